//! `leases.*`: protection for objects a client is still assembling, and
//! their expiry.
//!
//! A lease holds resources (`content/<digest>`, `snapshot/<node>/<key>`)
//! until it is deleted or its expiry passes. Expired leases are removed by
//! [`expire`], which the service runs whenever the soonest expiry is due
//! (and at least every second); each removal publishes `leases.expire`, on
//! which gc runs. Until it is removed, an expired lease is still listed, but
//! gc's mark no longer counts it.

use std::sync::Arc;
use std::time::Duration;

use heed::RwTxn;

use berth_bus::{subject, Call};
use berth_proto::metadata::{self as pb, Lease, LeaseEvent};
use berth_proto::Timestamp;

use crate::error::{Kind, MetadataError, Result};
use crate::events::{LEASES_CREATE, LEASES_DELETE, LEASES_EXPIRE, LEASES_UPDATE};
use crate::fields::{check_labels, Mask};
use crate::schema::{lease_expiry, parse_expiry_key, Schema};
use crate::selector::Selector;
use crate::store::{ensure_namespace, Store};
use crate::MetadataService;

/// The fields an update may change, besides labels.
const MUTABLE: &[&str] = &["expires_at"];

/// Fields an update may not name: resources change through `leases.add`
/// and `leases.remove`.
const IMMUTABLE: &[&str] = &["lease_id", "resources", "created_at"];

/// The most leases one expiry pass removes in one transaction.
const EXPIRE_BATCH: usize = 1024;

/// Checks a lease resource: `content/<digest>` or `snapshot/<node>/<key>`.
fn check_resource(resource: &str) -> Result<()> {
    if let Some(digest) = resource.strip_prefix("content/") {
        return super::check_digest("leased content digest", digest);
    }
    if let Some((node, key)) = resource
        .strip_prefix("snapshot/")
        .and_then(|rest| rest.split_once('/'))
    {
        subject::check_token("node id", node)?;
        return super::check_name("leased snapshot key", key, 1024);
    }
    Err(MetadataError::invalid(
        "lease resource",
        resource,
        "want content/<digest> or snapshot/<node>/<key>",
    ))
}

fn check_expiry(lease: &Lease) -> Result<()> {
    match &lease.expires_at {
        Some(at) if at.unix_nanos < 0 => Err(MetadataError::invalid(
            "lease expiry of",
            &lease.lease_id,
            "it is before 1970",
        )),
        _ => Ok(()),
    }
}

fn event(lease_id: &str) -> LeaseEvent {
    LeaseEvent {
        lease_id: lease_id.to_string(),
    }
}

/// Writes a changed lease: bumps its generation, moves its expiry index
/// entry, and queues `leases.update`.
fn put_changed(
    schema: &Schema,
    txn: &mut RwTxn,
    namespace: &str,
    before: &Lease,
    mut lease: Lease,
) -> Result<Lease> {
    lease.updated_at = Some(Timestamp::now());
    lease.generation = before.generation + 1;
    schema.unindex_expiry(txn, namespace, before)?;
    schema.index_expiry(txn, namespace, &lease)?;
    schema.leases.put(txn, namespace, &lease.lease_id, &lease)?;
    schema.outbox.push(
        txn,
        namespace,
        LEASES_UPDATE,
        lease.generation,
        &event(&lease.lease_id),
    )?;
    Ok(lease)
}

/// `leases.create`: an empty id picks one; `AlreadyExists` when it is taken.
pub(crate) async fn create(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::CreateLeaseRequest,
) -> berth_bus::Result<pb::LeaseReply> {
    let mut lease = req.lease.unwrap_or_default();
    if lease.lease_id.is_empty() {
        lease.lease_id = berth_bus::client::new_request_id();
    }
    subject::check_token("lease id", &lease.lease_id)?;
    check_labels(&lease.labels)?;
    check_expiry(&lease)?;
    lease.resources.iter().try_for_each(|r| check_resource(r))?;
    lease.resources.sort();
    lease.resources.dedup();

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            if schema
                .leases
                .get(txn, &namespace, &lease.lease_id)?
                .is_some()
            {
                return Err(MetadataError::exists(Kind::Lease, &lease.lease_id));
            }
            ensure_namespace(schema, txn, &namespace)?;
            let now = Timestamp::now();
            lease.created_at = Some(now);
            lease.updated_at = Some(now);
            lease.generation = 1;
            schema
                .leases
                .put(txn, &namespace, &lease.lease_id, &lease)?;
            schema.index_expiry(txn, &namespace, &lease)?;
            schema
                .outbox
                .push(txn, &namespace, LEASES_CREATE, 1, &event(&lease.lease_id))?;
            Ok(pb::LeaseReply { lease: Some(lease) })
        })
        .await?;
    Ok(reply)
}

/// `leases.get`: `NotFound` when there is no such lease.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetLeaseRequest,
) -> berth_bus::Result<pb::LeaseReply> {
    let lease = svc
        .store
        .read(|schema, txn| schema.leases.require(txn, call.namespace(), &req.lease_id))?;
    Ok(pb::LeaseReply { lease: Some(lease) })
}

/// `leases.update`: the masked fields (`labels`, `labels.<key>`,
/// `expires_at`).
pub(crate) async fn update(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::UpdateLeaseRequest,
) -> berth_bus::Result<pb::LeaseReply> {
    let new = req.lease.unwrap_or_default();
    subject::check_token("lease id", &new.lease_id)?;
    let mask = Mask::parse(
        Kind::Lease,
        &new.lease_id,
        &req.field_mask,
        MUTABLE,
        IMMUTABLE,
    )?;
    check_labels(&new.labels)?;
    check_expiry(&new)?;

    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let before = schema.leases.require(txn, &namespace, &new.lease_id)?;
            let mut lease = before.clone();
            if mask.has("expires_at") {
                lease.expires_at = new.expires_at;
            }
            mask.apply_labels(&mut lease.labels, &new.labels);
            check_labels(&lease.labels)?;
            let lease = put_changed(schema, txn, &namespace, &before, lease)?;
            Ok(pb::LeaseReply { lease: Some(lease) })
        })
        .await?;
    Ok(reply)
}

/// `leases.add`: attaches resources (idempotent).
pub(crate) async fn add(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::AddLeaseResourcesRequest,
) -> berth_bus::Result<pb::LeaseReply> {
    req.resources.iter().try_for_each(|r| check_resource(r))?;
    let added = req.resources;
    change_resources(svc, call, req.lease_id, move |resources| {
        resources.extend(added);
        resources.sort();
        resources.dedup();
    })
    .await
}

/// `leases.remove`: detaches resources; ones not attached are ignored.
pub(crate) async fn remove(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::RemoveLeaseResourcesRequest,
) -> berth_bus::Result<pb::LeaseReply> {
    let removed = req.resources;
    change_resources(svc, call, req.lease_id, move |resources| {
        resources.retain(|r| !removed.contains(r));
    })
    .await
}

/// Changes a lease's resources with `change`; a lease `change` leaves as
/// it was is not written again (no event, no new generation).
async fn change_resources(
    svc: Arc<MetadataService>,
    call: Call,
    lease_id: String,
    change: impl FnOnce(&mut Vec<String>) + Send + 'static,
) -> berth_bus::Result<pb::LeaseReply> {
    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let before = schema.leases.require(txn, &namespace, &lease_id)?;
            let mut lease = before.clone();
            change(&mut lease.resources);
            if lease.resources == before.resources {
                return Ok(pb::LeaseReply {
                    lease: Some(before),
                });
            }
            let lease = put_changed(schema, txn, &namespace, &before, lease)?;
            Ok(pb::LeaseReply { lease: Some(lease) })
        })
        .await?;
    Ok(reply)
}

/// `leases.delete`: what only the lease held goes at the next gc.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteLeaseRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let lease = schema.leases.require(txn, &namespace, &req.lease_id)?;
            schema.leases.delete(txn, &namespace, &req.lease_id)?;
            schema.unindex_expiry(txn, &namespace, &lease)?;
            schema.outbox.push(
                txn,
                &namespace,
                LEASES_DELETE,
                lease.generation + 1,
                &event(&lease.lease_id),
            )?;
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}

/// `leases.list`: every lease of the namespace.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    _req: pb::ListLeasesRequest,
) -> berth_bus::Result<pb::ListLeasesReply> {
    let leases = svc
        .store
        .read(|schema, txn| schema.leases.list(txn, call.namespace()))?;
    Ok(pb::ListLeasesReply { leases })
}

/// `leases.query`: the namespace's leases whose labels match.
pub(crate) async fn query(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::QueryLeasesRequest,
) -> berth_bus::Result<pb::ListLeasesReply> {
    let selector = Selector::parse(&req.label_selector, &req.selector)?;
    let leases = svc.store.read(|schema, txn| {
        Ok(schema
            .leases
            .list(txn, call.namespace())?
            .into_iter()
            .filter(|lease| selector.matches(&lease.labels))
            .collect())
    })?;
    Ok(pb::ListLeasesReply { leases })
}

/// True when the lease has an expiry that has passed at `now` (unix ns).
pub fn expired(lease: &Lease, now: i64) -> bool {
    lease_expiry(lease).is_some_and(|at| at as i64 <= now)
}

/// Removes up to [`EXPIRE_BATCH`] leases whose expiry passed, soonest first,
/// and queues `leases.expire` for each; returns how many went.
pub fn expire_due(schema: &Schema, txn: &mut RwTxn, now: i64) -> Result<usize> {
    let mut due = Vec::new();
    for item in schema.lease_expiry.iter(txn)?.take(EXPIRE_BATCH) {
        let (key, _) = item?;
        match parse_expiry_key(key) {
            Some((at, _, _)) if at as i64 > now => break,
            Some((_, namespace, lease_id)) => due.push((key.to_vec(), namespace, lease_id)),
            // An entry that does not parse is dropped, so it cannot stop
            // the index.
            None => due.push((key.to_vec(), String::new(), String::new())),
        }
    }
    let mut removed = 0;
    for (key, namespace, lease_id) in due {
        schema.lease_expiry.delete(txn, &key)?;
        let Some(lease) = schema.leases.get(txn, &namespace, &lease_id)? else {
            continue;
        };
        schema.leases.delete(txn, &namespace, &lease_id)?;
        schema.outbox.push(
            txn,
            &namespace,
            LEASES_EXPIRE,
            lease.generation + 1,
            &event(&lease_id),
        )?;
        removed += 1;
    }
    Ok(removed)
}

/// How long until the soonest expiry, at most `cap`.
pub fn next_due(store: &Store, cap: Duration) -> Result<Duration> {
    let first =
        store.read(|schema, txn| Ok(schema.lease_expiry.first(txn)?.map(|(k, _)| k.to_vec())))?;
    let Some((at, _, _)) = first.as_deref().and_then(parse_expiry_key) else {
        return Ok(cap);
    };
    let now = Timestamp::now().unix_nanos.max(0) as u64;
    Ok(Duration::from_nanos(at.saturating_sub(now)).min(cap))
}

/// Removes expired leases until shutdown: at each soonest expiry, and at
/// least every second (a lease created meanwhile with a sooner expiry waits
/// at most that long).
pub async fn run_expiry(svc: Arc<MetadataService>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        let wait = next_due(&svc.store, Duration::from_secs(1)).unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        loop {
            let now = Timestamp::now().unix_nanos;
            match svc
                .store
                .write(move |schema, txn| expire_due(schema, txn, now))
                .await
            {
                Ok(0) => break,
                Ok(count) => {
                    svc.store.schema().outbox.wake().notify_one();
                    tracing::info!(count, "leases expired");
                    if count < EXPIRE_BATCH {
                        break;
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "lease expiry failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_resources() {
        let digest = format!("sha256:{}", "0".repeat(64));
        let content = format!("content/{digest}");
        let cases: &[(&str, &str, bool)] = &[
            ("content", &content, true),
            ("snapshot", "snapshot/node-1/sha256:abc", true),
            ("content without a digest", "content/abc", false),
            ("snapshot without a key", "snapshot/node-1", false),
            ("snapshot with a bad node", "snapshot/a.b/key", false),
            ("unknown kind", "image/x", false),
        ];
        for (case, resource, ok) in cases {
            assert_eq!(check_resource(resource).is_ok(), *ok, "{case}");
        }
    }

    #[test]
    fn expiry_passes_at_its_time() {
        let lease = |nanos| Lease {
            expires_at: Some(Timestamp { unix_nanos: nanos }),
            ..Default::default()
        };
        assert!(expired(&lease(10), 10));
        assert!(!expired(&lease(11), 10));
        assert!(!expired(&lease(0), 10), "0 is never");
        assert!(!expired(&Lease::default(), 10));
    }
}
