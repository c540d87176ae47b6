//! The steps of one pull: resolve the reference to the image for the
//! platform, store its documents, then fetch its layers into ingests and
//! commit them, a few at a time.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::task::JoinHandle;

use berth_bus::Call;
use berth_oci::image::{BlobKind, Limits};
use berth_oci::{Descriptor, ImageError, ResolvedImage};
use berth_proto::content as pb;

use super::error::PullError;
use super::progress::Tracker;
use super::registry::{is_digest_check, Registry};
use super::PullSpec;
use crate::digest::Digest;
use crate::error::ContentError;
use crate::handlers::blocking;
use crate::handlers::ingests::commit_blob;
use crate::ingest::IngestMeta;
use crate::ContentService;

/// How many layers of one pull are fetched at once.
pub const LAYERS_AT_ONCE: usize = 4;

/// How many bytes go to the ingest in one write: network chunks are a few
/// KiB, and each write is a trip to the blocking pool.
const WRITE_CHUNK: usize = 1 << 20;

/// Pulls the image `spec` names into the namespace's store.
pub async fn pull(
    svc: &Arc<ContentService>,
    namespace: &str,
    spec: &PullSpec,
    tracker: &Tracker,
) -> Result<(), PullError> {
    let registry = Registry::connect(&spec.reference, spec.insecure, spec.credentials.clone());
    let registry = Arc::new(registry.await?);
    let resolved = resolve(svc, namespace, &registry, spec).await?;

    // The documents go in first: small, and what gc follows to the layers.
    let mut config_held = false;
    for (desc, bytes) in &resolved.documents {
        let held = store_document(svc, namespace, desc, bytes, &spec.lease_id).await?;
        if desc.digest == resolved.image.config.digest {
            config_held = held;
        }
    }
    tracker.resolved(image_pb(&resolved), blobs_pb(&resolved.image, config_held));

    let layers = &resolved.image.layers;
    let outcome = fetch_layers(svc, namespace, &registry, layers, spec, tracker).await;
    if let Err(err) = &outcome {
        if !err.is_transient() {
            discard_unfinished(svc, namespace, tracker).await;
        }
    }
    outcome
}

/// The image a pull resolved, with the documents met on the way.
struct Resolved {
    /// What the reference names.
    target: Descriptor,
    /// The image for the platform.
    image: ResolvedImage,
    /// Every index, manifest and config read, checked.
    documents: Vec<(Descriptor, Bytes)>,
}

/// What the walk of documents may fail with.
enum Walk {
    Image(ImageError),
    Pull(PullError),
}

impl From<ImageError> for Walk {
    fn from(err: ImageError) -> Self {
        Walk::Image(err)
    }
}

/// Fetches what the reference names and walks from it to the image for
/// the platform, checking every document ([`berth_oci::resolve_with`]).
async fn resolve(
    svc: &Arc<ContentService>,
    namespace: &str,
    registry: &Arc<Registry>,
    spec: &PullSpec,
) -> Result<Resolved, PullError> {
    let limits = Limits::DEFAULT;
    let reference = spec.reference.to_string();
    let asked = match (&spec.reference.digest, &spec.reference.tag) {
        (Some(digest), _) => digest.to_string(),
        (None, Some(tag)) => tag.clone(),
        (None, None) => berth_oci::reference::DEFAULT_TAG.to_string(),
    };
    let top = registry.manifest(&asked, limits.largest_document()).await?;
    let digest = berth_oci::Digest::of(&top.bytes);
    if let Some(pinned) = &spec.reference.digest {
        if *pinned != digest {
            return Err(PullError::ManifestDigest {
                registry: registry.host().to_string(),
                reference,
                actual: digest.to_string(),
            });
        }
    }
    let media_type = document_type(top.media_type.as_deref(), &top.bytes).ok_or_else(|| {
        PullError::Protocol {
            registry: registry.host().to_string(),
            what: format!("manifest {asked}"),
            reason: "the answer names no media type".to_string(),
        }
    })?;
    let target = Descriptor::new(&media_type, digest, top.bytes.len() as u64);

    // The walk is synchronous; its fetches run on the runtime from a
    // blocking thread.
    let documents = Arc::new(Mutex::new(Vec::new()));
    let walk = {
        let (svc, registry, documents) = (svc.clone(), registry.clone(), documents.clone());
        let (namespace, target, platform) =
            (namespace.to_string(), target.clone(), spec.platform.clone());
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            berth_oci::resolve_with(&target, &platform, &limits, |desc| -> Result<_, Walk> {
                let bytes = if desc.digest == target.digest {
                    top.bytes.clone()
                } else {
                    let fetch = fetch_document(&svc, &namespace, &registry, desc, &limits);
                    handle.block_on(fetch).map_err(Walk::Pull)?
                };
                let mut documents = documents.lock().unwrap_or_else(|p| p.into_inner());
                documents.push((desc.clone(), bytes.clone()));
                Ok(bytes.to_vec())
            })
        })
    };
    let image = match walk.await.map_err(ContentError::Worker)? {
        Ok(image) => image,
        Err(Walk::Pull(err)) => return Err(err),
        Err(Walk::Image(source)) => return Err(PullError::Image { reference, source }),
    };
    let documents = std::mem::take(&mut *documents.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Resolved {
        target,
        image,
        documents,
    })
}

/// The media type of a document the registry sent: its `Content-Type`
/// when that names an index or manifest, else the document's own
/// `mediaType`, else the `Content-Type` (which the walk then refuses).
fn document_type(header: Option<&str>, bytes: &[u8]) -> Option<String> {
    let known = |media_type: &str| {
        matches!(
            BlobKind::of(media_type),
            Some(BlobKind::Index | BlobKind::Manifest)
        )
    };
    if let Some(header) = header.filter(|h| known(h)) {
        return Some(header.to_string());
    }
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let stated = serde_json::from_slice::<Typed>(bytes)
        .ok()
        .and_then(|doc| doc.media_type);
    stated.or_else(|| header.map(str::to_string))
}

/// One document the walk asks for: from the store when the namespace
/// holds it, else from the registry (a manifest or index by digest, a
/// config as a blob), read no further than its kind's cap.
async fn fetch_document(
    svc: &Arc<ContentService>,
    namespace: &str,
    registry: &Registry,
    desc: &Descriptor,
    limits: &Limits,
) -> Result<Bytes, PullError> {
    let kind = BlobKind::of(&desc.media_type).unwrap_or(BlobKind::Manifest);
    let limit = limits.document(kind);
    let digest = Digest::parse(desc.digest.as_str())?;
    if let Some(blob) = svc.store.held(namespace, &digest)? {
        if blob.size <= limit {
            let (svc, namespace) = (svc.clone(), namespace.to_string());
            let read = blocking(move || svc.store.read(&namespace, &digest, 0, blob.size));
            // gc may take it between the look and the read: then it is
            // fetched like a document the namespace never held.
            if let Ok((bytes, _)) = read.await {
                return Ok(bytes.into());
            }
        }
    }
    match kind {
        BlobKind::Config => registry.small_blob(desc.digest.as_str(), limit).await,
        _ => Ok(registry.manifest(desc.digest.as_str(), limit).await?.bytes),
    }
}

/// Stores a checked document under the lease; true when the namespace
/// held it already.
async fn store_document(
    svc: &Arc<ContentService>,
    namespace: &str,
    desc: &Descriptor,
    bytes: &Bytes,
    lease_id: &str,
) -> Result<bool, PullError> {
    let digest = Digest::parse(desc.digest.as_str())?;
    let _fetching = svc
        .pulls
        .fetch_locks
        .lock(lock_name(namespace, &digest))
        .await;
    let reference = ingest_ref(&digest);
    let held = svc.store.held(namespace, &digest)?.is_some();
    if held {
        // The commit attaches the held blob to the lease; gc may take it
        // in between, and then the bytes in hand are written as for any
        // other document.
        match commit(svc, namespace, desc, &digest, reference.clone(), lease_id).await {
            Ok(()) => return Ok(true),
            Err(PullError::Blob { source, .. })
                if matches!(*source, ContentError::NothingToCommit { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    write_ingest(svc, namespace, &reference, bytes, desc).await?;
    commit(svc, namespace, desc, &digest, reference, lease_id).await?;
    Ok(false)
}

/// Writes a document's bytes into its ingest, afresh.
async fn write_ingest(
    svc: &Arc<ContentService>,
    namespace: &str,
    reference: &str,
    bytes: &Bytes,
    desc: &Descriptor,
) -> Result<(), PullError> {
    let (svc, namespace, reference) = (svc.clone(), namespace.to_string(), reference.to_string());
    let (bytes, meta) = (bytes.clone(), meta(desc));
    blocking(move || {
        let ingests = &svc.store.ingests;
        ingests.drop_if_any(&namespace, &reference);
        ingests.open_ingest(&namespace, &reference, &meta)?;
        ingests.write(&namespace, &reference, 0, &bytes)?;
        ingests.release(&namespace, &reference);
        Ok(())
    })
    .await?;
    Ok(())
}

/// Fetches and commits every layer, [`LAYERS_AT_ONCE`] at a time, base
/// first; a layer listed twice is fetched once.
async fn fetch_layers(
    svc: &Arc<ContentService>,
    namespace: &str,
    registry: &Registry,
    layers: &[Descriptor],
    spec: &PullSpec,
    tracker: &Tracker,
) -> Result<(), PullError> {
    let mut seen = HashSet::new();
    // The futures are made here, not by a closure in the stream: a stream
    // holding a closure over borrowed descriptors is not `Send` (the
    // compiler cannot prove it for every lifetime), and the pull runs on a
    // spawned task.
    let fetches: Vec<_> = layers
        .iter()
        .filter(|layer| seen.insert(layer.digest.clone()))
        .map(|layer| fetch_layer(svc, namespace, registry, layer, &spec.lease_id, tracker))
        .collect();
    futures::stream::iter(fetches)
        .buffer_unordered(LAYERS_AT_ONCE)
        .try_collect()
        .await
}

/// One layer: a reuse when the namespace holds it, else fetched from where
/// its ingest ends and committed.
async fn fetch_layer(
    svc: &Arc<ContentService>,
    namespace: &str,
    registry: &Registry,
    desc: &Descriptor,
    lease_id: &str,
    tracker: &Tracker,
) -> Result<(), PullError> {
    let digest = Digest::parse(desc.digest.as_str())?;
    let _fetching = svc
        .pulls
        .fetch_locks
        .lock(lock_name(namespace, &digest))
        .await;
    let reference = ingest_ref(&digest);
    let size = desc.size;

    // Held: the commit attaches it to the lease and stamps it. gc may take
    // it in between; then it is fetched like any other.
    if svc.store.held(namespace, &digest)?.is_some() {
        match commit(svc, namespace, desc, &digest, reference.clone(), lease_id).await {
            Ok(()) => {
                tracker.blob(digest.as_str(), |blob| {
                    blob.state = pb::BlobState::Exists as i32;
                    blob.offset = size as i64;
                });
                return Ok(());
            }
            Err(PullError::Blob { source, .. })
                if matches!(*source, ContentError::NothingToCommit { .. }) => {}
            Err(err) => return Err(err),
        }
    }

    let _permit = svc.pulls.downloads.0.acquire().await;
    let offset = open(svc, namespace, &reference, desc).await?;
    let _release = Release {
        svc: svc.clone(),
        namespace: namespace.to_string(),
        reference: reference.clone(),
    };
    tracker.blob(digest.as_str(), |blob| {
        blob.state = pb::BlobState::Fetching as i32;
        blob.offset = offset as i64;
    });
    if offset < size {
        let download = Download {
            svc,
            namespace,
            registry,
            digest: &digest,
            size,
            reference: &reference,
            tracker,
        };
        download.run(offset).await?;
    }
    commit(svc, namespace, desc, &digest, reference, lease_id).await?;
    tracker.blob(digest.as_str(), |blob| {
        blob.state = pb::BlobState::Committed as i32;
        blob.offset = size as i64;
    });
    Ok(())
}

/// Opens (or resumes) the layer's ingest and returns where it ends. An
/// ingest left with other expectations (an earlier manifest gave the same
/// digest another size) is dropped and started again.
async fn open(
    svc: &Arc<ContentService>,
    namespace: &str,
    reference: &str,
    desc: &Descriptor,
) -> Result<u64, PullError> {
    let (svc, namespace, reference) = (svc.clone(), namespace.to_string(), reference.to_string());
    let meta = meta(desc);
    let opened = blocking(move || {
        let ingests = &svc.store.ingests;
        match ingests.open_ingest(&namespace, &reference, &meta) {
            Err(ContentError::IngestMismatch { .. }) => {
                ingests.drop_if_any(&namespace, &reference);
                ingests.open_ingest(&namespace, &reference, &meta)
            }
            other => other,
        }
    });
    Ok(opened.await?.offset)
}

/// The bytes of one layer from the registry into its ingest.
struct Download<'a> {
    svc: &'a Arc<ContentService>,
    namespace: &'a str,
    registry: &'a Registry,
    digest: &'a Digest,
    size: u64,
    reference: &'a str,
    tracker: &'a Tracker,
}

impl Download<'_> {
    /// Streams the blob from `offset` to its end into the ingest, one
    /// write in flight while the next chunk arrives; returns the ingest's
    /// length. `Interrupted` when the registry breaks off (what came is
    /// kept), and the store's refusal when it sends more than the size.
    async fn run(&self, offset: u64) -> Result<u64, PullError> {
        let mut stream = self.registry.blob(self.digest.as_str(), offset).await?;
        // A registry that ignored the range sends the blob from its start.
        let mut skip = offset - stream.start.min(offset);
        let (mut written, mut end, mut fetched) = (offset, offset, 0u64);
        let mut buf = Vec::with_capacity(WRITE_CHUNK);
        let mut pending: Option<JoinHandle<Result<u64, ContentError>>> = None;
        let mut broke = None;
        loop {
            let done = match stream.chunks.next().await {
                Some(Ok(chunk)) => {
                    fetched += chunk.len() as u64;
                    let cut = (skip as usize).min(chunk.len());
                    skip -= cut as u64;
                    buf.extend_from_slice(&chunk[cut..]);
                    false
                }
                // The client's own digest check at the end of a whole
                // stream: every byte came, and the commit refuses them.
                Some(Err(err)) if is_digest_check(&err) => true,
                Some(Err(err)) => {
                    broke = Some(err);
                    true
                }
                None => true,
            };
            if buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
                if let Some(previous) = pending.take() {
                    end = self.finished(previous, fetched).await?;
                }
                let data = std::mem::replace(&mut buf, Vec::with_capacity(WRITE_CHUNK));
                let at = written;
                written += data.len() as u64;
                pending = Some(self.write(at, data));
            }
            if done {
                break;
            }
        }
        if let Some(last) = pending.take() {
            end = self.finished(last, fetched).await?;
        }
        if let Some(err) = broke {
            let err = Box::new(err);
            return Err(self
                .registry
                .interrupted(self.digest.as_str(), end, self.size, err));
        }
        if end < self.size {
            return Err(PullError::Interrupted {
                digest: self.digest.to_string(),
                registry: self.registry.host().to_string(),
                offset: end,
                size: self.size,
                source: None,
            });
        }
        Ok(end)
    }

    /// Starts writing `data` at `at` on the blocking pool.
    fn write(&self, at: u64, data: Vec<u8>) -> JoinHandle<Result<u64, ContentError>> {
        let (svc, namespace) = (self.svc.clone(), self.namespace.to_string());
        let reference = self.reference.to_string();
        tokio::task::spawn_blocking(move || {
            let ingests = &svc.store.ingests;
            ingests.write(&namespace, &reference, at as i64, &data)
        })
    }

    /// Waits for a write, and counts it as progress.
    async fn finished(
        &self,
        write: JoinHandle<Result<u64, ContentError>>,
        fetched: u64,
    ) -> Result<u64, PullError> {
        let end = write
            .await
            .map_err(ContentError::Worker)?
            .map_err(|source| PullError::Blob {
                digest: self.digest.to_string(),
                source: Box::new(source),
            })?;
        self.tracker.blob(self.digest.as_str(), |blob| {
            blob.offset = end as i64;
            blob.fetched = fetched as i64;
        });
        Ok(end)
    }
}

/// Commits a blob's ingest (or reuses the namespace's blob) under the
/// lease; the store's refusal is `Blob`, naming the digest.
async fn commit(
    svc: &Arc<ContentService>,
    namespace: &str,
    desc: &Descriptor,
    digest: &Digest,
    reference: String,
    lease_id: &str,
) -> Result<(), PullError> {
    let committed = commit_blob(
        svc.clone(),
        Call::internal(namespace),
        reference,
        digest.clone(),
        [desc.size, desc.size],
        lease_id.to_string(),
        BTreeMap::new(),
    );
    match committed.await {
        Ok(_) => Ok(()),
        Err(ContentError::Pull(err)) => Err(err),
        Err(source) => Err(PullError::Blob {
            digest: digest.to_string(),
            source: Box::new(source),
        }),
    }
}

/// Drops the ingests of the blobs a failed pull did not finish: the image
/// is refused, and nothing of it is worth resuming.
async fn discard_unfinished(svc: &Arc<ContentService>, namespace: &str, tracker: &Tracker) {
    let finished = [
        pb::BlobState::Committed as i32,
        pb::BlobState::Exists as i32,
    ];
    for blob in tracker.snapshot().blobs {
        if finished.contains(&blob.state) {
            continue;
        }
        let Ok(digest) = Digest::parse(&blob.digest) else {
            continue;
        };
        let _fetching = svc
            .pulls
            .fetch_locks
            .lock(lock_name(namespace, &digest))
            .await;
        let (svc, namespace) = (svc.clone(), namespace.to_string());
        let dropped = blocking(move || {
            let reference = ingest_ref(&digest);
            svc.store.ingests.drop_if_any(&namespace, &reference);
            Ok(())
        });
        let _ = dropped.await;
    }
}

/// Gives up the hold on an ingest when its fetch stops, however it stops,
/// so the next pull resumes it at once.
struct Release {
    svc: Arc<ContentService>,
    namespace: String,
    reference: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let (svc, namespace) = (self.svc.clone(), std::mem::take(&mut self.namespace));
        let reference = std::mem::take(&mut self.reference);
        // A write may still run on the blocking pool and hold the slot.
        tokio::task::spawn_blocking(move || svc.store.ingests.release(&namespace, &reference));
    }
}

/// The ingest a pull writes a blob through.
pub fn ingest_ref(digest: &Digest) -> String {
    format!("pull-{}", digest.hex())
}

/// The name of the fetch lock of a digest in a namespace.
fn lock_name(namespace: &str, digest: &Digest) -> String {
    format!("{namespace}/{digest}")
}

/// What a pull's ingest expects: the descriptor's digest and size. The
/// lease is given at commit, so a later pull under another lease resumes
/// the same ingest.
fn meta(desc: &Descriptor) -> IngestMeta {
    IngestMeta {
        expected_digest: desc.digest.to_string(),
        expected_size: desc.size,
        lease_id: String::new(),
    }
}

/// The resolved image as the wire has it.
fn image_pb(resolved: &Resolved) -> pb::PulledImage {
    let image = &resolved.image;
    pb::PulledImage {
        target: Some(descriptor_pb(&resolved.target)),
        manifest: Some(descriptor_pb(&image.manifest)),
        config_digest: image.config.digest.to_string(),
        layers: image.layers.iter().map(descriptor_pb).collect(),
        diff_ids: image.diff_ids.iter().map(ToString::to_string).collect(),
        platform: image.platform.to_string(),
    }
}

/// The config, stored already, then the layers, waiting.
fn blobs_pb(image: &ResolvedImage, config_held: bool) -> Vec<pb::BlobProgress> {
    let config_state = if config_held {
        pb::BlobState::Exists
    } else {
        pb::BlobState::Committed
    };
    let config = pb::BlobProgress {
        digest: image.config.digest.to_string(),
        media_type: image.config.media_type.clone(),
        size: image.config.size as i64,
        offset: image.config.size as i64,
        state: config_state as i32,
        fetched: if config_held {
            0
        } else {
            image.config.size as i64
        },
    };
    let layers = image.layers.iter().map(|layer| pb::BlobProgress {
        digest: layer.digest.to_string(),
        media_type: layer.media_type.clone(),
        size: layer.size as i64,
        state: pb::BlobState::Waiting as i32,
        ..Default::default()
    });
    std::iter::once(config).chain(layers).collect()
}

/// A descriptor on the wire.
fn descriptor_pb(desc: &Descriptor) -> berth_proto::Descriptor {
    berth_proto::Descriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.to_string(),
        size: desc.size as i64,
        annotations: desc.annotations.clone().into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document's media type comes from a known `Content-Type`, else
    /// from the document, else from whatever the header said.
    #[test]
    fn document_types() {
        use berth_oci::image::media_type::{OCI_INDEX, OCI_MANIFEST};
        let stated = format!(r#"{{"mediaType":"{OCI_INDEX}"}}"#);
        let cases: [(Option<&str>, &str, Option<&str>); 5] = [
            (Some(OCI_MANIFEST), "{}", Some(OCI_MANIFEST)),
            (Some("application/json"), &stated, Some(OCI_INDEX)),
            (None, &stated, Some(OCI_INDEX)),
            (Some("text/plain"), "{}", Some("text/plain")),
            (None, "{}", None),
        ];
        for (header, body, want) in cases {
            let got = document_type(header, body.as_bytes());
            assert_eq!(got.as_deref(), want, "{header:?} {body}");
        }
    }
}
