//! `unpack`: an image's layers as committed snapshots named by chain ID.
//!
//! For each layer, base first, the chain ID names the snapshot that holds the
//! layer applied on all those below it. A chain ID already committed in the
//! namespace is reused: its touched time is stamped in one transaction. A
//! missing one is applied: a temporary active snapshot (`extract-<random>`)
//! is made on the parent chain, the blob is streamed into
//! [`apply::apply_layer`], the compressed digest, size and diff ID are
//! checked against the descriptor and the image config, the bytes are
//! flushed with `syncfs`, and the snapshot is committed under the chain ID
//! with its `snapshot.commit` event. Any failure removes the temporary
//! snapshot and its directory, so nothing of a bad layer stays.
//!
//! One unpack at a time applies a given chain ID of a namespace; a second
//! waits for it and then reuses the snapshot it committed. Every chain ID is
//! attached to the caller's lease before it is touched or made, so a gc that
//! marks meanwhile either sees the lease or finds the snapshot touched after
//! its epoch.
//!
//! The blob is read from the content service of the same namespace, which
//! must hold it (`info` first, so a tenant cannot unpack a blob it never
//! provided): from the file under the configured content root when the two
//! services share the host, else pulled over NATS in chunks with a few in
//! flight, so memory stays bounded whatever the layer's size.
//!
//! What one unpack may ask is bounded by the node's [`crate::Limits`]: a
//! request of more layers is refused before anything is made, and a layer
//! that inflates past the cap, or would leave the filesystem nearly full,
//! stops there and goes like any failed layer.
//!
//! # Limitations
//!
//! The caps bound bytes, not files: a layer of millions of empty files
//! under the size cap may still use up the filesystem's inodes. Without a lease, nothing protects a chain ID between its commit and the
//! image record that names it: a gc marking in between may collect it. The
//! request log entry is written when every layer is done, so a retry of a
//! request that timed out part-way runs again, reusing the layers already
//! committed.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;

use berth_bus::api::Content;
use berth_bus::{chunk, Call};
use berth_oci::Digest;
use berth_proto::content as cpb;
use berth_proto::snapshot as pb;

use crate::apply::{self, Applied, Compression};
use crate::error::SnapshotError;
use crate::handlers::{blocking, create, mutate, now};
use crate::store::{Kind, Record, EXTRACT_PREFIX};
use crate::SnapshotService;

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// One layer of the request, checked.
#[derive(Debug, Clone)]
struct Layer {
    digest: Digest,
    size: u64,
    compression: Compression,
    diff_id: Digest,
    chain_id: Digest,
}

/// Makes sure every layer's committed snapshot exists on this node; the
/// reply names the top one.
pub(crate) async fn unpack(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::UnpackRequest,
) -> Result<pb::UnpackReply> {
    let layers = layers(&req, svc.limits.max_layers)?;
    let namespace = call.namespace().to_string();

    // A retry of a finished unpack gets its first reply.
    let replay = {
        let (svc, call) = (svc.clone(), call.clone());
        blocking(move || {
            let txn = svc.store.env.write_txn()?;
            let replayed = svc.store.requests.replay(&txn, &call);
            replayed.map_err(SnapshotError::bus("request log"))
        })
        .await?
    };
    if let Some(reply) = replay {
        return Ok(reply);
    }

    let chain_ids: Vec<String> = layers.iter().map(|l| l.chain_id.to_string()).collect();
    svc.attach_to_lease(&namespace, &req.lease_id, &chain_ids)
        .await?;

    // The layers are applied by a task of their own: the serve loop drops a
    // request's future at its deadline, and an apply cut off there would
    // leave its temporary snapshot until the next start.
    let work = tokio::spawn(unpack_layers(svc.clone(), namespace, layers));
    let reply = work.await.map_err(SnapshotError::Worker)??;

    blocking(move || {
        let (reply, _) = mutate(&svc.store, &call, |_| Ok(reply))?;
        Ok(reply)
    })
    .await
}

/// Checks the request: at most `max_layers` layers, as many diff IDs as
/// layers, well-formed digests, sizes and media types of layers berth can
/// apply.
fn layers(req: &pb::UnpackRequest, max_layers: usize) -> Result<Vec<Layer>> {
    if req.layers.len() > max_layers {
        return Err(SnapshotError::InvalidRequest {
            field: "layers",
            reason: format!(
                "the image has {} layers, over this node's limit of {max_layers}",
                req.layers.len()
            ),
        });
    }
    if req.layers.len() != req.diff_ids.len() {
        return Err(SnapshotError::InvalidRequest {
            field: "diff_ids",
            reason: format!(
                "{} diff ids for {} layers",
                req.diff_ids.len(),
                req.layers.len()
            ),
        });
    }
    let parse = |field, value: &str| {
        Digest::parse(value).map_err(|err| SnapshotError::InvalidRequest {
            field,
            reason: err.to_string(),
        })
    };
    let diff_ids = req
        .diff_ids
        .iter()
        .map(|diff_id| parse("diff_ids", diff_id))
        .collect::<Result<Vec<_>>>()?;
    let chain_ids = berth_oci::chain_ids(&diff_ids);

    let mut out = Vec::with_capacity(req.layers.len());
    for ((desc, diff_id), chain_id) in req.layers.iter().zip(diff_ids).zip(chain_ids) {
        let digest = parse("layers", &desc.digest)?;
        let size = u64::try_from(desc.size).map_err(|_| SnapshotError::InvalidRequest {
            field: "layers",
            reason: format!("layer {digest} has a negative size"),
        })?;
        let compression =
            apply::compression_for(&desc.media_type).map_err(|source| SnapshotError::Apply {
                digest: digest.to_string(),
                source,
            })?;
        out.push(Layer {
            digest,
            size,
            compression,
            diff_id,
            chain_id,
        });
    }
    Ok(out)
}

async fn unpack_layers(
    svc: Arc<SnapshotService>,
    namespace: String,
    layers: Vec<Layer>,
) -> Result<pb::UnpackReply> {
    let mut parent = String::new();
    let mut applied = 0;
    for layer in &layers {
        if ensure(&svc, &namespace, &parent, layer).await? {
            applied += 1;
        }
        parent = layer.chain_id.to_string();
    }
    Ok(pb::UnpackReply {
        chain_id: parent,
        applied,
    })
}

/// Makes sure the committed snapshot of `layer` exists; true when this call
/// applied it.
async fn ensure(
    svc: &Arc<SnapshotService>,
    namespace: &str,
    parent: &str,
    layer: &Layer,
) -> Result<bool> {
    let chain_id = layer.chain_id.as_str();
    if reuse(svc, namespace, chain_id).await? {
        return Ok(false);
    }
    let _applying = svc
        .chain_locks
        .lock(format!("{namespace}\0{chain_id}"))
        .await;

    // Another unpack may have committed it while this one waited.
    if reuse(svc, namespace, chain_id).await? {
        return Ok(false);
    }
    apply_layer(svc, namespace, parent, layer).await?;
    Ok(true)
}

/// Stamps committed `chain_id` as reused; false when it does not exist.
async fn reuse(svc: &Arc<SnapshotService>, namespace: &str, chain_id: &str) -> Result<bool> {
    let (svc, namespace, chain_id) = (svc.clone(), namespace.to_string(), chain_id.to_string());
    blocking(move || {
        let store = &svc.store;
        if store
            .get(&*store.env.read_txn()?, &namespace, &chain_id)?
            .is_none()
        {
            return Ok(false);
        }
        let mut txn = store.env.write_txn()?;
        let touched = store.touch(&mut txn, &namespace, &chain_id, now())?;
        txn.commit()?;
        Ok(touched)
    })
    .await
}

/// A temporary active snapshot a layer is applied into.
struct Extract {
    key: String,
    id: u64,
    lowers: Vec<PathBuf>,
}

/// Applies `layer` on `parent` into a temporary snapshot and commits it
/// under the layer's chain ID; on any failure the temporary snapshot goes.
#[tracing::instrument(skip_all, fields(namespace = %namespace, chain_id = %layer.chain_id, digest = %layer.digest))]
async fn apply_layer(
    svc: &Arc<SnapshotService>,
    namespace: &str,
    parent: &str,
    layer: &Layer,
) -> Result<()> {
    let extract = make_extract(svc, namespace, parent).await?;
    let (key, id) = (extract.key.clone(), extract.id);
    let started = std::time::Instant::now();
    match fill_and_commit(svc, namespace, extract, layer).await {
        Ok(applied) => {
            tracing::debug!(
                size = applied.uncompressed_size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "layer applied"
            );
            Ok(())
        }
        Err(err) => {
            discard(svc, namespace, &key, id).await;
            Err(err)
        }
    }
}

/// Makes the temporary snapshot `extract-<random>` on `parent`.
async fn make_extract(
    svc: &Arc<SnapshotService>,
    namespace: &str,
    parent: &str,
) -> Result<Extract> {
    let key = format!("{EXTRACT_PREFIX}{}", berth_bus::client::new_request_id());
    let (svc, namespace, parent) = (svc.clone(), namespace.to_string(), parent.to_string());
    blocking(move || {
        let store = &svc.store;
        create(store, &namespace, &parent, |id, lowers| {
            let record = Record::new(id, Kind::Active, &parent, BTreeMap::new(), now());
            let mut txn = store.env.write_txn()?;
            store.insert(&mut txn, &namespace, &key, &record)?;
            txn.commit()?;
            let lowers = lowers.to_vec();
            Ok((Extract { key, id, lowers }, true))
        })
    })
    .await
}

/// Streams the layer into the temporary snapshot, checks what was read, and
/// commits the snapshot under the layer's chain ID.
async fn fill_and_commit(
    svc: &Arc<SnapshotService>,
    namespace: &str,
    extract: Extract,
    layer: &Layer,
) -> Result<Applied> {
    let source = open_layer(svc, namespace, layer).await?;
    let (fs, compression) = (svc.store.fs_dir(extract.id), layer.compression);
    let digest = layer.digest.to_string();
    let lowers = extract.lowers;
    let limits = apply::LayerLimits {
        max_size: svc.limits.max_layer_size,
        min_free: svc.limits.min_free_bytes,
    };
    let applied = blocking(move || {
        apply::apply_layer_with(source, compression, &fs, &lowers, limits)
            .map_err(|source| SnapshotError::Apply { digest, source })
    })
    .await?;
    verify(layer, &applied)?;

    // Flushed before the record says committed, so a crash never leaves a
    // committed layer with missing bytes.
    let (svc, namespace) = (svc.clone(), namespace.to_string());
    let chain_id = layer.chain_id.to_string();
    blocking(move || {
        let store = &svc.store;
        store.syncfs(extract.id)?;
        let mut txn = store.env.write_txn()?;
        let labels = BTreeMap::new();
        store.commit(&mut txn, &namespace, &extract.key, &chain_id, labels, now())?;
        txn.commit()?;
        Ok(applied)
    })
    .await
}

/// Checks what the apply read against the descriptor and the image config.
fn verify(layer: &Layer, applied: &Applied) -> Result<()> {
    let digest = layer.digest.to_string();
    if applied.compressed_digest != layer.digest.as_str() {
        return Err(SnapshotError::LayerDigestMismatch {
            digest,
            actual: applied.compressed_digest.clone(),
        });
    }
    if applied.compressed_size != layer.size {
        return Err(SnapshotError::LayerSizeMismatch {
            digest,
            expected: layer.size,
            actual: applied.compressed_size,
        });
    }
    if applied.diff_id != layer.diff_id.as_str() {
        return Err(SnapshotError::DiffIdMismatch {
            digest,
            expected: layer.diff_id.to_string(),
            actual: applied.diff_id.clone(),
        });
    }
    Ok(())
}

/// Drops a temporary snapshot after a failed apply: record, then directory.
/// A failure here is logged; the next start removes what is left.
async fn discard(svc: &Arc<SnapshotService>, namespace: &str, key: &str, id: u64) {
    let (svc, namespace, key) = (svc.clone(), namespace.to_string(), key.to_string());
    let outcome = blocking(move || {
        let store = &svc.store;
        let mut txn = store.env.write_txn()?;
        store.discard(&mut txn, &namespace, &key)?;
        txn.commit()?;
        store.remove_dirs(id);
        Ok(())
    })
    .await;
    if let Err(err) = outcome {
        tracing::warn!(error = %err, "temporary snapshot not removed; the next start removes it");
    }
}

/// Opens the layer blob, which the namespace must hold in content: the file
/// under the content root when configured and present, else a stream pulled
/// over NATS.
async fn open_layer(
    svc: &SnapshotService,
    namespace: &str,
    layer: &Layer,
) -> Result<Box<dyn Read + Send>> {
    let digest = layer.digest.to_string();
    let content = Content {
        client: svc.client.clone(),
        namespace: namespace.to_string(),
    };
    let request = cpb::InfoRequest {
        digest: digest.clone(),
    };
    let info = content
        .info(&request)
        .await
        .map_err(|source| SnapshotError::Content {
            digest: digest.clone(),
            source,
        })?;

    // The path is made here from a checked digest, never taken from the wire.
    if let Some(root) = &svc.content_root {
        let path = root.join("blobs/sha256").join(layer.digest.hex());
        match std::fs::File::open(&path) {
            Ok(file) => return Ok(Box::new(file)),
            Err(err) => tracing::debug!(
                path = %path.display(),
                error = %err,
                "layer blob not readable under the content root; pulling it"
            ),
        }
    }
    let size = info.info.map_or(0, |info| info.size.max(0) as u64);
    Ok(Box::new(ChunkReader::spawn(content, digest, size)))
}

/// A blob pulled from the content service in chunks and read as a stream.
///
/// A task pulls ahead with [`chunk::IN_FLIGHT`] requests in flight and as
/// many chunks buffered, so memory stays bounded whatever the blob's size.
/// A failed chunk ends the stream with an `io::Error` that carries the
/// content service's [`berth_bus::Error`], whose code the reply keeps.
struct ChunkReader {
    chunks: mpsc::Receiver<berth_bus::Result<Bytes>>,
    current: Bytes,
}

impl ChunkReader {
    /// Starts pulling `size` bytes of `digest`; call from a tokio runtime.
    fn spawn(content: Content, digest: String, size: u64) -> Self {
        let (tx, rx) = mpsc::channel(chunk::IN_FLIGHT);
        tokio::spawn(async move {
            let max = content.client.max_body();
            let chunks = chunk::pull(size, max, chunk::IN_FLIGHT, |offset, length| {
                let request = cpb::ReadRequest {
                    digest: digest.clone(),
                    offset: offset as i64,
                    length: length as i64,
                };
                let content = &content;
                async move { Ok(content.read(&request).await?.data) }
            });
            futures::pin_mut!(chunks);

            // Stops at the first failure, or when the reader is gone.
            while let Some(chunk) = chunks.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        ChunkReader {
            chunks: rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChunkReader {
    /// Blocks the calling thread: read it from the blocking pool only.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(err)) => return Err(io::Error::other(err)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}
