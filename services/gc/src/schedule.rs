//! When gc runs: after a root goes away (an image, container or lease is
//! deleted, or a lease expires, which an idle daemon sees too), debounced,
//! and on a timer.
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
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use berth_bus::events::{Consumer, Cursor, Resume, STREAM};
use berth_bus::{Error, Result};

use crate::events::{trigger_filters, DEFAULT_NAMESPACE};
use crate::GcService;

/// How long the triggers must stay quiet before a run starts, so a burst
/// of deletes (an `image rm` of many images, a `rm` of many containers) is
/// one run, while a lone delete is collected almost at once.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(10);

/// The longest a steady stream of triggers holds a run back.
pub(crate) const DEBOUNCE_MAX: Duration = Duration::from_millis(100);

/// Runs gc after each debounced trigger and every `interval`, until shutdown.
pub(crate) async fn schedule(
    svc: Arc<GcService>,
    interval: Duration,
    mut triggers: mpsc::Receiver<()>,
    shutdown: CancellationToken,
) {
    let mut timer = tokio::time::interval_at(Instant::now() + interval, interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = timer.tick() => {}
            Some(()) = triggers.recv() => {
                if !debounce(&mut triggers, &shutdown).await {
                    return;
                }
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

/// Waits until no trigger came for [`DEBOUNCE`], or [`DEBOUNCE_MAX`] after
/// the first; false on shutdown.
async fn debounce(triggers: &mut mpsc::Receiver<()>, shutdown: &CancellationToken) -> bool {
    let latest = Instant::now() + DEBOUNCE_MAX;
    loop {
        let quiet = (Instant::now() + DEBOUNCE).min(latest);
        tokio::select! {
            _ = tokio::time::sleep_until(quiet) => return true,
            Some(()) = triggers.recv() => {}
            _ = shutdown.cancelled() => return false,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A lone trigger waits the quiet period; a steady stream of triggers
    /// waits at most the longest debounce.
    #[tokio::test(start_paused = true)]
    async fn debounce_waits_for_quiet_up_to_a_limit() {
        let shutdown = CancellationToken::new();
        let (send, mut triggers) = mpsc::channel(1);
        let start = Instant::now();
        assert!(debounce(&mut triggers, &shutdown).await);
        assert_eq!(start.elapsed(), DEBOUNCE);

        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(DEBOUNCE / 2).await;
                if send.send(()).await.is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        assert!(debounce(&mut triggers, &shutdown).await);
        assert_eq!(start.elapsed(), DEBOUNCE_MAX);
        feeder.abort();

        shutdown.cancel();
        assert!(!debounce(&mut triggers, &shutdown).await);
    }
}
