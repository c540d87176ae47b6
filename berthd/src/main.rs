//! `berthd`: all five berth services of one node in one process.
//!
//! Each service keeps its own NATS connection and talks to the others over
//! NATS only, exactly as the separate binaries of a fleet do; this process
//! merely saves starting five. When no NATS server answers at the URL and
//! the URL is on this host, berthd starts a private `nats-server` with
//! JetStream (its store under the root) and stops it on exit.
//!
//! SIGTERM or SIGINT stops the services; the shims and their containers keep
//! running, and the next start re-adopts them.

mod nats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// berthd: a single-node berth (content, snapshot, metadata, task, gc).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where every service keeps its data.
    #[arg(long, default_value = "/var/lib/berth")]
    root: PathBuf,
    /// Where bundles, shim state and rootfs mounts live (tmpfs).
    #[arg(long, default_value = "/run/berth")]
    state: PathBuf,
    /// NATS server to use; started here when none answers on this host.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// This node's id (default: the host name, dots as dashes).
    #[arg(long, env = "BERTH_NODE")]
    node: Option<String>,
    /// The berth-shim binary (default: next to berthd).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// The runc binary (default: runc in PATH).
    #[arg(long)]
    runc: Option<PathBuf>,
    /// The nats-server binary used when berthd starts its own.
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// Seconds between gc runs when nothing triggers one.
    #[arg(long, default_value_t = 60)]
    gc_interval: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berthd");
    let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
    let outcome = runtime.block_on(serve(args));
    // Requests in flight are not waited for past this point.
    runtime.shutdown_timeout(Duration::from_secs(2));
    berth_bus::trace::shutdown(Duration::from_secs(2));
    outcome
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let node = args
        .node
        .clone()
        .unwrap_or_else(berth_bus::subject::local_node_id);
    berth_bus::subject::check_token("node id", &node)?;
    let mut server =
        nats::ensure_server(&args.nats, &args.nats_server, &args.root.join("nats")).await?;

    let shutdown = CancellationToken::new();
    let connect = |name: &'static str| berth_bus::connect(&args.nats, name);
    let mut services = tokio::task::JoinSet::new();

    let config = berth_metadata::Config {
        root: args.root.join("metadata"),
    };
    services.spawn(named(
        "metadata",
        berth_metadata::run(connect("berth-metadata").await?, config, shutdown.clone()),
    ));

    let config = berth_content::Config {
        root: args.root.join("content"),
    };
    services.spawn(named(
        "content",
        berth_content::run(connect("berth-content").await?, config, shutdown.clone()),
    ));

    let config = berth_snapshot::Config {
        root: args.root.join("snapshot"),
        node: node.clone(),
        content_root: Some(args.root.join("content")),
    };
    services.spawn(named(
        "snapshot",
        berth_snapshot::run(connect("berth-snapshot").await?, config, shutdown.clone()),
    ));

    let config = berth_task::Config {
        root: args.root.join("task"),
        state: args.state.join("task"),
        node: node.clone(),
        shim: args.shim.clone(),
        runc: args.runc.clone(),
    };
    services.spawn(named(
        "task",
        berth_task::run(connect("berth-task").await?, config, shutdown.clone()),
    ));

    let config = berth_gc::Config {
        interval: Duration::from_secs(args.gc_interval),
    };
    services.spawn(named(
        "gc",
        berth_gc::run(connect("berth-gc").await?, config, shutdown.clone()),
    ));

    let probe = connect("berthd").await?;
    let ready = nats::wait_for_services(
        &probe,
        &berth_bus::subject::SERVICES,
        Duration::from_secs(30),
    );

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut failed = None;
    tokio::pin!(ready);
    let mut announced = false;
    loop {
        tokio::select! {
            outcome = &mut ready, if !announced => {
                announced = true;
                match outcome {
                    Ok(()) => tracing::info!(%node, nats = %args.nats, "berthd ready"),
                    Err(err) => tracing::warn!(error = %err, "services slow to register"),
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(joined) = services.join_next() => {
                // A service that stops on its own takes the node down with
                // it: a half-running node would answer some requests and
                // not others.
                let (name, outcome) = joined.context("service task panicked")?;
                failed = Some(match outcome {
                    Ok(()) => anyhow::anyhow!("the {name} service stopped"),
                    Err(err) => anyhow::anyhow!("the {name} service failed: {err}"),
                });
                break;
            }
        }
    }

    tracing::info!("berthd stopping");
    shutdown.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while services.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop within 10 s");
    }
    if let Some(server) = server.as_mut() {
        server.stop().await;
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// A service's run, labelled with its name for the join set.
async fn named(
    name: &'static str,
    run: impl std::future::Future<Output = berth_bus::Result<()>>,
) -> (&'static str, berth_bus::Result<()>) {
    (name, run.await)
}
