//! Security end to end: who may drive berth over NATS, what a container may
//! do by default, and what an import may make the node store.
//!
//! The secured nodes run the way a fleet does: nkey identities made by
//! `berthd gen-auth`, the server's `authorization` block, each service as
//! its own identity, and TLS material made by `deploy/gen-tls.sh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use berth_tests::{
    binary, bomb_layers, digest, fixture, nothing_stored, serial, wait_until, write_image, Node,
    NodeOptions,
};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fails unless `output` is berth's failure (125) with `needle` on stderr.
fn refused(output: &Output, needle: &str) -> Result<()> {
    ensure!(
        output.status.code() == Some(125) && text(&output.stderr).contains(needle),
        "expected exit 125 with {needle:?}, got {}:\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    Ok(())
}

/// Fails unless `output` succeeded; returns its stdout.
fn ok(output: Output) -> Result<String> {
    ensure!(
        output.status.success(),
        "exited with {}:\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    Ok(text(&output.stdout))
}

fn busybox() -> String {
    fixture::image("busybox/busybox.oci.tar")
        .to_string_lossy()
        .into_owned()
}

fn secured(tenants: &[&str]) -> NodeOptions {
    NodeOptions {
        secured: true,
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// A client with no credentials is refused at once, with a message that
/// says so and what to give, and so is one whose nkey the server does not
/// know.
#[test]
fn unauthenticated_clients_are_refused() -> Result<()> {
    let _serial = serial();
    let node = Node::start_with(secured(&[]))?;

    let started = Instant::now();
    let output = node.berth_as(None, &["ps"])?;
    let elapsed = started.elapsed();
    refused(&output, "refused the connection: authorization violation")?;
    refused(&output, "no credentials given")?;
    ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");

    // A key pair of its own is no identity the server knows.
    let stranger = berth_testkit::tempdir("berth-stranger-")?;
    let key = Command::new(binary("berthd")?)
        .args(["gen-auth", "--out"])
        .arg(stranger.path())
        .output()?;
    ensure!(key.status.success(), "{}", text(&key.stderr));
    let output = node.berth_as(Some(&stranger.path().join("admin.nk")), &["ps"])?;
    refused(&output, "authorization violation")?;
    refused(
        &output,
        &format!(
            "does not know the identity in {}",
            stranger.path().join("admin.nk").display()
        ),
    )?;

    // The admin's identity works.
    ok(node.berth(&["ps"])?)?;
    Ok(())
}

/// berthd's own nats-server asks for identities by default: the seeds are
/// under the root, readable by root only, the CLI finds the admin's with
/// no flags, and a client without one is refused; `--insecure` turns that
/// off.
#[test]
fn berthd_secures_its_own_server() -> Result<()> {
    let _serial = serial();
    let dir = berth_testkit::tempdir("berth-builtin-")?;
    let root = dir.path().join("root");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let berth = |root: &Path, args: &[&str]| -> Result<Output> {
        Ok(Command::new(binary("berth")?)
            .args(["--nats", &url, "--node", "builtin"])
            .args(args)
            .env("BERTH_ROOT", root)
            .env_remove("BERTH_NATS_NKEY")
            .stdin(Stdio::null())
            .output()?)
    };

    {
        let _berthd = Berthd::start(&root, &url, &[])?;
        let auth = root.join("auth");
        let mode = |path: &Path| -> Result<u32> {
            use std::os::unix::fs::PermissionsExt;
            Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
        };
        ensure!(mode(&auth)? == 0o700, "auth dir mode {:o}", mode(&auth)?);
        for file in ["admin.nk", "observer.nk", "task-builtin.nk", "content.nk"] {
            ensure!(
                mode(&auth.join(file))? == 0o600,
                "{file} is readable by others"
            );
        }

        // No flags: the admin's seed under BERTH_ROOT.
        let listed = ok(berth(&root, &["ps"])?)?;
        ensure!(listed.contains("CONTAINER ID"), "{listed}");
        // Elsewhere there is no seed to find.
        refused(
            &berth(&dir.path().join("elsewhere"), &["ps"])?,
            "authorization violation",
        )?;
    }

    // Without authentication, anyone on the port may do anything.
    let open_root = dir.path().join("open");
    let _berthd = Berthd::start(&open_root, &url, &["--insecure"])?;
    ok(berth(&dir.path().join("elsewhere"), &["ps"])?)?;
    ensure!(
        !open_root.join("auth").exists(),
        "--insecure made identities"
    );
    Ok(())
}

/// A tenant of `a` runs containers in `a`, follows its own events, and is
/// refused at once in `b` (publishes) and for `b`'s events (a consumer
/// filtered outside its namespace), never sees another's replies, and may
/// not run a container that would give it the node.
#[test]
fn tenants_are_confined_to_their_namespace() -> Result<()> {
    let _serial = serial();
    let node = Node::start_with(secured(&["a", "b"]))?;
    let tenant = node.seed("tenant-a.nk");
    let as_a = |args: &[&str]| node.berth_as(Some(&tenant), args);

    ok(as_a(&["-n", "a", "image", "import", &busybox()])?)?;
    let out = ok(as_a(&[
        "-n",
        "a",
        "run",
        "--rm",
        "busybox",
        "echo",
        "hello from a",
    ])?)?;
    ensure!(out == "hello from a\n", "{out:?}");
    let events = ok(as_a(&[
        "-n", "a", "events", "--since", "1", "--until", "0s",
    ])?)?;
    ensure!(events.contains(" a tasks.exit "), "{events}");

    for args in [
        vec!["-n", "b", "ps"],
        vec!["-n", "b", "image", "ls"],
        vec!["-n", "b", "run", "--rm", "busybox", "true"],
        vec!["-n", "b", "image", "import", busybox().as_str()],
    ] {
        let started = Instant::now();
        let output = as_a(&args)?;
        let elapsed = started.elapsed();
        refused(&output, "permission denied")?;
        ensure!(
            elapsed < Duration::from_secs(2),
            "{args:?} took {elapsed:?}"
        );
    }
    // What would give a tenant the node is refused in its namespace.
    for flags in [
        vec!["--privileged"],
        vec!["-v", "/:/host"],
        vec!["--net", "host"],
        vec!["--cap-add", "SYS_ADMIN"],
        vec!["--security-opt", "seccomp=unconfined"],
    ] {
        let mut args = vec!["-n", "a", "run", "--rm"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&["busybox", "true"]);
        refused(&as_a(&args)?, "keeps the default confinement")?;
    }
    let left = ok(as_a(&["-n", "a", "ps", "-a", "-q"])?)?;
    ensure!(left.trim().is_empty(), "containers left: {left}");

    // The cluster's internals are not a tenant's either.
    refused(&as_a(&["-n", "a", "ns", "ls"])?, "permission denied")?;
    refused(&as_a(&["-n", "a", "gc"])?, "permission denied")?;
    let started = Instant::now();
    let output = as_a(&["-n", "b", "events", "--since", "1", "--until", "0s"])?;
    let elapsed = started.elapsed();
    refused(
        &output,
        "permission denied: may not publish to $JS.API.CONSUMER.CREATE.BERTH_EVENTS.",
    )?;
    ensure!(
        elapsed < Duration::from_secs(2),
        "events in b took {elapsed:?}"
    );

    tokio::runtime::Runtime::new()?.block_on(raw_tenant_checks(&node, &tenant))
}

/// What the CLI cannot try: a consumer whose body filters another
/// namespace under a subject naming its own, and listening on the admin's
/// reply inbox while the admin makes requests.
async fn raw_tenant_checks(node: &Node, tenant: &Path) -> Result<()> {
    use futures::StreamExt;
    let connect = |seed: PathBuf| {
        let mut config = berth_bus::ConnectConfig::new(&node.nats.url(), "raw");
        config.nkey = Some(seed);
        async move { berth_bus::connect_with_config(&config).await }
    };
    let nats = connect(tenant.to_path_buf()).await?;

    // The subject's filter is the tenant's, the body's is `b`'s.
    let request = serde_json::json!({
        "stream_name": "BERTH_EVENTS",
        "config": {
            "name": "sneaky",
            "filter_subject": "berth.v1.b.events.>",
            "deliver_policy": "all",
            "ack_policy": "none",
        },
    });
    let answer = nats
        .request(
            "$JS.API.CONSUMER.CREATE.BERTH_EVENTS.sneaky.berth.v1.a.events.>",
            serde_json::to_vec(&request)?.into(),
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
    ensure!(answer.get("error").is_some(), "consumer made: {answer}");

    // The admin's replies go to its own prefix, which the tenant may not
    // subscribe to; nor may it subscribe to everything.
    let admin_key =
        berth_bus::config::public_key(&berth_bus::config::read_seed(&node.seed("admin.nk"))?)?;
    let mut spying = nats
        .subscribe(format!(
            "{}.>",
            berth_bus::config::inbox_prefix_for(&admin_key)
        ))
        .await?;
    let mut everything = nats.subscribe(">").await?;
    nats.flush().await?;
    ok(node.berth(&["-n", "a", "ps"])?)?;
    let heard = tokio::time::timeout(Duration::from_secs(1), async {
        tokio::select! {
            message = spying.next() => message,
            message = everything.next() => message,
        }
    })
    .await;
    ensure!(
        matches!(heard, Err(_) | Ok(None)),
        "the tenant heard {heard:?}"
    );
    Ok(())
}

/// The observer lists containers and follows events live, and is refused
/// at once when it would kill, remove or run one.
#[test]
fn the_observer_watches_but_changes_nothing() -> Result<()> {
    let _serial = serial();
    let node = Node::start_with(secured(&[]))?;
    let observer = node.seed("observer.nk");
    node.berth_ok(&["image", "import", &busybox()])?;
    node.berth_ok(&["run", "-d", "--name", "web", "busybox", "sleep", "600"])?;

    let listed = ok(node.berth_as(Some(&observer), &["ps"])?)?;
    ensure!(
        listed.contains("web") && listed.contains("running"),
        "{listed}"
    );
    ok(node.berth_as(Some(&observer), &["inspect", "web"])?)?;
    ok(node.berth_as(Some(&observer), &["nodes"])?)?;

    // Following: the observer sees the admin's stop as it happens.
    let mut follow = node
        .berth_command_as(&["--nkey".into(), observer.to_string_lossy().into_owned()])?
        .args(["events", "--filter", "tasks.exit"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let lines = lines_of(&mut follow);

    for args in [
        vec!["kill", "web"],
        vec!["rm", "-f", "web"],
        vec!["stop", "web"],
        vec!["run", "--rm", "busybox", "true"],
    ] {
        let started = Instant::now();
        let output = node.berth_as(Some(&observer), &args)?;
        let elapsed = started.elapsed();
        refused(&output, "permission denied")?;
        ensure!(
            elapsed < Duration::from_secs(2),
            "{args:?} took {elapsed:?}"
        );
    }
    let listed = node.berth_ok(&["ps"])?;
    ensure!(listed.contains("running"), "web did not survive: {listed}");

    // Give the consumer a moment to exist, then stop web as the admin.
    std::thread::sleep(Duration::from_millis(500));
    node.berth_ok(&["kill", "web"])?;
    let seen = wait_for_line(&lines, Duration::from_secs(10), |line| {
        line.contains("tasks.exit web")
    });
    let _ = follow.kill();
    let _ = follow.wait();
    ensure!(seen, "the observer did not see tasks.exit web");
    node.berth_ok(&["rm", "-f", "web"])?;
    Ok(())
}

/// A server that takes only TLS connections and verifies client
/// certificates (with nkey identities on top) runs the whole path: import,
/// run, output; a client without the CA and certificate gets nowhere.
#[test]
fn tls_only_deployment_runs_containers() -> Result<()> {
    let _serial = serial();
    let node = Node::start_with(NodeOptions {
        tls: true,
        ..secured(&[])
    })?;
    node.berth_ok(&["image", "import", &busybox()])?;
    let out = node.berth_ok(&["run", "--rm", "busybox", "echo", "over tls"])?;
    ensure!(out == "over tls\n", "{out:?}");

    // The same identity without TLS settings.
    let output = Command::new(binary("berth")?)
        .args(["--nats", &node.nats.url(), "--nkey"])
        .arg(node.seed("admin.nk"))
        .arg("ps")
        .env("BERTH_ROOT", "/nonexistent")
        .stdin(Stdio::null())
        .output()?;
    ensure!(
        output.status.code() == Some(125),
        "{}",
        text(&output.stdout)
    );
    Ok(())
}

/// Inside a default container seccomp is on, no_new_privileges is set,
/// and user namespaces, mounts and kernel modules are refused;
/// `--privileged` and the `--security-opt` opt-outs lift what they say.
#[test]
fn default_containers_are_confined() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    node.berth_ok(&["image", "import", &busybox()])?;
    let run = |flags: &[&str], script: &str| -> Result<Output> {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["busybox", "sh", "-c", script]);
        node.berth(&args)
    };
    const STATUS: &str = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status | tr -s '\\t ' ' '";
    const PROBES: &str = "unshare -U true && echo userns-ok; \
        mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo mount-ok; \
        printf 'not a module' > /tmp/x.ko; insmod /tmp/x.ko 2>&1; true";

    let status = ok(run(&[], STATUS)?)?;
    ensure!(status.contains("Seccomp: 2"), "{status}");
    ensure!(status.contains("NoNewPrivs: 1"), "{status}");
    let probes = run(&[], PROBES)?;
    let out = format!("{}{}", text(&probes.stdout), text(&probes.stderr));
    ensure!(!out.contains("userns-ok"), "unshare -U worked:\n{out}");
    ensure!(!out.contains("mount-ok"), "mount worked:\n{out}");
    ensure!(
        out.contains("Operation not permitted"),
        "insmod was not refused:\n{out}"
    );

    // Privileged: every one of them reaches the kernel.
    let status = ok(run(&["--privileged"], STATUS)?)?;
    ensure!(status.contains("Seccomp: 0"), "{status}");
    ensure!(status.contains("NoNewPrivs: 0"), "{status}");
    let probes = run(&["--privileged"], PROBES)?;
    let out = format!("{}{}", text(&probes.stdout), text(&probes.stderr));
    ensure!(out.contains("userns-ok"), "unshare -U failed:\n{out}");
    ensure!(out.contains("mount-ok"), "mount failed:\n{out}");
    ensure!(
        !out.contains("Operation not permitted"),
        "insmod was refused before the kernel read the module:\n{out}"
    );

    // Each opt-out lifts its own default only.
    let status = ok(run(&["--security-opt", "seccomp=unconfined"], STATUS)?)?;
    ensure!(
        status.contains("Seccomp: 0") && status.contains("NoNewPrivs: 1"),
        "{status}"
    );
    let status = ok(run(&["--security-opt", "no-new-privileges=false"], STATUS)?)?;
    ensure!(
        status.contains("Seccomp: 2") && status.contains("NoNewPrivs: 0"),
        "{status}"
    );
    // Without the filter, only the missing capability stops the mount.
    let probes = ok(run(&["--security-opt", "seccomp=unconfined"], PROBES)?)?;
    ensure!(probes.contains("userns-ok"), "{probes}");
    ensure!(!probes.contains("mount-ok"), "{probes}");
    refused(
        &run(&["--security-opt", "apparmor=x"], "true")?,
        "unknown --security-opt",
    )?;
    Ok(())
}

/// A gzip and a zstd layer that inflate far past the node's cap, and a
/// 32 MiB manifest, are refused at import with errors that say why, and
/// leave no blob, ingest or snapshot behind.
#[test]
fn bombs_and_huge_manifests_are_refused() -> Result<()> {
    let _serial = serial();
    let node = Node::start_with(NodeOptions {
        berthd_args: vec!["--max-layer-size".into(), "8m".into()],
        ..Default::default()
    })?;
    let dir = berth_testkit::tempdir("berth-bombs-")?;

    // A tar of one file of 64 MiB of zeros (eight times the cap), in well
    // under a MiB. The unpack stops at the cap, long before a diff ID is
    // checked, so any digest names it.
    let diff_id = digest(b"never checked");
    for (name, blob, media_type) in bomb_layers()? {
        ensure!(blob.len() < 1 << 20, "{name} bomb is {} bytes", blob.len());
        let archive = dir.path().join(format!("{name}.oci.tar"));
        write_image(&archive, &blob, media_type, &diff_id, "")?;
        let output = node.berth(&["image", "import", &archive.to_string_lossy()])?;
        refused(&output, "inflates past the 8388608 byte limit")?;
        refused(&output, &format!("cannot unpack {name}:latest"))?;
        nothing_stored(&node)?;
    }

    // A manifest of 32 MiB (one long annotation): refused before any byte
    // is sent.
    let layer = vec![0u8; 1024];
    let archive = dir.path().join("huge.oci.tar");
    write_image(
        &archive,
        &layer,
        "application/vnd.oci.image.layer.v1.tar",
        &digest(&layer),
        &"x".repeat(32 << 20),
    )?;
    let output = node.berth(&["image", "import", &archive.to_string_lossy()])?;
    refused(&output, "over the 4194304 byte limit")?;
    refused(&output, "manifest sha256:")?;
    nothing_stored(&node)?;
    Ok(())
}

/// The stdout lines of `child`, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    limit: Duration,
    mut wanted: impl FnMut(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// A berthd that starts its own nats-server, stopped on drop.
struct Berthd {
    child: Child,
}

impl Berthd {
    fn start(root: &Path, url: &str, extra: &[&str]) -> Result<Berthd> {
        let log = root.with_extension("log");
        std::fs::create_dir_all(root)?;
        let child = Command::new(binary("berthd")?)
            .arg("--root")
            .arg(root)
            .arg("--state")
            .arg(root.join("state"))
            .args(["--nats", url, "--node", "builtin", "--gc-interval", "3600"])
            .arg("--shim")
            .arg(berth_testkit::shim_bin())
            .args(extra)
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("BERTH_AUTH_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start berthd")?;
        let berthd = Berthd { child };
        let ready = wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&log).is_ok_and(|text| text.contains("berthd ready"))
        });
        ensure!(
            ready,
            "berthd did not get ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ok(berthd)
    }
}

impl Drop for Berthd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
