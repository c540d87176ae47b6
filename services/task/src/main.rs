//! `berth-task`: the task service on its own, as each node of a fleet runs it.

use std::path::PathBuf;

use clap::Parser;

/// berth's task service (the node agent).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// NATS server to connect to.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Where the task database lives.
    #[arg(long, default_value = "/var/lib/berth/task")]
    root: PathBuf,
    /// Where bundles, shim state and sockets live.
    #[arg(long, default_value = "/run/berth/task")]
    state: PathBuf,
    /// This node's id (default: the host name, dots as dashes).
    #[arg(long, env = "BERTH_NODE")]
    node: Option<String>,
    /// The berth-shim binary (default: next to this one; deploy/build-shim.sh
    /// builds the statically linked one that installs use).
    #[arg(long, env = "BERTH_SHIM")]
    shim: Option<PathBuf>,
    /// The runc binary (default: runc in PATH).
    #[arg(long)]
    runc: Option<PathBuf>,
    /// A namespace whose containers keep the default confinement: no
    /// privileged, host network, bind mounts, added capabilities or seccomp
    /// opt-outs (repeatable; give every tenant's namespace).
    #[arg(
        long = "confined-namespace",
        value_name = "NAMESPACE",
        env = "BERTH_CONFINED_NAMESPACES",
        value_delimiter = ','
    )]
    confined_namespaces: Vec<String>,
    /// Seconds between the node's heartbeats in the bucket `berth_nodes`
    /// (fractions allowed, 0.1 to 10); the node is lost after three missed.
    #[arg(long, env = "BERTH_HEARTBEAT_INTERVAL", default_value_t = 2.0)]
    heartbeat_interval: f64,
}

/// A duration given in seconds, fractions allowed.
fn seconds(value: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{value} is not a number of seconds"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berth-task");
    let nats = berth_bus::connect(&args.nats, "berth-task").await?;
    let shutdown = berth_bus::shutdown_on_signals()?;
    let config = berth_task::Config {
        root: args.root,
        state: args.state,
        node: args.node.unwrap_or_else(berth_bus::subject::local_node_id),
        shim: args.shim,
        runc: args.runc,
        confined_namespaces: args.confined_namespaces,
        heartbeat_interval: seconds(args.heartbeat_interval)?,
    };
    berth_task::run(nats, config, shutdown).await?;
    berth_bus::trace::shutdown(std::time::Duration::from_secs(2));
    Ok(())
}
