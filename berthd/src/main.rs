//! `berthd`: all five berth services of one node in one process.
//!
//! Each service keeps its own NATS connection and talks to the others over
//! NATS only, exactly as the separate binaries of a fleet do; this process
//! merely saves starting five. When no NATS server answers at the URL and
//! the URL is on this host, berthd starts a private `nats-server` with
//! JetStream (its store under the root) and stops it on exit.
//!
//! That private server asks every client who it is. At its first start
//! berthd makes an nkey identity for each of its services, for the local
//! admin and for an observer, under `<root>/auth` (readable by root only),
//! and writes the server's `authorization` block from their public keys;
//! each service connects as its own identity, allowed only the subjects it
//! serves and calls, and the CLI finds the admin's seed there with no
//! flags. `--insecure` starts the server without authentication instead.
//! `berthd gen-auth` makes the same files for a fleet's NATS servers.
//!
//! SIGTERM or SIGINT stops the services; the shims and their containers keep
//! running, and the next start re-adopts them.

mod auth;
mod nats;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use auth::{AuthDir, Role, AUTH_CONF};
use berth_bus::ConnectConfig;

/// berthd: a single-node berth (content, snapshot, metadata, task, gc).
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Command {
    /// Make nkey identities and the nats-server `authorization` block for
    /// berth's services, tenants and observers (existing seeds are kept).
    GenAuth(GenAuthArgs),
}

/// `berthd gen-auth` flags.
#[derive(clap::Args)]
struct GenAuthArgs {
    /// The auth directory to fill.
    #[arg(long, env = "BERTH_AUTH_DIR", default_value = "/var/lib/berth/auth")]
    out: PathBuf,
    /// A node whose snapshot and task services get identities (repeatable;
    /// default: this host's node id).
    #[arg(long = "node", value_name = "NODE")]
    nodes: Vec<String>,
    /// A namespace whose tenant gets an identity (repeatable).
    #[arg(long = "tenant", value_name = "NAMESPACE")]
    tenants: Vec<String>,
}

/// How berthd's services reach NATS and prove who they are.
#[derive(clap::Args, Clone)]
struct NatsAuth {
    /// User name for NATS (user and password authentication), for every
    /// service.
    #[arg(long, env = "BERTH_NATS_USER")]
    nats_user: Option<String>,
    /// The NATS user's password.
    #[arg(long, env = "BERTH_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// A file holding an nkey seed, for every service.
    #[arg(long, env = "BERTH_NATS_NKEY", value_name = "FILE")]
    nkey: Option<PathBuf>,
    /// A NATS credentials file (user JWT and seed), for every service.
    #[arg(long, env = "BERTH_NATS_CREDS", value_name = "FILE")]
    creds: Option<PathBuf>,
    /// The CA bundle that signed the NATS server's certificate (requires TLS).
    #[arg(long, env = "BERTH_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// The client certificate for a server that verifies clients.
    #[arg(long, env = "BERTH_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, env = "BERTH_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

/// Which of the five services berthd runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Services {
    /// All five: a single node.
    All,
    /// The cluster's services: content, metadata and gc (one per cluster).
    Control,
    /// The node agent: this node's snapshot and task services.
    Node,
}

impl Services {
    /// Whether the cluster's services run here.
    fn control(self) -> bool {
        matches!(self, Services::All | Services::Control)
    }

    /// Whether this node's services run here.
    fn node(self) -> bool {
        matches!(self, Services::All | Services::Node)
    }
}

/// berthd's flags.
#[derive(clap::Args)]
struct Args {
    /// Where every service keeps its data.
    #[arg(long, env = "BERTH_ROOT", default_value = "/var/lib/berth")]
    root: PathBuf,
    /// Where bundles, shim state and rootfs mounts live (tmpfs).
    #[arg(long, default_value = "/run/berth")]
    state: PathBuf,
    /// NATS server to use; started here when none answers on this host. A
    /// comma-separated list names the servers of a cluster (none is
    /// started then).
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Which services run in this process: `all` (a single node), `control`
    /// (content, metadata and gc, once per cluster) or `node` (this node's
    /// snapshot and task services, on every node of a fleet).
    #[arg(long, env = "BERTH_SERVICES", value_enum, default_value = "all")]
    services: Services,
    /// Seconds between this node's heartbeats in the bucket `berth_nodes`
    /// (fractions allowed, 0.1 to 10); the node is lost after three missed.
    #[arg(long, env = "BERTH_HEARTBEAT_INTERVAL", default_value_t = 2.0)]
    heartbeat_interval: f64,
    /// The content service's root on this host, read for layer blobs
    /// instead of pulling them over NATS (default with `--services all`:
    /// `<root>/content`; a node agent pulls unless given).
    #[arg(long, value_name = "DIR")]
    content_root: Option<PathBuf>,
    /// This node's id (default: the host name, dots as dashes).
    #[arg(long, env = "BERTH_NODE")]
    node: Option<String>,
    /// The berth-shim binary (default: next to berthd; deploy/build-shim.sh
    /// builds the statically linked one that installs use).
    #[arg(long, env = "BERTH_SHIM")]
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
    /// The identities each service connects as (default: `<root>/auth`,
    /// when it exists or berthd starts its own server).
    #[arg(long, env = "BERTH_AUTH_DIR", value_name = "DIR")]
    auth_dir: Option<PathBuf>,
    /// Start the private nats-server without authentication: any process
    /// that can reach its port may then run containers as root here.
    #[arg(long)]
    insecure: bool,
    /// Largest uncompressed size of one image layer, in bytes or with k, m,
    /// g (a layer that inflates past it is refused).
    #[arg(long, default_value = "32g", value_parser = berth_snapshot::parse_size)]
    max_layer_size: u64,
    /// Most layers an image may have.
    #[arg(long, default_value_t = berth_snapshot::Limits::default().max_layers)]
    max_layers: usize,
    /// Free space an unpack keeps on the snapshot filesystem (0: no check).
    #[arg(long, default_value = "256m", value_parser = berth_snapshot::parse_size)]
    min_free: u64,
    /// A namespace whose containers keep the default confinement: no
    /// privileged, host network, bind mounts, added capabilities or seccomp
    /// opt-outs (repeatable). Every namespace with a tenant identity in the
    /// auth directory is confined as well.
    #[arg(long = "confined-namespace", value_name = "NAMESPACE")]
    confined_namespaces: Vec<String>,
    #[command(flatten)]
    auth: NatsAuth,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::GenAuth(args)) = cli.command {
        return gen_auth(args);
    }
    let args = cli.args;
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
    let (mut server, identities) = bring_up_nats(&args, &node).await?;

    let shutdown = CancellationToken::new();
    let connect = |role: Role, name: &'static str| {
        let config = identities.config(&args.nats, name, &role);
        async move { berth_bus::connect_with_config(&config?).await }
    };
    let heartbeat_interval =
        Duration::try_from_secs_f64(args.heartbeat_interval).map_err(|_| {
            anyhow::anyhow!(
                "--heartbeat-interval {} is not a number of seconds",
                args.heartbeat_interval
            )
        })?;
    let mut services = tokio::task::JoinSet::new();

    if args.services.control() {
        let config = berth_metadata::Config {
            root: args.root.join("metadata"),
        };
        services.spawn(named(
            "metadata",
            berth_metadata::run(
                connect(Role::Metadata, "berth-metadata").await?,
                config,
                shutdown.clone(),
            ),
        ));

        let config = berth_content::Config {
            root: args.root.join("content"),
        };
        services.spawn(named(
            "content",
            berth_content::run(
                connect(Role::Content, "berth-content").await?,
                config,
                shutdown.clone(),
            ),
        ));
    }

    if args.services.node() {
        // Beside the content service, layer blobs are read from its files;
        // a node agent pulls them over NATS unless told where they are.
        let content_root = match (&args.content_root, args.services) {
            (Some(root), _) => Some(root.clone()),
            (None, Services::All) => Some(args.root.join("content")),
            (None, _) => None,
        };
        let config = berth_snapshot::Config {
            root: args.root.join("snapshot"),
            node: node.clone(),
            content_root,
            limits: berth_snapshot::Limits {
                max_layer_size: args.max_layer_size,
                max_layers: args.max_layers,
                min_free_bytes: args.min_free,
            },
        };
        services.spawn(named(
            "snapshot",
            berth_snapshot::run(
                connect(Role::Snapshot(node.clone()), "berth-snapshot").await?,
                config,
                shutdown.clone(),
            ),
        ));

        let config = berth_task::Config {
            root: args.root.join("task"),
            state: args.state.join("task"),
            node: node.clone(),
            shim: args.shim.clone(),
            runc: args.runc.clone(),
            confined_namespaces: identities.confined(&args.confined_namespaces),
            heartbeat_interval,
        };
        config.check()?;
        services.spawn(named(
            "task",
            berth_task::run(
                connect(Role::Task(node.clone()), "berth-task").await?,
                config,
                shutdown.clone(),
            ),
        ));
    }

    if args.services.control() {
        let config = berth_gc::Config {
            interval: Duration::from_secs(args.gc_interval),
        };
        services.spawn(named(
            "gc",
            berth_gc::run(
                connect(Role::Gc, "berth-gc").await?,
                config,
                shutdown.clone(),
            ),
        ));
    }

    let probe = connect(Role::Admin, "berthd").await?;
    let subjects = ready_subjects(args.services, &node);
    let ready = nats::wait_for_services(&probe, &subjects, Duration::from_secs(30));

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
                    Ok(()) => tracing::info!(%node, nats = %args.nats, services = ?args.services, "berthd ready"),
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

/// What answers once the services run: `$SRV.PING.<service>` of the
/// cluster's services, and a `list` on this node's own subjects for the
/// node's (another node's service would answer a `PING` by name too).
fn ready_subjects(services: Services, node: &str) -> Vec<String> {
    let mut subjects = Vec::new();
    if services.control() {
        for name in ["metadata", "content", "gc"] {
            subjects.push(format!("$SRV.PING.{name}"));
        }
    }
    if services.node() {
        for name in ["snapshot", "task"] {
            subjects.push(format!("berth.v1.default.{name}.{node}.list"));
        }
    }
    subjects
}

/// A service's run, labelled with its name for the join set.
async fn named(
    name: &'static str,
    run: impl std::future::Future<Output = berth_bus::Result<()>>,
) -> (&'static str, berth_bus::Result<()>) {
    (name, run.await)
}

/// Which identity each connection of berthd uses.
enum Identities {
    /// Every service as its own nkey from an auth directory, with the TLS
    /// settings of `tls`.
    PerRole {
        /// The seeds.
        dir: AuthDir,
        /// The flags' settings (their identity is unset).
        tls: ConnectConfig,
    },
    /// Every service as the one identity of the flags (or none).
    Shared(ConnectConfig),
}

impl Identities {
    /// The namespaces whose containers stay confined: `flags`, and every
    /// tenant's of the auth directory.
    fn confined(&self, flags: &[String]) -> Vec<String> {
        let mut confined = flags.to_vec();
        if let Identities::PerRole { dir, .. } = self {
            confined.extend(dir.tenants());
        }
        confined.sort();
        confined.dedup();
        confined
    }

    /// The connection settings of `role`, named `name`.
    ///
    /// `InvalidArgument` when the auth directory has no seed for `role`.
    fn config(&self, url: &str, name: &str, role: &Role) -> berth_bus::Result<ConnectConfig> {
        let mut config = match self {
            Identities::Shared(base) => base.clone(),
            Identities::PerRole { dir, tls } => {
                let seed = dir.seed_file(role);
                if !seed.exists() {
                    return Err(berth_bus::Error::invalid(format!(
                        "auth directory {} has no identity for {} ({}): run berthd gen-auth",
                        dir.dir.display(),
                        role.describe(),
                        role.file_name()
                    )));
                }
                ConnectConfig {
                    nkey: Some(seed),
                    ..tls.clone()
                }
            }
        };
        config.url = url.to_string();
        config.name = name.to_string();
        config.retry_initial_connect = true;
        Ok(config)
    }
}

/// The flags' connection settings, without URL or name.
fn flag_config(auth: &NatsAuth) -> ConnectConfig {
    ConnectConfig {
        user: auth.nats_user.clone(),
        password: auth.nats_password.clone(),
        nkey: auth.nkey.clone(),
        creds: auth.creds.clone(),
        tls_ca: auth.tls_ca.clone(),
        tls_cert: auth.tls_cert.clone(),
        tls_key: auth.tls_key.clone(),
        ..Default::default()
    }
}

/// The roles berthd itself needs in an auth directory.
fn own_roles(node: &str) -> Vec<Role> {
    vec![
        Role::Admin,
        Role::Observer,
        Role::Content,
        Role::Metadata,
        Role::Gc,
        Role::Snapshot(node.to_string()),
        Role::Task(node.to_string()),
    ]
}

/// Starts the private nats-server when none answers (with authorization
/// unless `--insecure`), and decides which identity each service uses:
/// the flags' when they name one, else the auth directory's when there is
/// one, else none.
async fn bring_up_nats(
    args: &Args,
    node: &str,
) -> anyhow::Result<(Option<nats::LocalServer>, Identities)> {
    let explicit = args.auth_dir.is_some();
    let dir = AuthDir::new(
        args.auth_dir
            .clone()
            .unwrap_or_else(|| args.root.join("auth")),
    );
    let base = flag_config(&args.auth);
    let store = args.root.join("nats");

    // A server that answers already is used as it is; one berthd starts
    // asks for the identities of the auth directory unless --insecure.
    let answering = nats::url_answers(&args.nats)?;
    let access = if answering || args.insecure {
        nats::Access::Open
    } else {
        let made = dir.ensure(&own_roles(node))?;
        if !made.is_empty() {
            tracing::info!(dir = %dir.dir.display(), identities = made.len(), "made nkey identities");
        }
        dir.write_conf()?;
        nats::Access::Authorized(dir.conf_file())
    };
    let server = nats::ensure_server(&args.nats, &args.nats_server, &store, &access).await?;

    // The flags' identity wins; then the auth directory's, when asked for
    // or present; an open private server needs none.
    let open_private = !answering && args.insecure;
    let identities = if base.has_identity() || open_private {
        Identities::Shared(base)
    } else if explicit || dir.seed_file(&Role::Admin).exists() {
        Identities::PerRole { dir, tls: base }
    } else {
        Identities::Shared(base)
    };
    Ok((server, identities))
}

/// `berthd gen-auth`: fills an auth directory and prints how to use it.
fn gen_auth(args: GenAuthArgs) -> anyhow::Result<()> {
    let nodes = if args.nodes.is_empty() {
        vec![berth_bus::subject::local_node_id()]
    } else {
        args.nodes
    };
    let mut roles = vec![
        Role::Admin,
        Role::Observer,
        Role::Content,
        Role::Metadata,
        Role::Gc,
    ];
    for node in nodes {
        roles.push(Role::Snapshot(node.clone()));
        roles.push(Role::Task(node));
    }
    roles.extend(args.tenants.into_iter().map(Role::Tenant));

    let dir = AuthDir::new(&args.out);
    let made = dir.ensure(&roles)?;
    dir.write_conf()?;
    for role in &made {
        println!("made {}", dir.seed_file(role).display());
    }
    println!(
        "wrote {}: include it in nats-server's configuration (`include \"{AUTH_CONF}\"` \
         from a file beside it: nats-server reads include paths relative to the file \
         that includes them), and give each service its seed (berthd --auth-dir {}, \
         or BERTH_NATS_NKEY=<seed file> for the separate service binaries)",
        dir.conf_file().display(),
        dir.dir.display()
    );
    Ok(())
}
