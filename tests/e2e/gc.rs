//! Garbage collection on a real node: what no root reaches leaves the disk,
//! what a root reaches (an image, a container, a lease) or an import just
//! reused never does, and `explain` says which root keeps what. Real
//! berthd, runc, nats-server and images. Needs root, runc and nats-server.
//!
//! The tests run one at a time: they share the host's cgroup tree and its
//! two cores. The benchmark at the end is ignored unless asked for (see
//! `docs/benchmarks/gc.md`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest as _, Sha256};
use tokio::runtime::Runtime;

use berth_bus::api::{Content, Gc, Metadata, Snapshot};
use berth_bus::{Client, Code};
use berth_proto::{content as cpb, gc as gpb, metadata as mpb, snapshot as spb};
use berth_tests::{berth_cgroups, fixture, serial, wait_until, Node};

const BUSYBOX: &str = "busybox/busybox.oci.tar";
const LAYERS: &str = "layers/layers.oci.tar";
const OPAQUE: &str = "opaque/opaque.oci.tar";

const BUSYBOX_NAME: &str = "docker.io/library/busybox:latest";
const BUSYBOX_MANIFEST: &str =
    "sha256:91cd2d477823893e647722a7bbb54835693458bd0e91d8b7daa8c7118bd8f57a";
const BUSYBOX_CONFIG: &str =
    "sha256:c61bf6ac9b93b0cdbedf841171164dbc9e0e8a49689f06ddaf821362f09b714d";
/// busybox's only layer, and the base layer of `layers`.
const BASE_LAYER: &str = "sha256:7ac49a7f8968043e1e30b4fb08cb7d9e2662b55d4993a6ea25c6a4de2ce94503";
/// The chain ID of that base layer, which `opaque` shares with a blob of its own.
const BASE_CHAIN_ID: &str =
    "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";
/// `opaque`'s base layer: other compressed bytes, the same diff ID.
const OPAQUE_BASE_LAYER: &str =
    "sha256:d87231b7d5254c6624c4e5b52251a9ccb7c975247465281139f30c52f24a7ee9";

/// A container id no other test on this host uses (cgroups are host-wide).
fn container(name: &str) -> String {
    format!("gc-{}-{name}", std::process::id())
}

/// Calls to the node's services through the typed clients.
struct Api {
    runtime: Runtime,
    client: Client,
    node: String,
}

impl Api {
    fn new(node: &Node) -> Result<Api> {
        let runtime = Runtime::new()?;
        let client = runtime.block_on(node.client())?;
        Ok(Api {
            runtime,
            client,
            node: node.node.clone(),
        })
    }

    fn content(&self) -> Content {
        Content {
            client: self.client.clone(),
            namespace: "default".into(),
        }
    }

    fn gc(&self) -> Gc {
        Gc {
            client: self.client.clone(),
            namespace: "default".into(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            client: self.client.clone(),
            namespace: "default".into(),
            node: self.node.clone(),
        }
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            client: self.client.clone(),
            namespace: "default".into(),
        }
    }

    /// Whether the namespace holds blob `digest`.
    fn holds_blob(&self, digest: &str) -> Result<bool> {
        let request = cpb::InfoRequest {
            digest: digest.into(),
        };
        match self.runtime.block_on(self.content().info(&request)) {
            Ok(_) => Ok(true),
            Err(err) if err.code == Code::NotFound => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Whether the node has snapshot `key` in the namespace.
    fn has_snapshot(&self, key: &str) -> Result<bool> {
        let request = spb::StatRequest { key: key.into() };
        match self.runtime.block_on(self.snapshot().stat(&request)) {
            Ok(_) => Ok(true),
            Err(err) if err.code == Code::NotFound => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// `gc.explain` of `object`, on every node.
    fn explain(&self, object: &str) -> Result<gpb::ExplainReply> {
        Ok(self.explain_on(object, "")?)
    }

    fn explain_on(&self, object: &str, node: &str) -> berth_bus::Result<gpb::ExplainReply> {
        let request = gpb::ExplainRequest {
            object: object.into(),
            node: node.into(),
        };
        self.runtime.block_on(self.gc().explain(&request))
    }

    /// Commits `data` as a blob in one write, attached to `lease_id` if any.
    fn commit(&self, data: &[u8], lease_id: &str) -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let content = self.content();
        let reference = format!("e2e-{}", &digest[7..19]);
        self.runtime.block_on(async {
            let open = cpb::OpenRequest {
                r#ref: reference.clone(),
                expected_digest: digest.clone(),
                expected_size: data.len() as i64,
                lease_id: lease_id.into(),
            };
            content.open(&open).await?;
            let write = cpb::WriteRequest {
                r#ref: reference.clone(),
                offset: 0,
                data: data.to_vec().into(),
            };
            content.write(&write).await?;
            let commit = cpb::CommitRequest {
                r#ref: reference,
                size: data.len() as i64,
                digest: digest.clone(),
                lease_id: lease_id.into(),
                ..Default::default()
            };
            content.commit(&commit).await?;
            Ok::<_, berth_bus::Error>(())
        })?;
        Ok(digest)
    }
}

/// The file of a blob in the node's content store.
fn blob_file(node: &Node, digest: &str) -> PathBuf {
    node.root()
        .join("content/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Every snapshot directory on the node.
fn snapshot_dirs(node: &Node) -> Vec<PathBuf> {
    let dir = node.root().join("snapshot/snapshots");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    dirs.sort();
    dirs
}

fn import(node: &Node, archive: &str) -> Result<String> {
    let path = fixture::image(archive);
    node.berth_ok(&["image", "import", path.to_str().context("fixture path")?])
}

/// Runs `berth run --rm IMAGE` and checks the image's own output.
fn runs_as_expected(node: &Node, image: &str) -> Result<()> {
    let expected =
        std::fs::read_to_string(fixture::image(&format!("{image}/expected-output.txt")))?;
    let output = node.berth(&["run", "--rm", image])?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout) == expected,
        "berth run --rm {image} exited with {}:\n{}\n{}\nberthd log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        node.log()
    );
    Ok(())
}

/// Nothing of any image or container is left on the node: no blob, no
/// snapshot directory, no ingest, no mount, no task process or file, and no
/// cgroup of `containers`.
fn assert_nothing_left(node: &Node, containers: &[String]) -> Result<()> {
    let blobs = Node::files_under(&node.root().join("content/blobs"));
    ensure!(blobs.is_empty(), "blobs left: {blobs:?}");
    let ingests = Node::files_under(&node.root().join("content/ingest"));
    ensure!(ingests.is_empty(), "ingests left: {ingests:?}");
    let snapshots = snapshot_dirs(node);
    ensure!(
        snapshots.is_empty(),
        "snapshot directories left: {snapshots:?}"
    );
    ensure!(node.mounts().is_empty(), "mounts left: {:?}", node.mounts());
    ensure!(node.node_processes().is_empty(), "task processes left");
    let task_files = Node::files_under(&node.state().join("task"));
    ensure!(task_files.is_empty(), "task files left: {task_files:?}");
    for container_id in containers {
        let cgroups = berth_cgroups("default", container_id);
        ensure!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    }
    Ok(())
}

/// Whether a container's task runs, by `berth ps`.
fn is_running(node: &Node, container_id: &str) -> bool {
    node.berth_ok(&["ps", "--json"])
        .map(|out| out.contains(container_id) && out.contains("running"))
        .unwrap_or(false)
}

/// After every container and image is removed, one `berth gc` leaves the
/// content and snapshot stores empty, nothing mounted, and no cgroup of
/// any of the containers, whether they ran with `--rm`, exited and were
/// removed, or were killed by `rm -f`.
#[test]
fn removing_everything_leaves_nothing() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    for archive in [BUSYBOX, LAYERS, OPAQUE] {
        import(&node, archive)?;
    }

    let (gone, exited, running) = (container("rm"), container("exited"), container("running"));
    node.berth_ok(&["run", "--rm", "--name", &gone, "layers"])?;
    node.berth_ok(&["run", "--name", &exited, "opaque"])?;
    node.berth_ok(&["run", "-d", "--name", &running, "busybox", "sleep", "600"])?;
    ensure!(
        wait_until(Duration::from_secs(10), || is_running(&node, &running)),
        "{running} not running"
    );
    // The check below sees runc's cgroups: the running container has them.
    ensure!(
        !berth_cgroups("default", &running).is_empty(),
        "no cgroup seen"
    );

    node.berth_ok(&["rm", &exited])?;
    node.berth_ok(&["rm", "-f", &running])?;
    node.berth_ok(&["image", "rm", "busybox", "layers", "opaque"])?;
    node.berth_ok(&["gc"])?;
    assert_nothing_left(&node, &[gone, exited, running])
}

/// Two images sharing a base layer: removing one keeps the shared blob and
/// snapshot, and the other still runs; removing the other frees them. An
/// image that shares only the chain ID (other compressed bytes of the same
/// layer) keeps the snapshot but not the first image's blob.
#[test]
fn shared_layers_stay_until_the_last_image_goes() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    let api = Api::new(&node)?;
    import(&node, BUSYBOX)?;
    import(&node, LAYERS)?;

    // busybox goes: its manifest and config with it, its layer stays for
    // `layers`, and so does the base snapshot.
    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    for digest in [BUSYBOX_MANIFEST, BUSYBOX_CONFIG] {
        ensure!(!blob_file(&node, digest).exists(), "{digest} kept");
    }
    ensure!(
        blob_file(&node, BASE_LAYER).exists(),
        "shared layer removed"
    );
    ensure!(api.has_snapshot(BASE_CHAIN_ID)?, "shared snapshot removed");
    runs_as_expected(&node, "layers")?;

    // `layers` goes too: nothing is left.
    node.berth_ok(&["image", "rm", "layers"])?;
    node.berth_ok(&["gc"])?;
    assert_nothing_left(&node, &[])?;

    // The same chain ID from other bytes: the snapshot is shared, the blob is not.
    import(&node, BUSYBOX)?;
    import(&node, OPAQUE)?;
    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    ensure!(
        !blob_file(&node, BASE_LAYER).exists(),
        "busybox's layer kept"
    );
    ensure!(
        blob_file(&node, OPAQUE_BASE_LAYER).exists(),
        "opaque's layer removed"
    );
    ensure!(api.has_snapshot(BASE_CHAIN_ID)?, "shared snapshot removed");
    runs_as_expected(&node, "opaque")?;
    node.berth_ok(&["image", "rm", "opaque"])?;
    node.berth_ok(&["gc"])?;
    assert_nothing_left(&node, &[])
}

/// A running container keeps its snapshot (with what it wrote) and its
/// image's content after the image's name is removed and gc runs; once the
/// container is removed, gc frees all of it.
#[test]
fn running_container_keeps_its_image_and_snapshot() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    let api = Api::new(&node)?;
    import(&node, BUSYBOX)?;
    let c = container("c");
    let script = "echo kept > /marker; echo started; sleep 600";
    node.berth_ok(&["run", "-d", "--name", &c, "busybox", "sh", "-c", script])?;
    let started = wait_until(Duration::from_secs(10), || {
        node.berth_ok(&["logs", &c])
            .map(|out| out.contains("started"))
            .unwrap_or(false)
    });
    ensure!(started, "{c} did not start:\n{}", node.log());

    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    for digest in [BUSYBOX_MANIFEST, BUSYBOX_CONFIG, BASE_LAYER] {
        ensure!(blob_file(&node, digest).exists(), "{digest} removed");
    }
    ensure!(api.has_snapshot(&c)?, "container snapshot removed");
    ensure!(api.has_snapshot(BASE_CHAIN_ID)?, "its parent removed");
    ensure!(is_running(&node, &c), "{c} stopped");
    ensure!(node.berth_ok(&["logs", &c])?.contains("started"));
    let marker = node
        .mounts()
        .into_iter()
        .map(|point| Path::new(&point).join("marker"))
        .find(|path| path.exists())
        .context("no mounted rootfs holds /marker")?;
    ensure!(std::fs::read_to_string(marker)? == "kept\n");

    node.berth_ok(&["rm", "-f", &c])?;
    node.berth_ok(&["gc"])?;
    assert_nothing_left(&node, &[c])
}

/// Race: one loop removes and re-imports busybox while another runs gc
/// every 20 ms, and the triggers run it too. After every import the
/// image's blobs and snapshot are all there, gc did remove them between
/// rounds, and at the end both busybox and `layers` (which shares its base
/// layer and stays imported throughout) still run. An import content
/// refuses is retried once and counted (see the comment in the loop).
#[test]
fn reimport_racing_gc_loses_nothing() -> Result<()> {
    const ROUNDS: usize = 300;
    const TIME_LIMIT: Duration = Duration::from_secs(45);
    let _serial = serial();
    let node = Node::start()?;
    let api = Api::new(&node)?;
    import(&node, LAYERS)?;
    import(&node, BUSYBOX)?;

    // The gc loop, on the test's runtime while this thread drives the CLI.
    let stop = Arc::new(AtomicBool::new(false));
    let (runs, removed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let collector = {
        let (gc, stop, runs, removed) = (api.gc(), stop.clone(), runs.clone(), removed.clone());
        api.runtime.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let done = gc.run(&gpb::RunRequest { dry_run: false }).await?;
                runs.fetch_add(1, Ordering::SeqCst);
                let blobs: usize = done.namespaces.iter().map(|ns| ns.blobs.len()).sum();
                removed.fetch_add(blobs as u64, Ordering::SeqCst);
                // Runs back to back would starve the importing loop of
                // the host's two cores.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, berth_bus::Error>(())
        })
    };

    let started = Instant::now();
    let (mut rounds, mut refused) = (0, 0);
    while rounds < ROUNDS && started.elapsed() < TIME_LIMIT {
        node.berth_ok(&["image", "rm", "busybox"])?;
        if let Err(err) = import(&node, BUSYBOX) {
            // Content refuses, with `NotFound`, a commit that found the
            // blob held at `open` but collected before the commit: nothing
            // was acknowledged, and a second import writes the bytes again.
            let message = format!("{err:#}");
            ensure!(
                message.contains("refused") && message.contains("not found"),
                "import in round {rounds}: {message}"
            );
            refused += 1;
            import(&node, BUSYBOX).with_context(|| format!("import again in round {rounds}"))?;
        }
        for digest in [BUSYBOX_MANIFEST, BUSYBOX_CONFIG, BASE_LAYER] {
            ensure!(api.holds_blob(digest)?, "round {rounds}: {digest} lost");
            ensure!(
                blob_file(&node, digest).exists(),
                "round {rounds}: file of {digest} lost"
            );
        }
        ensure!(
            api.has_snapshot(BASE_CHAIN_ID)?,
            "round {rounds}: snapshot lost"
        );
        rounds += 1;
    }
    stop.store(true, Ordering::SeqCst);
    api.runtime.block_on(collector)??;

    let (runs, removed) = (runs.load(Ordering::SeqCst), removed.load(Ordering::SeqCst));
    eprintln!(
        "{rounds} rounds in {:?}: {runs} gc runs, {removed} blobs removed, {refused} imports refused",
        started.elapsed()
    );
    ensure!(rounds >= 100, "only {rounds} rounds in {TIME_LIMIT:?}");
    ensure!(removed > 0, "gc never removed anything: no race was run");
    runs_as_expected(&node, "busybox")?;
    runs_as_expected(&node, "layers")
}

/// `explain` names the root that keeps a blob or snapshot (an image, then
/// a container once the image is gone), says that an unreferenced blob goes
/// at the next run, and that what is gone is unknown; a node that does not
/// answer is an error only when named.
#[test]
fn explain_says_what_keeps_what() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    let api = Api::new(&node)?;
    import(&node, BUSYBOX)?;
    let c = container("c");
    node.berth_ok(&["run", "-d", "--name", &c, "busybox", "sleep", "600"])?;

    // A kept blob, through the image.
    let layer = api.explain(BASE_LAYER)?;
    ensure!(layer.explanations.len() == 1, "{layer:?}");
    let blob = &layer.explanations[0];
    ensure!(blob.kind() == gpb::ObjectKind::Blob && blob.verdict() == gpb::Verdict::Kept);
    let expected =
        format!("kept: image {BUSYBOX_NAME} -> manifest {BUSYBOX_MANIFEST} -> layer {BASE_LAYER}");
    ensure!(blob.reason == expected, "{}", blob.reason);
    let kinds: Vec<gpb::StepKind> = blob.path.iter().map(|step| step.kind()).collect();
    use gpb::StepKind as K;
    ensure!(kinds == [K::Image, K::Manifest, K::Layer], "{kinds:?}");

    // Kept snapshots: the base layer through the image, the container's own.
    let base = api.explain(BASE_CHAIN_ID)?;
    ensure!(base.explanations.len() == 1, "{base:?}");
    let snapshot = &base.explanations[0];
    ensure!(snapshot.kind() == gpb::ObjectKind::Snapshot && snapshot.node == node.node);
    let expected = format!(
        "kept on node {}: image {BUSYBOX_NAME} -> snapshot {BASE_CHAIN_ID}",
        node.node
    );
    ensure!(snapshot.reason == expected, "{}", snapshot.reason);
    let own = api.explain(&c)?;
    let expected = format!("kept on node {}: container {c} -> snapshot {c}", node.node);
    ensure!(own.explanations[0].reason == expected, "{own:?}");

    // With the image gone, the container keeps both.
    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    let layer = api.explain(BASE_LAYER)?;
    let expected =
        format!("kept: container {c} -> manifest {BUSYBOX_MANIFEST} -> layer {BASE_LAYER}");
    ensure!(layer.explanations[0].reason == expected, "{layer:?}");
    let base = api.explain_on(BASE_CHAIN_ID, &node.node)?;
    let expected = format!(
        "kept on node {}: container {c} -> snapshot {c} -> parent {BASE_CHAIN_ID}",
        node.node
    );
    ensure!(base.explanations[0].reason == expected, "{base:?}");

    // An unreferenced blob goes at the next run; after it, it is unknown.
    let stray = api.commit(b"no image refers to this blob\n", "")?;
    let unreferenced = api.explain(&stray)?;
    ensure!(
        unreferenced.explanations[0].verdict() == gpb::Verdict::Unreferenced,
        "{unreferenced:?}"
    );
    let dry = node.berth_ok(&["gc", "--dry-run"])?;
    ensure!(dry.contains(&stray), "dry run does not name {stray}: {dry}");
    node.berth_ok(&["gc"])?;
    let gone = api.explain(&stray)?;
    let unknown = &gone.explanations[0];
    ensure!(unknown.verdict() == gpb::Verdict::Unknown, "{gone:?}");
    ensure!(unknown.kind() == gpb::ObjectKind::Unspecified, "{gone:?}");
    ensure!(api.explain("no-such-snapshot")?.explanations[0].verdict() == gpb::Verdict::Unknown);

    // Malformed requests and a node that is not there.
    let err = api.explain_on("", "").unwrap_err();
    ensure!(err.code == Code::InvalidArgument, "{err}");
    let err = api.explain_on(&c, "no-such-node").unwrap_err();
    ensure!(err.code == Code::Unavailable, "{err}");

    node.berth_ok(&["rm", "-f", &c])?;
    node.berth_ok(&["gc"])?;
    assert_nothing_left(&node, &[c])
}

/// A lease keeps what it holds; when it expires, an idle daemon collects
/// it without being asked.
#[test]
fn expired_lease_is_collected_by_an_idle_daemon() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    let api = Api::new(&node)?;
    let expires = berth_proto::Timestamp {
        unix_nanos: berth_proto::Timestamp::now().unix_nanos + 2_000_000_000,
    };
    let request = mpb::CreateLeaseRequest {
        lease: Some(mpb::Lease {
            expires_at: Some(expires),
            ..Default::default()
        }),
    };
    let lease = api
        .runtime
        .block_on(api.metadata().create_lease(&request))?;
    let lease_id = lease.lease.context("no lease")?.lease_id;
    let blob = api.commit(b"held by a lease that expires\n", &lease_id)?;

    node.berth_ok(&["gc"])?;
    ensure!(blob_file(&node, &blob).exists(), "leased blob removed");
    let why = api.explain(&blob)?;
    let expected = format!("kept: lease {lease_id} -> blob {blob}");
    ensure!(why.explanations[0].reason == expected, "{why:?}");

    // No request from here on: the expiry event alone triggers the run.
    let gone = wait_until(Duration::from_secs(10), || {
        !blob_file(&node, &blob).exists()
    });
    ensure!(
        gone,
        "blob still there after its lease expired:\n{}",
        node.log()
    );
    Ok(())
}

/// Benchmark, not a test: from the reply to `image rm` until the image's
/// blobs and snapshots are gone from disk, with gc triggered by the
/// deletion event alone, beside containerd when it is installed. Run with
/// `cargo test -p berth-tests --test gc -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_image_removed_to_space_reclaimed() -> Result<()> {
    const ROUNDS: usize = 15;
    let _serial = serial();
    let node = Node::start()?;
    let containerd = match Containerd::start() {
        Ok(containerd) => Some(containerd),
        Err(err) => {
            eprintln!("containerd left out: {err:#}");
            None
        }
    };

    let (mut berth, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        berth.push(berth_reclaim(&node)?);
        if let Some(containerd) = &containerd {
            theirs.push(containerd.reclaim()?);
        }
        eprintln!(
            "round {round}: berth {:?} containerd {:?}",
            berth.last(),
            theirs.last()
        );
    }
    report("berth", &mut berth);
    let mut runs = sweep_durations(&node.log());
    if !runs.is_empty() {
        report("berth gc runs that removed busybox", &mut runs);
    }
    if !theirs.is_empty() {
        report("containerd", &mut theirs);
        eprintln!("ratio of medians: {:.2}", median(&berth) / median(&theirs));
    }
    Ok(())
}

/// One berth round: import busybox, remove it, wait until its files go.
fn berth_reclaim(node: &Node) -> Result<f64> {
    import(node, BUSYBOX)?;
    let files: Vec<PathBuf> = [BUSYBOX_MANIFEST, BUSYBOX_CONFIG, BASE_LAYER]
        .iter()
        .map(|digest| blob_file(node, digest))
        .collect();
    ensure!(files.iter().all(|f| f.exists()) && !snapshot_dirs(node).is_empty());
    // Let the import's own lease delete trigger and finish its run first.
    std::thread::sleep(Duration::from_millis(300));

    node.berth_ok(&["image", "rm", "busybox"])?;
    let replied = Instant::now();
    wait_gone(replied, || {
        files.iter().all(|f| !f.exists()) && snapshot_dirs(node).is_empty()
    })
}

/// The durations, in seconds, of the runs in berthd's log that removed
/// busybox's three blobs.
fn sweep_durations(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|line| line.contains("gc sweep done") && line.contains(" blobs=3 "))
        .filter_map(|line| line.split(" duration_micros=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map(|micros| micros / 1e6)
        .collect()
}

/// Polls every 200 µs until `gone`, for at most 10 s; returns the seconds.
fn wait_gone(since: Instant, mut gone: impl FnMut() -> bool) -> Result<f64> {
    while !gone() {
        if since.elapsed() > Duration::from_secs(10) {
            bail!("not reclaimed after 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(since.elapsed().as_secs_f64())
}

fn median(figures: &[f64]) -> f64 {
    let mut sorted = figures.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn report(name: &str, figures: &mut [f64]) {
    figures.sort_by(f64::total_cmp);
    let ms = |s: f64| s * 1000.0;
    eprintln!(
        "{name}: median {:.1} ms, min {:.1} ms, max {:.1} ms over {} rounds",
        ms(median(figures)),
        ms(figures[0]),
        ms(figures[figures.len() - 1]),
        figures.len()
    );
}

/// A private containerd: its own root, state and socket in a temporary
/// directory, killed on drop.
struct Containerd {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-containerd-")
            .tempdir()?;
        let config = dir.path().join("config.toml");
        let d = dir.path().display();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
            ),
        )?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("containerd.log"))?)
            .spawn()
            .context("start containerd")?;
        let this = Containerd { child, dir };
        let up = wait_until(Duration::from_secs(20), || this.ctr(&["version"]).is_ok());
        ensure!(up, "containerd did not answer");
        Ok(this)
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        let socket = self.dir.path().join("containerd.sock");
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "bench"])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// One round: import busybox, remove it, wait until its blobs and
    /// snapshots go (containerd's own gc scheduler, defaults).
    fn reclaim(&self) -> Result<f64> {
        let archive = fixture::image(BUSYBOX);
        let archive = archive.to_str().context("fixture path")?;
        self.ctr(&[
            "images",
            "import",
            "--base-name",
            "docker.io/library/busybox",
            archive,
        ])?;
        let root = self.dir.path().join("root");
        let blobs = root.join("io.containerd.content.v1.content/blobs/sha256");
        let snapshots = root.join("io.containerd.snapshotter.v1.overlayfs/snapshots");
        let files: Vec<PathBuf> = [BUSYBOX_MANIFEST, BUSYBOX_CONFIG, BASE_LAYER]
            .iter()
            .map(|digest| blobs.join(digest.trim_start_matches("sha256:")))
            .collect();
        let count = |dir: &Path| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        ensure!(
            files.iter().all(|f| f.exists()) && count(&snapshots) > 0,
            "import left no files"
        );
        std::thread::sleep(Duration::from_millis(300));

        self.ctr(&["images", "rm", BUSYBOX_NAME])?;
        let replied = Instant::now();
        wait_gone(replied, || {
            files.iter().all(|f| !f.exists()) && count(&snapshots) == 0
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Overlay mounts of its snapshotter, if any were left.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.dir.path().join("root"))
            .stderr(Stdio::null())
            .status();
    }
}
