//! The calls gc makes to the other services: metadata for the roots, content
//! for blobs, snapshot services for prunes, and micro-service discovery to
//! find the nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use berth_bus::client::new_request_id;
use berth_bus::{chunk, subject, Client, Code, Error, Result};
use berth_proto::{content as cpb, metadata as mdpb, snapshot as spb};

use crate::mark::{BlobSource, MAX_MANIFEST_SIZE};

/// How long discovery collects replies from snapshot services.
pub(crate) const DISCOVERY_WINDOW: Duration = Duration::from_millis(250);

/// The other services, reached over one connection.
#[derive(Clone)]
pub(crate) struct Remote {
    client: Client,
}

impl Remote {
    pub(crate) fn new(client: Client) -> Self {
        Remote { client }
    }

    /// A new epoch and every namespace's roots, asked in `namespace` (any
    /// namespace answers for all).
    pub(crate) async fn mark(&self, namespace: &str) -> Result<mdpb::MarkReply> {
        let subject = subject::op(namespace, "metadata", "gc.mark")?;
        self.client.call(&subject, &mdpb::MarkRequest {}).await
    }

    /// Every blob `namespace` holds.
    pub(crate) async fn list_blobs(&self, namespace: &str) -> Result<Vec<cpb::Info>> {
        let subject = subject::op(namespace, "content", "list")?;
        let reply: cpb::ListReply = self
            .client
            .call(&subject, &cpb::ListRequest::default())
            .await?;
        Ok(reply.infos)
    }

    /// Whether `namespace` holds blob `digest`.
    pub(crate) async fn holds_blob(&self, namespace: &str, digest: &str) -> Result<bool> {
        let subject = subject::op(namespace, "content", "info")?;
        let request = cpb::InfoRequest {
            digest: digest.to_string(),
        };
        match self
            .client
            .call::<_, cpb::InfoReply>(&subject, &request)
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if err.code == Code::NotFound => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Every snapshot `namespace` has on `node`, with its parent.
    pub(crate) async fn list_snapshots(
        &self,
        namespace: &str,
        node: &str,
    ) -> Result<Vec<spb::Info>> {
        let subject = subject::node_op(namespace, "snapshot", node, "list")?;
        let reply: spb::ListReply = self
            .client
            .call(&subject, &spb::ListRequest::default())
            .await?;
        Ok(reply.infos)
    }

    /// Drops `namespace`'s hold on a blob unless it was touched at or after
    /// `epoch`.
    pub(crate) async fn delete_blob(
        &self,
        namespace: &str,
        digest: &str,
        epoch: u64,
    ) -> Result<cpb::DeleteReply> {
        let subject = subject::op(namespace, "content", "delete")?;
        let request = cpb::DeleteRequest {
            digest: digest.to_string(),
            unless_touched_since: epoch,
        };
        self.client
            .call_mut(&subject, &request, &new_request_id())
            .await
    }

    /// Asks `node` to prune `namespace` down to `live`.
    pub(crate) async fn prune(
        &self,
        namespace: &str,
        node: &str,
        live: Vec<String>,
        epoch: u64,
        dry_run: bool,
    ) -> Result<spb::PruneReply> {
        let subject = subject::node_op(namespace, "snapshot", node, "prune")?;
        let request = spb::PruneRequest {
            live,
            unless_touched_since: epoch,
            dry_run,
        };
        self.client
            .call_mut(&subject, &request, &new_request_id())
            .await
    }

    /// The nodes that run a snapshot service now, found through the NATS
    /// micro-service protocol: every instance answers `$SRV.PING.snapshot`
    /// and `$SRV.INFO.snapshot` on one inbox within `window`.
    ///
    /// # Limitations
    /// A node whose reply comes after the window is missed by this run and
    /// pruned by a later one.
    pub(crate) async fn snapshot_nodes(&self, window: Duration) -> Result<BTreeSet<String>> {
        let nats = self.client.nats();
        let unavailable =
            |err: &dyn std::fmt::Display| Error::unavailable(format!("snapshot discovery: {err}"));
        let inbox = nats.new_inbox();
        let mut replies = nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable(&e))?;
        for ask in ["$SRV.PING.snapshot", "$SRV.INFO.snapshot"] {
            nats.publish_with_reply(ask, inbox.clone(), Bytes::new())
                .await
                .map_err(|e| unavailable(&e))?;
        }
        nats.flush().await.map_err(|e| unavailable(&e))?;

        let mut nodes = BTreeSet::new();
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                reply = replies.next() => match reply {
                    Some(reply) => nodes.extend(nodes_of_reply(&reply.payload)),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(nodes)
    }
}

/// The chunk gc reads blobs in: the floor of `Client::max_body`, which every
/// content service accepts whatever its own view of the server's max
/// payload (a service that measured it before its connection was up
/// accepts only this much). Manifests and configs mostly fit in one.
const READ_CHUNK: usize = 4096;

impl BlobSource for Remote {
    /// Reads the first chunk to learn the size, then pulls the rest a few
    /// chunks at a time.
    async fn read(&self, namespace: &str, digest: &str) -> Result<Option<Bytes>> {
        let subject = subject::op(namespace, "content", "read")?;
        let chunk = READ_CHUNK.min(self.client.max_body());
        let fetch = |offset: u64, length: usize| {
            let request = cpb::ReadRequest {
                digest: digest.to_string(),
                offset: offset as i64,
                length: length as i64,
            };
            let subject = subject.clone();
            async move {
                let reply: cpb::ReadReply = self.client.call(&subject, &request).await?;
                Ok::<_, Error>(reply)
            }
        };

        let first = match fetch(0, chunk).await {
            Ok(reply) => reply,
            Err(err) if err.code == Code::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        if first.size > MAX_MANIFEST_SIZE {
            tracing::warn!(
                namespace,
                digest,
                size = first.size,
                "blob too large to follow; kept as it is"
            );
            return Ok(None);
        }
        let size = first.size.max(0) as u64;
        let mut data = Vec::with_capacity(size as usize);
        data.extend_from_slice(&first.data);
        let rest = size.saturating_sub(data.len() as u64);
        let start = data.len() as u64;
        let mut chunks = std::pin::pin!(chunk::pull(
            rest,
            chunk,
            chunk::IN_FLIGHT,
            |offset, length| {
                let reply = fetch(start + offset, length);
                async move { Ok(reply.await?.data) }
            }
        ));
        while let Some(bytes) = chunks.next().await {
            data.extend_from_slice(&bytes?);
        }
        Ok(Some(data.into()))
    }
}

/// The node ids one discovery reply names: the service's `node` metadata,
/// or else the node token of its endpoints' subjects
/// (`berth.v1.*.snapshot.<node>.<op>`).
pub(crate) fn nodes_of_reply(payload: &[u8]) -> Vec<String> {
    let Ok(reply) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Vec::new();
    };
    let valid = |node: &str| subject::check_token("node id", node).is_ok();
    if let Some(node) = reply.pointer("/metadata/node").and_then(|v| v.as_str()) {
        if valid(node) {
            return vec![node.to_string()];
        }
    }
    let endpoints = reply.get("endpoints").and_then(|v| v.as_array());
    let mut nodes: Vec<String> = endpoints
        .into_iter()
        .flatten()
        .filter_map(|endpoint| endpoint.get("subject").and_then(|v| v.as_str()))
        .filter_map(|subject| {
            let tokens: Vec<&str> = subject.split('.').collect();
            match tokens.as_slice() {
                ["berth", "v1", _, "snapshot", node, _, ..] if valid(node) => {
                    Some(node.to_string())
                }
                _ => None,
            }
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PING reply names its node in the metadata; an INFO reply without
    /// it names the node in its endpoints' subjects; anything else names none.
    #[test]
    fn nodes_from_discovery_replies() {
        let ping = br#"{"type":"io.nats.micro.v1.ping_response","name":"snapshot",
            "id":"x","version":"0.1.0","metadata":{"node":"node-1"}}"#;
        assert_eq!(nodes_of_reply(ping), vec!["node-1"]);

        let info = br#"{"type":"io.nats.micro.v1.info_response","name":"snapshot","metadata":{},
            "endpoints":[{"name":"prune","subject":"berth.v1.*.snapshot.node-2.prune"},
                         {"name":"list","subject":"berth.v1.*.snapshot.node-2.list"}]}"#;
        assert_eq!(nodes_of_reply(info), vec!["node-2"]);

        let bare_ping =
            br#"{"type":"io.nats.micro.v1.ping_response","name":"snapshot","metadata":{}}"#;
        assert!(nodes_of_reply(bare_ping).is_empty());
        assert!(nodes_of_reply(b"not json").is_empty());
        let wildcard = br#"{"endpoints":[{"subject":"berth.v1.*.snapshot.*.prune"}]}"#;
        assert!(nodes_of_reply(wildcard).is_empty());
    }
}
