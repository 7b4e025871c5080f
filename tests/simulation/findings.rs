//! Regression tests for what the simulation found that was not already
//! known (issue 13).

use std::time::Duration;

use sync_core::Seq;
use sync_net::fault::{FaultPlan, memory_pair_with_faults};

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
            assert!(
                !a.engine.synced_with(b.id).await.unwrap(),
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
