//! The content database: which blobs are on disk and which namespaces hold
//! them.
//!
//! ```text
//! ROOT/db/  LMDB, schema version 1:
//!   meta    "schema"                 -> u32 big-endian (1)
//!           "generation"             -> u64 big-endian, the last event generation given
//!   blobs   "<digest>"               -> BlobRecord (json)   one per blob file on disk
//!   owners  "<namespace>\0<digest>"  -> OwnerRecord (json)  a namespace's hold on a blob
//!   outbox, outbox_meta, requests    (berth-bus)
//! ```
//!
//! A blob record exists exactly while at least one owner record names its
//! digest, and counts them (`owners`), so dropping the last hold is one
//! lookup, not a scan. A namespace sees a blob only through its owner
//! record, which is written only when that namespace provided the bytes (or
//! held the blob already).
//!
//! Versions: a database without a `schema` key is version 0, whose blob
//! records carry no owner count; opening it counts the owner records of each
//! blob once, drops blob records no owner names (their files go with the
//! start-up sweep), and stamps version 1, in one transaction. A database of a
//! later version is refused.

use std::collections::{BTreeMap, HashMap};

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use serde::{Deserialize, Serialize};

use berth_bus::store::Env;

use crate::error::ContentError;

type Result<T, E = ContentError> = std::result::Result<T, E>;

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A blob on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Length in bytes.
    pub size: u64,
    /// First commit, nanoseconds since the Unix epoch.
    pub created: i64,
    /// How many namespaces hold it (absent in version 0).
    #[serde(default)]
    pub owners: u32,
}

/// A namespace's hold on a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OwnerRecord {
    /// Labels set by the namespace's clients.
    pub labels: BTreeMap<String, String>,
    /// When the namespace first committed the blob, nanoseconds.
    pub created: i64,
    /// When its labels last changed, nanoseconds (0: never).
    pub updated: i64,
    /// Last commit or reuse, nanoseconds: gc keeps what was touched at or
    /// after its mark epoch.
    pub touched: i64,
}

/// The databases of one content root.
#[derive(Clone, Copy)]
pub struct Schema {
    meta: Database<Str, RawBytes>,
    blobs: Database<Str, RawBytes>,
    owners: Database<Str, RawBytes>,
}

impl Schema {
    /// Opens (creating) the databases in `env`, migrating version 0 to
    /// the current layout; a later version is `Internal`.
    pub fn open(env: &Env) -> Result<Schema> {
        let mut txn = env.write_txn()?;
        let schema = Schema {
            meta: env.create_database(&mut txn, Some("meta"))?,
            blobs: env.create_database(&mut txn, Some("blobs"))?,
            owners: env.create_database(&mut txn, Some("owners"))?,
        };
        match schema.meta.get(&txn, "schema")? {
            None => schema.migrate_from_v0(&mut txn)?,
            Some(raw) if raw == SCHEMA_VERSION.to_be_bytes() => {}
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw).map_or_else(
                    |_| format!("{raw:?}"),
                    |v| u32::from_be_bytes(v).to_string(),
                );
                return Err(ContentError::SchemaVersion {
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        txn.commit()?;
        Ok(schema)
    }

    /// Counts the owners of every blob (version 0 kept no count) and
    /// stamps the version; on a new database it only stamps.
    fn migrate_from_v0(&self, txn: &mut RwTxn) -> Result<()> {
        let mut counts: HashMap<String, u32> = HashMap::new();
        for item in self.owners.iter(txn)? {
            let (key, _) = item?;
            if let Some((_, digest)) = key.split_once('\0') {
                *counts.entry(digest.to_string()).or_default() += 1;
            }
        }
        let mut records = Vec::new();
        for item in self.blobs.iter(txn)? {
            let (digest, raw) = item?;
            records.push((digest.to_string(), decode::<BlobRecord>(digest, raw)?));
        }
        for (digest, mut record) in records {
            match counts.get(&digest) {
                Some(&owners) => {
                    record.owners = owners;
                    self.put_blob(txn, &digest, &record)?;
                }
                None => {
                    self.blobs.delete(txn, &digest)?;
                }
            }
        }
        self.meta
            .put(txn, "schema", &SCHEMA_VERSION.to_be_bytes())?;
        Ok(())
    }

    /// The record of a blob on disk.
    pub fn blob(&self, txn: &RoTxn, digest: &str) -> Result<Option<BlobRecord>> {
        self.blobs
            .get(txn, digest)?
            .map(|raw| decode(digest, raw))
            .transpose()
    }

    /// Writes a blob's record.
    pub fn put_blob(&self, txn: &mut RwTxn, digest: &str, record: &BlobRecord) -> Result<()> {
        self.blobs.put(txn, digest, &encode(record))?;
        Ok(())
    }

    /// Drops a blob's record.
    pub fn delete_blob(&self, txn: &mut RwTxn, digest: &str) -> Result<()> {
        self.blobs.delete(txn, digest)?;
        Ok(())
    }

    /// A namespace's hold on a blob.
    pub fn owner(&self, txn: &RoTxn, namespace: &str, digest: &str) -> Result<Option<OwnerRecord>> {
        let key = owner_key(namespace, digest);
        self.owners
            .get(txn, &key)?
            .map(|raw| decode(&key, raw))
            .transpose()
    }

    /// Writes a namespace's hold on a blob.
    pub fn put_owner(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        digest: &str,
        record: &OwnerRecord,
    ) -> Result<()> {
        self.owners
            .put(txn, &owner_key(namespace, digest), &encode(record))?;
        Ok(())
    }

    /// Drops a namespace's hold on a blob.
    pub fn delete_owner(&self, txn: &mut RwTxn, namespace: &str, digest: &str) -> Result<()> {
        self.owners.delete(txn, &owner_key(namespace, digest))?;
        Ok(())
    }

    /// Every hold of a namespace, by digest.
    pub fn owned(&self, txn: &RoTxn, namespace: &str) -> Result<Vec<(String, OwnerRecord)>> {
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.owners.prefix_iter(txn, &prefix)? {
            let (key, raw) = item?;
            out.push((key[prefix.len()..].to_string(), decode(key, raw)?));
        }
        Ok(out)
    }

    /// Every blob record's digest (the start-up sweep compares them with
    /// the files).
    pub fn blob_digests(&self, txn: &RoTxn) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.blobs.iter(txn)? {
            out.push(item?.0.to_string());
        }
        Ok(out)
    }

    /// The next event generation: one counter for every blob, so a blob
    /// committed again after its record was dropped still gets a higher
    /// generation than its delete.
    pub fn next_generation(&self, txn: &mut RwTxn) -> Result<u64> {
        let last = match self.meta.get(txn, "generation")? {
            Some(raw) => <[u8; 8]>::try_from(raw).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let next = last + 1;
        self.meta.put(txn, "generation", &next.to_be_bytes())?;
        Ok(next)
    }
}

fn owner_key(namespace: &str, digest: &str) -> String {
    format!("{namespace}\0{digest}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(ContentError::corrupt(key.replace('\0', "/")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The records are plain structs of strings and numbers: encoding
    // cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &std::path::Path) -> Env {
        berth_bus::store::open_env(dir, 8).unwrap()
    }

    /// A version 0 database (blob records without an owner count, no
    /// schema key) opens as version 1 with each blob's owners counted, and
    /// a blob record that no owner named is dropped.
    #[test]
    fn version_0_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(dir.path());
        let (shared, single, ownerless) = (
            format!("sha256:{}", "1".repeat(64)),
            format!("sha256:{}", "2".repeat(64)),
            format!("sha256:{}", "3".repeat(64)),
        );

        // The layout as version 0 wrote it.
        {
            let mut txn = env.write_txn().unwrap();
            let blobs: Database<Str, RawBytes> =
                env.create_database(&mut txn, Some("blobs")).unwrap();
            let owners: Database<Str, RawBytes> =
                env.create_database(&mut txn, Some("owners")).unwrap();
            for digest in [&shared, &single, &ownerless] {
                blobs
                    .put(&mut txn, digest, br#"{"size":5,"created":7}"#)
                    .unwrap();
            }
            let owner = br#"{"labels":{},"created":7,"updated":0,"touched":7}"#;
            for key in [
                format!("a\0{shared}"),
                format!("b\0{shared}"),
                format!("a\0{single}"),
            ] {
                owners.put(&mut txn, &key, owner).unwrap();
            }
            txn.commit().unwrap();
        }

        let schema = Schema::open(&env).unwrap();
        let txn = env.read_txn().unwrap();
        assert_eq!(schema.blob(&txn, &shared).unwrap().unwrap().owners, 2);
        assert_eq!(schema.blob(&txn, &single).unwrap().unwrap().owners, 1);
        assert_eq!(schema.blob(&txn, &ownerless).unwrap(), None);
        assert_eq!(
            schema.owner(&txn, "b", &shared).unwrap().unwrap().touched,
            7
        );
        let version = schema.meta.get(&txn, "schema").unwrap().unwrap();
        assert_eq!(version, SCHEMA_VERSION.to_be_bytes());
        drop(txn);

        // Opening again changes nothing.
        Schema::open(&env).unwrap();
        let txn = env.read_txn().unwrap();
        assert_eq!(schema.blob(&txn, &shared).unwrap().unwrap().owners, 2);
    }

    /// A database of a later layout is refused, not read wrongly.
    #[test]
    fn a_later_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(dir.path());
        let schema = Schema::open(&env).unwrap();
        let mut txn = env.write_txn().unwrap();
        schema
            .meta
            .put(&mut txn, "schema", &9u32.to_be_bytes())
            .unwrap();
        txn.commit().unwrap();
        let err = Schema::open(&env).err().unwrap();
        assert!(matches!(err, ContentError::SchemaVersion { .. }), "{err}");
        assert_eq!(err.code(), berth_bus::Code::Internal);
    }

    /// Generations grow across every blob and survive a reopen.
    #[test]
    fn generations_grow() {
        let dir = tempfile::tempdir().unwrap();
        let env = env(dir.path());
        let schema = Schema::open(&env).unwrap();
        let mut txn = env.write_txn().unwrap();
        assert_eq!(schema.next_generation(&mut txn).unwrap(), 1);
        assert_eq!(schema.next_generation(&mut txn).unwrap(), 2);
        txn.commit().unwrap();
        let schema = Schema::open(&env).unwrap();
        let mut txn = env.write_txn().unwrap();
        assert_eq!(schema.next_generation(&mut txn).unwrap(), 3);
    }
}
