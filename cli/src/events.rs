//! `berth events`: the namespace's events, live or replayed.
//!
//! Every event is kept in the JetStream stream `BERTH_EVENTS`, so the
//! command reads them through an ordered consumer of that stream: from now
//! on by default, or from a sequence number or a time with `--since`, in
//! both cases going on live once it has caught up. `--until` ends it.
//!
//! The consumer is named and has one filter subject, so the server sees
//! the filter in the subject of the request that makes it
//! (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): that is what lets
//! NATS permissions confine a tenant's consumers to its own namespace.
//! Several `--filter`s read the namespace's events and keep the matching
//! ones here.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use prost::Message;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use berth_proto::Envelope;
use berth_proto::{content as cpb, gc as gpb, metadata as mpb, snapshot as spb, task as tpb};

use crate::{output, Ctx};

/// The stream that keeps every event.
const STREAM: &str = "BERTH_EVENTS";

/// `berth events` flags.
#[derive(Args)]
pub struct EventsArgs {
    /// Replay from a stream sequence number (`1` is the first event kept) or
    /// a time (`10m`, `2024-01-01T12:00:00Z`), then go on live.
    #[arg(long, value_name = "SEQ|TIME")]
    since: Option<String>,
    /// Stop at this sequence number or time instead of going on live.
    #[arg(long, value_name = "SEQ|TIME")]
    until: Option<String>,
    /// Only these topics, e.g. `tasks.exit` or `images.>` (repeatable).
    #[arg(long = "filter", value_name = "TOPIC")]
    filters: Vec<String>,
}

/// A `--since` or `--until` bound.
enum Bound {
    Sequence(u64),
    Time(i64),
}

fn bound(text: &str) -> anyhow::Result<Bound> {
    match text.parse::<u64>() {
        Ok(sequence) => Ok(Bound::Sequence(sequence)),
        Err(_) => Ok(Bound::Time(output::parse_time(text)?)),
    }
}

/// Prints events until interrupted, or until `--until`.
pub async fn events(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let deliver_policy = match args.since.as_deref().map(bound).transpose()? {
        None => DeliverPolicy::New,
        Some(Bound::Sequence(sequence)) => DeliverPolicy::ByStartSequence {
            start_sequence: sequence.max(1),
        },
        Some(Bound::Time(nanos)) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
                .context("--since is out of range")?,
        },
    };
    let until = args.until.as_deref().map(bound).transpose()?;
    let topics = if args.filters.is_empty() {
        vec![">".to_string()]
    } else {
        args.filters.clone()
    };
    let subjects = topics
        .iter()
        .map(|topic| filter_subject(ctx, topic))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let filter = match subjects.as_slice() {
        [one] => one.clone(),
        _ => filter_subject(ctx, ">")?,
    };

    // The stream's info is not asked for: a tenant may not read it.
    let js = async_nats::jetstream::new(ctx.client.nats().clone());
    let stream = js
        .get_stream_no_info(STREAM)
        .await
        .with_context(|| format!("cannot open the event stream {STREAM}"))?;
    let name = format!("berth_{}", uuid::Uuid::new_v4().simple());
    let create = format!("$JS.API.CONSUMER.CREATE.{STREAM}.{name}.{filter}");
    let config = OrderedConfig {
        name: Some(name),
        deliver_policy,
        filter_subject: filter,
        ..Default::default()
    };

    // A consumer the permissions refuse answers at once, not at the
    // JetStream request's timeout.
    let refused = berth_bus::conn::refusal(ctx.client.nats(), &create);
    let consumer = tokio::select! {
        made = stream.create_consumer(config) => made.with_context(|| {
            format!("cannot read the event stream {STREAM} (is berthd running?)")
        })?,
        err = refused => return Err(err.into()),
    };
    let mut messages = consumer.messages().await?;

    loop {
        // Ticks let `--until TIME` end the wait when nothing comes.
        let next = tokio::time::timeout(Duration::from_millis(250), messages.next()).await;
        let message = match next {
            Err(_) => {
                if let Some(Bound::Time(until)) = until {
                    if output::now_nanos() > until {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                continue;
            }
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Ok(Some(message)) => message.map_err(|err| anyhow::anyhow!("event stream: {err}"))?,
        };
        if !subjects
            .iter()
            .any(|filter| matches(filter, &message.subject))
        {
            continue;
        }
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let Ok(envelope) = Envelope::decode(message.payload.clone()) else {
            continue;
        };
        let at = output::nanos(envelope.timestamp.as_ref());
        let past = match until {
            Some(Bound::Sequence(last)) => sequence > last,
            Some(Bound::Time(last)) => at > last,
            None => false,
        };
        if past {
            return Ok(ExitCode::SUCCESS);
        }
        print(ctx, sequence, &envelope);
        if matches!(until, Some(Bound::Sequence(last)) if sequence == last) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// The subject of a topic filter in this namespace; wildcards pass.
fn filter_subject(ctx: &Ctx, topic: &str) -> anyhow::Result<String> {
    let valid = !topic.is_empty()
        && topic.split('.').all(|part| {
            !part.is_empty() && !part.contains(|c: char| c.is_whitespace() || c.is_control())
        });
    if !valid {
        anyhow::bail!("--filter {topic:?} is not a topic such as tasks.exit or images.>");
    }
    Ok(format!(
        "{}.{}.{}.{topic}",
        berth_bus::subject::PREFIX,
        ctx.namespace,
        berth_bus::subject::EVENTS
    ))
}

/// Whether `subject` matches the NATS subject filter `filter`.
fn matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in filter.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

fn print(ctx: &Ctx, sequence: u64, envelope: &Envelope) {
    let time = output::time(output::nanos(envelope.timestamp.as_ref()));
    let subject = summary(&envelope.topic, &envelope.payload);
    if ctx.json {
        let mut line = serde_json::json!({
            "sequence": sequence,
            "time": time,
            "unix_nanos": output::nanos(envelope.timestamp.as_ref()),
            "topic": envelope.topic,
            "namespace": envelope.namespace,
            "node": envelope.node,
            "source": envelope.source,
            "generation": envelope.generation,
            "object": subject,
        });
        // Exits carry the time the shim reaped the process, to the
        // nanosecond: what a watcher measures its delay against.
        if envelope.topic.starts_with("tasks.") {
            if let Some(at) = tpb::TaskEvent::decode(&envelope.payload[..])
                .ok()
                .and_then(|event| event.exited_at)
            {
                line["exited_at_unix_nanos"] = at.unix_nanos.into();
            }
        }
        println!("{line}");
    } else {
        println!(
            "{sequence} {time} {} {} {subject}",
            envelope.namespace, envelope.topic
        );
    }
}

/// What an event is about, from its payload: the object's id and the
/// detail a person looks for (an exit status, a digest).
fn summary(topic: &str, payload: &[u8]) -> String {
    let group = topic.split('.').next().unwrap_or_default();
    let text = match group {
        "images" => mpb::ImageEvent::decode(payload)
            .ok()
            .map(|e| format!("{} {}", e.name, e.digest)),
        "containers" => mpb::ContainerEvent::decode(payload)
            .ok()
            .map(|e| format!("{} {}", e.container_id, e.image)),
        "leases" => mpb::LeaseEvent::decode(payload).ok().map(|e| e.lease_id),
        "namespaces" => mpb::NamespaceEvent::decode(payload).ok().map(|e| e.name),
        "content" => cpb::ContentEvent::decode(payload)
            .ok()
            .map(|e| format!("{} {}", e.digest, e.size)),
        "snapshot" => spb::SnapshotEvent::decode(payload).ok().map(|e| e.key),
        "tasks" => tpb::TaskEvent::decode(payload).ok().map(|e| {
            let mut text = e.container_id;
            if !e.exec_id.is_empty() {
                text = format!("{text} exec={}", e.exec_id);
            }
            if topic.ends_with("exit") || topic.ends_with("exited") || topic.ends_with("delete") {
                text = format!("{text} status={}", e.exit_status);
            } else if e.pid > 0 {
                text = format!("{text} pid={}", e.pid);
            }
            text
        }),
        "gc" => gpb::GcDone::decode(payload).ok().map(|e| {
            let blobs: usize = e.namespaces.iter().map(|n| n.blobs.len()).sum();
            let snapshots: usize = e.namespaces.iter().map(|n| n.snapshots.len()).sum();
            format!("blobs={blobs} snapshots={snapshots}")
        }),
        _ => None,
    };
    text.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn filters_match_as_nats_does() {
        let cases = [
            ("a.events.>", "a.events.tasks.exit", true),
            ("a.events.>", "a.events", false),
            ("a.events.tasks.*", "a.events.tasks.exit", true),
            ("a.events.tasks.*", "a.events.tasks.exit.x", false),
            ("a.events.tasks.exit", "a.events.tasks.exit", true),
            ("a.events.tasks.exit", "a.events.tasks.start", false),
        ];
        for (filter, subject, want) in cases {
            assert_eq!(matches(filter, subject), want, "{filter} {subject}");
        }
    }
}
