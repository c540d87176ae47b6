//! Typed request/reply over NATS, with a timeout on every call.
//!
//! A call fails fast where the answer is known: `InvalidArgument` before
//! anything is sent for a subject or request id that is not made of valid
//! tokens, `Unavailable` as soon as the server reports no responder, and
//! `PermissionDenied` as soon as the server refuses the publish or the reply
//! inbox (on connections made by [`crate::connect`]). Only a reply that is
//! simply late waits for the timeout.

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use prost::Message;

use crate::conn::{self, Refusals};
use crate::error::{Code, Error, Result};
use crate::subject;

/// The header carrying a mutating request's caller-chosen id.
pub const REQUEST_ID: &str = "Berth-Request-Id";
/// The micro-service protocol's error code header.
pub const ERROR_CODE: &str = "Nats-Service-Error-Code";
/// The micro-service protocol's error message header.
pub const ERROR_MESSAGE: &str = "Nats-Service-Error";

/// How long a call waits for its reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The room [`Client::max_body`] leaves for headers and framing: trace
/// context, request id, message id, error headers and the protobuf field
/// around a chunk take well under a kilobyte.
pub const HEADER_ROOM: usize = 8 * 1024;

/// The body size [`Client::max_body`] answers before the connection is up
/// and the server's max payload is known; every NATS server accepts it.
pub const MIN_BODY: usize = 4096;

/// A fresh request id for a mutating request.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A connection that sends berth requests.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
    refusals: Option<Refusals>,
    inbox_prefix: String,
}

impl Client {
    /// Wraps a NATS connection; calls wait at most `timeout` for a reply.
    ///
    /// # Limitations
    /// Only a connection made by [`crate::connect`] or
    /// [`crate::connect_with`] reports permission refusals; on any other a
    /// forbidden request answers `DeadlineExceeded` after the timeout.
    pub fn new(nats: async_nats::Client, timeout: Duration) -> Self {
        // Replies arrive under `<prefix>.<connection id>.*`; the prefix is
        // what a fresh inbox holds before its last token.
        let inbox = nats.new_inbox();
        let inbox_prefix = match inbox.rsplit_once('.') {
            Some((prefix, _)) => prefix.to_string(),
            None => inbox,
        };
        Client {
            refusals: conn::refusals_of(&nats),
            nats,
            timeout,
            inbox_prefix,
        }
    }

    /// The NATS connection underneath.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The timeout of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same connection with another timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The largest body one message may carry: the server's max payload
    /// (which counts headers too) less [`HEADER_ROOM`], or half of it on a
    /// server configured below twice that; [`MIN_BODY`] while the
    /// connection is not up yet.
    pub fn max_body(&self) -> usize {
        let max_payload = self.nats.server_info().max_payload;
        if max_payload == 0 {
            return MIN_BODY;
        }
        max_payload.saturating_sub(HEADER_ROOM).max(max_payload / 2)
    }

    /// Sends a read-only request and decodes its reply.
    ///
    /// `Unavailable` at once when nothing serves the subject,
    /// `DeadlineExceeded` when no reply came within the timeout, and the
    /// service's own error otherwise.
    pub async fn call<Req: Message, Rep: Message + Default>(
        &self,
        subject: &str,
        request: &Req,
    ) -> Result<Rep> {
        let reply = self
            .call_raw(subject, request.encode_to_vec().into(), None)
            .await?;
        Ok(Rep::decode(reply)?)
    }

    /// Sends a mutating request under `request_id`: a retry with the same id
    /// returns the first outcome.
    pub async fn call_mut<Req: Message, Rep: Message + Default>(
        &self,
        subject: &str,
        request: &Req,
        request_id: &str,
    ) -> Result<Rep> {
        let body = request.encode_to_vec().into();
        let reply = self.call_raw(subject, body, Some(request_id)).await?;
        Ok(Rep::decode(reply)?)
    }

    /// Sends raw bytes and returns the raw reply, mapping errors.
    ///
    /// `InvalidArgument` before anything is sent when `subject` or
    /// `request_id` is not made of valid tokens or names a reserved
    /// namespace; `PermissionDenied` when the server refuses the subject or
    /// the reply inbox; otherwise as [`Client::call`].
    pub async fn call_raw(
        &self,
        subject: &str,
        body: Bytes,
        request_id: Option<&str>,
    ) -> Result<Bytes> {
        subject::check_request(subject)?;
        if let Some(request_id) = request_id {
            subject::check_token("request id", request_id)?;
        }

        // A refused reply inbox dooms every request: answer at once.
        let refusals = self.refusals.as_ref();
        if let Some(err) = refusals.and_then(|r| r.inbox_refused(&self.inbox_prefix)) {
            return Err(err);
        }
        // Listen before sending, so a refusal cannot slip past.
        let live = refusals.map(Refusals::listen);

        let mut headers = HeaderMap::new();
        crate::trace::inject(&mut headers);
        if let Some(request_id) = request_id {
            headers.insert(REQUEST_ID, request_id);
        }
        let request = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(self.timeout));
        let started = std::time::Instant::now();
        let reply = self.nats.send_request(subject.to_string(), request);
        let message = match live {
            Some(live) => tokio::select! {
                reply = reply => reply.map_err(|err| request_error(subject, err))?,
                err = conn::refusal_of(live, subject, &self.inbox_prefix) => return Err(err),
            },
            None => reply.await.map_err(|err| request_error(subject, err))?,
        };
        let elapsed_us = started.elapsed().as_micros() as u64;
        tracing::debug!(%subject, elapsed_us, "reply received");
        if let Some(err) = reply_error(message.headers.as_ref()) {
            return Err(err);
        }
        Ok(message.payload)
    }
}

/// Reads an error reply's headers, if the reply is one.
pub fn reply_error(headers: Option<&HeaderMap>) -> Option<Error> {
    let headers = headers?;
    let code = headers.get(ERROR_CODE)?.as_str().parse::<u16>().ok()?;
    let message = headers
        .get(ERROR_MESSAGE)
        .map(|value| value.as_str().to_string())
        .unwrap_or_default();
    Some(Error::new(Code::from_u16(code), message))
}

fn request_error(subject: &str, err: async_nats::RequestError) -> Error {
    let service = subject.split('.').nth(3).unwrap_or(subject);
    match err.kind() {
        // The server answers this both when the service is down and when
        // a running service does not serve the op (see `serve`).
        RequestErrorKind::NoResponders => Error::unavailable(format!(
            "no responder on {subject}: the {service} service is not running or does not serve this operation"
        )),
        RequestErrorKind::TimedOut => Error::new(
            Code::DeadlineExceeded,
            format!("no reply from the {service} service on {subject} in time"),
        ),
        RequestErrorKind::InvalidSubject => Error::invalid(format!("invalid subject {subject:?}")),
        RequestErrorKind::MaxPayloadExceeded => Error::invalid(format!(
            "request to {subject} is larger than the server's max payload"
        )),
        RequestErrorKind::Other => Error::unavailable(format!("request to {subject}: {err}")),
    }
}
