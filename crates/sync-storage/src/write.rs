//! Writes: local commits, remote batch apply, owner reset.

use std::collections::{HashMap, HashSet};

use sea_orm::sqlx::{Connection as _, SqliteConnection};
use sync_core::{DeviceId, Entry, EntryId, IndexId, Location, LocationId, Record, Seq, Watermark};
use tracing::Instrument;

use crate::Store;
use crate::bulk::{
    self, db_err, location_owners, owner_state, set_local_seq, set_watermark, tombstone,
    upsert_entries, upsert_locations,
};
use crate::digest::{self, DigestDelta};
use crate::error::{Result, StorageError};
use crate::types::{LocalChange, SeqRange};

/// Local changes committed per transaction.
const LOCAL_CHANGES_PER_TX: usize = 10_000;

impl Store {
    /// Commits local changes of this device, stamping each with the next
    /// seq in order; a `DeleteLocation` also stamps a tombstone for each live
    /// entry of the location, so the range may hold more seqs than changes.
    /// Bulk: multi-row statements, at most 10K changes per transaction (each
    /// consistent, the owner's max seq updated with its rows).
    pub async fn commit_local(
        &self,
        owner: DeviceId,
        changes: Vec<LocalChange>,
    ) -> Result<SeqRange> {
        let me = self.local_id()?;
        if owner != me {
            return Err(StorageError::NotLocalDevice { owner, local: me });
        }
        let span = tracing::info_span!(
            "commit_local",
            owner = %owner.fmt_short(),
            changes = changes.len()
        );
        async move {
            let _guard = self.inner.write_lock.lock().await;
            let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
            check_local_locations(&mut conn, owner, &changes).await?;
            let mut range: Option<SeqRange> = None;
            for chunk in changes.chunks(LOCAL_CHANGES_PER_TX) {
                let done = commit_local_tx(&mut conn, owner, chunk).await?;
                range = Some(match range {
                    None => done,
                    Some(r) => SeqRange {
                        first: r.first,
                        last: done.last,
                    },
                });
            }
            let range = match range {
                Some(r) => r,
                // Nothing to commit: an empty range just past the counter.
                None => {
                    let seq = local_seq(&mut conn, owner).await?;
                    SeqRange {
                        first: seq.next(),
                        last: seq,
                    }
                }
            };
            tracing::debug!(first = range.first.0, last = range.last.0, "committed");
            Ok(range)
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(self.path()))
    }
}

/// Refuses local changes that write another owner's location, or
/// entries in a location this device does not own. Checked before any
/// transaction so a refused commit writes nothing.
async fn check_local_locations(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    changes: &[LocalChange],
) -> Result<()> {
    let mut own: HashSet<LocationId> = HashSet::new();
    let mut wanted: HashSet<LocationId> = HashSet::new();
    for c in changes {
        match c {
            LocalChange::Location(l) => {
                location_of(owner, l)?;
                own.insert(l.id);
                wanted.insert(l.id);
            }
            LocalChange::Entry(e) => {
                wanted.insert(e.location);
            }
            _ => {}
        }
    }
    check_location_owners(conn, owner, Some(&own), wanted)
        .await
        .map(|_| ())
}

/// One transaction of `commit_local`: returns the last seq stamped.
/// This device's seq counter as committed.
async fn local_seq(conn: &mut SqliteConnection, owner: DeviceId) -> Result<Seq> {
    Ok(owner_state(conn, owner)
        .await?
        .ok_or(StorageError::NotInitialized)?
        .watermark
        .seq)
}

/// Commits one chunk of local changes in one `BEGIN IMMEDIATE` transaction:
/// the counter is read, advanced and written back under SQLite's write lock,
/// so no other connection (another `Store` on the same file, another
/// process) can hand out the same seqs or move the counter backwards.
async fn commit_local_tx(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    chunk: &[LocalChange],
) -> Result<SeqRange> {
    let mut txn = conn.begin_with("BEGIN IMMEDIATE").await.map_err(db_err)?;
    let start = local_seq(&mut txn, owner).await?;
    let mut seq = start;
    // Final state per id inside this transaction, in change order.
    let mut locs: HashMap<LocationId, Location> = HashMap::new();
    let mut ents: HashMap<EntryId, Entry> = HashMap::new();
    let mut del_locs: HashMap<LocationId, Seq> = HashMap::new();
    let mut del_ents: HashMap<EntryId, Seq> = HashMap::new();
    for c in chunk {
        seq = seq.next();
        match c {
            LocalChange::Location(l) => {
                del_locs.remove(&l.id);
                locs.insert(
                    l.id,
                    Location {
                        seq,
                        deleted: false,
                        ..l.clone()
                    },
                );
            }
            LocalChange::Entry(e) => {
                del_ents.remove(&e.id);
                ents.insert(
                    e.id,
                    Entry {
                        seq,
                        deleted: false,
                        ..e.clone()
                    },
                );
            }
            LocalChange::DeleteEntry(id) => match ents.get_mut(id) {
                Some(e) => {
                    e.seq = seq;
                    e.deleted = true;
                }
                None => {
                    del_ents.insert(*id, seq);
                }
            },
            LocalChange::DeleteLocation(id) => match locs.get_mut(id) {
                Some(l) => {
                    l.seq = seq;
                    l.deleted = true;
                }
                None => {
                    del_locs.insert(*id, seq);
                }
            },
        }
    }
    // A location that ends deleted takes its live entries with it, each
    // tombstoned under a seq of its own (readers and peers see them gone).
    let gone: HashSet<LocationId> = locs
        .values()
        .filter(|l| l.deleted)
        .map(|l| l.id)
        .chain(del_locs.keys().copied())
        .collect();
    let mut cascade: Vec<&mut Entry> = ents
        .values_mut()
        .filter(|e| !e.deleted && gone.contains(&e.location))
        .collect();
    cascade.sort_unstable_by_key(|e| e.id);
    for e in cascade {
        seq = seq.next();
        e.seq = seq;
        e.deleted = true;
    }
    let mut locs: Vec<&Location> = locs.values().collect();
    locs.sort_unstable_by_key(|l| l.id);
    let mut ents: Vec<&Entry> = ents.values().collect();
    ents.sort_unstable_by_key(|e| e.id);
    let mut del_locs: Vec<([u8; 16], Seq)> = del_locs
        .into_iter()
        .map(|(id, s)| (id.to_bytes(), s))
        .collect();
    del_locs.sort_unstable();
    let mut del_ents: Vec<([u8; 16], Seq)> = del_ents
        .into_iter()
        .map(|(id, s)| (id.to_bytes(), s))
        .collect();
    del_ents.sort_unstable();

    let written: HashSet<[u8; 16]> = ents
        .iter()
        .map(|e| e.id.to_bytes())
        .chain(del_ents.iter().map(|(id, _)| *id))
        .collect();
    let mut gone: Vec<LocationId> = gone.into_iter().collect();
    gone.sort_unstable();
    for location in gone {
        for id in bulk::live_entries_of(&mut txn, owner, location).await? {
            if !written.contains(&id) {
                seq = seq.next();
                del_ents.push((id, seq));
            }
        }
    }
    let mut deltas = HashMap::new();
    upsert_with_digest(&mut txn, owner, &locs, &ents, &mut deltas).await?;
    tombstone(&mut txn, "location", owner, &del_locs).await?;
    tombstone(&mut txn, "entry", owner, &del_ents).await?;
    digest::apply_updates(&mut deltas, digest::take_changed(&mut txn).await?);
    digest::save(&mut txn, deltas).await?;
    set_local_seq(&mut txn, owner, seq).await?;
    crate::gc::note_local_seq(&mut txn, seq).await?;
    txn.commit().await.map_err(db_err)?;
    sync_core::crash_point("commit.txn");
    Ok(SeqRange {
        first: start.next(),
        last: seq,
    })
}

impl Store {
    /// Applies a batch of `owner`'s records with `after < seq <= last` in ONE
    /// transaction, "higher seq wins", and moves the watermark to
    /// `max(held, last)` in the same transaction. Refused with nothing
    /// written on a gap, another IndexId (unless `after == 0`: a reset),
    /// a seq outside the range, a record of another owner, or records of
    /// this device.
    pub async fn apply_batch(
        &self,
        owner: DeviceId,
        index_id: IndexId,
        after: Seq,
        last: Seq,
        records: Vec<Record>,
    ) -> Result<Watermark> {
        let span = tracing::info_span!(
            "apply_batch",
            owner = %owner.fmt_short(),
            after = after.0,
            last = last.0,
            count = records.len()
        );
        async move {
            if self.inner.device.get().map(|d| d.device_id) == Some(owner) {
                return Err(StorageError::LocalOwner { owner });
            }
            if last < after {
                return Err(StorageError::BadRange {
                    after,
                    last,
                    seq: after,
                });
            }
            let (locs, ents) = split_records(owner, after, last, &records)?;

            let _guard = self.inner.write_lock.lock().await;
            let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
            // Dropped without commit (a refusal or an error): rolled back.
            let mut txn = conn.begin().await.map_err(db_err)?;
            let held = owner_state(&mut txn, owner).await?;
            let mut reset = false;
            match held {
                Some(s) if s.local => return Err(StorageError::LocalOwner { owner }),
                None if after > Seq::ZERO => {
                    return Err(StorageError::Gap {
                        owner,
                        after,
                        held: Seq::ZERO,
                    });
                }
                None => {}
                Some(s) if s.watermark.index_id != index_id => {
                    if after > Seq::ZERO {
                        return Err(StorageError::WrongIndex {
                            owner,
                            held: s.watermark.index_id,
                            got: index_id,
                            after,
                        });
                    }
                    reset = true;
                }
                Some(s) if after > s.watermark.seq => {
                    return Err(StorageError::Gap {
                        owner,
                        after,
                        held: s.watermark.seq,
                    });
                }
                Some(_) => {}
            }
            if reset {
                tracing::info!(index = %index_id, "new index of owner: dropping its old rows");
                bulk::drop_owner_rows(&mut txn, owner).await?;
            }
            write_records(&mut txn, owner, &locs, &ents).await?;
            let seq = match held {
                Some(s) if !reset => s.watermark.seq.max(last),
                _ => last,
            };
            let w = Watermark::new(index_id, seq);
            set_watermark(&mut txn, owner, w).await?;
            txn.commit().await.map_err(db_err)?;
            Ok(w)
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(self.path()))
    }

    /// Drops every row of a remote `owner` and sets its watermark to `(index_id, 0)`.
    pub async fn reset_owner(&self, owner: DeviceId, index_id: IndexId) -> Result<()> {
        if self.inner.device.get().map(|d| d.device_id) == Some(owner) {
            return Err(StorageError::LocalOwner { owner });
        }
        let span =
            tracing::info_span!("reset_owner", owner = %owner.fmt_short(), index = %index_id);
        async move {
            let _guard = self.inner.write_lock.lock().await;
            let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
            let mut txn = conn.begin().await.map_err(db_err)?;
            if let Some(s) = owner_state(&mut txn, owner).await?
                && s.local
            {
                return Err(StorageError::LocalOwner { owner });
            }
            bulk::drop_owner_rows(&mut txn, owner).await?;
            set_watermark(&mut txn, owner, Watermark::new(index_id, Seq::ZERO)).await?;
            txn.commit().await.map_err(db_err)?;
            Ok(())
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(self.path()))
    }
}

impl Store {
    /// Starts a new IndexId for this device's own records if it is still
    /// `current`, keeping every row and its seq, in one transaction.
    ///
    /// For a device that went back in time (a restore from a backup,
    /// commits lost to a power loss under `synchronous=NORMAL`): its next
    /// commits would reuse seqs its peers already hold with other content.
    /// Under a new IndexId every peer replaces all of its rows instead
    /// (`apply_batch` from `after == 0`). Returns the local watermark
    /// afterwards; unchanged if another call restarted the index first.
    pub async fn restart_local_index(&self, current: IndexId) -> Result<Watermark> {
        let me = self.local_id()?;
        let span =
            tracing::info_span!("restart_local_index", owner = %me.fmt_short(), old = %current);
        async move {
            let _guard = self.inner.write_lock.lock().await;
            let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
            let mut txn = conn.begin().await.map_err(db_err)?;
            let held = owner_state(&mut txn, me)
                .await?
                .ok_or(StorageError::NotInitialized)?
                .watermark;
            if held.index_id != current {
                return Ok(held);
            }
            let mut new = IndexId::random();
            while new == current {
                new = IndexId::random();
            }
            bulk::set_local_index(&mut txn, me, new).await?;
            txn.commit().await.map_err(db_err)?;
            tracing::info!(new = %new, seq = held.seq.0, "local index restarted");
            Ok(Watermark::new(new, held.seq))
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(self.path()))
    }
}

/// A location record must belong to the owner writing it.
fn location_of(owner: DeviceId, l: &Location) -> Result<()> {
    if l.owner == owner {
        return Ok(());
    }
    Err(StorageError::ForeignOwner {
        owner,
        detail: format!(
            "location {} belongs to {}",
            l.id.fmt_short(),
            l.owner.fmt_short()
        ),
    })
}

/// Checks every record of a batch of `owner` covering `(after, last]`: its
/// seq inside the range, every location owned by `owner`; returns the
/// locations and entries sorted by id (b-tree locality). Shared by received
/// batches and snapshot imports (see [`write_records`]).
pub(crate) fn split_records(
    owner: DeviceId,
    after: Seq,
    last: Seq,
    records: &[Record],
) -> Result<(Vec<&Location>, Vec<&Entry>)> {
    let mut locs: Vec<&Location> = Vec::new();
    let mut ents: Vec<&Entry> = Vec::with_capacity(records.len());
    for r in records {
        let seq = r.seq();
        if seq <= after || seq > last {
            return Err(StorageError::BadRange { after, last, seq });
        }
        match r {
            Record::Location(l) => {
                location_of(owner, l)?;
                locs.push(l);
            }
            Record::Entry(e) => ents.push(e),
        }
    }
    locs.sort_unstable_by_key(|l| l.id);
    ents.sort_unstable_by_key(|e| e.id);
    let dup_loc = locs
        .windows(2)
        .find(|w| w[0].id == w[1].id)
        .map(|w| w[0].id.fmt_short());
    let dup_ent = ents
        .windows(2)
        .find(|w| w[0].id == w[1].id)
        .map(|w| w[0].id.fmt_short());
    if let Some(id) = dup_loc.or(dup_ent) {
        return Err(StorageError::DuplicateRecord { owner, id });
    }
    Ok((locs, ents))
}

/// Writes checked records of `owner` inside the caller's transaction: no
/// entry may land in a location stored under another owner, no location
/// may be stored under another owner or be referenced by another owner's
/// entries, then the "higher seq wins, same owner only" upserts. The one
/// write path of remote records.
pub(crate) async fn write_records(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    locs: &[&Location],
    ents: &[&Entry],
) -> Result<()> {
    check_batch_locations(conn, owner, locs, ents).await?;
    let mut deltas = HashMap::new();
    upsert_with_digest(conn, owner, locs, ents, &mut deltas).await?;
    digest::save(conn, deltas).await
}

/// The upserts of checked, id-sorted records with their digest change:
/// every upserted record is added, then the rows the upsert updated are
/// corrected from what the triggers captured (see `digest.rs`).
async fn upsert_with_digest(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    locs: &[&Location],
    ents: &[&Entry],
    deltas: &mut HashMap<DeviceId, DigestDelta>,
) -> Result<()> {
    let d = deltas.entry(owner).or_default();
    upsert_locations(conn, owner, locs, d).await?;
    upsert_entries(conn, owner, ents, d).await?;
    let changed = digest::take_changed(conn).await?;
    digest::correct_upserts(owner, deltas, changed, |old| match old {
        Record::Entry(o) => ents
            .binary_search_by_key(&o.id, |e| e.id)
            .ok()
            .map(|i| Record::Entry(ents[i].clone())),
        Record::Location(o) => locs
            .binary_search_by_key(&o.id, |l| l.id)
            .ok()
            .map(|i| Record::Location(locs[i].clone())),
    })
}

/// Every location of the batch, and every entry's location, must not be
/// stored under another owner. An entry's location may be unknown yet:
/// records apply in any seq order (a renamed location has a newer seq than
/// its entries, so a new peer's first page holds entries of a location it
/// has not seen), and the watermark cannot pass the location before it
/// arrives. A location stored for the first time must not be referenced by
/// another owner's entries, so no entry ever lies in another owner's location.
async fn check_batch_locations(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    locs: &[&Location],
    ents: &[&Entry],
) -> Result<()> {
    let in_batch: HashSet<LocationId> = locs.iter().map(|l| l.id).collect();
    let mut wanted: HashSet<LocationId> = in_batch.clone();
    wanted.extend(ents.iter().map(|e| e.location));
    let stored = check_location_owners(conn, owner, None, wanted).await?;
    let new: Vec<LocationId> = in_batch
        .into_iter()
        .filter(|id| !stored.contains_key(id))
        .collect();
    if let Some(id) = bulk::foreign_entry_location(conn, owner, &new).await? {
        return Err(StorageError::ForeignOwner {
            owner,
            detail: format!(
                "location {} already holds entries of another owner",
                id.fmt_short()
            ),
        });
    }
    Ok(())
}

/// Checks the stored owners of `wanted` locations: none may belong to
/// another owner. With `declared` (local commits), one not stored at all
/// must be among them (the locations written by the same change); without
/// (received records), it may be unknown yet. Returns the stored owners.
async fn check_location_owners(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    declared: Option<&HashSet<LocationId>>,
    wanted: HashSet<LocationId>,
) -> Result<HashMap<LocationId, DeviceId>> {
    let ids: Vec<LocationId> = wanted.into_iter().collect();
    let stored: HashMap<LocationId, DeviceId> =
        location_owners(conn, &ids).await?.into_iter().collect();
    for id in ids {
        match (stored.get(&id), declared) {
            (Some(o), _) if *o != owner => {
                return Err(StorageError::ForeignOwner {
                    owner,
                    detail: format!("location {} belongs to {}", id.fmt_short(), o.fmt_short()),
                });
            }
            (None, Some(declared)) if !declared.contains(&id) => {
                return Err(StorageError::ForeignOwner {
                    owner,
                    detail: format!(
                        "entry in location {}, which is not a location of this owner",
                        id.fmt_short()
                    ),
                });
            }
            _ => {}
        }
    }
    Ok(stored)
}
