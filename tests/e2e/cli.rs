//! The client as a user meets it, through the real binaries on a real
//! nats-server and runc: every fixture image imported and run, each
//! command with the result a user would check (exit codes, output, `ps`
//! states, `inspect` fields), and the errors for what does not exist.
//! Needs root, runc and nats-server.
//!
//! Each test starts its own node. They take a lock, since containers of
//! tests running at once would share the process's node id and cgroups.

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use berth_tests::{fixture, serial, stderr, stdout, wait_until, Node};

/// `berth --json ARGS` parsed.
fn berth_json(node: &Node, args: &[&str]) -> Result<serde_json::Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = node.berth_ok(&all)?;
    serde_json::from_str(&text).with_context(|| format!("berth {args:?} printed {text}"))
}

/// A container's state as `inspect` reports it.
fn status(node: &Node, container_id: &str) -> Result<String> {
    let inspected = berth_json(node, &["inspect", container_id])?;
    Ok(inspected[0]["state"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

fn import(node: &Node, archive: &str) -> Result<String> {
    let path = fixture::image(archive);
    node.berth_ok(&["image", "import", path.to_str().context("path")?])
}

fn expected(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(fixture::image(path))?)
}

/// Every fixture image imports and prints what its fixture says: OCI,
/// docker-archive, zstd and gzip'd busybox, the layered and opaque images,
/// the host's platform of the multi-platform index, and Debian when the
/// shared copy is there.
#[test]
fn every_fixture_image_imports_and_runs() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    let busybox = expected("busybox/expected-output.txt")?;

    let cases = [
        ("busybox/busybox.oci.tar", "busybox:latest", "busybox"),
        ("busybox/busybox.docker.tar", "busybox:latest", "busybox"),
        (
            "busybox/busybox-zstd.oci.tar",
            "busybox-zstd:latest",
            "busybox",
        ),
        ("layers/layers.oci.tar", "layers:latest", "layers"),
        ("layers/layers.docker.tar", "layers:latest", "layers"),
        ("opaque/opaque.oci.tar", "opaque:latest", "opaque"),
        (
            "multiarch/multiarch.oci.tar",
            "multiarch:latest",
            "multiarch",
        ),
    ];
    for (archive, name, fixture_dir) in cases {
        let imported = import(&node, archive)?;
        ensure!(imported.contains(name), "{archive}: {imported}");
        let want = expected(&format!("{fixture_dir}/expected-output.txt"))?;
        let output = node.berth_code(&["run", "--rm", name], 0)?;
        ensure!(
            stdout(&output) == want,
            "{archive} printed:\n{}",
            stdout(&output)
        );
    }

    // The index resolved to this host's platform.
    let inspected = berth_json(&node, &["image", "inspect", "multiarch"])?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ensure!(
        inspected[0]["config"]["architecture"] == arch,
        "{inspected}"
    );

    // A gzip'd archive imports as the plain one does, named by its file.
    let dir = berth_testkit::tempdir("berth-cli-gz-")?;
    let gz = dir.path().join("busybox-gz.oci.tar.gz");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -c {} > {}",
            fixture::image("busybox/busybox.oci.tar").display(),
            gz.display()
        ))
        .status()?;
    ensure!(status.success(), "gzip failed");
    let imported = node.berth_ok(&["image", "import", gz.to_str().context("path")?])?;
    ensure!(imported.contains("busybox-gz:latest"), "{imported}");
    let output = node.berth_code(&["run", "--rm", "busybox-gz"], 0)?;
    ensure!(stdout(&output) == busybox);

    // Debian is too large for the repository; it runs when it is shared.
    match fixture::debian() {
        Some(path) => {
            let path = path.to_str().context("path")?;
            node.berth_ok(&["--timeout", "120", "image", "import", path])?;
            let output =
                node.berth_code(&["run", "--rm", "debian", "cat", "/etc/debian_version"], 0)?;
            ensure!(stdout(&output).starts_with("12."), "{}", stdout(&output));
        }
        None => eprintln!(
            "NOTE: the Debian image (../shared/images/debian/debian.oci.tar) is absent: \
             its import and run were not checked"
        ),
    }
    Ok(())
}

/// `image tag` gives a second name that runs; `image export` writes an OCI
/// layout archive that survives `image rm` and `gc` and imports again,
/// several images in one; unknown names read as a person would say them.
#[test]
fn images_tag_export_and_import_again() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    import(&node, "busybox/busybox.oci.tar")?;
    import(&node, "opaque/opaque.oci.tar")?;

    node.berth_ok(&["image", "tag", "busybox", "mybox:1"])?;
    let output = node.berth_code(&["run", "--rm", "mybox:1", "echo", "tagged"], 0)?;
    ensure!(stdout(&output) == "tagged\n");
    let listed = berth_json(&node, &["image", "ls"])?;
    let names: Vec<&str> = listed
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    ensure!(names.contains(&"docker.io/library/mybox:1"), "{names:?}");
    // docker's shorthand lists the same.
    ensure!(berth_json(&node, &["images"])? == listed);

    // The archive is an OCI layout: the layout file, an index naming each
    // image, and every blob under blobs/sha256.
    let dir = berth_testkit::tempdir("berth-cli-export-")?;
    let file = dir.path().join("both.tar");
    let file_arg = file.to_str().context("path")?;
    node.berth_ok(&["image", "export", "mybox:1", "opaque", file_arg])?;
    let mut entries = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&file)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        entries.insert(path, data);
    }
    ensure!(entries.contains_key("oci-layout"), "{:?}", entries.keys());
    let index: serde_json::Value = serde_json::from_slice(&entries["index.json"])?;
    let manifests = index["manifests"].as_array().context("manifests")?;
    ensure!(manifests.len() == 2, "{index}");
    ensure!(manifests[0]["annotations"]["org.opencontainers.image.ref.name"] == "1");
    ensure!(manifests[0]["annotations"]["io.containerd.image.name"] == "docker.io/library/mybox:1");
    for manifest in manifests {
        let digest = manifest["digest"].as_str().context("digest")?;
        let blob = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        ensure!(entries.contains_key(&blob), "{blob} missing");
    }

    // A second reader of the format, where one is installed.
    let skopeo = std::process::Command::new("skopeo")
        .args(["inspect", &format!("oci-archive:{file_arg}:1")])
        .output();
    match skopeo {
        Ok(output) => {
            ensure!(output.status.success(), "skopeo: {}", stderr(&output));
            let inspected: serde_json::Value = serde_json::from_slice(&output.stdout)?;
            ensure!(inspected["Digest"] == manifests[0]["digest"], "{inspected}");
        }
        Err(_) => eprintln!("NOTE: skopeo is not installed: the export was not read by it"),
    }

    // With every name gone, gc leaves nothing; the archive brings all back.
    node.berth_ok(&["rmi", "mybox:1"])?;
    let listed = node.berth_ok(&["images"])?;
    ensure!(
        !listed.contains("mybox") && listed.contains("busybox:latest"),
        "{listed}"
    );
    node.berth_ok(&["image", "rm", "busybox", "opaque"])?;
    node.berth_ok(&["gc"])?;
    let emptied = wait_until(Duration::from_secs(10), || {
        berth_json(&node, &["content", "ls"]).is_ok_and(|v| v == serde_json::json!([]))
    });
    ensure!(
        emptied,
        "blobs left: {}",
        node.berth_ok(&["content", "ls"])?
    );
    let imported = node.berth_ok(&["image", "import", file_arg])?;
    ensure!(
        imported.contains("mybox:1") && imported.contains("opaque:latest"),
        "{imported}"
    );
    let output = node.berth_code(&["run", "--rm", "mybox:1"], 0)?;
    ensure!(stdout(&output) == expected("busybox/expected-output.txt")?);
    let output = node.berth_code(&["run", "--rm", "opaque"], 0)?;
    ensure!(stdout(&output) == expected("opaque/expected-output.txt")?);

    // Unknown names: one line, exit 125, no backtrace.
    for args in [
        &["image", "inspect", "nope"][..],
        &["run", "--rm", "nope"],
        &["image", "tag", "nope", "other"],
    ] {
        let output = node.berth_code(args, 125)?;
        ensure!(
            stderr(&output) == "berth: no such image: nope\n",
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = node.berth_code(&["image", "rm", "nope"], 1)?;
    ensure!(stderr(&output).contains("no such image: nope"));
    Ok(())
}

/// What `run` flags set is what the process sees inside: environment,
/// working directory, user, host name, read-only rootfs, tmpfs, binds,
/// networks, limits, capabilities, stdin and a terminal for `run` and
/// `exec`; what berth cannot do is refused, a missing command exits 127.
#[test]
fn run_flags_are_seen_inside() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    import(&node, "busybox/busybox.oci.tar")?;
    let dir = berth_testkit::tempdir("berth-cli-run-")?;
    let env_file = dir.path().join("env.list");
    std::fs::write(&env_file, "FROM_FILE=yes\n# a comment\n\nSHARED=file\n")?;
    let env_file = env_file.to_str().context("path")?;

    // -e wins over --env-file; -w, -u and --hostname as given.
    let script = "id -u; pwd; hostname; env | grep -E '^(A|FROM_FILE|SHARED)=' | sort";
    let output = node.berth_code(
        &[
            "run",
            "--rm",
            "-e",
            "A=1",
            "-e",
            "SHARED=flag",
            "--env-file",
            env_file,
            "-w",
            "/tmp",
            "-u",
            "nobody",
            "--hostname",
            "box",
            "busybox",
            "sh",
            "-c",
            script,
        ],
        0,
    )?;
    ensure!(
        stdout(&output) == "65534\n/tmp\nbox\nA=1\nFROM_FILE=yes\nSHARED=flag\n",
        "{}",
        stdout(&output)
    );

    // --entrypoint replaces the image's command.
    let output = node.berth_code(
        &[
            "run",
            "--rm",
            "--entrypoint",
            "echo",
            "busybox",
            "via",
            "entrypoint",
        ],
        0,
    )?;
    ensure!(stdout(&output) == "via entrypoint\n");

    // A read-only rootfs refuses writes, except in a tmpfs.
    let output = node.berth_code(&["run", "--rm", "--read-only", "busybox", "touch", "/x"], 1)?;
    ensure!(
        stderr(&output).contains("Read-only file system"),
        "{}",
        stderr(&output)
    );
    node.berth_code(
        &[
            "run",
            "--rm",
            "--read-only",
            "--tmpfs",
            "/scratch",
            "busybox",
            "touch",
            "/scratch/x",
        ],
        0,
    )?;

    // A bind shows the host's file; :ro refuses writes.
    let share = dir.path().join("share");
    std::fs::create_dir(&share)?;
    std::fs::write(share.join("f.txt"), "from the host\n")?;
    let bind = format!("{}:/data", share.display());
    let output = node.berth_code(
        &[
            "run",
            "--rm",
            "-v",
            &bind,
            "busybox",
            "sh",
            "-c",
            "cat /data/f.txt; echo in > /data/g.txt",
        ],
        0,
    )?;
    ensure!(stdout(&output) == "from the host\n");
    ensure!(std::fs::read_to_string(share.join("g.txt"))? == "in\n");
    let bind_ro = format!("{bind}:ro");
    node.berth_code(
        &["run", "--rm", "-v", &bind_ro, "busybox", "touch", "/data/h"],
        1,
    )?;

    // --net none has loopback only; --net host has the node's interfaces.
    let devices = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '";
    let output = node.berth_code(
        &[
            "run", "--rm", "--net", "none", "busybox", "sh", "-c", devices,
        ],
        0,
    )?;
    ensure!(stdout(&output) == "lo\n", "{}", stdout(&output));
    let host_devices = std::fs::read_to_string("/proc/net/dev")?.lines().count() - 2;
    let output = node.berth_code(
        &[
            "run", "--rm", "--net", "host", "busybox", "sh", "-c", devices,
        ],
        0,
    )?;
    ensure!(
        stdout(&output).lines().count() == host_devices,
        "{}",
        stdout(&output)
    );

    // Limits reach the cgroup the service counts in.
    node.berth_ok(&[
        "run",
        "-d",
        "--name",
        "limited",
        "--memory",
        "16m",
        "--cpus",
        "0.5",
        "--pids-limit",
        "20",
        "busybox",
        "sleep",
        "30",
    ])?;
    let stats = berth_json(&node, &["stats", "--no-stream", "limited"])?;
    ensure!(stats[0]["memoryLimitBytes"] == 16 << 20, "{stats}");
    ensure!(stats[0]["pidsLimit"] == 20, "{stats}");
    let inspected = berth_json(&node, &["inspect", "limited"])?;
    ensure!(inspected[0]["config"]["cpus"] == 0.5, "{inspected}");
    node.berth_ok(&["rm", "-f", "limited"])?;

    // Capabilities: docker's default set, one more with --cap-add, one
    // fewer with --cap-drop, and (last, below) more with --privileged.
    let caps = |extra: &[&str]| -> Result<u64> {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["busybox", "sh", "-c", "grep CapEff /proc/self/status"]);
        let output = node.berth_code(&args, 0)?;
        let text = stdout(&output);
        let hex = text.split_whitespace().nth(1).context("CapEff")?;
        Ok(u64::from_str_radix(hex, 16)?)
    };
    let default = caps(&[])?;
    ensure!(default == 0xa80425fb, "default capabilities {default:x}");
    ensure!(caps(&["--cap-add", "NET_ADMIN"])? == default | (1 << 12));
    ensure!(caps(&["--cap-drop", "chown"])? == default & !1);

    // -i passes berth's stdin to the container and closes it at the end;
    // -t gives it a terminal.
    let mut child = node
        .berth_command()?
        .args(["run", "--rm", "-i", "busybox", "sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, b"piped in\n")?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "run -i exited with {}",
        output.status
    );
    ensure!(stdout(&output) == "piped in\nend\n", "{}", stdout(&output));
    let output = node.berth_code(&["run", "--rm", "-t", "busybox", "sh", "-c", "tty"], 0)?;
    ensure!(
        stdout(&output).starts_with("/dev/pts/"),
        "{}",
        stdout(&output)
    );

    // exec -i and -t do the same for an exec process.
    node.berth_ok(&["run", "-d", "--name", "idle", "busybox", "sleep", "30"])?;
    let mut child = node
        .berth_command()?
        .args(["exec", "-i", "idle", "sh", "-c", "cat; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, b"to exec\n")?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "exec -i exited with {}",
        output.status
    );
    ensure!(stdout(&output) == "to exec\nend\n", "{}", stdout(&output));
    let output = node.berth_code(&["exec", "-t", "idle", "sh", "-c", "tty"], 0)?;
    ensure!(
        stdout(&output).starts_with("/dev/pts/"),
        "{}",
        stdout(&output)
    );
    node.berth_ok(&["rm", "-f", "idle"])?;

    // What berth cannot do is refused with a reason, exit 125.
    let output = node.berth_code(&["run", "--rm", "--net", "bridge", "busybox", "true"], 125)?;
    ensure!(
        stderr(&output).contains("unknown network"),
        "{}",
        stderr(&output)
    );
    node.berth_code(&["run", "--rm", "--memory", "16x", "busybox", "true"], 125)?;

    // A command the image lacks exits 127, as docker's does.
    let output = node.berth_code(&["run", "--rm", "busybox", "no-such-command"], 127)?;
    ensure!(
        stderr(&output).contains("no-such-command"),
        "{}",
        stderr(&output)
    );
    let left = berth_json(&node, &["ps", "-a"])?;
    ensure!(left == serde_json::json!([]), "containers left: {left}");

    // --cap-drop ALL leaves none; --privileged gives every one the node has.
    ensure!(caps(&["--cap-drop", "ALL"])? == 0);
    ensure!(caps(&["--privileged"])? & !default != 0);
    Ok(())
}

/// The life of detached containers: `ps` and `inspect` states, `logs`
/// with `--tail` and `-f`, `kill -s`, `stop -t` against a process that
/// ignores SIGTERM (137) and one that traps it (143), `pause`/`resume`,
/// `exec`, `stats`, `top`, `wait`, `create`/`start`, `rm` and `rm -f`, and
/// the errors for a container that does not exist.
#[test]
fn containers_live_and_die_as_docker_says() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    import(&node, "busybox/busybox.oci.tar")?;
    let trap = "trap 'echo got TERM; exit 143' TERM; i=0; \
                while :; do echo line $i; i=$((i+1)); sleep 0.1; done";

    // Detached: the id on stdout, running in ps and inspect.
    let id = node.berth_ok(&[
        "run", "-d", "--name", "ticker", "--label", "app=t", "busybox", "sh", "-c", trap,
    ])?;
    ensure!(id == "ticker\n", "{id}");
    let listed = berth_json(&node, &["ps"])?;
    ensure!(
        listed[0]["id"] == "ticker" && listed[0]["status"] == "running",
        "{listed}"
    );
    let inspected = berth_json(&node, &["inspect", "ticker"])?;
    ensure!(inspected[0]["image"] == "docker.io/library/busybox:latest");
    ensure!(inspected[0]["labels"]["app"] == "t", "{inspected}");
    ensure!(
        inspected[0]["state"]["pid"].as_u64().unwrap_or(0) > 0,
        "{inspected}"
    );

    // logs --tail: the last lines only.
    ensure!(wait_until(Duration::from_secs(10), || {
        node.berth_ok(&["logs", "ticker"])
            .is_ok_and(|out| out.lines().count() >= 5)
    }));
    let tail = node.berth_ok(&["logs", "--tail", "2", "ticker"])?;
    let lines: Vec<&str> = tail.lines().collect();
    ensure!(
        lines.len() == 2 && lines.iter().all(|l| l.starts_with("line ")),
        "{tail}"
    );
    let output = node.berth_code(&["logs", "-t", "ticker"], 125)?;
    ensure!(
        stderr(&output).contains("not supported"),
        "{}",
        stderr(&output)
    );

    // pause and resume, as the state says.
    node.berth_ok(&["pause", "ticker"])?;
    ensure!(status(&node, "ticker")? == "paused");
    ensure!(berth_json(&node, &["ps"])?[0]["status"] == "paused");
    node.berth_ok(&["resume", "ticker"])?;
    ensure!(status(&node, "ticker")? == "running");

    // exec: its output, its status, and nothing left of it.
    let output = node.berth_code(
        &[
            "exec",
            "ticker",
            "sh",
            "-c",
            "echo from exec; echo err >&2; exit 5",
        ],
        5,
    )?;
    ensure!(stdout(&output) == "from exec\n" && stderr(&output) == "err\n");
    let output = node.berth_code(
        &[
            "exec",
            "-u",
            "nobody",
            "-w",
            "/tmp",
            "ticker",
            "sh",
            "-c",
            "id -u; pwd",
        ],
        0,
    )?;
    ensure!(stdout(&output) == "65534\n/tmp\n", "{}", stdout(&output));
    let inspected = berth_json(&node, &["inspect", "ticker"])?;
    ensure!(
        inspected[0]["state"]["execs"] == serde_json::json!([]),
        "{inspected}"
    );

    // stats and top see the shell and its sleep.
    let stats = berth_json(&node, &["stats", "--no-stream", "ticker"])?;
    ensure!(stats[0]["pids"].as_u64().unwrap_or(0) >= 1, "{stats}");
    ensure!(
        stats[0]["cpuUsageNanos"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    let top = node.berth_ok(&["top", "ticker"])?;
    ensure!(
        top.starts_with("PID") && top.contains("sh -c trap"),
        "{top}"
    );

    // stop: the trap answers SIGTERM with 143, wait says so too.
    node.berth_ok(&["stop", "-t", "5", "ticker"])?;
    ensure!(node.berth_ok(&["wait", "ticker"])? == "143\n");
    ensure!(node.berth_ok(&["logs", "--tail", "1", "ticker"])? == "got TERM\n");
    ensure!(berth_json(&node, &["ps", "-a"])?[0]["status"] == "exited (143)");
    ensure!(berth_json(&node, &["ps"])? == serde_json::json!([]));

    // start brings it back; kill -s TERM reaches the trap.
    node.berth_ok(&["start", "ticker"])?;
    ensure!(status(&node, "ticker")? == "running");
    node.berth_ok(&["kill", "-s", "TERM", "ticker"])?;
    ensure!(node.berth_ok(&["wait", "ticker"])? == "143\n");

    // stop -t 1 on a process that ignores SIGTERM: SIGKILL, 137.
    node.berth_ok(&["run", "-d", "--name", "sleeper", "busybox", "sleep", "600"])?;
    let started = std::time::Instant::now();
    node.berth_ok(&["stop", "-t", "1", "sleeper"])?;
    ensure!(started.elapsed() < Duration::from_secs(10));
    let inspected = berth_json(&node, &["inspect", "sleeper"])?;
    ensure!(inspected[0]["state"]["exitCode"] == 137, "{inspected}");

    // rm refuses a running container; rm -f takes it.
    node.berth_ok(&["run", "-d", "--name", "busy", "busybox", "sleep", "600"])?;
    let output = node.berth_code(&["rm", "busy"], 125)?;
    ensure!(
        stderr(&output).contains("stop it first or use rm -f"),
        "{}",
        stderr(&output)
    );
    node.berth_ok(&["rm", "-f", "busy", "sleeper", "ticker"])?;
    ensure!(berth_json(&node, &["ps", "-a"])? == serde_json::json!([]));

    // create makes a container that has not run; start -a runs it.
    let id = node.berth_ok(&[
        "create",
        "--name",
        "later",
        "busybox",
        "sh",
        "-c",
        "echo ran; exit 6",
    ])?;
    ensure!(id == "later\n");
    ensure!(status(&node, "later")? == "created");
    let output = node.berth_code(&["start", "-a", "later"], 6)?;
    ensure!(stdout(&output) == "ran\n");
    // Started again, it keeps its output: start -a copies the new run's
    // alone, logs has both.
    let output = node.berth_code(&["start", "-a", "later"], 6)?;
    ensure!(stdout(&output) == "ran\n", "{}", stdout(&output));
    ensure!(node.berth_ok(&["logs", "later"])? == "ran\nran\n");
    // logs -f on a running container follows it to its end.
    node.berth_ok(&[
        "run",
        "-d",
        "--name",
        "counter",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo $i; sleep 0.3; done",
    ])?;
    ensure!(node.berth_ok(&["logs", "-f", "counter"])? == "1\n2\n3\n");
    node.berth_ok(&["rm", "later", "counter"])?;
    // rm takes the output along: a new container of the same name starts
    // with none.
    node.berth_ok(&["create", "--name", "later", "busybox", "echo", "new"])?;
    ensure!(node.berth_ok(&["logs", "later"])?.is_empty());
    node.berth_ok(&["start", "-a", "later"])?;
    ensure!(node.berth_ok(&["logs", "later"])? == "new\n");
    node.berth_ok(&["rm", "later"])?;

    // A container that does not exist, whatever the command.
    for args in [
        &["inspect", "ghost"][..],
        &["logs", "ghost"],
        &["stop", "ghost"],
        &["kill", "ghost"],
        &["rm", "ghost"],
        &["exec", "ghost", "true"],
        &["pause", "ghost"],
        &["start", "ghost"],
        &["top", "ghost"],
        &["wait", "ghost"],
    ] {
        let output = node.berth_code(args, 125)?;
        ensure!(
            stderr(&output) == "berth: no such container: ghost\n",
            "{args:?}: {}",
            stderr(&output)
        );
    }
    Ok(())
}

/// `berth run` in the foreground passes the signals it gets to the
/// container and exits with the container's status.
#[test]
fn run_forwards_signals_and_exits_with_the_status() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    import(&node, "busybox/busybox.oci.tar")?;
    let script = "trap 'echo got HUP; exit 129' HUP; echo ready; while :; do sleep 0.1; done";
    let mut child = node
        .berth_command()?
        .args(["run", "--rm", "--name", "fg", "busybox", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;

    // Signal once the container has said it is ready (its trap is set).
    let mut out = child.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("ready\n") {
        ensure!(out.read(&mut byte)? == 1, "berth run ended early");
        seen.push(byte[0]);
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let status = child.wait()?;
    out.read_to_end(&mut seen)?;
    ensure!(status.code() == Some(129), "berth run exited with {status}");
    ensure!(String::from_utf8_lossy(&seen) == "ready\ngot HUP\n");
    ensure!(
        berth_json(&node, &["ps", "-a"])? == serde_json::json!([]),
        "--rm left it"
    );
    Ok(())
}

/// The plumbing: events replayed from the stream and filtered, content,
/// snapshots, leases, gc and its explanations, namespaces and nodes.
#[test]
fn plumbing_shows_the_stores_underneath() -> Result<()> {
    let _serial = serial();
    let node = Node::start()?;
    import(&node, "busybox/busybox.oci.tar")?;
    node.berth_code(
        &[
            "run", "--rm", "--name", "once", "busybox", "sh", "-c", "exit 4",
        ],
        4,
    )?;
    let layer = "sha256:7ac49a7f8968043e1e30b4fb08cb7d9e2662b55d4993a6ea25c6a4de2ce94503";
    let chain = "sha256:a45beec7b1e8c0baaffc2eceb3f87cb71769238c272ad035171475573e1296b2";

    // Events: replayed from the first, up to now, and by topic.
    let replay = node.berth_ok(&["events", "--since", "1", "--until", "0s"])?;
    for topic in [
        "content.commit",
        "snapshot.commit",
        "images.create",
        "tasks.exit",
    ] {
        ensure!(replay.contains(topic), "no {topic} in\n{replay}");
    }
    let exits = node.berth_ok(&[
        "--json",
        "events",
        "--since",
        "1",
        "--until",
        "0s",
        "--filter",
        "tasks.exit",
    ])?;
    let exits: Vec<serde_json::Value> = exits
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(exits.len() == 1, "{exits:?}");
    ensure!(exits[0]["object"] == "once status=4", "{exits:?}");
    let first = node.berth_ok(&["events", "--since", "1", "--until", "1"])?;
    ensure!(
        first.lines().count() == 1 && first.starts_with("1 "),
        "{first}"
    );

    // Content: the layer is listed, reads back whole, and can go.
    let blobs = berth_json(&node, &["content", "ls"])?;
    ensure!(
        blobs
            .as_array()
            .context("list")?
            .iter()
            .any(|b| b["digest"] == layer),
        "{blobs}"
    );
    let dir = berth_testkit::tempdir("berth-cli-content-")?;
    let out = dir.path().join("layer");
    node.berth_ok(&["content", "get", layer, "-o", out.to_str().context("path")?])?;
    use sha2::Digest as _;
    let sum = hex::encode(sha2::Sha256::digest(std::fs::read(&out)?));
    ensure!(format!("sha256:{sum}") == layer);
    let output = node.berth_code(
        &[
            "content",
            "get",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ],
        125,
    )?;
    ensure!(
        stderr(&output).contains("no such blob"),
        "{}",
        stderr(&output)
    );

    // Snapshots: the layer's, its usage, and a removable one of our own.
    let snapshots = berth_json(&node, &["snapshot", "ls"])?;
    ensure!(
        snapshots[0]["key"] == chain && snapshots[0]["kind"] == "committed",
        "{snapshots}"
    );
    let usage = berth_json(&node, &["snapshot", "usage", chain])?;
    ensure!(
        usage[0]["size"].as_i64().unwrap_or(0) > 1_000_000,
        "{usage}"
    );
    let output = node.berth_code(&["snapshot", "rm", "no-such-key"], 125)?;
    ensure!(
        stderr(&output).contains("no such snapshot"),
        "{}",
        stderr(&output)
    );

    // Leases: made, listed with their labels, removed.
    let lease = node.berth_ok(&[
        "lease",
        "create",
        "--expires",
        "1h",
        "--label",
        "purpose=test",
    ])?;
    let lease = lease.trim();
    let leases = berth_json(&node, &["lease", "ls"])?;
    ensure!(
        leases
            .as_array()
            .context("list")?
            .iter()
            .any(|l| l["id"] == lease && l["labels"]["purpose"] == "test"),
        "{leases}"
    );
    node.berth_ok(&["lease", "rm", lease])?;
    let output = node.berth_code(&["lease", "rm", lease], 125)?;
    ensure!(
        stderr(&output).contains("no such lease"),
        "{}",
        stderr(&output)
    );

    // gc explains why the layer stays, then what goes once the image does.
    let why = node.berth_ok(&["gc", "explain", layer])?;
    ensure!(why.contains("kept") && why.contains("busybox"), "{why}");
    let dry = node.berth_ok(&["gc", "--dry-run"])?;
    ensure!(dry.starts_with("would remove"), "{dry}");
    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    ensure!(wait_until(Duration::from_secs(10), || {
        berth_json(&node, &["content", "ls"]).is_ok_and(|v| v == serde_json::json!([]))
    }));
    let gone = node.berth_ok(&["gc", "explain", layer])?;
    ensure!(gone.contains("unknown"), "{gone}");

    // Namespaces: one made, used, listed and removed.
    node.berth_ok(&["ns", "create", "team"])?;
    let namespaces = node.berth_ok(&["ns", "ls"])?;
    ensure!(namespaces.contains("team"), "{namespaces}");
    ensure!(berth_json(&node, &["-n", "team", "image", "ls"])? == serde_json::json!([]));
    node.berth_ok(&["ns", "rm", "team"])?;
    ensure!(!node.berth_ok(&["ns", "ls"])?.contains("team"));

    // Nodes: this node with its node-local services, the rest cluster-wide.
    let nodes = berth_json(&node, &["nodes"])?;
    let ours = nodes
        .as_array()
        .context("list")?
        .iter()
        .find(|n| n["node"] == node.node.as_str())
        .with_context(|| format!("{} not in {nodes}", node.node))?;
    ensure!(ours["services"]["task"].is_string() && ours["services"]["snapshot"].is_string());
    let cluster = nodes
        .as_array()
        .context("list")?
        .iter()
        .find(|n| n["node"] == "-");
    ensure!(
        cluster.is_some_and(|c| c["services"]["metadata"].is_string()),
        "{nodes}"
    );
    Ok(())
}
