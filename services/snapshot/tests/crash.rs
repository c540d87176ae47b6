//! A SIGKILL of the snapshot service in the middle of applying a layer: the
//! service (the real `berth-snapshot` binary) is killed while it writes a
//! large layer, started again on the same root, and must show no committed
//! snapshot of the half-applied layer and no leftover directory; the retried
//! unpack then applies the whole layer. Needs root and `nats-server`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use berth_bus::api::{Content, Snapshot};
use berth_bus::Client;
use berth_proto::{content as cpb, snapshot as spb, Descriptor};
use berth_testkit::NatsServer;

const SNAPSHOT: &str = env!("CARGO_BIN_EXE_berth-snapshot");
const NODE: &str = "crash";
const FILES: usize = 16;
const FILE_SIZE: usize = 8 << 20;

/// A gzip layer of `FILES` files of zeros: small to store, long to apply.
/// Returns (layer file, compressed digest, diff ID).
fn big_layer(dir: &Path) -> Result<(PathBuf, String, String)> {
    struct Hashing<W: Write>(W, Sha256);
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    let path = dir.join("layer.tar.gz");
    let file = std::fs::File::create(&path)?;
    let gzip =
        flate2::write::GzEncoder::new(Hashing(file, Sha256::new()), flate2::Compression::fast());
    let mut tar = tar::Builder::new(Hashing(gzip, Sha256::new()));
    let zeros = vec![0u8; FILE_SIZE];
    for index in 0..FILES {
        let mut header = tar::Header::new_gnu();
        header.set_size(FILE_SIZE as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_704_067_200);
        header.set_cksum();
        tar.append_data(&mut header, format!("data/file-{index}"), zeros.as_slice())?;
    }
    let Hashing(gzip, tar_hash) = tar.into_inner()?;
    let Hashing(mut file, gzip_hash) = gzip.finish()?;
    file.flush()?;
    let hex = |hash: Sha256| format!("sha256:{}", hex::encode(hash.finalize()));
    Ok((path, hex(gzip_hash), hex(tar_hash)))
}

/// The snapshot service as its own process, so it can be killed.
struct Service {
    child: Child,
}

impl Service {
    fn start(url: &str, root: &Path, content_root: &Path) -> Result<Service> {
        let child = Command::new(SNAPSHOT)
            .args(["--nats", url, "--node", NODE])
            .arg("--root")
            .arg(root)
            .arg("--content-root")
            .arg(content_root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Service { child })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_served(snapshot: &Snapshot) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while snapshot.list(&spb::ListRequest::default()).await.is_err() {
        if Instant::now() > deadline {
            bail!("the snapshot service did not come up");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Bytes under `dir`, not following links.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            stack.extend(
                std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else {
            total += meta.len();
        }
    }
    total
}

/// Killed mid-apply: nothing half-made survives the restart, and the retry
/// applies the layer whole.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_in_the_middle_of_an_apply_leaves_nothing_half_made() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = berth_testkit::tempdir("berth-snapshot-crash-")?;
    let shutdown = CancellationToken::new();
    let (content_root, snapshot_root) = (dir.path().join("content"), dir.path().join("snapshot"));
    let url = nats.url();
    let connect = |name: &'static str| berth_bus::connect(&url, name);
    tokio::spawn(berth_content::run(
        connect("content").await?,
        berth_content::Config {
            root: content_root.clone(),
        },
        shutdown.clone(),
    ));
    tokio::spawn(berth_metadata::run(
        connect("metadata").await?,
        berth_metadata::Config {
            root: dir.path().join("metadata"),
        },
        shutdown.clone(),
    ));
    let client = Client::new(connect("test").await?, Duration::from_secs(60));
    let content = Content {
        client: client.clone(),
        namespace: "default".into(),
    };
    let snapshot = Snapshot {
        client: client.clone(),
        namespace: "default".into(),
        node: NODE.into(),
    };

    // The layer goes into content as any import puts it there.
    let (layer, digest, diff_id) = big_layer(dir.path())?;
    let size = std::fs::metadata(&layer)?.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let open = cpb::OpenRequest {
        r#ref: "crash-layer".into(),
        expected_digest: digest.clone(),
        expected_size: size as i64,
        ..Default::default()
    };
    loop {
        let mut file = std::fs::File::open(&layer)?;
        match content.push(&open, &mut file, Default::default()).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(err) => return Err(err.into()),
        }
    }
    let request = spb::UnpackRequest {
        layers: vec![Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: digest.clone(),
            size: size as i64,
            ..Default::default()
        }],
        diff_ids: vec![diff_id.clone()],
        lease_id: String::new(),
    };

    // Kill it once a good part of the layer is on disk.
    let mut service = Service::start(&nats.url(), &snapshot_root, &content_root)?;
    wait_served(&snapshot).await?;
    let unpacking = {
        let snapshot = snapshot.clone();
        let request = request.clone();
        tokio::spawn(async move { snapshot.unpack(&request).await })
    };
    let snapshots = snapshot_root.join("snapshots");
    let written = berth_testkit::wait_until(Duration::from_secs(30), || {
        bytes_under(&snapshots) > (FILES * FILE_SIZE / 4) as u64
    });
    if !written {
        let outcome = unpacking.await?;
        bail!("the apply never got going: {outcome:?}");
    }
    service.kill();
    anyhow::ensure!(
        bytes_under(&snapshots) < (FILES * FILE_SIZE) as u64,
        "the apply finished before the kill"
    );
    let _ = unpacking.await;

    // After the restart: no snapshot of the layer, no leftover directory.
    let mut service = Service::start(&nats.url(), &snapshot_root, &content_root)?;
    wait_served(&snapshot).await?;
    let infos = snapshot.list(&spb::ListRequest::default()).await?.infos;
    assert!(infos.is_empty(), "left after the crash: {infos:?}");
    let dirs = std::fs::read_dir(&snapshots)?.count();
    assert_eq!(dirs, 0, "snapshot directories left after the crash");

    // The retry applies the whole layer and commits it under its chain ID.
    let unpacked = snapshot.unpack(&request).await?;
    assert_eq!(
        (unpacked.chain_id.as_str(), unpacked.applied),
        (diff_id.as_str(), 1)
    );
    let stat = snapshot
        .stat(&spb::StatRequest {
            key: diff_id.clone(),
        })
        .await?
        .info
        .context("no info")?;
    assert_eq!(stat.kind, spb::Kind::Committed as i32);
    assert_eq!(bytes_under(&snapshots), (FILES * FILE_SIZE) as u64);
    let mut first = Vec::new();
    let dir = std::fs::read_dir(&snapshots)?
        .next()
        .context("no snapshot dir")??
        .path();
    std::fs::File::open(dir.join("fs/data/file-0"))?.read_to_end(&mut first)?;
    assert!(first.len() == FILE_SIZE && first.iter().all(|b| *b == 0));
    service.kill();
    shutdown.cancel();
    Ok(())
}
