//! berth's snapshot service: overlayfs snapshots on one node.
//!
//! For now this crate holds the node-local core that the service is built on:
//! [`apply`] unpacks one layer stream (gzip, zstd or plain tar) into a
//! snapshot's own upper directory, turning OCI whiteouts into overlayfs ones,
//! and [`overlay`] describes and performs the mounts that stack committed
//! snapshots into a container's root filesystem. Neither knows about NATS.

pub mod apply;
pub mod overlay;
