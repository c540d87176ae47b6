//! The snapshot service's errors, and the one map from them to wire codes.
//!
//! Every failure of the store, the handlers and the unpacker is a
//! [`SnapshotError`]. Messages are lowercase and name the failing object;
//! causes hang on `#[source]` and are joined into the wire message only
//! once, where the error becomes a reply ([`From<SnapshotError>`] for
//! [`berth_bus::Error`]).

use std::io;
use std::path::PathBuf;

use berth_bus::Code;

use crate::apply::ApplyError;
use crate::store::Kind;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A key or name is not usable (`InvalidArgument`).
    #[error("invalid snapshot key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A request field is malformed (`InvalidArgument`).
    #[error("invalid {field}: {reason}")]
    InvalidRequest {
        /// The field, e.g. `diff_ids`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No snapshot has this key in the namespace (`NotFound`).
    #[error("snapshot {key:?} not found")]
    NotFound {
        /// The key.
        key: String,
    },
    /// The key is taken (`AlreadyExists`).
    #[error("snapshot {key:?} already exists")]
    AlreadyExists {
        /// The key.
        key: String,
    },
    /// The snapshot's kind does not allow the operation (`FailedPrecondition`).
    #[error("snapshot {key:?} is {kind}, not {wanted}")]
    WrongKind {
        /// The key.
        key: String,
        /// What it is.
        kind: Kind,
        /// What the operation needs.
        wanted: &'static str,
    },
    /// The snapshot is a parent of others (`FailedPrecondition`).
    #[error("snapshot {key:?} has children")]
    HasChildren {
        /// The key.
        key: String,
    },
    /// The snapshot is a layer an unpack is applying now (`FailedPrecondition`).
    #[error("snapshot {key:?} is a layer being unpacked")]
    Unpacking {
        /// The key.
        key: String,
    },
    /// The parent chain is deeper than overlayfs stacks (`FailedPrecondition`).
    #[error("snapshot chain below {key:?} is deeper than {max} layers")]
    ChainTooDeep {
        /// The parent the chain starts at.
        key: String,
        /// The limit.
        max: usize,
    },
    /// The layer's bytes hash to another digest than its descriptor's
    /// (`InvalidArgument`).
    #[error("layer {digest} does not match its descriptor: its bytes are {actual}")]
    LayerDigestMismatch {
        /// The descriptor's digest.
        digest: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// The layer is another size than its descriptor says (`InvalidArgument`).
    #[error("layer {digest} is {actual} bytes, its descriptor says {expected}")]
    LayerSizeMismatch {
        /// The descriptor's digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// Bytes read.
        actual: u64,
    },
    /// The uncompressed layer is not the one the image config names
    /// (`InvalidArgument`).
    #[error("layer {digest} has diff id {actual}, the image config says {expected}")]
    DiffIdMismatch {
        /// The layer's digest.
        digest: String,
        /// The diff ID of the image config.
        expected: String,
        /// The diff ID of the bytes.
        actual: String,
    },
    /// Applying the layer failed: `InvalidArgument` when its bytes are at
    /// fault (a layer over the size cap included), the content service's
    /// code when reading it failed, `Unavailable` when the filesystem is
    /// nearly full, else `Internal`.
    #[error("failed to apply layer {digest}")]
    Apply {
        /// The layer's digest.
        digest: String,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// A new snapshot's upper directory could not be given its root's
    /// attributes (`Internal`).
    #[error("failed to prepare snapshot directory {path}")]
    InitUpper {
        /// The upper directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// The content service refused or failed a layer (its code).
    #[error("failed to read layer {digest} from the content service")]
    Content {
        /// The layer's digest.
        digest: String,
        /// The content service's answer.
        #[source]
        source: berth_bus::Error,
    },
    /// The metadata service did not attach the snapshots to the lease (its code).
    #[error("failed to attach snapshots to lease {lease_id:?}")]
    Lease {
        /// The lease.
        lease_id: String,
        /// The metadata service's answer.
        #[source]
        source: berth_bus::Error,
    },
    /// A part the shared bus crate keeps (the environment, the outbox, the
    /// request log) failed, or a request id was reused with another body
    /// (the bus's code).
    #[error("{what} failed")]
    Bus {
        /// What was used, e.g. `request log`.
        what: &'static str,
        /// The bus's error.
        #[source]
        source: berth_bus::Error,
    },
    /// The database was written by another layout version (`Internal`).
    #[error("snapshot database has schema version {found}, this build reads {expected}")]
    SchemaVersion {
        /// The stored version.
        found: String,
        /// The version this build reads.
        expected: u32,
    },
    /// The database failed (`Internal`).
    #[error("snapshot database failed")]
    Database(#[from] heed::Error),
    /// A stored record cannot be read (`Internal`).
    #[error("stored record of snapshot {key:?} is unreadable")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's answer.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem call on the snapshot root failed (`Internal`).
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done, e.g. `create directory`.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Blocking work panicked or was cancelled (`Internal`).
    #[error("snapshot worker failed")]
    Worker(#[source] tokio::task::JoinError),
}

impl SnapshotError {
    /// The wire code of this error.
    pub fn code(&self) -> Code {
        use SnapshotError::*;
        match self {
            InvalidKey { .. }
            | InvalidRequest { .. }
            | LayerDigestMismatch { .. }
            | LayerSizeMismatch { .. }
            | DiffIdMismatch { .. } => Code::InvalidArgument,
            NotFound { .. } => Code::NotFound,
            AlreadyExists { .. } => Code::AlreadyExists,
            WrongKind { .. } | HasChildren { .. } | Unpacking { .. } | ChainTooDeep { .. } => {
                Code::FailedPrecondition
            }
            Apply { source, .. } => apply_code(source),
            Content { source, .. } | Lease { source, .. } | Bus { source, .. } => source.code,
            Database(_)
            | InitUpper { .. }
            | SchemaVersion { .. }
            | Corrupt { .. }
            | Io { .. }
            | Worker(_) => Code::Internal,
        }
    }

    /// A [`SnapshotError::Bus`] for a failure of `what`.
    pub(crate) fn bus(what: &'static str) -> impl FnOnce(berth_bus::Error) -> Self {
        move |source| SnapshotError::Bus { what, source }
    }

    /// A [`SnapshotError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io { op, path, source }
    }
}

/// A layer's bytes at fault are the caller's; a failed read keeps the code
/// the content service answered with (the chunk reader carries it in the
/// `io::Error`); a nearly full filesystem is `Unavailable`; the snapshot
/// filesystem failing is the service's own.
fn apply_code(err: &ApplyError) -> Code {
    if err.is_invalid_input() {
        return Code::InvalidArgument;
    }
    match err {
        ApplyError::Read(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<berth_bus::Error>())
            .map_or(Code::Internal, |bus| bus.code),
        // The node is short of room: another node, or later, may do.
        ApplyError::NoSpace { .. } => Code::Unavailable,
        _ => Code::Internal,
    }
}

impl From<SnapshotError> for berth_bus::Error {
    fn from(err: SnapshotError) -> Self {
        // The wire message is the error and its causes, each said once.
        berth_bus::Error::with_causes(err.code(), &err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_failure_class() {
        let bus = |code| berth_bus::Error::new(code, "x");
        let read = |code| ApplyError::Read(io::Error::other(berth_bus::Error::new(code, "gone")));
        let cases = [
            (
                SnapshotError::InvalidKey {
                    key: "".into(),
                    reason: "empty",
                },
                Code::InvalidArgument,
            ),
            (SnapshotError::NotFound { key: "k".into() }, Code::NotFound),
            (
                SnapshotError::HasChildren { key: "k".into() },
                Code::FailedPrecondition,
            ),
            (
                SnapshotError::Apply {
                    digest: "d".into(),
                    source: ApplyError::UnsupportedMediaType("x".into()),
                },
                Code::InvalidArgument,
            ),
            (
                SnapshotError::Apply {
                    digest: "d".into(),
                    source: read(Code::Unavailable),
                },
                Code::Unavailable,
            ),
            (
                SnapshotError::Apply {
                    digest: "d".into(),
                    source: ApplyError::Read(io::Error::other("disk")),
                },
                Code::Internal,
            ),
            (
                SnapshotError::Content {
                    digest: "d".into(),
                    source: bus(Code::NotFound),
                },
                Code::NotFound,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn wire_messages_carry_each_cause_once() {
        let err = SnapshotError::Content {
            digest: "sha256:ab".into(),
            source: berth_bus::Error::not_found("blob sha256:ab not found"),
        };
        let wire = berth_bus::Error::from(err);
        assert_eq!(wire.code, Code::NotFound);
        assert_eq!(
            wire.message,
            "failed to read layer sha256:ab from the content service: blob sha256:ab not found"
        );
    }
}
