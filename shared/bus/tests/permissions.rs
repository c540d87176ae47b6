//! Permission refusals under NATS authorization come back as
//! `PermissionDenied` as soon as the server says no, never as a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use berth_bus::{subject, Call, Client, Code, Result, Service};
use berth_testkit::NatsServer;

/// `admin` may do anything; `tenant` may publish only in namespace `a` and
/// to reply inboxes; `deaf` may publish in namespace `a` but may not
/// subscribe to reply inboxes, so no reply can ever reach it.
const AUTHORIZATION: &str = r#"
authorization {
  users = [
    { user: admin, password: admin }
    {
      user: tenant, password: tenant,
      permissions: {
        publish: { allow: ["berth.v1.a.>", "_INBOX.>"] }
        subscribe: { allow: ["_INBOX.>"] }
      }
    }
    {
      user: deaf, password: deaf,
      permissions: {
        publish: { allow: ["berth.v1.a.>", "_INBOX.>"] }
        subscribe: { deny: ["_INBOX.>"] }
      }
    }
  ]
}
"#;

/// A reply with the namespace the request named.
#[derive(Clone, PartialEq, prost::Message)]
struct Listed {
    #[prost(string, tag = "1")]
    namespace: String,
}

/// `images.list` takes nothing here.
#[derive(Clone, PartialEq, prost::Message)]
struct List {}

async fn list(_: Arc<()>, call: Call, _: List) -> Result<Listed> {
    Ok(Listed {
        namespace: call.namespace().to_string(),
    })
}

async fn client_as(server: &NatsServer, user: &str) -> anyhow::Result<Client> {
    let options = ConnectOptions::with_user_and_password(user.into(), user.into()).name(user);
    let nats = berth_bus::connect_with(&server.url(), options).await?;
    Ok(Client::new(nats, Duration::from_secs(10)))
}

/// Starts the metadata service as `admin`, serving every namespace.
async fn serve(server: &NatsServer) -> anyhow::Result<berth_bus::serve::Serving> {
    let admin = client_as(server, "admin").await?;
    let serving = Service::new("metadata", "0.1.0", Arc::new(()))
        .op("images.list", list)
        .serve(admin.nats().clone())
        .await?;
    admin.nats().flush().await?;
    Ok(serving)
}

/// A publish the user may not make answers `PermissionDenied` naming the
/// subject, within a second of a 10 s timeout, while its own namespace
/// still works on the same connection.
#[tokio::test]
async fn forbidden_subject_is_permission_denied_at_once() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config(AUTHORIZATION)?;
    let _serving = serve(&server).await?;
    let tenant = client_as(&server, "tenant").await?;

    // Its own namespace first, so the reply inbox is known to work.
    let allowed = subject::op("a", "metadata", "images.list")?;
    let listed: Listed = tenant.call(&allowed, &List {}).await?;
    assert_eq!(listed.namespace, "a");

    let forbidden = subject::op("b", "metadata", "images.list")?;
    for _ in 0..2 {
        let started = Instant::now();
        let err = tenant
            .call::<_, Listed>(&forbidden, &List {})
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.code, Code::PermissionDenied, "{err}");
        assert_eq!(
            err.message,
            "permission denied: may not publish to berth.v1.b.metadata.images.list"
        );
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }

    // The refusal belonged to that subject only.
    let listed: Listed = tenant.call(&allowed, &List {}).await?;
    assert_eq!(listed.namespace, "a");
    Ok(())
}

/// A user who may not subscribe to its reply inbox gets `PermissionDenied`
/// at once, on the first request and on every later one.
#[tokio::test]
async fn refused_reply_inbox_is_permission_denied_at_once() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config(AUTHORIZATION)?;
    let _serving = serve(&server).await?;
    let deaf = client_as(&server, "deaf").await?;

    let allowed = subject::op("a", "metadata", "images.list")?;
    for _ in 0..3 {
        let started = Instant::now();
        let err = deaf
            .call::<_, Listed>(&allowed, &List {})
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.code, Code::PermissionDenied, "{err}");
        assert!(
            err.message
                .starts_with("permission denied: may not subscribe to _INBOX."),
            "{err}"
        );
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }
    Ok(())
}

/// On a connection not made by `berth_bus::connect`, the same refusal is
/// only a timeout: the watch is what makes the answer prompt.
#[tokio::test]
async fn without_the_watch_a_refusal_is_a_timeout() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config(AUTHORIZATION)?;
    let nats = ConnectOptions::with_user_and_password("tenant".into(), "tenant".into())
        .connect(server.url())
        .await?;
    let tenant = Client::new(nats, Duration::from_millis(500));

    let forbidden = subject::op("b", "metadata", "images.list")?;
    let err = tenant
        .call::<_, Listed>(&forbidden, &List {})
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    Ok(())
}

/// A request made outside `Client` (as JetStream's API calls are) can race
/// `conn::refusal`, which answers the server's refusal of its subject at
/// once.
#[tokio::test]
async fn refusals_of_other_requests_are_seen_too() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config(AUTHORIZATION)?;
    let tenant = client_as(&server, "tenant").await?;
    let nats = tenant.nats().clone();
    let subject = "$JS.API.STREAM.INFO.BERTH_EVENTS";

    let refused = berth_bus::conn::refusal(&nats, subject);
    let started = Instant::now();
    let request = nats.request(subject, bytes::Bytes::new());
    let err = tokio::select! {
        answer = request => anyhow::bail!("the request was answered: {answer:?}"),
        err = refused => err,
    };
    assert_eq!(err.code, Code::PermissionDenied, "{err}");
    assert_eq!(
        err.message,
        "permission denied: may not publish to $JS.API.STREAM.INFO.BERTH_EVENTS"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    Ok(())
}
