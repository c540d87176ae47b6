//! berth's snapshot service: overlayfs snapshots on one node, served over
//! NATS on `berth.v1.<namespace>.snapshot.<node>.<op>`.
//!
//! The ops and their messages are in `proto/berth/v1/snapshot.proto`; the
//! records and directories are drawn in [`store`]. A snapshot is prepared
//! (active, writable) or viewed (read-only) on a committed parent, and an
//! active one is committed under a name; `mounts` says how to stack it with
//! overlayfs. `unpack` turns an image's layers into committed snapshots
//! named by chain ID, shared by every image of the namespace that has them.
//! Bytes leave only through `remove` and `prune`, which gc calls with its
//! mark epoch.
//!
//! The node-local core is usable on its own: [`apply`] unpacks one layer
//! stream into a snapshot's upper directory, and [`overlay`] describes and
//! performs the mounts (the task service mounts a rootfs with it).

#![warn(missing_docs)]

pub mod apply;
pub mod convert;
pub mod error;
pub mod events;
mod handlers;
pub mod store;
mod unpack;

/// Overlay and bind mounts of snapshots (the `berth-mount` crate, which the
/// task service shares to mount a container's rootfs).
pub use berth_mount as overlay;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::MapErr;
use futures::TryFutureExt;
use tokio_util::sync::CancellationToken;

use berth_bus::api::Metadata;
use berth_bus::{Call, Client, Service};
use berth_proto::metadata as mdpb;

use berth_bus::locks::KeyLocks;
pub use error::SnapshotError;
use store::Store;

/// What the snapshot service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where snapshot directories and the database live
    /// (`<berth root>/snapshot`, by default `/var/lib/berth/snapshot`).
    pub root: PathBuf,
    /// This node's id: the `<node>` token of the subjects served, and of the
    /// lease resources `snapshot/<node>/<key>`.
    pub node: String,
    /// The content service's root when it runs on this host: layer blobs are
    /// then read from `<content_root>/blobs/sha256/<hex>` instead of pulled
    /// over NATS. `None` (the default) always pulls.
    pub content_root: Option<PathBuf>,
    /// What one unpack may ask of this node.
    pub limits: Limits,
}

/// Bounds on the images this node unpacks, so a decompression bomb or an
/// image of thousands of layers is refused before it fills the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes one layer's uncompressed tar stream may hold
    /// (default 32 GiB).
    pub max_layer_size: u64,
    /// The most layers one unpack may name (default 128, about what
    /// overlayfs stacks well; the kernel's own limit is 500).
    pub max_layers: usize,
    /// The free bytes an apply keeps on the snapshot filesystem
    /// (default 256 MiB); 0 turns the check off.
    pub min_free_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_size: 32 << 30,
            max_layers: 128,
            min_free_bytes: 256 << 20,
        }
    }
}

/// A byte count as flags take it: plain, or with a `k`, `m` or `g` suffix
/// (powers of 1024), as `512m` or `32g`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'k' | 'K')) => (&text[..at], 10),
        Some((at, 'm' | 'M')) => (&text[..at], 20),
        Some((at, 'g' | 'G')) => (&text[..at], 30),
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512m or 32g"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// The running service's state, shared by its handlers.
pub struct SnapshotService {
    /// The records and directories.
    pub store: Store,
    client: Client,
    node: String,
    content_root: Option<PathBuf>,
    limits: Limits,
    chain_locks: KeyLocks,
}

impl SnapshotService {
    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Adds `snapshot/<node>/<key>` for each key to lease `lease_id` in
    /// metadata; nothing for an empty lease id. The metadata service's
    /// answer keeps its code (`NotFound` for an unknown lease).
    async fn attach_to_lease(
        &self,
        namespace: &str,
        lease_id: &str,
        keys: &[String],
    ) -> Result<(), SnapshotError> {
        if lease_id.is_empty() || keys.is_empty() {
            return Ok(());
        }
        let failed = |source| SnapshotError::Lease {
            lease_id: lease_id.to_string(),
            source,
        };
        berth_bus::subject::check_token("lease id", lease_id).map_err(failed)?;
        let request = mdpb::AddLeaseResourcesRequest {
            lease_id: lease_id.to_string(),
            resources: keys
                .iter()
                .map(|key| format!("snapshot/{}/{key}", self.node))
                .collect(),
        };
        let metadata = Metadata {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        };
        metadata
            .add_lease_resources(&request)
            .await
            .map_err(failed)?;
        Ok(())
    }
}

/// Serves the snapshot service of `config.node` on `nats` until `shutdown`
/// is cancelled.
///
/// Before serving it recovers from a crash: the temporary snapshots of
/// unpacks that never finished are dropped, and directories no record owns
/// are deleted. Events are published from the outbox until shutdown.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> berth_bus::Result<()> {
    berth_bus::subject::check_token("node id", &config.node)?;
    let (root, node) = (config.root.clone(), config.node.clone());
    let store = tokio::task::spawn_blocking(move || -> Result<Store, SnapshotError> {
        let store = Store::open(&root, &node)?;
        let recovered = store.recover()?;
        if recovered != store::Recovered::default() {
            tracing::warn!(
                extracts = recovered.extracts,
                orphans = recovered.orphans,
                "removed what unfinished work left behind"
            );
        }
        Ok(store)
    })
    .await
    .map_err(SnapshotError::Worker)??;

    let svc = Arc::new(SnapshotService {
        store,
        client: Client::new(nats.clone(), berth_bus::client::DEFAULT_TIMEOUT),
        node: config.node.clone(),
        content_root: config.content_root,
        limits: config.limits,
        chain_locks: KeyLocks::default(),
    });
    let js = async_nats::jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;
    let outbox = svc.store.outbox.clone();
    let publisher = tokio::spawn(outbox.clone().run_publisher(
        svc.store.env.clone(),
        js,
        shutdown.clone(),
    ));

    let serving = Service::new("snapshot", env!("CARGO_PKG_VERSION"), svc)
        .node(&config.node)
        .wake_on_reply(outbox.wake())
        .op("prepare", wire(handlers::prepare))
        .op("view", wire(handlers::view))
        .op("commit", wire(handlers::commit))
        .op("mounts", wire(handlers::mounts))
        .op("stat", wire(handlers::stat))
        .op("list", wire(handlers::list))
        .op("usage", wire(handlers::usage_op))
        .op("update", wire(handlers::update))
        .op("remove", wire(handlers::remove))
        .op("unpack", wire(handlers::unpack))
        .op("prune", wire(handlers::prune))
        .serve(nats)
        .await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = publisher.await;
    Ok(())
}

type Wired<Fut> = MapErr<Fut, fn(SnapshotError) -> berth_bus::Error>;

/// Turns a handler's [`SnapshotError`] into the wire error, at the edge.
fn wire<Req, Rep, F, Fut>(
    handler: F,
) -> impl Fn(Arc<SnapshotService>, Call, Req) -> Wired<Fut> + Send + Sync + 'static
where
    F: Fn(Arc<SnapshotService>, Call, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Rep, SnapshotError>> + Send + 'static,
{
    move |svc, call, req| handler(svc, call, req).map_err(berth_bus::Error::from as fn(_) -> _)
}
