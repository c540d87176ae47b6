//! Request ids: a mutating request retried with its id answers its first
//! outcome, after a client timeout and after the service was killed with
//! SIGKILL and started again, and its effect happens once.
//!
//! The service is the `counter_service` example, run as its own process so
//! it can be killed; `cargo test` builds examples before it runs tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_bus::client::new_request_id;
use berth_bus::{subject, Client, Code};
use berth_testkit::NatsServer;

/// `counter.add`, as the example declares it.
#[derive(Clone, PartialEq, prost::Message)]
struct AddRequest {
    #[prost(uint64, tag = "1")]
    amount: u64,
    #[prost(uint64, tag = "2")]
    delay_ms: u64,
}

/// The counter's value.
#[derive(Clone, PartialEq, prost::Message)]
struct CounterReply {
    #[prost(uint64, tag = "1")]
    value: u64,
}

/// `counter.get`.
#[derive(Clone, PartialEq, prost::Message)]
struct GetRequest {}

/// The example binary, beside this test's directory in the target tree.
fn counter_service_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable outside a target tree")?;
    let bin = profile_dir.join("examples").join("counter_service");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo test -p berth-bus`, which builds examples",
            bin.display()
        );
    }
    Ok(bin)
}

/// The service process, killed with SIGKILL on drop.
struct CounterService(Child);

impl CounterService {
    /// Starts the service on `url` with its store in `dir`, and waits until
    /// it says it serves.
    fn start(url: &str, dir: &Path) -> anyhow::Result<CounterService> {
        let mut child = Command::new(counter_service_bin()?)
            .arg(url)
            .arg(dir)
            .env("BERTH_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut service = CounterService(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let status = service.0.try_wait()?;
            bail!("counter service did not start ({status:?}): {line:?}");
        }
        Ok(service)
    }

    /// SIGKILL, and wait for the process to be gone.
    fn kill(&mut self) -> anyhow::Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }
}

impl Drop for CounterService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A retry with the same request id answers the first outcome after a
/// client timeout and after a SIGKILL and restart; the counter moved once,
/// and the same id with another body is `InvalidArgument`.
#[tokio::test]
async fn retries_answer_the_first_outcome_across_a_kill() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let store = tempfile::tempdir()?;
    let mut service = CounterService::start(&server.url(), store.path())?;
    let nats = berth_bus::connect(&server.url(), "idempotency-test").await?;
    let client = Client::new(nats, Duration::from_secs(10));
    let add = subject::op("default", "metadata", "counter.add")?;
    let get = subject::op("default", "metadata", "counter.get")?;

    // The first attempt commits, then replies too late for the caller.
    let request_id = new_request_id();
    let request = AddRequest {
        amount: 5,
        delay_ms: 3_000,
    };
    let impatient = client.with_timeout(Duration::from_millis(300));
    let err = impatient
        .call_mut::<_, CounterReply>(&add, &request, &request_id)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");

    // The retry answers the first outcome, without the delay of a new add.
    let started = Instant::now();
    let reply: CounterReply = client.call_mut(&add, &request, &request_id).await?;
    assert_eq!(reply.value, 5);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // After SIGKILL and a restart on the same store, the same again.
    service.kill()?;
    let _service = CounterService::start(&server.url(), store.path())?;
    let reply: CounterReply = client.call_mut(&add, &request, &request_id).await?;
    assert_eq!(reply.value, 5);

    // The effect happened once.
    let value: CounterReply = client.call(&get, &GetRequest {}).await?;
    assert_eq!(value.value, 5);

    // The same id with another body is refused and changes nothing.
    let other = AddRequest {
        amount: 7,
        delay_ms: 0,
    };
    let err = client
        .call_mut::<_, CounterReply>(&add, &other, &request_id)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::InvalidArgument, "{err}");

    // A new id is a new request: the counter does move.
    let reply: CounterReply = client.call_mut(&add, &other, &new_request_id()).await?;
    assert_eq!(reply.value, 12);
    Ok(())
}

/// A request killed between its commit and its reply is not lost either:
/// the retry after the restart answers what was committed.
#[tokio::test]
async fn a_kill_between_commit_and_reply_keeps_the_outcome() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let store = tempfile::tempdir()?;
    let mut service = CounterService::start(&server.url(), store.path())?;
    let nats = berth_bus::connect(&server.url(), "idempotency-test").await?;
    let client = Client::new(nats, Duration::from_secs(10));
    let add = subject::op("default", "metadata", "counter.add")?;
    let get = subject::op("default", "metadata", "counter.get")?;

    let request_id = new_request_id();
    let request = AddRequest {
        amount: 3,
        delay_ms: 60_000,
    };
    let pending = tokio::spawn({
        let client = client.clone();
        let add = add.clone();
        let request = request.clone();
        let request_id = request_id.clone();
        async move {
            client
                .call_mut::<_, CounterReply>(&add, &request, &request_id)
                .await
        }
    });

    // Wait until the add committed (the counter shows it), then kill.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value: CounterReply = client.call(&get, &GetRequest {}).await?;
        if value.value == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the add never committed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.kill()?;
    pending.abort();

    let _service = CounterService::start(&server.url(), store.path())?;
    let reply: CounterReply = client.call_mut(&add, &request, &request_id).await?;
    assert_eq!(reply.value, 3);
    let value: CounterReply = client.call(&get, &GetRequest {}).await?;
    assert_eq!(value.value, 3);
    Ok(())
}
