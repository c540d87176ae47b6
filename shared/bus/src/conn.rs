//! Connections, and the permission refusals the server reports on them.
//!
//! When NATS authorization forbids a publish, the server drops the message
//! and sends `-ERR 'Permissions Violation for Publish to "SUBJECT"'` on the
//! connection; async-nats surfaces that as a connection event, while the
//! request itself would only time out. A connection made by [`connect`] or
//! [`connect_with`] listens to those events, and every [`Client`] on it races
//! its reply against a refusal of its subject, so a forbidden request answers
//! `PermissionDenied` as soon as the server says no.
//!
//! The same holds for the reply inbox: async-nats subscribes once to
//! `<inbox prefix>.<id>.*` for every reply of the connection. A user who may
//! not subscribe there can never get a reply, so that refusal is remembered
//! and every later request on the connection answers `PermissionDenied` at
//! once, until a reconnect subscribes again.
//!
//! Limitation: async-nats queues at most 128 connection events and drops
//! the rest, and a waiting request that falls 64 refusals behind skips
//! them; a refusal lost that way leaves its request to end by its timeout,
//! as it would without the watch.
//!
//! [`Client`]: crate::Client

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use async_nats::client::Statistics;
use async_nats::{ConnectOptions, Event, ServerError};
use tokio::sync::broadcast;

use crate::config::ConnectConfig;
use crate::error::{Code, Error, Result};

/// Connects to NATS at `url` as client `name`, with the identity and TLS
/// settings of the environment ([`ConnectConfig::from_env`]), so a service
/// binary runs under authorization with no flags of its own.
///
/// The first connection is retried in the background, so this returns at
/// once; requests sent before it is up wait in the client's buffer, up to
/// their timeout. Permission refusals on the connection become
/// `PermissionDenied` for [`crate::Client`]s made from it.
///
/// `InvalidArgument` when the environment's settings clash or name a file
/// that cannot be read.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client> {
    let mut config = ConnectConfig::from_env(url, name);
    config.retry_initial_connect = true;
    connect_with_config(&config).await
}

/// Connects as `config` says, with the permission watch of [`connect`].
///
/// Only without `retry_initial_connect` does the first connection's
/// outcome show here: `PermissionDenied` when the server refuses the
/// identity (or the lack of one), `Unavailable` when it cannot be reached
/// or TLS fails, with the reason in the message. `InvalidArgument` for
/// settings that clash or files that cannot be read, either way.
pub async fn connect_with_config(config: &ConnectConfig) -> Result<async_nats::Client> {
    connect_with(&config.url, config.options()?).await
}

/// Connects to NATS at `url` with the caller's `options` (credentials, TLS,
/// reconnect policy), adding the permission watch of [`connect`]. `url`
/// may list the servers of a cluster, separated by commas
/// ([`server_urls`]).
///
/// `Unavailable` when the connection cannot be made (only without
/// `retry_on_initial_connect`).
///
/// # Limitations
/// The watch takes the options' event callback: one set by the caller is
/// replaced. Connection events are still logged by async-nats itself.
pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<async_nats::Client> {
    let refusals = Refusals::default();
    let watch = refusals.clone();
    let options = options.event_callback(move |event| {
        watch.observe(&event);
        async {}
    });
    let nats = options
        .connect(server_urls(url))
        .await
        .map_err(|err| connect_error(url, &err))?;
    register(&nats, refusals);
    Ok(nats)
}

/// The servers of `url`: one URL, or several separated by commas (the
/// servers of one cluster, tried in turn and on every reconnect, besides
/// those the cluster itself announces).
pub fn server_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
        .collect()
}

/// The error of a failed first connection: `PermissionDenied` when the
/// server refused the identity (or its absence), else `Unavailable`.
fn connect_error(url: &str, err: &async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as Kind;
    match err.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => Error::new(
            Code::PermissionDenied,
            format!("NATS at {url} refused the connection: {}", err.kind()),
        ),
        Kind::Tls => Error::unavailable(format!("TLS with NATS at {url} failed: {err}")),
        _ => Error::unavailable(format!("cannot reach NATS at {url}: {err}")),
    }
}

/// What the server refused on one connection.
#[derive(Clone, Debug)]
pub(crate) struct Refusals {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Every refusal as it arrives, for the requests waiting now.
    live: broadcast::Sender<Violation>,
    /// Subscriptions the server refused since the last (re)connect.
    subscriptions: Mutex<HashSet<String>>,
}

impl Default for Refusals {
    fn default() -> Self {
        let (live, _) = broadcast::channel(64);
        Refusals {
            inner: Arc::new(Inner {
                live,
                subscriptions: Mutex::new(HashSet::new()),
            }),
        }
    }
}

/// One permission violation the server reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A publish to this subject was dropped.
    Publish(String),
    /// A subscription to this subject was refused.
    Subscribe(String),
}

impl Refusals {
    /// Records what a connection event says about permissions.
    fn observe(&self, event: &Event) {
        match event {
            // A reconnect subscribes again, and the server may now allow it.
            Event::Connected => self.lock().clear(),
            Event::ServerError(ServerError::Other(text)) => {
                let Some(violation) = parse_violation(text) else {
                    return;
                };
                if let Violation::Subscribe(subject) = &violation {
                    self.lock().insert(subject.clone());
                }
                // Nobody waiting is fine: the refusal belonged to no request.
                let _ = self.inner.live.send(violation);
            }
            _ => {}
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set holds plain strings: a panic while it was held left it
        // whole, so a poisoned lock is still usable.
        self.inner
            .subscriptions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The refusal, if any, of the reply subscription under `inbox_prefix`.
    pub(crate) fn inbox_refused(&self, inbox_prefix: &str) -> Option<Error> {
        self.lock()
            .iter()
            .find(|subject| is_under(subject, inbox_prefix))
            .map(|subject| denied(&Violation::Subscribe(subject.clone())))
    }

    /// A receiver of the refusals from now on.
    pub(crate) fn listen(&self) -> broadcast::Receiver<Violation> {
        self.inner.live.subscribe()
    }
}

/// Waits for a refusal that dooms a request to `subject` whose reply comes
/// to an inbox under `inbox_prefix`; pending forever when none comes.
pub(crate) async fn refusal_of(
    mut live: broadcast::Receiver<Violation>,
    subject: &str,
    inbox_prefix: &str,
) -> Error {
    loop {
        match live.recv().await {
            Ok(violation) => {
                let dooms = match &violation {
                    Violation::Publish(refused) => refused == subject,
                    Violation::Subscribe(refused) => is_under(refused, inbox_prefix),
                };
                if dooms {
                    return denied(&violation);
                }
            }
            // Refusals missed while lagging are lost to this request, which
            // then ends by its timeout as it would have without the watch.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

/// Waits for the server to refuse a publish to `subject` on `nats`, or the
/// subscription to its reply inbox, and answers the `PermissionDenied` a
/// [`crate::Client`] would; pending forever when no refusal comes (and on
/// a connection [`connect_with`] did not make). Listening starts when this
/// is called, so call it before sending.
///
/// For requests made outside [`crate::Client`] (JetStream's API calls):
/// race the request against this, so a refusal ends it at once.
pub fn refusal(
    nats: &async_nats::Client,
    subject: &str,
) -> impl std::future::Future<Output = Error> + use<> {
    let live = refusals_of(nats).map(|refusals| refusals.listen());
    let inbox = nats.new_inbox();
    let inbox_prefix = match inbox.rsplit_once('.') {
        Some((prefix, _)) => prefix.to_string(),
        None => inbox,
    };
    let subject = subject.to_string();
    async move {
        match live {
            Some(live) => refusal_of(live, &subject, &inbox_prefix).await,
            None => std::future::pending().await,
        }
    }
}

/// The error a refused request answers.
fn denied(violation: &Violation) -> Error {
    let message = match violation {
        Violation::Publish(subject) => format!("permission denied: may not publish to {subject}"),
        Violation::Subscribe(subject) => {
            format!("permission denied: may not subscribe to {subject}, where replies arrive")
        }
    };
    Error::new(Code::PermissionDenied, message)
}

fn is_under(subject: &str, prefix: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('.'))
}

/// Reads the server's permission violation texts:
/// `Permissions Violation for Publish to "SUBJECT"` and
/// `Permissions Violation for Subscription to "SUBJECT"` (optionally
/// followed by ` using queue "QUEUE"`).
pub(crate) fn parse_violation(text: &str) -> Option<Violation> {
    let rest = text.strip_prefix("Permissions Violation for ")?;
    if let Some(quoted) = rest.strip_prefix("Publish to ") {
        return first_quoted(quoted).map(Violation::Publish);
    }
    if let Some(quoted) = rest.strip_prefix("Subscription to ") {
        return first_quoted(quoted).map(Violation::Subscribe);
    }
    None
}

/// The first `"…"` of `text`. Subjects hold no quotes or backslashes that
/// the server would escape, so no unescaping is needed.
fn first_quoted(text: &str) -> Option<String> {
    let inner = text.strip_prefix('"')?;
    let end = inner.find('"')?;
    Some(inner[..end].to_string())
}

/// The watches of live connections, keyed by the connection's statistics,
/// which every clone of an `async_nats::Client` shares and nothing else has.
type Registry = Vec<(Weak<Statistics>, Refusals)>;

static REGISTRY: Mutex<Registry> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn register(nats: &async_nats::Client, refusals: Refusals) {
    let stats = Arc::downgrade(&nats.statistics());
    let mut registry = registry();
    registry.retain(|(stats, _)| stats.strong_count() > 0);
    registry.push((stats, refusals));
}

/// The watch of the connection `nats`, if [`connect_with`] made it.
pub(crate) fn refusals_of(nats: &async_nats::Client) -> Option<Refusals> {
    let stats = nats.statistics();
    registry()
        .iter()
        .find(|(known, _)| std::ptr::eq(known.as_ptr(), Arc::as_ptr(&stats)))
        .map(|(_, refusals)| refusals.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_may_list_the_servers_of_a_cluster() {
        assert_eq!(server_urls("nats://a:4222"), ["nats://a:4222"]);
        assert_eq!(
            server_urls("nats://a:4222, nats://b:4222,,nats://c:4222"),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
    }

    #[test]
    fn reads_the_servers_violation_texts() {
        let cases = [
            (
                r#"Permissions Violation for Publish to "berth.v1.b.metadata.images.list""#,
                Some(Violation::Publish("berth.v1.b.metadata.images.list".into())),
            ),
            (
                r#"Permissions Violation for Subscription to "_INBOX.abc.*""#,
                Some(Violation::Subscribe("_INBOX.abc.*".into())),
            ),
            (
                r#"Permissions Violation for Subscription to "a.b" using queue "q""#,
                Some(Violation::Subscribe("a.b".into())),
            ),
            (
                r#"Permissions Violation for Publish with Reply of "_R_.x""#,
                None,
            ),
            ("Maximum Payload Violation", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_violation(text), expected, "{text}");
        }
    }

    #[test]
    fn inbox_refusals_match_only_their_prefix() {
        let refusals = Refusals::default();
        refusals.observe(&Event::ServerError(ServerError::Other(
            r#"Permissions Violation for Subscription to "_INBOX.abc.*""#.into(),
        )));
        let err = refusals.inbox_refused("_INBOX").unwrap();
        assert_eq!(err.code, Code::PermissionDenied);
        assert!(refusals.inbox_refused("_INBOX_OTHER").is_none());
        refusals.observe(&Event::Connected);
        assert!(refusals.inbox_refused("_INBOX").is_none());
    }
}
