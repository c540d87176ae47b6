//! One registry repository as a pull sees it: its manifests, read with a
//! size cap, and its blobs, streamed from an offset.
//!
//! The distribution protocol is `oci-client`'s: it negotiates access (an
//! anonymous or basic-authenticated bearer token from the realm the
//! registry's `WWW-Authenticate` challenge names, or basic authentication
//! on every request when the registry asks for that) and streams blobs,
//! with a `Range` request from an offset. Manifests are the exception:
//! `oci-client` reads a manifest response whole before anything can look
//! at its size, and a registry may send any amount, so they are fetched
//! here with a read that stops past the cap, on a client made with the
//! same TLS settings and the token `oci-client` negotiated.
//!
//! Plain HTTP is used for a registry on a loopback address and for one the
//! request marks insecure; every other registry is reached over HTTPS with
//! the system's roots.
//!
//! # Limitations
//!
//! Foreign layers' `urls` are not followed: every blob comes from the
//! registry the reference names. Docker credential helpers and identity
//! tokens (OAuth refresh tokens) are not used: credentials are a user and
//! password or a bearer token.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;

use super::error::{Cause, PullError};
use berth_oci::image::media_type;
use berth_oci::Reference;

/// How long a connection to a registry may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a registry may stay silent in the middle of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What berth tells registries it is.
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

/// The media types a manifest request accepts: both image formats' index
/// and manifest (a registry holding an index answers 404 to a client that
/// does not accept indexes).
const ACCEPT: [&str; 4] = [
    media_type::OCI_INDEX,
    media_type::OCI_MANIFEST,
    media_type::DOCKER_MANIFEST_LIST,
    media_type::DOCKER_MANIFEST,
];

/// Credentials for a registry, as a pull request carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// User name for basic authentication or the token server.
    pub username: String,
    /// Its password.
    pub password: String,
    /// A bearer token, sent as is.
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs and error messages.
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    fn auth(&self) -> RegistryAuth {
        if !self.registry_token.is_empty() {
            RegistryAuth::Bearer(self.registry_token.clone())
        } else if !self.username.is_empty() || !self.password.is_empty() {
            RegistryAuth::Basic(self.username.clone(), self.password.clone())
        } else {
            RegistryAuth::Anonymous
        }
    }

    fn given(&self) -> bool {
        !matches!(self.auth(), RegistryAuth::Anonymous)
    }
}

/// A manifest or index as the registry sent it.
pub struct Document {
    /// Its bytes, at most the cap asked for.
    pub bytes: Bytes,
    /// The media type the registry named (`Content-Type`), if any.
    pub media_type: Option<String>,
}

/// A blob's bytes as they arrive.
pub struct BlobStream {
    /// Where the first chunk starts: the offset asked for, or 0 when the
    /// registry ignored the range.
    pub start: u64,
    /// The chunks.
    pub chunks: BoxStream<'static, std::io::Result<Bytes>>,
}

/// One repository of one registry, with access negotiated.
pub struct Registry {
    client: oci_client::Client,
    http: reqwest::Client,
    image: oci_client::Reference,
    credentials: Credentials,
    scheme: &'static str,
    /// The bearer token `oci-client` negotiated, for manifest requests.
    token: Option<String>,
}

impl Registry {
    /// Connects to the registry of `reference` and negotiates pull access
    /// to its repository. `Unreachable` when it does not answer;
    /// `Unauthorized` when its token server refuses the credentials.
    pub async fn connect(
        reference: &Reference,
        insecure: bool,
        credentials: Credentials,
    ) -> Result<Registry, PullError> {
        berth_bus::crypto::install();
        let tag = reference.tag.clone().unwrap_or_default();
        let image =
            oci_client::Reference::with_tag(reference.domain.clone(), reference.path.clone(), tag);
        let plain = insecure || is_loopback(reference.domain.as_str());
        let registry = image.resolve_registry().to_string();
        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::HttpsExcept(vec![registry])
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        let client =
            oci_client::Client::try_from(config).map_err(|err| PullError::Unreachable {
                registry: reference.domain.clone(),
                source: Box::new(err),
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|err| PullError::Unreachable {
                registry: reference.domain.clone(),
                source: Box::new(err),
            })?;
        let mut this = Registry {
            client,
            http,
            image,
            credentials,
            scheme: if plain { "http" } else { "https" },
            token: None,
        };
        let auth = this.credentials.auth();
        this.token = this
            .client
            .auth(&this.image, &auth, RegistryOperation::Pull)
            .await
            .map_err(|err| this.error("access", err))?;
        Ok(this)
    }

    /// The registry's host as the reference names it.
    pub fn host(&self) -> &str {
        self.image.registry()
    }

    /// The repository.
    pub fn repository(&self) -> &str {
        self.image.repository()
    }

    /// Fetches the manifest or index `tag_or_digest` names, refusing it
    /// (`ManifestTooLarge`) as soon as it is known to be over `limit`
    /// bytes, from its `Content-Length` or from what has arrived.
    pub async fn manifest(&self, tag_or_digest: &str, limit: u64) -> Result<Document, PullError> {
        let url = format!(
            "{}://{}/v2/{}/manifests/{tag_or_digest}",
            self.scheme,
            self.image.resolve_registry(),
            self.image.repository()
        );
        let what = format!("manifest {tag_or_digest}");
        let mut request = self.http.get(&url).header("Accept", ACCEPT.join(", "));
        request = match (&self.token, self.credentials.auth()) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let mut response = request.send().await.map_err(|err| self.unreachable(err))?;
        self.check_status(&what, &mut response).await?;

        let too_large = |size| PullError::ManifestTooLarge {
            registry: self.host().to_string(),
            what: tag_or_digest.to_string(),
            size,
            limit,
        };
        if let Some(length) = response.content_length().filter(|&len| len > limit) {
            return Err(too_large(Some(length)));
        }
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(|value| {
                value
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .filter(|value| !value.is_empty());
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| self.unreachable(err))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large(None));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Document {
            bytes: body.into(),
            media_type,
        })
    }

    /// Streams the blob `digest` from `offset` (a range request when it is
    /// past 0). The chunks are not verified here: the caller writes them
    /// to an ingest, whose commit checks digest and size.
    pub async fn blob(&self, digest: &str, offset: u64) -> Result<BlobStream, PullError> {
        let what = format!("blob {digest}");
        let response = self
            .client
            .pull_blob_stream_partial(&self.image, digest, offset, None)
            .await
            .map_err(|err| self.error(&what, err))?;
        let (start, stream) = match response {
            BlobResponse::Partial(stream) => (offset, stream),
            BlobResponse::Full(stream) => (0, stream),
        };
        Ok(BlobStream {
            start,
            chunks: stream.stream,
        })
    }

    /// Reads a whole blob of at most `limit` bytes (an image config).
    pub async fn small_blob(&self, digest: &str, limit: u64) -> Result<Bytes, PullError> {
        let mut stream = self.blob(digest, 0).await?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.chunks.next().await {
            let held = body.len() as u64;
            let chunk = chunk.map_err(|err| self.interrupted(digest, held, 0, Box::new(err)))?;
            if (body.len() + chunk.len()) as u64 > limit {
                // The caller's checks name the cap: hand it one byte past it.
                body.extend_from_slice(&chunk[..(limit as usize + 1 - body.len())]);
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.into())
    }

    /// `Interrupted` for the blob `digest` of `size` bytes whose stream
    /// broke off with `err` when `offset` bytes of it were held.
    pub fn interrupted(&self, digest: &str, offset: u64, size: u64, err: Cause) -> PullError {
        PullError::Interrupted {
            digest: digest.to_string(),
            registry: self.host().to_string(),
            offset,
            size,
            source: Some(err),
        }
    }

    /// Maps a non-success status of a manifest request to its error.
    async fn check_status(
        &self,
        what: &str,
        response: &mut reqwest::Response,
    ) -> Result<(), PullError> {
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        match status.as_u16() {
            401 | 403 => Err(self.unauthorized()),
            404 => Err(PullError::ManifestNotFound {
                reference: self.full_name(what),
            }),
            code => {
                let body = response.chunk().await.ok().flatten().unwrap_or_default();
                let message = String::from_utf8_lossy(&body[..body.len().min(200)]);
                Err(PullError::Refused {
                    registry: self.host().to_string(),
                    what: what.to_string(),
                    status: code,
                    message: message.trim().to_string(),
                })
            }
        }
    }

    /// `<registry>/<repository>:<tag>` or `@<digest>`, from `manifest X`.
    fn full_name(&self, what: &str) -> String {
        let asked = what.strip_prefix("manifest ").unwrap_or(what);
        let separator = if asked.contains(':') { '@' } else { ':' };
        format!(
            "{}/{}{separator}{asked}",
            self.image.registry(),
            self.image.repository()
        )
    }

    fn unauthorized(&self) -> PullError {
        PullError::Unauthorized {
            registry: self.host().to_string(),
            repository: self.repository().to_string(),
            given: self.credentials.given(),
        }
    }

    fn unreachable(&self, err: reqwest::Error) -> PullError {
        PullError::Unreachable {
            registry: self.host().to_string(),
            source: Box::new(err),
        }
    }

    /// Maps an `oci-client` failure of `what` (`access`, `blob <digest>`)
    /// to its class.
    fn error(&self, what: &str, err: OciDistributionError) -> PullError {
        use OciDistributionError as E;
        let registry = self.host().to_string();
        let refused = |status: u16, message: String| PullError::Refused {
            registry: registry.clone(),
            what: what.to_string(),
            status,
            message,
        };
        let not_found = || match what.strip_prefix("blob ") {
            Some(digest) => PullError::BlobNotFound {
                digest: digest.to_string(),
                registry: registry.clone(),
                repository: self.repository().to_string(),
            },
            None => PullError::ManifestNotFound {
                reference: self.image.whole(),
            },
        };
        match err {
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => self.unauthorized(),
            E::RegistryError { envelope, .. } => {
                let first = envelope.errors.first();
                match first.map(|e| &e.code) {
                    Some(
                        OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound,
                    ) => not_found(),
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => self.unauthorized(),
                    Some(OciErrorCode::Toomanyrequests) => {
                        refused(429, first.map(|e| e.message.clone()).unwrap_or_default())
                    }
                    _ => refused(400, envelope.to_string()),
                }
            }
            E::ServerError { code: 404, .. } => not_found(),
            E::ServerError {
                code: 401 | 403, ..
            } => self.unauthorized(),
            E::ServerError { code, message, .. } => refused(code, message),
            E::RequestError(source) => PullError::Unreachable {
                registry,
                source: Box::new(source),
            },
            E::IoError(source) => PullError::Unreachable {
                registry,
                source: Box::new(source),
            },
            other => PullError::Protocol {
                registry,
                what: what.to_string(),
                reason: other.to_string(),
            },
        }
    }
}

/// True for `localhost` and loopback addresses, with or without a port.
pub fn is_loopback(host: &str) -> bool {
    // `[::1]:5000`, `127.0.0.1:5000`, `localhost:5000`, `::1`.
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None if host.matches(':').count() > 1 => host,
        None => host.split(':').next().unwrap_or_default(),
    };
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a blob stream's error is `oci-client`'s digest check of a whole
/// stream (the bytes were all delivered; the commit will refuse them).
pub fn is_digest_check(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loopback registries are told by name or address, ports or not.
    #[test]
    fn loopback_hosts() {
        let cases = [
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("localhost:5000", true),
            ("LOCALHOST", true),
            ("[::1]:5000", true),
            ("::1", true),
            ("docker.io", false),
            ("10.0.0.1:5000", false),
            ("localhost.example.com", false),
            ("[2001:db8::1]:443", false),
        ];
        for (host, loopback) in cases {
            assert_eq!(is_loopback(host), loopback, "{host}");
        }
    }
}
