//! The whole path on real parts, through the real binaries: an OCI archive
//! imported, unpacked and recorded; containers run by runc through a shim
//! with their output and exit status back at the client; their exits
//! recorded by metadata; and after the image is removed, gc leaves nothing
//! on disk or mounted. Needs root, runc and nats-server.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use prost::Message;

use berth_proto::{task as tpb, Envelope};
use berth_tests::{fixture, Node};

/// Every event in the node's stream, in order, as (topic, envelope).
async fn events(node: &Node) -> Result<Vec<(String, Envelope)>> {
    let nats = async_nats::connect(node.nats.url()).await?;
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream("BERTH_EVENTS").await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let pending = stream.get_info().await?.state.messages;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    while (out.len() as u64) < pending {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await?
            .context("stream ended")??;
        let envelope = Envelope::decode(message.payload.clone())?;
        out.push((envelope.topic.clone(), envelope));
    }
    Ok(out)
}

/// The task events of one container, as (topic, exit status).
fn task_events(all: &[(String, Envelope)], container_id: &str) -> Vec<(String, u32)> {
    all.iter()
        .filter(|(topic, _)| topic.starts_with("tasks."))
        .filter_map(|(topic, envelope)| {
            let event = tpb::TaskEvent::decode(envelope.payload.clone()).ok()?;
            (event.container_id == container_id).then(|| (topic.clone(), event.exit_status))
        })
        .collect()
}

/// Import, run, exit codes, events, removal and collection of busybox.
#[test]
fn busybox_runs_through_all_five_services() -> Result<()> {
    let mut node = Node::start()?;
    let runtime = tokio::runtime::Runtime::new()?;

    // Import: the archive's tag `latest` and its file name give the name.
    let archive = fixture::image("busybox/busybox.oci.tar");
    let imported = node.berth_ok(&["image", "import", archive.to_str().unwrap()])?;
    assert!(imported.contains("busybox:latest"), "{imported}");
    let images = node.berth_ok(&["image", "ls"])?;
    assert!(images.contains("busybox:latest"), "{images}");

    // The image's own command prints exactly what the fixture says.
    let expected = std::fs::read_to_string(fixture::image("busybox/expected-output.txt"))?;
    let output = node.berth(&["run", "--rm", "busybox"])?;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        expected,
        "{}",
        node.log()
    );
    assert_eq!(output.status.code(), Some(0));

    // Arguments replace the image's Cmd; the exit code is the container's.
    let output = node.berth(&["run", "--rm", "--name", "hello", "busybox", "echo", "hello"])?;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = node.berth(&[
        "run", "--rm", "--name", "seven", "busybox", "sh", "-c", "exit 7",
    ])?;
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Without --rm the container stays, stopped, with its exit recorded by
    // metadata from the task events.
    let output = node.berth(&[
        "run",
        "--name",
        "kept",
        "busybox",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])?;
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "err\n");
    let applied = berth_tests::wait_until(Duration::from_secs(5), || {
        node.berth_ok(&["ps", "-a", "--json"])
            .map(|out| out.contains("\"exited (3)\""))
            .unwrap_or(false)
    });
    assert!(applied, "{}", node.berth_ok(&["ps", "-a", "--json"])?);
    assert_eq!(node.berth_ok(&["logs", "kept"])?, "out\n");
    node.berth_ok(&["rm", "kept"])?;
    assert!(!node.berth_ok(&["ps", "-a"])?.contains("kept"));

    // Each task's life is in the stream, in order, with its exit status.
    let all = runtime.block_on(events(&node))?;
    let life = |code| {
        vec![
            ("tasks.create".to_string(), 0),
            ("tasks.start".to_string(), 0),
            ("tasks.exit".to_string(), code),
            ("tasks.delete".to_string(), code),
        ]
    };
    assert_eq!(task_events(&all, "hello"), life(0));
    assert_eq!(task_events(&all, "seven"), life(7));
    assert_eq!(task_events(&all, "kept"), life(3));
    let topics: Vec<&str> = all.iter().map(|(topic, _)| topic.as_str()).collect();
    for topic in [
        "content.commit",
        "snapshot.commit",
        "images.create",
        "containers.create",
        "containers.delete",
    ] {
        assert!(topics.contains(&topic), "no {topic} in {topics:?}");
    }

    // Removing the image leaves its bytes to gc, which takes them all.
    node.berth_ok(&["image", "rm", "busybox"])?;
    node.berth_ok(&["gc"])?;
    let blobs = Node::files_under(&node.root().join("content/blobs"));
    assert!(blobs.is_empty(), "blobs left: {blobs:?}");
    let snapshots = std::fs::read_dir(node.root().join("snapshot/snapshots"))?.count();
    assert_eq!(snapshots, 0, "snapshot directories left");
    assert!(node.mounts().is_empty(), "mounts left: {:?}", node.mounts());
    assert!(node.node_processes().is_empty(), "processes left");
    let bundles = Node::files_under(&node.state().join("task"));
    assert!(bundles.is_empty(), "task files left: {bundles:?}");

    // berthd stops cleanly on SIGTERM.
    let status = node
        .stop_berthd(libc::SIGTERM)
        .context("berthd was not running")?;
    assert!(
        status.success(),
        "berthd exited with {status}:\n{}",
        node.log()
    );
    Ok(())
}
