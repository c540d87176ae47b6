//! The task service's errors and their wire codes.

use berth_bus::Code;

use crate::shim_client::ShimClientError;
use crate::spec::SpecError;

/// Why a task operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The container has no task on this node.
    #[error("container {container_id} has no task on this node")]
    NoTask {
        /// The container.
        container_id: String,
    },
    /// The task's state does not allow the operation.
    #[error("task of container {container_id} is {status}: {reason}")]
    State {
        /// The container.
        container_id: String,
        /// Its status now.
        status: &'static str,
        /// What the operation needs.
        reason: &'static str,
    },
    /// The container lives on another node.
    #[error("container {container_id} is on node {node}, not this one")]
    OtherNode {
        /// The container.
        container_id: String,
        /// The node its snapshot is on.
        node: String,
    },
    /// The container record or the image config cannot make a runtime spec.
    #[error("cannot build the runtime spec of container {container_id}")]
    Spec {
        /// The container.
        container_id: String,
        /// Why.
        #[source]
        source: SpecError,
    },
    /// The image config blob is not a JSON image config.
    #[error("image config {digest} of container {container_id} is malformed")]
    ImageConfig {
        /// The container.
        container_id: String,
        /// The config blob.
        digest: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The rootfs could not be mounted or unmounted.
    #[error("cannot mount the rootfs of container {container_id}")]
    Mount {
        /// The container.
        container_id: String,
        /// Why.
        #[source]
        source: berth_mount::MountError,
    },
    /// runc refused to create or start the container (say, a missing
    /// executable): the caller's input is at fault.
    #[error("runc refused container {container_id}: {message}")]
    Runc {
        /// The container.
        container_id: String,
        /// runc's own words.
        message: String,
    },
    /// The shim could not be reached or failed.
    #[error("shim of container {container_id} failed")]
    Shim {
        /// The container.
        container_id: String,
        /// Why.
        #[source]
        source: ShimClientError,
    },
    /// A bundle or state file could not be written or removed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The container asks for more than its namespace's confinement allows.
    #[error("container {container_id} may not {what}: namespace {namespace} keeps the default confinement on this node")]
    Confined {
        /// The container.
        container_id: String,
        /// Its namespace.
        namespace: String,
        /// What it asked for, e.g. `run privileged`.
        what: &'static str,
    },
    /// Another service (metadata, content, snapshot) or the store failed.
    #[error(transparent)]
    Bus(#[from] berth_bus::Error),
}

impl TaskError {
    /// The wire code of this error.
    pub fn code(&self) -> Code {
        match self {
            TaskError::NoTask { .. } => Code::NotFound,
            TaskError::State { .. } | TaskError::OtherNode { .. } => Code::FailedPrecondition,
            TaskError::Spec { source, .. } => match source {
                SpecError::Io { .. } | SpecError::Build(_) => Code::Internal,
                _ => Code::InvalidArgument,
            },
            TaskError::ImageConfig { .. } => Code::InvalidArgument,
            TaskError::Runc { .. } => Code::InvalidArgument,
            TaskError::Mount { .. } | TaskError::Io { .. } => Code::Internal,
            TaskError::Shim { .. } => Code::Unavailable,
            TaskError::Confined { .. } => Code::PermissionDenied,
            TaskError::Bus(err) => err.code,
        }
    }
}

impl From<TaskError> for berth_bus::Error {
    fn from(err: TaskError) -> Self {
        if let TaskError::Bus(err) = err {
            return err;
        }
        // The wire message carries the causes too: the caller has nothing
        // else to read them from.
        berth_bus::Error::with_causes(err.code(), &err)
    }
}

impl From<heed::Error> for TaskError {
    fn from(err: heed::Error) -> Self {
        TaskError::Bus(err.into())
    }
}

/// A result of the task service.
pub type Result<T, E = TaskError> = std::result::Result<T, E>;
