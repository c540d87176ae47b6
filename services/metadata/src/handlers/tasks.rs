//! `tasks.*`: reservations the task service takes before it calls runc, and
//! the state that task events bring.

use std::sync::Arc;

use heed::RwTxn;
use prost::Message;

use berth_bus::events::Delivered;
use berth_bus::{subject, Call, Error, Result};
use berth_proto::metadata::{self as pb, Task, TaskStatus};
use berth_proto::task::TaskEvent;

use crate::store::Store;
use crate::MetadataService;

/// The status's name as people read it.
pub fn status_name(status: i32) -> &'static str {
    match TaskStatus::try_from(status).unwrap_or(TaskStatus::Unspecified) {
        TaskStatus::Created => "created",
        TaskStatus::Running => "running",
        TaskStatus::Paused => "paused",
        TaskStatus::Stopped => "stopped",
        TaskStatus::Unknown => "unknown",
        TaskStatus::Unspecified => "unspecified",
    }
}

/// `tasks.reserve`: claims the container's task for a node and generation;
/// `FailedPrecondition` when a task is reserved already (a retry of the same
/// reservation returns it).
pub(crate) async fn reserve(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ReserveTaskRequest,
) -> Result<pb::TaskReply> {
    call.record("container_id", &req.container_id);
    subject::check_token("node id", &req.node)?;
    let store = &svc.store;
    store.mutate(&call, |txn| {
        store
            .containers
            .require(txn, call.namespace(), &req.container_id)?;
        if let Some(task) = store.tasks.get(txn, call.namespace(), &req.container_id)? {
            if task.generation == req.generation && task.node == req.node {
                return Ok(pb::TaskReply { task: Some(task) });
            }
            return Err(Error::precondition(format!(
                "container {} already has a task ({} on {})",
                req.container_id,
                status_name(task.status),
                task.node
            )));
        }
        let task = Task {
            container_id: req.container_id.clone(),
            node: req.node.clone(),
            generation: req.generation,
            boot_id: req.boot_id.clone(),
            status: TaskStatus::Created as i32,
            ..Default::default()
        };
        store
            .tasks
            .put(txn, call.namespace(), &req.container_id, &task)?;
        Ok(pb::TaskReply { task: Some(task) })
    })
}

/// `tasks.release`: the task was deleted; the container may go.
pub(crate) async fn release(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ReleaseTaskRequest,
) -> Result<pb::DeleteReply> {
    call.record("container_id", &req.container_id);
    let store = &svc.store;
    store.mutate(&call, |txn| {
        if let Some(task) = store.tasks.get(txn, call.namespace(), &req.container_id)? {
            if req.generation != 0 && task.generation != req.generation {
                return Err(Error::precondition(format!(
                    "task of container {} is generation {}, not {}",
                    req.container_id, task.generation, req.generation
                )));
            }
            store
                .tasks
                .delete(txn, call.namespace(), &req.container_id)?;
        }
        Ok(pb::DeleteReply {})
    })
}

/// `tasks.get`.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetTaskRequest,
) -> Result<pb::TaskReply> {
    let txn = svc.store.env.read_txn()?;
    let task = svc
        .store
        .tasks
        .require(&txn, call.namespace(), &req.container_id)?;
    Ok(pb::TaskReply { task: Some(task) })
}

/// `tasks.list`.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListTasksRequest,
) -> Result<pb::ListTasksReply> {
    let txn = svc.store.env.read_txn()?;
    let tasks = svc
        .store
        .tasks
        .list(&txn, call.namespace())?
        .into_iter()
        .filter(|task| req.node.is_empty() || task.node == req.node)
        .collect();
    Ok(pb::ListTasksReply { tasks })
}

/// Applies one task event and stores the cursor, in one transaction.
///
/// The event applies only to the reservation of its generation, and only if
/// its stream sequence is past the one the record last applied: a duplicate,
/// a redelivery or an event of an older reservation changes nothing.
pub fn apply(store: &Store, delivered: &Delivered) -> Result<bool> {
    let mut txn = store.env.write_txn()?;
    let applied = apply_in(store, &mut txn, delivered)?;
    store.set_cursor(&mut txn, delivered.cursor)?;
    txn.commit()?;
    Ok(applied)
}

fn apply_in(store: &Store, txn: &mut RwTxn, delivered: &Delivered) -> Result<bool> {
    let envelope = &delivered.envelope;
    let event = TaskEvent::decode(envelope.payload.clone())?;
    let namespace = envelope.namespace.as_str();
    let Some(mut task) = store.tasks.get(txn, namespace, &event.container_id)? else {
        return Ok(false);
    };
    if task.generation != envelope.generation || delivered.cursor.seq <= task.event_version {
        return Ok(false);
    }
    let stopped = task.status == TaskStatus::Stopped as i32;
    match envelope.topic.as_str() {
        "tasks.create" => {
            task.pid = event.pid;
            task.pid_start_time = event.pid_start_time;
        }
        "tasks.start" if !stopped => {
            task.status = TaskStatus::Running as i32;
            task.pid = event.pid;
            task.pid_start_time = event.pid_start_time;
        }
        "tasks.exit" => {
            task.status = TaskStatus::Stopped as i32;
            task.exit_status = event.exit_status;
            task.exited_at = event.exited_at;
            task.oom_killed = event.oom_killed;
        }
        "tasks.paused" if !stopped => task.status = TaskStatus::Paused as i32,
        "tasks.resumed" if !stopped => task.status = TaskStatus::Running as i32,
        "tasks.oom" => task.oom_killed = true,
        _ => return Ok(false),
    }
    task.event_version = delivered.cursor.seq;
    store
        .tasks
        .put(txn, namespace, &event.container_id, &task)?;
    Ok(true)
}
