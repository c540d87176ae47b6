//! Subjects: `berth.v1.<namespace>.<service>[.<node>].<op>` for requests and
//! `berth.v1.<namespace>.events.<topic>` for events.
//!
//! Every token is checked before anything is sent: a token that NATS would
//! read as a wildcard or a separator would address other subjects than the
//! caller meant, so it is refused here with `InvalidArgument`.

use crate::error::{Error, Result};

/// The subject prefix of this wire version.
pub const PREFIX: &str = "berth.v1";

/// The longest token berth accepts.
pub const MAX_TOKEN_LEN: usize = 128;

/// The services; a namespace may not take one of these names, nor `events`.
pub const SERVICES: [&str; 5] = ["content", "snapshot", "metadata", "task", "gc"];

/// The token that separates events from requests.
pub const EVENTS: &str = "events";

/// Checks one subject token: not empty, at most [`MAX_TOKEN_LEN`] bytes, no
/// `.`, `*`, `>`, whitespace or control characters.
pub fn check_token(kind: &str, token: &str) -> Result<()> {
    if token.is_empty() {
        return Err(Error::invalid(format!("{kind} is empty")));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::invalid(format!(
            "{kind} {token:?} is longer than {MAX_TOKEN_LEN} bytes"
        )));
    }
    if let Some(c) = token
        .chars()
        .find(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    {
        return Err(Error::invalid(format!(
            "{kind} {token:?} holds the character {c:?}"
        )));
    }
    Ok(())
}

/// Checks a namespace name: a valid token that is not a reserved name.
pub fn check_namespace(namespace: &str) -> Result<()> {
    check_token("namespace", namespace)?;
    if SERVICES.contains(&namespace) || namespace == EVENTS {
        return Err(Error::invalid(format!(
            "namespace {namespace:?} is reserved"
        )));
    }
    Ok(())
}

/// The subject of a cluster service's operation.
pub fn op(namespace: &str, service: &str, op: &str) -> Result<String> {
    check_namespace(namespace)?;
    check_op(op)?;
    Ok(format!("{PREFIX}.{namespace}.{service}.{op}"))
}

/// The subject of a node-local service's operation.
pub fn node_op(namespace: &str, service: &str, node: &str, op: &str) -> Result<String> {
    check_namespace(namespace)?;
    check_token("node id", node)?;
    check_op(op)?;
    Ok(format!("{PREFIX}.{namespace}.{service}.{node}.{op}"))
}

/// The subject of an event.
pub fn event(namespace: &str, topic: &str) -> Result<String> {
    check_namespace(namespace)?;
    check_dotted("topic", topic)?;
    Ok(format!("{PREFIX}.{namespace}.{EVENTS}.{topic}"))
}

/// The subjects of every event of every namespace (for streams and watchers).
pub fn all_events() -> String {
    format!("{PREFIX}.*.{EVENTS}.>")
}

/// Checks a whole subject before a request is sent on it: every token is
/// valid, and a berth subject (`berth.v1.…`) names a namespace that is not
/// reserved, a service and an op, and is not an event subject (a request
/// there would be stored in the event stream as if it were an event).
pub fn check_request(subject: &str) -> Result<()> {
    check_dotted("subject", subject)?;
    let tokens: Vec<&str> = subject.split('.').collect();
    if !tokens.starts_with(&["berth", "v1"]) {
        return Ok(());
    }
    let [_, _, namespace, service, _op, ..] = tokens[..] else {
        return Err(Error::invalid(format!(
            "subject {subject:?} names no namespace, service and operation"
        )));
    };
    check_namespace(namespace)?;
    if service == EVENTS {
        return Err(Error::invalid(format!(
            "subject {subject:?} is an event subject, not a request"
        )));
    }
    Ok(())
}

/// Ops may hold dots (`images.create`): each part is a token.
fn check_op(op: &str) -> Result<()> {
    check_dotted("operation", op)
}

fn check_dotted(kind: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{kind} is empty")));
    }
    value
        .split('.')
        .try_for_each(|part| check_token(kind, part))
}

/// A node id from a host name: dots become dashes and anything else that a
/// token may not hold becomes `_`, so `web1.example.com` is `web1-example-com`.
pub fn node_id_from_hostname(hostname: &str) -> String {
    let id: String = hostname
        .trim()
        .chars()
        .map(|c| match c {
            '.' => '-',
            '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .take(MAX_TOKEN_LEN)
        .collect();
    if id.is_empty() {
        "localhost".to_string()
    } else {
        id
    }
}

/// This host's node id.
pub fn local_node_id() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    node_id_from_hostname(&name)
}

/// The parts of a request subject, as the serve loop reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The namespace token.
    pub namespace: &'a str,
    /// The service token.
    pub service: &'a str,
}

/// Reads the namespace and service of a request subject.
pub fn parse(subject: &str) -> Result<Parsed<'_>> {
    let mut tokens = subject.split('.');
    let (Some("berth"), Some("v1"), Some(namespace), Some(service)) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return Err(Error::invalid(format!(
            "subject {subject:?} is not berth's"
        )));
    };
    check_namespace(namespace)?;
    Ok(Parsed { namespace, service })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_three_subject_forms() {
        assert_eq!(
            op("default", "content", "info").unwrap(),
            "berth.v1.default.content.info"
        );
        assert_eq!(
            node_op("default", "task", "node-1", "start").unwrap(),
            "berth.v1.default.task.node-1.start"
        );
        assert_eq!(
            event("default", "tasks.exit").unwrap(),
            "berth.v1.default.events.tasks.exit"
        );
    }

    #[test]
    fn refuses_bad_tokens() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        let bad = [
            "",
            "a.b",
            "a*",
            ">",
            "a b",
            "a\tb",
            "a\u{1}b",
            long.as_str(),
        ];
        for namespace in bad {
            let err = op(namespace, "content", "info").unwrap_err();
            assert_eq!(err.code, crate::Code::InvalidArgument, "{namespace:?}");
        }
        for node in ["", "n.1", "*", "n 1"] {
            assert!(
                node_op("default", "task", node, "start").is_err(),
                "{node:?}"
            );
        }
        assert!(op("default", "content", "images..create").is_err());
        assert!(event("default", "tasks.>").is_err());
    }

    #[test]
    fn checks_whole_request_subjects() {
        let good = [
            "berth.v1.default.content.info",
            "berth.v1.team-a.task.node-1.start",
            "$SRV.PING.content",
        ];
        for subject in good {
            check_request(subject).unwrap();
        }
        let bad = [
            "",
            "berth.v1.a b.content.info",
            "berth.v1.*.content.info",
            "berth.v1.default.content.>",
            "berth.v1..content.info",
            "berth.v1.events.content.info",
            "berth.v1.metadata.content.info",
            "berth.v1.default.events.tasks.exit",
            "berth.v1.default.content",
            "berth.v1",
        ];
        for subject in bad {
            let err = check_request(subject).unwrap_err();
            assert_eq!(err.code, crate::Code::InvalidArgument, "{subject:?}");
        }
    }

    #[test]
    fn refuses_reserved_namespaces() {
        for namespace in SERVICES.iter().chain(&[EVENTS]) {
            let err = op(namespace, "content", "info").unwrap_err();
            assert!(err.message.contains("reserved"), "{err}");
        }
    }

    #[test]
    fn node_ids_from_host_names_are_tokens() {
        assert_eq!(
            node_id_from_hostname("web1.example.com\n"),
            "web1-example-com"
        );
        assert_eq!(node_id_from_hostname("a b*c>"), "a_b_c_");
        assert_eq!(node_id_from_hostname(""), "localhost");
        check_token("node id", &node_id_from_hostname(&"x.".repeat(100))).unwrap();
    }

    #[test]
    fn parses_request_subjects() {
        let parsed = parse("berth.v1.team-a.metadata.images.create").unwrap();
        assert_eq!(parsed.namespace, "team-a");
        assert_eq!(parsed.service, "metadata");
        assert!(parse("other.v1.a.b").is_err());
        assert!(parse("berth.v1.events.metadata.x").is_err());
    }
}
