//! Exits: one watcher per task waits on its shim, records the exit with its
//! `tasks.exit` event in one transaction, and tells the shim once metadata
//! has applied it, so the shim keeps the exit on disk until nothing can lose
//! it.
//!
//! A shim that dies leaves its `exit.json` if the init exited first; without
//! one, `runc state` says whether the process still runs (the task is then
//! `unknown`) or is gone (an exit of unknown status, 255).

use std::sync::Arc;
use std::time::Duration;

use berth_bus::Code;
use berth_proto::metadata::{self as mpb, TaskStatus};
use berth_proto::task::TaskEvent;
use berth_proto::Timestamp;

use crate::shim::protocol::{read_exit_file, ShimPid, RUNC_ROOT_DIR};
use crate::shim_client::ShimClient;
use crate::store::{Exit, Status, TaskRecord};
use crate::TaskService;

/// The exit status of a process whose end nobody saw.
pub const UNKNOWN_EXIT: u32 = 255;

/// Watches one task until its exit is recorded and applied, in the
/// background; stops early when the service shuts down (the shim keeps the
/// exit for the next start).
pub fn watch(svc: Arc<TaskService>, namespace: String, container_id: String, record: TaskRecord) {
    tokio::spawn(async move {
        let shutdown = svc.shutdown.clone();
        tokio::select! {
            _ = follow(&svc, &namespace, &container_id, record) => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

async fn follow(svc: &Arc<TaskService>, namespace: &str, container_id: &str, record: TaskRecord) {
    let generation = record.generation;
    if record.exit.is_none() {
        match wait_exit(svc, namespace, container_id, &record).await {
            Ended::Exited(exit) => {
                record_exit(svc, namespace, container_id, generation, exit).await
            }
            Ended::Unknown => {
                mark_unknown(svc, namespace, container_id, generation).await;
                return;
            }
        }
    }
    if !record.exit_acked {
        acknowledge(svc, namespace, container_id, &record).await;
    }
}

/// How a watch ended.
enum Ended {
    /// The init exited, as recorded by the shim (or of unknown status).
    Exited(Exit),
    /// The shim is gone and the process still runs.
    Unknown,
}

/// Waits for the init's exit through the shim, and without it when it dies.
async fn wait_exit(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    record: &TaskRecord,
) -> Ended {
    let shim = ShimClient::at_socket(record.socket.clone());
    let state_dir = svc.paths.shim_state(namespace, container_id);
    loop {
        match shim.wait().await {
            Ok(exit) => {
                return Ended::Exited(Exit {
                    status: exit.status.max(0) as u32,
                    exited_at: exit.exited_at as i64,
                })
            }
            Err(err) => {
                // A shim that still runs dropped one connection: wait again.
                let alive = ShimPid::read(&state_dir)
                    .ok()
                    .flatten()
                    .is_some_and(|pid| pid.is_alive());
                if alive {
                    tracing::warn!(namespace, container_id, error = %err, "waiting on shim failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }

        // The shim is gone: its exit record, if it wrote one, is the truth.
        if let Ok(Some(exit)) = read_exit_file(&state_dir) {
            return Ended::Exited(Exit {
                status: exit.status.max(0) as u32,
                exited_at: exit.exited_at as i64,
            });
        }
        if runc_says_running(svc, namespace, container_id).await {
            return Ended::Unknown;
        }
        return Ended::Exited(Exit {
            status: UNKNOWN_EXIT,
            exited_at: Timestamp::now().unix_nanos,
        });
    }
}

/// Whether `runc state` reports the container's process as alive.
async fn runc_says_running(svc: &TaskService, namespace: &str, container_id: &str) -> bool {
    let root = svc
        .paths
        .shim_state(namespace, container_id)
        .join(RUNC_ROOT_DIR);
    let runc = svc.runc.clone().unwrap_or_else(|| "runc".into());
    let Ok(output) = tokio::process::Command::new(runc)
        .arg("--root")
        .arg(&root)
        .args(["state", container_id])
        .output()
        .await
    else {
        return false;
    };
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    matches!(
        state["status"].as_str(),
        Some("running" | "paused" | "created")
    )
}

/// Records the exit and queues `tasks.exit`, unless the task was deleted or
/// replaced meanwhile or its exit is recorded already.
///
/// The transaction runs on a blocking thread: its commit syncs, and on a
/// runtime worker it would hold back the send of the event ahead of it,
/// which was spawned on that worker.
pub(crate) async fn record_exit(
    svc: &Arc<TaskService>,
    namespace: &str,
    container_id: &str,
    generation: u64,
    exit: Exit,
) {
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    let outcome = {
        let (svc, namespace, container_id) =
            (svc.clone(), namespace.to_string(), container_id.to_string());
        crate::on_blocking_thread(move || {
            commit_exit(&svc, &namespace, &container_id, generation, exit)
        })
        .await
        .and_then(|outcome| outcome)
    };
    match outcome {
        Ok(true) => {
            svc.store.outbox.wake().notify_one();
            tracing::info!(
                namespace,
                container_id,
                exit_code = exit.status,
                "task exited"
            );
        }
        Ok(false) => {}
        Err(err) => {
            tracing::error!(namespace, container_id, error = %err, "task exit not recorded")
        }
    }
}

/// The transaction of [`record_exit`]: whether it recorded the exit.
fn commit_exit(
    svc: &TaskService,
    namespace: &str,
    container_id: &str,
    generation: u64,
    exit: Exit,
) -> berth_bus::Result<bool> {
    let mut txn = svc.store.env.write_txn()?;
    let Some(mut record) = svc.store.get(&txn, namespace, container_id)? else {
        return Ok(false);
    };
    if record.generation != generation || record.exit.is_some() {
        return Ok(false);
    }
    // The cgroup outlives the process until runc deletes it, so its
    // OOM count still tells whether the kernel killed the task.
    let suffix = crate::spec::cgroups_path(namespace, container_id);
    let oom_killed =
        !record.cgroups.is_empty() && crate::cgroup::oom_kills(&record.cgroups, &suffix) > 0;
    record.status = Status::Stopped;
    record.exit = Some(exit);
    record.oom_killed = oom_killed;
    svc.store.put(&mut txn, namespace, container_id, &record)?;
    let event = TaskEvent {
        container_id: container_id.to_string(),
        pid: record.pid,
        exit_status: exit.status,
        exited_at: Some(Timestamp {
            unix_nanos: exit.exited_at,
        }),
        oom_killed,
        boot_id: record.boot_id.clone(),
        pid_start_time: record.pid_start_time,
        exec_id: String::new(),
    };
    // The exit goes out ahead of this commit, whose sync is most of
    // the time from the reap to the event: a crash before the commit
    // leaves the exit with the shim, and recording it again on restart
    // makes the same message ids, which the stream stores once.
    let outbox = &svc.store.outbox;
    let mut keyed = Vec::with_capacity(2);
    for topic in ["tasks.oom", "tasks.exit"] {
        if topic == "tasks.oom" && !oom_killed {
            continue;
        }
        let key = format!("{topic}-{namespace}-{container_id}-{generation}");
        keyed.push(outbox.push_keyed(&mut txn, namespace, topic, generation, &event, &key)?);
    }
    outbox.send_ahead(&txn, keyed)?;
    txn.commit()?;
    Ok(true)
}

/// Records that nothing is known of a task whose shim died while its
/// process runs on.
async fn mark_unknown(svc: &TaskService, namespace: &str, container_id: &str, generation: u64) {
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    let outcome = (|| -> berth_bus::Result<()> {
        let mut txn = svc.store.env.write_txn()?;
        if let Some(mut record) = svc.store.get(&txn, namespace, container_id)? {
            if record.generation == generation && record.exit.is_none() {
                record.status = Status::Unknown;
                svc.store.put(&mut txn, namespace, container_id, &record)?;
                txn.commit()?;
            }
        }
        Ok(())
    })();
    match outcome {
        Ok(()) => tracing::warn!(namespace, container_id, "shim is gone; task state unknown"),
        Err(err) => {
            tracing::error!(namespace, container_id, error = %err, "task state not recorded")
        }
    }
}

/// Waits until metadata has applied the exit (its record of this
/// reservation is stopped, or gone), then tells the shim, which may then
/// forget the exit.
async fn acknowledge(svc: &TaskService, namespace: &str, container_id: &str, record: &TaskRecord) {
    let metadata = svc.metadata(namespace);
    let request = mpb::GetTaskRequest {
        container_id: container_id.to_string(),
    };
    let mut pause = Duration::from_millis(5);
    loop {
        let applied = match metadata.get_task(&request).await {
            Ok(reply) => reply.task.is_none_or(|task| {
                task.generation != record.generation || task.status == TaskStatus::Stopped as i32
            }),
            Err(err) => err.code == Code::NotFound,
        };
        if applied {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    let _ = ShimClient::at_socket(record.socket.clone())
        .ack_exit()
        .await;
    let lock = svc.lock(namespace, container_id);
    let _held = lock.lock().await;
    let outcome = (|| -> berth_bus::Result<()> {
        let mut txn = svc.store.env.write_txn()?;
        if let Some(mut stored) = svc.store.get(&txn, namespace, container_id)? {
            if stored.generation == record.generation {
                stored.exit_acked = true;
                svc.store.put(&mut txn, namespace, container_id, &stored)?;
                txn.commit()?;
            }
        }
        Ok(())
    })();
    if let Err(err) = outcome {
        tracing::warn!(namespace, container_id, error = %err, "exit acknowledgement not recorded");
    }
}
