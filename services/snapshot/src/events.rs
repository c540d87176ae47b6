//! The events the snapshot service publishes, and their payloads.
//!
//! Each is queued in the outbox inside the transaction of its change and
//! published after it (see `berth_bus::events`). The topics are those of
//! `proto/berth/v1/events.proto`: a committed snapshot (a layer unpacked, or
//! an explicit commit) and a removed one. Prepare, view and label changes
//! publish nothing; their outcome is the reply.

use heed::RwTxn;

use berth_bus::events::Outbox;
use berth_proto::snapshot::SnapshotEvent;

use crate::error::SnapshotError;
use crate::store::Record;

/// A snapshot was committed under a name.
pub const COMMIT: &str = "snapshot.commit";

/// A snapshot was removed.
pub const REMOVE: &str = "snapshot.remove";

/// Queues `snapshot.commit` for `name`.
pub(crate) fn commit(
    outbox: &Outbox,
    txn: &mut RwTxn,
    namespace: &str,
    name: &str,
    record: &Record,
) -> Result<(), SnapshotError> {
    push(
        outbox,
        txn,
        namespace,
        COMMIT,
        name,
        record,
        record.generation,
    )
}

/// Queues `snapshot.remove` for `key`, one generation past its record's.
pub(crate) fn remove(
    outbox: &Outbox,
    txn: &mut RwTxn,
    namespace: &str,
    key: &str,
    record: &Record,
) -> Result<(), SnapshotError> {
    push(
        outbox,
        txn,
        namespace,
        REMOVE,
        key,
        record,
        record.generation + 1,
    )
}

fn push(
    outbox: &Outbox,
    txn: &mut RwTxn,
    namespace: &str,
    topic: &str,
    key: &str,
    record: &Record,
    generation: u64,
) -> Result<(), SnapshotError> {
    let event = SnapshotEvent {
        key: key.to_string(),
        parent: record.parent.clone(),
    };
    outbox
        .push(txn, namespace, topic, generation, &event)
        .map_err(SnapshotError::bus("outbox"))
}
