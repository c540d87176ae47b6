//! berth's content service: blobs addressed by sha256 digest, stored once
//! however many images or namespaces use them, served over NATS.
//!
//! Subjects: `berth.v1.<namespace>.content.<op>`; the ops and their
//! messages are in `proto/berth/v1/content.proto`. The files are drawn in
//! [`store`] and [`ingest`], the database in [`schema`].
//!
//! A blob is written through an ingest (`open`, `write`, `commit`) that is
//! invisible until its commit verified the bytes' size and sha256, and is
//! visible then only to the namespace that wrote them; another namespace
//! must write the same bytes to see it, and the file is still stored once.
//! Bytes leave through `delete`, which gc calls with its mark epoch.
//!
//! `pull` fetches an image from an OCI registry into the store through the
//! same ingests, in this process ([`pull`]).

#![warn(missing_docs)]

mod convert;
pub mod digest;
pub mod error;
pub mod events;
mod handlers;
pub mod ingest;
pub mod pull;
pub mod schema;
pub mod store;

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
use digest::Digest;
pub use error::ContentError;
use store::Store;

/// What the content service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where blobs, ingests and the database live (`<berth root>/content`,
    /// by default `/var/lib/berth/content`).
    pub root: PathBuf,
}

/// The running service's state, shared by its handlers.
pub struct ContentService {
    /// The blob store.
    pub store: Store,
    client: Client,
    digest_locks: KeyLocks,
    pulls: pull::Pulls,
    /// Cancelled when the service stops: running pulls end then.
    shutdown: CancellationToken,
}

impl ContentService {
    /// Adds `content/<digest>` to a lease in metadata. The metadata
    /// service's answer keeps its code (`NotFound` for an unknown lease).
    async fn attach_to_lease(
        &self,
        namespace: &str,
        lease_id: &str,
        digest: &Digest,
    ) -> Result<(), ContentError> {
        let failed = |source| ContentError::Lease {
            digest: digest.to_string(),
            lease_id: lease_id.to_string(),
            source,
        };
        berth_bus::subject::check_token("lease id", lease_id).map_err(failed)?;
        let request = mdpb::AddLeaseResourcesRequest {
            lease_id: lease_id.to_string(),
            resources: vec![format!("content/{digest}")],
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

/// Serves the content service on `nats` until `shutdown` is cancelled.
///
/// Before serving it removes blob files no record names (what a crash
/// between a commit's or a delete's steps leaves); ingests are kept for
/// their writers to resume. Events are published from the outbox until
/// shutdown.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> berth_bus::Result<()> {
    let root = config.root.clone();
    let store = tokio::task::spawn_blocking(move || -> Result<Store, ContentError> {
        let store = Store::open(&root)?;
        let recovered = store.recover()?;
        if recovered.orphans > 0 {
            tracing::warn!(
                orphans = recovered.orphans,
                "removed blob files no record named"
            );
        }
        if recovered.missing > 0 {
            tracing::error!(
                missing = recovered.missing,
                "blob records without their files"
            );
        }
        Ok(store)
    })
    .await
    .map_err(ContentError::Worker)??;

    let svc = Arc::new(ContentService {
        store,
        client: Client::new(nats.clone(), berth_bus::client::DEFAULT_TIMEOUT),
        digest_locks: KeyLocks::default(),
        pulls: pull::Pulls::default(),
        shutdown: shutdown.child_token(),
    });
    let js = async_nats::jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;
    let outbox = svc.store.outbox.clone();
    let publisher = tokio::spawn(outbox.clone().run_publisher(
        svc.store.env.clone(),
        js,
        shutdown.clone(),
    ));

    let serving = Service::new("content", env!("CARGO_PKG_VERSION"), svc)
        .wake_on_reply(outbox.wake())
        .op("info", wire(handlers::blobs::info))
        .op("list", wire(handlers::blobs::list))
        .op("update", wire(handlers::blobs::update))
        .op("read", wire(handlers::blobs::read))
        .op("delete", wire(handlers::blobs::delete))
        .op("open", wire(handlers::ingests::open))
        .op("write", wire(handlers::ingests::write))
        .op("commit", wire(handlers::ingests::commit))
        .op("abort", wire(handlers::ingests::abort))
        .op("status", wire(handlers::ingests::status))
        .op("ingests", wire(handlers::ingests::ingests))
        .op("pull", wire(handlers::pull::pull))
        .serve(nats)
        .await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = publisher.await;
    Ok(())
}

type Wired<Fut> = MapErr<Fut, fn(ContentError) -> berth_bus::Error>;

/// Turns a handler's [`ContentError`] into the wire error, at the edge.
fn wire<Req, Rep, F, Fut>(
    handler: F,
) -> impl Fn(Arc<ContentService>, Call, Req) -> Wired<Fut> + Send + Sync + 'static
where
    F: Fn(Arc<ContentService>, Call, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Rep, ContentError>> + Send + 'static,
{
    move |svc, call, req| handler(svc, call, req).map_err(berth_bus::Error::from as fn(_) -> _)
}
