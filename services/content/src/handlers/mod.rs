//! One function per op of `berth.v1.<namespace>.content.<op>`: validate,
//! act on the store, return the reply. [`blobs`] serves committed blobs,
//! [`ingests`] the writes that make them, [`pull`] the fetches from
//! registries.
//!
//! Mutating ops that change the database run in one write transaction that
//! first looks up the request id, so a retry returns the first outcome
//! ([`mutate`]). Store work runs on the blocking pool: LMDB writes wait for
//! the one writer, and hashing and syncing take as long as the disk does.

pub(crate) mod blobs;
pub(crate) mod ingests;
pub(crate) mod pull;

use heed::RwTxn;

use berth_bus::Call;
use berth_proto::Message;

use crate::error::ContentError;
use crate::store::Store;

type Result<T, E = ContentError> = std::result::Result<T, E>;

/// Runs blocking store work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ContentError::Worker)?
}

/// The first outcome of this call's request id, if it went through.
pub(crate) fn replay<Rep: Message + Default>(store: &Store, call: &Call) -> Result<Option<Rep>> {
    if call.request_id().is_none() {
        return Ok(None);
    }
    let txn = store.env.write_txn()?;
    let replayed = store.requests.replay(&txn, call);
    replayed.map_err(ContentError::bus("request log"))
}

/// Runs one mutating request in one write transaction: the first outcome of
/// a retried request id, or `change` stored under the id with its effect.
/// The flag is true when this call made the change.
pub(crate) fn mutate<Rep: Message + Default>(
    store: &Store,
    call: &Call,
    change: impl FnOnce(&mut RwTxn) -> Result<Rep>,
) -> Result<(Rep, bool)> {
    let log_err = |err| ContentError::Bus {
        what: "request log",
        source: err,
    };
    store.requests.mutate(&store.env, call, log_err, change)
}
