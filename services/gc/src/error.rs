//! The gc service's errors and their wire codes.

use berth_bus::Code;

/// Why a gc run failed as a whole.
///
/// Failures confined to one namespace or one node during the sweep are not
/// errors of the run: they are logged, that part is skipped, and the next
/// run catches up.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// metadata did not hand out an epoch and the roots.
    #[error("gc mark in metadata failed")]
    Mark(#[source] berth_bus::Error),
    /// A manifest, index or config could not be read, so the live set of its
    /// namespace is unknown and nothing may be swept.
    #[error("blob {digest} of namespace {namespace} could not be read")]
    Read {
        /// The namespace marked.
        namespace: String,
        /// The blob.
        digest: String,
        /// What content answered.
        #[source]
        source: berth_bus::Error,
    },
    /// The event stream could not be reached.
    #[error("event stream not reachable")]
    Stream(#[source] berth_bus::Error),
}

impl GcError {
    /// The wire code: that of the service that failed.
    pub fn code(&self) -> Code {
        match self {
            GcError::Mark(source) | GcError::Stream(source) => source.code,
            GcError::Read { source, .. } => source.code,
        }
    }

    fn source_message(&self) -> &str {
        match self {
            GcError::Mark(source) | GcError::Stream(source) => &source.message,
            GcError::Read { source, .. } => &source.message,
        }
    }
}

impl From<GcError> for berth_bus::Error {
    /// The wire form carries the cause after the error, since a reply has
    /// only one message.
    fn from(err: GcError) -> Self {
        berth_bus::Error::new(err.code(), format!("{err}: {}", err.source_message()))
    }
}
