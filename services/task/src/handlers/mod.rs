//! One function per op of `berth.v1.<namespace>.task.<node>.<op>`, one
//! file per group: [`lifecycle`] (create, start, delete), [`control`]
//! (kill, stop, pause, resume, update, stdin, resize), [`exec`] and
//! [`inspect`] (state, list, logs, ps, metrics).
//!
//! Every op that changes a task takes that task's lock first, so a retry of
//! a request (same request id) sees the outcome of the first one, and a
//! start is always recorded before the exit that follows it.

mod control;
mod exec;
mod inspect;
mod lifecycle;

use std::path::Path;

use heed::RwTxn;
use prost::Message;

use berth_bus::Call;
use berth_proto::task as pb;
use berth_proto::Timestamp;

use crate::error::{Result, TaskError};
use crate::shim_client::{ShimClient, ShimClientError};
use crate::store::{Status, TaskRecord};
use crate::TaskService;

pub(crate) use control::{kill, pause, resize, resume, stdin, stop, update};
pub(crate) use exec::{exec, watch_exec};
pub(crate) use inspect::{list, logs, metrics, ps, state};
pub(crate) use lifecycle::{create, delete, start};

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

    /// Writes `record` with the events that announce the change (`event`
    /// under each of `topics`, in order) and the request's outcome, in one
    /// transaction.
    fn commit_change<Rep: Message>(
        &self,
        call: &Call,
        container_id: &str,
        record: &TaskRecord,
        topics: &[&str],
        event: &pb::TaskEvent,
        reply: &Rep,
    ) -> Result<()> {
        let namespace = call.namespace();
        let mut txn: RwTxn = self.store.env.write_txn()?;
        self.store.put(&mut txn, namespace, container_id, record)?;
        for topic in topics {
            self.store
                .outbox
                .push(&mut txn, namespace, topic, record.generation, event)?;
        }
        self.store.requests.record(&mut txn, call, reply)?;
        txn.commit()?;
        Ok(())
    }
}

/// The payload of a task event, from the record as it is after the change.
pub(crate) fn task_event(container_id: &str, record: &TaskRecord) -> pb::TaskEvent {
    let exit = record.exit;
    pb::TaskEvent {
        container_id: container_id.to_string(),
        pid: record.pid,
        exit_status: exit.map(|e| e.status).unwrap_or_default(),
        exited_at: exit.map(|e| Timestamp {
            unix_nanos: e.exited_at,
        }),
        oom_killed: record.oom_killed,
        boot_id: record.boot_id.clone(),
        pid_start_time: record.pid_start_time,
        exec_id: String::new(),
    }
}

/// Refuses an op on a task that is not in one of `allowed`.
fn require_status(
    container_id: &str,
    record: &TaskRecord,
    allowed: &[Status],
    reason: &'static str,
) -> Result<()> {
    if allowed.contains(&record.status) {
        return Ok(());
    }
    Err(TaskError::State {
        container_id: container_id.to_string(),
        status: record.status.as_str(),
        reason,
    })
}

/// A shim failure: runc's refusal in runc's words, else the shim's fault.
fn shim_error(container_id: &str) -> impl FnOnce(ShimClientError) -> TaskError + '_ {
    move |err| match err {
        ShimClientError::Shim { message, .. } => TaskError::Runc {
            container_id: container_id.to_string(),
            message,
        },
        source => TaskError::Shim {
            container_id: container_id.to_string(),
            source,
        },
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TaskError + 'a {
    move |source| TaskError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
