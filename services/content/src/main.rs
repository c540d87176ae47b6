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
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    berth_content::run(nats, berth_content::Config { root: args.root }, shutdown).await?;
    Ok(())
}
