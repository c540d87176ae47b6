//! The metadata service's errors, and the one map from them to wire codes.
//!
//! Every failure of the store, the handlers and the event consumer is a
//! [`MetadataError`]. Messages are lowercase and name the failing object;
//! causes hang on `#[source]` and are joined into the wire message once,
//! where the error becomes a reply ([`From<MetadataError>`] for
//! [`berth_bus::Error`]).

use std::fmt;
use std::sync::Arc;

use berth_bus::Code;

/// The kinds of record, as messages name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A namespace record.
    Namespace,
    /// A named image.
    Image,
    /// A container.
    Container,
    /// A lease.
    Lease,
    /// A task reservation.
    Task,
    /// A node of the registry.
    Node,
    /// A tombstone left for a lost node.
    Tombstone,
}

impl Kind {
    /// The kind's name in messages and field paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "namespace",
            Kind::Image => "image",
            Kind::Container => "container",
            Kind::Lease => "lease",
            Kind::Task => "task",
            Kind::Node => "node",
            Kind::Tombstone => "tombstone",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A request field is malformed (`InvalidArgument`).
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What the value is, e.g. `container id`.
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field mask names a field the kind does not have (`InvalidArgument`).
    #[error("{kind} {id:?} has no field {field:?} to update")]
    UnknownField {
        /// The kind updated.
        kind: Kind,
        /// The record's id.
        id: String,
        /// The path as given.
        field: String,
    },
    /// An update would change a field that never changes (`InvalidArgument`).
    #[error("field {field} of {kind} {id:?} cannot change")]
    Immutable {
        /// The kind updated.
        kind: Kind,
        /// The record's id.
        id: String,
        /// The field.
        field: &'static str,
    },
    /// A label selector term does not parse (`InvalidArgument`).
    #[error("invalid label selector term {term:?}: {reason}")]
    Selector {
        /// The term as given.
        term: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A namespace op names another namespace than its subject's
    /// (`InvalidArgument`).
    #[error("namespace {named:?} cannot be reached through namespace {subject:?}")]
    OtherNamespace {
        /// The subject's namespace.
        subject: String,
        /// The namespace the request named.
        named: String,
    },
    /// No record has this id in the namespace (`NotFound`).
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
    },
    /// The id is taken (`AlreadyExists`).
    #[error("{kind} {id:?} already exists")]
    AlreadyExists {
        /// The kind.
        kind: Kind,
        /// The id.
        id: String,
    },
    /// The container has a task, so it cannot be deleted, or reserved again
    /// (`FailedPrecondition`).
    #[error("container {container_id:?} has a task ({status} on node {node:?})")]
    HasTask {
        /// The container.
        container_id: String,
        /// The task's state.
        status: &'static str,
        /// The node the task is reserved on.
        node: String,
    },
    /// A task was asked for on another node than the container's snapshot
    /// (`FailedPrecondition`).
    #[error("container {container_id:?} lives on node {node:?}, not {asked:?}")]
    OtherNode {
        /// The container.
        container_id: String,
        /// The container's node.
        node: String,
        /// The node asked for.
        asked: String,
    },
    /// A release names another reservation than the stored one
    /// (`FailedPrecondition`).
    #[error("task of container {container_id:?} is generation {stored}, not {asked}")]
    Generation {
        /// The container.
        container_id: String,
        /// The stored reservation's generation.
        stored: u64,
        /// The generation asked for.
        asked: u64,
    },
    /// A task was to be abandoned on a node that is not lost: its task
    /// service still decides (`FailedPrecondition`).
    #[error("node {node:?} of container {container_id:?} is {state}, not lost: remove the task on the node")]
    NodeNotLost {
        /// The container.
        container_id: String,
        /// The task's node.
        node: String,
        /// The node's state in the registry.
        state: &'static str,
    },
    /// The namespace still holds records (`FailedPrecondition`).
    #[error("namespace {namespace:?} still holds {what}")]
    NamespaceNotEmpty {
        /// The namespace.
        namespace: String,
        /// What it holds, e.g. `images, containers`.
        what: String,
    },
    /// A bus facility (a token check, the outbox, the request log, a call to
    /// another service) refused or failed: its own code.
    #[error(transparent)]
    Bus(#[from] berth_bus::Error),
    /// The database was written by a newer layout (`Internal`).
    #[error("metadata database has schema version {found}, this build reads {expected} or older")]
    SchemaVersion {
        /// The stored version.
        found: u32,
        /// The version this build writes.
        expected: u32,
    },
    /// The database failed (`Internal`).
    #[error("metadata database failed")]
    Database(#[from] heed::Error),
    /// The transaction holding this change did not commit (`Internal`).
    #[error("metadata transaction did not commit")]
    Commit(#[source] Arc<heed::Error>),
    /// A stored record cannot be read (`Internal`).
    #[error("stored {kind} {key:?} is unreadable")]
    Corrupt {
        /// The kind.
        kind: &'static str,
        /// Its key.
        key: String,
        /// The decoder's answer.
        #[source]
        source: prost::DecodeError,
    },
    /// A batch of task events follows another cursor than the stored one:
    /// a batch before it did not commit (`Internal`). The consumer starts
    /// again from the stored cursor.
    #[error("task event cursor is at sequence {stored}, the batch follows {expected}")]
    CursorMoved {
        /// The sequence the batch follows.
        expected: u64,
        /// The stored sequence.
        stored: u64,
    },
    /// A value of the `meta` table has the wrong size (`Internal`).
    #[error("metadata database entry meta/{key} is malformed")]
    Meta {
        /// The entry's key.
        key: &'static str,
    },
    /// The writer thread is gone, or a change panicked on it (`Internal`).
    #[error("metadata writer {0}")]
    Writer(&'static str),
}

impl MetadataError {
    /// The wire code of this error.
    pub fn code(&self) -> Code {
        use MetadataError::*;
        match self {
            Invalid { .. }
            | UnknownField { .. }
            | Immutable { .. }
            | Selector { .. }
            | OtherNamespace { .. } => Code::InvalidArgument,
            NotFound { .. } => Code::NotFound,
            AlreadyExists { .. } => Code::AlreadyExists,
            HasTask { .. }
            | OtherNode { .. }
            | Generation { .. }
            | NodeNotLost { .. }
            | NamespaceNotEmpty { .. } => Code::FailedPrecondition,
            Bus(source) => source.code,
            SchemaVersion { .. }
            | Database(_)
            | Commit(_)
            | Corrupt { .. }
            | CursorMoved { .. }
            | Meta { .. }
            | Writer(_) => Code::Internal,
        }
    }

    /// An [`MetadataError::Invalid`] for `value` of `what`.
    pub(crate) fn invalid(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        MetadataError::Invalid {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// A [`MetadataError::NotFound`].
    pub(crate) fn not_found(kind: Kind, id: impl Into<String>) -> Self {
        MetadataError::NotFound {
            kind,
            id: id.into(),
        }
    }

    /// A [`MetadataError::AlreadyExists`].
    pub(crate) fn exists(kind: Kind, id: impl Into<String>) -> Self {
        MetadataError::AlreadyExists {
            kind,
            id: id.into(),
        }
    }
}

impl From<MetadataError> for berth_bus::Error {
    fn from(err: MetadataError) -> Self {
        // The wire message is the error and its causes, each said once.
        berth_bus::Error::with_causes(err.code(), &err)
    }
}

/// A result of this crate.
pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_failure_class() {
        let cases = [
            (
                MetadataError::invalid("container id", "a/b", "bad"),
                Code::InvalidArgument,
            ),
            (MetadataError::not_found(Kind::Image, "x"), Code::NotFound),
            (MetadataError::exists(Kind::Lease, "l"), Code::AlreadyExists),
            (
                MetadataError::HasTask {
                    container_id: "c".into(),
                    status: "running",
                    node: "n".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                MetadataError::Bus(berth_bus::Error::unavailable("down")),
                Code::Unavailable,
            ),
            (MetadataError::Writer("stopped"), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn wire_messages_name_the_object_and_carry_the_cause_once() {
        let err = MetadataError::Commit(Arc::new(heed::Error::Io(std::io::Error::other("disk"))));
        let wire = berth_bus::Error::from(err);
        assert_eq!(wire.code, Code::Internal);
        assert_eq!(wire.message.matches("disk").count(), 1, "{}", wire.message);

        let wire = berth_bus::Error::from(MetadataError::not_found(Kind::Container, "c1"));
        assert_eq!(wire.message, "container \"c1\" not found");
    }
}
