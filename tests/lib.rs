//! The end-to-end harness: a node made of the real binaries (`berthd`,
//! `berth`, `berth-shim`) on a real nats-server and runc, in temporary
//! directories, torn down on drop with nothing left mounted or running.
//!
//! The binaries are the ones `cargo build --workspace` leaves next to the
//! test executables; `deploy/test.sh` builds them before the tests run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

pub use berth_testkit::{fixture, wait_until, NatsServer};

/// One berth node: berthd with its own root and state, on its own nats-server.
pub struct Node {
    /// The NATS server.
    pub nats: NatsServer,
    /// The node id.
    pub node: String,
    dir: TempDir,
    berthd: Option<Child>,
}

/// A built workspace binary, or an error saying how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = berth_testkit::workspace_bin(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace` first (deploy/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

impl Node {
    /// Starts a node and waits until its five services answer.
    pub fn start() -> Result<Node> {
        let nats = NatsServer::start()?;
        let dir = berth_testkit::tempdir("berth-e2e-")?;
        let node = format!("e2e-{}", std::process::id());
        let mut this = Node {
            nats,
            node,
            dir,
            berthd: None,
        };
        this.start_berthd()?;
        Ok(this)
    }

    /// berthd's root (`--root`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// berthd's state directory (`--state`).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("berthd.log")
    }

    /// berthd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts berthd (again) and waits for its "ready" line.
    pub fn start_berthd(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mark = self.log().matches("berthd ready").count();
        let child = Command::new(binary("berthd")?)
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .args(["--nats", &self.nats.url(), "--node", &self.node])
            .args(["--shim"])
            .arg(binary("berth-shim")?)
            .args(["--gc-interval", "3600"])
            .env("BERTH_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start berthd")?;
        self.berthd = Some(child);
        let ready = wait_until(Duration::from_secs(60), || {
            self.log().matches("berthd ready").count() > mark
        });
        if !ready {
            bail!("berthd did not get ready:\n{}", self.log());
        }
        Ok(())
    }

    /// Stops berthd with `signal` and waits for it; returns its exit status.
    pub fn stop_berthd(&mut self, signal: i32) -> Option<std::process::ExitStatus> {
        let mut child = self.berthd.take()?;
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().ok()
    }

    /// Runs `berth ARGS` against this node and returns its output.
    pub fn berth(&self, args: &[&str]) -> Result<Output> {
        let output = Command::new(binary("berth")?)
            .args(["--nats", &self.nats.url(), "--node", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run berth")?;
        Ok(output)
    }

    /// Runs `berth ARGS` and returns its stdout, failing on a non-zero exit.
    pub fn berth_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.berth(args)?;
        if !output.status.success() {
            bail!(
                "berth {args:?} exited with {}:\nstdout: {}\nstderr: {}\nberthd log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Files under `dir` (recursively), as paths relative to it.
    pub fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(path) = stack.pop() {
            let Ok(entries) = fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(path);
                } else {
                    out.push(path.strip_prefix(dir).unwrap_or(&path).to_path_buf());
                }
            }
        }
        out.sort();
        out
    }

    /// Mount points under this node's directories.
    pub fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// Pids of processes whose command line names a task's files in this
    /// node's state directory (shims, and runc under them; not berthd).
    pub fn node_processes(&self) -> Vec<i32> {
        let state = self.state().join("task").to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&state) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_berthd(libc::SIGTERM);
        // A failed test may leave shims and containers: kill them, then
        // unmount what is left, deepest first.
        for pid in self.node_processes() {
            // SAFETY: kill takes any pid; these are this test's processes.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for point in mounts {
            let _ = Command::new("umount").args(["-l", &point]).status();
        }
    }
}
