//! `berth stats` and `berth top`: what a task's cgroup counts, and the
//! processes in it.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use berth_proto::task as tpb;

use crate::{containers, output, Ctx};

/// How far apart the two samples of one CPU reading are.
const SAMPLE_GAP: Duration = Duration::from_millis(500);

/// `berth stats` flags.
#[derive(Args)]
pub struct StatsArgs {
    /// Print one reading and exit, instead of one every second.
    #[arg(long)]
    no_stream: bool,
    /// The containers (default: every running one).
    #[arg(value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// One container's counters, at one instant.
struct Sample {
    container_id: String,
    metrics: tpb::MetricsReply,
    at: Instant,
}

async fn sample(ctx: &Ctx, container_ids: &[String]) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for container_id in container_ids {
        let container = containers::get(ctx, container_id).await?;
        let metrics = containers::task_of(ctx, &container)
            .metrics(&tpb::MetricsRequest {
                container_id: container_id.clone(),
            })
            .await
            .map_err(|err| containers::task_error(err, container_id))?;
        out.push(Sample {
            container_id: container_id.clone(),
            metrics,
            at: Instant::now(),
        });
    }
    Ok(out)
}

/// The containers whose task metadata records as running, on any node.
async fn running(ctx: &Ctx) -> anyhow::Result<Vec<String>> {
    let tasks = ctx.metadata().list_tasks(&Default::default()).await?.tasks;
    let mut ids: Vec<String> = tasks
        .into_iter()
        .filter(|t| t.status == berth_proto::metadata::TaskStatus::Running as i32)
        .map(|t| t.container_id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// Prints the containers' resource use: one reading with `--no-stream`,
/// else one a second until interrupted.
pub async fn stats(ctx: &Ctx, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let ids = if args.containers.is_empty() {
        running(ctx).await?
    } else {
        args.containers.clone()
    };
    let mut before = sample(ctx, &ids).await?;
    tokio::time::sleep(SAMPLE_GAP).await;
    loop {
        let after = sample(ctx, &ids).await?;
        print(ctx, &before, &after);
        if args.no_stream {
            return Ok(ExitCode::SUCCESS);
        }
        before = after;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print(ctx: &Ctx, before: &[Sample], after: &[Sample]) {
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for (old, new) in before.iter().zip(after) {
        let m = &new.metrics;
        let wall = new.at.duration_since(old.at).as_nanos().max(1) as f64;
        let cpu = m
            .cpu_usage_nanos
            .saturating_sub(old.metrics.cpu_usage_nanos) as f64;
        let cpu_percent = cpu / wall * 100.0;
        let mem_percent = (m.memory_limit_bytes > 0)
            .then(|| m.memory_usage_bytes as f64 / m.memory_limit_bytes as f64 * 100.0);
        json.push(serde_json::json!({
            "id": new.container_id,
            "cpuPercent": cpu_percent,
            "cpuUsageNanos": m.cpu_usage_nanos,
            "memoryUsageBytes": m.memory_usage_bytes,
            "memoryLimitBytes": m.memory_limit_bytes,
            "pids": m.pids_current,
            "pidsLimit": m.pids_limit,
            "ioReadBytes": m.io_read_bytes,
            "ioWriteBytes": m.io_write_bytes,
            "oomKills": m.oom_kills,
        }));
        let limit = match m.memory_limit_bytes {
            0 => "no limit".to_string(),
            bytes => output::mem(bytes),
        };
        rows.push(vec![
            new.container_id.clone(),
            format!("{cpu_percent:.2}%"),
            format!("{} / {limit}", output::mem(m.memory_usage_bytes)),
            mem_percent.map_or("-".to_string(), |p| format!("{p:.2}%")),
            format!(
                "{} / {}",
                output::size(m.io_read_bytes as i64),
                output::size(m.io_write_bytes as i64)
            ),
            m.pids_current.to_string(),
        ]);
    }
    if ctx.json {
        output::json(&serde_json::Value::Array(json));
    } else {
        output::table(
            &[
                "CONTAINER ID",
                "CPU %",
                "MEM USAGE / LIMIT",
                "MEM %",
                "BLOCK I/O",
                "PIDS",
            ],
            rows,
        );
    }
}

/// `berth top` flags.
#[derive(Args)]
pub struct TopArgs {
    /// The container.
    container: String,
}

/// Lists the processes of a container, pids as the node sees them.
pub async fn top(ctx: &Ctx, args: TopArgs) -> anyhow::Result<ExitCode> {
    let container = containers::get(ctx, &args.container).await?;
    let processes = containers::task_of(ctx, &container)
        .ps(&tpb::PsRequest {
            container_id: args.container.clone(),
        })
        .await
        .map_err(|err| containers::task_error(err, &args.container))?
        .processes;
    if ctx.json {
        output::json(&serde_json::Value::Array(
            processes
                .iter()
                .map(|p| serde_json::json!({"pid": p.pid, "command": p.command}))
                .collect(),
        ));
    } else {
        let rows = processes
            .into_iter()
            .map(|p| vec![p.pid.to_string(), p.command])
            .collect();
        output::table(&["PID", "COMMAND"], rows);
    }
    Ok(ExitCode::SUCCESS)
}
