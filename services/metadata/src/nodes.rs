//! The node registry: every node ever heard from, ready or lost.
//!
//! Each node's task service puts a `task.Heartbeat` under its node id in the
//! key-value bucket `berth_nodes` ([`berth_bus::nodes`]) every few seconds.
//! This service watches the bucket and keeps the record of every node it
//! ever heard from in the `nodes` table: READY while heartbeats arrive,
//! LOST once [`LOST_AFTER_BEATS`] of the node's intervals pass without one.
//! Time is this service's own: a heartbeat counts when it arrives here, so
//! the nodes' clocks never decide.
//!
//! A change of state is written with a `nodes.ready` or `nodes.lost` event
//! in each namespace that has a task reserved on the node. While a node is
//! lost its running tasks read as UNKNOWN ([`overlay`]), and
//! `containers.delete` may abandon them to a tombstone the node applies when
//! it returns.
//!
//! What this service cannot see does not make a node lost. A watch that is
//! made again delivers every key's last value once more; a heartbeat whose
//! start time and sequence are known already is no news. While this
//! service's own connection is down, and when the watch goes quiet while
//! nodes are ready (its consumer stalled on a server of the cluster that
//! went away), every ready node gets a fresh grace and the watch is made
//! again; only a watch that stays quiet after that says the nodes are gone.
//!
//! Bounds: a node that stops heartbeating is lost within three of its
//! intervals and a [`TICK`] of the last heartbeat that arrived, or twice
//! that when it was the only node heard from (the quiet watch is first taken
//! for a stall). After this service restarts, a node that stopped meanwhile
//! is lost within the same time from the restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use heed::RwTxn;
use prost::Message;
use tokio_util::sync::CancellationToken;

use berth_bus::nodes::{lost_after, LOST_AFTER_BEATS};
use berth_proto::metadata::{Node, NodeEvent, NodeState, Task};
use berth_proto::task::Heartbeat;
use berth_proto::Timestamp;

use crate::error::{MetadataError, Result};
use crate::events::{NODES_LOST, NODES_READY};
use crate::schema::Schema;
use crate::MetadataService;

/// How often the registry looks for nodes that went quiet.
pub const TICK: Duration = Duration::from_millis(250);

/// How often a ready node's last heartbeat is written to its record (it is
/// kept in memory in between).
const PERSIST_EVERY: Duration = Duration::from_secs(30);

/// What the registry holds in memory of one node.
#[derive(Debug, Clone)]
struct Live {
    /// The last heartbeat that arrived.
    heartbeat: Heartbeat,
    /// When it arrived.
    seen: Instant,
    /// When it arrived, by the wall clock.
    seen_at: Timestamp,
    /// When its record was last written.
    persisted: Instant,
    /// Whether the record says READY.
    ready: bool,
}

/// The nodes heard from, in memory, beside their records.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<String, Live>,
    /// When the last heartbeat that was news arrived, from any node.
    last_news: Option<Instant>,
    /// True once a quiet watch was given its one grace, until news arrives.
    regraced: bool,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map holds plain values: a panic while it was held left it
        // whole, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last heartbeat of `node` and when it arrived, if it was heard
    /// from since this service started.
    pub fn current(&self, node: &str) -> Option<(Heartbeat, Timestamp)> {
        let inner = self.lock();
        let live = inner.nodes.get(node)?;
        Some((live.heartbeat.clone(), live.seen_at))
    }

    /// Gives every ready node a fresh grace, as if it had just been heard.
    fn grace(&self) {
        let now = Instant::now();
        for live in self.lock().nodes.values_mut() {
            live.seen = now;
        }
    }
}

/// A node's record with what memory knows newer: its last heartbeat and
/// when it arrived.
pub fn with_current(registry: &Registry, mut record: Node) -> Node {
    if let Some((heartbeat, seen_at)) = registry.current(&record.node) {
        record.heartbeat = Some(heartbeat);
        record.last_seen = Some(seen_at);
    }
    record
}

/// Reads a task of a lost node as UNKNOWN unless it has exited: nobody can
/// say whether it still runs until its node is heard again.
pub fn overlay(schema: &Schema, txn: &heed::RoTxn, task: &mut Task) -> Result<()> {
    use berth_proto::metadata::TaskStatus;
    let live = [
        TaskStatus::Created as i32,
        TaskStatus::Running as i32,
        TaskStatus::Paused as i32,
    ];
    if live.contains(&task.status) && schema.node_lost(txn, &task.node)? {
        task.status = TaskStatus::Unknown as i32;
    }
    Ok(())
}

/// Keeps the registry until `shutdown`: loads the records, then watches
/// the bucket, making the watch again after any failure.
pub async fn run(svc: Arc<MetadataService>, shutdown: CancellationToken) {
    if let Err(err) = load(&svc) {
        tracing::error!(error = %err, "node registry not loaded");
    }
    let mut pause = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            outcome = watch(&svc) => outcome,
            _ = shutdown.cancelled() => return,
        };
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "node watch stopped; watching again");
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Seeds memory from the records: a ready node gets the grace of a fresh
/// heartbeat, so a restart of this service never makes a node lost at once.
fn load(svc: &MetadataService) -> Result<()> {
    let records = svc.store.read(|schema, txn| schema.all_nodes(txn))?;
    let now = Instant::now();
    let mut inner = svc.registry.lock();
    for record in records {
        let live = Live {
            heartbeat: record.heartbeat.clone().unwrap_or_default(),
            seen: now,
            seen_at: record.last_seen.unwrap_or_default(),
            persisted: now,
            ready: record.state == NodeState::Ready as i32,
        };
        inner.nodes.insert(record.node, live);
    }
    Ok(())
}

/// Watches the bucket and sweeps for lost nodes every [`TICK`]; returns
/// when the watch fails, ends or goes quiet.
async fn watch(svc: &Arc<MetadataService>) -> Result<()> {
    let js = async_nats::jetstream::new(svc.nats.clone());
    let bucket = berth_bus::nodes::ensure_bucket(&js).await?;
    let mut entries = bucket.watch_all().await.map_err(|err| {
        berth_bus::Error::unavailable(format!("watch bucket {}: {err}", berth_bus::nodes::BUCKET))
    })?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            entry = entries.next() => {
                let entry = entry
                    .ok_or_else(|| berth_bus::Error::unavailable("node watch ended"))?
                    .map_err(|err| berth_bus::Error::unavailable(format!("node watch: {err}")))?;
                if entry.operation == async_nats::jetstream::kv::Operation::Put {
                    heard(svc, &entry.key, &entry.value).await;
                }
            }
            _ = tick.tick() => {
                if svc.nats.connection_state() != async_nats::connection::State::Connected {
                    // Silence while this service is cut off says nothing of the nodes.
                    svc.registry.grace();
                    continue;
                }
                if quiet(&svc.registry) {
                    return Err(berth_bus::Error::unavailable(
                        "no heartbeat arrived from any node; taking it for a stalled watch",
                    )
                    .into());
                }
                sweep(svc).await;
            }
        }
    }
}

/// True, once per quiet spell, when no news arrived for longer than any
/// ready node may stay silent: every ready node then gets a grace.
fn quiet(registry: &Registry) -> bool {
    let mut inner = registry.lock();
    let longest = inner
        .nodes
        .values()
        .filter(|live| live.ready)
        .map(|live| node_lost_after(&live.heartbeat))
        .max();
    let Some(longest) = longest else {
        return false;
    };
    let silent = inner.last_news.is_none_or(|at| at.elapsed() > longest);
    if !silent || inner.regraced {
        return false;
    }
    inner.regraced = true;
    drop(inner);
    registry.grace();
    true
}

/// How long `heartbeat`'s node may stay silent before it is lost.
fn node_lost_after(heartbeat: &Heartbeat) -> Duration {
    let interval = match heartbeat.interval_ms {
        0 => berth_bus::nodes::DEFAULT_INTERVAL,
        ms => Duration::from_millis(ms.into()),
    };
    lost_after(interval)
}

/// Takes one heartbeat in: news moves the node's clock, and a node that was
/// lost, new or rebooted gets its record written.
async fn heard(svc: &MetadataService, key: &str, value: &[u8]) {
    let heartbeat = match Heartbeat::decode(value) {
        Ok(heartbeat) if heartbeat.node == key => heartbeat,
        Ok(_) | Err(_) => {
            tracing::debug!(node = %key, "heartbeat unreadable or of another node; ignored");
            return;
        }
    };
    if berth_bus::subject::check_token("node id", key).is_err() {
        return;
    }

    // A replay of a heartbeat already taken in is no news.
    let now = Instant::now();
    let seen_at = Timestamp::now();
    let write = {
        let mut inner = svc.registry.lock();
        let known = inner.nodes.get(key);
        let news = known.is_none_or(|live| {
            live.heartbeat.started_at != heartbeat.started_at
                || live.heartbeat.sequence != heartbeat.sequence
        });
        if !news {
            return;
        }
        let write = known.is_none_or(|live| {
            !live.ready
                || live.heartbeat.boot_id != heartbeat.boot_id
                || live.persisted.elapsed() >= PERSIST_EVERY
        });
        let persisted = match (write, known) {
            (false, Some(live)) => live.persisted,
            _ => now,
        };
        inner.last_news = Some(now);
        inner.regraced = false;
        inner.nodes.insert(
            key.to_string(),
            Live {
                heartbeat: heartbeat.clone(),
                seen: now,
                seen_at,
                persisted,
                ready: true,
            },
        );
        write
    };
    if write {
        let node = key.to_string();
        let outcome = svc
            .store
            .write(move |schema, txn| {
                record_state(
                    schema,
                    txn,
                    &node,
                    Some(heartbeat),
                    NodeState::Ready,
                    seen_at,
                )
            })
            .await;
        finish(svc, key, outcome);
    }
}

/// Marks lost every ready node that stayed silent past its bound.
async fn sweep(svc: &MetadataService) {
    let silent: Vec<String> = {
        let inner = svc.registry.lock();
        inner
            .nodes
            .iter()
            .filter(|(_, live)| {
                live.ready && live.seen.elapsed() > node_lost_after(&live.heartbeat)
            })
            .map(|(node, _)| node.clone())
            .collect()
    };
    for node in silent {
        if let Some(live) = svc.registry.lock().nodes.get_mut(&node) {
            live.ready = false;
        }
        let id = node.clone();
        let outcome = svc
            .store
            .write(move |schema, txn| {
                record_state(schema, txn, &id, None, NodeState::Lost, Timestamp::now())
            })
            .await;
        finish(svc, &node, outcome);
    }
}

/// Logs a state written (or not), and wakes the publisher for its events.
fn finish(svc: &MetadataService, node: &str, outcome: Result<Option<NodeState>>) {
    match outcome {
        Ok(Some(NodeState::Lost)) => {
            tracing::warn!(%node, beats = LOST_AFTER_BEATS, "node lost: no heartbeat");
        }
        Ok(Some(_)) => tracing::info!(%node, "node ready"),
        Ok(None) => {}
        Err(err) => tracing::error!(%node, error = %err, "node record not written"),
    }
    svc.store.schema().outbox.wake().notify_one();
}

/// Writes a node's record in `state`, with its last heartbeat when one
/// came; a change of state (or of boot id) bumps the generation and queues
/// its event in every namespace with a task on the node. Returns the new
/// state when it changed.
fn record_state(
    schema: &Schema,
    txn: &mut RwTxn,
    node: &str,
    heartbeat: Option<Heartbeat>,
    state: NodeState,
    now: Timestamp,
) -> Result<Option<NodeState>> {
    let mut record = schema.node(txn, node)?.unwrap_or_else(|| Node {
        node: node.to_string(),
        first_seen: Some(now),
        ..Default::default()
    });
    let old_boot = record
        .heartbeat
        .as_ref()
        .map(|h| h.boot_id.clone())
        .unwrap_or_default();
    let rebooted = heartbeat
        .as_ref()
        .is_some_and(|h| !old_boot.is_empty() && h.boot_id != old_boot);
    let moved = record.state != state as i32;
    if let Some(heartbeat) = heartbeat {
        record.heartbeat = Some(heartbeat);
        record.last_seen = Some(now);
    }
    if moved || rebooted {
        record.state = state as i32;
        record.state_changed_at = Some(now);
        record.generation += 1;
        queue_event(schema, txn, &record, state)?;
    }
    schema.put_node(txn, &record)?;
    Ok(moved.then_some(state))
}

/// Queues `nodes.ready` or `nodes.lost` in each namespace with a task
/// reserved on the node.
fn queue_event(schema: &Schema, txn: &mut RwTxn, record: &Node, state: NodeState) -> Result<()> {
    let namespaces: BTreeSet<String> = schema
        .tasks
        .all(txn)?
        .into_iter()
        .filter(|(_, task)| task.node == record.node)
        .map(|(namespace, _)| namespace)
        .collect();
    let topic = match state {
        NodeState::Lost => NODES_LOST,
        _ => NODES_READY,
    };
    let event = NodeEvent {
        node: record.node.clone(),
        state: state as i32,
        boot_id: record
            .heartbeat
            .as_ref()
            .map(|h| h.boot_id.clone())
            .unwrap_or_default(),
    };
    for namespace in namespaces {
        schema
            .outbox
            .push(txn, &namespace, topic, record.generation, &event)
            .map_err(MetadataError::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_in_the_nodes_own_intervals() {
        let beat = |ms| Heartbeat {
            interval_ms: ms,
            ..Default::default()
        };
        assert_eq!(node_lost_after(&beat(1000)), Duration::from_secs(3));
        assert_eq!(node_lost_after(&beat(0)), Duration::from_secs(6));
        assert_eq!(node_lost_after(&beat(600_000)), Duration::from_secs(30));
    }

    #[test]
    fn a_quiet_watch_gets_one_grace_per_spell() {
        let registry = Registry::default();
        assert!(!quiet(&registry), "no node, nothing to wait for");
        registry.lock().nodes.insert(
            "n1".into(),
            Live {
                heartbeat: Heartbeat {
                    interval_ms: 100,
                    ..Default::default()
                },
                seen: Instant::now(),
                seen_at: Timestamp::now(),
                persisted: Instant::now(),
                ready: true,
            },
        );
        assert!(quiet(&registry), "never any news: the watch may be stalled");
        assert!(!quiet(&registry), "the second quiet spell is real silence");
        registry.lock().regraced = false;
        registry.lock().last_news = Some(Instant::now());
        assert!(!quiet(&registry), "news just arrived");
    }
}
