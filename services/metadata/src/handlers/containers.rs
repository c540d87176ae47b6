//! `containers.*`: what to run.

use std::sync::Arc;

use berth_bus::{subject, Call, Error, Result};
use berth_proto::metadata::{self as pb, Container, ContainerEvent};
use berth_proto::Timestamp;

use crate::MetadataService;

/// A container id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn check_container_id(container_id: &str) -> Result<()> {
    let mut chars = container_id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !first_ok || !rest_ok || container_id.len() > 128 {
        return Err(Error::invalid(format!(
            "invalid container id {container_id:?}: use letters, digits and _.- (at most 128, starting with a letter or digit)"
        )));
    }
    Ok(())
}

fn event(container: &Container) -> ContainerEvent {
    ContainerEvent {
        container_id: container.container_id.clone(),
        image: container.image.clone(),
    }
}

/// `containers.create`: `AlreadyExists` when the id is taken.
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateContainerRequest,
) -> Result<pb::ContainerReply> {
    let mut container = req
        .container
        .ok_or_else(|| Error::invalid("no container in request"))?;
    check_container_id(&container.container_id)?;
    call.record("container_id", &container.container_id);
    if !container.node.is_empty() {
        subject::check_token("node id", &container.node)?;
    }
    let store = &svc.store;
    store.mutate(&call, |txn| {
        if store
            .containers
            .get(txn, call.namespace(), &container.container_id)?
            .is_some()
        {
            return Err(Error::already_exists(format!(
                "container {} already exists",
                container.container_id
            )));
        }
        let now = Timestamp::now();
        container.created_at = Some(now);
        container.updated_at = Some(now);
        container.generation = 1;
        store
            .containers
            .put(txn, call.namespace(), &container.container_id, &container)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "containers.create",
            1,
            &event(&container),
        )?;
        Ok(pb::ContainerReply {
            container: Some(container),
        })
    })
}

/// `containers.update`: labels, spec or image of an existing container.
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateContainerRequest,
) -> Result<pb::ContainerReply> {
    let new = req
        .container
        .ok_or_else(|| Error::invalid("no container in request"))?;
    let store = &svc.store;
    store.mutate(&call, |txn| {
        let mut container = store
            .containers
            .require(txn, call.namespace(), &new.container_id)?;
        let all = req.field_mask.is_empty();
        let wants = |field: &str| all || req.field_mask.iter().any(|f| f == field);
        if let Some(field) = req
            .field_mask
            .iter()
            .find(|f| !["labels", "spec", "image"].contains(&f.as_str()))
        {
            return Err(Error::invalid(format!("unknown field {field:?} in mask")));
        }
        if wants("labels") {
            container.labels = new.labels.clone();
        }
        if wants("spec") {
            container.spec = new.spec.clone();
        }
        if wants("image") {
            container.image = new.image.clone();
        }
        container.updated_at = Some(Timestamp::now());
        container.generation += 1;
        store
            .containers
            .put(txn, call.namespace(), &container.container_id, &container)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "containers.update",
            container.generation,
            &event(&container),
        )?;
        Ok(pb::ContainerReply {
            container: Some(container),
        })
    })
}

/// `containers.get`.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetContainerRequest,
) -> Result<pb::ContainerReply> {
    let txn = svc.store.env.read_txn()?;
    let container = svc
        .store
        .containers
        .require(&txn, call.namespace(), &req.container_id)?;
    Ok(pb::ContainerReply {
        container: Some(container),
    })
}

/// `containers.list`.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListContainersRequest,
) -> Result<pb::ListContainersReply> {
    let txn = svc.store.env.read_txn()?;
    let containers = svc
        .store
        .containers
        .list(&txn, call.namespace())?
        .into_iter()
        .filter(|c| crate::selects(&req.label_selector, &c.labels))
        .collect();
    Ok(pb::ListContainersReply { containers })
}

/// `containers.delete`: `FailedPrecondition` while a task is reserved, decided
/// on the reservation record in the same transaction.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteContainerRequest,
) -> Result<pb::DeleteReply> {
    call.record("container_id", &req.container_id);
    let store = &svc.store;
    store.mutate(&call, |txn| {
        let container = store
            .containers
            .require(txn, call.namespace(), &req.container_id)?;
        if let Some(task) = store.tasks.get(txn, call.namespace(), &req.container_id)? {
            return Err(Error::precondition(format!(
                "container {} has a task ({}); delete the task first",
                req.container_id,
                crate::handlers::tasks::status_name(task.status)
            )));
        }
        store
            .containers
            .delete(txn, call.namespace(), &req.container_id)?;
        store.outbox.push(
            txn,
            call.namespace(),
            "containers.delete",
            container.generation + 1,
            &event(&container),
        )?;
        Ok(pb::DeleteReply {})
    })
}
