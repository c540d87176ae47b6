//! `berth image export`: images out of the content store into an OCI image
//! layout archive (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), which
//! `berth image import`, skopeo (`oci-archive:FILE`) and `ctr import` read.
//!
//! Each `index.json` entry carries the image's full name as
//! `io.containerd.image.name` and its tag as
//! `org.opencontainers.image.ref.name`, as containerd writes them. Of an
//! index, the platforms whose manifests the store holds are exported; an
//! import of only the host's platform holds all of them when the archive it
//! came from did. Every blob is hashed on its way out, so an archive never
//! carries bytes that do not match their digest.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use berth_bus::{api, Code};
use berth_oci::image::{ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME};
use berth_oci::{BlobKind, Descriptor, Digest, Index, Manifest, Reference, Sha256Reader};
use berth_proto::content as cpb;

use crate::progress::Progress;
use crate::{images, Ctx};

/// Deepest chain of nested indexes followed.
const MAX_DEPTH: usize = 8;

/// What goes into the archive: every blob once, and the index entries.
#[derive(Default)]
struct Plan {
    blobs: Vec<(Digest, u64)>,
    seen: HashSet<Digest>,
    entries: Vec<serde_json::Value>,
}

impl Plan {
    fn add(&mut self, desc: &Descriptor) {
        if self.seen.insert(desc.digest.clone()) {
            self.blobs.push((desc.digest.clone(), desc.size));
        }
    }
}

/// A wire descriptor as an OCI one.
fn from_pb(desc: &berth_proto::Descriptor) -> anyhow::Result<Descriptor> {
    let digest = Digest::parse(&desc.digest).with_context(|| {
        format!(
            "the image record names a malformed digest {:?}",
            desc.digest
        )
    })?;
    Ok(Descriptor::new(
        &desc.media_type,
        digest,
        desc.size.max(0) as u64,
    ))
}

/// True when the namespace's content store holds the blob.
async fn stored(content: &api::Content, digest: &Digest) -> anyhow::Result<bool> {
    let info = content
        .info(&cpb::InfoRequest {
            digest: digest.to_string(),
        })
        .await;
    match info {
        Ok(_) => Ok(true),
        Err(err) if err.code == Code::NotFound => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Adds `desc` and everything below it that the store holds to the plan;
/// a manifest's config and layers must all be there.
async fn walk(
    content: &api::Content,
    name: &str,
    desc: &Descriptor,
    plan: &mut Plan,
    depth: usize,
) -> anyhow::Result<()> {
    if depth > MAX_DEPTH {
        anyhow::bail!("cannot export {name}: its indexes nest deeper than {MAX_DEPTH}");
    }
    let bytes = content.read_all(desc.digest.as_str()).await?;
    match BlobKind::of(&desc.media_type) {
        Some(BlobKind::Index) => {
            let index = Index::from_blob(desc, &bytes)?;
            for child in &index.manifests {
                // An import keeps every platform the archive carried, so a
                // missing one was never there; it stays out here too.
                if !stored(content, &child.digest).await? {
                    continue;
                }
                match BlobKind::of(&child.media_type) {
                    Some(BlobKind::Index | BlobKind::Manifest) => {
                        Box::pin(walk(content, name, child, plan, depth + 1)).await?
                    }
                    _ => plan.add(child),
                }
            }
        }
        Some(BlobKind::Manifest) => {
            let manifest = Manifest::from_blob(desc, &bytes)?;
            for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
                if !stored(content, &blob.digest).await? {
                    anyhow::bail!(
                        "cannot export {name}: blob {} of manifest {} is not in the content store",
                        blob.digest,
                        desc.digest
                    );
                }
                plan.add(blob);
            }
        }
        _ => anyhow::bail!(
            "cannot export {name}: its target {} is a {:?}, not an image",
            desc.digest,
            desc.media_type
        ),
    }
    plan.add(desc);
    Ok(())
}

/// The `index.json` entry of one image.
fn entry(name: &str, target: &Descriptor) -> serde_json::Value {
    let reference = Reference::parse(name).ok();
    let tag = reference
        .as_ref()
        .and_then(|r| r.tag.clone())
        .unwrap_or_else(|| name.to_string());
    serde_json::json!({
        "mediaType": target.media_type,
        "digest": target.digest.as_str(),
        "size": target.size,
        "annotations": {
            ANNOTATION_IMAGE_NAME: name,
            ANNOTATION_REF_NAME: tag,
        },
    })
}

/// Writes the images named to `file`, or to stdout for `-`.
pub async fn export(ctx: &Ctx, names: &[String], file: &Path) -> anyhow::Result<ExitCode> {
    let content = ctx.content();
    let mut plan = Plan::default();
    for name in names {
        let image = images::get(ctx, name).await?;
        let target = from_pb(&image.target.clone().unwrap_or_default())?;
        walk(
            &content,
            &images::familiar(&image.name),
            &target,
            &mut plan,
            0,
        )
        .await?;
        plan.entries.push(entry(&image.name, &target));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": berth_oci::image::media_type::OCI_INDEX,
        "manifests": plan.entries,
    });

    // The tar is written on a blocking thread that pulls each blob through
    // the runtime, chunk by chunk.
    let total = plan.blobs.iter().map(|(_, size)| size).sum();
    let progress = Progress::new("exporting", total);
    let to_stdout = file.as_os_str() == "-";
    let partial = partial_path(file);
    let writer: Box<dyn Write + Send> = if to_stdout {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?,
        )
    };
    let handle = tokio::runtime::Handle::current();
    let job = {
        let (content, progress, max_body) =
            (content.clone(), progress.clone(), ctx.client.max_body());
        tokio::task::spawn_blocking(move || {
            write_archive(writer, &index, &plan.blobs, |digest, size| {
                // tar copies in small pieces; each request fetches a chunk.
                let reader = BlobReader {
                    handle: handle.clone(),
                    content: content.clone(),
                    digest: digest.to_string(),
                    size,
                    offset: 0,
                    chunk: max_body,
                    progress: progress.clone(),
                };
                std::io::BufReader::with_capacity(max_body, reader)
            })
        })
    };
    let written = job.await?;
    progress.finish();
    if let Err(err) = written {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(err.context(format!("cannot write {}", file.display())));
    }
    if !to_stdout {
        std::fs::rename(&partial, file)
            .with_context(|| format!("cannot write {}", file.display()))?;
        let what = if names.len() == 1 { "image" } else { "images" };
        println!("exported {} {what} to {}", names.len(), file.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `FILE.partial` beside the archive: it takes the archive's name only
/// once whole.
fn partial_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    file.with_file_name(name)
}

/// Writes the layout into `writer` as a tar, hashing every blob.
fn write_archive<R: Read>(
    writer: Box<dyn Write + Send>,
    index: &serde_json::Value,
    blobs: &[(Digest, u64)],
    mut open: impl FnMut(&Digest, u64) -> R,
) -> anyhow::Result<()> {
    let mut tar = tar::Builder::new(writer);
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(&mut tar, "oci-layout", layout.len() as u64, &layout[..])?;
    let index = serde_json::to_vec(index)?;
    append(&mut tar, "index.json", index.len() as u64, &index[..])?;
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        tar.append_data(&mut header, dir, std::io::empty())?;
    }

    for (digest, size) in blobs {
        let path = format!("blobs/{}/{}", digest.algorithm(), digest.hex());
        let mut hashed = Sha256Reader::new(open(digest, *size));
        append(&mut tar, &path, *size, &mut hashed)?;
        let (_, actual, read) = hashed.finish();
        if &actual != digest || read != *size {
            anyhow::bail!("blob {digest} in the content store does not match its digest");
        }
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

/// Appends one regular file of `size` bytes.
fn append(
    tar: &mut tar::Builder<Box<dyn Write + Send>>,
    path: &str,
    size: u64,
    data: impl Read,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(size);
    tar.append_data(&mut header, path, data)?;
    Ok(())
}

/// Reads one blob from the content service, a chunk per request, from a
/// blocking thread.
struct BlobReader {
    handle: tokio::runtime::Handle,
    content: api::Content,
    digest: String,
    size: u64,
    offset: u64,
    chunk: usize,
    progress: Progress,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let length = buf.len().min(self.chunk);
        let request = cpb::ReadRequest {
            digest: self.digest.clone(),
            offset: self.offset as i64,
            length: length as i64,
        };
        let reply = self
            .handle
            .block_on(self.content.read(&request))
            .map_err(std::io::Error::other)?;
        let n = reply.data.len().min(buf.len());
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "blob {} ended at {} of {} bytes",
                    self.digest, self.offset, self.size
                ),
            ));
        }
        buf[..n].copy_from_slice(&reply.data[..n]);
        self.offset += n as u64;
        self.progress.add(n as u64);
        Ok(n)
    }
}
