//! The ops of `berth.v1.<namespace>.gc.<op>`.

use std::sync::Arc;

use berth_bus::{Call, Result};
use berth_proto::gc as pb;

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
