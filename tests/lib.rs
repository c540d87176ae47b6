//! The end-to-end harness: a node made of the real binaries (`berthd`,
//! `berth`, `berth-shim`) on a real nats-server and runc, in temporary
//! directories, torn down on drop with nothing left mounted or running.
//!
//! The binaries are the ones `cargo build --workspace` leaves next to the
//! test executables; `deploy/test.sh` builds them before the tests run.
//!
//! [`Node::start`] runs an open nats-server, as most tests need;
//! [`Node::start_with`] can secure it the way a fleet is secured: nkey
//! identities from `berthd gen-auth` with the server's `authorization`
//! block (each service as itself, `berth` as the admin), and TLS material
//! from `deploy/gen-tls.sh` with a server that verifies clients.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

pub use berth_testkit::{fixture, wait_until, NatsServer};

/// One test of a binary at a time: tests share the host's runc state,
/// cgroups and mounts. Held even after another test failed holding it.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A command's stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// One berth node: berthd with its own root and state, on its own nats-server.
pub struct Node {
    /// The NATS server.
    pub nats: NatsServer,
    /// The node id.
    pub node: String,
    dir: TempDir,
    berthd: Option<Child>,
    /// Flags every berthd start gets beyond the usual ones.
    berthd_args: Vec<String>,
    /// The connection flags every `berth` command gets (credentials, TLS).
    auth_args: Vec<String>,
    /// The TLS flags alone, which other identities need too.
    tls_args: Vec<String>,
    secured: bool,
    tls: bool,
}

/// How [`Node::start_with`] sets a node up; the default is [`Node::start`]'s.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Run the server with `berthd gen-auth` identities: every service
    /// connects as its own, `berth` as the admin. Tenants of these
    /// namespaces get identities too ([`Node::seed`] `tenant-<ns>.nk`).
    pub secured: bool,
    /// Namespaces whose tenants get identities (with `secured`).
    pub tenants: Vec<String>,
    /// Require TLS, with client certificates verified.
    pub tls: bool,
    /// More berthd flags.
    pub berthd_args: Vec<String>,
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
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
        Self::start_with(NodeOptions::default())
    }

    /// The node id every test node takes.
    pub fn default_node_id() -> String {
        format!("e2e-{}", std::process::id())
    }

    /// Starts a node set up as `options` says, and waits until its five
    /// services answer.
    pub fn start_with(options: NodeOptions) -> Result<Node> {
        let dir = berth_testkit::tempdir("berth-e2e-")?;
        let node = Self::default_node_id();
        let mut config = String::new();
        let mut berthd_args = options.berthd_args.clone();
        let mut auth_args = Vec::new();
        let mut tls_args = Vec::new();

        if options.secured {
            let auth = dir.path().join("auth");
            let mut gen = Command::new(binary("berthd")?);
            gen.arg("gen-auth").arg("--out").arg(&auth);
            gen.args(["--node", &node]);
            for tenant in &options.tenants {
                gen.args(["--tenant", tenant]);
            }
            let made = gen.output().context("run berthd gen-auth")?;
            if !made.status.success() {
                bail!(
                    "berthd gen-auth failed: {}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
            config.push_str(&fs::read_to_string(auth.join("nats-auth.conf"))?);
            berthd_args.push("--auth-dir".into());
            berthd_args.push(path_arg(&auth));
            auth_args.push("--nkey".into());
            auth_args.push(path_arg(&auth.join("admin.nk")));
        }
        if options.tls {
            let tls = dir.path().join("tls");
            let made = Command::new(deploy_dir().join("gen-tls.sh"))
                .arg(&tls)
                .output()
                .context("run deploy/gen-tls.sh")?;
            if !made.status.success() {
                bail!(
                    "gen-tls.sh failed: {}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
            config.push_str(&format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
                tls.join("server-cert.pem"),
                tls.join("server-key.pem"),
                tls.join("ca.pem"),
            ));
            for (flag, file) in [
                ("--tls-ca", "ca.pem"),
                ("--tls-cert", "client-cert.pem"),
                ("--tls-key", "client-key.pem"),
            ] {
                tls_args.push(flag.to_string());
                tls_args.push(path_arg(&tls.join(file)));
            }
            berthd_args.extend(tls_args.clone());
            auth_args.extend(tls_args.clone());
        }

        let nats = if config.is_empty() {
            NatsServer::start()?
        } else {
            NatsServer::start_with_config(&config)?
        };
        let mut this = Node {
            nats,
            node,
            dir,
            berthd: None,
            berthd_args,
            auth_args,
            tls_args,
            secured: options.secured,
            tls: options.tls,
        };
        this.start_berthd()?;
        Ok(this)
    }

    /// The seed file of an identity of a secured node (`admin.nk`,
    /// `observer.nk`, `tenant-a.nk`).
    pub fn seed(&self, file: &str) -> PathBuf {
        self.dir.path().join("auth").join(file)
    }

    /// The node's TLS material (`ca.pem`, `client-cert.pem`, ...).
    pub fn tls_file(&self, file: &str) -> PathBuf {
        self.dir.path().join("tls").join(file)
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
            .arg(berth_testkit::shim_bin())
            .args(["--gc-interval", "3600"])
            .args(&self.berthd_args)
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

    /// A `berth` command aimed at this node, for a test that spawns it
    /// itself (to signal it, or to read its output as it comes).
    pub fn berth_command(&self) -> Result<Command> {
        let auth = self.auth_args.clone();
        self.berth_command_as(&auth)
    }

    /// A `berth` command aimed at this node with the connection flags
    /// `auth` instead of the node's own (another identity, or none); the
    /// node's TLS flags are added when `auth` has none.
    pub fn berth_command_as(&self, auth: &[String]) -> Result<Command> {
        let mut command = Command::new(binary("berth")?);
        command
            .args(["--nats", &self.nats.url(), "--node", &self.node])
            .args(auth)
            .env_remove("BERTH_NATS_NKEY")
            .env("BERTH_ROOT", self.dir.path().join("no-root"))
            .stdin(Stdio::null());
        if !auth.iter().any(|arg| arg.starts_with("--tls")) {
            command.args(&self.tls_args);
        }
        Ok(command)
    }

    /// Runs `berth ARGS` as the identity whose seed file is `seed` (none
    /// for `None`) and returns its output.
    pub fn berth_as(&self, seed: Option<&Path>, args: &[&str]) -> Result<Output> {
        let auth = match seed {
            Some(seed) => vec!["--nkey".to_string(), path_arg(seed)],
            None => Vec::new(),
        };
        let output = self
            .berth_command_as(&auth)?
            .args(args)
            .output()
            .context("run berth")?;
        Ok(output)
    }

    /// Runs `berth ARGS` against this node and returns its output.
    pub fn berth(&self, args: &[&str]) -> Result<Output> {
        let output = self
            .berth_command()?
            .args(args)
            .output()
            .context("run berth")?;
        Ok(output)
    }

    /// Runs `berth ARGS`, which must exit with `code`; returns its output.
    pub fn berth_code(&self, args: &[&str], code: i32) -> Result<Output> {
        let output = self.berth(args)?;
        anyhow::ensure!(
            output.status.code() == Some(code),
            "berth {args:?} exited with {:?}, not {code}:\nstdout: {}\nstderr: {}\nberthd log:\n{}",
            output.status.code(),
            stdout(&output),
            stderr(&output),
            self.log()
        );
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

    /// A client of this node's NATS server, for the typed clients in
    /// `berth_bus::api`; calls time out after 30 s.
    pub async fn client(&self) -> Result<berth_bus::Client> {
        let mut config = berth_bus::ConnectConfig::new(&self.nats.url(), "berth-e2e");
        config.retry_initial_connect = true;
        if self.secured {
            config.nkey = Some(self.seed("admin.nk"));
        }
        if self.tls {
            config.tls_ca = Some(self.tls_file("ca.pem"));
            config.tls_cert = Some(self.tls_file("client-cert.pem"));
            config.tls_key = Some(self.tls_file("client-key.pem"));
        }
        let nats = berth_bus::connect_with_config(&config).await?;
        Ok(berth_bus::Client::new(nats, Duration::from_secs(30)))
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

/// A path as a command-line argument.
fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The cgroup directories runc made for a container and that are still
/// there: `berth/<namespace>/<container_id>` under each cgroup v1
/// controller, or under the unified v2 hierarchy.
pub fn berth_cgroups(namespace: &str, container_id: &str) -> Vec<PathBuf> {
    let own = Path::new("berth").join(namespace).join(container_id);
    let mut left = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join(&own).is_dir() {
        left.push(root.join(&own));
    }
    for controller in fs::read_dir(root).into_iter().flatten().flatten() {
        let path = controller.path().join(&own);
        if path.is_dir() {
            left.push(path);
        }
    }
    left
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

/// A tar of one file of 64 MiB of zeros, compressed by `encode` as a run
/// of members (gzip) or frames (zstd), which decoders read as one stream:
/// the header, 64 copies of one compressed MiB of zeros, the end blocks.
pub fn bomb(encode: impl Fn(&[u8]) -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    const MIB: usize = 1 << 20;
    let mut header = tar::Header::new_gnu();
    header.set_path("zeros")?;
    header.set_size(64 * MIB as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    let zeros = encode(&vec![0; MIB])?;
    let mut out = encode(header.as_bytes())?;
    for _ in 0..64 {
        out.extend_from_slice(&zeros);
    }
    out.extend(encode(&[0; 1024])?);
    Ok(out)
}

/// A gzip and a zstd [`bomb`], each with its name and its layer media type.
pub fn bomb_layers() -> Result<[(&'static str, Vec<u8>, &'static str); 2]> {
    let gzip = bomb(|data| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut encoder, data)?;
        Ok(encoder.finish()?)
    })?;
    let zstd = bomb(|data| Ok(zstd::encode_all(data, 3)?))?;
    Ok([
        ("gzip", gzip, "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("zstd", zstd, "application/vnd.oci.image.layer.v1.tar+zstd"),
    ])
}

/// The OCI digest (`sha256:<hex>`) of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes an OCI layout archive of one image (`latest`) with one layer;
/// `annotation` (when not empty) pads the manifest.
pub fn write_image(
    path: &Path,
    layer: &[u8],
    media_type: &str,
    diff_id: &str,
    annotation: &str,
) -> Result<()> {
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": { "Cmd": ["true"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    }))?;
    let mut manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": media_type,
            "digest": digest(layer),
            "size": layer.len(),
        }],
    });
    if !annotation.is_empty() {
        manifest["annotations"] = serde_json::json!({ "padding": annotation });
    }
    let manifest = serde_json::to_vec(&manifest)?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": "latest" },
        }],
    }))?;

    let mut builder = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |name: String, data: &[u8]| -> Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for blob in [layer, &config, &manifest] {
        let hex = digest(blob).trim_start_matches("sha256:").to_string();
        add(format!("blobs/sha256/{hex}"), blob)?;
    }
    builder.into_inner()?.sync_all()?;
    Ok(())
}

/// The OCI name of this host's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Waits until the node's content and snapshot stores hold nothing: the
/// failed import's blobs go with its lease, through gc.
pub fn nothing_stored(node: &Node) -> Result<()> {
    let root = node.root();
    let empty = || {
        Node::files_under(&root.join("content/blobs")).is_empty()
            && Node::files_under(&root.join("content/ingest")).is_empty()
            && std::fs::read_dir(root.join("snapshot/snapshots"))
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(true)
    };
    anyhow::ensure!(
        wait_until(Duration::from_secs(15), empty),
        "left behind: blobs {:?}, ingests {:?}, snapshots {:?}",
        Node::files_under(&root.join("content/blobs")),
        Node::files_under(&root.join("content/ingest")),
        Node::files_under(&root.join("snapshot/snapshots")),
    );
    let snapshots = node.berth_ok(&["snapshot", "ls", "--json"])?;
    anyhow::ensure!(!snapshots.contains("sha256:"), "{snapshots}");
    Ok(())
}
