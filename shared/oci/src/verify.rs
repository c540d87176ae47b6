//! Checking bytes against the descriptor that names them.
//!
//! A descriptor's size is authoritative: reading more or fewer bytes than it
//! declares is an error, and the digest must be the sha256 of exactly those
//! bytes. These helpers are what a consumer (the content service on ingest
//! and on read-back, the CLI on import) runs over a blob stream, since an
//! archive or a registry is never trusted to hold what it claims.

use std::io::{self, Read, Write};

use crate::digest::{Digest, Sha256Writer};
use crate::image::Descriptor;

/// Size of the buffer used to stream a blob through the hash.
const COPY_BUFFER: usize = 64 * 1024;

/// Why a blob does not match its descriptor.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The stream ended before the descriptor's size.
    #[error("blob {digest} is truncated: {actual} bytes of {expected}")]
    Truncated {
        /// Digest the descriptor names.
        digest: Digest,
        /// Size the descriptor declares.
        expected: u64,
        /// Bytes the stream held.
        actual: u64,
    },

    /// The stream holds more than the descriptor's size.
    #[error("blob {digest} is longer than its descriptor size {expected}")]
    TooLong {
        /// Digest the descriptor names.
        digest: Digest,
        /// Size the descriptor declares.
        expected: u64,
    },

    /// The bytes hash to another digest.
    #[error("blob {expected} hashes to {actual}")]
    DigestMismatch {
        /// Digest the descriptor names.
        expected: Digest,
        /// Digest of the bytes read.
        actual: Digest,
    },

    /// The descriptor's size is over the limit the caller set for this blob.
    #[error("blob {digest} is {size} bytes, over the {limit} byte limit")]
    TooLarge {
        /// Digest the descriptor names.
        digest: Digest,
        /// Size the descriptor declares.
        size: u64,
        /// The caller's limit.
        limit: u64,
    },

    /// Reading or writing the stream failed.
    #[error("failed to read blob {digest}")]
    Io {
        /// Digest the descriptor names.
        digest: Digest,
        /// The I/O failure.
        #[source]
        source: io::Error,
    },
}

/// Streams `reader` into `writer` and checks that it held exactly
/// `desc.size` bytes hashing to `desc.digest`.
///
/// At most `desc.size + 1` bytes are read, so a stream longer than declared
/// is caught without reading it to the end. The writer has received the
/// bytes by the time an error is returned: the caller must discard them.
pub fn copy_verified<R: Read, W: Write>(
    reader: R,
    writer: W,
    desc: &Descriptor,
) -> Result<W, VerifyError> {
    let io_err = |source| VerifyError::Io {
        digest: desc.digest.clone(),
        source,
    };
    let mut limited = reader.take(desc.size.saturating_add(1));
    let mut hashing = Sha256Writer::new(writer);
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        if hashing.written() + n as u64 > desc.size {
            return Err(VerifyError::TooLong {
                digest: desc.digest.clone(),
                expected: desc.size,
            });
        }
        hashing.write_all(&buf[..n]).map_err(io_err)?;
    }

    let (writer, actual, len) = hashing.finish();
    if len < desc.size {
        return Err(VerifyError::Truncated {
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: len,
        });
    }
    if actual != desc.digest {
        return Err(VerifyError::DigestMismatch {
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(writer)
}

/// Reads `reader` to its end and checks size and digest against `desc`,
/// keeping nothing.
pub fn verify_blob<R: Read>(reader: R, desc: &Descriptor) -> Result<(), VerifyError> {
    copy_verified(reader, io::sink(), desc).map(|_| ())
}

/// Reads a small blob into memory and checks it against `desc`.
///
/// Refuses with [`VerifyError::TooLarge`] before reading when the descriptor
/// declares more than `limit` bytes, so a hostile descriptor cannot make the
/// caller allocate without bound.
pub fn read_verified<R: Read>(
    reader: R,
    desc: &Descriptor,
    limit: u64,
) -> Result<Vec<u8>, VerifyError> {
    check_limit(desc, limit)?;
    // The size is at most `limit`, which the caller keeps small.
    let capacity = usize::try_from(desc.size).unwrap_or(0);
    copy_verified(reader, Vec::with_capacity(capacity), desc)
}

/// Checks bytes already in memory against `desc`.
pub fn verify_bytes(bytes: &[u8], desc: &Descriptor) -> Result<(), VerifyError> {
    verify_blob(bytes, desc)
}

/// Refuses a descriptor that declares more than `limit` bytes.
pub fn check_limit(desc: &Descriptor, limit: u64) -> Result<(), VerifyError> {
    if desc.size > limit {
        return Err(VerifyError::TooLarge {
            digest: desc.digest.clone(),
            size: desc.size,
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(bytes: &[u8]) -> Descriptor {
        Descriptor::new(
            "application/octet-stream",
            Digest::of(bytes),
            bytes.len() as u64,
        )
    }

    #[test]
    fn accepts_exact_blob() {
        let d = desc(b"hello");
        verify_blob(&b"hello"[..], &d).unwrap();
        assert_eq!(read_verified(&b"hello"[..], &d, 10).unwrap(), b"hello");
    }

    #[test]
    fn refuses_each_defect() {
        let d = desc(b"hello");
        let cases: &[(&[u8], &str)] = &[
            (b"hell", "truncated"),
            (b"hello!", "long"),
            (b"jello", "digest"),
            (b"", "truncated"),
        ];
        for (bytes, kind) in cases {
            let err = verify_blob(*bytes, &d).unwrap_err();
            let ok = match *kind {
                "truncated" => matches!(err, VerifyError::Truncated { .. }),
                "long" => matches!(err, VerifyError::TooLong { .. }),
                _ => matches!(err, VerifyError::DigestMismatch { .. }),
            };
            assert!(ok, "{bytes:?} gave {err:?}, wanted {kind}");
        }
    }

    #[test]
    fn limit_is_checked_before_reading() {
        let d = desc(b"hello");
        let err = read_verified(&b"hello"[..], &d, 4).unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::TooLarge {
                    size: 5,
                    limit: 4,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
