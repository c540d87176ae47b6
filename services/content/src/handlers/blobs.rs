//! Committed blobs: `info`, `list`, `update`, `read` and `delete`. Each
//! sees only the blobs the calling namespace holds.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_bus::Call;
use berth_proto::content as pb;

use super::{blocking, mutate, Result};
use crate::convert;
use crate::digest::Digest;
use crate::error::ContentError;
use crate::ContentService;

/// `info`: one blob of the namespace; `NotFound` when it holds none.
pub(crate) async fn info(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::InfoRequest,
) -> Result<pb::InfoReply> {
    let digest = Digest::parse(&req.digest)?;
    call.record("digest", digest.as_str());
    let (blob, owner) = svc.store.info(call.namespace(), &digest)?;
    Ok(pb::InfoReply {
        info: Some(convert::info(digest.as_str(), &blob, &owner)),
    })
}

/// `list`: the namespace's blobs carrying every selected label.
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
        .map(|(digest, blob, owner)| convert::info(&digest, &blob, &owner))
        .collect();
    Ok(pb::ListReply { infos })
}

/// `update`: replace the labels, all (`labels` or an empty mask) or one
/// key per `labels.<key>` mask entry.
pub(crate) async fn update(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::UpdateRequest,
) -> Result<pb::UpdateReply> {
    let digest = Digest::parse(&req.digest)?;
    call.record("digest", digest.as_str());
    for field in &req.field_mask {
        if field != "labels" && !field.starts_with("labels.") {
            return Err(ContentError::InvalidRequest {
                field: "field_mask",
                reason: format!("unknown field {field:?}"),
            });
        }
    }

    blocking(move || {
        let store = &svc.store;
        let namespace = call.namespace();
        let (reply, _) = mutate(store, &call, |txn| {
            let labels = merge_labels(store.labels(txn, namespace, &digest)?, &req);
            let (blob, owner) = store.update_labels(txn, namespace, &digest, labels)?;
            Ok(pb::UpdateReply {
                info: Some(convert::info(digest.as_str(), &blob, &owner)),
            })
        })?;
        Ok(reply)
    })
    .await
}

/// The labels after an update: all replaced, or the masked keys set (or
/// removed when the request leaves them out).
fn merge_labels(
    mut labels: BTreeMap<String, String>,
    req: &pb::UpdateRequest,
) -> BTreeMap<String, String> {
    if req.field_mask.is_empty() || req.field_mask.iter().any(|f| f == "labels") {
        return req.labels.clone().into_iter().collect();
    }
    for key in req
        .field_mask
        .iter()
        .filter_map(|f| f.strip_prefix("labels."))
    {
        match req.labels.get(key) {
            Some(value) => labels.insert(key.to_string(), value.clone()),
            None => labels.remove(key),
        };
    }
    labels
}

/// `read`: a range of a blob, at most the connection's largest body.
pub(crate) async fn read(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::ReadRequest,
) -> Result<pb::ReadReply> {
    let digest = Digest::parse(&req.digest)?;
    call.record("digest", digest.as_str());
    // The limit follows the connection: it is known only once it is up.
    let max = svc.client.max_body() as u64;
    let invalid = |field, reason: String| ContentError::InvalidRequest { field, reason };
    let offset = u64::try_from(req.offset)
        .map_err(|_| invalid("offset", format!("{} is negative", req.offset)))?;
    let length = u64::try_from(req.length)
        .map_err(|_| invalid("length", format!("{} is negative", req.length)))?;
    if length > max {
        let reason = format!("{length} is over the limit of {max} bytes");
        return Err(invalid("length", reason));
    }

    let namespace = call.namespace().to_string();
    let (data, size) =
        blocking(move || svc.store.read(&namespace, &digest, offset, length)).await?;
    Ok(pb::ReadReply {
        data: data.into(),
        size: size as i64,
    })
}

/// `delete`: drop the namespace's hold, conditionally for gc
/// (`unless_touched_since`); the bytes go when no namespace holds them.
///
/// Holds the digest's lock from the lookup to the unlink, so a commit of
/// the same digest runs wholly before or after. The records go first and
/// the file after the commit: a crash in between leaves a file no record
/// names, which the next start-up (or a delete of the digest) removes,
/// never a record without its bytes.
pub(crate) async fn delete(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::DeleteRequest,
) -> Result<pb::DeleteReply> {
    let digest = Digest::parse(&req.digest)?;
    call.record("digest", digest.as_str());
    let _held = svc.digest_locks.lock(digest.to_string()).await;

    blocking(move || {
        let store = &svc.store;
        let namespace = call.namespace();
        let mut unlink = None;
        let outcome = mutate(store, &call, |txn| {
            let dropped = store.drop_owner(txn, namespace, &digest, req.unless_touched_since)?;
            let freed = dropped.unlink.is_some().then_some(dropped.size);
            unlink = dropped.unlink;
            Ok(pb::DeleteReply {
                deleted: dropped.deleted,
                freed_bytes: freed.unwrap_or(0) as i64,
            })
        });
        match outcome {
            Ok((reply, made)) => Ok(finish_delete(&digest, reply, unlink.filter(|_| made))),
            Err(err @ ContentError::BlobNotFound { .. }) => {
                if store.remove_orphan(&digest)? {
                    tracing::warn!(digest = %digest, "removed a blob file no record named");
                }
                Err(err)
            }
            Err(err) => Err(err),
        }
    })
    .await
}

/// After a delete's commit: unlinks the file when no namespace holds the
/// blob any more. A failed unlink leaves a file no record names, which the
/// next start-up removes.
fn finish_delete(
    digest: &Digest,
    reply: pb::DeleteReply,
    unlink: Option<std::path::PathBuf>,
) -> pb::DeleteReply {
    if reply.deleted {
        let freed_bytes = reply.freed_bytes;
        tracing::debug!(digest = %digest, freed_bytes, "blob deleted");
    }
    if let Some(path) = unlink {
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %err, "blob file not removed");
        }
    }
    reply
}
