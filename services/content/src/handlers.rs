//! One function per op of `berth.v1.<namespace>.content.<op>`: validate,
//! act on the store, return the reply.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_bus::{subject, Call, Error, Result};
use berth_proto::content as pb;
use berth_proto::Timestamp;

use crate::store::{check_digest, BlobRecord, IngestMeta, OwnerRecord};
use crate::ContentService;

fn info(digest: &str, blob: &BlobRecord, owner: &OwnerRecord) -> pb::Info {
    pb::Info {
        digest: digest.to_string(),
        size: blob.size,
        labels: owner.labels.clone().into_iter().collect(),
        created_at: Some(Timestamp {
            unix_nanos: owner.created,
        }),
        updated_at: Some(Timestamp {
            unix_nanos: owner.updated.max(owner.created),
        }),
    }
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| Error::internal(format!("store task: {err}")))?
}

/// `info`: one blob of the namespace.
pub(crate) async fn info_op(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::InfoRequest,
) -> Result<pb::InfoReply> {
    call.record("digest", &req.digest);
    let (blob, owner) = svc.store.info(call.namespace(), &req.digest)?;
    Ok(pb::InfoReply {
        info: Some(info(&req.digest, &blob, &owner)),
    })
}

/// `list`: the namespace's blobs carrying the selected labels.
pub(crate) async fn list(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::ListRequest,
) -> Result<pb::ListReply> {
    let infos = svc
        .store
        .list(call.namespace())?
        .into_iter()
        .filter(|(_, _, owner)| {
            req.label_selector
                .iter()
                .all(|(key, value)| owner.labels.get(key) == Some(value))
        })
        .map(|(digest, blob, owner)| info(&digest, &blob, &owner))
        .collect();
    Ok(pb::ListReply { infos })
}

/// `update`: replace labels, all or by `labels.<key>` masks.
pub(crate) async fn update(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::UpdateRequest,
) -> Result<pb::UpdateReply> {
    check_digest(&req.digest)?;
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    if let Some(reply) = store.requests.replay(&txn, &call)? {
        return Ok(reply);
    }
    let mut labels = store.labels(&txn, call.namespace(), &req.digest)?;
    if req.field_mask.is_empty() || req.field_mask.iter().any(|f| f == "labels") {
        labels = req.labels.clone().into_iter().collect();
    } else {
        for field in &req.field_mask {
            let Some(key) = field.strip_prefix("labels.") else {
                return Err(Error::invalid(format!("unknown field {field:?} in mask")));
            };
            match req.labels.get(key) {
                Some(value) => labels.insert(key.to_string(), value.clone()),
                None => labels.remove(key),
            };
        }
    }
    let (blob, owner) = store.update_labels(&mut txn, call.namespace(), &req.digest, labels)?;
    let reply = pb::UpdateReply {
        info: Some(info(&req.digest, &blob, &owner)),
    };
    store.requests.record(&mut txn, &call, &reply)?;
    txn.commit()?;
    Ok(reply)
}

/// `read`: a range of a blob.
pub(crate) async fn read(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::ReadRequest,
) -> Result<pb::ReadReply> {
    // The limit follows the connection: it is known only once it is up.
    let max = svc.client.max_body() as i64;
    if req.length > max {
        return Err(Error::invalid(format!(
            "read length {} is over the limit of {max} bytes",
            req.length
        )));
    }
    let namespace = call.namespace().to_string();
    let (data, size) = blocking(move || {
        svc.store
            .read(&namespace, &req.digest, req.offset, req.length)
    })
    .await?;
    Ok(pb::ReadReply {
        data: data.into(),
        size,
    })
}

/// `open`: start or resume an ingest.
pub(crate) async fn open(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::OpenRequest,
) -> Result<pb::OpenReply> {
    let meta = IngestMeta {
        expected_digest: req.expected_digest,
        expected_size: req.expected_size,
        lease_id: req.lease_id,
    };
    let (offset, exists) = svc.store.open_ingest(call.namespace(), &req.r#ref, &meta)?;
    Ok(pb::OpenReply { offset, exists })
}

/// `write`: bytes at an offset of an ingest.
pub(crate) async fn write(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::WriteRequest,
) -> Result<pb::WriteReply> {
    let namespace = call.namespace().to_string();
    let offset = blocking(move || {
        svc.store
            .write(&namespace, &req.r#ref, req.offset, &req.data)
    })
    .await?;
    Ok(pb::WriteReply { offset })
}

/// `commit`: verify, place, record; `content.commit` goes out with it.
pub(crate) async fn commit(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::CommitRequest,
) -> Result<pb::CommitReply> {
    // What the open asked for holds unless the commit says otherwise; a
    // missing ingest may still commit a blob that is on disk already.
    let namespace = call.namespace().to_string();
    let status = svc.store.ingest_status(&namespace, &req.r#ref);
    let meta = status
        .as_ref()
        .map(|(meta, _)| meta.clone())
        .unwrap_or_default();
    let digest = if req.digest.is_empty() {
        meta.expected_digest.clone()
    } else {
        req.digest.clone()
    };
    if digest.is_empty() {
        return Err(Error::invalid(format!(
            "commit of ingest {:?} names no digest",
            req.r#ref
        )));
    }
    check_digest(&digest)?;
    if !meta.expected_digest.is_empty() && meta.expected_digest != digest {
        return Err(Error::invalid(format!(
            "commit digest {digest} differs from the expected {}",
            meta.expected_digest
        )));
    }
    let size = if req.size > 0 {
        req.size
    } else {
        meta.expected_size
    };
    call.record("digest", &digest);
    let lease_id = if req.lease_id.is_empty() {
        meta.lease_id.clone()
    } else {
        req.lease_id.clone()
    };

    let lock = svc.store.lock(&digest);
    let _held = lock.lock().await;
    let placed = {
        let svc = svc.clone();
        let (namespace, reference, digest) = (namespace.clone(), req.r#ref.clone(), digest.clone());
        blocking(move || {
            svc.store
                .verify_and_place(&namespace, &reference, &digest, size)
        })
        .await?
    };
    if !lease_id.is_empty() {
        svc.attach_to_lease(&namespace, &lease_id, &digest).await?;
    }
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    if let Some(reply) = store.requests.replay(&txn, &call)? {
        return Ok(reply);
    }
    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
    let (blob, owner) = store.record_commit(&mut txn, &namespace, &digest, placed, &labels)?;
    let reply = pb::CommitReply {
        info: Some(info(&digest, &blob, &owner)),
    };
    store.requests.record(&mut txn, &call, &reply)?;
    txn.commit()?;
    Ok(reply)
}

/// `abort`: drop an ingest.
pub(crate) async fn abort(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::AbortRequest,
) -> Result<pb::AbortReply> {
    svc.store.abort(call.namespace(), &req.r#ref)?;
    Ok(pb::AbortReply {})
}

fn ingest_status(reference: String, meta: IngestMeta, offset: i64) -> pb::IngestStatus {
    pb::IngestStatus {
        r#ref: reference,
        offset,
        expected_size: meta.expected_size,
        expected_digest: meta.expected_digest,
    }
}

/// `status`: one ingest's progress.
pub(crate) async fn status(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::StatusRequest,
) -> Result<pb::StatusReply> {
    let (meta, offset) = svc.store.ingest_status(call.namespace(), &req.r#ref)?;
    Ok(pb::StatusReply {
        status: Some(ingest_status(req.r#ref, meta, offset)),
    })
}

/// `ingests`: every ingest of the namespace.
pub(crate) async fn ingests(
    svc: Arc<ContentService>,
    call: Call,
    _req: pb::IngestsRequest,
) -> Result<pb::IngestsReply> {
    let statuses = svc
        .store
        .ingests(call.namespace())?
        .into_iter()
        .map(|(reference, meta, offset)| ingest_status(reference, meta, offset))
        .collect();
    Ok(pb::IngestsReply { statuses })
}

/// `delete`: drop the namespace's hold, conditionally for gc; the bytes go
/// when no namespace holds them.
pub(crate) async fn delete(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::DeleteRequest,
) -> Result<pb::DeleteReply> {
    check_digest(&req.digest)?;
    call.record("digest", &req.digest);
    let lock = svc.store.lock(&req.digest);
    let _held = lock.lock().await;
    let store = &svc.store;
    let mut txn = store.env.write_txn()?;
    if let Some(reply) = store.requests.replay(&txn, &call)? {
        return Ok(reply);
    }
    let (deleted, unlink) = store.drop_owner(
        &mut txn,
        call.namespace(),
        &req.digest,
        req.unless_touched_since,
    )?;
    let reply = pb::DeleteReply {
        deleted,
        freed_bytes: unlink.as_ref().map(|(_, size)| *size).unwrap_or(0),
    };
    store.requests.record(&mut txn, &call, &reply)?;
    txn.commit()?;
    // The record is gone first: a crash here leaves a file no record owns,
    // which the next delete or a restart sweep removes, never a record
    // without its bytes.
    if let Some((path, _)) = unlink {
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %err, "blob file not removed");
        }
    }
    Ok(reply)
}

/// The subject of metadata's `leases.add` in a namespace.
pub(crate) fn leases_add_subject(namespace: &str) -> Result<String> {
    subject::op(namespace, "metadata", "leases.add")
}
