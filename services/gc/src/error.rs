//! The gc service's errors and their wire codes.

use berth_bus::Code;

/// Why a gc run or an explanation failed as a whole.
///
/// Failures confined to one namespace or one node during the sweep are not
/// errors of the run: they are logged, that part is skipped, and the next
/// run catches up.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// A request gc refuses: an empty or malformed field.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What it held.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
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
    /// A node's snapshot service did not list the namespace's snapshots.
    #[error("snapshots of namespace {namespace} on node {node} could not be listed")]
    Node {
        /// The namespace.
        namespace: String,
        /// The node.
        node: String,
        /// What the node answered.
        #[source]
        source: berth_bus::Error,
    },
    /// The event stream could not be reached.
    #[error("event stream not reachable")]
    Stream(#[source] berth_bus::Error),
}

impl GcError {
    /// The wire code: `InvalidArgument` for a refused request, else that of
    /// the service that failed.
    pub fn code(&self) -> Code {
        match self.cause() {
            Some(source) => source.code,
            None => Code::InvalidArgument,
        }
    }

    /// The other service's error behind this one, if any.
    fn cause(&self) -> Option<&berth_bus::Error> {
        match self {
            GcError::Invalid { .. } => None,
            GcError::Mark(source) | GcError::Stream(source) => Some(source),
            GcError::Read { source, .. } | GcError::Node { source, .. } => Some(source),
        }
    }
}

impl From<GcError> for berth_bus::Error {
    /// The wire form carries the cause after the error, since a reply has
    /// only one message.
    fn from(err: GcError) -> Self {
        let message = match err.cause() {
            Some(source) => format!("{err}: {}", source.message),
            None => err.to_string(),
        };
        berth_bus::Error::new(err.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused request is `InvalidArgument` and says what was wrong; a
    /// failure of another service keeps its code and adds its message.
    #[test]
    fn codes_and_messages() {
        let invalid = GcError::Invalid {
            field: "object",
            value: String::new(),
            reason: "name a blob digest or a snapshot key".into(),
        };
        let wire = berth_bus::Error::from(invalid);
        assert_eq!(wire.code, Code::InvalidArgument);
        assert_eq!(
            wire.message,
            "invalid object \"\": name a blob digest or a snapshot key"
        );

        let node = GcError::Node {
            namespace: "default".into(),
            node: "node-1".into(),
            source: berth_bus::Error::unavailable("no responders"),
        };
        let wire = berth_bus::Error::from(node);
        assert_eq!(wire.code, Code::Unavailable);
        assert_eq!(
            wire.message,
            "snapshots of namespace default on node node-1 could not be listed: no responders"
        );
    }
}
