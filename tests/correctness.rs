//! Correctness over the whole API (issue 13), one regression test per way
//! found to stall or diverge.

use std::time::Duration;

use sync_storage::LocalChange;

use crate::harness::{
    assert_converged, connect, shutdown, spawn_devices, synthetic_changes, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);

/// Renaming a location stamps it with a new seq while its entries keep
/// older ones, so a new peer's first page (or first `StateChange`) held
/// entries of a location it had never seen: refused as `ForeignOwner`,
/// and every redial repeated it. Entries may now arrive before their
/// location (never in another owner's): the watermark cannot pass the
/// location before it arrives.
async fn renamed_location_reaches_a_new_peer(entries: u64) {
    let devices = spawn_devices(2, |c| {
        c.batch_size = 1_000;
        c.thresholds.bulk_from = u64::MAX;
        c.thresholds.snapshot_from = u64::MAX;
    })
    .await;
    let (a, b) = (&devices[0], &devices[1]);
    let (mut renamed, changes) = synthetic_changes(a.id, entries, 7);
    a.engine.commit(changes).await.expect("commit");
    renamed.name = format!("{} (renamed)", renamed.name);
    renamed.path = format!("{}-renamed", renamed.path);
    let last = a
        .engine
        .commit(vec![LocalChange::Location(renamed)])
        .await
        .expect("rename")
        .last;
    connect(b, a).await;
    wait_for_watermark(b, a.id, last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_location_reaches_a_new_peer_as_individual_changes() {
    renamed_location_reaches_a_new_peer(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_location_reaches_a_new_peer_in_batches() {
    renamed_location_reaches_a_new_peer(15_000).await;
}

/// Deleting a location left its entries live (readers listed files of a
/// folder the owner had dropped). It now tombstones them, each under a seq
/// of its own; re-creating the location afterwards reaches a peer that
/// saw the delete and one that never did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_location_tombstones_its_entries_and_undeleting_reaches_every_peer() {
    let devices = spawn_devices(3, |_| {}).await;
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let (location, changes) = synthetic_changes(a.id, 40, 9);
    let entries: Vec<LocalChange> = changes[1..].to_vec();
    a.engine.commit(changes).await.expect("commit");
    connect(b, a).await;
    let deleted = a
        .engine
        .commit(vec![LocalChange::DeleteLocation(location.id)])
        .await
        .expect("delete")
        .last;
    wait_for_watermark(b, a.id, deleted, WAIT).await;
    let held = assert_converged(a, b).await;
    assert_eq!((held.entries, held.tombstones), (0, 40));
    // Indexed again: the location and its entries come back.
    let mut back = vec![LocalChange::Location(location)];
    back.extend(entries);
    let last = a.engine.commit(back).await.expect("undelete").last;
    wait_for_watermark(b, a.id, last, WAIT).await;
    connect(c, a).await;
    wait_for_watermark(c, a.id, last, WAIT).await;
    for peer in [b, c] {
        let held = assert_converged(a, peer).await;
        assert_eq!(held.entries, 40);
    }
    shutdown(&devices).await;
}

/// Issue 13 item 2: two engines on one library reused seqs and moved the
/// counter backwards. A second engine on a data directory is refused at
/// once, naming the holder's pid; the lock goes with `shutdown`, and a
/// restarted engine continues the same counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_on_one_library_are_refused_naming_the_holder() {
    let mut devices = spawn_devices(1, |_| {}).await;
    let a = &mut devices[0];
    let (_, changes) = synthetic_changes(a.id, 50, 3);
    let first = a.engine.commit(changes).await.expect("commit");
    let err = match sync_actors::SyncEngine::start(sync_actors::EngineConfig::new(&a.dir)).await {
        Ok(_) => panic!("a second engine opened the library"),
        Err(e) => e,
    };
    assert!(
        matches!(
            &err,
            sync_actors::EngineError::Storage(sync_storage::StorageError::InUse { pid: Some(p), .. })
                if *p == std::process::id()
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("in use by another engine"),
        "{err}"
    );
    a.restart(|_| {}).await;
    let (_, more) = synthetic_changes(a.id, 10, 4);
    let next = a.engine.commit(more).await.expect("commit after restart");
    assert_eq!(
        next.first,
        first.last.next(),
        "the counter moved on from where it was"
    );
    shutdown(&devices).await;
}

/// Item 1 through the indexer: a real folder indexed, its location
/// deleted, then indexed again, reaches a peer that saw the delete and a
/// peer that never did, with the folder's entries live on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindexing_a_deleted_location_reaches_every_peer() {
    let devices = spawn_devices(3, |_| {}).await;
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let tree = tempfile::tempdir().expect("tree");
    for i in 0..30 {
        let dir = tree.path().join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("f{i}")), vec![b'x'; i]).expect("write");
    }
    let first = a.engine.index(tree.path(), None).await.expect("index");
    assert_eq!(first.entries, 35, "{first:?}");
    connect(b, a).await;
    let deleted = a
        .engine
        .commit(vec![LocalChange::DeleteLocation(first.location_id)])
        .await
        .expect("delete")
        .last;
    wait_for_watermark(b, a.id, deleted, WAIT).await;
    assert_eq!(assert_converged(a, b).await.entries, 0);
    let again = a.engine.index(tree.path(), None).await.expect("re-index");
    assert_eq!(again.entries, 35, "{again:?}");
    let last = a.store().local_watermark().await.expect("watermark").seq;
    wait_for_watermark(b, a.id, last, WAIT).await;
    connect(c, a).await;
    wait_for_watermark(c, a.id, last, WAIT).await;
    for peer in [b, c] {
        let held = assert_converged(a, peer).await;
        assert_eq!(held.entries, 35);
        let live = peer
            .store()
            .locations()
            .await
            .expect("locations")
            .into_iter()
            .filter(|l| !l.deleted)
            .count();
        assert_eq!(live, 1, "one live location on the peer");
    }
    shutdown(&devices).await;
}
