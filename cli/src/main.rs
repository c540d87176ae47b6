//! `berth`: the client, shaped like `ctr` and `nerdctl`.

mod images;
mod output;
mod run;
mod sys;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use berth_bus::{api, Client};

/// berth: a container lifecycle manager over NATS.
#[derive(Parser)]
#[command(name = "berth", version, about)]
pub struct Cli {
    /// NATS server to talk to.
    #[arg(
        long,
        global = true,
        env = "BERTH_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    /// Namespace of the objects.
    #[arg(
        short = 'n',
        long,
        global = true,
        env = "BERTH_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// Node for task and snapshot commands (default: this host's node id).
    #[arg(long, global = true, env = "BERTH_NODE")]
    node: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds each request may take.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Run a command in a new container.
    Run(run::RunArgs),
    /// List containers.
    Ps(sys::PsArgs),
    /// Remove containers.
    Rm(sys::RmArgs),
    /// Send a signal to a container's task.
    Kill(sys::KillArgs),
    /// Wait for a container's task to exit and print its status.
    Wait(sys::WaitArgs),
    /// Print a container's output.
    Logs(sys::LogsArgs),
    /// Collect garbage now.
    Gc(sys::GcArgs),
    /// Print events as they happen.
    Events(sys::EventsArgs),
    /// Inspect the content store.
    #[command(subcommand)]
    Content(sys::ContentCommand),
    /// Inspect snapshots.
    #[command(subcommand)]
    Snapshot(sys::SnapshotCommand),
}

/// Everything a command needs to talk to berth.
pub struct Ctx {
    /// The connection with the request timeout.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
    /// The node for node-local services.
    pub node: String,
    /// `--json`.
    pub json: bool,
}

impl Ctx {
    /// The content service.
    pub fn content(&self) -> api::Content {
        api::Content {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// The metadata service.
    pub fn metadata(&self) -> api::Metadata {
        api::Metadata {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// The snapshot service of the node.
    pub fn snapshot(&self) -> api::Snapshot {
        api::Snapshot {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: self.node.clone(),
        }
    }

    /// The task service of the node.
    pub fn task(&self) -> api::Task {
        api::Task {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: self.node.clone(),
        }
    }

    /// The gc service.
    pub fn gc(&self) -> api::Gc {
        api::Gc {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    berth_bus::trace::init_with("berth", "warn");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("berth: {err}");
            return ExitCode::from(125);
        }
    };
    // One span for the whole command: every request it sends carries its
    // trace context, so the services' spans join one trace.
    let span = tracing::info_span!("berth", otel.name = %cli.command.name());
    let outcome = runtime.block_on(tracing::Instrument::instrument(dispatch(cli), span));
    berth_bus::trace::shutdown(Duration::from_secs(2));
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("berth: {}", output::describe(&err));
            ExitCode::from(125)
        }
    }
}

impl Command {
    /// The span name of the command, `berth.<command>`.
    fn name(&self) -> String {
        let name = match self {
            Command::Image(_) => "image",
            Command::Run(_) => "run",
            Command::Ps(_) => "ps",
            Command::Rm(_) => "rm",
            Command::Kill(_) => "kill",
            Command::Wait(_) => "wait",
            Command::Logs(_) => "logs",
            Command::Gc(_) => "gc",
            Command::Events(_) => "events",
            Command::Content(_) => "content",
            Command::Snapshot(_) => "snapshot",
        };
        format!("berth.{name}")
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    berth_bus::subject::check_namespace(&cli.namespace)?;
    let node = cli
        .node
        .clone()
        .unwrap_or_else(berth_bus::subject::local_node_id);
    berth_bus::subject::check_token("node id", &node)?;
    let nats = async_nats::ConnectOptions::new()
        .name("berth")
        .connection_timeout(Duration::from_secs(2))
        .connect(&cli.nats)
        .await
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot reach NATS at {}: {err} (is berthd running?)",
                cli.nats
            )
        })?;
    let ctx = Ctx {
        client: Client::new(nats, Duration::from_secs(cli.timeout)),
        namespace: cli.namespace,
        node,
        json: cli.json,
    };
    let code = match cli.command {
        Command::Image(command) => images::dispatch(&ctx, command).await?,
        Command::Run(args) => run::run(&ctx, args).await?,
        Command::Ps(args) => sys::ps(&ctx, args).await?,
        Command::Rm(args) => sys::rm(&ctx, args).await?,
        Command::Kill(args) => sys::kill(&ctx, args).await?,
        Command::Wait(args) => sys::wait(&ctx, args).await?,
        Command::Logs(args) => sys::logs(&ctx, args).await?,
        Command::Gc(args) => sys::gc(&ctx, args).await?,
        Command::Events(args) => sys::events(&ctx, args).await?,
        Command::Content(command) => sys::content(&ctx, command).await?,
        Command::Snapshot(command) => sys::snapshot(&ctx, command).await?,
    };
    ctx.client.nats().flush().await.ok();
    Ok(code)
}
