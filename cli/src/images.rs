//! `berth image ...`: import, list, inspect, remove.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;

use berth_oci::{Archive, Descriptor, Platform, Reference};
use berth_proto::{content as cpb, metadata as mpb, snapshot as spb};

use crate::{output, Ctx};

/// `berth image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import images from an OCI layout archive or a docker-archive tarball.
    Import {
        /// The archive (plain or gzip-compressed).
        file: PathBuf,
        /// Name the imported image (only for archives holding one image).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images.
    Ls,
    /// Show an image's record.
    Inspect {
        /// The image's name.
        name: String,
    },
    /// Remove image names; the bytes go when gc runs.
    Rm {
        /// The images' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs one `berth image` subcommand.
pub async fn dispatch(ctx: &Ctx, command: ImageCommand) -> anyhow::Result<ExitCode> {
    match command {
        ImageCommand::Import { file, name } => import(ctx, file, name).await,
        ImageCommand::Ls => ls(ctx).await,
        ImageCommand::Inspect { name } => inspect(ctx, &name).await,
        ImageCommand::Rm { names } => rm(ctx, &names).await,
    }
}

/// The normalized form of an image name as a user typed it.
pub fn normalize(name: &str) -> anyhow::Result<String> {
    Ok(Reference::parse(name)
        .with_context(|| format!("invalid image name {name:?}"))?
        .to_string())
}

async fn import(ctx: &Ctx, file: PathBuf, name: Option<String>) -> anyhow::Result<ExitCode> {
    let archive = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || Archive::open(&file)).await?
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
            .with_context(|| format!("cannot import {image_name}"))?;
        resolved.push((image_name, image.target.clone(), found));
    }

    // The lease keeps what this import writes until the image records exist.
    let metadata = ctx.metadata();
    let expires = berth_proto::Timestamp {
        unix_nanos: berth_proto::Timestamp::now().unix_nanos + 3600 * 1_000_000_000,
    };
    let lease = metadata
        .create_lease(&mpb::CreateLeaseRequest {
            lease: Some(mpb::Lease {
                expires_at: Some(expires),
                labels: [("berth.io/purpose".to_string(), "import".to_string())].into(),
                ..Default::default()
            }),
        })
        .await?
        .lease
        .unwrap_or_default();
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
    for desc in archive.blobs() {
        push_blob(ctx, archive, desc, lease_id).await?;
    }
    for (name, target, image) in resolved {
        let unpacked = ctx
            .snapshot()
            .unpack(&spb::UnpackRequest {
                layers: image.layers.iter().map(to_pb).collect(),
                diff_ids: image.diff_ids.iter().map(|d| d.to_string()).collect(),
                lease_id: lease_id.to_string(),
            })
            .await
            .with_context(|| format!("cannot unpack {name}"))?;
        let record = mpb::Image {
            name: name.clone(),
            target: Some(to_pb(target)),
            config_digest: image.config.digest.to_string(),
            chain_id: unpacked.chain_id.clone(),
            ..Default::default()
        };
        let metadata = ctx.metadata();
        let created = metadata
            .create_image(&mpb::CreateImageRequest {
                image: Some(record.clone()),
            })
            .await;
        match created {
            Err(err) if err.code == berth_bus::Code::AlreadyExists => {
                metadata
                    .update_image(&mpb::UpdateImageRequest {
                        image: Some(record),
                        field_mask: Vec::new(),
                    })
                    .await?;
            }
            other => {
                other?;
            }
        }
        let short = Reference::parse(name)
            .map(|r| r.familiar())
            .unwrap_or_else(|_| name.clone());
        println!("imported {short} ({})", image.manifest_digest);
    }
    Ok(())
}

fn to_pb(desc: &Descriptor) -> berth_proto::Descriptor {
    berth_proto::Descriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.to_string(),
        size: desc.size as i64,
        annotations: desc.annotations.clone().into_iter().collect(),
    }
}

/// Writes one blob into the content store through a resumable ingest,
/// unless the store has it already; either way the commit attaches it to the
/// lease and stamps it as used.
async fn push_blob(
    ctx: &Ctx,
    archive: &Arc<Archive>,
    desc: &Descriptor,
    lease_id: &str,
) -> anyhow::Result<()> {
    let content = ctx.content();
    let digest = desc.digest.to_string();
    let reference = format!("import-{}", desc.digest.hex());
    let opened = content
        .open(&cpb::OpenRequest {
            r#ref: reference.clone(),
            expected_digest: digest.clone(),
            expected_size: desc.size as i64,
            lease_id: lease_id.to_string(),
        })
        .await?;
    if !opened.exists {
        let chunk = ctx.client.max_body();
        let mut offset = opened.offset as u64;
        let mut reader = archive.blob(&desc.digest)?;
        reader.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; chunk];
        loop {
            let n = read_full(&mut reader, &mut buf)?;
            if n == 0 {
                break;
            }
            let written = content
                .write(&cpb::WriteRequest {
                    r#ref: reference.clone(),
                    offset: offset as i64,
                    data: bytes::Bytes::copy_from_slice(&buf[..n]),
                })
                .await?;
            offset = written.offset as u64;
        }
    }
    content
        .commit(&cpb::CommitRequest {
            r#ref: reference,
            size: desc.size as i64,
            digest: digest.clone(),
            labels: Default::default(),
            lease_id: lease_id.to_string(),
        })
        .await
        .with_context(|| format!("blob {digest} refused"))?;
    Ok(())
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

async fn ls(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let images = ctx
        .metadata()
        .list_images(&Default::default())
        .await?
        .images;
    if ctx.json {
        output::json(&serde_json::Value::Array(
            images.iter().map(image_json).collect(),
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = images
        .iter()
        .map(|image| {
            let target = image.target.clone().unwrap_or_default();
            vec![
                Reference::parse(&image.name)
                    .map(|r| r.familiar())
                    .unwrap_or_else(|_| image.name.clone()),
                target.digest.chars().take(19).collect(),
                output::time(
                    image
                        .created_at
                        .as_ref()
                        .map(|t| t.unix_nanos)
                        .unwrap_or_default(),
                ),
            ]
        })
        .collect();
    output::table(&["NAME", "DIGEST", "CREATED"], rows);
    Ok(ExitCode::SUCCESS)
}

fn image_json(image: &mpb::Image) -> serde_json::Value {
    let target = image.target.clone().unwrap_or_default();
    serde_json::json!({
        "name": image.name,
        "target": {"mediaType": target.media_type, "digest": target.digest, "size": target.size},
        "config": image.config_digest,
        "chainId": image.chain_id,
        "labels": image.labels,
        "created": output::time(image.created_at.as_ref().map(|t| t.unix_nanos).unwrap_or_default()),
    })
}

async fn inspect(ctx: &Ctx, name: &str) -> anyhow::Result<ExitCode> {
    let image = get(ctx, name).await?;
    output::json(&image_json(&image));
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
        Err(err) if err.code == berth_bus::Code::NotFound => anyhow::bail!("no such image: {name}"),
        Err(err) => Err(err.into()),
    }
}

async fn rm(ctx: &Ctx, names: &[String]) -> anyhow::Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for name in names {
        let request = mpb::DeleteImageRequest {
            name: normalize(name)?,
        };
        match ctx.metadata().delete_image(&request).await {
            Ok(_) => println!("{name}"),
            Err(err) if err.code == berth_bus::Code::NotFound => {
                eprintln!("berth: no such image: {name}");
                code = ExitCode::from(1);
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(code)
}
