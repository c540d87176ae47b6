//! berth's content service: blobs addressed by sha256 digest, stored once
//! however many images or namespaces use them, served over NATS.
//!
//! Subjects: `berth.v1.<namespace>.content.<op>`; the ops and their messages
//! are in `proto/berth/v1/content.proto`. The layout on disk and the
//! database are drawn in [`store`].

pub mod handlers;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use berth_bus::{Client, Result, Service};
use berth_proto::metadata as mdpb;

use store::Store;

/// What the content service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where blobs, ingests and the database live (`<berth root>/content`).
    pub root: PathBuf,
}

/// The running service's state, shared by its handlers.
pub struct ContentService {
    /// The blob store.
    pub store: Store,
    client: Client,
}

impl ContentService {
    /// Adds `content/<digest>` to a lease in metadata.
    async fn attach_to_lease(&self, namespace: &str, lease_id: &str, digest: &str) -> Result<()> {
        let request = mdpb::AddLeaseResourcesRequest {
            lease_id: lease_id.to_string(),
            resources: vec![format!("content/{digest}")],
        };
        let subject = handlers::leases_add_subject(namespace)?;
        let _: mdpb::LeaseReply = self
            .client
            .call_mut(&subject, &request, &berth_bus::client::new_request_id())
            .await?;
        Ok(())
    }
}

/// Serves the content service on `nats` until `shutdown` is cancelled.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = Store::open(&config.root)?;
    let client = Client::new(nats.clone(), berth_bus::client::DEFAULT_TIMEOUT);
    let svc = Arc::new(ContentService { store, client });

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
        .op("info", handlers::info_op)
        .op("list", handlers::list)
        .op("update", handlers::update)
        .op("read", handlers::read)
        .op("open", handlers::open)
        .op("write", handlers::write)
        .op("commit", handlers::commit)
        .op("abort", handlers::abort)
        .op("status", handlers::status)
        .op("ingests", handlers::ingests)
        .op("delete", handlers::delete)
        .serve(nats)
        .await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = publisher.await;
    Ok(())
}
