//! Content digests: the `sha256:<64 lowercase hex>` names every blob goes by.
//!
//! berth supports one algorithm, sha256, and one spelling of it. Upper-case
//! hex is refused rather than folded, because two spellings of one digest
//! would name one blob twice in the content store and in every label that
//! points at it. The hashing helpers here let a consumer compute a digest
//! while the bytes stream past, so no blob is read twice to be checked.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The only algorithm berth accepts.
pub const SHA256: &str = "sha256";

/// Length of a sha256 digest in hex digits.
const SHA256_HEX_LEN: usize = 64;

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string has no `algorithm:` prefix.
    #[error("digest {value:?} has no algorithm prefix")]
    MissingAlgorithm {
        /// The refused string.
        value: String,
    },

    /// The algorithm is not sha256.
    #[error("unsupported digest algorithm {algorithm:?} in digest {value:?}")]
    UnsupportedAlgorithm {
        /// The algorithm named before the colon.
        algorithm: String,
        /// The refused string.
        value: String,
    },

    /// The hex part is not 64 characters long.
    #[error("digest {value:?} has {len} hex digits, sha256 needs 64")]
    WrongLength {
        /// The refused string.
        value: String,
        /// Length of the part after the colon.
        len: usize,
    },

    /// The hex part holds a character other than `0-9a-f` (upper case included).
    #[error("digest {value:?} is not lowercase hex")]
    InvalidHex {
        /// The refused string.
        value: String,
    },
}

/// A validated `sha256:<64 lowercase hex>` digest.
///
/// Parsing is strict (see [`Digest::parse`]); serde goes through the same
/// parser, so a deserialized digest is always well formed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`, refusing other algorithms, a wrong length and
    /// any character outside `0-9a-f`.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let Some((algorithm, hex)) = value.split_once(':') else {
            return Err(DigestError::MissingAlgorithm {
                value: value.to_owned(),
            });
        };
        if algorithm != SHA256 {
            return Err(DigestError::UnsupportedAlgorithm {
                algorithm: algorithm.to_owned(),
                value: value.to_owned(),
            });
        }
        if hex.len() != SHA256_HEX_LEN {
            return Err(DigestError::WrongLength {
                value: value.to_owned(),
                len: hex.len(),
            });
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::InvalidHex {
                value: value.to_owned(),
            });
        }
        Ok(Self(value.to_owned()))
    }

    /// Builds a digest from bare hex, as found in a blob's file name.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        Self::parse(&format!("{SHA256}:{hex}"))
    }

    /// Builds a digest from the 32 raw bytes of a sha256 sum.
    pub fn from_sha256(sum: [u8; 32]) -> Self {
        Self(format!("{SHA256}:{}", hex::encode(sum)))
    }

    /// Hashes `bytes` in one go.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// The algorithm, always `sha256`.
    pub fn algorithm(&self) -> &str {
        SHA256
    }

    /// The 64 hex digits after the colon.
    pub fn hex(&self) -> &str {
        &self.0[SHA256.len() + 1..]
    }

    /// The full `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Self::parse(&value).map_err(serde::de::Error::custom)
    }
}

/// An incremental sha256 that also counts the bytes it has seen.
#[derive(Clone, Default)]
pub struct Hasher {
    sha: Sha256,
    len: u64,
}

impl Hasher {
    /// Starts an empty hash.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the hash and returns the digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest::from_sha256(self.sha.finalize().into())
    }
}

/// A writer that hashes every byte on its way to `inner`.
///
/// Only bytes `inner` accepted are hashed, so a short write leaves the hash
/// in step with what was really written.
pub struct Sha256Writer<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Sha256Writer<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes every byte it hands out.
///
/// Useful to compute a diff ID while a decompressor feeds a tar reader.
pub struct Sha256Reader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Sha256Reader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
        }
    }

    /// Bytes read so far.
    pub fn read_len(&self) -> u64 {
        self.hasher.len()
    }

    /// Returns the inner reader, the digest and the byte count.
    pub fn finish(self) -> (R, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<R: Read> Read for Sha256Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn of_empty_matches_known_digest() {
        assert_eq!(Digest::of(b"").as_str(), EMPTY);
    }

    #[test]
    fn parse_accepts_lowercase_sha256() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::from_hex(d.hex()).unwrap(), d);
    }

    #[test]
    fn parse_refuses_malformed() {
        let upper = format!("sha256:{}", EMPTY[7..].to_uppercase());
        let cases: &[(&str, &str)] = &[
            ("", "missing"),
            ("e3b0c442", "missing"),
            ("sha512:abcd", "algorithm"),
            ("SHA256:e3b0", "algorithm"),
            ("sha256:e3b0", "length"),
            (&upper, "hex"),
            (
                "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "hex",
            ),
        ];
        for (input, kind) in cases {
            let err = Digest::parse(input).unwrap_err();
            let ok = match *kind {
                "missing" => matches!(err, DigestError::MissingAlgorithm { .. }),
                "algorithm" => matches!(err, DigestError::UnsupportedAlgorithm { .. }),
                "length" => matches!(err, DigestError::WrongLength { .. }),
                _ => matches!(err, DigestError::InvalidHex { .. }),
            };
            assert!(ok, "{input:?} gave {err:?}, wanted {kind}");
        }
        let err = Digest::parse("md5:abc").unwrap_err().to_string();
        assert!(err.contains("unsupported digest algorithm"), "{err}");
    }

    #[test]
    fn serde_round_trip_and_refusal() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:AB\"").is_err());
    }

    #[test]
    fn writer_and_reader_hash_what_passes() {
        let mut w = Sha256Writer::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (bytes, digest, len) = w.finish();
        assert_eq!(bytes, b"hello world");
        assert_eq!(len, 11);
        assert_eq!(digest, Digest::of(b"hello world"));

        let mut r = Sha256Reader::new(&b"hello world"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let (_, digest2, len2) = r.finish();
        assert_eq!((digest2, len2), (digest, 11));
    }
}
