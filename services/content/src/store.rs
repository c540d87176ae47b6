//! The blob store: files under the root, records in LMDB.
//!
//! ```text
//! ROOT/blobs/sha256/<hex>          committed blobs, read-only, written once
//! ROOT/ingest/<namespace>/<ref>/   data (the bytes so far), meta.json (expectations)
//! ROOT/db/                         LMDB:
//!   blobs   "<digest>"                -> BlobRecord (json)   one per blob on disk
//!   owners  "<namespace>\0<digest>"   -> OwnerRecord (json)  who provided it, labels, touched
//!   outbox, outbox_meta, requests     (berth-bus)
//! ```
//!
//! An ingest is invisible until commit: commit verifies size and sha256 of
//! the ingest file, fsyncs it, renames it into `blobs/` and records the owner
//! in one transaction with its `content.commit` event. Commits and deletes of
//! one digest hold that digest's lock, so a gc delete racing a re-commit
//! never unlinks bytes the commit just claimed.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use heed::types::{Bytes as RawBytes, Str};
use heed::Database;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use berth_bus::events::Outbox;
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;
use berth_bus::{Error, Result};

/// The largest ingest ref.
pub const MAX_REF_LEN: usize = 200;

/// A blob on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Length in bytes.
    pub size: i64,
    /// First commit, nanoseconds since the epoch.
    pub created: i64,
}

/// A namespace's hold on a blob.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct OwnerRecord {
    /// Labels set by the namespace's clients.
    pub labels: BTreeMap<String, String>,
    /// When the namespace first committed the blob.
    pub created: i64,
    /// When its labels changed.
    pub updated: i64,
    /// Last commit or reuse, nanoseconds: gc keeps what was touched at or
    /// after its mark epoch.
    pub touched: i64,
}

/// What `open` wrote for an ingest.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IngestMeta {
    /// The digest the bytes must have, if known.
    pub expected_digest: String,
    /// The size the bytes must have, 0 when unknown.
    pub expected_size: i64,
    /// The lease to attach the blob to.
    pub lease_id: String,
}

/// A checked `sha256:<64 lowercase hex>`.
pub fn check_digest(digest: &str) -> Result<&str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(Error::invalid(format!("malformed digest {digest:?}")));
    };
    if algorithm != "sha256" {
        return Err(Error::invalid(format!(
            "unsupported digest algorithm {algorithm:?} in {digest:?}"
        )));
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::invalid(format!("malformed digest {digest:?}")));
    }
    Ok(hex)
}

/// A checked ingest ref: no path characters, so it names one directory.
pub fn check_ref(reference: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
    if reference.is_empty()
        || reference.len() > MAX_REF_LEN
        || reference.starts_with('.')
        || !reference.chars().all(ok_char)
    {
        return Err(Error::invalid(format!(
            "invalid ingest ref {reference:?}: use letters, digits and -_.:@, at most {MAX_REF_LEN}"
        )));
    }
    Ok(())
}

/// Nanoseconds since the epoch.
pub fn now_nanos() -> i64 {
    berth_proto::Timestamp::now().unix_nanos
}

/// The content store of one root.
pub struct Store {
    root: PathBuf,
    pub(crate) env: Env,
    blobs: Database<Str, RawBytes>,
    owners: Database<Str, RawBytes>,
    pub(crate) outbox: Outbox,
    pub(crate) requests: RequestLog,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Store {
    /// Opens the store at `root`, creating its layout.
    pub fn open(root: &Path) -> Result<Self> {
        for dir in ["blobs/sha256", "ingest"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let env = berth_bus::store::open_env(&root.join("db"), 8)?;
        let mut txn = env.write_txn()?;
        let blobs = env.create_database(&mut txn, Some("blobs"))?;
        let owners = env.create_database(&mut txn, Some("owners"))?;
        txn.commit()?;
        let outbox = Outbox::open(&env, "content", "")?;
        let requests = RequestLog::open(&env)?;
        Ok(Store {
            root: root.to_path_buf(),
            env,
            blobs,
            owners,
            outbox,
            requests,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The path of a committed blob.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(check_digest(digest)?))
    }

    fn ingest_dir(&self, namespace: &str, reference: &str) -> PathBuf {
        self.root.join("ingest").join(namespace).join(reference)
    }

    /// The lock of one digest, held across a commit's or a delete's file and
    /// database steps.
    pub(crate) fn lock(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(digest.to_string()).or_default().clone()
    }

    /// The namespace's record of a blob, `NotFound` when it holds none.
    pub fn info(&self, namespace: &str, digest: &str) -> Result<(BlobRecord, OwnerRecord)> {
        check_digest(digest)?;
        let txn = self.env.read_txn()?;
        let owner = self
            .owners
            .get(&txn, &owner_key(namespace, digest))?
            .ok_or_else(|| Error::not_found(format!("blob {digest} not found")))?;
        let blob = self
            .blobs
            .get(&txn, digest)?
            .ok_or_else(|| Error::not_found(format!("blob {digest} not found")))?;
        Ok((decode(blob)?, decode(owner)?))
    }

    /// Every blob of the namespace with its records.
    pub fn list(&self, namespace: &str) -> Result<Vec<(String, BlobRecord, OwnerRecord)>> {
        let txn = self.env.read_txn()?;
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.owners.prefix_iter(&txn, &prefix)? {
            let (key, owner) = item?;
            let digest = &key[prefix.len()..];
            if let Some(blob) = self.blobs.get(&txn, digest)? {
                out.push((digest.to_string(), decode(blob)?, decode(owner)?));
            }
        }
        Ok(out)
    }

    /// Reads `length` bytes at `offset` of a blob the namespace holds.
    pub fn read(
        &self,
        namespace: &str,
        digest: &str,
        offset: i64,
        length: i64,
    ) -> Result<(Vec<u8>, i64)> {
        let (blob, _) = self.info(namespace, digest)?;
        if offset < 0 || length < 0 || offset > blob.size {
            return Err(Error::invalid(format!(
                "read of blob {digest} at offset {offset} is past its end ({} bytes)",
                blob.size
            )));
        }
        let length = length.min(blob.size - offset) as usize;
        let mut file = std::fs::File::open(self.blob_path(digest)?)?;
        file.seek(SeekFrom::Start(offset as u64))?;
        let mut data = vec![0; length];
        file.read_exact(&mut data)?;
        Ok((data, blob.size))
    }

    /// Starts or resumes an ingest; returns its offset and whether the
    /// expected blob exists already in this namespace or on disk.
    pub fn open_ingest(
        &self,
        namespace: &str,
        reference: &str,
        meta: &IngestMeta,
    ) -> Result<(i64, bool)> {
        check_ref(reference)?;
        if !meta.expected_digest.is_empty() {
            check_digest(&meta.expected_digest)?;
            if self.blob_path(&meta.expected_digest)?.exists() {
                return Ok((0, true));
            }
        }
        let dir = self.ingest_dir(namespace, reference);
        std::fs::create_dir_all(&dir)?;
        let meta_path = dir.join("meta.json");
        if !meta_path.exists() {
            write_atomic(&meta_path, &serde_json::to_vec(meta).map_err(json_error)?)?;
        }
        let data = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("data"))?;
        Ok((data.metadata()?.len() as i64, false))
    }

    /// Writes bytes at `offset` of an ingest; the offset must be at or
    /// before its end (a repeat of an earlier chunk is harmless).
    pub fn write(&self, namespace: &str, reference: &str, offset: i64, data: &[u8]) -> Result<i64> {
        check_ref(reference)?;
        let path = self.ingest_dir(namespace, reference).join("data");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|_| Error::not_found(format!("ingest {reference:?} not found")))?;
        let end = file.metadata()?.len() as i64;
        if offset < 0 || offset > end {
            return Err(Error::invalid(format!(
                "write to ingest {reference:?} at offset {offset}, but it holds {end} bytes"
            )));
        }
        file.seek(SeekFrom::Start(offset as u64))?;
        file.write_all(data)?;
        Ok(end.max(offset + data.len() as i64))
    }

    /// The ingest's expectations and current length.
    pub fn ingest_status(&self, namespace: &str, reference: &str) -> Result<(IngestMeta, i64)> {
        check_ref(reference)?;
        let dir = self.ingest_dir(namespace, reference);
        let raw = std::fs::read(dir.join("meta.json"))
            .map_err(|_| Error::not_found(format!("ingest {reference:?} not found")))?;
        let meta: IngestMeta = serde_json::from_slice(&raw).map_err(json_error)?;
        let offset = std::fs::metadata(dir.join("data"))
            .map(|m| m.len() as i64)
            .unwrap_or(0);
        Ok((meta, offset))
    }

    /// Every ingest of the namespace.
    pub fn ingests(&self, namespace: &str) -> Result<Vec<(String, IngestMeta, i64)>> {
        let dir = self.root.join("ingest").join(namespace);
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for entry in entries.flatten() {
            let reference = entry.file_name().to_string_lossy().into_owned();
            if let Ok((meta, offset)) = self.ingest_status(namespace, &reference) {
                out.push((reference, meta, offset));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Drops an ingest.
    pub fn abort(&self, namespace: &str, reference: &str) -> Result<()> {
        check_ref(reference)?;
        let dir = self.ingest_dir(namespace, reference);
        if !dir.exists() {
            return Err(Error::not_found(format!("ingest {reference:?} not found")));
        }
        std::fs::remove_dir_all(dir)?;
        Ok(())
    }

    /// Verifies an ingest against `digest` and `size` and moves it into
    /// `blobs/`; a mismatch discards the ingest. When the blob is on disk
    /// already the ingest is dropped and nothing is stored twice. Returns the
    /// size. The caller records the owner afterwards, under the digest lock.
    pub fn verify_and_place(
        &self,
        namespace: &str,
        reference: &str,
        digest: &str,
        size: i64,
    ) -> Result<i64> {
        let dir = self.ingest_dir(namespace, reference);
        let data = dir.join("data");
        let target = self.blob_path(digest)?;
        if !data.exists() {
            if target.exists() {
                return Ok(std::fs::metadata(&target)?.len() as i64);
            }
            return Err(Error::not_found(format!("ingest {reference:?} not found")));
        }
        let verified = verify_file(&data, digest, size);
        if let Err(err) = verified {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err);
        }
        let actual = std::fs::metadata(&data)?.len() as i64;
        if target.exists() {
            std::fs::remove_dir_all(&dir)?;
            return Ok(actual);
        }
        std::fs::File::open(&data)?.sync_all()?;
        let mut permissions = std::fs::metadata(&data)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o444);
        std::fs::set_permissions(&data, permissions)?;
        std::fs::rename(&data, &target)?;
        sync_dir(target.parent().unwrap_or(&self.root))?;
        std::fs::remove_dir_all(&dir)?;
        Ok(actual)
    }

    /// Records that `namespace` holds `digest` (a commit or a reuse): stamps
    /// its touched time, sets labels, queues `content.commit`.
    pub fn record_commit(
        &self,
        txn: &mut heed::RwTxn,
        namespace: &str,
        digest: &str,
        size: i64,
        labels: &BTreeMap<String, String>,
    ) -> Result<(BlobRecord, OwnerRecord)> {
        let now = now_nanos();
        let blob = match self.blobs.get(txn, digest)? {
            Some(raw) => decode(raw)?,
            None => BlobRecord { size, created: now },
        };
        let key = owner_key(namespace, digest);
        let mut owner: OwnerRecord = match self.owners.get(txn, &key)? {
            Some(raw) => decode(raw)?,
            None => OwnerRecord {
                created: now,
                ..Default::default()
            },
        };
        owner.touched = now;
        if !labels.is_empty() {
            owner.labels.extend(labels.clone());
            owner.updated = now;
        }
        self.blobs.put(txn, digest, &encode(&blob)?)?;
        self.owners.put(txn, &key, &encode(&owner)?)?;
        let event = berth_proto::content::ContentEvent {
            digest: digest.to_string(),
            size: blob.size,
        };
        self.outbox
            .push(txn, namespace, "content.commit", 0, &event)?;
        Ok((blob, owner))
    }

    /// Replaces the namespace's labels of a blob.
    pub fn update_labels(
        &self,
        txn: &mut heed::RwTxn,
        namespace: &str,
        digest: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(BlobRecord, OwnerRecord)> {
        let key = owner_key(namespace, digest);
        let mut owner: OwnerRecord = decode(
            self.owners
                .get(txn, &key)?
                .ok_or_else(|| Error::not_found(format!("blob {digest} not found")))?,
        )?;
        let blob: BlobRecord = decode(
            self.blobs
                .get(txn, digest)?
                .ok_or_else(|| Error::not_found(digest))?,
        )?;
        owner.labels = labels;
        owner.updated = now_nanos();
        self.owners.put(txn, &key, &encode(&owner)?)?;
        Ok((blob, owner))
    }

    /// The namespace's labels of a blob as they are now.
    pub fn labels(
        &self,
        txn: &heed::RwTxn,
        namespace: &str,
        digest: &str,
    ) -> Result<BTreeMap<String, String>> {
        let raw = self
            .owners
            .get(txn, &owner_key(namespace, digest))?
            .ok_or_else(|| Error::not_found(format!("blob {digest} not found")))?;
        Ok(decode::<OwnerRecord>(raw)?.labels)
    }

    /// Drops the namespace's hold on a blob unless it was touched at or after
    /// `unless_touched_since` (0: unconditionally). Returns whether it was
    /// dropped and the path to unlink when no namespace holds it any more;
    /// the caller unlinks after the transaction commits.
    pub fn drop_owner(
        &self,
        txn: &mut heed::RwTxn,
        namespace: &str,
        digest: &str,
        unless_touched_since: u64,
    ) -> Result<(bool, Option<(PathBuf, i64)>)> {
        let key = owner_key(namespace, digest);
        let Some(raw) = self.owners.get(txn, &key)? else {
            return Err(Error::not_found(format!("blob {digest} not found")));
        };
        let owner: OwnerRecord = decode(raw)?;
        if unless_touched_since > 0 && owner.touched >= unless_touched_since as i64 {
            return Ok((false, None));
        }
        self.owners.delete(txn, &key)?;
        let size = match self.blobs.get(txn, digest)? {
            Some(raw) => decode::<BlobRecord>(raw)?.size,
            None => 0,
        };
        let event = berth_proto::content::ContentEvent {
            digest: digest.to_string(),
            size,
        };
        self.outbox
            .push(txn, namespace, "content.delete", 0, &event)?;
        if self.any_owner(txn, digest)? {
            return Ok((true, None));
        }
        self.blobs.delete(txn, digest)?;
        Ok((true, Some((self.blob_path(digest)?, size))))
    }

    fn any_owner(&self, txn: &heed::RwTxn, digest: &str) -> Result<bool> {
        for item in self.owners.iter(txn)? {
            let (key, _) = item?;
            if key.split_once('\0').map(|(_, d)| d) == Some(digest) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Checks a file's size and sha256 against what the caller expects.
pub fn verify_file(path: &Path, digest: &str, size: i64) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let actual_size = file.metadata()?.len() as i64;
    if size > 0 && actual_size != size {
        return Err(Error::invalid(format!(
            "size mismatch for {digest}: got {actual_size} bytes, expected {size}"
        )));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != digest {
        return Err(Error::invalid(format!(
            "digest mismatch: content is {actual}, expected {digest}"
        )));
    }
    Ok(())
}

fn owner_key(namespace: &str, digest: &str) -> String {
    format!("{namespace}\0{digest}")
}

fn decode<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> Result<T> {
    serde_json::from_slice(raw).map_err(json_error)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(json_error)
}

fn json_error(err: serde_json::Error) -> Error {
    Error::internal(format!("stored record: {err}"))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(check_digest(&good).is_ok());
        let bad = [
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            "sha256".to_string(),
            format!("sha256:{}", "g".repeat(64)),
        ];
        for digest in bad {
            assert!(check_digest(&digest).is_err(), "{digest}");
        }
        assert!(check_digest(&format!("sha512:{}", "a".repeat(64)))
            .unwrap_err()
            .message
            .contains("unsupported"));
    }

    #[test]
    fn refs_with_path_characters_are_refused() {
        for reference in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(201)] {
            assert!(check_ref(reference).is_err(), "{reference:?}");
        }
        check_ref("import-sha256:abc@1").unwrap();
    }
}
