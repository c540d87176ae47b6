//! The content service on the bus, against a real nats-server with
//! JetStream, the service running in this process: refusals of bad input,
//! namespace isolation, one writer per ref, the events it publishes, and gc
//! deletes racing re-commits. Needs `nats-server` on PATH.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;

use berth_bus::api::Content;
use berth_bus::events::{Consumer, Cursor};
use berth_bus::Code;
use berth_proto::content as cpb;
use berth_proto::Message;

use common::{blob_files_are_sound, files_under, push, sha256, Harness};

fn open_request(reference: &str, data: &[u8]) -> cpb::OpenRequest {
    cpb::OpenRequest {
        r#ref: reference.to_string(),
        expected_digest: sha256(data),
        expected_size: data.len() as i64,
        lease_id: String::new(),
    }
}

fn write_request(reference: &str, offset: i64, data: &[u8]) -> cpb::WriteRequest {
    cpb::WriteRequest {
        r#ref: reference.to_string(),
        offset,
        data: bytes::Bytes::copy_from_slice(data),
    }
}

fn commit_request(reference: &str, digest: &str, size: usize) -> cpb::CommitRequest {
    cpb::CommitRequest {
        r#ref: reference.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        ..Default::default()
    }
}

fn info_request(digest: &str) -> cpb::InfoRequest {
    cpb::InfoRequest {
        digest: digest.to_string(),
    }
}

fn read_request(digest: &str, offset: i64, length: i64) -> cpb::ReadRequest {
    cpb::ReadRequest {
        digest: digest.to_string(),
        offset,
        length,
    }
}

/// Writes `data` at `offset` of an ingest in chunks the server takes.
async fn write_all(content: &Content, reference: &str, offset: usize, data: &[u8]) -> Result<()> {
    let max = content.client.max_body();
    for (index, chunk) in data.chunks(max).enumerate() {
        let at = (offset + index * max) as i64;
        content.write(&write_request(reference, at, chunk)).await?;
    }
    Ok(())
}

/// Drops the reply: the cases only look at errors.
fn done<T>(outcome: berth_bus::Result<T>) -> berth_bus::Result<()> {
    outcome.map(drop)
}

/// Each kind of bad input is refused with its code and a message naming
/// the fault, and none leaves a blob, an ingest or a file behind: a fresh
/// import of the right bytes under the same refs succeeds afterwards.
#[tokio::test]
async fn bad_input_is_refused_and_leaves_nothing() -> Result<()> {
    let harness = Harness::start().await?;
    let content = harness.content("default");
    let data = b"the right bytes".to_vec();
    let digest = sha256(&data);
    let other = sha256(b"other bytes");
    let upper = digest.to_uppercase().replace("SHA256", "sha256");

    // One ingest in use, for the cases that need one.
    content.open(&open_request("held", &data)).await?;
    content.write(&write_request("held", 0, &data[..4])).await?;

    let mut cases: Vec<(&str, berth_bus::Result<()>, Code, &str)> = Vec::new();
    let mut case = |name, outcome, code, says| cases.push((name, outcome, code, says));
    let open = |reference: &str, digest: &str| cpb::OpenRequest {
        r#ref: reference.to_string(),
        expected_digest: digest.to_string(),
        ..Default::default()
    };

    case(
        "malformed digest",
        done(content.open(&open("r1", &upper)).await),
        Code::InvalidArgument,
        "malformed digest",
    );
    case(
        "unsupported algorithm",
        done(
            content
                .open(&open("r1", &format!("sha512:{}", "a".repeat(128))))
                .await,
        ),
        Code::InvalidArgument,
        "unsupported digest algorithm",
    );
    case(
        "digest without algorithm",
        done(content.info(&info_request("abc")).await),
        Code::InvalidArgument,
        "malformed digest",
    );
    case(
        "ref climbing out",
        done(content.open(&open("../escape", &digest)).await),
        Code::InvalidArgument,
        "invalid ingest ref",
    );
    case(
        "ref with a slash",
        done(content.open(&open("a/b", &digest)).await),
        Code::InvalidArgument,
        "invalid ingest ref",
    );
    case(
        "negative expected size",
        done(
            content
                .open(&cpb::OpenRequest {
                    expected_size: -1,
                    ..open("r1", &digest)
                })
                .await,
        ),
        Code::InvalidArgument,
        "negative",
    );
    case(
        "second writer on a ref",
        done(content.open(&open_request("held", &data)).await),
        Code::FailedPrecondition,
        "held by another writer",
    );
    case(
        "write far past the end",
        done(content.write(&write_request("held", 1 << 40, b"x")).await),
        Code::InvalidArgument,
        "but it holds 4 bytes",
    );
    case(
        "write past the end, the gap never filled",
        done(content.write(&write_request("held", 9, &data[9..])).await),
        Code::InvalidArgument,
        "at offset 9, but it holds 4 bytes",
    );
    case(
        "write of other bytes over written ones",
        done(content.write(&write_request("held", 0, b"XYZW")).await),
        Code::InvalidArgument,
        "differs from the bytes it holds",
    );
    case(
        "write to no ingest",
        done(content.write(&write_request("nothing", 0, b"x")).await),
        Code::NotFound,
        "ingest \"nothing\" not found",
    );
    case(
        "commit naming another digest than the open",
        done(content.commit(&commit_request("held", &other, 0)).await),
        Code::InvalidArgument,
        "was opened for",
    );
    case(
        "commit by digest of a blob not held",
        done(content.commit(&commit_request("none", &digest, 0)).await),
        Code::NotFound,
        "not found",
    );
    case(
        "abort of no ingest",
        done(
            content
                .abort(&cpb::AbortRequest {
                    r#ref: "none".into(),
                })
                .await,
        ),
        Code::NotFound,
        "not found",
    );
    case(
        "info of a blob not held",
        done(content.info(&info_request(&digest)).await),
        Code::NotFound,
        "not found",
    );
    case(
        "delete of a blob not held",
        done(
            content
                .delete(&cpb::DeleteRequest {
                    digest: digest.clone(),
                    unless_touched_since: 0,
                })
                .await,
        ),
        Code::NotFound,
        "not found",
    );
    case(
        "update with an unknown mask",
        done(
            content
                .update(&cpb::UpdateRequest {
                    digest: digest.clone(),
                    field_mask: vec!["size".into()],
                    ..Default::default()
                })
                .await,
        ),
        Code::InvalidArgument,
        "unknown field",
    );

    // Writes that can never commit, and failed commits, discard the ingest.
    content.open(&open_request("long", &data)).await?;
    case(
        "write past the expected size",
        done(
            content
                .write(&write_request("long", 0, &[data.as_slice(), b"!"].concat()))
                .await,
        ),
        Code::InvalidArgument,
        "size mismatch",
    );
    content.open(&open_request("corrupt", &data)).await?;
    let mut corrupt = data.clone();
    corrupt[3] ^= 1;
    content
        .write(&write_request("corrupt", 0, &corrupt))
        .await?;
    case(
        "digest mismatch",
        done(
            content
                .commit(&commit_request("corrupt", &digest, data.len()))
                .await,
        ),
        Code::InvalidArgument,
        "digest mismatch",
    );
    content.open(&open_request("short", &data)).await?;
    content
        .write(&write_request("short", 0, &data[..5]))
        .await?;
    case(
        "size mismatch",
        done(
            content
                .commit(&commit_request("short", &digest, data.len()))
                .await,
        ),
        Code::InvalidArgument,
        "size mismatch",
    );

    for (name, outcome, code, says) in cases {
        let err = outcome
            .err()
            .with_context(|| format!("{name}: not refused"))?;
        assert_eq!(err.code, code, "{name}: {err}");
        assert!(err.message.contains(says), "{name}: {err}");
    }

    // Nothing is visible, and only the ingest still in use is left.
    content
        .abort(&cpb::AbortRequest {
            r#ref: "held".into(),
        })
        .await?;
    assert!(content.list(&Default::default()).await?.infos.is_empty());
    assert!(content
        .ingests(&cpb::IngestsRequest {})
        .await?
        .statuses
        .is_empty());
    assert!(files_under(&harness.root().join("blobs")).is_empty());
    assert!(files_under(&harness.root().join("ingest")).is_empty());

    // The right bytes import under the refs that failed.
    for reference in ["corrupt", "short", "long"] {
        let info = push(&content, reference, &data).await?;
        assert_eq!(info.digest, digest);
    }
    let read = content.read(&read_request(&digest, 0, 100)).await?;
    assert_eq!(read.data, data);

    // Reads past the end, or backwards, are refused.
    let reads = [
        (
            "read past the end",
            read_request(&digest, 16, 1),
            "past its end",
        ),
        ("negative offset", read_request(&digest, -1, 1), "negative"),
        ("negative length", read_request(&digest, 0, -1), "negative"),
        (
            "length over the limit",
            read_request(&digest, 0, 1 << 40),
            "over the limit",
        ),
    ];
    for (name, request, says) in reads {
        let err = content.read(&request).await.err().context(name)?;
        assert_eq!(err.code, Code::InvalidArgument, "{name}: {err}");
        assert!(err.message.contains(says), "{name}: {err}");
    }
    Ok(())
}

/// A blob only namespace a provided is invisible to namespace b, whatever
/// it asks; once b writes the same bytes both see it, one file on disk;
/// deleting it from a keeps it for b, and b's delete frees it.
#[tokio::test]
async fn namespaces_see_only_what_they_provided() -> Result<()> {
    let harness = Harness::start().await?;
    let (a, b) = (harness.content("a"), harness.content("b"));
    let data = common::pseudo_random(3 << 20, 7);
    let digest = sha256(&data);
    push(&a, "import", &data).await?;
    let path = harness.root().join("blobs/sha256").join(&digest[7..]);
    let inode = std::fs::metadata(&path)?.ino();

    // Knowing the digest is not enough.
    let err = b.info(&info_request(&digest)).await.unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");
    let err = b.read(&read_request(&digest, 0, 10)).await.unwrap_err();
    assert_eq!(err.code, Code::NotFound, "{err}");
    let opened = b.open(&open_request("import", &data)).await?;
    assert!(!opened.exists, "b is told the blob exists");
    let err = b
        .commit(&commit_request("claim", &digest, data.len()))
        .await;
    assert_eq!(err.unwrap_err().code, Code::NotFound);
    assert!(b.list(&Default::default()).await?.infos.is_empty());

    // b's wrong bytes are refused even though a's file is there.
    let mut wrong = data.clone();
    wrong[100] ^= 1;
    write_all(&b, "import", 0, &wrong).await?;
    let err = b
        .commit(&commit_request("import", &digest, data.len()))
        .await;
    assert_eq!(err.unwrap_err().code, Code::InvalidArgument);

    // The right bytes: both see the blob, stored once, the file untouched.
    push(&b, "import", &data).await?;
    assert_eq!(b.read_all(&digest).await?, data);
    assert!(a.info(&info_request(&digest)).await.is_ok());
    assert_eq!(std::fs::metadata(&path)?.ino(), inode);
    assert_eq!(
        files_under(&harness.root().join("blobs")),
        vec![path.clone()]
    );
    assert!(files_under(&harness.root().join("ingest")).is_empty());

    // Deleting from a keeps it for b; b's delete frees it.
    let delete = cpb::DeleteRequest {
        digest: digest.clone(),
        unless_touched_since: 0,
    };
    let dropped = a.delete(&delete).await?;
    assert!(dropped.deleted);
    assert_eq!(dropped.freed_bytes, 0);
    assert_eq!(
        a.info(&info_request(&digest)).await.unwrap_err().code,
        Code::NotFound
    );
    assert_eq!(b.read_all(&digest).await?, data);
    let dropped = b.delete(&delete).await?;
    assert_eq!(dropped.freed_bytes, data.len() as i64);
    assert!(!path.exists());
    Ok(())
}

/// A second writer on a ref is refused while the first writes; two refs
/// of one digest both commit, and the blob is stored once.
#[tokio::test]
async fn one_writer_per_ref_and_one_blob_per_digest() -> Result<()> {
    let harness = Harness::start().await?;
    let content = harness.content("default");
    let data = common::pseudo_random(1 << 20, 3);
    let digest = sha256(&data);

    // The first writer holds the ref; the second is refused, and `status`
    // says it is held without taking it.
    let opened = content.open(&open_request("one", &data)).await?;
    assert_eq!(
        (opened.offset, opened.exists, opened.resumed),
        (0, false, false)
    );
    content
        .write(&write_request("one", 0, &data[..1000]))
        .await?;
    let err = content.open(&open_request("one", &data)).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    let status = content
        .status(&cpb::StatusRequest {
            r#ref: "one".into(),
        })
        .await?
        .status
        .unwrap_or_default();
    assert_eq!((status.offset, status.held), (1000, true));
    assert_eq!(status.expected_digest, digest);

    // A second ref of the same digest is a second ingest.
    let opened = content.open(&open_request("two", &data)).await?;
    assert!(!opened.exists);
    write_all(&content, "two", 0, &data).await?;
    write_all(&content, "one", 1000, &data[1000..]).await?;
    let first = content
        .commit(&commit_request("one", &digest, data.len()))
        .await?;
    let second = content
        .commit(&commit_request("two", &digest, data.len()))
        .await?;
    assert_eq!(first.info.map(|i| i.size), second.info.map(|i| i.size));
    let blobs = files_under(&harness.root().join("blobs"));
    assert_eq!(blobs.len(), 1, "{blobs:?}");
    assert!(files_under(&harness.root().join("ingest")).is_empty());

    // Now the namespace holds it: open says so and commit needs no bytes.
    let opened = content.open(&open_request("three", &data)).await?;
    assert!(opened.exists);
    content
        .commit(&commit_request("three", &digest, data.len()))
        .await?;
    // A reuse with the wrong size is refused at open.
    let err = content
        .open(&cpb::OpenRequest {
            expected_size: 5,
            ..open_request("four", &data)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("size mismatch"), "{err}");
    Ok(())
}

/// `content.commit` and `content.delete` reach the event stream from the
/// outbox with what a subscriber needs: the digest, the size, whether
/// bytes were stored or freed, and growing generations.
#[tokio::test]
async fn commits_and_deletes_are_published() -> Result<()> {
    let harness = Harness::start().await?;
    let (a, b) = (harness.content("a"), harness.content("b"));
    let data = b"an event's blob".to_vec();
    let digest = sha256(&data);
    push(&a, "r", &data).await?;
    push(&a, "r", &data).await?;
    push(&b, "r", &data).await?;
    let delete = cpb::DeleteRequest {
        digest: digest.clone(),
        unless_touched_since: 0,
    };
    a.delete(&delete).await?;
    b.delete(&delete).await?;

    let js = async_nats::jetstream::new(harness.client.nats().clone());
    let consumer = Consumer::new(&js, vec!["berth.v1.*.events.content.>".into()]).await?;
    let mut stream = Box::pin(consumer.messages(Cursor::default()).await?);
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let delivered = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("events did not arrive")?
            .context("stream ended")??;
        let envelope = delivered.envelope;
        let event = cpb::ContentEvent::decode(envelope.payload.as_ref())?;
        assert_eq!(event.digest, digest);
        assert_eq!(event.size, data.len() as i64);
        assert_eq!(envelope.source, "content");
        seen.push((
            envelope.namespace,
            envelope.topic,
            event.reused,
            event.freed,
            envelope.generation,
        ));
    }
    let shape: Vec<(&str, &str, bool, bool)> = seen
        .iter()
        .map(|(ns, topic, reused, freed, _)| (ns.as_str(), topic.as_str(), *reused, *freed))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("a", "content.commit", false, false),
            ("a", "content.commit", true, false),
            ("b", "content.commit", true, false),
            ("a", "content.delete", false, false),
            ("b", "content.delete", false, true),
        ]
    );
    let generations: Vec<u64> = seen.iter().map(|s| s.4).collect();
    assert!(
        generations.windows(2).all(|w| w[0] < w[1]),
        "{generations:?}"
    );
    Ok(())
}

/// Runs `work` once `delay` has passed, yielding meanwhile so the other
/// side of a race can go on (finer than the timer's millisecond).
async fn after<T>(delay: Duration, work: impl std::future::Future<Output = T>) -> T {
    let start = std::time::Instant::now();
    while start.elapsed() < delay {
        tokio::task::yield_now().await;
    }
    work.await
}

/// Which side of a race went first, as the outcomes show it.
#[derive(Debug, Default)]
struct Orders {
    commit_first: usize,
    delete_first: usize,
}

/// gc's conditional delete ("unless touched since the mark") racing a
/// re-commit of the same digest never loses the blob, over many rounds:
/// whenever the commit is acknowledged, the blob is there afterwards with
/// its bytes; when the delete won first, the commit either placed the bytes
/// again or was refused; and no record ever lacks its file, nor a file its
/// record. Half the rounds re-commit in the deleting namespace (a reuse of
/// the blob it was told exists), half in another namespace that uploaded
/// the same bytes.
#[tokio::test]
async fn a_gc_delete_racing_a_recommit_never_loses_the_blob() -> Result<()> {
    let harness = Harness::start().await?;
    let (a, b) = (harness.content("a"), harness.content("b"));
    let data = common::pseudo_random(64 << 10, 11);
    let digest = sha256(&data);
    let path = harness.root().join("blobs/sha256").join(&digest[7..]);
    let mut orders: HashMap<&str, Orders> = HashMap::new();

    for round in 0..200 {
        if a.info(&info_request(&digest)).await.is_err() {
            push(&a, "setup", &data).await?;
        }
        // gc marks after the last commit, then deletes while a client
        // commits the same digest again.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let epoch = berth_proto::Timestamp::now().unix_nanos as u64;
        let (kind, recommitter) = if round % 2 == 0 {
            ("reuse", &a)
        } else {
            ("other", &b)
        };
        let delete = cpb::DeleteRequest {
            digest: digest.clone(),
            unless_touched_since: epoch,
        };
        // The re-commit is ready to commit when the race starts: a reuse
        // was told the blob exists, an upload has written its bytes.
        let reference = format!("round-{round}");
        let opened = recommitter.open(&open_request(&reference, &data)).await?;
        assert_eq!(opened.exists, kind == "reuse", "round {round}");
        if !opened.exists {
            write_all(recommitter, &reference, 0, &data).await?;
        }
        let commit = commit_request(&reference, &digest, data.len());
        // Rounds vary which request leaves first and by how much, so both
        // orders are met.
        let lead = Duration::from_micros((round as u64 * 97) % 1500);
        let (delete_lead, commit_lead) = match round % 4 < 2 {
            true => (Duration::ZERO, lead),
            false => (lead, Duration::ZERO),
        };
        let (dropped, committed) = tokio::join!(
            after(delete_lead, a.delete(&delete)),
            after(commit_lead, recommitter.commit(&commit)),
        );
        let dropped = dropped?;
        let deleted = dropped.deleted;

        // An acknowledged commit has its blob, bytes and all.
        match &committed {
            Ok(_) => {
                let back = recommitter.read_all(&digest).await?;
                assert_eq!(sha256(&back), digest, "round {round}");
            }
            Err(err) => {
                assert_eq!(err.code, Code::NotFound, "round {round}: {err}");
                assert_eq!(kind, "reuse", "round {round}: an upload was refused: {err}");
                assert!(deleted, "round {round}: refused though the delete kept it");
                recommitter
                    .abort(&cpb::AbortRequest { r#ref: reference })
                    .await
                    .ok();
            }
        }
        // In the deleting namespace, a reuse that went first keeps the blob.
        if kind == "reuse" && committed.is_ok() && !deleted {
            assert!(
                a.info(&info_request(&digest)).await.is_ok(),
                "round {round}"
            );
        }
        // A reuse that went first keeps a's hold; an upload by b that went
        // first keeps the file, so a's delete frees nothing.
        let delete_first = match kind {
            "reuse" => deleted,
            _ => dropped.freed_bytes > 0,
        };
        let order = orders.entry(kind).or_default();
        if delete_first {
            order.delete_first += 1;
        } else {
            order.commit_first += 1;
        }

        // Records and files agree.
        let held_a = a.info(&info_request(&digest)).await.is_ok();
        let held_b = b.info(&info_request(&digest)).await.is_ok();
        assert_eq!(path.exists(), held_a || held_b, "round {round}");
        if held_b {
            let drop_b = cpb::DeleteRequest {
                digest: digest.clone(),
                unless_touched_since: 0,
            };
            b.delete(&drop_b).await?;
        }
    }

    // Both orders happened, so the race was run and not only one side of it.
    println!("orders: {orders:?}");
    for (kind, order) in &orders {
        assert!(
            order.commit_first > 0,
            "{kind}: the commit never went first"
        );
        assert!(
            order.delete_first > 0,
            "{kind}: the delete never went first"
        );
    }
    blob_files_are_sound(&harness.root())?;
    Ok(())
}
