//! Request/reply through a real nats-server: typed round trips, every error
//! code across the wire, fast failures for missing services and ops,
//! malformed bodies, concurrency, and discovery through `$SRV`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_bus::{subject, Call, Client, Code, Error, Result, Service};
use berth_testkit::NatsServer;

/// What the test service is asked to do.
#[derive(Clone, PartialEq, prost::Message)]
struct Ask {
    /// Text to echo back.
    #[prost(string, tag = "1")]
    text: String,
    /// A wire code to fail with instead (0: succeed).
    #[prost(uint32, tag = "2")]
    fail_code: u32,
    /// How long to take.
    #[prost(uint64, tag = "3")]
    sleep_ms: u64,
}

/// What it answers.
#[derive(Clone, PartialEq, prost::Message)]
struct Answer {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(string, tag = "2")]
    namespace: String,
}

/// A body that does not decode as `Ask`: field 1 is a string, and a
/// varint there is a wire-type mismatch.
const NOT_AN_ASK: &[u8] = &[0x08, 0x01];

async fn echo(_: Arc<()>, call: Call, ask: Ask) -> Result<Answer> {
    tokio::time::sleep(Duration::from_millis(ask.sleep_ms)).await;
    if ask.fail_code != 0 {
        return Err(Error::new(Code::from_u16(ask.fail_code as u16), ask.text));
    }
    Ok(Answer {
        text: ask.text,
        namespace: call.namespace().to_string(),
    })
}

async fn start(server: &NatsServer) -> anyhow::Result<(Client, berth_bus::serve::Serving)> {
    let nats = berth_bus::connect(&server.url(), "rpc-test").await?;
    let serving = Service::new("metadata", "0.1.0", Arc::new(()))
        .op("echo", echo)
        .serve(nats.clone())
        .await?;
    nats.flush().await?;
    Ok((Client::new(nats, Duration::from_secs(10)), serving))
}

fn ask(text: &str) -> Ask {
    Ask {
        text: text.to_string(),
        ..Default::default()
    }
}

/// A typed request through a `Service` comes back decoded, with the
/// namespace the subject named.
#[tokio::test]
async fn round_trip_through_a_service() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;

    let subject = subject::op("team-a", "metadata", "echo")?;
    let answer: Answer = client.call(&subject, &ask("hello")).await?;
    assert_eq!(answer.text, "hello");
    assert_eq!(answer.namespace, "team-a");
    Ok(())
}

/// Every code a handler returns reaches the client as the same code with
/// the same message.
#[tokio::test]
async fn every_code_crosses_the_wire_intact() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;
    let subject = subject::op("default", "metadata", "echo")?;

    for code in Code::ALL {
        let message = format!("snapshot \"k1\" {code} (é)");
        let request = Ask {
            text: message.clone(),
            fail_code: code.as_u16() as u32,
            sleep_ms: 0,
        };
        let err = client
            .call::<_, Answer>(&subject, &request)
            .await
            .unwrap_err();
        assert_eq!(err, Error::new(code, message), "{code}");
    }

    // A message of several lines still fits one header, as one line.
    let request = Ask {
        text: "first\nsecond".to_string(),
        fail_code: Code::NotFound.as_u16() as u32,
        sleep_ms: 0,
    };
    let err = client
        .call::<_, Answer>(&subject, &request)
        .await
        .unwrap_err();
    assert_eq!(err, Error::not_found("first second"));
    Ok(())
}

/// A request to a service that is not running answers `Unavailable` at
/// once, far within its timeout.
#[tokio::test]
async fn missing_service_is_unavailable_at_once() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let nats = berth_bus::connect(&server.url(), "rpc-test").await?;
    let client = Client::new(nats, Duration::from_secs(10));

    let subject = subject::op("default", "content", "info")?;
    let started = Instant::now();
    let err = client
        .call::<_, Answer>(&subject, &ask("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// An op the running service does not serve answers `Unavailable` at once
/// (the server's no-responders status), never silence.
#[tokio::test]
async fn unknown_op_is_answered_at_once() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;

    let subject = subject::op("default", "metadata", "no-such-op")?;
    let started = Instant::now();
    let err = client
        .call::<_, Answer>(&subject, &ask("x"))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(err.message.contains("does not serve"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// A body that does not decode is refused with `InvalidArgument`, and the
/// handler is not run.
#[tokio::test]
async fn malformed_body_is_invalid_argument() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;

    let subject = subject::op("default", "metadata", "echo")?;
    let err = client
        .call_raw(&subject, NOT_AN_ASK.into(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");
    assert!(err.message.contains("malformed"), "{err}");
    Ok(())
}

/// A reply later than the client's timeout answers `DeadlineExceeded`
/// after the timeout, and a handler past the service's deadline answers it
/// from the service.
#[tokio::test]
async fn late_replies_are_deadline_exceeded() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let nats = berth_bus::connect(&server.url(), "rpc-test").await?;
    let _serving = Service::new("metadata", "0.1.0", Arc::new(()))
        .deadline(Duration::from_millis(300))
        .op("echo", echo)
        .serve(nats.clone())
        .await?;
    nats.flush().await?;
    let subject = subject::op("default", "metadata", "echo")?;
    let slow = Ask {
        sleep_ms: 2_000,
        ..ask("slow")
    };

    // The client gives up first.
    let client = Client::new(nats.clone(), Duration::from_millis(100));
    let err = client.call::<_, Answer>(&subject, &slow).await.unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(err.message.contains("no reply"), "{err}");

    // The service gives up first, and says so.
    let client = Client::new(nats, Duration::from_secs(10));
    let started = Instant::now();
    let err = client.call::<_, Answer>(&subject, &slow).await.unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(err.message.contains("did not finish"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}

/// Requests are served concurrently: eight requests of 400 ms each finish
/// together in well under the 3.2 s they would take one at a time.
#[tokio::test]
async fn requests_are_served_concurrently() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;
    let subject = subject::op("default", "metadata", "echo")?;

    let started = Instant::now();
    let calls = (0..8).map(|i| {
        let request = Ask {
            sleep_ms: 400,
            ..ask(&i.to_string())
        };
        let client = client.clone();
        let subject = subject.clone();
        async move { client.call::<_, Answer>(&subject, &request).await }
    });
    let answers = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    for (i, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer?.text, i.to_string());
    }
    assert!(elapsed < Duration::from_millis(1_600), "{elapsed:?}");
    Ok(())
}

/// The service registers through the micro-service protocol: `$SRV.PING`
/// finds it, and `$SRV.STATS` counts the requests of each endpoint.
#[tokio::test]
async fn services_are_discovered_and_counted() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let (client, _serving) = start(&server).await?;
    let subject = subject::op("default", "metadata", "echo")?;
    for _ in 0..3 {
        let _: Answer = client.call(&subject, &ask("x")).await?;
    }

    let nats = client.nats();
    let ping = nats.request("$SRV.PING.metadata", "".into()).await?;
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload)?;
    assert_eq!(ping["name"], "metadata", "{ping}");

    let stats = nats.request("$SRV.STATS.metadata", "".into()).await?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload)?;
    let endpoint = &stats["endpoints"][0];
    assert_eq!(endpoint["name"], "echo", "{stats}");
    assert_eq!(endpoint["subject"], "berth.v1.*.metadata.echo", "{stats}");
    assert_eq!(endpoint["num_requests"], 3, "{stats}");
    Ok(())
}
