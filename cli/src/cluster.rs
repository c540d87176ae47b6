//! What spans the cluster: `gc`, `gc explain`, `ns`, and the services
//! that answer discovery (for `nodes`).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures::StreamExt;

use berth_bus::{api, Code};
use berth_proto::{gc as gpb, metadata as mpb};

use crate::{flags, output, Ctx};

/// How long discovery collects `$SRV.INFO` replies.
const DISCOVERY: Duration = Duration::from_millis(500);

/// `berth gc` flags.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GcArgs {
    /// List what would go; remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    command: Option<GcCommand>,
}

/// `berth gc` subcommands.
#[derive(Subcommand)]
pub enum GcCommand {
    /// Say why a blob or snapshot stays, or that the next run takes it.
    Explain {
        /// A blob digest or a snapshot key.
        object: String,
        /// Only snapshots on this node.
        #[arg(long = "on")]
        on_node: Option<String>,
    },
}

/// Runs gc now and prints what went, or explains one object.
pub async fn gc(ctx: &Ctx, args: GcArgs) -> anyhow::Result<ExitCode> {
    if let Some(GcCommand::Explain { object, on_node }) = args.command {
        return explain(ctx, object, on_node.unwrap_or_default()).await;
    }
    let done = ctx
        .gc()
        .run(&gpb::RunRequest {
            dry_run: args.dry_run,
        })
        .await?;
    if ctx.json {
        let namespaces: Vec<_> = done
            .namespaces
            .iter()
            .map(|ns| {
                serde_json::json!({
                    "namespace": ns.namespace,
                    "blobs": ns.blobs,
                    "snapshots": ns.snapshots,
                    "freedBytes": ns.freed_bytes,
                })
            })
            .collect();
        output::json(&serde_json::json!({
            "epoch": done.epoch,
            "dryRun": done.dry_run,
            "durationMicros": done.duration_micros,
            "namespaces": namespaces,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if done.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for ns in &done.namespaces {
        for blob in &ns.blobs {
            println!("{verb} blob {blob} ({})", ns.namespace);
        }
        for snapshot in &ns.snapshots {
            println!("{verb} snapshot {snapshot} ({})", ns.namespace);
        }
    }
    let freed: i64 = done.namespaces.iter().map(|ns| ns.freed_bytes).sum();
    println!("{verb} {}", output::size(freed));
    Ok(ExitCode::SUCCESS)
}

fn verdict(verdict: i32) -> &'static str {
    match gpb::Verdict::try_from(verdict).unwrap_or_default() {
        gpb::Verdict::Kept => "kept",
        gpb::Verdict::Unreferenced => "unreferenced",
        gpb::Verdict::Missing => "missing",
        gpb::Verdict::Unknown => "unknown",
        gpb::Verdict::Unspecified => "-",
    }
}

fn object_kind(kind: i32) -> &'static str {
    match gpb::ObjectKind::try_from(kind).unwrap_or_default() {
        gpb::ObjectKind::Blob => "blob",
        gpb::ObjectKind::Snapshot => "snapshot",
        gpb::ObjectKind::Unspecified => "object",
    }
}

/// Prints gc's explanation of one object: one line per place it was found.
async fn explain(ctx: &Ctx, object: String, node: String) -> anyhow::Result<ExitCode> {
    let reply = ctx
        .gc()
        .explain(&gpb::ExplainRequest { object, node })
        .await?;
    if ctx.json {
        let explanations: Vec<_> = reply
            .explanations
            .iter()
            .map(|e| {
                serde_json::json!({
                    "kind": object_kind(e.kind),
                    "node": e.node,
                    "verdict": verdict(e.verdict),
                    "path": e.path.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                    "reason": e.reason,
                })
            })
            .collect();
        output::json(&serde_json::json!({"epoch": reply.epoch, "explanations": explanations}));
        return Ok(ExitCode::SUCCESS);
    }
    for e in &reply.explanations {
        let place = if e.node.is_empty() {
            object_kind(e.kind).to_string()
        } else {
            format!("{} on {}", object_kind(e.kind), e.node)
        };
        println!("{place}: {}", e.reason);
    }
    Ok(ExitCode::SUCCESS)
}

/// `berth ns` subcommands.
#[derive(Subcommand)]
pub enum NsCommand {
    /// List every namespace of the cluster.
    Ls,
    /// Create a namespace.
    Create {
        /// The namespace's name.
        name: String,
        /// Labels, `KEY=value`.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Remove empty namespaces.
    Rm {
        /// The namespaces' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// The metadata service as seen from another namespace.
fn metadata_in(ctx: &Ctx, namespace: &str) -> anyhow::Result<api::Metadata> {
    berth_bus::subject::check_namespace(namespace)?;
    Ok(api::Metadata {
        client: ctx.client.clone(),
        namespace: namespace.to_string(),
    })
}

/// Runs one `berth ns` subcommand.
pub async fn ns(ctx: &Ctx, command: NsCommand) -> anyhow::Result<ExitCode> {
    match command {
        NsCommand::Ls => {
            let namespaces = ctx
                .metadata()
                .list_namespaces(&Default::default())
                .await?
                .namespaces;
            if ctx.json {
                output::json(&serde_json::Value::Array(
                    namespaces
                        .iter()
                        .map(|n| {
                            serde_json::json!({
                                "name": n.name,
                                "labels": n.labels,
                                "created": output::time(output::nanos(n.created_at.as_ref())),
                            })
                        })
                        .collect(),
                ));
                return Ok(ExitCode::SUCCESS);
            }
            let rows = namespaces
                .into_iter()
                .map(|n| {
                    let labels: Vec<String> =
                        n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![n.name, labels.join(",")]
                })
                .collect();
            output::table(&["NAME", "LABELS"], rows);
        }
        NsCommand::Create { name, labels } => {
            metadata_in(ctx, &name)?
                .create_namespace(&mpb::CreateNamespaceRequest {
                    namespace: Some(mpb::Namespace {
                        name: name.clone(),
                        labels: flags::key_values(&labels, "label")?.into_iter().collect(),
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|err| match err.code {
                    Code::AlreadyExists => anyhow::anyhow!("namespace {name} exists already"),
                    _ => err.into(),
                })?;
            println!("{name}");
        }
        NsCommand::Rm { names } => {
            for name in names {
                metadata_in(ctx, &name)?
                    .delete_namespace(&mpb::DeleteNamespaceRequest { name: name.clone() })
                    .await
                    .map_err(|err| match err.code {
                        Code::NotFound => anyhow::anyhow!("no such namespace: {name}"),
                        _ => err.into(),
                    })?;
                println!("{name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One `$SRV.INFO` reply, as far as `nodes` reads it.
#[derive(serde::Deserialize)]
struct ServiceInfo {
    name: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    endpoints: Vec<EndpointInfo>,
}

#[derive(serde::Deserialize)]
struct EndpointInfo {
    #[serde(default)]
    subject: String,
}

/// The node a node-local endpoint serves, from its subject
/// `berth.v1.*.<service>.<node>.<op>`; `None` for a cluster service.
fn node_of(service: &str, subject: &str) -> Option<String> {
    if !matches!(service, "snapshot" | "task") {
        return None;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens[..] {
        ["berth", "v1", _, s, node, _, ..] if s == service => Some(node.to_string()),
        _ => None,
    }
}

/// The services that answer `$SRV.INFO` within a moment, by node (the
/// cluster's services under `-`), each with its version.
pub async fn services_by_node(
    ctx: &Ctx,
) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
    let nats = ctx.client.nats();
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply("$SRV.INFO", inbox, bytes::Bytes::new())
        .await?;
    nats.flush().await?;

    // Every instance of every service answers once; gather for a moment.
    let mut by_node: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let deadline = Instant::now() + DISCOVERY;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline.into(), replies.next()).await {
        let Ok(info) = serde_json::from_slice::<ServiceInfo>(&message.payload) else {
            continue;
        };
        if !berth_bus::subject::SERVICES.contains(&info.name.as_str()) {
            continue;
        }
        let node = info
            .endpoints
            .iter()
            .find_map(|e| node_of(&info.name, &e.subject))
            .unwrap_or_else(|| "-".to_string());
        by_node
            .entry(node)
            .or_default()
            .insert(info.name, info.version);
    }
    Ok(by_node)
}

#[cfg(test)]
mod tests {
    use super::node_of;

    #[test]
    fn node_local_subjects_name_their_node() {
        assert_eq!(
            node_of("task", "berth.v1.*.task.web1.create").as_deref(),
            Some("web1")
        );
        assert_eq!(node_of("content", "berth.v1.*.content.info"), None);
        assert_eq!(node_of("metadata", "berth.v1.*.metadata.images.get"), None);
    }
}
