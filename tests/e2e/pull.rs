//! `berth image pull` against a real registry: Debian's `docker-registry`
//! (distribution) on loopback, filled with skopeo from the fixture images,
//! pulled by a real berthd on its own nats-server and run with runc. Each
//! test checks what a user would: exit codes and messages, the output of
//! the pulled image, `image ls`, the registry's access log.
//! Needs root, runc, nats-server, docker-registry, skopeo and htpasswd
//! (deploy/install-deps.sh installs them).
//!
//! Each test starts its own node and registry, and takes a lock, since
//! containers of tests running at once would share the process's node id.
//!
//! Distribution itself neither takes nor serves a manifest over 4 MiB
//! ("read exceeds limit"), so the 32 MiB manifest comes from a hostile
//! relay in front of the real registry, which answers one repository's
//! manifest itself and passes every other request on.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

use berth_proto::content as cpb;
use berth_tests::{
    bomb_layers, digest, fixture, host_arch, nothing_stored, serial, stderr, stdout, wait_until,
    write_image, Node, NodeOptions,
};

/// The names `berth image ls` lists.
fn image_names(node: &Node) -> Result<Vec<String>> {
    let text = node.berth_ok(&["--json", "image", "ls"])?;
    let listed: serde_json::Value = serde_json::from_str(&text)?;
    Ok(listed
        .as_array()
        .context("image ls is not a list")?
        .iter()
        .filter_map(|image| image["name"].as_str().map(str::to_string))
        .collect())
}

/// The digests `berth content ls` lists.
fn content_digests(node: &Node) -> Result<String> {
    node.berth_ok(&["--json", "content", "ls"])
}

fn expected(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(fixture::image(path))?)
}

/// A port nothing listens on now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A file of an OCI archive.
fn archive_file(archive: &Path, name: &str) -> Result<Vec<u8>> {
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.path()?.to_string_lossy() == name {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            return Ok(data);
        }
    }
    bail!("{} holds no {name}", archive.display())
}

/// The digest of what an OCI archive's index names first: the manifest or
/// index the registry serves for it, byte for byte.
fn top_digest(archive: &Path) -> Result<String> {
    let index: serde_json::Value = serde_json::from_slice(&archive_file(archive, "index.json")?)?;
    Ok(index["manifests"][0]["digest"]
        .as_str()
        .context("index names no manifest")?
        .to_string())
}

/// The manifest of a single-image OCI archive.
fn manifest_of(archive: &Path) -> Result<serde_json::Value> {
    let digest = top_digest(archive)?;
    let hex = digest.trim_start_matches("sha256:");
    Ok(serde_json::from_slice(&archive_file(
        archive,
        &format!("blobs/sha256/{hex}"),
    )?)?)
}

/// One docker-registry on 127.0.0.1, with its storage, config and log in a
/// temporary directory; killed on drop.
struct Registry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry; with `htpasswd`, one that wants basic
    /// authentication against that file. The access log is on.
    fn start(htpasswd: Option<&Path>) -> Result<Registry> {
        let dir = berth_testkit::tempdir("berth-registry-")?;
        let port = free_port()?;
        let auth = match htpasswd {
            Some(file) => format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                file.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut registry = Registry {
            dir,
            port,
            child: None,
        };
        registry.spawn()?;
        Ok(registry)
    }

    /// Starts the registry process (again), appending to its log, and
    /// waits until it answers.
    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry (apt-get install docker-registry)")?;
        self.child = Some(child);
        let port = self.port;
        if !wait_until(Duration::from_secs(20), || {
            http_status(port, "/v2/").is_some()
        }) {
            bail!("docker-registry did not answer:\n{}", self.log());
        }
        Ok(())
    }

    /// Kills the registry at once, as a crash would (no line is logged for
    /// a request it was serving).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `127.0.0.1:<port>`.
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Copies `source` (a skopeo transport:path) to `repo:tag` here.
    fn push(&self, source: &str, target: &str, extra: &[&str]) -> Result<()> {
        let output = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(source)
            .arg(format!("docker://{}/{target}", self.host()))
            .stdin(Stdio::null())
            .output()
            .context("run skopeo (apt-get install skopeo)")?;
        ensure!(
            output.status.success(),
            "skopeo copy {source} {target} failed: {}",
            stderr(&output)
        );
        Ok(())
    }

    /// Pushes a fixture archive (`busybox/busybox.oci.tar`).
    fn push_fixture(&self, archive: &str, target: &str, extra: &[&str]) -> Result<()> {
        let path = fixture::image(archive);
        let transport = if archive.ends_with(".docker.tar") {
            format!("docker-archive:{}", path.display())
        } else {
            format!("oci-archive:{}:latest", path.display())
        };
        self.push(&transport, target, extra)
    }

    /// The manifest the registry serves for `repo:tag`.
    fn manifest(&self, image: &str) -> Result<serde_json::Value> {
        let output = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{}/{image}", self.host()))
            .stdin(Stdio::null())
            .output()
            .context("run skopeo")?;
        ensure!(
            output.status.success(),
            "skopeo inspect {image}: {}",
            stderr(&output)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// The registry's file holding the blob `digest`.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Status and body size of every GET of the blob `digest` of `repo`
    /// the access log shows.
    fn blob_gets(&self, repo: &str, digest: &str) -> Vec<(u16, u64)> {
        let request = format!("\"GET /v2/{repo}/blobs/{digest} ");
        self.log()
            .lines()
            .filter_map(|line| {
                let after = &line[line.find(&request)? + request.len()..];
                let mut fields = after[after.find('"')? + 1..].split_whitespace();
                let status = fields.next()?.parse().ok()?;
                let size = fields.next()?.parse().ok()?;
                Some((status, size))
            })
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The HTTP status a GET of `path` on 127.0.0.1:`port` answers, if any.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A TCP relay in front of a registry that sends the registry's answers
/// on at most `rate` bytes a second (0: at once), so that a test can stop
/// the registry in the middle of a blob. Each side's end ends the other.
struct Throttle {
    port: u16,
    rate: Arc<AtomicU64>,
}

impl Throttle {
    fn start(upstream: u16, rate: u64) -> Result<Throttle> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let rate = Arc::new(AtomicU64::new(rate));
        let shared = rate.clone();
        // The thread lives as long as the test process: it only relays.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let rate = shared.clone();
                std::thread::spawn(move || relay(client, upstream, rate));
            }
        });
        Ok(Throttle { port, rate })
    }

    fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::SeqCst);
    }
}

fn relay(client: TcpStream, upstream: u16, rate: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    let (mut server, mut client) = (server, client);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client.write_all(&buf[..n]).is_err() {
            break;
        }
        let rate = rate.load(Ordering::SeqCst);
        if rate > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Pulls `reference` (with `extra` flags before it) and checks it prints
/// `pulled <name> (<digest>)`; returns the digest.
fn pull(node: &Node, extra: &[&str], reference: &str) -> Result<String> {
    let mut args = vec!["--timeout", "60", "image", "pull"];
    args.extend_from_slice(extra);
    args.push(reference);
    let printed = node.berth_ok(&args)?;
    let digest = printed
        .trim()
        .strip_prefix("pulled ")
        .and_then(|rest| rest.rsplit_once(" ("))
        .and_then(|(_, digest)| digest.strip_suffix(')'))
        .with_context(|| format!("pull {reference} printed {printed:?}"))?;
    Ok(digest.to_string())
}

/// busybox (OCI and Docker schema 2), the six-layer image and the
/// multi-platform index pulled by tag and by digest from a plain
/// loopback registry: each runs and prints what its fixture says, the
/// index gives this host's platform, and the digests printed are the
/// registry's. A missing tag and a missing repository are clear errors
/// that record nothing; pulling again reuses everything.
#[test]
fn pulls_by_tag_and_digest_and_runs() -> Result<()> {
    let _serial = serial();
    let registry = Registry::start(None)?;
    registry.push_fixture("busybox/busybox.oci.tar", "busybox:latest", &[])?;
    registry.push_fixture("busybox/busybox.docker.tar", "busybox:docker", &[])?;
    registry.push_fixture("layers/layers.oci.tar", "layers:latest", &[])?;
    registry.push_fixture(
        "multiarch/multiarch.oci.tar",
        "multiarch:latest",
        &["--all"],
    )?;
    let node = Node::start()?;
    let host = registry.host();
    let busybox = expected("busybox/expected-output.txt")?;

    let cases = [
        ("busybox:latest", "busybox/busybox.oci.tar", "busybox"),
        ("busybox:docker", "", "busybox"),
        ("layers:latest", "layers/layers.oci.tar", "layers"),
        (
            "multiarch:latest",
            "multiarch/multiarch.oci.tar",
            "multiarch",
        ),
    ];
    for (tag, archive, fixture_dir) in cases {
        let want = expected(&format!("{fixture_dir}/expected-output.txt"))?;
        let reference = format!("{host}/{tag}");
        let digest = pull(&node, &[], &reference)?;
        if !archive.is_empty() {
            let pushed = top_digest(&fixture::image(archive))?;
            ensure!(digest == pushed, "{tag}: pulled {digest}, pushed {pushed}");
        }
        let output = node.berth_code(&["run", "--rm", &reference], 0)?;
        ensure!(
            stdout(&output) == want,
            "{tag} printed:\n{}",
            stdout(&output)
        );

        // The same image by digest, on a fresh node's worth of names: the
        // record is named by the digest and runs too.
        let name = tag.split(':').next().unwrap_or(tag);
        let pinned = format!("{host}/{name}@{digest}");
        ensure!(pull(&node, &[], &pinned)? == digest, "{pinned}");
        let output = node.berth_code(&["run", "--rm", &pinned], 0)?;
        ensure!(
            stdout(&output) == want,
            "{pinned} printed:\n{}",
            stdout(&output)
        );
    }
    let names = image_names(&node)?;
    for want in [
        format!("{host}/busybox:latest"),
        format!("{host}/layers:latest"),
        format!("{host}/multiarch:latest"),
    ] {
        ensure!(names.contains(&want), "image ls lacks {want}: {names:?}");
    }

    // The index resolved to this host's platform, and the record's target
    // is the index itself.
    let text = node.berth_ok(&["--json", "image", "inspect", &format!("{host}/multiarch")])?;
    let inspected: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(
        inspected[0]["config"]["architecture"] == host_arch(),
        "{inspected}"
    );
    ensure!(
        inspected[0]["target"]["mediaType"] == "application/vnd.oci.image.index.v1+json",
        "{inspected}"
    );

    // Pulling again fetches nothing and still runs.
    pull(&node, &[], &format!("{host}/busybox"))?;
    let output = node.berth_code(&["run", "--rm", &format!("{host}/busybox")], 0)?;
    ensure!(stdout(&output) == busybox);

    // Missing tag, missing repository: errors saying so, nothing recorded.
    let before = image_names(&node)?;
    for missing in [format!("{host}/busybox:nope"), format!("{host}/nothing")] {
        let output = node.berth_code(&["image", "pull", &missing], 125)?;
        ensure!(
            stderr(&output).contains("not found"),
            "{missing}: {}",
            stderr(&output)
        );
    }
    ensure!(image_names(&node)? == before);

    // A malformed reference is refused before anything is asked.
    let output = node.berth_code(&["image", "pull", "Bad//Name"], 125)?;
    ensure!(
        stderr(&output).contains("invalid image name"),
        "{}",
        stderr(&output)
    );
    Ok(())
}

/// A registry behind an htpasswd file: refused without credentials and
/// with wrong ones (each said plainly), pulled with `--user`, with
/// `--password-stdin`, and with a docker config.json's `auths`.
#[test]
fn basic_auth_refused_without_credentials_works_with() -> Result<()> {
    let _serial = serial();
    let dir = berth_testkit::tempdir("berth-pull-auth-")?;
    let htpasswd = dir.path().join("htpasswd");
    let made = Command::new("htpasswd")
        .args(["-Bbc"])
        .arg(&htpasswd)
        .args(["puller", "s3cret"])
        .output()
        .context("run htpasswd (apt-get install apache2-utils)")?;
    ensure!(made.status.success(), "htpasswd: {}", stderr(&made));
    let registry = Registry::start(Some(&htpasswd))?;
    registry.push_fixture(
        "busybox/busybox.oci.tar",
        "private/busybox:latest",
        &["--dest-creds", "puller:s3cret"],
    )?;
    let node = Node::start()?;
    let reference = format!("{}/private/busybox:latest", registry.host());
    let busybox = expected("busybox/expected-output.txt")?;
    // No docker config of the test user's may lend credentials.
    let no_config = dir.path().join("empty.json");
    std::fs::write(&no_config, r#"{"auths":{}}"#)?;
    let no_config = no_config.to_str().context("path")?;

    let output = node.berth_code(
        &["image", "pull", "--registry-config", no_config, &reference],
        125,
    )?;
    ensure!(
        stderr(&output).contains("asks for credentials"),
        "{}",
        stderr(&output)
    );
    let output = node.berth_code(
        &["image", "pull", "--user", "puller:wrong", &reference],
        125,
    )?;
    ensure!(
        stderr(&output).contains("refused the credentials"),
        "{}",
        stderr(&output)
    );
    ensure!(image_names(&node)?.is_empty(), "{:?}", image_names(&node)?);

    pull(&node, &["--user", "puller:s3cret"], &reference)?;
    let output = node.berth_code(&["run", "--rm", &reference], 0)?;
    ensure!(stdout(&output) == busybox, "{}", stdout(&output));

    // The password on stdin, as scripts pass secrets.
    node.berth_ok(&["image", "rm", &reference])?;
    let mut child = node
        .berth_command()?
        .args([
            "image",
            "pull",
            "--user",
            "puller",
            "--password-stdin",
            &reference,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"s3cret\n")?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "{}", stderr(&output));
    ensure!(image_names(&node)?.contains(&reference));

    // A docker config.json entry for the registry.
    node.berth_ok(&["image", "rm", &reference])?;
    let config = dir.path().join("config.json");
    // base64 of "puller:s3cret".
    std::fs::write(
        &config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"cHVsbGVyOnMzY3JldA=="}}}}}}"#,
            registry.host()
        ),
    )?;
    let config = config.to_str().context("path")?;
    pull(&node, &["--registry-config", config], &reference)?;
    let output = node.berth_code(&["run", "--rm", &reference], 0)?;
    ensure!(stdout(&output) == busybox, "{}", stdout(&output));
    Ok(())
}

/// The size of the large layer's one file.
const BIG: usize = 40 << 20;

/// Writes an OCI layout of busybox with one more layer on top: an
/// uncompressed tar holding `/big.bin`, BIG bytes that do not compress.
/// Returns the directory and the digest of `/big.bin`.
fn large_image(dir: &Path) -> Result<(PathBuf, String)> {
    let layout = dir.join("large");
    let source = fixture::image("busybox/busybox.oci.tar");
    tar::Archive::new(std::fs::File::open(&source)?).unpack(&layout)?;
    let blobs = layout.join("blobs/sha256");
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };

    // xorshift: random enough that no compression or dedup helps.
    let mut data = vec![0u8; BIG];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let file_digest = hex::encode(Sha256::digest(&data));
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(BIG as u64);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    layer.append_data(&mut header, "big.bin", data.as_slice())?;
    let layer = layer.into_inner()?;
    let (layer_digest, layer_size) = put(&layer)?;

    let mut manifest = manifest_of(&source)?;
    let config_hex = manifest["config"]["digest"]
        .as_str()
        .context("config")?
        .trim_start_matches("sha256:")
        .to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blobs.join(&config_hex))?)?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(layer_digest.clone().into());
    let (config_digest, config_size) = put(&serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"]
        .as_array_mut()
        .context("layers")?
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }));
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok((layout, file_digest))
}

/// The registry is stopped in the middle of a large layer: the pull fails
/// saying it broke off and records no image. Restarted, a second pull
/// goes on from where the first stopped (a range request for the rest),
/// fetches no finished blob again (one GET each in the access log), and
/// the image runs with the whole file. Progress is followed on the bus as
/// any client would, on a node with per-service NATS identities, so the
/// content service's permission to publish it is checked too.
#[test]
fn interrupted_pull_resumes_without_fetching_twice() -> Result<()> {
    let _serial = serial();
    let dir = berth_testkit::tempdir("berth-pull-large-")?;
    let (layout, file_digest) = large_image(dir.path())?;
    let mut registry = Registry::start(None)?;
    registry.push(
        &format!("oci:{}:latest", layout.display()),
        "large:latest",
        &[],
    )?;
    // skopeo compresses the plain layer on the way: the registry's
    // manifest is the one to go by.
    let large_manifest = registry.manifest("large:latest")?;
    let config = large_manifest["config"]["digest"]
        .as_str()
        .context("config")?
        .to_string();
    let base_layer = large_manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_string();
    let big_layer = large_manifest["layers"][1]["digest"]
        .as_str()
        .context("layer")?
        .to_string();
    let big_size = large_manifest["layers"][1]["size"]
        .as_u64()
        .context("size")?;
    // 8 MiB/s: the big layer takes five seconds, time to stop the
    // registry in its middle.
    let throttle = Throttle::start(registry.port, 8 << 20)?;
    let node = Node::start_with(NodeOptions {
        secured: true,
        tenants: vec!["a".to_string()],
        ..Default::default()
    })?;
    let reference = format!("127.0.0.1:{}/large:latest", throttle.port);

    let runtime = tokio::runtime::Runtime::new()?;
    let (first, seen) = runtime.block_on(async {
        let client = node.client().await?;
        let mut progress = client
            .nats()
            .subscribe("berth.v1.default.content.pull.progress.*")
            .await?;
        let child = node
            .berth_command()?
            .args(["--timeout", "60", "image", "pull", &reference])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Until the base layer is in and the big one is well under way.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (mut seen, mut last) = (None, None);
        while seen.is_none() {
            let Ok(message) = tokio::time::timeout_at(deadline, progress.next()).await else {
                let mut child = child;
                let _ = child.kill();
                let output = child.wait_with_output()?;
                bail!(
                    "no progress message showed the big layer under way; the last: {last:?}\n\
                     pull: {}\nberthd log:\n{}",
                    stderr(&output),
                    node.log()
                );
            };
            let message = message.context("progress subscription ended")?;
            let status = cpb::PullStatus::decode(message.payload)?;
            last = Some(status.clone());
            let state = |digest: &str| status.blobs.iter().find(|b| b.digest == digest).cloned();
            if let (Some(base), Some(big)) = (state(&base_layer), state(&big_layer)) {
                let in_store = [
                    cpb::BlobState::Committed as i32,
                    cpb::BlobState::Exists as i32,
                ];
                if in_store.contains(&base.state) && big.offset >= 4 << 20 {
                    seen = Some((status.name.clone(), big.offset as u64));
                }
            }
        }
        anyhow::Ok((child, seen))
    })?;
    let (name, offset_seen) = seen.context("progress")?;
    ensure!(name == reference, "progress names {name}");
    registry.kill();

    // The first pull ends with the registry's breaking off.
    let mut first = first;
    let started = Instant::now();
    while first.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(90) {
            let _ = first.kill();
            bail!("the pull did not end after the registry stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = first.wait_with_output()?;
    ensure!(
        output.status.code() == Some(125),
        "first pull: {:?} {}",
        output.status,
        stderr(&output)
    );
    let said = stderr(&output);
    ensure!(
        !image_names(&node)?.contains(&reference),
        "an interrupted pull recorded the image"
    );
    // "broke off at byte N of SIZE": what the content service kept.
    let held: u64 = said
        .split("broke off at byte ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("the first pull did not say where it broke off: {said}"))?;
    ensure!(
        held >= offset_seen && held < big_size,
        "held {held} of {big_size}, {offset_seen} seen"
    );

    // Its lease stays, marked, so that gc leaves what it committed.
    let interrupted = |node: &Node| -> Result<usize> {
        let leases: serde_json::Value =
            serde_json::from_str(&node.berth_ok(&["--json", "lease", "ls"])?)?;
        Ok(leases
            .as_array()
            .context("lease ls")?
            .iter()
            .filter(|lease| lease["labels"]["berth.io/interrupted-pull"] == reference.as_str())
            .count())
    };
    ensure!(
        interrupted(&node)? == 1,
        "no lease marks the interrupted pull"
    );
    // The base layer was unpacked while the big one was still arriving.
    let unpacked = wait_until(Duration::from_secs(10), || {
        node.berth_ok(&["--json", "snapshot", "ls"])
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|list| list.as_array().cloned())
            .is_some_and(|list| list.iter().any(|s| s["kind"] == "committed"))
    });
    ensure!(
        unpacked,
        "no layer was unpacked during the interrupted pull"
    );

    // Back up, and at full speed; the finished pull drops that lease.
    registry.spawn()?;
    throttle.set_rate(0);
    pull(&node, &[], &reference)?;
    ensure!(
        interrupted(&node)? == 0,
        "the interrupted pull's lease stayed"
    );

    // Every blob but the big layer was fetched once over both pulls; the
    // big layer's only logged GET is the second pull's range request for
    // what the first did not get (the first was cut off unlogged).
    for digest in [config.as_str(), base_layer.as_str()] {
        let gets = registry.blob_gets("large", digest);
        ensure!(
            gets.len() == 1,
            "{digest} fetched {} times: {gets:?}\n{}",
            gets.len(),
            registry.log()
        );
    }
    let gets = registry.blob_gets("large", &big_layer);
    ensure!(
        gets.len() == 1 && gets[0].0 == 206 && gets[0].1 == big_size - held,
        "the big layer ({big_size} bytes, {held} held after the first pull) was fetched as \
         {gets:?}"
    );

    let output = node.berth_code(
        &[
            "run",
            "--rm",
            &reference,
            "sh",
            "-c",
            "wc -c < /big.bin; sha256sum /big.bin",
        ],
        0,
    )?;
    let printed = stdout(&output);
    ensure!(
        printed == format!("{BIG}\n{file_digest}  /big.bin\n"),
        "printed {printed}"
    );

    // A tenant pulls into its own namespace, and its own connection
    // follows the pull's progress on the subject its identity may read.
    registry.push_fixture("busybox/busybox.oci.tar", "busybox:latest", &[])?;
    let tenant = node.seed("tenant-a.nk");
    let busybox = format!("127.0.0.1:{}/busybox:latest", throttle.port);
    runtime.block_on(async {
        let mut config = berth_bus::ConnectConfig::new(&node.nats.url(), "tenant-follower");
        config.nkey = Some(tenant.clone());
        let nats = berth_bus::connect_with_config(&config).await?;
        let mut progress = nats.subscribe("berth.v1.a.content.pull.progress.*").await?;
        nats.flush().await?;
        let output = node.berth_as(Some(&tenant), &["-n", "a", "image", "pull", &busybox])?;
        ensure!(
            output.status.success() && stdout(&output).starts_with("pulled "),
            "tenant pull: {} {}",
            stdout(&output),
            stderr(&output)
        );
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(message) = progress.next().await {
                let status = cpb::PullStatus::decode(message.payload).ok()?;
                if status.phase == cpb::PullPhase::Done as i32 {
                    return Some(status);
                }
            }
            None
        })
        .await;
        match done {
            Ok(Some(status)) => ensure!(status.name == busybox, "{status:?}"),
            other => bail!("the tenant saw no progress of its pull: {other:?}"),
        }
        anyhow::Ok(())
    })?;
    let output = node.berth_as(Some(&tenant), &["-n", "a", "run", "--rm", &busybox])?;
    ensure!(
        stdout(&output) == expected("busybox/expected-output.txt")?,
        "tenant run: {} {}",
        stdout(&output),
        stderr(&output)
    );
    Ok(())
}

/// A layer whose bytes in the registry's storage were changed (same size)
/// is refused at pull with a message naming the digest: no image, no
/// such blob in the store. Put right, the same pull works: the store kept
/// nothing of the bad bytes.
#[test]
fn tampered_blob_is_refused() -> Result<()> {
    let _serial = serial();
    let registry = Registry::start(None)?;
    registry.push_fixture("busybox/busybox.oci.tar", "tampered:latest", &[])?;
    let manifest = manifest_of(&fixture::image("busybox/busybox.oci.tar"))?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_string();
    let file = registry.blob_file(&layer);
    let good = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0xff;
    std::fs::write(&file, &bad)?;

    let node = Node::start()?;
    let reference = format!("{}/tampered:latest", registry.host());
    let output = node.berth_code(&["image", "pull", &reference], 125)?;
    let said = stderr(&output);
    ensure!(
        said.contains(&layer) && said.contains("refused") && said.contains("digest mismatch"),
        "pull of a tampered blob said: {said}"
    );
    ensure!(image_names(&node)?.is_empty(), "{:?}", image_names(&node)?);
    let blobs = content_digests(&node)?;
    ensure!(!blobs.contains(&layer), "the store holds {layer}: {blobs}");

    std::fs::write(&file, &good)?;
    pull(&node, &[], &reference)?;
    let output = node.berth_code(&["run", "--rm", &reference], 0)?;
    ensure!(stdout(&output) == expected("busybox/expected-output.txt")?);
    Ok(())
}

/// `PUT`s a manifest into a registry with the HTTP the distribution
/// protocol describes; returns the status.
fn put_manifest(port: u16, repo_tag: &str, media_type: &str, body: &[u8]) -> Result<u16> {
    let (repo, tag) = repo_tag.split_once(':').context("repo:tag")?;
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "PUT /v2/{repo}/manifests/{tag} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Type: {media_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    answer
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("registry answered {answer:?}"))
}

/// A manifest naming a layer of a media type no image format has is
/// refused at pull with a message naming that type, and nothing is
/// recorded.
#[test]
fn unknown_media_type_is_refused() -> Result<()> {
    let _serial = serial();
    let registry = Registry::start(None)?;
    registry.push_fixture("busybox/busybox.oci.tar", "odd:base", &[])?;
    let mut manifest = manifest_of(&fixture::image("busybox/busybox.oci.tar"))?;
    manifest["layers"][0]["mediaType"] = "application/x-berth-unheard-of".into();
    let status = put_manifest(
        registry.port,
        "odd:latest",
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest)?,
    )?;
    ensure!(
        status == 201,
        "the registry answered the manifest with {status}"
    );

    let node = Node::start()?;
    let reference = format!("{}/odd:latest", registry.host());
    let output = node.berth_code(&["image", "pull", &reference], 125)?;
    let said = stderr(&output);
    ensure!(
        said.contains("application/x-berth-unheard-of"),
        "pull of an unknown media type said: {said}"
    );
    ensure!(image_names(&node)?.is_empty(), "{:?}", image_names(&node)?);
    Ok(())
}

/// In front of a real registry, a registry turned hostile for one
/// repository: it answers that repository's manifest GETs itself with
/// `body` (declaring its length or not) and passes every other request on.
/// One request per connection, so that none slips past on a kept-alive
/// one; `sent` counts the bytes of `body` the client took.
struct HostileManifest {
    port: u16,
    sent: Arc<AtomicU64>,
}

impl HostileManifest {
    fn start(upstream: u16, repo: &str, body: Vec<u8>, declare_length: bool) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let sent = Arc::new(AtomicU64::new(0));
        let (shared, body) = (sent.clone(), Arc::new(body));
        let prefix = format!("GET /v2/{repo}/manifests/");
        // Lives as long as the test process, as the throttle does.
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (sent, body, prefix) = (shared.clone(), body.clone(), prefix.clone());
                std::thread::spawn(move || {
                    let _ = answer(client, upstream, &prefix, &body, declare_length, &sent);
                });
            }
        });
        Ok(HostileManifest { port, sent })
    }
}

/// Serves one request of a [`HostileManifest`] connection.
fn answer(
    mut client: TcpStream,
    upstream: u16,
    prefix: &str,
    body: &[u8],
    declare_length: bool,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    // A pull sends GETs only: the request is its head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with(prefix) {
        let length = if declare_length {
            format!("Content-Length: {}\r\n", body.len())
        } else {
            String::new()
        };
        write!(
            client,
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
             {length}Connection: close\r\n\r\n"
        )?;
        for chunk in body.chunks(64 * 1024) {
            client.write_all(chunk)?;
            sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        return Ok(());
    }
    let mut request: String = head
        .trim_end()
        .lines()
        .filter(|line| !line.to_ascii_lowercase().starts_with("connection:"))
        .map(|line| format!("{line}\r\n"))
        .collect();
    request.push_str("Connection: close\r\n\r\n");
    let mut server = TcpStream::connect(("127.0.0.1", upstream))?;
    server.write_all(request.as_bytes())?;
    std::io::copy(&mut server, &mut client)?;
    Ok(())
}

/// A registry that sends a 32 MiB manifest is refused at pull, whether it
/// declares the length (refused at the headers) or not (refused once
/// 4 MiB have arrived), with a message naming the cap; the body is not
/// read to its end, and nothing is recorded or stored.
#[test]
fn oversized_manifest_is_refused() -> Result<()> {
    let _serial = serial();
    let registry = Registry::start(None)?;
    registry.push_fixture("busybox/busybox.oci.tar", "huge:latest", &[])?;
    // The fixture's own manifest, with a 32 MiB annotation: it names the
    // real config and layers, which the registry does hold.
    let mut manifest = manifest_of(&fixture::image("busybox/busybox.oci.tar"))?;
    manifest["annotations"] = serde_json::json!({ "pad": "x".repeat(32 << 20) });
    let body = serde_json::to_vec(&manifest)?;
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_string();

    let node = Node::start()?;
    for declare_length in [true, false] {
        let hostile = HostileManifest::start(registry.port, "huge", body.clone(), declare_length)?;
        let reference = format!("127.0.0.1:{}/huge:latest", hostile.port);
        // docker's shorthand, `pull`, is `image pull`.
        let output = node.berth_code(&["--timeout", "60", "pull", &reference], 125)?;
        let said = stderr(&output);
        let size = if declare_length {
            format!("is {} bytes", body.len())
        } else {
            "is larger".to_string()
        };
        ensure!(
            said.contains(&size) && said.contains(&format!("over the {} byte limit", 4 << 20)),
            "pull of a 32 MiB manifest (length declared: {declare_length}) said: {said}"
        );
        let sent = hostile.sent.load(Ordering::SeqCst);
        ensure!(
            sent < body.len() as u64,
            "the whole manifest was read ({sent} bytes; length declared: {declare_length})"
        );
        ensure!(image_names(&node)?.is_empty(), "{:?}", image_names(&node)?);
        let blobs = content_digests(&node)?;
        ensure!(!blobs.contains(&layer), "the store holds {layer}: {blobs}");
    }
    Ok(())
}

/// A gzip and a zstd layer in a registry that inflate far past the node's
/// cap are refused at pull, in the unpack, with the error that says why;
/// no image is recorded, and the pull's blobs go with its lease, leaving
/// no blob, ingest or snapshot.
#[test]
fn bomb_layers_are_refused_at_pull() -> Result<()> {
    let _serial = serial();
    let registry = Registry::start(None)?;
    let node = Node::start_with(NodeOptions {
        berthd_args: vec!["--max-layer-size".into(), "8m".into()],
        ..Default::default()
    })?;
    let dir = berth_testkit::tempdir("berth-pull-bombs-")?;
    for (name, blob, media_type) in bomb_layers()? {
        let archive = dir.path().join(format!("{name}.oci.tar"));
        write_image(&archive, &blob, media_type, &digest(b"never checked"), "")?;
        registry.push(
            &format!("oci-archive:{}:latest", archive.display()),
            &format!("{name}-bomb:latest"),
            &["--preserve-digests"],
        )?;
        let reference = format!("{}/{name}-bomb:latest", registry.host());
        let output = node.berth_code(&["--timeout", "60", "image", "pull", &reference], 125)?;
        let said = stderr(&output);
        ensure!(
            said.contains("inflates past the 8388608 byte limit"),
            "pull of a {name} bomb said: {said}"
        );
        ensure!(image_names(&node)?.is_empty(), "{:?}", image_names(&node)?);
        nothing_stored(&node)?;
    }
    Ok(())
}
