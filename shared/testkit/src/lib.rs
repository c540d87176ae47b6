//! What berth's integration tests share.
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream on a free loopback
//!   port, its store in a temporary directory, killed on drop. It can be
//!   killed and started again on the same port and store, for outage tests.
//! - [`NatsCluster`]: three such servers routed into one cluster with
//!   JetStream clustered (streams can be kept on all three), any of which
//!   can be killed and started again.
//! - [`fixture`]: paths of the images and cases copied into `tests/fixtures`.
//!
//! The tests need `nats-server` (2.10 or later) and, where they run
//! containers, root and `runc` on PATH; `.ci/run` installs both.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// A nats-server with JetStream for one test, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    extra_config: Option<String>,
}

impl NatsServer {
    /// Starts a server on a free port with a fresh store.
    pub fn start() -> Result<NatsServer> {
        Self::start_inner(None)
    }

    /// Starts a server with `config` appended to its configuration file
    /// (nats-server config syntax), e.g. an `authorization` block.
    pub fn start_with_config(config: &str) -> Result<NatsServer> {
        Self::start_inner(Some(config.to_string()))
    }

    fn start_inner(extra_config: Option<String>) -> Result<NatsServer> {
        let dir = tempfile::Builder::new().prefix("berth-nats-").tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = NatsServer {
            child: None,
            port,
            dir,
            extra_config,
        };
        server.restart()?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's store and configuration.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL and waits for it; a no-op when stopped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// (Re)starts the server on the same port and store, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let store = self.dir.path().join("jetstream");
        let config = self.dir.path().join("nats.conf");
        let mut text = format!(
            "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}\n}}\n",
            self.port, store
        );
        if let Some(extra) = &self.extra_config {
            text.push_str(extra);
            text.push('\n');
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(self.dir.path().join("nats.log"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nats-server (is it on PATH? .ci/run installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
                bail!("nats-server exited with {status}: {log}");
            }
            if Instant::now() > deadline {
                bail!("nats-server did not listen on port {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nats-servers in one cluster (`berth`), JetStream clustered, each
/// on its own free client and route ports with its own store; killed on
/// drop.
pub struct NatsCluster {
    servers: Vec<ClusterServer>,
    dir: TempDir,
}

struct ClusterServer {
    child: Option<Child>,
    port: u16,
    route_port: u16,
}

impl NatsCluster {
    /// How many servers the cluster has.
    pub const SIZE: usize = 3;

    /// Starts the three servers and waits until they elected a JetStream
    /// metadata leader (streams can be made then).
    pub fn start() -> Result<NatsCluster> {
        let dir = tempfile::Builder::new()
            .prefix("berth-nats-cluster-")
            .tempdir()?;
        // Hold every listener until all ports are chosen, so none repeats.
        let listeners: Vec<TcpListener> = (0..Self::SIZE * 2)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<_>>()?;
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<_>>()?;
        drop(listeners);
        let servers = (0..Self::SIZE)
            .map(|i| ClusterServer {
                child: None,
                port: ports[i],
                route_port: ports[Self::SIZE + i],
            })
            .collect();
        let mut cluster = NatsCluster { servers, dir };
        for i in 0..Self::SIZE {
            cluster.spawn(i)?;
        }
        for i in 0..Self::SIZE {
            cluster.wait_listening(i)?;
        }
        let elected = wait_until(Duration::from_secs(30), || {
            (0..Self::SIZE).any(|i| cluster.log(i).contains("new metadata leader"))
        });
        if !elected {
            bail!(
                "the NATS cluster elected no JetStream leader within 30 s:\n{}",
                cluster.log(0)
            );
        }
        Ok(cluster)
    }

    /// The client URL of server `i`.
    pub fn url_of(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].port)
    }

    /// Every server's client URL, comma-separated (what berth's `--nats`
    /// takes for a cluster).
    pub fn urls(&self) -> String {
        (0..Self::SIZE)
            .map(|i| self.url_of(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("s{i}.log"))).unwrap_or_default()
    }

    /// Kills server `i` with SIGKILL and waits for it; a no-op when stopped.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports and store, and waits until it
    /// listens (it then catches up with the cluster on its own).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_listening(i)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let routes: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("nats-route://127.0.0.1:{}", s.route_port))
            .collect();
        let config = self.dir.path().join(format!("s{i}.conf"));
        let text = format!(
            "server_name: s{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}\n}}\n\
             cluster {{\n  name: berth\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
            self.servers[i].port,
            self.dir.path().join(format!("js{i}")),
            self.servers[i].route_port,
            routes.join(", ")
        );
        std::fs::write(&config, text)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("s{i}.log")))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nats-server (is it on PATH? .ci/run installs it)")?;
        self.servers[i].child = Some(child);
        Ok(())
    }

    fn wait_listening(&mut self, i: usize) -> Result<()> {
        let port = self.servers[i].port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.servers[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("nats-server s{i} exited with {status}: {}", self.log(i));
            }
            if Instant::now() > deadline {
                bail!("nats-server s{i} did not listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..Self::SIZE {
            self.kill(i);
        }
    }
}

/// Paths of the fixtures in `tests/fixtures`.
pub mod fixture {
    use std::path::{Path, PathBuf};

    /// `tests/fixtures` of the repository.
    pub fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    /// An image archive, e.g. `image("busybox/busybox.oci.tar")`.
    pub fn image(path: &str) -> PathBuf {
        root().join("images").join(path)
    }

    /// A case's directory, e.g. `case("C10-content-integrity")`.
    pub fn case(name: &str) -> PathBuf {
        root().join("cases").join(name)
    }

    /// The 51 MB Debian image, read from `../shared` where present (it is
    /// too large to copy into the repository).
    pub fn debian() -> Option<PathBuf> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/images/debian/debian.oci.tar");
        path.exists().then_some(path)
    }
}

/// Waits until `check` is true, polling every 10 ms, for at most `limit`.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when this process runs as root (mounts, runc, cgroups need it).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// A temporary directory named for the test, removed on drop.
pub fn tempdir(prefix: &str) -> Result<TempDir> {
    Ok(tempfile::Builder::new().prefix(prefix).tempdir()?)
}

/// The `berth-shim` the tests run: `$BERTH_SHIM` when set (deploy/test.sh
/// sets it to the statically linked shim of deploy/build-shim.sh, the one
/// that ships), else the workspace's own build. Panics with how to build it
/// when it is missing, since no task test can run without one.
pub fn shim_bin() -> PathBuf {
    let path = std::env::var_os("BERTH_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_bin("berth-shim"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (deploy/test.sh does)",
        path.display()
    );
    path
}

/// Absolute path of a binary built by the workspace (`target/<profile>/NAME`),
/// next to the running test executable.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    dir.join(name)
}
