//! The fixture images under `tests/fixtures/images` open, name themselves and
//! resolve to exactly the digests listed in their `digests.txt`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use berth_oci::image::media_type;
use berth_oci::{
    verify_blob, Archive, ArchiveFormat, Compression, Digest, Platform, ResolvedImage, Sha256Reader,
};

const BUSYBOX_MANIFEST: &str =
    "sha256:91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";
const BUSYBOX_CONFIG: &str =
    "sha256:c61bf6ac9b93b0cdbedf841171164dbc9e0e8a49689f06ddaf821362f09b714d";
const BUSYBOX_LAYER: &str =
    "sha256:7ac49a7f8968043e1e30b4fb08cb7d9e2662b55d4993a6ea25c6a4de2ce94503";
const BUSYBOX_DIFF_ID: &str =
    "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";

/// Expected digests of one image, as `digests.txt` lists them.
struct Expected {
    file: &'static str,
    name: &'static str,
    manifest: (&'static str, u64),
    config: (&'static str, u64),
    /// Layer digest, size and media type.
    layers: &'static [(&'static str, u64, &'static str)],
    diff_ids: &'static [&'static str],
}

const GZIP: &str = media_type::OCI_LAYER_GZIP;

const OCI_FIXTURES: &[Expected] = &[
    Expected {
        file: "busybox/busybox.oci.tar",
        name: "docker.io/library/busybox:latest",
        manifest: (BUSYBOX_MANIFEST, 349),
        config: (BUSYBOX_CONFIG, 775),
        layers: &[(BUSYBOX_LAYER, 1088417, GZIP)],
        diff_ids: &[BUSYBOX_DIFF_ID],
    },
    Expected {
        file: "busybox/busybox-zstd.oci.tar",
        name: "docker.io/library/busybox-zstd:latest",
        manifest: (
            "sha256:15e0a9eb996029582b5ce9cdf7e2ca2e10fb0659a9f1e0948548597db303df29",
            348,
        ),
        config: (BUSYBOX_CONFIG, 775),
        layers: &[(
            "sha256:6ed1e35c61897a79c375bcf1ed07ad5d94a00690c395dc6c8754fb823df79734",
            1093091,
            media_type::OCI_LAYER_ZSTD,
        )],
        diff_ids: &[BUSYBOX_DIFF_ID],
    },
    Expected {
        file: "layers/layers.oci.tar",
        name: "docker.io/library/layers:latest",
        manifest: (
            "sha256:14bb6206fd46eb528868c4c11cc1cec8bc30f0c540ff05b967d250d0812f1749",
            1120,
        ),
        config: (
            "sha256:d0e152331ee9ee1252f3bacace1a5c88f54147ecefacc7e5e5c7a76a5fc8396e",
            1633,
        ),
        layers: &[
            (BUSYBOX_LAYER, 1088417, GZIP),
            (
                "sha256:737d8d254f208655904c58b2e935686360223cc461c4b2450b7354f97d4a758a",
                1338,
                GZIP,
            ),
            (
                "sha256:dd7f88531dcbe40d0d7cdb3d043f35fe2484548301ccc53966725e04375c517a",
                982,
                GZIP,
            ),
            (
                "sha256:eae4bf85d9f07644c0d5c8b5324bdcd9965f4bb9def9632b972a4b70a1501cf7",
                188,
                GZIP,
            ),
            (
                "sha256:af4b664d47b575287e43a947130c28c919c315b17567713c2f4819635cb40adc",
                123,
                GZIP,
            ),
            (
                "sha256:7447b3c8257c7ad08ed322d07e562560b4cfb2ec22357476f1aecfd7441999eb",
                79,
                GZIP,
            ),
        ],
        diff_ids: LAYERS_DIFF_IDS,
    },
    Expected {
        file: "opaque/opaque.oci.tar",
        name: "docker.io/library/opaque:latest",
        manifest: (
            "sha256:037ba583fa90240b5226fa8805abcc0e67cfeb9d8f4ba6c21e66de85d8486975",
            920,
        ),
        config: (
            "sha256:8f3d970d5322d8a6d53011fd71e893567884757954ad3c4ac7dc9ac9f4719272",
            1184,
        ),
        layers: &[
            (
                "sha256:d87231b7d5254c6624c4e5b52251a9ccb7c975247465281139f30c52f24a7ee9",
                1088076,
                GZIP,
            ),
            (
                "sha256:94fd15a66577c8b5c334e9475686bf00fcb4f70af995541124b8e6e95cf599d9",
                289,
                GZIP,
            ),
            (
                "sha256:f1eeced31508b8053f9f97151bced479aabf6c4c9b94a0be2391d24a99f873a0",
                232,
                GZIP,
            ),
        ],
        diff_ids: &[
            BUSYBOX_DIFF_ID,
            "sha256:96f5ea81e9d53e3776bad5b2d8ac31547d5bcebfdf8c698ae46888e3a6020fb3",
            "sha256:b41bddbab50c0bb1439dcb9263a265e210658221fddc924dd8698879bfa0ae60",
        ],
    },
    Expected {
        file: "multiarch/multiarch.oci.tar",
        name: "docker.io/library/multiarch:latest",
        manifest: (BUSYBOX_MANIFEST, 349),
        config: (BUSYBOX_CONFIG, 775),
        layers: &[(BUSYBOX_LAYER, 1088417, GZIP)],
        diff_ids: &[BUSYBOX_DIFF_ID],
    },
];

const LAYERS_DIFF_IDS: &[&str] = &[
    BUSYBOX_DIFF_ID,
    "sha256:5c5affa5d693892ca86fcb2a2bc885d04b5474ee141879d359f51ed41b0d406b",
    "sha256:6af7d6d7dfc1a8ef926eafeb462d3f10e41eb0a7039d64a00241117a5a1ad725",
    "sha256:9156ad772118263614326b5f00782b4271686d5c09f16db041bbcd6146a56115",
    "sha256:6801a040b1f7718f6be63feb21c58ace8dae52a4a5c1094249f446b7547d0549",
    "sha256:aeb467e0425867e63bd3704351bb574afb3232d60782d5ad00f1dc7ca8522db4",
];

/// A docker-archive, the OCI archive of the same image, its name, diff IDs
/// and uncompressed layer sizes.
type DockerCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [u64],
);

/// Uncompressed layer sizes of `layers.docker.tar`, from `digests.txt`.
const LAYERS_DOCKER_SIZES: &[u64] = &[2130944, 17920, 19968, 1560, 528, 512];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/images")
        .join(rel)
}

fn d(s: &str) -> Digest {
    Digest::parse(s).unwrap()
}

fn amd64() -> Platform {
    Platform::new("linux", "amd64", None)
}

fn open_single(rel: &str) -> (Archive, ResolvedImage) {
    let archive = Archive::open(fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(archive.images().len(), 1, "{rel} lists one image");
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    (archive, image)
}

/// Reads every listed blob back and checks it against its descriptor.
fn verify_all_blobs(archive: &Archive) {
    for desc in archive.blobs() {
        let reader = archive.blob(&desc.digest).unwrap();
        assert_eq!(reader.size(), desc.size, "size of {}", desc.digest);
        verify_blob(reader, desc).unwrap_or_else(|e| panic!("{}: {e}", desc.digest));
    }
}

/// Every OCI fixture resolves to the manifest, config, layers and diff IDs of digests.txt.
#[test]
fn oci_fixtures_match_digests_txt() {
    for want in OCI_FIXTURES {
        let (archive, image) = open_single(want.file);
        assert_eq!(archive.format(), ArchiveFormat::OciLayout);
        assert_eq!(
            archive.images()[0].name.to_string(),
            want.name,
            "{}",
            want.file
        );

        assert_eq!(image.manifest_digest, d(want.manifest.0), "{}", want.file);
        assert_eq!(image.manifest.size, want.manifest.1, "{}", want.file);
        assert_eq!(image.config.digest, d(want.config.0), "{}", want.file);
        assert_eq!(image.config.size, want.config.1, "{}", want.file);
        assert_eq!(image.config.media_type, media_type::OCI_CONFIG);
        let layers: Vec<_> = image
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size, l.media_type.as_str()))
            .collect();
        let want_layers: Vec<_> = want.layers.iter().map(|(g, s, m)| (d(g), *s, *m)).collect();
        assert_eq!(layers, want_layers, "{}", want.file);
        let diff_ids: Vec<_> = want.diff_ids.iter().map(|s| d(s)).collect();
        assert_eq!(image.diff_ids, diff_ids, "{}", want.file);
        assert_eq!(image.chain_ids.len(), diff_ids.len());
        assert_eq!(image.chain_ids[0], diff_ids[0]);
        assert_eq!(image.platform.architecture, "amd64");

        verify_all_blobs(&archive);
    }
}

/// The busybox config's runtime defaults come through as the README lists them.
#[test]
fn busybox_config_defaults() {
    let (_, image) = open_single("busybox/busybox.oci.tar");
    let config = &image.config_json;
    assert_eq!(config.entrypoint, None);
    assert_eq!(config.cmd.as_ref().map(|c| c[0].as_str()), Some("sh"));
    assert_eq!(
        config.env,
        vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            "FIXTURE=busybox".to_owned(),
        ]
    );
    assert_eq!(config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(config.user.as_deref().filter(|u| !u.is_empty()), None);
    assert_eq!(
        config
            .labels
            .get("org.opencontainers.image.title")
            .map(String::as_str),
        Some("busybox-fixture")
    );

    let (_, layers) = open_single("layers/layers.oci.tar");
    assert_eq!(
        layers.config_json.entrypoint,
        Some(vec!["/usr/local/bin/check-layers".to_owned()])
    );
    assert_eq!(layers.config_json.cmd, Some(vec!["/data".to_owned()]));
}

/// The multiarch index holds two manifests; on linux/amd64 the busybox one is picked,
/// and asking for arm64 picks the other.
#[test]
fn multiarch_picks_platform() {
    let archive = Archive::open(fixture("multiarch/multiarch.oci.tar")).unwrap();
    let target = &archive.images()[0].target;
    assert_eq!(target.media_type, media_type::OCI_INDEX);
    assert_eq!(
        target.digest,
        d("sha256:ad6e1f42345038ac4389a7cba77da6d01cf4380c127c81f93bde34f56a42c213")
    );

    if Platform::host().architecture == "amd64" {
        let host = archive
            .resolve(&archive.images()[0], &Platform::host())
            .unwrap();
        assert_eq!(host.manifest_digest, d(BUSYBOX_MANIFEST));
    }
    let arm = Platform::new("linux", "arm64", Some("v8"));
    let image = archive.resolve(&archive.images()[0], &arm).unwrap();
    assert_eq!(
        image.manifest_digest,
        d("sha256:1d62bd216c092342ce5a6afaf6714304f48cb2c7e8585d7c1a5735fd14f6c1a8")
    );
    assert_eq!(
        image.diff_ids,
        vec![d(
            "sha256:acfe818664ed459794e677bf3fe2023265fd2aa4aaa84cdd7e811f47ac9ccde1"
        )]
    );

    // Both platforms' blobs are listed once each, and the index comes last.
    let blobs = archive.blobs();
    assert_eq!(blobs.len(), 7);
    assert_eq!(blobs.last().unwrap().digest, target.digest);
    verify_all_blobs(&archive);
}

/// A docker-archive gets a synthesized OCI manifest with the same config digest and
/// diff IDs as the OCI archive, and uncompressed layers named by their diff IDs.
#[test]
fn docker_archives_match_oci_archives() {
    let cases: &[DockerCase] = &[
        (
            "busybox/busybox.docker.tar",
            "busybox/busybox.oci.tar",
            "docker.io/library/busybox:latest",
            &[BUSYBOX_DIFF_ID],
            &[2130944],
        ),
        (
            "layers/layers.docker.tar",
            "layers/layers.oci.tar",
            "docker.io/library/layers:latest",
            LAYERS_DIFF_IDS,
            LAYERS_DOCKER_SIZES,
        ),
    ];
    for (docker_file, oci_file, name, diff_ids, sizes) in cases {
        let (docker, image) = open_single(docker_file);
        let (_, oci) = open_single(oci_file);
        assert_eq!(docker.format(), ArchiveFormat::DockerArchive);
        assert_eq!(docker.images()[0].name.to_string(), *name);
        assert_eq!(
            docker.images()[0].target.media_type,
            media_type::OCI_MANIFEST
        );

        assert_eq!(image.config.digest, oci.config.digest, "{docker_file}");
        assert_eq!(image.config.size, oci.config.size);
        assert_eq!(image.diff_ids, oci.diff_ids);
        assert_eq!(image.chain_ids, oci.chain_ids);
        assert_eq!(image.config_json, oci.config_json);
        for ((layer, diff_id), size) in image.layers.iter().zip(*diff_ids).zip(*sizes) {
            assert_eq!(layer.digest, d(diff_id));
            assert_eq!(layer.size, *size);
            assert_eq!(layer.media_type, media_type::OCI_LAYER);
        }

        // The synthesized manifest is served and hashes to the target digest.
        let mut manifest = Vec::new();
        docker
            .blob(&image.manifest_digest)
            .unwrap()
            .read_to_end(&mut manifest)
            .unwrap();
        assert_eq!(Digest::of(&manifest), image.manifest_digest);
        verify_all_blobs(&docker);
    }
}

/// A gzip-compressed outer archive opens like the plain one.
#[test]
fn gzip_outer_archive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busybox.oci.tar.gz");
    let plain = std::fs::read(fixture("busybox/busybox.oci.tar")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&plain).unwrap();
    gz.finish().unwrap();

    let archive = Archive::open(&path).unwrap();
    assert_eq!(
        archive.images()[0].name.to_string(),
        "docker.io/library/busybox:latest"
    );
    let image = archive.resolve(&archive.images()[0], &amd64()).unwrap();
    assert_eq!(image.manifest_digest, d(BUSYBOX_MANIFEST));
    verify_all_blobs(&archive);
}

/// The busybox layer decompresses to its diff ID, in gzip and in zstd, as an
/// unpacker hashing while it reads would see it.
#[test]
fn layer_diff_ids_hash_through_decompression() {
    for rel in ["busybox/busybox.oci.tar", "busybox/busybox-zstd.oci.tar"] {
        let (archive, image) = open_single(rel);
        let layer = &image.layers[0];
        let blob = archive.blob(&layer.digest).unwrap();
        let compression = match berth_oci::BlobKind::of(&layer.media_type) {
            Some(berth_oci::BlobKind::Layer(c)) => c,
            other => panic!("{rel}: layer kind {other:?}"),
        };
        let plain: Box<dyn Read> = match compression {
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob).unwrap()),
            Compression::None => Box::new(blob),
        };
        let mut hashing = Sha256Reader::new(plain);
        std::io::copy(&mut hashing, &mut std::io::sink()).unwrap();
        let (_, diff_id, len) = hashing.finish();
        assert_eq!(
            (diff_id, len),
            (image.diff_ids[0].clone(), 2130944),
            "{rel}"
        );
    }
}
