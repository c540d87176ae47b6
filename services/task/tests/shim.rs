//! The shim against real runc and the busybox image: output, exit statuses,
//! signals, orphan reaping, error reporting, detachment and cleanup.
//!
//! Each test uses its own container id, bundle, state directory and runc
//! root, so they run concurrently. They need root and runc in PATH.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_task::shim::protocol::{ShimPid, TaskStatus};
use berth_task::shim_client::{read_exit, spawn_shim, ShimClient, ShimClientError};
use berth_task::spec::{build_spec, prepare_rootfs, write_config, ImageConfig, RunOptions};
use tempfile::TempDir;

const BUSYBOX: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/images/busybox/busybox.oci.tar"
);

/// A bundle with the busybox rootfs, and a state directory beside it.
struct Fixture {
    _dir: TempDir,
    container_id: String,
    bundle: PathBuf,
    state: PathBuf,
}

impl Fixture {
    /// Unpacks busybox and writes a config.json running `args`.
    fn new(name: &str, args: &[&str]) -> Result<Fixture> {
        let dir = tempfile::Builder::new().prefix("berth-shim-").tempdir()?;
        let bundle = dir.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        fs::create_dir_all(&rootfs)?;
        let image = unpack_busybox(dir.path(), &rootfs)?;

        let container_id = format!("shim-{name}-{}", std::process::id());
        let opts = RunOptions {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..RunOptions::default()
        };
        let mut spec = build_spec("test", &container_id, &rootfs, &image, &opts)?;
        prepare_rootfs(&bundle, &rootfs, &mut spec)?;
        write_config(&bundle, &spec)?;
        Ok(Fixture {
            state: dir.path().join("state"),
            _dir: dir,
            container_id,
            bundle,
        })
    }

    async fn spawn(&self) -> Result<ShimClient, ShimClientError> {
        spawn_shim(
            &berth_testkit::shim_bin(),
            &self.container_id,
            &self.bundle,
            &self.state,
            None,
        )
        .await
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.state.join(name)).unwrap_or_default()
    }

    fn shim_pid(&self) -> Result<ShimPid> {
        ShimPid::read(&self.state)?.context("shim.pid missing")
    }

    /// Whether runc still knows the container under the shim's root.
    fn runc_knows(&self) -> bool {
        Command::new("runc")
            .arg("--root")
            .arg(self.state.join("runc"))
            .args(["state", &self.container_id])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for Fixture {
    /// A failed test must not leave its container or its shim running.
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(self.state.join("runc"))
            .args(["delete", "--force", &self.container_id])
            .output();
        if let Ok(Some(shim)) = ShimPid::read(&self.state) {
            if shim.is_alive() {
                // SAFETY: plain kill(2) of the shim this test started.
                unsafe { libc::kill(shim.pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Extracts the single layer of the busybox OCI archive into `rootfs` and
/// returns the image's config.
fn unpack_busybox(scratch: &Path, rootfs: &Path) -> Result<ImageConfig> {
    let layout = scratch.join("layout");
    fs::create_dir_all(&layout)?;
    run(Command::new("tar")
        .arg("-xf")
        .arg(BUSYBOX)
        .arg("-C")
        .arg(&layout))?;

    let blob = |digest: &str| layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index digest")?;
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blob(manifest_digest))?)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer digest")?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("config digest")?;

    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob(layer))
        .arg("-C")
        .arg(rootfs))?;
    let config: serde_json::Value = serde_json::from_slice(&fs::read(blob(config_digest))?)?;
    Ok(serde_json::from_value(config["config"].clone())?)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Children of `pid`, from `/proc/*/stat`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| parent_of(*p) == Some(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A started `echo hello` writes to stdout.log, exits 0, and delete removes
/// runc's state, the socket and the shim.
#[tokio::test]
async fn echo_output_reaches_stdout_log_and_delete_cleans_up() -> Result<()> {
    let fx = Fixture::new("echo", &["echo", "hello"])?;
    let shim = fx.spawn().await?;
    assert_eq!(shim.state().await?.status, TaskStatus::Created);
    let shim_pid = fx.shim_pid()?;
    assert!(shim_pid.is_alive());

    let pid = shim.start().await?;
    assert!(pid > 0);
    let exit = shim.wait().await?;
    assert_eq!(exit.status, 0);
    assert_eq!(fx.log("stdout.log"), "hello\n");
    assert_eq!(fx.log("stderr.log"), "");
    let state = shim.state().await?;
    assert_eq!(state.status, TaskStatus::Stopped);
    assert_eq!(state.exit, Some(exit));

    assert!(fx.runc_knows());
    shim.ack_exit().await?;
    let deleted = shim.delete().await?;
    assert_eq!(deleted.map(|e| e.status), Some(0));
    assert!(!fx.runc_knows());
    eventually("shim exit", || !shim_pid.is_alive()).await?;
    assert!(!fx.state.join("shim.sock").exists());
    assert!(!fx.state.join("shim.pid").exists());
    // Acknowledged, so the record goes with the shim.
    assert_eq!(read_exit(&fx.state)?, None);
    Ok(())
}

/// An exit code comes back as is, and exit.json holds it (unacknowledged, it
/// survives delete).
#[tokio::test]
async fn exit_code_is_recorded() -> Result<()> {
    let fx = Fixture::new("exit7", &["sh", "-c", "exit 7"])?;
    let shim = fx.spawn().await?;
    shim.start().await?;
    let exit = shim.wait().await?;
    assert_eq!(exit.status, 7);
    assert!(exit.exited_at > 0);
    assert_eq!(read_exit(&fx.state)?, Some(exit));

    shim.delete().await?;
    let kept = read_exit(&fx.state)?.context("exit.json removed before ack")?;
    assert_eq!(kept.status, 7);
    assert!(!kept.acked);
    Ok(())
}

/// `kill 9` ends the init with status 128 + 9, and a waiter on its own
/// connection is answered while other calls proceed.
#[tokio::test]
async fn sigkill_gives_137() -> Result<()> {
    let fx = Fixture::new("kill", &["sleep", "100"])?;
    let shim = fx.spawn().await?;
    shim.start().await?;
    let waiter = {
        let shim = shim.clone();
        tokio::spawn(async move { shim.wait().await })
    };
    assert_eq!(shim.state().await?.status, TaskStatus::Running);

    shim.kill(9, false).await?;
    let exit = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
    assert_eq!(exit.status, 137);
    shim.delete().await?;
    Ok(())
}

/// A child the init leaves behind is reaped: the shim has no children left
/// after the exit.
#[tokio::test]
async fn orphans_are_reaped() -> Result<()> {
    let fx = Fixture::new("orphan", &["sh", "-c", "sleep 100 & exit 0"])?;
    let shim = fx.spawn().await?;
    let shim_pid = fx.shim_pid()?.pid;
    shim.start().await?;
    assert_eq!(shim.wait().await?.status, 0);
    eventually("no children of the shim", || {
        children_of(shim_pid).is_empty()
    })
    .await?;
    shim.delete().await?;
    Ok(())
}

/// stdout and stderr go to separate files.
#[tokio::test]
async fn stdout_and_stderr_are_kept_apart() -> Result<()> {
    let fx = Fixture::new("stdio", &["sh", "-c", "echo out; echo err >&2; echo out2"])?;
    let shim = fx.spawn().await?;
    shim.start().await?;
    assert_eq!(shim.wait().await?.status, 0);
    assert_eq!(fx.log("stdout.log"), "out\nout2\n");
    assert_eq!(fx.log("stderr.log"), "err\n");
    shim.delete().await?;
    Ok(())
}

/// A missing executable is an error carrying runc's message, from spawn or
/// from start, not a made-up exit code.
#[tokio::test]
async fn missing_binary_is_an_error() -> Result<()> {
    let fx = Fixture::new("missing", &["/no/such/binary"])?;
    let message = match fx.spawn().await {
        Err(ShimClientError::Start { message, .. }) => message,
        Err(other) => bail!("unexpected spawn error: {other}"),
        Ok(shim) => {
            let err = shim.start().await.expect_err("start of a missing binary");
            let _ = shim.delete().await;
            match err {
                ShimClientError::Shim { message, .. } => message,
                other => bail!("unexpected start error: {other}"),
            }
        }
    };
    assert!(
        message.contains("no such file") || message.contains("not found"),
        "{message}"
    );
    Ok(())
}

/// The shim is detached: started through a shell that exits, it is not a
/// child of the test, and it still serves a full lifecycle.
#[tokio::test]
async fn shim_outlives_its_spawner() -> Result<()> {
    let fx = Fixture::new("detach", &["sh", "-c", "sleep 0.2; echo done"])?;
    let output = Command::new("sh")
        .arg("-c")
        .arg("\"$@\"; exit $?")
        .arg("sh")
        .arg(berth_testkit::shim_bin())
        .arg("--id")
        .arg(&fx.container_id)
        .arg("--bundle")
        .arg(&fx.bundle)
        .arg("--state")
        .arg(&fx.state)
        .output()?;
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"ready\":\"ok\""));

    let shim_pid = fx.shim_pid()?;
    assert!(shim_pid.is_alive());
    assert_ne!(parent_of(shim_pid.pid), Some(std::process::id()));
    let shim = ShimClient::connect(&fx.state).await?;
    shim.start().await?;
    assert_eq!(shim.wait().await?.status, 0);
    assert_eq!(fx.log("stdout.log"), "done\n");
    shim.delete().await?;
    Ok(())
}

/// A second shim for the same state refuses to steal a live shim's socket.
#[tokio::test]
async fn second_shim_on_a_live_socket_is_refused() -> Result<()> {
    let fx = Fixture::new("twice", &["sleep", "100"])?;
    let shim = fx.spawn().await?;
    match fx.spawn().await {
        Err(ShimClientError::Start { message, .. }) => {
            assert!(message.contains("already serves"), "{message}")
        }
        other => bail!("second shim was not refused: {other:?}"),
    }
    // The created, never started container is killed by delete.
    assert!(shim.delete().await?.is_some());
    assert!(!fx.runc_knows());
    Ok(())
}
