//! What the service promises across a SIGKILL of its process.

mod common;

use anyhow::Result;

use berth_bus::Code;
use berth_proto::metadata as mpb;
use berth_testkit::NatsServer;

use common::{container, metadata, Process};

/// A create retried with its request id after the service was killed and
/// restarted returns the first outcome (not already-exists); the same id
/// with another body is invalid-argument, and a fresh id already-exists.
#[tokio::test]
async fn a_create_retried_after_a_restart_returns_its_first_outcome() -> Result<()> {
    let nats = NatsServer::start()?;
    let dir = berth_testkit::tempdir("berth-metadata-replay-")?;
    let mut process = Process::start(&nats.url(), dir.path())?;
    let conn = berth_bus::connect(&nats.url(), "test").await?;
    let md = metadata(&conn, "replay");
    common::wait_served(&md).await?;

    let subject = berth_bus::subject::op("replay", "metadata", "containers.create")?;
    let request = mpb::CreateContainerRequest {
        container: Some(container("c1", "n1")),
    };
    let first: mpb::ContainerReply = md.client.call_mut(&subject, &request, "req-1").await?;

    process.kill();
    process.restart()?;
    common::wait_served(&md).await?;

    let again: mpb::ContainerReply = md.client.call_mut(&subject, &request, "req-1").await?;
    assert_eq!(again, first, "the retry got another outcome");
    assert_eq!(again.container.unwrap().generation, 1);

    let other = mpb::CreateContainerRequest {
        container: Some(container("c2", "n1")),
    };
    let reused = md
        .client
        .call_mut::<_, mpb::ContainerReply>(&subject, &other, "req-1")
        .await;
    assert_eq!(reused.err().map(|e| e.code), Some(Code::InvalidArgument));

    let fresh = md.create_container(&request).await;
    assert_eq!(fresh.err().map(|e| e.code), Some(Code::AlreadyExists));
    Ok(())
}
