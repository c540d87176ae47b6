//! A counter kept in LMDB behind the bus, for the request-id tests.
//!
//! `counter_service NATS_URL DB_DIR` serves `berth.v1.*.metadata.counter.add`
//! (mutating: adds `amount`, answers the new value) and
//! `berth.v1.*.metadata.counter.get`, then prints `ready` on stdout. An add
//! stores its outcome under its request id in the transaction that changes
//! the counter, so a retry answers the first outcome. An add that asks for
//! `delay_ms` waits that long after its commit before it replies, which lets
//! a test time out on a request whose effect happened, or kill the process
//! between the commit and the reply.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use heed::types::{Str, U64};
use heed::Database;

use berth_bus::idempotency::RequestLog;
use berth_bus::store::{open_env, Env};
use berth_bus::{Call, Error, Result, Service};

/// `counter.add`: add `amount`; wait `delay_ms` after the commit.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddRequest {
    /// What to add.
    #[prost(uint64, tag = "1")]
    pub amount: u64,
    /// How long to wait between the commit and the reply.
    #[prost(uint64, tag = "2")]
    pub delay_ms: u64,
}

/// The counter's value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CounterReply {
    /// The value after the request.
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

/// `counter.get` takes nothing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetRequest {}

struct Counter {
    env: Env,
    values: Database<Str, U64<heed::byteorder::BigEndian>>,
    requests: RequestLog,
}

impl Counter {
    /// Adds in one write transaction with the request's outcome; a retry
    /// answers the stored outcome and reports that it was one.
    fn add(&self, call: &Call, amount: u64) -> Result<(CounterReply, bool)> {
        let mut txn = self.env.write_txn()?;
        if let Some(first) = self.requests.replay::<CounterReply>(&txn, call)? {
            return Ok((first, true));
        }
        let value = self.values.get(&txn, call.namespace())?.unwrap_or(0) + amount;
        self.values.put(&mut txn, call.namespace(), &value)?;
        let reply = CounterReply { value };
        self.requests.record(&mut txn, call, &reply)?;
        txn.commit()?;
        Ok((reply, false))
    }

    fn get(&self, namespace: &str) -> Result<CounterReply> {
        let txn = self.env.read_txn()?;
        let value = self.values.get(&txn, namespace)?.unwrap_or(0);
        Ok(CounterReply { value })
    }
}

async fn add(counter: Arc<Counter>, call: Call, request: AddRequest) -> Result<CounterReply> {
    // LMDB transactions block: keep them off the async workers.
    let amount = request.amount;
    let (reply, replayed) = tokio::task::spawn_blocking({
        let counter = counter.clone();
        move || counter.add(&call, amount)
    })
    .await
    .map_err(|err| Error::internal(format!("counter writer: {err}")))??;
    if !replayed {
        tokio::time::sleep(Duration::from_millis(request.delay_ms)).await;
    }
    Ok(reply)
}

async fn get(counter: Arc<Counter>, call: Call, _: GetRequest) -> Result<CounterReply> {
    counter.get(call.namespace())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .context("usage: counter_service NATS_URL DB_DIR")?;
    let dir = PathBuf::from(
        args.next()
            .context("usage: counter_service NATS_URL DB_DIR")?,
    );

    let env = open_env(&dir, 2)?;
    let mut txn = env.write_txn()?;
    let values = env.create_database(&mut txn, Some("counter"))?;
    txn.commit()?;
    let requests = RequestLog::open(&env)?;
    let counter = Arc::new(Counter {
        env,
        values,
        requests,
    });

    let nats = berth_bus::connect(&url, "counter-service").await?;
    let _serving = Service::new("metadata", env!("CARGO_PKG_VERSION"), counter)
        .op("counter.add", add)
        .op("counter.get", get)
        .serve(nats.clone())
        .await?;
    nats.flush().await?;
    println!("ready");

    // Serve until killed: the tests end this process with SIGKILL.
    std::future::pending::<()>().await;
    Ok(())
}
