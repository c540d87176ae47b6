//! Snapshot records and directories: the node's snapshot store.
//!
//! ```text
//! ROOT/snapshots/<id>/fs     the snapshot's own layer (its overlay upper dir)
//! ROOT/snapshots/<id>/work   overlay's work dir
//! ROOT/db/                   LMDB, schema version 1:
//!   snapshots  "<namespace>\0<key>" -> Record (json)
//!   meta       "version"            -> u32 big-endian (1)
//!              "next_id"            -> u64 big-endian, the next directory id
//!   outbox, outbox_meta, requests   (berth-bus)
//! ```
//!
//! A snapshot is active (writable, made by prepare), a view (read-only) or
//! committed (immutable, a possible parent). Its directory is made before its
//! record and removed after it, so a committed record always has its bytes,
//! and a directory no record owns is garbage: a crash mid-way, or a removal
//! whose delete failed. The sweep of such directories holds the store's
//! directory lock exclusively, and everything that makes a directory holds it
//! shared until the record is written, so a snapshot being made is never
//! taken for garbage.
//!
//! Records are namespaced: the same chain ID in two namespaces is two
//! snapshots with two directories. Keys starting with [`EXTRACT_PREFIX`]
//! belong to layers being unpacked; no request may make them, prune skips
//! them, and [`Store::recover`] drops them at start-up (a crash mid-apply).
//! The transitions below take the caller's write transaction, so a request's
//! change, its event (outbox) and its request-log entry commit together.
//!
//! # Limitations
//!
//! Touched times are this node's wall clock, compared with gc's epoch taken
//! from the metadata host's clock: a node whose clock runs behind may lose a
//! snapshot reused just before a mark, unless a lease holds it. The store
//! knows nothing of mounts, so removing an active snapshot that a container
//! still has mounted deletes its upper directory under the mount; callers
//! unmount first (the task service does, on delete).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use berth_bus::events::Outbox;
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;

use crate::error::SnapshotError;
use crate::events;

mod sweep;

pub use sweep::Recovered;

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Keys of the temporary snapshots an unpack applies layers into.
pub const EXTRACT_PREFIX: &str = "extract-";

/// The deepest parent chain a snapshot may have: overlayfs stacks at most
/// 500 lower layers.
pub const MAX_DEPTH: usize = 500;

/// The longest key or name.
pub const MAX_KEY_LEN: usize = 256;

/// The most bytes one label (name and value) may hold.
pub const MAX_LABEL_LEN: usize = 4096;

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only, made by `view`.
    View,
    /// Writable, made by `prepare`.
    Active,
    /// Immutable, made by `commit`; may be a parent.
    Committed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::View => "a view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })
    }
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its directory under `snapshots/`.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The committed parent's key, empty for none.
    pub parent: String,
    /// Labels set by clients.
    pub labels: BTreeMap<String, String>,
    /// Made, nanoseconds since the Unix epoch.
    pub created: i64,
    /// Last changed, nanoseconds since the Unix epoch.
    pub updated: i64,
    /// Last made or reused, nanoseconds since the Unix epoch: gc keeps what
    /// was touched at or after its mark epoch.
    pub touched: i64,
    /// Bumped by every change; the generation of its events.
    #[serde(default)]
    pub generation: u64,
}

impl Record {
    /// A new snapshot in directory `id`, made and touched at `now`.
    pub fn new(
        id: u64,
        kind: Kind,
        parent: &str,
        labels: BTreeMap<String, String>,
        now: i64,
    ) -> Self {
        Record {
            id,
            kind,
            parent: parent.to_string(),
            labels,
            created: now,
            updated: now,
            touched: now,
            generation: 1,
        }
    }
}

/// Checks a key or name a client chose for a new snapshot: 1 to
/// [`MAX_KEY_LEN`] bytes, no `/`, no control characters, and not in the
/// reserved [`EXTRACT_PREFIX`].
pub fn check_key(key: &str) -> Result<()> {
    let invalid = |reason| {
        Err(SnapshotError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return invalid("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return invalid("longer than 256 bytes");
    }
    if key.contains('/') || key.chars().any(char::is_control) {
        return invalid("holds '/' or a control character");
    }
    if key.starts_with(EXTRACT_PREFIX) {
        return invalid("the prefix \"extract-\" is reserved for unpacking");
    }
    Ok(())
}

/// Checks labels: non-empty names, at most [`MAX_LABEL_LEN`] bytes each.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    for (name, value) in labels {
        if name.is_empty() || name.len() + value.len() > MAX_LABEL_LEN {
            return Err(SnapshotError::InvalidRequest {
                field: "labels",
                reason: format!("label {name:?} is empty or longer than {MAX_LABEL_LEN} bytes"),
            });
        }
    }
    Ok(())
}

/// The snapshot store of one node.
pub struct Store {
    root: PathBuf,
    /// The LMDB environment.
    pub env: Env,
    records: Database<Str, RawBytes>,
    meta: Database<Str, RawBytes>,
    /// Events waiting to be published.
    pub outbox: Outbox,
    /// Outcomes of mutating requests.
    pub requests: RequestLog,
    dirs: RwLock<()>,
}

impl Store {
    /// Opens (creating) the store at `root` for node `node`.
    ///
    /// Refuses a database written by a newer layout version (`Internal`).
    pub fn open(root: &Path, node: &str) -> Result<Self> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots)
            .map_err(SnapshotError::io("create directory", &snapshots))?;
        let env = berth_bus::store::open_env(&root.join("db"), 2)
            .map_err(SnapshotError::bus("snapshot database"))?;
        let mut txn = env.write_txn()?;
        let records = env.create_database(&mut txn, Some("snapshots"))?;
        let meta: Database<Str, RawBytes> = env.create_database(&mut txn, Some("meta"))?;
        match meta.get(&txn, "version")? {
            None => meta.put(&mut txn, "version", &SCHEMA_VERSION.to_be_bytes())?,
            Some(raw) if raw == SCHEMA_VERSION.to_be_bytes() => {}
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw).map_or_else(
                    |_| format!("{raw:?}"),
                    |v| u32::from_be_bytes(v).to_string(),
                );
                return Err(SnapshotError::SchemaVersion {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        txn.commit()?;
        let outbox = Outbox::open(&env, "snapshot", node).map_err(SnapshotError::bus("outbox"))?;
        let requests = RequestLog::open(&env).map_err(SnapshotError::bus("request log"))?;
        Ok(Store {
            root: root.to_path_buf(),
            env,
            records,
            meta,
            outbox,
            requests,
            dirs: RwLock::new(()),
        })
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The snapshot's own layer: the overlay upper directory.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// The snapshot's overlay work directory.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    /// The record of `key`, if any.
    pub fn get(&self, txn: &RoTxn, namespace: &str, key: &str) -> Result<Option<Record>> {
        match self.records.get(txn, &record_key(namespace, key))? {
            Some(raw) => Ok(Some(decode(key, raw)?)),
            None => Ok(None),
        }
    }

    /// The record of `key`; `NotFound` without one.
    pub fn require(&self, txn: &RoTxn, namespace: &str, key: &str) -> Result<Record> {
        self.get(txn, namespace, key)?
            .ok_or_else(|| SnapshotError::NotFound {
                key: key.to_string(),
            })
    }

    /// Every record of a namespace, sorted by key.
    pub fn list(&self, txn: &RoTxn, namespace: &str) -> Result<Vec<(String, Record)>> {
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.records.prefix_iter(txn, &prefix)? {
            let (raw_key, raw) = item?;
            let key = &raw_key[prefix.len()..];
            out.push((key.to_string(), decode(key, raw)?));
        }
        Ok(out)
    }

    /// The `fs` directories of committed `parent` and its ancestors,
    /// top-most first; none for an empty parent.
    ///
    /// `NotFound` for a missing parent, `FailedPrecondition` when it is not
    /// committed or its chain is deeper than [`MAX_DEPTH`].
    pub fn lowers(&self, txn: &RoTxn, namespace: &str, parent: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            if out.len() == MAX_DEPTH {
                return Err(SnapshotError::ChainTooDeep {
                    key: parent.to_string(),
                    max: MAX_DEPTH,
                });
            }
            let record = self.require(txn, namespace, &next)?;
            if record.kind != Kind::Committed {
                return Err(SnapshotError::WrongKind {
                    key: next,
                    kind: record.kind,
                    wanted: "committed",
                });
            }
            out.push(self.fs_dir(record.id));
            next = record.parent;
        }
        Ok(out)
    }

    /// A fresh directory id, in its own short transaction.
    pub fn alloc_id(&self) -> Result<u64> {
        let mut txn = self.env.write_txn()?;
        let next = match self.meta.get(&txn, "next_id")? {
            Some(raw) => <[u8; 8]>::try_from(raw).map_or(1, u64::from_be_bytes),
            None => 1,
        };
        self.meta
            .put(&mut txn, "next_id", &(next + 1).to_be_bytes())?;
        txn.commit()?;
        Ok(next)
    }

    /// Holds off the sweep of unowned directories while a snapshot's
    /// directory exists without its record.
    pub fn making(&self) -> RwLockReadGuard<'_, ()> {
        self.dirs
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the directories of snapshot `id` on `lowers` (see
    /// [`Store::lowers`]): an empty `fs` whose root takes the attributes of
    /// the top-most lower, and `work`. Call it holding [`Store::making`].
    pub fn make_dirs(&self, id: u64, lowers: &[PathBuf]) -> Result<()> {
        let work = self.work_dir(id);
        std::fs::create_dir_all(&work).map_err(SnapshotError::io("create directory", &work))?;
        let fs = self.fs_dir(id);
        std::fs::create_dir_all(&fs).map_err(SnapshotError::io("create directory", &fs))?;
        crate::apply::init_upper(&fs, lowers)
            .map_err(|source| SnapshotError::InitUpper { path: fs, source })
    }

    /// Deletes snapshot `id`'s directory after its record is gone. A
    /// failure is logged and left to the next prune, which removes
    /// directories no record owns.
    pub fn remove_dirs(&self, id: u64) {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(
                path = %dir.display(),
                error = %err,
                "snapshot directory not removed; prune will retry"
            ),
        }
    }

    /// Flushes the filesystem holding snapshot `id` to disk.
    pub fn syncfs(&self, id: u64) -> Result<()> {
        let fs = self.fs_dir(id);
        let file = std::fs::File::open(&fs).map_err(SnapshotError::io("open", &fs))?;
        nix::unistd::syncfs(&file).map_err(|errno| SnapshotError::Io {
            op: "syncfs",
            path: fs,
            source: errno.into(),
        })
    }

    /// Writes new snapshot `key`, whose directory exists: `key` must be free
    /// and the record's parent empty or committed.
    ///
    /// `AlreadyExists` when `key` is taken, `NotFound` without the parent,
    /// `FailedPrecondition` when the parent is not committed.
    pub fn insert(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        key: &str,
        record: &Record,
    ) -> Result<()> {
        if self.get(txn, namespace, key)?.is_some() {
            return Err(SnapshotError::AlreadyExists {
                key: key.to_string(),
            });
        }
        if !record.parent.is_empty() {
            let parent = self.require(txn, namespace, &record.parent)?;
            if parent.kind != Kind::Committed {
                return Err(SnapshotError::WrongKind {
                    key: record.parent.clone(),
                    kind: parent.kind,
                    wanted: "committed",
                });
            }
        }
        self.put(txn, namespace, key, record)
    }

    /// Turns active `key` into committed `name`, queueing `snapshot.commit`.
    /// The caller [`Store::syncfs`]es its bytes first.
    ///
    /// `AlreadyExists` when `name` is taken, `NotFound` without `key`,
    /// `FailedPrecondition` when `key` is not active.
    pub fn commit(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        now: i64,
    ) -> Result<Record> {
        if self.get(txn, namespace, name)?.is_some() {
            return Err(SnapshotError::AlreadyExists {
                key: name.to_string(),
            });
        }
        let mut record = self.require(txn, namespace, key)?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::WrongKind {
                key: key.to_string(),
                kind: record.kind,
                wanted: "active",
            });
        }
        record.kind = Kind::Committed;
        record.labels.extend(labels);
        record.updated = now;
        record.touched = now;
        record.generation += 1;
        self.records.delete(txn, &record_key(namespace, key))?;
        self.put(txn, namespace, name, &record)?;
        events::commit(&self.outbox, txn, namespace, name, &record)?;
        Ok(record)
    }

    /// Stamps committed `key` as reused now. False when there is no such
    /// snapshot; `FailedPrecondition` when it is not committed.
    pub fn touch(&self, txn: &mut RwTxn, namespace: &str, key: &str, now: i64) -> Result<bool> {
        let Some(mut record) = self.get(txn, namespace, key)? else {
            return Ok(false);
        };
        if record.kind != Kind::Committed {
            return Err(SnapshotError::WrongKind {
                key: key.to_string(),
                kind: record.kind,
                wanted: "committed",
            });
        }
        record.touched = now;
        self.put(txn, namespace, key, &record)?;
        Ok(true)
    }

    /// Replaces the labels of `key`; `NotFound` without it.
    pub fn set_labels(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        now: i64,
    ) -> Result<Record> {
        let mut record = self.require(txn, namespace, key)?;
        record.labels = labels;
        record.updated = now;
        record.generation += 1;
        self.put(txn, namespace, key, &record)?;
        Ok(record)
    }

    /// Drops the record of `key` and queues `snapshot.remove`; the caller
    /// deletes the directory after the commit ([`Store::remove_dirs`]).
    ///
    /// With `unless_touched_since` > 0 (gc's mark epoch) a snapshot touched
    /// at or after it, or with children, stays and the answer is `None`.
    /// Unconditionally, children are `FailedPrecondition`. `NotFound`
    /// without `key`; a layer being unpacked is `FailedPrecondition`.
    pub fn remove(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        key: &str,
        unless_touched_since: u64,
    ) -> Result<Option<Record>> {
        let record = self.require(txn, namespace, key)?;
        if key.starts_with(EXTRACT_PREFIX) {
            return Err(SnapshotError::Unpacking {
                key: key.to_string(),
            });
        }
        let conditional = unless_touched_since > 0;
        if conditional && record.touched >= unless_touched_since as i64 {
            return Ok(None);
        }
        if self
            .list(txn, namespace)?
            .iter()
            .any(|(_, r)| r.parent == key)
        {
            if conditional {
                return Ok(None);
            }
            return Err(SnapshotError::HasChildren {
                key: key.to_string(),
            });
        }
        self.drop_record(txn, namespace, key, &record)?;
        Ok(Some(record))
    }

    /// Drops the record of a temporary snapshot an unpack could not commit.
    /// Nothing referred to it, so no event is queued.
    pub fn discard(&self, txn: &mut RwTxn, namespace: &str, key: &str) -> Result<()> {
        self.records.delete(txn, &record_key(namespace, key))?;
        Ok(())
    }

    fn put(&self, txn: &mut RwTxn, namespace: &str, key: &str, record: &Record) -> Result<()> {
        let raw = serde_json::to_vec(record).map_err(|source| SnapshotError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        self.records.put(txn, &record_key(namespace, key), &raw)?;
        Ok(())
    }

    fn drop_record(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        key: &str,
        record: &Record,
    ) -> Result<()> {
        self.records.delete(txn, &record_key(namespace, key))?;
        events::remove(&self.outbox, txn, namespace, key, record)
    }
}

/// Bytes (allocated blocks) and inodes under `dir`, not following links.
pub fn usage(dir: &Path) -> (i64, i64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        inodes += 1;
        bytes += std::os::unix::fs::MetadataExt::blocks(&meta) as i64 * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|entry| entry.path()));
            }
        }
    }
    (bytes, inodes)
}

fn record_key(namespace: &str, key: &str) -> String {
    format!("{namespace}\0{key}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(|source| SnapshotError::Corrupt {
        key: key.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "node-t").unwrap();
        (dir, store)
    }

    /// Makes a snapshot the way the handlers do: directory, then record.
    pub(super) fn make(store: &Store, key: &str, parent: &str, kind: Kind, now: i64) -> Record {
        let id = store.alloc_id().unwrap();
        let lowers = store
            .lowers(&store.env.read_txn().unwrap(), "ns", parent)
            .unwrap();
        store.make_dirs(id, &lowers).unwrap();
        let record = Record::new(id, kind, parent, BTreeMap::new(), now);
        let mut txn = store.env.write_txn().unwrap();
        store.insert(&mut txn, "ns", key, &record).unwrap();
        txn.commit().unwrap();
        record
    }

    pub(super) fn committed(store: &Store, name: &str, parent: &str, now: i64) -> Record {
        let key = format!("{EXTRACT_PREFIX}{name}");
        make(store, &key, parent, Kind::Active, now);
        let mut txn = store.env.write_txn().unwrap();
        let record = store
            .commit(&mut txn, "ns", &key, name, BTreeMap::new(), now)
            .unwrap();
        txn.commit().unwrap();
        record
    }

    #[test]
    fn keys_are_checked() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let cases = [
            ("c1", true),
            ("sha256:ab", true),
            ("", false),
            (long.as_str(), false),
            ("a/b", false),
            ("a\0b", false),
            ("a\nb", false),
            ("extract-1", false),
        ];
        for (key, ok) in cases {
            assert_eq!(check_key(key).is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn lowers_follow_the_chain_top_most_first() {
        let (_dir, store) = open();
        let base = committed(&store, "base", "", 1);
        let top = committed(&store, "top", "base", 1);
        make(&store, "c1", "top", Kind::Active, 1);
        let txn = store.env.read_txn().unwrap();
        let lowers = store.lowers(&txn, "ns", "top").unwrap();
        assert_eq!(lowers, vec![store.fs_dir(top.id), store.fs_dir(base.id)]);
        let err = store.lowers(&txn, "ns", "c1").unwrap_err();
        assert!(matches!(err, SnapshotError::WrongKind { .. }), "{err}");
        let err = store.lowers(&txn, "ns", "missing").unwrap_err();
        assert!(matches!(err, SnapshotError::NotFound { .. }), "{err}");
    }

    #[test]
    fn remove_refuses_parents_and_keeps_what_was_touched() {
        let (_dir, store) = open();
        let base = committed(&store, "base", "", 10);
        committed(&store, "top", "base", 20);
        let mut txn = store.env.write_txn().unwrap();
        let err = store.remove(&mut txn, "ns", "base", 0).unwrap_err();
        assert!(matches!(err, SnapshotError::HasChildren { .. }), "{err}");
        assert_eq!(store.remove(&mut txn, "ns", "base", 5).unwrap(), None);
        assert_eq!(store.remove(&mut txn, "ns", "top", 15).unwrap(), None);
        assert!(store.remove(&mut txn, "ns", "top", 25).unwrap().is_some());
        assert_eq!(
            store
                .remove(&mut txn, "ns", "base", 0)
                .unwrap()
                .map(|r| r.id),
            Some(base.id)
        );
        txn.commit().unwrap();
    }
}
