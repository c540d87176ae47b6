//! Ingests: blobs being written, invisible until they are committed.
//!
//! ```text
//! ROOT/ingest/<namespace dir>/<ref>/data        the bytes so far
//! ROOT/ingest/<namespace dir>/<ref>/meta.json   IngestMeta: what the bytes must be
//! ```
//!
//! An ingest lives only in files: a write appends to `data` and nothing is
//! written to the database until commit, so an ingest's offset is the
//! length of its file, and one left by a crashed writer or a killed service
//! resumes there. While a writer uses an ingest the service keeps it open in
//! memory with the sha256 of its bytes so far, updated as each chunk is
//! written: commit then knows the digest without reading the file again. An
//! ingest loaded from disk (after a restart, or after it sat unused long
//! enough to be dropped from memory) is hashed once up to its end, by the
//! first write or commit that uses it; `open` and `status` only look at
//! the file's length, so they answer at once.
//!
//! Writes only append. A write must start at or before the ingest's end;
//! the part it repeats must equal the bytes already there (a retried chunk
//! is harmless), and the rest is appended. So the bytes hashed are always
//! the bytes in the file. A writer may keep a few chunks in flight: one
//! that arrives ahead of the chunks before it waits for them (briefly, and
//! only a few chunks ahead), so they are still written in order.
//!
//! One writer per ref: `open` takes the ref for its caller, and each write
//! keeps it taken; while it was used less than [`HOLD`] ago another `open`
//! of the ref is refused with `FailedPrecondition`. Writes carry no writer
//! identity, so the hold guards against a second client that opens the ref
//! (two imports of one image), not against one that writes without opening;
//! such writes still cannot corrupt anything, because a write that
//! disagrees with the bytes held is refused and commit verifies the digest.
//! Two refs of one digest are two ingests; both commit, and the blob is
//! stored once.
//!
//! # Limitations
//!
//! The first write after a restart hashes what the ingest holds, at the
//! speed of sha256 (a gigabyte or two a second): a write resuming tens of
//! gigabytes outlasts the client's timeout, and its retry (the same chunk,
//! which is harmless) waits for the hashing to end. An ingest nobody
//! commits or aborts stays on disk until an operator aborts it (`ingests`
//! lists them with their last write time). After a power loss (not a
//! process crash) the tail of `data` may hold bytes that were never
//! written; commit's digest check refuses them and the ingest is discarded.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::{namespace_dir, Digest};
use crate::error::ContentError;

type Result<T, E = ContentError> = std::result::Result<T, E>;

/// How long a ref stays taken by its writer after its last open or write.
pub const HOLD: Duration = Duration::from_secs(10);

/// How long a write that starts past the ingest's end waits for the writes
/// before it (a writer with a few chunks in flight), when the gap is at
/// most [`AHEAD_MAX`].
pub const GAP_WAIT: Duration = Duration::from_secs(2);

/// How far past the ingest's end a write may start and wait: a few chunks
/// of the largest NATS payload.
pub const AHEAD_MAX: u64 = 64 << 20;

/// How long an unused ingest is kept open in memory (its file handle and
/// running hash) before it is dropped; it is reloaded from disk on use.
pub const KEEP_OPEN: Duration = Duration::from_secs(300);

/// What `open` asked of an ingest: empty or zero fields are unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IngestMeta {
    /// The digest the bytes must have, if known.
    pub expected_digest: String,
    /// The size the bytes must have, 0 when unknown.
    pub expected_size: u64,
    /// The lease to attach the blob to at commit.
    pub lease_id: String,
}

/// One ingest as `status` and `ingests` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestStatus {
    /// The ref.
    pub reference: String,
    /// What the bytes must be.
    pub meta: IngestMeta,
    /// Bytes held: where the next write starts.
    pub offset: u64,
    /// The last write, nanoseconds since the Unix epoch.
    pub updated: i64,
    /// Whether a writer holds the ref now.
    pub held: bool,
}

/// What `open` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Where the next write starts.
    pub offset: u64,
    /// Whether the ingest existed already.
    pub resumed: bool,
}

/// What a verified commit did with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// The blob's size.
    pub size: u64,
    /// False when the blob's file was on disk already (for another
    /// namespace) and the ingest was dropped instead of moved.
    pub stored: bool,
}

/// The ingests of one content root.
pub struct Ingests {
    root: PathBuf,
    slots: Mutex<HashMap<(String, String), Arc<Slot>>>,
}

/// One ref in use: at most one operation on it at a time.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// Notified when the ingest grows or closes, for writes that came
    /// ahead of the ones before them.
    filled: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// The open file and running hash, once loaded.
    live: Option<Live>,
    /// The last open or write: the writer's hold.
    used: Option<Instant>,
    /// Committed, aborted or discarded: the slot is out of the map.
    closed: bool,
}

struct Live {
    file: File,
    /// The sha256 of the first `hashed` bytes.
    hasher: Sha256,
    hashed: u64,
    /// The length of the file.
    len: u64,
    meta: IngestMeta,
}

impl Live {
    /// Writes `data` at `offset` (at or before the end; what it repeats
    /// must equal the bytes held), hashes what it adds, and returns the new
    /// length. Errors as [`Ingests::write`]'s.
    fn append(&mut self, reference: &str, offset: i64, data: &[u8], path: &Path) -> Result<u64> {
        let end = self.len;
        let start = u64::try_from(offset)
            .ok()
            .filter(|start| *start <= end)
            .ok_or_else(|| ContentError::WrongOffset {
                reference: reference.to_string(),
                offset,
                end,
            })?;
        let new_end = start + data.len() as u64;
        let expected = self.meta.expected_size;
        if expected > 0 && new_end > expected {
            let digest = match self.meta.expected_digest.as_str() {
                "" => "(no digest)".to_string(),
                digest => digest.to_string(),
            };
            return Err(ContentError::PastExpectedSize {
                digest,
                reference: reference.to_string(),
                end: new_end,
                expected,
            });
        }

        // The repeated part must be what is there; only the tail is new.
        let repeated = (end - start).min(data.len() as u64) as usize;
        if repeated > 0 {
            let mut held = vec![0; repeated];
            self.file
                .read_exact_at(&mut held, start)
                .map_err(ContentError::io("read", path))?;
            if held != data[..repeated] {
                return Err(ContentError::OverlapDiffers {
                    reference: reference.to_string(),
                    offset,
                });
            }
        }
        let tail = &data[repeated..];
        self.file
            .write_all_at(tail, end)
            .map_err(ContentError::io("write", path))?;
        self.hasher.update(tail);
        self.len = end.max(new_end);
        self.hashed = self.len;
        Ok(self.len)
    }

    /// Checks the bytes against each size given (0: unknown) and the
    /// digest; needs [`Live::catch_up`] first.
    fn verify(&self, digest: &Digest, sizes: &[u64]) -> Result<()> {
        if let Some(&expected) = sizes.iter().find(|&&s| s > 0 && s != self.len) {
            return Err(ContentError::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual: self.len,
            });
        }
        let actual = Digest::from_sha256(&self.hasher.clone().finalize());
        if actual != *digest {
            return Err(ContentError::DigestMismatch {
                digest: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    /// Makes the verified bytes at `data` the blob file `blob`: synced,
    /// read-only, renamed, and the rename synced.
    fn place(&self, data: &Path, blob: &Path) -> Result<()> {
        self.file
            .sync_all()
            .map_err(ContentError::io("sync", data))?;
        let read_only = std::fs::Permissions::from_mode(0o444);
        std::fs::set_permissions(data, read_only)
            .map_err(ContentError::io("make read-only", data))?;
        std::fs::rename(data, blob).map_err(ContentError::io("rename", data))?;
        match blob.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    }

    /// Hashes what the file holds past what was hashed: after a load from
    /// disk, the bytes written before it. A no-op while writes come in
    /// through this service, which hash as they write.
    fn catch_up(&mut self, path: &Path) -> Result<()> {
        let mut buf = vec![0; (1 << 20).min((self.len - self.hashed) as usize)];
        while self.hashed < self.len {
            let want = buf.len().min((self.len - self.hashed) as usize);
            let n = self
                .file
                .read_at(&mut buf[..want], self.hashed)
                .map_err(ContentError::io("read", path))?;
            if n == 0 {
                // The file is shorter than it was: take it as it is now.
                self.len = self.hashed;
                break;
            }
            self.hasher.update(&buf[..n]);
            self.hashed += n as u64;
        }
        Ok(())
    }
}

impl Ingests {
    /// The ingests under `root` (`ROOT/ingest`), created if missing.
    pub fn open(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(ContentError::io("create directory", root))?;
        Ok(Ingests {
            root: root.to_path_buf(),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The directory of one ingest.
    pub fn dir(&self, namespace: &str, reference: &str) -> PathBuf {
        self.root.join(namespace_dir(namespace)).join(reference)
    }

    /// Starts an ingest, or resumes the one under `reference` at the end of
    /// its bytes, and takes the ref for the caller.
    ///
    /// `FailedPrecondition` when another writer used the ref less than
    /// [`HOLD`] ago, or when a resumed ingest expects another digest, size
    /// or lease than `asked` (an empty field of either side is no
    /// conflict: the known one holds).
    pub fn open_ingest(
        &self,
        namespace: &str,
        reference: &str,
        asked: &IngestMeta,
    ) -> Result<Opened> {
        loop {
            let slot = self.slot(namespace, reference, true);
            let mut state = lock(&slot.state);
            // Committed or aborted while this caller waited: start afresh.
            if state.closed {
                continue;
            }
            if let Some(used) = state.used {
                if used.elapsed() < HOLD {
                    return Err(ContentError::IngestHeld {
                        reference: reference.to_string(),
                        idle: used.elapsed(),
                        hold: HOLD,
                    });
                }
            }

            // A loaded ingest is resumed as it is in memory; otherwise
            // from disk, or created.
            let dir = self.dir(namespace, reference);
            let resumed = match state.live.as_mut() {
                Some(live) => {
                    reconcile(&dir, reference, &mut live.meta, asked)?;
                    true
                }
                None => {
                    let (live, resumed) = match load(&dir)? {
                        Some(mut live) => {
                            reconcile(&dir, reference, &mut live.meta, asked)?;
                            (live, true)
                        }
                        None => (create(&dir, asked)?, false),
                    };
                    state.live = Some(live);
                    resumed
                }
            };
            state.used = Some(Instant::now());
            let offset = state.live.as_ref().map_or(0, |live| live.len);
            return Ok(Opened { offset, resumed });
        }
    }

    /// Writes `data` at `offset` and returns the ingest's new length.
    ///
    /// A write that starts a little past the end (at most [`AHEAD_MAX`])
    /// waits up to [`GAP_WAIT`] for the writes before it, so a writer may
    /// keep a few chunks in flight; they are still written, and hashed, in
    /// order.
    ///
    /// `NotFound` without such an ingest. `InvalidArgument` when `offset`
    /// is past the end (after that wait), when the bytes repeated differ
    /// from those held, or when the ingest would outgrow its expected size
    /// (which discards it: those bytes can never commit).
    pub fn write(&self, namespace: &str, reference: &str, offset: i64, data: &[u8]) -> Result<u64> {
        let slot = self.slot(namespace, reference, false);
        let mut state = self.wait_for_turn(namespace, reference, &slot, offset)?;
        let path = self.dir(namespace, reference).join("data");
        let live = state
            .live
            .as_mut()
            .ok_or_else(|| ContentError::IngestNotFound {
                reference: reference.to_string(),
            })?;
        live.catch_up(&path)?;

        match live.append(reference, offset, data, &path) {
            Ok(len) => {
                state.used = Some(Instant::now());
                slot.filled.notify_all();
                Ok(len)
            }
            Err(err @ ContentError::PastExpectedSize { .. }) => {
                self.discard(namespace, reference, &slot, &mut state);
                Err(err)
            }
            Err(err @ ContentError::Io { .. }) => {
                // The file may hold part of the write: reload it next time.
                state.live = None;
                Err(err)
            }
            Err(err) => Err(err),
        }
    }

    /// Locks the ingest for a write at `offset`, loaded: at once, or once
    /// the writes before it filled the gap (see [`Ingests::write`]), or
    /// when [`GAP_WAIT`] is over. `NotFound` without the ingest.
    fn wait_for_turn<'s>(
        &self,
        namespace: &str,
        reference: &str,
        slot: &'s Arc<Slot>,
        offset: i64,
    ) -> Result<MutexGuard<'s, SlotState>> {
        let mut state = lock(&slot.state);
        let deadline = Instant::now() + GAP_WAIT;
        loop {
            if !self.ensure_loaded(namespace, reference, slot, &mut state)? {
                return Err(ContentError::IngestNotFound {
                    reference: reference.to_string(),
                });
            }
            state.used = Some(Instant::now());
            let end = state.live.as_ref().map_or(0, |live| live.len);
            let ahead = u64::try_from(offset).is_ok_and(|at| at > end && at - end <= AHEAD_MAX);
            let now = Instant::now();
            if !ahead || now >= deadline {
                return Ok(state);
            }
            state = match slot.filled.wait_timeout(state, deadline - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Loads the ingest into its slot from disk if it is not loaded; false
    /// when there is none (the slot is closed then).
    fn ensure_loaded(
        &self,
        namespace: &str,
        reference: &str,
        slot: &Arc<Slot>,
        state: &mut SlotState,
    ) -> Result<bool> {
        if state.closed {
            return Ok(false);
        }
        if state.live.is_none() {
            match load(&self.dir(namespace, reference))? {
                Some(live) => state.live = Some(live),
                None => {
                    self.close(namespace, reference, slot, state);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Verifies the ingest against `digest` and the sizes given (commit's
    /// and open's, each when known) and moves its bytes to `blob`, or, when
    /// `blob` exists already, drops them: nothing is stored twice.
    ///
    /// `Ok(None)` without such an ingest. A size or digest mismatch is
    /// `InvalidArgument` and discards the ingest. The blob file is synced
    /// and read-only before its rename, and the rename is synced.
    pub fn commit(
        &self,
        namespace: &str,
        reference: &str,
        digest: &Digest,
        sizes: &[u64],
        blob: &Path,
    ) -> Result<Option<Placed>> {
        let slot = self.slot(namespace, reference, false);
        let mut state = lock(&slot.state);
        if !self.ensure_loaded(namespace, reference, &slot, &mut state)? {
            return Ok(None);
        }
        let data = self.dir(namespace, reference).join("data");
        let Some(live) = state.live.as_mut() else {
            return Ok(None);
        };
        live.catch_up(&data)?;

        // Verify before anything becomes visible.
        let size = live.len;
        if let Err(err) = live.verify(digest, sizes) {
            self.discard(namespace, reference, &slot, &mut state);
            return Err(err);
        }
        let stored = !blob.exists();
        if stored {
            live.place(&data, blob)?;
        }
        self.discard(namespace, reference, &slot, &mut state);
        Ok(Some(Placed { size, stored }))
    }

    /// Drops an ingest; `NotFound` without one.
    pub fn abort(&self, namespace: &str, reference: &str) -> Result<()> {
        let slot = self.slot(namespace, reference, false);
        let mut state = lock(&slot.state);
        let exists = !state.closed && self.dir(namespace, reference).exists();
        self.discard(namespace, reference, &slot, &mut state);
        if !exists {
            return Err(ContentError::IngestNotFound {
                reference: reference.to_string(),
            });
        }
        Ok(())
    }

    /// Drops an ingest if there is one (commit of a blob the namespace
    /// holds already needs no bytes).
    pub fn drop_if_any(&self, namespace: &str, reference: &str) {
        let slot = self.slot(namespace, reference, false);
        let mut state = lock(&slot.state);
        self.discard(namespace, reference, &slot, &mut state);
    }

    /// Gives up the caller's hold on a ref, so the next `open` takes it at
    /// once instead of after [`HOLD`]: the content service's own pulls call
    /// it when they stop writing an ingest they will not commit now (the
    /// registry broke off), so that a pull started again resumes at once.
    /// A no-op without the ingest.
    pub fn release(&self, namespace: &str, reference: &str) {
        let key = (namespace.to_string(), reference.to_string());
        let Some(slot) = lock(&self.slots).get(&key).cloned() else {
            return;
        };
        lock(&slot.state).used = None;
    }

    /// What an ingest was opened for, from its file; `None` without one.
    pub fn meta(&self, namespace: &str, reference: &str) -> Result<Option<IngestMeta>> {
        read_meta(&self.dir(namespace, reference))
    }

    /// One ingest's progress, from its files; `NotFound` without one.
    pub fn status(&self, namespace: &str, reference: &str) -> Result<IngestStatus> {
        let dir = self.dir(namespace, reference);
        let data = dir.join("data");
        let (meta, stat) = match (read_meta(&dir)?, std::fs::metadata(&data)) {
            (Some(meta), Ok(stat)) => (meta, stat),
            _ => {
                return Err(ContentError::IngestNotFound {
                    reference: reference.to_string(),
                })
            }
        };
        let updated = stat
            .modified()
            .ok()
            .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos() as i64);
        Ok(IngestStatus {
            reference: reference.to_string(),
            meta,
            offset: stat.len(),
            updated,
            held: self.held(namespace, reference),
        })
    }

    /// Every ingest of a namespace, by ref.
    pub fn list(&self, namespace: &str) -> Result<Vec<IngestStatus>> {
        let dir = self.root.join(namespace_dir(namespace));
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(ContentError::io("list", dir)(err)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let reference = entry.file_name().to_string_lossy().into_owned();
            // A directory half made by a crash inside `open` is no ingest.
            if let Ok(status) = self.status(namespace, &reference) {
                out.push(status);
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Whether a writer holds the ref now: it used it less than [`HOLD`]
    /// ago, or is writing to it.
    fn held(&self, namespace: &str, reference: &str) -> bool {
        let key = (namespace.to_string(), reference.to_string());
        let Some(slot) = lock(&self.slots).get(&key).cloned() else {
            return false;
        };
        let held = match slot.state.try_lock() {
            Ok(state) => !state.closed && state.used.is_some_and(|used| used.elapsed() < HOLD),
            Err(_) => true,
        };
        held
    }

    /// The slot of a ref, made on first use. `open` also drops the slots
    /// unused for [`KEEP_OPEN`], so the map holds what is being written.
    fn slot(&self, namespace: &str, reference: &str, sweep: bool) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if sweep {
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || match slot.state.try_lock() {
                        Ok(state) => state.used.is_some_and(|used| used.elapsed() < KEEP_OPEN),
                        Err(_) => true,
                    }
            });
        }
        let key = (namespace.to_string(), reference.to_string());
        slots.entry(key).or_default().clone()
    }

    /// Removes the ingest's files and closes its slot.
    fn discard(&self, namespace: &str, reference: &str, slot: &Arc<Slot>, state: &mut SlotState) {
        let dir = self.dir(namespace, reference);
        if let Err(err) = std::fs::remove_dir_all(&dir) {
            if err.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %dir.display(), error = %err, "ingest directory not removed");
            }
        }
        self.close(namespace, reference, slot, state);
    }

    /// Marks the slot closed and takes it out of the map, so whoever waits
    /// for it sees the ingest gone.
    fn close(&self, namespace: &str, reference: &str, slot: &Arc<Slot>, state: &mut SlotState) {
        state.live = None;
        state.closed = true;
        slot.filled.notify_all();
        let mut slots = lock(&self.slots);
        let key = (namespace.to_string(), reference.to_string());
        if slots.get(&key).is_some_and(|held| Arc::ptr_eq(held, slot)) {
            slots.remove(&key);
        }
    }
}

/// A std mutex's guard; a panic while it was held leaves the data usable
/// (every step re-reads the files it depends on).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens an ingest on disk; `None` when it has no data file (none, or a
/// crash inside `open`). Its bytes are hashed on first use, not here, so
/// `open` answers at once however large the ingest.
fn load(dir: &Path) -> Result<Option<Live>> {
    let data = dir.join("data");
    let file = match OpenOptions::new().read(true).write(true).open(&data) {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(ContentError::io("open", data)(err)),
    };
    let len = file
        .metadata()
        .map_err(ContentError::io("stat", &data))?
        .len();
    Ok(Some(Live {
        file,
        hasher: Sha256::new(),
        hashed: 0,
        len,
        meta: read_meta(dir)?.unwrap_or_default(),
    }))
}

/// Makes a new ingest: its directory, expectations, and an empty data file.
fn create(dir: &Path, meta: &IngestMeta) -> Result<Live> {
    std::fs::create_dir_all(dir).map_err(ContentError::io("create directory", dir))?;
    write_meta(dir, meta)?;
    let data = dir.join("data");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&data)
        .map_err(ContentError::io("create", &data))?;
    Ok(Live {
        file,
        hasher: Sha256::new(),
        hashed: 0,
        len: 0,
        meta: meta.clone(),
    })
}

/// Checks a resumed ingest's expectations against what the caller asks,
/// and takes the caller's where the ingest had none.
fn reconcile(dir: &Path, reference: &str, held: &mut IngestMeta, asked: &IngestMeta) -> Result<()> {
    let mismatch = |field, held: String, asked: String| ContentError::IngestMismatch {
        reference: reference.to_string(),
        field,
        held,
        asked,
    };
    let mut merged = held.clone();
    if !asked.expected_digest.is_empty() {
        if held.expected_digest.is_empty() {
            merged.expected_digest = asked.expected_digest.clone();
        } else if held.expected_digest != asked.expected_digest {
            let (h, a) = (held.expected_digest.clone(), asked.expected_digest.clone());
            return Err(mismatch("digest", h, a));
        }
    }
    if asked.expected_size > 0 {
        if held.expected_size == 0 {
            merged.expected_size = asked.expected_size;
        } else if held.expected_size != asked.expected_size {
            let (h, a) = (held.expected_size, asked.expected_size);
            return Err(mismatch("size", h.to_string(), a.to_string()));
        }
    }
    if !asked.lease_id.is_empty() {
        if held.lease_id.is_empty() {
            merged.lease_id = asked.lease_id.clone();
        } else if held.lease_id != asked.lease_id {
            let (h, a) = (held.lease_id.clone(), asked.lease_id.clone());
            return Err(mismatch("lease", h, a));
        }
    }
    if merged != *held {
        write_meta(dir, &merged)?;
        *held = merged;
    }
    Ok(())
}

fn read_meta(dir: &Path) -> Result<Option<IngestMeta>> {
    let path = dir.join("meta.json");
    match std::fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(ContentError::corrupt(path.display().to_string())),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(ContentError::io("read", path)(err)),
    }
}

fn write_meta(dir: &Path, meta: &IngestMeta) -> Result<()> {
    let path = dir.join("meta.json");
    let tmp = dir.join("meta.json.tmp");
    let raw = serde_json::to_vec(meta).unwrap_or_default();
    let mut file = File::create(&tmp).map_err(ContentError::io("create", &tmp))?;
    file.write_all(&raw)
        .and_then(|()| file.sync_all())
        .map_err(ContentError::io("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(ContentError::io("rename", &tmp))?;
    Ok(())
}

/// Makes a rename in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(ContentError::io("sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> Digest {
        Digest::from_sha256(&Sha256::digest(data))
    }

    fn meta(digest: &Digest, size: u64) -> IngestMeta {
        IngestMeta {
            expected_digest: digest.to_string(),
            expected_size: size,
            lease_id: String::new(),
        }
    }

    /// A retried chunk is harmless, a different one at the same place is
    /// refused, a gap is refused, and the running hash is the file's.
    #[test]
    fn writes_append_and_repeats_must_match() {
        let root = tempfile::tempdir().unwrap();
        let ingests = Ingests::open(root.path()).unwrap();
        let data = b"hello, world".to_vec();
        let digest = sha(&data);
        let opened = ingests
            .open_ingest("ns", "r", &meta(&digest, data.len() as u64))
            .unwrap();
        assert_eq!(
            opened,
            Opened {
                offset: 0,
                resumed: false
            }
        );

        assert_eq!(ingests.write("ns", "r", 0, &data[..5]).unwrap(), 5);
        assert_eq!(ingests.write("ns", "r", 0, &data[..5]).unwrap(), 5);
        assert_eq!(ingests.write("ns", "r", 3, &data[3..8]).unwrap(), 8);
        let err = ingests.write("ns", "r", 2, b"XY").unwrap_err();
        assert!(matches!(err, ContentError::OverlapDiffers { .. }), "{err}");
        let err = ingests.write("ns", "r", 9, b"x").unwrap_err();
        assert!(
            matches!(err, ContentError::WrongOffset { end: 8, .. }),
            "{err}"
        );
        let err = ingests.write("ns", "r", -1, b"x").unwrap_err();
        assert!(matches!(err, ContentError::WrongOffset { .. }), "{err}");
        assert_eq!(ingests.write("ns", "r", 8, &data[8..]).unwrap(), 12);

        let blob = root.path().join("blob");
        let placed = ingests.commit("ns", "r", &digest, &[12], &blob).unwrap();
        assert_eq!(
            placed,
            Some(Placed {
                size: 12,
                stored: true
            })
        );
        assert_eq!(std::fs::read(&blob).unwrap(), data);
        assert!(!ingests.dir("ns", "r").exists());
        let err = ingests.write("ns", "r", 12, b"x").unwrap_err();
        assert!(matches!(err, ContentError::IngestNotFound { .. }), "{err}");
    }

    /// A write that arrives ahead of the one before it waits for it, so a
    /// writer may keep chunks in flight; one far past the end is refused
    /// at once, and one whose gap never fills after the wait.
    #[test]
    fn a_write_ahead_waits_for_the_one_before() {
        let root = tempfile::tempdir().unwrap();
        let ingests = Ingests::open(root.path()).unwrap();
        ingests
            .open_ingest("ns", "r", &IngestMeta::default())
            .unwrap();
        let second = std::thread::scope(|scope| {
            let second = scope.spawn(|| ingests.write("ns", "r", 4, b"5678"));
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(ingests.write("ns", "r", 0, b"1234").unwrap(), 4);
            second.join().unwrap()
        });
        assert_eq!(second.unwrap(), 8);

        let start = Instant::now();
        let far = ingests.write("ns", "r", (AHEAD_MAX + 9) as i64, b"x");
        assert!(matches!(far, Err(ContentError::WrongOffset { end: 8, .. })));
        assert!(start.elapsed() < GAP_WAIT);
        let near = ingests.write("ns", "r", 9, b"x");
        assert!(matches!(
            near,
            Err(ContentError::WrongOffset { end: 8, .. })
        ));
        assert!(start.elapsed() >= GAP_WAIT);
        let blob = root.path().join("blob");
        let placed = ingests
            .commit("ns", "r", &sha(b"12345678"), &[8], &blob)
            .unwrap();
        assert_eq!(placed.map(|p| p.size), Some(8));
    }

    /// A second open of a ref in use is refused; once the ref is committed
    /// it can be opened afresh.
    #[test]
    fn a_second_writer_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let ingests = Ingests::open(root.path()).unwrap();
        ingests
            .open_ingest("ns", "r", &IngestMeta::default())
            .unwrap();
        let err = ingests
            .open_ingest("ns", "r", &IngestMeta::default())
            .unwrap_err();
        assert!(matches!(err, ContentError::IngestHeld { .. }), "{err}");
        assert_eq!(err.code(), berth_bus::Code::FailedPrecondition);
        assert!(ingests.status("ns", "r").unwrap().held);

        // Another namespace's ref of the same name is another ingest.
        ingests
            .open_ingest("other", "r", &IngestMeta::default())
            .unwrap();

        ingests.write("ns", "r", 0, b"abc").unwrap();
        let blob = root.path().join("blob");
        ingests.commit("ns", "r", &sha(b"abc"), &[], &blob).unwrap();
        let opened = ingests
            .open_ingest("ns", "r", &IngestMeta::default())
            .unwrap();
        assert_eq!(
            opened,
            Opened {
                offset: 0,
                resumed: false
            }
        );
    }

    /// An ingest left on disk (a restart) resumes at the end of its file,
    /// is hashed once, and commits with the right digest.
    #[test]
    fn an_ingest_on_disk_resumes_at_its_end() {
        let root = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let digest = sha(&data);
        {
            let ingests = Ingests::open(root.path()).unwrap();
            ingests.open_ingest("ns", "r", &meta(&digest, 0)).unwrap();
            ingests.write("ns", "r", 0, &data[..100_000]).unwrap();
        }
        let ingests = Ingests::open(root.path()).unwrap();
        assert_eq!(ingests.status("ns", "r").unwrap().offset, 100_000);
        let opened = ingests
            .open_ingest("ns", "r", &meta(&digest, data.len() as u64))
            .unwrap();
        assert_eq!(
            opened,
            Opened {
                offset: 100_000,
                resumed: true
            }
        );
        assert_eq!(
            ingests.meta("ns", "r").unwrap().unwrap().expected_size,
            300_000
        );
        ingests.write("ns", "r", 100_000, &data[100_000..]).unwrap();
        let blob = root.path().join("blob");
        let placed = ingests.commit("ns", "r", &digest, &[], &blob).unwrap();
        assert_eq!(placed.unwrap().size, 300_000);
    }

    /// Each way an ingest can be wrong is refused with its own error, and
    /// the ones that can never commit discard the ingest.
    #[test]
    fn bad_ingests_are_refused_and_discarded() {
        let root = tempfile::tempdir().unwrap();
        let ingests = Ingests::open(root.path()).unwrap();
        let blob = root.path().join("blob");
        let good = sha(b"abc");
        type Check = fn(&ContentError) -> bool;
        let cases: [(&str, Check, bool); 4] = [
            (
                "size",
                |e| matches!(e, ContentError::SizeMismatch { .. }),
                true,
            ),
            (
                "digest",
                |e| matches!(e, ContentError::DigestMismatch { .. }),
                true,
            ),
            (
                "too-long",
                |e| matches!(e, ContentError::PastExpectedSize { .. }),
                true,
            ),
            (
                "resume",
                |e| matches!(e, ContentError::IngestMismatch { .. }),
                false,
            ),
        ];
        for (name, check, discarded) in cases {
            ingests.open_ingest("ns", name, &meta(&good, 3)).unwrap();
            let err = match name {
                "size" => {
                    ingests.write("ns", name, 0, b"ab").unwrap();
                    ingests.commit("ns", name, &good, &[3], &blob).unwrap_err()
                }
                "digest" => {
                    ingests.write("ns", name, 0, b"abd").unwrap();
                    ingests.commit("ns", name, &good, &[3], &blob).unwrap_err()
                }
                "too-long" => ingests.write("ns", name, 0, b"abcd").unwrap_err(),
                _ => {
                    // Past the hold, as a writer coming back later.
                    let slot = ingests.slot("ns", name, false);
                    lock(&slot.state).used = None;
                    drop(slot);
                    ingests
                        .open_ingest("ns", name, &meta(&sha(b"x"), 3))
                        .unwrap_err()
                }
            };
            assert!(check(&err), "{name}: {err}");
            assert_eq!(ingests.dir("ns", name).exists(), !discarded, "{name}");
            assert!(!blob.exists(), "{name}");
        }
    }
}
