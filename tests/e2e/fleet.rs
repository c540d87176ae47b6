//! A fleet on one machine, of real parts: three nats-servers in one
//! cluster with JetStream kept on all three (`BERTH_STREAM_REPLICAS=3`),
//! the control services in one `berthd --services control`, and two nodes
//! with their own roots and state directories, running containers with
//! runc: node a as the separate `berth-snapshot` and `berth-task`
//! binaries, node b as one `berthd --services node`.
//!
//! What it shows: both nodes run containers and list as ready, with
//! `berth nodes query` answering across them; one NATS server stopped,
//! the fleet keeps working and the events written before are all there; a
//! node's task service SIGKILLed and started again re-adopts its running
//! container; a node stopped entirely is marked lost within a bound while
//! the other keeps running, its task reads as unknown, `rm -f` of its
//! container leaves a tombstone, and when the node returns it applies it:
//! the container's process and files are gone.
//!
//! Needs root, runc and nats-server 2.10 or later.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use berth_testkit::NatsCluster;
use berth_tests::{binary, fixture, wait_until};

/// Seconds between heartbeats: short, so that the loss of a node shows
/// within seconds, yet long enough for a loaded machine.
const HEARTBEAT: &str = "0.5";

/// The bound on marking a node lost, as the test checks it: three
/// intervals and the registry's tick are well under this, and the rest is
/// room for a loaded machine.
const LOST_WITHIN: Duration = Duration::from_secs(20);

/// One long-lived process of the fleet, killed on drop.
struct Proc {
    child: Option<Child>,
}

impl Proc {
    fn spawn(mut command: Command, log: &Path) -> Result<Proc> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = command
            .env("BERTH_STREAM_REPLICAS", "3")
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
        Ok(Proc { child: Some(child) })
    }

    /// Sends `signal` and waits for the process.
    fn stop(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(child.id() as i32, signal) };
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(libc::SIGKILL);
    }
}

/// A node agent: this node's snapshot and task services.
struct Agent {
    id: String,
    dir: PathBuf,
    snapshot: Option<Proc>,
    task: Option<Proc>,
    /// Both services in one `berthd --services node`, instead.
    berthd: Option<Proc>,
}

impl Agent {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- snapshot of {}\n{}\n--- task of {}\n{}\n--- berthd of {}\n{}",
            self.id,
            read("snapshot.log"),
            self.id,
            read("task.log"),
            self.id,
            read("berthd.log")
        )
    }
}

/// The fleet: cluster, control services, node agents.
struct Fleet {
    cluster: NatsCluster,
    dir: TempDir,
    control: Option<Proc>,
    agents: Vec<Agent>,
}

impl Fleet {
    fn start() -> Result<Fleet> {
        let cluster = NatsCluster::start()?;
        let dir = berth_testkit::tempdir("berth-fleet-")?;
        let mut fleet = Fleet {
            cluster,
            dir,
            control: None,
            agents: Vec::new(),
        };
        let mut control = Command::new(binary("berthd")?);
        control
            .args(["--services", "control", "--nats", &fleet.cluster.urls()])
            .arg("--root")
            .arg(fleet.dir.path().join("control"))
            .args(["--gc-interval", "3600"]);
        let log = fleet.dir.path().join("control.log");
        fleet.control = Some(Proc::spawn(control, &log)?);
        let ready = wait_until(Duration::from_secs(60), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("berthd ready")
        });
        ensure!(ready, "control services not ready:\n{}", fleet.logs());
        for name in ["a", "b"] {
            let id = format!("fleet-{name}-{}", std::process::id());
            let dir = fleet.dir.path().join(&id);
            fs::create_dir_all(&dir)?;
            fleet.agents.push(Agent {
                id,
                dir,
                snapshot: None,
                task: None,
                berthd: None,
            });
        }
        fleet.start_snapshot(0)?;
        fleet.start_task(0)?;
        fleet.start_berthd(1)?;
        Ok(fleet)
    }

    /// Starts node `i` as one `berthd --services node` (snapshot and task),
    /// pulling layers over the bus too, and waits until it is ready.
    fn start_berthd(&mut self, i: usize) -> Result<()> {
        let agent = &self.agents[i];
        let mut command = Command::new(binary("berthd")?);
        command
            .args(["--services", "node", "--nats", &self.cluster.urls()])
            .args(["--node", &agent.id])
            .arg("--root")
            .arg(agent.dir.join("root"))
            .arg("--state")
            .arg(agent.state())
            .arg("--shim")
            .arg(berth_testkit::shim_bin())
            .args(["--heartbeat-interval", HEARTBEAT]);
        let log = agent.dir.join("berthd.log");
        let mark = fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("berthd ready")
            .count();
        let proc = Proc::spawn(command, &log)?;
        self.agents[i].berthd = Some(proc);
        let ready = wait_until(Duration::from_secs(60), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("berthd ready")
                .count()
                > mark
        });
        ensure!(ready, "node agent not ready:\n{}", self.logs());
        Ok(())
    }

    /// Starts node `i`'s snapshot service. It has no content root: every
    /// layer it unpacks comes from the content service over the bus.
    fn start_snapshot(&mut self, i: usize) -> Result<()> {
        let agent = &self.agents[i];
        let mut command = Command::new(binary("berth-snapshot")?);
        command
            .args(["--nats", &self.cluster.urls(), "--node", &agent.id])
            .arg("--root")
            .arg(agent.dir.join("root/snapshot"));
        let proc = Proc::spawn(command, &agent.dir.join("snapshot.log"))?;
        self.agents[i].snapshot = Some(proc);
        Ok(())
    }

    /// Starts node `i`'s task service.
    fn start_task(&mut self, i: usize) -> Result<()> {
        let agent = &self.agents[i];
        let mut command = Command::new(binary("berth-task")?);
        command
            .args(["--nats", &self.cluster.urls(), "--node", &agent.id])
            .arg("--root")
            .arg(agent.dir.join("root/task"))
            .arg("--state")
            .arg(agent.state().join("task"))
            .arg("--shim")
            .arg(berth_testkit::shim_bin())
            .args(["--heartbeat-interval", HEARTBEAT]);
        let proc = Proc::spawn(command, &agent.dir.join("task.log"))?;
        self.agents[i].task = Some(proc);
        Ok(())
    }

    fn logs(&self) -> String {
        let mut out = fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default();
        for agent in &self.agents {
            out.push_str(&agent.log());
        }
        out
    }

    /// `berth ARGS` against the whole cluster, `--node` of agent `node`.
    fn berth(&self, node: usize, args: &[&str]) -> Result<Output> {
        Command::new(binary("berth")?)
            .args(["--nats", &self.cluster.urls()])
            .args(["--node", &self.agents[node].id])
            .env_remove("BERTH_NATS_NKEY")
            .env("BERTH_ROOT", self.dir.path().join("no-root"))
            .stdin(Stdio::null())
            .args(args)
            .output()
            .context("run berth")
    }

    /// `berth ARGS`' stdout; an error with both outputs and the logs on a
    /// non-zero exit.
    fn berth_ok(&self, node: usize, args: &[&str]) -> Result<String> {
        let output = self.berth(node, args)?;
        if !output.status.success() {
            bail!(
                "berth {args:?} exited with {}:\nstdout: {}\nstderr: {}\nlogs:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.logs()
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    fn json(&self, node: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.berth_ok(node, &all)?;
        serde_json::from_str(&text).with_context(|| format!("berth {args:?} printed {text}"))
    }

    /// The registry's state of agent `i` (`ready`, `lost`), as `berth
    /// nodes` lists it; `None` while it is not listed.
    fn node_state(&self, i: usize) -> Result<Option<String>> {
        let nodes = self.json(0, &["nodes"])?;
        Ok(nodes
            .as_array()
            .context("nodes list")?
            .iter()
            .find(|n| n["node"] == self.agents[i].id.as_str())
            .and_then(|n| n["state"].as_str())
            .map(str::to_string))
    }

    /// Waits (bounded) until agent `i` is in `state`.
    fn wait_state(&self, i: usize, state: &str, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.node_state(i)?.as_deref() == Some(state) {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "node {} not {state} within {limit:?}:\n{}",
            self.agents[i].id,
            self.logs()
        )
    }

    /// Every container's status by id, as `ps -a` shows it.
    fn statuses(&self) -> Result<Vec<(String, String)>> {
        let listed = self.json(0, &["ps", "-a"])?;
        Ok(listed
            .as_array()
            .context("ps list")?
            .iter()
            .map(|c| {
                (
                    c["id"].as_str().unwrap_or_default().to_string(),
                    c["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    fn status(&self, container_id: &str) -> Result<Option<String>> {
        Ok(self
            .statuses()?
            .into_iter()
            .find(|(id, _)| id == container_id)
            .map(|(_, status)| status))
    }

    /// Pids of the shims (and runc under them) of agent `i` for one
    /// container.
    fn container_processes(&self, i: usize, container_id: &str) -> Vec<i32> {
        let state = self.agents[i].state().to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours = args.iter().any(|a| a.contains(&state));
            if ours && args.iter().any(|a| a == container_id) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            if let Some(mut berthd) = agent.berthd.take() {
                berthd.stop(libc::SIGTERM);
            }
            if let Some(mut task) = agent.task.take() {
                task.stop(libc::SIGTERM);
            }
            if let Some(mut snapshot) = agent.snapshot.take() {
                snapshot.stop(libc::SIGTERM);
            }
        }
        if let Some(mut control) = self.control.take() {
            control.stop(libc::SIGTERM);
        }
        // Shims and containers a failed test left, then their mounts.
        let prefix = self.dir.path().to_string_lossy().into_owned();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&prefix) {
                // SAFETY: kill takes any pid; these are this test's processes.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for point in mounts {
            let _ = Command::new("umount").args(["-l", &point]).status();
        }
    }
}

fn ids_of(value: &serde_json::Value) -> Vec<(String, String)> {
    value
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or_default().to_string(),
                        r["id"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_nodes_on_a_three_server_cluster() -> Result<()> {
    let mut fleet = Fleet::start()?;
    let (a, b) = (fleet.agents[0].id.clone(), fleet.agents[1].id.clone());

    // Both nodes announce themselves.
    fleet.wait_state(0, "ready", Duration::from_secs(60))?;
    fleet.wait_state(1, "ready", Duration::from_secs(60))?;
    let nodes = fleet.json(0, &["nodes"])?;
    for id in [&a, &b] {
        let node = nodes
            .as_array()
            .context("nodes")?
            .iter()
            .find(|n| n["node"] == id.as_str())
            .with_context(|| format!("{id} not in {nodes}"))?;
        ensure!(node["services"]["task"].is_string(), "{node}");
        ensure!(node["services"]["snapshot"].is_string(), "{node}");
        ensure!(node["cpus"].as_u64().unwrap_or(0) >= 1, "{node}");
        ensure!(node["memoryBytes"].as_u64().unwrap_or(0) > 0, "{node}");
        ensure!(
            !node["bootId"].as_str().unwrap_or_default().is_empty(),
            "{node}"
        );
    }

    // The image goes to the cluster's content service once, unpacked on
    // node a. Node b never saw it: its first container unpacks it there,
    // with the blobs pulled from content over the bus (b's snapshot
    // service has no content root to read them from).
    let archive = fixture::image("busybox/busybox.oci.tar");
    let archive = archive.to_str().context("archive path")?;
    fleet.berth_ok(0, &["image", "import", archive])?;
    let unpacked_on_b = fleet.json(0, &["nodes", "query", "holds", "busybox"])?;
    ensure!(
        !unpacked_on_b.to_string().contains(b.as_str()),
        "{unpacked_on_b}"
    );

    // A container on each node.
    fleet.berth_ok(
        0,
        &["run", "-d", "--name", "a1", "busybox", "sleep", "1000"],
    )?;
    fleet.berth_ok(
        1,
        &["run", "-d", "--name", "b1", "busybox", "sleep", "1000"],
    )?;
    let failed = fleet.berth(1, &["run", "--name", "b2", "busybox", "sh", "-c", "exit 3"])?;
    ensure!(failed.status.code() == Some(3), "{failed:?}");
    let listed = fleet.json(0, &["ps"])?;
    let placed: Vec<(String, String)> = ids_of(&listed);
    ensure!(placed.contains(&(a.clone(), "a1".into())), "{listed}");
    ensure!(placed.contains(&(b.clone(), "b1".into())), "{listed}");
    let both_running = wait_until(Duration::from_secs(30), || {
        let Ok(nodes) = fleet.json(0, &["nodes"]) else {
            return false;
        };
        let running = |id: &str| {
            nodes
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["node"] == id && n["runningTasks"].as_u64() == Some(1))
        };
        running(&a) && running(&b)
    });
    ensure!(both_running, "heartbeats do not count the running tasks");

    // Scatter-gather: both nodes hold the image and run it; b had a
    // non-zero exit in the last hour.
    let holds = fleet.json(0, &["nodes", "query", "holds", "busybox"])?;
    let holders: Vec<&str> = holds
        .as_array()
        .context("holds")?
        .iter()
        .filter_map(|h| h["node"].as_str())
        .collect();
    ensure!(
        holders.contains(&a.as_str()) && holders.contains(&b.as_str()),
        "{holds}"
    );
    let runs = ids_of(&fleet.json(0, &["nodes", "query", "runs", "busybox"])?);
    ensure!(runs.contains(&(a.clone(), "a1".into())), "{runs:?}");
    ensure!(runs.contains(&(b.clone(), "b1".into())), "{runs:?}");
    ensure!(runs.len() == 2, "{runs:?}");
    let exits = fleet.json(0, &["nodes", "query", "exits", "--since", "1h"])?;
    ensure!(ids_of(&exits) == [(b.clone(), "b2".to_string())], "{exits}");
    ensure!(exits[0]["exitCode"] == 3, "{exits}");

    // One NATS server down: the fleet keeps working, and every event
    // written before is still in the replicated stream.
    let replay = ["--json", "events", "--since", "1", "--until", "0s"];
    let count = |text: String| text.lines().filter(|l| !l.trim().is_empty()).count();
    let before = count(fleet.berth_ok(0, &replay)?);
    fleet.cluster.kill(0);
    fleet.berth_ok(
        0,
        &["run", "-d", "--name", "a2", "busybox", "sleep", "1000"],
    )?;
    let echoed = fleet.berth_ok(1, &["run", "--rm", "busybox", "echo", "still here"])?;
    ensure!(echoed.contains("still here"), "{echoed}");
    ensure!(fleet.status("a1")?.as_deref() == Some("running"));
    ensure!(fleet.status("b1")?.as_deref() == Some("running"));
    // The events of the work just done reach the stream once the
    // publishers are on another server; those from before are all there.
    let mut after = 0;
    let caught_up = wait_until(Duration::from_secs(60), || {
        let Ok(text) = fleet.berth_ok(0, &replay) else {
            return false;
        };
        // a2's task started: `"object":"a2 pid=…"`.
        let ours = text.contains("\"object\":\"a2 pid=");
        after = count(text);
        ours && after > before
    });
    ensure!(
        before > 0 && caught_up,
        "events before {before}, after {after}:\n{}",
        fleet.logs()
    );
    ensure!(fleet.node_state(0)?.as_deref() == Some("ready"));
    ensure!(fleet.node_state(1)?.as_deref() == Some("ready"));
    fleet.cluster.restart(0)?;

    // SIGKILL of node a's task service: its containers run on under their
    // shims, and the restarted service re-adopts them.
    let shims = fleet.container_processes(0, "a1");
    ensure!(!shims.is_empty(), "no shim of a1 found");
    fleet.agents[0]
        .task
        .take()
        .context("task of a")?
        .stop(libc::SIGKILL);
    ensure!(
        fleet.container_processes(0, "a1") == shims,
        "a1's shim went with the task service"
    );
    fleet.start_task(0)?;
    let readopted = wait_until(Duration::from_secs(30), || {
        fleet
            .berth(0, &["kill", "-s", "KILL", "a1"])
            .is_ok_and(|o| o.status.success())
    });
    ensure!(readopted, "a1 not re-adopted:\n{}", fleet.logs());
    let waited = fleet.berth_ok(0, &["wait", "a1"])?;
    ensure!(waited.trim() == "137", "{waited}");
    // A slow restart may have let the registry mark a lost; an `rm -f`
    // then would leave tombstones for a's next reconcile (5 s on) instead
    // of removing the tasks now. What is checked here is the re-adoption.
    fleet.wait_state(0, "ready", LOST_WITHIN)?;
    fleet.berth_ok(0, &["rm", "-f", "a1", "a2"])?;
    ensure!(fleet.status("a2")?.is_none());
    fleet.berth_ok(
        0,
        &["run", "-d", "--name", "a3", "busybox", "sleep", "1000"],
    )?;

    // Node b stops entirely (its berthd SIGKILLed; its container's process
    // stays, as after a partition). The registry marks it lost within the
    // bound, its tasks read as unknown, and node a keeps running.
    fleet.agents[1]
        .berthd
        .take()
        .context("berthd of b")?
        .stop(libc::SIGKILL);
    let took = fleet.wait_state(1, "lost", LOST_WITHIN)?;
    ensure!(took < LOST_WITHIN, "lost after {took:?}");
    ensure!(fleet.status("b1")?.as_deref() == Some("unknown"));
    ensure!(fleet.node_state(0)?.as_deref() == Some("ready"));
    let echoed = fleet.berth_ok(0, &["run", "--rm", "busybox", "echo", "a works"])?;
    ensure!(echoed.contains("a works"), "{echoed}");
    ensure!(fleet.status("a3")?.as_deref() == Some("running"));

    // rm without -f is refused; rm -f removes the record and leaves b a
    // tombstone. The container's process still runs on b meanwhile.
    let refused = fleet.berth(0, &["rm", "b1"])?;
    ensure!(!refused.status.success(), "{refused:?}");
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("lost"),
        "{refused:?}"
    );
    fleet.berth_ok(0, &["rm", "-f", "b1"])?;
    ensure!(fleet.status("b1")?.is_none());
    ensure!(
        !fleet.container_processes(1, "b1").is_empty(),
        "b1 went before b returned"
    );

    // b returns under the same boot: it applies the tombstone, killing b1
    // and removing its files.
    fleet.start_berthd(1)?;
    fleet.wait_state(1, "ready", Duration::from_secs(60))?;
    let bundle = fleet.agents[1].state().join("task/bundles/default/b1");
    let reconciled = wait_until(Duration::from_secs(60), || {
        fleet.container_processes(1, "b1").is_empty() && !bundle.exists()
    });
    ensure!(reconciled, "b1 still on node b:\n{}", fleet.logs());
    ensure!(
        fleet.agents[1].log().contains("tombstones applied"),
        "{}",
        fleet.agents[1].log()
    );
    let runs = ids_of(&fleet.json(0, &["nodes", "query", "runs", "busybox"])?);
    ensure!(runs == [(a.clone(), "a3".to_string())], "{runs:?}");

    // The rest is removed as usual.
    fleet.berth_ok(0, &["rm", "-f", "a3"])?;
    fleet.berth_ok(1, &["rm", "-f", "b2"])?;
    Ok(())
}
