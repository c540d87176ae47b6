//! Resolving an image: from an index or manifest to the layers and config
//! of the one image that runs on a platform.
//!
//! Every JSON blob met on the way is checked against its descriptor (size
//! limit first, then size and digest), so the blob source may be untrusted:
//! an archive, a registry, or a content store read back from disk.

use crate::digest::Digest;
use crate::image::{
    wrong_kind, BlobKind, ConfigFile, Descriptor, ImageConfig, ImageError, Index, Limits, Manifest,
};
use crate::platform::Platform;
use crate::verify;

/// Deepest chain of nested indexes followed before giving up.
pub(crate) const MAX_INDEX_DEPTH: usize = 8;

/// Chain IDs of a layer stack, bottom first: the first is the first diff
/// ID, and each next one is the sha256 of the text `"<chain> <diff_id>"`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// An image picked for one platform, with everything needed to unpack and run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// Digest of the chosen manifest.
    pub manifest_digest: Digest,
    /// Descriptor of the chosen manifest.
    pub manifest: Descriptor,
    /// Descriptor of the config.
    pub config: Descriptor,
    /// Layer descriptors, bottom first.
    pub layers: Vec<Descriptor>,
    /// Uncompressed layer digests, one per layer.
    pub diff_ids: Vec<Digest>,
    /// Chain IDs, one per layer: the snapshot names.
    pub chain_ids: Vec<Digest>,
    /// Runtime defaults from the config.
    pub config_json: ImageConfig,
    /// Platform stated by the config.
    pub platform: Platform,
}

/// Walks from `target` (an index or a manifest) to the image for `platform`.
///
/// `fetch` returns a blob's bytes; every JSON blob is checked against its
/// descriptor here (size limit first, then digest and size), so `fetch` may
/// hand back untrusted bytes. Nested indexes are followed. Among matching
/// manifests the best [`Platform::score`] wins, then the first listed; a
/// manifest reached without a platform in its descriptor must have a config
/// for `platform`.
///
/// Errors from `fetch` pass through; the rest are [`ImageError`]s:
/// `NoMatchingManifest`, `DiffIdCountMismatch`, `UnknownMediaType`,
/// `TooLarge`, `TooManyLayers`, `Verify`. The caps are [`Limits::DEFAULT`];
/// [`resolve_with`] takes others.
pub fn resolve<E, F>(target: &Descriptor, platform: &Platform, fetch: F) -> Result<ResolvedImage, E>
where
    F: FnMut(&Descriptor) -> Result<Vec<u8>, E>,
    E: From<ImageError>,
{
    resolve_with(target, platform, &Limits::DEFAULT, fetch)
}

/// [`resolve`] under `limits`: each document's size is checked against its
/// kind's cap before `fetch` is asked for it, and the manifest's layers
/// against `max_layers`.
pub fn resolve_with<E, F>(
    target: &Descriptor,
    platform: &Platform,
    limits: &Limits,
    mut fetch: F,
) -> Result<ResolvedImage, E>
where
    F: FnMut(&Descriptor) -> Result<Vec<u8>, E>,
    E: From<ImageError>,
{
    let manifest_desc = match BlobKind::of_descriptor(target)? {
        BlobKind::Manifest => target.clone(),
        BlobKind::Index => select_manifest(target, platform, limits, &mut fetch, 0)?
            .map(|(_, desc)| desc)
            .ok_or_else(|| no_match(target, platform))?,
        _ => {
            return Err(
                wrong_kind(&target.digest, &target.media_type, "an index or manifest").into(),
            )
        }
    };

    verify::check_limit(&manifest_desc, limits.max_manifest_size).map_err(ImageError::from)?;
    let manifest = Manifest::from_blob_within(&manifest_desc, &fetch(&manifest_desc)?, limits)?;
    verify::check_limit(&manifest.config, limits.max_config_size).map_err(ImageError::from)?;
    let config = ConfigFile::from_blob_within(&manifest.config, &fetch(&manifest.config)?, limits)?;

    // A manifest that no index placed must prove its platform by its config.
    let config_known = !config.platform.os.is_empty() || !config.platform.architecture.is_empty();
    if manifest_desc.platform.is_none()
        && config_known
        && platform.score(&config.platform).is_none()
    {
        return Err(no_match(target, platform).into());
    }
    check_diff_ids(&manifest, &config)?;

    Ok(ResolvedImage {
        manifest_digest: manifest_desc.digest.clone(),
        chain_ids: chain_ids(&config.diff_ids),
        manifest: manifest_desc,
        config: manifest.config,
        layers: manifest.layers,
        diff_ids: config.diff_ids,
        config_json: config.config,
        platform: config.platform,
    })
}

/// Refuses a config whose diff IDs do not pair one to one with the layers.
pub fn check_diff_ids(manifest: &Manifest, config: &ConfigFile) -> Result<(), ImageError> {
    if manifest.layers.len() != config.diff_ids.len() {
        return Err(ImageError::DiffIdCountMismatch {
            config: manifest.config.digest.clone(),
            diff_ids: config.diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    Ok(())
}

/// Finds the best manifest for `platform` under the index `desc`, with its score.
fn select_manifest<E, F>(
    desc: &Descriptor,
    platform: &Platform,
    limits: &Limits,
    fetch: &mut F,
    depth: usize,
) -> Result<Option<(u8, Descriptor)>, E>
where
    F: FnMut(&Descriptor) -> Result<Vec<u8>, E>,
    E: From<ImageError>,
{
    if depth >= MAX_INDEX_DEPTH {
        return Err(ImageError::TooDeep {
            digest: desc.digest.clone(),
        }
        .into());
    }
    verify::check_limit(desc, limits.max_index_size).map_err(ImageError::from)?;
    let index = Index::from_blob_within(desc, &fetch(desc)?, limits)?;

    let mut best: Option<(u8, Descriptor)> = None;
    for entry in &index.manifests {
        // Entries without a platform rank last; their config decides later.
        let score = match &entry.platform {
            Some(p) => match platform.score(p) {
                Some(score) => score,
                None => continue,
            },
            None => 0,
        };
        let found = match BlobKind::of(&entry.media_type) {
            Some(BlobKind::Manifest) => Some((score, entry.clone())),
            Some(BlobKind::Index) => select_manifest(entry, platform, limits, fetch, depth + 1)?,
            // Artifacts and unknown entries are not images for this host.
            _ => None,
        };
        if let Some((score, found)) = found {
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, found));
            }
        }
    }
    Ok(best)
}

fn no_match(target: &Descriptor, platform: &Platform) -> ImageError {
    ImageError::NoMatchingManifest {
        digest: target.digest.clone(),
        platform: platform.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1: &str = "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
    const L2: &str = "sha256:5c5affa5d693892ca86fcb2a2bc885d04b5474ee141879d359f51ed41b0d406b";
    const L3: &str = "sha256:6af7d6d7dfc1a8ef926eafeb462d3f10e41eb0a7039d64a00241117a5a1ad725";

    fn d(s: &str) -> Digest {
        Digest::parse(s).unwrap()
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        assert!(chain_ids(&[]).is_empty());
        // Values computed independently with Python's hashlib.
        let want = [
            L1,
            "sha256:0576aca6a372cbbf746126041aa7371db6c48a6325a5f9b549e8db10e48a8120",
            "sha256:ec47e7b2faca584f80c35b3f60c280445bb1c0c04b8b45214e8d65279c9ca8b0",
        ];
        let got = chain_ids(&[d(L1), d(L2), d(L3)]);
        assert_eq!(got, want.iter().map(|s| d(s)).collect::<Vec<_>>());
    }
}
