//! Tombstone collection across devices: an owner collects tombstones older
//! than the horizon and acknowledged by every trusted peer holding its
//! records, replicas follow the point it announces and stay verified
//! identical, a peer that has not acknowledged holds collection back, and a
//! replica restored from behind the collection point is repaired by
//! reconciliation instead of keeping records whose deletes it never saw.

use std::path::Path;
use std::time::Duration;

use sync_actors::SyncEvent;
use sync_core::Seq;
use sync_storage::LocalChange;

use crate::chaos::check_records;
use crate::harness::{Device, connect, shutdown, spawn_devices, synthetic_changes, wait_event};

const WAIT: Duration = Duration::from_secs(60);

/// Commits `n` entries on `device`; returns their ids.
async fn entries(device: &Device, n: u64, seed: u64) -> Vec<sync_core::EntryId> {
    let (_, changes) = synthetic_changes(device.id, n, seed);
    let ids = changes
        .iter()
        .filter_map(|c| match c {
            LocalChange::Entry(e) => Some(e.id),
            _ => None,
        })
        .collect();
    device.engine.commit(changes).await.expect("commit");
    ids
}

/// Deletes `ids` on `device`; returns the last seq.
async fn delete(device: &Device, ids: &[sync_core::EntryId]) -> Seq {
    let changes = ids.iter().map(|id| LocalChange::DeleteEntry(*id)).collect();
    device.engine.commit(changes).await.expect("delete").last
}

/// Waits until `receiver` holds `owner`'s current records exactly, with
/// the same tombstone collection point, and the owner says so.
async fn identical(owner: &Device, receiver: &Device) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let want = owner.store().owner_digest(owner.id).await.expect("digest");
        let got = receiver
            .store()
            .owner_digest(owner.id)
            .await
            .expect("digest");
        if got == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} holds {got:?} of {}, which holds {want:?}",
            receiver.id.fmt_short(),
            owner.id.fmt_short()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let check = check_records(owner, receiver).await;
    assert!(check.clean(), "{check:?}");
}

/// No age required of a tombstone (the horizon's dating by minute is
/// tested in sync-storage).
fn horizon_zero(c: &mut sync_actors::EngineConfig) {
    c.tombstone_horizon = Duration::ZERO;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_tombstones_are_followed_by_the_replica_and_copies_stay_identical() {
    let devices = spawn_devices(2, horizon_zero).await;
    let (a, b) = (&devices[0], &devices[1]);
    let ids = entries(a, 2000, 1).await;
    let last = delete(a, &ids[..600]).await;
    connect(a, b).await;
    identical(a, b).await;
    assert_eq!(b.store().summary(a.id).await.unwrap().tombstones, 600);
    // B's acknowledgement is kept when its transfer completes.
    let deadline = tokio::time::Instant::now() + WAIT;
    while a
        .store()
        .peer_holds()
        .await
        .unwrap()
        .get(&b.id)
        .map(|w| w.seq)
        != Some(last)
    {
        assert!(tokio::time::Instant::now() < deadline, "B's ack not kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut events = b.engine.subscribe();
    let done = a.engine.collect_tombstones().await.expect("collect");
    assert_eq!((done.upto, done.dropped), (last, 600));
    wait_event(&mut events, WAIT, |e| {
        matches!(e, SyncEvent::TombstonesCollected { owner, dropped: 600, .. } if *owner == a.id)
    })
    .await;
    identical(a, b).await;
    for d in [a, b] {
        let s = d.store().summary(a.id).await.unwrap();
        assert_eq!((s.entries, s.tombstones), (1400, 0));
    }
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_has_not_acknowledged_holds_collection_back() {
    let devices = spawn_devices(3, horizon_zero).await;
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let ids = entries(a, 1000, 2).await;
    let first = delete(a, &ids[..100]).await;
    connect(a, c).await;
    identical(a, c).await;
    c.engine.shutdown().await.expect("C goes away");
    let second = delete(a, &ids[100..400]).await;
    connect(a, b).await;
    identical(a, b).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let holds = a.store().peer_holds().await.unwrap();
        if holds.get(&b.id).map(|w| w.seq) == Some(second)
            && holds.get(&c.id).map(|w| w.seq) == Some(first)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks not kept: {holds:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = a.engine.collect_tombstones().await.expect("collect");
    assert_eq!(
        (done.upto, done.dropped),
        (first, 100),
        "C acknowledged only the first deletes"
    );
    assert_eq!(a.store().summary(a.id).await.unwrap().tombstones, 300);
    identical(a, b).await;
    for d in [a, b] {
        d.engine.shutdown().await.ok();
    }
}

/// Copies a directory tree (files and modes).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
    let perms = std::fs::metadata(from).expect("metadata").permissions();
    std::fs::set_permissions(to, perms).expect("permissions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restored_from_behind_the_collection_point_is_repaired() {
    let mut devices = spawn_devices(2, horizon_zero).await;
    let ids = entries(&devices[0], 3000, 3).await;
    connect(&devices[0], &devices[1]).await;
    identical(&devices[0], &devices[1]).await;
    // A backup of B taken before the deletes.
    let backup = tempfile::tempdir().expect("tempdir");
    devices[1].engine.shutdown().await.expect("stop B");
    copy_tree(&devices[1].dir, &backup.path().join("b"));
    devices[1].restart(horizon_zero).await;
    let last = delete(&devices[0], &ids[..500]).await;
    connect(&devices[0], &devices[1]).await;
    identical(&devices[0], &devices[1]).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while devices[0]
        .store()
        .peer_holds()
        .await
        .unwrap()
        .get(&devices[1].id)
        .map(|w| w.seq)
        != Some(last)
    {
        assert!(tokio::time::Instant::now() < deadline, "B's ack not kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        devices[0]
            .engine
            .collect_tombstones()
            .await
            .unwrap()
            .dropped,
        500
    );
    // B goes back to its backup: it holds the 500 entries live, and their
    // tombstones are gone from A.
    devices[1].engine.shutdown().await.expect("stop B");
    std::fs::remove_dir_all(&devices[1].dir).expect("remove");
    copy_tree(&backup.path().join("b"), &devices[1].dir);
    devices[1].restart(horizon_zero).await;
    assert_eq!(
        devices[1]
            .store()
            .summary(devices[0].id)
            .await
            .unwrap()
            .entries,
        3000
    );
    connect(&devices[0], &devices[1]).await;
    identical(&devices[0], &devices[1]).await;
    assert_eq!(
        devices[1]
            .store()
            .summary(devices[0].id)
            .await
            .unwrap()
            .entries,
        2500
    );
    shutdown(&devices).await;
}
