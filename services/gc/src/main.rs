//! `berth-gc`: the gc service on its own, as a fleet runs it.

use std::time::Duration;

use clap::Parser;

/// berth's gc service.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// NATS server to connect to.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Seconds between runs when nothing triggers one.
    #[arg(long, default_value_t = 60)]
    interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_bus::trace::init("berth-gc");
    let nats = berth_bus::connect(&args.nats, "berth-gc").await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let config = berth_gc::Config {
        interval: Duration::from_secs(args.interval),
    };
    berth_gc::run(nats, config, shutdown).await?;
    Ok(())
}
