//! Connection settings: where the NATS server is, who berth is on it, and
//! how the link is protected.
//!
//! A [`ConnectConfig`] names one identity, given in one of three ways: a
//! user and password, an nkey seed file (the server knows only the public
//! key), or a credentials file (a user JWT with its seed, as `nsc` writes
//! them). TLS takes a CA bundle to trust and, where the server verifies
//! clients, a certificate and its key. Every setting also has an
//! environment variable ([`env`]), which is how the service binaries take
//! them: [`crate::connect`] reads them, so a service needs no flags of its
//! own to run under authorization.
//!
//! Each identity gets its own reply inbox prefix, `_INBOX_<identity>`, where
//! the identity is the user name or the nkey's public key
//! ([`inbox_prefix_for`]). The server's permissions let each user subscribe
//! to its own prefix only, so no client can read the replies sent to
//! another.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::ConnectOptions;

use crate::error::{Error, Result};

/// The environment variables [`ConnectConfig::from_env`] reads.
pub mod env {
    /// The NATS URL.
    pub const URL: &str = "BERTH_NATS_URL";
    /// A user name (with [`PASSWORD`]).
    pub const USER: &str = "BERTH_NATS_USER";
    /// The user's password.
    pub const PASSWORD: &str = "BERTH_NATS_PASSWORD";
    /// The path of a file holding an nkey seed (`SU…`).
    pub const NKEY: &str = "BERTH_NATS_NKEY";
    /// The path of a credentials file (user JWT and seed).
    pub const CREDS: &str = "BERTH_NATS_CREDS";
    /// The path of the CA bundle that signed the server's certificate.
    pub const TLS_CA: &str = "BERTH_TLS_CA";
    /// The path of this client's certificate (PEM).
    pub const TLS_CERT: &str = "BERTH_TLS_CERT";
    /// The path of this client's private key (PEM).
    pub const TLS_KEY: &str = "BERTH_TLS_KEY";
    /// Overrides the reply inbox prefix derived from the identity.
    pub const INBOX_PREFIX: &str = "BERTH_NATS_INBOX_PREFIX";
}

/// The inbox prefix every client without an identity uses.
pub const DEFAULT_INBOX_PREFIX: &str = "_INBOX";

/// The reply inbox prefix of `identity` (a user name or an nkey public
/// key): `_INBOX_<identity>`, with anything a subject token may not hold
/// turned into `_`. Server permissions and clients both derive it here.
pub fn inbox_prefix_for(identity: &str) -> String {
    let token: String = identity
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    format!("{DEFAULT_INBOX_PREFIX}_{token}")
}

/// Where NATS is and how to connect to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectConfig {
    /// The server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The client name the server shows for the connection.
    pub name: String,
    /// User name, for user and password authentication.
    pub user: Option<String>,
    /// The user's password.
    pub password: Option<String>,
    /// A file holding an nkey seed.
    pub nkey: Option<PathBuf>,
    /// A credentials file (a user JWT and its seed).
    pub creds: Option<PathBuf>,
    /// The CA bundle to verify the server's certificate with; setting any
    /// TLS field requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate, for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    /// The key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The reply inbox prefix; `None` derives it from the identity
    /// ([`inbox_prefix_for`]), or `_INBOX` without one.
    pub inbox_prefix: Option<String>,
    /// Keep retrying the first connection in the background and return at
    /// once (services), instead of failing when the server does not answer
    /// (the CLI). Off by default.
    pub retry_initial_connect: bool,
}

impl ConnectConfig {
    /// A connection to `url` named `name`, with no identity and no TLS.
    pub fn new(url: &str, name: &str) -> Self {
        ConnectConfig {
            url: url.to_string(),
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// A connection to `url` named `name`, with the identity and TLS the
    /// [`env`] variables give (unset or empty ones are left out).
    pub fn from_env(url: &str, name: &str) -> Self {
        Self::new(url, name).with_env()
    }

    /// This configuration with each unset field taken from its [`env`]
    /// variable, when that is set and not empty.
    pub fn with_env(mut self) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let path = |name: &str| var(name).map(PathBuf::from);
        self.user = self.user.or_else(|| var(env::USER));
        self.password = self.password.or_else(|| var(env::PASSWORD));
        self.nkey = self.nkey.or_else(|| path(env::NKEY));
        self.creds = self.creds.or_else(|| path(env::CREDS));
        self.tls_ca = self.tls_ca.or_else(|| path(env::TLS_CA));
        self.tls_cert = self.tls_cert.or_else(|| path(env::TLS_CERT));
        self.tls_key = self.tls_key.or_else(|| path(env::TLS_KEY));
        self.inbox_prefix = self.inbox_prefix.or_else(|| var(env::INBOX_PREFIX));
        self
    }

    /// True when the configuration names an identity (user, nkey or creds).
    pub fn has_identity(&self) -> bool {
        self.user.is_some() || self.nkey.is_some() || self.creds.is_some()
    }

    /// Checks that the settings go together: at most one identity, a
    /// password only with a user, a certificate only with its key.
    ///
    /// `InvalidArgument` naming the settings that clash.
    pub fn check(&self) -> Result<()> {
        let identities = [
            self.user.is_some(),
            self.nkey.is_some(),
            self.creds.is_some(),
        ];
        if identities.into_iter().filter(|set| *set).count() > 1 {
            return Err(Error::invalid(
                "connection settings name more than one identity: give one of a user, an nkey seed or a credentials file",
            ));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid("a NATS password needs a user name"));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::invalid(
                "a TLS client certificate and its key go together: give both",
            ));
        }
        if let Some(prefix) = &self.inbox_prefix {
            crate::subject::check_token("inbox prefix", prefix)?;
        }
        Ok(())
    }

    /// The reply inbox prefix this configuration connects with: the one
    /// given, or the identity's ([`inbox_prefix_for`]), or `_INBOX`.
    ///
    /// `InvalidArgument` when a seed or credentials file cannot be read or
    /// holds no valid seed.
    pub fn resolved_inbox_prefix(&self) -> Result<String> {
        if let Some(prefix) = &self.inbox_prefix {
            return Ok(prefix.clone());
        }
        if let Some(user) = &self.user {
            return Ok(inbox_prefix_for(user));
        }
        if let Some(path) = &self.nkey {
            return Ok(inbox_prefix_for(&public_key(&read_seed(path)?)?));
        }
        if let Some(path) = &self.creds {
            let text = read_secret(path, "credentials file")?;
            let seed = creds_seed(&text).ok_or_else(|| {
                Error::invalid(format!(
                    "credentials file {} holds no user nkey seed",
                    path.display()
                ))
            })?;
            return Ok(inbox_prefix_for(&public_key(&seed)?));
        }
        Ok(DEFAULT_INBOX_PREFIX.to_string())
    }

    /// The async-nats options of this configuration (without the
    /// permission watch, which [`crate::connect_with`] adds).
    ///
    /// `InvalidArgument` for settings that clash ([`ConnectConfig::check`])
    /// or a seed, credentials or TLS file that cannot be read.
    pub fn options(&self) -> Result<ConnectOptions> {
        self.check()?;
        let mut options = ConnectOptions::new()
            .name(&self.name)
            .connection_timeout(Duration::from_secs(2))
            .custom_inbox_prefix(self.resolved_inbox_prefix()?);
        if self.retry_initial_connect {
            options = options.retry_on_initial_connect();
        }

        // The identity.
        if let Some(user) = &self.user {
            let password = self.password.clone().unwrap_or_default();
            options = options.user_and_password(user.clone(), password);
        }
        if let Some(path) = &self.nkey {
            options = options.nkey(read_seed(path)?);
        }
        if let Some(path) = &self.creds {
            let text = read_secret(path, "credentials file")?;
            options = options.credentials(&text).map_err(|err| {
                Error::invalid(format!(
                    "credentials file {} is not valid: {err}",
                    path.display()
                ))
            })?;
        }

        // TLS: any TLS setting means the link must be encrypted.
        if let Some(ca) = &self.tls_ca {
            check_readable(ca, "TLS CA bundle")?;
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            check_readable(cert, "TLS certificate")?;
            check_readable(key, "TLS key")?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_ca.is_some() || self.tls_cert.is_some() {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Reads a secret file, naming it in the error.
fn read_secret(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|err| Error::invalid(format!("cannot read {what} {}: {err}", path.display())))
}

fn check_readable(path: &Path, what: &str) -> Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|err| Error::invalid(format!("cannot read {what} {}: {err}", path.display())))
}

/// The user seed in an nkey seed file: its first word that starts with
/// `SU` (the file may hold comments or a trailing newline).
pub fn read_seed(path: &Path) -> Result<String> {
    let text = read_secret(path, "nkey seed file")?;
    text.split_whitespace()
        .find(|word| word.starts_with("SU"))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::invalid(format!(
                "nkey seed file {} holds no user seed (a word starting with SU)",
                path.display()
            ))
        })
}

/// The public key (`U…`) of a user seed.
pub fn public_key(seed: &str) -> Result<String> {
    let pair = nkeys::KeyPair::from_seed(seed)
        .map_err(|err| Error::invalid(format!("invalid nkey seed: {err}")))?;
    Ok(pair.public_key())
}

/// The seed in a credentials file: the first `SU…` line after the
/// `BEGIN USER NKEY SEED` marker.
fn creds_seed(text: &str) -> Option<String> {
    let (_, after) = text.split_once("BEGIN USER NKEY SEED")?;
    after
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_prefixes_are_tokens() {
        assert_eq!(inbox_prefix_for("task"), "_INBOX_task");
        assert_eq!(inbox_prefix_for("a.b c*"), "_INBOX_a_b_c_");
        crate::subject::check_token("inbox", &inbox_prefix_for("x.>y")).unwrap();
    }

    #[test]
    fn clashing_settings_are_refused() {
        let base = ConnectConfig::new("nats://127.0.0.1:4222", "t");
        let cases = [
            ConnectConfig {
                user: Some("u".into()),
                nkey: Some("/k".into()),
                ..base.clone()
            },
            ConnectConfig {
                password: Some("p".into()),
                ..base.clone()
            },
            ConnectConfig {
                tls_cert: Some("/c".into()),
                ..base.clone()
            },
            ConnectConfig {
                inbox_prefix: Some("a.b".into()),
                ..base.clone()
            },
        ];
        for config in cases {
            assert!(config.check().is_err(), "{config:?}");
        }
        base.check().unwrap();
    }

    #[test]
    fn identities_give_their_inbox_prefix() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed()?;
        let seed_file = dir.path().join("u.nk");
        std::fs::write(&seed_file, format!("{seed}\n"))?;
        let creds_file = dir.path().join("u.creds");
        std::fs::write(
            &creds_file,
            format!("-----BEGIN NATS USER JWT-----\nx.y.z\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"),
        )?;

        let base = ConnectConfig::new("nats://127.0.0.1:4222", "t");
        let expected = inbox_prefix_for(&pair.public_key());
        let by_seed = ConnectConfig {
            nkey: Some(seed_file),
            ..base.clone()
        };
        assert_eq!(by_seed.resolved_inbox_prefix()?, expected);
        let by_creds = ConnectConfig {
            creds: Some(creds_file),
            ..base.clone()
        };
        assert_eq!(by_creds.resolved_inbox_prefix()?, expected);
        let by_user = ConnectConfig {
            user: Some("alice".into()),
            ..base.clone()
        };
        assert_eq!(by_user.resolved_inbox_prefix()?, "_INBOX_alice");
        assert_eq!(base.resolved_inbox_prefix()?, "_INBOX");
        Ok(())
    }
}
