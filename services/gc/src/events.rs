//! The events gc reads and the one it publishes.
//!
//! gc has no database of its own, so `gc.done` is published straight to
//! JetStream and awaited until the stream acknowledges it, not through an
//! outbox. Losing one (a crash between the sweep and the publish) loses no
//! state: the removals are recorded by their owners, which publish their
//! own `content.delete` and `snapshot.remove` events.

use async_nats::jetstream;
use async_nats::HeaderMap;
use prost::Message;

use berth_bus::{subject, Error, Result};
use berth_proto::gc::GcDone;
use berth_proto::{Envelope, Timestamp};

/// The topic of a finished run.
pub const DONE: &str = "gc.done";

/// The topics that trigger a run: a root went away.
pub const TRIGGERS: [&str; 4] = [
    "images.delete",
    "containers.delete",
    "leases.delete",
    "leases.expire",
];

/// The namespace `gc.done` goes to when a run removed nothing, and the one
/// scheduled runs ask metadata in.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The stream filters of the trigger topics in every namespace.
pub fn trigger_filters() -> Vec<String> {
    TRIGGERS
        .iter()
        .map(|topic| format!("{}.*.{}.{topic}", subject::PREFIX, subject::EVENTS))
        .collect()
}

/// Publishes `gc.done` in each namespace the run removed something from,
/// each carrying only its own namespace's result (a tenant sees only its
/// own namespace), or once in the default namespace when nothing went.
///
/// Idempotent: the message id is the epoch and namespace, which the stream
/// deduplicates.
pub async fn publish_done(js: &jetstream::Context, done: &GcDone) -> Result<()> {
    let mut per_namespace: Vec<(String, GcDone)> = done
        .namespaces
        .iter()
        .map(|result| {
            let own = GcDone {
                namespaces: vec![result.clone()],
                ..done.clone()
            };
            (result.namespace.clone(), own)
        })
        .collect();
    if per_namespace.is_empty() {
        per_namespace.push((DEFAULT_NAMESPACE.to_string(), done.clone()));
    }

    let mut acks = Vec::with_capacity(per_namespace.len());
    for (namespace, payload) in per_namespace {
        let envelope = Envelope {
            topic: DONE.to_string(),
            namespace: namespace.clone(),
            node: String::new(),
            timestamp: Some(Timestamp::now()),
            generation: done.epoch,
            source: "gc".to_string(),
            payload: payload.encode_to_vec().into(),
            traceparent: berth_bus::trace::current_traceparent(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("gc-{}-{namespace}", done.epoch).as_str(),
        );
        if !envelope.traceparent.is_empty() {
            headers.insert("traceparent", envelope.traceparent.as_str());
        }
        let subject = subject::event(&namespace, DONE)?;
        let ack = js
            .publish_with_headers(subject, headers, envelope.encode_to_vec().into())
            .await
            .map_err(|err| Error::unavailable(format!("publish event {DONE}: {err}")))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await
            .map_err(|err| Error::unavailable(format!("event {DONE} not acknowledged: {err}")))?;
    }
    Ok(())
}
