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
    let shutdown = berth_bus::shutdown_on_signals()?;
    let config = berth_gc::Config {
        interval: Duration::from_secs(args.interval),
    };
    berth_gc::run(nats, config, shutdown).await?;
    berth_bus::trace::shutdown(std::time::Duration::from_secs(2));
    Ok(())
}
