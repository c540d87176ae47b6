//! `gc.mark`: the epoch and every root, read in one transaction.

use std::collections::BTreeSet;
use std::sync::Arc;

use berth_bus::{Call, Result};
use berth_proto::metadata as pb;
use berth_proto::Timestamp;

use crate::MetadataService;

/// `gc.mark`: a new epoch, then the roots of every namespace as of that
/// epoch. Objects touched at or after the epoch are kept by the owners'
/// conditional deletes, so whatever is created after this read is safe.
pub(crate) async fn mark(
    svc: Arc<MetadataService>,
    _call: Call,
    _req: pb::MarkRequest,
) -> Result<pb::MarkReply> {
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    let epoch = store.next_epoch(&mut txn)?;
    let now = Timestamp::now().unix_nanos;
    let names: BTreeSet<String> = store.all_namespaces(&txn)?.into_iter().collect();
    let mut namespaces = Vec::new();
    for namespace in names {
        namespaces.push(pb::NamespaceRoots {
            images: store.images.list(&txn, &namespace)?,
            containers: store.containers.list(&txn, &namespace)?,
            leases: store
                .leases
                .list(&txn, &namespace)?
                .into_iter()
                .filter(|lease| !super::leases::expired(lease, now))
                .collect(),
            namespace,
        });
    }
    txn.commit()?;
    Ok(pb::MarkReply { epoch, namespaces })
}
