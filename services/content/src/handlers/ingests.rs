//! Writing blobs: `open`, `write`, `commit`, `abort`, `status` and
//! `ingests`. Only `commit` writes the database; the others touch the
//! ingest's files (see [`crate::ingest`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_bus::Call;
use berth_proto::content as pb;

use super::{blocking, mutate, replay, Result};
use crate::convert;
use crate::digest::{check_ref, Digest};
use crate::error::ContentError;
use crate::ingest::IngestMeta;
use crate::store::check_sizes;
use crate::ContentService;

/// A non-negative size from the wire; 0 is unknown.
fn size(field: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| ContentError::InvalidRequest {
        field,
        reason: format!("{value} is negative"),
    })
}

/// `open`: start or resume an ingest and take its ref; `exists` when the
/// namespace holds the expected blob already (no ingest is made then).
pub(crate) async fn open(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::OpenRequest,
) -> Result<pb::OpenReply> {
    check_ref(&req.r#ref)?;
    let expected = match req.expected_digest.as_str() {
        "" => None,
        digest => Some(Digest::parse(digest)?),
    };
    let meta = IngestMeta {
        expected_digest: req.expected_digest,
        expected_size: size("expected_size", req.expected_size)?,
        lease_id: req.lease_id,
    };
    let namespace = call.namespace().to_string();

    // Only this namespace's hold counts: bytes on disk for another
    // namespace must still be written, so the digest alone claims nothing.
    if let Some(digest) = &expected {
        call.record("digest", digest.as_str());
        if let Some(blob) = svc.store.held(&namespace, digest)? {
            check_sizes(digest, &blob, &[meta.expected_size])?;
            return Ok(pb::OpenReply {
                offset: 0,
                exists: true,
                resumed: false,
            });
        }
    }

    let opened =
        blocking(move || svc.store.ingests.open_ingest(&namespace, &req.r#ref, &meta)).await?;
    Ok(pb::OpenReply {
        offset: opened.offset as i64,
        exists: false,
        resumed: opened.resumed,
    })
}

/// `write`: bytes at an offset of an ingest; returns its new length.
pub(crate) async fn write(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::WriteRequest,
) -> Result<pb::WriteReply> {
    check_ref(&req.r#ref)?;
    let namespace = call.namespace().to_string();
    let offset = blocking(move || {
        svc.store
            .ingests
            .write(&namespace, &req.r#ref, req.offset, &req.data)
    })
    .await?;
    Ok(pb::WriteReply {
        offset: offset as i64,
    })
}

/// `commit`: verify the ingest, place its bytes, record the namespace's
/// hold and queue `content.commit`; or, without an ingest, reuse a blob
/// the namespace holds. Either way the blob is attached to the lease and
/// its touched time stamped.
///
/// Holds the digest's lock from before the lease is attached to after the
/// records are written, so a gc delete of the digest runs wholly before or
/// after (see [`crate::store`]).
pub(crate) async fn commit(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::CommitRequest,
) -> Result<pb::CommitReply> {
    check_ref(&req.r#ref)?;
    // A retry of a commit that went through finds its outcome before it
    // looks for the ingest, which that commit used up. What the open asked
    // for holds unless the commit says otherwise.
    let (looked_up, store, reference) = (call.clone(), svc.clone(), req.r#ref.clone());
    let (replayed, meta) = blocking(move || {
        let replayed = replay::<pb::CommitReply>(&store.store, &looked_up)?;
        let meta = store
            .store
            .ingests
            .meta(looked_up.namespace(), &reference)?;
        Ok((replayed, meta.unwrap_or_default()))
    })
    .await?;
    if let Some(reply) = replayed {
        return Ok(reply);
    }
    let Expected {
        digest,
        sizes,
        lease_id,
    } = expected(&req, meta)?;
    call.record("digest", digest.as_str());
    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
    commit_blob(svc, call, req.r#ref, digest, sizes, lease_id, labels).await
}

/// The act step of a commit, for the `commit` op and for the service's
/// own pulls: attaches the blob to the lease, verifies and places the
/// ingest's bytes under `reference` (or, without them, reuses a blob the
/// namespace holds), and writes the records with `content.commit` in one
/// transaction under `call`'s request id.
///
/// Holds the digest's lock from before the lease is attached to after the
/// records are written, so a gc delete of the digest runs wholly before or
/// after (see [`crate::store`]). Errors as the `commit` op's.
pub(crate) async fn commit_blob(
    svc: Arc<ContentService>,
    call: Call,
    reference: String,
    digest: Digest,
    sizes: [u64; 2],
    lease_id: String,
    labels: BTreeMap<String, String>,
) -> Result<pb::CommitReply> {
    let namespace = call.namespace().to_string();

    // The lease first: when metadata cannot be reached the ingest is left
    // whole for a retry. A commit refused after it leaves the lease naming
    // a blob the namespace lacks, which keeps nothing.
    let _held = svc.digest_locks.lock(digest.to_string()).await;
    if !lease_id.is_empty() {
        svc.attach_to_lease(&namespace, &lease_id, &digest).await?;
    }
    blocking(move || {
        let store = &svc.store;
        let committed = store.place(&namespace, &reference, &digest, &sizes)?;
        let (reply, _) = mutate(store, &call, |txn| {
            let (blob, owner) =
                store.record_commit(txn, &namespace, &digest, committed, &labels)?;
            Ok(pb::CommitReply {
                info: Some(convert::info(digest.as_str(), &blob, &owner)),
            })
        })?;
        let (size, reused) = (committed.size, committed.reused);
        tracing::debug!(digest = %digest, size, reused, "blob committed");
        Ok(reply)
    })
    .await
}

/// What a commit checks its ingest against, and the lease it attaches to.
struct Expected {
    digest: Digest,
    /// The commit's size and the open's (0: unknown).
    sizes: [u64; 2],
    lease_id: String,
}

/// The commit's expectations, each falling back to what the open gave.
fn expected(req: &pb::CommitRequest, meta: IngestMeta) -> Result<Expected> {
    let lease_id = match req.lease_id.as_str() {
        "" => meta.lease_id.clone(),
        lease_id => lease_id.to_string(),
    };
    Ok(Expected {
        digest: resolve_digest(req, &meta)?,
        sizes: [size("size", req.size)?, meta.expected_size],
        lease_id,
    })
}

/// The digest a commit verifies against: the request's, else the one the
/// ingest was opened for; the two may not differ.
fn resolve_digest(req: &pb::CommitRequest, meta: &IngestMeta) -> Result<Digest> {
    let digest = match (req.digest.as_str(), meta.expected_digest.as_str()) {
        ("", "") => {
            return Err(ContentError::InvalidRequest {
                field: "digest",
                reason: format!("the commit of ingest {:?} names none", req.r#ref),
            })
        }
        ("", opened) => opened,
        (asked, "") => asked,
        (asked, opened) if asked != opened => {
            return Err(ContentError::InvalidRequest {
                field: "digest",
                reason: format!(
                    "the commit names {asked}, ingest {:?} was opened for {opened}",
                    req.r#ref
                ),
            })
        }
        (asked, _) => asked,
    };
    Digest::parse(digest)
}

/// `abort`: drop an ingest; `NotFound` without one.
pub(crate) async fn abort(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::AbortRequest,
) -> Result<pb::AbortReply> {
    check_ref(&req.r#ref)?;
    let namespace = call.namespace().to_string();
    blocking(move || svc.store.ingests.abort(&namespace, &req.r#ref)).await?;
    Ok(pb::AbortReply {})
}

/// `status`: one ingest's progress, from its files; takes no hold.
pub(crate) async fn status(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::StatusRequest,
) -> Result<pb::StatusReply> {
    check_ref(&req.r#ref)?;
    let namespace = call.namespace().to_string();
    let status = blocking(move || svc.store.ingests.status(&namespace, &req.r#ref)).await?;
    Ok(pb::StatusReply {
        status: Some(convert::ingest_status(status)),
    })
}

/// `ingests`: every ingest of the namespace, by ref.
pub(crate) async fn ingests(
    svc: Arc<ContentService>,
    call: Call,
    _req: pb::IngestsRequest,
) -> Result<pb::IngestsReply> {
    let namespace = call.namespace().to_string();
    let statuses = blocking(move || svc.store.ingests.list(&namespace)).await?;
    Ok(pb::IngestsReply {
        statuses: statuses.into_iter().map(convert::ingest_status).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commit's digest and the open's must agree when both are given.
    #[test]
    fn commit_digests_are_resolved() {
        let (a, b) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let req = |digest: &str| pb::CommitRequest {
            r#ref: "r".into(),
            digest: digest.into(),
            ..Default::default()
        };
        let opened = |digest: &str| IngestMeta {
            expected_digest: digest.into(),
            ..Default::default()
        };
        let (a, b) = (a.as_str(), b.as_str());
        let cases = [
            (a, "", Some(a)),
            ("", a, Some(a)),
            (a, a, Some(a)),
            (a, b, None),
            ("", "", None),
        ];
        for (asked, held, want) in cases {
            let got = resolve_digest(&req(asked), &opened(held)).ok();
            assert_eq!(got.as_ref().map(Digest::as_str), want, "{asked} {held}");
        }
    }
}
