//! The node registry on a real nats-server: heartbeats put into the bucket
//! `berth_nodes` make a node ready, their end makes it lost within three of
//! its intervals, a lost node's tasks read as unknown, and removing a
//! container whose task is on a lost node leaves a tombstone for the node;
//! all of it survives a SIGKILL of the service.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use prost::Message;

use berth_bus::Code;
use berth_proto::metadata::{self as mpb, NodeState, TaskStatus};
use berth_proto::task::Heartbeat;
use berth_proto::Timestamp;
use common::{eventually, reserve, task, Service};

/// Puts one heartbeat of `node` (interval 200 ms) into the bucket.
async fn beat(bucket: &async_nats::jetstream::kv::Store, node: &str, sequence: u64) -> Result<()> {
    let heartbeat = Heartbeat {
        node: node.to_string(),
        boot_id: "boot-1".to_string(),
        version: "test".to_string(),
        running_tasks: 1,
        tasks: 1,
        memory_bytes: 1 << 30,
        cpus: 2,
        started_at: Some(Timestamp { unix_nanos: 1 }),
        sent_at: Some(Timestamp::now()),
        interval_ms: 200,
        sequence,
    };
    bucket.put(node, heartbeat.encode_to_vec().into()).await?;
    Ok(())
}

async fn state(metadata: &berth_bus::api::Metadata, node: &str) -> Result<Option<i32>> {
    match metadata
        .get_node(&mpb::GetNodeRequest { node: node.into() })
        .await
    {
        Ok(reply) => Ok(reply.node.map(|n| n.state)),
        Err(err) if err.code == Code::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// A node heard from is ready; silent for three intervals it is lost, its
/// running task reads as unknown, and it is ready again at its next beat.
#[tokio::test]
async fn silence_makes_a_node_lost_and_its_tasks_unknown() -> Result<()> {
    let service = Service::start().await?;
    let metadata = service.api("default");
    let js = async_nats::jetstream::new(service.conn.clone());
    let bucket = berth_bus::nodes::ensure_bucket(&js).await?;
    reserve(&metadata, "web", "n1", 7).await?;

    // Heard from: ready, with what the heartbeat said.
    beat(&bucket, "n1", 1).await?;
    eventually(Duration::from_secs(10), "n1 ready", || async {
        Ok(state(&metadata, "n1").await? == Some(NodeState::Ready as i32))
    })
    .await?;
    let listed = metadata.list_nodes(&Default::default()).await?.nodes;
    ensure!(listed.len() == 1, "{listed:?}");
    let heartbeat = listed[0].heartbeat.clone().unwrap_or_default();
    ensure!(heartbeat.cpus == 2 && heartbeat.boot_id == "boot-1");
    ensure!(
        task(&metadata, "web").await?.map(|t| t.status) == Some(TaskStatus::Created as i32),
        "a ready node's task keeps its state"
    );

    // Beating keeps it ready; silence makes it lost within the bound
    // (three intervals of 200 ms, plus the sweep's tick and slack).
    for sequence in 2..8 {
        beat(&bucket, "n1", sequence).await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        ensure!(state(&metadata, "n1").await? == Some(NodeState::Ready as i32));
    }
    let silent = Instant::now();
    eventually(Duration::from_secs(10), "n1 lost", || async {
        Ok(state(&metadata, "n1").await? == Some(NodeState::Lost as i32))
    })
    .await?;
    ensure!(
        silent.elapsed() < Duration::from_secs(3),
        "lost after {:?}",
        silent.elapsed()
    );
    let shown = task(&metadata, "web").await?.map(|t| t.status);
    ensure!(shown == Some(TaskStatus::Unknown as i32), "{shown:?}");
    let unknown = metadata
        .list_tasks(&mpb::ListTasksRequest {
            node: "n1".into(),
            status: vec![TaskStatus::Unknown as i32],
        })
        .await?
        .tasks;
    ensure!(unknown.len() == 1, "{unknown:?}");

    // The next heartbeat brings it back, and its task with it.
    beat(&bucket, "n1", 8).await?;
    eventually(Duration::from_secs(10), "n1 ready again", || async {
        Ok(state(&metadata, "n1").await? == Some(NodeState::Ready as i32))
    })
    .await?;
    let shown = task(&metadata, "web").await?.map(|t| t.status);
    ensure!(shown == Some(TaskStatus::Created as i32), "{shown:?}");
    service.stop().await
}

/// Only a task on a lost node may be abandoned: the container goes, and
/// the node finds a tombstone of that reservation, which it then deletes.
#[tokio::test]
async fn abandoning_a_lost_nodes_task_leaves_a_tombstone() -> Result<()> {
    let service = Service::start().await?;
    let metadata = service.api("default");
    let js = async_nats::jetstream::new(service.conn.clone());
    let bucket = berth_bus::nodes::ensure_bucket(&js).await?;
    reserve(&metadata, "web", "n2", 9).await?;
    let abandon = mpb::DeleteContainerRequest {
        container_id: "web".into(),
        abandon_task: true,
    };

    // A node never heard from, and a ready one, keep their tasks.
    let refused = metadata.delete_container(&abandon).await.err();
    ensure!(refused.map(|e| e.code) == Some(Code::FailedPrecondition));
    let beating = {
        let bucket = bucket.clone();
        tokio::spawn(async move {
            for sequence in 1.. {
                let _ = beat(&bucket, "n2", sequence).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually(Duration::from_secs(10), "n2 ready", || async {
        Ok(state(&metadata, "n2").await? == Some(NodeState::Ready as i32))
    })
    .await?;
    let refused = metadata.delete_container(&abandon).await.err();
    ensure!(
        refused.as_ref().map(|e| e.code) == Some(Code::FailedPrecondition),
        "{refused:?}"
    );
    beating.abort();

    // Lost: the container and its reservation go, the tombstone stays.
    eventually(Duration::from_secs(10), "n2 lost", || async {
        Ok(state(&metadata, "n2").await? == Some(NodeState::Lost as i32))
    })
    .await?;
    metadata.delete_container(&abandon).await?;
    ensure!(task(&metadata, "web").await?.is_none());
    let list = mpb::ListTombstonesRequest { node: "n2".into() };
    let tombstones = metadata.list_tombstones(&list).await?.tombstones;
    ensure!(tombstones.len() == 1, "{tombstones:?}");
    ensure!(tombstones[0].generation == 9 && tombstones[0].boot_id == "boot-1");
    let other = mpb::ListTombstonesRequest { node: "n3".into() };
    ensure!(metadata
        .list_tombstones(&other)
        .await?
        .tombstones
        .is_empty());
    let elsewhere = service.api("other");
    ensure!(elsewhere
        .list_tombstones(&list)
        .await?
        .tombstones
        .is_empty());

    // The node applied it: gone, and deleting it again is no error.
    let applied = mpb::DeleteTombstoneRequest {
        node: "n2".into(),
        container_id: "web".into(),
    };
    metadata.delete_tombstone(&applied).await?;
    metadata.delete_tombstone(&applied).await?;
    ensure!(metadata.list_tombstones(&list).await?.tombstones.is_empty());
    service.stop().await
}

/// A SIGKILL of the service loses nothing of the registry: a lost node is
/// still lost after the restart, its tombstone is still there, and a node
/// that kept beating is never taken for lost by the restarted service.
#[tokio::test]
async fn the_registry_and_tombstones_survive_a_kill() -> Result<()> {
    let nats = berth_testkit::NatsServer::start()?;
    let dir = berth_testkit::tempdir("berth-metadata-nodes-")?;
    let mut process = common::Process::start(&nats.url(), dir.path())?;
    let conn = berth_bus::connect(&nats.url(), "test").await?;
    let metadata = common::metadata(&conn, "default");
    common::wait_served(&metadata).await?;
    let js = async_nats::jetstream::new(conn.clone());
    let bucket = berth_bus::nodes::ensure_bucket(&js).await?;
    reserve(&metadata, "web", "gone", 3).await?;

    // "steady" beats throughout; "gone" beats once, then is lost.
    let beating = {
        let bucket = bucket.clone();
        tokio::spawn(async move {
            for sequence in 1.. {
                let _ = beat(&bucket, "steady", sequence).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    beat(&bucket, "gone", 1).await?;
    eventually(Duration::from_secs(10), "both ready", || async {
        Ok(
            state(&metadata, "gone").await? == Some(NodeState::Ready as i32)
                && state(&metadata, "steady").await? == Some(NodeState::Ready as i32),
        )
    })
    .await?;
    eventually(Duration::from_secs(10), "gone lost", || async {
        Ok(state(&metadata, "gone").await? == Some(NodeState::Lost as i32))
    })
    .await?;
    metadata
        .delete_container(&mpb::DeleteContainerRequest {
            container_id: "web".into(),
            abandon_task: true,
        })
        .await?;

    process.kill();
    process.restart()?;
    common::wait_served(&metadata).await?;

    // Right after the restart, and for longer than a node may stay silent.
    let list = mpb::ListTombstonesRequest {
        node: "gone".into(),
    };
    for _ in 0..10 {
        ensure!(state(&metadata, "gone").await? == Some(NodeState::Lost as i32));
        ensure!(state(&metadata, "steady").await? == Some(NodeState::Ready as i32));
        let tombstones = metadata.list_tombstones(&list).await?.tombstones;
        ensure!(
            tombstones.len() == 1 && tombstones[0].generation == 3,
            "{tombstones:?}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    beating.abort();
    Ok(())
}
