//! `nodes.*`: the node registry ([`crate::nodes`]), the same through every
//! namespace, since nodes belong to none.

use std::sync::Arc;

use berth_bus::{subject, Call};
use berth_proto::metadata as pb;

use crate::error::{Kind, MetadataError};
use crate::nodes::with_current;
use crate::MetadataService;

/// `nodes.list`: every node ever heard from, by id, with its last heartbeat.
pub(crate) async fn list(
    svc: Arc<MetadataService>,
    _call: Call,
    _req: pb::ListNodesRequest,
) -> berth_bus::Result<pb::ListNodesReply> {
    let records = svc.store.read(|schema, txn| schema.all_nodes(txn))?;
    let nodes = records
        .into_iter()
        .map(|record| with_current(&svc.registry, record))
        .collect();
    Ok(pb::ListNodesReply { nodes })
}

/// `nodes.get`: one node; `NotFound` when it was never heard from.
pub(crate) async fn get(
    svc: Arc<MetadataService>,
    call: Call,
    req: pb::GetNodeRequest,
) -> berth_bus::Result<pb::NodeReply> {
    call.record("node", &req.node);
    subject::check_token("node id", &req.node)?;
    let record = svc
        .store
        .read(|schema, txn| schema.node(txn, &req.node))?
        .ok_or_else(|| MetadataError::not_found(Kind::Node, &req.node))?;
    Ok(pb::NodeReply {
        node: Some(with_current(&svc.registry, record)),
    })
}
