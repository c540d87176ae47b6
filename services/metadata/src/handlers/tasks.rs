//! `tasks.*`: reservations the task service takes before it calls runc and
//! gives back when it deletes the task. Their state comes from task events
//! ([`crate::apply`]); legality is decided here, on the records. What a
//! lost node's tasks do nobody knows until it is heard again, so reads
//! show them as UNKNOWN ([`crate::nodes::overlay`]) while the records keep
//! their last state.

use std::sync::Arc;

use berth_bus::{subject, Call};
use berth_proto::metadata::{self as pb, Task, TaskStatus};
use berth_proto::Timestamp;

use crate::apply::status_name;
use crate::error::MetadataError;
use crate::handlers::containers::check_container_id;
use crate::nodes::overlay;
use crate::MetadataService;

/// `tasks.reserve`: claims the container's task for a node and generation.
/// `NotFound` without the container; `FailedPrecondition` when a task is
/// reserved already, or the container lives on another node. The same
/// reservation again returns it.
pub(crate) async fn reserve(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ReserveTaskRequest,
) -> berth_bus::Result<pb::TaskReply> {
    call.record("container_id", &req.container_id);
    check_container_id(&req.container_id)?;
    subject::check_token("node id", &req.node)?;
    if req.generation == 0 {
        return Err(
            MetadataError::invalid("task generation", "0", "a reservation needs one").into(),
        );
    }

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let container = schema
                .containers
                .require(txn, &namespace, &req.container_id)?;
            if let Some(task) = schema.tasks.get(txn, &namespace, &req.container_id)? {
                if task.generation == req.generation && task.node == req.node {
                    return Ok(pb::TaskReply { task: Some(task) });
                }
                return Err(MetadataError::HasTask {
                    container_id: req.container_id,
                    status: status_name(task.status),
                    node: task.node,
                });
            }
            if !container.node.is_empty() && container.node != req.node {
                return Err(MetadataError::OtherNode {
                    container_id: req.container_id,
                    node: container.node,
                    asked: req.node,
                });
            }
            let now = Timestamp::now();
            let task = Task {
                container_id: req.container_id.clone(),
                node: req.node,
                generation: req.generation,
                boot_id: req.boot_id,
                status: TaskStatus::Created as i32,
                created_at: Some(now),
                updated_at: Some(now),
                ..Default::default()
            };
            schema
                .tasks
                .put(txn, &namespace, &req.container_id, &task)?;
            Ok(pb::TaskReply { task: Some(task) })
        })
        .await?;
    Ok(reply)
}

/// `tasks.release`: the task was deleted (or never made); the container may
/// go. Idempotent; `FailedPrecondition` when the stored reservation is of
/// another generation than a non-zero `generation`.
pub(crate) async fn release(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ReleaseTaskRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    call.record("container_id", &req.container_id);
    check_container_id(&req.container_id)?;

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            if let Some(task) = schema.tasks.get(txn, &namespace, &req.container_id)? {
                if req.generation != 0 && task.generation != req.generation {
                    return Err(MetadataError::Generation {
                        container_id: req.container_id,
                        stored: task.generation,
                        asked: req.generation,
                    });
                }
                schema.tasks.delete(txn, &namespace, &req.container_id)?;
            }
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}

/// `tasks.get`: `NotFound` when the container has no reservation. A task
/// of a lost node that had not exited reads as UNKNOWN.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetTaskRequest,
) -> berth_bus::Result<pb::TaskReply> {
    call.record("container_id", &req.container_id);
    let task = svc.store.read(|schema, txn| {
        let mut task = schema
            .tasks
            .require(txn, call.namespace(), &req.container_id)?;
        overlay(schema, txn, &mut task)?;
        Ok(task)
    })?;
    Ok(pb::TaskReply { task: Some(task) })
}

/// `tasks.list`: the namespace's reservations, optionally of one node and
/// in some states (a lost node's live tasks are UNKNOWN here too).
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListTasksRequest,
) -> berth_bus::Result<pb::ListTasksReply> {
    let tasks = svc.store.read(|schema, txn| {
        let mut tasks = Vec::new();
        for mut task in schema.tasks.list(txn, call.namespace())? {
            if !req.node.is_empty() && task.node != req.node {
                continue;
            }
            overlay(schema, txn, &mut task)?;
            if req.status.is_empty() || req.status.contains(&task.status) {
                tasks.push(task);
            }
        }
        Ok(tasks)
    })?;
    Ok(pb::ListTasksReply { tasks })
}
