//! The records' layout in one LMDB environment, and its migrations.
//!
//! ```text
//! ROOT/db/  LMDB, schema version 3:
//!   namespaces    "<namespace>"                  -> metadata.Namespace (protobuf)
//!   written       "<namespace>"                  -> empty: every namespace a change
//!                                                   was ever written to (gc's list)
//!   images        "<namespace>\0<name>"          -> metadata.Image
//!   containers    "<namespace>\0<container_id>"  -> metadata.Container
//!   tasks         "<namespace>\0<container_id>"  -> metadata.Task (the reservation)
//!   leases        "<namespace>\0<lease_id>"      -> metadata.Lease
//!   lease_expiry  u64 BE expiry (unix ns) ++ "<namespace>\0<lease_id>" -> empty
//!   nodes         "<node>"                       -> metadata.Node (no namespace:
//!                                                   the cluster's registry)
//!   tombstones    "<namespace>\0<container_id>\0<node>" -> metadata.Tombstone
//!   meta          "schema" -> u32 BE, "epoch" -> u64 BE,
//!                 "cursor" -> events::Cursor (16 bytes: stream identity, sequence)
//!   outbox, outbox_meta, requests                 (berth-bus)
//! ```
//!
//! Names and ids are subject tokens or checked strings that never hold a
//! control character, so `"<namespace>\0"` is the exact prefix of one
//! namespace: namespace `a` can never read the records of `a\0…` or `ab`.
//! Every key fits LMDB's 511 bytes: a namespace is at most 128 bytes and an
//! id at most [`MAX_ID_BYTES`].
//!
//! Migrations (each runs once, in the transaction that sets the version):
//!
//! - 1 -> 2: `namespaces` held empty values (every namespace written to);
//!   now those names move to `written` and `namespaces` holds a record per
//!   namespace, made for each name found. The `lease_expiry` index is built
//!   from the leases.
//! - 2 -> 3: the node registry (`nodes`) and the tombstones left for lost
//!   nodes (`tombstones`) are new tables; nothing older is rewritten.

use std::marker::PhantomData;
use std::path::Path;

use heed::types::{Bytes as RawBytes, Str};
use heed::{Database, RoTxn, RwTxn};
use prost::Message;

use berth_bus::events::{Cursor, Outbox};
use berth_bus::idempotency::RequestLog;
use berth_bus::store::Env;
use berth_proto::metadata::{Lease, Namespace, Node, NodeState};
use berth_proto::Timestamp;

use crate::error::{Kind, MetadataError, Result};

/// The layout version this code reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

/// The longest id (an image name) that still fits LMDB's key beside a
/// namespace of 128 bytes and the separator.
pub const MAX_ID_BYTES: usize = 511 - berth_bus::subject::MAX_TOKEN_LEN - 1;

/// One migration: rewrites the previous layout in the opening transaction.
type Migration = fn(&Schema, &mut RwTxn) -> Result<()>;

/// The migrations, by the version each one produces.
const MIGRATIONS: &[(u32, Migration)] = &[(2, migrate_to_v2), (3, migrate_to_v3)];

/// One kind of record: a table keyed by namespace and id, holding the
/// record's protobuf encoding.
pub struct Table<M> {
    db: Database<Str, RawBytes>,
    kind: Kind,
    _record: PhantomData<fn() -> M>,
}

impl<M> Clone for Table<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for Table<M> {}

impl<M: Message + Default> Table<M> {
    fn new(db: Database<Str, RawBytes>, kind: Kind) -> Self {
        Table {
            db,
            kind,
            _record: PhantomData,
        }
    }

    /// The record, if any.
    pub fn get(&self, txn: &RoTxn, namespace: &str, id: &str) -> Result<Option<M>> {
        let key = key(namespace, id);
        match self.db.get(txn, &key)? {
            Some(raw) => Ok(Some(self.decode(&key, raw)?)),
            None => Ok(None),
        }
    }

    /// The record, or `NotFound` naming it.
    pub fn require(&self, txn: &RoTxn, namespace: &str, id: &str) -> Result<M> {
        self.get(txn, namespace, id)?
            .ok_or_else(|| MetadataError::not_found(self.kind, id))
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
        let mut out = Vec::new();
        for item in self.db.prefix_iter(txn, &prefix(namespace))? {
            let (key, raw) = item?;
            out.push(self.decode(key, raw)?);
        }
        Ok(out)
    }

    /// True when the namespace holds a record of this kind.
    pub fn any_in(&self, txn: &RoTxn, namespace: &str) -> Result<bool> {
        Ok(self
            .db
            .prefix_iter(txn, &prefix(namespace))?
            .next()
            .transpose()?
            .is_some())
    }

    /// Every record of every namespace, with its namespace, in key order.
    pub fn all(&self, txn: &RoTxn) -> Result<Vec<(String, M)>> {
        let mut out = Vec::new();
        for item in self.db.iter(txn)? {
            let (key, raw) = item?;
            let namespace = key.split('\0').next().unwrap_or_default();
            out.push((namespace.to_string(), self.decode(key, raw)?));
        }
        Ok(out)
    }

    fn decode(&self, key: &str, raw: &[u8]) -> Result<M> {
        M::decode(raw).map_err(|source| MetadataError::Corrupt {
            kind: self.kind.as_str(),
            key: key.replace('\0', "/"),
            source,
        })
    }
}

/// The key of a record: namespace, NUL, id.
pub fn key(namespace: &str, id: &str) -> String {
    format!("{namespace}\0{id}")
}

/// The prefix of every key of one namespace.
fn prefix(namespace: &str) -> String {
    format!("{namespace}\0")
}

/// The key of a lease in the expiry index: its expiry first, so the index
/// iterates soonest first.
pub fn expiry_key(expires_nanos: u64, namespace: &str, lease_id: &str) -> Vec<u8> {
    let mut out = expires_nanos.to_be_bytes().to_vec();
    out.extend_from_slice(key(namespace, lease_id).as_bytes());
    out
}

/// Splits an expiry index key into its expiry, namespace and lease id.
pub fn parse_expiry_key(raw: &[u8]) -> Option<(u64, String, String)> {
    let (when, rest) = raw.split_first_chunk::<8>()?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (namespace, lease_id) = rest.split_once('\0')?;
    Some((
        u64::from_be_bytes(*when),
        namespace.to_string(),
        lease_id.to_string(),
    ))
}

/// A lease's expiry in the index's unit; `None` for a lease that never ends.
pub fn lease_expiry(lease: &Lease) -> Option<u64> {
    lease
        .expires_at
        .as_ref()
        .filter(|t| t.unix_nanos > 0)
        .map(|t| t.unix_nanos as u64)
}

/// Every table of the metadata database.
#[derive(Clone)]
pub struct Schema {
    /// The environment.
    pub env: Env,
    /// Namespace records.
    pub namespaces: Database<Str, RawBytes>,
    /// Every namespace ever written to.
    pub written: Database<Str, RawBytes>,
    /// Named images.
    pub images: Table<berth_proto::metadata::Image>,
    /// Containers.
    pub containers: Table<berth_proto::metadata::Container>,
    /// Task reservations and their last known state.
    pub tasks: Table<berth_proto::metadata::Task>,
    /// Leases.
    pub leases: Table<Lease>,
    /// Leases by expiry.
    pub lease_expiry: Database<RawBytes, RawBytes>,
    /// The node registry, by node id (`metadata.Node`).
    pub nodes: Database<Str, RawBytes>,
    /// Tasks a lost node must delete when it returns, keyed by namespace
    /// and `<container_id>\0<node>` ([`tombstone_id`]).
    pub tombstones: Table<berth_proto::metadata::Tombstone>,
    /// Schema version, gc epoch, consumer cursor.
    pub meta: Database<Str, RawBytes>,
    /// Events waiting to be published.
    pub outbox: Outbox,
    /// Outcomes of mutating requests.
    pub requests: RequestLog,
}

impl Schema {
    /// Opens the database in `dir`, creating it, and brings an older layout
    /// up to [`SCHEMA_VERSION`]. `Internal` for a newer layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let env = berth_bus::store::open_env(dir, 10)?;
        // The bus's tables open in transactions of their own.
        let outbox = Outbox::open(&env, "metadata", "")?;
        let requests = RequestLog::open(&env)?;
        let mut txn = env.write_txn()?;
        let schema = Schema {
            namespaces: env.create_database(&mut txn, Some("namespaces"))?,
            written: env.create_database(&mut txn, Some("written"))?,
            images: Table::new(env.create_database(&mut txn, Some("images"))?, Kind::Image),
            containers: Table::new(
                env.create_database(&mut txn, Some("containers"))?,
                Kind::Container,
            ),
            tasks: Table::new(env.create_database(&mut txn, Some("tasks"))?, Kind::Task),
            leases: Table::new(env.create_database(&mut txn, Some("leases"))?, Kind::Lease),
            lease_expiry: env.create_database(&mut txn, Some("lease_expiry"))?,
            nodes: env.create_database(&mut txn, Some("nodes"))?,
            tombstones: Table::new(
                env.create_database(&mut txn, Some("tombstones"))?,
                Kind::Tombstone,
            ),
            meta: env.create_database(&mut txn, Some("meta"))?,
            outbox,
            requests,
            env: env.clone(),
        };
        schema.migrate(&mut txn)?;
        txn.commit()?;
        Ok(schema)
    }

    /// Runs the migrations past the stored version, and stores the new one.
    fn migrate(&self, txn: &mut RwTxn) -> Result<()> {
        let found = match self.meta.get(txn, "schema")? {
            Some(raw) => u32::from_be_bytes(
                raw.try_into()
                    .map_err(|_| MetadataError::Meta { key: "schema" })?,
            ),
            // A new database is at the current version from the start.
            None => SCHEMA_VERSION,
        };
        if found > SCHEMA_VERSION {
            return Err(MetadataError::SchemaVersion {
                found,
                expected: SCHEMA_VERSION,
            });
        }
        for (version, migration) in MIGRATIONS {
            if *version > found {
                migration(self, txn)?;
                tracing::info!(version, "metadata database migrated");
            }
        }
        self.meta
            .put(txn, "schema", &SCHEMA_VERSION.to_be_bytes())?;
        Ok(())
    }

    /// The stored version (for tests and tools).
    pub fn version(&self, txn: &RoTxn) -> Result<Option<u32>> {
        Ok(self
            .meta
            .get(txn, "schema")?
            .and_then(|raw| raw.try_into().ok())
            .map(u32::from_be_bytes))
    }

    /// The namespace record, if any.
    pub fn namespace(&self, txn: &RoTxn, name: &str) -> Result<Option<Namespace>> {
        match self.namespaces.get(txn, name)? {
            Some(raw) => Ok(Some(Namespace::decode(raw).map_err(|source| {
                MetadataError::Corrupt {
                    kind: "namespace",
                    key: name.to_string(),
                    source,
                }
            })?)),
            None => Ok(None),
        }
    }

    /// Writes the namespace record.
    pub fn put_namespace(&self, txn: &mut RwTxn, namespace: &Namespace) -> Result<()> {
        self.namespaces
            .put(txn, &namespace.name, &namespace.encode_to_vec())?;
        Ok(())
    }

    /// Every namespace record, in name order.
    pub fn all_namespaces(&self, txn: &RoTxn) -> Result<Vec<Namespace>> {
        let mut out = Vec::new();
        for item in self.namespaces.iter(txn)? {
            let (name, raw) = item?;
            out.push(
                Namespace::decode(raw).map_err(|source| MetadataError::Corrupt {
                    kind: "namespace",
                    key: name.to_string(),
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Every namespace a change was ever written to, in name order.
    pub fn written_namespaces(&self, txn: &RoTxn) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.written.iter(txn)? {
            out.push(item?.0.to_string());
        }
        Ok(out)
    }

    /// Notes that a change was written to `namespace`.
    pub fn mark_written(&self, txn: &mut RwTxn, namespace: &str) -> Result<()> {
        if self.written.get(txn, namespace)?.is_none() {
            self.written.put(txn, namespace, &[])?;
        }
        Ok(())
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

    /// A new gc epoch: the current time, and always above the last one.
    pub fn next_epoch(&self, txn: &mut RwTxn) -> Result<u64> {
        let last = match self.meta.get(txn, "epoch")? {
            Some(raw) => raw.try_into().map(u64::from_be_bytes).unwrap_or(0),
            None => 0,
        };
        let now = Timestamp::now().unix_nanos.max(0) as u64;
        let epoch = now.max(last + 1);
        self.meta.put(txn, "epoch", &epoch.to_be_bytes())?;
        Ok(epoch)
    }

    /// Adds a lease to the expiry index (a lease that never ends is not in it).
    pub fn index_expiry(&self, txn: &mut RwTxn, namespace: &str, lease: &Lease) -> Result<()> {
        if let Some(when) = lease_expiry(lease) {
            let key = expiry_key(when, namespace, &lease.lease_id);
            self.lease_expiry.put(txn, &key, &[])?;
        }
        Ok(())
    }

    /// The registry's record of a node, if it was ever heard from.
    pub fn node(&self, txn: &RoTxn, node: &str) -> Result<Option<Node>> {
        match self.nodes.get(txn, node)? {
            Some(raw) => Ok(Some(Node::decode(raw).map_err(|source| {
                MetadataError::Corrupt {
                    kind: "node",
                    key: node.to_string(),
                    source,
                }
            })?)),
            None => Ok(None),
        }
    }

    /// Writes a node's record.
    pub fn put_node(&self, txn: &mut RwTxn, record: &Node) -> Result<()> {
        self.nodes.put(txn, &record.node, &record.encode_to_vec())?;
        Ok(())
    }

    /// Every node's record, by id.
    pub fn all_nodes(&self, txn: &RoTxn) -> Result<Vec<Node>> {
        let mut out = Vec::new();
        for item in self.nodes.iter(txn)? {
            let (node, raw) = item?;
            out.push(Node::decode(raw).map_err(|source| MetadataError::Corrupt {
                kind: "node",
                key: node.to_string(),
                source,
            })?);
        }
        Ok(out)
    }

    /// True when the registry holds `node` as lost.
    pub fn node_lost(&self, txn: &RoTxn, node: &str) -> Result<bool> {
        Ok(self
            .node(txn, node)?
            .is_some_and(|record| record.state == NodeState::Lost as i32))
    }

    /// Removes a lease from the expiry index.
    pub fn unindex_expiry(&self, txn: &mut RwTxn, namespace: &str, lease: &Lease) -> Result<()> {
        if let Some(when) = lease_expiry(lease) {
            let key = expiry_key(when, namespace, &lease.lease_id);
            self.lease_expiry.delete(txn, &key)?;
        }
        Ok(())
    }
}

/// The id of a tombstone in its table: the container, then the node, so a
/// container id reused on another node and lost there too keeps both.
pub fn tombstone_id(container_id: &str, node: &str) -> String {
    format!("{container_id}\0{node}")
}

/// 2 -> 3: the node registry and the tombstones start empty; their tables
/// are made when the schema opens.
fn migrate_to_v3(_schema: &Schema, _txn: &mut RwTxn) -> Result<()> {
    Ok(())
}

/// 1 -> 2: namespace names move to `written`, each gets a record, and the
/// lease expiry index is built.
fn migrate_to_v2(schema: &Schema, txn: &mut RwTxn) -> Result<()> {
    // Version 1 kept `name -> empty` in `namespaces`.
    let mut names = Vec::new();
    for item in schema.namespaces.iter(txn)? {
        let (name, raw) = item?;
        if raw.is_empty() {
            names.push(name.to_string());
        }
    }
    let now = Timestamp::now();
    for name in names {
        schema.written.put(txn, &name, &[])?;
        let record = Namespace {
            name: name.clone(),
            created_at: Some(now),
            updated_at: Some(now),
            generation: 1,
            ..Default::default()
        };
        schema.put_namespace(txn, &record)?;
    }

    for (namespace, lease) in schema.leases.all(txn)? {
        schema.index_expiry(txn, &namespace, &lease)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::metadata::Image;

    /// A version 1 database, written the way the version 1 code laid it out.
    fn write_v1(dir: &Path) {
        let env = berth_bus::store::open_env(dir, 8).unwrap();
        let mut txn = env.write_txn().unwrap();
        let meta: Database<Str, RawBytes> = env.create_database(&mut txn, Some("meta")).unwrap();
        meta.put(&mut txn, "schema", &1u32.to_be_bytes()).unwrap();
        let namespaces: Database<Str, RawBytes> =
            env.create_database(&mut txn, Some("namespaces")).unwrap();
        namespaces.put(&mut txn, "a", &[]).unwrap();
        namespaces.put(&mut txn, "gone", &[]).unwrap();
        let leases: Database<Str, RawBytes> =
            env.create_database(&mut txn, Some("leases")).unwrap();
        let lease = Lease {
            lease_id: "l1".into(),
            expires_at: Some(Timestamp { unix_nanos: 42 }),
            ..Default::default()
        };
        leases
            .put(&mut txn, "a\0l1", &lease.encode_to_vec())
            .unwrap();
        let forever = Lease {
            lease_id: "l2".into(),
            ..Default::default()
        };
        leases
            .put(&mut txn, "a\0l2", &forever.encode_to_vec())
            .unwrap();
        let images: Database<Str, RawBytes> =
            env.create_database(&mut txn, Some("images")).unwrap();
        let image = Image {
            name: "x".into(),
            ..Default::default()
        };
        images
            .put(&mut txn, "a\0x", &image.encode_to_vec())
            .unwrap();
        txn.commit().unwrap();
        env.prepare_for_closing().wait();
    }

    #[test]
    fn migrates_version_1_to_2() {
        let dir = tempfile::tempdir().unwrap();
        write_v1(dir.path());

        let schema = Schema::open(dir.path()).unwrap();
        let txn = schema.env.read_txn().unwrap();
        assert_eq!(schema.version(&txn).unwrap(), Some(SCHEMA_VERSION));
        assert_eq!(schema.written_namespaces(&txn).unwrap(), ["a", "gone"]);
        let records = schema.all_namespaces(&txn).unwrap();
        let names: Vec<_> = records.iter().map(|ns| ns.name.as_str()).collect();
        assert_eq!(names, ["a", "gone"]);
        assert!(records.iter().all(|ns| ns.generation == 1));

        // Only the lease that ends is in the index, under its expiry.
        let index: Vec<_> = schema
            .lease_expiry
            .iter(&txn)
            .unwrap()
            .map(|item| parse_expiry_key(item.unwrap().0).unwrap())
            .collect();
        assert_eq!(index, [(42, "a".to_string(), "l1".to_string())]);

        // The records themselves are untouched.
        assert_eq!(schema.images.require(&txn, "a", "x").unwrap().name, "x");
        drop(txn);
        let env = schema.env.clone();
        drop(schema);
        env.prepare_for_closing().wait();

        // Opening again runs nothing twice.
        let schema = Schema::open(dir.path()).unwrap();
        let txn = schema.env.read_txn().unwrap();
        assert_eq!(schema.all_namespaces(&txn).unwrap().len(), 2);
    }

    #[test]
    fn migrates_version_2_to_3() {
        let dir = tempfile::tempdir().unwrap();
        write_v1(dir.path());
        {
            // A version 2 database: the first migration's layout, stamped 2.
            let schema = Schema::open(dir.path()).unwrap();
            let mut txn = schema.env.write_txn().unwrap();
            schema
                .meta
                .put(&mut txn, "schema", &2u32.to_be_bytes())
                .unwrap();
            txn.commit().unwrap();
            let env = schema.env.clone();
            drop(schema);
            env.prepare_for_closing().wait();
        }

        let schema = Schema::open(dir.path()).unwrap();
        let txn = schema.env.read_txn().unwrap();
        assert_eq!(schema.version(&txn).unwrap(), Some(3));
        assert!(schema.all_nodes(&txn).unwrap().is_empty());
        assert!(schema.tombstones.list(&txn, "a").unwrap().is_empty());
        assert_eq!(schema.images.require(&txn, "a", "x").unwrap().name, "x");
        assert_eq!(schema.written_namespaces(&txn).unwrap(), ["a", "gone"]);
    }

    #[test]
    fn refuses_a_newer_layout() {
        let dir = tempfile::tempdir().unwrap();
        {
            let schema = Schema::open(dir.path()).unwrap();
            let mut txn = schema.env.write_txn().unwrap();
            schema
                .meta
                .put(&mut txn, "schema", &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            txn.commit().unwrap();
            let env = schema.env.clone();
            drop(schema);
            env.prepare_for_closing().wait();
        }
        let err = Schema::open(dir.path()).err().unwrap();
        assert!(matches!(err, MetadataError::SchemaVersion { .. }), "{err}");
    }

    #[test]
    fn a_namespace_prefix_matches_that_namespace_only() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Schema::open(dir.path()).unwrap();
        let mut txn = schema.env.write_txn().unwrap();
        for (namespace, name) in [("a", "one"), ("ab", "two"), ("b", "three"), ("a", "z\0x")] {
            let image = Image {
                name: name.into(),
                ..Default::default()
            };
            schema
                .images
                .put(&mut txn, namespace, name, &image)
                .unwrap();
        }
        let names = |ns: &str| -> Vec<String> {
            schema
                .images
                .list(&txn, ns)
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .collect()
        };
        assert_eq!(names("a"), ["one", "z\0x"]);
        assert_eq!(names("ab"), ["two"]);
        assert!(names("").is_empty());
        assert!(!schema.images.any_in(&txn, "c").unwrap());
        assert!(schema.images.get(&txn, "ab", "one").unwrap().is_none());
    }

    #[test]
    fn expiry_keys_order_by_time_and_round_trip() {
        let early = expiry_key(5, "ns", "l");
        let late = expiry_key(256, "a", "l");
        assert!(early < late);
        assert_eq!(
            parse_expiry_key(&late),
            Some((256, "a".to_string(), "l".to_string()))
        );
        assert_eq!(parse_expiry_key(b"short"), None);
    }
}
