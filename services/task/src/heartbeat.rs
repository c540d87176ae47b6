//! The node's announcement: a heartbeat in the key-value bucket
//! `berth_nodes` ([`berth_bus::nodes`]) under this node's id, every
//! interval, for as long as the service runs.
//!
//! The heartbeat says who the node is (id, boot id, version), what it runs
//! (its task records, and those running or paused) and what it has (memory
//! and CPUs). The metadata service marks the node lost when three intervals
//! pass without one. A heartbeat that cannot be put is retried at the next
//! interval: heartbeats are idempotent, and only the last one matters.
//!
//! A clean stop puts nothing more and deletes nothing: the containers keep
//! running under their shims, and a restart within the bound is never seen
//! as a lost node.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio_util::sync::CancellationToken;

use berth_proto::task::Heartbeat;
use berth_proto::Timestamp;

use crate::store::Status;
use crate::TaskService;

/// How long one put may take before it counts as failed.
const PUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Puts this node's heartbeat every `interval` until `shutdown`.
pub async fn run(svc: Arc<TaskService>, interval: Duration, shutdown: CancellationToken) {
    let js = async_nats::jetstream::new(svc.client.nats().clone());
    let started_at = Timestamp::now();
    let mut bucket = None;
    let mut failing = false;
    let mut sequence = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        sequence += 1;
        let outcome = beat(&svc, &js, &mut bucket, started_at, interval, sequence).await;

        // One warning when heartbeats start failing, one line when they
        // come back; the failures in between are the same failure.
        match outcome {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(node = %svc.node, "heartbeats reach the bucket again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                bucket = None;
                tracing::warn!(node = %svc.node, error = %err, "heartbeat not put; retrying every interval");
            }
            Err(err) => {
                bucket = None;
                tracing::debug!(node = %svc.node, error = %err, "heartbeat not put");
            }
        }
    }
}

/// Puts one heartbeat, opening the bucket first when it is not open.
async fn beat(
    svc: &TaskService,
    js: &async_nats::jetstream::Context,
    bucket: &mut Option<async_nats::jetstream::kv::Store>,
    started_at: Timestamp,
    interval: Duration,
    sequence: u64,
) -> berth_bus::Result<()> {
    let store = match bucket {
        Some(store) => store,
        None => bucket.insert(berth_bus::nodes::ensure_bucket(js).await?),
    };
    let heartbeat = heartbeat(svc, started_at, interval, sequence)?;
    let put = store.put(&svc.node, heartbeat.encode_to_vec().into());
    match tokio::time::timeout(PUT_TIMEOUT, put).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(berth_bus::Error::unavailable(format!(
            "put heartbeat of node {}: {err}",
            svc.node
        ))),
        Err(_) => Err(berth_bus::Error::unavailable(format!(
            "put heartbeat of node {}: no ack within {PUT_TIMEOUT:?}",
            svc.node
        ))),
    }
}

/// This node's heartbeat as of now.
fn heartbeat(
    svc: &TaskService,
    started_at: Timestamp,
    interval: Duration,
    sequence: u64,
) -> berth_bus::Result<Heartbeat> {
    let records = {
        let txn = svc.store.env.read_txn()?;
        svc.store.all(&txn)?
    };
    let running = records
        .iter()
        .filter(|(_, _, record)| matches!(record.status, Status::Running | Status::Paused))
        .count();
    Ok(Heartbeat {
        node: svc.node.clone(),
        boot_id: svc.boot_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        running_tasks: running as u32,
        tasks: records.len() as u32,
        memory_bytes: memory_bytes(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        started_at: Some(started_at),
        sent_at: Some(Timestamp::now()),
        interval_ms: interval.as_millis().min(u128::from(u32::MAX)) as u32,
        sequence,
    })
}

/// The node's memory (`MemTotal` of `/proc/meminfo`), in bytes; 0 when it
/// cannot be read.
fn memory_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_mem_total(&meminfo)
}

fn parse_mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::parse_mem_total;

    #[test]
    fn memory_comes_from_mem_total() {
        let cases = [
            (
                "MemTotal:       16314420 kB\nMemFree: 1 kB\n",
                16314420 * 1024,
            ),
            ("MemFree: 1 kB\n", 0),
            ("MemTotal: lots\n", 0),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_mem_total(text), bytes, "{text:?}");
        }
    }
}
