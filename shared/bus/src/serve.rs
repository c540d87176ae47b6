//! The serve loop, written once for every service.
//!
//! A service registers through the NATS micro-service protocol
//! (`async_nats::service`), so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`
//! discover it and count every endpoint. Each op is one endpoint on
//! `berth.v1.*.<service>[.<node>].<op>`. For each request the loop opens the
//! span (its parent taken from `traceparent`), reads the namespace from the
//! subject, decodes the body (a failure is `InvalidArgument`), runs the
//! handler under a deadline, replies with the body or with code and message,
//! and wakes the event publisher. Requests run concurrently, bounded by a
//! semaphore.
//!
//! An op the service does not serve has no endpoint, so the NATS server
//! itself answers the request at once with its no-responders status, which
//! the client reads as `Unavailable`. A catch-all subscription could name
//! the op in an `InvalidArgument` reply instead, but it would receive a copy
//! of every request (every chunk of every blob written) to answer the rare
//! one; the client's message says that either the service is down or it
//! does not serve the op.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::{self, ServiceExt};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, Semaphore};
use tracing::{Instrument, Span};

use crate::client::REQUEST_ID;
use crate::error::{Code, Error, Result};
use crate::subject;

/// What a handler knows of the request it serves.
#[derive(Debug, Clone)]
pub struct Call {
    namespace: String,
    node: Option<String>,
    subject: String,
    request_id: Option<String>,
    body_digest: [u8; 32],
    span: Span,
}

impl Call {
    /// The namespace named by the subject.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The node serving the request (node-local services).
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The request's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The caller's request id, if it sent one.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// The sha256 of the request body, to tell a retry from a reuse of its id.
    pub fn body_digest(&self) -> &[u8; 32] {
        &self.body_digest
    }

    /// Records a field on the request's span.
    pub fn record(&self, field: &str, value: &str) {
        self.span.record(field, value);
    }

    /// A call for work a service does on its own (tests, background jobs).
    pub fn internal(namespace: &str) -> Self {
        Call {
            namespace: namespace.to_string(),
            node: None,
            subject: String::new(),
            request_id: None,
            body_digest: [0; 32],
            span: Span::none(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type RawHandler<S> = Arc<dyn Fn(Arc<S>, Call, Bytes) -> BoxFuture<Result<Bytes>> + Send + Sync>;

struct Op<S> {
    name: &'static str,
    handler: RawHandler<S>,
}

/// A service under construction: its name, version, node and ops.
pub struct Service<S> {
    name: &'static str,
    version: String,
    description: String,
    node: Option<String>,
    state: Arc<S>,
    ops: Vec<Op<S>>,
    concurrency: usize,
    deadline: Duration,
    wake: Option<Arc<Notify>>,
}

impl<S: Send + Sync + 'static> Service<S> {
    /// A service named `name` (one of [`subject::SERVICES`]) at `version`,
    /// holding `state`. Defaults: 64 requests at once, 60 s per request.
    pub fn new(name: &'static str, version: &str, state: Arc<S>) -> Self {
        Service {
            name,
            version: version.to_string(),
            description: format!("berth {name} service"),
            node: None,
            state,
            ops: Vec::new(),
            concurrency: 64,
            deadline: Duration::from_secs(60),
            wake: None,
        }
    }

    /// Serves node-local subjects `berth.v1.*.<service>.<node>.<op>`.
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    /// How many requests may run at once.
    pub fn concurrency(mut self, limit: usize) -> Self {
        self.concurrency = limit.max(1);
        self
    }

    /// How long one request may run before it answers `DeadlineExceeded`.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Notified after every successful request, so the outbox publisher
    /// moves the events the request wrote without waiting for its timer.
    pub fn wake_on_reply(mut self, wake: Arc<Notify>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// Adds op `name`: decode `Req`, run `handler`, encode `Rep`.
    pub fn op<Req, Rep, F, Fut>(mut self, name: &'static str, handler: F) -> Self
    where
        Req: Message + Default + 'static,
        Rep: Message + 'static,
        F: Fn(Arc<S>, Call, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rep>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let raw: RawHandler<S> = Arc::new(move |state, call, body: Bytes| {
            let handler = handler.clone();
            Box::pin(async move {
                let request = Req::decode(body)?;
                let reply = handler(state, call, request).await?;
                Ok(Bytes::from(reply.encode_to_vec()))
            })
        });
        self.ops.push(Op { name, handler: raw });
        self
    }

    /// Registers the service and its endpoints and serves until the returned
    /// handle is stopped or the connection closes.
    pub async fn serve(self, nats: async_nats::Client) -> Result<Serving> {
        let service = nats
            .service_builder()
            .description(self.description.clone())
            .start(self.name, self.version.clone())
            .await
            .map_err(|err| Error::unavailable(format!("register {} service: {err}", self.name)))?;
        let limit = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = Vec::new();
        for op in &self.ops {
            let subject = match &self.node {
                Some(node) => format!("{}.*.{}.{node}.{}", subject::PREFIX, self.name, op.name),
                None => format!("{}.*.{}.{}", subject::PREFIX, self.name, op.name),
            };
            let endpoint = service
                .endpoint_builder()
                .name(op.name.replace('.', "-"))
                .add(subject.clone())
                .await
                .map_err(|err| Error::unavailable(format!("add endpoint {subject}: {err}")))?;
            let ctx = EndpointCtx {
                service: self.name,
                op: op.name,
                node: self.node.clone(),
                state: self.state.clone(),
                handler: op.handler.clone(),
                limit: limit.clone(),
                deadline: self.deadline,
                wake: self.wake.clone(),
            };
            tasks.push(tokio::spawn(ctx.run(endpoint)));
        }
        tracing::info!(service = self.name, node = ?self.node, ops = self.ops.len(), "service up");
        Ok(Serving { service, tasks })
    }
}

/// A running service.
pub struct Serving {
    service: service::Service,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Serving {
    /// Stops taking requests; requests in progress finish on their own.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.service.stop().await;
    }
}

struct EndpointCtx<S> {
    service: &'static str,
    op: &'static str,
    node: Option<String>,
    state: Arc<S>,
    handler: RawHandler<S>,
    limit: Arc<Semaphore>,
    deadline: Duration,
    wake: Option<Arc<Notify>>,
}

impl<S: Send + Sync + 'static> EndpointCtx<S> {
    async fn run(self, mut endpoint: service::endpoint::Endpoint) {
        let ctx = Arc::new(self);
        while let Some(request) = endpoint.next().await {
            let Ok(permit) = ctx.limit.clone().acquire_owned().await else {
                return;
            };
            let ctx = ctx.clone();
            tokio::spawn(async move {
                ctx.handle(request).await;
                drop(permit);
            });
        }
    }

    async fn handle(&self, request: service::Request) {
        let message = &request.message;
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("{}.{}", self.service, self.op),
            namespace = tracing::field::Empty,
            node = self.node.as_deref().unwrap_or(""),
            subject = %message.subject,
            container_id = tracing::field::Empty,
            digest = tracing::field::Empty,
            snapshot_key = tracing::field::Empty,
            error.code = tracing::field::Empty,
        );
        crate::trace::set_parent(&span, message.headers.as_ref());

        let started = std::time::Instant::now();
        let outcome = self
            .dispatch(message, span.clone())
            .instrument(span.clone())
            .await;
        let elapsed_us = started.elapsed().as_micros() as u64;
        span.in_scope(|| tracing::debug!(elapsed_us, ok = outcome.is_ok(), "request served"));
        let reply = match outcome {
            Ok(body) => Ok(body),
            Err(err) => {
                span.record("error.code", err.code.as_str());
                match err.code {
                    Code::Internal | Code::Unavailable => {
                        span.in_scope(|| tracing::error!(error = %err.message, "request failed"))
                    }
                    _ => span.in_scope(|| tracing::debug!(error = %err.message, "request refused")),
                }
                Err(service::error::Error {
                    status: single_line(&err.message),
                    code: err.code.as_u16() as usize,
                })
            }
        };
        let ok = reply.is_ok();
        if let Err(err) = request.respond(reply).await {
            span.in_scope(|| tracing::warn!(error = %err, "reply not sent"));
        }
        if ok {
            if let Some(wake) = &self.wake {
                wake.notify_one();
            }
        }
    }

    async fn dispatch(&self, message: &async_nats::Message, span: Span) -> Result<Bytes> {
        let parsed = subject::parse(&message.subject)?;
        span.record("namespace", parsed.namespace);
        let request_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(REQUEST_ID))
            .map(|value| value.as_str().to_string());
        if let Some(request_id) = &request_id {
            subject::check_token("request id", request_id)?;
        }
        let call = Call {
            namespace: parsed.namespace.to_string(),
            node: self.node.clone(),
            subject: message.subject.to_string(),
            request_id,
            body_digest: Sha256::digest(&message.payload).into(),
            span,
        };
        let work = (self.handler)(self.state.clone(), call, message.payload.clone());
        match tokio::time::timeout(self.deadline, work).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::new(
                Code::DeadlineExceeded,
                format!(
                    "{}.{} did not finish within {:?}",
                    self.service, self.op, self.deadline
                ),
            )),
        }
    }
}

/// Header values are one line; keep the first and mark the cut.
fn single_line(message: &str) -> String {
    let cleaned: String = message
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if cleaned.len() > 1024 {
        let mut end = 1024;
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &cleaned[..end])
    } else {
        cleaned
    }
}
