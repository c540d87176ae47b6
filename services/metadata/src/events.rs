//! The topics this service publishes and the ones it reads.
//!
//! Every change queues its event in the outbox in the transaction that makes
//! it (payloads in `metadata.proto`); the task events come from the task
//! service and change only the state of a reservation.

/// A namespace record was made (by `namespaces.create` or its first object).
pub const NAMESPACES_CREATE: &str = "namespaces.create";
/// A namespace's labels changed.
pub const NAMESPACES_UPDATE: &str = "namespaces.update";
/// A namespace record was removed.
pub const NAMESPACES_DELETE: &str = "namespaces.delete";

/// An image name was recorded.
pub const IMAGES_CREATE: &str = "images.create";
/// An image record changed.
pub const IMAGES_UPDATE: &str = "images.update";
/// An image name was removed.
pub const IMAGES_DELETE: &str = "images.delete";

/// A container was recorded.
pub const CONTAINERS_CREATE: &str = "containers.create";
/// A container record changed.
pub const CONTAINERS_UPDATE: &str = "containers.update";
/// A container record was removed.
pub const CONTAINERS_DELETE: &str = "containers.delete";

/// A lease was taken.
pub const LEASES_CREATE: &str = "leases.create";
/// A lease's labels, expiry or resources changed.
pub const LEASES_UPDATE: &str = "leases.update";
/// A lease was given back.
pub const LEASES_DELETE: &str = "leases.delete";
/// A lease ended by its expiry and was removed.
pub const LEASES_EXPIRE: &str = "leases.expire";

/// A node is heard from again, or for the first time with tasks, or under a
/// new boot id (payload `NodeEvent`; in each namespace with a task on it).
pub const NODES_READY: &str = "nodes.ready";
/// A node stopped heartbeating: its tasks read as unknown (payload
/// `NodeEvent`; in each namespace with a task on it).
pub const NODES_LOST: &str = "nodes.lost";

/// The task events applied to task records (payload `task.TaskEvent`).
pub mod task {
    /// The init process exists (`runc create`).
    pub const CREATE: &str = "tasks.create";
    /// The init process runs.
    pub const START: &str = "tasks.start";
    /// The init process exited.
    pub const EXIT: &str = "tasks.exit";
    /// The task was deleted on its node (its reservation released).
    pub const DELETE: &str = "tasks.delete";
    /// The task was frozen.
    pub const PAUSED: &str = "tasks.paused";
    /// The task was thawed.
    pub const RESUMED: &str = "tasks.resumed";
    /// The OOM killer hit the task.
    pub const OOM: &str = "tasks.oom";
}

/// The stream filter of every task event of every namespace.
pub fn task_filter() -> String {
    format!(
        "{}.*.{}.tasks.>",
        berth_bus::subject::PREFIX,
        berth_bus::subject::EVENTS
    )
}
