//! One module per subject group of `berth.v1.<namespace>.metadata.*`, one
//! function per op, named like the op's last token.
//!
//! Each op validates its request, acts through the store (one change on the
//! writer for a mutating op, one read transaction otherwise) and returns its
//! reply; the serve loop writes errors in their wire form.

pub mod containers;
pub mod gc;
pub mod images;
pub mod leases;
pub mod namespaces;
pub mod nodes;
pub mod tasks;
pub mod tombstones;

use crate::error::{MetadataError, Result};

/// Checks a digest: `sha256:` and 64 lowercase hex digits.
pub fn check_digest(what: &'static str, digest: &str) -> Result<()> {
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    let well_formed = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed {
        return Err(MetadataError::invalid(
            what,
            digest,
            "want sha256: and 64 lowercase hex digits",
        ));
    }
    Ok(())
}

/// Checks a free-form id or name: not empty, at most `max` bytes, no
/// whitespace or control character.
pub fn check_name(what: &'static str, name: &str, max: usize) -> Result<()> {
    if name.is_empty() {
        return Err(MetadataError::invalid(what, name, "it is empty"));
    }
    if name.len() > max {
        return Err(MetadataError::invalid(
            what,
            name,
            format!("it is longer than {max} bytes"),
        ));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(MetadataError::invalid(
            what,
            name,
            "it holds whitespace or a control character",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "a1".repeat(32));
        let cases: &[(&str, String, bool)] = &[
            ("well formed", good.clone(), true),
            ("no algorithm", "a1".repeat(32), false),
            (
                "other algorithm",
                format!("sha512:{}", "a1".repeat(32)),
                false,
            ),
            (
                "upper case",
                good.to_uppercase().replace("SHA256", "sha256"),
                false,
            ),
            ("short", "sha256:abc".into(), false),
            ("empty", String::new(), false),
        ];
        for (case, digest, ok) in cases {
            assert_eq!(check_digest("digest", digest).is_ok(), *ok, "{case}");
        }
    }

    #[test]
    fn names() {
        let cases: &[(&str, &str, bool)] = &[
            ("reference", "docker.io/library/busybox:latest", true),
            ("empty", "", false),
            ("space", "a b", false),
            ("nul", "a\0b", false),
            ("too long", &"x".repeat(65), false),
        ];
        for (case, name, ok) in cases {
            assert_eq!(check_name("name", name, 64).is_ok(), *ok, "{case}");
        }
    }
}
