//! Layer apply: unpacks one OCI layer stream into a snapshot's upper directory.
//!
//! A layer is applied to the snapshot's own upper directory, never through an
//! overlay mount, so the result is exactly what overlayfs expects of an upper
//! layer: OCI whiteouts (`.wh.<name>`) become 0:0 character devices, opaque
//! markers (`.wh..wh..opq`) become the `trusted.overlay.opaque=y` xattr, and
//! the committed parent layers ("lowers", top-most first) are only read: to
//! copy the attributes of parent directories a layer leaves out, and to turn
//! a hardlink to a lower file into a copy (a link into a shared layer would let
//! one image change another's files).
//!
//! Four threads share the work. The calling thread reads the blob and
//! inflates it; two scoped hashing threads take copies of what it read and
//! of what it inflated, over bounded channels, and hash them (the blob's
//! digest and the diff ID); a scoped writer thread takes the tar stream in
//! chunks and writes the files. So reading, hashing, inflating and writing
//! overlap, and none of them waits for another but through a full channel.
//!
//! Every name is confined to the upper directory: `..` is clipped at the root
//! and absolute names are taken as relative to it (chroot-style scoping, as
//! other runtimes do), parents are opened with `openat2(RESOLVE_IN_ROOT)` so a symlink
//! the layer made resolves inside the root too, and every change is a `*at()`
//! call on a directory descriptor with `O_NOFOLLOW` on the last component.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstat, fstatat, futimens, makedev, mkdirat, mknodat, utimensat,
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};

/// Bytes in one chunk passed from the inflating thread to the writer.
const CHUNK_SIZE: usize = 256 * 1024;

/// Chunks in flight between the two threads (bounds memory to about 4 MiB).
const CHANNEL_DEPTH: usize = 16;

/// Tar streams are made of blocks of this size.
const BLOCK_SIZE: u64 = 512;

/// The xattr overlayfs reads to decide that a directory hides the layers below.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip, possibly in several members (inflated with the zlib-rs backend).
    Gzip,
    /// zstd, possibly in several frames.
    Zstd,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// Maps an OCI or Docker layer media type to its compression.
///
/// Any other media type (a config, a manifest, an encrypted or unknown layer
/// type) is [`ApplyError::UnsupportedMediaType`].
pub fn compression_for(media_type: &str) -> Result<Compression, ApplyError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(ApplyError::UnsupportedMediaType(other.to_string())),
    }
}

/// What [`apply_layer`] measured while it read the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `sha256:<hex>` of the uncompressed tar stream; the caller compares it
    /// with the image config's diff ID.
    pub diff_id: String,
    /// `sha256:<hex>` of the bytes read, as stored in the content store.
    pub compressed_digest: String,
    /// Bytes read from the layer stream.
    pub compressed_size: u64,
    /// Bytes of the uncompressed tar stream.
    pub uncompressed_size: u64,
}

/// Bounds on what applying one layer may write, checked as the stream is
/// inflated so that a decompression bomb is refused before it fills the
/// disk: the writer is at most a few chunks behind the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLimits {
    /// The most bytes the uncompressed tar stream may hold.
    pub max_size: u64,
    /// The free bytes the snapshot filesystem must keep; the apply stops
    /// when the free space falls below it. 0 turns the check off.
    pub min_free: u64,
}

impl LayerLimits {
    /// No bounds.
    pub const NONE: LayerLimits = LayerLimits {
        max_size: u64::MAX,
        min_free: 0,
    };
}

/// How many uncompressed bytes pass between two looks at the free space.
const FREE_CHECK_EVERY: u64 = 64 << 20;

/// Why a layer could not be applied.
///
/// For the wire code: [`ApplyError::is_invalid_input`] is true for the
/// variants caused by the layer's bytes (`InvalidArgument`); `Read` is a
/// failure of the content source (`Unavailable` or `Internal`, as the source
/// says), and `Io` and `OpenDir` are failures of the snapshot filesystem
/// (`Internal`).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The media type is not a layer type berth can unpack (invalid input).
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    /// The layer stream itself could not be read (io).
    #[error("failed to read layer stream")]
    Read(#[source] io::Error),
    /// The compressed data is corrupt or ends early (invalid input).
    #[error("layer is not a valid {compression} stream")]
    Decompress {
        /// `gzip` or `zstd`.
        compression: &'static str,
        /// What the decoder reported.
        #[source]
        source: io::Error,
    },
    /// The tar stream is malformed (invalid input).
    #[error("layer tar stream is malformed after entry {after:?}")]
    Tar {
        /// The last entry read before the fault, empty at the start.
        after: String,
        /// What the tar reader reported.
        #[source]
        source: io::Error,
    },
    /// The tar stream ends inside an entry's data (invalid input).
    #[error("layer tar stream ends inside the data of {path:?}")]
    Truncated {
        /// The entry whose data is cut short.
        path: String,
    },
    /// An entry cannot be applied as it stands (invalid input).
    #[error("layer entry {path:?} is invalid: {reason}")]
    InvalidEntry {
        /// The entry's name as stored in the layer.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A parent of the entry is a non-directory in this layer or below it
    /// (invalid input).
    #[error("a parent of layer entry {path:?} is not a directory")]
    NotADirectory {
        /// The entry's name as stored in the layer.
        path: String,
    },
    /// A hardlink names a file that is neither earlier in the layer nor in a
    /// lower layer (invalid input).
    #[error("hardlink {path:?} names {target:?}, which is not in the layer or below it")]
    LinkTargetNotFound {
        /// The hardlink's name.
        path: String,
        /// The name it links to.
        target: String,
    },
    /// The uncompressed layer is larger than the limit (invalid input): a
    /// decompression bomb, or a layer this node is set to refuse.
    #[error("layer inflates past the {limit} byte limit on one layer's uncompressed size")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The snapshot filesystem is nearly full (not the layer's fault).
    #[error("snapshot filesystem has {free} bytes free, under the {reserve} bytes it keeps free")]
    NoSpace {
        /// Free bytes when the apply stopped.
        free: u64,
        /// The reserve it keeps.
        reserve: u64,
    },
    /// A snapshot directory could not be opened (io).
    #[error("failed to open snapshot directory {path}")]
    OpenDir {
        /// The upper or lower directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A filesystem call on the upper directory failed (io).
    #[error("failed to {op} {path:?}")]
    Io {
        /// What was being done, e.g. `create file`.
        op: &'static str,
        /// The entry's name inside the snapshot.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl ApplyError {
    /// True when the layer's bytes are at fault (`InvalidArgument` on the
    /// wire), false when reading the source or writing the snapshot failed.
    pub fn is_invalid_input(&self) -> bool {
        !matches!(
            self,
            ApplyError::Read(_)
                | ApplyError::OpenDir { .. }
                | ApplyError::Io { .. }
                | ApplyError::NoSpace { .. }
        )
    }
}

/// Applies one layer stream to `upper`, the snapshot's own upper directory.
///
/// `layer` is the blob as stored in the content store, compressed as
/// `compression` says. `lowers` are the committed parent layers' directories,
/// top-most first; they are only read, to copy the mode, owner, xattrs and
/// mtime of parent directories the layer leaves out (else 0755 root), and to
/// copy a lower file that a hardlink in the layer names. The root of `upper`
/// takes its attributes from the top-most lower root (or the layer's `.`
/// entry), because overlayfs shows the upper root's attributes.
///
/// Layers that end without the tar end-of-archive blocks, even without the
/// last entry's padding, are accepted (some image tools write them); a compressed
/// stream that ends early is [`ApplyError::Decompress`].
///
/// Not idempotent: on error `upper` holds part of the layer, and the caller
/// removes it (a snapshot is committed only after a successful apply). The
/// caller also `syncfs`es the upper directory before committing it.
///
/// # Limitations
///
/// A parent that is a symlink in a lower layer is not followed: the entry
/// fails with [`ApplyError::NotADirectory`], as does one below a lower file.
/// Device nodes that cannot be created (no `CAP_MKNOD`) and xattrs the
/// filesystem does not support are skipped with a warning. `trusted.overlay.*`
/// and `user.overlay.*` xattrs in a layer are dropped, since overlayfs would
/// obey them.
pub fn apply_layer(
    layer: impl Read,
    compression: Compression,
    upper: &Path,
    lowers: &[PathBuf],
) -> Result<Applied, ApplyError> {
    apply_layer_with(layer, compression, upper, lowers, LayerLimits::NONE)
}

/// [`apply_layer`] within `limits`: [`ApplyError::TooLarge`] as soon as the
/// uncompressed stream passes `limits.max_size`, [`ApplyError::NoSpace`]
/// when the snapshot filesystem's free space falls below
/// `limits.min_free`. Either way `upper` holds part of the layer (at most
/// the limit and a few chunks), which the caller removes as after any
/// other failure.
pub fn apply_layer_with(
    layer: impl Read,
    compression: Compression,
    upper: &Path,
    lowers: &[PathBuf],
    limits: LayerLimits,
) -> Result<Applied, ApplyError> {
    let unpacker = Unpacker::open(upper, lowers)?;
    let (tx, rx) = mpsc::sync_channel(CHANNEL_DEPTH);

    // The writer and the hashers run on their own threads, so the layer
    // reader need not be Send.
    let (read, written, compressed, diff_id) = thread::scope(|scope| {
        let (compressed_tx, compressed) = hash_thread(scope);
        let (diff_tx, diff_id) = hash_thread(scope);
        let writer = scope.spawn(move || unpacker.unpack(ChannelReader::new(rx)));
        let mut source = CountingReader::new(layer, compressed_tx);
        let read = pump(
            &mut source,
            compression,
            tx,
            diff_tx,
            &Guard { limits, upper },
        );
        let count = source.count;
        drop(source);
        let written = joined(writer);
        (read, written, (joined(compressed), count), joined(diff_id))
    });

    // A failed read aborts the writer too, so the reader's error is the cause;
    // a failed writer stops the reader, so then the writer's error is.
    let uncompressed = match (read, written) {
        (Err(PumpError::Failed(e)), _) => return Err(e),
        (Err(PumpError::WriterGone), Err(e)) | (Ok(_), Err(e)) => return Err(e),
        // The writer only succeeds after draining the stream, so this would
        // be a bug here, reported rather than trusted.
        (Err(PumpError::WriterGone), Ok(())) => {
            return Err(ApplyError::Read(io::Error::other(
                "layer writer stopped early",
            )))
        }
        (Ok(size), Ok(())) => size,
    };
    Ok(Applied {
        diff_id: diff_id.to_string(),
        compressed_digest: compressed.0.to_string(),
        compressed_size: compressed.1,
        uncompressed_size: uncompressed,
    })
}

/// Gives the root of `upper` the mode, owner and xattrs of the top-most lower
/// root (0755 root:root without lowers), as [`apply_layer`] does.
///
/// The snapshot service calls this on the empty upper of an active snapshot
/// before mounting it, since overlayfs shows the upper root's attributes.
/// Idempotent.
pub fn init_upper(upper: &Path, lowers: &[PathBuf]) -> Result<(), ApplyError> {
    let mut unpacker = Unpacker::open(upper, lowers)?;
    unpacker.init_root()?;
    unpacker.finish()
}

// ---------------------------------------------------------------------------
// The stream: read, hash, inflate, hash, hand over.

/// A reader that counts what passes through it, sends a copy to be hashed,
/// and remembers whether the source (not a decoder above it) failed.
struct CountingReader<R> {
    inner: R,
    hash: mpsc::SyncSender<Bytes>,
    count: u64,
    failed: bool,
}

impl<R: Read> CountingReader<R> {
    fn new(inner: R, hash: mpsc::SyncSender<Bytes>) -> Self {
        CountingReader {
            inner,
            hash,
            count: 0,
            failed: false,
        }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.failed = true)?;
        if n > 0 {
            // The hasher lives as long as this reader; a send fails only
            // after it panicked, which its join reports.
            let _ = self.hash.send(Bytes::copy_from_slice(&buf[..n]));
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// A thread that hashes what it is sent until the sender is dropped; its
/// handle gives the digest.
fn hash_thread<'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
) -> (
    mpsc::SyncSender<Bytes>,
    thread::ScopedJoinHandle<'scope, Digest256>,
) {
    let (tx, rx) = mpsc::sync_channel::<Bytes>(CHANNEL_DEPTH);
    let handle = scope.spawn(move || {
        let mut hasher = Sha256::new();
        for chunk in rx {
            hasher.update(&chunk);
        }
        Digest256(hasher.finalize().into())
    });
    (tx, handle)
}

/// A sha256 digest, shown as `sha256:<hex>`.
struct Digest256([u8; 32]);

impl std::fmt::Display for Digest256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// A scoped thread's result, its panic passed on.
fn joined<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// One message from the inflating thread to the writer.
enum Chunk {
    Data(Bytes),
    /// The tar stream ended cleanly; a dropped sender without it is an abort.
    End,
}

enum PumpError {
    Failed(ApplyError),
    /// The writer stopped early; its own error says why.
    WriterGone,
}

/// The limits of one apply and the directory whose filesystem they watch.
struct Guard<'a> {
    limits: LayerLimits,
    upper: &'a Path,
}

impl Guard<'_> {
    /// Checks the stream after `before` bytes grew to `after`.
    fn check(&self, before: u64, after: u64) -> Result<(), ApplyError> {
        if after > self.limits.max_size {
            return Err(ApplyError::TooLarge {
                limit: self.limits.max_size,
            });
        }
        let reserve = self.limits.min_free;
        if reserve > 0 && before / FREE_CHECK_EVERY != after / FREE_CHECK_EVERY {
            // A failed look is not a reason to stop: the writes would fail
            // on their own if the filesystem were gone.
            if let Ok(stat) = nix::sys::statvfs::statvfs(self.upper) {
                // The counts are narrower than u64 on 32-bit targets.
                #[allow(clippy::unnecessary_cast)]
                let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
                if free < reserve {
                    return Err(ApplyError::NoSpace { free, reserve });
                }
            }
        }
        Ok(())
    }
}

/// Reads the whole layer, inflates it and sends the tar stream to the
/// writer and to `diff` (its hasher), stopping as soon as `guard` refuses
/// the stream's size. Returns the stream's size.
fn pump<R: Read>(
    source: &mut CountingReader<R>,
    compression: Compression,
    tx: mpsc::SyncSender<Chunk>,
    diff: mpsc::SyncSender<Bytes>,
    guard: &Guard<'_>,
) -> Result<u64, PumpError> {
    let mut buffered = BufReader::with_capacity(CHUNK_SIZE, source);
    let mut size = 0u64;

    let inflated = (|| -> io::Result<Result<(), PumpError>> {
        let mut decoder: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut buffered),
            Compression::Gzip => Box::new(MultiGzDecoder::new(&mut buffered)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(&mut buffered)?),
        };
        loop {
            let chunk = Bytes::from(read_chunk(&mut decoder)?);
            if chunk.is_empty() {
                return Ok(Ok(()));
            }
            let grown = size + chunk.len() as u64;
            if let Err(refused) = guard.check(size, grown) {
                return Ok(Err(PumpError::Failed(refused)));
            }
            // The hasher lives as long as this call; a send fails only
            // after it panicked, which its join reports.
            let _ = diff.send(chunk.clone());
            size = grown;
            if tx.send(Chunk::Data(chunk)).is_err() {
                return Ok(Err(PumpError::WriterGone));
            }
        }
    })();

    // Classify a failure by where it came from: the source, or the data.
    match inflated {
        Ok(Ok(())) => {}
        Ok(Err(gone)) => return Err(gone),
        Err(e) if buffered.get_ref().failed => return Err(PumpError::Failed(ApplyError::Read(e))),
        Err(e) => {
            let compression = compression.name();
            return Err(PumpError::Failed(ApplyError::Decompress {
                compression,
                source: e,
            }));
        }
    }

    // Bytes after the last gzip member or zstd frame still count for the digest.
    io::copy(&mut buffered, &mut io::sink()).map_err(|e| PumpError::Failed(ApplyError::Read(e)))?;
    tx.send(Chunk::End).map_err(|_| PumpError::WriterGone)?;
    Ok(size)
}

/// Reads up to one chunk, fewer only at the end of the stream.
fn read_chunk(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut chunk = vec![0u8; CHUNK_SIZE];
    let mut filled = 0;
    while filled < chunk.len() {
        match reader.read(&mut chunk[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    chunk.truncate(filled);
    Ok(chunk)
}

/// The writer's view of the tar stream. At its end it adds the zeros that
/// complete the last 512-byte block, so a layer that stops right after its
/// last entry's data reads as a clean end; [`Unpacker::unpack`] then checks
/// that no entry's data reached into those zeros.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    chunk: Bytes,
    pos: usize,
    /// Bytes received, without the padding.
    real_len: u64,
    ended: bool,
    padding: u64,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            chunk: Bytes::new(),
            pos: 0,
            real_len: 0,
            ended: false,
            padding: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.ended {
                let n = buf.len().min(self.padding as usize);
                buf[..n].fill(0);
                self.padding -= n as u64;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(chunk)) => {
                    self.real_len += chunk.len() as u64;
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Chunk::End) => {
                    self.ended = true;
                    self.padding = (BLOCK_SIZE - self.real_len % BLOCK_SIZE) % BLOCK_SIZE;
                }
                Err(_) => return Err(io::Error::other("layer stream aborted")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Names and whiteouts.

/// What a base name means to the overlay encoding.
#[derive(Debug, PartialEq, Eq)]
enum Whiteout<'a> {
    /// An ordinary name.
    None,
    /// `.wh..wh..opq`: the directory holding it hides the layers below.
    Opaque,
    /// `.wh.<name>`: `<name>` is deleted.
    Remove(&'a [u8]),
    /// Other `.wh..wh.` names (bookkeeping of older union filesystems): ignored.
    Meta,
    /// `.wh.`, `.wh..` and `.wh...`: names nothing.
    Invalid,
}

fn parse_whiteout(base: &[u8]) -> Whiteout<'_> {
    if base == b".wh..wh..opq" {
        return Whiteout::Opaque;
    }
    if base.starts_with(b".wh..wh.") {
        return Whiteout::Meta;
    }
    match base.strip_prefix(b".wh.") {
        None => Whiteout::None,
        Some(b"" | b"." | b"..") => Whiteout::Invalid,
        Some(name) => Whiteout::Remove(name),
    }
}

/// Splits an entry name into components inside the root: empty and `.`
/// components go, `..` removes the previous one and stops at the root, and a
/// leading `/` means the root.
fn clean_path(raw: &[u8]) -> Option<Vec<&[u8]>> {
    if raw.contains(&0) {
        return None;
    }
    let mut comps: Vec<&[u8]> = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                comps.pop();
            }
            comp => comps.push(comp),
        }
    }
    Some(comps)
}

fn join(comps: &[&[u8]]) -> Vec<u8> {
    comps.join(&b'/')
}

fn lossy(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

// ---------------------------------------------------------------------------
// The writer.

/// Access and modification time of an entry.
#[derive(Clone, Copy)]
struct Times {
    atime: TimeSpec,
    mtime: TimeSpec,
}

impl Times {
    fn of(stat: &FileStat) -> Times {
        Times {
            atime: TimeSpec::new(stat.st_atime, stat.st_atime_nsec),
            mtime: TimeSpec::new(stat.st_mtime, stat.st_mtime_nsec),
        }
    }
}

/// The attributes a layer entry carries.
struct Attrs {
    mode: Mode,
    uid: Uid,
    gid: Gid,
    times: Times,
    xattrs: Xattrs,
}

/// Where the top-most layer holding a path has it.
enum Hit {
    /// Found in layer `layer` (0 is the upper directory, then the lowers).
    Found {
        layer: usize,
        dir: OwnedFd,
        name: Vec<u8>,
        stat: FileStat,
    },
    /// A non-directory sits on the way to the path, so nothing is below it.
    NonDir,
    /// No layer has it, or it is whited out.
    Absent,
}

/// The upper copy of a lower file that a hardlink in this layer named, so
/// later hardlinks to the same file link to that copy.
struct LowerCopy {
    path: Vec<Vec<u8>>,
    dev: u64,
    ino: u64,
}

struct Unpacker {
    upper: OwnedFd,
    lowers: Vec<OwnedFd>,
    /// Directory mtimes, set at the end because adding entries changes them.
    dir_times: Vec<(Vec<Vec<u8>>, Times)>,
    lower_copies: HashMap<Vec<u8>, LowerCopy>,
    buf: Vec<u8>,
}

fn open_dir(path: &Path) -> Result<OwnedFd, ApplyError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    nix::fcntl::open(path, flags, Mode::empty()).map_err(|e| ApplyError::OpenDir {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

fn io_err<'a, E: Into<io::Error>>(
    op: &'static str,
    path: &'a [u8],
) -> impl FnOnce(E) -> ApplyError + 'a {
    move |e| ApplyError::Io {
        op,
        path: lossy(path),
        source: e.into(),
    }
}

impl Unpacker {
    fn open(upper: &Path, lowers: &[PathBuf]) -> Result<Unpacker, ApplyError> {
        let lowers = lowers
            .iter()
            .map(|p| open_dir(p))
            .collect::<Result<_, _>>()?;
        Ok(Unpacker {
            upper: open_dir(upper)?,
            lowers,
            dir_times: Vec::new(),
            lower_copies: HashMap::new(),
            buf: vec![0; CHUNK_SIZE],
        })
    }

    /// Applies every entry, then checks the stream's end and sets directory
    /// times. Drains the stream so the reader can hash all of it.
    fn unpack(mut self, reader: ChannelReader) -> Result<(), ApplyError> {
        self.init_root()?;
        let mut archive = tar::Archive::new(reader);
        let mut last = String::new();
        let mut data_end = 0u64;
        let applied = (|| {
            let entries = archive.entries().map_err(|source| ApplyError::Tar {
                after: String::new(),
                source,
            })?;
            for entry in entries {
                let mut entry = entry.map_err(|source| ApplyError::Tar {
                    after: last.clone(),
                    source,
                })?;
                last = lossy(&entry.path_bytes());
                data_end = data_end.max(entry.raw_file_position() + entry.size());
                self.apply_entry(&mut entry)?;
            }
            Ok(())
        })();

        // Data that reached into the padding zeros was cut short in the layer.
        let mut reader = archive.into_inner();
        if reader.ended && data_end > reader.real_len {
            return Err(ApplyError::Truncated { path: last });
        }
        applied?;
        io::copy(&mut reader, &mut io::sink()).map_err(|source| ApplyError::Tar {
            after: last,
            source,
        })?;
        self.finish()
    }

    /// Sets the directory times collected while applying.
    fn finish(&mut self) -> Result<(), ApplyError> {
        for (path, times) in std::mem::take(&mut self.dir_times) {
            let comps: Vec<&[u8]> = path.iter().map(Vec::as_slice).collect();
            let Some((name, parent)) = comps.split_last() else {
                futimens(&self.upper, &times.atime, &times.mtime)
                    .map_err(io_err("set times of", b"/"))?;
                continue;
            };

            // A later entry may have removed the directory or replaced it.
            let Ok(dir) = self.resolve_dir(parent) else {
                continue;
            };
            match stat_at(&dir, name) {
                Ok(Some(st)) if is_dir(&st) => {}
                _ => continue,
            }
            utimensat(
                &dir,
                *name,
                &times.atime,
                &times.mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(io_err("set times of", &join(&comps)))?;
        }
        Ok(())
    }

    /// Copies the top-most lower root's attributes onto the upper root.
    fn init_root(&mut self) -> Result<(), ApplyError> {
        let Some(lower) = self.lowers.first() else {
            let upper = self.upper.as_fd();
            fchown(upper, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                .map_err(io_err("set owner of", b"/"))?;
            return fchmod(upper, Mode::from_bits_truncate(0o755))
                .map_err(io_err("set mode of", b"/"));
        };
        let st = fstat(lower).map_err(io_err("stat lower root", b"/"))?;
        let xattrs =
            list_xattrs(&XattrOn::Fd(lower.as_fd())).map_err(io_err("read xattrs of", b"/"))?;
        let attrs = Attrs {
            mode: Mode::from_bits_truncate(st.st_mode),
            uid: Uid::from_raw(st.st_uid),
            gid: Gid::from_raw(st.st_gid),
            times: Times::of(&st),
            xattrs,
        };
        let upper = self
            .upper
            .try_clone()
            .map_err(|e| io_error("open", b"/", e))?;
        self.set_dir_attrs(&upper, &[], &attrs, b"/")
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ApplyError> {
        let raw = entry.path_bytes().into_owned();
        let invalid = |reason: &str| ApplyError::InvalidEntry {
            path: lossy(&raw),
            reason: reason.into(),
        };
        let comps = clean_path(&raw).ok_or_else(|| invalid("the name holds a NUL byte"))?;
        let mut kind = entry.header().entry_type();
        if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            // Old tar formats mark a directory only by the trailing slash.
            kind = tar::EntryType::Directory;
        }
        let attrs = entry_attrs(entry, &raw)?;

        let Some((name, parent)) = comps.split_last() else {
            if !kind.is_dir() {
                return Err(invalid("the root can only be a directory"));
            }
            let upper = self
                .upper
                .try_clone()
                .map_err(|e| io_error("open", b"/", e))?;
            return self.set_dir_attrs(&upper, &[], &attrs, b"/");
        };
        match parse_whiteout(name) {
            Whiteout::None => {}
            Whiteout::Opaque => return self.make_opaque(parent, &raw),
            Whiteout::Remove(target) => return self.whiteout(parent, target, &raw),
            Whiteout::Meta => return Ok(()),
            Whiteout::Invalid => return Err(invalid("a whiteout must name an entry")),
        }

        let dir = self.parent_dir(parent, &raw)?;
        let path = join(&comps);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.write_file(&dir, name, entry, &attrs, &path)
            }
            tar::EntryType::Directory => self.make_dir(&dir, name, &comps, &attrs, &path),
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| invalid("symlink without a target"))?;
                if target.is_empty() {
                    return Err(invalid("symlink without a target"));
                }
                self.make_symlink(&dir, name, &target, &attrs, &path)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| invalid("hardlink without a target"))?;
                self.make_hardlink(&dir, name, &target, &raw, &path)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let sflag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = makedev(u64::from(major), u64::from(minor));
                self.make_node(&dir, name, sflag, dev, &attrs, &path)
            }
            tar::EntryType::XGlobalHeader => Ok(()),
            other => Err(invalid(&format!(
                "unsupported entry type {:?}",
                other.as_byte() as char
            ))),
        }
    }

    /// Opens `comps` (a directory inside upper) for `*at()` calls, following
    /// symlinks only inside the root.
    fn resolve_dir(&self, comps: &[&[u8]]) -> Result<OwnedFd, Errno> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        if comps.is_empty() {
            return openat(&self.upper, ".", flags, Mode::empty());
        }
        let how = OpenHow::new().flags(flags).resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        let path = join(comps);
        loop {
            // The kernel asks for a retry when a rename raced the lookup.
            match openat2(&self.upper, path.as_slice(), how) {
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Opens the parent directory of an entry, creating the directories the
    /// layer left out with the attributes of the top-most lower that has them.
    fn parent_dir(&mut self, parent: &[&[u8]], raw: &[u8]) -> Result<OwnedFd, ApplyError> {
        match self.resolve_dir(parent) {
            Ok(dir) => return Ok(dir),
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(e) => return Err(io_err("open parent of", raw)(e)),
        }

        // Walk down from the root, creating what is missing.
        let mut dir = self.resolve_dir(&[]).map_err(io_err("open", b"/"))?;
        for depth in 0..parent.len() {
            let prefix = &parent[..=depth];
            match self.resolve_dir(prefix) {
                Ok(next) => {
                    dir = next;
                    continue;
                }
                Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                Err(e) => return Err(io_err("open parent of", raw)(e)),
            }
            let name = prefix[depth];
            let path = join(prefix);
            match stat_at(&dir, name).map_err(io_err("stat", &path))? {
                None => dir = self.make_parent(&dir, name, prefix, raw)?,
                Some(st) if is_whiteout(&st) => {
                    // Deleted earlier in this layer and now a directory again:
                    // nothing below may show through.
                    unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
                        .map_err(io_err("remove", &path))?;
                    dir = self.new_dir(&dir, name, &path)?;
                    set_opaque(&dir, &path)?;
                }
                Some(_) => return Err(ApplyError::NotADirectory { path: lossy(raw) }),
            }
        }
        Ok(dir)
    }

    /// Creates a directory the layer did not list, as a copy of the top-most
    /// lower's attributes (else 0755 root).
    fn make_parent(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        prefix: &[&[u8]],
        raw: &[u8],
    ) -> Result<OwnedFd, ApplyError> {
        let path = join(prefix);
        let created = match self
            .lookup(prefix)
            .map_err(|e| io_error("look up", &path, e))?
        {
            Hit::Found {
                stat,
                dir: lower_dir,
                name: lower_name,
                ..
            } if is_dir(&stat) => {
                let lower = openat(
                    &lower_dir,
                    lower_name.as_slice(),
                    dir_flags(),
                    Mode::empty(),
                )
                .map_err(io_err("open lower", &path))?;
                let xattrs = list_xattrs(&XattrOn::Fd(lower.as_fd()))
                    .map_err(io_err("read xattrs of lower", &path))?;
                let attrs = Attrs {
                    mode: Mode::from_bits_truncate(stat.st_mode),
                    uid: Uid::from_raw(stat.st_uid),
                    gid: Gid::from_raw(stat.st_gid),
                    times: Times::of(&stat),
                    xattrs,
                };
                let created = self.new_dir(dir, name, &path)?;
                self.set_dir_attrs(&created, prefix, &attrs, &path)?;
                created
            }
            Hit::Found { .. } | Hit::NonDir => {
                return Err(ApplyError::NotADirectory { path: lossy(raw) })
            }
            Hit::Absent => {
                let created = self.new_dir(dir, name, &path)?;
                fchown(&created, Some(Uid::from_raw(0)), Some(Gid::from_raw(0)))
                    .map_err(io_err("set owner of", &path))?;
                fchmod(&created, Mode::from_bits_truncate(0o755))
                    .map_err(io_err("set mode of", &path))?;
                created
            }
        };
        Ok(created)
    }

    fn new_dir(&self, dir: &OwnedFd, name: &[u8], path: &[u8]) -> Result<OwnedFd, ApplyError> {
        mkdirat(dir, name, Mode::from_bits_truncate(0o700))
            .map_err(io_err("create directory", path))?;
        openat(dir, name, dir_flags(), Mode::empty()).map_err(io_err("open directory", path))
    }

    /// Finds the top-most layer (upper first, then the lowers) that has
    /// `comps`, following overlayfs: a whiteout or an opaque directory hides
    /// the layers below, and a non-directory stops a path through it.
    /// Symlinks are never followed.
    fn lookup(&self, comps: &[&[u8]]) -> io::Result<Hit> {
        let mut dir_seen = vec![false; comps.len()];
        let roots = std::iter::once(&self.upper).chain(&self.lowers);
        for (layer, root) in roots.enumerate() {
            let mut dir = openat(root, ".", dir_flags(), Mode::empty())?;
            let mut hidden_below = false;
            for (depth, name) in comps.iter().enumerate() {
                let Some(stat) = stat_at(&dir, name)? else {
                    break;
                };
                if is_whiteout(&stat) {
                    return Ok(Hit::Absent);
                }
                if depth + 1 == comps.len() {
                    return Ok(Hit::Found {
                        layer,
                        dir,
                        name: name.to_vec(),
                        stat,
                    });
                }
                if !is_dir(&stat) {
                    // Below a directory of a higher layer this file is hidden.
                    return Ok(if dir_seen[depth] {
                        Hit::Absent
                    } else {
                        Hit::NonDir
                    });
                }
                dir_seen[depth] = true;
                dir = openat(&dir, *name, dir_flags(), Mode::empty())?;
                hidden_below |= is_opaque(&dir)?;
            }
            if hidden_below {
                return Ok(Hit::Absent);
            }
        }
        Ok(Hit::Absent)
    }

    /// Marks a directory opaque; the marker may come before or after the
    /// directory's own entry, and entries of this layer inside it stay.
    fn make_opaque(&mut self, parent: &[&[u8]], raw: &[u8]) -> Result<(), ApplyError> {
        let dir = match self.parent_dir(parent, raw) {
            Ok(dir) => dir,
            // Below a non-directory nothing of the lower layers shows anyway.
            Err(ApplyError::NotADirectory { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let path = join(parent);
        let dir = openat(&dir, ".", dir_flags(), Mode::empty())
            .map_err(io_err("open directory", &path))?;
        set_opaque(&dir, &path)
    }

    /// Deletes `name` in `parent`: removes what this layer put there and
    /// leaves an overlay whiteout that hides the lower layers' copy.
    fn whiteout(&mut self, parent: &[&[u8]], name: &[u8], raw: &[u8]) -> Result<(), ApplyError> {
        let dir = match self.parent_dir(parent, raw) {
            Ok(dir) => dir,
            Err(ApplyError::NotADirectory { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut comps = parent.to_vec();
        comps.push(name);
        let path = join(&comps);
        remove_all(dir.as_fd(), name).map_err(|e| io_error("remove", &path, e))?;
        mknodat(&dir, name, SFlag::S_IFCHR, Mode::empty(), 0)
            .map_err(io_err("create whiteout", &path))
    }

    /// Removes whatever is at `name` unless it is a directory and
    /// `keep_dir` is set; tells what was there.
    fn clear(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
        path: &[u8],
    ) -> Result<Existing, ApplyError> {
        let existing = match stat_at(dir, name).map_err(io_err("stat", path))? {
            None => return Ok(Existing::Nothing),
            Some(st) if is_dir(&st) && keep_dir => return Ok(Existing::Dir),
            Some(st) if is_whiteout(&st) => Existing::Whiteout,
            Some(_) => Existing::Other,
        };
        remove_all(dir.as_fd(), name).map_err(|e| io_error("remove", path, e))?;
        Ok(existing)
    }

    fn write_file<R: Read>(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        entry: &mut tar::Entry<'_, R>,
        attrs: &Attrs,
        path: &[u8],
    ) -> Result<(), ApplyError> {
        self.clear(dir, name, false, path)?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(dir, name, flags, Mode::from_bits_truncate(0o600))
            .map_err(io_err("create file", path))?;
        let mut file = File::from(fd);

        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ApplyError::Tar {
                        after: lossy(path),
                        source,
                    })
                }
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| io_error("write", path, e))?;
            written += n as u64;
        }
        if written != entry.size() {
            return Err(ApplyError::Truncated { path: lossy(path) });
        }

        // Owner before mode (chown clears set-id bits), and xattrs after the
        // owner (chown clears security.capability).
        fchown(&file, Some(attrs.uid), Some(attrs.gid)).map_err(io_err("set owner of", path))?;
        fchmod(&file, attrs.mode).map_err(io_err("set mode of", path))?;
        set_xattrs(&XattrOn::Fd(file.as_fd()), &attrs.xattrs, path)?;
        futimens(&file, &attrs.times.atime, &attrs.times.mtime)
            .map_err(io_err("set times of", path))
    }

    fn make_dir(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        comps: &[&[u8]],
        attrs: &Attrs,
        path: &[u8],
    ) -> Result<(), ApplyError> {
        let existing = self.clear(dir, name, true, path)?;
        let created = match existing {
            Existing::Dir => openat(dir, name, dir_flags(), Mode::empty())
                .map_err(io_err("open directory", path))?,
            Existing::Whiteout => {
                // Deleted and re-created in one layer: hide the lower copy.
                let created = self.new_dir(dir, name, path)?;
                set_opaque(&created, path)?;
                created
            }
            Existing::Nothing | Existing::Other => self.new_dir(dir, name, path)?,
        };
        self.set_dir_attrs(&created, comps, attrs, path)
    }

    /// Sets owner, mode and xattrs now, and the times at the end.
    fn set_dir_attrs(
        &mut self,
        dir: &OwnedFd,
        comps: &[&[u8]],
        attrs: &Attrs,
        path: &[u8],
    ) -> Result<(), ApplyError> {
        fchown(dir, Some(attrs.uid), Some(attrs.gid)).map_err(io_err("set owner of", path))?;
        fchmod(dir, attrs.mode).map_err(io_err("set mode of", path))?;
        set_xattrs(&XattrOn::Fd(dir.as_fd()), &attrs.xattrs, path)?;
        self.dir_times
            .push((comps.iter().map(|c| c.to_vec()).collect(), attrs.times));
        Ok(())
    }

    fn make_symlink(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        target: &[u8],
        attrs: &Attrs,
        path: &[u8],
    ) -> Result<(), ApplyError> {
        self.clear(dir, name, false, path)?;
        symlinkat(target, dir, name).map_err(io_err("create symlink", path))?;
        set_entry_attrs(dir, name, attrs, false, path)
    }

    fn make_node(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        kind: SFlag,
        dev: libc::dev_t,
        attrs: &Attrs,
        path: &[u8],
    ) -> Result<(), ApplyError> {
        self.clear(dir, name, false, path)?;
        match mknodat(dir, name, kind, Mode::from_bits_truncate(0o600), dev) {
            Ok(()) => {}
            Err(Errno::EPERM) if kind != SFlag::S_IFIFO => {
                tracing::warn!(path = %lossy(path), "skipped a device node this process may not create");
                return Ok(());
            }
            Err(e) => return Err(io_err("create node", path)(e)),
        }
        set_entry_attrs(dir, name, attrs, true, path)
    }

    /// Links `name` to `target`: to the file if this layer has it, else to a
    /// copy of the lower file (never a link into a lower layer).
    fn make_hardlink(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        target: &[u8],
        raw: &[u8],
        path: &[u8],
    ) -> Result<(), ApplyError> {
        let not_found = || ApplyError::LinkTargetNotFound {
            path: lossy(raw),
            target: lossy(target),
        };
        let tcomps = clean_path(target).ok_or_else(not_found)?;
        if tcomps.is_empty() {
            return Err(not_found());
        }
        let tpath = join(&tcomps);
        let (src_dir, src_name, stat) = match self
            .lookup(&tcomps)
            .map_err(|e| io_error("look up", &tpath, e))?
        {
            Hit::Found {
                layer: 0,
                dir: src_dir,
                name: src_name,
                stat,
            } if !is_dir(&stat) => {
                if !self.same_inode(dir, name, &stat, path)? {
                    self.clear(dir, name, false, path)?;
                    linkat(&src_dir, src_name.as_slice(), dir, name, AtFlags::empty())
                        .map_err(io_err("create hardlink", path))?;
                }
                return Ok(());
            }
            Hit::Found {
                layer,
                dir,
                name,
                stat,
            } if layer > 0 && !is_dir(&stat) => (dir, name, stat),
            _ => return Err(not_found()),
        };

        // A second link to the same lower file joins the first copy.
        if let Some(copy) = self.lower_copies.get(&tpath) {
            let ccomps: Vec<&[u8]> = copy.path.iter().map(Vec::as_slice).collect();
            if let Some((cname, cparent)) = ccomps.split_last() {
                if let Ok(cdir) = self.resolve_dir(cparent) {
                    if let Ok(Some(st)) = stat_at(&cdir, cname) {
                        if st.st_dev == copy.dev && st.st_ino == copy.ino {
                            if !self.same_inode(dir, name, &st, path)? {
                                self.clear(dir, name, false, path)?;
                                linkat(&cdir, *cname, dir, name, AtFlags::empty())
                                    .map_err(io_err("create hardlink", path))?;
                            }
                            return Ok(());
                        }
                    }
                }
            }
        }

        self.clear(dir, name, false, path)?;
        copy_lower(&src_dir, &src_name, &stat, dir, name, path, &mut self.buf)?;
        if let Ok(Some(st)) = stat_at(dir, name) {
            let path = path.split(|b| *b == b'/').map(<[u8]>::to_vec).collect();
            self.lower_copies.insert(
                tpath,
                LowerCopy {
                    path,
                    dev: st.st_dev,
                    ino: st.st_ino,
                },
            );
        }
        Ok(())
    }

    fn same_inode(
        &self,
        dir: &OwnedFd,
        name: &[u8],
        stat: &FileStat,
        path: &[u8],
    ) -> Result<bool, ApplyError> {
        Ok(match stat_at(dir, name).map_err(io_err("stat", path))? {
            Some(st) => st.st_dev == stat.st_dev && st.st_ino == stat.st_ino,
            None => false,
        })
    }
}

/// What [`Unpacker::clear`] found at a name.
enum Existing {
    Nothing,
    Dir,
    Whiteout,
    Other,
}

/// Reads an entry's mode, owner, times and xattrs (PAX `SCHILY.xattr.*`).
fn entry_attrs<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Attrs, ApplyError> {
    let invalid = |reason: String| ApplyError::InvalidEntry {
        path: lossy(raw),
        reason,
    };
    let header = entry.header();
    let mode = header
        .mode()
        .map_err(|e| invalid(format!("bad mode: {e}")))?;
    let uid = header.uid().map_err(|e| invalid(format!("bad uid: {e}")))?;
    let gid = header.gid().map_err(|e| invalid(format!("bad gid: {e}")))?;
    let mtime = header
        .mtime()
        .map_err(|e| invalid(format!("bad mtime: {e}")))?;
    let uid = u32::try_from(uid).map_err(|_| invalid(format!("uid {uid} out of range")))?;
    let gid = u32::try_from(gid).map_err(|_| invalid(format!("gid {gid} out of range")))?;
    let mtime = i64::try_from(mtime).map_err(|_| invalid(format!("mtime {mtime} out of range")))?;
    let mut times = Times {
        atime: TimeSpec::new(mtime, 0),
        mtime: TimeSpec::new(mtime, 0),
    };
    let mut atime = None;

    let mut xattrs = Vec::new();
    let pax = entry
        .pax_extensions()
        .map_err(|e| invalid(format!("bad pax header: {e}")))?;
    for ext in pax.into_iter().flatten() {
        let ext = ext.map_err(|e| invalid(format!("bad pax header: {e}")))?;
        let key = ext.key_bytes();
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
        } else if key == b"mtime" {
            times.mtime = parse_pax_time(ext.value_bytes()).unwrap_or(times.mtime);
        } else if key == b"atime" {
            atime = parse_pax_time(ext.value_bytes());
        }
    }
    times.atime = atime.unwrap_or(times.mtime);
    Ok(Attrs {
        mode: Mode::from_bits_truncate(mode & 0o7777),
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        times,
        xattrs,
    })
}

/// Parses a PAX time such as `1704067200.25`.
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let value = std::str::from_utf8(value).ok()?;
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    // A negative time with a fraction counts the fraction back from zero.
    let nanos = if secs < 0 || value.starts_with('-') {
        -nanos
    } else {
        nanos
    };
    Some(TimeSpec::new(secs, nanos))
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn io_error(op: &'static str, path: &[u8], source: io::Error) -> ApplyError {
    ApplyError::Io {
        op,
        path: lossy(path),
        source,
    }
}

fn stat_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn file_type(stat: &FileStat) -> libc::mode_t {
    stat.st_mode & libc::S_IFMT
}

fn is_dir(stat: &FileStat) -> bool {
    file_type(stat) == libc::S_IFDIR
}

fn is_whiteout(stat: &FileStat) -> bool {
    file_type(stat) == libc::S_IFCHR && stat.st_rdev == 0
}

fn is_opaque(dir: &OwnedFd) -> io::Result<bool> {
    let value = get_xattr(&XattrOn::Fd(dir.as_fd()), OPAQUE_XATTR.as_bytes())?;
    Ok(value.as_deref() == Some(b"y"))
}

fn set_opaque(dir: &OwnedFd, path: &[u8]) -> Result<(), ApplyError> {
    set_xattr(&XattrOn::Fd(dir.as_fd()), OPAQUE_XATTR.as_bytes(), b"y")
        .map_err(|e| io_error("mark opaque", path, e))
}

/// Removes `name` in `dir`, a whole tree for a directory, never following
/// a symlink.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = openat(dir, name, dir_flags(), Mode::empty())?;
    let mut names = Vec::new();
    for entry in nix::dir::Dir::from_fd(sub.try_clone()?)?.into_iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    for child in names {
        remove_all(sub.as_fd(), &child)?;
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(Into::into)
}

/// Sets owner, mode (unless a symlink), xattrs and times on a non-regular
/// entry through its directory.
fn set_entry_attrs(
    dir: &OwnedFd,
    name: &[u8],
    attrs: &Attrs,
    chmod: bool,
    path: &[u8],
) -> Result<(), ApplyError> {
    fchownat(
        dir,
        name,
        Some(attrs.uid),
        Some(attrs.gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io_err("set owner of", path))?;
    if chmod {
        fchmodat(dir, name, attrs.mode, FchmodatFlags::NoFollowSymlink)
            .map_err(io_err("set mode of", path))?;
    }
    set_xattrs(&XattrOn::Entry(dir.as_fd(), name), &attrs.xattrs, path)?;
    utimensat(
        dir,
        name,
        &attrs.times.atime,
        &attrs.times.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io_err("set times of", path))
}

/// Copies a lower-layer entry (not a directory) into upper with its data,
/// owner, mode, xattrs and times.
fn copy_lower(
    src_dir: &OwnedFd,
    src_name: &[u8],
    stat: &FileStat,
    dir: &OwnedFd,
    name: &[u8],
    path: &[u8],
    buf: &mut [u8],
) -> Result<(), ApplyError> {
    let times = Times::of(stat);
    let mode = Mode::from_bits_truncate(stat.st_mode);
    let (uid, gid) = (Uid::from_raw(stat.st_uid), Gid::from_raw(stat.st_gid));
    match file_type(stat) {
        libc::S_IFREG => {
            let src = openat(
                src_dir,
                src_name,
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err("open lower copy of", path))?;
            let xattrs = list_xattrs(&XattrOn::Fd(src.as_fd()))
                .map_err(io_err("read xattrs of lower copy of", path))?;
            let flags = OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC;
            let dst = openat(dir, name, flags, Mode::from_bits_truncate(0o600))
                .map_err(io_err("create file", path))?;
            let (mut src, mut dst) = (File::from(src), File::from(dst));
            loop {
                let n = src
                    .read(buf)
                    .map_err(|e| io_error("read lower copy of", path, e))?;
                if n == 0 {
                    break;
                }
                dst.write_all(&buf[..n])
                    .map_err(|e| io_error("write", path, e))?;
            }
            fchown(&dst, Some(uid), Some(gid)).map_err(io_err("set owner of", path))?;
            fchmod(&dst, mode).map_err(io_err("set mode of", path))?;
            set_xattrs(&XattrOn::Fd(dst.as_fd()), &xattrs, path)?;
            futimens(&dst, &times.atime, &times.mtime).map_err(io_err("set times of", path))
        }
        kind => {
            let xattrs = list_xattrs(&XattrOn::Entry(src_dir.as_fd(), src_name))
                .map_err(io_err("read xattrs of lower copy of", path))?;
            if kind == libc::S_IFLNK {
                let target = nix::fcntl::readlinkat(src_dir, src_name)
                    .map_err(io_err("read lower copy of", path))?;
                symlinkat(target.as_bytes(), dir, name).map_err(io_err("create symlink", path))?;
            } else {
                let sflag = SFlag::from_bits_truncate(kind);
                mknodat(
                    dir,
                    name,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    stat.st_rdev,
                )
                .map_err(io_err("create node", path))?;
            }
            let attrs = Attrs {
                mode,
                uid,
                gid,
                times,
                xattrs,
            };
            set_entry_attrs(dir, name, &attrs, kind != libc::S_IFLNK, path)
        }
    }
}

// ---------------------------------------------------------------------------
// xattrs. nix has no wrappers, so these call libc. An entry that cannot be
// opened safely for writing (a symlink, a device, a fifo) is reached as
// `/proc/self/fd/<dir>/<name>` with the `l*` calls, which do not follow the
// last component.

/// Extended attributes as (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

enum XattrOn<'a> {
    Fd(BorrowedFd<'a>),
    Entry(BorrowedFd<'a>, &'a [u8]),
}

impl XattrOn<'_> {
    fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
        let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        path.extend_from_slice(name);
        CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    }
}

fn cstring(raw: &[u8]) -> io::Result<CString> {
    CString::new(raw).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Lists every xattr but overlayfs' own, with values.
fn list_xattrs(on: &XattrOn<'_>) -> Result<Xattrs, Errno> {
    let path = match on {
        XattrOn::Entry(dir, name) => {
            Some(XattrOn::proc_path(*dir, name).map_err(|_| Errno::EINVAL)?)
        }
        XattrOn::Fd(_) => None,
    };
    let list = |buf: &mut [u8]| -> isize {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: the buffer is valid for `len` bytes and the path is a
        // NUL-terminated string that outlives the call.
        unsafe {
            match (&path, on) {
                (Some(path), _) => libc::llistxattr(path.as_ptr(), ptr, len),
                (None, XattrOn::Fd(fd)) => libc::flistxattr(fd.as_raw_fd(), ptr, len),
                (None, XattrOn::Entry(..)) => -1,
            }
        }
    };
    let names = read_sized(list)?;
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if is_overlay_xattr(name) {
            continue;
        }
        match get_xattr(on, name) {
            Ok(Some(value)) => out.push((name.to_vec(), value)),
            Ok(None) => {}
            Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
        }
    }
    Ok(out)
}

fn get_xattr(on: &XattrOn<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let cname = cstring(name)?;
    let path = match on {
        XattrOn::Entry(dir, entry) => Some(XattrOn::proc_path(*dir, entry)?),
        XattrOn::Fd(_) => None,
    };
    let get = |buf: &mut [u8]| -> isize {
        let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
        // SAFETY: as in list_xattrs; the name is NUL-terminated too.
        unsafe {
            match (&path, on) {
                (Some(path), _) => libc::lgetxattr(path.as_ptr(), cname.as_ptr(), ptr, len),
                (None, XattrOn::Fd(fd)) => {
                    libc::fgetxattr(fd.as_raw_fd(), cname.as_ptr(), ptr, len)
                }
                (None, XattrOn::Entry(..)) => -1,
            }
        }
    };
    match read_sized(get) {
        Ok(value) => Ok(Some(value)),
        Err(Errno::ENODATA) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Calls a size-probing libc function (`*listxattr`, `*getxattr`) until the
/// value fits.
fn read_sized(mut call: impl FnMut(&mut [u8]) -> isize) -> Result<Vec<u8>, Errno> {
    loop {
        let size = Errno::result(call(&mut []))?;
        let mut buf = vec![0u8; size as usize];
        match Errno::result(call(&mut buf)) {
            Ok(n) => {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            // The value grew between the two calls.
            Err(Errno::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn set_xattr(on: &XattrOn<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let cname = cstring(name)?;
    let (ptr, len) = (value.as_ptr().cast(), value.len());
    // SAFETY: the name and path are NUL-terminated, the value is valid for
    // `len` bytes, and all outlive the call.
    let rc = unsafe {
        match on {
            XattrOn::Fd(fd) => libc::fsetxattr(fd.as_raw_fd(), cname.as_ptr(), ptr, len, 0),
            XattrOn::Entry(dir, entry) => {
                let path = XattrOn::proc_path(*dir, entry)?;
                libc::lsetxattr(path.as_ptr(), cname.as_ptr(), ptr, len, 0)
            }
        }
    };
    Errno::result(rc).map(drop).map_err(Into::into)
}

fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Sets an entry's xattrs; ones the filesystem cannot hold are skipped with
/// a warning, and overlayfs' own are dropped.
fn set_xattrs(
    on: &XattrOn<'_>,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    path: &[u8],
) -> Result<(), ApplyError> {
    for (name, value) in xattrs {
        if is_overlay_xattr(name) {
            tracing::warn!(path = %lossy(path), xattr = %lossy(name), "dropped an overlayfs xattr from a layer");
            continue;
        }
        match set_xattr(on, name, value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::warn!(path = %lossy(path), xattr = %lossy(name), "skipped an xattr the filesystem does not support");
            }
            // user.* xattrs are not allowed on symlinks and device nodes.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && matches!(on, XattrOn::Entry(..)) => {
                tracing::warn!(path = %lossy(path), xattr = %lossy(name), "skipped an xattr this entry type cannot hold");
            }
            Err(e) => return Err(io_error("set xattr of", path, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_map_to_compression() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            ("application/vnd.oci.image.config.v1+json", None),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                None,
            ),
            ("", None),
        ];
        for (media_type, want) in cases {
            let got = compression_for(media_type).ok();
            assert_eq!(got, want, "{media_type}");
        }
        let err = compression_for("text/plain").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported layer media type \"text/plain\""
        );
        assert!(err.is_invalid_input());
    }

    #[test]
    fn whiteout_names_parse() {
        let cases: [(&[u8], Whiteout<'_>); 8] = [
            (b"file.txt", Whiteout::None),
            (b".wh..wh..opq", Whiteout::Opaque),
            (b".wh.deleted.txt", Whiteout::Remove(b"deleted.txt")),
            (b".wh..hidden", Whiteout::Remove(b".hidden")),
            (b".wh..wh.plnk", Whiteout::Meta),
            (b".wh.", Whiteout::Invalid),
            (b".wh..", Whiteout::Invalid),
            (b".wh...", Whiteout::Invalid),
        ];
        for (name, want) in cases {
            assert_eq!(parse_whiteout(name), want, "{}", lossy(name));
        }
    }

    #[test]
    fn names_are_clipped_at_the_root() {
        let cases: [(&[u8], &[&[u8]]); 7] = [
            (b"a/b/c", &[b"a", b"b", b"c"]),
            (b"./a/./b/", &[b"a", b"b"]),
            (b"/etc/passwd", &[b"etc", b"passwd"]),
            (b"../../../tmp/x", &[b"tmp", b"x"]),
            (b"ok/../../../../tmp/x", &[b"tmp", b"x"]),
            (b".", &[]),
            (b"a//b", &[b"a", b"b"]),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_path(raw).unwrap(), want.to_vec(), "{}", lossy(raw));
        }
        assert!(clean_path(b"a\0b").is_none());
    }

    #[test]
    fn pax_times_parse() {
        assert_eq!(parse_pax_time(b"86400"), Some(TimeSpec::new(86400, 0)));
        assert_eq!(parse_pax_time(b"1.5"), Some(TimeSpec::new(1, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }

    fn small_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let data = vec![7u8; 100_000];
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "file", data.as_slice())
            .unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&small_tar()).unwrap();
        let gz = gz.finish().unwrap();
        let upper = tempfile::tempdir().unwrap();
        let err =
            apply_layer(&gz[..gz.len() - 10], Compression::Gzip, upper.path(), &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Decompress {
                    compression: "gzip",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_invalid_input());
    }

    #[test]
    fn truncated_zstd_is_an_error() {
        let zst = zstd::encode_all(small_tar().as_slice(), 3).unwrap();
        let upper = tempfile::tempdir().unwrap();
        let err =
            apply_layer(&zst[..zst.len() - 10], Compression::Zstd, upper.path(), &[]).unwrap_err();
        assert!(
            matches!(
                err,
                ApplyError::Decompress {
                    compression: "zstd",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn plain_tar_cut_inside_data_is_an_error() {
        let tar = small_tar();
        let upper = tempfile::tempdir().unwrap();
        let err = apply_layer(&tar[..50_000], Compression::None, upper.path(), &[]).unwrap_err();
        assert!(matches!(err, ApplyError::Truncated { .. }), "{err:?}");
    }

    #[test]
    fn tar_without_end_blocks_or_padding_is_accepted() {
        let tar = small_tar();
        // Header (512) plus the data, without padding or end-of-archive blocks.
        let cut = &tar[..512 + 100_000];
        let upper = tempfile::tempdir().unwrap();
        let applied = apply_layer(cut, Compression::None, upper.path(), &[]).unwrap();
        assert_eq!(applied.uncompressed_size, cut.len() as u64);
        assert_eq!(applied.compressed_digest, applied.diff_id);
        assert_eq!(
            std::fs::read(upper.path().join("file")).unwrap(),
            vec![7u8; 100_000]
        );
    }

    /// A tar of one file of `size` zeros, streamed without holding it.
    fn zeros_tar(size: u64) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "zeros", io::repeat(0).take(size))
            .unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn bombs_stop_at_the_size_limit() {
        let tar = zeros_tar(64 << 20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(tar.as_slice(), 19).unwrap();
        let limits = LayerLimits {
            max_size: 4 << 20,
            min_free: 0,
        };
        for (blob, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            assert!(blob.len() < 1 << 20, "{} bytes", blob.len());
            let upper = tempfile::tempdir().unwrap();
            let err = apply_layer_with(blob.as_slice(), compression, upper.path(), &[], limits)
                .unwrap_err();
            assert!(
                matches!(err, ApplyError::TooLarge { limit } if limit == 4 << 20),
                "{err:?}"
            );
            assert!(err.is_invalid_input());

            // The writer stopped within a few chunks of the limit.
            let written = std::fs::metadata(upper.path().join("zeros"))
                .map(|m| m.len())
                .unwrap_or(0);
            let slack = (CHANNEL_DEPTH as u64 + 2) * CHUNK_SIZE as u64;
            assert!(written <= (4 << 20) + slack, "{written} bytes written");
        }
    }

    #[test]
    fn a_full_filesystem_stops_the_apply() {
        let tar = zeros_tar(FREE_CHECK_EVERY + (1 << 20));
        let upper = tempfile::tempdir().unwrap();
        let limits = LayerLimits {
            max_size: u64::MAX,
            min_free: u64::MAX,
        };
        let err = apply_layer_with(tar.as_slice(), Compression::None, upper.path(), &[], limits)
            .unwrap_err();
        assert!(matches!(err, ApplyError::NoSpace { .. }), "{err:?}");
        assert!(!err.is_invalid_input());
    }
}
