//! berth's wire contract: the messages of `proto/berth/v1`, generated at build
//! time. Each service's messages live in a module named after the service.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Types shared by every service: status codes, descriptors, mounts, times.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/berth.v1.rs"));

    /// The content service's messages.
    pub mod content {
        include!(concat!(env!("OUT_DIR"), "/berth.v1.content.rs"));
    }
    /// The snapshot service's messages.
    pub mod snapshot {
        include!(concat!(env!("OUT_DIR"), "/berth.v1.snapshot.rs"));
    }
    /// The metadata service's messages.
    pub mod metadata {
        include!(concat!(env!("OUT_DIR"), "/berth.v1.metadata.rs"));
    }
    /// The task service's messages.
    pub mod task {
        include!(concat!(env!("OUT_DIR"), "/berth.v1.task.rs"));
    }
    /// The gc service's messages.
    pub mod gc {
        include!(concat!(env!("OUT_DIR"), "/berth.v1.gc.rs"));
    }
}

pub use prost::Message;
pub use v1::*;

impl v1::Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        Self { unix_nanos: nanos }
    }
}
