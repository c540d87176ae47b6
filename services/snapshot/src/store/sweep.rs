//! What goes without a request naming it: gc's prune down to a live set,
//! the sweep of directories no record owns, and the clean-up at start-up of
//! what a crash mid-unpack left.

use std::collections::{HashMap, HashSet};

use heed::{RoTxn, RwTxn};

use super::{decode, usage, Record, Result, Store, EXTRACT_PREFIX, MAX_DEPTH};
use crate::error::SnapshotError;

/// What [`Store::recover`] cleaned up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records of layers whose unpack never finished.
    pub extracts: usize,
    /// Directories no record owned.
    pub orphans: usize,
}

impl Store {
    /// What a prune of `namespace` down to `live` would remove, children
    /// before their parents.
    ///
    /// Kept: the `live` keys, snapshots touched at or after
    /// `unless_touched_since` (when > 0), layers being unpacked, and every
    /// ancestor of those. Whatever else goes has no kept descendant, so
    /// removing deepest first leaves no snapshot without its parent.
    pub fn prune_plan(
        &self,
        txn: &RoTxn,
        namespace: &str,
        live: &[String],
        unless_touched_since: u64,
    ) -> Result<Vec<(String, Record)>> {
        let records: HashMap<String, Record> = self.list(txn, namespace)?.into_iter().collect();
        let seeds = records.iter().filter(|(key, record)| {
            key.starts_with(EXTRACT_PREFIX)
                || (unless_touched_since > 0 && record.touched >= unless_touched_since as i64)
        });
        let seeds: Vec<&String> = seeds.map(|(key, _)| key).chain(live).collect();

        // Each kept snapshot keeps its chain; a chain already kept ends the walk.
        let mut keep = HashSet::new();
        for seed in seeds {
            let mut next = seed.as_str();
            while let Some(record) = records.get(next) {
                if !keep.insert(next.to_string()) {
                    break;
                }
                next = &record.parent;
            }
        }

        let depth = |key: &str| {
            let mut depth = 0;
            let mut next = key;
            while let Some(record) = records.get(next).filter(|_| depth <= MAX_DEPTH) {
                depth += 1;
                next = &record.parent;
            }
            depth
        };
        let mut plan: Vec<(usize, String, Record)> = records
            .iter()
            .filter(|(key, _)| !keep.contains(*key))
            .map(|(key, record)| (depth(key), key.clone(), record.clone()))
            .collect();
        plan.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        Ok(plan
            .into_iter()
            .map(|(_, key, record)| (key, record))
            .collect())
    }

    /// Removes what `plan` ([`Store::prune_plan`]) lists that still may go:
    /// the same snapshot (same directory), without children, and not
    /// touched at or after `unless_touched_since` (when > 0). Returns the
    /// removed ones; the caller deletes their directories after the commit.
    pub fn prune(
        &self,
        txn: &mut RwTxn,
        namespace: &str,
        plan: &[(String, Record)],
        unless_touched_since: u64,
    ) -> Result<Vec<(String, Record)>> {
        let mut children: HashMap<String, usize> = HashMap::new();
        for (_, record) in self.list(txn, namespace)? {
            *children.entry(record.parent).or_default() += 1;
        }
        let mut removed = Vec::new();
        for (key, planned) in plan {
            let Some(record) = self.get(txn, namespace, key)? else {
                continue;
            };
            let touched = unless_touched_since > 0 && record.touched >= unless_touched_since as i64;
            let parent_of_some = children.get(key).is_some_and(|&count| count > 0);
            if record.id != planned.id || touched || parent_of_some {
                continue;
            }
            self.drop_record(txn, namespace, key, &record)?;
            if let Some(count) = children.get_mut(&record.parent) {
                *count -= 1;
            }
            removed.push((key.clone(), record));
        }
        Ok(removed)
    }

    /// At start-up, before any request: drops the records of layers whose
    /// unpack never finished (they were never committed, so nothing refers
    /// to them) and deletes every directory no record owns.
    pub fn recover(&self) -> Result<Recovered> {
        let _sweeping = self.sweeping();
        let mut txn = self.env.write_txn()?;
        let mut extracts = Vec::new();
        for item in self.records.iter(&txn)? {
            let (raw_key, _) = item?;
            let key = raw_key.split_once('\0').map_or("", |(_, key)| key);
            if key.starts_with(EXTRACT_PREFIX) {
                extracts.push(raw_key.to_string());
            }
        }
        for raw_key in &extracts {
            self.records.delete(&mut txn, raw_key)?;
        }
        txn.commit()?;
        let (orphans, _) = self.remove_orphans()?;
        Ok(Recovered {
            extracts: extracts.len(),
            orphans,
        })
    }

    /// Deletes every directory no record owns; returns how many and the
    /// bytes they held. Waits for snapshots being made.
    pub fn sweep_orphans(&self) -> Result<(usize, i64)> {
        let _sweeping = self.sweeping();
        self.remove_orphans()
    }

    fn sweeping(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.dirs
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The sweep itself; the caller holds the directory lock exclusively.
    fn remove_orphans(&self) -> Result<(usize, i64)> {
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots)
            .map_err(SnapshotError::io("read directory", &snapshots))?;
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("read directory", &snapshots))?;
            let id = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok());
            dirs.push((id, entry.path()));
        }

        let owned = {
            let txn = self.env.read_txn()?;
            let mut owned = HashSet::new();
            for item in self.records.iter(&txn)? {
                let (raw_key, raw) = item?;
                owned.insert(decode::<Record>(raw_key, raw)?.id);
            }
            owned
        };
        let mut removed = 0;
        let mut freed = 0;
        for (id, path) in dirs {
            if id.is_some_and(|id| owned.contains(&id)) {
                continue;
            }
            freed += usage(&path).0;
            let outcome = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match outcome {
                Ok(()) => removed += 1,
                Err(err) => tracing::warn!(
                    path = %path.display(),
                    error = %err,
                    "unowned snapshot directory not removed"
                ),
            }
        }
        Ok((removed, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{committed, make, open};
    use super::*;
    use crate::store::Kind;

    #[test]
    fn prune_keeps_live_chains_and_removes_children_first() {
        let (_dir, store) = open();
        committed(&store, "a", "", 1);
        committed(&store, "b", "a", 1);
        committed(&store, "c", "b", 1);
        committed(&store, "x", "a", 1);
        make(&store, "c1", "c", Kind::Active, 1);
        make(&store, "fresh", "a", Kind::Active, 100);

        let txn = store.env.read_txn().unwrap();
        let plan = store
            .prune_plan(&txn, "ns", &["b".to_string()], 50)
            .unwrap();
        drop(txn);
        let keys: Vec<&str> = plan.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["c1", "c", "x"]);

        let mut txn = store.env.write_txn().unwrap();
        let removed = store.prune(&mut txn, "ns", &plan, 50).unwrap();
        txn.commit().unwrap();
        assert_eq!(removed.len(), 3);
        let txn = store.env.read_txn().unwrap();
        let left: Vec<String> = store
            .list(&txn, "ns")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left, ["a", "b", "fresh"]);
    }

    #[test]
    fn recover_drops_unfinished_extracts_and_unowned_directories() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, extract) = {
            let store = Store::open(dir.path(), "node-t").unwrap();
            let kept = committed(&store, "base", "", 1);
            let extract = make(&store, "extract-crashed", "base", Kind::Active, 1);
            std::fs::create_dir_all(dir.path().join("snapshots/999/fs")).unwrap();
            std::fs::create_dir_all(dir.path().join("snapshots/stray")).unwrap();
            (kept, extract)
        };

        let store = Store::open(dir.path(), "node-t").unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(
            recovered,
            Recovered {
                extracts: 1,
                orphans: 3
            }
        );
        let txn = store.env.read_txn().unwrap();
        let keys: Vec<String> = store
            .list(&txn, "ns")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["base"]);
        assert!(store.dir(kept.id).exists());
        assert!(!store.dir(extract.id).exists());
        assert!(!dir.path().join("snapshots/999").exists());
        assert!(!dir.path().join("snapshots/stray").exists());
    }
}
