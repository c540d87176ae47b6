//! `berth-snapshot`: the snapshot service of one node on its own, as a fleet
//! runs it.

use std::path::PathBuf;

use clap::Parser;

/// berth's snapshot service.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// NATS server to connect to.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Where snapshots and the database live.
    #[arg(long, default_value = "/var/lib/berth/snapshot")]
    root: PathBuf,
    /// This node's id: the host name, dots as dashes, unless given.
    #[arg(long, env = "BERTH_NODE", default_value_t = berth_bus::subject::local_node_id())]
    node: String,
    /// The content service's root on this host, to read layer blobs from
    /// its files instead of pulling them over NATS.
    #[arg(long)]
    content_root: Option<PathBuf>,
    /// Largest uncompressed size of one image layer (bytes, or with k, m, g).
    #[arg(long, default_value = "32g", value_parser = berth_snapshot::parse_size)]
    max_layer_size: u64,
    /// Most layers an image may have.
    #[arg(long, default_value_t = berth_snapshot::Limits::default().max_layers)]
    max_layers: usize,
    /// Free space an unpack keeps on the snapshot filesystem (0: no check).
    #[arg(long, default_value = "256m", value_parser = berth_snapshot::parse_size)]
    min_free: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berth-snapshot");
    let nats = berth_bus::connect(&args.nats, "berth-snapshot").await?;

    // SIGINT or SIGTERM stops taking requests and ends the service.
    let shutdown = berth_bus::shutdown_on_signals()?;

    let config = berth_snapshot::Config {
        root: args.root,
        node: args.node,
        content_root: args.content_root,
        limits: berth_snapshot::Limits {
            max_layer_size: args.max_layer_size,
            max_layers: args.max_layers,
            min_free_bytes: args.min_free,
        },
    };
    berth_snapshot::run(nats, config, shutdown).await?;
    berth_bus::trace::shutdown(std::time::Duration::from_secs(2));
    Ok(())
}
