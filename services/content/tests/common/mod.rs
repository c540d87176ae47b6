//! What the content service's integration tests share: a real nats-server,
//! the service in this process or as its own binary, and small clients.

#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use berth_bus::api::Content;
use berth_bus::{Client, Code};
use berth_proto::content as cpb;
use berth_testkit::NatsServer;

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes that look random and are the same on every run.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A nats-server and a content service root; the service runs in this
/// process until the harness is dropped.
pub struct Harness {
    /// The server.
    pub nats: NatsServer,
    /// Holds the content root.
    pub dir: TempDir,
    /// A client connection.
    pub client: Client,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    /// Starts nats-server and the content service, and waits until it serves.
    pub async fn start() -> Result<Harness> {
        let nats = NatsServer::start()?;
        let dir = berth_testkit::tempdir("berth-content-")?;
        let connection = berth_bus::connect(&nats.url(), "test").await?;
        let harness = Harness {
            client: Client::new(connection, Duration::from_secs(30)),
            nats,
            dir,
            shutdown: CancellationToken::new(),
        };
        let service = berth_bus::connect(&harness.nats.url(), "berth-content").await?;
        let config = berth_content::Config {
            root: harness.root(),
        };
        tokio::spawn(berth_content::run(
            service,
            config,
            harness.shutdown.clone(),
        ));
        wait_until_served(&harness.content("default")).await?;
        Ok(harness)
    }

    /// The content root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("content")
    }

    /// The content service of `namespace`.
    pub fn content(&self, namespace: &str) -> Content {
        Content {
            client: self.client.clone(),
            namespace: namespace.to_string(),
        }
    }
}

/// Calls until the service answers something other than "not running".
pub async fn wait_until_served(content: &Content) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match content.ingests(&cpb::IngestsRequest {}).await {
            Ok(_) => return Ok(()),
            Err(err) if err.code == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => bail!("content service not serving: {err}"),
        }
    }
}

/// Writes `data` as a blob under `reference` and commits it.
pub async fn push(content: &Content, reference: &str, data: &[u8]) -> berth_bus::Result<cpb::Info> {
    let open = cpb::OpenRequest {
        r#ref: reference.to_string(),
        expected_digest: sha256(data),
        expected_size: data.len() as i64,
        lease_id: String::new(),
    };
    let reply = content
        .push(&open, &mut Cursor::new(data), Default::default())
        .await?;
    Ok(reply.info.unwrap_or_default())
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Checks every blob file hashes to its name; returns their digests.
pub fn blob_files_are_sound(root: &Path) -> Result<Vec<String>> {
    let mut digests = Vec::new();
    for path in files_under(&root.join("blobs/sha256")) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let digest = format!("sha256:{name}");
        let data = std::fs::read(&path)?;
        if sha256(&data) != digest {
            bail!("blob file {} holds other bytes", path.display());
        }
        digests.push(digest);
    }
    Ok(digests)
}

/// The content service as its own process, for kill tests.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `berth-content` on `root` against `url`, logging to `log`.
    pub fn start(url: &str, root: &Path, log: &Path) -> Result<Process> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_berth-content"))
            .arg("--nats")
            .arg(url)
            .arg("--root")
            .arg(root)
            .env("BERTH_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("start berth-content")?;
        Ok(Process {
            child,
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
