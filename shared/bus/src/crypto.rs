//! The process-wide TLS crypto provider.
//!
//! rustls needs one installed before any client config is built without a
//! provider of its own, and the HTTP clients in the process (the OTLP
//! exporter, the content service's registry client) build theirs that
//! way. It is ring, the one the NATS client uses, installed once; one that
//! another part of the process installed first stays.

use std::sync::Once;

/// Installs ring as the process's crypto provider, once.
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
