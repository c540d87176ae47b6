//! The task records of one node, in LMDB.
//!
//! ```text
//! ROOT/db/  LMDB, schema version 1:
//!   tasks  "<namespace>\0<container_id>" -> TaskRecord (json)
//!   meta   "schema" -> u32
//!   outbox, outbox_meta, requests           (berth-bus)
//! ```
//!
//! A record is written once the shim serves (`create`), and changed with
//! the event that announces the change in the same transaction: `tasks.start`
//! with the running status, `tasks.exit` with the exit. It is removed with
//! `tasks.delete`. Bundles and shim state live in the state directory, named
//! by namespace and container id (see [`crate::Paths`]).

use std::path::PathBuf;

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use berth_bus::events::Outbox;
use berth_bus::idempotency::RequestLog;
use berth_bus::store::{Durability, Env};
use berth_bus::{Error, Result};

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What a task is doing, as this node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `runc create` done; the process waits for `start`.
    Created,
    /// Started and not exited.
    Running,
    /// Frozen by `pause`.
    Paused,
    /// The init exited; see the record's exit.
    Stopped,
    /// The shim is gone and runc cannot say what became of the process.
    Unknown,
}

impl Status {
    /// The name the wire and people use.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Unknown => "unknown",
        }
    }
}

/// How the init exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code; 128+N when killed by signal N; 255 when unknown.
    pub status: u32,
    /// When it was reaped, nanoseconds since the epoch.
    pub exited_at: i64,
}

/// One task on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The reservation's generation in metadata; every event carries it.
    pub generation: u64,
    /// The node's boot id when the task was created.
    pub boot_id: String,
    /// The status.
    pub status: Status,
    /// The init's pid on the node.
    pub pid: u32,
    /// The init's start time (clock ticks since boot), against pid reuse.
    pub pid_start_time: u64,
    /// The exit, once known.
    pub exit: Option<Exit>,
    /// The shim's socket.
    pub socket: PathBuf,
    /// True once metadata applied the exit and the shim was told so.
    #[serde(default)]
    pub exit_acked: bool,
    /// Where the task's cgroup is in each hierarchy, read from
    /// `/proc/<pid>/cgroup` at create.
    #[serde(default)]
    pub cgroups: crate::cgroup::Paths,
    /// True when the OOM killer killed a process of the task.
    #[serde(default)]
    pub oom_killed: bool,
    /// The task's exec processes by id.
    #[serde(default)]
    pub execs: std::collections::BTreeMap<String, ExecRecord>,
    /// The image the container record named at create (empty in records
    /// written before it was kept).
    #[serde(default)]
    pub image: String,
}

/// One exec process of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// Its pid on the node.
    pub pid: u32,
    /// Its exit, once known.
    pub exit: Option<Exit>,
}

/// The task store of one node.
pub struct Store {
    /// The environment.
    pub env: Env,
    tasks: Database<Str, RawBytes>,
    /// Events waiting to be published.
    pub outbox: Outbox,
    /// Outcomes of mutating requests.
    pub requests: RequestLog,
}

impl Store {
    /// Opens the store in `dir`, creating it, and checks its schema version.
    pub fn open(dir: &std::path::Path, node: &str) -> Result<Self> {
        // A node's tasks die with the machine, and a reboot voids their
        // records (they are reconciled by boot id), so a crash of the
        // machine may undo the last commit: one sync a commit, not two.
        let env = berth_bus::store::open_env_with(dir, 4, Durability::Process)?;
        let mut txn = env.write_txn()?;
        let tasks = env.create_database(&mut txn, Some("tasks"))?;
        let meta: Database<Str, RawBytes> = env.create_database(&mut txn, Some("meta"))?;
        match meta.get(&txn, "schema")? {
            None => meta.put(&mut txn, "schema", &SCHEMA_VERSION.to_be_bytes())?,
            Some(raw) if raw == SCHEMA_VERSION.to_be_bytes() => {}
            Some(raw) => {
                return Err(Error::internal(format!(
                    "task store schema {raw:?} is not version {SCHEMA_VERSION}"
                )))
            }
        }
        txn.commit()?;
        Ok(Store {
            outbox: Outbox::open(&env, "task", node)?,
            requests: RequestLog::open(&env)?,
            env,
            tasks,
        })
    }

    /// The record of a container's task, if any.
    pub fn get(
        &self,
        txn: &RoTxn,
        namespace: &str,
        container_id: &str,
    ) -> Result<Option<TaskRecord>> {
        match self.tasks.get(txn, &key(namespace, container_id))? {
            Some(raw) => Ok(Some(decode(raw)?)),
            None => Ok(None),
        }
    }

    /// Writes a record.
    pub fn put(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        container_id: &str,
        record: &TaskRecord,
    ) -> Result<()> {
        let raw = serde_json::to_vec(record).map_err(|err| Error::internal(err.to_string()))?;
        self.tasks.put(txn, &key(namespace, container_id), &raw)?;
        Ok(())
    }

    /// Removes a record.
    pub fn delete(&self, txn: &mut RwTxn, namespace: &str, container_id: &str) -> Result<()> {
        self.tasks.delete(txn, &key(namespace, container_id))?;
        Ok(())
    }

    /// Every record of a namespace, by container id.
    pub fn list(&self, txn: &RoTxn, namespace: &str) -> Result<Vec<(String, TaskRecord)>> {
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.tasks.prefix_iter(txn, &prefix)? {
            let (key, raw) = item?;
            out.push((key[prefix.len()..].to_string(), decode(raw)?));
        }
        Ok(out)
    }

    /// Every record of every namespace, as (namespace, container id, record).
    pub fn all(&self, txn: &RoTxn) -> Result<Vec<(String, String, TaskRecord)>> {
        let mut out = Vec::new();
        for item in self.tasks.iter(txn)? {
            let (key, raw) = item?;
            let (namespace, container_id) = key.split_once('\0').unwrap_or((key, ""));
            out.push((
                namespace.to_string(),
                container_id.to_string(),
                decode(raw)?,
            ));
        }
        Ok(out)
    }
}

fn key(namespace: &str, container_id: &str) -> String {
    format!("{namespace}\0{container_id}")
}

fn decode(raw: &[u8]) -> Result<TaskRecord> {
    serde_json::from_slice(raw).map_err(|err| Error::internal(format!("stored task record: {err}")))
}
