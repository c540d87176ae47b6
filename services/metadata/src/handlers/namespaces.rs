//! `namespaces.*`: a tenant's namespace as an object with labels.
//!
//! Each op acts on the namespace of its subject, never another: a client
//! confined to `berth.v1.a.>` can make, change and remove `a` only. The
//! request's name may be empty or that namespace. `namespaces.list` alone
//! answers for the whole cluster.
//!
//! A namespace record also comes into being with the first image, container
//! or lease created in it, as containerd does, so clients need not create it
//! first. Removing the record leaves the namespace in gc's list (`written`),
//! so the bytes it held are still collected.

use std::sync::Arc;

use berth_bus::{subject, Call};
use berth_proto::metadata::{self as pb, Namespace, NamespaceEvent};
use berth_proto::Timestamp;

use crate::error::{Kind, MetadataError, Result};
use crate::events::{NAMESPACES_CREATE, NAMESPACES_DELETE, NAMESPACES_UPDATE};
use crate::fields::{check_labels, Mask};
use crate::selector::Selector;
use crate::MetadataService;

/// The namespace an op acts on: the subject's; a request naming another is
/// `InvalidArgument`.
fn target(call: &Call, named: &str) -> Result<String> {
    let own = call.namespace();
    if !named.is_empty() && named != own {
        subject::check_namespace(named)?;
        return Err(MetadataError::OtherNamespace {
            subject: own.to_string(),
            named: named.to_string(),
        });
    }
    subject::check_namespace(own)?;
    Ok(own.to_string())
}

fn event(name: &str) -> NamespaceEvent {
    NamespaceEvent {
        name: name.to_string(),
    }
}

/// `namespaces.create`: `AlreadyExists` when the namespace has a record
/// (also one its first object made).
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateNamespaceRequest,
) -> berth_bus::Result<pb::NamespaceReply> {
    let mut namespace = req.namespace.unwrap_or_default();
    let name = target(&call, &namespace.name)?;
    check_labels(&namespace.labels)?;

    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            if schema.namespace(txn, &name)?.is_some() {
                return Err(MetadataError::exists(Kind::Namespace, name));
            }
            let now = Timestamp::now();
            namespace.name = name.clone();
            namespace.created_at = Some(now);
            namespace.updated_at = Some(now);
            namespace.generation = 1;
            schema.put_namespace(txn, &namespace)?;
            schema
                .outbox
                .push(txn, &name, NAMESPACES_CREATE, 1, &event(&name))?;
            Ok(pb::NamespaceReply {
                namespace: Some(namespace),
            })
        })
        .await?;
    Ok(reply)
}

/// `namespaces.update`: the masked fields (`labels`, `labels.<key>`).
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateNamespaceRequest,
) -> berth_bus::Result<pb::NamespaceReply> {
    let new = req.namespace.unwrap_or_default();
    let name = target(&call, &new.name)?;
    let mask = Mask::parse(Kind::Namespace, &name, &req.field_mask, &[], &["name"])?;
    check_labels(&new.labels)?;

    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let mut namespace = schema
                .namespace(txn, &name)?
                .ok_or_else(|| MetadataError::not_found(Kind::Namespace, &name))?;
            mask.apply_labels(&mut namespace.labels, &new.labels);
            check_labels(&namespace.labels)?;
            namespace.updated_at = Some(Timestamp::now());
            namespace.generation += 1;
            schema.put_namespace(txn, &namespace)?;
            schema.outbox.push(
                txn,
                &name,
                NAMESPACES_UPDATE,
                namespace.generation,
                &event(&name),
            )?;
            Ok(pb::NamespaceReply {
                namespace: Some(namespace),
            })
        })
        .await?;
    Ok(reply)
}

/// `namespaces.get`: `NotFound` when the namespace has no record.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetNamespaceRequest,
) -> berth_bus::Result<pb::NamespaceReply> {
    let name = target(&call, &req.name)?;
    let namespace = svc.store.read(|schema, txn| {
        schema
            .namespace(txn, &name)?
            .ok_or_else(|| MetadataError::not_found(Kind::Namespace, &name))
    })?;
    Ok(pb::NamespaceReply {
        namespace: Some(namespace),
    })
}

/// `namespaces.list`: every namespace record of the cluster that matches.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    _call: Call,
    req: pb::ListNamespacesRequest,
) -> berth_bus::Result<pb::ListNamespacesReply> {
    let selector = Selector::parse(&req.label_selector, &req.selector)?;
    let namespaces = svc.store.read(|schema, txn| {
        Ok(schema
            .all_namespaces(txn)?
            .into_iter()
            .filter(|ns: &Namespace| selector.matches(&ns.labels))
            .collect())
    })?;
    Ok(pb::ListNamespacesReply { namespaces })
}

/// `namespaces.delete`: `FailedPrecondition` while the namespace holds an
/// image, container, lease or task, decided in the transaction that
/// removes it.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteNamespaceRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    let name = target(&call, &req.name)?;

    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let namespace = schema
                .namespace(txn, &name)?
                .ok_or_else(|| MetadataError::not_found(Kind::Namespace, &name))?;
            let mut held = Vec::new();
            if schema.images.any_in(txn, &name)? {
                held.push("images");
            }
            if schema.containers.any_in(txn, &name)? {
                held.push("containers");
            }
            if schema.leases.any_in(txn, &name)? {
                held.push("leases");
            }
            if schema.tasks.any_in(txn, &name)? {
                held.push("tasks");
            }
            if !held.is_empty() {
                return Err(MetadataError::NamespaceNotEmpty {
                    namespace: name,
                    what: held.join(", "),
                });
            }
            schema.namespaces.delete(txn, &name)?;
            schema.outbox.push(
                txn,
                &name,
                NAMESPACES_DELETE,
                namespace.generation + 1,
                &event(&name),
            )?;
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}
