//! A pull's progress: one status, changed by the pull as it goes, read by
//! the requests that wait for it, and published on the progress subject.
//!
//! Every message holds the whole status, so a follower that missed some
//! loses nothing, and each change bumps `sequence`, so one that arrives
//! out of order can be dropped. Messages go out at most every
//! [`INTERVAL`], with the latest status each time: a blob's byte count
//! changes with every write, and followers need no more than a few a
//! second of those.

use std::time::Duration;

use tokio::sync::watch;

use berth_proto::content as pb;
use berth_proto::Message;

use super::error::PullError;

/// The shortest time between two progress messages of one pull.
pub const INTERVAL: Duration = Duration::from_millis(50);

/// The status of one pull, shared by the pull and its followers.
pub struct Tracker {
    tx: watch::Sender<pb::PullStatus>,
}

impl Tracker {
    /// A tracker for pull `pull_id` of the image `name`, resolving.
    pub fn new(pull_id: &str, name: &str) -> Tracker {
        let status = pb::PullStatus {
            pull_id: pull_id.to_string(),
            sequence: 1,
            phase: pb::PullPhase::Resolving as i32,
            name: name.to_string(),
            ..Default::default()
        };
        Tracker {
            tx: watch::Sender::new(status),
        }
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<pb::PullStatus> {
        self.tx.subscribe()
    }

    /// The status now.
    pub fn snapshot(&self) -> pb::PullStatus {
        self.tx.borrow().clone()
    }

    /// True once the pull ended, well or not.
    pub fn ended(status: &pb::PullStatus) -> bool {
        status.phase == pb::PullPhase::Done as i32 || status.phase == pb::PullPhase::Failed as i32
    }

    fn change(&self, change: impl FnOnce(&mut pb::PullStatus)) {
        self.tx.send_modify(|status| {
            change(status);
            status.sequence += 1;
        });
    }

    /// The image is resolved: its blobs are known and the layers are next.
    pub fn resolved(&self, image: pb::PulledImage, blobs: Vec<pb::BlobProgress>) {
        self.change(|status| {
            status.phase = pb::PullPhase::Fetching as i32;
            status.image = Some(image);
            status.blobs = blobs;
        });
    }

    /// Changes every entry of the blob `digest` (a layer may be listed
    /// twice).
    pub fn blob(&self, digest: &str, mut change: impl FnMut(&mut pb::BlobProgress)) {
        self.change(|status| {
            for blob in status.blobs.iter_mut().filter(|b| b.digest == digest) {
                change(blob);
            }
        });
    }

    /// The pull ended: DONE, or FAILED with the error as the requests
    /// answer it.
    pub fn finish(&self, outcome: &Result<(), PullError>) {
        self.change(|status| match outcome {
            Ok(()) => status.phase = pb::PullPhase::Done as i32,
            Err(err) => {
                let wire = berth_bus::Error::with_causes(err.code(), err);
                status.phase = pb::PullPhase::Failed as i32;
                status.error_code = i32::from(wire.code.as_u16());
                status.error = wire.message;
            }
        });
    }
}

/// Publishes the statuses `changes` sees on `subject`, at most one per
/// [`INTERVAL`], until the pull ends (its last status is published too).
/// A publish that fails is skipped: the next carries the whole status.
pub async fn publish(
    nats: async_nats::Client,
    subject: String,
    mut changes: watch::Receiver<pb::PullStatus>,
) {
    loop {
        let status = changes.borrow_and_update().clone();
        let body = status.encode_to_vec();
        if let Err(err) = nats.publish(subject.clone(), body.into()).await {
            tracing::debug!(subject = %subject, error = %err, "progress not published");
        }
        if Tracker::ended(&status) {
            let _ = nats.flush().await;
            return;
        }
        tokio::time::sleep(INTERVAL).await;
        if changes.changed().await.is_err() {
            return;
        }
    }
}
