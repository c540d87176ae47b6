//! berth's gc service: mark and sweep over the reference graph.
//!
//! A run takes an epoch and the roots of every namespace from metadata
//! (`gc.mark`), derives each namespace's live set by reading manifests,
//! indexes and configs from content ([`mark`]), then asks the owners of the
//! bytes to drop the rest unless touched since the epoch: content per blob,
//! and every known node's snapshot service in one prune per namespace,
//! which keeps the parents of what it is told is live. Content and
//! snapshot holds are per namespace, so each namespace is marked and swept
//! on its own; bytes leave the disk when no namespace holds them.
//!
//! Subjects: `berth.v1.<namespace>.gc.run` and `gc.explain`
//! (`proto/berth/v1/gc.proto`). A run publishes `gc.done`. Runs start on
//! request, after a root is deleted or a lease expires (debounced, see
//! `schedule`), when a snapshot node joins, and on a timer
//! ([`Config::interval`]). [`explain`] answers why one blob or snapshot
//! stays, walking the same edges.
//!
//! # Limitations
//!
//! The protocol keeps what is created or reused while a run marks: the
//! owners stamp those objects, and imports hold leases. A root made later
//! that refers to objects already stored without touching them or holding
//! them in a lease (a second image record for a target, a container record
//! for an image removed meanwhile) is not covered: the run that marked just
//! before it may take those objects.

pub mod chain;
pub mod error;
pub mod events;
pub mod explain;
pub mod mark;

mod convert;
mod handlers;
mod nodes;
mod remote;
mod schedule;
mod sweep;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use berth_bus::{Client, Error, Result, Service};
use berth_proto::gc::GcDone;

use error::GcError;
use mark::Graph;
use nodes::Nodes;
use remote::Remote;
use sweep::Sweep;

/// What the gc service needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often gc runs without a trigger; default 60 s, at least 100 ms.
    pub interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval: Duration::from_secs(60),
        }
    }
}

/// How long one `gc.run` request may take, waiting for a run in progress
/// included.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// The running service's state.
pub struct GcService {
    remote: Remote,
    js: jetstream::Context,
    /// Held for the whole of a run, so runs never overlap.
    runs: Mutex<Runs>,
    /// How many runs have started; read without the lock to tell whether a
    /// later run started after a caller arrived.
    started: AtomicU64,
    /// The snapshot nodes to prune.
    nodes: Arc<Nodes>,
}

/// What lives across runs.
#[derive(Default)]
struct Runs {
    graph: Graph,
    /// The number and outcome of the last run that was not a dry run.
    last: Option<(u64, Result<GcDone>)>,
}

impl GcService {
    /// The service; nodes found new send on `trigger`.
    fn new(client: Client, js: jetstream::Context, trigger: mpsc::Sender<()>) -> Self {
        GcService {
            remote: Remote::new(client),
            js,
            runs: Mutex::new(Runs::default()),
            started: AtomicU64::new(0),
            nodes: Arc::new(Nodes::new(trigger)),
        }
    }

    /// Runs gc once, marking from a point after this call, and returns what
    /// went. A run in progress is waited for first, and callers that waited
    /// for the same one share the one run that follows it.
    ///
    /// The run goes on even if the caller stops waiting.
    pub async fn collect_now(self: &Arc<Self>, namespace: &str, dry_run: bool) -> Result<GcDone> {
        let svc = self.clone();
        let namespace = namespace.to_string();
        tokio::spawn(async move { svc.collect_after_arrival(&namespace, dry_run).await })
            .await
            .map_err(|err| Error::internal(format!("gc run stopped: {err}")))?
    }

    async fn collect_after_arrival(&self, namespace: &str, dry_run: bool) -> Result<GcDone> {
        let arrived_after = self.started.load(Ordering::SeqCst);
        let mut runs = self.runs.lock().await;
        // A run numbered past what had started when this caller arrived
        // marked after it arrived, so its outcome answers this call too.
        if let (false, Some((run, outcome))) = (dry_run, &runs.last) {
            if *run > arrived_after {
                return outcome.clone();
            }
        }

        let run = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let outcome = self
            .collect(&mut runs, namespace, dry_run)
            .await
            .map_err(Error::from);
        if !dry_run {
            runs.last = Some((run, outcome.clone()));
        }
        outcome
    }

    /// One run: mark, derive every live set, sweep, publish `gc.done`.
    ///
    /// The snapshot nodes pruned are those known when the run starts (see
    /// [`nodes`]); only a run that knows none waits for discovery.
    async fn collect(
        &self,
        runs: &mut Runs,
        namespace: &str,
        dry_run: bool,
    ) -> Result<GcDone, GcError> {
        let started = Instant::now();
        let known = self.nodes.known();
        let (mark, nodes) = if known.is_empty() {
            tokio::join!(
                self.remote.mark(namespace),
                self.nodes.discover(&self.remote)
            )
        } else {
            self.nodes.refresh(&self.remote);
            (self.remote.mark(namespace).await, known)
        };
        let mark = mark.map_err(GcError::Mark)?;

        // Every live set is known before anything is deleted: a namespace
        // whose manifests cannot be read fails the run, not its sweep.
        let mut live_sets = Vec::with_capacity(mark.namespaces.len());
        for roots in &mark.namespaces {
            let roots = convert::roots(roots);
            let live = runs.graph.live_set(&self.remote, &roots).await?;
            live_sets.push((roots.namespace.clone(), live));
        }
        runs.graph.forget_unreached();

        let sweep = Sweep {
            remote: &self.remote,
            epoch: mark.epoch,
            dry_run,
        };
        let (results, gone) = sweep.namespaces(&live_sets, &nodes).await;
        self.nodes.forget(&gone);

        let done = GcDone {
            epoch: mark.epoch,
            namespaces: results.into_iter().filter(sweep::removed_any).collect(),
            duration_micros: started.elapsed().as_micros() as u64,
            dry_run,
        };
        log_done(&done, nodes.len().saturating_sub(gone.len()));
        // A dry run changes nothing, so it is no event.
        if !dry_run {
            if let Err(err) = events::publish_done(&self.js, &done).await {
                tracing::warn!(error = %err, "event gc.done not published");
            }
        }
        Ok(done)
    }
}

fn log_done(done: &GcDone, nodes: usize) {
    let blobs: usize = done.namespaces.iter().map(|ns| ns.blobs.len()).sum();
    let snapshots: usize = done.namespaces.iter().map(|ns| ns.snapshots.len()).sum();
    let freed_bytes: i64 = done.namespaces.iter().map(|ns| ns.freed_bytes).sum();
    tracing::info!(
        epoch = done.epoch,
        blobs,
        snapshots,
        freed_bytes,
        nodes,
        dry_run = done.dry_run,
        duration_micros = done.duration_micros,
        "gc sweep done"
    );
}

/// Serves the gc service on `nats` until `shutdown` is cancelled: the `run`
/// and `explain` ops, the deletion-event trigger, node discovery and the
/// timer.
pub async fn run(
    nats: async_nats::Client,
    config: Config,
    shutdown: CancellationToken,
) -> Result<()> {
    let js = jetstream::new(nats.clone());
    berth_bus::events::ensure_stream(&js).await?;
    let client = Client::new(nats.clone(), berth_bus::client::DEFAULT_TIMEOUT);

    let (trigger, triggers) = mpsc::channel(1);
    let svc = Arc::new(GcService::new(client, js.clone(), trigger.clone()));
    svc.nodes.refresh(&svc.remote);
    let watcher = tokio::spawn(schedule::watch_deletions(js, trigger, shutdown.clone()));
    let interval = config.interval.max(Duration::from_millis(100));
    let scheduler = tokio::spawn(schedule::schedule(
        svc.clone(),
        interval,
        triggers,
        shutdown.clone(),
    ));

    let serving = Service::new("gc", env!("CARGO_PKG_VERSION"), svc)
        .deadline(RUN_DEADLINE)
        .op("run", handlers::run)
        .op("explain", handlers::explain)
        .serve(nats)
        .await?;
    shutdown.cancelled().await;
    serving.stop().await;
    let _ = tokio::join!(watcher, scheduler);
    Ok(())
}
