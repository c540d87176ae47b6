//! The store: the tables of [`crate::schema`], read from any task and
//! changed through the one [`Writer`].
//!
//! The records are the messages of `proto/berth/v1/metadata.proto`, stored
//! as they are encoded. This service decides on only a few of their fields
//! (ids, labels, generations, a task's state); a second set of domain types
//! would copy every other field twice and decide nothing more, so the wire
//! messages are the records, and the checks that make them legal live in the
//! handlers that change them.
//!
//! A mutating request is one change on the writer: the first outcome of a
//! retried request id is returned as it was, else the change runs and its
//! outcome is stored under the id, with the change and the events it queued
//! in the outbox, in one transaction.

use std::path::Path;

use heed::{RoTxn, RwTxn};
use prost::Message;

use berth_bus::Call;
use berth_proto::metadata::{Namespace, NamespaceEvent};
use berth_proto::Timestamp;

use crate::error::Result;
use crate::schema::Schema;
use crate::writer::Writer;

/// The metadata store.
#[derive(Clone)]
pub struct Store {
    schema: Schema,
    writer: Writer,
}

impl Store {
    /// Opens (creating, migrating) the database in `dir` and starts its writer.
    pub fn open(dir: &Path) -> Result<Self> {
        let schema = Schema::open(dir)?;
        let writer = Writer::start(schema.clone())?;
        Ok(Store { schema, writer })
    }

    /// The tables.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Runs `read` in a read transaction: a consistent view of every table
    /// as of the last commit. Reads never wait for the writer.
    pub fn read<R>(&self, read: impl FnOnce(&Schema, &RoTxn) -> Result<R>) -> Result<R> {
        let txn = self.schema.env.read_txn()?;
        read(&self.schema, &txn)
    }

    /// Runs `change` on the writer, without a request id (background work:
    /// applying events, expiring leases, taking a gc epoch).
    pub async fn write<R, F>(&self, change: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Schema, &mut RwTxn) -> Result<R> + Send + 'static,
    {
        self.writer.write(change).await
    }

    /// Queues `change` on the writer now and returns the future of its
    /// outcome; changes run in the order they were submitted.
    pub fn submit<R, F>(
        &self,
        change: F,
    ) -> impl std::future::Future<Output = Result<R>> + Send + 'static
    where
        R: Send + 'static,
        F: FnOnce(&Schema, &mut RwTxn) -> Result<R> + Send + 'static,
    {
        self.writer.submit(change)
    }

    /// Runs one mutating request: returns the first outcome of a retried
    /// request id (`InvalidArgument` when the id came with another body),
    /// else applies `change` and stores its outcome under the id, with the
    /// change and its events, in one transaction. A failed change writes
    /// nothing, so its retry runs again.
    pub async fn mutate<Rep, F>(&self, call: &Call, change: F) -> Result<Rep>
    where
        Rep: Message + Default + Send + 'static,
        F: FnOnce(&Schema, &mut RwTxn) -> Result<Rep> + Send + 'static,
    {
        let call = call.clone();
        self.writer
            .write(move |schema, txn| {
                if let Some(reply) = schema.requests.replay(txn, &call)? {
                    return Ok(reply);
                }
                let reply = change(schema, txn)?;
                schema.mark_written(txn, call.namespace())?;
                schema.requests.record(txn, &call, &reply)?;
                Ok(reply)
            })
            .await
    }
}

/// Makes the namespace's record when it has none (the first object created
/// in a namespace creates it), and queues `namespaces.create`.
pub fn ensure_namespace(schema: &Schema, txn: &mut RwTxn, name: &str) -> Result<()> {
    if schema.namespace(txn, name)?.is_some() {
        return Ok(());
    }
    let now = Timestamp::now();
    let record = Namespace {
        name: name.to_string(),
        created_at: Some(now),
        updated_at: Some(now),
        generation: 1,
        ..Default::default()
    };
    schema.put_namespace(txn, &record)?;
    let event = NamespaceEvent {
        name: name.to_string(),
    };
    schema
        .outbox
        .push(txn, name, crate::events::NAMESPACES_CREATE, 1, &event)?;
    Ok(())
}
