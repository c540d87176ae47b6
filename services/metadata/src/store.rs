//! The records, in one LMDB environment.
//!
//! ```text
//! ROOT/db/  LMDB, schema version 1:
//!   images      "<namespace>\0<name>"          -> metadata.Image (protobuf)
//!   containers  "<namespace>\0<container_id>"  -> metadata.Container
//!   tasks       "<namespace>\0<container_id>"  -> metadata.Task (the reservation)
//!   leases      "<namespace>\0<lease_id>"      -> metadata.Lease
//!   namespaces  "<namespace>"                  -> empty (every namespace ever written to)
//!   meta        "schema" -> u32, "epoch" -> u64, "cursor" -> events::Cursor (16 bytes)
//!   outbox, outbox_meta, requests              (berth-bus)
//! ```
//!
//! Every change and its event go into one write transaction; the task events
//! this service consumes are applied in the transaction that also stores the
//! stream cursor, so a crash never applies one twice or skips one.

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use prost::Message;

use berth_bus::events::{Cursor, Outbox};
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;
use berth_bus::{Error, Result};

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// One kind of record: a table keyed by namespace and id.
#[derive(Clone, Copy)]
pub struct Table<M> {
    db: Database<Str, RawBytes>,
    kind: &'static str,
    _record: std::marker::PhantomData<M>,
}

impl<M: Message + Default> Table<M> {
    fn new(db: Database<Str, RawBytes>, kind: &'static str) -> Self {
        Table {
            db,
            kind,
            _record: std::marker::PhantomData,
        }
    }

    /// The record, if any.
    pub fn get(&self, txn: &RoTxn, namespace: &str, id: &str) -> Result<Option<M>> {
        match self.db.get(txn, &key(namespace, id))? {
            Some(raw) => Ok(Some(M::decode(raw).map_err(|err| {
                Error::internal(format!("stored {} {id:?}: {err}", self.kind))
            })?)),
            None => Ok(None),
        }
    }

    /// The record, or `NotFound` naming it.
    pub fn require(&self, txn: &RoTxn, namespace: &str, id: &str) -> Result<M> {
        self.get(txn, namespace, id)?
            .ok_or_else(|| Error::not_found(format!("no such {}: {id}", self.kind)))
    }

    /// Writes the record.
    pub fn put(&self, txn: &mut RwTxn, namespace: &str, id: &str, record: &M) -> Result<()> {
        self.db
            .put(txn, &key(namespace, id), &record.encode_to_vec())?;
        Ok(())
    }

    /// Removes the record; false when there was none.
    pub fn delete(&self, txn: &mut RwTxn, namespace: &str, id: &str) -> Result<bool> {
        Ok(self.db.delete(txn, &key(namespace, id))?)
    }

    /// Every record of a namespace, in id order.
    pub fn list(&self, txn: &RoTxn, namespace: &str) -> Result<Vec<M>> {
        let prefix = format!("{namespace}\0");
        let mut out = Vec::new();
        for item in self.db.prefix_iter(txn, &prefix)? {
            let (_, raw) = item?;
            out.push(
                M::decode(raw)
                    .map_err(|err| Error::internal(format!("stored {}: {err}", self.kind)))?,
            );
        }
        Ok(out)
    }

    /// Every namespace that holds a record of this kind.
    pub fn namespaces(&self, txn: &RoTxn) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        for item in self.db.iter(txn)? {
            let (key, _) = item?;
            let namespace = key.split('\0').next().unwrap_or_default();
            if out.last().map(String::as_str) != Some(namespace) {
                out.push(namespace.to_string());
            }
        }
        Ok(out)
    }
}

fn key(namespace: &str, id: &str) -> String {
    format!("{namespace}\0{id}")
}

/// The metadata store.
pub struct Store {
    /// The environment.
    pub env: Env,
    /// Named images.
    pub images: Table<berth_proto::metadata::Image>,
    /// Containers.
    pub containers: Table<berth_proto::metadata::Container>,
    /// Task reservations and their last known state.
    pub tasks: Table<berth_proto::metadata::Task>,
    /// Leases.
    pub leases: Table<berth_proto::metadata::Lease>,
    meta: Database<Str, RawBytes>,
    namespaces: Database<Str, RawBytes>,
    /// Events waiting to be published.
    pub outbox: Outbox,
    /// Outcomes of mutating requests.
    pub requests: RequestLog,
}

impl Store {
    /// Opens the store in `dir`, creating it, and checks its schema version.
    pub fn open(dir: &std::path::Path) -> Result<Self> {
        let env = berth_bus::store::open_env(dir, 8)?;
        let mut txn = env.write_txn()?;
        let mut table = |name: &str, kind: &'static str| -> Result<_> {
            Ok((
                env.create_database::<Str, RawBytes>(&mut txn, Some(name))?,
                kind,
            ))
        };
        let (images, _) = table("images", "image")?;
        let (containers, _) = table("containers", "container")?;
        let (tasks, _) = table("tasks", "task")?;
        let (leases, _) = table("leases", "lease")?;
        let (meta, _) = table("meta", "meta")?;
        let (namespaces, _) = table("namespaces", "namespace")?;
        match meta.get(&txn, "schema")? {
            None => meta.put(&mut txn, "schema", &SCHEMA_VERSION.to_be_bytes())?,
            Some(raw) if raw == SCHEMA_VERSION.to_be_bytes() => {}
            Some(raw) => {
                return Err(Error::internal(format!(
                    "metadata store schema {raw:?} is not version {SCHEMA_VERSION}"
                )))
            }
        }
        txn.commit()?;
        let outbox = Outbox::open(&env, "metadata", "")?;
        let requests = RequestLog::open(&env)?;
        Ok(Store {
            images: Table::new(images, "image"),
            containers: Table::new(containers, "container"),
            tasks: Table::new(tasks, "task"),
            leases: Table::new(leases, "lease"),
            meta,
            namespaces,
            outbox,
            requests,
            env,
        })
    }

    /// The stored cursor of the task-event consumer.
    pub fn cursor(&self, txn: &RoTxn) -> Result<Cursor> {
        Ok(self
            .meta
            .get(txn, "cursor")?
            .map(Cursor::from_bytes)
            .unwrap_or_default())
    }

    /// Stores the consumer's cursor (in the transaction of the change it caused).
    pub fn set_cursor(&self, txn: &mut RwTxn, cursor: Cursor) -> Result<()> {
        self.meta.put(txn, "cursor", &cursor.to_bytes())?;
        Ok(())
    }

    /// Every namespace that was ever written to, in name order.
    pub fn all_namespaces(&self, txn: &RoTxn) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.namespaces.iter(txn)? {
            out.push(item?.0.to_string());
        }
        Ok(out)
    }

    /// A new gc epoch: the current time, and always above the last one.
    pub fn next_epoch(&self, txn: &mut RwTxn) -> Result<u64> {
        let last = match self.meta.get(txn, "epoch")? {
            Some(raw) if raw.len() == 8 => u64::from_be_bytes(raw.try_into().unwrap_or_default()),
            _ => 0,
        };
        let now = berth_proto::Timestamp::now().unix_nanos.max(0) as u64;
        let epoch = now.max(last + 1);
        self.meta.put(txn, "epoch", &epoch.to_be_bytes())?;
        Ok(epoch)
    }
}

impl Store {
    /// Runs one mutating request in one write transaction: returns the first
    /// outcome of a retried request id, else applies `change` and stores its
    /// outcome under the id, with the change and its events.
    pub fn mutate<Rep, F>(&self, call: &berth_bus::Call, change: F) -> Result<Rep>
    where
        Rep: Message + Default,
        F: FnOnce(&mut RwTxn) -> Result<Rep>,
    {
        let mut txn = self.env.write_txn()?;
        if let Some(reply) = self.requests.replay(&txn, call)? {
            return Ok(reply);
        }
        let reply = change(&mut txn)?;
        self.namespaces.put(&mut txn, call.namespace(), &[])?;
        self.requests.record(&mut txn, call, &reply)?;
        txn.commit()?;
        Ok(reply)
    }
}
