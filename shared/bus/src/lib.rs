//! berth's NATS bus: what every service and client stands on.
//!
//! - [`subject`]: the one builder of `berth.v1.<namespace>.<service>[.<node>].<op>`
//!   and event subjects, refusing bad tokens before anything is sent;
//! - [`error`]: the closed set of codes that cross the wire;
//! - [`config`]: where NATS is, the identity berth connects as, and TLS;
//! - [`conn`]: connections that turn the server's permission refusals into
//!   `PermissionDenied` replies;
//! - [`client`]: typed request/reply with a timeout on every call;
//! - [`crypto`]: the process-wide TLS crypto provider;
//! - [`serve`]: the serve loop on the NATS micro-service protocol;
//! - [`idempotency`]: request ids stored with the effect;
//! - [`events`]: the outbox, its publisher, and the ordered consumer;
//! - [`chunk`]: large bodies pulled by the receiver in chunks;
//! - [`locks`]: async locks by name (a digest, a chain ID), held across awaits;
//! - [`nodes`]: the key-value bucket where node agents announce themselves;
//! - [`api`]: one typed client per service;
//! - [`trace`]: logging set-up and `traceparent` propagation;
//! - [`store`]: the LMDB environment settings every service shares.

pub mod api;
pub mod chunk;
pub mod client;
pub mod config;
pub mod conn;
pub mod crypto;
pub mod error;
pub mod events;
pub mod idempotency;
pub mod locks;
pub mod nodes;
pub mod serve;
pub mod store;
pub mod subject;
pub mod trace;

pub use client::Client;
pub use config::ConnectConfig;
pub use conn::{connect, connect_with, connect_with_config};
pub use error::{Code, Error, Result};
pub use serve::{Call, Service};

/// A token cancelled at the first SIGTERM or SIGINT, for a service binary's
/// shutdown.
pub fn shutdown_on_signals() -> Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}
