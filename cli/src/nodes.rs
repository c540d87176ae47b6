//! `berth nodes`: the fleet's nodes as the registry knows them, and
//! questions asked of every node at once (`berth nodes query ...`).
//!
//! The list joins two sources: the metadata service's registry (state,
//! boot id, capacity and tasks from each node's last heartbeat) and the
//! services that answer `$SRV.INFO` now (with their versions). A query is a
//! scatter-gather: one request to each ready node's snapshot or task
//! service, all in flight together, each bounded by `--timeout`; a node
//! that does not answer is named on stderr and left out, never waited for
//! past the timeout.
//!
//! # Limitations
//! Queries ask the namespace of `-n` only, since a node's task and snapshot
//! services answer per namespace; lost nodes are not asked (their state is
//! unknown until they are heard from again).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth_bus::Code;
use berth_proto::metadata::{self as mpb, NodeState};
use berth_proto::{snapshot as spb, task as tpb};

use crate::{cluster, images, output, Ctx};

/// `berth nodes` flags.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodesArgs {
    #[command(subcommand)]
    command: Option<NodesCommand>,
}

/// `berth nodes` subcommands.
#[derive(Subcommand)]
pub enum NodesCommand {
    /// List the nodes with their state and services (the default).
    Ls,
    /// Ask every ready node at once.
    #[command(subcommand)]
    Query(Query),
}

/// The fleet queries.
#[derive(Subcommand)]
pub enum Query {
    /// Nodes that hold an image's unpacked layers: an image name, its
    /// manifest digest, or a snapshot's chain ID.
    Holds {
        /// Image name or digest.
        object: String,
    },
    /// Nodes running (or pausing) a container of an image.
    Runs {
        /// Image name.
        image: String,
    },
    /// Tasks that exited with a non-zero status lately, by node.
    Exits {
        /// How far back: a duration (`1h`, `30m`) or a time.
        #[arg(long, default_value = "1h")]
        since: String,
    },
}

/// Runs `berth nodes`.
pub async fn nodes(ctx: &Ctx, args: NodesArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None | Some(NodesCommand::Ls) => list(ctx).await,
        Some(NodesCommand::Query(query)) => self::query(ctx, query).await,
    }
}

/// A node's state as printed: `ready`, `lost`, or `-` for a node whose
/// services answer but that never heartbeated (an older task service).
fn state_name(state: i32) -> &'static str {
    match NodeState::try_from(state).unwrap_or_default() {
        NodeState::Ready => "ready",
        NodeState::Lost => "lost",
        NodeState::Unspecified => "-",
    }
}

/// The registry's nodes, by id.
async fn registry(ctx: &Ctx) -> anyhow::Result<Vec<mpb::Node>> {
    Ok(ctx.metadata().list_nodes(&Default::default()).await?.nodes)
}

/// Lists every node known to the registry or answering discovery, and the
/// cluster's services as node `-`.
async fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let (records, services) = tokio::join!(registry(ctx), cluster::services_by_node(ctx));
    let records = records?;
    let mut services = services?;
    let mut by_node: BTreeMap<String, Option<mpb::Node>> = BTreeMap::new();
    for record in records {
        by_node.insert(record.node.clone(), Some(record));
    }
    for node in services.keys() {
        by_node.entry(node.clone()).or_insert(None);
    }

    if ctx.json {
        let nodes: Vec<_> = by_node
            .iter()
            .map(|(node, record)| {
                let answering = services.remove(node).unwrap_or_default();
                let mut value = serde_json::json!({"node": node, "services": answering});
                if let Some(record) = record {
                    let beat = record.heartbeat.clone().unwrap_or_default();
                    let extra = serde_json::json!({
                        "state": state_name(record.state),
                        "bootId": beat.boot_id,
                        "version": beat.version,
                        "tasks": beat.tasks,
                        "runningTasks": beat.running_tasks,
                        "cpus": beat.cpus,
                        "memoryBytes": beat.memory_bytes,
                        "heartbeatIntervalMs": beat.interval_ms,
                        "firstSeen": output::nanos(record.first_seen.as_ref()),
                        "lastSeen": output::nanos(record.last_seen.as_ref()),
                        "stateChangedAt": output::nanos(record.state_changed_at.as_ref()),
                        "generation": record.generation,
                    });
                    if let (Some(value), serde_json::Value::Object(extra)) =
                        (value.as_object_mut(), extra)
                    {
                        value.extend(extra);
                    }
                }
                value
            })
            .collect();
        output::json(&serde_json::Value::Array(nodes));
        return Ok(ExitCode::SUCCESS);
    }
    if by_node.is_empty() {
        anyhow::bail!(
            "no node is known and no berth service answered $SRV.INFO (is berthd running?)"
        );
    }
    let rows = by_node
        .into_iter()
        .map(|(node, record)| {
            let answering: Vec<String> = services
                .remove(&node)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, version)| format!("{name} {version}"))
                .collect();
            let answering = if answering.is_empty() {
                "-".to_string()
            } else {
                answering.join(", ")
            };
            match record {
                Some(record) => {
                    let beat = record.heartbeat.clone().unwrap_or_default();
                    vec![
                        node,
                        state_name(record.state).to_string(),
                        format!("{}/{}", beat.running_tasks, beat.tasks),
                        beat.cpus.to_string(),
                        output::mem(beat.memory_bytes),
                        output::ago(output::nanos(record.last_seen.as_ref())),
                        short_boot(&beat.boot_id),
                        answering,
                    ]
                }
                None => {
                    let dash = || "-".to_string();
                    vec![
                        node,
                        dash(),
                        dash(),
                        dash(),
                        dash(),
                        dash(),
                        dash(),
                        answering,
                    ]
                }
            }
        })
        .collect();
    output::table(
        &[
            "NODE",
            "STATE",
            "TASKS (RUNNING/ALL)",
            "CPUS",
            "MEMORY",
            "LAST SEEN",
            "BOOT",
            "SERVICES",
        ],
        rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// The first eight characters of a boot id, as a column shows it.
fn short_boot(boot_id: &str) -> String {
    match boot_id.get(..8) {
        Some(short) => short.to_string(),
        None if boot_id.is_empty() => "-".to_string(),
        None => boot_id.to_string(),
    }
}

/// One node's answer to a query: what matched, or why it did not answer.
type Answer<T> = (String, Result<Vec<T>, berth_bus::Error>);

/// Asks `ask` of every ready node at once and waits for every answer (each
/// bounded by the client's timeout); lost nodes are named on stderr.
async fn scatter<T, F, Fut>(ctx: &Ctx, ask: F) -> anyhow::Result<Vec<Answer<T>>>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<T>, berth_bus::Error>>,
{
    let mut ready = Vec::new();
    for record in registry(ctx).await? {
        if record.state == NodeState::Ready as i32 {
            ready.push(record.node);
        } else {
            eprintln!(
                "berth: node {} is {}: not asked",
                record.node,
                state_name(record.state)
            );
        }
    }
    let asked = ready.into_iter().map(|node| {
        let answer = ask(node.clone());
        async move { (node, answer.await) }
    });
    let answers = futures::future::join_all(asked).await;
    let mut out = Vec::new();
    for (node, answer) in answers {
        match answer {
            Err(err) if matches!(err.code, Code::Unavailable | Code::DeadlineExceeded) => {
                eprintln!("berth: node {node} did not answer: {}", err.message);
            }
            other => out.push((node, other)),
        }
    }
    Ok(out)
}

/// Runs one fleet query and prints the nodes that match.
async fn query(ctx: &Ctx, query: Query) -> anyhow::Result<ExitCode> {
    match query {
        Query::Holds { object } => {
            let chain_id = chain_id_of(ctx, &object).await?;
            let answers = scatter(ctx, |node| {
                let snapshot = ctx.snapshot_on(&node);
                let chain_id = chain_id.clone();
                async move {
                    let infos = snapshot.list(&spb::ListRequest::default()).await?.infos;
                    Ok(infos.into_iter().filter(|i| i.key == chain_id).collect())
                }
            })
            .await?;
            let mut rows = Vec::new();
            for (node, answer) in answers {
                for info in answer? {
                    rows.push((node.clone(), info));
                }
            }
            if ctx.json {
                let nodes: Vec<_> = rows
                    .iter()
                    .map(|(node, info)| {
                        serde_json::json!({
                            "node": node,
                            "chainId": info.key,
                            "created": output::nanos(info.created_at.as_ref()),
                        })
                    })
                    .collect();
                output::json(&serde_json::Value::Array(nodes));
            } else {
                let rows = rows
                    .into_iter()
                    .map(|(node, info)| {
                        vec![
                            node,
                            info.key,
                            output::ago(output::nanos(info.created_at.as_ref())),
                        ]
                    })
                    .collect();
                output::table(&["NODE", "CHAIN ID", "UNPACKED"], rows);
            }
        }
        Query::Runs { image } => {
            let name = match images::get(ctx, &image).await {
                Ok(record) => record.name,
                Err(_) => images::normalize(&image)?,
            };
            let states = gather_states(ctx).await?;
            let live: Vec<_> = states
                .into_iter()
                .filter(|(_, s)| {
                    s.image == name && matches!(s.status.as_str(), "running" | "paused")
                })
                .collect();
            print_states(ctx, live, false);
        }
        Query::Exits { since } => {
            let since = output::parse_time(&since)?;
            let states = gather_states(ctx).await?;
            let failed: Vec<_> = states
                .into_iter()
                .filter(|(_, s)| {
                    s.status == "stopped"
                        && s.exit_status != 0
                        && output::nanos(s.exited_at.as_ref()) >= since
                })
                .collect();
            print_states(ctx, failed, true);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every ready node's task states in the namespace, with their node.
async fn gather_states(ctx: &Ctx) -> anyhow::Result<Vec<(String, tpb::State)>> {
    let answers = scatter(ctx, |node| {
        let task = ctx.task_on(&node);
        async move { Ok(task.list(&tpb::ListRequest {}).await?.states) }
    })
    .await?;
    let mut out = Vec::new();
    for (node, answer) in answers {
        for state in answer? {
            out.push((node.clone(), state));
        }
    }
    Ok(out)
}

/// Prints tasks by node, with their exits when `exits`.
fn print_states(ctx: &Ctx, states: Vec<(String, tpb::State)>, exits: bool) {
    if ctx.json {
        let rows: Vec<_> = states
            .iter()
            .map(|(node, s)| {
                serde_json::json!({
                    "node": node,
                    "id": s.container_id,
                    "image": s.image,
                    "status": s.status,
                    "exitCode": s.exit_status,
                    "exitedAt": output::nanos(s.exited_at.as_ref()),
                })
            })
            .collect();
        output::json(&serde_json::Value::Array(rows));
        return;
    }
    let rows = states
        .into_iter()
        .map(|(node, s)| {
            let mut row = vec![node, s.container_id, images::familiar(&s.image)];
            if exits {
                row.push(s.exit_status.to_string());
                row.push(output::ago(output::nanos(s.exited_at.as_ref())));
            } else {
                row.push(s.status);
            }
            row
        })
        .collect();
    if exits {
        output::table(&["NODE", "CONTAINER", "IMAGE", "EXIT", "EXITED"], rows);
    } else {
        output::table(&["NODE", "CONTAINER", "IMAGE", "STATUS"], rows);
    }
}

/// The chain ID `object` names: an image's (by name or manifest digest),
/// or `object` itself when it is a digest no image has.
async fn chain_id_of(ctx: &Ctx, object: &str) -> anyhow::Result<String> {
    if !object.starts_with("sha256:") {
        return Ok(images::get(ctx, object).await?.chain_id);
    }
    let images = ctx
        .metadata()
        .list_images(&Default::default())
        .await?
        .images;
    let by_manifest = images
        .into_iter()
        .find(|image| image.target.as_ref().is_some_and(|t| t.digest == object));
    Ok(match by_manifest {
        Some(image) => image.chain_id,
        None => object.to_string(),
    })
}

/// Unpacks `image` on `--node` when that node has not: a node that never
/// saw the image pulls its layers from the content service over the bus
/// (the snapshot service reads them in chunks). The documents (index,
/// manifest, config) are read from content here, to learn the layers for
/// this host's platform. No lease is needed: the image record is a root
/// for its chain's snapshots on every node, so gc keeps them.
pub async fn ensure_unpacked(ctx: &Ctx, image: &mpb::Image) -> anyhow::Result<()> {
    let mut snapshot = ctx.snapshot();
    let stat = snapshot
        .stat(&spb::StatRequest {
            key: image.chain_id.clone(),
        })
        .await;
    match stat {
        Ok(_) => return Ok(()),
        Err(err) if err.code == Code::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    let name = images::familiar(&image.name);
    let target = image
        .target
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("image {name} has no target"))?;
    let digest = berth_oci::Digest::parse(&target.digest)
        .map_err(|err| anyhow::anyhow!("image {name} names digest {:?}: {err}", target.digest))?;
    let target = berth_oci::Descriptor::new(&target.media_type, digest, target.size.max(0) as u64);

    // The walk takes its documents synchronously; each is a small blob,
    // read whole over the bus on this runtime's other threads.
    let content = ctx.content();
    let runtime = tokio::runtime::Handle::current();
    let resolved = tokio::task::block_in_place(|| {
        berth_oci::resolve(&target, &berth_oci::Platform::host(), |desc| {
            runtime
                .block_on(content.read_all(desc.digest.as_ref()))
                .map_err(anyhow::Error::from)
        })
    })
    .map_err(|err| anyhow::anyhow!("cannot resolve {name} for this platform: {err}"))?;

    // Applying layers takes time in proportion to their size, as on import.
    let bytes: u64 = resolved.layers.iter().map(|l| l.size).sum();
    snapshot.client = snapshot
        .client
        .with_timeout(ctx.client.timeout() + std::time::Duration::from_secs(bytes >> 20));
    let unpacked = snapshot
        .unpack(&spb::UnpackRequest {
            layers: resolved.layers.iter().map(images::to_pb).collect(),
            diff_ids: resolved.diff_ids.iter().map(|d| d.to_string()).collect(),
            lease_id: String::new(),
        })
        .await
        .map_err(|err| anyhow::anyhow!("cannot unpack {name} on node {}: {err}", ctx.node))?;
    if unpacked.chain_id != image.chain_id {
        anyhow::bail!(
            "image {name} unpacks to {} on node {}, not to its recorded {}",
            unpacked.chain_id,
            ctx.node,
            image.chain_id
        );
    }
    Ok(())
}
