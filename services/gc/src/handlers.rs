//! The ops of `berth.v1.<namespace>.gc.<op>`.

use std::sync::Arc;

use berth_bus::{Call, Result};
use berth_proto::gc as pb;

use crate::mark::is_digest;
use crate::GcService;

/// `run`: collects now and answers with what went; waits for a run in
/// progress first (runs never overlap). A retry runs gc again, which is
/// harmless, so no request id is stored. The namespace of the subject is
/// only where metadata is asked; a run covers every namespace.
pub(crate) async fn run(
    svc: Arc<GcService>,
    call: Call,
    req: pb::RunRequest,
) -> Result<pb::GcDone> {
    svc.collect_now(call.namespace(), req.dry_run).await
}

/// `explain`: why a blob or snapshot of the subject's namespace stays, or
/// that it goes; `InvalidArgument` for an empty or malformed object or node.
/// Read-only, so a retry is harmless.
pub(crate) async fn explain(
    svc: Arc<GcService>,
    call: Call,
    req: pb::ExplainRequest,
) -> Result<pb::ExplainReply> {
    let field = match is_digest(&req.object) {
        true => "digest",
        false => "snapshot_key",
    };
    call.record(field, &req.object);

    Ok(svc.explain(call.namespace(), req).await?)
}
