//! Each strategy moves every record, chosen by how much the peer is missing;
//! live changes after the bulk; three devices; events.

use std::time::Duration;

use sync_actors::{Direction, SyncEvent};
use sync_core::{Record, Seq, Strategy};
use sync_storage::LocalChange;

use crate::harness::{
    assert_converged, connect, generate, shutdown, spawn_devices, wait_event, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(180);

/// The strategy of the first outgoing transfer in `events`.
fn sent_strategy(events: &[SyncEvent]) -> Option<Strategy> {
    events.iter().find_map(|e| match e {
        SyncEvent::TransferStarted {
            strategy,
            direction: Direction::Send,
            ..
        } => Some(*strategy),
        _ => None,
    })
}

/// Connects a fresh receiver to an owner holding `entries` and returns the
/// strategy the owner's supervisor chose.
async fn sync_fresh(entries: u64) -> Strategy {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, entries, 7).await;
    let mut events = a.engine.subscribe();
    connect(b, a).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferStarted {
                direction: Direction::Send,
                ..
            }
        )
    })
    .await;
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
    sent_strategy(&seen).expect("a transfer started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_records_go_as_individual_changes() {
    assert_eq!(sync_fresh(49).await, Strategy::Individual);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_records_go_as_pushed_batches() {
    assert_eq!(sync_fresh(5_000).await, Strategy::Batches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_device_missing_200k_gets_a_snapshot_then_the_tail() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 200_000, 11).await;
    let mut events = a.engine.subscribe();
    let mut received = b.engine.subscribe();
    connect(b, a).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferStarted {
                direction: Direction::Send,
                ..
            }
        )
    })
    .await;
    assert_eq!(sent_strategy(&seen), Some(Strategy::Snapshot));
    wait_event(&mut received, WAIT, |e| {
        matches!(e, SyncEvent::SnapshotImported { .. })
    })
    .await;
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    // The tail after the snapshot travels as changes or batches.
    let tail = generate(a, 300, 12).await;
    wait_for_watermark(b, a.id, tail.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_missing_200k_gets_a_bulk_notice_and_pulls() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, b) = (&devices[0], &devices[1]);
    let first = generate(a, 500, 3).await;
    connect(b, a).await;
    wait_for_watermark(b, a.id, first.last, WAIT).await;
    let mut events = a.engine.subscribe();
    let mut received = b.engine.subscribe();
    let range = generate(a, 200_000, 4).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferStarted {
                direction: Direction::Send,
                ..
            }
        )
    })
    .await;
    assert_eq!(sent_strategy(&seen), Some(Strategy::Bulk));
    // The receiver pulls: started, progress rising, completed.
    let recv = wait_event(&mut received, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferCompleted {
                direction: Direction::Receive,
                strategy: Strategy::Bulk,
                ..
            }
        )
    })
    .await;
    let mut last_done = 0;
    let mut progress = 0;
    for e in &recv {
        if let SyncEvent::TransferProgress {
            done,
            direction: Direction::Receive,
            ..
        } = e
        {
            assert!(*done >= last_done, "progress went backwards");
            last_done = *done;
            progress += 1;
        }
    }
    assert!(
        progress >= 10,
        "only {progress} progress events for 200K records"
    );
    assert!(recv.iter().any(|e| matches!(
        e,
        SyncEvent::TransferStarted {
            strategy: Strategy::Bulk,
            direction: Direction::Receive,
            ..
        }
    )));
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_events_show_start_rising_progress_and_completion() {
    let devices = spawn_devices(2, |c| c.batch_size = 1_000).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 50_000, 5).await;
    let mut events = a.engine.subscribe();
    connect(b, a).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferCompleted {
                direction: Direction::Send,
                ..
            }
        )
    })
    .await;
    let (mut started, mut last, mut steps) = (false, 0, 0);
    for e in &seen {
        match e {
            SyncEvent::TransferStarted {
                total, strategy, ..
            } => {
                started = true;
                assert_eq!(*strategy, Strategy::Batches);
                assert_eq!(*total, range.last.0);
            }
            SyncEvent::TransferProgress { done, total, .. } => {
                assert!(started, "progress before start");
                assert!(*done > last, "done must rise");
                assert!(done <= total);
                last = *done;
                steps += 1;
            }
            SyncEvent::TransferCompleted { records, .. } => assert_eq!(*records, range.last.0),
            _ => {}
        }
    }
    assert!(steps >= 50, "{steps} progress events");
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_and_deletes_after_the_bulk_arrive_and_never_go_backwards() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 20_000, 9).await;
    connect(b, a).await;
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    let records = a.store().records_after(a.id, Seq::ZERO, 200).await.unwrap();
    let entries: Vec<_> = records
        .into_iter()
        .filter_map(|r| match r {
            Record::Entry(e) => Some(e),
            Record::Location(_) => None,
        })
        .collect();
    // Live: one change at a time, each a separate commit.
    let mut last = range.last;
    for (i, e) in entries.iter().take(40).enumerate() {
        let change = if i % 2 == 0 {
            let mut e = e.clone();
            e.name = format!("renamed-{i}");
            LocalChange::Entry(e)
        } else {
            LocalChange::DeleteEntry(e.id)
        };
        last = a.engine.commit(vec![change]).await.unwrap().last;
    }
    // Then a burst of updates to the same entries.
    let burst: Vec<_> = entries
        .iter()
        .skip(40)
        .map(|e| {
            let mut e = e.clone();
            e.size += 1;
            LocalChange::Entry(e)
        })
        .collect();
    last = last.max(a.engine.commit(burst).await.unwrap().last);
    wait_for_watermark(b, a.id, last, WAIT).await;
    let summary = assert_converged(a, b).await;
    assert_eq!(summary.tombstones, 20);
    // Every record on B carries the newest seq A has for it.
    let on_a = a
        .store()
        .records_after(a.id, Seq::ZERO, usize::MAX)
        .await
        .unwrap();
    let on_b = b
        .store()
        .records_after(a.id, Seq::ZERO, usize::MAX)
        .await
        .unwrap();
    assert_eq!(on_a, on_b);
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_each_owning_a_location_all_converge() {
    let devices = spawn_devices(3, |_| {}).await;
    let mut ranges = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        ranges.push(generate(d, 3_000 + 1_000 * i as u64, 20 + i as u64).await);
    }
    connect(&devices[0], &devices[1]).await;
    connect(&devices[1], &devices[2]).await;
    connect(&devices[2], &devices[0]).await;
    for (i, owner) in devices.iter().enumerate() {
        for (j, other) in devices.iter().enumerate() {
            if i != j {
                wait_for_watermark(other, owner.id, ranges[i].last, WAIT).await;
                assert_converged(owner, other).await;
            }
        }
    }
    shutdown(&devices).await;
}
