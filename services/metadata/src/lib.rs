//! berth's metadata service: the source of truth for images, containers,
//! leases and task reservations, and the roots gc collects from.
//!
//! Subjects: `berth.v1.<namespace>.metadata.<group>.<op>`; the messages are in
//! `proto/berth/v1/metadata.proto`, the database is drawn in [`store`]. Task
//! events are read in order from the event stream and applied with the
//! consumer's cursor in the same transaction.

pub mod handlers;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use berth_bus::events::{Consumer, Resume};
use berth_bus::{Result, Service};

use store::Store;

/// What the metadata service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database lives (`<berth root>/metadata`).
    pub root: PathBuf,
}

/// The running service's state.
pub struct MetadataService {
    /// The records.
    pub store: Store,
}

/// True when `labels` carry every key of `selector` with its value.
pub fn selects(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Serves the metadata service until `shutdown` is cancelled.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let store = Store::open(&config.root.join("db"))?;
    let svc = Arc::new(MetadataService { store });
    let js = async_nats::jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;

    let outbox = svc.store.outbox.clone();
    let publisher = tokio::spawn(outbox.clone().run_publisher(
        svc.store.env.clone(),
        js.clone(),
        shutdown.clone(),
    ));
    let consumer = tokio::spawn(consume_task_events(svc.clone(), js, shutdown.clone()));
    let expiry = tokio::spawn(expire_leases(svc.clone(), shutdown.clone()));

    use handlers::{containers, gc, images, leases, tasks};
    let serving = Service::new("metadata", env!("CARGO_PKG_VERSION"), svc)
        .wake_on_reply(outbox.wake())
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
        .op("leases.add", leases::add)
        .op("leases.delete", leases::delete)
        .op("leases.list", leases::list)
        .op("gc.mark", gc::mark)
        .serve(nats)
        .await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = tokio::join!(publisher, consumer, expiry);
    Ok(())
}

/// Applies task events from the stream until shutdown, starting again from
/// the stored cursor after any failure.
async fn consume_task_events(
    svc: Arc<MetadataService>,
    js: async_nats::jetstream::Context,
    shutdown: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            outcome = consume_once(&svc, &js) => outcome,
            _ = shutdown.cancelled() => return,
        };
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "task event consumer stopped; restarting");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn consume_once(
    svc: &Arc<MetadataService>,
    js: &async_nats::jetstream::Context,
) -> Result<()> {
    let filter = format!(
        "{}.*.{}.tasks.>",
        berth_bus::subject::PREFIX,
        berth_bus::subject::EVENTS
    );
    let mut consumer = Consumer::new(js, vec![filter]).await?;
    let stored = {
        let txn = svc.store.env.read_txn()?;
        svc.store.cursor(&txn)?
    };
    let cursor = match consumer.resume(stored).await? {
        Resume::Continue(cursor) => cursor,
        Resume::Reconcile { from, reason } => {
            // The stream lost events or was replaced: forget which sequences
            // were applied (they belong to the old stream) and replay what it
            // holds. Generations still refuse events of old reservations.
            tracing::warn!(?reason, "event stream changed; reconciling task records");
            let store = &svc.store;
            let mut txn = store.env.write_txn()?;
            for namespace in store.tasks.namespaces(&txn)? {
                for mut task in store.tasks.list(&txn, &namespace)? {
                    task.event_version = 0;
                    store
                        .tasks
                        .put(&mut txn, &namespace, &task.container_id.clone(), &task)?;
                }
            }
            store.set_cursor(&mut txn, from)?;
            txn.commit()?;
            from
        }
    };
    let mut messages = Box::pin(consumer.messages(cursor).await?);
    while let Some(delivered) = messages.next().await {
        let delivered = delivered?;
        let svc = svc.clone();
        let topic = delivered.envelope.topic.clone();
        let applied =
            tokio::task::spawn_blocking(move || handlers::tasks::apply(&svc.store, &delivered))
                .await
                .map_err(|err| berth_bus::Error::internal(err.to_string()))??;
        tracing::debug!(%topic, applied, "task event");
    }
    Ok(())
}

async fn expire_leases(svc: Arc<MetadataService>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
        match handlers::leases::expire(&svc.store) {
            Ok(0) => {}
            Ok(count) => {
                svc.store.outbox.wake().notify_one();
                tracing::info!(count, "leases expired");
            }
            Err(err) => tracing::error!(error = %err, "lease expiry failed"),
        }
    }
}
