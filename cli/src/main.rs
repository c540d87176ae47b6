//! `berth`: the client, shaped like `ctr` and `nerdctl`.
//!
//! Every command is a handful of requests to the services over NATS; the
//! client keeps no state of its own. Tables go to stdout for people, `--json`
//! prints the same facts for scripts, and every failure is one line on
//! stderr with exit code 125 (docker's code for "the tool failed", as
//! opposed to the container's own status).

mod attach;
mod cluster;
mod connect;
mod containers;
mod events;
mod exec;
mod export;
mod flags;
mod follow;
mod images;
mod logs;
mod nodes;
mod output;
mod plumbing;
mod progress;
mod ps;
mod pull;
mod run;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use berth_bus::{api, Client};

/// berth: a container lifecycle manager over NATS.
#[derive(Parser)]
#[command(name = "berth", version)]
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
    /// Node for new containers and snapshot commands (default: this host's
    /// node id); commands on an existing container go to its own node.
    #[arg(long, global = true, env = "BERTH_NODE")]
    node: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds each request may take; an unpack gets a second more per MiB
    /// of layers, and `stop` its grace period.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    #[command(flatten)]
    auth: connect::NatsAuth,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// List images (`image ls`).
    Images,
    /// Pull an image from an OCI registry (`image pull`).
    Pull(pull::PullArgs),
    /// Remove image names (`image rm`).
    Rmi {
        /// The images' names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Run a command in a new container.
    Run(run::RunArgs),
    /// Create a container and its task without starting it.
    Create(run::CreateArgs),
    /// Start created or stopped containers.
    Start(containers::StartArgs),
    /// Stop containers: the stop signal, then SIGKILL after a grace period.
    Stop(containers::StopArgs),
    /// Send a signal to containers' tasks.
    Kill(containers::KillArgs),
    /// Remove containers.
    Rm(containers::RmArgs),
    /// List containers.
    Ps(ps::PsArgs),
    /// Show containers' records and task states as JSON.
    Inspect(ps::InspectArgs),
    /// Print a container's output.
    Logs(logs::LogsArgs),
    /// Run a command in a running container.
    Exec(exec::ExecArgs),
    /// Freeze every process of containers.
    Pause(containers::IdsArgs),
    /// Thaw paused containers.
    Resume(containers::IdsArgs),
    /// Wait for containers to exit and print their status.
    Wait(containers::IdsArgs),
    /// Show containers' resource use.
    Stats(stats::StatsArgs),
    /// List the processes of a container.
    Top(stats::TopArgs),
    /// Print events, live or replayed from the stream.
    Events(events::EventsArgs),
    /// Inspect the content store.
    #[command(subcommand)]
    Content(plumbing::ContentCommand),
    /// Inspect snapshots on the node.
    #[command(subcommand)]
    Snapshot(plumbing::SnapshotCommand),
    /// Manage leases.
    #[command(subcommand)]
    Lease(plumbing::LeaseCommand),
    /// Collect garbage now, or explain why an object stays.
    Gc(cluster::GcArgs),
    /// Manage namespaces.
    #[command(subcommand)]
    Ns(cluster::NsCommand),
    /// List the nodes (state, capacity, services), or ask them all at once.
    Nodes(nodes::NodesArgs),
}

/// Everything a command needs to talk to berth.
pub struct Ctx {
    /// The connection with the request timeout.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
    /// The node for new containers and node-local plumbing.
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

    /// The snapshot service of `--node`.
    pub fn snapshot(&self) -> api::Snapshot {
        self.snapshot_on(&self.node)
    }

    /// The snapshot service of one node.
    pub fn snapshot_on(&self, node: &str) -> api::Snapshot {
        api::Snapshot {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: node.to_string(),
        }
    }

    /// The task service of one node.
    pub fn task_on(&self, node: &str) -> api::Task {
        api::Task {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: node.to_string(),
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
    // Output piped into `head` ends berth quietly, as it ends any other
    // command line tool, instead of failing on the next write. Sockets are
    // written with MSG_NOSIGNAL, so this touches only stdout and stderr.
    // SAFETY: setting a signal's disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };

    // Usage mistakes exit 125 like every other berth failure; help and
    // version are not failures.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(output::FAILED)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The client reports its own failures in one line; async-nats would
    // log a refused connection a second time.
    berth_bus::trace::init_with("berth", "warn,async_nats=off");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("berth: {err}");
            return ExitCode::from(output::FAILED);
        }
    };

    // One span for the whole command: every request it sends carries its
    // trace context, so the services' spans join one trace.
    let span = tracing::info_span!("berth", otel.name = %cli.command.name());
    let outcome = runtime.block_on(tracing::Instrument::instrument(dispatch(cli), span));
    berth_bus::trace::shutdown(Duration::from_secs(2));
    // A streaming command may leave a blocking stdin or signal task behind.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("berth: {}", output::describe(&err));
            ExitCode::from(output::exit_code(&err))
        }
    }
}

impl Command {
    /// The span name of the command, `berth.<command>`.
    fn name(&self) -> String {
        let name = match self {
            Command::Image(_) | Command::Images | Command::Pull(_) | Command::Rmi { .. } => "image",
            Command::Run(_) => "run",
            Command::Create(_) => "create",
            Command::Start(_) => "start",
            Command::Stop(_) => "stop",
            Command::Kill(_) => "kill",
            Command::Rm(_) => "rm",
            Command::Ps(_) => "ps",
            Command::Inspect(_) => "inspect",
            Command::Logs(_) => "logs",
            Command::Exec(_) => "exec",
            Command::Pause(_) => "pause",
            Command::Resume(_) => "resume",
            Command::Wait(_) => "wait",
            Command::Stats(_) => "stats",
            Command::Top(_) => "top",
            Command::Events(_) => "events",
            Command::Content(_) => "content",
            Command::Snapshot(_) => "snapshot",
            Command::Lease(_) => "lease",
            Command::Gc(_) => "gc",
            Command::Ns(_) => "ns",
            Command::Nodes(_) => "nodes",
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
    if cli.timeout == 0 {
        anyhow::bail!("--timeout must be at least 1 second");
    }
    let nats = connect::connect(&cli.nats, &cli.auth).await?;
    let ctx = Ctx {
        client: Client::new(nats, Duration::from_secs(cli.timeout)),
        namespace: cli.namespace,
        node,
        json: cli.json,
    };

    let code = match cli.command {
        Command::Image(command) => images::dispatch(&ctx, command).await?,
        // docker's shorthands for three image commands.
        Command::Images => images::dispatch(&ctx, images::ImageCommand::Ls).await?,
        Command::Pull(args) => images::dispatch(&ctx, images::ImageCommand::Pull(args)).await?,
        Command::Rmi { names } => {
            images::dispatch(&ctx, images::ImageCommand::Rm { names }).await?
        }
        Command::Run(args) => run::run(&ctx, args).await?,
        Command::Create(args) => run::create(&ctx, args).await?,
        Command::Start(args) => containers::start(&ctx, args).await?,
        Command::Stop(args) => containers::stop(&ctx, args).await?,
        Command::Kill(args) => containers::kill(&ctx, args).await?,
        Command::Rm(args) => containers::rm(&ctx, args).await?,
        Command::Ps(args) => ps::ps(&ctx, args).await?,
        Command::Inspect(args) => ps::inspect(&ctx, args).await?,
        Command::Logs(args) => logs::logs(&ctx, args).await?,
        Command::Exec(args) => exec::exec(&ctx, args).await?,
        Command::Pause(args) => containers::pause(&ctx, args).await?,
        Command::Resume(args) => containers::resume(&ctx, args).await?,
        Command::Wait(args) => containers::wait(&ctx, args).await?,
        Command::Stats(args) => stats::stats(&ctx, args).await?,
        Command::Top(args) => stats::top(&ctx, args).await?,
        Command::Events(args) => events::events(&ctx, args).await?,
        Command::Content(command) => plumbing::content(&ctx, command).await?,
        Command::Snapshot(command) => plumbing::snapshot(&ctx, command).await?,
        Command::Lease(command) => plumbing::lease(&ctx, command).await?,
        Command::Gc(args) => cluster::gc(&ctx, args).await?,
        Command::Ns(command) => cluster::ns(&ctx, command).await?,
        Command::Nodes(args) => nodes::nodes(&ctx, args).await?,
    };
    ctx.client.nats().flush().await.ok();
    Ok(code)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
