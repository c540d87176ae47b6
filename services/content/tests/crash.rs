//! The content service killed with SIGKILL in the middle of an ingest, as
//! its own process (the `berth-content` binary), against a real
//! nats-server. Needs `nats-server` on PATH.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use berth_bus::api::Content;
use berth_bus::{Client, Code};
use berth_proto::content as cpb;
use berth_testkit::NatsServer;

use common::{sha256, wait_until_served, Process};

const SIZE: usize = 100 << 20;

/// Writes `data` to the ingest from `offset` on, one chunk in flight,
/// publishing each acknowledged end in `acked`. Stops at the first error,
/// except that with `retry_late` a chunk whose reply is late is sent again
/// (the first write after a restart hashes what the ingest holds).
async fn write_from(
    content: Content,
    reference: String,
    data: Arc<Vec<u8>>,
    offset: u64,
    acked: Arc<AtomicU64>,
    retry_late: bool,
) -> berth_bus::Result<()> {
    let max = content.client.max_body() as u64;
    let mut offset = offset;
    while offset < data.len() as u64 {
        let end = (offset + max).min(data.len() as u64);
        let request = cpb::WriteRequest {
            r#ref: reference.clone(),
            offset: offset as i64,
            data: bytes::Bytes::copy_from_slice(&data[offset as usize..end as usize]),
        };
        offset = match content.write(&request).await {
            Ok(reply) => reply.offset as u64,
            Err(err) if retry_late && err.code == Code::DeadlineExceeded => continue,
            Err(err) => return Err(err),
        };
        acked.store(offset, Ordering::SeqCst);
    }
    Ok(())
}

/// SIGKILL in the middle of a 100 MiB ingest loses nothing written: after
/// a restart on the same root, `status` and `open` report the offset the
/// file holds (at least what was acknowledged), the writer resumes there,
/// and the blob commits with the right digest. No database write happens
/// per chunk: the database file is unchanged by the writes.
#[tokio::test]
async fn a_killed_service_resumes_the_ingest() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = berth_testkit::tempdir("berth-content-kill-")?;
    let root = dir.path().join("content");
    let log = dir.path().join("content.log");
    let client = Client::new(
        berth_bus::connect(&nats.url(), "test").await?,
        Duration::from_secs(3),
    );
    let content = Content {
        client,
        namespace: "default".into(),
    };
    let data = Arc::new(common::pseudo_random(SIZE, 42));
    let digest = sha256(&data);
    let open = cpb::OpenRequest {
        r#ref: "big".into(),
        expected_digest: digest.clone(),
        expected_size: SIZE as i64,
        lease_id: String::new(),
    };

    // Write until 40 MiB are acknowledged, and kill the service while the
    // writer goes on.
    let mut service = Process::start(&nats.url(), &root, &log)?;
    wait_until_served(&content).await?;
    assert_eq!(content.open(&open).await?.offset, 0);
    let database = std::fs::read(root.join("db/data.mdb"))?;
    let acked = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_from(
        content.clone(),
        "big".into(),
        data.clone(),
        0,
        acked.clone(),
        false,
    ));
    while acked.load(Ordering::SeqCst) < 40 << 20 {
        if writer.is_finished() {
            bail!(
                "the writer stopped early: {:?}; log: {}",
                writer.await?,
                service.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    service.kill();
    let interrupted = writer.await?;
    assert!(interrupted.is_err(), "the writer finished before the kill");
    let acked = acked.load(Ordering::SeqCst);
    assert!(acked < SIZE as u64);
    assert_eq!(std::fs::read(root.join("db/data.mdb"))?, database);

    // Restarted, the service reports where the file ends.
    let service = Process::start(&nats.url(), &root, &log)?;
    wait_until_served(&content).await?;
    let status = content
        .status(&cpb::StatusRequest {
            r#ref: "big".into(),
        })
        .await?
        .status
        .unwrap_or_default();
    let offset = status.offset as u64;
    assert!(
        offset >= acked && offset < SIZE as u64,
        "{offset} vs {acked}"
    );
    assert_eq!(status.expected_digest, digest);
    let reopened = content.open(&open).await?;
    assert_eq!(reopened.offset as u64, offset);
    assert!(reopened.resumed && !reopened.exists);

    // The rest, then the commit.
    let rest = Arc::new(AtomicU64::new(0));
    write_from(
        content.clone(),
        "big".into(),
        data.clone(),
        offset,
        rest,
        true,
    )
    .await?;
    let commit = cpb::CommitRequest {
        r#ref: "big".into(),
        digest: digest.clone(),
        size: SIZE as i64,
        ..Default::default()
    };
    // Verifying and syncing 100 MiB may take longer than a chunk.
    let patient = Content {
        client: content.client.with_timeout(Duration::from_secs(120)),
        ..content.clone()
    };
    let info = patient.commit(&commit).await?.info.unwrap_or_default();
    assert_eq!(
        (info.digest.as_str(), info.size),
        (digest.as_str(), SIZE as i64)
    );
    let blob = std::fs::read(root.join("blobs/sha256").join(&digest[7..]))?;
    assert_eq!(sha256(&blob), digest, "log: {}", service.log());
    assert!(content
        .ingests(&cpb::IngestsRequest {})
        .await?
        .statuses
        .is_empty());
    Ok(())
}
