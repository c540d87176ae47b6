//! `exec`: another process in a running task's namespaces and cgroup, with
//! its own output, state and exit (`tasks.exec-added` and
//! `tasks.exec-started` at once, then `tasks.exec-exited`), removed with
//! `delete` under its exec id.

use std::path::Path;
use std::sync::Arc;

use berth_bus::Call;
use berth_proto::task as pb;
use berth_proto::Timestamp;

use super::{require_status, shim_error, task_event};
use crate::error::{Result, TaskError};
use crate::shim::protocol::check_exec_id;
use crate::shim_client::ShimClient;
use crate::spec;
use crate::store::{ExecRecord, Exit, Status, TaskRecord};
use crate::TaskService;

/// `exec`: starts `args` in the task as `exec_id`; `FailedPrecondition`
/// unless the task runs, `AlreadyExists` for an exec id in use.
pub(crate) async fn exec(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::ExecRequest,
) -> berth_bus::Result<pb::ExecReply> {
    call.record("container_id", &req.container_id);
    check_exec_id(&req.exec_id).map_err(berth_bus::Error::invalid)?;
    if req.args.is_empty() {
        return Err(berth_bus::Error::invalid(format!(
            "exec {} in container {} names no command",
            req.exec_id, req.container_id
        )));
    }
    Ok(start_exec(&svc, &call, &req).await?)
}

async fn start_exec(
    svc: &Arc<TaskService>,
    call: &Call,
    req: &pb::ExecRequest,
) -> Result<pb::ExecReply> {
    let namespace = call.namespace();
    let container_id = req.container_id.as_str();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let mut record = svc.record(namespace, container_id)?;
    require_status(
        container_id,
        &record,
        &[Status::Running],
        "exec needs a running task",
    )?;
    if record.execs.contains_key(&req.exec_id) {
        return Err(TaskError::Bus(berth_bus::Error::already_exists(format!(
            "exec {} exists already in container {container_id}",
            req.exec_id
        ))));
    }

    let bundle = svc.paths.bundle(namespace, container_id);
    let process = exec_process(&bundle, req).map_err(|source| TaskError::Spec {
        container_id: container_id.to_string(),
        source,
    })?;
    let pid = svc
        .shim_client(&record)
        .exec(&req.exec_id, process, req.stdin || req.tty)
        .await
        .map_err(shim_error(container_id))?;

    record
        .execs
        .insert(req.exec_id.clone(), ExecRecord { pid, exit: None });
    let mut event = task_event(container_id, &record);
    event.pid = pid;
    event.exec_id = req.exec_id.clone();
    let reply = pb::ExecReply { pid };
    svc.commit_change(
        call,
        container_id,
        &record,
        // berth adds and starts an exec in one step; watchers that follow
        // both stages, as containerd has them, see both.
        &["tasks.exec-added", "tasks.exec-started"],
        &event,
        &reply,
    )?;
    tracing::info!(namespace, container_id, exec_id = %req.exec_id, pid, "exec started");

    watch_exec(svc.clone(), namespace, container_id, &record, &req.exec_id);
    Ok(reply)
}

/// The task's own process with the exec's command, environment, working
/// directory and user over it.
fn exec_process(
    bundle: &Path,
    req: &pb::ExecRequest,
) -> Result<serde_json::Value, spec::SpecError> {
    let config = bundle.join("config.json");
    let task_spec = oci_spec::runtime::Spec::load(&config).map_err(spec::SpecError::Build)?;
    let mut process = task_spec.process().clone().unwrap_or_default();
    process.set_args(Some(req.args.clone()));
    process.set_terminal(Some(req.tty));
    let mut env = process.env().clone().unwrap_or_default();
    for entry in &req.env {
        let name = entry.split('=').next().unwrap_or_default();
        env.retain(|existing| existing.split('=').next() != Some(name));
        env.push(entry.clone());
    }
    if req.tty && !env.iter().any(|entry| entry.starts_with("TERM=")) {
        env.push("TERM=xterm".to_string());
    }
    process.set_env(Some(env));
    if !req.working_dir.is_empty() {
        process.set_cwd(req.working_dir.clone().into());
    }
    if !req.user.is_empty() {
        let user = spec::resolve_user(&bundle.join(spec::ROOTFS_DIR), &req.user)?;
        let mut oci_user = process.user().clone();
        oci_user.set_uid(user.uid);
        oci_user.set_gid(user.gid);
        oci_user.set_additional_gids(Some(user.additional_gids));
        process.set_user(oci_user);
    }
    serde_json::to_value(process).map_err(|err| spec::SpecError::Io {
        path: config,
        source: err.into(),
    })
}

/// Waits for the exec's exit in the background and records it with
/// `tasks.exec-exited`.
pub(crate) fn watch_exec(
    svc: Arc<TaskService>,
    namespace: &str,
    container_id: &str,
    record: &TaskRecord,
    exec_id: &str,
) {
    let shim = ShimClient::at_socket(record.socket.clone());
    let (namespace, container_id, exec_id) = (
        namespace.to_string(),
        container_id.to_string(),
        exec_id.to_string(),
    );
    let generation = record.generation;
    tokio::spawn(async move {
        let shutdown = svc.shutdown.clone();
        let exit = tokio::select! {
            exit = shim.wait_exec(&exec_id) => exit,
            _ = shutdown.cancelled() => return,
        };
        let (exit, seen) = match exit {
            Ok(exit) => {
                let exit = Exit {
                    status: exit.status.max(0) as u32,
                    exited_at: exit.exited_at as i64,
                };
                (exit, true)
            }
            // The shim is gone or forgot the exec: nothing saw it end.
            Err(_) => {
                let exit = Exit {
                    status: crate::monitor::UNKNOWN_EXIT,
                    exited_at: Timestamp::now().unix_nanos,
                };
                (exit, false)
            }
        };
        record_exec_exit(
            &svc,
            &namespace,
            &container_id,
            generation,
            &exec_id,
            exit,
            seen,
        )
        .await;
    });
}

/// Records an exec's exit and queues `tasks.exec-exited`, unless the task
/// was replaced meanwhile or the exit is recorded already. The
/// transaction runs on a blocking thread, as the init's exit does (see
/// `monitor::record_exit`). `seen` says whether the shim saw the exit
/// (else its time is made here, and a redo would not make the same event).
async fn record_exec_exit(
    svc: &Arc<TaskService>,
    namespace: &str,
    container_id: &str,
    generation: u64,
    exec_id: &str,
    exit: Exit,
    seen: bool,
) {
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    let outcome = {
        let svc = svc.clone();
        let (namespace, container_id, exec_id) = (
            namespace.to_string(),
            container_id.to_string(),
            exec_id.to_string(),
        );
        crate::on_blocking_thread(move || {
            commit_exec_exit(
                &svc,
                &namespace,
                &container_id,
                generation,
                &exec_id,
                exit,
                seen,
            )
        })
        .await
        .and_then(|outcome| outcome)
    };
    match outcome {
        Ok(true) => {
            svc.store.outbox.wake().notify_one();
            tracing::info!(
                namespace,
                container_id,
                exec_id,
                exit_code = exit.status,
                "exec exited"
            );
        }
        Ok(false) => {}
        Err(err) => {
            tracing::error!(namespace, container_id, exec_id, error = %err, "exec exit not recorded")
        }
    }
}

/// The transaction of [`record_exec_exit`]: whether it recorded the exit.
fn commit_exec_exit(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    generation: u64,
    exec_id: &str,
    exit: Exit,
    seen: bool,
) -> berth_bus::Result<bool> {
    let mut txn = svc.store.env.write_txn()?;
    let Some(mut record) = svc.store.get(&txn, namespace, container_id)? else {
        return Ok(false);
    };
    if record.generation != generation {
        return Ok(false);
    }
    let Some(entry) = record.execs.get_mut(exec_id).filter(|e| e.exit.is_none()) else {
        return Ok(false);
    };
    entry.exit = Some(exit);
    let pid = entry.pid;
    svc.store.put(&mut txn, namespace, container_id, &record)?;
    let mut event = task_event(container_id, &record);
    event.pid = pid;
    event.exec_id = exec_id.to_string();
    event.exit_status = exit.status;
    event.exited_at = Some(Timestamp {
        unix_nanos: exit.exited_at,
    });
    // Ahead of the commit, as the init's exit goes (see
    // `monitor::commit_exit`), when the shim saw it: the time of the exit,
    // which the shim keeps, tells apart two execs that reused an id.
    let topic = "tasks.exec-exited";
    let key = format!(
        "{topic}-{namespace}-{container_id}-{generation}-{exec_id}-{}",
        exit.exited_at
    );
    let outbox = &svc.store.outbox;
    let keyed = outbox.push_keyed(&mut txn, namespace, topic, generation, &event, &key)?;
    if seen {
        outbox.send_ahead(&txn, vec![keyed])?;
    }
    txn.commit()?;
    Ok(true)
}

/// `delete` with an exec id: forgets an exited exec and its output.
pub(crate) async fn delete_exec(
    svc: &TaskService,
    call: &Call,
    container_id: &str,
    exec_id: &str,
) -> Result<pb::DeleteReply> {
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let mut record = svc.record(namespace, container_id)?;
    let Some(entry) = record.execs.get(exec_id).copied() else {
        return Err(TaskError::Bus(berth_bus::Error::not_found(format!(
            "no exec {exec_id} in container {container_id}"
        ))));
    };
    let Some(exit) = entry.exit else {
        return Err(TaskError::State {
            container_id: container_id.to_string(),
            status: "running an exec",
            reason: "an exec process is deleted once it has exited",
        });
    };
    // A shim that is gone took the exec's files with it.
    let _ = svc.shim_client(&record).delete_exec(exec_id).await;
    record.execs.remove(exec_id);
    let reply = pb::DeleteReply {
        exit_status: exit.status,
        exited_at: Some(Timestamp {
            unix_nanos: exit.exited_at,
        }),
    };
    let mut txn = svc.store.env.write_txn()?;
    svc.store.put(&mut txn, namespace, container_id, &record)?;
    svc.store.requests.record(&mut txn, call, &reply)?;
    txn.commit()?;
    Ok(reply)
}
