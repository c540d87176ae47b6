//! Events: an outbox written with the change, a publisher that moves it to
//! JetStream, and a consumer that reads the stream in order from a cursor.
//!
//! A change and its event are written in one LMDB transaction (the outbox),
//! then published; a crash between the two loses nothing, because the
//! publisher starts from the outbox again. Each outbox entry is published
//! with a `Nats-Msg-Id` that JetStream deduplicates, so an entry published
//! twice (a crash after the ack, before the delete) is stored once. Entries
//! go out one at a time, each after the ack of the one before, so the
//! stream holds them in the order they were written. The acknowledged ones
//! are deleted by the next change's transaction, or by the publisher after
//! a second of quiet: a delete commit of the publisher's own would be one
//! more sync per event, contending with the changes for the store's one
//! writer.
//!
//! An event whose message id the caller derives from the change itself
//! ([`Outbox::push_keyed`]: an exit, keyed by the reservation it ends) may
//! also go out ahead of its commit ([`Outbox::send_ahead`]), when every
//! entry before it is in the stream already: a crash before the commit
//! makes the same change again on restart (the shim still holds the exit),
//! under the same id, which JetStream stores once. The publisher then skips
//! the entry the send ahead delivered, so the stream's order holds.
//!
//! Limitation: deduplication lasts the stream's duplicate window (two
//! minutes). A service that crashed between an ack and the delete (at most
//! the events acked since its last change, or in its last second) and
//! comes back later publishes those entries again; their generation makes
//! applying them a second time a no-op.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use heed::byteorder::BigEndian;
use heed::types::{Bytes as RawBytes, Str, U64};
use heed::{Database, RwTxn};
use prost::Message;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use berth_proto::{Envelope, Timestamp};

use crate::error::{Code, Error, Result};
use crate::store::Env;
use crate::subject;

/// The JetStream stream holding every event of every namespace.
pub const STREAM: &str = "BERTH_EVENTS";

/// The environment variable that says on how many servers of a NATS
/// cluster berth's JetStream streams and buckets are kept.
pub const REPLICAS_ENV: &str = "BERTH_STREAM_REPLICAS";

/// The replicas [`REPLICAS_ENV`] asks for: 1 when unset (a single server),
/// 3 for a cluster of three, so that losing one server loses nothing;
/// values past JetStream's limit of 5 are taken as 5.
pub fn replicas() -> usize {
    std::env::var(REPLICAS_ENV)
        .ok()
        .and_then(|value| value.trim().parse::<usize>().ok())
        .map(|replicas| replicas.clamp(1, 5))
        .unwrap_or(1)
}

/// Creates the event stream if it does not exist (idempotent), kept on
/// [`replicas`] servers.
///
/// A JetStream that does not answer yet (a cluster still placing its
/// first streams, a server starting) is asked again with a growing pause
/// for up to [`STREAM_WAIT`]; then `Unavailable`.
///
/// # Limitations
/// A stream that exists is used as it is: changing [`REPLICAS_ENV`] later
/// does not change its replicas (`nats stream edit` does).
pub async fn ensure_stream(js: &jetstream::Context) -> Result<stream::Stream> {
    use jetstream::context::CreateStreamErrorKind as Kind;
    let deadline = tokio::time::Instant::now() + STREAM_WAIT;
    let mut pause = Duration::from_millis(100);
    loop {
        let made = js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_string(),
                subjects: vec![subject::all_events()],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                num_replicas: replicas(),
                ..Default::default()
            })
            .await;
        let err = match made {
            Ok(stream) => return Ok(stream),
            Err(err) => err,
        };
        let lasting = matches!(
            err.kind(),
            Kind::EmptyStreamName | Kind::InvalidStreamName | Kind::DomainAndExternalSet
        );
        if lasting || tokio::time::Instant::now() + pause > deadline {
            return Err(Error::unavailable(format!("create stream {STREAM}: {err}")));
        }
        tracing::debug!(error = %err, "event stream not made yet; asking again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// How long [`ensure_stream`] keeps asking a JetStream that does not answer.
pub const STREAM_WAIT: Duration = Duration::from_secs(30);

/// The outbox of one service: events waiting to be published.
#[derive(Clone)]
pub struct Outbox {
    entries: Database<U64<BigEndian>, RawBytes>,
    meta: Database<Str, RawBytes>,
    /// The message ids of keyed entries, by sequence.
    ids: Database<U64<BigEndian>, Str>,
    id: String,
    source: String,
    node: String,
    wake: Arc<Notify>,
    ahead: Arc<Ahead>,
}

/// What the publisher and the sends ahead share.
#[derive(Default)]
struct Ahead {
    /// The stream, once the publisher runs.
    js: OnceLock<jetstream::Context>,
    state: Mutex<AheadState>,
}

#[derive(Default)]
struct AheadState {
    /// Every entry up to this sequence is in the stream (0 at start: the
    /// entries left from before are not known to be).
    acked_through: u64,
    /// Entries sent ahead and not yet taken by the publisher, by sequence:
    /// their message id, and whether the stream acknowledged them (`None`
    /// while the send is under way).
    flights: BTreeMap<u64, (String, watch::Receiver<Option<bool>>)>,
}

/// An entry queued by [`Outbox::push_keyed`], which [`Outbox::send_ahead`]
/// may publish before its transaction commits.
pub struct Keyed {
    seq: u64,
    msg_id: String,
    raw: Vec<u8>,
}

impl Outbox {
    /// Opens (creating) the outbox tables in `env`; `source` is the
    /// service's name and `node` its node id (empty for cluster services).
    pub fn open(env: &Env, source: &str, node: &str) -> Result<Self> {
        let mut txn = env.write_txn()?;
        let entries = env.create_database(&mut txn, Some("outbox"))?;
        let meta: Database<Str, RawBytes> = env.create_database(&mut txn, Some("outbox_meta"))?;
        let ids = env.create_database(&mut txn, Some("outbox_ids"))?;
        // The outbox's identity keeps message ids unique if the store is
        // ever recreated while the stream keeps its dedup window.
        let id = match meta.get(&txn, "id")? {
            Some(raw) => String::from_utf8_lossy(raw).into_owned(),
            None => {
                let id = uuid::Uuid::new_v4().simple().to_string();
                meta.put(&mut txn, "id", id.as_bytes())?;
                id
            }
        };
        txn.commit()?;
        Ok(Outbox {
            entries,
            meta,
            ids,
            id,
            source: source.to_string(),
            node: node.to_string(),
            wake: Arc::new(Notify::new()),
            ahead: Arc::default(),
        })
    }

    /// Queues an event in `txn`, the transaction that makes the change.
    ///
    /// `InvalidArgument` for a namespace or topic that makes no event
    /// subject, so such an event fails its change instead of blocking the
    /// outbox.
    pub fn push<P: Message>(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        topic: &str,
        generation: u64,
        payload: &P,
    ) -> Result<()> {
        self.queue(txn, namespace, topic, generation, payload)?;
        Ok(())
    }

    /// Queues an event like [`Outbox::push`], under a message id made of
    /// `key`, which must name this change alone and come out the same when
    /// the change is made again after a crash (the exit of one reservation,
    /// say): then [`Outbox::send_ahead`] may publish it before the commit.
    pub fn push_keyed<P: Message>(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        topic: &str,
        generation: u64,
        payload: &P,
        key: &str,
    ) -> Result<Keyed> {
        let (seq, raw) = self.queue(txn, namespace, topic, generation, payload)?;
        let msg_id = format!("{}-{key}", self.id);
        self.ids.put(txn, &seq, &msg_id)?;
        Ok(Keyed { seq, msg_id, raw })
    }

    /// Publishes `keyed`, entries of the transaction `txn` in the order they
    /// were queued, before `txn` commits, when every entry before them is in
    /// the stream and no other send ahead is under way; else leaves them to
    /// the publisher. The caller commits next: the publisher, woken after
    /// the commit, waits for this send and skips what it delivered. Returns
    /// whether the send was started.
    ///
    /// Holding the write transaction is what makes the check hold: no entry
    /// can be queued before these until it commits.
    pub fn send_ahead(&self, txn: &RwTxn, keyed: Vec<Keyed>) -> Result<bool> {
        let Some(first) = keyed.first().map(|k| k.seq) else {
            return Ok(false);
        };
        let Some(js) = self.ahead.js.get().cloned() else {
            return Ok(false);
        };
        let before = match self.entries.rev_range(txn, &(..first))?.next() {
            Some(item) => Some(item?.0),
            None => None,
        };
        let mut senders = Vec::with_capacity(keyed.len());
        {
            let mut state = self.ahead.lock();
            let published = before.is_none_or(|seq| seq <= state.acked_through);
            if !published || !state.flights.is_empty() {
                return Ok(false);
            }
            for entry in &keyed {
                let (tx, rx) = watch::channel(None);
                state.flights.insert(entry.seq, (entry.msg_id.clone(), rx));
                senders.push(tx);
            }
        }
        tokio::spawn(async move {
            // One failure leaves it and everything after it to the
            // publisher, which sends them in order.
            let mut delivered = true;
            for (entry, sender) in keyed.into_iter().zip(senders) {
                if delivered {
                    delivered = publish_one(&js, &entry.msg_id, entry.raw).await.is_ok();
                }
                let _ = sender.send(Some(delivered));
            }
        });
        Ok(true)
    }

    /// Queues an event in `txn`; returns its sequence and stored form.
    fn queue<P: Message>(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        topic: &str,
        generation: u64,
        payload: &P,
    ) -> Result<(u64, Vec<u8>)> {
        subject::event(namespace, topic)?;
        let seq = match self.entries.last(txn)? {
            Some((seq, _)) => seq + 1,
            None => self.next_seq(txn)?,
        };
        let envelope = Envelope {
            topic: topic.to_string(),
            namespace: namespace.to_string(),
            node: self.node.clone(),
            timestamp: Some(Timestamp::now()),
            generation,
            source: self.source.clone(),
            payload: payload.encode_to_vec().into(),
            traceparent: crate::trace::current_traceparent(),
        };
        let raw = envelope.encode_to_vec();
        self.entries.put(txn, &seq, &raw)?;
        self.meta.put(txn, "next", &(seq + 1).to_be_bytes())?;
        self.sweep(txn)?;
        Ok((seq, raw))
    }

    /// The notifier that makes the publisher look at the outbox now.
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// How many events wait to be published.
    pub fn pending(&self, env: &Env) -> Result<u64> {
        let txn = env.read_txn()?;
        let acked = self.ahead.lock().acked_through;
        let pending = self.entries.range(&txn, &(acked + 1..))?.count();
        Ok(pending as u64)
    }

    /// Removes, in `txn`, the entries the stream has acknowledged. A
    /// change's own transaction does it as it queues its events, so the
    /// publisher needs no commit (and no sync) of its own for them.
    fn sweep(&self, txn: &mut RwTxn) -> Result<()> {
        let acked = self.ahead.lock().acked_through;
        let Some((first, _)) = self.entries.first(txn)? else {
            return Ok(());
        };
        if first <= acked {
            self.entries.delete_range(txn, &(..=acked))?;
            self.ids.delete_range(txn, &(..=acked))?;
        }
        Ok(())
    }

    /// Removes the acknowledged entries in a commit of its own: when the
    /// publisher is idle or stops, so an outbox left alone ends empty.
    fn sweep_alone(&self, env: &Env) -> Result<()> {
        let acked = self.ahead.lock().acked_through;
        let lingering = {
            let txn = env.read_txn()?;
            matches!(self.entries.first(&txn)?, Some((first, _)) if first <= acked)
        };
        if lingering {
            let mut txn = env.write_txn()?;
            self.sweep(&mut txn)?;
            txn.commit()?;
        }
        Ok(())
    }

    fn sweep_or_warn(&self, env: &Env) {
        if let Err(err) = self.sweep_alone(env) {
            tracing::warn!(source = %self.source, error = %err, "removing published events failed");
        }
    }

    /// Sequence numbers keep growing across an empty outbox, so message ids
    /// never repeat.
    fn next_seq(&self, txn: &RwTxn) -> Result<u64> {
        Ok(match self.meta.get(txn, "next")? {
            Some(raw) if raw.len() == 8 => {
                u64::from_be_bytes(raw.try_into().map_err(|_| Error::internal("outbox meta"))?)
            }
            _ => 1,
        })
    }

    /// Moves the outbox to JetStream until `shutdown` is cancelled: publishes
    /// in order, waits for the acks, then deletes what was acked. Failures
    /// are retried with a growing pause; nothing is dropped. Sends ahead
    /// may start as soon as this returns, before the future is polled.
    pub fn run_publisher(
        self,
        env: Env,
        js: jetstream::Context,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let _ = self.ahead.js.set(js.clone());
        async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.publish_batch(&env, &js).await {
                    Ok(0) => {
                        backoff = Duration::from_millis(50);
                        let idle = tokio::select! {
                            _ = self.wake.notified() => false,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => true,
                            _ = shutdown.cancelled() => {
                                self.sweep_or_warn(&env);
                                return;
                            }
                        };
                        if idle {
                            self.sweep_or_warn(&env);
                        }
                    }
                    Ok(_) => backoff = Duration::from_millis(50),
                    Err(err) => {
                        tracing::warn!(source = %self.source, error = %err, "publishing events failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => {
                                self.sweep_or_warn(&env);
                                return;
                            }
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    /// Publishes up to 256 entries past the acknowledged ones, in order,
    /// one at a time: each waits for its ack before the next is sent, so a
    /// failure can never leave a later event stored before an earlier one.
    /// Returns how many were acked, or the failure after the ones before
    /// it. The acked entries are removed by the next change's transaction,
    /// or by the publisher once idle.
    pub async fn publish_batch(&self, env: &Env, js: &jetstream::Context) -> Result<usize> {
        let acked_through = self.ahead.lock().acked_through;
        let batch = {
            let txn = env.read_txn()?;
            let mut batch = Vec::new();
            for item in self.entries.range(&txn, &(acked_through + 1..))?.take(256) {
                let (seq, raw) = item?;
                let msg_id = match self.ids.get(&txn, &seq)? {
                    Some(id) => id.to_string(),
                    None => format!("{}-{seq}", self.id),
                };
                batch.push((seq, msg_id, raw.to_vec()));
            }
            batch
        };
        if batch.is_empty() {
            return Ok(0);
        }

        // Pipelining would be faster, but after a lost connection a later
        // message can reach the stream while an earlier one was lost.
        let mut acked = 0;
        let mut failure = None;
        for (seq, msg_id, raw) in batch {
            let delivered = self.sent_ahead(seq, &msg_id).await;
            let published = match delivered {
                true => Ok(()),
                false => publish_one(js, &msg_id, raw).await,
            };
            match published {
                Ok(()) => {
                    acked += 1;
                    self.ahead.lock().acked_through = seq;
                }
                Err(err) => {
                    failure = Some(err);
                    break;
                }
            }
        }

        match failure {
            Some(err) => Err(err),
            None => Ok(acked),
        }
    }

    /// Whether a send ahead delivered entry `seq` (waiting for it while it
    /// is under way). Sends ahead of entries before it are done with: a
    /// flight whose transaction never committed left no entry, or one that
    /// another change reused the sequence of, hence the id's check.
    async fn sent_ahead(&self, seq: u64, msg_id: &str) -> bool {
        let flight = {
            let mut state = self.ahead.lock();
            let later = state.flights.split_off(&(seq + 1));
            let mut taken = std::mem::replace(&mut state.flights, later);
            taken.remove(&seq)
        };
        match flight {
            Some((id, mut outcome)) if id == msg_id => {
                // A send whose task ended without a word (the runtime shut
                // down) counts as not delivered: the publisher sends it, and
                // the stream stores it once.
                matches!(
                    outcome.wait_for(Option::is_some).await.as_deref(),
                    Ok(Some(true))
                )
            }
            _ => false,
        }
    }
}

impl Ahead {
    fn lock(&self) -> std::sync::MutexGuard<'_, AheadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes one outbox entry and waits for the stream's ack. The message id
/// names the outbox and the entry (its sequence, or its key), so a repeat
/// within the stream's duplicate window is stored once.
async fn publish_one(js: &jetstream::Context, msg_id: &str, raw: Vec<u8>) -> Result<()> {
    let envelope = Envelope::decode(raw.as_slice())?;
    let subject = subject::event(&envelope.namespace, &envelope.topic)?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    if !envelope.traceparent.is_empty() {
        headers.insert("traceparent", envelope.traceparent.as_str());
    }
    let ack = js
        .publish_with_headers(subject, headers, raw.into())
        .await
        .map_err(|err| Error::unavailable(format!("publish event: {err}")))?;
    ack.await
        .map_err(|err| Error::unavailable(format!("event not acknowledged: {err}")))?;
    Ok(())
}

/// Where a consumer stands in the stream: the stream's identity (its
/// creation time) and the last sequence applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The stream's creation time in nanoseconds; 0 before the first event.
    pub stream_created: i64,
    /// The last stream sequence applied.
    pub seq: u64,
}

impl Cursor {
    /// The 16-byte form stored beside the change it caused.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.stream_created.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    /// Reads the stored form; anything else is the start.
    pub fn from_bytes(raw: &[u8]) -> Cursor {
        if raw.len() != 16 {
            return Cursor::default();
        }
        let mut created = [0; 8];
        let mut seq = [0; 8];
        created.copy_from_slice(&raw[..8]);
        seq.copy_from_slice(&raw[8..]);
        Cursor {
            stream_created: i64::from_be_bytes(created),
            seq: u64::from_be_bytes(seq),
        }
    }
}

/// How a consumer may go on from a stored cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The stream is the one the cursor came from and holds every event after it.
    Continue(Cursor),
    /// The stream was recreated, or events after the cursor were dropped by
    /// retention: the consumer must reconcile in full, then go on from `from`.
    Reconcile {
        /// The cursor to go on from after reconciling (the stream's start).
        from: Cursor,
        /// Why.
        reason: ReconcileReason,
    },
}

/// Why a consumer must reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileReason {
    /// The stream's identity differs from the cursor's.
    StreamRecreated,
    /// The stream's first sequence is past the cursor.
    Gap,
}

/// One event read from the stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Where the consumer stands once this event is applied.
    pub cursor: Cursor,
    /// The event.
    pub envelope: Envelope,
    /// The subject it was published on.
    pub subject: String,
}

/// Reads the event stream in order from a stored cursor.
///
/// # Limitations
/// The stream's identity is its creation time, and events dropped by
/// retention are seen through the stream's first sequence: both are checked
/// by [`Consumer::resume`] and again whenever the underlying consumer is
/// (re)created while [`Consumer::messages`] runs (after a reconnect, a
/// server restart, or a deleted stream). A live consumer that falls behind
/// retention without its consumer being recreated skips what was dropped;
/// each object's generation keeps what it then applies correct.
pub struct Consumer {
    stream: stream::Stream,
    created: i64,
    filters: Vec<String>,
}

impl Consumer {
    /// A consumer of the events whose subjects match `filters` (e.g.
    /// `berth.v1.*.events.tasks.>`); creates the stream if it is missing.
    pub async fn new(js: &jetstream::Context, filters: Vec<String>) -> Result<Self> {
        let mut stream = ensure_stream(js).await?;
        let info = stream
            .info()
            .await
            .map_err(|err| Error::unavailable(format!("stream info: {err}")))?;
        let created = identity(info);
        Ok(Consumer {
            stream,
            created,
            filters,
        })
    }

    /// Decides how to go on from `cursor`, reading the stream as it is now
    /// (a stream recreated since [`Consumer::new`] is seen).
    ///
    /// A fresh cursor (all zeros) continues from the start, unless the
    /// stream already dropped events by retention: that is a `Gap` too.
    pub async fn resume(&mut self, cursor: Cursor) -> Result<Resume> {
        let info = self
            .stream
            .info()
            .await
            .map_err(|err| Error::unavailable(format!("stream info: {err}")))?;
        self.created = identity(info);
        let first = info.state.first_sequence;
        let start = Cursor {
            stream_created: self.created,
            seq: first.saturating_sub(1),
        };

        let fresh = cursor == Cursor::default();
        if !fresh && cursor.stream_created != self.created {
            return Ok(Resume::Reconcile {
                from: start,
                reason: ReconcileReason::StreamRecreated,
            });
        }
        // The stream holds every event after the cursor only if its first
        // sequence is at most the next one; an empty stream whose events
        // expired has its first sequence just past its last.
        if first > cursor.seq + 1 {
            return Ok(Resume::Reconcile {
                from: start,
                reason: ReconcileReason::Gap,
            });
        }
        Ok(Resume::Continue(Cursor {
            stream_created: self.created,
            seq: cursor.seq,
        }))
    }

    /// Streams the events after `cursor`, in order, forever (an ordered
    /// consumer: no acks; the caller's stored cursor is the position).
    ///
    /// When the stream turns out to have been recreated, or to have dropped
    /// events after the last one delivered, the stream yields one
    /// `FailedPrecondition` error and ends: the caller resumes from its
    /// stored cursor, and [`Consumer::resume`] says how.
    pub async fn messages(
        &self,
        cursor: Cursor,
    ) -> Result<impl futures::Stream<Item = Result<Delivered>> + use<>> {
        use futures::StreamExt;
        let consumer = self
            .stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subjects: self.filters.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: cursor.seq + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|err| Error::unavailable(format!("create consumer: {err}")))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|err| Error::unavailable(format!("consume events: {err}")))?;
        let watch = Watch {
            stream: self.stream.clone(),
            created: self.created,
            consumer: String::new(),
            last: cursor.seq,
        };
        Ok(futures::stream::unfold(
            (Box::pin(messages), watch, false),
            |(mut messages, mut watch, ended)| async move {
                if ended {
                    return None;
                }
                let item = messages.next().await?;
                let delivered = watch.deliver(item).await;
                let ended = matches!(&delivered, Err(err) if err.code == Code::FailedPrecondition);
                Some((delivered, (messages, watch, ended)))
            },
        ))
    }
}

/// What [`Consumer::messages`] knows of the stream it reads.
struct Watch {
    stream: stream::Stream,
    created: i64,
    /// The name of the consumer that delivered the last event; the ordered
    /// consumer gets a new name each time it is recreated.
    consumer: String,
    /// The last stream sequence delivered.
    last: u64,
}

impl Watch {
    /// Checks and decodes one message from the ordered consumer.
    async fn deliver(
        &mut self,
        item: Result<jetstream::Message, jetstream::consumer::pull::OrderedError>,
    ) -> Result<Delivered> {
        let message = item.map_err(|err| Error::unavailable(format!("read event: {err}")))?;
        let info = message
            .info()
            .map_err(|err| Error::internal(format!("event metadata: {err}")))?;
        let seq = info.stream_sequence;

        // A (re)created consumer starts at the sequence after the last one
        // on whatever stream has the name now: check that it is the same
        // stream and that nothing in between was dropped.
        if info.consumer != self.consumer {
            let consumer = info.consumer.to_string();
            self.check_stream(seq).await?;
            self.consumer = consumer;
        }

        let envelope = Envelope::decode(message.payload.clone())?;
        self.last = seq;
        Ok(Delivered {
            cursor: Cursor {
                stream_created: self.created,
                seq,
            },
            envelope,
            subject: message.subject.to_string(),
        })
    }

    /// `FailedPrecondition` when the stream is not the one the cursor is
    /// on, or lost events between the last one delivered and `seq`.
    async fn check_stream(&mut self, seq: u64) -> Result<()> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|err| Error::unavailable(format!("stream info: {err}")))?;
        if identity(&info) != self.created {
            return Err(Error::precondition(format!(
                "event stream {STREAM} was recreated under the consumer"
            )));
        }
        let first = info.state.first_sequence;
        if seq > self.last + 1 && first > self.last + 1 {
            return Err(Error::precondition(format!(
                "event stream {STREAM} dropped events after sequence {}",
                self.last
            )));
        }
        Ok(())
    }
}

/// A stream's identity: its creation time in nanoseconds.
fn identity(info: &stream::Info) -> i64 {
    info.created.unix_timestamp_nanos() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_their_stored_form() {
        let cursor = Cursor {
            stream_created: 1_700_000_000_123_456_789,
            seq: 42,
        };
        assert_eq!(Cursor::from_bytes(&cursor.to_bytes()), cursor);
        assert_eq!(Cursor::from_bytes(b"short"), Cursor::default());
    }
}
