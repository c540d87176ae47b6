//! `berth ps` and `berth inspect`: containers with the state of their tasks.
//!
//! A container's record comes from metadata; its task's state comes from the
//! task service of its node, which knows it first (metadata learns it from
//! the events a moment later). A node that does not answer leaves the state
//! metadata recorded last.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Args;

use berth_bus::Code;
use berth_proto::{metadata as mpb, task as tpb};

use crate::{containers, output, Ctx};

/// `berth ps` flags.
#[derive(Args)]
pub struct PsArgs {
    /// Show every container, not only running and paused ones.
    #[arg(short, long)]
    all: bool,
    /// Print only the ids.
    #[arg(short, long)]
    quiet: bool,
}

/// The state metadata recorded for a task, in the task service's words.
fn recorded_state(task: &mpb::Task) -> tpb::State {
    let status = match mpb::TaskStatus::try_from(task.status).unwrap_or_default() {
        mpb::TaskStatus::Created => "created",
        mpb::TaskStatus::Running => "running",
        mpb::TaskStatus::Paused => "paused",
        mpb::TaskStatus::Stopped => "stopped",
        _ => "unknown",
    };
    tpb::State {
        container_id: task.container_id.clone(),
        status: status.to_string(),
        pid: task.pid,
        exit_status: task.exit_status,
        exited_at: task.exited_at,
        generation: task.generation,
        oom_killed: task.oom_killed,
        ..Default::default()
    }
}

/// The task states of the containers, by container id.
async fn states(
    ctx: &Ctx,
    containers: &[mpb::Container],
) -> anyhow::Result<HashMap<String, tpb::State>> {
    let mut nodes: Vec<&str> = containers.iter().map(|c| c.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let mut out = HashMap::new();
    let mut unanswered = false;
    for node in nodes.into_iter().filter(|n| !n.is_empty()) {
        match ctx.task_on(node).list(&tpb::ListRequest {}).await {
            Ok(reply) => {
                for state in reply.states {
                    out.insert(state.container_id.clone(), state);
                }
            }
            Err(err) if matches!(err.code, Code::Unavailable | Code::DeadlineExceeded) => {
                unanswered = true;
            }
            Err(err) => return Err(err.into()),
        }
    }
    if unanswered {
        let tasks = ctx.metadata().list_tasks(&Default::default()).await?.tasks;
        for task in tasks {
            out.entry(task.container_id.clone())
                .or_insert_with(|| recorded_state(&task));
        }
    }
    Ok(out)
}

/// A task's state as `ps` prints it: `running`, `exited (3)`, ...
pub fn status_text(state: Option<&tpb::State>) -> String {
    match state {
        None => "created".to_string(),
        Some(state) if state.status == "stopped" => format!("exited ({})", state.exit_status),
        Some(state) => state.status.clone(),
    }
}

/// The command a container runs: the spec's arguments once the task
/// service made one, else the arguments given.
fn command(container: &mpb::Container) -> String {
    let from_spec = serde_json::from_slice::<serde_json::Value>(&container.spec)
        .ok()
        .and_then(|spec| spec["process"]["args"].as_array().cloned())
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        });
    from_spec.unwrap_or_else(|| {
        let options = container.options.clone().unwrap_or_default();
        options
            .entrypoint
            .iter()
            .chain(&options.args)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// The short name of an image, as docker prints it.
fn familiar(image: &str) -> String {
    berth_oci::Reference::parse(image)
        .map(|r| r.familiar())
        .unwrap_or_else(|_| image.to_string())
}

/// Lists containers with their task's state.
pub async fn ps(ctx: &Ctx, args: PsArgs) -> anyhow::Result<ExitCode> {
    let containers = ctx
        .metadata()
        .list_containers(&Default::default())
        .await?
        .containers;
    let states = states(ctx, &containers).await?;
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for container in &containers {
        let state = states.get(&container.container_id);
        let live = state.is_some_and(|s| s.status == "running" || s.status == "paused");
        if !args.all && !live {
            continue;
        }
        let status = status_text(state);
        let created = output::nanos(container.created_at.as_ref());
        json.push(serde_json::json!({
            "id": container.container_id,
            "image": container.image,
            "command": command(container),
            "node": container.node,
            "status": status,
            "pid": state.map(|s| s.pid).unwrap_or(0),
            "exitCode": state.filter(|s| s.status == "stopped").map(|s| s.exit_status),
            "created": output::time(created),
            "labels": container.labels,
        }));
        rows.push(vec![
            container.container_id.clone(),
            familiar(&container.image),
            truncate(&command(container), 30),
            output::ago(created),
            status,
            container.node.clone(),
        ]);
    }
    if ctx.json {
        output::json(&serde_json::Value::Array(json));
    } else if args.quiet {
        rows.iter().for_each(|row| println!("{}", row[0]));
    } else {
        output::table(
            &[
                "CONTAINER ID",
                "IMAGE",
                "COMMAND",
                "CREATED",
                "STATUS",
                "NODE",
            ],
            rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let cut: String = text.chars().take(max - 1).collect();
    format!("{cut}…")
}

/// `berth inspect` flags.
#[derive(Args)]
pub struct InspectArgs {
    /// The containers.
    #[arg(required = true, value_name = "CONTAINER")]
    containers: Vec<String>,
}

/// Prints the containers' records and task states as a JSON array.
pub async fn inspect(ctx: &Ctx, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let mut out = Vec::new();
    for container_id in &args.containers {
        let container = containers::get(ctx, container_id).await?;
        let state = match containers::task_state(ctx, &container).await {
            Ok(state) => state,
            // The node is away: what metadata recorded last.
            Err(err) if output::is_code(&err, Code::Unavailable) => ctx
                .metadata()
                .get_task(&mpb::GetTaskRequest {
                    container_id: container_id.clone(),
                })
                .await
                .ok()
                .and_then(|reply| reply.task)
                .map(|task| recorded_state(&task)),
            Err(err) => return Err(err),
        };
        out.push(container_json(&container, state.as_ref()));
    }
    output::json(&serde_json::Value::Array(out));
    Ok(ExitCode::SUCCESS)
}

/// One container as `inspect` prints it.
fn container_json(container: &mpb::Container, state: Option<&tpb::State>) -> serde_json::Value {
    let options = container.options.clone().unwrap_or_default();
    let spec = serde_json::from_slice::<serde_json::Value>(&container.spec).ok();
    serde_json::json!({
        "id": container.container_id,
        "image": container.image,
        "imageDigest": container.image_digest,
        "node": container.node,
        "runtime": container.runtime,
        "snapshotKey": container.snapshot_key,
        "labels": container.labels,
        "stopSignal": container.stop_signal,
        "created": output::time(output::nanos(container.created_at.as_ref())),
        "updated": output::time(output::nanos(container.updated_at.as_ref())),
        "generation": container.generation,
        "config": {
            "args": options.args,
            "entrypoint": options.entrypoint_set.then_some(&options.entrypoint),
            "env": options.env,
            "workingDir": options.working_dir,
            "user": options.user,
            "hostname": options.hostname,
            "network": if options.host_network { "host" } else { "none" },
            "readOnly": options.readonly_rootfs,
            "binds": options.binds.iter().map(|b| serde_json::json!({
                "source": b.source, "destination": b.destination, "readOnly": b.readonly,
            })).collect::<Vec<_>>(),
            "tmpfs": options.tmpfs,
            "memoryBytes": options.memory_bytes,
            "cpus": options.cpu_millis as f64 / 1000.0,
            "pidsLimit": options.pids_limit,
            "capAdd": options.cap_add,
            "capDrop": options.cap_drop,
            "privileged": options.privileged,
            "seccompUnconfined": options.seccomp_unconfined,
            "seccompProfile": !options.seccomp_profile.is_empty(),
            "allowNewPrivileges": options.allow_new_privileges,
        },
        "state": state_json(state),
        "spec": spec,
    })
}

/// A task's state as JSON; `status: created` with no task.
fn state_json(state: Option<&tpb::State>) -> serde_json::Value {
    let Some(state) = state else {
        return serde_json::json!({"status": "created", "task": false});
    };
    serde_json::json!({
        "status": state.status,
        "task": true,
        "pid": state.pid,
        "exitCode": (state.status == "stopped").then_some(state.exit_status),
        "exitedAt": output::time(output::nanos(state.exited_at.as_ref())),
        "oomKilled": state.oom_killed,
        "execs": state.execs.iter().map(|e| serde_json::json!({
            "execId": e.exec_id,
            "status": e.status,
            "pid": e.pid,
            "exitCode": (e.status == "stopped").then_some(e.exit_status),
        })).collect::<Vec<_>>(),
    })
}
