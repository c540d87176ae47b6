//! The blob store: files under the root, records in LMDB.
//!
//! ```text
//! ROOT/blobs/sha256/<hex>   committed blobs, read-only, written once, one per digest
//! ROOT/ingest/...           blobs being written (see `ingest`)
//! ROOT/db/                  LMDB (see `schema`)
//! ```
//!
//! A blob goes through three steps: its bytes are written to an ingest,
//! invisible to everyone; commit verifies their size and sha256, syncs the
//! file and renames it to `blobs/sha256/<hex>` (or drops it when that file
//! exists already: the bytes are stored once); then one transaction writes
//! the namespace's owner record, counts it on the blob record and queues
//! `content.commit`. The file is always there before its records and is
//! unlinked only after they are gone, so a record never lacks its bytes; a
//! crash between the steps leaves a file no record names, which
//! [`Store::recover`] removes at start-up (or a `delete` of that digest).
//!
//! Namespaces: a blob is visible in a namespace only through its owner
//! record, and that record is written only by a commit that verified bytes
//! the namespace wrote (or a reuse by a namespace that held the blob
//! already). Knowing a digest is not enough: another namespace's open
//! answers `exists` false and its bytes must still be written and
//! verified, after which the file already on disk is kept.
//!
//! Commits and deletes of one digest hold that digest's lock (taken by the
//! handlers) from the first look at its records to the unlink, so a gc
//! delete racing a re-commit of the same digest runs entirely before it or
//! entirely after it. Before: the blob is gone and the commit either brings
//! verified bytes, which it places again, or is refused (`NotFound`), never
//! acknowledged without bytes. After: the commit stamped the blob's touched
//! time after gc's mark, so the delete (`unless touched since` the mark)
//! keeps it. Leases are gc's part: it reads them with its mark and asks for
//! no delete of what one holds, and a lease attached after the mark comes
//! with a commit that touched the blob after the mark.
//!
//! # Limitations
//!
//! Touched times are this host's wall clock, compared with the mark epoch
//! taken from the metadata host's clock: when the content host's clock runs
//! behind by more than the time between a mark and a reuse, that reuse can
//! be lost, unless a lease held the blob at the mark. Reads are served from
//! files verified when they were committed and are not hashed again: a
//! reader that needs the whole blob verifies the digest as it reads (the
//! snapshot service does).

use std::collections::{BTreeMap, HashSet};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use heed::RwTxn;

use berth_bus::events::Outbox;
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;
use berth_proto::content::ContentEvent;

use crate::digest::{Digest, ALGORITHM};
use crate::error::ContentError;
use crate::events;
use crate::ingest::Ingests;
use crate::schema::{BlobRecord, OwnerRecord, Schema};

pub use crate::digest::check_ref;
pub use crate::ingest::IngestMeta;

type Result<T, E = ContentError> = std::result::Result<T, E>;

/// Checks a digest (`sha256:<64 lowercase hex>`) and returns its hex part.
pub fn check_digest(digest: &str) -> Result<String> {
    Ok(Digest::parse(digest)?.hex().to_string())
}

/// Nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    berth_proto::Timestamp::now().unix_nanos
}

/// What [`Store::recover`] found at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Blob files no record named, removed.
    pub orphans: usize,
    /// Blob records whose file is missing (the disk lost it; reads of
    /// those blobs fail until they are deleted).
    pub missing: usize,
}

/// What a verified commit did, before its records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The blob's size.
    pub size: u64,
    /// No new bytes went to disk: the namespace held the blob, or its file
    /// was there for another namespace.
    pub reused: bool,
}

/// What a delete did; the caller unlinks `unlink` after the commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// False when the blob was touched since the epoch and stays.
    pub deleted: bool,
    /// The file to unlink when no namespace holds the blob any more.
    pub unlink: Option<PathBuf>,
    /// The blob's size.
    pub size: u64,
}

/// The content store of one root.
pub struct Store {
    root: PathBuf,
    pub(crate) env: Env,
    schema: Schema,
    pub(crate) outbox: Outbox,
    pub(crate) requests: RequestLog,
    pub(crate) ingests: Ingests,
}

impl Store {
    /// Opens the store at `root`, creating its layout and migrating an
    /// older database (`Internal` for a newer one).
    pub fn open(root: &Path) -> Result<Self> {
        let blobs = root.join("blobs").join(ALGORITHM);
        std::fs::create_dir_all(&blobs).map_err(ContentError::io("create directory", &blobs))?;
        let ingests = Ingests::open(&root.join("ingest"))?;
        let env = berth_bus::store::open_env(&root.join("db"), 8)
            .map_err(ContentError::bus("content database"))?;
        let schema = Schema::open(&env)?;
        let outbox = Outbox::open(&env, "content", "").map_err(ContentError::bus("outbox"))?;
        let requests = RequestLog::open(&env).map_err(ContentError::bus("request log"))?;
        Ok(Store {
            root: root.to_path_buf(),
            env,
            schema,
            outbox,
            requests,
            ingests,
        })
    }

    /// Removes blob files no record names (a crash between a commit's
    /// rename and its transaction, or between a delete's transaction and
    /// its unlink). Ingests are kept: their writers resume them. Run before
    /// serving.
    pub fn recover(&self) -> Result<Recovered> {
        let txn = self.env.read_txn()?;
        let recorded: HashSet<String> = self.schema.blob_digests(&txn)?.into_iter().collect();
        drop(txn);

        let dir = self.root.join("blobs").join(ALGORITHM);
        let entries = std::fs::read_dir(&dir).map_err(ContentError::io("list", &dir))?;
        let mut found = HashSet::new();
        let mut recovered = Recovered::default();
        for entry in entries {
            let entry = entry.map_err(ContentError::io("list", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = format!("{ALGORITHM}:{name}");
            if recorded.contains(&digest) {
                found.insert(digest);
                continue;
            }
            let path = entry.path();
            std::fs::remove_file(&path).map_err(ContentError::io("remove", &path))?;
            recovered.orphans += 1;
        }
        recovered.missing = recorded.len() - found.len();
        Ok(recovered)
    }

    /// The path of a committed blob, `<root>/blobs/sha256/<hex>`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.path_of(&Digest::parse(digest)?))
    }

    fn path_of(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(ALGORITHM).join(digest.hex())
    }

    /// The namespace's records of a blob; `NotFound` when it holds none,
    /// whether or not another namespace does.
    pub fn info(&self, namespace: &str, digest: &Digest) -> Result<(BlobRecord, OwnerRecord)> {
        let txn = self.env.read_txn()?;
        let owner = self.schema.owner(&txn, namespace, digest.as_str())?;
        let blob = self.schema.blob(&txn, digest.as_str())?;
        match (blob, owner) {
            (Some(blob), Some(owner)) => Ok((blob, owner)),
            _ => Err(ContentError::BlobNotFound {
                digest: digest.to_string(),
            }),
        }
    }

    /// The blob's record when the namespace holds it.
    pub fn held(&self, namespace: &str, digest: &Digest) -> Result<Option<BlobRecord>> {
        match self.info(namespace, digest) {
            Ok((blob, _)) => Ok(Some(blob)),
            Err(ContentError::BlobNotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Every blob of the namespace with its records, by digest.
    pub fn list(&self, namespace: &str) -> Result<Vec<(String, BlobRecord, OwnerRecord)>> {
        let txn = self.env.read_txn()?;
        let mut out = Vec::new();
        for (digest, owner) in self.schema.owned(&txn, namespace)? {
            if let Some(blob) = self.schema.blob(&txn, &digest)? {
                out.push((digest, blob, owner));
            }
        }
        Ok(out)
    }

    /// Reads up to `length` bytes at `offset` of a blob the namespace
    /// holds, and returns them with the blob's size. `InvalidArgument` for
    /// an offset past the end; the bytes are fewer than asked only there.
    pub fn read(
        &self,
        namespace: &str,
        digest: &Digest,
        offset: u64,
        length: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let (blob, _) = self.info(namespace, digest)?;
        if offset > blob.size {
            return Err(ContentError::ReadPastEnd {
                digest: digest.to_string(),
                offset: offset as i64,
                size: blob.size,
            });
        }
        let length = length.min(blob.size - offset) as usize;
        let path = self.path_of(digest);
        // A delete between the lookup and the open took the blob.
        let file = std::fs::File::open(&path).map_err(|err| match err.kind() {
            ErrorKind::NotFound => ContentError::BlobNotFound {
                digest: digest.to_string(),
            },
            _ => ContentError::io("open", &path)(err),
        })?;
        let mut data = vec![0; length];
        file.read_exact_at(&mut data, offset)
            .map_err(ContentError::io("read", &path))?;
        Ok((data, blob.size))
    }

    /// The file and ingest steps of a commit, under the digest's lock
    /// (held by the caller): a namespace that holds the blob needs no
    /// bytes (any ingest under `reference` is dropped); otherwise the
    /// ingest is verified against `digest` and `sizes` (each when not 0)
    /// and placed. [`Store::record_commit`] then writes the records.
    ///
    /// `NotFound` when the namespace neither holds the blob nor has the
    /// ingest; `InvalidArgument` for a size or digest mismatch.
    pub fn place(
        &self,
        namespace: &str,
        reference: &str,
        digest: &Digest,
        sizes: &[u64],
    ) -> Result<Committed> {
        if let Some(blob) = self.held(namespace, digest)? {
            check_sizes(digest, &blob, sizes)?;
            self.ingests.drop_if_any(namespace, reference);
            return Ok(Committed {
                size: blob.size,
                reused: true,
            });
        }
        let blob = self.path_of(digest);
        match self
            .ingests
            .commit(namespace, reference, digest, sizes, &blob)?
        {
            Some(placed) => Ok(Committed {
                size: placed.size,
                reused: !placed.stored,
            }),
            None => Err(ContentError::NothingToCommit {
                digest: digest.to_string(),
                reference: reference.to_string(),
            }),
        }
    }

    /// Records that `namespace` holds `digest`, whose bytes are in place:
    /// stamps its touched time, merges `labels` and queues `content.commit`,
    /// in the caller's transaction.
    pub fn record_commit(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        digest: &Digest,
        committed: Committed,
        labels: &BTreeMap<String, String>,
    ) -> Result<(BlobRecord, OwnerRecord)> {
        let now = now_nanos();
        let key = digest.as_str();
        let mut blob = self.schema.blob(txn, key)?.unwrap_or(BlobRecord {
            size: committed.size,
            created: now,
            owners: 0,
        });
        let mut owner = match self.schema.owner(txn, namespace, key)? {
            Some(owner) => owner,
            None => {
                blob.owners += 1;
                OwnerRecord {
                    created: now,
                    ..Default::default()
                }
            }
        };
        owner.touched = now;
        if !labels.is_empty() {
            owner.labels.extend(labels.clone());
            owner.updated = now;
        }
        self.schema.put_blob(txn, key, &blob)?;
        self.schema.put_owner(txn, namespace, key, &owner)?;

        let event = ContentEvent {
            digest: key.to_string(),
            size: blob.size as i64,
            reused: committed.reused,
            freed: false,
        };
        self.push(txn, namespace, events::COMMIT, &event)?;
        Ok((blob, owner))
    }

    /// The namespace's labels of a blob; `NotFound` when it holds none.
    pub fn labels(
        &self,
        txn: &RwTxn,
        namespace: &str,
        digest: &Digest,
    ) -> Result<BTreeMap<String, String>> {
        let owner = self.schema.owner(txn, namespace, digest.as_str())?;
        let owner = owner.ok_or_else(|| ContentError::BlobNotFound {
            digest: digest.to_string(),
        })?;
        Ok(owner.labels)
    }

    /// Replaces the namespace's labels of a blob.
    pub fn update_labels(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        digest: &Digest,
        labels: BTreeMap<String, String>,
    ) -> Result<(BlobRecord, OwnerRecord)> {
        let key = digest.as_str();
        let not_found = || ContentError::BlobNotFound {
            digest: digest.to_string(),
        };
        let mut owner = self
            .schema
            .owner(txn, namespace, key)?
            .ok_or_else(not_found)?;
        let blob = self.schema.blob(txn, key)?.ok_or_else(not_found)?;
        owner.labels = labels;
        owner.updated = now_nanos();
        self.schema.put_owner(txn, namespace, key, &owner)?;
        Ok((blob, owner))
    }

    /// Drops the namespace's hold on a blob unless it was touched at or
    /// after `unless_touched_since` (0: unconditionally), under the
    /// digest's lock (held by the caller), and queues `content.delete`.
    /// When no namespace holds the blob any more its record goes too, and
    /// the caller unlinks [`Dropped::unlink`] after the commit.
    ///
    /// `NotFound` when the namespace holds no such blob. One lookup of the
    /// owner and one of the blob, whatever the number of blobs.
    pub fn drop_owner(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        digest: &Digest,
        unless_touched_since: u64,
    ) -> Result<Dropped> {
        let key = digest.as_str();
        let not_found = || ContentError::BlobNotFound {
            digest: digest.to_string(),
        };
        let owner = self
            .schema
            .owner(txn, namespace, key)?
            .ok_or_else(not_found)?;
        let blob = self.schema.blob(txn, key)?;
        let size = blob.as_ref().map_or(0, |blob| blob.size);
        let touched = u64::try_from(owner.touched).unwrap_or(0);
        if unless_touched_since > 0 && touched >= unless_touched_since {
            return Ok(Dropped {
                deleted: false,
                unlink: None,
                size,
            });
        }

        self.schema.delete_owner(txn, namespace, key)?;
        let unlink = match blob {
            Some(mut blob) if blob.owners > 1 => {
                blob.owners -= 1;
                self.schema.put_blob(txn, key, &blob)?;
                None
            }
            _ => {
                self.schema.delete_blob(txn, key)?;
                Some(self.path_of(digest))
            }
        };
        let event = ContentEvent {
            digest: key.to_string(),
            size: size as i64,
            reused: false,
            freed: unlink.is_some(),
        };
        self.push(txn, namespace, events::DELETE, &event)?;
        Ok(Dropped {
            deleted: true,
            unlink,
            size,
        })
    }

    /// Removes the blob's file when no record names it (what a crash
    /// between a delete's steps leaves); returns whether there was one.
    /// Under the digest's lock (held by the caller).
    pub fn remove_orphan(&self, digest: &Digest) -> Result<bool> {
        let txn = self.env.read_txn()?;
        if self.schema.blob(&txn, digest.as_str())?.is_some() {
            return Ok(false);
        }
        drop(txn);
        let path = self.path_of(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(false),
            Err(err) => Err(ContentError::io("remove", path)(err)),
        }
    }

    /// Queues one event with the next generation.
    fn push(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        topic: &str,
        event: &ContentEvent,
    ) -> Result<()> {
        let generation = self.schema.next_generation(txn)?;
        self.outbox
            .push(txn, namespace, topic, generation, event)
            .map_err(ContentError::bus("outbox"))
    }
}

/// A held blob's size against the sizes a commit or open names.
pub(crate) fn check_sizes(digest: &Digest, blob: &BlobRecord, sizes: &[u64]) -> Result<()> {
    match sizes.iter().find(|&&size| size > 0 && size != blob.size) {
        Some(&expected) => Err(ContentError::SizeMismatch {
            digest: digest.to_string(),
            expected,
            actual: blob.size,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use super::*;

    fn commit(store: &Store, namespace: &str, data: &[u8]) -> Digest {
        let digest = Digest::from_sha256(&Sha256::digest(data));
        let meta = IngestMeta {
            expected_digest: digest.to_string(),
            ..Default::default()
        };
        let reference = format!("r-{namespace}");
        store
            .ingests
            .open_ingest(namespace, &reference, &meta)
            .unwrap();
        store.ingests.write(namespace, &reference, 0, data).unwrap();
        let committed = store.place(namespace, &reference, &digest, &[]).unwrap();
        let mut txn = store.env.write_txn().unwrap();
        store
            .record_commit(&mut txn, namespace, &digest, committed, &BTreeMap::new())
            .unwrap();
        txn.commit().unwrap();
        digest
    }

    fn delete(store: &Store, namespace: &str, digest: &Digest, epoch: u64) -> Dropped {
        let mut txn = store.env.write_txn().unwrap();
        let dropped = store
            .drop_owner(&mut txn, namespace, digest, epoch)
            .unwrap();
        txn.commit().unwrap();
        if let Some(path) = &dropped.unlink {
            std::fs::remove_file(path).unwrap();
        }
        dropped
    }

    /// Owners are counted: the bytes stay until the last namespace lets
    /// go, and a blob touched since the epoch stays.
    #[test]
    fn the_last_owner_frees_the_bytes() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let digest = commit(&store, "a", b"shared");
        assert_eq!(commit(&store, "b", b"shared"), digest);
        let path = store.path_of(&digest);

        let kept = delete(&store, "a", &digest, now_nanos() as u64 - 60_000_000_000);
        assert!(!kept.deleted);
        let first = delete(&store, "a", &digest, 0);
        assert!(first.deleted && first.unlink.is_none());
        assert!(path.exists());
        assert_eq!(store.held("b", &digest).unwrap().unwrap().owners, 1);
        let last = delete(&store, "b", &digest, now_nanos() as u64);
        assert_eq!(last.unlink.as_deref(), Some(path.as_path()));
        assert!(!path.exists());
        assert!(store.list("b").unwrap().is_empty());
    }

    /// At start-up a blob file no record names is removed and a recorded
    /// one is kept; a delete of an unrecorded digest removes its file too.
    #[test]
    fn files_no_record_names_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let digest = {
            let store = Store::open(root.path()).unwrap();
            commit(&store, "a", b"kept")
        };
        let orphan = Digest::from_sha256(&Sha256::digest(b"orphan"));
        let blobs = root.path().join("blobs/sha256");
        std::fs::write(blobs.join(orphan.hex()), b"orphan").unwrap();

        let store = Store::open(root.path()).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(
            recovered,
            Recovered {
                orphans: 1,
                missing: 0
            }
        );
        assert!(store.path_of(&digest).exists());
        assert!(!blobs.join(orphan.hex()).exists());

        std::fs::write(blobs.join(orphan.hex()), b"orphan").unwrap();
        assert!(store.remove_orphan(&orphan).unwrap());
        assert!(!store.remove_orphan(&digest).unwrap());
        assert!(store.path_of(&digest).exists());
    }
}
