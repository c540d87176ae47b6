//! `berth-content`: the content service on its own, as a fleet runs it.

use std::path::PathBuf;

use clap::Parser;

/// berth's content service.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// NATS server to connect to.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Where blobs and the database live.
    #[arg(long, default_value = "/var/lib/berth/content")]
    root: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berth-content");
    let nats = berth_bus::connect(&args.nats, "berth-content").await?;
    let shutdown = berth_bus::shutdown_on_signals()?;
    berth_content::run(nats, berth_content::Config { root: args.root }, shutdown).await?;
    berth_bus::trace::shutdown(std::time::Duration::from_secs(2));
    Ok(())
}
