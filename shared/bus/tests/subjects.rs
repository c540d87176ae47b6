//! Bad subject tokens, reserved namespaces and bad request ids are refused
//! with `InvalidArgument` before anything is sent.

use std::time::Duration;

use berth_bus::api::{Metadata, Task};
use berth_bus::client::new_request_id;
use berth_bus::{Client, Code};
use berth_proto::metadata::ListImagesRequest;
use berth_proto::task::StateRequest;
use berth_testkit::NatsServer;
use futures::StreamExt;

/// Namespaces that must never reach the wire.
fn bad_namespaces() -> Vec<String> {
    let mut names: Vec<String> = ["", "a.b", "a*", ">", "a b", "a\tb", "a\u{7}b", "events"]
        .into_iter()
        .map(String::from)
        .collect();
    names.extend(berth_bus::subject::SERVICES.iter().map(|s| s.to_string()));
    names.push("x".repeat(berth_bus::subject::MAX_TOKEN_LEN + 1));
    names
}

/// Raw subjects that must never reach the wire.
const BAD_SUBJECTS: [&str; 6] = [
    "berth.v1.default.metadata.>",
    "berth.v1.*.metadata.images.list",
    "berth.v1.default..images.list",
    "berth.v1.content.metadata.images.list",
    "berth.v1.default.events.tasks.exit",
    "berth.v1.default.metadata",
];

/// Sends every bad request `client` can be asked for, and checks each is
/// refused as invalid.
async fn send_bad_requests(client: &Client) -> anyhow::Result<()> {
    for namespace in bad_namespaces() {
        let metadata = Metadata {
            client: client.clone(),
            namespace: namespace.clone(),
        };
        let err = metadata
            .list_images(&ListImagesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{namespace:?}: {err}");
    }
    for node in ["", "n.1", "n*", "n 1", ">"] {
        let task = Task {
            client: client.clone(),
            namespace: "default".into(),
            node: node.into(),
        };
        let err = task.state(&StateRequest::default()).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{node:?}: {err}");
    }
    for subject in BAD_SUBJECTS {
        let err = client.call_raw(subject, "".into(), None).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{subject:?}: {err}");
    }
    for request_id in ["", "a b", "a.b", "*"] {
        let subject = "berth.v1.default.metadata.images.create";
        let err = client
            .call_raw(subject, "".into(), Some(request_id))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{request_id:?}: {err}");
    }
    Ok(())
}

/// With a subscriber on `>` watching, no bad request publishes anything,
/// while a good one is seen at once.
#[tokio::test]
async fn bad_subjects_never_reach_the_server() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let watcher = async_nats::connect(server.url()).await?;
    let mut seen = watcher.subscribe(">").await?;
    watcher.flush().await?;
    let nats = berth_bus::connect(&server.url(), "subjects-test").await?;
    let client = Client::new(nats, Duration::from_secs(2));

    send_bad_requests(&client).await?;
    client.nats().flush().await?;
    let leaked = tokio::time::timeout(Duration::from_millis(300), seen.next()).await;
    assert!(leaked.is_err(), "a bad request was published: {leaked:?}");

    // The watcher does see what is sent: a good request, which only the
    // watcher receives (so it times out).
    let err = client
        .with_timeout(Duration::from_millis(200))
        .call_raw("berth.v1.default.metadata.images.list", "".into(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    let message = tokio::time::timeout(Duration::from_secs(2), seen.next())
        .await?
        .expect("subscription ended");
    assert_eq!(
        message.subject.as_str(),
        "berth.v1.default.metadata.images.list"
    );
    Ok(())
}

/// With no server at all, bad requests are `InvalidArgument` at once, while
/// a good one waits for a connection and times out: the check comes before
/// the wire.
#[tokio::test]
async fn bad_subjects_are_refused_without_a_server() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let nats = berth_bus::connect(&format!("nats://127.0.0.1:{port}"), "subjects-test").await?;
    let client = Client::new(nats, Duration::from_millis(300));

    let started = std::time::Instant::now();
    send_bad_requests(&client).await?;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    let err = client
        .call_mut::<_, ListImagesRequest>(
            "berth.v1.default.metadata.images.create",
            &ListImagesRequest::default(),
            &new_request_id(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    Ok(())
}
