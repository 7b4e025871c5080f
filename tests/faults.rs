//! Transfers under faults: links cut at random points (in-memory transport
//! with the fault wrapper: a cut must be injected), and a panic inside a
//! transfer. Every schedule converges; re-sent data stays within one credit
//! window (or one chunk) per cut.

use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use sync_actors::{Direction, SyncEvent};
use sync_core::Strategy;
use sync_net::fault::{FaultPlan, memory_pair_with_faults};

use crate::harness::{
    Device, assert_converged, connect, generate, shutdown, spawn_devices, wait_event,
    wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(180);

/// Sums the records B applied of `owner` (from the event bus).
fn applied(events: &mut tokio::sync::broadcast::Receiver<SyncEvent>) -> u64 {
    let mut n = 0;
    while let Ok(e) = events.try_recv() {
        if let SyncEvent::Applied { records, .. } = e {
            n += records;
        }
    }
    n
}

/// Links `sender` and `receiver` over in-memory connections, each cut after
/// a random number of the sender's bytes, until the receiver holds `target`.
/// Returns the number of cuts.
async fn converge_through_cuts(
    sender: &Device,
    receiver: &Device,
    target: sync_core::Seq,
    rng: &mut StdRng,
    max_cut: u64,
) -> u32 {
    let mut cuts = 0;
    for _ in 0..60 {
        let held = receiver.store().watermark(sender.id).await.unwrap();
        if held.is_some_and(|w| w.seq >= target) {
            return cuts;
        }
        let plan = FaultPlan {
            cut_after_bytes: Some(rng.random_range(200..max_cut)),
            ..FaultPlan::default()
        };
        let (ca, cb) = memory_pair_with_faults(
            &sender.engine.net_config(),
            &receiver.engine.net_config(),
            plan,
            FaultPlan::default(),
        )
        .await
        .expect("memory pair");
        let closed_a = sender.engine.attach(ca).await.unwrap();
        let closed_b = receiver.engine.attach(cb).await.unwrap();
        // Wait for the cut (both sessions end) or the end of the transfer.
        let cut = async {
            let _ = closed_a.await;
            let _ = closed_b.await;
        };
        let done = wait_for_watermark(receiver, sender.id, target, WAIT);
        tokio::select! {
            _ = cut => cuts += 1,
            _ = done => return cuts,
        }
    }
    panic!("did not converge after 60 links");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_transfer_cut_at_random_points_resumes_and_converges() {
    for seed in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = spawn_devices(2, |c| {
            c.batch_size = 1_000;
            c.credit_window = 4;
        })
        .await;
        let (a, b) = (&devices[0], &devices[1]);
        let range = generate(a, 30_000, seed).await;
        let mut events = b.engine.subscribe();
        let cuts = converge_through_cuts(a, b, range.last, &mut rng, 700_000).await;
        assert_converged(a, b).await;
        let records = applied(&mut events);
        let resent = records.saturating_sub(range.last.0);
        // A cut loses at most the batches in flight: one credit window.
        assert!(
            resent <= u64::from(cuts) * 4 * 1_000,
            "seed {seed}: {resent} records re-sent over {cuts} cuts"
        );
        shutdown(&devices).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_download_cut_at_random_points_resumes_and_converges() {
    for seed in 10..13u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = spawn_devices(2, |c| {
            c.thresholds.snapshot_from = 5_000;
            c.thresholds.bulk_from = 5_000;
        })
        .await;
        let (a, b) = (&devices[0], &devices[1]);
        let range = generate(a, 60_000, seed).await;
        // Drained as they come: read only at the end, the bus overflowed
        // (progress and verification events) and lost the import's event.
        let mut events = b.engine.subscribe();
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = counted.clone();
        let drain = tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(SyncEvent::SnapshotImported { .. }) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        });
        let cuts = converge_through_cuts(a, b, range.last, &mut rng, 6_000_000).await;
        assert_converged(a, b).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drain.abort();
        let imported = counted.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            imported, 1,
            "seed {seed}: one snapshot imported after {cuts} cuts"
        );
        shutdown(&devices).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_inside_a_transfer_is_restarted_by_the_supervisor() {
    let devices = spawn_devices(2, |c| {
        c.batch_size = 1_000;
        c.faults.panic_sender_after_batches = Some(3);
    })
    .await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 20_000, 5).await;
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
    let failed = seen.iter().find_map(|e| match e {
        SyncEvent::TransferFailed {
            will_retry,
            cause,
            attempt,
            ..
        } => Some((*will_retry, cause.clone(), *attempt)),
        _ => None,
    });
    let (will_retry, cause, attempt) = failed.expect("the panic was reported");
    assert!(will_retry);
    assert_eq!(attempt, 1);
    assert!(cause.contains("injected fault"), "{cause}");
    let restarted = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                SyncEvent::TransferStarted {
                    strategy: Strategy::Batches,
                    ..
                }
            )
        })
        .count();
    assert_eq!(restarted, 2, "started, then restarted once");
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_receiver_resumes_from_its_watermark() {
    let mut devices = spawn_devices(2, |c| c.batch_size = 1_000).await;
    let range = generate(&devices[0], 40_000, 8).await;
    connect(&devices[1], &devices[0]).await;
    // Stop B part-way, as a restart of its process would.
    wait_for_watermark(&devices[1], devices[0].id, sync_core::Seq(5_000), WAIT).await;
    devices[1].restart(|c| c.batch_size = 1_000).await;
    let held = devices[1]
        .store()
        .watermark(devices[0].id)
        .await
        .unwrap()
        .unwrap();
    assert!(held.seq.0 >= 5_000, "watermark survived the restart");
    let mut events = devices[0].engine.subscribe();
    connect(&devices[1], &devices[0]).await;
    let seen = wait_event(&mut events, WAIT, |e| {
        matches!(e, SyncEvent::TransferStarted { .. })
    })
    .await;
    let started = seen.iter().find_map(|e| match e {
        SyncEvent::TransferStarted { total, .. } => Some(*total),
        _ => None,
    });
    // Resumed from the watermark, not from zero.
    assert!(started.unwrap() <= range.last.0 - held.seq.0);
    wait_for_watermark(&devices[1], devices[0].id, range.last, WAIT).await;
    assert_converged(&devices[0], &devices[1]).await;
    shutdown(&devices).await;
}

// Regression: two redial loops to one peer replaced each other's sessions
// forever (each replaced session redialed at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_peer_twice_settles_on_one_session() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 2_000, 3).await;
    let addr = a.engine.listen("127.0.0.1:0").await.unwrap();
    let mut events = b.engine.subscribe();
    b.engine.connect(&addr.to_string()).await.unwrap();
    b.engine.connect(&addr.to_string()).await.unwrap();
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut connected = 0;
    while let Ok(e) = events.try_recv() {
        if matches!(e, SyncEvent::PeerConnected { .. }) {
            connected += 1;
        }
    }
    assert!(
        connected <= 2,
        "{connected} sessions in 2 s: the redial loops churn"
    );
    assert_eq!(b.engine.peers().await.unwrap().len(), 1);
    // Live changes still flow on the surviving session.
    let more = generate(a, 10, 4).await;
    wait_for_watermark(b, a.id, more.last, WAIT).await;
    assert_converged(a, b).await;
    shutdown(&devices).await;
}
