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

/// How many namespaces are swept at once.
const NAMESPACES_IN_FLIGHT: usize = 4;

/// What one sweep works from.
pub(crate) struct Sweep<'a> {
    /// The services.
    pub remote: &'a Remote,
    /// The mark epoch.
    pub epoch: u64,
    /// Report only.
    pub dry_run: bool,
}

/// What a prune of one namespace on some nodes did.
#[derive(Default)]
pub(crate) struct Pruned {
    /// The removed snapshots as `<node>/<key>`, and the bytes freed.
    pub result: NamespaceResult,
    /// The nodes that answered.
    pub answered: BTreeSet<String>,
    /// The nodes whose prune answered `Unavailable`.
    pub unavailable: BTreeSet<String>,
}

impl Sweep<'_> {
    /// Sweeps every namespace of `live_sets`, a few at once: its blobs and,
    /// side by side, its snapshots on each of `nodes`. Returns one result
    /// per namespace, in order, and the nodes whose every prune answered
    /// `Unavailable`: nothing serves them any more.
    pub(crate) async fn namespaces(
        &self,
        live_sets: &[(String, LiveSet)],
        nodes: &BTreeSet<String>,
    ) -> (Vec<NamespaceResult>, BTreeSet<String>) {
        let sweeps: Vec<_> = live_sets
            .iter()
            .map(|(namespace, live)| self.namespace(namespace, live, nodes))
            .collect();
        let swept: Vec<_> = futures::stream::iter(sweeps)
            .buffered(NAMESPACES_IN_FLIGHT)
            .collect()
            .await;

        let (mut answered, mut unavailable) = (BTreeSet::new(), BTreeSet::new());
        let mut results = Vec::with_capacity(swept.len());
        for (result, pruned) in swept {
            answered.extend(pruned.answered);
            unavailable.extend(pruned.unavailable);
            results.push(result);
        }
        let gone = unavailable.difference(&answered).cloned().collect();
        (results, gone)
    }

    /// Sweeps one namespace: see [`Sweep::namespaces`].
    async fn namespace(
        &self,
        namespace: &str,
        live: &LiveSet,
        nodes: &BTreeSet<String>,
    ) -> (NamespaceResult, Pruned) {
        let (mut result, mut pruned) = tokio::join!(
            self.blobs(namespace, live),
            self.snapshots(namespace, live, nodes)
        );
        merge(&mut result, std::mem::take(&mut pruned.result));
        (result, pruned)
    }

    /// Deletes every blob of the namespace that is not live.
    ///
    /// In a dry run `freed_bytes` counts the full size of every blob that
    /// would go, an upper bound: bytes another namespace holds stay on disk.
    async fn blobs(&self, namespace: &str, live: &LiveSet) -> NamespaceResult {
        let mut result = empty(namespace);
        let infos = match self.remote.list_blobs(namespace).await {
            Ok(infos) => infos,
            Err(err) => {
                tracing::warn!(namespace, error = %err, "content not listed; blobs not swept");
                return result;
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
            return result;
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
        result
    }

    /// Prunes the namespace on each of `nodes` at once, so a node that does
    /// not answer delays only itself; it is skipped and catches up next run.
    async fn snapshots(&self, namespace: &str, live: &LiveSet, nodes: &BTreeSet<String>) -> Pruned {
        let prunes = nodes.iter().map(|node| async move {
            let keys = live.snapshots_on(node);
            let outcome = self
                .remote
                .prune(namespace, node, keys, self.epoch, self.dry_run)
                .await;
            (node, outcome)
        });
        let mut pruned = Pruned {
            result: empty(namespace),
            ..Default::default()
        };
        for (node, outcome) in futures::future::join_all(prunes).await {
            let reply = match outcome {
                Ok(reply) => reply,
                Err(err) => {
                    if err.code == Code::Unavailable {
                        pruned.unavailable.insert(node.clone());
                    }
                    tracing::warn!(
                        namespace,
                        node = %node,
                        error = %err,
                        "snapshots not pruned; node skipped",
                    );
                    continue;
                }
            };
            for key in &reply.removed {
                tracing::debug!(namespace, node = %node, snapshot_key = %key, "snapshot removed");
            }
            pruned.answered.insert(node.clone());
            pruned.result.freed_bytes += reply.freed_bytes;
            let removed = reply.removed.into_iter().map(|key| format!("{node}/{key}"));
            pruned.result.snapshots.extend(removed);
        }
        pruned.result.snapshots.sort();
        pruned
    }
}

/// A result of `namespace` that removed nothing.
fn empty(namespace: &str) -> NamespaceResult {
    NamespaceResult {
        namespace: namespace.to_string(),
        ..Default::default()
    }
}

/// Adds what `more` removed to `into`, both of one namespace.
pub(crate) fn merge(into: &mut NamespaceResult, more: NamespaceResult) {
    into.blobs.extend(more.blobs);
    into.blobs.sort();
    into.snapshots.extend(more.snapshots);
    into.snapshots.sort();
    into.freed_bytes += more.freed_bytes;
}

/// True when a result removed something.
pub(crate) fn removed_any(result: &NamespaceResult) -> bool {
    !result.blobs.is_empty() || !result.snapshots.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merging adds both lists in order and sums the bytes.
    #[test]
    fn merge_results() {
        let mut into = NamespaceResult {
            namespace: "default".into(),
            blobs: vec!["b".into()],
            snapshots: vec!["n2/k".into()],
            freed_bytes: 5,
        };
        let more = NamespaceResult {
            namespace: "default".into(),
            blobs: vec!["a".into()],
            snapshots: vec!["n1/k".into()],
            freed_bytes: 7,
        };
        merge(&mut into, more);
        assert_eq!(into.blobs, ["a", "b"]);
        assert_eq!(into.snapshots, ["n1/k", "n2/k"]);
        assert_eq!(into.freed_bytes, 12);
        assert!(removed_any(&into));
        assert!(!removed_any(&empty("default")));
    }
}
