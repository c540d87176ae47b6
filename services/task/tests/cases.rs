//! The lifecycle case C17 (signals, exit statuses, a PID 1 that ignores
//! SIGTERM, OOM, a missing binary) run through the task service with its own
//! image (`tests/fixtures/cases/C17-signals-exit-status-oom`). Needs root.

mod common;

use std::time::Duration;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::{metadata as mpb, task as tpb};
use berth_testkit::fixture;
use common::Node;

fn image() -> std::path::PathBuf {
    fixture::case("C17-signals-exit-status-oom").join("image.tar")
}

/// The exits of one container in the stream.
async fn exits(node: &Node, container_id: &str) -> Result<Vec<u32>> {
    Ok(node
        .task_events(container_id)
        .await?
        .into_iter()
        .filter(|(topic, _)| topic == "tasks.exit")
        .map(|(_, status)| status)
        .collect())
}

/// PID 1 without a handler survives SIGTERM; stop ends it with SIGKILL and
/// 137, published once; with a handler SIGTERM gives its own code; plain
/// exits keep their codes; the image's StopSignal is what stop sends first.
#[tokio::test(flavor = "multi_thread")]
async fn c17_signals_and_exit_statuses() -> Result<()> {
    let node = Node::start("c17").await?;
    let task = node.task();

    let no_handler = node.import(&image(), "pid1-no-handler").await?;
    node.container("no-handler", &no_handler, &[]).await?;
    node.run("no-handler").await?;
    task.kill(&tpb::KillRequest {
        container_id: "no-handler".into(),
        signal: libc::SIGTERM as u32,
        all: false,
        ..Default::default()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(node.state("no-handler").await?.status, "running");
    let stopped = task
        .stop(&tpb::StopRequest {
            container_id: "no-handler".into(),
            timeout_seconds: 1,
        })
        .await?;
    assert_eq!((stopped.exit_status, stopped.killed), (137, true));
    let state = node.wait_stopped("no-handler").await?;
    assert!(state.exited_at.is_some());
    assert_eq!(node.wait_applied("no-handler").await?.exit_status, 137);
    assert_eq!(exits(&node, "no-handler").await?, [137]);

    let trap = node.import(&image(), "pid1-trap-term").await?;
    node.container("trap", &trap, &[]).await?;
    node.run("trap").await?;
    // The handler is installed once the process runs; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = task
        .stop(&tpb::StopRequest {
            container_id: "trap".into(),
            timeout_seconds: 10,
        })
        .await?;
    assert_eq!((stopped.exit_status, stopped.killed), (42, false));
    assert_eq!(exits(&node, "trap").await?, [42]);

    for (tag, code) in [("exit-3", 3), ("exit-0", 0)] {
        let image = node.import(&image(), tag).await?;
        node.container(tag, &image, &[]).await?;
        node.run(tag).await?;
        assert_eq!(node.wait_stopped(tag).await?.exit_status, code);
        assert_eq!(node.wait_applied(tag).await?.exit_status, code);
        assert_eq!(exits(&node, tag).await?, [code]);
    }

    let usr1 = node.import(&image(), "stopsignal-usr1").await?;
    node.container("usr1", &usr1, &[]).await?;
    node.run("usr1").await?;
    let stopped = task
        .stop(&tpb::StopRequest {
            container_id: "usr1".into(),
            timeout_seconds: 1,
        })
        .await?;
    assert_eq!((stopped.exit_status, stopped.killed), (137, true));
    Ok(())
}

/// A 1 GiB allocation under a 32 MiB limit: 137 and OOM, with `tasks.oom`.
#[tokio::test(flavor = "multi_thread")]
async fn c17_oom_is_reported() -> Result<()> {
    let node = Node::start("c17oom").await?;
    let image = node.import(&image(), "oom").await?;
    let options = mpb::RunOptions {
        memory_bytes: 32 << 20,
        ..Default::default()
    };
    node.container_with("oom", &image, options).await?;
    node.run("oom").await?;
    let state = node.wait_stopped("oom").await?;
    assert_eq!((state.exit_status, state.oom_killed), (137, true));
    let events = node.task_events("oom").await?;
    let oom = events.iter().position(|(topic, _)| topic == "tasks.oom");
    let exit = events.iter().position(|(topic, _)| topic == "tasks.exit");
    assert!(oom.is_some() && oom < exit, "{events:?}");
    assert!(node.wait_applied("oom").await?.oom_killed);
    Ok(())
}

/// A Cmd naming no binary fails at create with the runtime's words; no
/// exit is invented for it.
#[tokio::test(flavor = "multi_thread")]
async fn c17_missing_binary_fails_at_create() -> Result<()> {
    let node = Node::start("c17missing").await?;
    let image = node.import(&image(), "missing-binary").await?;
    node.container("missing", &image, &[]).await?;
    let err = node
        .task()
        .create(&tpb::CreateRequest {
            container_id: "missing".into(),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("does-not-exist"), "{err}");
    assert!(exits(&node, "missing").await?.is_empty());
    Ok(())
}
