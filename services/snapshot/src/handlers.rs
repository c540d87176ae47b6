//! One function per op of `berth.v1.<namespace>.snapshot.<node>.<op>`:
//! validate, act on the store, return the reply. `unpack` lives in
//! [`crate::unpack`].
//!
//! Mutating ops run in one write transaction that first looks up the
//! request id, so a retry returns the first outcome ([`mutate`]). Store work
//! runs on the blocking pool: LMDB writes wait for the one writer, and
//! directory walks and `syncfs` take as long as the disk does.

use std::path::PathBuf;
use std::sync::Arc;

use heed::RwTxn;

use berth_bus::Call;
use berth_proto::snapshot as pb;
use berth_proto::{Message, Mount, Timestamp};

use crate::convert;
use crate::error::SnapshotError;
use crate::overlay;
use crate::store::{check_key, check_labels, usage, Kind, Record, Store, EXTRACT_PREFIX};
use crate::SnapshotService;

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// Nanoseconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    Timestamp::now().unix_nanos
}

/// Runs blocking store work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(SnapshotError::Worker)?
}

/// Runs one mutating request in one write transaction: the first outcome of
/// a retried request id, or `change` stored under the id with its effect.
/// The flag is true when this call made the change.
pub(crate) fn mutate<Rep: Message + Default>(
    store: &Store,
    call: &Call,
    change: impl FnOnce(&mut RwTxn) -> Result<Rep>,
) -> Result<(Rep, bool)> {
    let log_err = |err| SnapshotError::Bus {
        what: "request log",
        source: err,
    };
    store.requests.mutate(&store.env, call, log_err, change)
}

/// Makes a snapshot on committed `parent` (empty for none): its directories
/// on the parent's lowers, then `write` commits its record and says whether
/// it did. When `write` fails or did not write, the directories go again.
pub(crate) fn create<R>(
    store: &Store,
    namespace: &str,
    parent: &str,
    write: impl FnOnce(u64, &[PathBuf]) -> Result<(R, bool)>,
) -> Result<R> {
    let lowers = store.lowers(&*store.env.read_txn()?, namespace, parent)?;
    let id = store.alloc_id()?;

    // The directory exists before the record; the sweep of unowned
    // directories waits until the record is written or the directory gone.
    let _making = store.making();
    let outcome = store
        .make_dirs(id, &lowers)
        .and_then(|()| write(id, &lowers));
    match outcome {
        Ok((made, true)) => Ok(made),
        Ok((made, false)) => {
            store.remove_dirs(id);
            Ok(made)
        }
        Err(err) => {
            store.remove_dirs(id);
            Err(err)
        }
    }
}

/// The mount of a snapshot's record on `lowers` (its parents' directories).
fn mount_of(store: &Store, record: &Record, lowers: &[PathBuf]) -> Mount {
    let spec = overlay::overlay_mount(
        &store.fs_dir(record.id),
        &store.work_dir(record.id),
        lowers,
        record.kind == Kind::View,
    );
    convert::mount(spec)
}

/// `prepare`: a writable snapshot on a committed parent.
pub(crate) async fn prepare(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::PrepareRequest,
) -> Result<pb::PrepareReply> {
    call.record("snapshot_key", &req.key);
    let labels = convert::labels(req.labels);
    make(
        svc,
        call,
        req.key,
        req.parent,
        Kind::Active,
        labels,
        req.lease_id,
    )
    .await
}

/// `view`: a read-only snapshot on a committed parent.
pub(crate) async fn view(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::ViewRequest,
) -> Result<pb::PrepareReply> {
    call.record("snapshot_key", &req.key);
    let labels = convert::labels(req.labels);
    make(
        svc,
        call,
        req.key,
        req.parent,
        Kind::View,
        labels,
        req.lease_id,
    )
    .await
}

/// What `prepare` and `view` share.
async fn make(
    svc: Arc<SnapshotService>,
    call: Call,
    key: String,
    parent: String,
    kind: Kind,
    labels: std::collections::BTreeMap<String, String>,
    lease_id: String,
) -> Result<pb::PrepareReply> {
    check_key(&key)?;
    check_labels(&labels)?;

    // Leased before it exists, so a gc marking meanwhile keeps it.
    svc.attach_to_lease(call.namespace(), &lease_id, std::slice::from_ref(&key))
        .await?;

    blocking(move || {
        let store = &svc.store;
        let namespace = call.namespace();
        create(store, namespace, &parent, |id, lowers| {
            mutate(store, &call, |txn| {
                let record = Record::new(id, kind, &parent, labels, now());
                store.insert(txn, namespace, &key, &record)?;
                Ok(pb::PrepareReply {
                    mounts: vec![mount_of(store, &record, lowers)],
                })
            })
        })
    })
    .await
}

/// `commit`: an active snapshot becomes committed under a name, its bytes
/// flushed to disk first.
pub(crate) async fn commit(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::CommitRequest,
) -> Result<pb::CommitReply> {
    call.record("snapshot_key", &req.key);
    check_key(&req.name)?;
    let labels = convert::labels(req.labels);
    check_labels(&labels)?;
    if req.key.starts_with(EXTRACT_PREFIX) {
        return Err(SnapshotError::Unpacking { key: req.key });
    }

    blocking(move || {
        let store = &svc.store;
        let namespace = call.namespace();
        // A missing key is left to the transaction: a retry of a commit that
        // happened finds its first outcome there.
        let found = store.get(&*store.env.read_txn()?, namespace, &req.key)?;
        if let Some(record) = found {
            store.syncfs(record.id)?;
        }
        let (reply, _) = mutate(store, &call, |txn| {
            store.commit(txn, namespace, &req.key, &req.name, labels, now())?;
            Ok(pb::CommitReply {})
        })?;
        Ok(reply)
    })
    .await
}

/// `mounts`: what to mount for an active snapshot or a view.
pub(crate) async fn mounts(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::MountsRequest,
) -> Result<pb::MountsReply> {
    call.record("snapshot_key", &req.key);
    let store = &svc.store;
    let txn = store.env.read_txn()?;
    let record = store.require(&txn, call.namespace(), &req.key)?;
    if record.kind == Kind::Committed {
        return Err(SnapshotError::WrongKind {
            key: req.key,
            kind: record.kind,
            wanted: "active or a view",
        });
    }
    let lowers = store.lowers(&txn, call.namespace(), &record.parent)?;
    Ok(pb::MountsReply {
        mounts: vec![mount_of(store, &record, &lowers)],
    })
}

/// `stat`: one snapshot.
pub(crate) async fn stat(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::StatRequest,
) -> Result<pb::StatReply> {
    call.record("snapshot_key", &req.key);
    let txn = svc.store.env.read_txn()?;
    let record = svc.store.require(&txn, call.namespace(), &req.key)?;
    Ok(pb::StatReply {
        info: Some(convert::info(&req.key, &record)),
    })
}

/// `list`: the namespace's snapshots carrying the selected labels, by key.
pub(crate) async fn list(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::ListRequest,
) -> Result<pb::ListReply> {
    let txn = svc.store.env.read_txn()?;
    let infos = svc
        .store
        .list(&txn, call.namespace())?
        .into_iter()
        .filter(|(_, record)| {
            req.label_selector
                .iter()
                .all(|(name, value)| record.labels.get(name) == Some(value))
        })
        .map(|(key, record)| convert::info(&key, &record))
        .collect();
    Ok(pb::ListReply { infos })
}

/// `usage`: bytes and inodes of one snapshot's own layer.
pub(crate) async fn usage_op(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::UsageRequest,
) -> Result<pb::UsageReply> {
    call.record("snapshot_key", &req.key);
    let fs = {
        let txn = svc.store.env.read_txn()?;
        let record = svc.store.require(&txn, call.namespace(), &req.key)?;
        svc.store.fs_dir(record.id)
    };
    let (size, inodes) = blocking(move || Ok(usage(&fs))).await?;
    Ok(pb::UsageReply { size, inodes })
}

/// `update`: replaces labels, all of them or those the mask names.
pub(crate) async fn update(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::UpdateRequest,
) -> Result<pb::UpdateReply> {
    call.record("snapshot_key", &req.key);
    let given = convert::labels(req.labels);
    blocking(move || {
        let store = &svc.store;
        let namespace = call.namespace();
        let (reply, _) = mutate(store, &call, |txn| {
            let current = store.require(txn, namespace, &req.key)?;
            let labels = convert::apply_mask(&current.labels, &given, &req.field_mask)?;
            check_labels(&labels)?;
            let record = store.set_labels(txn, namespace, &req.key, labels, now())?;
            Ok(pb::UpdateReply {
                info: Some(convert::info(&req.key, &record)),
            })
        })?;
        Ok(reply)
    })
    .await
}

/// `remove`: drops one snapshot, unconditionally (admin) or unless touched
/// since gc's epoch; `FailedPrecondition` for an unconditional remove of a
/// parent.
pub(crate) async fn remove(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::RemoveRequest,
) -> Result<pb::RemoveReply> {
    call.record("snapshot_key", &req.key);
    blocking(move || {
        let store = &svc.store;
        let mut gone = None;
        let (reply, _) = mutate(store, &call, |txn| {
            gone = store.remove(txn, call.namespace(), &req.key, req.unless_touched_since)?;
            Ok(pb::RemoveReply {
                removed: gone.is_some(),
            })
        })?;

        // The record is gone and its event queued; the bytes follow.
        if let Some(record) = gone {
            store.remove_dirs(record.id);
        }
        Ok(reply)
    })
    .await
}

/// `prune`: removes every snapshot of the namespace that is not live (nor an
/// ancestor of one) and not touched since the epoch, children first, and
/// every directory no record owns.
pub(crate) async fn prune(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::PruneRequest,
) -> Result<pb::PruneReply> {
    blocking(move || prune_now(&svc.store, &call, &req)).await
}

fn prune_now(store: &Store, call: &Call, req: &pb::PruneRequest) -> Result<pb::PruneReply> {
    let namespace = call.namespace();
    let epoch = req.unless_touched_since;
    let plan = store.prune_plan(&*store.env.read_txn()?, namespace, &req.live, epoch)?;

    // Sizes are measured before the transaction, which re-checks the plan,
    // so the disk walk never holds the writer.
    let sizes: std::collections::HashMap<u64, i64> = plan
        .iter()
        .map(|(_, record)| (record.id, usage(&store.dir(record.id)).0))
        .collect();
    if req.dry_run {
        return Ok(pb::PruneReply {
            removed: plan.iter().map(|(key, _)| key.clone()).collect(),
            freed_bytes: sizes.values().sum(),
        });
    }

    let (_, orphan_bytes) = store.sweep_orphans()?;
    let mut gone = Vec::new();
    let (reply, _) = mutate(store, call, |txn| {
        gone = store.prune(txn, namespace, &plan, epoch)?;
        let freed: i64 = gone.iter().map(|(_, record)| sizes[&record.id]).sum();
        Ok(pb::PruneReply {
            removed: gone.iter().map(|(key, _)| key.clone()).collect(),
            freed_bytes: freed + orphan_bytes,
        })
    })?;
    for (key, record) in &gone {
        tracing::debug!(namespace, snapshot_key = %key, "snapshot pruned");
        store.remove_dirs(record.id);
    }
    Ok(reply)
}

/// `unpack`: see [`crate::unpack`].
pub(crate) async fn unpack(
    svc: Arc<SnapshotService>,
    call: Call,
    req: pb::UnpackRequest,
) -> Result<pb::UnpackReply> {
    crate::unpack::unpack(svc, call, req).await
}
