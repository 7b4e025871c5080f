//! Regression tests for what the simulation found that was not already
//! known (issue 13).

use std::path::Path;
use std::time::Duration;

use sync_actors::{EngineConfig, SyncEngine};
use sync_core::Seq;
use sync_net::fault::{FaultPlan, memory_pair_with_faults};

use super::model::own_records;
use crate::harness::{Device, generate, shutdown, spawn_devices, wait_for_watermark};

/// Links `a` and `b` in memory, each write of `b` delayed by `delay`.
async fn link(a: &Device, b: &Device, delay: Duration) {
    let slow = FaultPlan {
        delay: Some(delay),
        ..FaultPlan::default()
    };
    let (ca, cb) = memory_pair_with_faults(
        &a.engine.net_config(),
        &b.engine.net_config(),
        FaultPlan::default(),
        slow,
    )
    .await
    .expect("memory pair");
    a.engine.attach(ca).await.expect("attach a");
    b.engine.attach(cb).await.expect("attach b");
}

/// Finding S1 (simulation, `synced_probe`, stale claims): the receiver's
/// `synced_with(owner)` compares its watermark with the owner's
/// `Watermarks` of the session's start, never raised by the batches that
/// arrive since, so while a transfer it is receiving runs, and after it has
/// applied part of it, it said it was synced. Fixed: a plan first tells
/// the peer this device's watermark (a `Watermarks` of its own entry)
/// whenever it moved since the peer was last told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_midway_through_a_transfer_is_not_synced() {
    let devices = spawn_devices(2, |c| c.batch_size = 50).await;
    let (a, b) = (&devices[0], &devices[1]);
    link(a, b, Duration::from_millis(5)).await;
    assert!(
        a.engine
            .wait_synced(b.id, Duration::from_secs(30))
            .await
            .unwrap()
    );
    let last = generate(b, 3_000, 5).await.last;
    let mut partial = 0;
    loop {
        let held = a.store().watermark(b.id).await.unwrap().map(|w| w.seq);
        let held = held.unwrap_or(Seq::ZERO);
        if held >= last {
            break;
        }
        if held > Seq::ZERO {
            partial += 1;
            let synced = a.engine.synced_with(b.id).await.unwrap();
            // The claim is read after `held`: the transfer may have ended
            // in between (seen under load), which makes it true.
            let now = a.store().watermark(b.id).await.unwrap().map(|w| w.seq);
            assert!(
                !synced || now.is_some_and(|s| s >= last),
                "synced_with(owner) is true while holding {held} of its {last}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        partial > 0,
        "the transfer ended before a partial state was seen"
    );
    wait_for_watermark(a, b.id, last, Duration::from_secs(60)).await;
    shutdown(&devices).await;
}

/// Copies the library files of a stopped engine's data directory.
fn copy_library(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for name in ["library.db", "library.db-wal", "library.db-shm"] {
        let _ = std::fs::remove_file(to.join(name));
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).expect("copy library file");
        }
    }
}

/// Stops `device`'s engine, runs `with_dir` on its data directory, starts it.
async fn while_stopped(device: &mut Device, with_dir: impl FnOnce(&Path)) {
    device.engine.shutdown().await.expect("shutdown");
    with_dir(&device.dir);
    device.engine = SyncEngine::start(EngineConfig::new(&device.dir))
        .await
        .expect("start engine");
}

/// Finding S2 (simulation seeds 20007, 20059, 20092: `restore`, "not
/// synced within 30s", the peer holding the owner's records
/// "duplicated"): an owner restored from a copy taken before its first
/// commit holds no record. A peer holding its lost records makes it start
/// a new IndexId (issue 13 item 3), but with nothing to send the plan is
/// `UpToDate` (`OtherIndex`, 0 pending), and a peer replaces an owner's
/// rows only when a batch of the new index arrives: the peer kept the lost
/// records for good, and the owner never counted it as synced. Fixed: the
/// owner's plan sends an empty batch after seq 0 of its new index
/// (`send_empty_reset`), which makes the peer drop the old rows (also
/// `restore::an_owner_restored_to_an_empty_copy_empties_its_peer`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_restored_to_an_empty_library_empties_its_peers() {
    let mut devices = spawn_devices(2, |_| {}).await;
    let copy = tempfile::tempdir().expect("tempdir");
    let backup = copy.path().join("backup");
    // A copy of A's library before its first commit.
    while_stopped(&mut devices[0], |dir| copy_library(dir, &backup)).await;
    let made = generate(&devices[0], 3, 1).await;
    link(&devices[0], &devices[1], Duration::ZERO).await;
    wait_for_watermark(
        &devices[1],
        devices[0].id,
        made.last,
        Duration::from_secs(30),
    )
    .await;
    while_stopped(&mut devices[0], |dir| copy_library(&backup, dir)).await;
    let (a, b) = (&devices[0], &devices[1]);
    assert_eq!(a.store().local_watermark().await.unwrap().seq, Seq::ZERO);
    link(a, b, Duration::ZERO).await;
    let synced = a
        .engine
        .wait_synced(b.id, Duration::from_secs(20))
        .await
        .unwrap();
    let kept = own_records(&b.store(), a.id, Seq::ZERO).await.unwrap();
    assert!(
        synced && kept.is_empty(),
        "A (no records) synced with B: {synced}; B holds {} of A's lost records at {:?}",
        kept.len(),
        b.store().watermark(a.id).await.unwrap()
    );
    shutdown(&devices).await;
}
