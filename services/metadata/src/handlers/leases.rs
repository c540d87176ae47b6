//! `leases.*`: protection for objects a client is still assembling.

use std::sync::Arc;

use berth_bus::{Call, Error, Result};
use berth_proto::metadata::{self as pb, Lease, LeaseEvent};
use berth_proto::Timestamp;

use crate::store::Store;
use crate::MetadataService;

/// `leases.create`: an empty id picks one.
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateLeaseRequest,
) -> Result<pb::LeaseReply> {
    let mut lease = req.lease.unwrap_or_default();
    if lease.lease_id.is_empty() {
        lease.lease_id = berth_bus::client::new_request_id();
    }
    berth_bus::subject::check_token("lease id", &lease.lease_id)?;
    let store = &svc.store;
    store.mutate(&call, |txn| {
        if store
            .leases
            .get(txn, call.namespace(), &lease.lease_id)?
            .is_some()
        {
            return Err(Error::already_exists(format!(
                "lease {} already exists",
                lease.lease_id
            )));
        }
        lease.created_at = Some(Timestamp::now());
        store
            .leases
            .put(txn, call.namespace(), &lease.lease_id, &lease)?;
        let event = LeaseEvent {
            lease_id: lease.lease_id.clone(),
        };
        store
            .outbox
            .push(txn, call.namespace(), "leases.create", 1, &event)?;
        Ok(pb::LeaseReply { lease: Some(lease) })
    })
}

/// `leases.add`: attaches resources to a lease.
pub(crate) async fn add(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::AddLeaseResourcesRequest,
) -> Result<pb::LeaseReply> {
    for resource in &req.resources {
        if !(resource.starts_with("content/") || resource.starts_with("snapshot/")) {
            return Err(Error::invalid(format!(
                "unknown lease resource {resource:?}"
            )));
        }
    }
    let store = &svc.store;
    store.mutate(&call, |txn| {
        let mut lease = store.leases.require(txn, call.namespace(), &req.lease_id)?;
        for resource in &req.resources {
            if !lease.resources.contains(resource) {
                lease.resources.push(resource.clone());
            }
        }
        store
            .leases
            .put(txn, call.namespace(), &lease.lease_id, &lease)?;
        Ok(pb::LeaseReply { lease: Some(lease) })
    })
}

/// `leases.delete`: what only the lease held goes at the next gc.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteLeaseRequest,
) -> Result<pb::DeleteReply> {
    let store = &svc.store;
    store.mutate(&call, |txn| {
        if !store.leases.delete(txn, call.namespace(), &req.lease_id)? {
            return Err(Error::not_found(format!("no such lease: {}", req.lease_id)));
        }
        let event = LeaseEvent {
            lease_id: req.lease_id.clone(),
        };
        store
            .outbox
            .push(txn, call.namespace(), "leases.delete", 2, &event)?;
        Ok(pb::DeleteReply {})
    })
}

/// `leases.list`.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    _req: pb::ListLeasesRequest,
) -> Result<pb::ListLeasesReply> {
    let txn = svc.store.env.read_txn()?;
    let leases = svc.store.leases.list(&txn, call.namespace())?;
    Ok(pb::ListLeasesReply { leases })
}

/// True when the lease has an expiry that has passed.
pub fn expired(lease: &Lease, now: i64) -> bool {
    lease
        .expires_at
        .as_ref()
        .is_some_and(|t| t.unix_nanos > 0 && t.unix_nanos <= now)
}

/// Removes every expired lease and queues `leases.expire` for each; returns
/// how many went.
pub fn expire(store: &Store) -> Result<usize> {
    let now = Timestamp::now().unix_nanos;
    let mut txn = store.env.write_txn()?;
    let mut removed = 0;
    for namespace in store.leases.namespaces(&txn)? {
        for lease in store.leases.list(&txn, &namespace)? {
            if expired(&lease, now) {
                store.leases.delete(&mut txn, &namespace, &lease.lease_id)?;
                let event = LeaseEvent {
                    lease_id: lease.lease_id.clone(),
                };
                store
                    .outbox
                    .push(&mut txn, &namespace, "leases.expire", 2, &event)?;
                removed += 1;
            }
        }
    }
    txn.commit()?;
    Ok(removed)
}
