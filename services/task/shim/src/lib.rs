//! The per-container shim: a small synchronous program (std threads, no async
//! runtime) that owns one container's runc lifecycle on a node.
//!
//! The `berth-shim` binary calls [`main`]. It detaches from its caller (double
//! fork and `setsid`), becomes a child subreaper, runs `runc create`, and then
//! serves [`protocol`] requests on a unix socket. It reaps every child,
//! records the init's exit in `exit.json` before answering waiters, and keeps
//! that record until metadata acknowledges it, so a restart of the task
//! service loses no exit.

mod console;
mod daemon;
mod detach;
pub mod protocol;

pub use daemon::ShimConfig;
pub use detach::{main, parse_args, ShimError};
