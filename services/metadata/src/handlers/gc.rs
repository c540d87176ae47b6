//! `gc.mark`: a new epoch, then every root of every namespace in one read.

use std::sync::Arc;

use berth_bus::Call;
use berth_proto::metadata as pb;
use berth_proto::Timestamp;

use crate::MetadataService;

/// `gc.mark`: takes a new epoch E (committed first), then reads the roots
/// of every namespace ever written to in one read transaction begun after
/// it. A root made before that read is in the reply; an object made after
/// it is stamped by its owner at or after E, which gc's conditional deletes
/// keep. Expired leases are not roots, even before they are removed.
/// Containers come without `spec` and `options`, which gc never reads.
///
/// # Limitations
/// The reply is one message, so the roots of all namespaces must fit the
/// server's max payload (at the 1 MiB default, some thousands of images and
/// containers).
pub(crate) async fn mark(
    svc: Arc<MetadataService>,
    _call: Call,
    _req: pb::MarkRequest,
) -> berth_bus::Result<pb::MarkReply> {
    let epoch = svc
        .store
        .write(|schema, txn| schema.next_epoch(txn))
        .await?;

    let now = Timestamp::now().unix_nanos;
    let namespaces = svc.store.read(|schema, txn| {
        let mut out = Vec::new();
        for namespace in schema.written_namespaces(txn)? {
            let containers = schema
                .containers
                .list(txn, &namespace)?
                .into_iter()
                .map(|mut container| {
                    container.spec = Default::default();
                    container.options = None;
                    container
                })
                .collect();
            let leases = schema
                .leases
                .list(txn, &namespace)?
                .into_iter()
                .filter(|lease| !super::leases::expired(lease, now))
                .collect();
            out.push(pb::NamespaceRoots {
                images: schema.images.list(txn, &namespace)?,
                containers,
                leases,
                namespace,
            });
        }
        Ok(out)
    })?;
    Ok(pb::MarkReply { epoch, namespaces })
}
