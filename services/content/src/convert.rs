//! Domain records to wire messages.

use berth_proto::content as pb;
use berth_proto::Timestamp;

use crate::ingest::IngestStatus;
use crate::schema::{BlobRecord, OwnerRecord};

/// A blob as the namespace holding it sees it.
pub(crate) fn info(digest: &str, blob: &BlobRecord, owner: &OwnerRecord) -> pb::Info {
    pb::Info {
        digest: digest.to_string(),
        size: blob.size as i64,
        labels: owner.labels.clone().into_iter().collect(),
        created_at: Some(Timestamp {
            unix_nanos: owner.created,
        }),
        updated_at: Some(Timestamp {
            unix_nanos: owner.updated.max(owner.created),
        }),
    }
}

/// An ingest's progress.
pub(crate) fn ingest_status(status: IngestStatus) -> pb::IngestStatus {
    pb::IngestStatus {
        r#ref: status.reference,
        offset: status.offset as i64,
        expected_size: status.meta.expected_size as i64,
        expected_digest: status.meta.expected_digest,
        updated_at: Some(Timestamp {
            unix_nanos: status.updated,
        }),
        held: status.held,
    }
}
