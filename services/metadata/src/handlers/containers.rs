//! `containers.*`: what to run, not the running process.

use std::sync::Arc;

use berth_bus::{subject, Call};
use berth_proto::metadata::{self as pb, Container, ContainerEvent};
use berth_proto::Timestamp;

use crate::apply::status_name;
use crate::error::{Kind, MetadataError, Result};
use crate::events::{CONTAINERS_CREATE, CONTAINERS_DELETE, CONTAINERS_UPDATE};
use crate::fields::{check_labels, Mask};
use crate::handlers::{check_digest, check_name};
use crate::selector::Selector;
use crate::store::ensure_namespace;
use crate::MetadataService;

/// The runtime a container gets when it names none.
pub const DEFAULT_RUNTIME: &str = "io.berth.runc.v1";

/// The fields an update may change, besides labels.
const MUTABLE: &[&str] = &["spec", "image", "image_digest", "stop_signal", "options"];

/// The fields fixed at creation: the rootfs lives in one snapshot on one
/// node, and the runtime that runs it does not change under a task.
const IMMUTABLE: &[&str] = &["container_id", "node", "snapshot_key", "runtime"];

/// A container id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
pub fn check_container_id(container_id: &str) -> Result<()> {
    let mut chars = container_id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !first_ok || !rest_ok || container_id.len() > 128 {
        return Err(MetadataError::invalid(
            "container id",
            container_id,
            "use letters, digits and _.- (at most 128, starting with a letter or digit)",
        ));
    }
    Ok(())
}

/// A stop signal: a name (`SIGTERM`, `TERM`, `SIGRTMIN+3`) or a number from
/// 1 to 64.
fn check_stop_signal(signal: &str) -> Result<()> {
    if let Ok(number) = signal.parse::<u32>() {
        if (1..=64).contains(&number) {
            return Ok(());
        }
        return Err(MetadataError::invalid(
            "stop signal",
            signal,
            "a signal number is 1 to 64",
        ));
    }
    let name_ok = signal.len() <= 16
        && signal
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-')
        && signal.starts_with(|c: char| c.is_ascii_uppercase());
    if !name_ok {
        return Err(MetadataError::invalid(
            "stop signal",
            signal,
            "want a signal name such as SIGTERM, or its number",
        ));
    }
    Ok(())
}

/// Checks the fields a container record may hold.
fn check(container: &Container) -> Result<()> {
    check_container_id(&container.container_id)?;
    if !container.node.is_empty() {
        subject::check_token("node id", &container.node)?;
    }
    if !container.image.is_empty() {
        check_name("image name", &container.image, crate::schema::MAX_ID_BYTES)?;
    }
    if !container.image_digest.is_empty() {
        check_digest("container image digest", &container.image_digest)?;
    }
    if !container.snapshot_key.is_empty() {
        check_name("snapshot key", &container.snapshot_key, 1024)?;
    }
    if !container.stop_signal.is_empty() {
        check_stop_signal(&container.stop_signal)?;
    }
    if !container.spec.is_empty()
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&container.spec)
            .is_err()
    {
        return Err(MetadataError::invalid(
            "oci spec of container",
            &container.container_id,
            "it is not a JSON object",
        ));
    }
    check_labels(&container.labels)
}

fn event(container: &Container) -> ContainerEvent {
    ContainerEvent {
        container_id: container.container_id.clone(),
        image: container.image.clone(),
        snapshot_key: container.snapshot_key.clone(),
        node: container.node.clone(),
    }
}

/// `containers.create`: `AlreadyExists` when the id is taken. A container
/// that names no runtime gets [`DEFAULT_RUNTIME`].
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateContainerRequest,
) -> berth_bus::Result<pb::ContainerReply> {
    let mut container = req
        .container
        .ok_or_else(|| MetadataError::invalid("request", "", "it has no container"))?;
    call.record("container_id", &container.container_id);
    check(&container)?;
    if container.runtime.is_empty() {
        container.runtime = DEFAULT_RUNTIME.to_string();
    }

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let container_id = container.container_id.clone();
            if schema
                .containers
                .get(txn, &namespace, &container_id)?
                .is_some()
            {
                return Err(MetadataError::exists(Kind::Container, container_id));
            }
            ensure_namespace(schema, txn, &namespace)?;
            let now = Timestamp::now();
            container.created_at = Some(now);
            container.updated_at = Some(now);
            container.generation = 1;
            schema
                .containers
                .put(txn, &namespace, &container_id, &container)?;
            schema
                .outbox
                .push(txn, &namespace, CONTAINERS_CREATE, 1, &event(&container))?;
            Ok(pb::ContainerReply {
                container: Some(container),
            })
        })
        .await?;
    Ok(reply)
}

/// `containers.update`: the masked fields; the fixed ones (node, snapshot
/// key, runtime) are `InvalidArgument` to name, or to send changed with an
/// empty mask.
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateContainerRequest,
) -> berth_bus::Result<pb::ContainerReply> {
    let new = req
        .container
        .ok_or_else(|| MetadataError::invalid("request", "", "it has no container"))?;
    call.record("container_id", &new.container_id);
    check_container_id(&new.container_id)?;
    let mask = Mask::parse(
        Kind::Container,
        &new.container_id,
        &req.field_mask,
        MUTABLE,
        IMMUTABLE,
    )?;
    let whole = req.field_mask.is_empty();

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let container_id = new.container_id.clone();
            let mut container = schema.containers.require(txn, &namespace, &container_id)?;
            if whole {
                check_fixed(&container, &new)?;
            }
            apply(&mask, &mut container, &new);
            check(&container)?;
            container.updated_at = Some(Timestamp::now());
            container.generation += 1;
            schema
                .containers
                .put(txn, &namespace, &container_id, &container)?;
            schema.outbox.push(
                txn,
                &namespace,
                CONTAINERS_UPDATE,
                container.generation,
                &event(&container),
            )?;
            Ok(pb::ContainerReply {
                container: Some(container),
            })
        })
        .await?;
    Ok(reply)
}

/// A whole-record update may repeat the fixed fields, or leave them empty,
/// but not change them.
fn check_fixed(stored: &Container, new: &Container) -> Result<()> {
    let fixed = [
        ("node", &stored.node, &new.node),
        ("snapshot_key", &stored.snapshot_key, &new.snapshot_key),
        ("runtime", &stored.runtime, &new.runtime),
    ];
    for (field, stored_value, new_value) in fixed {
        if !new_value.is_empty() && new_value != stored_value {
            return Err(MetadataError::Immutable {
                kind: Kind::Container,
                id: stored.container_id.clone(),
                field,
            });
        }
    }
    Ok(())
}

/// Copies the masked fields of `new` onto `container`.
fn apply(mask: &Mask, container: &mut Container, new: &Container) {
    if mask.has("spec") {
        container.spec = new.spec.clone();
    }
    if mask.has("image") {
        container.image = new.image.clone();
    }
    if mask.has("image_digest") {
        container.image_digest = new.image_digest.clone();
    }
    if mask.has("stop_signal") {
        container.stop_signal = new.stop_signal.clone();
    }
    if mask.has("options") {
        container.options = new.options.clone();
    }
    mask.apply_labels(&mut container.labels, &new.labels);
}

/// `containers.get`: `NotFound` when the id is not recorded.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetContainerRequest,
) -> berth_bus::Result<pb::ContainerReply> {
    call.record("container_id", &req.container_id);
    let container = svc.store.read(|schema, txn| {
        schema
            .containers
            .require(txn, call.namespace(), &req.container_id)
    })?;
    Ok(pb::ContainerReply {
        container: Some(container),
    })
}

/// `containers.list`: the namespace's containers that match, by id.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListContainersRequest,
) -> berth_bus::Result<pb::ListContainersReply> {
    let selector = Selector::parse(&req.label_selector, &req.selector)?;
    let containers = svc.store.read(|schema, txn| {
        Ok(schema
            .containers
            .list(txn, call.namespace())?
            .into_iter()
            .filter(|container| selector.matches(&container.labels))
            .collect())
    })?;
    Ok(pb::ListContainersReply { containers })
}

/// `containers.delete`: `FailedPrecondition` while a task is reserved, in
/// any state, decided on the reservation record in the transaction that
/// removes the container; a racing `tasks.reserve` runs before or after it
/// on the one writer, never beside it.
///
/// With `abandon_task`, a task reserved on a node the registry holds as
/// lost goes too, and a tombstone is left for that node in the same
/// transaction; a task on a node that is not lost is still
/// `FailedPrecondition`.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteContainerRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    call.record("container_id", &req.container_id);
    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let container_id = req.container_id;
            let container = schema.containers.require(txn, &namespace, &container_id)?;
            if let Some(task) = schema.tasks.get(txn, &namespace, &container_id)? {
                if !req.abandon_task {
                    return Err(MetadataError::HasTask {
                        container_id,
                        status: status_name(task.status),
                        node: task.node,
                    });
                }
                abandon(schema, txn, &namespace, &container, task)?;
            }
            schema.containers.delete(txn, &namespace, &container_id)?;
            schema.outbox.push(
                txn,
                &namespace,
                CONTAINERS_DELETE,
                container.generation + 1,
                &event(&container),
            )?;
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}

/// Drops the reservation of a task whose node is lost and leaves the
/// node its tombstone; `NodeNotLost` when the registry holds the node as
/// anything but lost.
fn abandon(
    schema: &crate::schema::Schema,
    txn: &mut heed::RwTxn,
    namespace: &str,
    container: &Container,
    task: pb::Task,
) -> Result<()> {
    let container_id = &container.container_id;
    let state = schema.node(txn, &task.node)?.map(|node| node.state);
    if state != Some(pb::NodeState::Lost as i32) {
        return Err(MetadataError::NodeNotLost {
            container_id: container_id.clone(),
            state: match state {
                Some(_) => "ready",
                None => "unknown to the registry",
            },
            node: task.node,
        });
    }
    let tombstone = pb::Tombstone {
        container_id: container_id.clone(),
        node: task.node.clone(),
        generation: task.generation,
        boot_id: task.boot_id.clone(),
        snapshot_key: container.snapshot_key.clone(),
        created_at: Some(Timestamp::now()),
    };
    let id = crate::schema::tombstone_id(container_id, &task.node);
    schema.tombstones.put(txn, namespace, &id, &tombstone)?;
    schema.tasks.delete(txn, namespace, container_id)?;
    tracing::info!(namespace, container_id = %container_id, node = %task.node, "task of a lost node abandoned to a tombstone");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids() {
        let long = "a".repeat(129);
        let cases: &[(&str, &str, bool)] = &[
            ("plain", "web-1", true),
            ("dots and underscores", "a.b_c", true),
            ("empty", "", false),
            ("leading dash", "-a", false),
            ("slash", "a/b", false),
            ("subject wildcard", "a*", false),
            ("too long", &long, false),
        ];
        for (case, id, ok) in cases {
            assert_eq!(check_container_id(id).is_ok(), *ok, "{case}");
        }
    }

    #[test]
    fn stop_signals() {
        let cases: &[(&str, &str, bool)] = &[
            ("name", "SIGTERM", true),
            ("short name", "TERM", true),
            ("realtime", "SIGRTMIN+3", true),
            ("number", "9", true),
            ("zero", "0", false),
            ("past the last", "65", false),
            ("lower case", "sigterm", false),
            ("punctuation", "SIG;TERM", false),
        ];
        for (case, signal, ok) in cases {
            assert_eq!(check_stop_signal(signal).is_ok(), *ok, "{case}");
        }
    }

    #[test]
    fn specs_must_be_json_objects() {
        let container = |spec: &str| Container {
            container_id: "c".into(),
            spec: spec.as_bytes().to_vec().into(),
            ..Default::default()
        };
        assert!(check(&container(r#"{"ociVersion":"1.0.2"}"#)).is_ok());
        assert!(check(&container("")).is_ok());
        assert!(check(&container("[1]")).is_err());
        assert!(check(&container("{not json")).is_err());
    }
}
