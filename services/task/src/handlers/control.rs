//! `kill`, `stop`, `pause`, `resume`, `update`, `stdin` and `resize`:
//! acting on a running task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_bus::Call;
use berth_proto::task as pb;

use super::{require_status, shim_error, task_event};
use crate::error::{Result, TaskError};
use crate::shim_client::ShimClientError;
use crate::spec;
use crate::store::{Exit, Status};
use crate::TaskService;

/// How long `stop` waits when the caller names no timeout, as docker does.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `stop` waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// `kill`: signals the init, or every process of the container.
/// `FailedPrecondition` once the task has exited. Not recorded by request
/// id: sending a signal again is what a retry means.
pub(crate) async fn kill(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::KillRequest,
) -> berth_bus::Result<pb::KillReply> {
    call.record("container_id", &req.container_id);
    let signal = i32::try_from(req.signal).unwrap_or(i32::MAX);
    if !req.exec_id.is_empty() {
        let record = svc.record(call.namespace(), &req.container_id)?;
        svc.shim_client(&record)
            .kill_exec(&req.exec_id, signal)
            .await
            .map_err(shim_error(&req.container_id))?;
        return Ok(pb::KillReply {});
    }
    signal_task(&svc, call.namespace(), &req.container_id, signal, req.all).await?;
    Ok(pb::KillReply {})
}

async fn signal_task(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    signal: i32,
    all: bool,
) -> Result<()> {
    let record = svc.record(namespace, container_id)?;
    if matches!(record.status, Status::Stopped | Status::Unknown) {
        return Err(TaskError::State {
            container_id: container_id.to_string(),
            status: record.status.as_str(),
            reason: "there is no process to signal",
        });
    }
    svc.shim_client(&record)
        .kill(signal, all)
        .await
        .map_err(|err| match err {
            ShimClientError::Shim { message, .. } => TaskError::State {
                container_id: container_id.to_string(),
                status: "not running",
                reason: if message.contains("not running") {
                    "there is no process to signal"
                } else {
                    "runc refused the signal"
                },
            },
            source => TaskError::Shim {
                container_id: container_id.to_string(),
                source,
            },
        })
}

/// `stop`: the image's stop signal, then SIGKILL to every process after the
/// timeout; answers with the exit. A paused task is resumed first, since a
/// frozen process cannot act on a signal.
pub(crate) async fn stop(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::StopRequest,
) -> berth_bus::Result<pb::StopReply> {
    call.record("container_id", &req.container_id);
    let namespace = call.namespace();
    let container_id = req.container_id.as_str();
    let record = svc.record(namespace, container_id)?;
    if let Some(exit) = record.exit {
        return Ok(pb::StopReply {
            exit_status: exit.status,
            killed: false,
        });
    }
    if record.status == Status::Paused {
        resume_task(&svc, &call, container_id).await?;
    }
    let timeout = match req.timeout_seconds {
        0 => DEFAULT_STOP_TIMEOUT,
        seconds => Duration::from_secs(seconds.into()),
    };

    let signal = stop_signal(&svc, namespace, container_id);
    if signal_task(&svc, namespace, container_id, signal, false)
        .await
        .is_ok()
    {
        if let Some(exit) = wait_exit(&svc, namespace, container_id, timeout).await? {
            return Ok(pb::StopReply {
                exit_status: exit.status,
                killed: false,
            });
        }
    }
    // The process ignored the signal (or was gone already): SIGKILL all.
    let _ = signal_task(&svc, namespace, container_id, libc::SIGKILL, true).await;
    match wait_exit(&svc, namespace, container_id, KILL_WAIT).await? {
        Some(exit) => Ok(pb::StopReply {
            exit_status: exit.status,
            killed: true,
        }),
        None => Err(berth_bus::Error::new(
            berth_bus::Code::DeadlineExceeded,
            format!("container {container_id} did not exit within {KILL_WAIT:?} of SIGKILL"),
        )),
    }
}

/// The stop signal the bundle's spec records, SIGTERM without one.
fn stop_signal(svc: &TaskService, namespace: &str, container_id: &str) -> i32 {
    let config = svc
        .paths
        .bundle(namespace, container_id)
        .join("config.json");
    oci_spec::runtime::Spec::load(config)
        .map(|spec| spec::stop_signal(&spec))
        .unwrap_or(libc::SIGTERM)
}

/// Waits until the task's exit is recorded, at most `limit`.
async fn wait_exit(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    limit: Duration,
) -> Result<Option<Exit>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(exit) = svc.record(namespace, container_id)?.exit {
            return Ok(Some(exit));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `pause`: freezes every process of a running task; `tasks.paused`.
pub(crate) async fn pause(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::PauseRequest,
) -> berth_bus::Result<pb::PauseReply> {
    call.record("container_id", &req.container_id);
    let container_id = req.container_id.as_str();
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(&call)? {
        return Ok(reply);
    }
    let mut record = svc.record(namespace, container_id)?;
    require_status(
        container_id,
        &record,
        &[Status::Running],
        "only a running task can pause",
    )?;
    svc.shim_client(&record)
        .pause()
        .await
        .map_err(shim_error(container_id))?;
    record.status = Status::Paused;
    let event = task_event(container_id, &record);
    let reply = pb::PauseReply {};
    svc.commit_change(
        &call,
        container_id,
        &record,
        &["tasks.paused"],
        &event,
        &reply,
    )?;
    tracing::info!(namespace, container_id, "task paused");
    Ok(reply)
}

/// `resume`: thaws a paused task; `tasks.resumed`.
pub(crate) async fn resume(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::ResumeRequest,
) -> berth_bus::Result<pb::ResumeReply> {
    call.record("container_id", &req.container_id);
    Ok(resume_task(&svc, &call, &req.container_id).await?)
}

async fn resume_task(
    svc: &TaskService,
    call: &Call,
    container_id: &str,
) -> Result<pb::ResumeReply> {
    let namespace = call.namespace();
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    if let Some(reply) = svc.replay(call)? {
        return Ok(reply);
    }
    let mut record = svc.record(namespace, container_id)?;
    require_status(
        container_id,
        &record,
        &[Status::Paused],
        "only a paused task can resume",
    )?;
    svc.shim_client(&record)
        .resume()
        .await
        .map_err(shim_error(container_id))?;
    record.status = Status::Running;
    let event = task_event(container_id, &record);
    let reply = pb::ResumeReply {};
    svc.commit_change(
        call,
        container_id,
        &record,
        &["tasks.resumed"],
        &event,
        &reply,
    )?;
    tracing::info!(namespace, container_id, "task resumed");
    Ok(reply)
}

/// `update`: new memory, CPU or process limits for a live task (`runc
/// update`); a limit of 0 is left as it is.
pub(crate) async fn update(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::UpdateRequest,
) -> berth_bus::Result<pb::UpdateReply> {
    call.record("container_id", &req.container_id);
    let container_id = req.container_id.as_str();
    let record = svc.record(call.namespace(), container_id)?;
    require_status(
        container_id,
        &record,
        &[Status::Created, Status::Running, Status::Paused],
        "the task has exited",
    )?;
    let limits = spec::Limits {
        memory_bytes: req.memory_bytes,
        cpu_millis: req.cpu_millis,
        pids: req.pids_limit,
    };
    let spec_err = |source| TaskError::Spec {
        container_id: container_id.to_string(),
        source,
    };
    let resources = spec::apply_limits(Default::default(), &limits).map_err(spec_err)?;
    let resources = serde_json::to_value(resources)
        .map_err(|err| berth_bus::Error::internal(err.to_string()))?;
    svc.shim_client(&record)
        .update(resources)
        .await
        .map_err(shim_error(container_id))?;
    Ok(pb::UpdateReply {})
}

/// `stdin`: bytes for the init's stdin or terminal, in order; `close` ends
/// the input. `FailedPrecondition` when the task was made without stdin.
///
/// # Limitations
/// Not recorded by request id: a retry after a timeout may write the bytes
/// twice.
pub(crate) async fn stdin(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::StdinRequest,
) -> berth_bus::Result<pb::StdinReply> {
    let container_id = req.container_id.as_str();
    let record = svc.record(call.namespace(), container_id)?;
    let shim = svc.shim_client(&record);
    let refused = |err: ShimClientError| -> berth_bus::Error {
        match err {
            ShimClientError::Shim { message, .. } if message.contains("no open stdin") => {
                berth_bus::Error::precondition(format!(
                    "container {container_id} was created without stdin"
                ))
            }
            source => TaskError::Shim {
                container_id: container_id.to_string(),
                source,
            }
            .into(),
        }
    };
    let exec_id = (!req.exec_id.is_empty()).then_some(req.exec_id.as_str());
    if !req.data.is_empty() {
        shim.stdin(exec_id, req.data.to_vec())
            .await
            .map_err(refused)?;
    }
    if req.close {
        shim.close_stdin(exec_id).await.map_err(refused)?;
    }
    Ok(pb::StdinReply {})
}

/// `resize`: the init's terminal size; a no-op without a terminal.
pub(crate) async fn resize(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::ResizeRequest,
) -> berth_bus::Result<pb::ResizeReply> {
    let container_id = req.container_id.as_str();
    let record = svc.record(call.namespace(), container_id)?;
    let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
    let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
    svc.shim_client(&record)
        .resize(
            (!req.exec_id.is_empty()).then_some(req.exec_id.as_str()),
            cols,
            rows,
        )
        .await
        .map_err(shim_error(container_id))?;
    Ok(pb::ResizeReply {})
}
