//! One function per op of `berth.v1.<namespace>.snapshot.<node>.<op>`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use berth_bus::{Call, Error, Result};
use berth_proto::snapshot as pb;
use berth_proto::Timestamp;

use crate::store::{check_key, usage, Kind, Record};
use crate::{overlay, SnapshotService};

fn now() -> i64 {
    Timestamp::now().unix_nanos
}

fn kind_pb(kind: Kind) -> i32 {
    match kind {
        Kind::View => pb::Kind::View as i32,
        Kind::Active => pb::Kind::Active as i32,
        Kind::Committed => pb::Kind::Committed as i32,
    }
}

fn info(key: &str, record: &Record) -> pb::Info {
    pb::Info {
        key: key.to_string(),
        parent: record.parent.clone(),
        kind: kind_pb(record.kind),
        labels: record.labels.clone().into_iter().collect(),
        created_at: Some(Timestamp { unix_nanos: record.created }),
        updated_at: Some(Timestamp { unix_nanos: record.updated }),
    }
}

/// Runs blocking filesystem work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| Error::internal(format!("snapshot task: {err}")))?
}

/// The mounts of a snapshot's record.
fn mounts_of(svc: &SnapshotService, namespace: &str, record: &Record) -> Result<Vec<berth_proto::Mount>> {
    let txn = svc.store.env.read_txn()?;
    let lowers = svc.store.lowers(&txn, namespace, &record.parent)?;
    let dir = svc.store.dir(record.id);
    let spec = overlay::overlay_mount(&dir.join("fs"), &dir.join("work"), &lowers, record.kind == Kind::View);
    Ok(vec![berth_proto::Mount {
        r#type: spec.fstype,
        source: spec.source,
        options: spec.options,
    }])
}

/// Makes an active or view snapshot on `parent` (shared by prepare and view).
pub(crate) fn make(
    svc: &SnapshotService,
    call: &Call,
    key: &str,
    parent: &str,
    kind: Kind,
    labels: BTreeMap<String, String>,
) -> Result<Record> {
    check_key(key)?;
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    if store.get(&txn, call.namespace(), key)?.is_some() {
        return Err(Error::already_exists(format!("snapshot {key:?} already exists")));
    }
    if !parent.is_empty() {
        let record = store.require(&txn, call.namespace(), parent)?;
        if record.kind != Kind::Committed {
            return Err(Error::precondition(format!("parent {parent:?} is not committed")));
        }
    }
    let now = now();
    let record = Record {
        id: store.next_id(&mut txn)?,
        kind,
        parent: parent.to_string(),
        labels,
        created: now,
        updated: now,
        touched: now,
    };
    store.put(&mut txn, call.namespace(), key, &record)?;
    txn.commit()?;

    // The directories come after the record: a crash in between leaves a
    // record whose directories `ensure_dirs` makes on the next use.
    ensure_dirs(svc, call.namespace(), &record)?;
    Ok(record)
}

fn ensure_dirs(svc: &SnapshotService, namespace: &str, record: &Record) -> Result<()> {
    let dir = svc.store.dir(record.id);
    std::fs::create_dir_all(dir.join("work"))?;
    let fs = dir.join("fs");
    std::fs::create_dir_all(&fs)?;
    let lowers = {
        let txn = svc.store.env.read_txn()?;
        svc.store.lowers(&txn, namespace, &record.parent)?
    };
    crate::apply::init_upper(&fs, &lowers).map_err(|err| Error::internal(err.to_string()))
}

/// `prepare`: a writable snapshot.
pub(crate) async fn prepare(svc: Arc<SnapshotService>, call: Call, req: pb::PrepareRequest) -> Result<pb::PrepareReply> {
    call.record("snapshot_key", &req.key);
    let record = {
        let (svc, call, req) = (svc.clone(), call.clone(), req.clone());
        blocking(move || make(&svc, &call, &req.key, &req.parent, Kind::Active, req.labels.into_iter().collect())).await?
    };
    if !req.lease_id.is_empty() {
        svc.attach_to_lease(call.namespace(), &req.lease_id, &req.key).await?;
    }
    Ok(pb::PrepareReply {
        mounts: mounts_of(&svc, call.namespace(), &record)?,
    })
}

/// `view`: a read-only snapshot.
pub(crate) async fn view(svc: Arc<SnapshotService>, call: Call, req: pb::ViewRequest) -> Result<pb::PrepareReply> {
    let record = {
        let (svc, call, req) = (svc.clone(), call.clone(), req.clone());
        blocking(move || make(&svc, &call, &req.key, &req.parent, Kind::View, req.labels.into_iter().collect())).await?
    };
    if !req.lease_id.is_empty() {
        svc.attach_to_lease(call.namespace(), &req.lease_id, &req.key).await?;
    }
    Ok(pb::PrepareReply {
        mounts: mounts_of(&svc, call.namespace(), &record)?,
    })
}

/// Turns active `key` into committed `name` after flushing its bytes.
pub(crate) fn commit_now(svc: &SnapshotService, namespace: &str, key: &str, name: &str, labels: BTreeMap<String, String>) -> Result<()> {
    check_key(name)?;
    let store = &svc.store;
    let record = {
        let txn = store.env.read_txn()?;
        if store.get(&txn, namespace, name)?.is_some() {
            return Err(Error::already_exists(format!("snapshot {name:?} already exists")));
        }
        store.require(&txn, namespace, key)?
    };
    if record.kind != Kind::Active {
        return Err(Error::precondition(format!("snapshot {key:?} is not active")));
    }
    syncfs(&store.dir(record.id).join("fs"))?;
    let mut txn = store.env.write_txn()?;
    if store.get(&txn, namespace, name)?.is_some() {
        return Err(Error::already_exists(format!("snapshot {name:?} already exists")));
    }
    let mut committed = store.require(&txn, namespace, key)?;
    committed.kind = Kind::Committed;
    committed.labels.extend(labels);
    committed.updated = now();
    committed.touched = committed.updated;
    store.delete(&mut txn, namespace, key)?;
    store.put(&mut txn, namespace, name, &committed)?;
    let event = pb::SnapshotEvent {
        key: name.to_string(),
        parent: committed.parent.clone(),
    };
    store.outbox.push(&mut txn, namespace, "snapshot.commit", 0, &event)?;
    txn.commit()?;
    Ok(())
}

fn syncfs(dir: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(dir)?;
    // SAFETY: syncfs takes any open descriptor on the filesystem to flush.
    let rc = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&file)) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// `commit`.
pub(crate) async fn commit(svc: Arc<SnapshotService>, call: Call, req: pb::CommitRequest) -> Result<pb::CommitReply> {
    call.record("snapshot_key", &req.key);
    let namespace = call.namespace().to_string();
    blocking(move || commit_now(&svc, &namespace, &req.key, &req.name, req.labels.into_iter().collect())).await?;
    Ok(pb::CommitReply {})
}

/// `mounts`.
pub(crate) async fn mounts(svc: Arc<SnapshotService>, call: Call, req: pb::MountsRequest) -> Result<pb::MountsReply> {
    let record = {
        let txn = svc.store.env.read_txn()?;
        svc.store.require(&txn, call.namespace(), &req.key)?
    };
    if record.kind == Kind::Committed {
        return Err(Error::precondition(format!("snapshot {:?} is committed; prepare or view on it", req.key)));
    }
    Ok(pb::MountsReply {
        mounts: mounts_of(&svc, call.namespace(), &record)?,
    })
}

/// `stat`.
pub(crate) async fn stat(svc: Arc<SnapshotService>, call: Call, req: pb::StatRequest) -> Result<pb::StatReply> {
    let txn = svc.store.env.read_txn()?;
    let record = svc.store.require(&txn, call.namespace(), &req.key)?;
    Ok(pb::StatReply {
        info: Some(info(&req.key, &record)),
    })
}

/// `list`.
pub(crate) async fn list(svc: Arc<SnapshotService>, call: Call, req: pb::ListRequest) -> Result<pb::ListReply> {
    let txn = svc.store.env.read_txn()?;
    let infos = svc
        .store
        .list(&txn, call.namespace())?
        .into_iter()
        .filter(|(_, r)| req.label_selector.iter().all(|(k, v)| r.labels.get(k) == Some(v)))
        .map(|(key, record)| info(&key, &record))
        .collect();
    Ok(pb::ListReply { infos })
}

/// `usage`.
pub(crate) async fn usage_op(svc: Arc<SnapshotService>, call: Call, req: pb::UsageRequest) -> Result<pb::UsageReply> {
    let dir = {
        let txn = svc.store.env.read_txn()?;
        svc.store.dir(svc.store.require(&txn, call.namespace(), &req.key)?.id)
    };
    let (size, inodes) = blocking(move || Ok(usage(&dir.join("fs")))).await?;
    Ok(pb::UsageReply { size, inodes })
}

/// Removes one snapshot's record (and then its directory) unless it has
/// children or, for gc, was touched since the epoch. Returns whether it went.
pub(crate) fn remove_now(svc: &SnapshotService, namespace: &str, key: &str, unless_touched_since: u64) -> Result<bool> {
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    let record = store.require(&txn, namespace, key)?;
    if store.has_children(&txn, namespace, key)? {
        if unless_touched_since > 0 {
            return Ok(false);
        }
        return Err(Error::precondition(format!("snapshot {key:?} has children")));
    }
    if unless_touched_since > 0 && record.touched >= unless_touched_since as i64 {
        return Ok(false);
    }
    store.delete(&mut txn, namespace, key)?;
    let event = pb::SnapshotEvent {
        key: key.to_string(),
        parent: record.parent.clone(),
    };
    store.outbox.push(&mut txn, namespace, "snapshot.remove", 0, &event)?;
    txn.commit()?;
    let dir = store.dir(record.id);
    if let Err(err) = std::fs::remove_dir_all(&dir) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %err, "snapshot directory not removed; prune will retry");
        }
    }
    Ok(true)
}

/// `remove`.
pub(crate) async fn remove(svc: Arc<SnapshotService>, call: Call, req: pb::RemoveRequest) -> Result<pb::RemoveReply> {
    call.record("snapshot_key", &req.key);
    let namespace = call.namespace().to_string();
    let removed = blocking(move || remove_now(&svc, &namespace, &req.key, req.unless_touched_since)).await?;
    Ok(pb::RemoveReply { removed })
}

/// `prune`: removes what is not live and not touched since the epoch,
/// leaves first, and every directory no record owns.
pub(crate) async fn prune(svc: Arc<SnapshotService>, call: Call, req: pb::PruneRequest) -> Result<pb::PruneReply> {
    let namespace = call.namespace().to_string();
    blocking(move || prune_now(&svc, &namespace, &req)).await
}

fn prune_now(svc: &SnapshotService, namespace: &str, req: &pb::PruneRequest) -> Result<pb::PruneReply> {
    let store = &svc.store;
    let records = {
        let txn = store.env.read_txn()?;
        store.list(&txn, namespace)?
    };
    // Live keys keep their ancestors.
    let mut live: HashSet<String> = HashSet::new();
    for key in &req.live {
        let mut next = key.clone();
        while let Some((_, record)) = records.iter().find(|(k, _)| *k == next) {
            if !live.insert(next.clone()) {
                break;
            }
            next = record.parent.clone();
        }
    }
    let mut removed = Vec::new();
    let mut freed = 0;
    let mut candidates: Vec<(String, Record)> = records.into_iter().filter(|(k, _)| !live.contains(k)).collect();
    loop {
        let mut progressed = false;
        let mut left = Vec::new();
        for (key, record) in candidates {
            let child_left = left.iter().any(|(_, r): &(String, Record)| r.parent == key);
            if req.dry_run {
                removed.push(key);
                continue;
            }
            if child_left {
                left.push((key, record));
                continue;
            }
            let bytes = usage(&store.dir(record.id)).0;
            match remove_now(svc, namespace, &key, req.unless_touched_since) {
                Ok(true) => {
                    freed += bytes;
                    removed.push(key);
                    progressed = true;
                }
                Ok(false) => left.push((key, record)),
                Err(err) if err.code == berth_bus::Code::NotFound => {}
                Err(err) => return Err(err),
            }
        }
        candidates = left;
        if !progressed || candidates.is_empty() {
            break;
        }
    }
    if !req.dry_run {
        for dir in store.orphan_dirs()? {
            freed += usage(&dir).0;
            if let Err(err) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %err, "orphan snapshot directory not removed");
            }
        }
    }
    Ok(pb::PruneReply {
        removed,
        freed_bytes: freed,
    })
}

/// `unpack`: makes sure every layer's committed snapshot exists.
pub(crate) async fn unpack(svc: Arc<SnapshotService>, call: Call, req: pb::UnpackRequest) -> Result<pb::UnpackReply> {
    crate::unpack::unpack(svc, call, req).await
}

/// The fs directories of a snapshot's parents, for tests and the unpacker.
pub(crate) fn lowers_of(svc: &SnapshotService, namespace: &str, parent: &str) -> Result<Vec<PathBuf>> {
    let txn = svc.store.env.read_txn()?;
    svc.store.lowers(&txn, namespace, parent)
}
