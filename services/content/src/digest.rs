//! The names the content service takes from the wire: digests, ingest refs,
//! and the directory a namespace's ingests live in. Each is checked before
//! it touches the disk, so no name can reach outside the content root or
//! into another namespace's directory.

use std::fmt;

use crate::error::ContentError;

/// The longest ingest ref.
pub const MAX_REF_LEN: usize = 200;

/// The only algorithm blobs are stored under.
pub const ALGORITHM: &str = "sha256";

/// A checked `sha256:<64 lowercase hex>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses a digest; `InvalidArgument` for anything but sha256 with 64
    /// lowercase hex digits (upper-case hex is refused, not folded, since
    /// the OCI layout names blob files by the digest as written).
    pub fn parse(digest: &str) -> Result<Digest, ContentError> {
        let malformed = |reason| ContentError::MalformedDigest {
            digest: digest.to_string(),
            reason,
        };
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return Err(malformed("expected <algorithm>:<hex>"));
        };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        if !algorithm_ok {
            return Err(malformed(
                "the algorithm must be lowercase letters and digits",
            ));
        }
        if algorithm != ALGORITHM {
            return Err(ContentError::UnsupportedAlgorithm {
                algorithm: algorithm.to_string(),
                digest: digest.to_string(),
            });
        }
        if hex.len() != 64 {
            return Err(malformed("a sha256 digest has 64 hex digits"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(malformed("the hex must be lowercase 0-9a-f"));
        }
        Ok(Digest(digest.to_string()))
    }

    /// The digest of `sha256` output bytes.
    pub fn from_sha256(hash: &[u8]) -> Digest {
        Digest(format!("{ALGORITHM}:{}", hex::encode(hash)))
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex part: the blob's file name.
    pub fn hex(&self) -> &str {
        &self.0[ALGORITHM.len() + 1..]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an ingest ref: letters, digits and `-_.:@`, not starting with a
/// dot, at most [`MAX_REF_LEN`] bytes, so it names exactly one directory.
pub fn check_ref(reference: &str) -> Result<(), ContentError> {
    let invalid = |reason| ContentError::InvalidRef {
        reference: reference.to_string(),
        reason,
    };
    if reference.is_empty() {
        return Err(invalid("it is empty"));
    }
    if reference.len() > MAX_REF_LEN {
        return Err(invalid("it is longer than 200 bytes"));
    }
    if reference.starts_with('.') {
        return Err(invalid("it starts with a dot"));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
    if !reference.chars().all(ok_char) {
        return Err(invalid("use only letters, digits and -_.:@"));
    }
    Ok(())
}

/// The directory name of a namespace's ingests: the name itself when it is
/// made of letters, digits, `-` and `_`, else with every other byte written
/// `%XX`. The map is one-to-one, so two namespaces never share a directory
/// (a namespace may hold `/`, which NATS allows in a token).
pub fn namespace_dir(namespace: &str) -> String {
    let mut out = String::with_capacity(namespace.len());
    for byte in namespace.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every malformed digest is refused with the kind of fault named, and
    /// only sha256 is accepted.
    #[test]
    fn digests_are_checked() {
        let hex = "a".repeat(64);
        let good = format!("sha256:{hex}");
        let parsed = Digest::parse(&good).unwrap();
        assert_eq!(parsed.hex(), hex);
        assert_eq!(parsed.as_str(), good);

        let cases = [
            (format!("sha256:{}", "A".repeat(64)), "lowercase"),
            (format!("sha256:{}", "a".repeat(63)), "64 hex digits"),
            (format!("sha256:{}", "g".repeat(64)), "lowercase"),
            ("sha256".to_string(), "<algorithm>:<hex>"),
            (format!(":{hex}"), "algorithm"),
            (format!("SHA256:{hex}"), "algorithm"),
            (format!("sha512:{}", "a".repeat(128)), "unsupported"),
            (format!("blake3:{hex}"), "unsupported"),
        ];
        for (digest, kind) in cases {
            let err = Digest::parse(&digest).unwrap_err();
            assert!(err.to_string().contains(kind), "{digest}: {err}");
            assert_eq!(err.code(), berth_bus::Code::InvalidArgument);
        }
    }

    /// Refs that could name another directory, or none, are refused.
    #[test]
    fn refs_with_path_characters_are_refused() {
        let long = "x".repeat(MAX_REF_LEN + 1);
        let cases = [
            "", "..", "../x", "a/b", "/abs", ".hidden", "a b", "a\0b", "ä", &long,
        ];
        for reference in cases {
            assert!(check_ref(reference).is_err(), "{reference:?}");
        }
        check_ref("import-sha256:abc@1").unwrap();
        check_ref(&"x".repeat(MAX_REF_LEN)).unwrap();
    }

    /// Namespace directories are one per namespace and stay inside `ingest/`.
    #[test]
    fn namespace_dirs_are_distinct_and_flat() {
        assert_eq!(namespace_dir("default"), "default");
        assert_eq!(namespace_dir("team-a_1"), "team-a_1");
        let names = ["a/b", "a%2Fb", "a", "a%b", ":"];
        let dirs: std::collections::HashSet<String> =
            names.iter().map(|name| namespace_dir(name)).collect();
        assert_eq!(dirs.len(), names.len());
        for dir in dirs {
            assert!(!dir.contains('/') && !dir.starts_with('.'), "{dir}");
        }
    }
}
