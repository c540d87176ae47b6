//! `tombstones.*`: what `containers.delete` with `abandon_task` leaves for
//! a lost node, and the node's word that it applied it.
//!
//! A tombstone names a task by container, node and generation. The node's
//! task service lists its tombstones in each namespace it has tasks in when
//! it starts (and from time to time after), deletes each task of that
//! generation (killing it first when it still runs under the same boot),
//! and then deletes the tombstone.

use std::sync::Arc;

use berth_bus::{subject, Call};
use berth_proto::metadata as pb;

use crate::handlers::containers::check_container_id;
use crate::schema::tombstone_id;
use crate::MetadataService;

/// `tombstones.list`: the namespace's tombstones for one node, by
/// container id.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::ListTombstonesRequest,
) -> berth_bus::Result<pb::ListTombstonesReply> {
    call.record("node", &req.node);
    subject::check_token("node id", &req.node)?;
    let tombstones = svc.store.read(|schema, txn| {
        Ok(schema
            .tombstones
            .list(txn, call.namespace())?
            .into_iter()
            .filter(|tombstone| tombstone.node == req.node)
            .collect())
    })?;
    Ok(pb::ListTombstonesReply { tombstones })
}

/// `tombstones.delete`: the node applied the tombstone. Idempotent.
pub(crate) async fn delete(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::DeleteTombstoneRequest,
) -> berth_bus::Result<pb::DeleteReply> {
    call.record("container_id", &req.container_id);
    call.record("node", &req.node);
    subject::check_token("node id", &req.node)?;
    check_container_id(&req.container_id)?;
    let namespace = call.namespace().to_string();
    let reply = svc
        .store
        .mutate(&call, move |schema, txn| {
            let id = tombstone_id(&req.container_id, &req.node);
            schema.tombstones.delete(txn, &namespace, &id)?;
            Ok(pb::DeleteReply {})
        })
        .await?;
    Ok(reply)
}
