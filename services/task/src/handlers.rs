//! One function per op of `berth.v1.<namespace>.task.<node>.<op>`.
//!
//! Every op that changes a task takes that task's lock first, so a retry of
//! a request (same request id) sees the outcome of the first one, and a
//! start is always recorded before the exit that follows it.

use std::path::Path;
use std::sync::Arc;

use prost::Message;

use berth_bus::{Call, Code};
use berth_proto::metadata as mpb;
use berth_proto::task as pb;
use berth_proto::Timestamp;

use crate::error::{Result, TaskError};
use crate::shim_client::{spawn_shim_at, ShimClient, ShimClientError};
use crate::spec::{self, ImageConfig, RunOptions};
use crate::store::{Status, TaskRecord};
use crate::{monitor, remove_tree, TaskService};

impl TaskService {
    /// The first outcome of a retried request id, if this is a retry.
    fn replay<Rep: Message + Default>(&self, call: &Call) -> Result<Option<Rep>> {
        if call.request_id().is_none() {
            return Ok(None);
        }
        let txn = self.store.env.write_txn()?;
        Ok(self.store.requests.replay(&txn, call)?)
    }

    /// The record of a container's task, or `NotFound`.
    pub(crate) fn record(&self, namespace: &str, container_id: &str) -> Result<TaskRecord> {
        let txn = self.store.env.read_txn()?;
        self.store
            .get(&txn, namespace, container_id)?
            .ok_or_else(|| TaskError::NoTask {
                container_id: container_id.to_string(),
            })
    }

    fn shim_client(&self, record: &TaskRecord) -> ShimClient {
        ShimClient::at_socket(record.socket.clone())
    }
}

fn task_event(container_id: &str, record: &TaskRecord) -> pb::TaskEvent {
    let exit = record.exit;
    pb::TaskEvent {
        container_id: container_id.to_string(),
        pid: record.pid,
        exit_status: exit.map(|e| e.status).unwrap_or_default(),
        exited_at: exit.map(|e| Timestamp {
            unix_nanos: e.exited_at,
        }),
        oom_killed: false,
        boot_id: record.boot_id.clone(),
        pid_start_time: record.pid_start_time,
    }
}

/// A generation no earlier reservation of this container had: the time.
fn new_generation() -> u64 {
    Timestamp::now().unix_nanos.max(1) as u64
}

/// `create`: reserves the task in metadata, mounts the rootfs, writes the
/// bundle and starts the shim (`runc create`). `FailedPrecondition` when the
/// container has a task already or lives on another node; `InvalidArgument`
/// when its options or image cannot run (runc's words).
pub(crate) async fn create(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::CreateRequest,
) -> berth_bus::Result<pb::CreateReply> {
    Ok(create_task(&svc, &call, &req.container_id).await?)
}

async fn create_task(
    svc: &Arc<TaskService>,
    call: &Call,
    container_id: &str,
) -> Result<pb::CreateReply> {
    call.record("container_id", container_id);
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    if let Ok(record) = svc.record(namespace, container_id) {
        return Err(TaskError::State {
            container_id: container_id.to_string(),
            status: record.status.as_str(),
            reason: "the container has a task already",
        });
    }

    // The container record says what to run; metadata decides, on that
    // record, whether a task may be made for it.
    let metadata = svc.metadata(namespace);
    let container = metadata
        .get_container(&mpb::GetContainerRequest {
            container_id: container_id.to_string(),
        })
        .await?
        .container
        .unwrap_or_default();
    if !container.node.is_empty() && container.node != svc.node {
        return Err(TaskError::OtherNode {
            container_id: container_id.to_string(),
            node: container.node,
        });
    }
    let generation = new_generation();
    metadata
        .reserve_task(&mpb::ReserveTaskRequest {
            container_id: container_id.to_string(),
            node: svc.node.clone(),
            generation,
            boot_id: svc.boot_id.clone(),
        })
        .await?;

    // From here a failure undoes what was made and gives the reservation back.
    let record = match make_task(svc, namespace, &container, generation).await {
        Ok(record) => record,
        Err(err) => {
            undo_create(svc, namespace, container_id).await;
            release(svc, namespace, container_id, generation).await;
            return Err(err);
        }
    };

    let reply = pb::CreateReply { pid: record.pid };
    let mut txn = svc.store.env.write_txn()?;
    svc.store.put(&mut txn, namespace, container_id, &record)?;
    let event = task_event(container_id, &record);
    svc.store
        .outbox
        .push(&mut txn, namespace, "tasks.create", generation, &event)?;
    svc.store.requests.record(&mut txn, call, &reply)?;
    txn.commit()?;
    tracing::info!(namespace, container_id, pid = record.pid, "task created");

    monitor::watch(
        svc.clone(),
        namespace.to_string(),
        container_id.to_string(),
        record,
    );
    Ok(reply)
}

/// The bundle, the rootfs mount and the shim of a reserved task.
async fn make_task(
    svc: &Arc<TaskService>,
    namespace: &str,
    container: &mpb::Container,
    generation: u64,
) -> Result<TaskRecord> {
    let container_id = container.container_id.as_str();
    let options = container.options.clone().unwrap_or_default();
    let image = image_config(svc, namespace, container_id, &options.image_config_digest).await?;
    let mounts = svc
        .snapshot(namespace)
        .mounts(&berth_proto::snapshot::MountsRequest {
            key: container.snapshot_key.clone(),
        })
        .await?
        .mounts;

    // The bundle: the rootfs mounted from the snapshot, then the spec
    // (which reads users from the mounted rootfs) beside it.
    let bundle = svc.paths.bundle(namespace, container_id);
    let rootfs = bundle.join(spec::ROOTFS_DIR);
    std::fs::create_dir_all(&rootfs).map_err(io_err("create", &rootfs))?;
    let mount_err = |source| TaskError::Mount {
        container_id: container_id.to_string(),
        source,
    };
    for mount in &mounts {
        let spec = berth_mount::MountSpec {
            fstype: mount.r#type.clone(),
            source: mount.source.clone(),
            options: mount.options.clone(),
        };
        berth_mount::mount(&spec, &rootfs).map_err(mount_err)?;
    }
    let spec_err = |source| TaskError::Spec {
        container_id: container_id.to_string(),
        source,
    };
    let run = run_options(&options);
    let mut oci =
        spec::build_spec(namespace, container_id, &rootfs, &image, &run).map_err(spec_err)?;
    spec::prepare_rootfs(&bundle, &rootfs, &mut oci).map_err(spec_err)?;
    spec::write_config(&bundle, &oci).map_err(spec_err)?;

    // The shim runs `runc create` and reports once it is done.
    let state = svc.paths.shim_state(namespace, container_id);
    let socket = svc.paths.socket(namespace, container_id);
    let shim = spawn_shim_at(
        &svc.shim,
        container_id,
        &bundle,
        &state,
        &socket,
        svc.runc.as_deref(),
    )
    .await
    .map_err(|err| match err {
        ShimClientError::Start { message, .. } => TaskError::Runc {
            container_id: container_id.to_string(),
            message,
        },
        source => TaskError::Shim {
            container_id: container_id.to_string(),
            source,
        },
    })?;
    let shim_err = |source| TaskError::Shim {
        container_id: container_id.to_string(),
        source,
    };
    let pid = shim.state().await.map_err(shim_err)?.pid;
    Ok(TaskRecord {
        generation,
        boot_id: svc.boot_id.clone(),
        status: Status::Created,
        pid,
        pid_start_time: crate::shim::protocol::process_start_time(pid).unwrap_or_default(),
        exit: None,
        socket,
        exit_acked: false,
    })
}

/// The process fields of the image's config blob; none without one.
async fn image_config(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    digest: &str,
) -> Result<ImageConfig> {
    if digest.is_empty() {
        return Ok(ImageConfig::default());
    }
    let bytes = svc.content(namespace).read_all(digest).await?;
    let malformed = |source| TaskError::ImageConfig {
        container_id: container_id.to_string(),
        digest: digest.to_string(),
        source,
    };
    let mut file: serde_json::Value = serde_json::from_slice(&bytes).map_err(malformed)?;
    let config = file
        .get_mut("config")
        .map(serde_json::Value::take)
        .unwrap_or_default();
    if config.is_null() {
        return Ok(ImageConfig::default());
    }
    serde_json::from_value(config).map_err(malformed)
}

/// The caller's overrides as the spec builder takes them.
fn run_options(options: &mpb::RunOptions) -> RunOptions {
    let some = |value: &str| (!value.is_empty()).then(|| value.to_string());
    RunOptions {
        args: options.args.clone(),
        entrypoint: options.entrypoint_set.then(|| options.entrypoint.clone()),
        env: options.env.clone(),
        working_dir: some(&options.working_dir),
        user: some(&options.user),
        hostname: some(&options.hostname),
        host_network: options.host_network,
        readonly_rootfs: options.readonly_rootfs,
        tty: options.tty,
    }
}

/// Removes what a create made on the node: runc's state (through a live
/// shim), the rootfs mount, the bundle and the shim's files.
async fn undo_create(svc: &TaskService, namespace: &str, container_id: &str) {
    let socket = svc.paths.socket(namespace, container_id);
    if socket.exists() {
        let _ = ShimClient::at_socket(socket.clone()).delete().await;
        let _ = std::fs::remove_file(&socket);
    }
    remove_bundle(svc, namespace, container_id);
    let state = svc.paths.shim_state(namespace, container_id);
    if let Err(err) = remove_tree(&state) {
        tracing::warn!(path = %state.display(), error = %err, "shim state not removed");
    }
}

fn remove_bundle(svc: &TaskService, namespace: &str, container_id: &str) {
    let bundle = svc.paths.bundle(namespace, container_id);
    let rootfs = bundle.join(spec::ROOTFS_DIR);
    if let Err(err) = berth_mount::unmount(&rootfs) {
        tracing::warn!(path = %rootfs.display(), error = %err, "rootfs not unmounted");
        return;
    }
    if let Err(err) = remove_tree(&bundle) {
        tracing::warn!(path = %bundle.display(), error = %err, "bundle not removed");
    }
}

/// Gives a reservation back; a reservation already gone is fine.
async fn release(svc: &TaskService, namespace: &str, container_id: &str, generation: u64) {
    let released = svc
        .metadata(namespace)
        .release_task(&mpb::ReleaseTaskRequest {
            container_id: container_id.to_string(),
            generation,
        })
        .await;
    if let Err(err) = released {
        if err.code != Code::NotFound {
            tracing::warn!(namespace, container_id, error = %err, "task reservation not released");
        }
    }
}

/// `start`: runs the created process. `FailedPrecondition` when it was
/// started already or has exited.
pub(crate) async fn start(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::StartRequest,
) -> berth_bus::Result<pb::StartReply> {
    Ok(start_task(&svc, &call, &req.container_id).await?)
}

async fn start_task(svc: &TaskService, call: &Call, container_id: &str) -> Result<pb::StartReply> {
    call.record("container_id", container_id);
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let mut record = svc.record(namespace, container_id)?;
    if record.status != Status::Created {
        return Err(TaskError::State {
            container_id: container_id.to_string(),
            status: record.status.as_str(),
            reason: "only a created task can start",
        });
    }
    let pid = svc
        .shim_client(&record)
        .start()
        .await
        .map_err(|err| match err {
            ShimClientError::Shim { message, .. } => TaskError::Runc {
                container_id: container_id.to_string(),
                message,
            },
            source => TaskError::Shim {
                container_id: container_id.to_string(),
                source,
            },
        })?;

    record.status = Status::Running;
    record.pid = pid;
    let reply = pb::StartReply { pid };
    let mut txn = svc.store.env.write_txn()?;
    svc.store.put(&mut txn, namespace, container_id, &record)?;
    let event = task_event(container_id, &record);
    svc.store.outbox.push(
        &mut txn,
        namespace,
        "tasks.start",
        record.generation,
        &event,
    )?;
    svc.store.requests.record(&mut txn, call, &reply)?;
    txn.commit()?;
    tracing::info!(namespace, container_id, pid, "task started");
    Ok(reply)
}

/// `kill`: signals the init, or every process of the container.
/// `FailedPrecondition` once the task has exited. Not recorded by request
/// id: sending a signal again is what a retry means.
pub(crate) async fn kill(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::KillRequest,
) -> berth_bus::Result<pb::KillReply> {
    call.record("container_id", &req.container_id);
    let record = svc.record(call.namespace(), &req.container_id)?;
    if matches!(record.status, Status::Stopped | Status::Unknown) {
        return Err(TaskError::State {
            container_id: req.container_id,
            status: record.status.as_str(),
            reason: "there is no process to signal",
        }
        .into());
    }
    let signal = i32::try_from(req.signal).unwrap_or(i32::MAX);
    svc.shim_client(&record)
        .kill(signal, req.all)
        .await
        .map_err(|err| match err {
            ShimClientError::Shim { message, .. } => TaskError::State {
                container_id: req.container_id.clone(),
                status: "not running",
                reason: if message.contains("not running") {
                    "there is no process to signal"
                } else {
                    "runc refused the signal"
                },
            },
            source => TaskError::Shim {
                container_id: req.container_id.clone(),
                source,
            },
        })?;
    Ok(pb::KillReply {})
}

/// `delete`: removes a task that is not running: runc's state, the rootfs
/// mount, the bundle, the shim's files and the reservation; returns the exit.
/// `FailedPrecondition` while it runs.
pub(crate) async fn delete(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::DeleteRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    Ok(delete_task(&svc, &call, &req.container_id).await?)
}

async fn delete_task(
    svc: &TaskService,
    call: &Call,
    container_id: &str,
) -> Result<pb::DeleteReply> {
    call.record("container_id", container_id);
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let record = svc.record(namespace, container_id)?;
    if record.status == Status::Running {
        return Err(TaskError::State {
            container_id: container_id.to_string(),
            status: record.status.as_str(),
            reason: "kill it before deleting it",
        });
    }

    // runc's state goes with the shim; a shim that is gone left it to runc.
    let shim_exit = match svc.shim_client(&record).delete().await {
        Ok(exit) => exit,
        Err(ShimClientError::Connect { .. }) => {
            force_delete(svc, namespace, container_id).await;
            None
        }
        Err(source) => {
            return Err(TaskError::Shim {
                container_id: container_id.to_string(),
                source,
            })
        }
    };
    let exit = record.exit.or(shim_exit.map(|e| crate::store::Exit {
        status: e.status.max(0) as u32,
        exited_at: e.exited_at as i64,
    }));
    remove_bundle(svc, namespace, container_id);
    release(svc, namespace, container_id, record.generation).await;

    let reply = pb::DeleteReply {
        exit_status: exit.map(|e| e.status).unwrap_or(255),
        exited_at: exit.map(|e| Timestamp {
            unix_nanos: e.exited_at,
        }),
    };
    let mut txn = svc.store.env.write_txn()?;
    svc.store.delete(&mut txn, namespace, container_id)?;
    let mut event = task_event(container_id, &record);
    event.exit_status = reply.exit_status;
    event.exited_at = reply.exited_at;
    svc.store.outbox.push(
        &mut txn,
        namespace,
        "tasks.delete",
        record.generation,
        &event,
    )?;
    svc.store.requests.record(&mut txn, call, &reply)?;
    txn.commit()?;

    let _ = std::fs::remove_file(&record.socket);
    let state = svc.paths.shim_state(namespace, container_id);
    if let Err(err) = remove_tree(&state) {
        tracing::warn!(path = %state.display(), error = %err, "shim state not removed");
    }
    tracing::info!(namespace, container_id, "task deleted");
    Ok(reply)
}

/// `runc delete --force` without the shim, for a shim that died.
async fn force_delete(svc: &TaskService, namespace: &str, container_id: &str) {
    let root = svc
        .paths
        .shim_state(namespace, container_id)
        .join(crate::shim::protocol::RUNC_ROOT_DIR);
    let runc = svc.runc.clone().unwrap_or_else(|| "runc".into());
    let outcome = tokio::process::Command::new(runc)
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", container_id])
        .output()
        .await;
    if let Err(err) = outcome {
        tracing::warn!(namespace, container_id, error = %err, "runc delete not run");
    }
}

fn state_of(container_id: &str, record: &TaskRecord) -> pb::State {
    pb::State {
        container_id: container_id.to_string(),
        status: record.status.as_str().to_string(),
        pid: record.pid,
        exit_status: record.exit.map(|e| e.status).unwrap_or_default(),
        exited_at: record.exit.map(|e| Timestamp {
            unix_nanos: e.exited_at,
        }),
        generation: record.generation,
    }
}

/// `state`: one task as this node knows it.
pub(crate) async fn state(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::StateRequest,
) -> berth_bus::Result<pb::StateReply> {
    let record = svc.record(call.namespace(), &req.container_id)?;
    Ok(pb::StateReply {
        state: Some(state_of(&req.container_id, &record)),
    })
}

/// `list`: every task of the namespace on this node.
pub(crate) async fn list(
    svc: Arc<TaskService>,
    call: Call,
    _req: pb::ListRequest,
) -> berth_bus::Result<pb::ListReply> {
    let txn = svc.store.env.read_txn()?;
    let states = svc
        .store
        .list(&txn, call.namespace())?
        .iter()
        .map(|(container_id, record)| state_of(container_id, record))
        .collect();
    Ok(pb::ListReply { states })
}

/// `logs`: a range of the task's stdout or stderr, kept apart in the shim's
/// state directory. `eof` once the task has exited and the range reaches the
/// end of the stream.
pub(crate) async fn logs(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::LogsRequest,
) -> berth_bus::Result<pb::LogsReply> {
    let record = svc.record(call.namespace(), &req.container_id)?;
    let name = match pb::Stream::try_from(req.stream) {
        Ok(pb::Stream::Stderr) => crate::shim::protocol::STDERR_FILE,
        _ => crate::shim::protocol::STDOUT_FILE,
    };
    let path = svc
        .paths
        .shim_state(call.namespace(), &req.container_id)
        .join(name);
    let max = svc.client.max_body() as i64;
    let length = if req.length <= 0 {
        max
    } else {
        req.length.min(max)
    };
    let offset = req.offset.max(0) as u64;
    let (data, size) =
        tokio::task::spawn_blocking(move || read_range(&path, offset, length as usize))
            .await
            .map_err(|err| berth_bus::Error::internal(err.to_string()))??;
    let exited = matches!(record.status, Status::Stopped | Status::Unknown);
    let eof = exited && offset + data.len() as u64 >= size;
    Ok(pb::LogsReply {
        data: data.into(),
        eof,
    })
}

/// Up to `length` bytes of `path` at `offset`, and the file's size; a
/// missing file is empty.
fn read_range(path: &Path, offset: u64, length: usize) -> berth_bus::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(err) => return Err(err.into()),
    };
    let size = file.metadata()?.len();
    if offset >= size {
        return Ok((Vec::new(), size));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::with_capacity(length.min((size - offset) as usize));
    file.take(length as u64).read_to_end(&mut data)?;
    Ok((data, size))
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TaskError + 'a {
    move |source| TaskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
