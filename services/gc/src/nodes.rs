//! The snapshot nodes a run prunes.
//!
//! Nodes are found through the NATS micro-service protocol, whose replies
//! have no end marker: discovery listens for a window. A run never waits
//! for that window once any node is known. It prunes the nodes known when
//! it starts and asks for a discovery in the background (at most one
//! starts per [`REFRESH_EVERY`]). A node that discovery finds beside known
//! ones triggers one more run, and a node whose prunes answer `Unavailable`
//! (nothing serves its subjects) is forgotten until discovery finds it
//! again. Only a run that knows no node at all waits for discovery, beside
//! its mark.
//!
//! # Limitations
//!
//! A node that joins is pruned only after the discovery that finds it, up
//! to [`REFRESH_EVERY`] and a window after the run that asked for it; one
//! whose discovery replies come after the window is found by a later one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::remote::{Remote, DISCOVERY_WINDOW};

/// The least time between two background discoveries.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The nodes known, and how to find more.
pub(crate) struct Nodes {
    state: Mutex<State>,
    /// Where a node found new asks for a run.
    trigger: mpsc::Sender<()>,
}

#[derive(Default)]
struct State {
    known: BTreeSet<String>,
    /// When the last background discovery started.
    refreshed: Option<Instant>,
    /// True while a background discovery waits for its time.
    waiting: bool,
}

impl Nodes {
    /// No node known yet; found nodes send on `trigger`.
    pub(crate) fn new(trigger: mpsc::Sender<()>) -> Self {
        Nodes {
            state: Mutex::new(State::default()),
            trigger,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The nodes known now.
    pub(crate) fn known(&self) -> BTreeSet<String> {
        self.state().known.clone()
    }

    /// Discovers now and waits the whole window; returns every node known
    /// after it. A failed discovery is logged and adds nothing.
    pub(crate) async fn discover(&self, remote: &Remote) -> BTreeSet<String> {
        let found = self.found(remote).await;
        let mut state = self.state();
        state.known.extend(found);
        state.known.clone()
    }

    /// Asks for a discovery in the background: at once, or when
    /// [`REFRESH_EVERY`] has passed since the last one started; a call while
    /// one waits to start adds nothing. If it finds a node beside known
    /// ones, a run follows.
    pub(crate) fn refresh(self: &Arc<Self>, remote: &Remote) {
        let delay = {
            let mut state = self.state();
            if state.waiting {
                return;
            }
            state.waiting = true;
            let since = state.refreshed.map(|at| at.elapsed());
            since.map_or(Duration::ZERO, |since| REFRESH_EVERY.saturating_sub(since))
        };
        let (nodes, remote) = (self.clone(), remote.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            {
                let mut state = nodes.state();
                state.waiting = false;
                state.refreshed = Some(Instant::now());
            }
            let found = nodes.found(&remote).await;

            // A run that knew no node discovered them itself, so only a
            // node joining known ones calls for another run.
            let added = {
                let mut state = nodes.state();
                let before = state.known.len();
                state.known.extend(found);
                before > 0 && state.known.len() > before
            };
            if added {
                tracing::debug!("snapshot node found; gc runs again");
                // A full channel holds a trigger already, which is enough.
                let _ = nodes.trigger.try_send(());
            }
        });
    }

    /// Forgets the nodes nothing serves any more.
    pub(crate) fn forget(&self, gone: &BTreeSet<String>) {
        if gone.is_empty() {
            return;
        }
        tracing::info!(nodes = ?gone, "snapshot nodes gone; no longer pruned");
        self.state().known.retain(|node| !gone.contains(node));
    }

    async fn found(&self, remote: &Remote) -> BTreeSet<String> {
        match remote.snapshot_nodes(DISCOVERY_WINDOW).await {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(error = %err, "snapshot nodes not discovered");
                BTreeSet::new()
            }
        }
    }
}
