//! `state`, `list`, `logs`, `ps` and `metrics`: what a task is doing.

use std::path::Path;
use std::sync::Arc;

use berth_bus::Call;
use berth_proto::task as pb;
use berth_proto::Timestamp;

use super::shim_error;
use crate::error::TaskError;
use crate::shim::protocol::{EXEC_DIR, STDERR_FILE, STDOUT_FILE};
use crate::store::{ExecRecord, Exit, Status, TaskRecord};
use crate::TaskService;

fn exited_at(exit: Option<Exit>) -> Option<Timestamp> {
    exit.map(|e| Timestamp {
        unix_nanos: e.exited_at,
    })
}

fn exec_state(container_id: &str, generation: u64, exec_id: &str, exec: &ExecRecord) -> pb::State {
    let status = if exec.exit.is_some() {
        "stopped"
    } else {
        "running"
    };
    pb::State {
        container_id: container_id.to_string(),
        status: status.to_string(),
        pid: exec.pid,
        exit_status: exec.exit.map(|e| e.status).unwrap_or_default(),
        exited_at: exited_at(exec.exit),
        generation,
        exec_id: exec_id.to_string(),
        oom_killed: false,
        execs: Vec::new(),
        image: String::new(),
    }
}

fn state_of(container_id: &str, record: &TaskRecord) -> pb::State {
    pb::State {
        container_id: container_id.to_string(),
        status: record.status.as_str().to_string(),
        pid: record.pid,
        exit_status: record.exit.map(|e| e.status).unwrap_or_default(),
        exited_at: exited_at(record.exit),
        generation: record.generation,
        exec_id: String::new(),
        oom_killed: record.oom_killed,
        execs: record
            .execs
            .iter()
            .map(|(exec_id, exec)| exec_state(container_id, record.generation, exec_id, exec))
            .collect(),
        image: record.image.clone(),
    }
}

/// `state`: one task (or one of its exec processes) as this node knows it.
pub(crate) async fn state(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::StateRequest,
) -> berth_bus::Result<pb::StateReply> {
    let record = svc.record(call.namespace(), &req.container_id)?;
    if req.exec_id.is_empty() {
        return Ok(pb::StateReply {
            state: Some(state_of(&req.container_id, &record)),
        });
    }
    let exec = record.execs.get(&req.exec_id).ok_or_else(|| {
        berth_bus::Error::not_found(format!(
            "no exec {} in container {}",
            req.exec_id, req.container_id
        ))
    })?;
    Ok(pb::StateReply {
        state: Some(exec_state(
            &req.container_id,
            record.generation,
            &req.exec_id,
            exec,
        )),
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

/// `logs`: a range of the task's (or an exec's) stdout or stderr, kept apart
/// in the shim's state directory. `eof` once the process has exited and the
/// range reaches the end of the stream. A task that replaced a stopped one
/// of the same container appends to the output its delete kept.
pub(crate) async fn logs(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::LogsRequest,
) -> berth_bus::Result<pb::LogsReply> {
    let record = svc.record(call.namespace(), &req.container_id)?;
    let name = match pb::Stream::try_from(req.stream) {
        Ok(pb::Stream::Stderr) => STDERR_FILE,
        _ => STDOUT_FILE,
    };
    let mut dir = svc.paths.shim_state(call.namespace(), &req.container_id);
    let exited = if req.exec_id.is_empty() {
        matches!(record.status, Status::Stopped | Status::Unknown)
    } else {
        let exec = record.execs.get(&req.exec_id).ok_or_else(|| {
            berth_bus::Error::not_found(format!(
                "no exec {} in container {}",
                req.exec_id, req.container_id
            ))
        })?;
        dir = dir.join(EXEC_DIR).join(&req.exec_id);
        exec.exit.is_some()
    };
    let path = dir.join(name);
    let max = svc.client.max_body() as i64;
    let length = if req.length <= 0 {
        max
    } else {
        req.length.min(max)
    };
    let offset = req.offset.max(0) as u64;
    let (data, size) =
        crate::on_blocking_thread(move || read_range(&path, offset, length as usize)).await??;
    let eof = exited && offset + data.len() as u64 >= size;
    Ok(pb::LogsReply {
        data: data.into(),
        eof,
        size: size as i64,
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

/// `ps`: the task's processes (`runc ps`) with their command lines.
pub(crate) async fn ps(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::PsRequest,
) -> berth_bus::Result<pb::PsReply> {
    let container_id = req.container_id.as_str();
    let record = svc.record(call.namespace(), container_id)?;
    if matches!(record.status, Status::Stopped | Status::Unknown) {
        return Ok(pb::PsReply::default());
    }
    let mut pids = svc
        .shim_client(&record)
        .ps()
        .await
        .map_err(shim_error(container_id))?;
    pids.sort_unstable();
    let processes = pids
        .into_iter()
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let command = cmdline
                .split(|b| *b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| String::from_utf8_lossy(arg).into_owned())
                .collect::<Vec<_>>()
                .join(" ");
            pb::ProcessInfo { pid, command }
        })
        .collect();
    Ok(pb::PsReply { processes })
}

/// `metrics`: what the task's cgroup counted. `FailedPrecondition` when the
/// task's cgroup is not known.
pub(crate) async fn metrics(
    svc: Arc<TaskService>,
    call: Call,
    req: pb::MetricsRequest,
) -> berth_bus::Result<pb::MetricsReply> {
    let record = svc.record(call.namespace(), &req.container_id)?;
    if record.cgroups.is_empty() {
        return Err(TaskError::State {
            container_id: req.container_id,
            status: record.status.as_str(),
            reason: "its cgroup is not known",
        }
        .into());
    }
    let suffix = crate::spec::cgroups_path(call.namespace(), &req.container_id);
    crate::on_blocking_thread(move || crate::cgroup::metrics(&record.cgroups, &suffix)).await
}
