//! Pulls: images fetched from OCI registries into the store by the content
//! service itself, so the bytes never pass through the client that asked.
//!
//! ```text
//! pull request ──> job (namespace, pull id) ──> registry: manifest or index,
//!      ^  │              │                       manifest for the platform,
//!      │  └ waits ≤ 20 s │                       config, layers (4 at once)
//!      └── asked again   ├─> ingests pull-<hex> ─> commit (verified) ─> lease
//!          until DONE    └─> progress: berth.v1.<ns>.content.pull.progress.<pull id>
//! ```
//!
//! A request starts a job, or joins the one its pull id names, and answers
//! when the job ends or after its wait, whichever comes first; the job
//! runs on without it. So no request outlasts its deadline however long
//! the pull takes, and a caller that lost a reply asks again. The outcome
//! stays in memory for [`KEEP_ENDED`] after the end.
//!
//! The job fetches every blob through an ingest named for its digest
//! (`pull-<hex>`), written in this process, not over NATS: a blob the
//! namespace holds is not fetched at all (its commit only attaches it to
//! the lease), one partly written by an earlier pull goes on from its end
//! with a range request, and the commit verifies digest and size before
//! anything becomes visible. Indexes, manifests and configs are checked
//! by [`berth_oci::resolve_with`] (size caps, digests, media types, one
//! diff ID per layer) before they are stored or a layer is fetched. A pull
//! that fails on bad input discards the ingests it left; one that fails
//! because the registry went away keeps them, for the next pull to resume.
//!
//! One fetch of a digest in a namespace runs at a time, so two pulls of
//! one image share the work, and at most [`DOWNLOADS`] blobs are fetched at
//! once across all pulls.
//!
//! # Limitations
//!
//! Jobs live in memory: after a restart of the service a pull's id is
//! unknown, and asking again starts the pull afresh (resuming its ingests).
//! Any namespace that may call `pull` can make the content service connect
//! to any host and port it can reach (over HTTPS unless the host is a
//! loopback address or the request says `insecure`); what comes back is
//! stored only when it verifies as an image.

mod error;
mod fetch;
mod progress;
mod registry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use berth_bus::locks::KeyLocks;
use berth_bus::Call;
use berth_oci::{Platform, Reference};
use berth_proto::content as pb;

pub use error::PullError;
pub use registry::{is_loopback, Credentials};

use crate::ContentService;
use progress::Tracker;

/// How long an ended pull's outcome is kept for requests that ask again.
pub const KEEP_ENDED: Duration = Duration::from_secs(600);

/// The longest a request waits for its pull (and its default wait).
pub const MAX_WAIT: Duration = berth_bus::api::PULL_WAIT;

/// How many blobs are fetched at once, across every pull.
pub const DOWNLOADS: usize = 8;

/// What a pull request asks for, checked.
#[derive(Debug, Clone)]
pub struct PullSpec {
    /// The caller's name for the pull.
    pub pull_id: String,
    /// The image, normalized.
    pub reference: Reference,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// The lease committed blobs are attached to (empty: none).
    pub lease_id: String,
    /// Plain HTTP even off loopback.
    pub insecure: bool,
    /// How to authenticate.
    pub credentials: Credentials,
    /// How long the request waits for the pull.
    pub wait: Duration,
}

impl PullSpec {
    /// Checks a request: `InvalidArgument` for a malformed pull id, lease
    /// id, reference or platform.
    pub fn parse(req: pb::PullRequest) -> Result<PullSpec, PullError> {
        let invalid = |field: &'static str| {
            move |err: berth_bus::Error| {
                PullError::Store(Box::new(crate::ContentError::InvalidRequest {
                    field,
                    reason: err.message,
                }))
            }
        };
        berth_bus::subject::check_token("pull id", &req.pull_id).map_err(invalid("pull_id"))?;
        if !req.lease_id.is_empty() {
            berth_bus::subject::check_token("lease id", &req.lease_id)
                .map_err(invalid("lease_id"))?;
        }
        let reference =
            Reference::parse(&req.reference).map_err(|source| PullError::InvalidReference {
                reference: req.reference.clone(),
                source,
            })?;
        let credentials = req.credentials.unwrap_or_default();
        let wait = match req.wait_ms {
            0 => MAX_WAIT,
            ms => Duration::from_millis(ms.into()).min(MAX_WAIT),
        };
        Ok(PullSpec {
            pull_id: req.pull_id,
            reference,
            platform: parse_platform(&req.platform)?,
            lease_id: req.lease_id,
            insecure: req.insecure,
            credentials: Credentials {
                username: credentials.username,
                password: credentials.password,
                registry_token: credentials.registry_token,
            },
            wait,
        })
    }
}

/// `os/architecture[/variant]`, or this host's platform for an empty text.
pub fn parse_platform(text: &str) -> Result<Platform, PullError> {
    if text.is_empty() {
        return Ok(Platform::host());
    }
    let parts: Vec<&str> = text.split('/').collect();
    let valid = |part: &&str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if !(2..=3).contains(&parts.len()) || !parts.iter().all(valid) {
        return Err(PullError::InvalidPlatform {
            platform: text.to_string(),
        });
    }
    Ok(Platform::new(parts[0], parts[1], parts.get(2).copied()))
}

/// The pulls of one service: running and recently ended, by namespace and
/// pull id.
#[derive(Default)]
pub struct Pulls {
    jobs: Mutex<HashMap<(String, String), Arc<Job>>>,
    /// One fetch of a digest in a namespace at a time.
    fetch_locks: KeyLocks,
    /// At most [`DOWNLOADS`] blobs at once.
    downloads: Downloads,
}

/// The bound on blobs fetched at once.
struct Downloads(Arc<Semaphore>);

impl Default for Downloads {
    fn default() -> Self {
        Downloads(Arc::new(Semaphore::new(DOWNLOADS)))
    }
}

/// One pull: the request that started it and its status.
pub struct Job {
    /// The sha256 of the request that started it.
    body: [u8; 32],
    tracker: Tracker,
    ended: Mutex<Option<Instant>>,
}

impl Job {
    /// Waits until the pull ends or `limit` passes, and returns its status.
    pub async fn wait(&self, limit: Duration) -> pb::PullStatus {
        let mut changes = self.tracker.subscribe();
        let _ = tokio::time::timeout(limit, changes.wait_for(Tracker::ended)).await;
        self.tracker.snapshot()
    }
}

impl Pulls {
    /// The job of `spec.pull_id` in the call's namespace: the running or
    /// ended one (`PullIdReused` when another request started it), or a
    /// new one, started here.
    pub fn start_or_join(
        &self,
        svc: &Arc<ContentService>,
        call: &Call,
        spec: PullSpec,
    ) -> Result<Arc<Job>, PullError> {
        let namespace = call.namespace().to_string();
        let key = (namespace.clone(), spec.pull_id.clone());
        let mut jobs = lock(&self.jobs);
        jobs.retain(|_, job| lock(&job.ended).is_none_or(|at| at.elapsed() < KEEP_ENDED));
        if let Some(job) = jobs.get(&key) {
            if job.body != *call.body_digest() {
                return Err(PullError::PullIdReused {
                    pull_id: spec.pull_id,
                });
            }
            return Ok(job.clone());
        }

        let job = Arc::new(Job {
            body: *call.body_digest(),
            tracker: Tracker::new(&spec.pull_id, &spec.reference.to_string()),
            ended: Mutex::new(None),
        });
        jobs.insert(key, job.clone());
        tokio::spawn(run(svc.clone(), namespace, spec, job.clone()));
        Ok(job)
    }
}

/// Runs one pull to its end, publishing its progress, and records the end.
async fn run(svc: Arc<ContentService>, namespace: String, spec: PullSpec, job: Arc<Job>) {
    let started = Instant::now();
    let nats = svc.client.nats().clone();
    let subject = berth_bus::subject::op(
        &namespace,
        "content",
        &format!("pull.progress.{}", spec.pull_id),
    );
    let publisher = subject
        .ok()
        .map(|subject| tokio::spawn(progress::publish(nats, subject, job.tracker.subscribe())));
    tracing::info!(namespace = %namespace, image = %spec.reference, "pull started");

    let outcome = tokio::select! {
        outcome = fetch::pull(&svc, &namespace, &spec, &job.tracker) => outcome,
        () = svc.shutdown.cancelled() => Err(PullError::Stopped),
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match &outcome {
        Ok(()) => tracing::info!(namespace = %namespace, image = %spec.reference, elapsed_ms,
            "image pulled"),
        Err(err) => tracing::info!(namespace = %namespace, image = %spec.reference,
            error.code = err.code().as_str(), error = %err, elapsed_ms, "pull failed"),
    }
    job.tracker.finish(&outcome);
    *lock(&job.ended) = Some(Instant::now());
    if let Some(publisher) = publisher {
        let _ = publisher.await;
    }
}

/// A std mutex's guard; the maps stay usable after a panic elsewhere.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Platforms are `os/arch[/variant]`; empty is this host's.
    #[test]
    fn platforms_parse() {
        assert_eq!(parse_platform("").unwrap(), Platform::host());
        assert_eq!(
            parse_platform("linux/arm64/v8").unwrap(),
            Platform::new("linux", "arm64", Some("v8"))
        );
        assert_eq!(
            parse_platform("linux/amd64").unwrap(),
            Platform::new("linux", "amd64", None)
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(parse_platform(bad).is_err(), "{bad}");
        }
    }
}
