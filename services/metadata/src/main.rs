//! `berth-metadata`: the metadata service on its own, as a fleet runs it.

use std::path::PathBuf;

use clap::Parser;

/// berth's metadata service.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// NATS server to connect to.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Where the database lives.
    #[arg(long, default_value = "/var/lib/berth/metadata")]
    root: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berth-metadata");
    let nats = berth_bus::connect(&args.nats, "berth-metadata").await?;
    let shutdown = berth_bus::shutdown_on_signals()?;
    berth_metadata::run(nats, berth_metadata::Config { root: args.root }, shutdown).await?;
    berth_bus::trace::shutdown(std::time::Duration::from_secs(2));
    Ok(())
}
