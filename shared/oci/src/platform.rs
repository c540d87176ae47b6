//! Platforms: which OS and CPU an image is built for, and which images run here.
//!
//! Architectures use Go's names (`amd64`, `arm64`), as image configs and
//! indexes do; the host's Rust name is mapped on the way in. Matching follows
//! the usual runtime rules: an arm64 image without variant is `v8`, an arm v7
//! host also runs v6 and v5 images, and an exact variant beats a compatible one.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// An OS and CPU an image is built for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's names (`amd64`, `arm64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// OS version, used by Windows images.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features, used by Windows images.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nullable"
    )]
    pub os_features: Vec<String>,
    /// CPU variant (`v8` for arm64, `v7` for arm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Builds a platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            architecture: architecture.to_owned(),
            os: os.to_owned(),
            os_version: None,
            os_features: Vec::new(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform this process runs on, with the architecture in Go's names.
    pub fn host() -> Self {
        let (arch, variant) = go_arch(std::env::consts::ARCH);
        Self::new(std::env::consts::OS, arch, variant)
    }

    /// Ranks how well an image for `candidate` runs here: `None` when it
    /// cannot, higher is better (an exact variant beats an older one).
    ///
    /// # Limitations
    /// amd64 micro-architecture levels (`v2`, `v3`) are not detected: only an
    /// amd64 image without variant or with `v1` matches.
    pub fn score(&self, candidate: &Platform) -> Option<u8> {
        if !self.os.eq_ignore_ascii_case(&candidate.os) {
            return None;
        }
        let (want_arch, want_default) = go_arch(&self.architecture);
        let (have_arch, have_default) = go_arch(&candidate.architecture);
        if want_arch != have_arch {
            return None;
        }
        let want = self.variant.as_deref().or(want_default).unwrap_or("");
        let have = candidate.variant.as_deref().or(have_default).unwrap_or("");
        if want == have {
            return Some(u8::MAX);
        }
        match want_arch {
            // An arm v7 CPU runs v6 and v5 code too; prefer the newest.
            "arm" => {
                let level = |v: &str| v.strip_prefix('v').and_then(|n| n.parse::<u8>().ok());
                match (level(want), level(have)) {
                    (Some(w), Some(h)) if h <= w => Some(h),
                    _ => None,
                }
            }
            "amd64" if matches!((want, have), ("", "v1") | ("v1", "")) => Some(u8::MAX - 1),
            _ => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// Maps Rust's (or an alias's) architecture name to Go's, with the variant
/// assumed when none is given.
fn go_arch(arch: &str) -> (&str, Option<&'static str>) {
    match arch {
        "x86_64" | "amd64" | "x86-64" => ("amd64", None),
        "aarch64" | "arm64" => ("arm64", Some("v8")),
        "arm" | "armhf" | "armv7" => ("arm", Some("v7")),
        "armel" => ("arm", Some("v6")),
        "x86" | "i386" | "i686" | "386" => ("386", None),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "riscv64" | "riscv64gc" => ("riscv64", None),
        "loongarch64" | "loong64" => ("loong64", None),
        other => (other, None),
    }
}

/// Reads JSON `null` as the type's default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_platform_uses_go_names() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.architecture, "amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(
                (host.architecture.as_str(), host.variant.as_deref()),
                ("arm64", Some("v8"))
            );
        }
    }

    #[test]
    fn platform_scores() {
        let amd64 = Platform::new("linux", "amd64", None);
        let arm64 = Platform::new("linux", "arm64", None);
        let armv7 = Platform::new("linux", "arm", Some("v7"));
        let cases: &[(&Platform, Platform, bool)] = &[
            (&amd64, Platform::new("linux", "amd64", None), true),
            (&amd64, Platform::new("linux", "x86_64", None), true),
            (&amd64, Platform::new("linux", "amd64", Some("v1")), true),
            (&amd64, Platform::new("linux", "amd64", Some("v3")), false),
            (&amd64, Platform::new("linux", "arm64", Some("v8")), false),
            (&amd64, Platform::new("windows", "amd64", None), false),
            (&arm64, Platform::new("linux", "arm64", Some("v8")), true),
            (&arm64, Platform::new("linux", "arm64", None), true),
            (&armv7, Platform::new("linux", "arm", Some("v6")), true),
            (&armv7, Platform::new("linux", "arm", Some("v8")), false),
        ];
        for (want, have, ok) in cases {
            assert_eq!(want.score(have).is_some(), *ok, "{want} running {have}");
        }
        let v7 = armv7.score(&Platform::new("linux", "arm", Some("v7")));
        let v6 = armv7.score(&Platform::new("linux", "arm", Some("v6")));
        assert!(v7 > v6);
    }
}
