//! An owner whose library goes back in time (restored from a copy taken
//! while its engine was stopped): it notices a peer holding more of its
//! records than it has, starts a new IndexId, and both converge record by
//! record, for every owner.

use std::path::Path;
use std::time::Duration;

use sync_actors::{EngineConfig, SyncEngine, SyncEvent};
use sync_core::{DeviceId, Seq};

use crate::chaos::check_records;
use crate::harness::{
    Device, assert_converged, generate, shutdown, spawn_devices, wait_event, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);

/// Copies a directory tree with its files' and directories' permissions.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy file");
        }
    }
    let perms = std::fs::metadata(from).expect("metadata").permissions();
    std::fs::set_permissions(to, perms).expect("permissions");
}

/// Stops `device`'s engine, runs `with_dir` on its stopped data directory,
/// and starts it again.
async fn while_stopped(device: &mut Device, with_dir: impl FnOnce(&Path)) {
    device.engine.shutdown().await.expect("shutdown");
    with_dir(&device.dir);
    let config = EngineConfig::new(&device.dir);
    device.engine = SyncEngine::start(config).await.expect("start engine");
}

/// Waits until `receiver` holds exactly `owner`'s current watermark of its records.
async fn wait_holds_current(owner: &Device, receiver: &Device) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let want = owner.store().local_watermark().await.expect("local");
        let held = receiver.store().watermark(owner.id).await.expect("held");
        if held == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} holds {held:?} of {}, which has {want:?}",
            receiver.id.fmt_short(),
            owner.id.fmt_short()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Both devices hold the same records of both owners, compared one by
/// one, and each counts the other as in sync.
async fn assert_same_records(a: &Device, b: &Device) {
    for (owner, receiver) in [(a, b), (b, a)] {
        wait_holds_current(owner, receiver).await;
        assert!(
            owner
                .engine
                .wait_synced(receiver.id, WAIT)
                .await
                .expect("synced"),
            "{} does not count {} as in sync",
            owner.id.fmt_short(),
            receiver.id.fmt_short()
        );
        let check = check_records(owner, receiver).await;
        assert!(
            check.clean(),
            "records of {}: {check:?}",
            owner.id.fmt_short()
        );
        assert_converged(owner, receiver).await;
    }
}

/// A (`devices[0]`) with a copy of its data directory taken at seq 5, then
/// 10 records synced to B (which has 3 of its own): returns the copy's
/// directory (kept alive by the returned guard) and A's seq once synced.
async fn restored_later(devices: &mut [Device]) -> (tempfile::TempDir, Seq) {
    let copy = tempfile::tempdir().expect("tempdir");
    let first = generate(&devices[0], 4, 1).await;
    assert_eq!(first.last, Seq(5));
    let backup = copy.path().join("backup");
    while_stopped(&mut devices[0], |dir| copy_tree(dir, &backup)).await;
    let more = generate(&devices[0], 4, 2).await;
    assert_eq!(more.last, Seq(10));
    generate(&devices[1], 2, 3).await;
    connect_a_to_b(&devices[0], &devices[1]).await;
    assert_same_records(&devices[0], &devices[1]).await;
    // Restored: seq 5 again, while B holds 10 of the same IndexId.
    while_stopped(&mut devices[0], |dir| {
        std::fs::remove_dir_all(dir).expect("remove data dir");
        copy_tree(&backup, dir);
    })
    .await;
    (copy, more.last)
}

/// A dials B.
async fn connect_a_to_b(a: &Device, b: &Device) {
    let addr = b.engine.listen("127.0.0.1:0").await.expect("listen");
    a.engine.connect(&addr.to_string()).await.expect("connect");
}

/// Waits for A's `IndexRestarted` naming B; returns (peer_seq, local_seq).
async fn index_restarted(
    events: &mut tokio::sync::broadcast::Receiver<SyncEvent>,
    b: DeviceId,
) -> (Seq, Seq) {
    let seen = wait_event(events, WAIT, |e| {
        matches!(e, SyncEvent::IndexRestarted { .. })
    })
    .await;
    match seen.last() {
        Some(&SyncEvent::IndexRestarted {
            peer,
            peer_seq,
            local_seq,
            old,
            new,
        }) => {
            assert_eq!(peer, b);
            assert_ne!(old, new);
            (peer_seq, local_seq)
        }
        other => unreachable!("{other:?}"),
    }
}

// Regression: a restored owner reused seqs B held with other content, and
// B, "up to date", kept the lost records and skipped the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_restored_from_a_copy_then_committing_converges_with_its_peer() {
    let mut devices = spawn_devices(2, |_| {}).await;
    let (_copy, synced) = restored_later(&mut devices).await;
    let (a, b) = (&devices[0], &devices[1]);
    let old = a.store().local_watermark().await.expect("local");
    assert_eq!(old.seq, Seq(5));
    // Three other records under seqs 6..=8, which B holds with other content.
    let fresh = generate(a, 2, 4).await;
    assert_eq!(fresh.last, Seq(8));
    let mut events = a.engine.subscribe();
    connect_a_to_b(a, b).await;
    assert_eq!(index_restarted(&mut events, b.id).await, (synced, Seq(8)));
    crate::harness::assert_logged(&["went back in time", &format!("peer={}", b.id.fmt_short())])
        .await;
    let now = a.store().local_watermark().await.expect("local");
    assert_ne!(now.index_id, old.index_id);
    assert_eq!(now.seq, Seq(8));
    assert_same_records(a, b).await;
    // Later commits flow as usual under the new index.
    let later = generate(a, 3, 5).await;
    wait_for_watermark(b, a.id, later.last, WAIT).await;
    assert_same_records(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_restored_from_a_copy_connecting_before_it_commits_converges() {
    let mut devices = spawn_devices(2, |_| {}).await;
    let (_copy, synced) = restored_later(&mut devices).await;
    let (a, b) = (&devices[0], &devices[1]);
    let mut events = a.engine.subscribe();
    connect_a_to_b(a, b).await;
    assert_eq!(index_restarted(&mut events, b.id).await, (synced, Seq(5)));
    // B drops the five records A lost and keeps the five it has.
    assert_same_records(a, b).await;
    // The next commits reuse seqs 6..=8 under the new index: B must apply
    // them, not skip them as held.
    let fresh = generate(a, 2, 4).await;
    assert_eq!(fresh.last, Seq(8));
    assert_same_records(a, b).await;
    shutdown(&devices).await;
}

/// An owner restored to a copy holding none of its records (taken before
/// its first commit): its new index has nothing to send, so nothing was
/// sent and the peer kept the ten records the owner no longer has. An
/// empty batch after seq 0 of the new index now makes the peer drop them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_restored_to_an_empty_copy_empties_its_peer() {
    let mut devices = spawn_devices(2, |_| {}).await;
    let copy = tempfile::tempdir().expect("tempdir");
    let backup = copy.path().join("backup");
    while_stopped(&mut devices[0], |dir| copy_tree(dir, &backup)).await;
    let synced = generate(&devices[0], 9, 1).await.last;
    generate(&devices[1], 2, 3).await;
    connect_a_to_b(&devices[0], &devices[1]).await;
    assert_same_records(&devices[0], &devices[1]).await;
    while_stopped(&mut devices[0], |dir| {
        std::fs::remove_dir_all(dir).expect("remove data dir");
        copy_tree(&backup, dir);
    })
    .await;
    let (a, b) = (&devices[0], &devices[1]);
    let mut events = a.engine.subscribe();
    connect_a_to_b(a, b).await;
    assert_eq!(
        index_restarted(&mut events, b.id).await,
        (synced, Seq::ZERO)
    );
    assert_same_records(a, b).await;
    let held = b.store().summary(a.id).await.expect("summary");
    assert_eq!((held.entries, held.tombstones), (0, 0), "{held:?}");
    shutdown(&devices).await;
}
