//! berth's metadata service: the source of truth for namespaces, images,
//! containers, leases and task reservations, and the roots gc collects from.
//!
//! Subjects: `berth.v1.<namespace>.metadata.<group>.<op>`; the messages are in
//! `proto/berth/v1/metadata.proto`, the database is drawn in [`schema`].
//!
//! - Every op acts on its subject's namespace only (keys are prefixed by it),
//!   except the operator's `namespaces.list` and `gc.mark`.
//! - A namespace's record is made by `namespaces.create` or by the first
//!   image, container or lease created in it; every namespace a change was
//!   ever written to stays in gc's list after its record is deleted.
//! - Changes run on one writer thread ([`writer`]), several to a commit.
//!   Each request's change, its outbox events and its request id are one
//!   nested transaction, so a retry returns the first outcome and racing
//!   changes of the same records are decided one after the other.
//! - Task events are read in order from the event stream ([`consume`]) and
//!   applied in batches, with the consumer's cursor in the same transaction
//!   ([`apply`]).
//! - Expired leases are removed and publish `leases.expire`
//!   ([`handlers::leases`]).
//! - Nodes are registered from their heartbeats in the key-value bucket
//!   `berth_nodes` and marked lost when those stop ([`nodes`]); `nodes.*`
//!   answers the registry, and a lost node's tasks can be abandoned to
//!   tombstones it applies when it returns (`tombstones.*`).

pub mod apply;
pub mod consume;
pub mod error;
pub mod events;
pub mod fields;
pub mod handlers;
pub mod nodes;
pub mod schema;
pub mod selector;
pub mod store;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use berth_bus::Service;

use store::Store;

pub use error::MetadataError;

/// What the metadata service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database lives (`<berth root>/metadata`); the environment
    /// is `<root>/db`.
    pub root: PathBuf,
}

/// The running service's state.
pub struct MetadataService {
    /// The records.
    pub store: Store,
    /// The connection, for the event stream and the reconcile's calls to
    /// task services.
    pub nats: async_nats::Client,
    /// The nodes heard from, in memory beside their records.
    pub registry: nodes::Registry,
}

/// Serves the metadata service until `shutdown` is cancelled.
///
/// Errors when the database cannot be opened (or has a newer layout), or
/// when the event stream or the service cannot be set up on NATS.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> berth_bus::Result<()> {
    let store = Store::open(&config.root.join("db"))?;
    let js = async_nats::jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;
    let svc = Arc::new(MetadataService {
        store,
        nats: nats.clone(),
        registry: nodes::Registry::default(),
    });

    // The outbox publisher, the task-event consumer and the lease expiry
    // run beside the requests.
    let outbox = svc.store.schema().outbox.clone();
    let publisher = tokio::spawn(outbox.clone().run_publisher(
        svc.store.schema().env.clone(),
        js,
        shutdown.clone(),
    ));
    let consumer = tokio::spawn(consume::run(svc.clone(), shutdown.clone()));
    let expiry = tokio::spawn(handlers::leases::run_expiry(svc.clone(), shutdown.clone()));
    let registry = tokio::spawn(nodes::run(svc.clone(), shutdown.clone()));

    let serving = serve(svc.clone(), outbox.wake()).serve(nats).await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = tokio::join!(publisher, consumer, expiry, registry);

    // The database closes once the last request in flight and the writer let
    // go of it, so the same root can be opened again in this process.
    let env = svc.store.schema().env.clone();
    drop(svc);
    let closed = tokio::task::spawn_blocking(move || env.prepare_for_closing().wait());
    if tokio::time::timeout(CLOSE_WAIT, closed).await.is_err() {
        tracing::warn!("metadata database still in use at shutdown");
    }
    Ok(())
}

/// How long shutdown waits for the database to close.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The service and its ops, one endpoint group per file of [`handlers`].
fn serve(svc: Arc<MetadataService>, wake: Arc<tokio::sync::Notify>) -> Service<MetadataService> {
    use handlers::{containers, gc, images, leases, namespaces, nodes, tasks, tombstones};
    Service::new("metadata", env!("CARGO_PKG_VERSION"), svc)
        .wake_on_reply(wake)
        .op("namespaces.create", namespaces::create)
        .op("namespaces.update", namespaces::update)
        .op("namespaces.get", namespaces::get)
        .op("namespaces.list", namespaces::list)
        .op("namespaces.delete", namespaces::delete)
        .op("images.create", images::create)
        .op("images.update", images::update)
        .op("images.get", images::get)
        .op("images.list", images::list)
        .op("images.delete", images::delete)
        .op("containers.create", containers::create)
        .op("containers.update", containers::update)
        .op("containers.get", containers::get)
        .op("containers.list", containers::list)
        .op("containers.delete", containers::delete)
        .op("tasks.reserve", tasks::reserve)
        .op("tasks.release", tasks::release)
        .op("tasks.get", tasks::get)
        .op("tasks.list", tasks::list)
        .op("leases.create", leases::create)
        .op("leases.get", leases::get)
        .op("leases.update", leases::update)
        .op("leases.add", leases::add)
        .op("leases.remove", leases::remove)
        .op("leases.delete", leases::delete)
        .op("leases.list", leases::list)
        .op("leases.query", leases::query)
        .op("gc.mark", gc::mark)
        .op("nodes.list", nodes::list)
        .op("nodes.get", nodes::get)
        .op("tombstones.list", tombstones::list)
        .op("tombstones.delete", tombstones::delete)
}
