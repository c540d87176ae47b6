//! The client's NATS connection: where, as whom, and over what.
//!
//! The identity comes from the flags or their environment variables (a
//! user and password, an nkey seed file or a credentials file). With none
//! given, berth uses the local admin's seed that berthd keeps under its
//! root (`$BERTH_ROOT/auth/admin.nk`, by default
//! `/var/lib/berth/auth/admin.nk`) when this user may read it, so root on
//! a berthd host needs no flags. TLS settings apply whatever the identity.
//!
//! The connection is made through `berth_bus`, whose watch turns the
//! server's permission refusals into a prompt "permission denied" instead
//! of a timeout.

use std::path::PathBuf;

use clap::Args;

use berth_bus::{Code, ConnectConfig};

/// berthd's root when `BERTH_ROOT` does not say otherwise.
const DEFAULT_ROOT: &str = "/var/lib/berth";

/// How berth proves who it is to NATS, and protects the link.
#[derive(Args, Clone, Debug, Default)]
pub struct NatsAuth {
    /// User name for NATS (user and password authentication).
    #[arg(long, global = true, env = "BERTH_NATS_USER")]
    nats_user: Option<String>,
    /// The NATS user's password (the environment variable keeps it out of
    /// the process list).
    #[arg(
        long,
        global = true,
        env = "BERTH_NATS_PASSWORD",
        hide_env_values = true
    )]
    nats_password: Option<String>,
    /// A file holding an nkey seed (default: berthd's admin seed, when
    /// readable).
    #[arg(long, global = true, env = "BERTH_NATS_NKEY", value_name = "FILE")]
    nkey: Option<PathBuf>,
    /// A NATS credentials file (user JWT and seed).
    #[arg(long, global = true, env = "BERTH_NATS_CREDS", value_name = "FILE")]
    creds: Option<PathBuf>,
    /// The CA bundle that signed the NATS server's certificate (requires TLS).
    #[arg(long, global = true, env = "BERTH_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A client certificate, for a server that verifies clients.
    #[arg(long, global = true, env = "BERTH_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, global = true, env = "BERTH_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

/// The local admin's seed file berthd writes.
pub fn admin_seed() -> PathBuf {
    let root = std::env::var_os("BERTH_ROOT")
        .filter(|root| !root.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
    root.join("auth").join("admin.nk")
}

impl NatsAuth {
    /// The connection settings for `url`: the flags', or the local admin's
    /// seed when they name no identity and it is readable.
    pub fn config(&self, url: &str) -> ConnectConfig {
        let mut config = ConnectConfig {
            url: url.to_string(),
            name: "berth".to_string(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            nkey: self.nkey.clone(),
            creds: self.creds.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ..Default::default()
        };
        config.inbox_prefix = std::env::var(berth_bus::config::env::INBOX_PREFIX)
            .ok()
            .filter(|prefix| !prefix.is_empty());
        if !config.has_identity() {
            let seed = admin_seed();
            if std::fs::File::open(&seed).is_ok() {
                config.nkey = Some(seed);
            }
        }
        config
    }
}

/// Connects to NATS at `url` as `auth` says; the error says what to do
/// when the server is not there or does not take the identity.
pub async fn connect(url: &str, auth: &NatsAuth) -> anyhow::Result<async_nats::Client> {
    let config = auth.config(url);
    match berth_bus::connect_with_config(&config).await {
        Ok(nats) => Ok(nats),
        Err(err) if err.code == Code::PermissionDenied => {
            let hint = if let Some(seed) = &config.nkey {
                format!("it does not know the identity in {}", seed.display())
            } else if config.has_identity() {
                "it does not know these credentials".to_string()
            } else {
                format!(
                    "no credentials given: use --nkey, --creds or --nats-user; berthd keeps the admin's seed in {}, readable by root",
                    admin_seed().display()
                )
            };
            anyhow::bail!("{} ({hint})", err.message)
        }
        Err(err) if err.code == Code::Unavailable => {
            anyhow::bail!("{} ({})", err.message, unavailable_hint(&err.message))
        }
        Err(err) => Err(err.into()),
    }
}

/// What to check when no server took the connection: the TLS settings
/// when the handshake failed on a certificate, else whether berthd runs.
fn unavailable_hint(message: &str) -> &'static str {
    let lower = message.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") {
        "TLS: --tls-ca names the CA of the server's certificate; a server that \
         verifies clients also needs --tls-cert and --tls-key"
    } else {
        "is berthd running?"
    }
}
