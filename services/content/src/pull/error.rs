//! Why a pull failed, and the wire code of each failure.
//!
//! A registry's answers fall into the same classes as the service's own:
//! a refusal of the caller's credentials is `PermissionDenied`, a tag or
//! blob the registry lacks is `NotFound`, a registry that cannot be
//! reached or breaks off is `Unavailable` (pull again to resume), and
//! everything the registry sends that berth refuses (a document over its
//! cap, an unknown media type, bytes that do not match their digest) is
//! `InvalidArgument`.

use berth_bus::Code;
use berth_oci::{ImageError, ReferenceError};

use crate::error::ContentError;

/// A cause from the HTTP client, whatever its type.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference is not a docker-style image name (`InvalidArgument`).
    #[error("invalid image reference {reference:?}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        #[source]
        source: ReferenceError,
    },
    /// The platform is not `os/architecture[/variant]` (`InvalidArgument`).
    #[error("invalid platform {platform:?}: expected os/architecture[/variant]")]
    InvalidPlatform {
        /// The platform as given.
        platform: String,
    },
    /// A pull of this id runs with another request (`InvalidArgument`).
    #[error("pull {pull_id:?} is running with another request: use another pull id")]
    PullIdReused {
        /// The pull id.
        pull_id: String,
    },
    /// The registry wants credentials, or refused those given
    /// (`PermissionDenied`).
    #[error("registry {registry} {} to pull {repository}", if *.given {
        "refused the credentials given"
    } else {
        "asks for credentials"
    })]
    Unauthorized {
        /// The registry's host.
        registry: String,
        /// The repository.
        repository: String,
        /// Whether credentials were given.
        given: bool,
    },
    /// The registry has no such tag or manifest (`NotFound`).
    #[error("image {reference} not found in its registry")]
    ManifestNotFound {
        /// The reference, normalized.
        reference: String,
    },
    /// The registry lacks a blob its manifest names (`NotFound`).
    #[error("blob {digest} not found in registry {registry} (repository {repository})")]
    BlobNotFound {
        /// The blob.
        digest: String,
        /// The registry's host.
        registry: String,
        /// The repository.
        repository: String,
    },
    /// The registry cannot be reached, or answered with a server error
    /// (`Unavailable`).
    #[error("registry {registry} cannot be reached")]
    Unreachable {
        /// The registry's host.
        registry: String,
        /// The HTTP client's answer.
        #[source]
        source: Cause,
    },
    /// The registry broke off while sending a blob; what came is kept in
    /// the blob's ingest (`Unavailable`).
    #[error(
        "fetching blob {digest} from registry {registry} broke off at byte {offset} of {size} \
         (pull again to go on from there)"
    )]
    Interrupted {
        /// The blob.
        digest: String,
        /// The registry's host.
        registry: String,
        /// Bytes of the blob held.
        offset: u64,
        /// The blob's size.
        size: u64,
        /// The HTTP client's answer, if it gave one.
        #[source]
        source: Option<Cause>,
    },
    /// The registry answered with a status the distribution protocol does
    /// not allow there (`InvalidArgument`; `Unavailable` for 429 and 5xx).
    #[error("registry {registry} answered {what} with HTTP {status}: {message}")]
    Refused {
        /// The registry's host.
        registry: String,
        /// What was asked, e.g. `manifest latest`.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body, or the client's words.
        message: String,
    },
    /// The registry's answer breaks the distribution protocol in another
    /// way (`InvalidArgument`).
    #[error("registry {registry} sent an invalid answer for {what}: {reason}")]
    Protocol {
        /// The registry's host.
        registry: String,
        /// What was asked.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest or index is over its size cap; the response was not read
    /// further (`InvalidArgument`).
    #[error("manifest {what} of registry {registry} is {}, over the {limit} byte limit", match .size {
        Some(size) => format!("{size} bytes"),
        None => "larger".to_string(),
    })]
    ManifestTooLarge {
        /// The registry's host.
        registry: String,
        /// The tag or digest asked for.
        what: String,
        /// Its size, when the registry said.
        size: Option<u64>,
        /// The cap.
        limit: u64,
    },
    /// A manifest fetched by digest hashes to another one
    /// (`InvalidArgument`).
    #[error("registry {registry} answered {reference} with a manifest whose digest is {actual}")]
    ManifestDigest {
        /// The registry's host.
        registry: String,
        /// The reference pinned by digest.
        reference: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// An index, manifest or config of the image was refused
    /// (`InvalidArgument`).
    #[error("image {reference} refused")]
    Image {
        /// The reference, normalized.
        reference: String,
        /// The check that failed.
        #[source]
        source: ImageError,
    },
    /// A blob could not be committed: its bytes do not match its
    /// descriptor, or the store failed (the store's code).
    #[error("blob {digest} refused")]
    Blob {
        /// The blob.
        digest: String,
        /// The store's answer.
        #[source]
        source: Box<ContentError>,
    },
    /// The store failed (its code).
    #[error(transparent)]
    Store(Box<ContentError>),
    /// A pull that ended with an error, as the request sees it after it
    /// joined (that error's code).
    #[error("{message}")]
    Ended {
        /// The code of the first answer.
        code: Code,
        /// Its message.
        message: String,
    },
    /// The service stopped while the pull ran (`Unavailable`).
    #[error("the content service stopped during the pull (pull again to go on)")]
    Stopped,
}

impl PullError {
    /// The wire code of this error.
    pub fn code(&self) -> Code {
        use PullError::*;
        match self {
            InvalidReference { .. }
            | InvalidPlatform { .. }
            | PullIdReused { .. }
            | Protocol { .. }
            | ManifestTooLarge { .. }
            | ManifestDigest { .. }
            | Image { .. } => Code::InvalidArgument,
            Unauthorized { .. } => Code::PermissionDenied,
            ManifestNotFound { .. } | BlobNotFound { .. } => Code::NotFound,
            Unreachable { .. } | Interrupted { .. } | Stopped => Code::Unavailable,
            Refused { status, .. } if *status == 429 || *status >= 500 => Code::Unavailable,
            Refused { .. } => Code::InvalidArgument,
            Blob { source, .. } | Store(source) => source.code(),
            Ended { code, .. } => *code,
        }
    }

    /// True when pulling again may succeed without anything changing
    /// (the registry was away): what the pull fetched is worth keeping.
    pub fn is_transient(&self) -> bool {
        matches!(self.code(), Code::Unavailable | Code::DeadlineExceeded)
    }
}

impl From<ContentError> for PullError {
    fn from(err: ContentError) -> Self {
        match err {
            ContentError::Pull(pull) => pull,
            other => PullError::Store(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each class of registry failure crosses the wire with its code.
    #[test]
    fn codes_follow_the_failure_class() {
        let refused = |status| PullError::Refused {
            registry: "r".into(),
            what: "manifest latest".into(),
            status,
            message: String::new(),
        };
        let cases = [
            (
                PullError::Unauthorized {
                    registry: "r".into(),
                    repository: "busybox".into(),
                    given: false,
                },
                Code::PermissionDenied,
            ),
            (
                PullError::ManifestNotFound {
                    reference: "r/busybox:nope".into(),
                },
                Code::NotFound,
            ),
            (refused(400), Code::InvalidArgument),
            (refused(503), Code::Unavailable),
            (refused(429), Code::Unavailable),
            (
                PullError::Blob {
                    digest: "d".into(),
                    source: Box::new(ContentError::DigestMismatch {
                        digest: "d".into(),
                        actual: "e".into(),
                    }),
                },
                Code::InvalidArgument,
            ),
            (PullError::Stopped, Code::Unavailable),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
        let asked = PullError::Unauthorized {
            registry: "127.0.0.1:5000".into(),
            repository: "busybox".into(),
            given: false,
        };
        assert_eq!(
            asked.to_string(),
            "registry 127.0.0.1:5000 asks for credentials to pull busybox"
        );
    }
}
