//! The integrity cases of `tests/fixtures/cases/C10-content-integrity`
//! imported into the content service over a real nats-server, the way an
//! importer does: every descriptor's blob pushed with the descriptor's
//! digest and size, children before the manifest that names them. Needs
//! `nats-server` on PATH.

mod common;

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use berth_bus::api::Content;
use berth_bus::Code;
use berth_proto::content as cpb;

use common::{blob_files_are_sound, sha256, Harness};

/// An OCI layout archive's files, by path.
struct Layout {
    files: HashMap<String, Vec<u8>>,
}

impl Layout {
    fn open(path: &Path) -> Result<Layout> {
        let mut archive = tar::Archive::new(std::fs::File::open(path)?);
        let mut files = HashMap::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let name = entry
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            files.insert(name, data);
        }
        Ok(Layout { files })
    }

    /// The blob a digest names, as the layout stores it
    /// (`blobs/<algorithm>/<hex>`), if the archive has it.
    fn blob(&self, digest: &str) -> Option<&[u8]> {
        let (algorithm, hex) = digest.split_once(':')?;
        self.files
            .get(&format!("blobs/{algorithm}/{hex}"))
            .map(Vec::as_slice)
    }

    fn index(&self) -> Result<Value> {
        let raw = self.files.get("index.json").context("no index.json")?;
        Ok(serde_json::from_slice(raw)?)
    }
}

/// A descriptor's digest and size.
fn descriptor(value: &Value) -> Result<(String, i64)> {
    let digest = value["digest"]
        .as_str()
        .context("descriptor without digest")?;
    let size = value["size"].as_i64().context("descriptor without size")?;
    Ok((digest.to_string(), size))
}

/// Imports the image the index names: config and layers, then the
/// manifest. A blob missing from the archive is committed by digest alone,
/// as an importer does that hopes the store holds it. Stops at the first
/// refusal, and returns it.
async fn import(content: &Content, layout: &Layout) -> Result<berth_bus::Result<()>> {
    let index = layout.index()?;
    for manifest in index["manifests"].as_array().context("no manifests")? {
        let (digest, size) = descriptor(manifest)?;
        if let Some(raw) = layout.blob(&digest) {
            let parsed: Value = serde_json::from_slice(raw)?;
            let mut children = vec![descriptor(&parsed["config"])?];
            for layer in parsed["layers"].as_array().context("no layers")? {
                children.push(descriptor(layer)?);
            }
            for (digest, size) in children {
                if let Err(err) = push(content, layout, &digest, size).await {
                    return Ok(Err(err));
                }
            }
        }
        if let Err(err) = push(content, layout, &digest, size).await {
            return Ok(Err(err));
        }
    }
    Ok(Ok(()))
}

async fn push(
    content: &Content,
    layout: &Layout,
    digest: &str,
    size: i64,
) -> berth_bus::Result<()> {
    let reference = format!("import-{}", digest.replace(':', "-"));
    let Some(data) = layout.blob(digest) else {
        let commit = cpb::CommitRequest {
            r#ref: reference,
            digest: digest.to_string(),
            size,
            ..Default::default()
        };
        return content.commit(&commit).await.map(drop);
    };
    let open = cpb::OpenRequest {
        r#ref: reference,
        expected_digest: digest.to_string(),
        expected_size: size,
        lease_id: String::new(),
    };
    content
        .push(&open, &mut Cursor::new(data), Default::default())
        .await
        .map(drop)
}

/// Which descriptor of the valid image a case breaks.
#[derive(Clone, Copy, Debug)]
enum Part {
    Config,
    Layer(usize),
    Manifest,
}

/// How a case is refused: the code, the kind of fault the message names,
/// and the descriptor at fault.
type Refusal = (Code, &'static str, Part);

/// The digest a case's broken descriptor carries, read from its archive.
fn offending_digest(layout: &Layout, part: Part) -> Result<String> {
    let index = layout.index()?;
    let (manifest, _) = descriptor(&index["manifests"][0])?;
    if let Part::Manifest = part {
        return Ok(manifest);
    }
    let parsed: Value = serde_json::from_slice(layout.blob(&manifest).context("no manifest")?)?;
    let desc = match part {
        Part::Config => &parsed["config"],
        Part::Layer(n) => &parsed["layers"][n],
        Part::Manifest => unreachable!(),
    };
    Ok(descriptor(desc)?.0)
}

/// Every defective archive is refused at blob ingest with an error that
/// names the offending digest and the kind of mismatch, or, where the
/// fault is only visible once a layer is uncompressed (diff IDs, a gzip
/// stream cut short), imports into content and is left to unpack. No case
/// leaves an ingest, a blob whose bytes do not hash to its digest, or the
/// offending blob visible; and the valid image imports afterwards into
/// every namespace a case failed in.
#[tokio::test]
async fn integrity_cases_are_refused_and_the_store_stays_sound() -> Result<()> {
    let harness = Harness::start().await?;
    let dir = berth_testkit::fixture::case("C10-content-integrity");
    let refused = |code, kind, part| Some((code, kind, part));
    let cases: [(&str, Option<Refusal>); 11] = [
        (
            "layer-digest-mismatch",
            refused(Code::InvalidArgument, "digest mismatch", Part::Layer(1)),
        ),
        (
            "config-digest-mismatch",
            refused(Code::InvalidArgument, "digest mismatch", Part::Config),
        ),
        (
            "descriptor-size-too-big",
            refused(Code::InvalidArgument, "size mismatch", Part::Layer(0)),
        ),
        (
            "descriptor-size-too-small",
            refused(Code::InvalidArgument, "size mismatch", Part::Layer(1)),
        ),
        (
            "truncated-blob",
            refused(Code::InvalidArgument, "size mismatch", Part::Layer(1)),
        ),
        (
            "missing-blob",
            refused(Code::NotFound, "not found", Part::Layer(0)),
        ),
        (
            "index-points-nowhere",
            refused(Code::NotFound, "not found", Part::Manifest),
        ),
        (
            "malformed-digest",
            refused(Code::InvalidArgument, "malformed digest", Part::Manifest),
        ),
        ("truncated-gzip-consistent", None),
        ("diffid-mismatch", None),
        ("diffid-count-mismatch", None),
    ];

    for (index, (name, expected)) in cases.iter().enumerate() {
        let namespace = format!("case{index}");
        let content = harness.content(&namespace);
        let layout = Layout::open(&dir.join(format!("{name}.tar")))?;
        let outcome = import(&content, &layout).await?;
        match (expected, outcome) {
            (None, Ok(())) => {}
            (None, Err(err)) => bail!("{name}: refused at ingest: {err}"),
            (Some(_), Ok(())) => bail!("{name}: imported"),
            (Some((code, kind, part)), Err(err)) => {
                let digest = offending_digest(&layout, *part)?;
                assert_eq!(err.code, *code, "{name}: {err}");
                assert!(err.message.contains(kind), "{name}: {err}");
                assert!(
                    err.message.contains(&digest),
                    "{name}: {err} names not {digest}"
                );
                if let Ok(info) = content.info(&cpb::InfoRequest { digest }).await {
                    bail!("{name}: the offending blob is visible: {info:?}");
                }
            }
        }

        // Nothing half done is left, and what is visible is sound.
        let ingests = content.ingests(&cpb::IngestsRequest {}).await?.statuses;
        assert!(ingests.is_empty(), "{name}: ingests left: {ingests:?}");
        for info in content.list(&Default::default()).await?.infos {
            let data = content.read_all(&info.digest).await?;
            assert_eq!(sha256(&data), info.digest, "{name}");
        }
        blob_files_are_sound(&harness.root()).context(*name)?;
    }

    // The valid image imports into every namespace, after every case.
    let valid = Layout::open(&dir.join("valid.tar"))?;
    for index in 0..=cases.len() {
        let content = harness.content(&format!("case{index}"));
        import(&content, &valid).await??;
        let infos = content.list(&Default::default()).await?.infos;
        let hexes = valid
            .files
            .keys()
            .filter_map(|path| path.strip_prefix("blobs/sha256/"));
        for digest in hexes.filter(|hex| !hex.is_empty()) {
            let digest = format!("sha256:{digest}");
            assert!(
                infos.iter().any(|info| info.digest == digest),
                "case{index}: {digest}"
            );
            assert_eq!(sha256(&content.read_all(&digest).await?), digest);
        }
    }
    blob_files_are_sound(&harness.root())?;
    Ok(())
}
