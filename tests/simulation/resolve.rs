//! Turns a commit's picks into `LocalChange`s of the owner's own records,
//! each resolved against the model as the earlier changes of the same
//! commit leave it.

use std::path::Path;

use chrono::DateTime;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Record, Seq};
use sync_storage::LocalChange;

use super::model::{OwnerModel, Prediction};
use super::ops::{Change, ENTRY_NAMES};

/// The changes of one commit being built.
pub struct Resolver<'a> {
    owner: DeviceId,
    base: &'a OwnerModel,
    /// Locations under this folder are indexed: commits leave their entries alone.
    indexed_root: &'a Path,
    /// Numbers names, sizes and times, so every commit writes something new.
    made: &'a mut u64,
    /// The changes so far.
    pub changes: Vec<LocalChange>,
}

/// `list[pick % len]`, or `None` for an empty list.
fn nth<T: Clone>(list: &[T], pick: usize) -> Option<T> {
    (!list.is_empty()).then(|| list[pick % list.len()].clone())
}

impl<'a> Resolver<'a> {
    /// A commit of `owner`'s records, starting from `base`.
    pub fn new(
        owner: DeviceId,
        base: &'a OwnerModel,
        indexed_root: &'a Path,
        made: &'a mut u64,
    ) -> Self {
        Resolver {
            owner,
            base,
            indexed_root,
            made,
            changes: Vec::new(),
        }
    }

    /// The owner's records as the changes so far leave them.
    fn working(&self) -> OwnerModel {
        let mut m = self.base.clone();
        for (k, r) in Prediction::of(self.base, &self.changes).records {
            m.records.insert(k, r);
        }
        m
    }

    fn committed(&self, l: &Location) -> bool {
        !Path::new(&l.path).starts_with(self.indexed_root)
    }

    fn next(&mut self) -> u64 {
        *self.made += 1;
        *self.made
    }

    /// Live folders of `location` (not `except` nor below it).
    fn folders(
        m: &OwnerModel,
        location: LocationId,
        except: Option<EntryId>,
    ) -> Vec<Option<EntryId>> {
        let below = |mut id: EntryId| {
            for _ in 0..64 {
                if Some(id) == except {
                    return true;
                }
                match m.records.get(&(1, id.to_bytes())) {
                    Some(Record::Entry(e)) => match e.parent {
                        Some(p) => id = p,
                        None => return false,
                    },
                    _ => return false,
                }
            }
            true
        };
        let mut out = vec![None];
        out.extend(
            m.entries(false)
                .into_iter()
                .filter(|e| e.location == location && e.kind == EntryKind::Dir && !below(e.id))
                .map(|e| Some(e.id)),
        );
        out
    }

    /// Adds the change `c` resolves to, if anything can take it.
    pub fn add(&mut self, c: &Change) {
        let m = self.working();
        if let Some(change) = self.resolve(&m, c) {
            self.changes.push(change);
        }
    }

    fn resolve(&mut self, m: &OwnerModel, c: &Change) -> Option<LocalChange> {
        let live_committed: Vec<Location> = m
            .locations(false)
            .into_iter()
            .filter(|l| self.committed(l))
            .collect();
        let in_live = |e: &Entry| live_committed.iter().any(|l| l.id == e.location);
        let live: Vec<Entry> = m.entries(false).into_iter().filter(in_live).collect();
        match c {
            Change::CreateLocation { name } => {
                let n = self.next();
                let name = ENTRY_NAMES[name % ENTRY_NAMES.len()];
                Some(LocalChange::Location(Location {
                    id: LocationId::new_v7(),
                    owner: self.owner,
                    path: format!("/sim/{name}-{n}"),
                    name: name.to_string(),
                    seq: Seq::ZERO,
                    deleted: false,
                }))
            }
            Change::RenameLocation { pick, name } => {
                let mut l = nth(&m.locations(false), *pick)?;
                let n = self.next();
                l.name = format!("{} {n}", ENTRY_NAMES[name % ENTRY_NAMES.len()]);
                if self.committed(&l) {
                    l.path = format!("/sim/{}-{n}", l.name);
                }
                Some(LocalChange::Location(l))
            }
            Change::DeleteLocation { pick } => Some(LocalChange::DeleteLocation(
                nth(&m.locations(false), *pick)?.id,
            )),
            Change::RecreateLocation { pick } => {
                Some(LocalChange::Location(nth(&m.locations(true), *pick)?))
            }
            Change::CreateEntry {
                location,
                parent,
                name,
                dir,
            } => {
                let l = nth(&live_committed, *location)?;
                let parent = nth(&Self::folders(m, l.id, None), *parent)?;
                let n = self.next();
                let at = DateTime::from_timestamp(1_700_000_000 + n as i64, 0)?;
                Some(LocalChange::Entry(Entry {
                    id: EntryId::new_v7(),
                    location: l.id,
                    parent,
                    name: ENTRY_NAMES[name % ENTRY_NAMES.len()].to_string(),
                    kind: if *dir {
                        EntryKind::Dir
                    } else {
                        EntryKind::File
                    },
                    size: if *dir { 0 } else { n },
                    inode: None,
                    created_at: at,
                    modified_at: at,
                    seq: Seq::ZERO,
                    deleted: false,
                }))
            }
            Change::UpdateEntry { pick, size } => {
                let mut e = nth(&live, *pick)?;
                let n = self.next();
                e.size = size + n;
                e.modified_at = DateTime::from_timestamp(1_700_000_000 + n as i64, 0)?;
                Some(LocalChange::Entry(e))
            }
            Change::RenameEntry { pick, name } => {
                let mut e = nth(&live, *pick)?;
                e.name = format!("{}-{}", ENTRY_NAMES[name % ENTRY_NAMES.len()], self.next());
                Some(LocalChange::Entry(e))
            }
            Change::MoveEntry { pick, parent } => {
                let mut e = nth(&live, *pick)?;
                e.parent = nth(&Self::folders(m, e.location, Some(e.id)), *parent)?;
                Some(LocalChange::Entry(e))
            }
            Change::MoveEntryToLocation { pick, location } => {
                let mut e = nth(&live, *pick)?;
                let to = nth(&live_committed, *location)?;
                e.location = to.id;
                e.parent = None;
                Some(LocalChange::Entry(e))
            }
            Change::DeleteEntry { pick } => Some(LocalChange::DeleteEntry(nth(&live, *pick)?.id)),
            Change::UndeleteEntry { pick } => {
                let dead: Vec<Entry> = m.entries(true).into_iter().filter(in_live).collect();
                Some(LocalChange::Entry(nth(&dead, *pick)?))
            }
        }
    }
}
