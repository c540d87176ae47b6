//! The lifecycle commands of existing containers: start, stop, kill, rm,
//! pause, resume and wait.
//!
//! Every command reads the container's record first, so an unknown id is
//! `no such container: ID`, and then talks to the task service of the node
//! the record names, wherever `--node` points.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use berth_bus::{api, Code};
use berth_proto::{metadata as mpb, snapshot as spb, task as tpb};

use crate::follow::{self, Followed, Proc};
use crate::{flags, run, Ctx};

/// A container's record, or `None` when there is none.
pub async fn find(ctx: &Ctx, container_id: &str) -> anyhow::Result<Option<mpb::Container>> {
    let reply = ctx
        .metadata()
        .get_container(&mpb::GetContainerRequest {
            container_id: container_id.to_string(),
        })
        .await;
    match reply {
        Ok(reply) => Ok(reply.container),
        Err(err) if err.code == Code::NotFound => Ok(None),
        Err(err) if err.code == Code::InvalidArgument => {
            anyhow::bail!("no such container: {container_id} ({})", err.message)
        }
        Err(err) => Err(err.into()),
    }
}

/// A container's record, or `no such container: ID`.
pub async fn get(ctx: &Ctx, container_id: &str) -> anyhow::Result<mpb::Container> {
    find(ctx, container_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no such container: {container_id}"))
}

/// The task service of the container's node.
pub fn task_of(ctx: &Ctx, container: &mpb::Container) -> api::Task {
    let node = if container.node.is_empty() {
        &ctx.node
    } else {
        &container.node
    };
    ctx.task_on(node)
}

/// The init process of a container.
pub fn init_of(ctx: &Ctx, container: &mpb::Container) -> Proc {
    Proc {
        task: task_of(ctx, container),
        container_id: container.container_id.clone(),
        exec_id: String::new(),
    }
}

/// The container's task as its node sees it; `None` when it has none.
pub async fn task_state(
    ctx: &Ctx,
    container: &mpb::Container,
) -> anyhow::Result<Option<tpb::State>> {
    match init_of(ctx, container).state().await {
        Ok(state) => Ok(Some(state)),
        Err(err) if err.code == Code::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// A task error with the container named the way a person would say it.
pub fn task_error(err: berth_bus::Error, container_id: &str) -> anyhow::Error {
    match err.code {
        Code::NotFound => anyhow::anyhow!("container {container_id} is not running"),
        _ => err.into(),
    }
}

/// Runs `f` for each container and prints each id it succeeded for; a
/// failure is printed and the rest still run. Exit 1 when any failed.
async fn each<F, Fut>(ids: &[String], mut f: F) -> anyhow::Result<ExitCode>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut code = ExitCode::SUCCESS;
    for container_id in ids {
        match f(container_id.clone()).await {
            Ok(()) => println!("{container_id}"),
            Err(err) if ids.len() > 1 => {
                eprintln!("berth: {}", crate::output::describe(&err));
                code = ExitCode::from(1);
            }
            Err(err) => return Err(err),
        }
    }
    Ok(code)
}

/// Flags of commands that take only container ids.
#[derive(Args)]
pub struct IdsArgs {
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// `berth start` flags.
#[derive(Args)]
pub struct StartArgs {
    /// Stream the output and exit with the container's status (one container).
    #[arg(short, long)]
    attach: bool,
    /// With `-a`, pass berth's stdin to a container created with `-i`.
    #[arg(short, long, requires = "attach")]
    interactive: bool,
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// Makes sure the container has a task that has not run yet: a new one
/// when it has none, or a fresh one in place of a stopped one. Returns
/// false when it runs already.
async fn ready_task(ctx: &Ctx, container: &mpb::Container) -> anyhow::Result<bool> {
    let task = task_of(ctx, container);
    let container_id = &container.container_id;
    let state = task_state(ctx, container).await?;
    match state.as_ref().map(|s| s.status.as_str()) {
        Some("created") => return Ok(true),
        Some("running") | Some("paused") => return Ok(false),
        Some(_) => {
            // Its output stays, and the new task's is appended to it.
            task.delete(&tpb::DeleteRequest {
                container_id: container_id.clone(),
                exec_id: String::new(),
                keep_output: true,
            })
            .await?;
        }
        None => {}
    }
    task.create(&tpb::CreateRequest {
        container_id: container_id.clone(),
        start: false,
    })
    .await
    .map_err(|err| run::start_failure(err, container_id))?;
    Ok(true)
}

/// Starts containers; with `-a`, follows the one container like `run`.
/// Starting a stopped container replaces its task; the output of the runs
/// before stays, and `logs` shows it ahead of the new run's, while `-a`
/// copies only the new run's.
pub async fn start(ctx: &Ctx, args: StartArgs) -> anyhow::Result<ExitCode> {
    if args.attach && args.containers.len() > 1 {
        anyhow::bail!("start -a takes one container");
    }
    if !args.attach {
        return each(&args.containers, |container_id| async move {
            let container = get(ctx, &container_id).await?;
            if ready_task(ctx, &container).await? {
                task_of(ctx, &container)
                    .start(&tpb::StartRequest {
                        container_id: container_id.clone(),
                    })
                    .await
                    .map_err(|err| run::start_failure(err, &container_id))?;
            }
            Ok(())
        })
        .await;
    }

    let container = get(ctx, &args.containers[0]).await?;
    let exits = follow::exit_events(ctx, false).await?;
    let proc = init_of(ctx, &container);
    let ready = ready_task(ctx, &container).await?;
    let from = proc.output_ends().await?;
    if ready {
        task_of(ctx, &container)
            .start(&tpb::StartRequest {
                container_id: container.container_id.clone(),
            })
            .await
            .map_err(|err| run::start_failure(err, &container.container_id))?;
    }
    let options = container.options.clone().unwrap_or_default();
    let input = args.interactive && options.stdin;
    if args.interactive && !options.stdin {
        anyhow::bail!(
            "container {} was created without -i: it has no stdin to attach",
            container.container_id
        );
    }
    match run::follow_init(&proc, options.tty, input, exits, from).await? {
        Followed::Exited(exited) => Ok(ExitCode::from(exited.status.min(255) as u8)),
        Followed::Detached => Ok(ExitCode::from(130)),
    }
}

/// `berth stop` flags.
#[derive(Args)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL (0: at once).
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u32,
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// Stops containers: the image's stop signal (SIGTERM unless it says
/// otherwise), then SIGKILL once the grace period is over.
pub async fn stop(ctx: &Ctx, args: StopArgs) -> anyhow::Result<ExitCode> {
    let time = args.time;
    each(&args.containers, |container_id| async move {
        let container = get(ctx, &container_id).await?;
        if time == 0 {
            return kill_and_wait(ctx, &container).await;
        }

        // The service answers once the task has exited, so the request may
        // take the whole grace period on top of the usual timeout.
        let mut task = task_of(ctx, &container);
        let grace = Duration::from_secs(u64::from(time));
        task.client = task.client.with_timeout(ctx.client.timeout() + grace);
        let stopped = task
            .stop(&tpb::StopRequest {
                container_id: container_id.clone(),
                timeout_seconds: time,
            })
            .await;
        match stopped {
            // A container with no task has nothing to stop.
            Err(err) if err.code == Code::NotFound => Ok(()),
            other => Ok(other.map(|_| ())?),
        }
    })
    .await
}

/// SIGKILL to every process of the task, and the exit awaited; a paused
/// task is thawed so that it can die.
async fn kill_and_wait(ctx: &Ctx, container: &mpb::Container) -> anyhow::Result<()> {
    let Some(state) = task_state(ctx, container).await? else {
        return Ok(());
    };
    // A created task has no process running yet, and one whose shim is
    // gone (`unknown`) none that can be signalled: delete takes them as
    // they are.
    if matches!(state.status.as_str(), "stopped" | "created" | "unknown") {
        return Ok(());
    }
    let proc = init_of(ctx, container);
    let mut exits = follow::exit_events(ctx, false).await?;
    proc.task
        .kill(&tpb::KillRequest {
            container_id: container.container_id.clone(),
            signal: libc::SIGKILL as u32,
            all: true,
            ..Default::default()
        })
        .await?;
    if state.status == "paused" {
        proc.task
            .resume(&tpb::ResumeRequest {
                container_id: container.container_id.clone(),
            })
            .await?;
    }
    proc.wait(&mut exits).await?;
    Ok(())
}

/// `berth kill` flags.
#[derive(Args)]
pub struct KillArgs {
    /// The signal, by name or number (`KILL`, `SIGTERM`, `15`).
    #[arg(short, long, default_value = "KILL")]
    signal: String,
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// Sends a signal to the containers' init processes.
pub async fn kill(ctx: &Ctx, args: KillArgs) -> anyhow::Result<ExitCode> {
    let signal = flags::signal_number(&args.signal)?;
    each(&args.containers, |container_id| async move {
        let container = get(ctx, &container_id).await?;
        task_of(ctx, &container)
            .kill(&tpb::KillRequest {
                container_id: container_id.clone(),
                signal,
                all: false,
                ..Default::default()
            })
            .await
            .map_err(|err| task_error(err, &container_id))?;
        Ok(())
    })
    .await
}

/// `berth rm` flags.
#[derive(Args)]
pub struct RmArgs {
    /// Kill a running task first.
    #[arg(short, long)]
    force: bool,
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// Removes containers: their task, record and rootfs snapshot.
pub async fn rm(ctx: &Ctx, args: RmArgs) -> anyhow::Result<ExitCode> {
    let force = args.force;
    each(&args.containers, |container_id| async move {
        let container = get(ctx, &container_id).await?;
        if lost_node(ctx, &container).await? {
            if !force {
                anyhow::bail!(
                    "node {} of container {container_id} is lost, so its task's state is unknown: \
                     rm -f removes the container and leaves the node a tombstone to apply when it returns",
                    container.node
                );
            }
            return abandon(ctx, &container).await;
        }
        let state = task_state(ctx, &container).await?;
        match state.as_ref().map(|s| s.status.as_str()) {
            None | Some("stopped") | Some("created") | Some("unknown") => {}
            Some(status) if !force => {
                anyhow::bail!("container {container_id} is {status}: stop it first or use rm -f")
            }
            Some(_) => {}
        }
        kill_and_wait(ctx, &container).await?;
        cleanup(ctx, &container_id).await
    })
    .await
}

/// True when the container's node is one the registry holds as lost.
async fn lost_node(ctx: &Ctx, container: &mpb::Container) -> anyhow::Result<bool> {
    if container.node.is_empty() {
        return Ok(false);
    }
    let reply = ctx
        .metadata()
        .get_node(&mpb::GetNodeRequest {
            node: container.node.clone(),
        })
        .await;
    match reply {
        Ok(reply) => Ok(reply
            .node
            .is_some_and(|node| node.state == mpb::NodeState::Lost as i32)),
        Err(err) if err.code == Code::NotFound => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Removes a container whose node is lost: metadata drops the record and
/// the task's reservation and leaves the node a tombstone, which its task
/// service applies when it returns (killing the task if it still runs).
/// The rootfs snapshot stays on the node until gc prunes it there.
async fn abandon(ctx: &Ctx, container: &mpb::Container) -> anyhow::Result<()> {
    ctx.metadata()
        .delete_container(&mpb::DeleteContainerRequest {
            container_id: container.container_id.clone(),
            abandon_task: true,
        })
        .await?;
    eprintln!(
        "berth: node {} is lost: its task of {} goes when the node returns",
        container.node, container.container_id
    );
    Ok(())
}

/// Deletes the task, the container record and its snapshot; each step
/// already done is skipped.
pub async fn cleanup(ctx: &Ctx, container_id: &str) -> anyhow::Result<()> {
    let Some(container) = find(ctx, container_id).await? else {
        return Ok(());
    };
    let deleted = task_of(ctx, &container)
        .delete(&tpb::DeleteRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
            keep_output: false,
        })
        .await;
    match deleted {
        Err(err) if err.code != Code::NotFound => return Err(err.into()),
        _ => {}
    }
    let node = if container.node.is_empty() {
        ctx.node.clone()
    } else {
        container.node.clone()
    };
    // The record and the rootfs go at once: neither needs the other gone
    // first, and a rootfs whose record went first is gc's to take anyway.
    let metadata = ctx.metadata();
    let request = mpb::DeleteContainerRequest {
        container_id: container_id.to_string(),
        ..Default::default()
    };
    let (record, rootfs) = tokio::join!(
        metadata.delete_container(&request),
        remove_snapshot(ctx, &node, &container.snapshot_key)
    );
    record?;
    match rootfs {
        Err(err) if err.code != Code::NotFound => Err(err.into()),
        _ => Ok(()),
    }
}

/// Removes one snapshot on one node, unconditionally.
pub async fn remove_snapshot(ctx: &Ctx, node: &str, key: &str) -> Result<(), berth_bus::Error> {
    ctx.snapshot_on(node)
        .remove(&spb::RemoveRequest {
            key: key.to_string(),
            unless_touched_since: 0,
        })
        .await?;
    Ok(())
}

/// Freezes containers.
pub async fn pause(ctx: &Ctx, args: IdsArgs) -> anyhow::Result<ExitCode> {
    each(&args.containers, |container_id| async move {
        let container = get(ctx, &container_id).await?;
        task_of(ctx, &container)
            .pause(&tpb::PauseRequest {
                container_id: container_id.clone(),
            })
            .await
            .map_err(|err| task_error(err, &container_id))?;
        Ok(())
    })
    .await
}

/// Thaws paused containers.
pub async fn resume(ctx: &Ctx, args: IdsArgs) -> anyhow::Result<ExitCode> {
    each(&args.containers, |container_id| async move {
        let container = get(ctx, &container_id).await?;
        task_of(ctx, &container)
            .resume(&tpb::ResumeRequest {
                container_id: container_id.clone(),
            })
            .await
            .map_err(|err| task_error(err, &container_id))?;
        Ok(())
    })
    .await
}

/// Waits for each container's task to exit and prints its status.
pub async fn wait(ctx: &Ctx, args: IdsArgs) -> anyhow::Result<ExitCode> {
    let mut exits = follow::exit_events(ctx, false).await?;
    for container_id in &args.containers {
        let container = get(ctx, container_id).await?;
        let exited = init_of(ctx, &container)
            .wait(&mut exits)
            .await
            .map_err(|err| match err.downcast::<berth_bus::Error>() {
                Ok(bus) => task_error(bus, container_id),
                Err(err) => err,
            })?;
        println!("{}", exited.status);
    }
    Ok(ExitCode::SUCCESS)
}
