//! Image references, normalized the way docker does it.
//!
//! `busybox` means `docker.io/library/busybox:latest`: a name with no domain
//! goes to `docker.io`, a one-part name there gets the `library/` prefix, and
//! a reference with neither tag nor digest gets the tag `latest`. The first
//! path component is a domain only if it holds a `.` or a `:`, is
//! `localhost`, or has an upper-case letter, as in docker. Image records are
//! stored under the normalized form, and [`Reference::familiar`] gives back
//! the short form people type.
//!
//! An OCI archive names its images with the `org.opencontainers.image.ref.name`
//! annotation, which is often a bare tag (`latest`). [`Reference::for_archive`]
//! fills in the repository from the archive's file name in that case.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

/// Domain a name without one belongs to.
pub const DEFAULT_DOMAIN: &str = "docker.io";

/// Legacy spelling of [`DEFAULT_DOMAIN`], rewritten on parse.
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";

/// Prefix of one-part names on the default domain.
const OFFICIAL_PREFIX: &str = "library/";

/// Tag given to a reference that has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// Longest name (domain and path) docker accepts.
const MAX_NAME_LEN: usize = 255;

/// Longest tag docker accepts.
const MAX_TAG_LEN: usize = 128;

/// File name suffixes stripped to turn an archive file into a repository name,
/// longest first so `.oci.tar.gz` is not cut to `x.oci`.
const ARCHIVE_SUFFIXES: &[&str] = &[
    ".oci.tar.gz",
    ".docker.tar.gz",
    ".tar.gz",
    ".oci.tgz",
    ".tgz",
    ".oci.tar",
    ".docker.tar",
    ".tar",
];

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The string is empty.
    #[error("image reference is empty")]
    Empty,

    /// A bare 64-hex string looks like an image ID, not a name.
    #[error("image reference {reference:?} is a 64-hex id, not a repository name")]
    HexName {
        /// The refused reference.
        reference: String,
    },

    /// The repository path holds an upper-case letter.
    #[error("repository name in image reference {reference:?} must be lowercase")]
    Uppercase {
        /// The refused reference.
        reference: String,
    },

    /// The domain part is not a host name with an optional port.
    #[error("invalid domain {domain:?} in image reference {reference:?}")]
    InvalidDomain {
        /// The refused reference.
        reference: String,
        /// The domain part.
        domain: String,
    },

    /// A path component breaks docker's grammar.
    #[error("invalid repository path {path:?} in image reference {reference:?}")]
    InvalidPath {
        /// The refused reference.
        reference: String,
        /// The path part.
        path: String,
    },

    /// The name is longer than 255 characters.
    #[error("repository name in image reference {reference:?} is longer than 255 characters")]
    NameTooLong {
        /// The refused reference.
        reference: String,
    },

    /// The tag breaks docker's grammar (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
    #[error("invalid tag {tag:?} in image reference {reference:?}")]
    InvalidTag {
        /// The refused reference.
        reference: String,
        /// The tag part.
        tag: String,
    },

    /// The part after `@` is not a valid digest.
    #[error("invalid digest in image reference {reference:?}")]
    InvalidDigest {
        /// The refused reference.
        reference: String,
        /// What was wrong with the digest.
        #[source]
        source: DigestError,
    },

    /// An archive's file name gives no usable repository name for a bare tag.
    #[error("archive file {file:?} gives no repository name for tag {tag:?}")]
    ArchiveName {
        /// The archive's file name.
        file: String,
        /// The tag from the archive's annotation.
        tag: String,
    },
}

/// A normalized image reference: `domain/path[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reference {
    /// Registry host, with port if any (`docker.io`, `localhost:5000`).
    pub domain: String,
    /// Repository path below the domain (`library/busybox`).
    pub path: String,
    /// Tag, `latest` when the input had neither tag nor digest.
    pub tag: Option<String>,
    /// Digest pinned with `@`, if any.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes a docker-style reference.
    ///
    /// `busybox` gives `docker.io/library/busybox:latest`; a reference with a
    /// digest and no tag keeps no tag.
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        if reference.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let err_ref = || reference.to_owned();

        // The name never holds `@`, so the first one starts the digest.
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) => {
                let digest =
                    Digest::parse(digest).map_err(|source| ReferenceError::InvalidDigest {
                        reference: err_ref(),
                        source,
                    })?;
                (rest, Some(digest))
            }
            None => (reference, None),
        };

        // A tag colon comes after the last slash; an earlier one is a port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(ReferenceError::InvalidTag {
                    reference: err_ref(),
                    tag: tag.to_owned(),
                });
            }
        }
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReferenceError::HexName {
                reference: err_ref(),
            });
        }

        let (domain, path) = split_domain(name);
        check_name(reference, &domain, &path)?;

        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(Self {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// Names an image found in an OCI archive from its
    /// `org.opencontainers.image.ref.name` annotation.
    ///
    /// An annotation holding a whole name (it has a `/`, `:` or `@`) is
    /// normalized as by [`Reference::parse`]. A bare tag (`latest`) takes the
    /// archive's file name, less `.oci.tar`, `.tar`, `.tar.gz` and similar
    /// suffixes, as repository: `busybox.oci.tar` with `latest` gives
    /// `docker.io/library/busybox:latest`. Without an annotation the image is
    /// named by the file name and `digest`.
    ///
    /// # Limitations
    /// A one-word annotation is always read as a tag, never as a repository.
    pub fn for_archive(
        annotation: Option<&str>,
        archive_file: &Path,
        digest: &Digest,
    ) -> Result<Self, ReferenceError> {
        if let Some(name) = annotation {
            if name.contains(['/', ':', '@']) {
                return Self::parse(name);
            }
        }
        let file = archive_file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = archive_base_name(&file);
        if base.is_empty() || base.contains(['/', ':', '@']) {
            return Err(ReferenceError::ArchiveName {
                file,
                tag: annotation.unwrap_or_default().to_owned(),
            });
        }

        // The base name is a one-part repository, so it lands under `library/`.
        match annotation {
            Some(tag) => Self::parse(&format!("{base}:{tag}")),
            None => Self::parse(&format!("{base}@{digest}")),
        }
    }

    /// The repository name: `domain/path`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The short form docker prints: `busybox:latest` for
    /// `docker.io/library/busybox:latest`, `user/app:1` for
    /// `docker.io/user/app:1`; other domains are kept.
    pub fn familiar(&self) -> String {
        let name = if self.domain == DEFAULT_DOMAIN {
            self.path
                .strip_prefix(OFFICIAL_PREFIX)
                .filter(|p| !p.contains('/'))
                .unwrap_or(&self.path)
                .to_owned()
        } else {
            self.name()
        };
        let mut out = name;
        self.push_suffix(&mut out);
        out
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest.as_str());
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        self.push_suffix(&mut out);
        f.write_str(&out)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The archive file name less its archive suffix (`busybox.oci.tar` -> `busybox`).
pub fn archive_base_name(file_name: &str) -> &str {
    ARCHIVE_SUFFIXES
        .iter()
        .find_map(|suffix| file_name.strip_suffix(suffix))
        .unwrap_or(file_name)
}

/// Splits a name into domain and path with docker's rules, then normalizes
/// the default domain and the `library/` prefix.
fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    };
    let domain = if domain == LEGACY_DEFAULT_DOMAIN {
        DEFAULT_DOMAIN
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path.to_owned()
    };
    (domain.to_owned(), path)
}

/// Checks domain and path against docker's grammar.
fn check_name(reference: &str, domain: &str, path: &str) -> Result<(), ReferenceError> {
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ReferenceError::Uppercase {
            reference: reference.to_owned(),
        });
    }
    if !valid_domain(domain) {
        return Err(ReferenceError::InvalidDomain {
            reference: reference.to_owned(),
            domain: domain.to_owned(),
        });
    }
    if !path.split('/').all(valid_path_component) {
        return Err(ReferenceError::InvalidPath {
            reference: reference.to_owned(),
            path: path.to_owned(),
        });
    }
    if domain.len() + 1 + path.len() > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong {
            reference: reference.to_owned(),
        });
    }
    Ok(())
}

/// `host[:port]` where host is dot-separated labels or a bracketed IPv6 address.
fn valid_domain(domain: &str) -> bool {
    let valid_port = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());

    if let Some(rest) = domain.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        let v6_ok = !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        let after_ok = after.is_empty() || after.strip_prefix(':').is_some_and(valid_port);
        return v6_ok && after_ok;
    }

    let (host, port_ok) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, valid_port(port)),
        None => (domain, true),
    };
    port_ok && host.split('.').all(valid_domain_label)
}

/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn valid_domain_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";

    #[test]
    fn normalizes_like_docker() {
        let digested = format!("busybox@sha256:{HEX}");
        let digested_out = format!("docker.io/library/busybox@sha256:{HEX}");
        let tagged_digested = format!("quay.io/a/b:v1@sha256:{HEX}");
        let cases: &[(&str, &str, &str)] = &[
            (
                "busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            (
                "library/busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            ("user/app:2", "docker.io/user/app:2", "user/app:2"),
            (
                "host:5000/ns/name:tag",
                "host:5000/ns/name:tag",
                "host:5000/ns/name:tag",
            ),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "localhost:5000/x",
                "localhost:5000/x:latest",
                "localhost:5000/x:latest",
            ),
            (
                "registry.example.com/a/b/c",
                "registry.example.com/a/b/c:latest",
                "registry.example.com/a/b/c:latest",
            ),
            ("Host/app", "Host/app:latest", "Host/app:latest"),
            (
                "[::1]:5000/app",
                "[::1]:5000/app:latest",
                "[::1]:5000/app:latest",
            ),
            (
                "a__b/c-d--e.f_g",
                "docker.io/a__b/c-d--e.f_g:latest",
                "a__b/c-d--e.f_g:latest",
            ),
            (&digested, &digested_out, &digested[..]),
            (&tagged_digested, &tagged_digested, &tagged_digested),
        ];
        for (input, normalized, familiar) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&r.to_string(), normalized, "normalized form of {input}");
            assert_eq!(&r.familiar(), familiar, "familiar form of {input}");
        }
    }

    #[test]
    fn parts_are_split() {
        let r = Reference::parse("host:5000/ns/name:tag").unwrap();
        assert_eq!(r.domain, "host:5000");
        assert_eq!(r.path, "ns/name");
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.digest, None);
        assert_eq!(r.name(), "host:5000/ns/name");
    }

    #[test]
    fn refuses_malformed() {
        let hex_name = HEX.to_owned();
        let upper_digest = format!("busybox@sha256:{}", HEX.to_uppercase());
        let long = format!("a/{}", "b".repeat(260));
        let long_tag = format!("a:{}", "t".repeat(129));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("BusyBox", "upper"),
            ("docker.io/Library/busybox", "upper"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            (&long_tag, "tag"),
            ("busybox@sha512:abcd", "digest"),
            (&upper_digest, "digest"),
            ("bad_host.com:x/a", "domain"),
            ("-bad.com/a", "domain"),
            ("a//b", "path"),
            ("a/b-", "path"),
            ("a/.b", "path"),
            ("a/b..c", "path"),
            (&hex_name, "hex"),
            (&long, "long"),
        ];
        for (input, kind) in cases {
            let err = Reference::parse(input).unwrap_err();
            let ok = match *kind {
                "empty" => matches!(err, ReferenceError::Empty),
                "upper" => matches!(err, ReferenceError::Uppercase { .. }),
                "tag" => matches!(err, ReferenceError::InvalidTag { .. }),
                "digest" => matches!(err, ReferenceError::InvalidDigest { .. }),
                "domain" => matches!(err, ReferenceError::InvalidDomain { .. }),
                "path" => matches!(err, ReferenceError::InvalidPath { .. }),
                "hex" => matches!(err, ReferenceError::HexName { .. }),
                _ => matches!(err, ReferenceError::NameTooLong { .. }),
            };
            assert!(ok, "{input:?} gave {err:?}, wanted {kind}");
        }
    }

    #[test]
    fn archive_names() {
        let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
        let cases: &[(Option<&str>, &str, String)] = &[
            (
                Some("latest"),
                "dir/busybox.oci.tar",
                "docker.io/library/busybox:latest".into(),
            ),
            (
                Some("1.36"),
                "busybox.tar.gz",
                "docker.io/library/busybox:1.36".into(),
            ),
            (Some("v1"), "app.tar", "docker.io/library/app:v1".into()),
            (
                Some("busybox:1.36"),
                "whatever.tar",
                "docker.io/library/busybox:1.36".into(),
            ),
            (
                Some("quay.io/x/y:2"),
                "whatever.tar",
                "quay.io/x/y:2".into(),
            ),
            (None, "app.oci.tar", format!("docker.io/library/app@{d}")),
        ];
        for (annotation, file, want) in cases {
            let r = Reference::for_archive(*annotation, Path::new(file), &d).unwrap();
            assert_eq!(&r.to_string(), want, "{annotation:?} in {file}");
        }
        let err = Reference::for_archive(Some("latest"), Path::new(".tar"), &d).unwrap_err();
        assert!(matches!(err, ReferenceError::ArchiveName { .. }), "{err:?}");
        let err = Reference::for_archive(Some("latest"), Path::new("my img.tar"), &d).unwrap_err();
        assert!(matches!(err, ReferenceError::InvalidPath { .. }), "{err:?}");
    }

    #[test]
    fn base_name_strips_longest_suffix() {
        assert_eq!(archive_base_name("busybox.oci.tar"), "busybox");
        assert_eq!(archive_base_name("busybox.oci.tar.gz"), "busybox");
        assert_eq!(archive_base_name("busybox.tar.gz"), "busybox");
        assert_eq!(archive_base_name("busybox.docker.tar"), "busybox");
        assert_eq!(archive_base_name("busybox"), "busybox");
    }
}
