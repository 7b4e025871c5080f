//! The reference model: per owner, every record that owner's store must
//! hold (tombstones included), kept from that owner's own commits, index
//! runs and restores; and the expectation that after quiescence every
//! device holds, for every owner, exactly those records.
//!
//! A commit is predicted before it runs (which records change, to what,
//! how many seqs it takes, the cascade of a deleted location) and checked
//! against what the owner's store then holds. Index runs and restores
//! cannot be predicted record by record (the indexer picks ids, a restore
//! rolls back): the model adopts what the owner's store holds, and
//! `index_check` compares that with the folder on disk.

use std::collections::BTreeMap;

use sync_core::{DeviceId, IndexId, LocationId, Record, Seq, Watermark};
use sync_storage::{LocalChange, SeqRange, Store};

/// A record's identity: 0 for locations, 1 for entries, and the id.
pub type Key = (u8, [u8; 16]);

/// The key of a record.
pub fn key(r: &Record) -> Key {
    match r {
        Record::Location(l) => (0, l.id.to_bytes()),
        Record::Entry(e) => (1, e.id.to_bytes()),
    }
}

/// A record with its seq cleared (for comparing what a change wrote).
fn unstamped(r: &Record) -> Record {
    let mut r = r.clone();
    match &mut r {
        Record::Location(l) => l.seq = Seq::ZERO,
        Record::Entry(e) => e.seq = Seq::ZERO,
    }
    r
}

/// What one owner's store must hold of its own records.
#[derive(Clone, Debug, Default)]
pub struct OwnerModel {
    /// Every record, by key.
    pub records: BTreeMap<Key, Record>,
    /// The owner's IndexId and max seq.
    pub watermark: Watermark,
}

impl OwnerModel {
    /// The live locations, in key order.
    pub fn locations(&self, deleted: bool) -> Vec<sync_core::Location> {
        self.records
            .values()
            .filter_map(|r| match r {
                Record::Location(l) if l.deleted == deleted => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// The entries (live or deleted), in key order.
    pub fn entries(&self, deleted: bool) -> Vec<sync_core::Entry> {
        self.records
            .values()
            .filter_map(|r| match r {
                Record::Entry(e) if e.deleted == deleted => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

/// What a commit is expected to write: each record's final content (seq
/// cleared) and the seqs it takes.
#[derive(Clone, Debug, Default)]
pub struct Prediction {
    /// Changed records, seq cleared.
    pub records: BTreeMap<Key, Record>,
    /// Seqs the commit stamps: one per change, one per cascaded tombstone.
    pub seqs: u64,
}

impl Prediction {
    /// The prediction for `changes` applied to `owner`'s records, with the
    /// semantics of `Store::commit_local`.
    pub fn of(owner: &OwnerModel, changes: &[LocalChange]) -> Prediction {
        let mut p = Prediction {
            seqs: changes.len() as u64,
            ..Prediction::default()
        };
        let current = |p: &Prediction, k: &Key| {
            p.records
                .get(k)
                .or_else(|| owner.records.get(k))
                .map(unstamped)
        };
        for c in changes {
            let (k, r) = match c {
                LocalChange::Location(l) => {
                    let mut l = l.clone();
                    l.deleted = false;
                    ((0, l.id.to_bytes()), Some(Record::Location(l)))
                }
                LocalChange::Entry(e) => {
                    let mut e = e.clone();
                    e.deleted = false;
                    ((1, e.id.to_bytes()), Some(Record::Entry(e)))
                }
                LocalChange::DeleteEntry(id) => {
                    let k = (1, id.to_bytes());
                    (k, current(&p, &k).map(tombstoned))
                }
                LocalChange::DeleteLocation(id) => {
                    let k = (0, id.to_bytes());
                    (k, current(&p, &k).map(tombstoned))
                }
            };
            if let Some(r) = r {
                p.records.insert(k, unstamped(&r));
            }
        }
        p.cascade(owner);
        p
    }

    /// Tombstones the live entries of every location that ends deleted.
    fn cascade(&mut self, owner: &OwnerModel) {
        let gone: Vec<LocationId> = self
            .records
            .values()
            .filter_map(|r| match r {
                Record::Location(l) if l.deleted => Some(l.id),
                _ => None,
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut finals: BTreeMap<Key, Record> = owner
            .records
            .iter()
            .filter(|(k, _)| k.0 == 1)
            .map(|(k, r)| (*k, unstamped(r)))
            .collect();
        finals.extend(
            self.records
                .iter()
                .filter(|(k, _)| k.0 == 1)
                .map(|(k, r)| (*k, r.clone())),
        );
        for (k, r) in finals {
            if let Record::Entry(e) = &r
                && !e.deleted
                && gone.contains(&e.location)
            {
                self.records.insert(k, tombstoned(r));
                self.seqs += 1;
            }
        }
    }
}

fn tombstoned(mut r: Record) -> Record {
    match &mut r {
        Record::Location(l) => l.deleted = true,
        Record::Entry(e) => e.deleted = true,
    }
    r
}

/// The model of every owner of one schedule.
#[derive(Debug, Default)]
pub struct Model {
    /// By owner.
    pub owners: BTreeMap<DeviceId, OwnerModel>,
    /// Owners restored from an earlier copy: they may start a new IndexId
    /// once they see a peer holding more of them (issue 13 item 3).
    pub restored: std::collections::BTreeSet<DeviceId>,
}

impl Model {
    /// The model of `owner` (empty if it never committed).
    pub fn owner(&self, owner: DeviceId) -> OwnerModel {
        self.owners.get(&owner).cloned().unwrap_or_default()
    }

    /// Adopts everything `owner`'s store holds of its own records (after
    /// a restore, or to start).
    pub async fn adopt_all(&mut self, owner: DeviceId, store: &Store) -> Result<(), String> {
        let records = own_records(store, owner, Seq::ZERO).await?;
        let watermark = store.local_watermark().await.map_err(|e| e.to_string())?;
        self.owners.insert(
            owner,
            OwnerModel {
                records: records.into_iter().map(|r| (key(&r), r)).collect(),
                watermark,
            },
        );
        Ok(())
    }

    /// Adopts what `owner`'s store wrote after the model's max seq (an index
    /// run); checks the new seqs are fresh and distinct. Returns the records.
    pub async fn adopt_new(
        &mut self,
        owner: DeviceId,
        store: &Store,
    ) -> Result<Vec<Record>, String> {
        let model = self.owners.entry(owner).or_default();
        let after = model.watermark.seq;
        let fresh = own_records(store, owner, after).await?;
        let watermark = store.local_watermark().await.map_err(|e| e.to_string())?;
        if watermark.index_id != model.watermark.index_id && self.restored.contains(&owner) {
            // A new sequence after a restore: the store is the truth again.
            self.adopt_all(owner, store).await?;
            return Ok(fresh);
        }
        check_fresh_seqs(&fresh, after, watermark.seq)?;
        if watermark.index_id != model.watermark.index_id && model.watermark.seq != Seq::ZERO {
            return Err(format!(
                "owner {} changed its IndexId outside a restore ({} -> {})",
                owner.fmt_short(),
                model.watermark.index_id,
                watermark.index_id
            ));
        }
        for r in &fresh {
            model.records.insert(key(r), r.clone());
        }
        model.watermark = watermark;
        Ok(fresh)
    }

    /// Checks a commit's result against its prediction, then adopts it.
    pub async fn check_commit(
        &mut self,
        owner: DeviceId,
        store: &Store,
        prediction: &Prediction,
        range: SeqRange,
    ) -> Result<(), String> {
        let before = self.owner(owner).watermark.seq;
        if range.first != before.next() || range.len() != prediction.seqs {
            return Err(format!(
                "commit stamped {}..={} ({} seqs) after max seq {before}, expected {} seqs",
                range.first,
                range.last,
                range.len(),
                prediction.seqs
            ));
        }
        let index = self.index_of(owner);
        let fresh = self.adopt_new(owner, store).await?;
        let mut wrote: BTreeMap<Key, Record> =
            fresh.iter().map(|r| (key(r), unstamped(r))).collect();
        if self.index_of(owner) != index {
            // Re-stamped under a new IndexId: only the predicted records count.
            wrote.retain(|k, _| prediction.records.contains_key(k));
        }
        if wrote != prediction.records {
            return Err(format!(
                "commit wrote {} records, predicted {}: {}",
                wrote.len(),
                prediction.records.len(),
                first_difference(&prediction.records, &wrote)
            ));
        }
        let now = self.owner(owner).watermark.seq;
        if now != range.last {
            return Err(format!(
                "max seq {now} after a commit ending at {}",
                range.last
            ));
        }
        Ok(())
    }

    /// The IndexId the model holds for `owner`.
    pub fn index_of(&self, owner: DeviceId) -> IndexId {
        self.owner(owner).watermark.index_id
    }
}

/// Every record of `owner` in `store` with seq above `after`, in seq order.
pub async fn own_records(
    store: &Store,
    owner: DeviceId,
    after: Seq,
) -> Result<Vec<Record>, String> {
    store
        .records_after(owner, after, usize::MAX)
        .await
        .map_err(|e| format!("records_after: {e}"))
}

/// New records must carry distinct seqs in `(after, max]`.
fn check_fresh_seqs(fresh: &[Record], after: Seq, max: Seq) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for r in fresh {
        let s = r.seq();
        if s <= after || s > max || !seen.insert(s) {
            return Err(format!(
                "a new record at seq {s} outside ({after}, {max}] or twice: {r:?}"
            ));
        }
    }
    Ok(())
}

/// The first key on which two record maps differ, described.
pub fn first_difference(want: &BTreeMap<Key, Record>, got: &BTreeMap<Key, Record>) -> String {
    for (k, w) in want {
        match got.get(k) {
            None => return format!("missing {w:?}"),
            Some(g) if g != w => return format!("expected {w:?}, got {g:?}"),
            _ => {}
        }
    }
    match got.iter().find(|(k, _)| !want.contains_key(*k)) {
        Some((_, g)) => format!("unexpected {g:?}"),
        None => "no difference".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use sync_core::{Entry, EntryId, EntryKind, Location};

    fn location(owner: DeviceId) -> Location {
        Location {
            id: LocationId::new_v7(),
            owner,
            path: "/l".into(),
            name: "l".into(),
            seq: Seq(1),
            deleted: false,
        }
    }

    fn entry(location: LocationId, seq: u64) -> Entry {
        Entry {
            id: EntryId::new_v7(),
            location,
            parent: None,
            name: "e".into(),
            kind: EntryKind::File,
            size: 1,
            inode: None,
            created_at: Utc::now(),
            modified_at: Utc::now(),
            seq: Seq(seq),
            deleted: false,
        }
    }

    #[test]
    fn deleting_a_location_predicts_a_tombstone_per_live_entry() {
        let owner = DeviceId::new_v7();
        let l = location(owner);
        let (e1, e2) = (entry(l.id, 2), entry(l.id, 3));
        let mut dead = entry(l.id, 4);
        dead.deleted = true;
        let mut m = OwnerModel::default();
        for r in [
            Record::Location(l.clone()),
            Record::Entry(e1.clone()),
            Record::Entry(e2),
            Record::Entry(dead),
        ] {
            m.records.insert(key(&r), r);
        }
        let p = Prediction::of(
            &m,
            &[
                LocalChange::DeleteEntry(e1.id),
                LocalChange::DeleteLocation(l.id),
            ],
        );
        // Two changes, one cascaded tombstone (e1 is already deleted by then).
        assert_eq!(p.seqs, 3);
        assert_eq!(p.records.len(), 3);
        assert!(p.records.values().all(Record::deleted));
        // Re-created in the same commit: nothing cascades.
        let p = Prediction::of(
            &m,
            &[
                LocalChange::DeleteLocation(l.id),
                LocalChange::Location(l.clone()),
            ],
        );
        assert_eq!((p.seqs, p.records.len()), (2, 1));
    }
}
