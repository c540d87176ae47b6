//! Label selectors of the list ops.
//!
//! A list request carries `label_selector` (each key must carry exactly its
//! value) and `selector`, terms that must all hold:
//!
//! | term          | holds when                          |
//! |---------------|-------------------------------------|
//! | `key`         | the label is present                |
//! | `!key`        | the label is absent                 |
//! | `key=value`   | the label has this value (`==` too) |
//! | `key!=value`  | it is absent or has another value   |
//!
//! Spaces around keys and values are trimmed. A key is not empty and holds
//! none of `=`, `!` and space.

use std::collections::HashMap;

use crate::error::{MetadataError, Result};

/// One parsed term.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Present(String),
    Absent(String),
    Equals(String, String),
    Differs(String, String),
}

/// A parsed selector: every term must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    /// Parses a request's selectors; `InvalidArgument` for a malformed term.
    pub fn parse(exact: &HashMap<String, String>, terms: &[String]) -> Result<Self> {
        let mut selector = Selector::default();
        for (key, value) in exact {
            selector
                .terms
                .push(Term::Equals(key.clone(), value.clone()));
        }
        for term in terms {
            selector.terms.push(parse_term(term)?);
        }
        Ok(selector)
    }

    /// True when `labels` satisfy every term.
    pub fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Present(key) => labels.contains_key(key),
            Term::Absent(key) => !labels.contains_key(key),
            Term::Equals(key, value) => labels.get(key) == Some(value),
            Term::Differs(key, value) => labels.get(key) != Some(value),
        })
    }
}

fn parse_term(raw: &str) -> Result<Term> {
    let term = raw.trim();
    let bad = |reason| MetadataError::Selector {
        term: raw.to_string(),
        reason,
    };
    let (term, operator, value) = if let Some((key, value)) = term.split_once("!=") {
        (key, "!=", Some(value))
    } else if let Some((key, value)) = term.split_once("==") {
        (key, "=", Some(value))
    } else if let Some((key, value)) = term.split_once('=') {
        (key, "=", Some(value))
    } else {
        (term, "", None)
    };
    let (negated, key) = match term.trim().strip_prefix('!') {
        Some(key) if value.is_none() => (true, key.trim()),
        Some(_) => return Err(bad("a negated key takes no value")),
        None => (false, term.trim()),
    };
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.contains(['=', '!', ' ']) {
        return Err(bad("the key holds '=', '!' or a space"));
    }
    let key = key.to_string();
    Ok(match (operator, value) {
        (_, None) if negated => Term::Absent(key),
        (_, None) => Term::Present(key),
        ("!=", Some(value)) => Term::Differs(key, value.trim().to_string()),
        (_, Some(value)) => Term::Equals(key, value.trim().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn select(terms: &[&str]) -> Result<Selector> {
        let terms: Vec<String> = terms.iter().map(|t| t.to_string()).collect();
        Selector::parse(&HashMap::new(), &terms)
    }

    #[test]
    fn terms_match_as_documented() {
        let record = labels(&[("app", "web"), ("tier", "front")]);
        let cases: &[(&str, &[&str], bool)] = &[
            ("no terms", &[], true),
            ("present", &["app"], true),
            ("present, missing", &["env"], false),
            ("absent", &["!env"], true),
            ("absent, present", &["!app"], false),
            ("equals", &["app=web"], true),
            ("double equals", &["app==web"], true),
            ("equals, other value", &["app=db"], false),
            ("differs", &["app!=db"], true),
            ("differs, missing label", &["env!=prod"], true),
            ("differs, same value", &["app!=web"], false),
            ("spaces trimmed", &[" app = web "], true),
            ("every term must hold", &["app=web", "tier=back"], false),
            ("empty value", &["app="], false),
        ];
        for (case, terms, expected) in cases {
            let selector = select(terms).unwrap();
            assert_eq!(selector.matches(&record), *expected, "{case}");
        }
    }

    #[test]
    fn malformed_terms_are_refused() {
        let cases: &[(&str, &str)] = &[
            ("empty", ""),
            ("only a bang", "!"),
            ("no key", "=web"),
            ("negated with a value", "!app=web"),
            ("space in key", "my app=web"),
        ];
        for (case, term) in cases {
            let err = select(&[term])
                .err()
                .unwrap_or_else(|| panic!("{case}: accepted"));
            assert_eq!(err.code(), berth_bus::Code::InvalidArgument, "{case}");
        }
    }

    #[test]
    fn the_exact_map_is_equality() {
        let selector = Selector::parse(&labels(&[("app", "web")]), &[]).unwrap();
        assert!(selector.matches(&labels(&[("app", "web"), ("x", "y")])));
        assert!(!selector.matches(&labels(&[("app", "db")])));
    }
}
