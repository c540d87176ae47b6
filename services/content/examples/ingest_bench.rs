//! Benchmark: one large ingest over NATS against `sha256sum` of the same
//! file, and the content service's peak memory while it ingests.
//!
//! Each run, in turn: `sha256sum FILE` (wall time), then a fresh
//! `berth-content` process on an empty root behind a local nats-server,
//! and the file pushed through one ingest the way `Content::push` does it
//! (open; writes of the server's max payload less header room, a few in
//! flight; commit with its fsync),
//! timed from open to the commit's reply (the commit's share is shown
//! apart: with the hash kept as the chunks arrive it is the fsync and the
//! rename); the service's `VmHWM` is read
//! from `/proc/<pid>/status` after the commit. Runs alternate so a drift of
//! the machine's speed hits both sides alike; medians are reported, with
//! the ratio of throughputs (ingest / sha256sum) per run.
//!
//! ```text
//! cargo build --release -p berth-content --bins --examples
//! target/release/examples/ingest_bench [--size-mib 512] [--runs 5] [--file PATH] [--dir DIR]
//!     [--one-in-flight]
//! ```
//!
//! `--one-in-flight` sends each write after the reply to the one before,
//! for comparison. `--file` defaults to a file of pseudo-random bytes made under `--dir`
//! (default: the system's temporary directory), where the content roots go
//! too. Needs `nats-server` and `sha256sum` on PATH and the release
//! `berth-content` binary beside the examples directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

use berth_bus::api::Content;
use berth_bus::{Client, Code};
use berth_proto::content as cpb;
use berth_testkit::NatsServer;

struct Args {
    size_mib: usize,
    one_in_flight: bool,
    runs: usize,
    file: Option<PathBuf>,
    dir: PathBuf,
}

fn args() -> Result<Args> {
    let mut args = Args {
        size_mib: 512,
        one_in_flight: false,
        runs: 5,
        file: None,
        dir: std::env::temp_dir(),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let mut value = || {
            given
                .next()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--size-mib" => args.size_mib = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--file" => args.file = Some(value()?.into()),
            "--dir" => args.dir = value()?.into(),
            "--one-in-flight" => args.one_in_flight = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

/// Makes `len` pseudo-random bytes at `path` unless it is there already.
fn make_file(path: &Path, len: usize) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == len as u64) {
        return Ok(());
    }
    let mut file = std::io::BufWriter::new(File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let n = left.min(block.len());
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.flush()?;
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The release `berth-content` binary: `target/release/berth-content`,
/// beside this program's `examples/` directory.
fn service_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("berth-content"))
        .context("no directory above this program")?;
    if !bin.exists() {
        bail!(
            "{} missing: cargo build --release -p berth-content --bins",
            bin.display()
        );
    }
    Ok(bin)
}

/// The peak resident set of a process (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()?)
}

fn time_sha256sum(file: &Path) -> Result<Duration> {
    let start = Instant::now();
    let status = Command::new("sha256sum")
        .arg(file)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("sha256sum failed: {status}");
    }
    Ok(start.elapsed())
}

/// A child process killed when dropped, on every path out.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One ingest's figures.
struct Ingest {
    /// From open to the commit's reply.
    elapsed: Duration,
    /// The commit alone: verify (the hash is ready), fsync, rename.
    commit: Duration,
    /// The service's peak resident set, KiB.
    peak_kib: u64,
}

/// One ingest into a fresh service.
async fn time_ingest(
    nats: &NatsServer,
    service: &Path,
    root: &Path,
    file: &Path,
    digest: &str,
    one_in_flight: bool,
) -> Result<Ingest> {
    let _ = std::fs::remove_dir_all(root);
    let log = File::create(root.with_extension("log"))?;
    let child = Command::new(service)
        .arg("--nats")
        .arg(nats.url())
        .arg("--root")
        .arg(root)
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let child = Killed(child);
    let client = Client::new(
        berth_bus::connect(&nats.url(), "bench").await?,
        Duration::from_secs(120),
    );
    let content = Content {
        client,
        namespace: "bench".into(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(err) = content.ingests(&cpb::IngestsRequest {}).await {
        if err.code != Code::Unavailable || Instant::now() > deadline {
            bail!("content service not serving: {err}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let size = std::fs::metadata(file)?.len();
    let open = cpb::OpenRequest {
        r#ref: "bench".into(),
        expected_digest: digest.to_string(),
        expected_size: size as i64,
        lease_id: String::new(),
    };
    let mut source = File::open(file)?;
    let start = Instant::now();

    // What `Content::push` does, in its two steps, to time the commit apart.
    let offset = content.open(&open).await?.offset as u64;
    if one_in_flight {
        write_one_at_a_time(&content, offset, &mut source).await?;
    } else {
        content.upload("bench", offset, &mut source).await?;
    }
    let written = start.elapsed();
    let commit = cpb::CommitRequest {
        r#ref: "bench".into(),
        digest: digest.to_string(),
        size: size as i64,
        ..Default::default()
    };
    let reply = content.commit(&commit).await?;
    let elapsed = start.elapsed();

    let peak = peak_rss_kib(child.0.id())?;
    if reply.info.map(|info| info.size) != Some(size as i64) {
        bail!("the commit reported another size");
    }
    drop(child);
    let _ = std::fs::remove_dir_all(root);
    Ok(Ingest {
        elapsed,
        commit: elapsed - written,
        peak_kib: peak,
    })
}

/// The writes with one chunk in flight, each sent after the reply to the
/// one before (for comparison with [`Content::upload`]).
async fn write_one_at_a_time(content: &Content, offset: u64, source: &mut File) -> Result<()> {
    source.seek(SeekFrom::Start(offset))?;
    let mut offset = offset;
    let mut chunk = vec![0; content.client.max_body()];
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            match source.read(&mut chunk[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(());
        }
        let write = cpb::WriteRequest {
            r#ref: "bench".into(),
            offset: offset as i64,
            data: bytes::Bytes::copy_from_slice(&chunk[..filled]),
        };
        offset = content.write(&write).await?.offset as u64;
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let file = match &args.file {
        Some(file) => file.clone(),
        None => {
            let file = args.dir.join(format!("berth-bench-{}m.bin", args.size_mib));
            make_file(&file, args.size_mib << 20)?;
            file
        }
    };
    let size = std::fs::metadata(&file)?.len() as f64;
    let digest = sha256_of(&file)?;
    let service = service_binary()?;
    let nats = NatsServer::start()?;
    let root = args.dir.join("berth-bench-content");

    // A warm-up of each side, not counted: the file in the page cache.
    time_sha256sum(&file)?;
    time_ingest(&nats, &service, &root, &file, &digest, args.one_in_flight).await?;

    let (mut sha, mut ingest, mut ratios, mut peaks) = (vec![], vec![], vec![], vec![]);
    for run in 1..=args.runs {
        let hashed = time_sha256sum(&file)?.as_secs_f64();
        let ingested =
            time_ingest(&nats, &service, &root, &file, &digest, args.one_in_flight).await?;
        let took = ingested.elapsed.as_secs_f64();
        let peak = ingested.peak_kib;
        println!(
            "run {run}: sha256sum {hashed:.3} s ({:.0} MB/s), ingest {took:.3} s ({:.0} MB/s, \
             commit {:.3} s), ratio {:.2}, service peak RSS {:.1} MiB",
            size / hashed / 1e6,
            size / took / 1e6,
            ingested.commit.as_secs_f64(),
            hashed / took,
            peak as f64 / 1024.0
        );
        sha.push(hashed);
        ingest.push(took);
        ratios.push(hashed / took);
        peaks.push(peak as f64 / 1024.0);
    }
    let (sha, ingest) = (median(sha), median(ingest));
    println!(
        "median of {} runs, {:.0} MiB: sha256sum {sha:.3} s ({:.0} MB/s), ingest {ingest:.3} s \
         ({:.0} MB/s), ratio of throughputs {:.2}, service peak RSS median {:.1} MiB, max {:.1} MiB",
        args.runs,
        size / (1 << 20) as f64,
        size / sha / 1e6,
        size / ingest / 1e6,
        median(ratios),
        median(peaks.clone()),
        peaks.iter().cloned().fold(0.0, f64::max),
    );
    Ok(())
}
