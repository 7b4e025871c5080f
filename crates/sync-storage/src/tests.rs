//! Unit tests against real SQLite files in temporary directories.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use chrono::{TimeZone, Utc};
use sea_orm::ConnectionTrait;
use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, IndexId, LibraryId, Location, LocationId, Record, Seq,
    Strategy, TransferId, Watermark,
};
use tempfile::TempDir;

use crate::snapshot::{hash_file, read_chunk_at};
use crate::*;

async fn open(dir: &TempDir, name: &str) -> Store {
    Store::open(&dir.path().join(name).join("library.db"))
        .await
        .unwrap()
}

pub(crate) async fn device(dir: &TempDir, name: &str) -> (Store, DeviceId) {
    let s = open(dir, name).await;
    let d = s.create_device(name, LibraryId::new_v7()).await.unwrap();
    (s, d.device_id)
}

pub(crate) fn location(owner: DeviceId, seq: u64) -> Location {
    Location {
        id: LocationId::new_v7(),
        owner,
        path: "/home/me/photos".into(),
        name: "photos".into(),
        seq: Seq(seq),
        deleted: false,
    }
}

pub(crate) fn entry(loc: LocationId, i: u64, seq: u64) -> Entry {
    let t = Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap();
    Entry {
        id: EntryId::new_v7(),
        location: loc,
        parent: None,
        name: format!("IMG_{i:06}.jpg"),
        kind: if i.is_multiple_of(10) {
            EntryKind::Dir
        } else {
            EntryKind::File
        },
        size: u64::MAX - i,
        inode: if i.is_multiple_of(7) {
            None
        } else {
            Some(1 << 63 | i)
        },
        created_at: t,
        modified_at: t + chrono::Duration::microseconds(i as i64),
        seq: Seq(seq),
        deleted: false,
    }
}

/// A location at seq 1 then `n` entries at seqs 2..=n+1.
pub(crate) fn batch(owner: DeviceId, n: u64) -> (Location, Vec<Record>) {
    let loc = location(owner, 1);
    let mut out = vec![Record::Location(loc.clone())];
    for i in 0..n {
        out.push(Record::Entry(entry(loc.id, i, i + 2)));
    }
    (loc, out)
}

/// Everything observable about the library: summaries and watermarks.
pub(crate) async fn state(s: &Store) -> (Vec<OwnerSummary>, Vec<(DeviceId, Watermark)>) {
    (s.summaries().await.unwrap(), s.watermarks().await.unwrap())
}

#[tokio::test]
async fn apply_is_idempotent_and_order_insensitive() {
    let dir = TempDir::new().unwrap();
    let (a, _) = device(&dir, "a").await;
    let (b, _) = device(&dir, "b").await;
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (_, recs) = batch(owner, 3000);
    let w1 = a
        .apply_batch(owner, idx, Seq(0), Seq(3001), recs.clone())
        .await
        .unwrap();
    assert_eq!(w1, Watermark::new(idx, Seq(3001)));
    let first = a.summary(owner).await.unwrap();
    assert_eq!(first.entries, 3000);
    assert_eq!(first.seq, Seq(3001));
    // Same batch again: same state.
    a.apply_batch(owner, idx, Seq(0), Seq(3001), recs.clone())
        .await
        .unwrap();
    assert_eq!(a.summary(owner).await.unwrap(), first);
    // Reversed order on another store: same state.
    let mut rev = recs.clone();
    rev.reverse();
    b.apply_batch(owner, idx, Seq(0), Seq(3001), rev)
        .await
        .unwrap();
    assert_eq!(b.summary(owner).await.unwrap(), first);
    // Rows round-trip exactly (u64 bit-casts, micros, options).
    let loc = match &recs[0] {
        Record::Location(l) => l.clone(),
        _ => unreachable!(),
    };
    let got = b.location_entries(loc.id).await.unwrap();
    let want: Vec<Entry> = recs[1..]
        .iter()
        .map(|r| match r {
            Record::Entry(e) => e.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(b.locations().await.unwrap(), vec![loc]);
    let page = b.records_after(owner, Seq(0), 10_000).await.unwrap();
    assert_eq!(page, recs);
    // The fingerprint is exactly Fingerprint::add over (id, seq, deleted) of every record.
    let mut fp = sync_core::Fingerprint::default();
    for r in &recs {
        fp.add(&r.id_bytes(), r.seq(), r.deleted());
    }
    assert_eq!(first.fingerprint, fp);
}

#[tokio::test]
async fn summary_fingerprint_matches_records_with_huge_values() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (loc, mut recs) = batch(owner, 200);
    // Seqs above i64::MAX round-trip through the i64 bit-cast; ids full of zero bytes.
    let base = u64::MAX - 1000;
    for (i, r) in recs.iter_mut().enumerate() {
        match r {
            Record::Location(l) => l.seq = Seq(base + 1),
            Record::Entry(e) => {
                e.seq = Seq(base + 2 + i as u64);
                e.deleted = i % 3 == 0;
                if i == 5 {
                    e.id = EntryId::from_bytes([0; 16]);
                }
                if i == 6 {
                    e.id = EntryId::from_bytes([b','; 16]);
                }
            }
        }
    }
    s.apply_batch(owner, IndexId(1), Seq(0), Seq(base + 1000), recs.clone())
        .await
        .unwrap();
    let mut fp = sync_core::Fingerprint::default();
    for r in &recs {
        fp.add(&r.id_bytes(), r.seq(), r.deleted());
    }
    let sum = s.summary(owner).await.unwrap();
    assert_eq!(sum.fingerprint, fp);
    assert_eq!(sum.entries + sum.tombstones, 200);
    assert_eq!(sum.tombstones, 66);
    assert_eq!(s.location_entries(loc.id).await.unwrap().len(), 200);
}

#[tokio::test]
async fn older_seq_never_overwrites_and_tombstones_win() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (loc, recs) = batch(owner, 10);
    s.apply_batch(owner, idx, Seq(0), Seq(11), recs.clone())
        .await
        .unwrap();
    let mut e0 = match &recs[1] {
        Record::Entry(e) => e.clone(),
        _ => unreachable!(),
    };
    let mut e1 = match &recs[2] {
        Record::Entry(e) => e.clone(),
        _ => unreachable!(),
    };
    e0.name = "renamed".into();
    e0.seq = Seq(12);
    e1.deleted = true;
    e1.seq = Seq(13);
    s.apply_batch(
        owner,
        idx,
        Seq(11),
        Seq(13),
        vec![Record::Entry(e0.clone()), Record::Entry(e1.clone())],
    )
    .await
    .unwrap();
    let after_new = s.summary(owner).await.unwrap();
    // Replaying the old batch (after 0 <= held 13) changes nothing.
    let w = s
        .apply_batch(owner, idx, Seq(0), Seq(11), recs.clone())
        .await
        .unwrap();
    assert_eq!(w, Watermark::new(idx, Seq(13)));
    assert_eq!(s.summary(owner).await.unwrap(), after_new);
    assert_eq!(after_new.tombstones, 1);
    assert_eq!(after_new.entries, 9);
    let rows = s.location_entries(loc.id).await.unwrap();
    let got0 = rows.iter().find(|e| e.id == e0.id).unwrap();
    assert_eq!(got0, &e0);
    let got1 = rows.iter().find(|e| e.id == e1.id).unwrap();
    assert!(got1.deleted);
    assert_eq!(got1.seq, Seq(13));
}

#[tokio::test]
async fn refusals_leave_the_library_unchanged() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let other = DeviceId::new_v7();
    let idx = IndexId::random();
    let (loc, recs) = batch(owner, 100);
    s.apply_batch(owner, idx, Seq(0), Seq(101), recs)
        .await
        .unwrap();
    let (oloc, orecs) = batch(other, 5);
    s.apply_batch(other, IndexId::random(), Seq(0), Seq(6), orecs)
        .await
        .unwrap();
    let before = state(&s).await;

    // Gap: after 200 but 101 held.
    let e = s
        .apply_batch(
            owner,
            idx,
            Seq(200),
            Seq(201),
            vec![Record::Entry(entry(loc.id, 1, 201))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Gap {
                after: Seq(200),
                held: Seq(101),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("gap"), "{e}");
    // Gap for an owner nothing is held of.
    let e = s
        .apply_batch(DeviceId::new_v7(), idx, Seq(5), Seq(6), vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Gap { held: Seq(0), .. }), "{e}");
    // Wrong index with after != 0.
    let e = s
        .apply_batch(
            owner,
            IndexId::random(),
            Seq(50),
            Seq(102),
            vec![Record::Entry(entry(loc.id, 1, 102))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::WrongIndex { .. }), "{e}");
    // A location claiming another owner.
    let e = s
        .apply_batch(
            owner,
            idx,
            Seq(101),
            Seq(102),
            vec![Record::Location(location(other, 102))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ForeignOwner { .. }), "{e}");
    // An entry in another owner's location, after valid records.
    let e = s
        .apply_batch(
            owner,
            idx,
            Seq(101),
            Seq(103),
            vec![
                Record::Entry(entry(loc.id, 1, 102)),
                Record::Entry(entry(oloc.id, 2, 103)),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ForeignOwner { .. }), "{e}");
    // Seq outside (after, last].
    let e = s
        .apply_batch(
            owner,
            idx,
            Seq(101),
            Seq(102),
            vec![Record::Entry(entry(loc.id, 1, 103))],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, StorageError::BadRange { seq: Seq(103), .. }),
        "{e}"
    );
    let e = s
        .apply_batch(owner, idx, Seq(101), Seq(100), vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::BadRange { .. }), "{e}");
    // Own records from outside.
    let e = s
        .apply_batch(me, idx, Seq(0), Seq(1), vec![])
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::LocalOwner { .. }), "{e}");
    let e = s.reset_owner(me, IndexId::random()).await.unwrap_err();
    assert!(matches!(e, StorageError::LocalOwner { .. }), "{e}");

    assert_eq!(state(&s).await, before);
}

#[tokio::test]
async fn new_index_after_zero_resets_the_owner() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (_, old) = batch(owner, 50);
    s.apply_batch(owner, IndexId(1), Seq(0), Seq(51), old)
        .await
        .unwrap();
    let (_, new) = batch(owner, 7);
    let w = s
        .apply_batch(owner, IndexId(2), Seq(0), Seq(8), new.clone())
        .await
        .unwrap();
    assert_eq!(w, Watermark::new(IndexId(2), Seq(8)));
    let sum = s.summary(owner).await.unwrap();
    assert_eq!(sum.entries, 7);
    assert_eq!(sum.index_id, IndexId(2));
    assert_eq!(s.records_after(owner, Seq(0), 1000).await.unwrap(), new);
    // reset_owner drops everything.
    s.reset_owner(owner, IndexId(3)).await.unwrap();
    assert_eq!(
        s.watermark(owner).await.unwrap(),
        Some(Watermark::new(IndexId(3), Seq(0)))
    );
    assert_eq!(s.summary(owner).await.unwrap().entries, 0);
    assert_eq!(s.count_after(owner, Seq(0)).await.unwrap(), 0);
}

#[tokio::test]
async fn device_lifecycle_and_local_commits() {
    let dir = TempDir::new().unwrap();
    let s = open(&dir, "s").await;
    assert!(s.device().await.unwrap().is_none());
    assert!(matches!(
        s.local_watermark().await,
        Err(StorageError::NotInitialized)
    ));
    let d = s
        .create_device("laptop", LibraryId::new_v7())
        .await
        .unwrap();
    assert!(matches!(
        s.create_device("again", LibraryId::new_v7()).await,
        Err(StorageError::AlreadyInitialized { .. })
    ));
    let me = d.device_id;
    let w0 = s.local_watermark().await.unwrap();
    assert_eq!(w0.seq, Seq(0));
    assert_ne!(w0.index_id, IndexId(0));
    assert!(matches!(
        s.commit_local(DeviceId::new_v7(), vec![]).await,
        Err(StorageError::NotLocalDevice { .. })
    ));
    assert!(matches!(
        s.commit_local(
            me,
            vec![LocalChange::Location(location(DeviceId::new_v7(), 0))]
        )
        .await,
        Err(StorageError::ForeignOwner { .. })
    ));

    // 25K changes: three transactions.
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    let mut ids = Vec::new();
    for i in 0..25_000 {
        let e = entry(loc.id, i, 0);
        ids.push(e.id);
        changes.push(LocalChange::Entry(e));
    }
    // Deletes of rows committed in an earlier transaction and in the same one.
    for id in ids.iter().step_by(1000) {
        changes.push(LocalChange::DeleteEntry(*id));
    }
    changes.push(LocalChange::DeleteEntry(ids[24_999]));
    let n = changes.len() as u64;
    let r = s.commit_local(me, changes).await.unwrap();
    assert_eq!(r.first, Seq(1));
    assert_eq!(r.last, Seq(n));
    assert_eq!(r.len(), n);
    assert_eq!(
        s.local_watermark().await.unwrap(),
        Watermark::new(w0.index_id, Seq(n))
    );
    let sum = s.summary(me).await.unwrap();
    assert!(sum.local);
    assert_eq!(sum.seq, Seq(n));
    assert_eq!(sum.tombstones, 26);
    assert_eq!(sum.entries, 25_000 - 26);

    // Page through everything in seq order.
    let mut after = Seq(0);
    let mut seen = 0u64;
    loop {
        let page = s.records_after(me, after, 777).await.unwrap();
        if page.is_empty() {
            break;
        }
        for r in &page {
            assert!(r.seq() > after, "seq order");
            after = r.seq();
            seen += 1;
        }
    }
    assert_eq!(after, Seq(n));
    assert_eq!(seen, 25_001);
    assert_eq!(s.count_after(me, Seq(0)).await.unwrap(), 25_001);
    assert_eq!(s.count_after(me, Seq(n - 1)).await.unwrap(), 1);

    // Tombstoned in place: other fields kept.
    let rows = s.location_entries(loc.id).await.unwrap();
    let first = rows.iter().find(|e| e.id == ids[0]).unwrap();
    assert!(first.deleted);
    assert_eq!(first.name, "IMG_000000.jpg");

    // An update re-stamps; deleting a location tombstones its live entries,
    // each under a seq of its own (the updated one too: it ends deleted).
    let live = s.summary(me).await.unwrap().entries;
    assert_eq!(live, 25_000 - 26);
    let mut e = rows[5].clone();
    e.name = "new-name".into();
    let r2 = s
        .commit_local(
            me,
            vec![
                LocalChange::Entry(e.clone()),
                LocalChange::DeleteLocation(loc.id),
            ],
        )
        .await
        .unwrap();
    assert_eq!((r2.first, r2.last), (Seq(n + 1), Seq(n + 2 + live)));
    let tail = s.records_after(me, Seq(n), 100_000).await.unwrap();
    assert_eq!(
        tail.len() as u64,
        1 + live,
        "the location and every live entry"
    );
    assert!(
        tail.iter()
            .any(|r| matches!(r, Record::Location(l) if l.deleted && l.seq == Seq(n + 2)))
    );
    assert!(
        tail.iter()
            .any(|r| matches!(r, Record::Entry(x) if x.name == "new-name" && x.deleted))
    );
    assert!(
        tail.iter().all(|r| r.deleted()),
        "nothing of the location stays live"
    );
    let summary = s.summary(me).await.unwrap();
    assert_eq!((summary.entries, summary.tombstones), (0, 25_000));
    let empty = s.commit_local(me, vec![]).await.unwrap();
    assert!(empty.is_empty());

    // Persisted: reopen.
    s.close().await;
    let s2 = open(&dir, "s").await;
    assert_eq!(s2.device().await.unwrap(), Some(d));
    assert_eq!(s2.summary(me).await.unwrap().seq, Seq(n + 2 + live));
}

#[tokio::test]
async fn error_mid_transaction_leaves_rows_and_watermark_consistent() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (loc, recs) = batch(owner, 100);
    s.apply_batch(owner, idx, Seq(0), Seq(101), recs)
        .await
        .unwrap();
    s.inner
        .writer
        .execute_unprepared(
            "CREATE TRIGGER poison BEFORE INSERT ON entry WHEN NEW.name = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
        .await
        .unwrap();
    let before = state(&s).await;
    // A big batch with the poisoned row in the middle (by id order too).
    let mut big = Vec::new();
    for i in 0..5000u64 {
        let mut e = entry(loc.id, i, 102 + i);
        if i == 2500 {
            e.name = "poison".into();
        }
        big.push(Record::Entry(e));
    }
    let e = s
        .apply_batch(owner, idx, Seq(101), Seq(5101), big)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Db(_)), "{e}");
    assert!(e.to_string().contains("injected failure"), "{e}");
    assert_eq!(state(&s).await, before);

    // Local commit over several transactions: the failing one rolls back
    // whole, earlier ones stay, max seq matches the rows.
    let l = location(me, 0);
    let mut changes = vec![LocalChange::Location(l.clone())];
    for i in 0..25_000u64 {
        let mut e = entry(l.id, i, 0);
        if i == 15_000 {
            e.name = "poison".into();
        }
        changes.push(LocalChange::Entry(e));
    }
    assert!(s.commit_local(me, changes).await.is_err());
    let w = s.local_watermark().await.unwrap();
    assert_eq!(w.seq, Seq(10_000));
    assert_eq!(s.count_after(me, Seq(0)).await.unwrap(), 10_000);
    let last = s.records_after(me, Seq(9_999), 10).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].seq(), Seq(10_000));
}

#[tokio::test]
async fn checkpoints_round_trip() {
    let dir = TempDir::new().unwrap();
    let s = open(&dir, "s").await;
    let t = Utc.timestamp_opt(1_700_000_000, 5_000).unwrap();
    let mut c = Checkpoint {
        transfer: TransferId::new_v7(),
        peer: DeviceId::new_v7(),
        owner: DeviceId::new_v7(),
        direction: Direction::Receive,
        strategy: Strategy::Snapshot,
        last_acked: Seq(u64::MAX - 1),
        snapshot: Some(sync_core::SnapshotId::new_v7()),
        next_chunk: 7,
        attempts: 2,
        state: TransferState::Running,
        started_at: t,
        updated_at: t,
    };
    s.save_checkpoint(&c).await.unwrap();
    assert_eq!(
        s.load_checkpoint(c.transfer).await.unwrap(),
        Some(c.clone())
    );
    c.state = TransferState::Failed;
    c.snapshot = None;
    c.strategy = Strategy::Batches;
    c.direction = Direction::Send;
    s.save_checkpoint(&c).await.unwrap();
    let c2 = Checkpoint {
        transfer: TransferId::new_v7(),
        state: TransferState::Completed,
        started_at: t + chrono::Duration::seconds(1),
        ..c.clone()
    };
    s.save_checkpoint(&c2).await.unwrap();
    assert_eq!(s.list_checkpoints().await.unwrap(), vec![c.clone(), c2]);
    assert_eq!(s.load_checkpoint(TransferId::new_v7()).await.unwrap(), None);
}

// ---------------------------------------------------------------- snapshots

/// A local device with `n` entries (long names: several chunks) and some tombstones.
pub(crate) async fn populated(dir: &TempDir, name: &str, n: u64) -> (Store, DeviceId) {
    let (s, me) = device(dir, name).await;
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    let mut ids = Vec::new();
    for i in 0..n {
        let mut e = entry(loc.id, i, 0);
        e.name = format!("{i:08}-{}", "x".repeat(200));
        ids.push(e.id);
        changes.push(LocalChange::Entry(e));
    }
    for id in ids.iter().step_by(97) {
        changes.push(LocalChange::DeleteEntry(*id));
    }
    s.commit_local(me, changes).await.unwrap();
    (s, me)
}

/// Downloads every chunk of `manifest` into `to` and imports it.
pub(crate) async fn transfer(
    from: &Store,
    manifest: &SnapshotManifest,
    to: &Store,
) -> Result<Watermark> {
    let mut d = to.begin_download(&manifest.offer()).await?;
    while !d.is_complete() {
        let i = d.next_chunk();
        let (hash, data) = from.read_snapshot_chunk(manifest, i).await?;
        d.write_chunk(i, hash, &data).await?;
    }
    to.import_snapshot(d).await
}

/// Serves an arbitrary file as a snapshot with the given offer fields.
pub(crate) async fn offer_file(
    to: &Store,
    path: &Path,
    owner: DeviceId,
    index_id: IndexId,
    max_seq: Seq,
    entries: u64,
) -> Result<Watermark> {
    let (bytes, hash, chunks) = hash_file(path).unwrap();
    let offer = SnapshotOfferInfo {
        id: sync_core::SnapshotId::new_v7(),
        owner,
        index_id,
        max_seq,
        entries,
        bytes,
        chunks: chunks.len() as u32,
        hash,
    };
    let mut d = to.begin_download(&offer).await?;
    for (i, c) in chunks.iter().enumerate() {
        let raw = read_chunk_at(path, bytes, i as u32).unwrap();
        d.write_chunk(i as u32, c.hash, &sync_core::codec::compress(&raw))
            .await?;
    }
    to.import_snapshot(d).await
}

#[tokio::test]
async fn snapshot_export_import_round_trip() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 12_000).await;
    let m = a.export_snapshot(me).await.unwrap();
    assert!(m.chunks.len() >= 3, "{} chunks", m.chunks.len());
    assert_eq!(m.entries, 12_001);
    assert_eq!(a.snapshot_manifest(m.id).await.unwrap(), Some(m.clone()));
    assert!(
        a.snapshot_manifest(sync_core::SnapshotId::new_v7())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        a.read_snapshot_chunk(&m, m.chunks.len() as u32).await,
        Err(StorageError::NoSuchChunk { .. })
    ));

    let (b, _) = device(&dir, "b").await;
    let w = transfer(&a, &m, &b).await.unwrap();
    let wa = a.local_watermark().await.unwrap();
    assert_eq!(w, wa);
    assert_eq!(b.watermark(me).await.unwrap(), Some(wa));
    let sa = a.summary(me).await.unwrap();
    let sb = b.summary(me).await.unwrap();
    assert_eq!(
        (
            sa.fingerprint,
            sa.entries,
            sa.tombstones,
            sa.seq,
            sa.index_id
        ),
        (
            sb.fingerprint,
            sb.entries,
            sb.tombstones,
            sb.seq,
            sb.index_id
        )
    );
    assert!(!sb.local);
    // The downloaded file is gone.
    assert_eq!(std::fs::read_dir(b.incoming_dir()).unwrap().count(), 0);
    // Batches continue from the snapshot's max_seq.
    assert_eq!(b.count_after(me, Seq(0)).await.unwrap(), 12_001);

    // A remote owner's records can be re-exported (B -> C).
    let m2 = b.export_snapshot(me).await.unwrap();
    let (c, _) = device(&dir, "c").await;
    transfer(&b, &m2, &c).await.unwrap();
    assert_eq!(c.summary(me).await.unwrap().fingerprint, sa.fingerprint);
    // Importing into the owner itself is refused.
    let e = transfer(&b, &m2, &a).await.unwrap_err();
    assert!(matches!(e, StorageError::LocalOwner { .. }), "{e}");
}

#[tokio::test]
async fn snapshot_download_resumes_after_drop() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 12_000).await;
    let m = a.export_snapshot(me).await.unwrap();
    let (b, _) = device(&dir, "b").await;
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    for i in 0..2 {
        let (h, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
        d.write_chunk(i, h, &data).await.unwrap();
    }
    // Out of order is refused.
    let (h, data) = a.read_snapshot_chunk(&m, 3).await.unwrap();
    assert!(matches!(
        d.write_chunk(3, h, &data).await,
        Err(StorageError::ChunkOutOfOrder {
            expected: 2,
            got: 3
        })
    ));
    drop(d);
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    assert_eq!(d.next_chunk(), 2);
    assert_eq!(d.chunks(), m.chunks.len() as u32);
    assert_eq!(d.id(), m.id);
    while !d.is_complete() {
        let i = d.next_chunk();
        let (h, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
        d.write_chunk(i, h, &data).await.unwrap();
    }
    // Regression (noticed while building the disk-full tests): a complete
    // download dropped before its import (a crash there) resumed one chunk
    // short, because a partial last chunk was not counted as present.
    assert_ne!(
        m.bytes % sync_core::SNAPSHOT_CHUNK_SIZE as u64,
        0,
        "a partial last chunk"
    );
    drop(d);
    let d = b.begin_download(&m.offer()).await.unwrap();
    assert!(d.is_complete(), "resumed at chunk {}", d.next_chunk());
    b.import_snapshot(d).await.unwrap();
    assert_eq!(
        b.summary(me).await.unwrap().fingerprint,
        a.summary(me).await.unwrap().fingerprint
    );
}

#[tokio::test]
async fn bad_snapshots_are_refused_and_change_nothing() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 12_000).await;
    let m = a.export_snapshot(me).await.unwrap();
    let (b, _) = device(&dir, "b").await;
    // B already holds something of another owner and an older part of A.
    let other = DeviceId::new_v7();
    let (_, recs) = batch(other, 20);
    b.apply_batch(other, IndexId(9), Seq(0), Seq(21), recs)
        .await
        .unwrap();
    let part = a.records_after(me, Seq(0), 500).await.unwrap();
    let last = part.last().unwrap().seq();
    b.apply_batch(
        me,
        a.local_watermark().await.unwrap().index_id,
        Seq(0),
        last,
        part,
    )
    .await
    .unwrap();
    let before = state(&b).await;

    // Truncated: import with chunks missing.
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    let (h, data) = a.read_snapshot_chunk(&m, 0).await.unwrap();
    d.write_chunk(0, h, &data).await.unwrap();
    let e = b.import_snapshot(d).await.unwrap_err();
    assert!(matches!(e, StorageError::Truncated { have: 1, .. }), "{e}");

    // Chunk hash mismatch, and corrupt chunk data.
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    assert_eq!(d.next_chunk(), 1, "resumes the partial download");
    let (mut h, data) = a.read_snapshot_chunk(&m, 1).await.unwrap();
    h[0] ^= 1;
    let e = d.write_chunk(1, h, &data).await.unwrap_err();
    assert!(
        matches!(e, StorageError::ChunkHashMismatch { index: 1 }),
        "{e}"
    );
    let e = d.write_chunk(1, h, &data[..10]).await.unwrap_err();
    assert!(
        matches!(e, StorageError::CorruptChunk { index: 1, .. }),
        "{e}"
    );
    assert_eq!(d.next_chunk(), 1);
    d.discard().await.unwrap();

    // Whole-file hash mismatch.
    let mut offer = m.offer();
    offer.hash[3] ^= 0xff;
    offer.id = sync_core::SnapshotId::new_v7();
    let mut d = b.begin_download(&offer).await.unwrap();
    for i in 0..offer.chunks {
        let (h, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
        d.write_chunk(i, h, &data).await.unwrap();
    }
    let e = b.import_snapshot(d).await.unwrap_err();
    assert!(matches!(e, StorageError::FileHashMismatch { .. }), "{e}");

    // Not SQLite.
    let junk = dir.path().join("junk.bin");
    // (Within the size bound of a 5-record offer, so the header is reached.)
    std::fs::write(&junk, vec![7u8; 600 << 10]).unwrap();
    let e = offer_file(&b, &junk, me, IndexId(1), Seq(5), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::NotSqlite(_)), "{e}");

    // SQLite with the wrong schema.
    let wrong = dir.path().join("wrong.db");
    {
        let conn = sea_orm::Database::connect(format!("sqlite://{}?mode=rwc", wrong.display()))
            .await
            .unwrap();
        conn.execute_unprepared("CREATE TABLE manifest (x INTEGER); CREATE TABLE entry (id BLOB)")
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let e = offer_file(&b, &wrong, me, IndexId(1), Seq(5), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::WrongSchema(_)), "{e}");

    // A manifest row that disagrees with the content.
    let edited = dir.path().join("edited.db");
    std::fs::copy(&m.path, &edited).unwrap();
    {
        let conn = sea_orm::Database::connect(format!("sqlite://{}", edited.display()))
            .await
            .unwrap();
        conn.execute_unprepared("UPDATE manifest SET records = records + 5")
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let e = offer_file(&b, &edited, me, m.index_id, m.max_seq, m.entries + 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ManifestMismatch(_)), "{e}");
    // An offer that disagrees with the (genuine) manifest.
    let e = offer_file(&b, &m.path, me, m.index_id, Seq(m.max_seq.0 + 1), m.entries)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ManifestMismatch(_)), "{e}");
    let e = offer_file(&b, &m.path, other, m.index_id, m.max_seq, m.entries)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ManifestMismatch(_)), "{e}");
    // A bad offer.
    let mut bad = m.offer();
    bad.chunks += 1;
    assert!(matches!(
        b.begin_download(&bad).await,
        Err(StorageError::BadOffer(_))
    ));

    assert_eq!(state(&b).await, before);
    // And the genuine snapshot still imports on top of the partial state.
    transfer(&a, &m, &b).await.unwrap();
    assert_eq!(
        b.summary(me).await.unwrap().fingerprint,
        a.summary(me).await.unwrap().fingerprint
    );
}

#[tokio::test]
async fn new_library_uses_large_pages_and_writer_survives_refusals() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let row = s
        .inner
        .reader
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Sqlite,
            "PRAGMA page_size",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.try_get_by_index::<i64>(0).unwrap(),
        i64::from(PAGE_SIZE)
    );

    // A refusal inside the sqlx transaction (a gap) rolls back and hands the
    // writer connection back clean: the next batch and a local commit work.
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (loc, recs) = batch(owner, 1500);
    s.apply_batch(owner, idx, Seq(0), Seq(1501), recs)
        .await
        .unwrap();
    let e = s
        .apply_batch(
            owner,
            idx,
            Seq(2000),
            Seq(2001),
            vec![Record::Entry(entry(loc.id, 1, 2001))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::Gap { .. }), "{e}");
    let w = s
        .apply_batch(
            owner,
            idx,
            Seq(1501),
            Seq(1502),
            vec![Record::Entry(entry(loc.id, 1, 1502))],
        )
        .await
        .unwrap();
    assert_eq!(w.seq, Seq(1502));
    let l = location(me, 0);
    let r = s
        .commit_local(me, vec![LocalChange::Location(l)])
        .await
        .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(s.summary(owner).await.unwrap().entries, 1501);
}

#[tokio::test]
async fn records_after_round_trips_odd_values_across_pages() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (loc, mut recs) = batch(owner, 300);
    let names = [
        "",
        "a,b",
        "nul\0byte",
        "日本語の名前.txt",
        "-1",
        "x".repeat(5000).leak(),
    ];
    let parent = EntryId::new_v7();
    let early = Utc.timestamp_opt(-2_000_000_000, 1_000).unwrap();
    for (i, r) in recs.iter_mut().enumerate() {
        if let Record::Entry(e) = r {
            e.name = names[i % names.len()].to_owned();
            e.parent = (i % 2 == 0).then_some(parent);
            e.deleted = i % 5 == 0;
            e.kind = EntryKind::from_code((i % 3) as u8).unwrap();
            e.size = if i % 4 == 0 { 0 } else { u64::MAX - i as u64 };
            if i % 11 == 0 {
                e.created_at = early;
                e.modified_at = early;
            }
        }
    }
    // A second location in the middle of the seq range.
    let mut loc2 = location(owner, 150);
    loc2.name = "two,names\0".into();
    if let Record::Entry(e) = &mut recs[149] {
        e.seq = Seq(400);
    }
    recs.push(Record::Location(loc2));
    s.apply_batch(owner, IndexId(1), Seq(0), Seq(400), recs.clone())
        .await
        .unwrap();
    let mut want = recs.clone();
    want.sort_by_key(|r| r.seq());
    for page in [1, 7, 100, 1000] {
        let mut got = Vec::new();
        let mut after = Seq(0);
        loop {
            let p = s.records_after(owner, after, page).await.unwrap();
            assert!(p.len() <= page);
            let Some(last) = p.last() else { break };
            after = last.seq();
            got.extend(p);
        }
        assert_eq!(got, want, "page size {page}");
    }
    assert_eq!(s.count_after(owner, Seq(0)).await.unwrap(), 302);
    assert_eq!(s.location_entries(loc.id).await.unwrap().len(), 300);
    // Seqs above i64::MAX are read back in stored (i64) order.
    let other = DeviceId::new_v7();
    let (_, mut high) = batch(other, 20);
    let base = u64::MAX - 100;
    for (i, r) in high.iter_mut().enumerate() {
        match r {
            Record::Location(l) => l.seq = Seq(base + 1),
            Record::Entry(e) => e.seq = Seq(base + 1 + i as u64),
        }
    }
    s.apply_batch(other, IndexId(2), Seq(0), Seq(base + 50), high.clone())
        .await
        .unwrap();
    assert_eq!(s.records_after(other, Seq(base), 100).await.unwrap(), high);
    assert_eq!(
        s.records_after(other, Seq(base + 10), 3).await.unwrap(),
        high[10..13].to_vec()
    );
}

#[tokio::test]
async fn checkpoint_truncates_the_wal() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (_, recs) = batch(owner, 2000);
    s.apply_batch(owner, IndexId(1), Seq(0), Seq(2001), recs)
        .await
        .unwrap();
    let mut wal = s.path().as_os_str().to_owned();
    wal.push("-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0);
    s.checkpoint().await.unwrap();
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
    // Writes and reads go on afterwards.
    let me = s.device().await.unwrap().unwrap().device_id;
    let l = location(me, 0);
    s.commit_local(me, vec![LocalChange::Location(l)])
        .await
        .unwrap();
    assert_eq!(s.summary(owner).await.unwrap().entries, 2000);
}

// ---------------------------------------------------------------- full disk

use crate::testing::SmallDisk;

/// Where a full disk is simulated: a small tmpfs, or (where mounting is not
/// permitted) SQLite's `max_page_count` on the library's writer.
enum Space {
    Disk(SmallDisk),
    PageCap(TempDir),
}

impl Space {
    fn new(kib: u64) -> Space {
        match SmallDisk::mount(kib) {
            Some(d) => Space::Disk(d),
            None => {
                eprintln!(
                    "cannot mount a tmpfs (not root?): falling back to PRAGMA max_page_count"
                );
                Space::PageCap(TempDir::new().unwrap())
            }
        }
    }

    fn path(&self) -> &Path {
        match self {
            Space::Disk(d) => d.path(),
            Space::PageCap(t) => t.path(),
        }
    }

    /// Leaves `kib` KiB free for `store` (on the disk, or as library pages).
    async fn leave_free(&self, store: &Store, kib: u64) {
        match self {
            Space::Disk(d) => d.resize(d.used_kib() + kib),
            Space::PageCap(_) => store
                .cap_pages_for_tests(Some((kib * 1024 / u64::from(PAGE_SIZE)) as u32))
                .await
                .unwrap(),
        }
    }

    /// Plenty of space again.
    async fn grow(&self, store: &Store) {
        match self {
            Space::Disk(d) => d.resize(256 * 1024),
            Space::PageCap(_) => store.cap_pages_for_tests(None).await.unwrap(),
        }
    }
}

fn assert_disk_full(e: &StorageError, path: &Path) {
    assert!(
        matches!(e, StorageError::DiskFull { path: p } if p == path),
        "expected DiskFull at {}, got {e:?}",
        path.display()
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("no space left on the disk holding"),
        "{msg}"
    );
    assert!(msg.contains("free some space"), "{msg}");
}

/// The records of `owner` held by `s` with `after < seq <= last`, in seq order.
async fn records_between(s: &Store, owner: DeviceId, after: Seq, last: Seq) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut cursor = after;
    loop {
        let page = s.records_after(owner, cursor, 10_000).await.unwrap();
        let Some(l) = page.last() else { break };
        cursor = l.seq();
        out.extend(page.into_iter().filter(|r| r.seq() <= last));
        if cursor >= last {
            break;
        }
    }
    out
}

#[tokio::test]
async fn full_disk_refuses_a_batch_whole_and_it_applies_once_space_returns() {
    let dir = TempDir::new().unwrap();
    let (a, owner) = populated(&dir, "a", 20_000).await;
    let idx = a.local_watermark().await.unwrap().index_id;
    let max = a.local_watermark().await.unwrap().seq;
    let space = Space::new(4 * 1024);
    let b = Store::open(&space.path().join("b").join("library.db"))
        .await
        .unwrap();
    b.create_device("b", LibraryId::new_v7()).await.unwrap();
    // B already holds the first 500 records of A.
    b.apply_batch(
        owner,
        idx,
        Seq(0),
        Seq(500),
        records_between(&a, owner, Seq(0), Seq(500)).await,
    )
    .await
    .unwrap();
    let before = state(&b).await;
    space.leave_free(&b, 512).await;

    // ~20K rows of ~250 bytes do not fit in 512 KiB: refused whole, and
    // again when retried (as a peer does while the disk stays full).
    let big = records_between(&a, owner, Seq(500), max).await;
    for _ in 0..2 {
        let e = b
            .apply_batch(owner, idx, Seq(500), max, big.clone())
            .await
            .unwrap_err();
        assert_disk_full(&e, b.path());
        assert_eq!(state(&b).await, before);
        assert_eq!(
            b.watermark(owner).await.unwrap(),
            Some(Watermark::new(idx, Seq(500)))
        );
    }

    // A smaller batch applies whole or not at all. Regression: sqlx went on
    // counting the transactions SQLite had rolled back itself, and the
    // commits that followed were reported but never seen by readers.
    let small = records_between(&a, owner, Seq(500), Seq(700)).await;
    match b.apply_batch(owner, idx, Seq(500), Seq(700), small).await {
        Ok(w) => {
            assert_eq!(w, Watermark::new(idx, Seq(700)));
            let want = records_between(&a, owner, Seq(0), Seq(700)).await;
            let mut fp = sync_core::Fingerprint::default();
            for r in &want {
                fp.add(&r.id_bytes(), r.seq(), r.deleted());
            }
            assert_eq!(b.summary(owner).await.unwrap().fingerprint, fp);
        }
        Err(e) => {
            assert_disk_full(&e, b.path());
            assert_eq!(state(&b).await, before);
        }
    }

    // Space returns: the same batch applies, and B holds exactly what A holds.
    space.grow(&b).await;
    let w = b.apply_batch(owner, idx, Seq(500), max, big).await.unwrap();
    assert_eq!(w, Watermark::new(idx, max));
    let (sa, sb) = (
        a.summary(owner).await.unwrap(),
        b.summary(owner).await.unwrap(),
    );
    assert_eq!(
        (sb.fingerprint, sb.entries, sb.tombstones, sb.seq),
        (sa.fingerprint, sa.entries, sa.tombstones, sa.seq)
    );
    // And the writer goes on working.
    let me = b.device().await.unwrap().unwrap().device_id;
    b.commit_local(me, vec![LocalChange::Location(location(me, 0))])
        .await
        .unwrap();

    // An export that fills the disk is refused and leaves no file behind.
    if let Space::Disk(disk) = &space {
        let before = state(&b).await;
        disk.resize(disk.used_kib() + 256);
        let e = b.export_snapshot(owner).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::DiskFull { path } if path.starts_with(b.snapshots_dir())),
            "{e:?}"
        );
        assert_eq!(std::fs::read_dir(b.snapshots_dir()).unwrap().count(), 0);
        assert_eq!(state(&b).await, before);
    }
    b.close().await;
}

#[tokio::test]
async fn full_disk_during_snapshot_download_or_import_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let (a, owner) = populated(&dir, "a", 12_000).await;
    let m = a.export_snapshot(owner).await.unwrap();
    assert!(m.chunks.len() >= 3, "{} chunks", m.chunks.len());
    let space = Space::new(4 * 1024);
    let b = Store::open(&space.path().join("b").join("library.db"))
        .await
        .unwrap();
    b.create_device("b", LibraryId::new_v7()).await.unwrap();
    let other = DeviceId::new_v7();
    let (_, recs) = batch(other, 20);
    b.apply_batch(other, IndexId(9), Seq(0), Seq(21), recs)
        .await
        .unwrap();
    let before = state(&b).await;

    match &space {
        Space::Disk(disk) => {
            // No room for the file, its private copy at import and the
            // reserve: refused before a byte is written.
            disk.resize(disk.used_kib() + m.bytes / 1024 + 512);
            let part = b.incoming_dir().join(format!("{}.part", m.id));
            let e = b.begin_download(&m.offer()).await.unwrap_err();
            assert_disk_full(&e, &part);
            assert!(!part.exists(), "nothing written");

            // Room at the start, then the disk fills up (another writer):
            // the download runs out of space on its second chunk.
            disk.resize(disk.used_kib() + (2 * m.bytes + (64 << 20)) / 1024 + 1024);
            let mut d = b.begin_download(&m.offer()).await.unwrap();
            let filler = space.path().join("filler");
            let fill = |leave_kib: u64| {
                let _ = std::fs::remove_file(&filler);
                let free = crate::perms::available_bytes(space.path()).unwrap() / 1024;
                let free = free.saturating_sub(leave_kib);
                std::fs::write(&filler, vec![0u8; (free * 1024) as usize]).unwrap();
            };
            fill(m.chunks[0].len as u64 / 1024 + 256);
            let e = loop {
                let i = d.next_chunk();
                assert!(!d.is_complete(), "the download fit");
                let (hash, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
                if let Err(e) = d.write_chunk(i, hash, &data).await {
                    break e;
                }
            };
            assert_disk_full(&e, &part);
            assert_eq!(d.next_chunk(), 1);
            drop(d);
            assert_eq!(state(&b).await, before);

            // Room for the download, then not for the import: the download
            // resumes and completes, the import is refused.
            std::fs::remove_file(&filler).unwrap();
            let mut d = b.begin_download(&m.offer()).await.unwrap();
            assert_eq!(d.next_chunk(), 1, "resumes after the last chunk written");
            while !d.is_complete() {
                let i = d.next_chunk();
                let (hash, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
                d.write_chunk(i, hash, &data).await.unwrap();
            }
            fill(256);
            let e = b.import_snapshot(d).await.unwrap_err();
            assert!(matches!(e, StorageError::DiskFull { .. }), "{e:?}");
            assert_eq!(state(&b).await, before);
            std::fs::remove_file(&filler).unwrap();
        }
        Space::PageCap(_) => {
            eprintln!("no tmpfs: the download's ENOSPC is not covered, only the import's");
            space.leave_free(&b, 256).await;
            let e = transfer(&a, &m, &b).await.unwrap_err();
            assert_disk_full(&e, b.path());
            assert_eq!(state(&b).await, before);
        }
    }

    // Space returns: the kept download resumes (at most its last, partial,
    // chunk is fetched again) and imports.
    space.grow(&b).await;
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    assert!(
        d.next_chunk() + 1 >= d.chunks(),
        "{} of {}",
        d.next_chunk(),
        d.chunks()
    );
    while !d.is_complete() {
        let i = d.next_chunk();
        let (hash, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
        d.write_chunk(i, hash, &data).await.unwrap();
    }
    let w = b.import_snapshot(d).await.unwrap();
    assert_eq!(w, a.local_watermark().await.unwrap());
    assert_eq!(
        b.summary(owner).await.unwrap().fingerprint,
        a.summary(owner).await.unwrap().fingerprint
    );
    assert_eq!(
        b.summary(other).await.unwrap(),
        before.0.iter().find(|s| s.owner == other).unwrap().clone()
    );
    b.close().await;
}

/// Regression (found by the crash schedules, `export.built`): an export
/// killed after writing its file but before saving its manifest left the
/// file in `snapshots/` forever, and superseded snapshots were never
/// removed. `prune_snapshots` at start removes both.
#[tokio::test]
async fn orphaned_and_superseded_snapshot_files_are_pruned() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 500).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        made.push(a.export_snapshot(me).await.unwrap());
    }
    // What a crash between writing the file and saving the manifest leaves.
    let orphan = a.snapshots_dir().join("killed-export.db");
    std::fs::copy(&made[0].path, &orphan).unwrap();
    let files = || std::fs::read_dir(a.snapshots_dir()).unwrap().count();
    assert_eq!(files(), 4);
    // While exports may run, unnamed files are kept; the oldest is dropped.
    assert_eq!(a.prune_snapshots(2, false).await.unwrap(), 1);
    assert!(orphan.exists() && !made[0].path.exists());
    assert_eq!(a.snapshot_manifest(made[0].id).await.unwrap(), None);
    // At start, the orphan goes too; the two newest stay usable.
    assert_eq!(a.prune_snapshots(2, true).await.unwrap(), 1);
    assert!(!orphan.exists());
    assert_eq!(files(), 2);
    for m in &made[1..] {
        assert_eq!(a.snapshot_manifest(m.id).await.unwrap().as_ref(), Some(m));
        assert!(m.path.exists());
    }
    // A manifest whose file is gone is dropped.
    std::fs::remove_file(&made[1].path).unwrap();
    a.prune_snapshots(2, true).await.unwrap();
    assert_eq!(a.snapshot_manifest(made[1].id).await.unwrap(), None);
    assert_eq!(
        a.snapshot_manifest(made[2].id).await.unwrap().as_ref(),
        Some(&made[2])
    );
}

/// Regression (found by the crash schedules, `import.copied`): a receiver
/// killed after an import committed but before it removed the download
/// kept the `.part` and `.next` files forever. `prune_downloads` removes a
/// download once the library holds its snapshot, and keeps one still needed.
#[tokio::test]
async fn downloads_of_imported_snapshots_are_pruned_and_others_kept() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 800).await;
    let (b, _) = device(&dir, "b").await;
    let m = a.export_snapshot(me).await.unwrap();
    // A complete download, as the crash leaves it: files kept, import done.
    let mut d = b.begin_download(&m.offer()).await.unwrap();
    while !d.is_complete() {
        let i = d.next_chunk();
        let (hash, data) = a.read_snapshot_chunk(&m, i).await.unwrap();
        d.write_chunk(i, hash, &data).await.unwrap();
    }
    let files = |s: &Store| {
        let mut names: Vec<_> = std::fs::read_dir(s.incoming_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let left = files(&b);
    assert_eq!(left.len(), 2, "{left:?}");
    let saved: Vec<_> = left
        .iter()
        .map(|n| (n.clone(), std::fs::read(b.incoming_dir().join(n)).unwrap()))
        .collect();
    // Not imported yet: the download is still needed.
    assert_eq!(b.prune_downloads().await.unwrap(), 0);
    assert_eq!(files(&b), left);
    b.import_snapshot(d).await.unwrap();
    assert!(files(&b).is_empty());
    for (n, bytes) in &saved {
        std::fs::write(b.incoming_dir().join(n), bytes).unwrap();
    }
    assert_eq!(b.prune_downloads().await.unwrap(), 1);
    assert!(files(&b).is_empty());
}

/// Regression (found by the load test): every index walk loaded all of its
/// location's rows, tombstones included, collected through sea-orm (~2 KB
/// per row at once), so a folder under churn made the serving device's peak
/// RSS grow with its history of deletes: 603 MB after 30 rescans of a
/// 34K-path folder. Rows are now streamed (237 MB), and walks read live
/// entries only (174 MB after 60 rescans; 115 MB after 4).
#[tokio::test]
async fn live_location_entries_leave_tombstones_out() {
    let dir = TempDir::new().unwrap();
    let (s, _) = populated(&dir, "a", 300).await;
    let loc = s.locations().await.unwrap()[0].id;
    let all = s.location_entries(loc).await.unwrap();
    let live = s.live_location_entries(loc).await.unwrap();
    let tombstones = all.iter().filter(|e| e.deleted).count();
    assert!(tombstones > 0);
    assert_eq!(all.len(), 300);
    assert_eq!(live.len(), 300 - tombstones);
    assert!(live.iter().all(|e| !e.deleted));
    let want: Vec<_> = all.into_iter().filter(|e| !e.deleted).collect();
    assert_eq!(live, want, "the same rows, in id order");
}

/// Regression (found by the `snapshot_import` fuzz target): a snapshot whose
/// schema declares a column type that is not UTF-8 made sqlx panic in its
/// worker thread while preparing the manifest query. Declared types are now
/// checked as values first: the file is refused as `WrongSchema`.
#[tokio::test]
async fn a_snapshot_with_a_non_utf8_declared_type_is_refused() {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 50).await;
    let (b, _) = device(&dir, "b").await;
    let before = state(&b).await;
    let m = a.export_snapshot(me).await.unwrap();
    let mut bytes = std::fs::read(&m.path).unwrap();
    // The manifest's first column, which the manifest query reads.
    let at = bytes
        .windows(14)
        .position(|w| w == b"format INTEGER")
        .expect("the manifest's schema");
    bytes[at + 13] = 0xFF;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let got = offer_file(&b, &bad, me, m.index_id, m.max_seq, m.entries).await;
    assert!(matches!(got, Err(StorageError::WrongSchema(_))), "{got:?}");
    assert_eq!(state(&b).await, before);
}

/// Records apply in any seq order: an entry may arrive before its location
/// (a renamed location has a newer seq than its entries), but never in a
/// location of another owner, and a location is refused once another
/// owner's entries lie in it.
#[tokio::test]
async fn entries_may_arrive_before_their_location_but_never_cross_owners() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let (o1, o2) = (DeviceId::new_v7(), DeviceId::new_v7());
    let later = location(o1, 3);
    // o1's entries first, its location after: both apply.
    s.apply_batch(
        o1,
        IndexId(1),
        Seq(0),
        Seq(2),
        vec![
            Record::Entry(entry(later.id, 1, 1)),
            Record::Entry(entry(later.id, 2, 2)),
        ],
    )
    .await
    .unwrap();
    s.apply_batch(
        o1,
        IndexId(1),
        Seq(2),
        Seq(3),
        vec![Record::Location(later.clone())],
    )
    .await
    .unwrap();
    assert_eq!(s.location_entries(later.id).await.unwrap().len(), 2);
    // o2 cannot put an entry in o1's location...
    let e = s
        .apply_batch(
            o2,
            IndexId(2),
            Seq(0),
            Seq(1),
            vec![Record::Entry(entry(later.id, 3, 1))],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ForeignOwner { .. }), "{e}");
    // ...nor claim a location in which o1's early entries already lie.
    let unknown = LocationId::new_v7();
    s.apply_batch(
        o1,
        IndexId(1),
        Seq(3),
        Seq(4),
        vec![Record::Entry(entry(unknown, 4, 4))],
    )
    .await
    .unwrap();
    let mut claimed = location(o2, 1);
    claimed.id = unknown;
    let before = state(&s).await;
    let e = s
        .apply_batch(
            o2,
            IndexId(2),
            Seq(0),
            Seq(1),
            vec![Record::Location(claimed)],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ForeignOwner { .. }), "{e}");
    assert_eq!(state(&s).await, before);
}

/// Issue 13 item 2: two handles on one library committing at once (as two
/// processes did) must never hand out one seq twice, nor move the counter
/// backwards: the counter is read and advanced inside one `BEGIN
/// IMMEDIATE` transaction per chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_library_never_reuse_seqs() {
    let dir = TempDir::new().unwrap();
    let (a, me) = device(&dir, "a").await;
    let b = open(&dir, "a").await;
    let loc = location(me, 0);
    a.commit_local(me, vec![LocalChange::Location(loc.clone())])
        .await
        .unwrap();
    let writer = |s: Store, base: u64| {
        let loc = loc.id;
        tokio::spawn(async move {
            let mut ranges = Vec::new();
            for round in 0..20u64 {
                let changes: Vec<LocalChange> = (0..(round % 7) * 300 + 1)
                    .map(|i| LocalChange::Entry(entry(loc, base + round * 10_000 + i, 0)))
                    .collect();
                ranges.push(s.commit_local(me, changes).await.unwrap());
            }
            ranges
        })
    };
    let (ra, rb) = tokio::join!(writer(a.clone(), 0), writer(b.clone(), 1 << 40));
    let mut ranges: Vec<SeqRange> = ra.unwrap().into_iter().chain(rb.unwrap()).collect();
    ranges.sort_by_key(|r| r.first);
    for pair in ranges.windows(2) {
        assert!(
            pair[0].last < pair[1].first,
            "overlapping seq ranges: {pair:?}"
        );
    }
    let committed: u64 = ranges.iter().map(|r| r.last.0 + 1 - r.first.0).sum();
    let records = a.records_after(me, Seq::ZERO, usize::MAX).await.unwrap();
    let mut seqs: Vec<u64> = records.iter().map(|r| r.seq().0).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), records.len(), "two records share a seq");
    assert_eq!(records.len() as u64, committed + 1);
    assert_eq!(a.local_watermark().await.unwrap().seq, Seq(committed + 1));
    assert_eq!(b.local_watermark().await.unwrap().seq, Seq(committed + 1));
}

#[tokio::test]
async fn restarting_the_local_index_keeps_rows_and_seqs_once() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let loc = location(me, 0);
    let changes = vec![
        LocalChange::Location(loc.clone()),
        LocalChange::Entry(entry(loc.id, 1, 0)),
        LocalChange::Entry(entry(loc.id, 2, 0)),
    ];
    s.commit_local(me, changes).await.unwrap();
    let before = s.local_watermark().await.unwrap();
    let rows = s.records_after(me, Seq::ZERO, 100).await.unwrap();
    let summary = s.summary(me).await.unwrap();

    let after = s.restart_local_index(before.index_id).await.unwrap();
    assert_ne!(after.index_id, before.index_id);
    assert_eq!(after.seq, before.seq);
    assert_eq!(s.local_watermark().await.unwrap(), after);
    assert_eq!(s.records_after(me, Seq::ZERO, 100).await.unwrap(), rows);
    let now = s.summary(me).await.unwrap();
    assert_eq!(
        (now.fingerprint, now.entries, now.seq),
        (summary.fingerprint, summary.entries, summary.seq)
    );
    assert_eq!(now.index_id, after.index_id);

    // A second report of the same old index (another peer) changes nothing.
    assert_eq!(s.restart_local_index(before.index_id).await.unwrap(), after);
    assert_eq!(s.local_watermark().await.unwrap(), after);
    // The next commit continues the seq under the new index.
    let r = s
        .commit_local(me, vec![LocalChange::Entry(entry(loc.id, 3, 0))])
        .await
        .unwrap();
    assert_eq!(r.first, before.seq.next());
    assert_eq!(
        s.local_watermark().await.unwrap(),
        Watermark::new(after.index_id, r.last)
    );
}
