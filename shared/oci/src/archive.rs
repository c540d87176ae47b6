//! Image archives on disk: OCI layout tarballs and docker-archive tarballs.
//!
//! [`Archive::open`] indexes the tar once (entry name to offset and size in
//! the file) and walks every image it holds, so a structural defect is
//! reported before any byte is imported. Blobs are then served straight from
//! the file by positional reads, without extracting anything. An outer
//! archive compressed with gzip or zstd is first inflated into an anonymous
//! temporary file, since tar entries must be addressable by offset.
//!
//! What `open` checks, for every blob an image references:
//! - the blob is in the archive ([`ArchiveError::MissingBlob`] names it);
//! - its size in the archive equals the descriptor's size (cheap: the tar
//!   header says it);
//! - every index, manifest and config is under its size cap in the
//!   archive's [`Limits`] (checked before it is read), hashes to its
//!   descriptor, has a known media type, each manifest lists no more layers
//!   than the cap, and each config has one diff ID per layer.
//!
//! What it does not check: layer digests and diff IDs. Hashing every layer
//! would read the whole archive twice, so the consumer hashes layers while it
//! ingests them ([`crate::verify::verify_blob`]) and computes diff IDs while
//! it unpacks. [`Archive::blob`] serves the archive's bytes as they are.
//!
//! A docker-archive has no OCI manifest: `open` writes one (config and
//! layers as listed in `manifest.json`) and serves it as a blob, so both
//! kinds of archive import the same way. Its uncompressed layers take their
//! digest from the config's diff IDs, unhashed, for the same reason as above;
//! compressed ones are hashed here, since nothing else names them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::digest::{Digest, Hasher};
use crate::image::{
    self, media_type, BlobKind, Compression, ConfigFile, Descriptor, ImageError, Index, Limits,
    Manifest, Platform, ResolvedImage, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME,
};
use crate::reference::{Reference, ReferenceError};
use crate::verify;

/// Most symbolic or hard links followed to reach one entry.
const MAX_LINK_HOPS: usize = 8;

/// Deepest chain of nested indexes walked.
const MAX_INDEX_DEPTH: usize = 8;

/// Why an archive could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive file could not be opened or inflated.
    #[error("failed to open image archive {path:?}")]
    Open {
        /// The archive file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },

    /// The tar stream could not be read.
    #[error("failed to read image archive {path:?}")]
    Read {
        /// The archive file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },

    /// The archive holds neither `index.json` nor `manifest.json`.
    #[error("image archive {path:?} is neither an oci layout nor a docker archive")]
    UnknownFormat {
        /// The archive file.
        path: PathBuf,
    },

    /// `oci-layout` names a layout version berth does not read.
    #[error("oci-layout in {path:?} has unsupported version {version:?}")]
    LayoutVersion {
        /// The archive file.
        path: PathBuf,
        /// The version found.
        version: String,
    },

    /// A JSON file of the archive itself (`oci-layout`, `manifest.json`) is malformed.
    #[error("{name} in image archive is not valid json")]
    Json {
        /// The file in the archive.
        name: String,
        /// The parse failure.
        #[source]
        source: serde_json::Error,
    },

    /// A file `manifest.json` names is not in the archive.
    #[error("file {name:?} referenced by {referrer} is missing from the archive")]
    MissingFile {
        /// The missing path.
        name: String,
        /// Who named it.
        referrer: String,
    },

    /// A blob an index or manifest references is not in the archive.
    #[error("blob {digest} referenced by {referrer} is missing from the archive")]
    MissingBlob {
        /// The missing blob.
        digest: Digest,
        /// Who referenced it (`index.json`, `manifest sha256:…`).
        referrer: String,
    },

    /// A blob's size in the archive differs from its descriptor's size.
    #[error(
        "blob {digest} is {archive} bytes in the archive but its descriptor says {descriptor}"
    )]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size the descriptor declares.
        descriptor: u64,
        /// Size of the file in the archive.
        archive: u64,
    },

    /// An index.json entry points at something other than an index or manifest.
    #[error("{referrer} points at {digest} of media type {media_type:?}, not an image")]
    NotAnImage {
        /// The blob.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Who referenced it.
        referrer: String,
    },

    /// Indexes nested deeper than berth walks.
    #[error("index {digest} nests indexes deeper than {MAX_INDEX_DEPTH}")]
    TooDeep {
        /// The index at which the walk stopped.
        digest: Digest,
    },

    /// [`Archive::blob`] was asked for a digest the archive does not hold.
    #[error("blob {digest} not found in the archive")]
    BlobNotFound {
        /// The digest asked for.
        digest: Digest,
    },

    /// An image document is malformed or inconsistent.
    #[error(transparent)]
    Image(#[from] ImageError),

    /// An image name in the archive is malformed.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
}

/// The two archive formats berth reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`).
    OciLayout,
    /// A `docker save` archive (`manifest.json`, config and layer files).
    DockerArchive,
}

/// One named image of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveImage {
    /// The image's normalized name.
    pub name: Reference,
    /// Its index or manifest.
    pub target: Descriptor,
}

/// Where one tar entry's data lies in the file, or which entry it links to.
#[derive(Debug, Clone)]
enum Entry {
    File { offset: u64, size: u64 },
    Link(String),
}

/// Where a referenced blob's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    File { offset: u64, size: u64 },
    Memory(Arc<[u8]>),
}

/// An image archive opened and checked; see the module docs for what is checked.
///
/// Reads are positional, so one `Archive` serves many [`BlobReader`]s at
/// once, from several threads.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    file: Arc<File>,
    format: ArchiveFormat,
    entries: HashMap<String, Entry>,
    images: Vec<ArchiveImage>,
    blobs: Vec<Descriptor>,
    sources: HashMap<Digest, Source>,
    limits: Limits,
}

/// The largest `oci-layout` file read (it holds one small JSON object).
const MAX_LAYOUT_FILE: u64 = 64 << 10;

impl Archive {
    /// Opens, indexes and checks the archive at `path`.
    ///
    /// Errors: `Open`/`Read` for I/O, `UnknownFormat`, `MissingBlob`,
    /// `MissingFile`, `SizeMismatch`, and `Image`/`Reference` for malformed
    /// documents and names. The caps are [`Limits::DEFAULT`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ArchiveError> {
        Self::open_with(path, Limits::DEFAULT)
    }

    /// [`Archive::open`] under `limits`, which also hold for
    /// [`Archive::resolve`]: `Image(TooLarge)` for a document over its cap,
    /// `Image(TooManyLayers)` for a manifest with too many layers.
    pub fn open_with(path: impl AsRef<Path>, limits: Limits) -> Result<Self, ArchiveError> {
        let path = path.as_ref().to_path_buf();
        let file = open_tar(&path).map_err(|source| ArchiveError::Open {
            path: path.clone(),
            source,
        })?;
        let entries = index_tar(&file).map_err(|source| ArchiveError::Read {
            path: path.clone(),
            source,
        })?;

        let mut archive = Self {
            path,
            file: Arc::new(file),
            format: ArchiveFormat::OciLayout,
            entries,
            images: Vec::new(),
            blobs: Vec::new(),
            sources: HashMap::new(),
            limits,
        };
        // Newer `docker save` writes both; the layout is the richer of the two.
        if archive.resolve_entry("index.json").is_some() {
            archive.load_oci_layout()?;
        } else if archive.resolve_entry("manifest.json").is_some() {
            archive.format = ArchiveFormat::DockerArchive;
            archive.load_docker_archive()?;
        } else {
            return Err(ArchiveError::UnknownFormat { path: archive.path });
        }
        Ok(archive)
    }

    /// The archive file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which kind of archive this is.
    pub fn format(&self) -> ArchiveFormat {
        self.format
    }

    /// Every named image, in archive order; one target may carry several names.
    pub fn images(&self) -> &[ArchiveImage] {
        &self.images
    }

    /// Every blob the images reference, each once, children before the
    /// index or manifest that references them, so that importing in this
    /// order never stores a parent before its children.
    ///
    /// Manifests of an index that the archive lacks (an archive may hold
    /// only some platforms of an index) are not listed.
    pub fn blobs(&self) -> &[Descriptor] {
        &self.blobs
    }

    /// Opens one blob for reading, as the archive holds it (unverified).
    ///
    /// Serves every referenced blob, the synthesized manifest of a
    /// docker-archive included, and any other file under an OCI layout's
    /// `blobs/sha256/`. `BlobNotFound` otherwise.
    pub fn blob(&self, digest: &Digest) -> Result<BlobReader, ArchiveError> {
        let source = match self.sources.get(digest) {
            Some(source) => source.clone(),
            None => self
                .layout_blob(digest)
                .ok_or_else(|| ArchiveError::BlobNotFound {
                    digest: digest.clone(),
                })?,
        };
        Ok(BlobReader::new(&self.file, source))
    }

    /// Picks the manifest of `image` for `platform` and returns what is
    /// needed to unpack and run it, with every JSON blob verified.
    pub fn resolve(
        &self,
        image: &ArchiveImage,
        platform: &Platform,
    ) -> Result<ResolvedImage, ArchiveError> {
        image::resolve_with(&image.target, platform, &self.limits, |desc| {
            self.read_json_blob(desc)
        })
    }

    /// Reads `index.json` and walks every image it lists.
    fn load_oci_layout(&mut self) -> Result<(), ArchiveError> {
        if let Some(bytes) = self.read_named("oci-layout", "archive", MAX_LAYOUT_FILE)? {
            let layout: OciLayout =
                serde_json::from_slice(&bytes).map_err(|source| ArchiveError::Json {
                    name: "oci-layout".to_owned(),
                    source,
                })?;
            if !layout.image_layout_version.starts_with("1.") {
                return Err(ArchiveError::LayoutVersion {
                    path: self.path.clone(),
                    version: layout.image_layout_version,
                });
            }
        }
        let bytes = self
            .read_named("index.json", "archive", self.limits.max_index_size)?
            .unwrap_or_default();
        let index = Index::parse_within("index.json", &bytes, &self.limits)?;

        let mut seen = HashSet::new();
        for target in index.manifests {
            match BlobKind::of(&target.media_type) {
                Some(BlobKind::Index | BlobKind::Manifest) => {}
                _ => {
                    return Err(ArchiveError::NotAnImage {
                        digest: target.digest,
                        media_type: target.media_type,
                        referrer: "index.json".to_owned(),
                    })
                }
            }
            self.walk(&target, "index.json", &mut seen, 0)?;
            let name = match target.annotation(ANNOTATION_IMAGE_NAME) {
                Some(full) => Reference::parse(full)?,
                None => Reference::for_archive(
                    target.annotation(ANNOTATION_REF_NAME),
                    &self.path,
                    &target.digest,
                )?,
            };
            self.images.push(ArchiveImage { name, target });
        }
        Ok(())
    }

    /// Checks `desc` and everything below it, then lists it after its children.
    fn walk(
        &mut self,
        desc: &Descriptor,
        referrer: &str,
        seen: &mut HashSet<Digest>,
        depth: usize,
    ) -> Result<(), ArchiveError> {
        if depth > MAX_INDEX_DEPTH {
            return Err(ArchiveError::TooDeep {
                digest: desc.digest.clone(),
            });
        }
        if !seen.insert(desc.digest.clone()) {
            return Ok(());
        }
        self.locate(desc, referrer)?;

        match BlobKind::of_descriptor(desc)? {
            BlobKind::Index => {
                let object = format!("index {}", desc.digest);
                self.limits
                    .check_document(&object, BlobKind::Index, desc.size)?;
                let index =
                    Index::from_blob_within(desc, &self.read_json_blob(desc)?, &self.limits)?;
                let referrer = format!("index {}", desc.digest);
                for child in &index.manifests {
                    // An archive may carry only some platforms of an index.
                    if self.layout_blob(&child.digest).is_none() {
                        continue;
                    }
                    // Attestations and artifacts are carried along, not walked.
                    if is_attestation(child) || BlobKind::of(&child.media_type).is_none() {
                        self.locate(child, &referrer)?;
                        self.push_blob(child, seen);
                        continue;
                    }
                    self.walk(child, &referrer, seen, depth + 1)?;
                }
            }
            BlobKind::Manifest => {
                let referrer = format!("manifest {}", desc.digest);
                self.limits
                    .check_document(&referrer, BlobKind::Manifest, desc.size)?;
                let bytes = self.read_json_blob(desc)?;
                let manifest = Manifest::from_blob_within(desc, &bytes, &self.limits)?;
                self.locate(&manifest.config, &referrer)?;
                let config_object = format!("config {}", manifest.config.digest);
                self.limits.check_document(
                    &config_object,
                    BlobKind::Config,
                    manifest.config.size,
                )?;
                let config = ConfigFile::from_blob_within(
                    &manifest.config,
                    &self.read_json_blob(&manifest.config)?,
                    &self.limits,
                )?;
                image::check_diff_ids(&manifest, &config)?;
                for layer in &manifest.layers {
                    self.locate(layer, &referrer)?;
                }
                for layer in manifest.layers.iter().chain([&manifest.config]) {
                    self.push_blob(layer, seen);
                }
            }
            BlobKind::Config | BlobKind::Layer(_) => {}
        }
        self.blobs.push(desc.clone());
        Ok(())
    }

    /// Lists a leaf blob once.
    fn push_blob(&mut self, desc: &Descriptor, seen: &mut HashSet<Digest>) {
        if seen.insert(desc.digest.clone()) {
            self.blobs.push(desc.clone());
        }
    }

    /// Finds `desc`'s blob in the layout, checks its size and records it.
    fn locate(&mut self, desc: &Descriptor, referrer: &str) -> Result<(), ArchiveError> {
        let source = self
            .layout_blob(&desc.digest)
            .ok_or_else(|| ArchiveError::MissingBlob {
                digest: desc.digest.clone(),
                referrer: referrer.to_owned(),
            })?;
        if let Source::File { size, .. } = source {
            if size != desc.size {
                return Err(ArchiveError::SizeMismatch {
                    digest: desc.digest.clone(),
                    descriptor: desc.size,
                    archive: size,
                });
            }
        }
        self.sources.insert(desc.digest.clone(), source);
        Ok(())
    }

    /// The layout's file for `digest`, if the archive has one.
    fn layout_blob(&self, digest: &Digest) -> Option<Source> {
        if self.format != ArchiveFormat::OciLayout {
            return None;
        }
        let name = format!("blobs/{}/{}", digest.algorithm(), digest.hex());
        self.resolve_entry(&name)
            .map(|(offset, size)| Source::File { offset, size })
    }

    /// Reads `manifest.json` and builds an OCI manifest for each image in it.
    fn load_docker_archive(&mut self) -> Result<(), ArchiveError> {
        let bytes = self
            .read_named("manifest.json", "archive", self.limits.max_manifest_size)?
            .unwrap_or_default();
        let images: Vec<DockerImage> =
            serde_json::from_slice(&bytes).map_err(|source| ArchiveError::Json {
                name: "manifest.json".to_owned(),
                source,
            })?;

        let mut listed = HashSet::new();
        for docker in images {
            let target = self.synthesize_manifest(&docker, &mut listed)?;
            let tags = docker.repo_tags.unwrap_or_default();
            if tags.is_empty() {
                let name = Reference::for_archive(None, &self.path, &target.digest)?;
                self.images.push(ArchiveImage { name, target });
                continue;
            }
            for tag in tags {
                let name = Reference::parse(&tag)?;
                self.images.push(ArchiveImage {
                    name,
                    target: target.clone(),
                });
            }
        }
        Ok(())
    }

    /// Builds, records and returns the OCI manifest for one docker-archive image.
    fn synthesize_manifest(
        &mut self,
        docker: &DockerImage,
        listed: &mut HashSet<Digest>,
    ) -> Result<Descriptor, ArchiveError> {
        let config_bytes = self
            .read_named(&docker.config, "manifest.json", self.limits.max_config_size)?
            .ok_or_else(|| ArchiveError::MissingFile {
                name: docker.config.clone(),
                referrer: "manifest.json".to_owned(),
            })?;
        let config_desc = Descriptor::of_bytes(media_type::OCI_CONFIG, &config_bytes);
        let object = format!("config {}", config_desc.digest);
        let config = ConfigFile::parse_within(&object, &config_bytes, &self.limits)?;
        self.limits
            .check_layers(&format!("image {}", docker.config), docker.layers.len())?;
        if config.diff_ids.len() != docker.layers.len() {
            return Err(ImageError::DiffIdCountMismatch {
                config: config_desc.digest,
                diff_ids: config.diff_ids.len(),
                layers: docker.layers.len(),
            }
            .into());
        }

        let mut layers = Vec::with_capacity(docker.layers.len());
        for (name, diff_id) in docker.layers.iter().zip(&config.diff_ids) {
            let layer = self.docker_layer(name, diff_id)?;
            layers.push(layer);
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_owned()),
            config: config_desc,
            layers,
            annotations: Default::default(),
        };
        let bytes = manifest.to_json();
        let target = Descriptor::of_bytes(media_type::OCI_MANIFEST, &bytes);

        self.sources.insert(
            manifest.config.digest.clone(),
            Source::Memory(config_bytes.into()),
        );
        self.sources
            .insert(target.digest.clone(), Source::Memory(bytes.into()));
        for desc in manifest.layers.iter().chain([&manifest.config, &target]) {
            if listed.insert(desc.digest.clone()) {
                self.blobs.push(desc.clone());
            }
        }
        Ok(target)
    }

    /// Describes one docker-archive layer file, hashing it only if compressed.
    fn docker_layer(&mut self, name: &str, diff_id: &Digest) -> Result<Descriptor, ArchiveError> {
        let (offset, size) = self
            .resolve_entry(name)
            .ok_or_else(|| ArchiveError::MissingFile {
                name: name.to_owned(),
                referrer: "manifest.json".to_owned(),
            })?;
        let source = Source::File { offset, size };
        let read_err = |source| ArchiveError::Read {
            path: self.path.clone(),
            source,
        };

        let mut head = [0u8; 4];
        let head_len = usize::try_from(size.min(4)).unwrap_or(4);
        self.file
            .read_exact_at(&mut head[..head_len], offset)
            .map_err(read_err)?;
        let compression = Compression::detect(&head[..head_len]);
        let digest = match compression {
            Compression::None => diff_id.clone(),
            Compression::Gzip | Compression::Zstd => {
                let mut hasher = Hasher::new();
                let mut reader = BlobReader::new(&self.file, source.clone());
                copy_into_hasher(&mut reader, &mut hasher).map_err(read_err)?;
                hasher.finish()
            }
        };
        self.sources.insert(digest.clone(), source);
        Ok(Descriptor::new(
            compression.oci_layer_media_type(),
            digest,
            size,
        ))
    }

    /// Reads a referenced JSON blob, refusing one over the largest document
    /// cap before reading it (callers check their kind's own cap first).
    fn read_json_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, ArchiveError> {
        verify::check_limit(desc, self.limits.largest_document()).map_err(ImageError::from)?;
        let mut reader = self.blob(&desc.digest)?;
        let mut bytes = Vec::with_capacity(usize::try_from(reader.size()).unwrap_or(0));
        // Read one byte past the declared size so a longer blob is seen as such.
        (&mut reader)
            .take(desc.size + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ArchiveError::Read {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }

    /// Reads a named file of the archive (not a blob) if present, refusing
    /// one over `limit` bytes before reading it.
    fn read_named(
        &self,
        name: &str,
        referrer: &str,
        limit: u64,
    ) -> Result<Option<Vec<u8>>, ArchiveError> {
        let Some((offset, size)) = self.resolve_entry(name) else {
            return Ok(None);
        };
        if size > limit {
            return Err(ImageError::TooLarge {
                object: format!("{name} in {referrer}"),
                size,
                limit,
            }
            .into());
        }
        let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|source| ArchiveError::Read {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some(bytes))
    }

    /// Follows links from `name` to a regular file entry.
    fn resolve_entry(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = normalize(name)?;
        for _ in 0..=MAX_LINK_HOPS {
            match self.entries.get(&name)? {
                Entry::File { offset, size } => return Some((*offset, *size)),
                Entry::Link(target) => name = target.clone(),
            }
        }
        None
    }
}

/// A reader over one blob of an archive, seekable within the blob.
///
/// Reads are positional (`pread`), so readers of one archive do not disturb
/// each other.
#[derive(Debug)]
pub struct BlobReader {
    inner: ReaderInner,
}

#[derive(Debug)]
enum ReaderInner {
    File {
        file: Arc<File>,
        offset: u64,
        size: u64,
        pos: u64,
    },
    Memory(Cursor<Arc<[u8]>>),
}

impl BlobReader {
    fn new(file: &Arc<File>, source: Source) -> Self {
        let inner = match source {
            Source::File { offset, size } => ReaderInner::File {
                file: Arc::clone(file),
                offset,
                size,
                pos: 0,
            },
            Source::Memory(bytes) => ReaderInner::Memory(Cursor::new(bytes)),
        };
        Self { inner }
    }

    /// The blob's size as the archive holds it.
    pub fn size(&self) -> u64 {
        match &self.inner {
            ReaderInner::File { size, .. } => *size,
            ReaderInner::Memory(cursor) => cursor.get_ref().len() as u64,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            ReaderInner::File {
                file,
                offset,
                size,
                pos,
            } => {
                let left = size.saturating_sub(*pos);
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                if want == 0 {
                    return Ok(0);
                }
                let n = file.read_at(&mut buf[..want], *offset + *pos)?;
                *pos += n as u64;
                Ok(n)
            }
            ReaderInner::Memory(cursor) => cursor.read(buf),
        }
    }
}

impl Seek for BlobReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        match &mut self.inner {
            ReaderInner::File { size, pos, .. } => {
                let target = match to {
                    SeekFrom::Start(n) => Some(n),
                    SeekFrom::End(d) => size.checked_add_signed(d),
                    SeekFrom::Current(d) => pos.checked_add_signed(d),
                };
                let target = target.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "seek before start of blob")
                })?;
                *pos = target;
                Ok(target)
            }
            ReaderInner::Memory(cursor) => cursor.seek(to),
        }
    }
}

/// One entry of a docker-archive's `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// The `oci-layout` file.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayout {
    image_layout_version: String,
}

/// Whether an index entry is a build attestation, not an image to walk.
fn is_attestation(desc: &Descriptor) -> bool {
    desc.platform
        .as_ref()
        .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
}

/// Opens the archive, inflating a gzip or zstd outer layer into an anonymous
/// temporary file so that entries can be read by offset.
fn open_tar(path: &Path) -> io::Result<File> {
    let mut file = File::open(path)?;
    let mut head = [0u8; 4];
    let n = read_up_to(&mut file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;

    let compression = Compression::detect(&head[..n]);
    if compression == Compression::None {
        return Ok(file);
    }
    let mut plain = tempfile::tempfile()?;
    match compression {
        Compression::Gzip => io::copy(&mut flate2::read::MultiGzDecoder::new(file), &mut plain)?,
        _ => io::copy(&mut zstd::stream::read::Decoder::new(file)?, &mut plain)?,
    };
    plain.seek(SeekFrom::Start(0))?;
    Ok(plain)
}

/// Reads into `buf` until it is full or the stream ends.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Indexes every regular file and link of the tar by normalized name; a
/// later entry of the same name wins, as when extracting.
fn index_tar(file: &File) -> io::Result<HashMap<String, Entry>> {
    let mut entries = HashMap::new();
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries_with_seek()? {
        let entry = entry?;
        let path = entry.path()?;
        let Some(name) = path.to_str().and_then(normalize) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let value = if kind.is_file() {
            Entry::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name()? else {
                continue;
            };
            let Some(target) = target.to_str() else {
                continue;
            };
            // A symlink is relative to its directory, a hard link to the root.
            let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                (true, Some((dir, _))) if !target.starts_with('/') => format!("{dir}/{target}"),
                _ => target.to_owned(),
            };
            match normalize(&joined) {
                Some(target) => Entry::Link(target),
                None => continue,
            }
        } else {
            continue;
        };
        entries.insert(name, value);
    }
    Ok(entries)
}

/// Canonical entry name: no leading `/` or `./`, no `.` parts, `..` applied;
/// `None` for a name that climbs above the root or is empty.
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

fn copy_into_hasher(reader: &mut impl Read, hasher: &mut Hasher) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_names() {
        let cases: &[(&str, Option<&str>)] = &[
            ("index.json", Some("index.json")),
            ("./index.json", Some("index.json")),
            ("/blobs/sha256/ab", Some("blobs/sha256/ab")),
            ("blobs/sha256/", Some("blobs/sha256")),
            ("abc/../def.tar", Some("def.tar")),
            ("../x", None),
            ("", None),
            (".", None),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), *want, "{input:?}");
        }
    }

    #[test]
    fn blob_reader_reads_and_seeks_within_range() {
        let mut tmp = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut tmp, b"xxhello worldyy").unwrap();
        let file = Arc::new(tmp);
        let mut r = BlobReader::new(
            &file,
            Source::File {
                offset: 2,
                size: 11,
            },
        );
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
        r.seek(SeekFrom::Start(6)).unwrap();
        s.clear();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "world");
        r.seek(SeekFrom::End(-5)).unwrap();
        let mut five = [0u8; 5];
        r.read_exact(&mut five).unwrap();
        assert_eq!(&five, b"world");
        assert!(r.seek(SeekFrom::Current(-100)).is_err());
        assert_eq!(r.size(), 11);
    }
}
