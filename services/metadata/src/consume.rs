//! The task-event consumer: reads `tasks.*` from the event stream in order,
//! from the cursor stored with the records, and applies them in batches.
//!
//! Events that arrive together (a backlog after a restart, a burst of exits)
//! are applied in one change of up to [`BATCH`] events, with the cursor of
//! the last one, so a crash anywhere leaves the records and the cursor in
//! step: the events after the cursor are read again and applied once. The
//! next batch is read while one commits ([`IN_FLIGHT`] at most), and each
//! applies only on top of the cursor it follows.
//!
//! When the stream is not the one the cursor came from (it was recreated),
//! or dropped events the cursor had not reached, replaying it cannot bring
//! the records up to date: the consumer reconciles first. The task records'
//! reservations are this service's own and stay; their state is asked of
//! each node's task service (`task.<node>.list` in each namespace), taken
//! where the node reports the same reservation, and the cursor moves to the
//! stream's start in the same transaction. The consumer then reads the
//! stream as it is from there. A stream deleted under a running consumer
//! is noticed within two seconds: the consumer starts again, which makes
//! the stream anew.
//!
//! Limitation: a node that does not answer the reconcile keeps its task
//! records as they were until its next events; an exit it published into
//! the lost part of the stream is not seen, and the task service keeps that
//! exit until metadata shows it (it waits for a stopped record before it
//! lets the shim forget the status).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use berth_bus::api;
use berth_bus::events::{Consumer, Cursor, Delivered, ReconcileReason, Resume, STREAM};
use berth_bus::Client;

use crate::apply::{self, NodeStates};
use crate::error::Result;
use crate::MetadataService;

/// The most events in one batch.
pub const BATCH: usize = 512;

/// The most batches handed to the writer and not yet committed.
pub const IN_FLIGHT: usize = 4;

/// How often the consumer checks that its stream is still the one it reads.
const STREAM_CHECK: Duration = Duration::from_secs(2);

/// How long a node has to answer the reconcile's `list`.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies task events until shutdown, starting again from the stored
/// cursor after any failure (a lost connection, a stream recreated under
/// the consumer).
pub async fn run(svc: Arc<MetadataService>, shutdown: CancellationToken) {
    let mut pause = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            outcome = consume(&svc) => outcome,
            _ = shutdown.cancelled() => return,
        };
        // Repeated failures wait longer, up to two seconds.
        match outcome {
            Ok(()) => pause = Duration::from_millis(100),
            Err(err) => {
                tracing::warn!(error = %err, "task event consumer stopped; resuming from the stored cursor");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// One run of the consumer: resume (or reconcile), then apply until the
/// stream ends or fails.
async fn consume(svc: &Arc<MetadataService>) -> Result<()> {
    let js = async_nats::jetstream::new(svc.nats.clone());
    let mut consumer = Consumer::new(&js, vec![crate::events::task_filter()]).await?;
    let stored = svc.store.read(|schema, txn| schema.cursor(txn))?;
    let (cursor, after) = match consumer.resume(stored).await? {
        Resume::Continue(cursor) => (cursor, stored),
        Resume::Reconcile { from, reason } => {
            let from = reconcile(svc, from, reason).await?;
            (from, from)
        }
    };

    let messages = consumer.messages(cursor).await?;
    let mut chunks = Box::pin(messages.ready_chunks(BATCH));
    let mut pending = FuturesOrdered::new();
    let outcome = apply_stream(svc, &js, &mut chunks, &mut pending, cursor, after).await;

    // What was handed to the writer finishes before the next run reads the
    // stored cursor.
    while let Some((_, settled)) = pending.next().await {
        if let Err(err) = settled {
            tracing::debug!(error = %err, "task event batch not applied");
        }
    }
    outcome
}

/// A batch on the writer: its size, and the future of its outcome.
type Pending = FuturesOrdered<BoxFuture<'static, (usize, Result<apply::Applied>)>>;

/// Hands batches to the writer as they arrive, up to [`IN_FLIGHT`] at once
/// (the next one is read while one commits, and batches queued together
/// share a commit). Each batch names the cursor it follows, so none commits
/// past one that failed.
async fn apply_stream(
    svc: &Arc<MetadataService>,
    js: &async_nats::jetstream::Context,
    chunks: &mut (impl futures::Stream<Item = Vec<berth_bus::Result<Delivered>>> + Unpin),
    pending: &mut Pending,
    cursor: Cursor,
    mut after: Cursor,
) -> Result<()> {
    let mut watch = tokio::time::interval(STREAM_CHECK);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    watch.tick().await;
    loop {
        tokio::select! {
            // The events ready now, once fewer than IN_FLIGHT batches wait.
            chunk = chunks.next(), if pending.len() < IN_FLIGHT => {
                let Some(chunk) = chunk else {
                    return Ok(());
                };
                let mut batch = Vec::with_capacity(chunk.len());
                let mut failure = None;
                for item in chunk {
                    match item {
                        Ok(delivered) => batch.push(delivered),
                        Err(err) => {
                            failure = Some(err);
                            break;
                        }
                    }
                }
                if let Some(last) = batch.last() {
                    let follows = after;
                    after = last.cursor;
                    let count = batch.len();
                    let applied = svc.store.submit(move |schema, txn| {
                        apply::apply_batch(schema, txn, follows, &batch)
                    });
                    pending.push_back(applied.map(move |outcome| (count, outcome)).boxed());
                }
                if let Some(err) = failure {
                    return Err(err.into());
                }
            }
            // The oldest batch committed, or failed: then this run ends.
            Some((count, outcome)) = pending.next(), if !pending.is_empty() => {
                let applied = outcome?;
                tracing::debug!(
                    events = count,
                    changed = applied.changed,
                    "task events applied"
                );
            }
            // The stream is still the one the cursor is on.
            _ = watch.tick() => check_stream(js, cursor.stream_created).await?,
        }
    }
}

/// `FailedPrecondition` when the stream is gone or is another one than the
/// consumer reads. A deleted stream makes the ordered consumer retry without
/// a word, and nothing would make the stream again: the consumer's restart
/// does (it creates the stream when it is missing), then reconciles.
async fn check_stream(js: &async_nats::jetstream::Context, created: i64) -> Result<()> {
    let unavailable = |err: &dyn std::fmt::Display| {
        berth_bus::Error::unavailable(format!("event stream {STREAM}: {err}"))
    };
    let mut stream = js.get_stream(STREAM).await.map_err(|e| unavailable(&e))?;
    let info = stream.info().await.map_err(|e| unavailable(&e))?;
    if info.created.unix_timestamp_nanos() as i64 != created {
        return Err(berth_bus::Error::precondition(format!(
            "event stream {STREAM} was recreated under the consumer"
        ))
        .into());
    }
    Ok(())
}

/// Asks every node holding a reservation for its tasks, and replaces the
/// records' state with the answers; returns the cursor to go on from.
async fn reconcile(
    svc: &Arc<MetadataService>,
    from: Cursor,
    reason: ReconcileReason,
) -> Result<Cursor> {
    tracing::warn!(
        ?reason,
        "event stream changed; reconciling task records with their nodes"
    );

    // Which nodes to ask, in which namespaces.
    let mut pairs: Vec<(String, String)> = svc.store.read(|schema, txn| {
        Ok(schema
            .tasks
            .all(txn)?
            .into_iter()
            .map(|(namespace, task)| (namespace, task.node))
            .collect())
    })?;
    pairs.sort();
    pairs.dedup();

    // Every node at once; none is waited for longer than its timeout.
    let client = Client::new(svc.nats.clone(), NODE_TIMEOUT);
    let asked = pairs.into_iter().map(|(namespace, node)| {
        let task = api::Task {
            client: client.clone(),
            namespace: namespace.clone(),
            node: node.clone(),
        };
        async move {
            let reply = task.list(&Default::default()).await;
            (namespace, node, reply)
        }
    });
    let mut states = NodeStates::new();
    for (namespace, node, reply) in futures::future::join_all(asked).await {
        match reply {
            Ok(reply) => {
                for state in reply.states {
                    states.insert((namespace.clone(), state.container_id.clone()), state);
                }
            }
            Err(err) => tracing::warn!(
                %namespace, %node, error = %err,
                "node did not answer the reconcile; its task records keep their state"
            ),
        }
    }

    let taken = svc
        .store
        .write(move |schema, txn| apply::reconcile(schema, txn, &states, from))
        .await?;
    tracing::info!(records = taken, "task records reconciled");
    Ok(from)
}
