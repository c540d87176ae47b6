//! `berth image ...`: pull, import, list, inspect, tag, remove and export.
//!
//! An import reads the archive once to check it (every image resolved for
//! this host before a byte moves), then writes each blob into the content
//! store through a resumable ingest, unpacks the host platform's layers on
//! `--node` and records the image, all under a lease so that gc takes
//! nothing half-made.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;

use berth_bus::Code;
use berth_oci::{Archive, Descriptor, Limits, Platform, Reference};
use berth_proto::{content as cpb, metadata as mpb, snapshot as spb};

use crate::progress::Progress;
use crate::{export, output, Ctx};

/// `berth image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from an OCI registry (fetched by the content service),
    /// unpack it and record it.
    Pull(crate::pull::PullArgs),
    /// Import images from an OCI layout archive or a docker-archive tarball.
    Import {
        /// The archive (plain, gzip or zstd).
        file: PathBuf,
        /// Name the imported image (only for archives holding one image).
        #[arg(long)]
        name: Option<String>,
        /// Largest index, manifest or config accepted (bytes, or with k, m, g).
        #[arg(long, default_value = "4m", value_name = "SIZE")]
        max_document_size: String,
        /// Most layers an image may have (the node unpacking it may allow
        /// fewer).
        #[arg(long, default_value_t = berth_oci::image::MAX_LAYERS)]
        max_layers: usize,
    },
    /// Write images to an OCI archive that `image import` (and skopeo) reads.
    Export {
        /// The images' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// The archive to write (`-` for stdout).
        file: PathBuf,
    },
    /// List images.
    #[command(alias = "list")]
    Ls,
    /// Show images' records and configs as JSON.
    Inspect {
        /// The images' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Give an image another name.
    Tag {
        /// The image's name.
        source: String,
        /// The new name.
        target: String,
    },
    /// Remove image names; the bytes go when gc runs.
    #[command(alias = "remove")]
    Rm {
        /// The images' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
}

/// Runs one `berth image` subcommand.
pub async fn dispatch(ctx: &Ctx, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Pull(args) => crate::pull::pull(ctx, args).await,
        ImageCommand::Import {
            file,
            name,
            max_document_size,
            max_layers,
        } => {
            let size = crate::flags::parse_bytes(&max_document_size)
                .context("--max-document-size")? as u64;
            let limits = Limits {
                max_index_size: size,
                max_manifest_size: size,
                max_config_size: size,
                max_layers,
            };
            import(ctx, file, name, limits).await
        }
        ImageCommand::Export { names, file } => export::export(ctx, &names, &file).await,
        ImageCommand::Ls => ls(ctx).await,
        ImageCommand::Inspect { names } => inspect(ctx, &names).await,
        ImageCommand::Tag { source, target } => tag(ctx, &source, &target).await,
        ImageCommand::Rm { names } => rm(ctx, &names).await,
    }
}

/// The normalized form of an image name as a user typed it.
pub fn normalize(name: &str) -> anyhow::Result<String> {
    Ok(Reference::parse(name)
        .with_context(|| format!("invalid image name {name:?}"))?
        .to_string())
}

/// The short form docker prints (`busybox:latest`).
pub fn familiar(name: &str) -> String {
    Reference::parse(name)
        .map(|r| r.familiar())
        .unwrap_or_else(|_| name.to_string())
}

async fn import(
    ctx: &Ctx,
    file: PathBuf,
    name: Option<String>,
    limits: Limits,
) -> anyhow::Result<ExitCode> {
    let archive = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || Archive::open_with(&file, limits)).await?
    }
    .with_context(|| format!("cannot import {}", file.display()))?;
    let archive = Arc::new(archive);
    if name.is_some() && archive.images().len() > 1 {
        anyhow::bail!(
            "--name needs an archive holding one image; {} holds {}",
            file.display(),
            archive.images().len()
        );
    }

    // Resolve every image for this host before any byte moves, so a broken
    // archive fails without leaving anything behind.
    let platform = Platform::host();
    let mut resolved = Vec::new();
    for image in archive.images() {
        let image_name = match &name {
            Some(name) => normalize(name)?,
            None => image.name.to_string(),
        };
        let found = archive
            .resolve(image, &platform)
            .with_context(|| format!("cannot import {}", familiar(&image_name)))?;
        resolved.push((image_name, image.target.clone(), found));
    }

    // The lease keeps what this import writes until the image records exist.
    let metadata = ctx.metadata();
    let lease = write_lease(ctx, "import").await?;
    let outcome = import_leased(ctx, &archive, &resolved, &lease.lease_id).await;
    let _ = metadata
        .delete_lease(&mpb::DeleteLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await;
    outcome?;
    Ok(ExitCode::SUCCESS)
}

async fn import_leased(
    ctx: &Ctx,
    archive: &Arc<Archive>,
    resolved: &[(String, Descriptor, berth_oci::ResolvedImage)],
    lease_id: &str,
) -> anyhow::Result<()> {
    let total = archive.blobs().iter().map(|d| d.size).sum();
    let progress = Progress::new("importing", total);
    for desc in archive.blobs() {
        push_blob(ctx, archive, desc, lease_id, &progress).await?;
    }
    progress.finish();

    for (name, target, image) in resolved {
        // Applying layers takes time in proportion to their size: the
        // request gets a second per MiB on top of the usual timeout.
        let mut snapshot = ctx.snapshot();
        let bytes: u64 = image.layers.iter().map(|l| l.size).sum();
        let extra = std::time::Duration::from_secs(bytes >> 20);
        snapshot.client = snapshot.client.with_timeout(ctx.client.timeout() + extra);
        let unpacked = snapshot
            .unpack(&spb::UnpackRequest {
                layers: image.layers.iter().map(to_pb).collect(),
                diff_ids: image.diff_ids.iter().map(|d| d.to_string()).collect(),
                lease_id: lease_id.to_string(),
            })
            .await
            .with_context(|| format!("cannot unpack {}", familiar(name)))?;
        let record = mpb::Image {
            name: name.clone(),
            target: Some(to_pb(target)),
            config_digest: image.config.digest.to_string(),
            chain_id: unpacked.chain_id.clone(),
            ..Default::default()
        };
        put_image(ctx, record).await?;
        println!("imported {} ({})", familiar(name), image.manifest_digest);
    }
    Ok(())
}

/// Records an image, replacing the record a name had (as docker re-tags).
pub(crate) async fn put_image(ctx: &Ctx, record: mpb::Image) -> anyhow::Result<()> {
    let metadata = ctx.metadata();
    let created = metadata
        .create_image(&mpb::CreateImageRequest {
            image: Some(record.clone()),
        })
        .await;
    match created {
        Err(err) if err.code == Code::AlreadyExists => {
            metadata
                .update_image(&mpb::UpdateImageRequest {
                    image: Some(record),
                    field_mask: vec![
                        "target".to_string(),
                        "config_digest".to_string(),
                        "chain_id".to_string(),
                    ],
                })
                .await?;
        }
        other => {
            other?;
        }
    }
    Ok(())
}

/// A descriptor on the wire.
pub fn to_pb(desc: &Descriptor) -> berth_proto::Descriptor {
    berth_proto::Descriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.to_string(),
        size: desc.size as i64,
        annotations: desc.annotations.clone().into_iter().collect(),
    }
}

/// Writes one blob into the content store through a resumable ingest,
/// unless the namespace holds it already; either way the commit attaches it
/// to the lease and stamps it as used.
///
/// Two things are waited out rather than reported: another import holding
/// the same ingest (the content service refuses a second writer for a few
/// seconds), and gc taking a blob the namespace held between `open` and the
/// commit (the commit is refused; the next attempt uploads it again).
async fn push_blob(
    ctx: &Ctx,
    archive: &Arc<Archive>,
    desc: &Descriptor,
    lease_id: &str,
    progress: &Progress,
) -> anyhow::Result<()> {
    let content = ctx.content();
    let digest = desc.digest.to_string();
    let open = cpb::OpenRequest {
        r#ref: format!("import-{}", desc.digest.hex()),
        expected_digest: digest.clone(),
        expected_size: desc.size as i64,
        lease_id: lease_id.to_string(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut reader = archive.blob(&desc.digest)?;
        let pushed = content.push(&open, &mut reader, Default::default()).await;
        let retry = match &pushed {
            Err(err) if err.code == berth_bus::Code::FailedPrecondition => true,
            Err(err) if err.code == berth_bus::Code::NotFound => true,
            _ => false,
        };
        if retry && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        pushed.with_context(|| format!("blob {digest} refused"))?;
        progress.add(desc.size);
        return Ok(());
    }
}

async fn ls(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let images = ctx
        .metadata()
        .list_images(&Default::default())
        .await?
        .images;
    if ctx.json {
        output::json(&serde_json::Value::Array(
            images.iter().map(|i| image_json(i, None)).collect(),
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = images
        .iter()
        .map(|image| {
            let target = image.target.clone().unwrap_or_default();
            let digest = target.digest.strip_prefix("sha256:").unwrap_or_default();
            vec![
                familiar(&image.name),
                digest.chars().take(12).collect(),
                output::ago(output::nanos(image.created_at.as_ref())),
            ]
        })
        .collect();
    output::table(&["NAME", "DIGEST", "CREATED"], rows);
    Ok(ExitCode::SUCCESS)
}

/// One image as `ls --json` and `inspect` print it; `config` is the image
/// config blob, when read.
fn image_json(image: &mpb::Image, config: Option<serde_json::Value>) -> serde_json::Value {
    let target = image.target.clone().unwrap_or_default();
    let mut out = serde_json::json!({
        "name": image.name,
        "target": {"mediaType": target.media_type, "digest": target.digest, "size": target.size},
        "configDigest": image.config_digest,
        "chainId": image.chain_id,
        "labels": image.labels,
        "created": output::time(output::nanos(image.created_at.as_ref())),
    });
    if let Some(config) = config {
        out["config"] = config;
    }
    out
}

async fn inspect(ctx: &Ctx, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    for name in names {
        let image = get(ctx, name).await?;
        let config = ctx
            .content()
            .read_all(&image.config_digest)
            .await
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .map(|config| {
                serde_json::json!({
                    "architecture": config["architecture"],
                    "os": config["os"],
                    "config": config["config"],
                })
            });
        out.push(image_json(&image, config));
    }
    output::json(&serde_json::Value::Array(out));
    Ok(ExitCode::SUCCESS)
}

/// The image record for a name as the user typed it.
pub async fn get(ctx: &Ctx, name: &str) -> anyhow::Result<mpb::Image> {
    let normalized = normalize(name)?;
    match ctx
        .metadata()
        .get_image(&mpb::GetImageRequest { name: normalized })
        .await
    {
        Ok(reply) => Ok(reply.image.unwrap_or_default()),
        Err(err) if err.code == Code::NotFound => anyhow::bail!("no such image: {name}"),
        Err(err) => Err(err.into()),
    }
}

async fn tag(ctx: &Ctx, source: &str, target: &str) -> anyhow::Result<ExitCode> {
    let image = get(ctx, source).await?;
    let record = mpb::Image {
        name: normalize(target)?,
        target: image.target,
        config_digest: image.config_digest,
        chain_id: image.chain_id,
        labels: image.labels,
        ..Default::default()
    };
    put_image(ctx, record).await?;
    Ok(ExitCode::SUCCESS)
}

async fn rm(ctx: &Ctx, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for name in names {
        let request = mpb::DeleteImageRequest {
            name: normalize(name)?,
        };
        match ctx.metadata().delete_image(&request).await {
            Ok(_) => println!("{name}"),
            Err(err) if err.code == Code::NotFound => {
                eprintln!("berth: no such image: {name}");
                code = ExitCode::from(1);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(code)
}

/// A lease for what one import or pull writes, labelled with its purpose:
/// it keeps the blobs and snapshots until the image records exist, and
/// lets them go an hour on if the client never comes back to delete it.
pub(crate) async fn write_lease(ctx: &Ctx, purpose: &str) -> anyhow::Result<mpb::Lease> {
    let expires = berth_proto::Timestamp {
        unix_nanos: output::now_nanos() + 3600 * 1_000_000_000,
    };
    let lease = ctx
        .metadata()
        .create_lease(&mpb::CreateLeaseRequest {
            lease: Some(mpb::Lease {
                expires_at: Some(expires),
                labels: [("berth.io/purpose".to_string(), purpose.to_string())].into(),
                ..Default::default()
            }),
        })
        .await?
        .lease
        .unwrap_or_default();
    Ok(lease)
}
