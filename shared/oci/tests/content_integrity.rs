//! Each defective archive of `tests/fixtures/cases/C10-content-integrity` is
//! caught: structural defects by `Archive::open`, byte defects by
//! `verify_blob`, and the rest (which only unpacking can see) are shown to
//! pass both so the unpacker knows it must check them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use berth_oci::{
    verify_blob, Archive, ArchiveError, DigestError, ImageError, Manifest, Platform, Sha256Reader,
    VerifyError,
};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/cases/C10-content-integrity")
        .join(name)
}

fn amd64() -> Platform {
    Platform::new("linux", "amd64", None)
}

/// Every blob of the archive by digest, read straight from the tar without
/// berth's checks, so the consumer-side check can be run on broken archives.
fn raw_blobs(path: &Path) -> HashMap<String, Vec<u8>> {
    let mut tar = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = HashMap::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            out.insert(format!("sha256:{hex}"), bytes);
        }
    }
    out
}

/// The manifest of a case archive, parsed without verification.
fn raw_manifest(path: &Path) -> Manifest {
    let blobs = raw_blobs(path);
    let index: serde_json::Value = serde_json::from_slice(&tar_file(path, "index.json")).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let bytes = blobs.get(&digest).cloned().unwrap_or_else(|| {
        // The index may point nowhere; the manifest is the one blob that parses as one.
        blobs
            .values()
            .find(|b| Manifest::parse("manifest", b).is_ok())
            .unwrap()
            .clone()
    });
    Manifest::parse("manifest", &bytes).unwrap()
}

fn tar_file(path: &Path, name: &str) -> Vec<u8> {
    let mut tar = tar::Archive::new(std::fs::File::open(path).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            return bytes;
        }
    }
    panic!("{name} not in {path:?}");
}

/// Runs the consumer's check over every layer and the config: the first failure.
fn consumer_verify(path: &Path) -> Result<(), VerifyError> {
    let blobs = raw_blobs(path);
    let manifest = raw_manifest(path);
    for desc in manifest.layers.iter().chain([&manifest.config]) {
        let bytes = blobs
            .get(desc.digest.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        verify_blob(bytes, desc)?;
    }
    Ok(())
}

/// Opens through berth and reads every blob back through `verify_blob`.
fn import(path: &Path) -> Result<(), String> {
    let archive = Archive::open(path).map_err(|e| format!("open: {e}"))?;
    for image in archive.images() {
        archive
            .resolve(image, &amd64())
            .map_err(|e| format!("resolve: {e}"))?;
    }
    for desc in archive.blobs() {
        let reader = archive.blob(&desc.digest).map_err(|e| e.to_string())?;
        verify_blob(reader, desc).map_err(|e| format!("verify: {e}"))?;
    }
    Ok(())
}

/// The control archive opens, resolves and verifies, and is named after its file.
#[test]
fn valid_archive_imports() {
    let path = case("valid.tar");
    import(&path).unwrap();
    let archive = Archive::open(&path).unwrap();
    assert_eq!(
        archive.images()[0].name.to_string(),
        "docker.io/library/valid:latest"
    );
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.diff_ids.len(), 2);
    consumer_verify(&path).unwrap();
}

/// A layer blob absent from blobs/ is refused at open, naming the layer's digest.
#[test]
fn missing_blob_is_refused_at_open() {
    let path = case("missing-blob.tar");
    let layer = raw_manifest(&path).layers[0].digest.clone();
    match Archive::open(&path) {
        Err(ArchiveError::MissingBlob { digest, referrer }) => {
            assert_eq!(digest, layer);
            assert!(referrer.starts_with("manifest sha256:"), "{referrer}");
        }
        other => panic!("wanted MissingBlob, got {other:?}"),
    }
}

/// index.json pointing at a digest with no blob is refused at open, naming it.
#[test]
fn index_pointing_nowhere_is_refused_at_open() {
    let path = case("index-points-nowhere.tar");
    let err = Archive::open(&path).unwrap_err();
    let ArchiveError::MissingBlob { digest, referrer } = &err else {
        panic!("wanted MissingBlob, got {err:?}");
    };
    assert_eq!(referrer, "index.json");
    // The target is sha256("no such manifest").
    assert_eq!(*digest, berth_oci::Digest::of(b"no such manifest"));
    assert!(err.to_string().contains(digest.as_str()));
}

/// An upper-case hex digest in index.json is refused at open as malformed.
#[test]
fn malformed_digest_is_refused_at_open() {
    let err = Archive::open(case("malformed-digest.tar")).unwrap_err();
    assert!(
        matches!(
            &err,
            ArchiveError::Image(ImageError::InvalidDigest {
                source: DigestError::InvalidHex { .. },
                ..
            })
        ),
        "{err:?}"
    );
}

/// A config with one diff ID for two layers is refused at open.
#[test]
fn diffid_count_mismatch_is_refused_at_open() {
    let err = Archive::open(case("diffid-count-mismatch.tar")).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Image(ImageError::DiffIdCountMismatch {
                diff_ids: 1,
                layers: 2,
                ..
            })
        ),
        "{err:?}"
    );
}

/// Descriptor sizes that disagree with the blob in the archive are refused at open
/// (the tar header gives the size for free); `verify_blob` refuses them too.
#[test]
fn size_mismatches_are_refused_at_open_and_by_verify() {
    let cases: &[(&str, usize)] = &[
        ("descriptor-size-too-big.tar", 0),
        ("descriptor-size-too-small.tar", 1),
        ("truncated-blob.tar", 1),
    ];
    for (name, layer) in cases {
        let path = case(name);
        let desc = raw_manifest(&path).layers[*layer].clone();
        match Archive::open(&path) {
            Err(ArchiveError::SizeMismatch {
                digest, descriptor, ..
            }) => {
                assert_eq!(digest, desc.digest, "{name}");
                assert_eq!(descriptor, desc.size, "{name}");
            }
            other => panic!("{name}: wanted SizeMismatch, got {other:?}"),
        }

        let err = consumer_verify(&path).unwrap_err();
        let ok = match *name {
            "descriptor-size-too-small.tar" => matches!(err, VerifyError::TooLong { .. }),
            _ => matches!(err, VerifyError::Truncated { .. }),
        };
        assert!(ok, "{name}: {err:?}");
    }
}

/// A config stored under a digest it does not hash to is refused at open, since
/// every JSON blob is hashed when it is parsed.
#[test]
fn config_digest_mismatch_is_refused_at_open() {
    let path = case("config-digest-mismatch.tar");
    let config = raw_manifest(&path).config.digest;
    match Archive::open(&path) {
        Err(ArchiveError::Image(ImageError::Verify(VerifyError::DigestMismatch {
            expected,
            ..
        }))) => assert_eq!(expected, config),
        other => panic!("wanted DigestMismatch, got {other:?}"),
    }
    assert!(matches!(
        consumer_verify(&path),
        Err(VerifyError::DigestMismatch { .. })
    ));
}

/// A layer altered in place (same size) passes open, which does not hash
/// layers, and is caught by `verify_blob` naming the layer's digest.
#[test]
fn layer_digest_mismatch_is_caught_by_verify() {
    let path = case("layer-digest-mismatch.tar");
    let archive = Archive::open(&path).unwrap();
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    let layer = &image.layers[1];
    let err = verify_blob(archive.blob(&layer.digest).unwrap(), layer).unwrap_err();
    match err {
        VerifyError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, layer.digest);
            assert_ne!(actual, layer.digest);
        }
        other => panic!("wanted DigestMismatch, got {other:?}"),
    }
    verify_blob(
        archive.blob(&image.layers[0].digest).unwrap(),
        &image.layers[0],
    )
    .unwrap();
}

/// Defects only unpacking can see pass both open and `verify_blob`: a gzip
/// stream cut short (self-consistent digest) and a wrong diff ID. The
/// unpacker catches them by inflating and hashing, as shown here.
#[test]
fn unpack_time_defects_pass_archive_and_verify() {
    for name in ["truncated-gzip-consistent.tar", "diffid-mismatch.tar"] {
        import(&case(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let archive = Archive::open(case("truncated-gzip-consistent.tar")).unwrap();
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    let blob = archive.blob(&image.layers[1].digest).unwrap();
    let mut sink = Vec::new();
    let err = flate2::read::GzDecoder::new(blob)
        .read_to_end(&mut sink)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);

    let archive = Archive::open(case("diffid-mismatch.tar")).unwrap();
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    let blob = archive.blob(&image.layers[1].digest).unwrap();
    let mut hashing = Sha256Reader::new(flate2::read::GzDecoder::new(blob));
    std::io::copy(&mut hashing, &mut std::io::sink()).unwrap();
    let (_, diff_id, _) = hashing.finish();
    assert_ne!(diff_id, image.diff_ids[1]);
}
