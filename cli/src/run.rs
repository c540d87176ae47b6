//! `berth run`: container record, snapshot, task, output, exit status.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use prost::Message;

use berth_proto::{metadata as mpb, snapshot as spb, task as tpb, Envelope};

use crate::{images, Ctx};

/// `berth run` flags.
#[derive(Args)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container id.
    #[arg(short, long)]
    detach: bool,
    /// The container's id (default: a random one).
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable, `KEY=value`.
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User: `uid`, `uid:gid`, `name` or `name:group`.
    #[arg(short, long)]
    user: Option<String>,
    /// The container's host name.
    #[arg(long)]
    hostname: Option<String>,
    /// `none` (a private network namespace with loopback) or `host`.
    #[arg(long, default_value = "none")]
    net: String,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    /// Labels, `KEY=value`.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// The image.
    image: String,
    /// The command and its arguments (default: the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// A random container id, as docker prints them (12 hex digits).
fn new_container_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

fn key_values(pairs: &[String], what: &str) -> anyhow::Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {pair:?} is not KEY=value"))
        })
        .collect()
}

/// Runs `berth run`.
pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<ExitCode> {
    let image = images::get(ctx, &args.image).await?;
    let host_network = match args.net.as_str() {
        "none" => false,
        "host" => true,
        other => anyhow::bail!("unknown network {other:?}: use none or host"),
    };
    key_values(&args.env, "environment variable")?;
    let container_id = args.name.clone().unwrap_or_else(new_container_id);
    let options = mpb::RunOptions {
        args: args.args.clone(),
        entrypoint: args
            .entrypoint
            .iter()
            .filter(|e| !e.is_empty())
            .cloned()
            .collect(),
        entrypoint_set: args.entrypoint.is_some(),
        env: args.env.clone(),
        working_dir: args.workdir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        hostname: args.hostname.clone().unwrap_or_default(),
        host_network,
        readonly_rootfs: args.read_only,
        tty: false,
        image_config_digest: image.config_digest.clone(),
        ..Default::default()
    };

    // The rootfs: an active snapshot on the image's top layer.
    ctx.snapshot()
        .prepare(&spb::PrepareRequest {
            key: container_id.clone(),
            parent: image.chain_id.clone(),
            labels: Default::default(),
            lease_id: String::new(),
        })
        .await
        .with_context(|| format!("cannot prepare the rootfs of {container_id}"))?;
    let container = mpb::Container {
        container_id: container_id.clone(),
        image: image.name.clone(),
        image_digest: image
            .target
            .as_ref()
            .map(|t| t.digest.clone())
            .unwrap_or_default(),
        snapshot_key: container_id.clone(),
        node: ctx.node.clone(),
        runtime: "io.berth.runc.v1".to_string(),
        labels: key_values(&args.labels, "label")?.into_iter().collect(),
        options: Some(options),
        ..Default::default()
    };
    if let Err(err) = ctx
        .metadata()
        .create_container(&mpb::CreateContainerRequest {
            container: Some(container),
        })
        .await
    {
        let _ = remove_snapshot(ctx, &container_id).await;
        return Err(err.into());
    }

    // Subscribe before the start, so even an instant exit is seen.
    let exits = exit_events(ctx).await?;
    let task = ctx.task();
    let started = async {
        task.create(&tpb::CreateRequest {
            container_id: container_id.clone(),
        })
        .await?;
        task.start(&tpb::StartRequest {
            container_id: container_id.clone(),
        })
        .await
    }
    .await;
    if let Err(err) = started {
        if args.rm {
            let _ = cleanup(ctx, &container_id).await;
        }
        return Err(anyhow::Error::new(err).context(format!("cannot start {container_id}")));
    }
    if args.detach {
        println!("{container_id}");
        return Ok(ExitCode::SUCCESS);
    }

    let status = follow(ctx, &container_id, exits).await?;
    if args.rm {
        cleanup(ctx, &container_id).await?;
    }
    Ok(ExitCode::from(status.min(255) as u8))
}

/// The subscription to the namespace's exit events.
pub async fn exit_events(ctx: &Ctx) -> anyhow::Result<async_nats::Subscriber> {
    let subject = berth_bus::subject::event(&ctx.namespace, "tasks.exit")?;
    Ok(ctx.client.nats().subscribe(subject).await?)
}

/// Waits for the container's exit event, the task state as a fallback.
pub async fn wait_exit(
    ctx: &Ctx,
    container_id: &str,
    exits: &mut async_nats::Subscriber,
) -> anyhow::Result<u32> {
    loop {
        // The event is the normal path; the state poll covers an exit that
        // happened before the subscription.
        if let Ok(state) = ctx
            .task()
            .state(&tpb::StateRequest {
                container_id: container_id.to_string(),
                ..Default::default()
            })
            .await
        {
            if let Some(state) = state.state.filter(|s| s.status == "stopped") {
                return Ok(state.exit_status);
            }
        }
        match tokio::time::timeout(Duration::from_secs(1), exits.next()).await {
            Ok(Some(message)) => {
                let Ok(envelope) = Envelope::decode(message.payload) else {
                    continue;
                };
                let Ok(event) = tpb::TaskEvent::decode(envelope.payload) else {
                    continue;
                };
                if event.container_id == container_id {
                    return Ok(event.exit_status);
                }
            }
            Ok(None) => anyhow::bail!("event subscription closed"),
            Err(_) => continue,
        }
    }
}

/// Copies the container's output to ours until it exits; returns its status.
async fn follow(
    ctx: &Ctx,
    container_id: &str,
    mut exits: async_nats::Subscriber,
) -> anyhow::Result<u32> {
    let mut offsets = [0i64; 2];
    let waiter = wait_exit(ctx, container_id, &mut exits);
    tokio::pin!(waiter);
    let mut status = None;
    loop {
        let progressed = copy_output(ctx, container_id, &mut offsets).await?;
        if let Some(status) = status {
            if !progressed {
                return Ok(status);
            }
            continue;
        }
        if !progressed {
            tokio::select! {
                exited = &mut waiter => status = Some(exited?),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }
}

/// Pulls what is new of stdout and stderr; true when anything came.
pub async fn copy_output(
    ctx: &Ctx,
    container_id: &str,
    offsets: &mut [i64; 2],
) -> anyhow::Result<bool> {
    let mut progressed = false;
    for (index, stream) in [tpb::Stream::Stdout, tpb::Stream::Stderr]
        .into_iter()
        .enumerate()
    {
        let reply = ctx
            .task()
            .logs(&tpb::LogsRequest {
                container_id: container_id.to_string(),
                stream: stream as i32,
                offset: offsets[index],
                length: ctx.client.max_body() as i64,
                ..Default::default()
            })
            .await?;
        if reply.data.is_empty() {
            continue;
        }
        offsets[index] += reply.data.len() as i64;
        progressed = true;
        if index == 0 {
            let mut out = std::io::stdout().lock();
            out.write_all(&reply.data)?;
            out.flush()?;
        } else {
            let mut err = std::io::stderr().lock();
            err.write_all(&reply.data)?;
            err.flush()?;
        }
    }
    Ok(progressed)
}

async fn remove_snapshot(ctx: &Ctx, key: &str) -> anyhow::Result<()> {
    ctx.snapshot()
        .remove(&spb::RemoveRequest {
            key: key.to_string(),
            unless_touched_since: 0,
        })
        .await?;
    Ok(())
}

/// Deletes the task, the container record and its snapshot.
pub async fn cleanup(ctx: &Ctx, container_id: &str) -> anyhow::Result<()> {
    match ctx
        .task()
        .delete(&tpb::DeleteRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => {}
        Err(err) if err.code == berth_bus::Code::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    let container = ctx
        .metadata()
        .get_container(&mpb::GetContainerRequest {
            container_id: container_id.to_string(),
        })
        .await?
        .container
        .unwrap_or_default();
    ctx.metadata()
        .delete_container(&mpb::DeleteContainerRequest {
            container_id: container_id.to_string(),
        })
        .await?;
    match remove_snapshot(ctx, &container.snapshot_key).await {
        Ok(()) => Ok(()),
        Err(err) => match err.downcast_ref::<berth_bus::Error>() {
            Some(err) if err.code == berth_bus::Code::NotFound => Ok(()),
            _ => Err(err),
        },
    }
}
