//! The metadata service's benchmark, run by hand (never as a test):
//!
//! ```text
//! cargo run --release -p berth-metadata --example bench -- [--root DIR]
//! ```
//!
//! It starts its own nats-server and the service in this process, then
//! measures:
//!
//! 0. the floor under a create: one-record commits on the store, no NATS;
//! 1. create+get round trips per second: `containers.create` then
//!    `containers.get` of the same id, one pair at a time, and with many
//!    pairs in flight;
//! 2. the event apply rate: task events published to the stream while the
//!    service is stopped, then the time from its start until the last one
//!    shows in its record; beside it, the rate of reading the same events
//!    through the bus's consumer without applying them.
//!
//! The results are in `docs/benchmarks/metadata.md`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use async_nats::HeaderMap;
use berth_bus::{api, Client};
use berth_proto::metadata as mpb;
use berth_proto::task::TaskEvent;
use berth_proto::{Envelope, Message, Timestamp};

/// Options of the benchmark.
#[derive(Parser)]
struct Args {
    /// Where the database goes (a fresh directory is made inside).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Pairs for the one-at-a-time run.
    #[arg(long, default_value_t = 2_000)]
    serial: usize,
    /// Pairs for the concurrent run.
    #[arg(long, default_value_t = 20_000)]
    pairs: usize,
    /// Pairs in flight in the concurrent run.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Task events in the pre-filled stream.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Containers the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    containers: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let nats = berth_testkit::NatsServer::start()?;
    let parent = args.root.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("berth-metadata-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("make a directory in {}", parent.display()))?;
    let root = dir.path().to_path_buf();
    let conn = berth_bus::connect(&nats.url(), "bench").await?;
    let md = api::Metadata {
        client: Client::new(conn.clone(), Duration::from_secs(30)),
        namespace: "bench".into(),
    };
    println!("database in {}", root.display());

    commits(&parent, args.serial).await?;
    let service = Running::start(&nats.url(), &root).await?;
    wait_served(&md).await?;
    round_trips(&md, "serial", args.serial, 1).await?;
    round_trips(&md, "concurrent", args.pairs, args.in_flight).await?;
    service.stop().await?;

    apply_rate(&nats.url(), &root, &conn, &md, &args).await?;
    Ok(())
}

/// The service running in this process.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<berth_bus::Result<()>>,
}

impl Running {
    async fn start(url: &str, root: &std::path::Path) -> Result<Running> {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(berth_metadata::run(
            berth_bus::connect(url, "berth-metadata").await?,
            berth_metadata::Config {
                root: root.to_path_buf(),
            },
            shutdown.clone(),
        ));
        Ok(Running { shutdown, task })
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

async fn wait_served(md: &api::Metadata) -> Result<()> {
    for _ in 0..2_000 {
        if md.list_images(&Default::default()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("metadata never answered")
}

fn container(container_id: String) -> mpb::Container {
    mpb::Container {
        container_id: container_id.clone(),
        image: "docker.io/library/busybox:latest".into(),
        image_digest: format!("sha256:{}", "b".repeat(64)),
        snapshot_key: container_id,
        node: "n1".into(),
        labels: [("app".to_string(), "bench".to_string())].into(),
        ..Default::default()
    }
}

/// The floor under a create: `count` commits of one record each, one at a
/// time, straight on the store (no NATS).
async fn commits(parent: &std::path::Path, count: usize) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("berth-metadata-commits-")
        .tempdir_in(parent)?;
    let store = berth_metadata::store::Store::open(dir.path())?;
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for n in 0..count {
        let record = container(format!("c{n}"));
        let begun = Instant::now();
        store
            .write(move |schema, txn| {
                let container_id = record.container_id.clone();
                schema.containers.put(txn, "bench", &container_id, &record)
            })
            .await?;
        latencies.push(begun.elapsed());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "store commits: {count} one at a time, {:.0} commits/s; median {:.2} ms, p99 {:.2} ms",
        count as f64 / elapsed.as_secs_f64(),
        latencies[count / 2].as_secs_f64() * 1e3,
        latencies[count * 99 / 100].as_secs_f64() * 1e3,
    );
    Ok(())
}

/// `count` create+get pairs, `in_flight` at a time; prints pairs/s and the
/// latency of a pair.
async fn round_trips(md: &api::Metadata, name: &str, count: usize, in_flight: usize) -> Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..in_flight).map(|_| {
        let md = md.clone();
        let next = next.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
                    return anyhow::Ok(latencies);
                }
                let container_id = format!("{name}-{n}");
                let begun = Instant::now();
                md.create_container(&mpb::CreateContainerRequest {
                    container: Some(container(container_id.clone())),
                })
                .await?;
                md.get_container(&mpb::GetContainerRequest { container_id })
                    .await?;
                latencies.push(begun.elapsed());
            }
        })
    });
    let mut latencies = Vec::with_capacity(count);
    for worker in futures::future::join_all(workers).await {
        latencies.extend(worker??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "create+get {name}: {count} pairs, {in_flight} in flight, {:.2} s: {:.0} pairs/s; pair median {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Pre-fills the stream with task events for reserved containers while the
/// service is stopped, then times how long the started service takes to
/// apply them all.
async fn apply_rate(
    url: &str,
    root: &std::path::Path,
    conn: &async_nats::Client,
    md: &api::Metadata,
    args: &Args,
) -> Result<()> {
    // Reservations first, with the service up.
    let service = Running::start(url, root).await?;
    wait_served(md).await?;
    for n in 0..args.containers {
        let container_id = format!("t{n}");
        md.create_container(&mpb::CreateContainerRequest {
            container: Some(container(container_id.clone())),
        })
        .await?;
        md.reserve_task(&mpb::ReserveTaskRequest {
            container_id,
            node: "n1".into(),
            generation: 1 + n as u64,
            boot_id: "boot".into(),
        })
        .await?;
    }
    service.stop().await?;

    // The stream: start, then pause and resume over and over, round robin
    // over the containers; the very last event is an exit.
    let js = async_nats::jetstream::new(conn.clone());
    let started = Instant::now();
    let mut acks = Vec::new();
    for i in 0..args.events {
        let n = i % args.containers;
        let round = i / args.containers;
        let topic = match round {
            _ if i + 1 == args.events => "tasks.exit",
            0 => "tasks.start",
            r if r % 2 == 1 => "tasks.paused",
            _ => "tasks.resumed",
        };
        let event = TaskEvent {
            container_id: format!("t{n}"),
            pid: 100 + n as u32,
            exit_status: 3,
            ..Default::default()
        };
        let envelope = Envelope {
            topic: topic.into(),
            namespace: "bench".into(),
            node: "n1".into(),
            timestamp: Some(Timestamp::now()),
            generation: 1 + n as u64,
            source: "task".into(),
            payload: event.encode_to_vec().into(),
            traceparent: String::new(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("bench-{i}").as_str());
        let subject = berth_bus::subject::event("bench", topic)?;
        acks.push(
            js.publish_with_headers(subject, headers, envelope.encode_to_vec().into())
                .await?,
        );
        if acks.len() == 1_000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    println!(
        "stream pre-filled: {} events in {:.2} s",
        args.events,
        started.elapsed().as_secs_f64()
    );

    // The floor: the same events read through the bus's consumer, applied
    // nowhere.
    let started = Instant::now();
    let mut consumer =
        berth_bus::events::Consumer::new(&js, vec![berth_metadata::events::task_filter()]).await?;
    let from = match consumer.resume(Default::default()).await? {
        berth_bus::events::Resume::Continue(cursor) => cursor,
        berth_bus::events::Resume::Reconcile { from, .. } => from,
    };
    let messages = consumer.messages(from).await?;
    futures::pin_mut!(messages);
    let mut read = 0;
    while read < args.events {
        messages.next().await.context("stream ended")??;
        read += 1;
    }
    let elapsed = started.elapsed();
    println!(
        "stream read (no apply): {read} events in {:.2} s: {:.0} events/s",
        elapsed.as_secs_f64(),
        read as f64 / elapsed.as_secs_f64()
    );

    // The clock runs from the start of the service to the last event shown.
    let started = Instant::now();
    let service = Running::start(url, root).await?;
    let last = mpb::GetTaskRequest {
        container_id: format!("t{}", (args.events - 1) % args.containers),
    };
    loop {
        if let Ok(reply) = md.get_task(&last).await {
            if reply
                .task
                .is_some_and(|t| t.status == mpb::TaskStatus::Stopped as i32)
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "event apply: {} events in {:.2} s from the service's start: {:.0} events/s",
        args.events,
        elapsed.as_secs_f64(),
        args.events as f64 / elapsed.as_secs_f64()
    );
    service.stop().await
}
