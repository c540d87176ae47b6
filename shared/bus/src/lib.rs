//! berth's NATS bus: what every service and client stands on.
//!
//! - [`subject`]: the one builder of `berth.v1.<namespace>.<service>[.<node>].<op>`
//!   and event subjects, refusing bad tokens before anything is sent;
//! - [`error`]: the closed set of codes that cross the wire;
//! - [`client`]: typed request/reply with a timeout on every call;
//! - [`serve`]: the serve loop on the NATS micro-service protocol;
//! - [`idempotency`]: request ids stored with the effect;
//! - [`events`]: the outbox, its publisher, and the ordered consumer;
//! - [`chunk`]: large bodies pulled by the receiver in chunks;
//! - [`trace`]: logging set-up and `traceparent` propagation;
//! - [`store`]: the LMDB environment settings every service shares.

pub mod api;
pub mod chunk;
pub mod client;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod serve;
pub mod store;
pub mod subject;
pub mod trace;

pub use client::Client;
pub use error::{Code, Error, Result};
pub use serve::{Call, Service};

/// Connects to NATS at `url`, retrying the first connection for `wait`
/// before answering `Unavailable`.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(std::time::Duration::from_secs(2))
        .connect(url)
        .await
        .map_err(|err| Error::unavailable(format!("connect to NATS at {url}: {err}")))
}
