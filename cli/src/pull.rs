//! `berth image pull`: an image from an OCI registry, fetched by the
//! content service, unpacked on `--node` and recorded, as `image import`
//! leaves an archive's image.
//!
//! ```text
//! berth ── content.pull (asked again until DONE) ──> content service ──> registry
//!   ^                                                     │
//!   └── content.pull.progress.<pull id> (bars, unpack) <──┘
//!   │
//!   ├── snapshot.unpack of each committed prefix of the layers, while
//!   │   the rest still download
//!   └── metadata: the image record (name, target, config, chain id)
//! ```
//!
//! Everything is held by a lease until the record exists, so a pull that
//! fails leaves no image and nothing gc must keep. A pull the registry
//! broke off (`Unavailable`) keeps its lease until it expires: the blobs it
//! committed stay, the content service keeps a partly fetched layer in its
//! ingest, and the next pull goes on from there.
//!
//! Credentials come from `--user` (with `--password-stdin`), else from the
//! `auths` of a docker `config.json`; without either the pull is anonymous
//! (a registry handing out anonymous bearer tokens is served too).
//!
//! # Limitations
//!
//! Docker credential helpers (`credsStore`, `credHelpers`) and identity
//! tokens are not used. The lease lasts an hour: a pull slower than that
//! may see gc take the blobs it already fetched (they are fetched again),
//! and the lease of an interrupted pull holds its blobs for the rest of
//! that hour unless a pull of the same name finishes.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use clap::Args;
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use prost::Message as _;
use tokio::sync::watch;

use berth_bus::Code;
use berth_oci::{Platform, Reference};
use berth_proto::{content as cpb, metadata as mpb, snapshot as spb};

use crate::images::{familiar, put_image, write_lease};
use crate::{output, Ctx};

/// How many times in a row a pull request may go unanswered before the
/// pull is given up: the service answers within its wait, so more than a
/// few lost replies means it is gone.
const LOST_REPLIES: u32 = 3;

/// `berth image pull`.
#[derive(Args)]
pub struct PullArgs {
    /// The image: `busybox`, `busybox:1.36`, `host:port/ns/name:tag`,
    /// `name@sha256:<hex>`.
    reference: String,
    /// The platform to pick from a multi-platform image,
    /// `os/architecture[/variant]` (default: this host's).
    #[arg(long)]
    platform: Option<String>,
    /// Reach the registry over plain HTTP (a registry on a loopback address
    /// always is).
    #[arg(long)]
    insecure: bool,
    /// Registry credentials, `USER[:PASSWORD]` (without the password, give
    /// `--password-stdin`).
    #[arg(short = 'u', long, value_name = "USER[:PASSWORD]")]
    user: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "user")]
    password_stdin: bool,
    /// A docker `config.json` to take credentials from (default:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`).
    #[arg(long, value_name = "FILE")]
    registry_config: Option<PathBuf>,
}

/// Pulls, unpacks and records one image.
pub async fn pull(ctx: &Ctx, args: PullArgs) -> anyhow::Result<ExitCode> {
    let reference = Reference::parse(&args.reference)
        .with_context(|| format!("invalid image name {:?}", args.reference))?;
    let name = reference.to_string();
    let credentials = credentials(&args, &reference.domain)?;
    let platform = match &args.platform {
        Some(platform) => platform.clone(),
        // The image is unpacked for this host, so it is this host's
        // platform that counts, not the content service's.
        None => Platform::host().to_string(),
    };
    let request = cpb::PullRequest {
        reference: name.clone(),
        platform,
        lease_id: String::new(),
        insecure: args.insecure,
        credentials,
        pull_id: uuid::Uuid::new_v4().simple().to_string(),
        wait_ms: 0,
    };

    // The lease keeps what this pull writes until the image record exists.
    let metadata = ctx.metadata();
    let lease = write_lease(ctx, "pull").await?;
    let request = cpb::PullRequest {
        lease_id: lease.lease_id.clone(),
        ..request
    };
    let outcome = pull_leased(ctx, &name, request).await;
    // A pull the registry broke off keeps its lease until it expires, so
    // that gc leaves the blobs it committed for the next pull to reuse; the
    // label lets the pull that finishes the image drop it.
    let resumable = outcome
        .as_ref()
        .is_err_and(|err| output::is_code(err, Code::Unavailable));
    if resumable {
        let _ = metadata
            .update_lease(&mpb::UpdateLeaseRequest {
                lease: Some(mpb::Lease {
                    lease_id: lease.lease_id.clone(),
                    labels: [(INTERRUPTED.to_string(), name.clone())].into(),
                    ..Default::default()
                }),
                field_mask: vec![format!("labels.{INTERRUPTED}")],
            })
            .await;
    } else {
        let _ = metadata
            .delete_lease(&mpb::DeleteLeaseRequest {
                lease_id: lease.lease_id.clone(),
            })
            .await;
    }
    if outcome.is_ok() {
        drop_interrupted(ctx, &name).await;
    }
    outcome.with_context(|| format!("cannot pull {}", familiar(&name)))?;
    Ok(ExitCode::SUCCESS)
}

/// The label of the lease an interrupted pull leaves; its value is the
/// image's name.
const INTERRUPTED: &str = "berth.io/interrupted-pull";

/// Deletes the leases interrupted pulls of `name` left: the image is
/// recorded now and holds its blobs itself. Best effort: a lease left
/// expires anyway.
async fn drop_interrupted(ctx: &Ctx, name: &str) {
    let metadata = ctx.metadata();
    let Ok(found) = metadata
        .query_leases(&mpb::QueryLeasesRequest {
            label_selector: [(INTERRUPTED.to_string(), name.to_string())].into(),
            selector: Vec::new(),
        })
        .await
    else {
        return;
    };
    for lease in found.leases {
        let _ = metadata
            .delete_lease(&mpb::DeleteLeaseRequest {
                lease_id: lease.lease_id,
            })
            .await;
    }
}

async fn pull_leased(ctx: &Ctx, name: &str, request: cpb::PullRequest) -> anyhow::Result<()> {
    let content = ctx.content();
    // Subscribed before the first request, so no message is missed.
    let subject = content.pull_progress_subject(&request.pull_id)?;
    let subscription = ctx
        .client
        .nats()
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("cannot follow {subject}"))?;
    let (statuses, _) = watch::channel(None::<cpb::PullStatus>);
    let follower = tokio::spawn(follow(subscription, statuses.clone()));
    let display = tokio::spawn(draw(statuses.subscribe()));

    let requests = ask_until_done(&content, &request, &statuses);
    let unpacks = unpack_as_committed(ctx, &request.lease_id, statuses.subscribe());
    let outcome = tokio::try_join!(requests, unpacks);
    follower.abort();
    // The display ends when the last sender goes.
    drop(statuses);
    let _ = display.await;
    let (status, chain_id) = outcome?;

    let image = status.image.unwrap_or_default();
    let target = image.target.unwrap_or_default();
    let record = mpb::Image {
        name: name.to_string(),
        target: Some(target.clone()),
        config_digest: image.config_digest,
        chain_id,
        ..Default::default()
    };
    put_image(ctx, record).await?;
    println!("pulled {} ({})", familiar(name), target.digest);
    Ok(())
}

/// Sends the pull request until the pull is DONE, and returns the last
/// status. A lost reply is asked again (the same body joins the same pull).
async fn ask_until_done(
    content: &berth_bus::api::Content,
    request: &cpb::PullRequest,
    statuses: &watch::Sender<Option<cpb::PullStatus>>,
) -> anyhow::Result<cpb::PullStatus> {
    let mut lost = 0;
    loop {
        let status = match content.pull(request).await {
            Ok(reply) => reply.status.unwrap_or_default(),
            Err(err) if err.code == Code::DeadlineExceeded && lost + 1 < LOST_REPLIES => {
                lost += 1;
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        lost = 0;
        offer(statuses, status.clone());
        if status.phase == cpb::PullPhase::Done as i32 {
            return Ok(status);
        }
    }
}

/// Takes a status when it is newer than the one held: progress messages
/// and replies may arrive in any order.
fn offer(statuses: &watch::Sender<Option<cpb::PullStatus>>, status: cpb::PullStatus) {
    statuses.send_if_modified(|held| {
        if held.as_ref().is_some_and(|h| h.sequence >= status.sequence) {
            return false;
        }
        *held = Some(status);
        true
    });
}

/// Passes the progress messages on; one that does not decode is skipped
/// (the next one holds the whole status).
async fn follow(
    mut subscription: async_nats::Subscriber,
    statuses: watch::Sender<Option<cpb::PullStatus>>,
) {
    while let Some(message) = subscription.next().await {
        if let Ok(status) = cpb::PullStatus::decode(message.payload) {
            offer(&statuses, status);
        }
    }
}

/// Unpacks the layers on the node as they are committed, each prefix of
/// committed layers as soon as it grows, so unpacking overlaps the
/// download of the layers above; returns the top layer's chain ID once the
/// pull is DONE and every layer is unpacked. Waits forever on a failed
/// pull: the request says why.
async fn unpack_as_committed(
    ctx: &Ctx,
    lease_id: &str,
    mut statuses: watch::Receiver<Option<cpb::PullStatus>>,
) -> anyhow::Result<String> {
    let mut unpacked: Option<(usize, String)> = None;
    loop {
        let status = statuses.borrow_and_update().clone();
        if let Some(status) = status {
            if status.phase == cpb::PullPhase::Failed as i32 {
                std::future::pending::<()>().await;
            }
            let done = status.phase == cpb::PullPhase::Done as i32;
            if let Some(image) = &status.image {
                let ready = committed_prefix(&status, image);
                let have = unpacked.as_ref().map(|(count, _)| *count);
                if have.is_none_or(|have| ready > have) && (ready > 0 || done) {
                    let chain_id = unpack(ctx, image, ready, lease_id).await?;
                    unpacked = Some((ready, chain_id));
                }
                if let Some((count, chain_id)) = &unpacked {
                    if done && *count == image.layers.len() {
                        return Ok(chain_id.clone());
                    }
                }
            }
        }
        if statuses.changed().await.is_err() {
            anyhow::bail!("the pull's progress stopped before it was done");
        }
    }
}

/// How many layers from the base up are committed.
fn committed_prefix(status: &cpb::PullStatus, image: &cpb::PulledImage) -> usize {
    let finished = [
        cpb::BlobState::Committed as i32,
        cpb::BlobState::Exists as i32,
    ];
    let states: HashMap<&str, i32> = status
        .blobs
        .iter()
        .map(|blob| (blob.digest.as_str(), blob.state))
        .collect();
    image
        .layers
        .iter()
        .take_while(|layer| {
            states
                .get(layer.digest.as_str())
                .is_some_and(|state| finished.contains(state))
        })
        .count()
}

/// Unpacks the first `count` layers of the image on `--node`; returns the
/// chain ID of the topmost.
async fn unpack(
    ctx: &Ctx,
    image: &cpb::PulledImage,
    count: usize,
    lease_id: &str,
) -> anyhow::Result<String> {
    // Applying layers takes time in proportion to their size: the request
    // gets a second per MiB on top of the usual timeout, as in `import`.
    let layers = &image.layers[..count];
    let bytes: u64 = layers.iter().map(|l| l.size.max(0) as u64).sum();
    let mut snapshot = ctx.snapshot();
    let extra = Duration::from_secs(bytes >> 20);
    snapshot.client = snapshot.client.with_timeout(ctx.client.timeout() + extra);
    let unpacked = snapshot
        .unpack(&spb::UnpackRequest {
            layers: layers.to_vec(),
            diff_ids: image.diff_ids.iter().take(count).cloned().collect(),
            lease_id: lease_id.to_string(),
        })
        .await
        .context("cannot unpack the layers")?;
    Ok(unpacked.chain_id)
}

/// Draws the statuses as bars on stderr, one per blob, when stderr is a
/// terminal; returns when the last sender goes.
async fn draw(mut statuses: watch::Receiver<Option<cpb::PullStatus>>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let multi = MultiProgress::new();
    let phase = multi.add(ProgressBar::new_spinner());
    phase.enable_steady_tick(Duration::from_millis(120));
    // No rate: a resumed blob starts at its offset, and a rate counted from
    // that jump would be nonsense.
    let style = ProgressStyle::with_template("{prefix} {msg:11} [{bar:30}] {bytes}/{total_bytes}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    loop {
        if let Some(status) = statuses.borrow_and_update().clone() {
            let phase_name = match cpb::PullPhase::try_from(status.phase) {
                Ok(cpb::PullPhase::Resolving) => "resolving",
                Ok(cpb::PullPhase::Fetching) => "fetching",
                Ok(cpb::PullPhase::Done) => "unpacking",
                _ => "",
            };
            phase.set_message(format!("{phase_name} {}", familiar(&status.name)));
            for blob in &status.blobs {
                let bar = bars.entry(blob.digest.clone()).or_insert_with(|| {
                    let bar = ProgressBar::new(blob.size.max(0) as u64);
                    bar.set_style(style.clone());
                    let hex = blob.digest.split(':').nth(1).unwrap_or(&blob.digest);
                    bar.set_prefix(hex.chars().take(12).collect::<String>());
                    multi.add(bar)
                });
                bar.set_position(blob.offset.max(0) as u64);
                let state = match cpb::BlobState::try_from(blob.state) {
                    Ok(cpb::BlobState::Waiting) => "waiting",
                    Ok(cpb::BlobState::Fetching) => "downloading",
                    Ok(cpb::BlobState::Committed) => "done",
                    Ok(cpb::BlobState::Exists) => "exists",
                    _ => "",
                };
                bar.set_message(state);
            }
        }
        if statuses.changed().await.is_err() {
            break;
        }
    }
    let _ = multi.clear();
}

/// The credentials for `domain`: the flags', else the docker config's,
/// else none (anonymous).
fn credentials(args: &PullArgs, domain: &str) -> anyhow::Result<Option<cpb::RegistryCredentials>> {
    if let Some(user) = &args.user {
        let (username, password) = match user.split_once(':') {
            Some((_, _)) if args.password_stdin => {
                anyhow::bail!("--password-stdin and a password in --user: give one")
            }
            Some((username, password)) => (username.to_string(), password.to_string()),
            None if args.password_stdin => {
                let mut password = String::new();
                std::io::stdin()
                    .read_to_string(&mut password)
                    .context("cannot read the password from stdin")?;
                (
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                )
            }
            None => {
                anyhow::bail!("--user {user} needs a password: USER:PASSWORD or --password-stdin")
            }
        };
        return Ok(Some(cpb::RegistryCredentials {
            username,
            password,
            registry_token: String::new(),
        }));
    }
    let path = match &args.registry_config {
        Some(path) => path.clone(),
        None => match default_config_file() {
            Some(path) if path.exists() => path,
            _ => return Ok(None),
        },
    };
    from_config(&path, domain)
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn default_config_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker").join("config.json"))
}

/// A docker `config.json`, as far as pulls use it.
#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

/// One entry of `auths`.
#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    /// base64 of `user:password`.
    #[serde(default)]
    auth: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    registrytoken: String,
}

/// The entry of `domain` in the docker config at `path`, if any.
fn from_config(path: &Path, domain: &str) -> anyhow::Result<Option<cpb::RegistryCredentials>> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: DockerConfig = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a docker config.json", path.display()))?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| same_registry(key, domain))
        .map(|(_, entry)| entry)
    else {
        return Ok(None);
    };
    let (mut username, mut password) = (entry.username.clone(), entry.password.clone());
    if !entry.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.auth.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let pair = decoded.as_deref().and_then(|text| text.split_once(':'));
        let Some((user, secret)) = pair else {
            anyhow::bail!(
                "{}: the auth of {domain} is not base64 of user:password",
                path.display()
            );
        };
        (username, password) = (user.to_string(), secret.to_string());
    }
    Ok(Some(cpb::RegistryCredentials {
        username,
        password,
        registry_token: entry.registrytoken.clone(),
    }))
}

/// Whether a key of `auths` (`host:port`, or a URL such as
/// `https://index.docker.io/v1/`) names the registry `domain`.
fn same_registry(key: &str, domain: &str) -> bool {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    // Docker Hub goes by several names.
    let hub = |name: &str| ["docker.io", "index.docker.io", "registry-1.docker.io"].contains(&name);
    host.eq_ignore_ascii_case(domain) || (hub(host) && hub(domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of `auths` match by host, Docker Hub by any of its names.
    #[test]
    fn config_keys_name_registries() {
        assert!(same_registry("127.0.0.1:5000", "127.0.0.1:5000"));
        assert!(same_registry(
            "https://127.0.0.1:5000/v2/",
            "127.0.0.1:5000"
        ));
        assert!(same_registry("https://index.docker.io/v1/", "docker.io"));
        assert!(!same_registry("127.0.0.1:5001", "127.0.0.1:5000"));
        assert!(!same_registry("quay.io", "docker.io"));
    }

    /// `auth` is base64 of `user:password` and wins over the plain fields.
    #[test]
    fn config_entries_give_credentials() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("berth-pull-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(
            &file,
            format!(
                r#"{{"auths":{{"localhost:5000":{{"auth":"{auth}"}},"quay.io":{{"auth":"!"}}}}}}"#
            ),
        )?;
        let found = from_config(&file, "localhost:5000")?.expect("an entry");
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("alice", "s3cret:x")
        );
        assert!(from_config(&file, "ghcr.io")?.is_none());
        assert!(from_config(&file, "quay.io").is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
