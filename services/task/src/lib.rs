//! berth's task service: the node agent that turns a container record into a
//! running process through runc, watches it through a per-container shim,
//! and publishes every lifecycle event.
//!
//! Subjects: `berth.v1.<namespace>.task.<node>.<op>`; the messages are in
//! `proto/berth/v1/task.proto`. The records are drawn in [`store`].
//!
//! - [`spec`] builds a bundle's `config.json` from an image config and the
//!   caller's overrides;
//! - [`shim`] is the synchronous shim program (the `berth-shim` binary) and
//!   its wire format; [`shim_client`] is the async side that spawns, drives
//!   and re-adopts shims;
//! - [`handlers`] holds one function per op; [`monitor`] waits for each
//!   task's exit, records it with its `tasks.exit` event, and tells the shim
//!   once metadata has applied it; [`recover`] re-adopts tasks at start-up;
//! - [`heartbeat`] announces the node in the key-value bucket `berth_nodes`
//!   every interval, and [`reconcile`] applies the tombstones metadata kept
//!   for it while it was lost.
//!
//! A task's life: `create` reserves the task in metadata (container, node,
//! generation), mounts the rootfs from the snapshot's mounts, writes the
//! bundle and starts the shim, which runs `runc create`; `start` runs the
//! process; the exit is recorded; `delete` removes the runc state, unmounts,
//! removes the bundle and releases the reservation.

pub mod cgroup;
pub mod error;
mod handlers;
pub mod heartbeat;
pub mod monitor;
pub mod reconcile;
pub mod recover;
pub use berth_shim as shim;
pub mod shim_client;
pub mod spec;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use berth_bus::{api, Client, Service};

use store::Store;

/// What the task service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the task database lives (`<berth root>/task`).
    pub root: PathBuf,
    /// Where bundles, shim state and sockets live (`<berth state>/task`,
    /// e.g. `/run/berth/task`); rootfs mounts are made here.
    pub state: PathBuf,
    /// This node's id (a subject token).
    pub node: String,
    /// The `berth-shim` binary; default: next to the running executable.
    pub shim: Option<PathBuf>,
    /// The runc binary; default: `runc` in PATH.
    pub runc: Option<PathBuf>,
    /// Namespaces whose containers keep the default confinement: a
    /// container there may not be privileged, share the host's network,
    /// bind-mount host paths, add capabilities or loosen seccomp
    /// (`PermissionDenied`). Tenants' namespaces belong here, since any of
    /// those would give a tenant the node. Empty by default.
    pub confined_namespaces: Vec<String>,
    /// How often the node's heartbeat is put into the bucket `berth_nodes`
    /// (default 2 s; from 100 ms to 10 s, a third of the bucket's TTL).
    /// The node is lost when three intervals pass without one.
    pub heartbeat_interval: Duration,
}

impl Config {
    /// `InvalidArgument` for a heartbeat interval outside 100 ms to
    /// [`berth_bus::nodes::MAX_INTERVAL`].
    pub fn check(&self) -> berth_bus::Result<()> {
        berth_bus::subject::check_token("node id", &self.node)?;
        let bounds = Duration::from_millis(100)..=berth_bus::nodes::MAX_INTERVAL;
        if !bounds.contains(&self.heartbeat_interval) {
            return Err(berth_bus::Error::invalid(format!(
                "heartbeat interval {:?} is not between {:?} and {:?}",
                self.heartbeat_interval,
                bounds.start(),
                bounds.end()
            )));
        }
        Ok(())
    }
}

/// Where one task's files are.
#[derive(Debug, Clone)]
pub struct Paths {
    state: PathBuf,
}

impl Paths {
    /// The OCI bundle: `config.json`, `rootfs/` (the mount point) and the
    /// files bind-mounted over `/etc`.
    pub fn bundle(&self, namespace: &str, container_id: &str) -> PathBuf {
        self.state
            .join("bundles")
            .join(namespace)
            .join(container_id)
    }

    /// The shim's state directory: logs, exit record, runc's state.
    pub fn shim_state(&self, namespace: &str, container_id: &str) -> PathBuf {
        self.state.join("shims").join(namespace).join(container_id)
    }

    /// The shim's socket. Named by a hash, since a unix socket path holds
    /// at most 107 bytes and container ids may be 128 long.
    pub fn socket(&self, namespace: &str, container_id: &str) -> PathBuf {
        let hash = Sha256::digest(format!("{namespace}/{container_id}").as_bytes());
        let name = format!("{}.sock", &hex::encode(hash)[..24]);
        self.state.join("sockets").join(name)
    }
}

/// The running service's state, shared by its handlers and monitors.
pub struct TaskService {
    /// The task records.
    pub store: Store,
    client: Client,
    node: String,
    boot_id: String,
    paths: Paths,
    shim: PathBuf,
    runc: Option<PathBuf>,
    confined: Vec<String>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutdown: CancellationToken,
}

impl TaskService {
    /// The lock of one container's task, held by every step that changes
    /// its record, so a start and the exit that follows it are recorded in
    /// that order.
    fn lock(&self, namespace: &str, container_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks
            .entry(format!("{namespace}/{container_id}"))
            .or_default()
            .clone()
    }

    fn metadata(&self, namespace: &str) -> api::Metadata {
        api::Metadata {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        }
    }

    fn content(&self, namespace: &str) -> api::Content {
        api::Content {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        }
    }

    fn snapshot(&self, namespace: &str) -> api::Snapshot {
        api::Snapshot {
            client: self.client.clone(),
            namespace: namespace.to_string(),
            node: self.node.clone(),
        }
    }

    /// The files of tasks on this node.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The boot id this service runs under.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }
}

/// This machine's boot id, which changes at every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The `berth-shim` next to the running executable, else `berth-shim` in PATH.
fn default_shim() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("berth-shim")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("berth-shim"))
}

/// Serves the task service on `nats` until `shutdown` is cancelled. Shims
/// and their containers keep running after it stops, and the next start
/// re-adopts them.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> berth_bus::Result<()> {
    config.check()?;
    let store = Store::open(&config.root.join("db"), &config.node)?;
    for dir in ["bundles", "shims", "sockets"] {
        std::fs::create_dir_all(config.state.join(dir))?;
    }
    let svc = Arc::new(TaskService {
        store,
        client: Client::new(nats.clone(), berth_bus::client::DEFAULT_TIMEOUT),
        node: config.node.clone(),
        boot_id: boot_id(),
        paths: Paths {
            state: config.state.clone(),
        },
        shim: config.shim.clone().unwrap_or_else(default_shim),
        runc: config.runc.clone(),
        confined: config.confined_namespaces.clone(),
        locks: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
    });

    let js = async_nats::jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;
    let outbox = svc.store.outbox.clone();
    let publisher = tokio::spawn(outbox.clone().run_publisher(
        svc.store.env.clone(),
        js,
        shutdown.clone(),
    ));

    // Exits that happened while the service was down are recorded before
    // the first request is served.
    recover::recover(&svc).await?;

    use handlers as h;
    let serving = Service::new("task", env!("CARGO_PKG_VERSION"), svc.clone())
        .node(&config.node)
        .wake_on_reply(outbox.wake())
        .op("create", h::create)
        .op("start", h::start)
        .op("kill", h::kill)
        .op("delete", h::delete)
        .op("state", h::state)
        .op("list", h::list)
        .op("logs", h::logs)
        .op("stop", h::stop)
        .op("pause", h::pause)
        .op("resume", h::resume)
        .op("exec", h::exec)
        .op("ps", h::ps)
        .op("metrics", h::metrics)
        .op("update", h::update)
        .op("stdin", h::stdin)
        .op("resize", h::resize)
        .serve(nats)
        .await?;

    // Served: the node announces itself, and applies what was decided for
    // it while it was away.
    let beating = tokio::spawn(heartbeat::run(
        svc.clone(),
        config.heartbeat_interval,
        shutdown.clone(),
    ));
    let reconciling = tokio::spawn(reconcile::run(svc.clone(), shutdown.clone()));
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = tokio::join!(publisher, beating, reconciling);
    Ok(())
}

/// Runs `work` on a blocking thread: file reads and store commits, which
/// would hold up a runtime worker and every task queued on it.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> berth_bus::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| berth_bus::Error::internal(err.to_string()))
}

/// Removes `path` and everything under it; a missing path is fine.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}
