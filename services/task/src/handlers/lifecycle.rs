//! `create`, `start` and `delete`: the task from reservation to removal.

use std::sync::Arc;

use berth_bus::{Call, Code};
use berth_proto::metadata as mpb;
use berth_proto::task as pb;
use berth_proto::Timestamp;

use super::{io_err, shim_error, task_event};
use crate::error::{Result, TaskError};
use crate::shim_client::{spawn_shim_at, ShimClient, ShimClientError, Spawn};
use crate::spec::{self, ImageConfig, RunOptions};
use crate::store::{Status, TaskRecord};
use crate::{monitor, remove_tree, TaskService};

/// A generation no earlier reservation of this container had: the time.
fn new_generation() -> u64 {
    Timestamp::now().unix_nanos.max(1) as u64
}

/// `create`: reserves the task in metadata, mounts the rootfs, writes the
/// bundle and starts the shim (`runc create`, or `runc run --detach` when
/// the request says start too). `FailedPrecondition` when the
/// container has a task already or lives on another node; `InvalidArgument`
/// when its options or image cannot run (runc's words); `PermissionDenied`
/// when they leave the confinement of a confined namespace.
pub(crate) async fn create(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::CreateRequest,
) -> berth_bus::Result<pb::CreateReply> {
    Ok(create_task(&svc, &call, &req.container_id, req.start).await?)
}

async fn create_task(
    svc: &Arc<TaskService>,
    call: &Call,
    container_id: &str,
    start: bool,
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
    if svc.confined.iter().any(|confined| confined == namespace) {
        let options = container.options.clone().unwrap_or_default();
        check_confinement(namespace, container_id, &options)?;
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
    let record = match make_task(svc, namespace, &container, generation, start).await {
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
    if start {
        svc.store
            .outbox
            .push(&mut txn, namespace, "tasks.start", generation, &event)?;
    }
    svc.store.requests.record(&mut txn, call, &reply)?;
    txn.commit()?;
    tracing::info!(
        namespace,
        container_id,
        pid = record.pid,
        start,
        "task created"
    );

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
    start: bool,
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

    // The shim runs `runc create` and reports once it is done. An earlier
    // task's output may be there, kept by its delete for this one to
    // append to.
    let state = svc.paths.shim_state(namespace, container_id);
    let socket = svc.paths.socket(namespace, container_id);
    let shim = spawn_shim_at(
        &svc.shim,
        container_id,
        &bundle,
        &state,
        &socket,
        svc.runc.as_deref(),
        Spawn {
            stdin: options.stdin || options.tty,
            start,
        },
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
        status: if start {
            Status::Running
        } else {
            Status::Created
        },
        pid,
        pid_start_time: crate::shim::protocol::process_start_time(pid).unwrap_or_default(),
        exit: None,
        socket,
        exit_acked: false,
        cgroups: crate::cgroup::of_pid(pid),
        oom_killed: false,
        execs: Default::default(),
        image: container.image.clone(),
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

/// Refuses the options that would take a container of a confined
/// namespace out of the default confinement, naming the first one.
fn check_confinement(namespace: &str, container_id: &str, options: &mpb::RunOptions) -> Result<()> {
    let asked = [
        (options.privileged, "run privileged"),
        (options.host_network, "share the host's network"),
        (!options.binds.is_empty(), "bind-mount host paths"),
        (!options.cap_add.is_empty(), "add capabilities"),
        (options.seccomp_unconfined, "run without seccomp"),
        (
            !options.seccomp_profile.is_empty(),
            "replace the seccomp profile",
        ),
    ];
    match asked.into_iter().find(|(asked, _)| *asked) {
        Some((_, what)) => Err(TaskError::Confined {
            container_id: container_id.to_string(),
            namespace: namespace.to_string(),
            what,
        }),
        None => Ok(()),
    }
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
        binds: options
            .binds
            .iter()
            .map(|bind| spec::Bind {
                source: bind.source.clone().into(),
                destination: bind.destination.clone(),
                readonly: bind.readonly,
            })
            .collect(),
        tmpfs: options.tmpfs.clone(),
        limits: spec::Limits {
            memory_bytes: options.memory_bytes,
            cpu_millis: options.cpu_millis,
            pids: options.pids_limit,
        },
        cap_add: options.cap_add.clone(),
        cap_drop: options.cap_drop.clone(),
        privileged: options.privileged,
        seccomp_unconfined: options.seccomp_unconfined,
        seccomp_profile: some(&options.seccomp_profile),
        allow_new_privileges: options.allow_new_privileges,
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
        .map_err(shim_error(container_id))?;

    record.status = Status::Running;
    record.pid = pid;
    let reply = pb::StartReply { pid };
    let event = task_event(container_id, &record);
    svc.commit_change(
        call,
        container_id,
        &record,
        &["tasks.start"],
        &event,
        &reply,
    )?;
    tracing::info!(namespace, container_id, pid, "task started");
    Ok(reply)
}

/// `delete`: removes a task that is not running: runc's state, the rootfs
/// mount, the bundle, the shim's files and the reservation; returns the exit.
/// `FailedPrecondition` while it runs.
pub(crate) async fn delete(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::DeleteRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    if !req.exec_id.is_empty() {
        let reply = super::exec::delete_exec(&svc, &call, &req.container_id, &req.exec_id).await?;
        return Ok(reply);
    }
    Ok(delete_task(&svc, &call, &req.container_id, req.keep_output).await?)
}

async fn delete_task(
    svc: &TaskService,
    call: &Call,
    container_id: &str,
    keep_output: bool,
) -> Result<pb::DeleteReply> {
    call.record("container_id", container_id);
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let record = svc.record(namespace, container_id)?;
    if matches!(record.status, Status::Running | Status::Paused) {
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
    let suffix = spec::cgroups_path(namespace, container_id);
    crate::cgroup::remove_parents(&record.cgroups, &suffix);
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
    if let Err(err) = clear_shim_state(&state, keep_output) {
        tracing::warn!(path = %state.display(), error = %err, "shim state not removed");
    }
    tracing::info!(namespace, container_id, keep_output, "task deleted");
    Ok(reply)
}

/// Removes a shim's state directory, or with `keep_output` everything in it
/// but the init's stdout and stderr. A missing directory is fine.
///
/// # Limitations
/// A crash of the service between a delete's commit and this leaves the
/// directory, as it was before output was kept; a later task of a
/// container with the same id then appends to that output.
fn clear_shim_state(state: &std::path::Path, keep_output: bool) -> std::io::Result<()> {
    use crate::shim::protocol::{STDERR_FILE, STDOUT_FILE};
    if !keep_output {
        return remove_tree(state);
    }
    let entries = match std::fs::read_dir(state) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if name == STDOUT_FILE || name == STDERR_FILE {
            continue;
        }
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
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
