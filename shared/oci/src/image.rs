//! Image documents: descriptors, indexes, manifests and configs.
//!
//! Both OCI and Docker schema 2 media types are read; Docker's are the same
//! documents under other names. Parsing goes through private serde shapes
//! that keep digests as text, so a malformed digest comes back as a typed
//! [`ImageError::InvalidDigest`] naming the document, not as a JSON error.
//!
//! [`resolve`] walks from an index or manifest to the image for one platform
//! and checks what can be checked without the layers: every JSON blob hashes
//! to its descriptor, stays under its [`Limits`] (4 MiB per document and 128
//! layers unless the caller says otherwise), has a known media type, and the
//! config has one diff ID per layer.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::digest::{Digest, DigestError};
pub use crate::platform::Platform;
use crate::resolve::MAX_INDEX_DEPTH;
pub use crate::resolve::{chain_ids, check_diff_ids, resolve, resolve_with, ResolvedImage};
use crate::verify::{self, VerifyError};

/// Largest manifest, index or config accepted by default, in bytes (4 MiB,
/// the limit registries hold manifests to).
pub const MAX_JSON_SIZE: u64 = 4 << 20;

/// Most layers an image may have by default (overlayfs stacks far more, but
/// no real image needs them, and each costs a mount option and a snapshot).
pub const MAX_LAYERS: usize = 128;

/// The caps every reader of image documents applies, so that an oversized
/// document is refused before it is read into memory and an image of
/// thousands of layers before anything is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest index (and `index.json`), in bytes.
    pub max_index_size: u64,
    /// Largest manifest (and docker-archive `manifest.json`), in bytes.
    pub max_manifest_size: u64,
    /// Largest image config, in bytes.
    pub max_config_size: u64,
    /// Most layers one manifest may list.
    pub max_layers: usize,
}

impl Limits {
    /// 4 MiB per document, 128 layers.
    pub const DEFAULT: Limits = Limits {
        max_index_size: MAX_JSON_SIZE,
        max_manifest_size: MAX_JSON_SIZE,
        max_config_size: MAX_JSON_SIZE,
        max_layers: MAX_LAYERS,
    };

    /// The size cap of a document of `kind`; layers have none here (the
    /// snapshot service caps what they inflate to).
    pub fn document(&self, kind: BlobKind) -> u64 {
        match kind {
            BlobKind::Index => self.max_index_size,
            BlobKind::Manifest => self.max_manifest_size,
            BlobKind::Config => self.max_config_size,
            BlobKind::Layer(_) => u64::MAX,
        }
    }

    /// The largest of the document caps.
    pub fn largest_document(&self) -> u64 {
        self.max_index_size
            .max(self.max_manifest_size)
            .max(self.max_config_size)
    }

    /// `TooLarge` naming `object` when `size` is over the cap of `kind`.
    pub fn check_document(
        &self,
        object: &str,
        kind: BlobKind,
        size: u64,
    ) -> Result<(), ImageError> {
        let limit = self.document(kind);
        if size > limit {
            return Err(ImageError::TooLarge {
                object: object.to_owned(),
                size,
                limit,
            });
        }
        Ok(())
    }

    /// `TooManyLayers` when `object` lists more than `max_layers`.
    pub fn check_layers(&self, object: &str, layers: usize) -> Result<(), ImageError> {
        if layers > self.max_layers {
            return Err(ImageError::TooManyLayers {
                object: object.to_owned(),
                layers,
                limit: self.max_layers,
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Media types berth knows.
pub mod media_type {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI uncompressed layer.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI gzip layer.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// OCI zstd layer.
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    /// OCI non-distributable uncompressed layer.
    pub const OCI_LAYER_ND: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
    /// OCI non-distributable gzip layer.
    pub const OCI_LAYER_ND_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
    /// OCI non-distributable zstd layer.
    pub const OCI_LAYER_ND_ZSTD: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
    /// Docker schema 2 manifest list.
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker uncompressed layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker gzip layer.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// Docker zstd layer.
    pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
    /// Docker foreign gzip layer.
    pub const DOCKER_FOREIGN_LAYER_GZIP: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
}

/// Annotation naming an image in an OCI layout (`latest` or a full name).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Annotation containerd and docker put on index.json entries with the full name.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// Why an image document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The document is bigger than its [`Limits`] allow.
    #[error("{object} is {size} bytes, over the {limit} byte limit")]
    TooLarge {
        /// The document (`manifest sha256:…`, `index.json`).
        object: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// The document is not the JSON shape expected.
    #[error("{object} is not valid json")]
    Json {
        /// The document.
        object: String,
        /// The parse failure.
        #[source]
        source: serde_json::Error,
    },

    /// A digest in the document is malformed.
    #[error("{object} holds an invalid digest")]
    InvalidDigest {
        /// The document.
        object: String,
        /// What was wrong with the digest.
        #[source]
        source: DigestError,
    },

    /// A media type berth does not handle.
    #[error("unknown media type {media_type:?} for {object}")]
    UnknownMediaType {
        /// The blob or document.
        object: String,
        /// The media type.
        media_type: String,
    },

    /// A known media type in a place that needs another kind.
    #[error("{object} has media type {media_type:?}, expected {expected}")]
    WrongMediaType {
        /// The blob or document.
        object: String,
        /// The media type found.
        media_type: String,
        /// The kind wanted (`a manifest`, `a config`, `a layer`).
        expected: &'static str,
    },

    /// A descriptor without a media type.
    #[error("descriptor of {digest} in {object} has no media type")]
    MissingMediaType {
        /// The document holding the descriptor.
        object: String,
        /// The descriptor's digest.
        digest: Digest,
    },

    /// The document's own `mediaType` disagrees with its descriptor.
    #[error("{object} says media type {document:?} but its descriptor says {descriptor:?}")]
    MediaTypeMismatch {
        /// The document.
        object: String,
        /// The media type in the descriptor.
        descriptor: String,
        /// The media type in the document.
        document: String,
    },

    /// `schemaVersion` is not 2.
    #[error("{object} has schema version {version}, expected 2")]
    SchemaVersion {
        /// The document.
        object: String,
        /// The version found.
        version: u32,
    },

    /// The config lists a different number of diff IDs than the manifest has layers.
    #[error("config {config} has {diff_ids} diff ids for {layers} layers")]
    DiffIdCountMismatch {
        /// The config's digest.
        config: Digest,
        /// Number of diff IDs.
        diff_ids: usize,
        /// Number of layers in the manifest.
        layers: usize,
    },

    /// No manifest in the index (or the manifest's config) fits the platform.
    #[error("no manifest for platform {platform} in {digest}")]
    NoMatchingManifest {
        /// The index or manifest searched.
        digest: Digest,
        /// The platform wanted, as `os/arch[/variant]`.
        platform: String,
    },

    /// The manifest lists more layers than its [`Limits`] allow.
    #[error("{object} has {layers} layers, over the limit of {limit}")]
    TooManyLayers {
        /// The manifest.
        object: String,
        /// How many it lists.
        layers: usize,
        /// The limit.
        limit: usize,
    },

    /// Indexes nested deeper than berth follows.
    #[error("index {digest} nests indexes deeper than {MAX_INDEX_DEPTH}")]
    TooDeep {
        /// The index at which the walk stopped.
        digest: Digest,
    },

    /// A document did not match its descriptor.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Guesses the compression from a blob's first bytes (four are enough).
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    /// The OCI layer media type for a layer with this compression.
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Self::None => media_type::OCI_LAYER,
            Self::Gzip => media_type::OCI_LAYER_GZIP,
            Self::Zstd => media_type::OCI_LAYER_ZSTD,
        }
    }
}

/// What a media type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// An OCI index or Docker manifest list.
    Index,
    /// An OCI or Docker schema 2 manifest.
    Manifest,
    /// An image config.
    Config,
    /// A layer, with its compression.
    Layer(Compression),
}

impl BlobKind {
    /// Classifies a media type; `None` for one berth does not know.
    pub fn of(media_type: &str) -> Option<Self> {
        use media_type::*;
        let kind = match media_type {
            OCI_INDEX | DOCKER_MANIFEST_LIST => Self::Index,
            OCI_MANIFEST | DOCKER_MANIFEST => Self::Manifest,
            OCI_CONFIG | DOCKER_CONFIG => Self::Config,
            OCI_LAYER | OCI_LAYER_ND | DOCKER_LAYER => Self::Layer(Compression::None),
            OCI_LAYER_GZIP | OCI_LAYER_ND_GZIP | DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER_GZIP => {
                Self::Layer(Compression::Gzip)
            }
            OCI_LAYER_ZSTD | OCI_LAYER_ND_ZSTD | DOCKER_LAYER_ZSTD => {
                Self::Layer(Compression::Zstd)
            }
            _ => return None,
        };
        Some(kind)
    }

    /// Classifies the media type of `desc`, refusing an unknown one.
    pub fn of_descriptor(desc: &Descriptor) -> Result<Self, ImageError> {
        Self::of(&desc.media_type).ok_or_else(|| ImageError::UnknownMediaType {
            object: format!("blob {}", desc.digest),
            media_type: desc.media_type.clone(),
        })
    }
}

/// A typed pointer to a blob: media type, digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the blob.
    pub media_type: String,
    /// sha256 of the blob.
    pub digest: Digest,
    /// Size of the blob in bytes; authoritative.
    pub size: u64,
    /// Other places to fetch the blob from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Free-form annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform of a manifest listed in an index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// A descriptor with no urls, annotations or platform.
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.to_owned(),
            digest,
            size,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
            platform: None,
        }
    }

    /// The descriptor of `bytes` under `media_type`.
    pub fn of_bytes(media_type: &str, bytes: &[u8]) -> Self {
        Self::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// One annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// An image manifest: one config and its layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The document's own media type, when it states one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// Layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses a manifest fetched by `desc` after checking its size limit, its
    /// digest and size, and its media types (config and layers included).
    pub fn from_blob(desc: &Descriptor, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::from_blob_within(desc, bytes, &Limits::DEFAULT)
    }

    /// [`Manifest::from_blob`] under `limits` (its size, and its layers).
    pub fn from_blob_within(
        desc: &Descriptor,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Self, ImageError> {
        let object = format!("manifest {}", desc.digest);
        let limit = limits.max_manifest_size;
        check_blob(
            &object,
            desc,
            bytes,
            BlobKind::Manifest,
            "a manifest",
            limit,
        )?;
        let manifest = Self::parse_within(&object, bytes, limits)?;
        check_document_type(&object, desc, manifest.media_type.as_deref())?;
        Ok(manifest)
    }

    /// Parses manifest JSON, naming it `object` in errors; no digest check.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::parse_within(object, bytes, &Limits::DEFAULT)
    }

    /// [`Manifest::parse`] under `limits`: `TooLarge` for more bytes than
    /// `max_manifest_size`, `TooManyLayers` for more than `max_layers`.
    pub fn parse_within(object: &str, bytes: &[u8], limits: &Limits) -> Result<Self, ImageError> {
        check_size(object, bytes, limits.max_manifest_size)?;
        let raw: RawManifest = from_json(object, bytes)?;
        check_schema(object, raw.schema_version)?;
        if let Some(mt) = &raw.media_type {
            expect_kind(object, mt, BlobKind::Manifest, "a manifest")?;
        }

        let config = raw.config.into_descriptor(object)?;
        expect_kind(object, &config.media_type, BlobKind::Config, "a config")?;
        let layers = raw
            .layers
            .into_iter()
            .map(|l| l.into_descriptor(object))
            .collect::<Result<Vec<_>, _>>()?;
        limits.check_layers(object, layers.len())?;
        for layer in &layers {
            if !matches!(BlobKind::of_descriptor(layer)?, BlobKind::Layer(_)) {
                return Err(wrong_kind(&layer.digest, &layer.media_type, "a layer"));
            }
        }

        Ok(Self {
            schema_version: raw.schema_version,
            media_type: raw.media_type,
            config,
            layers,
            annotations: raw.annotations,
        })
    }

    /// The canonical JSON of this manifest, as berth writes it.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and numbers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// An image index (or Docker manifest list): manifests for several platforms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The document's own media type, when it states one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The listed manifests or nested indexes.
    pub manifests: Vec<Descriptor>,
    /// Free-form annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Index {
    /// Parses an index fetched by `desc` after checking its size limit,
    /// digest, size and media type.
    pub fn from_blob(desc: &Descriptor, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::from_blob_within(desc, bytes, &Limits::DEFAULT)
    }

    /// [`Index::from_blob`] under `limits.max_index_size`.
    pub fn from_blob_within(
        desc: &Descriptor,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Self, ImageError> {
        let object = format!("index {}", desc.digest);
        let limit = limits.max_index_size;
        check_blob(&object, desc, bytes, BlobKind::Index, "an index", limit)?;
        let index = Self::parse_within(&object, bytes, limits)?;
        check_document_type(&object, desc, index.media_type.as_deref())?;
        Ok(index)
    }

    /// Parses index JSON (an OCI layout's `index.json` too), naming it
    /// `object` in errors. Entries' media types are not checked here, since
    /// an index may list artifacts berth skips.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::parse_within(object, bytes, &Limits::DEFAULT)
    }

    /// [`Index::parse`] under `limits.max_index_size`.
    pub fn parse_within(object: &str, bytes: &[u8], limits: &Limits) -> Result<Self, ImageError> {
        check_size(object, bytes, limits.max_index_size)?;
        let raw: RawIndex = from_json(object, bytes)?;
        check_schema(object, raw.schema_version)?;
        if let Some(mt) = &raw.media_type {
            expect_kind(object, mt, BlobKind::Index, "an index")?;
        }
        let manifests = raw
            .manifests
            .into_iter()
            .map(|m| m.into_descriptor(object))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            schema_version: raw.schema_version,
            media_type: raw.media_type,
            manifests,
            annotations: raw.annotations,
        })
    }
}

/// The runtime part of an image config: what the container runs by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// Default user (`name`, `uid`, `uid:gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Default environment, `KEY=value`.
    #[serde(default, deserialize_with = "nullable")]
    pub env: Vec<String>,
    /// Entrypoint; `None` when unset, which differs from an empty list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or command when there is no entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    /// Signal that stops the container (`SIGTERM` when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

/// One history entry of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Command that made the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Whether the step made no layer; such entries have no diff ID.
    #[serde(default)]
    pub empty_layer: bool,
}

/// A parsed image config: platform, runtime defaults and diff IDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// Platform the image is built for.
    pub platform: Platform,
    /// Runtime defaults.
    pub config: ImageConfig,
    /// Digests of the uncompressed layers, bottom first.
    pub diff_ids: Vec<Digest>,
    /// Build history.
    pub history: Vec<History>,
}

impl ConfigFile {
    /// Parses a config fetched by `desc` after checking its size limit,
    /// digest, size and media type.
    pub fn from_blob(desc: &Descriptor, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::from_blob_within(desc, bytes, &Limits::DEFAULT)
    }

    /// [`ConfigFile::from_blob`] under `limits.max_config_size`.
    pub fn from_blob_within(
        desc: &Descriptor,
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<Self, ImageError> {
        let object = format!("config {}", desc.digest);
        let limit = limits.max_config_size;
        check_blob(&object, desc, bytes, BlobKind::Config, "a config", limit)?;
        Self::parse_within(&object, bytes, limits)
    }

    /// Parses config JSON, naming it `object` in errors; no digest check.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        Self::parse_within(object, bytes, &Limits::DEFAULT)
    }

    /// [`ConfigFile::parse`] under `limits.max_config_size`.
    pub fn parse_within(object: &str, bytes: &[u8], limits: &Limits) -> Result<Self, ImageError> {
        check_size(object, bytes, limits.max_config_size)?;
        let raw: RawConfig = from_json(object, bytes)?;
        let diff_ids = raw
            .rootfs
            .diff_ids
            .iter()
            .map(|d| Digest::parse(d).map_err(|source| invalid_digest(object, source)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            platform: Platform {
                architecture: raw.architecture,
                os: raw.os,
                os_version: raw.os_version,
                os_features: raw.os_features,
                variant: raw.variant,
            },
            config: raw.config.unwrap_or_default(),
            diff_ids,
            history: raw.history,
        })
    }
}

pub(crate) fn wrong_kind(digest: &Digest, media_type: &str, expected: &'static str) -> ImageError {
    ImageError::WrongMediaType {
        object: format!("blob {digest}"),
        media_type: media_type.to_owned(),
        expected,
    }
}

fn invalid_digest(object: &str, source: DigestError) -> ImageError {
    ImageError::InvalidDigest {
        object: object.to_owned(),
        source,
    }
}

/// Checks limit, kind of media type, size and digest of a fetched document.
fn check_blob(
    object: &str,
    desc: &Descriptor,
    bytes: &[u8],
    kind: BlobKind,
    expected: &'static str,
    limit: u64,
) -> Result<(), ImageError> {
    verify::check_limit(desc, limit)?;
    expect_kind(object, &desc.media_type, kind, expected)?;
    verify::verify_bytes(bytes, desc)?;
    Ok(())
}

fn expect_kind(
    object: &str,
    media_type: &str,
    kind: BlobKind,
    expected: &'static str,
) -> Result<(), ImageError> {
    match BlobKind::of(media_type) {
        Some(k) if k == kind => Ok(()),
        Some(_) => Err(ImageError::WrongMediaType {
            object: object.to_owned(),
            media_type: media_type.to_owned(),
            expected,
        }),
        None => Err(ImageError::UnknownMediaType {
            object: object.to_owned(),
            media_type: media_type.to_owned(),
        }),
    }
}

/// Refuses a document whose own `mediaType` differs from its descriptor's.
fn check_document_type(
    object: &str,
    desc: &Descriptor,
    document: Option<&str>,
) -> Result<(), ImageError> {
    match document {
        Some(document) if document != desc.media_type => Err(ImageError::MediaTypeMismatch {
            object: object.to_owned(),
            descriptor: desc.media_type.clone(),
            document: document.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn check_size(object: &str, bytes: &[u8], limit: u64) -> Result<(), ImageError> {
    let size = bytes.len() as u64;
    if size > limit {
        return Err(ImageError::TooLarge {
            object: object.to_owned(),
            size,
            limit,
        });
    }
    Ok(())
}

fn check_schema(object: &str, version: u32) -> Result<(), ImageError> {
    if version != 2 {
        return Err(ImageError::SchemaVersion {
            object: object.to_owned(),
            version,
        });
    }
    Ok(())
}

fn from_json<'a, T: Deserialize<'a>>(object: &str, bytes: &'a [u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::Json {
        object: object.to_owned(),
        source,
    })
}

/// Reads JSON `null` as the type's default, as Docker writes `"Env": null`.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A descriptor as written, digest still text.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default, deserialize_with = "nullable")]
    urls: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

impl RawDescriptor {
    fn into_descriptor(self, object: &str) -> Result<Descriptor, ImageError> {
        let digest =
            Digest::parse(&self.digest).map_err(|source| invalid_digest(object, source))?;
        let media_type = self
            .media_type
            .ok_or_else(|| ImageError::MissingMediaType {
                object: object.to_owned(),
                digest: digest.clone(),
            })?;
        Ok(Descriptor {
            media_type,
            digest,
            size: self.size,
            urls: self.urls,
            annotations: self.annotations,
            platform: self.platform,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: RawDescriptor,
    #[serde(default, deserialize_with = "nullable")]
    layers: Vec<RawDescriptor>,
    #[serde(default, deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIndex {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    manifests: Vec<RawDescriptor>,
    #[serde(default, deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(rename = "os.version", default)]
    os_version: Option<String>,
    #[serde(rename = "os.features", default, deserialize_with = "nullable")]
    os_features: Vec<String>,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RawRootFs,
    #[serde(default, deserialize_with = "nullable")]
    history: Vec<History>,
}

#[derive(Deserialize)]
struct RawRootFs {
    #[serde(default, deserialize_with = "nullable")]
    diff_ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const L1: &str = "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
    const L2: &str = "sha256:5c5affa5d693892ca86fcb2a2bc885d04b5474ee141879d359f51ed41b0d406b";
    const L3: &str = "sha256:6af7d6d7dfc1a8ef926eafeb462d3f10e41eb0a7039d64a00241117a5a1ad725";

    fn d(s: &str) -> Digest {
        Digest::parse(s).unwrap()
    }

    /// Blobs kept by digest, as a content store would.
    #[derive(Default)]
    struct Store(HashMap<Digest, Vec<u8>>);

    impl Store {
        fn add(&mut self, media_type: &str, bytes: Vec<u8>) -> Descriptor {
            let desc = Descriptor::of_bytes(media_type, &bytes);
            self.0.insert(desc.digest.clone(), bytes);
            desc
        }

        fn fetch(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
            Ok(self.0.get(&desc.digest).cloned().unwrap_or_default())
        }
    }

    fn config_json(arch: &str, diff_ids: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["sh"], "Env": null, "WorkingDir": "/srv",
                       "Labels": {"a": "b"}, "StopSignal": "SIGINT"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    fn manifest_json(mt: &str, config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": mt, "config": config, "layers": layers,
        }))
        .unwrap()
    }

    /// One image for `arch` with one gzip layer, returning its manifest descriptor.
    fn image(store: &mut Store, arch: &str, mt: &str, config_mt: &str) -> Descriptor {
        let config = store.add(config_mt, config_json(arch, &[L1]));
        let layer = Descriptor::new(media_type::DOCKER_LAYER_GZIP, d(L2), 10);
        store.add(mt, manifest_json(mt, &config, &[layer]))
    }

    fn index_json(entries: &[Descriptor]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": entries})).unwrap()
    }

    fn with_platform(
        mut desc: Descriptor,
        os: &str,
        arch: &str,
        variant: Option<&str>,
    ) -> Descriptor {
        desc.platform = Some(Platform::new(os, arch, variant));
        desc
    }

    #[test]
    fn media_types_classify() {
        let cases: &[(&str, Option<BlobKind>)] = &[
            (media_type::OCI_INDEX, Some(BlobKind::Index)),
            (media_type::DOCKER_MANIFEST_LIST, Some(BlobKind::Index)),
            (media_type::DOCKER_MANIFEST, Some(BlobKind::Manifest)),
            (media_type::DOCKER_CONFIG, Some(BlobKind::Config)),
            (
                media_type::DOCKER_LAYER_GZIP,
                Some(BlobKind::Layer(Compression::Gzip)),
            ),
            (
                media_type::OCI_LAYER_ZSTD,
                Some(BlobKind::Layer(Compression::Zstd)),
            ),
            (
                media_type::OCI_LAYER,
                Some(BlobKind::Layer(Compression::None)),
            ),
            (
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                None,
            ),
            ("application/vnd.cncf.helm.config.v1+json", None),
        ];
        for (mt, want) in cases {
            assert_eq!(BlobKind::of(mt), *want, "{mt}");
        }
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"usr/"), Compression::None);
    }

    #[test]
    fn resolves_docker_schema2_through_nested_index() {
        let mut store = Store::default();
        let amd = image(
            &mut store,
            "amd64",
            media_type::DOCKER_MANIFEST,
            media_type::DOCKER_CONFIG,
        );
        let arm = image(
            &mut store,
            "arm64",
            media_type::DOCKER_MANIFEST,
            media_type::DOCKER_CONFIG,
        );
        let inner = store.add(
            media_type::DOCKER_MANIFEST_LIST,
            index_json(&[
                with_platform(arm, "linux", "arm64", Some("v8")),
                with_platform(amd.clone(), "linux", "amd64", None),
            ]),
        );
        let outer = store.add(media_type::OCI_INDEX, index_json(&[inner]));

        let want = Platform::new("linux", "amd64", None);
        let image = resolve(&outer, &want, |desc| store.fetch(desc)).unwrap();
        assert_eq!(image.manifest_digest, amd.digest);
        assert_eq!(image.platform.architecture, "amd64");
        assert_eq!(image.diff_ids, vec![d(L1)]);
        assert_eq!(image.chain_ids, vec![d(L1)]);
        assert_eq!(image.config_json.cmd, Some(vec!["sh".to_owned()]));
        assert!(image.config_json.env.is_empty());
        assert_eq!(image.config_json.working_dir.as_deref(), Some("/srv"));
        assert_eq!(image.config_json.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(
            image.config_json.labels.get("a").map(String::as_str),
            Some("b")
        );
        assert_eq!(image.layers[0].media_type, media_type::DOCKER_LAYER_GZIP);

        let riscv = Platform::new("linux", "riscv64", None);
        let err = resolve(&outer, &riscv, |desc| store.fetch(desc)).unwrap_err();
        assert!(
            matches!(err, ImageError::NoMatchingManifest { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unplaced_manifest_is_checked_against_its_config() {
        let mut store = Store::default();
        let arm = image(
            &mut store,
            "arm64",
            media_type::OCI_MANIFEST,
            media_type::OCI_CONFIG,
        );
        let amd64 = Platform::new("linux", "amd64", None);
        let err = resolve(&arm, &amd64, |desc| store.fetch(desc)).unwrap_err();
        assert!(
            matches!(err, ImageError::NoMatchingManifest { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_defective_documents() {
        let mut store = Store::default();
        let amd64 = Platform::new("linux", "amd64", None);

        // Two layers but one diff ID.
        let config = store.add(media_type::OCI_CONFIG, config_json("amd64", &[L1]));
        let layer = |digest| Descriptor::new(media_type::OCI_LAYER_GZIP, d(digest), 10);
        let two = store.add(
            media_type::OCI_MANIFEST,
            manifest_json(media_type::OCI_MANIFEST, &config, &[layer(L1), layer(L2)]),
        );
        let err = resolve(&two, &amd64, |desc| store.fetch(desc)).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::DiffIdCountMismatch {
                    diff_ids: 1,
                    layers: 2,
                    ..
                }
            ),
            "{err:?}"
        );

        // A layer of an unknown media type.
        let odd = Descriptor::new("application/x-odd", d(L1), 10);
        let bytes = manifest_json(media_type::OCI_MANIFEST, &config, &[odd]);
        let err = Manifest::parse("manifest", &bytes).unwrap_err();
        assert!(
            matches!(err, ImageError::UnknownMediaType { .. }),
            "{err:?}"
        );

        // A document whose mediaType contradicts its descriptor.
        let bytes = manifest_json(media_type::DOCKER_MANIFEST, &config, &[layer(L1)]);
        let desc = Descriptor::of_bytes(media_type::OCI_MANIFEST, &bytes);
        let err = Manifest::from_blob(&desc, &bytes).unwrap_err();
        assert!(
            matches!(err, ImageError::MediaTypeMismatch { .. }),
            "{err:?}"
        );

        // Bytes that do not hash to the descriptor.
        let mut desc = Descriptor::of_bytes(media_type::OCI_MANIFEST, &bytes);
        desc.digest = d(L3);
        let err = Manifest::from_blob(&desc, &bytes).unwrap_err();
        assert!(
            matches!(err, ImageError::Verify(VerifyError::DigestMismatch { .. })),
            "{err:?}"
        );

        // Over the 4 MiB limit, by descriptor and by content.
        let big = Descriptor::new(media_type::OCI_MANIFEST, d(L3), MAX_JSON_SIZE + 1);
        let err = resolve(&big, &amd64, |desc| store.fetch(desc)).unwrap_err();
        assert!(
            matches!(err, ImageError::Verify(VerifyError::TooLarge { .. })),
            "{err:?}"
        );
        let huge = vec![b' '; MAX_JSON_SIZE as usize + 1];
        let err = ConfigFile::parse("config", &huge).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { .. }), "{err:?}");

        // An upper-case digest inside a manifest.
        let text = String::from_utf8(manifest_json(media_type::OCI_MANIFEST, &config, &[]))
            .unwrap()
            .replace(config.digest.hex(), &config.digest.hex().to_uppercase());
        let err = Manifest::parse("manifest", text.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::InvalidDigest {
                    source: DigestError::InvalidHex { .. },
                    ..
                }
            ),
            "{err:?}"
        );

        // Schema version 1.
        let err = Index::parse("index.json", br#"{"schemaVersion":1,"manifests":[]}"#).unwrap_err();
        assert!(
            matches!(err, ImageError::SchemaVersion { version: 1, .. }),
            "{err:?}"
        );

        // Not JSON at all.
        let err = Index::parse("index.json", b"{").unwrap_err();
        assert!(matches!(err, ImageError::Json { .. }), "{err:?}");
    }

    #[test]
    fn manifest_json_round_trips() {
        let config = Descriptor::of_bytes(media_type::OCI_CONFIG, b"{}");
        let layer = Descriptor::new(media_type::OCI_LAYER, d(L1), 2130944);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_owned()),
            config,
            layers: vec![layer],
            annotations: BTreeMap::new(),
        };
        let bytes = manifest.to_json();
        assert_eq!(Manifest::parse("manifest", &bytes).unwrap(), manifest);
    }

    #[test]
    fn limits_are_the_callers() {
        let config = Descriptor::of_bytes(media_type::OCI_CONFIG, b"{}");
        let layers: Vec<Descriptor> = (0..3)
            .map(|_| Descriptor::new(media_type::OCI_LAYER, d(L1), 1))
            .collect();
        let bytes = manifest_json(media_type::OCI_MANIFEST, &config, &layers);
        let tight = Limits {
            max_layers: 2,
            ..Limits::DEFAULT
        };
        let err = Manifest::parse_within("manifest m", &bytes, &tight).unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest m has 3 layers, over the limit of 2"
        );
        Manifest::parse("manifest m", &bytes).unwrap();

        let small = Limits {
            max_manifest_size: 16,
            ..Limits::DEFAULT
        };
        let err = Manifest::parse_within("manifest m", &bytes, &small).unwrap_err();
        assert!(
            matches!(err, ImageError::TooLarge { limit: 16, .. }),
            "{err:?}"
        );
        let err = small
            .check_document("manifest m", BlobKind::Manifest, 32 << 20)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "manifest m is 33554432 bytes, over the 16 byte limit"
        );
        assert_eq!(Limits::DEFAULT.largest_document(), MAX_JSON_SIZE);
    }
}
