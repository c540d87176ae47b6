//! Typed request/reply over NATS, with a timeout on every call.

use std::time::Duration;

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use prost::Message;

use crate::error::{Code, Error, Result};

/// The header carrying a mutating request's caller-chosen id.
pub const REQUEST_ID: &str = "Berth-Request-Id";
/// The micro-service protocol's error code header.
pub const ERROR_CODE: &str = "Nats-Service-Error-Code";
/// The micro-service protocol's error message header.
pub const ERROR_MESSAGE: &str = "Nats-Service-Error";

/// How long a call waits for its reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh request id for a mutating request.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A connection that sends berth requests.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    timeout: Duration,
}

impl Client {
    /// Wraps a NATS connection; calls wait at most `timeout` for a reply.
    pub fn new(nats: async_nats::Client, timeout: Duration) -> Self {
        Client { nats, timeout }
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
            nats: self.nats.clone(),
            timeout,
        }
    }

    /// The largest body one request may carry, leaving room for headers.
    pub fn max_body(&self) -> usize {
        self.nats
            .server_info()
            .max_payload
            .saturating_sub(8 * 1024)
            .max(4096)
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
    pub async fn call_raw(
        &self,
        subject: &str,
        body: Bytes,
        request_id: Option<&str>,
    ) -> Result<Bytes> {
        let mut headers = HeaderMap::new();
        crate::trace::inject(&mut headers);
        if let Some(request_id) = request_id {
            headers.insert(REQUEST_ID, request_id);
        }
        let request = async_nats::Request::new()
            .payload(body)
            .headers(headers)
            .timeout(Some(self.timeout));
        let message = self
            .nats
            .send_request(subject.to_string(), request)
            .await
            .map_err(|err| request_error(subject, err))?;
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
        RequestErrorKind::NoResponders => Error::unavailable(format!(
            "the {service} service is not running (no responder on {subject})"
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
