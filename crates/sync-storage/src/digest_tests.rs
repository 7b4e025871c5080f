//! Tests of the per-owner digests against real SQLite files: kept exact by
//! every write path, equal for equal copies, found stale after a change
//! behind the engine's back, and repairs committed only when they match.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use sea_orm::sqlx::{self, Connection as _};
use sync_core::digest::{Element, OwnerDigest, RangeFp, bucket_of};
use sync_core::{DeviceId, EntryId, IndexId, Record, Seq, Watermark};
use tempfile::TempDir;

use crate::tests::{batch, device, entry, location, transfer};
use crate::*;

/// The digest of `records` as a fresh computation would find it.
fn expected(owner: DeviceId, w: Watermark, records: &[Record]) -> OwnerDigest {
    let mut h = sync_core::digest::LtHash::new();
    for r in records {
        h.add(&Element::of(r));
    }
    OwnerDigest {
        owner,
        watermark: w,
        records: records.len() as u64,
        digest: h.id(),
        pruned: Seq(0),
    }
}

trait WithPruned {
    fn with_pruned(self, pruned: Seq) -> Self;
}

impl WithPruned for OwnerDigest {
    fn with_pruned(mut self, pruned: Seq) -> Self {
        self.pruned = pruned;
        self
    }
}

/// Asserts the stored digest and buckets of `owner` match its rows.
async fn assert_exact(s: &Store, owner: DeviceId) {
    assert_eq!(
        s.audit_digests().await.unwrap(),
        vec![],
        "stored digest drifted"
    );
    let mut want: BTreeMap<u64, RangeFp> = BTreeMap::new();
    for (seq, _, fp) in s
        .recon_items(owner, Seq(0), Seq(u64::MAX >> 1))
        .await
        .unwrap()
    {
        want.entry(bucket_of(seq)).or_default().add(fp);
    }
    assert_eq!(s.recon_buckets(owner).await.unwrap(), want);
}

/// Every record of `owner` held, in seq order.
async fn all(s: &Store, owner: DeviceId) -> Vec<Record> {
    s.records_after(owner, Seq(0), usize::MAX >> 1)
        .await
        .unwrap()
}

#[tokio::test]
async fn applied_batches_keep_the_digest_exact_through_redelivery_updates_and_resets() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (loc, recs) = batch(owner, 3000);
    s.apply_batch(owner, idx, Seq(0), Seq(3001), recs.clone())
        .await
        .unwrap();
    let d = s.owner_digest(owner).await.unwrap().unwrap();
    assert_eq!(d, expected(owner, Watermark::new(idx, Seq(3001)), &recs));
    // Redelivered (every record loses): unchanged.
    s.apply_batch(owner, idx, Seq(0), Seq(3001), recs.clone())
        .await
        .unwrap();
    assert_eq!(s.owner_digest(owner).await.unwrap().unwrap(), d);
    // Newer versions of 500 entries, a tombstone, and a renamed location.
    let mut newer = Vec::new();
    let mut seq = 3001;
    for r in recs.iter().skip(1).step_by(6) {
        let Record::Entry(e) = r else { continue };
        seq += 1;
        let mut e = e.clone();
        e.seq = Seq(seq);
        e.size ^= 1;
        e.deleted = seq % 2 == 0;
        newer.push(Record::Entry(e));
    }
    seq += 1;
    let mut renamed = loc.clone();
    renamed.name = "renamed".into();
    renamed.seq = Seq(seq);
    newer.push(Record::Location(renamed));
    s.apply_batch(owner, idx, Seq(3001), Seq(seq), newer.clone())
        .await
        .unwrap();
    let held = all(&s, owner).await;
    assert_eq!(held.len(), 3001);
    assert_eq!(
        s.owner_digest(owner).await.unwrap().unwrap(),
        expected(owner, Watermark::new(idx, Seq(seq)), &held)
    );
    assert_exact(&s, owner).await;
    // A new IndexId from 0 replaces everything.
    let idx2 = IndexId::random();
    let (_, fresh) = batch(owner, 10);
    s.apply_batch(owner, idx2, Seq(0), Seq(11), fresh.clone())
        .await
        .unwrap();
    assert_eq!(
        s.owner_digest(owner).await.unwrap().unwrap(),
        expected(owner, Watermark::new(idx2, Seq(11)), &fresh)
    );
    s.reset_owner(owner, idx).await.unwrap();
    assert_eq!(
        s.owner_digest(owner).await.unwrap().unwrap(),
        expected(owner, Watermark::new(idx, Seq(0)), &[])
    );
    assert_exact(&s, owner).await;
}

#[tokio::test]
async fn local_commits_keep_the_digest_exact_including_cascaded_tombstones() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "me").await;
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    let ents: Vec<_> = (0..25_000).map(|i| entry(loc.id, i, 0)).collect();
    changes.extend(ents.iter().cloned().map(LocalChange::Entry));
    s.commit_local(me, changes).await.unwrap();
    assert_exact(&s, me).await;
    let mut more: Vec<LocalChange> = ents[..300]
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.name.push_str(".bak");
            LocalChange::Entry(e)
        })
        .collect();
    more.extend(
        ents[300..600]
            .iter()
            .map(|e| LocalChange::DeleteEntry(e.id)),
    );
    s.commit_local(me, more).await.unwrap();
    assert_exact(&s, me).await;
    s.commit_local(me, vec![LocalChange::DeleteLocation(loc.id)])
        .await
        .unwrap();
    assert_exact(&s, me).await;
    let d = s.owner_digest(me).await.unwrap().unwrap();
    assert_eq!(d.records, 25_001);
    assert_eq!(
        d,
        expected(me, s.local_watermark().await.unwrap(), &all(&s, me).await)
    );
}

#[tokio::test]
async fn copies_made_by_batches_in_any_order_and_by_snapshot_have_the_owners_digest() {
    let dir = TempDir::new().unwrap();
    let (a, me) = device(&dir, "a").await;
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    changes.extend((0..4000).map(|i| LocalChange::Entry(entry(loc.id, i, 0))));
    a.commit_local(me, changes).await.unwrap();
    let owner_d = a.owner_digest(me).await.unwrap().unwrap();
    let recs = all(&a, me).await;
    let w = owner_d.watermark;

    let (b, _) = device(&dir, "b").await;
    for chunk in recs.chunks(700) {
        let after = Seq(chunk[0].seq().0 - 1);
        let last = chunk.last().unwrap().seq();
        let mut rev = chunk.to_vec();
        rev.reverse();
        b.apply_batch(me, w.index_id, after, last, rev)
            .await
            .unwrap();
    }
    assert_eq!(b.owner_digest(me).await.unwrap().unwrap(), owner_d);

    let (c, _) = device(&dir, "c").await;
    let m = a.export_snapshot(me).await.unwrap();
    transfer(&a, &m, &c).await.unwrap();
    assert_eq!(c.owner_digest(me).await.unwrap().unwrap(), owner_d);
    assert_exact(&c, me).await;

    // One record different: the digest says so.
    let (d, _) = device(&dir, "d").await;
    let mut off = recs.clone();
    if let Record::Entry(e) = &mut off[7] {
        e.size ^= 1;
    }
    d.apply_batch(me, w.index_id, Seq(0), w.seq, off)
        .await
        .unwrap();
    let dd = d.owner_digest(me).await.unwrap().unwrap();
    assert_eq!(dd.watermark, owner_d.watermark);
    assert_ne!(dd.digest, owner_d.digest);
}

#[tokio::test]
async fn a_batch_holding_one_id_twice_is_refused_whole() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (_, mut recs) = batch(owner, 5);
    let Record::Entry(mut twin) = recs[2].clone() else {
        panic!()
    };
    twin.seq = Seq(7);
    recs.push(Record::Entry(twin));
    let err = s
        .apply_batch(owner, IndexId(1), Seq(0), Seq(7), recs)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::DuplicateRecord { .. }), "{err}");
    assert_eq!(s.watermark(owner).await.unwrap(), None);
}

/// Opens the library file with a plain connection of another "program".
async fn other_program(s: &Store) -> sqlx::SqliteConnection {
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(s.path());
    sqlx::SqliteConnection::connect_with(&opts).await.unwrap()
}

#[tokio::test]
async fn a_row_changed_behind_the_engines_back_is_found_and_the_digest_follows_the_rows() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let idx = IndexId::random();
    let (_, recs) = batch(owner, 200);
    s.apply_batch(owner, idx, Seq(0), Seq(201), recs.clone())
        .await
        .unwrap();
    // First audit of this process runs; nothing is wrong.
    assert_eq!(s.audit_if_changed().await.unwrap(), vec![]);
    let before = s.owner_digest(owner).await.unwrap().unwrap();
    // Our own writes do not count as another program's.
    let (_, more) = batch(owner, 0);
    let _ = more;
    assert_eq!(s.audit_if_changed().await.unwrap(), vec![]);

    let mut shell = other_program(&s).await;
    sqlx::query("UPDATE entry SET name = 'edited' WHERE seq = 50")
        .execute(&mut shell)
        .await
        .unwrap();
    shell.close().await.unwrap();
    let found = s.audit_if_changed().await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].owner, owner);
    assert_eq!(found[0].stored.1, before.digest);
    let after = s.owner_digest(owner).await.unwrap().unwrap();
    assert_ne!(after.digest, before.digest);
    assert_eq!(
        after,
        expected(owner, after.watermark, &all(&s, owner).await)
    );
    // Found once: the digest now follows the rows.
    assert_eq!(s.audit_if_changed().await.unwrap(), vec![]);
}

#[tokio::test]
async fn a_library_without_digests_is_digested_when_opened() {
    let dir = TempDir::new().unwrap();
    let (s, _) = device(&dir, "s").await;
    let owner = DeviceId::new_v7();
    let (_, recs) = batch(owner, 300);
    let idx = IndexId::random();
    s.apply_batch(owner, idx, Seq(0), Seq(301), recs.clone())
        .await
        .unwrap();
    let want = s.owner_digest(owner).await.unwrap().unwrap();
    let path = s.path().to_path_buf();
    s.close().await;
    let mut shell = {
        let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
        sqlx::SqliteConnection::connect_with(&opts).await.unwrap()
    };
    sqlx::query("DELETE FROM owner_digest")
        .execute(&mut shell)
        .await
        .unwrap();
    sqlx::query("DELETE FROM recon_bucket")
        .execute(&mut shell)
        .await
        .unwrap();
    shell.close().await.unwrap();
    let s = Store::open(&path).await.unwrap();
    assert_eq!(s.owner_digest(owner).await.unwrap().unwrap(), want);
    assert_exact(&s, owner).await;
}

/// B's copy of A's records made to differ in every way: missing, extra,
/// stale and corrupted (same seq, other content).
async fn diverged(dir: &TempDir) -> (Store, Store, DeviceId, Vec<Record>) {
    let (a, me) = device(dir, "a").await;
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    let ents: Vec<_> = (0..2000).map(|i| entry(loc.id, i, 0)).collect();
    changes.extend(ents.iter().cloned().map(LocalChange::Entry));
    a.commit_local(me, changes).await.unwrap();
    let old = all(&a, me).await;
    let w = a.local_watermark().await.unwrap();
    let (b, _) = device(dir, "b").await;
    b.apply_batch(me, w.index_id, Seq(0), w.seq, old.clone())
        .await
        .unwrap();
    // A moves on: 10 updates B never gets.
    a.commit_local(
        me,
        ents[100..110]
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.size = 1;
                LocalChange::Entry(e)
            })
            .collect(),
    )
    .await
    .unwrap();
    // B: one row missing, one extra, one corrupted.
    let mut shell = other_program(&b).await;
    sqlx::query("DELETE FROM entry WHERE seq = 500")
        .execute(&mut shell)
        .await
        .unwrap();
    sqlx::query("UPDATE entry SET name = 'evil' WHERE seq = 900")
        .execute(&mut shell)
        .await
        .unwrap();
    shell.close().await.unwrap();
    let mut extra = entry(loc.id, 99_999, 1500);
    extra.id = EntryId::new_v7();
    let extra_seq = Seq(w.seq.0 + 1);
    extra.seq = extra_seq;
    b.apply_batch(me, w.index_id, w.seq, extra_seq, vec![Record::Entry(extra)])
        .await
        .unwrap();
    b.audit_digests().await.unwrap();
    (a, b, me, old)
}

/// The seqs where two item lists differ: (needed from the source, extra here).
async fn differences(a: &Store, b: &Store, owner: DeviceId) -> (Vec<Seq>, Vec<Seq>) {
    let top = Seq(u64::MAX >> 1);
    let ia: std::collections::HashSet<_> = a
        .recon_items(owner, Seq(0), top)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _, f)| (s, f))
        .collect();
    let ib: std::collections::HashSet<_> = b
        .recon_items(owner, Seq(0), top)
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _, f)| (s, f))
        .collect();
    let need = ia.difference(&ib).map(|(s, _)| *s).collect();
    let extra = ib.difference(&ia).map(|(s, _)| *s).collect();
    (need, extra)
}

#[tokio::test]
async fn a_repair_makes_the_copy_identical_and_a_lying_one_writes_nothing() {
    let dir = TempDir::new().unwrap();
    let (a, b, me, _) = diverged(&dir).await;
    let (need, extra) = differences(&a, &b, me).await;
    assert_eq!(need.len(), 12, "10 newer + missing + corrupted");
    assert_eq!(extra.len(), 12, "10 stale + extra + corrupted");
    let (records, claim) = a.records_at(me, &need).await.unwrap();
    let claim = claim.unwrap();
    assert_eq!(records.len(), 12);
    let before = b.owner_digest(me).await.unwrap().unwrap();

    // Lies: a tampered record, a record left out, an extra deletion, a
    // claimed digest that is not the result's. Each refused, nothing written.
    let mut tampered = records.clone();
    if let Record::Entry(e) = &mut tampered[0] {
        e.name = "forged".into();
    }
    let mut more_extra = extra.clone();
    more_extra.push(Seq(3));
    let mut wrong_claim = claim;
    wrong_claim.digest = before.digest;
    for (claim, extra, records) in [
        (claim, extra.clone(), tampered),
        (claim, extra.clone(), records[1..].to_vec()),
        (claim, more_extra, records.clone()),
        (wrong_claim, extra.clone(), records.clone()),
    ] {
        let err = b.apply_repair(claim, &extra, records).await.unwrap_err();
        assert!(matches!(err, StorageError::RepairMismatch { .. }), "{err}");
        assert_eq!(b.owner_digest(me).await.unwrap().unwrap(), before);
    }
    let w = b.apply_repair(claim, &extra, records).await.unwrap();
    assert_eq!(w, claim.watermark);
    assert_eq!(
        b.owner_digest(me).await.unwrap().unwrap(),
        a.owner_digest(me).await.unwrap().unwrap()
    );
    assert_eq!(all(&b, me).await, all(&a, me).await);
    assert_exact(&b, me).await;
}

#[tokio::test]
async fn a_repair_of_this_devices_own_records_is_refused() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let claim = s.owner_digest(me).await.unwrap().unwrap();
    let err = s.apply_repair(claim, &[], vec![]).await.unwrap_err();
    assert!(matches!(err, StorageError::LocalOwner { .. }), "{err}");
}

#[tokio::test]
async fn collecting_tombstones_drops_only_tombstones_and_keeps_the_digest_exact() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let loc = location(me, 0);
    let mut changes = vec![LocalChange::Location(loc.clone())];
    let ents: Vec<_> = (0..3000).map(|i| entry(loc.id, i, 0)).collect();
    changes.extend(ents.iter().cloned().map(LocalChange::Entry));
    s.commit_local(me, changes).await.unwrap();
    let deletes = s
        .commit_local(
            me,
            ents[..1200]
                .iter()
                .map(|e| LocalChange::DeleteEntry(e.id))
                .collect(),
        )
        .await
        .unwrap();
    let before = s.summary(me).await.unwrap();
    assert_eq!(before.tombstones, 1200);
    // Up to the middle of the deletes: only those below it go.
    let mid = Seq(deletes.first.0 + 499);
    assert_eq!(s.prune_tombstones(me, mid).await.unwrap(), 500);
    let after = s.summary(me).await.unwrap();
    assert_eq!((after.entries, after.tombstones), (before.entries, 700));
    let d = s.owner_digest(me).await.unwrap().unwrap();
    assert_eq!(d.pruned, mid);
    assert_eq!(
        d,
        expected(me, d.watermark, &all(&s, me).await).with_pruned(mid)
    );
    assert_exact(&s, me).await;
    // Again up to the end: the rest; a lower point never lowers it.
    assert_eq!(s.prune_tombstones(me, deletes.last).await.unwrap(), 700);
    assert_eq!(s.prune_tombstones(me, Seq(1)).await.unwrap(), 0);
    assert_eq!(
        s.owner_digest(me).await.unwrap().unwrap().pruned,
        deletes.last
    );
    assert_eq!(s.summary(me).await.unwrap().entries, 1800);
    assert_exact(&s, me).await;
}

#[tokio::test]
async fn local_seqs_are_dated_by_minute_and_peer_holds_are_kept() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let loc = location(me, 0);
    let r = s
        .commit_local(me, vec![LocalChange::Location(loc)])
        .await
        .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::minutes(2);
    assert_eq!(s.local_seq_before(later).await.unwrap(), r.last);
    assert_eq!(
        s.local_seq_before(chrono::Utc::now() - chrono::Duration::minutes(2))
            .await
            .unwrap(),
        Seq(0)
    );
    let peer = DeviceId::new_v7();
    let w = Watermark::new(IndexId(3), Seq(9));
    s.save_peer_holds(peer, w).await.unwrap();
    s.save_peer_holds(peer, Watermark::new(IndexId(3), Seq(12)))
        .await
        .unwrap();
    assert_eq!(
        s.peer_holds().await.unwrap()[&peer],
        Watermark::new(IndexId(3), Seq(12))
    );
}

#[tokio::test]
async fn an_entry_reusing_another_owners_id_is_refused_and_no_digest_moves() {
    let dir = TempDir::new().unwrap();
    let (s, me) = device(&dir, "s").await;
    let loc = location(me, 0);
    let mine = entry(loc.id, 1, 0);
    s.commit_local(
        me,
        vec![LocalChange::Location(loc), LocalChange::Entry(mine.clone())],
    )
    .await
    .unwrap();
    let carol = DeviceId::new_v7();
    let (_, carols) = batch(carol, 20);
    s.apply_batch(carol, IndexId(1), Seq(0), Seq(21), carols.clone())
        .await
        .unwrap();
    let mallory = DeviceId::new_v7();
    let stolen = [
        match &carols[3] {
            Record::Entry(e) => e.id,
            Record::Location(_) => unreachable!(),
        },
        mine.id,
    ];
    for id in stolen {
        let (mloc, _) = batch(mallory, 0);
        let mut e = entry(mloc.id, 9, 2);
        e.id = id;
        let before: Vec<_> = [me, carol, mallory]
            .iter()
            .map(|o| futures_free(s.owner_digest(*o)))
            .collect();
        let before = futures_all(before).await;
        let err = s
            .apply_batch(
                mallory,
                IndexId(2),
                Seq(0),
                Seq(2),
                vec![Record::Location(mloc), Record::Entry(e)],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::ForeignOwner { .. }), "{err}");
        let after = futures_all(
            [me, carol, mallory]
                .iter()
                .map(|o| futures_free(s.owner_digest(*o)))
                .collect(),
        )
        .await;
        assert_eq!(before, after);
    }
    assert_eq!(s.audit_digests().await.unwrap(), vec![]);
}

type DigestFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<OwnerDigest>> + 'a>>;

fn futures_free<'a>(
    f: impl std::future::Future<Output = crate::Result<Option<OwnerDigest>>> + 'a,
) -> DigestFuture<'a> {
    Box::pin(async move { f.await.unwrap() })
}

async fn futures_all(fs: Vec<DigestFuture<'_>>) -> Vec<Option<OwnerDigest>> {
    let mut out = Vec::new();
    for f in fs {
        out.push(f.await);
    }
    out
}
