//! Tombstones: tasks that were removed while this node was lost.
//!
//! `berth rm -f` of a container whose node is lost removes the container
//! and its task reservation in metadata and leaves a tombstone for the node
//! (`tombstones.*`): container, generation and the boot id of the
//! reservation. When the node's task service runs again it lists its
//! tombstones in every namespace it has tasks in, once re-adoption is done
//! and then every [`EVERY`] (a node cut off from NATS without restarting
//! finds them too), and applies each one:
//!
//! - a task of the tombstone's generation is deleted: killed first when it
//!   still runs under the boot it was reserved in (under another boot its
//!   process died with that boot, and re-adoption recorded its exit), then
//!   its runc state, rootfs mount, bundle and shim files go as with
//!   `delete`;
//! - a task of another generation, or none, is left alone;
//!
//! and the tombstone is deleted. The container's rootfs snapshot goes with
//! the next gc, which no longer finds a container holding it.
//!
//! # Limitations
//! Tombstones are looked for only in the namespaces this node holds task
//! records in: a tombstone of a reservation whose task never reached this
//! node's records (the node went away between `tasks.reserve` and writing
//! its record) names nothing here and stays in metadata, where it does no
//! harm but is never deleted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use berth_bus::{Call, Code};
use berth_proto::metadata as mpb;
use berth_proto::task as pb;

use crate::store::Status;
use crate::TaskService;

/// How often tombstones are looked for after the first time: the bound on
/// how long a task removed while its node was (or looked) lost runs on
/// after the node is back. A round is one `tombstones.list` a namespace.
pub const EVERY: Duration = Duration::from_secs(5);

/// How long a killed task has to exit before its tombstone waits for the
/// next round.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Applies this node's tombstones now and every [`EVERY`] until `shutdown`;
/// a round that fails is tried again a few seconds later.
pub async fn run(svc: Arc<TaskService>, shutdown: CancellationToken) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = match reconcile(&svc).await {
            Ok(0) => EVERY,
            Ok(applied) => {
                tracing::info!(applied, "tombstones applied");
                EVERY
            }
            Err(err) => {
                tracing::warn!(error = %err, "tombstones not applied; retrying");
                Duration::from_secs(2)
            }
        };
    }
}

/// Applies every tombstone of this node in the namespaces it has tasks
/// in; returns how many were applied.
pub async fn reconcile(svc: &Arc<TaskService>) -> berth_bus::Result<usize> {
    let mut namespaces: Vec<String> = {
        let txn = svc.store.env.read_txn()?;
        svc.store
            .all(&txn)?
            .into_iter()
            .map(|(namespace, _, _)| namespace)
            .collect()
    };
    namespaces.dedup();
    let mut applied = 0;
    for namespace in namespaces {
        let metadata = svc.metadata(&namespace);
        let tombstones = metadata
            .list_tombstones(&mpb::ListTombstonesRequest {
                node: svc.node.clone(),
            })
            .await?
            .tombstones;
        for tombstone in tombstones {
            apply(svc, &namespace, &tombstone).await?;
            metadata
                .delete_tombstone(&mpb::DeleteTombstoneRequest {
                    node: svc.node.clone(),
                    container_id: tombstone.container_id.clone(),
                })
                .await?;
            applied += 1;
        }
    }
    Ok(applied)
}

/// Deletes the task a tombstone names, if this node has it at that
/// generation: killed first when its process may still run.
async fn apply(
    svc: &Arc<TaskService>,
    namespace: &str,
    tombstone: &mpb::Tombstone,
) -> berth_bus::Result<()> {
    let container_id = tombstone.container_id.as_str();
    let record = match svc.record(namespace, container_id) {
        Ok(record) if record.generation == tombstone.generation => record,
        // Another task of the same container, or none: nothing to undo.
        Ok(_) => return Ok(()),
        Err(crate::error::TaskError::NoTask { .. }) => return Ok(()),
        Err(err) => return Err(err.into()),
    };

    // Under the boot of the reservation the process may still run; under
    // another it died with that boot.
    let live = matches!(record.status, Status::Running | Status::Paused);
    if live && record.boot_id == svc.boot_id {
        kill(svc, namespace, container_id, record.status).await?;
    }
    crate::handlers::delete(
        svc.clone(),
        Call::internal(namespace),
        pb::DeleteRequest {
            container_id: container_id.to_string(),
            exec_id: String::new(),
            keep_output: false,
        },
    )
    .await?;
    tracing::info!(
        namespace,
        container_id,
        generation = tombstone.generation,
        "task of a tombstone deleted"
    );
    Ok(())
}

/// SIGKILL to every process of the task (thawed first when paused), and
/// its exit awaited.
async fn kill(
    svc: &Arc<TaskService>,
    namespace: &str,
    container_id: &str,
    status: Status,
) -> berth_bus::Result<()> {
    let call = || Call::internal(namespace);
    let request = pb::KillRequest {
        container_id: container_id.to_string(),
        signal: libc::SIGKILL as u32,
        all: true,
        exec_id: String::new(),
    };
    let killed = crate::handlers::kill(svc.clone(), call(), request).await;
    if status == Status::Paused {
        let resume = pb::ResumeRequest {
            container_id: container_id.to_string(),
        };
        let _ = crate::handlers::resume(svc.clone(), call(), resume).await;
    }
    if let Err(err) = killed {
        // A task that exited meanwhile has nothing left to signal.
        if err.code != Code::FailedPrecondition {
            return Err(err);
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let record = svc.record(namespace, container_id)?;
        if record.exit.is_some() || record.status == Status::Unknown {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(berth_bus::Error::unavailable(format!(
                "container {container_id} did not exit within {KILL_WAIT:?} of SIGKILL"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
