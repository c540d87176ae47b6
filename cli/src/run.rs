//! `berth create` and `berth run`: the container record, its rootfs
//! snapshot and its task; `run` then starts it, streams its output and
//! exits with its status.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use berth_bus::Code;
use berth_proto::{metadata as mpb, snapshot as spb, task as tpb};

use crate::follow::{self, Followed, Forwarder, Proc};
use crate::output::{self, Exit};
use crate::{attach, containers, flags, images, Ctx};

/// What a new container is: `berth create` flags, shared by `berth run`.
#[derive(Args)]
pub struct CreateArgs {
    /// The container's id (default: 12 random hex digits).
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable: `KEY=value`, or `KEY` to pass berth's own.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Read environment variables from a file, one `KEY=value` a line.
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<PathBuf>,
    /// Override the image's entrypoint (an empty string clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// User: `uid`, `uid:gid`, `name` or `name:group`.
    #[arg(short, long)]
    user: Option<String>,
    /// The container's host name (default: its id).
    #[arg(long)]
    hostname: Option<String>,
    /// Labels, `KEY=value`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Mount the rootfs read-only.
    #[arg(long)]
    read_only: bool,
    /// Add a capability (`NET_ADMIN`, `CAP_SYS_TIME`, `ALL`).
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Drop a capability (`CHOWN`, `ALL`).
    #[arg(long = "cap-drop", value_name = "CAP")]
    cap_drop: Vec<String>,
    /// Every capability and device, no seccomp filter, no masked paths, no
    /// no-new-privileges: the container may do what root on the node may.
    #[arg(long)]
    privileged: bool,
    /// Loosen a default: `seccomp=unconfined` (no filter), `seccomp=FILE`
    /// (an OCI linux.seccomp profile instead of the default one),
    /// `no-new-privileges=false` (setuid binaries work).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opts: Vec<String>,
    /// Bind-mount a host path: `SRC:DST` or `SRC:DST:ro`.
    #[arg(short, long = "volume", value_name = "SRC:DST[:ro]")]
    volumes: Vec<String>,
    /// Mount a fresh tmpfs at a container path.
    #[arg(long = "tmpfs", value_name = "DST")]
    tmpfs: Vec<String>,
    /// `none` (a private network namespace with loopback only) or `host`.
    #[arg(long, alias = "network", default_value = "none")]
    net: String,
    /// Memory limit: bytes, or with k, m, g (`16m`, `1g`).
    #[arg(short, long)]
    memory: Option<String>,
    /// CPU limit, in CPUs (`0.5`, `2`).
    #[arg(long)]
    cpus: Option<String>,
    /// Most processes the container may have.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Keep stdin open and pass berth's to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    tty: bool,
    /// The image.
    image: String,
    /// The command and its arguments (default: the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `berth run` flags.
#[derive(Args)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container id.
    #[arg(short, long)]
    detach: bool,
    #[command(flatten)]
    create: CreateArgs,
}

/// A random container id, as docker prints them (12 hex digits).
fn new_container_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// The run options the flags say, checked before anything is made.
fn options(args: &CreateArgs, image: &mpb::Image) -> anyhow::Result<mpb::RunOptions> {
    let host_network = match args.net.as_str() {
        "none" => false,
        "host" => true,
        other => anyhow::bail!("unknown network {other:?}: berth has none and host"),
    };
    let mut env = Vec::new();
    for file in &args.env_files {
        env.extend(flags::env_file(file)?);
    }
    env.extend(flags::env_entries(&args.env)?);
    let binds = args
        .volumes
        .iter()
        .map(|v| flags::bind(v))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tmpfs = args
        .tmpfs
        .iter()
        .map(|t| flags::tmpfs(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(limit) = args.pids_limit.filter(|n| *n < 1) {
        anyhow::bail!("--pids-limit {limit} must be at least 1");
    }
    let security = flags::security_opts(&args.security_opts)?;

    Ok(mpb::RunOptions {
        args: args.args.clone(),
        entrypoint: args
            .entrypoint
            .iter()
            .filter(|e| !e.is_empty())
            .cloned()
            .collect(),
        entrypoint_set: args.entrypoint.is_some(),
        env,
        working_dir: args.workdir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        hostname: args.hostname.clone().unwrap_or_default(),
        host_network,
        readonly_rootfs: args.read_only,
        tty: args.tty,
        stdin: args.interactive,
        image_config_digest: image.config_digest.clone(),
        binds,
        tmpfs,
        memory_bytes: args
            .memory
            .as_deref()
            .map(flags::parse_memory)
            .transpose()?
            .unwrap_or(0),
        cpu_millis: args
            .cpus
            .as_deref()
            .map(flags::parse_cpus)
            .transpose()?
            .unwrap_or(0),
        pids_limit: args.pids_limit.unwrap_or(0),
        cap_add: args
            .cap_add
            .iter()
            .map(|c| flags::capability(c))
            .collect::<anyhow::Result<_>>()?,
        cap_drop: args
            .cap_drop
            .iter()
            .map(|c| flags::capability(c))
            .collect::<anyhow::Result<_>>()?,
        privileged: args.privileged,
        seccomp_unconfined: security.seccomp_unconfined,
        seccomp_profile: security.seccomp_profile,
        allow_new_privileges: security.allow_new_privileges,
    })
}

/// Makes the container's rootfs and record on `--node`; returns its id.
async fn make_container(ctx: &Ctx, args: &CreateArgs) -> anyhow::Result<String> {
    let image = images::get(ctx, &args.image).await?;
    let options = options(args, &image)?;
    let labels = flags::key_values(&args.labels, "label")?;
    for bind in &options.binds {
        // Only a local node's paths can be checked from here.
        if ctx.node == berth_bus::subject::local_node_id()
            && !std::path::Path::new(&bind.source).exists()
        {
            anyhow::bail!("bind source {} does not exist", bind.source);
        }
    }
    let container_id = args.name.clone().unwrap_or_else(new_container_id);
    if containers::find(ctx, &container_id).await?.is_some() {
        anyhow::bail!("the container name {container_id:?} is already in use");
    }

    // The record first, then its rootfs: gc keeps a snapshot that a
    // container record names, so no moment leaves the snapshot unowned and
    // no lease is needed to cover one. A record whose rootfs could not be
    // made is taken back.
    let container = mpb::Container {
        container_id: container_id.clone(),
        image: image.name.clone(),
        image_digest: image
            .target
            .as_ref()
            .map(|t| t.digest.clone())
            .unwrap_or_default(),
        snapshot_key: container_id.clone(),
        node: ctx.node.clone(),
        runtime: "io.berth.runc.v1".to_string(),
        labels: labels.into_iter().collect(),
        options: Some(options),
        ..Default::default()
    };
    crate::nodes::ensure_unpacked(ctx, &image).await?;
    let snapshot_key = container.snapshot_key.clone();
    ctx.metadata()
        .create_container(&mpb::CreateContainerRequest {
            container: Some(container),
        })
        .await?;
    let prepared = ctx
        .snapshot()
        .prepare(&spb::PrepareRequest {
            key: snapshot_key,
            parent: image.chain_id.clone(),
            labels: Default::default(),
            lease_id: String::new(),
        })
        .await;
    if let Err(err) = prepared {
        let _ = ctx
            .metadata()
            .delete_container(&mpb::DeleteContainerRequest {
                container_id: container_id.clone(),
                ..Default::default()
            })
            .await;
        return Err(
            anyhow::Error::new(err).context(format!("cannot prepare the rootfs of {container_id}"))
        );
    }
    Ok(container_id)
}

/// A start or create refused by runc, with docker's exit code: 127 for a
/// command that is not there, 126 for one that cannot be run.
pub fn start_failure(err: berth_bus::Error, container_id: &str) -> anyhow::Error {
    let lower = err.message.to_ascii_lowercase();
    let code = if err.code != Code::InvalidArgument {
        output::FAILED
    } else if lower.contains("not found") || lower.contains("no such file") {
        127
    } else if lower.contains("permission denied") {
        126
    } else {
        output::FAILED
    };
    anyhow::Error::new(Exit {
        code,
        message: format!("cannot start {container_id}: {}", err.message),
    })
}

/// Runs `berth create`: record, rootfs and task, not started; prints the id.
pub async fn create(ctx: &Ctx, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let container_id = make_container(ctx, &args).await?;
    ctx.task_on(&ctx.node)
        .create(&tpb::CreateRequest {
            container_id: container_id.clone(),
            start: false,
        })
        .await
        .map_err(|err| start_failure(err, &container_id))?;
    println!("{container_id}");
    Ok(ExitCode::SUCCESS)
}

/// Follows a started process to its exit as `run`, `start -a` and `exec`
/// do: its output copied from the offsets `from` on, berth's signals
/// passed on, and with `input` berth's stdin passed too; with `tty` the
/// local terminal is raw and its size followed.
pub async fn follow_init(
    proc: &Proc,
    tty: bool,
    input: bool,
    exits: async_nats::Subscriber,
    from: [i64; 2],
) -> anyhow::Result<Followed> {
    // From here on, signals go to the container instead of ending berth.
    let mut signals = Forwarder::install()?;
    let raw = if tty && input {
        attach::RawTerminal::enter()
    } else {
        None
    };
    let (task, container_id, exec_id) = (&proc.task, &proc.container_id, &proc.exec_id);
    let pump =
        input.then(|| attach::pump_stdin(task.clone(), container_id.clone(), exec_id.clone()));
    let sizer = (tty && std::io::stdout().is_terminal())
        .then(|| attach::follow_size(task.clone(), container_id.clone(), exec_id.clone()));
    let followed = proc.follow(exits, Some(&mut signals), from).await;
    for helper in pump.iter().chain(&sizer) {
        helper.abort();
    }
    drop(raw);
    followed
}

/// Runs `berth run`.
pub async fn run(ctx: &Ctx, args: RunArgs) -> anyhow::Result<ExitCode> {
    if args.rm && args.detach {
        anyhow::bail!(
            "--rm with -d needs something to remove the container when it exits, \
             and berth has no such watcher: run it with -d and remove it with berth rm"
        );
    }
    let container_id = make_container(ctx, &args.create).await?;

    // Subscribe before the start, so even an instant exit is seen.
    let exits = follow::exit_events(ctx, false).await?;
    let task = ctx.task_on(&ctx.node);
    // A terminal gets its size between create and start; anything else
    // starts in the create, one runc call instead of two.
    let sized = args.create.tty && !args.detach;
    let started = async {
        task.create(&tpb::CreateRequest {
            container_id: container_id.clone(),
            start: !sized,
        })
        .await?;
        if sized {
            attach::set_size(&task, &container_id, "").await?;
            task.start(&tpb::StartRequest {
                container_id: container_id.clone(),
            })
            .await?;
        }
        Ok::<_, berth_bus::Error>(())
    }
    .await;
    if let Err(err) = started {
        if args.rm {
            let _ = containers::cleanup(ctx, &container_id).await;
        }
        return Err(start_failure(err, &container_id));
    }
    if args.detach {
        println!("{container_id}");
        return Ok(ExitCode::SUCCESS);
    }

    let proc = Proc {
        task,
        container_id: container_id.clone(),
        exec_id: String::new(),
    };
    let (tty, input) = (args.create.tty, args.create.interactive);
    let exited = match follow_init(&proc, tty, input, exits, [0, 0]).await? {
        Followed::Exited(exited) => exited,
        Followed::Detached => {
            eprintln!("berth: detached from {container_id}, which keeps running");
            return Ok(ExitCode::from(130));
        }
    };
    if args.rm {
        containers::cleanup(ctx, &container_id).await?;
    }
    Ok(ExitCode::from(exited.status.min(255) as u8))
}
