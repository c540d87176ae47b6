//! `pull`: fetch an image from a registry into the store. The work is a
//! job of [`crate::pull`]; the request starts or joins it and waits for it
//! a while.

use std::sync::Arc;

use berth_bus::{Call, Code};
use berth_proto::content as pb;

use super::Result;
use crate::pull::{PullError, PullSpec};
use crate::ContentService;

/// `pull`: starts the pull the request's id names (or joins it) and
/// answers when it ends or after the request's wait; a failed pull answers
/// with its error.
pub(crate) async fn pull(
    svc: Arc<ContentService>,
    call: Call,
    req: pb::PullRequest,
) -> Result<pb::PullReply> {
    let spec = PullSpec::parse(req)?;
    let wait = spec.wait;
    let job = svc.pulls.start_or_join(&svc, &call, spec)?;

    let status = job.wait(wait).await;
    if status.phase == pb::PullPhase::Failed as i32 {
        let code = u16::try_from(status.error_code).map_or(Code::Internal, Code::from_u16);
        return Err(PullError::Ended {
            code,
            message: status.error,
        }
        .into());
    }
    Ok(pb::PullReply {
        status: Some(status),
    })
}
