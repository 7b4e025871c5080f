//! A transfer given up after its last attempt is tried again on a slow
//! timer, with no commit and no reconnect to replan it, and `status`
//! shows it given up in the meantime.

use std::time::Duration;

use sync_actors::{Direction, EngineConfig, SyncEvent, TransferStatus};

use crate::harness::{
    Device, assert_converged, connect, generate, shutdown, spawn_devices, wait_event,
    wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);
/// Attempts before a transfer is given up.
const ATTEMPTS: u32 = 2;
/// Give-ups to see before the cause is fixed: the supervisor's poll for
/// commits made by other processes replans at most once (the first time it
/// sees the library with a peer connected), so a third give-up can only
/// come from the slow timer.
const GIVE_UPS: usize = 3;

fn configure(c: &mut EngineConfig) {
    // A peer holding nothing gets a snapshot, which the sender must export.
    c.thresholds.snapshot_from = 500;
    c.thresholds.bulk_from = 500;
    c.max_attempts = ATTEMPTS;
    c.backoff_base = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(20);
    c.retry_after_giving_up = Duration::from_millis(800);
}

/// Makes `device`'s snapshot exports fail (or work again): its snapshot
/// directory becomes a file (or a directory again).
fn block_snapshots(device: &Device, blocked: bool) {
    let dir = device.store().snapshots_dir().to_path_buf();
    if blocked {
        std::fs::remove_dir_all(&dir).expect("remove snapshots dir");
        std::fs::write(&dir, b"not a directory").expect("block snapshots dir");
    } else {
        std::fs::remove_file(&dir).expect("unblock snapshots dir");
        std::fs::create_dir(&dir).expect("snapshots dir");
    }
}

fn is_give_up(e: &SyncEvent) -> bool {
    matches!(
        e,
        SyncEvent::TransferFailed {
            direction: Direction::Send,
            will_retry: false,
            ..
        }
    )
}

/// Fails if anything but the slow timer could have replanned: a commit or
/// a session that ended or began.
fn assert_no_replanning_event(seen: &[SyncEvent]) {
    for e in seen {
        assert!(
            !matches!(
                e,
                SyncEvent::LocalCommitted { .. }
                    | SyncEvent::PeerConnected { .. }
                    | SyncEvent::PeerDisconnected { .. }
            ),
            "{e:?}: the transfer was replanned by something else than the timer"
        );
    }
}

// Regression: after its last attempt a transfer waited for the next
// commit, which an idle owner never makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_up_transfer_is_tried_again_with_no_commit_and_no_reconnect() {
    let devices = spawn_devices(2, configure).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, 1_000, 5).await;
    block_snapshots(a, true);
    let mut events = a.engine.subscribe();
    connect(b, a).await;
    wait_event(&mut events, WAIT, |e| {
        matches!(e, SyncEvent::PeerConnected { .. })
    })
    .await;

    for _ in 0..GIVE_UPS {
        let seen = wait_event(&mut events, WAIT, is_give_up).await;
        assert_no_replanning_event(&seen);
    }
    let peers = a.engine.peers().await.expect("peers");
    let [peer] = peers.as_slice() else {
        panic!("one session expected: {peers:?}");
    };
    match &peer.transfer {
        TransferStatus::GaveUp {
            attempts, cause, ..
        } => {
            assert_eq!(*attempts, ATTEMPTS);
            assert!(cause.contains("Not a directory"), "{cause}");
        }
        // The timer may already have started the next round.
        TransferStatus::Sending { .. } | TransferStatus::Retrying { .. } => {}
        TransferStatus::Idle => panic!("a given-up transfer shows as idle"),
    }

    // The cause goes away; nobody commits or reconnects.
    block_snapshots(a, false);
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
    assert_no_replanning_event(&seen);
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    assert_converged(a, b).await;
    let peers = a.engine.peers().await.expect("peers");
    assert_eq!(peers[0].transfer, TransferStatus::Idle);
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_given_up_transfer_until_it_is_tried_again() {
    let devices = spawn_devices(2, |c| {
        configure(c);
        c.retry_after_giving_up = Duration::from_secs(600);
    })
    .await;
    let (a, b) = (&devices[0], &devices[1]);
    generate(a, 1_000, 6).await;
    block_snapshots(a, true);
    let mut events = a.engine.subscribe();
    connect(b, a).await;
    wait_event(&mut events, WAIT, is_give_up).await;
    let before = chrono::Utc::now();
    // The supervisor's first poll may replan once; then it stays given up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (attempts, cause, retry_at) = loop {
        let peers = a.engine.peers().await.expect("peers");
        if let Some(TransferStatus::GaveUp {
            attempts,
            cause,
            retry_at,
        }) = peers.first().map(|p| p.transfer.clone())
        {
            break (attempts, cause, retry_at);
        }
        assert!(tokio::time::Instant::now() < deadline, "{peers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(attempts, ATTEMPTS);
    assert!(cause.contains("Not a directory"), "{cause}");
    assert!(
        retry_at > before + chrono::Duration::seconds(500),
        "retry at {retry_at}, not about 600 s after {before}"
    );
    shutdown(&devices).await;
}
