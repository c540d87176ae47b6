//! gc against a real nats-server, metadata and content: unreferenced blobs
//! leave the disk, an image's manifest, config and layer stay until the
//! image is deleted, snapshot nodes are found (also one that joins later)
//! and given the live set, and every run announces itself with `gc.done`.
//!
//! Needs `nats-server` (2.10 or later, with JetStream) on PATH.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use berth_bus::client::new_request_id;
use berth_bus::serve::Serving;
use berth_bus::{Call, Client, Service};
use berth_proto::{content as cpb, gc as gpb, metadata as mdpb, snapshot as spb, Envelope};

const BUSYBOX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/images/busybox/busybox.oci.tar"
);
const MANIFEST: &str = "sha256:91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";
const DIFF_ID: &str = "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
const NODE: &str = "node-t";

/// A nats-server with JetStream on a free port, killed on drop.
struct NatsServer {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl NatsServer {
    fn start() -> Result<NatsServer> {
        let dir = tempfile::Builder::new()
            .prefix("berth-gc-nats-")
            .tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("nats-server")
            .args(["-js", "-sd"])
            .arg(dir.path())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start nats-server (is it on PATH?)")?;
        let server = NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The blobs of an OCI layout archive, by digest.
fn archive_blobs(path: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let mut tar = tar::Archive::new(std::fs::File::open(path)?);
    let mut blobs = Vec::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let Some(hex) = name
            .strip_prefix("blobs/sha256/")
            .filter(|hex| !hex.is_empty())
        else {
            continue;
        };
        let digest = format!("sha256:{hex}");
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        blobs.push((digest, data));
    }
    Ok(blobs)
}

/// Commits `data` to content in namespace `default` through an ingest.
async fn commit(client: &Client, digest: &str, data: &[u8]) -> Result<()> {
    let subject = |op| berth_bus::subject::op("default", "content", op);
    let reference = format!("test-{}", &digest[7..19]);
    let open = cpb::OpenRequest {
        r#ref: reference.clone(),
        expected_digest: digest.to_string(),
        expected_size: data.len() as i64,
        lease_id: String::new(),
    };
    let _: cpb::OpenReply = client
        .call_mut(&subject("open")?, &open, &new_request_id())
        .await?;
    for (index, chunk) in data.chunks(client.max_body()).enumerate() {
        let write = cpb::WriteRequest {
            r#ref: reference.clone(),
            offset: (index * client.max_body()) as i64,
            data: chunk.to_vec().into(),
        };
        let _: cpb::WriteReply = client.call(&subject("write")?, &write).await?;
    }
    let done = cpb::CommitRequest {
        r#ref: reference,
        size: data.len() as i64,
        digest: digest.to_string(),
        ..Default::default()
    };
    let _: cpb::CommitReply = client
        .call_mut(&subject("commit")?, &done, &new_request_id())
        .await?;
    Ok(())
}

fn blob_file(content_root: &Path, digest: &str) -> PathBuf {
    content_root.join("blobs/sha256").join(&digest[7..])
}

/// Calls until the service answers something other than "not running".
async fn wait_for<Req: Message, Rep: Message + Default>(
    client: &Client,
    subject: &str,
    request: &Req,
) -> Result<Rep> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.call(subject, request).await {
            Ok(reply) => return Ok(reply),
            Err(err) if Instant::now() > deadline => bail!("{subject}: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A snapshot service on `node` that records the prunes it gets and
/// reports one stale snapshot removed; it registers without metadata, so gc
/// finds the node in its endpoints' subjects.
type Prunes = Arc<Mutex<Vec<(String, spb::PruneRequest)>>>;

async fn fake_snapshot_service(
    nats: async_nats::Client,
    node: &str,
    prunes: Prunes,
) -> Result<Serving> {
    let serving = Service::new("snapshot", "0.0.0", prunes)
        .node(node)
        .op(
            "prune",
            |prunes: Prunes, call: Call, req: spb::PruneRequest| async move {
                let removed = if req.dry_run {
                    vec![]
                } else {
                    vec!["stale".to_string()]
                };
                prunes
                    .lock()
                    .unwrap()
                    .push((call.namespace().to_string(), req));
                Ok(spb::PruneReply {
                    removed,
                    freed_bytes: 10,
                })
            },
        )
        .serve(nats)
        .await?;
    Ok(serving)
}

/// The whole cycle: dry run, real run, `gc.done`, then an image delete that
/// triggers a run on its own.
#[tokio::test(flavor = "multi_thread")]
async fn collects_unreferenced_blobs_and_keeps_images() -> Result<()> {
    let server = NatsServer::start()?;
    let roots = tempfile::Builder::new()
        .prefix("berth-gc-roots-")
        .tempdir()?;
    let content_root = roots.path().join("content");
    let shutdown = CancellationToken::new();

    let connect = |name: &'static str| berth_bus::connect(&server.url, name);
    let metadata = berth_metadata::Config {
        root: roots.path().join("metadata"),
    };
    tokio::spawn(berth_metadata::run(
        connect("metadata").await?,
        metadata,
        shutdown.clone(),
    ));
    let content = berth_content::Config {
        root: content_root.clone(),
    };
    tokio::spawn(berth_content::run(
        connect("content").await?,
        content,
        shutdown.clone(),
    ));
    let prunes = Prunes::default();
    let _snapshot = fake_snapshot_service(connect("snapshot").await?, NODE, prunes.clone()).await?;

    // Content and the image: busybox's three blobs, and one blob no image uses.
    let nats = connect("test").await?;
    let client = Client::new(nats.clone(), Duration::from_secs(10));
    let list = berth_bus::subject::op("default", "content", "list")?;
    let _: cpb::ListReply = wait_for(&client, &list, &cpb::ListRequest::default()).await?;
    let busybox = archive_blobs(BUSYBOX)?;
    for (digest, data) in &busybox {
        commit(&client, digest, data).await?;
    }
    let stray_data = b"a blob no image refers to\n".to_vec();
    let stray = format!("sha256:{}", hex::encode(Sha256::digest(&stray_data)));
    commit(&client, &stray, &stray_data).await?;
    let image = mdpb::Image {
        name: "docker.io/library/busybox:latest".into(),
        target: Some(berth_proto::Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: MANIFEST.into(),
            size: 349,
            ..Default::default()
        }),
        ..Default::default()
    };
    let create = berth_bus::subject::op("default", "metadata", "images.create")?;
    let request = mdpb::CreateImageRequest {
        image: Some(image.clone()),
    };
    let _: mdpb::ImageReply = client
        .call_mut(&create, &request, &new_request_id())
        .await?;

    // gc starts after the image exists, so only the delete below triggers it.
    let config = berth_gc::Config {
        interval: Duration::from_secs(3600),
    };
    tokio::spawn(berth_gc::run(
        connect("gc").await?,
        config,
        shutdown.clone(),
    ));
    let run = berth_bus::subject::op("default", "gc", "run")?;
    let mut done_events = nats.subscribe("berth.v1.default.events.gc.done").await?;

    // A dry run names the stray blob and removes nothing.
    let dry: gpb::GcDone = wait_for(&client, &run, &gpb::RunRequest { dry_run: true }).await?;
    assert!(dry.dry_run);
    let default = dry
        .namespaces
        .iter()
        .find(|ns| ns.namespace == "default")
        .context("no result")?;
    assert_eq!(default.blobs, vec![stray.clone()]);
    assert!(default.snapshots.is_empty());
    assert!(blob_file(&content_root, &stray).exists());

    // The real run removes the stray blob's file and keeps the image's.
    let done: gpb::GcDone = client
        .call(&run, &gpb::RunRequest { dry_run: false })
        .await?;
    let default = done
        .namespaces
        .iter()
        .find(|ns| ns.namespace == "default")
        .context("no result")?;
    assert_eq!(default.blobs, vec![stray.clone()]);
    assert_eq!(default.snapshots, vec![format!("{NODE}/stale")]);
    assert_eq!(default.freed_bytes, stray_data.len() as i64 + 10);
    assert!(!blob_file(&content_root, &stray).exists());
    for (digest, _) in &busybox {
        assert!(
            blob_file(&content_root, digest).exists(),
            "{digest} removed"
        );
    }

    // The node was given the image's chain ID as live, with the epoch.
    {
        let prunes = prunes.lock().unwrap();
        let (namespace, last) = prunes.last().context("no prune")?;
        assert_eq!(namespace, "default");
        assert_eq!(last.live, vec![DIFF_ID.to_string()]);
        assert_eq!(last.unless_touched_since, done.epoch);
        assert!(!last.dry_run);
    }

    // The run announced itself in the namespace it removed from.
    let event = tokio::time::timeout(Duration::from_secs(5), done_events.next())
        .await?
        .context("no gc.done")?;
    let envelope = Envelope::decode(event.payload)?;
    assert_eq!(envelope.topic, "gc.done");
    let payload = gpb::GcDone::decode(envelope.payload.as_ref())?;
    assert_eq!(payload.epoch, done.epoch);
    assert_eq!(payload.namespaces[0].blobs, vec![stray]);

    // Requests that arrive together never overlap and share runs: at most
    // the run in progress and one after it.
    let calls =
        (0..4).map(|_| client.call::<_, gpb::GcDone>(&run, &gpb::RunRequest { dry_run: false }));
    let mut epochs = Vec::new();
    for outcome in futures::future::join_all(calls).await {
        epochs.push(outcome?.epoch);
    }
    epochs.sort();
    epochs.dedup();
    assert!(epochs.len() <= 2, "runs: {epochs:?}");
    assert!(epochs[0] > done.epoch);

    // Deleting the image triggers a run that takes its blobs.
    let delete = berth_bus::subject::op("default", "metadata", "images.delete")?;
    let request = mdpb::DeleteImageRequest {
        name: image.name.clone(),
    };
    let _: mdpb::DeleteReply = client
        .call_mut(&delete, &request, &new_request_id())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while busybox
        .iter()
        .any(|(digest, _)| blob_file(&content_root, digest).exists())
    {
        if Instant::now() > deadline {
            bail!("image blobs still on disk after the image was deleted");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A node that joins is found by the discovery a run asks for in the
    // background, and that discovery triggers the run that prunes it.
    let joined = Prunes::default();
    let _second =
        fake_snapshot_service(connect("snapshot-2").await?, "node-u", joined.clone()).await?;
    let _: gpb::GcDone = client
        .call(&run, &gpb::RunRequest { dry_run: false })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while joined.lock().unwrap().is_empty() {
        if Instant::now() > deadline {
            bail!("the node that joined was never pruned");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    shutdown.cancel();
    Ok(())
}
