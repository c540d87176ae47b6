//! Request ids: a retry returns the first outcome.
//!
//! A service stores `request id -> (body digest, reply)` in the same write
//! transaction as the effect, so a caller that timed out and retries gets the
//! reply of the request that did happen, even after the service restarted.
//! The same id with a different body is `InvalidArgument`. Only successful
//! outcomes are stored: a failed request changed nothing, so running it again
//! is what the retry should do.

use heed::types::Bytes as RawBytes;
use heed::{Database, RwTxn};
use prost::Message;

use crate::error::{Error, Result};
use crate::serve::Call;
use crate::store::Env;

/// The table of request outcomes of one service.
#[derive(Clone, Copy)]
pub struct RequestLog {
    db: Database<RawBytes, RawBytes>,
}

impl RequestLog {
    /// Opens (creating) the table `requests` in `env`.
    pub fn open(env: &Env) -> Result<Self> {
        let mut txn = env.write_txn()?;
        let db = env.create_database(&mut txn, Some("requests"))?;
        txn.commit()?;
        Ok(RequestLog { db })
    }

    /// The first outcome of this call's request id, if it has one; an error
    /// when the id was used with another body.
    pub fn replay<Rep: Message + Default>(&self, txn: &RwTxn, call: &Call) -> Result<Option<Rep>> {
        let Some(key) = key(call) else {
            return Ok(None);
        };
        let Some(stored) = self.db.get(txn, &key)? else {
            return Ok(None);
        };
        if stored.len() < 32 || &stored[..32] != call.body_digest() {
            return Err(Error::invalid(format!(
                "request id {:?} was used with a different request",
                call.request_id().unwrap_or_default()
            )));
        }
        Ok(Some(Rep::decode(&stored[32..])?))
    }

    /// Runs one mutating request in one write transaction of `env`: the
    /// first outcome of a retried request id, or what `change` replies,
    /// stored under the id with its effect. The flag is true when this call
    /// made the change. A failure of the log itself goes through `log_err`
    /// into the service's own error.
    pub fn mutate<Rep, E>(
        &self,
        env: &Env,
        call: &Call,
        log_err: impl Fn(Error) -> E,
        change: impl FnOnce(&mut RwTxn) -> std::result::Result<Rep, E>,
    ) -> std::result::Result<(Rep, bool), E>
    where
        Rep: Message + Default,
        E: From<heed::Error>,
    {
        let mut txn = env.write_txn()?;
        if let Some(reply) = self.replay(&txn, call).map_err(&log_err)? {
            return Ok((reply, false));
        }
        let reply = change(&mut txn)?;
        self.record(&mut txn, call, &reply).map_err(&log_err)?;
        txn.commit()?;
        Ok((reply, true))
    }

    /// Stores this call's outcome under its request id (no-op without one).
    pub fn record<Rep: Message>(&self, txn: &mut RwTxn, call: &Call, reply: &Rep) -> Result<()> {
        let Some(key) = key(call) else {
            return Ok(());
        };
        let mut value = call.body_digest().to_vec();
        reply
            .encode(&mut value)
            .map_err(|err| Error::internal(err.to_string()))?;
        self.db.put(txn, &key, &value)?;
        Ok(())
    }
}

/// Keyed by namespace and subject too: one id names one request to one op.
fn key(call: &Call) -> Option<Vec<u8>> {
    let request_id = call.request_id()?;
    Some(format!("{}\0{}\0{request_id}", call.namespace(), call.subject()).into_bytes())
}
