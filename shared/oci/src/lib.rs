//! OCI image helpers shared by the CLI and the services.
//!
//! - [`digest`]: the `sha256:<hex>` type and streaming hashers.
//! - [`reference`](mod@reference): docker-style image names, normalized.
//! - [`image`]: descriptors, indexes, manifests, configs, platform choice and
//!   chain IDs.
//! - [`platform`]: OS and CPU of an image, and which run on this host.
//! - [`resolve`](mod@resolve): from an index or manifest to the image for one platform.
//! - [`verify`](mod@verify): checking a blob stream against its descriptor.
//! - [`archive`]: OCI layout and docker-archive tarballs on disk.
//!
//! Every error here is about the input (an `InvalidArgument` on the wire),
//! except the I/O variants (`Internal`) and a blob asked of an archive that
//! lacks it (`NotFound`); services map them at their edge.

#![warn(missing_docs)]

pub mod archive;
pub mod digest;
pub mod image;
pub mod platform;
pub mod reference;
pub mod resolve;
pub mod verify;

pub use archive::{Archive, ArchiveError, ArchiveFormat, ArchiveImage, BlobReader};
pub use digest::{Digest, DigestError, Hasher, Sha256Reader, Sha256Writer};
pub use image::{
    chain_ids, resolve, resolve_with, BlobKind, Compression, ConfigFile, Descriptor, ImageConfig,
    ImageError, Index, Limits, Manifest, Platform, ResolvedImage,
};
pub use reference::{Reference, ReferenceError};
pub use verify::{verify_blob, VerifyError};
