//! Archives repacked from the real busybox fixture blobs, in shapes the fixtures
//! do not cover: a legacy docker-archive whose layer is a gzip file reached
//! through an `<id>/layer.tar` symlink, and archives holding several images.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use berth_oci::image::media_type;
use berth_oci::{verify_blob, Archive, ArchiveError, Digest, Platform};

const BUSYBOX_CONFIG_HEX: &str = "c61bf6ac9b93b0cdbedf841171164dbc9e0e8a49689f06ddaf821362f09b714d";
const BUSYBOX_DIFF_ID_HEX: &str =
    "a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
const BUSYBOX_MANIFEST: &str =
    "sha256:91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";
const ZSTD_MANIFEST: &str =
    "sha256:15e0a9eb996029582b5ce9cdf7e2ca2e10fb0659a9f1e0948548597db303df29";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/images")
        .join(rel)
}

/// One file of a tar, by name.
fn member(archive: &Path, name: &str) -> Vec<u8> {
    let mut tar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            return bytes;
        }
    }
    panic!("{name} not in {archive:?}");
}

fn append_file(tar: &mut tar::Builder<std::fs::File>, name: &str, bytes: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, name, bytes).unwrap();
}

fn append_symlink(tar: &mut tar::Builder<std::fs::File>, name: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Symlink);
    header.set_size(0);
    header.set_mode(0o777);
    tar.append_link(&mut header, name, target).unwrap();
}

/// A legacy docker-archive layer (gzip, behind a symlink) is hashed to name it,
/// gets the `+gzip` media type, and every RepoTags entry becomes a normalized name.
#[test]
fn legacy_docker_archive_with_gzip_layer() {
    let docker = fixture("busybox/busybox.docker.tar");
    let config = member(&docker, &format!("{BUSYBOX_CONFIG_HEX}.json"));
    let layer = member(&docker, &format!("{BUSYBOX_DIFF_ID_HEX}.tar"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gzipped = gz.finish().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("legacy.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let manifest = serde_json::json!([
        {"Config": format!("{BUSYBOX_CONFIG_HEX}.json"),
         "RepoTags": ["busybox:1.35", "example.com:5000/tools/busybox:x"],
         "Layers": ["0123abcd/layer.tar"]},
        {"Config": format!("{BUSYBOX_CONFIG_HEX}.json"), "RepoTags": null,
         "Layers": ["0123abcd/layer.tar"]},
    ]);
    append_file(&mut tar, "manifest.json", manifest.to_string().as_bytes());
    append_file(&mut tar, &format!("{BUSYBOX_CONFIG_HEX}.json"), &config);
    append_file(&mut tar, "blobs/layer.gz", &gzipped);
    append_symlink(&mut tar, "0123abcd/layer.tar", "../blobs/layer.gz");
    tar.into_inner().unwrap();

    let archive = Archive::open(&path).unwrap();
    let names: Vec<String> = archive
        .images()
        .iter()
        .map(|i| i.name.to_string())
        .collect();
    let untagged = format!(
        "docker.io/library/legacy@{}",
        archive.images()[2].target.digest
    );
    assert_eq!(
        names,
        [
            "docker.io/library/busybox:1.35",
            "example.com:5000/tools/busybox:x",
            untagged.as_str(),
        ]
    );

    let image = archive
        .resolve(&archive.images()[0], &Platform::new("linux", "amd64", None))
        .unwrap();
    assert_eq!(image.config.digest.hex(), BUSYBOX_CONFIG_HEX);
    assert_eq!(image.layers[0].media_type, media_type::OCI_LAYER_GZIP);
    assert_eq!(image.layers[0].digest, Digest::of(&gzipped));
    assert_eq!(image.layers[0].size, gzipped.len() as u64);
    assert_eq!(image.diff_ids[0].hex(), BUSYBOX_DIFF_ID_HEX);

    // One layer, one config, one manifest: the two images share all three.
    assert_eq!(archive.blobs().len(), 3);
    for desc in archive.blobs() {
        verify_blob(archive.blob(&desc.digest).unwrap(), desc).unwrap();
    }
}

/// An OCI layout listing two images names each one, the full-name annotation
/// winning over the bare tag, and shares their common config blob.
#[test]
fn oci_layout_with_two_images() {
    let gzip = fixture("busybox/busybox.oci.tar");
    let zstd = fixture("busybox/busybox-zstd.oci.tar");
    let gzip_index: serde_json::Value =
        serde_json::from_slice(&member(&gzip, "index.json")).unwrap();
    let zstd_index: serde_json::Value =
        serde_json::from_slice(&member(&zstd, "index.json")).unwrap();
    let mut second = zstd_index["manifests"][0].clone();
    second["annotations"]["io.containerd.image.name"] =
        serde_json::json!("docker.io/library/busybox:zstd");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [gzip_index["manifests"][0].clone(), second],
    });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("both.oci.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    append_file(&mut tar, "oci-layout", &member(&gzip, "oci-layout"));
    append_file(&mut tar, "index.json", index.to_string().as_bytes());
    for source in [&gzip, &zstd] {
        let mut src = tar::Archive::new(std::fs::File::open(source).unwrap());
        for entry in src.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            if name.starts_with("blobs/sha256/") && name.len() > "blobs/sha256/".len() {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                append_file(&mut tar, &name, &bytes);
            }
        }
    }
    tar.into_inner().unwrap();

    let archive = Archive::open(&path).unwrap();
    let images = archive.images();
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].name.to_string(), "docker.io/library/both:latest");
    assert_eq!(images[0].target.digest.as_str(), BUSYBOX_MANIFEST);
    assert_eq!(images[1].name.to_string(), "docker.io/library/busybox:zstd");
    assert_eq!(images[1].target.digest.as_str(), ZSTD_MANIFEST);
    assert_eq!(images[1].name.familiar(), "busybox:zstd");

    // Two layers, one shared config, two manifests.
    assert_eq!(archive.blobs().len(), 5);
    let err = archive.blob(&Digest::of(b"absent")).unwrap_err();
    assert!(matches!(err, ArchiveError::BlobNotFound { .. }), "{err:?}");
}

/// A file that is no image archive is refused with a typed error.
#[test]
fn unknown_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
    append_file(&mut tar, "hello.txt", b"hi");
    tar.into_inner().unwrap();
    let err = Archive::open(&path).unwrap_err();
    assert!(matches!(err, ArchiveError::UnknownFormat { .. }), "{err:?}");

    let err = Archive::open(dir.path().join("absent.tar")).unwrap_err();
    assert!(matches!(err, ArchiveError::Open { .. }), "{err:?}");
}
