//! The content service's errors, and the one map from them to wire codes.
//!
//! Every failure of the store, the ingests and the handlers is a
//! [`ContentError`]. Messages are lowercase and name the failing blob or
//! ingest; causes hang on `#[source]` and are joined into the wire message
//! once, where the error becomes a reply ([`From<ContentError>`] for
//! [`berth_bus::Error`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use berth_bus::Code;

pub use crate::pull::PullError;

/// Why a content operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// A digest is not `<algorithm>:<hex>` with lowercase hex of the right
    /// length (`InvalidArgument`).
    #[error("malformed digest {digest:?}: {reason}")]
    MalformedDigest {
        /// The digest as given.
        digest: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The digest names an algorithm other than sha256 (`InvalidArgument`).
    #[error("unsupported digest algorithm {algorithm:?} in {digest:?}: only sha256 is stored")]
    UnsupportedAlgorithm {
        /// The algorithm.
        algorithm: String,
        /// The digest as given.
        digest: String,
    },
    /// An ingest ref could name another directory, or none (`InvalidArgument`).
    #[error("invalid ingest ref {reference:?}: {reason}")]
    InvalidRef {
        /// The ref as given.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A request field is malformed (`InvalidArgument`).
    #[error("invalid {field}: {reason}")]
    InvalidRequest {
        /// The field, e.g. `expected_size`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The namespace holds no such blob, whoever else may (`NotFound`).
    #[error("blob {digest} not found")]
    BlobNotFound {
        /// The digest.
        digest: String,
    },
    /// The namespace has no ingest of this ref (`NotFound`).
    #[error("ingest {reference:?} not found")]
    IngestNotFound {
        /// The ref.
        reference: String,
    },
    /// A commit names a blob the namespace does not hold and brings no
    /// bytes for it (`NotFound`).
    #[error(
        "blob {digest} not found and ingest {reference:?} holds no bytes for it: write them first"
    )]
    NothingToCommit {
        /// The digest.
        digest: String,
        /// The ref.
        reference: String,
    },
    /// Another writer used the ref moments ago (`FailedPrecondition`).
    #[error(
        "ingest {reference:?} is held by another writer (last used {idle:?} ago, \
         free after {hold:?} unused): use another ref, or wait"
    )]
    IngestHeld {
        /// The ref.
        reference: String,
        /// How long ago the ref was last opened or written.
        idle: Duration,
        /// How long a ref stays held without use.
        hold: Duration,
    },
    /// A resumed ingest was opened with other expectations than it has
    /// (`FailedPrecondition`).
    #[error(
        "ingest {reference:?} expects {field} {held}, not {asked}: abort it or use another ref"
    )]
    IngestMismatch {
        /// The ref.
        reference: String,
        /// `digest`, `size` or `lease`.
        field: &'static str,
        /// What the ingest holds.
        held: String,
        /// What the caller asked for.
        asked: String,
    },
    /// A write does not continue the ingest where it ends (`InvalidArgument`).
    #[error("write to ingest {reference:?} at offset {offset}, but it holds {end} bytes")]
    WrongOffset {
        /// The ref.
        reference: String,
        /// The offset of the write.
        offset: i64,
        /// Where the ingest ends.
        end: u64,
    },
    /// A repeated write brings other bytes than the ingest holds there
    /// (`InvalidArgument`).
    #[error(
        "write to ingest {reference:?} at offset {offset} differs from the bytes it holds there"
    )]
    OverlapDiffers {
        /// The ref.
        reference: String,
        /// The offset of the write.
        offset: i64,
    },
    /// A write goes past the size the ingest expects; the ingest is
    /// discarded (`InvalidArgument`).
    #[error("size mismatch for {digest}: ingest {reference:?} would hold {end} bytes, expected {expected}")]
    PastExpectedSize {
        /// The ingest's expected digest, or `(no digest)`.
        digest: String,
        /// The ref.
        reference: String,
        /// Where the write would end.
        end: u64,
        /// The expected size.
        expected: u64,
    },
    /// The committed bytes are another size than expected; the ingest is
    /// discarded (`InvalidArgument`).
    #[error("size mismatch for {digest}: got {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The expected digest.
        digest: String,
        /// The expected size.
        expected: u64,
        /// What the ingest holds.
        actual: u64,
    },
    /// The committed bytes hash to another digest; the ingest is discarded
    /// (`InvalidArgument`).
    #[error("digest mismatch: content is {actual}, expected {digest}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A read starts past the blob's end (`InvalidArgument`).
    #[error("read of blob {digest} at offset {offset} is past its end ({size} bytes)")]
    ReadPastEnd {
        /// The blob.
        digest: String,
        /// The offset asked for.
        offset: i64,
        /// The blob's size.
        size: u64,
    },
    /// The metadata service did not attach the blob to the lease (its code).
    #[error("failed to attach blob {digest} to lease {lease_id:?}")]
    Lease {
        /// The blob.
        digest: String,
        /// The lease.
        lease_id: String,
        /// The metadata service's answer.
        #[source]
        source: berth_bus::Error,
    },
    /// A part the bus crate keeps (the environment, the outbox, the request
    /// log) failed, or a request id was reused with another body (its code).
    #[error("{what} failed")]
    Bus {
        /// What was used, e.g. `request log`.
        what: &'static str,
        /// The bus's error.
        #[source]
        source: berth_bus::Error,
    },
    /// The database was written by a layout this build does not read
    /// (`Internal`).
    #[error("content database has schema version {found}, this build reads {expected}")]
    SchemaVersion {
        /// The stored version.
        found: String,
        /// The version this build reads.
        expected: u32,
    },
    /// The database failed (`Internal`).
    #[error("content database failed")]
    Database(#[from] heed::Error),
    /// A stored record cannot be read (`Internal`).
    #[error("stored record {key:?} is unreadable")]
    Corrupt {
        /// The record's key or file.
        key: String,
        /// The decoder's answer.
        #[source]
        source: serde_json::Error,
    },
    /// A filesystem call on the content root failed (`Internal`).
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done, e.g. `rename`.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Blocking work panicked or was cancelled (`Internal`).
    #[error("content worker failed")]
    Worker(#[source] tokio::task::JoinError),
    /// A pull from a registry failed (its own code, see [`PullError`]).
    #[error(transparent)]
    Pull(#[from] PullError),
}

impl ContentError {
    /// The wire code of this error.
    pub fn code(&self) -> Code {
        use ContentError::*;
        match self {
            MalformedDigest { .. }
            | UnsupportedAlgorithm { .. }
            | InvalidRef { .. }
            | InvalidRequest { .. }
            | WrongOffset { .. }
            | OverlapDiffers { .. }
            | PastExpectedSize { .. }
            | SizeMismatch { .. }
            | DigestMismatch { .. }
            | ReadPastEnd { .. } => Code::InvalidArgument,
            BlobNotFound { .. } | IngestNotFound { .. } | NothingToCommit { .. } => Code::NotFound,
            IngestHeld { .. } | IngestMismatch { .. } => Code::FailedPrecondition,
            Lease { source, .. } | Bus { source, .. } => source.code,
            SchemaVersion { .. } | Database(_) | Corrupt { .. } | Io { .. } | Worker(_) => {
                Code::Internal
            }
            Pull(pull) => pull.code(),
        }
    }

    /// A [`ContentError::Bus`] for a failure of `what`.
    pub(crate) fn bus(what: &'static str) -> impl FnOnce(berth_bus::Error) -> Self {
        move |source| ContentError::Bus { what, source }
    }

    /// A [`ContentError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| ContentError::Io { op, path, source }
    }

    /// A [`ContentError::Corrupt`] for the record at `key`.
    pub(crate) fn corrupt(key: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Self {
        let key = key.into();
        move |source| ContentError::Corrupt { key, source }
    }
}

impl From<ContentError> for berth_bus::Error {
    fn from(err: ContentError) -> Self {
        // The wire message is the error and its causes, each said once.
        berth_bus::Error::with_causes(err.code(), &err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each class of failure crosses the wire with its code, and a cause
    /// is said once, after the error naming the object.
    #[test]
    fn codes_follow_the_failure_class() {
        let digest = || format!("sha256:{}", "a".repeat(64));
        let cases = [
            (
                ContentError::DigestMismatch {
                    digest: digest(),
                    actual: digest(),
                },
                Code::InvalidArgument,
            ),
            (
                ContentError::BlobNotFound { digest: digest() },
                Code::NotFound,
            ),
            (
                ContentError::IngestHeld {
                    reference: "r".into(),
                    idle: Duration::ZERO,
                    hold: Duration::from_secs(10),
                },
                Code::FailedPrecondition,
            ),
            (
                ContentError::Lease {
                    digest: digest(),
                    lease_id: "l".into(),
                    source: berth_bus::Error::not_found("lease \"l\" not found"),
                },
                Code::NotFound,
            ),
            (
                ContentError::Io {
                    op: "rename",
                    path: "/x".into(),
                    source: io::Error::other("disk"),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
            let wire = berth_bus::Error::from(err);
            assert_eq!(wire.code, code);
        }
        let wire = berth_bus::Error::from(ContentError::Io {
            op: "rename",
            path: "/x".into(),
            source: io::Error::other("disk full"),
        });
        assert_eq!(wire.message, "failed to rename /x: disk full");
    }
}
