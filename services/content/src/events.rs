//! The events the content service publishes, through its outbox, each with
//! a [`berth_proto::content::ContentEvent`] payload on
//! `berth.v1.<namespace>.events.<topic>`.
//!
//! Every event carries a generation from one counter of the store, so a
//! blob deleted and committed again has a higher generation on its commit
//! than on its delete, and a consumer that applies events by generation
//! keeps the last state.

/// A namespace now holds a blob: its bytes were committed or reused.
/// `reused` says no new bytes were stored (the namespace held the blob, or
/// its file was on disk for another namespace).
pub const COMMIT: &str = "content.commit";

/// A namespace let go of a blob. `freed` says its bytes left the disk (no
/// namespace holds it any more).
pub const DELETE: &str = "content.delete";
