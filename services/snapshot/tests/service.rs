//! The snapshot service on the bus, against a real nats-server, a real
//! content service and a real metadata service (for leases), all started in
//! this process: real images are imported into content, unpacked over NATS
//! on a node that reads blobs from the content root and on one that pulls
//! them in chunks, and the prepared snapshots are mounted with overlayfs and
//! looked at. Needs root (mounts, owners) and `nats-server` on PATH.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use berth_bus::api::{Content, Metadata, Snapshot};
use berth_bus::{Client, Code};
use berth_oci::{Archive, Platform};
use berth_proto::{
    content as cpb, metadata as mdpb, snapshot as spb, Descriptor, Envelope, Message,
};
use berth_snapshot::overlay::{self, MountSpec};
use berth_snapshot::store::{Kind, Record, Store};
use berth_testkit::NatsServer;

/// Reads blobs from the content service's files.
const LOCAL: &str = "node-local";
/// Pulls blobs over NATS.
const REMOTE: &str = "node-remote";

/// Every service of one test, stopped when dropped.
struct Cluster {
    nats: NatsServer,
    roots: TempDir,
    client: Client,
    shutdown: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An image as its archive names it: layers and diff IDs, base first.
struct Image {
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
    config: Descriptor,
}

impl Cluster {
    /// nats-server, content, metadata, and the snapshot services of
    /// [`LOCAL`] (with the content root) and [`REMOTE`] (without).
    async fn start() -> Result<Cluster> {
        let nats = NatsServer::start()?;
        let roots = berth_testkit::tempdir("berth-snapshot-svc-")?;
        let connection = connect(&nats.url(), "test").await?;
        let cluster = Cluster {
            client: Client::new(connection, Duration::from_secs(30)),
            nats,
            roots,
            shutdown: CancellationToken::new(),
        };

        let content = berth_content::Config {
            root: cluster.content_root(),
        };
        let connection = cluster.connect("content").await?;
        tokio::spawn(berth_content::run(
            connection,
            content,
            cluster.shutdown.clone(),
        ));
        let metadata = berth_metadata::Config {
            root: cluster.roots.path().join("metadata"),
        };
        let connection = cluster.connect("metadata").await?;
        tokio::spawn(berth_metadata::run(
            connection,
            metadata,
            cluster.shutdown.clone(),
        ));
        cluster.start_snapshot(LOCAL, true).await?;
        cluster.start_snapshot(REMOTE, false).await?;

        let content = cluster.content("default");
        let request = cpb::ListRequest::default();
        wait_until_served(|| content.list(&request)).await?;
        let metadata = cluster.metadata("default");
        wait_until_served(|| metadata.list_leases(&mdpb::ListLeasesRequest {})).await?;
        Ok(cluster)
    }

    async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        connect(&self.nats.url(), name).await
    }

    fn content_root(&self) -> PathBuf {
        self.roots.path().join("content")
    }

    /// The root of `node`'s snapshot service.
    fn snapshot_root(&self, node: &str) -> PathBuf {
        self.roots.path().join(node)
    }

    /// Starts the snapshot service of `node` and waits until it answers.
    async fn start_snapshot(&self, node: &str, local_content: bool) -> Result<()> {
        let config = berth_snapshot::Config {
            root: self.snapshot_root(node),
            node: node.to_string(),
            content_root: local_content.then(|| self.content_root()),
            limits: Default::default(),
        };
        let connection = self.connect(node).await?;
        tokio::spawn(berth_snapshot::run(
            connection,
            config,
            self.shutdown.clone(),
        ));
        let snapshot = self.snapshot("default", node);
        let request = spb::ListRequest::default();
        wait_until_served(|| snapshot.list(&request)).await?;
        Ok(())
    }

    fn snapshot(&self, namespace: &str, node: &str) -> Snapshot {
        Snapshot {
            client: self.client.clone(),
            namespace: namespace.to_string(),
            node: node.to_string(),
        }
    }

    fn content(&self, namespace: &str) -> Content {
        Content {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        }
    }

    fn metadata(&self, namespace: &str) -> Metadata {
        Metadata {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        }
    }

    /// Commits every blob of the archive `fixture` to content in
    /// `namespace`, through ingests as a client does, and returns its image.
    async fn import(&self, namespace: &str, fixture: &str) -> Result<Image> {
        let archive = Archive::open(berth_testkit::fixture::image(fixture))?;
        let content = self.content(namespace);
        for desc in archive.blobs() {
            let mut data = Vec::new();
            archive.blob(&desc.digest)?.read_to_end(&mut data)?;
            commit_blob(&content, desc.digest.as_str(), &data).await?;
        }
        let image = archive.resolve(&archive.images()[0], &Platform::host())?;
        let descriptor = |d: &berth_oci::Descriptor| Descriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.to_string(),
            size: d.size as i64,
            annotations: Default::default(),
        };
        Ok(Image {
            layers: image.layers.iter().map(descriptor).collect(),
            diff_ids: image.diff_ids.iter().map(|d| d.to_string()).collect(),
            config: descriptor(&image.config),
        })
    }

    /// A lease in `namespace`.
    async fn lease(&self, namespace: &str, lease_id: &str) -> Result<()> {
        let request = mdpb::CreateLeaseRequest {
            lease: Some(mdpb::Lease {
                lease_id: lease_id.to_string(),
                ..Default::default()
            }),
        };
        self.metadata(namespace).create_lease(&request).await?;
        Ok(())
    }

    /// Directories under `node`'s `snapshots/`.
    fn snapshot_dirs(&self, node: &str) -> Result<usize> {
        let dir = self.snapshot_root(node).join("snapshots");
        Ok(std::fs::read_dir(dir)?.count())
    }
}

/// A connection that has met the server, so it knows the max payload (the
/// content service sizes its chunks by it when it starts).
async fn connect(url: &str, name: &str) -> Result<async_nats::Client> {
    let connection = berth_bus::connect(url, name).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while connection.server_info().max_payload == 0 {
        if Instant::now() > deadline {
            bail!("no connection to {url}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(connection)
}

/// Writes `data` to content as blob `digest`: open, write in chunks unless
/// the bytes are on disk already, commit.
async fn commit_blob(content: &Content, digest: &str, data: &[u8]) -> Result<()> {
    let reference = format!("import-{}", &digest[7..23]);
    let open = cpb::OpenRequest {
        r#ref: reference.clone(),
        expected_digest: digest.to_string(),
        expected_size: data.len() as i64,
        lease_id: String::new(),
    };
    // A blob already on disk is still committed, to claim it for the namespace.
    let exists = content.open(&open).await?.exists;
    let max = content.client.max_body();
    for (index, chunk) in data.chunks(max).enumerate().filter(|_| !exists) {
        let write = cpb::WriteRequest {
            r#ref: reference.clone(),
            offset: (index * max) as i64,
            data: chunk.to_vec().into(),
        };
        content.write(&write).await?;
    }
    let commit = cpb::CommitRequest {
        r#ref: reference,
        size: data.len() as i64,
        digest: digest.to_string(),
        ..Default::default()
    };
    content.commit(&commit).await?;
    Ok(())
}

/// Calls until the service answers something other than "not running".
async fn wait_until_served<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = berth_bus::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match call().await {
            Ok(reply) => return Ok(reply),
            Err(err) if Instant::now() > deadline => bail!("service not up: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn unpack_request(image: &Image, lease_id: &str) -> spb::UnpackRequest {
    spb::UnpackRequest {
        layers: image.layers.clone(),
        diff_ids: image.diff_ids.clone(),
        lease_id: lease_id.to_string(),
    }
}

fn prepare_request(key: &str, parent: &str) -> spb::PrepareRequest {
    spb::PrepareRequest {
        key: key.to_string(),
        parent: parent.to_string(),
        ..Default::default()
    }
}

/// The snapshot's mounts, mounted on a temporary directory and unmounted
/// when dropped, whether the test passed or not.
struct Mounted {
    target: TempDir,
}

impl Mounted {
    fn new(mounts: &[berth_proto::Mount]) -> Result<Mounted> {
        let mounted = Mounted {
            target: berth_testkit::tempdir("berth-snapshot-mnt-")?,
        };
        for mount in mounts {
            let spec = MountSpec {
                fstype: mount.r#type.clone(),
                source: mount.source.clone(),
                options: mount.options.clone(),
            };
            overlay::mount(&spec, mounted.target.path())
                .with_context(|| format!("mount {spec:?}"))?;
        }
        Ok(mounted)
    }

    fn path(&self, inner: &str) -> PathBuf {
        self.target.path().join(inner.trim_start_matches('/'))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = overlay::unmount(self.target.path());
    }
}

fn sha256_of(path: &Path) -> Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

fn keys(list: &spb::ListReply) -> Vec<String> {
    list.infos.iter().map(|info| info.key.clone()).collect()
}

fn skip_unless_root() -> bool {
    if berth_testkit::is_root() {
        return false;
    }
    eprintln!("skipped: needs root for mounts");
    true
}

/// Unpacking busybox, then layers and opaque (which share its base layer),
/// applies each chain ID once, reuses it after, leases every chain ID,
/// publishes `snapshot.commit` per applied layer, and yields root
/// filesystems with the images' files, on both ways of reading blobs.
#[tokio::test(flavor = "multi_thread")]
async fn unpacks_images_and_mounts_their_root_filesystems() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    for (node, namespace) in [(LOCAL, "local"), (REMOTE, "remote")] {
        let busybox = cluster.import(namespace, "busybox/busybox.oci.tar").await?;
        let layers = cluster.import(namespace, "layers/layers.oci.tar").await?;
        let opaque = cluster.import(namespace, "opaque/opaque.oci.tar").await?;
        cluster.lease(namespace, "import").await?;
        let commits = cluster
            .client
            .nats()
            .subscribe(format!("berth.v1.{namespace}.events.snapshot.commit"))
            .await?;

        let snapshot = cluster.snapshot(namespace, node);
        let mut chains = Vec::new();
        for (image, applied) in [(&busybox, 1), (&layers, 5), (&opaque, 2)] {
            let reply = snapshot.unpack(&unpack_request(image, "import")).await?;
            assert_eq!(reply.applied, applied, "{node}");
            chains.push(reply.chain_id);
        }
        let again = snapshot.unpack(&unpack_request(&layers, "")).await?;
        assert_eq!((again.applied, &again.chain_id), (0, &chains[1]), "{node}");

        // Eight layers were applied: eight commit events, in the namespace.
        let events = tokio::time::timeout(Duration::from_secs(10), commits.take(8).collect());
        let events: Vec<_> = events.await.context("eight snapshot.commit events")?;
        let payloads: HashSet<String> = events
            .iter()
            .map(|message| Envelope::decode(message.payload.clone()))
            .map(|envelope| {
                spb::SnapshotEvent::decode(envelope.unwrap().payload)
                    .unwrap()
                    .key
            })
            .collect();
        assert_eq!(payloads.len(), 8, "{node}");
        assert!(payloads.contains(&chains[2]), "{node}");

        let leases = cluster
            .metadata(namespace)
            .list_leases(&Default::default())
            .await?;
        let resources = &leases.leases[0].resources;
        for chain_id in &chains {
            let resource = format!("snapshot/{node}/{chain_id}");
            assert!(resources.contains(&resource), "{resource} in {resources:?}");
        }

        // Each image's root filesystem, through a container snapshot.
        let rootfs = |key: &str, parent: &str| {
            let snapshot = snapshot.clone();
            let request = prepare_request(key, parent);
            async move { Mounted::new(&snapshot.prepare(&request).await?.mounts) }
        };
        let root = rootfs("c-busybox", &chains[0]).await?;
        let busybox_bin = std::fs::metadata(root.path("/bin/busybox"))?;
        assert_eq!(busybox_bin.len(), 1982256, "{node}");
        assert!(std::fs::symlink_metadata(root.path("/bin/sh"))?.is_symlink());
        drop(root);

        let root = rootfs("c-layers", &chains[1]).await?;
        assert_eq!(
            sha256_of(&root.path("/data/hello.txt"))?,
            "6c96e564481702b24e6660004a55f00f119c5c0b32b7a55ff52d68f400a6a1b8"
        );
        assert!(
            !root.path("/data/deleted-dir").exists(),
            "whiteout on {node}"
        );
        drop(root);

        let root = rootfs("c-opaque", &chains[2]).await?;
        assert!(
            !root.path("/data/opaque/old-1.txt").exists(),
            "opaque dir on {node}"
        );
        assert!(root.path("/data/opaque/new.txt").exists());
        assert!(root.path("/data/kept.txt").exists());
        assert!(!root.path("/data/deleted.txt").exists());
        drop(root);
    }
    Ok(())
}

/// Two unpacks of the same image at once both succeed with the same chain
/// ID, and each layer is applied once between them.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_unpacks_apply_each_layer_once() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let image = cluster.import("race", "layers/layers.oci.tar").await?;
    let snapshot = cluster.snapshot("race", REMOTE);
    let request = unpack_request(&image, "");
    let (first, second) = tokio::join!(snapshot.unpack(&request), snapshot.unpack(&request));
    let (first, second) = (first?, second?);
    assert_eq!(first.chain_id, second.chain_id);
    assert_eq!(first.applied + second.applied, 6);

    let list = snapshot.list(&Default::default()).await?;
    assert_eq!(list.infos.len(), 6, "{:?}", keys(&list));
    let committed = spb::Kind::Committed as i32;
    assert!(list.infos.iter().all(|info| info.kind == committed));
    assert_eq!(cluster.snapshot_dirs(REMOTE)?, 6);
    Ok(())
}

/// A wrong diff ID, a media type that is no layer, bytes that are no
/// gzip, a blob the namespace never provided and a blob whose bytes changed
/// on disk are each refused with a typed error, and leave no record and no
/// directory besides the committed layers below them.
#[tokio::test(flavor = "multi_thread")]
async fn bad_layers_are_refused_and_leave_nothing_behind() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let busybox = cluster.import("bad", "busybox/busybox.oci.tar").await?;
    let opaque = cluster.import("bad", "opaque/opaque.oci.tar").await?;
    let foreign = cluster.import("other", "layers/layers.oci.tar").await?;

    // The top layer of opaque changes on disk: another gzip header time,
    // so it still inflates to the same tar stream, at the same size.
    let tampered = &opaque.layers[2];
    let blob = cluster
        .content_root()
        .join("blobs/sha256")
        .join(&tampered.digest[7..]);
    let mut bytes = std::fs::read(&blob)?;
    bytes[4..8].copy_from_slice(&[1, 2, 3, 4]);
    std::fs::write(&blob, bytes)?;

    let mut config_as_layer = busybox.config.clone();
    config_as_layer.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let mut config_media_type = busybox.layers[0].clone();
    config_media_type.media_type = busybox.config.media_type.clone();
    let cases = [
        (
            "wrong diff id",
            vec![busybox.layers[0].clone()],
            vec![opaque.diff_ids[1].clone()],
            Code::InvalidArgument,
            "diff id",
        ),
        (
            "not a layer type",
            vec![config_media_type],
            busybox.diff_ids.clone(),
            Code::InvalidArgument,
            "media type",
        ),
        (
            "not gzip",
            vec![config_as_layer],
            busybox.diff_ids.clone(),
            Code::InvalidArgument,
            "gzip",
        ),
        (
            "foreign blob",
            vec![foreign.layers[1].clone()],
            vec![foreign.diff_ids[1].clone()],
            Code::NotFound,
            "not found",
        ),
        (
            "changed on disk",
            opaque.layers.clone(),
            opaque.diff_ids.clone(),
            Code::InvalidArgument,
            "does not match",
        ),
        (
            "count",
            busybox.layers.clone(),
            vec![],
            Code::InvalidArgument,
            "diff ids",
        ),
    ];
    for node in [LOCAL, REMOTE] {
        let snapshot = cluster.snapshot("bad", node);
        for (name, layers, diff_ids, code, text) in cases.clone() {
            let request = spb::UnpackRequest {
                layers,
                diff_ids,
                lease_id: String::new(),
            };
            let err = snapshot.unpack(&request).await.unwrap_err();
            assert_eq!(err.code, code, "{name} on {node}: {err}");
            assert!(err.message.contains(text), "{name} on {node}: {err}");
        }

        // Only the two good layers below the changed one were committed.
        let list = snapshot.list(&Default::default()).await?;
        let committed = spb::Kind::Committed as i32;
        assert_eq!(list.infos.len(), 2, "{node}: {:?}", keys(&list));
        assert!(list.infos.iter().all(|info| info.kind == committed));
        assert_eq!(cluster.snapshot_dirs(node)?, 2, "{node}");
    }
    Ok(())
}

/// A committed layer with children cannot be removed; gc's conditional
/// remove and prune keep what was touched since the epoch and what is live
/// (with its parents), remove the rest children first, and take directories
/// no record owns with them.
#[tokio::test(flavor = "multi_thread")]
async fn remove_and_prune_follow_parents_epochs_and_live_sets() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let image = cluster.import("sweep", "layers/layers.oci.tar").await?;
    let snapshot = cluster.snapshot("sweep", LOCAL);
    let top = snapshot.unpack(&unpack_request(&image, "")).await?.chain_id;
    snapshot.prepare(&prepare_request("c1", &top)).await?;
    let stat = spb::StatRequest { key: top.clone() };
    let info = snapshot.stat(&stat).await?.info.unwrap_or_default();
    assert_eq!(info.kind, spb::Kind::Committed as i32);
    assert!(!info.parent.is_empty(), "the top layer has a parent");

    let remove = |key: &str, unless_touched_since| spb::RemoveRequest {
        key: key.to_string(),
        unless_touched_since,
    };
    let err = snapshot.remove(&remove(&top, 0)).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert!(
        !snapshot.remove(&remove("c1", 1)).await?.removed,
        "touched after the epoch"
    );
    let err = snapshot.remove(&remove("missing", 0)).await.unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");

    let orphan = cluster.snapshot_root(LOCAL).join("snapshots/99999/fs");
    std::fs::create_dir_all(&orphan)?;
    std::fs::write(orphan.join("left.txt"), "left behind")?;
    let prune = |live: &[&str], epoch, dry_run| spb::PruneRequest {
        live: live.iter().map(|key| key.to_string()).collect(),
        unless_touched_since: epoch,
        dry_run,
    };
    let now = || berth_proto::Timestamp::now().unix_nanos as u64;

    // Live container: its chain stays; the orphan goes.
    let kept = snapshot.prune(&prune(&["c1"], now(), false)).await?;
    assert!(kept.removed.is_empty(), "{:?}", kept.removed);
    assert!(!orphan.exists());

    // An old epoch keeps everything touched since.
    let kept = snapshot.prune(&prune(&[], 1, false)).await?;
    assert!(kept.removed.is_empty(), "{:?}", kept.removed);

    let epoch = now();
    let planned = snapshot.prune(&prune(&[], epoch, true)).await?;
    assert_eq!(planned.removed.len(), 7);
    assert_eq!(snapshot.list(&Default::default()).await?.infos.len(), 7);
    let pruned = snapshot.prune(&prune(&[], epoch, false)).await?;
    assert_eq!(pruned.removed, planned.removed);
    assert_eq!(pruned.removed[0], "c1", "children first");
    assert_eq!(pruned.removed[6], image.diff_ids[0], "the base last");
    assert!(pruned.freed_bytes > 1_000_000, "{}", pruned.freed_bytes);
    assert!(snapshot.list(&Default::default()).await?.infos.is_empty());
    assert_eq!(cluster.snapshot_dirs(LOCAL)?, 0);
    Ok(())
}

/// An active snapshot written through its mount and committed under a name
/// shows its file in a read-only view on it; labels update by mask; keys
/// are checked; a retried prepare returns its first reply.
#[tokio::test(flavor = "multi_thread")]
async fn commit_view_update_and_usage_over_the_bus() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let image = cluster.import("work", "busybox/busybox.oci.tar").await?;
    let snapshot = cluster.snapshot("work", LOCAL);
    let base = snapshot.unpack(&unpack_request(&image, "")).await?.chain_id;

    // A retry under one request id: one snapshot, the same mounts.
    let subject = berth_bus::subject::node_op("work", "snapshot", LOCAL, "prepare")?;
    let request = prepare_request("work", &base);
    let first: spb::PrepareReply = cluster
        .client
        .call_mut(&subject, &request, "retry-1")
        .await?;
    let retried: spb::PrepareReply = cluster
        .client
        .call_mut(&subject, &request, "retry-1")
        .await?;
    assert_eq!(first, retried);
    let err = snapshot.prepare(&request).await.unwrap_err();
    assert_eq!(err.code, Code::AlreadyExists, "{err}");

    {
        let root = Mounted::new(&first.mounts)?;
        std::fs::write(root.path("/hello.txt"), "hi")?;
        assert!(root.path("/bin/busybox").exists());
    }
    let mut labels = std::collections::HashMap::new();
    labels.insert("a".to_string(), "1".to_string());
    let commit = spb::CommitRequest {
        name: "mine".into(),
        key: "work".into(),
        labels,
    };
    snapshot.commit(&commit).await?;
    let err = snapshot.commit(&commit).await.unwrap_err();
    assert_eq!(err.code, Code::AlreadyExists, "{err}");
    let err = snapshot
        .commit(&spb::CommitRequest {
            name: "other".into(),
            ..commit
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");
    let err = snapshot
        .mounts(&spb::MountsRequest { key: "mine".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");

    let view = spb::ViewRequest {
        key: "look".into(),
        parent: "mine".into(),
        ..Default::default()
    };
    let mounts = snapshot.view(&view).await?.mounts;
    assert_eq!(
        mounts,
        snapshot
            .mounts(&spb::MountsRequest { key: "look".into() })
            .await?
            .mounts
    );
    {
        let root = Mounted::new(&mounts)?;
        assert_eq!(std::fs::read_to_string(root.path("/hello.txt"))?, "hi");
        assert!(root.path("/bin/busybox").exists());
        assert!(
            std::fs::write(root.path("/other.txt"), "no").is_err(),
            "a view is read-only"
        );
    }

    let mut labels = std::collections::HashMap::new();
    labels.insert("b".to_string(), "2".to_string());
    let update = spb::UpdateRequest {
        key: "mine".into(),
        labels,
        field_mask: vec!["labels.b".into()],
    };
    let subject = berth_bus::subject::node_op("work", "snapshot", LOCAL, "update")?;
    let updated: spb::UpdateReply = cluster
        .client
        .call_mut(&subject, &update, "update-1")
        .await?;
    let info = updated.info.unwrap_or_default();
    assert_eq!(info.labels.len(), 2, "{:?}", info.labels);
    assert_eq!(info.kind, spb::Kind::Committed as i32);
    assert_eq!(info.parent, base);
    let selector = [("b".to_string(), "2".to_string())].into_iter().collect();
    let selected = snapshot
        .list(&spb::ListRequest {
            label_selector: selector,
        })
        .await?;
    assert_eq!(keys(&selected), ["mine"]);

    let usage = snapshot
        .usage(&spb::UsageRequest { key: "mine".into() })
        .await?;
    assert!(usage.size > 0 && usage.inodes >= 2, "{usage:?}");
    let base_usage = snapshot
        .usage(&spb::UsageRequest { key: base.clone() })
        .await?;
    assert!(base_usage.size > 1_000_000, "{base_usage:?}");

    for key in ["", "a/b", "extract-1"] {
        let err = snapshot
            .prepare(&prepare_request(key, &base))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{key:?}: {err}");
    }
    let err = snapshot
        .prepare(&prepare_request("x", "missing"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");
    let err = snapshot
        .prepare(&prepare_request("x", "look"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    Ok(())
}

/// What a crash mid-unpack leaves, a temporary snapshot's record and
/// directory and a directory no record owns, is gone once the service
/// starts again on the same root.
#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_a_crash_are_removed_at_start() -> Result<()> {
    if skip_unless_root() {
        return Ok(());
    }
    let cluster = Cluster::start().await?;
    let node = "node-crashed";
    let root = cluster.snapshot_root(node);
    let extract_dir = {
        let store = Store::open(&root, node)?;
        let id = store.alloc_id()?;
        store.make_dirs(id, &[])?;
        let record = Record::new(id, Kind::Active, "", Default::default(), 1);
        let mut txn = store.env.write_txn()?;
        store.insert(&mut txn, "default", "extract-crashed", &record)?;
        txn.commit()?;
        std::fs::create_dir_all(root.join("snapshots/4242/fs"))?;
        store.dir(id)
    };
    assert!(extract_dir.exists());

    cluster.start_snapshot(node, false).await?;
    let list = cluster
        .snapshot("default", node)
        .list(&Default::default())
        .await?;
    assert!(list.infos.is_empty(), "{:?}", keys(&list));
    assert!(!extract_dir.exists());
    assert_eq!(cluster.snapshot_dirs(node)?, 0);
    Ok(())
}
