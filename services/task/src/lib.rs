//! berth's task service: the node agent that writes OCI bundles, runs a
//! per-container shim around runc, and reports task exits.
//!
//! [`spec`] builds a bundle's `config.json` from an image config and the
//! caller's overrides. [`shim`] is the synchronous shim program (the
//! `berth-shim` binary) and its wire format; [`shim_client`] is the async
//! side the service uses to spawn, drive and re-adopt shims.

pub mod shim;
pub mod shim_client;
pub mod spec;
