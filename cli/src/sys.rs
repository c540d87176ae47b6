//! The smaller commands: ps, rm, kill, wait, logs, gc, events, content, snapshot.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use futures::StreamExt;
use prost::Message;

use berth_proto::{
    content as cpb, gc as gpb, metadata as mpb, snapshot as spb, task as tpb, Envelope,
};

use crate::{output, run, Ctx};

/// `berth ps` flags.
#[derive(Args)]
pub struct PsArgs {
    /// Show every container, not only running ones.
    #[arg(short, long)]
    all: bool,
}

/// Lists containers with their task's state.
pub async fn ps(ctx: &Ctx, args: PsArgs) -> anyhow::Result<ExitCode> {
    let metadata = ctx.metadata();
    let containers = metadata
        .list_containers(&Default::default())
        .await?
        .containers;
    let tasks = metadata.list_tasks(&Default::default()).await?.tasks;
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for container in containers {
        let task = tasks
            .iter()
            .find(|t| t.container_id == container.container_id);
        let status = match task {
            None => "created".to_string(),
            Some(task) if task.status == mpb::TaskStatus::Stopped as i32 => {
                format!("exited ({})", task.exit_status)
            }
            Some(task) => berth_metadata_status(task.status).to_string(),
        };
        if !args.all && !status.starts_with("running") {
            continue;
        }
        let command = container
            .options
            .as_ref()
            .map(|o| o.args.join(" "))
            .unwrap_or_default();
        json.push(serde_json::json!({
            "id": container.container_id,
            "image": container.image,
            "command": command,
            "node": container.node,
            "status": status,
            "pid": task.map(|t| t.pid).unwrap_or(0),
            "created": output::time(container.created_at.as_ref().map(|t| t.unix_nanos).unwrap_or(0)),
        }));
        rows.push(vec![
            container.container_id,
            container.image,
            command,
            status,
            container.node,
        ]);
    }
    if ctx.json {
        output::json(&serde_json::Value::Array(json));
    } else {
        output::table(
            &["CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "NODE"],
            rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn berth_metadata_status(status: i32) -> &'static str {
    match mpb::TaskStatus::try_from(status).unwrap_or(mpb::TaskStatus::Unspecified) {
        mpb::TaskStatus::Created => "created",
        mpb::TaskStatus::Running => "running",
        mpb::TaskStatus::Paused => "paused",
        mpb::TaskStatus::Stopped => "exited",
        _ => "unknown",
    }
}

/// `berth rm` flags.
#[derive(Args)]
pub struct RmArgs {
    /// Kill a running task first.
    #[arg(short, long)]
    force: bool,
    /// The containers.
    #[arg(required = true)]
    containers: Vec<String>,
}

/// Removes containers (their task, record and snapshot).
pub async fn rm(ctx: &Ctx, args: RmArgs) -> anyhow::Result<ExitCode> {
    for container_id in &args.containers {
        let state = ctx
            .task()
            .state(&tpb::StateRequest {
                container_id: container_id.clone(),
                ..Default::default()
            })
            .await;
        if let Ok(Some(state)) = state.map(|s| s.state) {
            if state.status != "stopped" {
                if !args.force {
                    anyhow::bail!(
                        "container {container_id} is {}: stop it first or use rm -f",
                        state.status
                    );
                }
                let mut exits = run::exit_events(ctx).await?;
                ctx.task()
                    .kill(&tpb::KillRequest {
                        container_id: container_id.clone(),
                        signal: 9,
                        all: true,
                        ..Default::default()
                    })
                    .await?;
                run::wait_exit(ctx, container_id, &mut exits).await?;
            }
        }
        match ctx
            .metadata()
            .get_container(&mpb::GetContainerRequest {
                container_id: container_id.clone(),
            })
            .await
        {
            Err(err) if err.code == berth_bus::Code::NotFound => {
                anyhow::bail!("no such container: {container_id}")
            }
            other => {
                other?;
            }
        }
        run::cleanup(ctx, container_id).await?;
        println!("{container_id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth kill` flags.
#[derive(Args)]
pub struct KillArgs {
    /// The signal, by number or name (`KILL`, `SIGTERM`).
    #[arg(short, long, default_value = "KILL")]
    signal: String,
    /// The container.
    container: String,
}

/// The number of a signal given by name or number.
pub fn signal_number(signal: &str) -> anyhow::Result<u32> {
    if let Ok(number) = signal.parse::<u32>() {
        return Ok(number);
    }
    let name = signal.trim_start_matches("SIG").to_ascii_uppercase();
    let number = match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "STOP" => 19,
        "CONT" => 18,
        _ => anyhow::bail!("unknown signal {signal:?}"),
    };
    Ok(number)
}

/// Sends a signal to the container's init process.
pub async fn kill(ctx: &Ctx, args: KillArgs) -> anyhow::Result<ExitCode> {
    let signal = signal_number(&args.signal)?;
    ctx.task()
        .kill(&tpb::KillRequest {
            container_id: args.container.clone(),
            signal,
            all: false,
            ..Default::default()
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `berth wait` flags.
#[derive(Args)]
pub struct WaitArgs {
    /// The container.
    container: String,
}

/// Waits for the task to exit, prints the status, and exits with it.
pub async fn wait(ctx: &Ctx, args: WaitArgs) -> anyhow::Result<ExitCode> {
    let mut exits = run::exit_events(ctx).await?;
    let status = run::wait_exit(ctx, &args.container, &mut exits).await?;
    println!("{status}");
    Ok(ExitCode::SUCCESS)
}

/// `berth logs` flags.
#[derive(Args)]
pub struct LogsArgs {
    /// The container.
    container: String,
}

/// Prints what the container wrote so far, stdout and stderr apart.
pub async fn logs(ctx: &Ctx, args: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut offsets = [0; 2];
    while run::copy_output(ctx, &args.container, &mut offsets).await? {}
    Ok(ExitCode::SUCCESS)
}

/// `berth gc` flags.
#[derive(Args)]
pub struct GcArgs {
    /// List what would go; remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs gc now and prints what went.
pub async fn gc(ctx: &Ctx, args: GcArgs) -> anyhow::Result<ExitCode> {
    let done = ctx
        .gc()
        .run(&gpb::RunRequest {
            dry_run: args.dry_run,
        })
        .await?;
    if ctx.json {
        let namespaces: Vec<_> = done
            .namespaces
            .iter()
            .map(|ns| serde_json::json!({"namespace": ns.namespace, "blobs": ns.blobs, "snapshots": ns.snapshots, "freedBytes": ns.freed_bytes}))
            .collect();
        output::json(
            &serde_json::json!({"epoch": done.epoch, "dryRun": done.dry_run, "durationMicros": done.duration_micros, "namespaces": namespaces}),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if done.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for ns in &done.namespaces {
        for blob in &ns.blobs {
            println!("{verb} blob {blob} ({})", ns.namespace);
        }
        for snapshot in &ns.snapshots {
            println!("{verb} snapshot {snapshot} ({})", ns.namespace);
        }
    }
    let freed: i64 = done.namespaces.iter().map(|ns| ns.freed_bytes).sum();
    println!("{verb} {}", output::size(freed));
    Ok(ExitCode::SUCCESS)
}

/// `berth events` flags.
#[derive(Args)]
pub struct EventsArgs {
    /// Only this topic, e.g. `tasks.exit` or `images.>`.
    #[arg(long)]
    filter: Option<String>,
}

/// Prints the namespace's events as they happen.
pub async fn events(ctx: &Ctx, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let topic = args.filter.unwrap_or_else(|| ">".to_string());
    let subject = format!(
        "{}.{}.{}.{topic}",
        berth_bus::subject::PREFIX,
        ctx.namespace,
        berth_bus::subject::EVENTS
    );
    let mut events = ctx.client.nats().subscribe(subject).await?;
    while let Some(message) = events.next().await {
        let Ok(envelope) = Envelope::decode(message.payload) else {
            continue;
        };
        let time = output::time(
            envelope
                .timestamp
                .as_ref()
                .map(|t| t.unix_nanos)
                .unwrap_or(0),
        );
        if ctx.json {
            println!(
                "{}",
                serde_json::json!({"topic": envelope.topic, "namespace": envelope.namespace, "node": envelope.node, "time": time, "generation": envelope.generation, "source": envelope.source})
            );
        } else {
            println!(
                "{time} {} {} {}",
                envelope.namespace, envelope.topic, envelope.source
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth content` subcommands.
#[derive(Subcommand)]
pub enum ContentCommand {
    /// List blobs.
    Ls,
}

/// Runs one `berth content` subcommand.
pub async fn content(ctx: &Ctx, command: ContentCommand) -> anyhow::Result<ExitCode> {
    match command {
        ContentCommand::Ls => {
            let infos = ctx
                .content()
                .list(&cpb::ListRequest::default())
                .await?
                .infos;
            if ctx.json {
                output::json(&serde_json::Value::Array(
                    infos.iter().map(|i| serde_json::json!({"digest": i.digest, "size": i.size, "labels": i.labels})).collect(),
                ));
            } else {
                let rows = infos
                    .into_iter()
                    .map(|i| vec![i.digest, output::size(i.size)])
                    .collect();
                output::table(&["DIGEST", "SIZE"], rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth snapshot` subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots on the node.
    Ls,
}

/// Runs one `berth snapshot` subcommand.
pub async fn snapshot(ctx: &Ctx, command: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match command {
        SnapshotCommand::Ls => {
            let infos = ctx
                .snapshot()
                .list(&spb::ListRequest::default())
                .await?
                .infos;
            let kind = |k: i32| match spb::Kind::try_from(k).unwrap_or(spb::Kind::Unspecified) {
                spb::Kind::Committed => "committed",
                spb::Kind::Active => "active",
                spb::Kind::View => "view",
                spb::Kind::Unspecified => "-",
            };
            if ctx.json {
                output::json(&serde_json::Value::Array(
                    infos.iter().map(|i| serde_json::json!({"key": i.key, "parent": i.parent, "kind": kind(i.kind)})).collect(),
                ));
            } else {
                let rows = infos
                    .iter()
                    .map(|i| vec![i.key.clone(), i.parent.clone(), kind(i.kind).to_string()])
                    .collect();
                output::table(&["KEY", "PARENT", "KIND"], rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
