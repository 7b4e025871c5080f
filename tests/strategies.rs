//! Each strategy moves every record, chosen by how much the peer is missing.

use std::time::Duration;

use sync_actors::{Direction, SyncEvent};
use sync_core::Strategy;

use crate::harness::{
    assert_converged, connect, generate, spawn_devices, wait_event, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(120);

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
    let strategy = seen
        .iter()
        .find_map(|e| match e {
            SyncEvent::TransferStarted { strategy, .. } => Some(*strategy),
            _ => None,
        })
        .expect("a transfer started");
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    for d in &devices {
        d.engine.shutdown().await.expect("shutdown");
    }
    strategy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_records_go_as_individual_changes() {
    assert_eq!(sync_fresh(49).await, Strategy::Individual);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_records_go_as_pushed_batches() {
    assert_eq!(sync_fresh(5_000).await, Strategy::Batches);
}
