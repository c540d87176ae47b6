//! Events through the outbox and the JetStream stream: nothing written while
//! the publisher or the consumer is down is lost, everything arrives in
//! order and is applied once, a republished entry is stored once, an entry
//! sent ahead of its commit keeps its place and is stored once, and a
//! recreated stream or a gap past retention is reported, never skipped.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use heed::byteorder::BigEndian;
use heed::types::{Bytes as RawBytes, Str, U64};
use heed::Database;
use tokio_util::sync::CancellationToken;

use berth_bus::events::{
    ensure_stream, Consumer, Cursor, Delivered, Outbox, ReconcileReason, Resume, STREAM,
};
use berth_bus::store::{open_env, Env};
use berth_bus::{subject, Code};
use berth_testkit::NatsServer;

/// An event's payload: which change it reports.
#[derive(Clone, PartialEq, prost::Message)]
struct Changed {
    #[prost(uint64, tag = "1")]
    number: u64,
}

/// The side that makes changes: a change and its event in one transaction.
struct Producer {
    env: Env,
    outbox: Outbox,
    changes: Database<U64<BigEndian>, RawBytes>,
    _dir: tempfile::TempDir,
}

impl Producer {
    fn open() -> anyhow::Result<Producer> {
        let dir = tempfile::tempdir()?;
        let env = open_env(dir.path(), 4)?;
        let outbox = Outbox::open(&env, "metadata", "")?;
        let mut txn = env.write_txn()?;
        let changes = env.create_database(&mut txn, Some("changes"))?;
        txn.commit()?;
        Ok(Producer {
            env,
            outbox,
            changes,
            _dir: dir,
        })
    }

    /// Makes changes `numbers`, each with its event `containers.update`
    /// whose generation is the change's number.
    fn change(&self, numbers: std::ops::RangeInclusive<u64>) -> anyhow::Result<()> {
        for number in numbers {
            let mut txn = self.env.write_txn()?;
            self.changes.put(&mut txn, &number, b"done")?;
            let payload = Changed { number };
            self.outbox
                .push(&mut txn, "default", "containers.update", number, &payload)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// Begins change `number` with its event keyed by the change, sends
    /// the event ahead, and returns the open transaction and whether the
    /// send was started.
    fn change_ahead(&self, number: u64) -> anyhow::Result<(heed::RwTxn<'_>, bool)> {
        let mut txn = self.env.write_txn()?;
        self.changes.put(&mut txn, &number, b"done")?;
        let payload = Changed { number };
        let key = format!("change-{number}");
        let keyed = self.outbox.push_keyed(
            &mut txn,
            "default",
            "containers.update",
            number,
            &payload,
            &key,
        )?;
        let sent = self.outbox.send_ahead(&txn, vec![keyed])?;
        Ok((txn, sent))
    }

    /// Runs the publisher until the returned token is cancelled.
    fn publisher(
        &self,
        js: &jetstream::Context,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(self.outbox.clone().run_publisher(
            self.env.clone(),
            js.clone(),
            shutdown.clone(),
        ));
        (shutdown, task)
    }
}

/// The side that applies events: each applied event and the cursor after
/// it are written in one transaction.
struct Applier {
    env: Env,
    meta: Database<Str, RawBytes>,
    applied: Database<U64<BigEndian>, U64<BigEndian>>,
    _dir: tempfile::TempDir,
}

impl Applier {
    fn open() -> anyhow::Result<Applier> {
        let dir = tempfile::tempdir()?;
        let env = open_env(dir.path(), 4)?;
        let mut txn = env.write_txn()?;
        let meta = env.create_database(&mut txn, Some("meta"))?;
        let applied = env.create_database(&mut txn, Some("applied"))?;
        txn.commit()?;
        Ok(Applier {
            env,
            meta,
            applied,
            _dir: dir,
        })
    }

    fn cursor(&self) -> anyhow::Result<Cursor> {
        let txn = self.env.read_txn()?;
        Ok(self
            .meta
            .get(&txn, "cursor")?
            .map(Cursor::from_bytes)
            .unwrap_or_default())
    }

    /// Applies one event unless the cursor is already past it; answers
    /// whether it did.
    fn apply(&self, delivered: &Delivered) -> anyhow::Result<bool> {
        let mut txn = self.env.write_txn()?;
        let cursor = self
            .meta
            .get(&txn, "cursor")?
            .map(Cursor::from_bytes)
            .unwrap_or_default();
        if delivered.cursor.stream_created == cursor.stream_created
            && delivered.cursor.seq <= cursor.seq
        {
            return Ok(false);
        }
        let payload: Changed = prost::Message::decode(delivered.envelope.payload.clone())?;
        assert_eq!(payload.number, delivered.envelope.generation);
        self.applied
            .put(&mut txn, &delivered.cursor.seq, &payload.number)?;
        self.meta
            .put(&mut txn, "cursor", &delivered.cursor.to_bytes())?;
        txn.commit()?;
        Ok(true)
    }

    /// The change numbers applied, in stream order.
    fn applied(&self) -> anyhow::Result<Vec<u64>> {
        let txn = self.env.read_txn()?;
        let mut numbers = Vec::new();
        for item in self.applied.iter(&txn)? {
            numbers.push(item?.1);
        }
        Ok(numbers)
    }

    /// Resumes from the stored cursor and applies events until `count`
    /// have been applied in all; answers how many deliveries were repeats.
    async fn consume_until(&self, js: &jetstream::Context, count: usize) -> anyhow::Result<usize> {
        let mut consumer = Consumer::new(js, vec![events_filter()]).await?;
        let cursor = match consumer.resume(self.cursor()?).await? {
            Resume::Continue(cursor) => cursor,
            other => bail!("expected to continue, got {other:?}"),
        };
        let mut messages = Box::pin(consumer.messages(cursor).await?);
        let mut repeats = 0;
        while self.applied()?.len() < count {
            let delivered = within(Duration::from_secs(10), messages.next())
                .await?
                .context("event stream ended")??;
            if !self.apply(&delivered)? {
                repeats += 1;
            }
        }
        Ok(repeats)
    }
}

fn events_filter() -> String {
    format!("{}.*.{}.>", subject::PREFIX, subject::EVENTS)
}

async fn within<F: Future>(limit: Duration, future: F) -> anyhow::Result<F::Output> {
    tokio::time::timeout(limit, future)
        .await
        .context("timed out")
}

async fn stream_messages(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

async fn wait_drained(producer: &Producer) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while producer.outbox.pending(&producer.env)? > 0 {
        if Instant::now() > deadline {
            bail!("outbox not drained");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn connect(server: &NatsServer) -> anyhow::Result<jetstream::Context> {
    let nats = berth_bus::connect(&server.url(), "events-test").await?;
    Ok(jetstream::new(nats))
}

/// Events written while the publisher is down, and while the consumer is
/// down, all arrive in order once both run, and each is applied once across
/// a restart of the consumer from its stored cursor.
#[tokio::test]
async fn events_survive_a_down_publisher_and_consumer() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    ensure_stream(&js).await?;
    let producer = Producer::open()?;
    let applier = Applier::open()?;

    // Publisher down: the changes wait in the outbox, none in the stream.
    producer.change(1..=40)?;
    assert_eq!(producer.outbox.pending(&producer.env)?, 40);
    assert_eq!(stream_messages(&js).await?, 0);

    // Publisher up, consumer down.
    let (shutdown, task) = producer.publisher(&js);
    wait_drained(&producer).await?;
    producer.change(41..=80)?;
    wait_drained(&producer).await?;
    shutdown.cancel();
    task.await?;
    assert_eq!(stream_messages(&js).await?, 80);

    // Publisher down again while the consumer reads part of the stream and
    // stops.
    producer.change(81..=100)?;
    let repeats = applier.consume_until(&js, 60).await?;
    assert_eq!(repeats, 0);

    // Both up: the consumer goes on from its cursor.
    let (shutdown, task) = producer.publisher(&js);
    let repeats = applier.consume_until(&js, 100).await?;
    shutdown.cancel();
    task.await?;
    assert_eq!(repeats, 0, "events after the cursor only");
    assert_eq!(applier.applied()?, (1..=100).collect::<Vec<_>>());
    assert_eq!(stream_messages(&js).await?, 100);

    // A consumer restarted from its cursor with nothing new applies nothing.
    let mut consumer = Consumer::new(&js, vec![events_filter()]).await?;
    let Resume::Continue(cursor) = consumer.resume(applier.cursor()?).await? else {
        bail!("expected to continue");
    };
    let mut messages = Box::pin(consumer.messages(cursor).await?);
    let next = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
    assert!(next.is_err(), "nothing after the cursor: {next:?}");
    Ok(())
}

/// An outbox entry published again (as after a crash between the ack and
/// the delete) is stored once, thanks to its message id.
#[tokio::test]
async fn a_republished_entry_is_stored_once() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    ensure_stream(&js).await?;
    let mut producer = Producer::open()?;
    producer.change(1..=3)?;

    // Published, then the service dies before any change deletes them: they
    // are still in the outbox, and the restarted publisher sends them again.
    assert_eq!(producer.outbox.publish_batch(&producer.env, &js).await?, 3);
    assert_eq!(producer.outbox.pending(&producer.env)?, 0);
    assert_eq!(
        outbox_len(&producer.env)?,
        3,
        "acked entries wait for a sweep"
    );
    producer.outbox = Outbox::open(&producer.env, "metadata", "")?;
    assert_eq!(producer.outbox.pending(&producer.env)?, 3);

    assert_eq!(producer.outbox.publish_batch(&producer.env, &js).await?, 3);
    assert_eq!(producer.outbox.pending(&producer.env)?, 0);
    assert_eq!(stream_messages(&js).await?, 3);

    // The next change's transaction removes what the stream acknowledged,
    // and a publisher that stops removes the rest.
    producer.change(4..=4)?;
    assert_eq!(outbox_len(&producer.env)?, 1);
    let (shutdown, task) = producer.publisher(&js);
    wait_drained(&producer).await?;
    shutdown.cancel();
    task.await?;
    assert_eq!(outbox_len(&producer.env)?, 0);
    assert_eq!(stream_messages(&js).await?, 4);
    Ok(())
}

/// How many entries the outbox table holds, acknowledged or not.
fn outbox_len(env: &Env) -> anyhow::Result<u64> {
    let txn = env.read_txn()?;
    let entries: Database<U64<BigEndian>, RawBytes> = env
        .open_database(&txn, Some("outbox"))?
        .context("no outbox table")?;
    Ok(entries.len(&txn)?)
}

/// A keyed entry goes out before its transaction commits when everything
/// before it is in the stream, and only then; made again after a crash
/// before the commit, it is stored once; and the stream keeps the order
/// the changes were made in.
#[tokio::test]
async fn an_entry_sent_ahead_keeps_its_place_and_is_stored_once() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    ensure_stream(&js).await?;
    let mut producer = Producer::open()?;
    let applier = Applier::open()?;
    let nats = berth_bus::connect(&server.url(), "events-test-watch").await?;
    let mut watch = nats.subscribe(events_filter()).await?;
    nats.flush().await?;

    // Before the publisher runs there is no stream to send to.
    let (txn, sent) = producer.change_ahead(1)?;
    assert!(!sent, "no publisher yet");
    txn.commit()?;

    let (shutdown, task) = producer.publisher(&js);
    wait_drained(&producer).await?;
    let mut seen = Vec::new();
    seen_until(&mut watch, &mut seen, 1).await?;

    // Everything before it is in the stream: the event is out while its
    // transaction is still open.
    let (txn, sent) = producer.change_ahead(2)?;
    assert!(sent);
    seen_until(&mut watch, &mut seen, 2).await?;
    txn.commit()?;
    producer.outbox.wake().notify_one();
    producer.change(3..=4)?;
    producer.outbox.wake().notify_one();
    wait_drained(&producer).await?;

    // Sent ahead, then the service dies before the commit: the change is
    // made again after the restart, under the same key.
    let (txn, sent) = producer.change_ahead(5)?;
    assert!(sent);
    seen_until(&mut watch, &mut seen, 5).await?;
    txn.abort();
    shutdown.cancel();
    task.await?;
    producer.outbox = Outbox::open(&producer.env, "metadata", "")?;
    let (shutdown, task) = producer.publisher(&js);
    wait_drained(&producer).await?;
    let (txn, sent) = producer.change_ahead(5)?;
    assert!(sent, "nothing waits before it");
    txn.commit()?;
    producer.outbox.wake().notify_one();
    wait_drained(&producer).await?;

    // With entries still waiting (the publisher is down), nothing goes
    // ahead of them.
    shutdown.cancel();
    task.await?;
    producer.change(6..=6)?;
    let (txn, sent) = producer.change_ahead(7)?;
    assert!(!sent, "an earlier entry is not in the stream yet");
    txn.commit()?;
    let (shutdown, task) = producer.publisher(&js);
    wait_drained(&producer).await?;
    shutdown.cancel();
    task.await?;

    let repeats = applier.consume_until(&js, 7).await?;
    assert_eq!(repeats, 0);
    assert_eq!(applier.applied()?, (1..=7).collect::<Vec<_>>());
    assert_eq!(stream_messages(&js).await?, 7, "each change stored once");
    // What a plain subscriber saw: each change once (the publisher skips
    // what went ahead), but the one made again after the crash, which
    // JetStream stored once.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(300), watch.next()).await
    {
        let envelope: berth_proto::Envelope = prost::Message::decode(message.payload)?;
        seen.push(envelope.generation);
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 5, 6, 7]);
    Ok(())
}

/// Reads the plain subscription into `seen` (the generations) until
/// `generation` arrives.
async fn seen_until(
    watch: &mut async_nats::Subscriber,
    seen: &mut Vec<u64>,
    generation: u64,
) -> anyhow::Result<()> {
    loop {
        let message = within(Duration::from_secs(5), watch.next())
            .await?
            .context("subscription ended")?;
        let envelope: berth_proto::Envelope = prost::Message::decode(message.payload)?;
        seen.push(envelope.generation);
        if envelope.generation == generation {
            return Ok(());
        }
    }
}

/// A stream deleted and created again is reported as `StreamRecreated`,
/// also to a consumer made before the recreation.
#[tokio::test]
async fn a_recreated_stream_is_detected() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    ensure_stream(&js).await?;
    let producer = Producer::open()?;
    let applier = Applier::open()?;
    producer.change(1..=5)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;
    applier.consume_until(&js, 5).await?;
    let cursor = applier.cursor()?;
    let mut before = Consumer::new(&js, vec![events_filter()]).await?;
    assert_eq!(before.resume(cursor).await?, Resume::Continue(cursor));

    js.delete_stream(STREAM).await?;
    ensure_stream(&js).await?;
    producer.change(6..=7)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;

    let mut after = Consumer::new(&js, vec![events_filter()]).await?;
    for consumer in [&mut before, &mut after] {
        match consumer.resume(cursor).await? {
            Resume::Reconcile { from, reason } => {
                assert_eq!(reason, ReconcileReason::StreamRecreated);
                assert_eq!(from.seq, 0);
                assert_ne!(from.stream_created, cursor.stream_created);
            }
            other => bail!("expected a reconcile, got {other:?}"),
        }
    }
    Ok(())
}

/// A stream recreated under a running consumer ends its messages with
/// `FailedPrecondition` instead of delivering the new stream's events as if
/// they followed the old ones.
#[tokio::test]
async fn a_stream_recreated_under_a_live_consumer_is_reported() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    ensure_stream(&js).await?;
    let producer = Producer::open()?;
    producer.change(1..=3)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;

    let mut consumer = Consumer::new(&js, vec![events_filter()]).await?;
    let Resume::Continue(cursor) = consumer.resume(Cursor::default()).await? else {
        bail!("expected to continue");
    };
    let mut messages = Box::pin(consumer.messages(cursor).await?);
    for number in 1..=3 {
        let delivered = within(Duration::from_secs(10), messages.next())
            .await?
            .context("ended")??;
        assert_eq!(delivered.envelope.generation, number);
    }

    // The new stream's first events have sequences the old one used.
    js.delete_stream(STREAM).await?;
    ensure_stream(&js).await?;
    producer.change(4..=8)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;

    let item = within(Duration::from_secs(30), messages.next())
        .await?
        .context("ended without an error")?;
    let err = item.expect_err("an event of the new stream was delivered");
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert!(err.message.contains("recreated"), "{err}");
    assert!(messages.next().await.is_none(), "the stream goes on");
    Ok(())
}

/// Events dropped by retention past a consumer's cursor are reported as a
/// `Gap`; a cursor just before the stream's first event is not one.
#[tokio::test]
async fn a_gap_past_retention_is_detected() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let js = connect(&server).await?;
    js.create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec![subject::all_events()],
        max_messages: 5,
        ..Default::default()
    })
    .await?;
    let producer = Producer::open()?;
    let applier = Applier::open()?;
    producer.change(1..=3)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;
    applier.consume_until(&js, 3).await?;
    let cursor = applier.cursor()?;
    assert_eq!(cursor.seq, 3);

    // Ten more: the stream keeps sequences 9 to 13 only.
    producer.change(4..=13)?;
    producer.outbox.publish_batch(&producer.env, &js).await?;
    let mut consumer = Consumer::new(&js, vec![events_filter()]).await?;
    match consumer.resume(cursor).await? {
        Resume::Reconcile { from, reason } => {
            assert_eq!(reason, ReconcileReason::Gap);
            assert_eq!(from.seq, 8);
            assert_eq!(from.stream_created, cursor.stream_created);
        }
        other => bail!("expected a gap, got {other:?}"),
    }

    // A fresh cursor on a stream that dropped events is a gap too.
    let fresh = consumer.resume(Cursor::default()).await?;
    assert!(
        matches!(
            fresh,
            Resume::Reconcile {
                reason: ReconcileReason::Gap,
                ..
            }
        ),
        "{fresh:?}"
    );

    // Just before the first event kept, or at the end, nothing is missing.
    for seq in [8, 13] {
        let at = Cursor { seq, ..cursor };
        assert_eq!(consumer.resume(at).await?, Resume::Continue(at));
    }
    Ok(())
}

/// An event whose namespace or topic makes no subject fails the change it
/// belongs to, instead of waiting in the outbox for ever.
#[test]
fn an_event_without_a_subject_is_refused_at_push() -> anyhow::Result<()> {
    let producer = Producer::open()?;
    for (namespace, topic) in [
        ("default", "tasks.>"),
        ("events", "tasks.exit"),
        ("a b", "x"),
    ] {
        let mut txn = producer.env.write_txn()?;
        let err = producer
            .outbox
            .push(&mut txn, namespace, topic, 1, &Changed { number: 1 })
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{namespace:?} {topic:?}");
    }
    assert_eq!(producer.outbox.pending(&producer.env)?, 0);
    Ok(())
}
