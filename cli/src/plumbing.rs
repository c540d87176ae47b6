//! The stores underneath, as ctr shows them: `content`, `snapshot` and
//! `lease` commands.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use berth_bus::Code;
use berth_proto::{content as cpb, metadata as mpb, snapshot as spb};

use crate::{flags, output, Ctx};

/// `berth content` subcommands.
#[derive(Subcommand)]
pub enum ContentCommand {
    /// List blobs.
    Ls,
    /// Write a blob's bytes to stdout or a file.
    Get {
        /// The blob's digest.
        digest: String,
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Remove blobs from the namespace now, whatever still uses them.
    Rm {
        /// The blobs' digests.
        #[arg(required = true)]
        digests: Vec<String>,
    },
}

/// Runs one `berth content` subcommand.
pub async fn content(ctx: &Ctx, command: ContentCommand) -> anyhow::Result<ExitCode> {
    match command {
        ContentCommand::Ls => content_ls(ctx).await,
        ContentCommand::Get { digest, output } => content_get(ctx, &digest, output).await,
        ContentCommand::Rm { digests } => content_rm(ctx, &digests).await,
    }
}

async fn content_ls(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let infos = ctx
        .content()
        .list(&cpb::ListRequest::default())
        .await?
        .infos;
    if ctx.json {
        output::json(&serde_json::Value::Array(
            infos
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "digest": i.digest,
                        "size": i.size,
                        "labels": i.labels,
                        "created": output::time(output::nanos(i.created_at.as_ref())),
                    })
                })
                .collect(),
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = infos
        .into_iter()
        .map(|i| {
            let labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                i.digest,
                output::size(i.size),
                output::ago(output::nanos(i.created_at.as_ref())),
                labels.join(","),
            ]
        })
        .collect();
    output::table(&["DIGEST", "SIZE", "CREATED", "LABELS"], rows);
    Ok(ExitCode::SUCCESS)
}

/// A content error with the blob named.
fn no_blob(err: berth_bus::Error, digest: &str) -> anyhow::Error {
    match err.code {
        Code::NotFound => anyhow::anyhow!("no such blob: {digest}"),
        _ => err.into(),
    }
}

async fn content_get(ctx: &Ctx, digest: &str, path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let content = ctx.content();
    let info = content
        .info(&cpb::InfoRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|err| no_blob(err, digest))?
        .info
        .unwrap_or_default();
    let mut out: Box<dyn Write> = match &path {
        Some(path) => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };

    // Chunk by chunk, so a large layer never sits in memory whole.
    let mut offset = 0;
    while offset < info.size {
        let reply = content
            .read(&cpb::ReadRequest {
                digest: digest.to_string(),
                offset,
                length: ctx.client.max_body() as i64,
            })
            .await?;
        if reply.data.is_empty() {
            anyhow::bail!("blob {digest} ended at {offset} of {} bytes", info.size);
        }
        out.write_all(&reply.data)?;
        offset += reply.data.len() as i64;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn content_rm(ctx: &Ctx, digests: &[String]) -> anyhow::Result<ExitCode> {
    for digest in digests {
        ctx.content()
            .delete(&cpb::DeleteRequest {
                digest: digest.clone(),
                unless_touched_since: 0,
            })
            .await
            .map_err(|err| no_blob(err, digest))?;
        println!("{digest}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth snapshot` subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots on the node.
    Ls,
    /// Show the disk use of snapshots' own layers (default: all).
    Usage {
        /// The snapshots' keys or names.
        keys: Vec<String>,
    },
    /// Remove snapshots now (a snapshot with children stays).
    Rm {
        /// The snapshots' keys or names.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

/// Runs one `berth snapshot` subcommand.
pub async fn snapshot(ctx: &Ctx, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match command {
        SnapshotCommand::Ls => snapshot_ls(ctx).await,
        SnapshotCommand::Usage { keys } => snapshot_usage(ctx, keys).await,
        SnapshotCommand::Rm { keys } => snapshot_rm(ctx, &keys).await,
    }
}

fn kind(kind: i32) -> &'static str {
    match spb::Kind::try_from(kind).unwrap_or(spb::Kind::Unspecified) {
        spb::Kind::Committed => "committed",
        spb::Kind::Active => "active",
        spb::Kind::View => "view",
        spb::Kind::Unspecified => "-",
    }
}

async fn snapshot_ls(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let infos = ctx
        .snapshot()
        .list(&spb::ListRequest::default())
        .await?
        .infos;
    if ctx.json {
        output::json(&serde_json::Value::Array(
            infos
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "key": i.key,
                        "parent": i.parent,
                        "kind": kind(i.kind),
                        "labels": i.labels,
                        "created": output::time(output::nanos(i.created_at.as_ref())),
                    })
                })
                .collect(),
        ));
        return Ok(ExitCode::SUCCESS);
    }
    let rows = infos
        .iter()
        .map(|i| vec![i.key.clone(), i.parent.clone(), kind(i.kind).to_string()])
        .collect();
    output::table(&["KEY", "PARENT", "KIND"], rows);
    Ok(ExitCode::SUCCESS)
}

/// A snapshot error with the snapshot named.
fn no_snapshot(err: berth_bus::Error, key: &str) -> anyhow::Error {
    match err.code {
        Code::NotFound => anyhow::anyhow!("no such snapshot: {key}"),
        _ => err.into(),
    }
}

async fn snapshot_usage(ctx: &Ctx, mut keys: Vec<String>) -> anyhow::Result<ExitCode> {
    let snapshot = ctx.snapshot();
    if keys.is_empty() {
        let infos = snapshot.list(&spb::ListRequest::default()).await?.infos;
        keys = infos.into_iter().map(|i| i.key).collect();
    }
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for key in keys {
        let usage = snapshot
            .usage(&spb::UsageRequest { key: key.clone() })
            .await
            .map_err(|err| no_snapshot(err, &key))?;
        json.push(serde_json::json!({"key": key, "size": usage.size, "inodes": usage.inodes}));
        rows.push(vec![
            key,
            output::size(usage.size),
            usage.inodes.to_string(),
        ]);
    }
    if ctx.json {
        output::json(&serde_json::Value::Array(json));
    } else {
        output::table(&["KEY", "SIZE", "INODES"], rows);
    }
    Ok(ExitCode::SUCCESS)
}

async fn snapshot_rm(ctx: &Ctx, keys: &[String]) -> anyhow::Result<ExitCode> {
    for key in keys {
        ctx.snapshot()
            .remove(&spb::RemoveRequest {
                key: key.clone(),
                unless_touched_since: 0,
            })
            .await
            .map_err(|err| no_snapshot(err, key))?;
        println!("{key}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth lease` subcommands.
#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Create a lease and print its id.
    Create {
        /// The lease's id (default: one picked by metadata).
        #[arg(long)]
        id: Option<String>,
        /// How long it lasts (`30m`, `24h`; default: until removed).
        #[arg(long)]
        expires: Option<String>,
        /// Labels, `KEY=value`.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List leases.
    Ls,
    /// Remove leases; what they held waits for gc.
    Rm {
        /// The leases' ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Runs one `berth lease` subcommand.
pub async fn lease(ctx: &Ctx, command: LeaseCommand) -> anyhow::Result<ExitCode> {
    let metadata = ctx.metadata();
    match command {
        LeaseCommand::Create {
            id,
            expires,
            labels,
        } => {
            let expires_at = match expires {
                Some(text) => {
                    let duration = output::parse_duration(&text).with_context(|| {
                        format!("--expires {text:?} is not a duration such as 30m or 24h")
                    })?;
                    Some(berth_proto::Timestamp {
                        unix_nanos: output::now_nanos() + duration.as_nanos() as i64,
                    })
                }
                None => None,
            };
            let lease = metadata
                .create_lease(&mpb::CreateLeaseRequest {
                    lease: Some(mpb::Lease {
                        lease_id: id.unwrap_or_default(),
                        labels: flags::key_values(&labels, "label")?.into_iter().collect(),
                        expires_at,
                        ..Default::default()
                    }),
                })
                .await?
                .lease
                .unwrap_or_default();
            println!("{}", lease.lease_id);
        }
        LeaseCommand::Ls => {
            let leases = metadata.list_leases(&Default::default()).await?.leases;
            lease_ls(ctx, &leases);
        }
        LeaseCommand::Rm { ids } => {
            for lease_id in ids {
                metadata
                    .delete_lease(&mpb::DeleteLeaseRequest {
                        lease_id: lease_id.clone(),
                    })
                    .await
                    .map_err(|err| match err.code {
                        Code::NotFound => anyhow::anyhow!("no such lease: {lease_id}"),
                        _ => err.into(),
                    })?;
                println!("{lease_id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn lease_ls(ctx: &Ctx, leases: &[mpb::Lease]) {
    if ctx.json {
        output::json(&serde_json::Value::Array(
            leases
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "id": l.lease_id,
                        "labels": l.labels,
                        "created": output::time(output::nanos(l.created_at.as_ref())),
                        "expires": output::time(output::nanos(l.expires_at.as_ref())),
                        "resources": l.resources,
                    })
                })
                .collect(),
        ));
        return;
    }
    let rows = leases
        .iter()
        .map(|l| {
            vec![
                l.lease_id.clone(),
                output::ago(output::nanos(l.created_at.as_ref())),
                output::time(output::nanos(l.expires_at.as_ref())),
                l.resources.len().to_string(),
            ]
        })
        .collect();
    output::table(&["ID", "CREATED", "EXPIRES", "RESOURCES"], rows);
}
