//! Task events from the stream: applied exactly once across SIGKILLs of the
//! service, and reconciled with the nodes when the stream is replaced.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use prost::Message;

use berth_bus::events::STREAM;
use berth_proto::metadata::{self as mpb, TaskStatus};
use berth_proto::task::{self as tpb, TaskEvent};
use berth_proto::Timestamp;
use berth_testkit::NatsServer;

use common::{eventually, metadata, reserve, task, Process, Service, TaskEventOut};

const NAMESPACE: &str = "burst";
const CONTAINERS: usize = 200;

/// What each container's five events make of its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// create, start, oom, paused, exit: stopped by the OOM killer.
    OomExit,
    /// create, start, paused, resumed, paused: paused.
    Paused,
    /// create, start, paused, exit, delete: the record is gone.
    Deleted,
    /// Reserved again after a release: create, start of the new
    /// reservation, then start, exit, paused of the old one, late.
    Replaced,
    /// create, start, resumed (a no-op while running), oom, exit 7; its start
    /// and exit are published again later under new message ids.
    Republished,
}

fn script(n: usize) -> Script {
    match n % 5 {
        0 => Script::OomExit,
        1 => Script::Paused,
        2 => Script::Deleted,
        3 => Script::Replaced,
        _ => Script::Republished,
    }
}

fn old_generation(n: usize) -> u64 {
    1_000 + n as u64
}

fn generation(n: usize) -> u64 {
    match script(n) {
        Script::Replaced => 5_000 + n as u64,
        _ => old_generation(n),
    }
}

fn pid(n: usize) -> u32 {
    10_000 + n as u32
}

fn exited_at(n: usize) -> Timestamp {
    Timestamp {
        unix_nanos: 1_700_000_000_000_000_000 + n as i64,
    }
}

/// The payload of one event of container `n`.
fn payload(n: usize, topic: &str) -> TaskEvent {
    let mut event = TaskEvent {
        container_id: format!("t{n}"),
        pid: pid(n),
        pid_start_time: 500 + n as u64,
        boot_id: "boot-2".into(),
        ..Default::default()
    };
    if topic == "tasks.exit" {
        event.exited_at = Some(exited_at(n));
        event.exit_status = match script(n) {
            Script::OomExit => 137,
            Script::Republished => 7,
            _ => 0,
        };
        event.oom_killed = script(n) == Script::OomExit;
    }
    event
}

/// The five distinct events of container `n`, in order.
fn events_of(n: usize) -> Vec<TaskEventOut> {
    let current = generation(n);
    let steps: Vec<(&str, u64)> = match script(n) {
        Script::OomExit => vec![
            ("tasks.create", current),
            ("tasks.start", current),
            ("tasks.oom", current),
            ("tasks.paused", current),
            ("tasks.exit", current),
        ],
        Script::Paused => vec![
            ("tasks.create", current),
            ("tasks.start", current),
            ("tasks.paused", current),
            ("tasks.resumed", current),
            ("tasks.paused", current),
        ],
        Script::Deleted => vec![
            ("tasks.create", current),
            ("tasks.start", current),
            ("tasks.paused", current),
            ("tasks.exit", current),
            ("tasks.delete", current),
        ],
        Script::Replaced => vec![
            ("tasks.create", current),
            ("tasks.start", current),
            ("tasks.start", old_generation(n)),
            ("tasks.exit", old_generation(n)),
            ("tasks.paused", old_generation(n)),
        ],
        Script::Republished => vec![
            ("tasks.create", current),
            ("tasks.start", current),
            ("tasks.resumed", current),
            ("tasks.oom", current),
            ("tasks.exit", current),
        ],
    };
    steps
        .into_iter()
        .enumerate()
        .map(|(step, (topic, generation))| {
            let mut event = payload(n, topic);
            if generation != current {
                event.pid = 1;
            }
            let id = format!("t{n}-{step}");
            TaskEventOut::new(NAMESPACE, topic, generation, event, &id)
        })
        .collect()
}

/// The burst as the task services would publish it: every container's
/// events interleaved, with duplicates injected: some published twice under
/// one message id (the stream keeps one), and the republished scripts'
/// start and exit again under new ids (the stream keeps both).
fn burst() -> Vec<TaskEventOut> {
    let scripts: Vec<Vec<TaskEventOut>> = (0..CONTAINERS).map(events_of).collect();
    let mut out = Vec::new();
    for step in 0..5 {
        for (n, events) in scripts.iter().enumerate() {
            out.push(events[step].clone());
            if n % 3 == 0 {
                out.push(events[step].clone());
            }
        }
    }
    for (n, events) in scripts.iter().enumerate() {
        if script(n) == Script::Republished {
            for step in [1, 4] {
                let mut again = events[step].clone();
                again.msg_id = format!("{}-again", again.msg_id);
                out.push(again);
            }
        }
    }
    out
}

/// The record container `n` must end with (`None`: no record).
fn expected(n: usize) -> Option<mpb::Task> {
    let mut task = mpb::Task {
        container_id: format!("t{n}"),
        node: "n1".into(),
        generation: generation(n),
        pid: pid(n),
        pid_start_time: 500 + n as u64,
        boot_id: "boot-2".into(),
        ..Default::default()
    };
    match script(n) {
        Script::OomExit => {
            task.status = TaskStatus::Stopped as i32;
            task.exit_status = 137;
            task.exited_at = Some(exited_at(n));
            task.oom_killed = true;
        }
        Script::Paused => task.status = TaskStatus::Paused as i32,
        Script::Deleted => return None,
        Script::Replaced => task.status = TaskStatus::Running as i32,
        Script::Republished => {
            task.status = TaskStatus::Stopped as i32;
            task.exit_status = 7;
            task.exited_at = Some(exited_at(n));
            task.oom_killed = true;
        }
    }
    Some(task)
}

/// The fields the events decide (times of the records' own are left out).
fn decided(task: &mpb::Task) -> mpb::Task {
    mpb::Task {
        event_version: 0,
        created_at: None,
        updated_at: None,
        ..task.clone()
    }
}

/// SIGKILL of the service during a burst of 1,000 task events (and while
/// it catches up after a restart), with duplicates and redeliveries: after
/// the last restart every task record is exactly what its events make, and
/// the stored cursor is the stream's last event.
#[tokio::test]
async fn sigkill_during_a_burst_of_task_events_loses_and_repeats_nothing() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = berth_testkit::tempdir("berth-metadata-kill-")?;
    let mut process = Process::start(&nats.url(), dir.path())?;
    let conn = berth_bus::connect(&nats.url(), "test").await?;
    let md = metadata(&conn, NAMESPACE);
    common::wait_served(&md).await?;

    // Every container reserved as the task service would; the replaced ones
    // were reserved, released and reserved again.
    for n in 0..CONTAINERS {
        let container_id = format!("t{n}");
        reserve(&md, &container_id, "n1", old_generation(n)).await?;
        if script(n) == Script::Replaced {
            md.release_task(&mpb::ReleaseTaskRequest {
                container_id: container_id.clone(),
                generation: old_generation(n),
            })
            .await?;
            reserve(&md, &container_id, "n1", generation(n)).await?;
        }
    }

    // The burst goes out from its own task while the service is killed.
    let events = burst();
    assert_eq!(
        events
            .iter()
            .map(|e| &e.msg_id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        CONTAINERS * 5 + CONTAINERS / 5 * 2
    );
    let total = events.len();
    let published = Arc::new(AtomicUsize::new(0));
    let js = async_nats::jetstream::new(conn.clone());
    let publisher = {
        let published = published.clone();
        let js = js.clone();
        tokio::spawn(async move {
            for (n, event) in events.iter().enumerate() {
                event.publish(&js).await?.await?;
                published.store(n + 1, Ordering::SeqCst);
                if n % 100 == 99 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            anyhow::Ok(())
        })
    };

    // Killed while it applies the burst live; then killed and kept down for
    // the second half, so it restarts into a backlog, and is killed again
    // while it catches up.
    let at = |mark: usize| {
        let published = published.clone();
        eventually(
            Duration::from_secs(30),
            "the burst to progress",
            move || {
                let published = published.clone();
                async move { Ok(published.load(Ordering::SeqCst) >= mark) }
            },
        )
    };
    at(total / 4).await?;
    process.kill();
    process.restart()?;
    at(total / 2).await?;
    process.kill();
    publisher.await??;
    for pause in [15, 40, 80] {
        process.restart()?;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        process.kill();
    }
    process.restart()?;
    common::wait_served(&md).await?;

    // Every record ends as its events make it.
    let wanted: Vec<_> = (0..CONTAINERS).map(expected).collect();
    eventually(Duration::from_secs(30), "every record to settle", || {
        let md = md.clone();
        let wanted = wanted.clone();
        async move {
            for (n, want) in wanted.iter().enumerate() {
                let got = task(&md, &format!("t{n}")).await?;
                if got.as_ref().map(decided) != *want {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    })
    .await
    .with_context(|| {
        format!(
            "first record: {:?}",
            wanted.first().cloned().flatten().map(|t| t.container_id)
        )
    })?;

    // Exactly, once more after it settled: nothing still moving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, want) in wanted.iter().enumerate() {
        let got = task(&md, &format!("t{n}")).await?;
        assert_eq!(got.as_ref().map(decided), *want, "container t{n}");
    }

    // The cursor stored with the records is the stream's last task event.
    process.kill();
    let stream = js.get_stream(STREAM).await?.get_info().await?;
    let schema = berth_metadata::schema::Schema::open(&dir.path().join("db"))?;
    let txn = schema.env.read_txn()?;
    let cursor = schema.cursor(&txn)?;
    assert_eq!(cursor.seq, stream.state.last_sequence);
    Ok(())
}

/// When the stream is deleted under it, the consumer restarts, asks each
/// node holding a reservation for its tasks, takes the state of the same
/// reservations, and then applies the new stream's events from its start.
#[tokio::test]
async fn a_recreated_stream_is_reconciled_with_the_nodes() -> Result<()> {
    let service = Service::start().await?;
    let md = service.api("rec");
    let js = async_nats::jetstream::new(service.conn.clone());
    reserve(&md, "c1", "n1", 7).await?;
    reserve(&md, "c2", "n1", 8).await?;
    reserve(&md, "c3", "gone", 9).await?;
    let start = |container_id: &str, pid| TaskEvent {
        container_id: container_id.into(),
        pid,
        ..Default::default()
    };
    TaskEventOut::new("rec", "tasks.start", 7, start("c1", 5), "c1-start")
        .publish(&js)
        .await?
        .await?;
    eventually(Duration::from_secs(10), "c1 running", || async {
        Ok(task(&md, "c1")
            .await?
            .is_some_and(|t| t.status == TaskStatus::Running as i32))
    })
    .await?;

    // Node n1's task service, as far as `list` goes: c1 has exited; c2 is
    // another reservation than metadata's. Node `gone` does not answer.
    let mut requests = service.conn.subscribe("berth.v1.rec.task.n1.list").await?;
    let answering = service.conn.clone();
    let node = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let reply = tpb::ListReply {
                states: vec![
                    tpb::State {
                        container_id: "c1".into(),
                        status: "stopped".into(),
                        pid: 5,
                        exit_status: 3,
                        generation: 7,
                        ..Default::default()
                    },
                    tpb::State {
                        container_id: "c2".into(),
                        status: "running".into(),
                        pid: 6,
                        generation: 999,
                        ..Default::default()
                    },
                ],
            };
            if let Some(inbox) = request.reply {
                let _ = answering.publish(inbox, reply.encode_to_vec().into()).await;
            }
        }
    });

    // The stream goes; the consumer's reads fail and it starts again.
    js.delete_stream(STREAM).await?;
    eventually(Duration::from_secs(20), "c1 reconciled", || async {
        Ok(task(&md, "c1")
            .await?
            .is_some_and(|t| t.status == TaskStatus::Stopped as i32 && t.exit_status == 3))
    })
    .await?;
    let c2 = task(&md, "c2").await?.unwrap();
    assert_eq!(
        c2.status,
        TaskStatus::Created as i32,
        "another reservation's state"
    );
    let c3 = task(&md, "c3").await?.unwrap();
    assert_eq!(
        c3.status,
        TaskStatus::Created as i32,
        "an unreachable node's"
    );

    // The new stream's events apply, from its first one.
    let mut published = false;
    for _ in 0..100 {
        let event = TaskEventOut::new("rec", "tasks.start", 8, start("c2", 6), "c2-start");
        if let Ok(ack) = event.publish(&js).await {
            if ack.await.is_ok() {
                published = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published, "the stream was never recreated");
    eventually(Duration::from_secs(10), "c2 running", || async {
        Ok(task(&md, "c2")
            .await?
            .is_some_and(|t| t.status == TaskStatus::Running as i32 && t.pid == 6))
    })
    .await?;

    node.abort();
    service.stop().await
}
