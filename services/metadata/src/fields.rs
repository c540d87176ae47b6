//! Field masks of updates, and the checks every record's labels pass.
//!
//! An update names the fields it changes: a field of the kind, `labels` for
//! the whole label map, or `labels.<key>` for one label (set from the
//! request, or removed when the request lacks the key). An empty mask
//! changes every field that may change. A mask is resolved whole before any
//! field is touched, so a bad path changes nothing.

use std::collections::HashMap;

use crate::error::{Kind, MetadataError, Result};

/// The most bytes one label's key and value take together.
pub const MAX_LABEL_BYTES: usize = 4096;

/// Checks a label map: keys are not empty and hold no control character,
/// and each key and value take at most [`MAX_LABEL_BYTES`].
pub fn check_labels(labels: &HashMap<String, String>) -> Result<()> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err(MetadataError::invalid("label key", key, "it is empty"));
        }
        if key.chars().any(char::is_control) {
            return Err(MetadataError::invalid(
                "label key",
                key,
                "it holds a control character",
            ));
        }
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(MetadataError::invalid(
                "label",
                key,
                format!("its key and value exceed {MAX_LABEL_BYTES} bytes"),
            ));
        }
    }
    Ok(())
}

/// What one update changes.
#[derive(Debug, PartialEq, Eq)]
pub struct Mask {
    fields: Vec<&'static str>,
    all_labels: bool,
    label_keys: Vec<String>,
}

impl Mask {
    /// Resolves `paths` against a kind whose changeable fields (besides
    /// `labels`) are `mutable` and whose fixed ones are `immutable`.
    /// `InvalidArgument` for an unknown path, or one naming a fixed field.
    pub fn parse(
        kind: Kind,
        id: &str,
        paths: &[String],
        mutable: &[&'static str],
        immutable: &[&'static str],
    ) -> Result<Mask> {
        if paths.is_empty() {
            return Ok(Mask {
                fields: mutable.to_vec(),
                all_labels: true,
                label_keys: Vec::new(),
            });
        }
        let mut mask = Mask {
            fields: Vec::new(),
            all_labels: false,
            label_keys: Vec::new(),
        };
        for path in paths {
            if path == "labels" {
                mask.all_labels = true;
            } else if let Some(key) = path.strip_prefix("labels.").filter(|k| !k.is_empty()) {
                mask.label_keys.push(key.to_string());
            } else if let Some(field) = mutable.iter().find(|f| *f == path) {
                mask.fields.push(field);
            } else if let Some(field) = immutable.iter().find(|f| *f == path) {
                return Err(MetadataError::Immutable {
                    kind,
                    id: id.to_string(),
                    field,
                });
            } else {
                return Err(MetadataError::UnknownField {
                    kind,
                    id: id.to_string(),
                    field: path.clone(),
                });
            }
        }
        Ok(mask)
    }

    /// True when the update changes `field`.
    pub fn has(&self, field: &str) -> bool {
        self.fields.contains(&field)
    }

    /// Changes `current` as the mask says from `new`.
    pub fn apply_labels(
        &self,
        current: &mut HashMap<String, String>,
        new: &HashMap<String, String>,
    ) {
        if self.all_labels {
            current.clone_from(new);
        }
        for key in &self.label_keys {
            match new.get(key) {
                Some(value) => {
                    current.insert(key.clone(), value.clone());
                }
                None => {
                    current.remove(key);
                }
            }
        }
    }
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

    fn paths(items: &[&str]) -> Vec<String> {
        items.iter().map(|p| p.to_string()).collect()
    }

    const MUTABLE: &[&str] = &["spec", "image"];
    const IMMUTABLE: &[&str] = &["runtime"];

    #[test]
    fn masks_resolve_or_refuse() {
        let parse =
            |items: &[&str]| Mask::parse(Kind::Container, "c", &paths(items), MUTABLE, IMMUTABLE);
        let all = parse(&[]).unwrap();
        assert!(all.has("spec") && all.has("image"));
        let spec = parse(&["spec"]).unwrap();
        assert!(spec.has("spec") && !spec.has("image"));

        let refused: &[(&str, &[&str])] = &[
            ("unknown field", &["nope"]),
            ("fixed field", &["runtime"]),
            ("empty label key", &["labels."]),
            ("a good path does not excuse a bad one", &["spec", "nope"]),
        ];
        for (case, items) in refused {
            let err = parse(items)
                .err()
                .unwrap_or_else(|| panic!("{case}: accepted"));
            assert_eq!(err.code(), berth_bus::Code::InvalidArgument, "{case}");
        }
    }

    #[test]
    fn label_paths_set_and_remove_single_labels() {
        let mask = Mask::parse(
            Kind::Image,
            "x",
            &paths(&["labels.keep", "labels.drop"]),
            MUTABLE,
            IMMUTABLE,
        )
        .unwrap();
        let mut current = labels(&[("drop", "1"), ("other", "2")]);
        mask.apply_labels(
            &mut current,
            &labels(&[("keep", "new"), ("other", "ignored")]),
        );
        assert_eq!(current, labels(&[("keep", "new"), ("other", "2")]));

        let whole = Mask::parse(Kind::Image, "x", &paths(&["labels"]), MUTABLE, IMMUTABLE).unwrap();
        whole.apply_labels(&mut current, &labels(&[("only", "this")]));
        assert_eq!(current, labels(&[("only", "this")]));
    }

    #[test]
    fn label_checks() {
        let long = "v".repeat(MAX_LABEL_BYTES);
        let cases: &[(&str, HashMap<String, String>, bool)] = &[
            ("plain", labels(&[("a", "b")]), true),
            ("empty value", labels(&[("a", "")]), true),
            ("empty key", labels(&[("", "b")]), false),
            ("control character", labels(&[("a\u{1}", "b")]), false),
            ("too long", labels(&[("k", long.as_str())]), false),
        ];
        for (case, map, ok) in cases {
            assert_eq!(check_labels(map).is_ok(), *ok, "{case}");
        }
    }
}
