//! When gc runs: after a root goes away (an image, container or lease is
//! deleted, or a lease expires), debounced, and on a timer.
//!
//! The trigger events are read from the end of the stream as it is when gc
//! starts, with the cursor kept in memory only. A trigger missed across a
//! restart of gc only delays collection until the timer fires, and a run
//! always works from the full set of roots, never from the events.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use berth_bus::events::{Consumer, Cursor, Resume, STREAM};
use berth_bus::{Error, Result};

use crate::events::{trigger_filters, DEFAULT_NAMESPACE};
use crate::GcService;

/// How long a trigger waits for more triggers before the run starts, so a
/// burst of deletes (an `image rm` of many images) is one run.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(50);

/// Runs gc after each debounced trigger and every `interval`, until shutdown.
pub(crate) async fn schedule(
    svc: Arc<GcService>,
    interval: Duration,
    mut triggers: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = timer.tick() => {}
            Some(()) = triggers.recv() => {
                tokio::select! {
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                    _ = shutdown.cancelled() => return,
                }
                while triggers.try_recv().is_ok() {}
            }
        }

        // A trigger that arrives during the run is kept in the channel and
        // causes one more run, since it may name garbage this run missed.
        tokio::select! {
            outcome = svc.collect_now(DEFAULT_NAMESPACE, false) => {
                if let Err(err) = outcome {
                    tracing::error!(error = %err, "scheduled gc run failed");
                }
            }
            _ = shutdown.cancelled() => return,
        }
        timer.reset();
    }
}

/// Sends a trigger for every deletion event until shutdown, starting the
/// consumer again after any failure.
pub(crate) async fn watch_deletions(
    js: jetstream::Context,
    triggers: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut cursor = None;
    loop {
        let outcome = tokio::select! {
            outcome = watch_once(&js, &triggers, &mut cursor) => outcome,
            _ = shutdown.cancelled() => return,
        };
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "deletion event consumer stopped; restarting");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Consumes from `cursor` (the stream's end the first time) and moves it.
async fn watch_once(
    js: &jetstream::Context,
    triggers: &mpsc::Sender<()>,
    cursor: &mut Option<Cursor>,
) -> Result<()> {
    let mut consumer = Consumer::new(js, trigger_filters()).await?;
    let from = match *cursor {
        None => stream_end(js).await?,
        Some(last) => match consumer.resume(last).await? {
            Resume::Continue(last) => last,
            Resume::Reconcile { from, reason } => {
                // Deletions may have been lost with the old stream: one run
                // from the full roots covers them.
                tracing::warn!(?reason, "event stream changed; running gc once");
                let _ = triggers.try_send(());
                from
            }
        },
    };
    *cursor = Some(from);

    let mut messages = Box::pin(consumer.messages(from).await?);
    while let Some(delivered) = messages.next().await {
        let delivered = delivered?;
        *cursor = Some(delivered.cursor);
        tracing::debug!(
            topic = %delivered.envelope.topic,
            namespace = %delivered.envelope.namespace,
            "gc triggered",
        );
        // A full channel already holds a trigger, which is all it needs.
        let _ = triggers.try_send(());
    }
    Ok(())
}

/// Where the stream ends now.
async fn stream_end(js: &jetstream::Context) -> Result<Cursor> {
    let unavailable =
        |err: &dyn std::fmt::Display| Error::unavailable(format!("stream {STREAM}: {err}"));
    let mut stream = js.get_stream(STREAM).await.map_err(|e| unavailable(&e))?;
    let info = stream.info().await.map_err(|e| unavailable(&e))?;
    Ok(Cursor {
        stream_created: info.created.unix_timestamp_nanos() as i64,
        seq: info.state.last_sequence,
    })
}
