//! Snapshot records and directories.
//!
//! ```text
//! ROOT/snapshots/<id>/fs     the snapshot's own layer (overlay upper dir)
//! ROOT/snapshots/<id>/work   overlay's work dir (active snapshots)
//! ROOT/db/  LMDB:
//!   snapshots  "<namespace>\0<key>" -> Record (json)
//!   meta       "next_id" -> u64
//!   outbox, outbox_meta, requests    (berth-bus)
//! ```
//!
//! A record is written before its directory is made and removed before its
//! directory is deleted, so a directory without a record is garbage (a
//! crash mid-way), which `prune` removes; a committed record always has its
//! bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use berth_bus::events::Outbox;
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;
use berth_bus::{Error, Result};

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only.
    View,
    /// Writable.
    Active,
    /// Immutable, may be a parent.
    Committed,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Its directory under `snapshots/`.
    pub id: u64,
    /// Its kind.
    pub kind: Kind,
    /// The committed parent's key, empty for none.
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Made, nanoseconds.
    pub created: i64,
    /// Last changed, nanoseconds.
    pub updated: i64,
    /// Last made or reused, nanoseconds (gc keeps what was touched since its epoch).
    pub touched: i64,
}

/// A checked snapshot key: a name usable as one directory-free string.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 256 || key.contains('\0') || key.contains('/') {
        return Err(Error::invalid(format!("invalid snapshot key {key:?}")));
    }
    Ok(())
}

/// The snapshot store of one node.
pub struct Store {
    root: PathBuf,
    /// The environment.
    pub env: Env,
    records: Database<Str, RawBytes>,
    meta: Database<Str, RawBytes>,
    /// Events waiting to be published.
    pub outbox: Outbox,
    /// Outcomes of mutating requests.
    pub requests: RequestLog,
}

impl Store {
    /// Opens the store at `root`.
    pub fn open(root: &Path, node: &str) -> Result<Self> {
        std::fs::create_dir_all(root.join("snapshots"))?;
        let env = berth_bus::store::open_env(&root.join("db"), 8)?;
        let mut txn = env.write_txn()?;
        let records = env.create_database(&mut txn, Some("snapshots"))?;
        let meta = env.create_database(&mut txn, Some("meta"))?;
        txn.commit()?;
        Ok(Store {
            root: root.to_path_buf(),
            outbox: Outbox::open(&env, "snapshot", node)?,
            requests: RequestLog::open(&env)?,
            env,
            records,
            meta,
        })
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The record of `key`, if any.
    pub fn get(&self, txn: &RoTxn, namespace: &str, key: &str) -> Result<Option<Record>> {
        match self.records.get(txn, &record_key(namespace, key))? {
            Some(raw) => Ok(Some(decode(raw)?)),
            None => Ok(None),
        }
    }

    /// The record of `key`, or `NotFound`.
    pub fn require(&self, txn: &RoTxn, namespace: &str, key: &str) -> Result<Record> {
        self.get(txn, namespace, key)?
            .ok_or_else(|| Error::not_found(format!("snapshot {key:?} not found")))
    }

    /// Writes a record.
    pub fn put(&self, txn: &mut RwTxn, namespace: &str, key: &str, record: &Record) -> Result<()> {
        let raw = serde_json::to_vec(record).map_err(|err| Error::internal(err.to_string()))?;
        self.records.put(txn, &record_key(namespace, key), &raw)?;
        Ok(())
    }

    /// Removes a record.
    pub fn delete(&self, txn: &mut RwTxn, namespace: &str, key: &str) -> Result<()> {
        self.records.delete(txn, &record_key(namespace, key))?;
        Ok(())
    }

    /// Every record of a namespace, by key.
    pub fn list(&self, txn: &RoTxn, namespace: &str) -> Result<Vec<(String, Record)>> {
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.records.prefix_iter(txn, &prefix)? {
            let (key, raw) = item?;
            out.push((key[prefix.len()..].to_string(), decode(raw)?));
        }
        Ok(out)
    }

    /// Every directory id any record of any namespace owns.
    pub fn owned_ids(&self, txn: &RoTxn) -> Result<std::collections::HashSet<u64>> {
        let mut out = std::collections::HashSet::new();
        for item in self.records.iter(txn)? {
            let (_, raw) = item?;
            out.insert(decode::<Record>(raw)?.id);
        }
        Ok(out)
    }

    /// A new directory id.
    pub fn next_id(&self, txn: &mut RwTxn) -> Result<u64> {
        let next = match self.meta.get(txn, "next_id")? {
            Some(raw) if raw.len() == 8 => u64::from_be_bytes(raw.try_into().unwrap_or_default()),
            _ => 1,
        };
        self.meta.put(txn, "next_id", &(next + 1).to_be_bytes())?;
        Ok(next)
    }

    /// The `fs` directories of `parent` and its ancestors, top-most first.
    pub fn lowers(&self, txn: &RoTxn, namespace: &str, parent: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            let record = self.require(txn, namespace, &next)?;
            out.push(self.dir(record.id).join("fs"));
            next = record.parent;
            if out.len() > 512 {
                return Err(Error::internal(format!("snapshot chain of {parent:?} loops")));
            }
        }
        Ok(out)
    }

    /// True when any snapshot of the namespace has `key` as parent.
    pub fn has_children(&self, txn: &RoTxn, namespace: &str, key: &str) -> Result<bool> {
        Ok(self.list(txn, namespace)?.iter().any(|(_, r)| r.parent == key))
    }

    /// Ids of directories under `snapshots/` that no record owns.
    pub fn orphan_dirs(&self) -> Result<Vec<PathBuf>> {
        let txn = self.env.read_txn()?;
        let owned = self.owned_ids(&txn)?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.root.join("snapshots"))? {
            let entry = entry?;
            let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
            if id.is_none_or(|id| !owned.contains(&id)) {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

/// Bytes and inodes under `dir`, not following links.
pub fn usage(dir: &Path) -> (i64, i64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        inodes += 1;
        bytes += std::os::unix::fs::MetadataExt::blocks(&meta) as i64 * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    (bytes, inodes)
}

fn record_key(namespace: &str, key: &str) -> String {
    format!("{namespace}\0{key}")
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(|err| Error::internal(format!("stored snapshot record: {err}")))
}
