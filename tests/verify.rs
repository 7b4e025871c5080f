//! "Synced" as a proof: two devices compare content digests of every owner
//! they both hold, say "verified identical" only when the contents are
//! equal, notice rows changed behind an engine's back, and repair a copy
//! that differs by reconciliation, moving only the differing records.

use std::time::Duration;

use sync_actors::{SyncEvent, TransferStatus};
use sync_core::digest::Verification;
use sync_core::{DeviceId, Seq, Strategy};

use crate::chaos::check_records;
use crate::harness::{Device, connect, generate, shutdown, spawn_devices, wait_event};

const WAIT: Duration = Duration::from_secs(60);

/// Waits until `device` reports `peer`'s copy of `owner`'s records as
/// verified identical at `owner`'s current seq.
async fn wait_identical(device: &Device, peer: &Device, owner: &Device) -> Seq {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let want = owner.store().local_watermark().await.expect("local").seq;
        let peers = device.engine.peers().await.expect("peers");
        let state = peers
            .iter()
            .find(|p| p.peer == peer.id)
            .and_then(|p| p.verification.iter().find(|(o, _)| *o == owner.id))
            .map(|(_, v)| *v);
        if state == Some(Verification::Identical { seq: want }) {
            return want;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} reports {state:?} for {}'s records with {}, want identical at {want}",
            device.id.fmt_short(),
            owner.id.fmt_short(),
            peer.id.fmt_short()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The records of `owner` as two devices hold them are the same, one by one.
async fn same_records(owner: &Device, receiver: &Device) {
    let check = check_records(owner, receiver).await;
    assert!(
        check.clean(),
        "records of {}: {check:?}",
        owner.id.fmt_short()
    );
}

/// A synced pair: A with 3,000 records, B with 200, each holding the other's.
async fn synced_pair() -> Vec<Device> {
    let devices = spawn_devices(2, |_| {}).await;
    generate(&devices[0], 3000, 1).await;
    generate(&devices[1], 200, 2).await;
    connect(&devices[0], &devices[1]).await;
    for (x, y) in [(0, 1), (1, 0)] {
        for owner in [0, 1] {
            wait_identical(&devices[x], &devices[y], &devices[owner]).await;
        }
    }
    devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_copies_are_verified_identical_by_both_sides_for_both_owners() {
    let devices = synced_pair().await;
    let (a, b) = (&devices[0], &devices[1]);
    same_records(a, b).await;
    same_records(b, a).await;
    // Live changes afterwards are verified again once they settle.
    let mut events = a.engine.subscribe();
    let live = generate(a, 5, 3).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(e, SyncEvent::Verified { owner, state: Verification::Identical { seq }, .. }
            if *owner == a.id && *seq == live.last)
    })
    .await;
    assert!(
        !seen.iter().any(|e| matches!(
            e,
            SyncEvent::Verified {
                state: Verification::Differs { .. },
                ..
            }
        )),
        "{seen:?}"
    );
    wait_identical(b, a, a).await;
    same_records(a, b).await;
    shutdown(&devices).await;
}

/// Runs `sql` on `device`'s library file as another program would.
async fn write_outside(device: &Device, sql: &str) -> u64 {
    let path = device.dir.join("library.db");
    sync_storage::testing::write_outside(&path, sql)
        .await
        .expect("write outside the engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_behind_a_stopped_engine_are_found_and_repaired_by_reconciliation() {
    let mut devices = synced_pair().await;
    let a_id = devices[0].id;
    devices[1].engine.shutdown().await.expect("shutdown B");
    // B's copy of A: one record renamed, one gone, one size changed.
    let owner = hex(a_id);
    for sql in [
        format!("UPDATE entry SET name = 'tampered' WHERE owner = x'{owner}' AND seq = 100"),
        format!("DELETE FROM entry WHERE owner = x'{owner}' AND seq = 200"),
        format!("UPDATE entry SET size = size + 1 WHERE owner = x'{owner}' AND seq = 2500"),
    ] {
        assert_eq!(write_outside(&devices[1], &sql).await, 1, "{sql}");
    }
    devices[1].restart(|_| {}).await;
    let mut a_events = devices[0].engine.subscribe();
    let mut b_events = devices[1].engine.subscribe();
    connect(&devices[0], &devices[1]).await;
    let seen = wait_event(&mut b_events, WAIT, |e| {
        matches!(e, SyncEvent::RowsChangedOutside { .. })
    })
    .await;
    match seen.last() {
        Some(SyncEvent::RowsChangedOutside {
            owner,
            stored_records,
            actual_records,
        }) => {
            assert_eq!(*owner, a_id);
            assert_eq!(*stored_records, actual_records + 1);
        }
        other => unreachable!("{other:?}"),
    }
    let done = wait_event(&mut a_events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferCompleted {
                strategy: Strategy::Repair,
                ..
            }
        )
    })
    .await;
    let Some(SyncEvent::TransferCompleted { records, .. }) = done.last() else {
        unreachable!()
    };
    assert_eq!(*records, 3, "only the three differing records travel");
    wait_identical(&devices[1], &devices[0], &devices[0]).await;
    wait_identical(&devices[0], &devices[1], &devices[0]).await;
    same_records(&devices[0], &devices[1]).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_while_the_engine_runs_are_found_at_the_next_session() {
    let mut devices = synced_pair().await;
    let a_id = devices[0].id;
    // A record of A's that A never made, and a renamed one, written into
    // B while B runs.
    let owner = hex(a_id);
    let sql = format!(
        "INSERT INTO entry SELECT x'00112233445566778899aabbccddeeff', owner, location, parent, \
         'planted', kind, size, inode, created_at, modified_at, 0, deleted FROM entry \
         WHERE owner = x'{owner}' AND seq = 10; \
         UPDATE entry SET name = 'renamed' WHERE owner = x'{owner}' AND seq = 11"
    );
    write_outside(&devices[1], &sql).await;
    // A new session: A restarts and dials again.
    devices[0].restart(|_| {}).await;
    let mut b_events = devices[1].engine.subscribe();
    connect(&devices[0], &devices[1]).await;
    wait_event(
        &mut b_events,
        WAIT,
        |e| matches!(e, SyncEvent::RowsChangedOutside { owner, .. } if *owner == a_id),
    )
    .await;
    wait_identical(&devices[1], &devices[0], &devices[0]).await;
    same_records(&devices[0], &devices[1]).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_restarted_its_index_repairs_its_peers_instead_of_resending() {
    let mut devices = spawn_devices(2, |_| {}).await;
    generate(&devices[0], 5000, 1).await;
    connect(&devices[0], &devices[1]).await;
    wait_identical(&devices[1], &devices[0], &devices[0]).await;
    devices[0].engine.shutdown().await.expect("shutdown A");
    {
        let store = sync_storage::Store::open(&devices[0].dir.join("library.db"))
            .await
            .expect("open A");
        let w = store.local_watermark().await.expect("local");
        store
            .restart_local_index(w.index_id)
            .await
            .expect("restart index");
        store.close().await;
    }
    devices[0].restart(|_| {}).await;
    generate(&devices[0], 20, 9).await;
    let mut events = devices[0].engine.subscribe();
    connect(&devices[0], &devices[1]).await;
    let done = wait_event(&mut events, WAIT, |e| {
        matches!(e, SyncEvent::TransferCompleted { .. })
    })
    .await;
    let Some(SyncEvent::TransferCompleted {
        strategy, records, ..
    }) = done.last()
    else {
        unreachable!()
    };
    assert_eq!(*strategy, Strategy::Repair);
    assert!(*records <= 21, "{records} records moved for 21 changed");
    wait_identical(&devices[1], &devices[0], &devices[0]).await;
    same_records(&devices[0], &devices[1]).await;
    let peers = devices[0].engine.peers().await.expect("peers");
    assert_eq!(peers[0].transfer, TransferStatus::Idle);
    shutdown(&devices).await;
}

/// Lowercase hex of a device id, for SQL blob literals.
fn hex(id: DeviceId) -> String {
    id.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
