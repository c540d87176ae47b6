//! The task service over NATS, on real parts: metadata, content and snapshot
//! services in this process, the task service as its own process (so it can
//! be killed), real runc and the busybox image. Needs root.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::{metadata as mpb, task as tpb};
use common::{pid_alive, Node};

/// A task's life over NATS: create, start, output, exit recorded here and in
/// metadata, delete that leaves no bundle, mount or reservation.
/// `create` with `start` runs the process at once (one `runc run
/// --detach`): the reply's pid is the running init, the task reads
/// running, `tasks.create` and `tasks.start` are published in that order,
/// and a later `start` is refused.
#[tokio::test(flavor = "multi_thread")]
async fn create_with_start_runs_at_once() -> Result<()> {
    let node = Node::start("runnow").await?;
    let image = node.import_busybox().await?;
    node.container("r1", &image, &["sh", "-c", "echo up; sleep 30"])
        .await?;
    let created = node
        .task()
        .create(&tpb::CreateRequest {
            container_id: "r1".into(),
            start: true,
        })
        .await?;
    assert!(pid_alive(created.pid), "init {} not running", created.pid);
    let state = node.state("r1").await?;
    assert_eq!((state.status.as_str(), state.pid), ("running", created.pid));

    let again = node
        .task()
        .start(&tpb::StartRequest {
            container_id: "r1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code, Code::FailedPrecondition, "{again}");

    let topics = node.task_topics("r1").await?;
    let at = |topic: &str| topics.iter().position(|t| t == topic);
    assert!(
        at("tasks.create").is_some() && at("tasks.create") < at("tasks.start"),
        "{topics:?}"
    );

    node.task()
        .kill(&tpb::KillRequest {
            container_id: "r1".into(),
            signal: 9,
            ..Default::default()
        })
        .await?;
    let stopped = node.wait_stopped("r1").await?;
    assert_eq!(stopped.exit_status, 137);
    let stdout = node
        .task()
        .logs(&tpb::LogsRequest {
            container_id: "r1".into(),
            stream: tpb::Stream::Stdout as i32,
            ..Default::default()
        })
        .await?;
    assert_eq!(&stdout.data[..], b"up\n");
    node.delete("r1").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_is_recorded_and_cleaned_up() -> Result<()> {
    let node = Node::start("life").await?;
    let image = node.import_busybox().await?;
    node.container(
        "c1",
        &image,
        &["sh", "-c", "echo hello; echo oops >&2; exit 4"],
    )
    .await?;
    node.run("c1").await?;

    let state = node.wait_stopped("c1").await?;
    assert_eq!(state.exit_status, 4);
    let stdout = node
        .task()
        .logs(&tpb::LogsRequest {
            container_id: "c1".into(),
            stream: tpb::Stream::Stdout as i32,
            offset: 0,
            length: 0,
            ..Default::default()
        })
        .await?;
    assert_eq!(&stdout.data[..], b"hello\n");
    assert!(stdout.eof);
    let stderr = node
        .task()
        .logs(&tpb::LogsRequest {
            container_id: "c1".into(),
            stream: tpb::Stream::Stderr as i32,
            offset: 0,
            length: 0,
            ..Default::default()
        })
        .await?;
    assert_eq!(&stderr.data[..], b"oops\n");
    let applied = node.wait_applied("c1").await?;
    assert_eq!(applied.exit_status, 4);

    // A second start of the same task is refused on its record.
    let again = node
        .task()
        .start(&tpb::StartRequest {
            container_id: "c1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code, Code::FailedPrecondition, "{again}");

    let deleted = node.delete("c1").await?;
    assert_eq!(deleted.exit_status, 4);
    let gone = node
        .metadata()
        .get_task(&mpb::GetTaskRequest {
            container_id: "c1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code, Code::NotFound);
    assert!(!node
        .state_dir()
        .join("bundles")
        .join(&node.namespace)
        .join("c1")
        .exists());
    assert!(!node
        .state_dir()
        .join("shims")
        .join(&node.namespace)
        .join("c1")
        .exists());
    assert_eq!(
        node.mounts()
            .iter()
            .filter(|m| m.contains("bundles"))
            .count(),
        0
    );
    // runc removes the task's cgroup; its namespace parent goes with the
    // last task (checked where the pids controller is mounted as on v1).
    if std::path::Path::new("/sys/fs/cgroup/pids").exists() {
        assert!(
            !node.namespace_cgroup().exists(),
            "{:?} left",
            node.namespace_cgroup()
        );
    }
    assert_eq!(
        node.task_events("c1").await?,
        [
            ("tasks.create".to_string(), 0),
            ("tasks.start".into(), 0),
            ("tasks.exit".into(), 4),
            ("tasks.delete".into(), 4)
        ]
    );
    Ok(())
}

/// A command that does not exist fails at create with runc's words, and
/// leaves no reservation, bundle or mount behind.
#[tokio::test(flavor = "multi_thread")]
async fn missing_binary_is_an_error_at_create() -> Result<()> {
    let node = Node::start("missing").await?;
    let image = node.import_busybox().await?;
    node.container("nope", &image, &["/no/such/binary"]).await?;
    let err = node
        .task()
        .create(&tpb::CreateRequest {
            container_id: "nope".into(),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("/no/such/binary"), "{err}");
    let reservation = node
        .metadata()
        .get_task(&mpb::GetTaskRequest {
            container_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reservation.code, Code::NotFound);
    assert!(!node
        .state_dir()
        .join("bundles")
        .join(&node.namespace)
        .join("nope")
        .exists());
    assert!(node.mounts().iter().all(|m| !m.contains("bundles")));

    // The container may have a task once the command is fixed: nothing of
    // the failed one is in the way.
    let retry = node
        .task()
        .create(&tpb::CreateRequest {
            container_id: "nope".into(),
            start: false,
        })
        .await;
    assert_eq!(retry.unwrap_err().code, Code::InvalidArgument);
    Ok(())
}

/// SIGKILL of the task service with five tasks running, one exiting while
/// it is down: after the restart four still run, and the fifth's exit is
/// recorded, applied by metadata and published exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_task_service_loses_no_exit() -> Result<()> {
    let mut node = Node::start("sigkill").await?;
    let image = node.import_busybox().await?;
    let mut pids = Vec::new();
    for index in 0..4 {
        let id = format!("long{index}");
        node.container(&id, &image, &["sleep", "600"]).await?;
        pids.push((id.clone(), node.run(&id).await?));
    }
    node.container("short", &image, &["sh", "-c", "sleep 2; exit 5"])
        .await?;
    node.run("short").await?;

    if std::path::Path::new("/sys/fs/cgroup/pids").exists() {
        assert!(
            node.namespace_cgroup().exists(),
            "tasks run outside {:?}",
            node.namespace_cgroup()
        );
    }
    node.kill_task_service();
    // The short task exits while nobody watches it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (_, pid) in &pids {
        assert!(pid_alive(*pid), "a container died with the task service");
    }
    node.start_task_service()?;
    node.wait_for_services().await?;

    let state = node.wait_stopped("short").await?;
    assert_eq!(state.exit_status, 5);
    assert_eq!(node.wait_applied("short").await?.exit_status, 5);
    for (id, pid) in &pids {
        let state = node.state(id).await?;
        assert_eq!((state.status.as_str(), state.pid), ("running", *pid));
    }
    let exits: Vec<_> = node
        .task_events("short")
        .await?
        .into_iter()
        .filter(|(topic, _)| topic == "tasks.exit")
        .collect();
    assert_eq!(exits, [("tasks.exit".to_string(), 5)]);

    // The re-adopted tasks are still driven through their shims.
    for (id, _) in &pids {
        node.task()
            .kill(&tpb::KillRequest {
                container_id: id.clone(),
                signal: 9,
                all: false,
                ..Default::default()
            })
            .await?;
        assert_eq!(node.wait_stopped(id).await?.exit_status, 137);
        node.delete(id).await?;
    }
    node.delete("short").await?;
    if std::path::Path::new("/sys/fs/cgroup/pids").exists() {
        assert!(
            !node.namespace_cgroup().exists(),
            "{:?} left",
            node.namespace_cgroup()
        );
    }
    Ok(())
}
