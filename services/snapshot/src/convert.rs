//! Between the wire types of `berth_proto::snapshot` and the store's.

use std::collections::{BTreeMap, HashMap};

use berth_proto::snapshot as pb;
use berth_proto::{Mount, Timestamp};

use crate::error::SnapshotError;
use crate::overlay::MountSpec;
use crate::store::{Kind, Record};

/// The wire value of a kind.
pub fn kind(kind: Kind) -> pb::Kind {
    match kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

/// What `stat` and `list` say of one snapshot.
pub fn info(key: &str, record: &Record) -> pb::Info {
    pb::Info {
        key: key.to_string(),
        parent: record.parent.clone(),
        kind: kind(record.kind) as i32,
        labels: record.labels.clone().into_iter().collect(),
        created_at: Some(Timestamp {
            unix_nanos: record.created,
        }),
        updated_at: Some(Timestamp {
            unix_nanos: record.updated,
        }),
    }
}

/// A mount as the wire carries it.
pub fn mount(spec: MountSpec) -> Mount {
    Mount {
        r#type: spec.fstype,
        source: spec.source,
        options: spec.options,
    }
}

/// Labels from the wire, sorted.
pub fn labels(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// Applies an `update`: an empty mask or `labels` replaces every label;
/// each `labels.<name>` sets that label from `given`, or drops it when
/// `given` lacks it. Any other mask entry is `InvalidArgument`.
pub fn apply_mask(
    current: &BTreeMap<String, String>,
    given: &BTreeMap<String, String>,
    mask: &[String],
) -> Result<BTreeMap<String, String>, SnapshotError> {
    if mask.is_empty() || mask.iter().any(|field| field == "labels") {
        return Ok(given.clone());
    }
    let mut labels = current.clone();
    for field in mask {
        let Some(name) = field
            .strip_prefix("labels.")
            .filter(|name| !name.is_empty())
        else {
            return Err(SnapshotError::InvalidRequest {
                field: "field_mask",
                reason: format!("unknown field {field:?}"),
            });
        };
        match given.get(name) {
            Some(value) => labels.insert(name.to_string(), value.clone()),
            None => labels.remove(name),
        };
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn masks_replace_set_or_drop_labels() {
        let current = map(&[("a", "1"), ("b", "2")]);
        let given = map(&[("a", "9"), ("c", "3")]);
        type Case<'a> = (&'a [&'a str], Option<BTreeMap<String, String>>);
        let cases: [Case; 5] = [
            (&[], Some(given.clone())),
            (&["labels"], Some(given.clone())),
            (&["labels.a"], Some(map(&[("a", "9"), ("b", "2")]))),
            (
                &["labels.b", "labels.c"],
                Some(map(&[("a", "1"), ("c", "3")])),
            ),
            (&["name"], None),
        ];
        for (mask, want) in cases {
            let mask: Vec<String> = mask.iter().map(|f| f.to_string()).collect();
            let got = apply_mask(&current, &given, &mask).ok();
            assert_eq!(got, want, "{mask:?}");
        }
    }
}
