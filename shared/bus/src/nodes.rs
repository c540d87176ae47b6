//! The node registry's bucket: where each node agent announces itself.
//!
//! Every task service puts a `task.Heartbeat` under its node id in the
//! JetStream key-value bucket [`BUCKET`] every few seconds. The bucket keeps
//! one value per key and drops it [`TTL`] after its last put, so the keys
//! are the nodes heard from lately, readable by any NATS client (`nats kv
//! ls berth_nodes`). The metadata service watches the bucket and keeps the
//! registry of record: every node ever heard from, ready or lost.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::error::{Error, Result};

/// The bucket's name.
pub const BUCKET: &str = "berth_nodes";

/// The JetStream stream that holds the bucket.
pub const BUCKET_STREAM: &str = "KV_berth_nodes";

/// How long the bucket keeps a node's last heartbeat.
pub const TTL: Duration = Duration::from_secs(30);

/// The longest heartbeat interval a node may take: a third of [`TTL`], so a
/// live node's key never expires between two heartbeats.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);

/// The interval a node agent heartbeats at unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// Heartbeats a node may miss before it is lost.
pub const LOST_AFTER_BEATS: u32 = 3;

/// How long after its last heartbeat a node that beats every `interval` is
/// lost: [`LOST_AFTER_BEATS`] intervals.
pub fn lost_after(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(100), MAX_INTERVAL) * LOST_AFTER_BEATS
}

/// Opens the bucket, creating it when it does not exist (kept in memory on
/// [`crate::events::replicas`] servers: heartbeats are put again within
/// seconds, so a server's restart loses nothing that matters).
///
/// `Unavailable` when JetStream does not answer or refuses the bucket.
///
/// # Limitations
/// A bucket that exists is used as it is, whatever its replicas.
pub async fn ensure_bucket(js: &jetstream::Context) -> Result<kv::Store> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: BUCKET.to_string(),
            description: "berth nodes: each node's last heartbeat".to_string(),
            history: 1,
            max_age: TTL,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: crate::events::replicas(),
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another service made it in between.
        Err(err) => js
            .get_key_value(BUCKET)
            .await
            .map_err(|_| Error::unavailable(format!("create bucket {BUCKET}: {err}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_lost_after_three_intervals_within_bounds() {
        assert_eq!(lost_after(Duration::from_secs(2)), Duration::from_secs(6));
        assert_eq!(lost_after(Duration::from_secs(60)), MAX_INTERVAL * 3);
        assert_eq!(lost_after(Duration::ZERO), Duration::from_millis(300));
        assert!(MAX_INTERVAL * 3 <= TTL);
    }
}
