//! Sweep: ask the owners of the bytes to drop what is not live.
//!
//! Every delete is conditional on the mark epoch, checked by the owner in
//! one transaction: a blob or snapshot created or reused since the epoch
//! stays, so an import racing this sweep never loses what it reuses. A
//! failure here is confined to what it touches (one namespace's blobs, one
//! node): it is logged and skipped, and the next run catches up.

use std::collections::BTreeSet;

use futures::StreamExt;

use berth_bus::Code;
use berth_proto::gc::NamespaceResult;

use crate::mark::LiveSet;
use crate::remote::Remote;

/// How many deletes one namespace has in flight.
const DELETES_IN_FLIGHT: usize = 8;

/// What one sweep works from.
pub(crate) struct Sweep<'a> {
    /// The services.
    pub remote: &'a Remote,
    /// The nodes running a snapshot service.
    pub nodes: &'a BTreeSet<String>,
    /// The mark epoch.
    pub epoch: u64,
    /// Report only.
    pub dry_run: bool,
}

impl Sweep<'_> {
    /// Sweeps one namespace's blobs and, on every node, its snapshots.
    pub(crate) async fn namespace(&self, namespace: &str, live: &LiveSet) -> NamespaceResult {
        let mut result = NamespaceResult {
            namespace: namespace.to_string(),
            ..Default::default()
        };
        self.blobs(namespace, live, &mut result).await;
        self.snapshots(namespace, live, &mut result).await;
        result
    }

    /// Deletes every blob of the namespace that is not live.
    ///
    /// In a dry run `freed_bytes` counts the full size of every blob that
    /// would go, an upper bound: bytes another namespace holds stay on disk.
    async fn blobs(&self, namespace: &str, live: &LiveSet, result: &mut NamespaceResult) {
        let infos = match self.remote.list_blobs(namespace).await {
            Ok(infos) => infos,
            Err(err) => {
                tracing::warn!(namespace, error = %err, "content not listed; blobs not swept");
                return;
            }
        };
        let dead: Vec<_> = infos
            .into_iter()
            .filter(|info| !live.blobs.contains(&info.digest))
            .collect();
        if self.dry_run {
            result.freed_bytes += dead.iter().map(|info| info.size).sum::<i64>();
            result
                .blobs
                .extend(dead.into_iter().map(|info| info.digest));
            return;
        }

        let outcomes: Vec<_> = futures::stream::iter(dead)
            .map(|info| async move {
                let outcome = self
                    .remote
                    .delete_blob(namespace, &info.digest, self.epoch)
                    .await;
                (info.digest, outcome)
            })
            .buffer_unordered(DELETES_IN_FLIGHT)
            .collect()
            .await;
        for (digest, outcome) in outcomes {
            match outcome {
                Ok(reply) if reply.deleted => {
                    tracing::debug!(
                        namespace,
                        %digest,
                        freed_bytes = reply.freed_bytes,
                        "blob removed",
                    );
                    result.freed_bytes += reply.freed_bytes;
                    result.blobs.push(digest);
                }
                Ok(_) => tracing::debug!(namespace, %digest, "blob kept: touched since the epoch"),
                Err(err) if err.code == Code::NotFound => {}
                Err(err) => tracing::warn!(namespace, %digest, error = %err, "blob not removed"),
            }
        }
        result.blobs.sort();
    }

    /// Prunes the namespace on every node at once, so a node that does not
    /// answer delays only itself; it is skipped and catches up next run.
    async fn snapshots(&self, namespace: &str, live: &LiveSet, result: &mut NamespaceResult) {
        let prunes = self.nodes.iter().map(|node| async move {
            let keys = live.snapshots_on(node);
            let outcome = self
                .remote
                .prune(namespace, node, keys, self.epoch, self.dry_run)
                .await;
            (node, outcome)
        });
        for (node, outcome) in futures::future::join_all(prunes).await {
            match outcome {
                Ok(reply) => {
                    for key in &reply.removed {
                        tracing::debug!(
                            namespace,
                            node = %node,
                            snapshot_key = %key,
                            "snapshot removed",
                        );
                    }
                    result.freed_bytes += reply.freed_bytes;
                    result
                        .snapshots
                        .extend(reply.removed.into_iter().map(|key| format!("{node}/{key}")));
                }
                Err(err) => {
                    tracing::warn!(
                        namespace,
                        node = %node,
                        error = %err,
                        "snapshots not pruned; node skipped",
                    );
                }
            }
        }
        result.snapshots.sort();
    }
}

/// True when a result removed something.
pub(crate) fn removed_any(result: &NamespaceResult) -> bool {
    !result.blobs.is_empty() || !result.snapshots.is_empty()
}
