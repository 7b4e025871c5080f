//! A receiver whose disk fills up mid-transfer: the apply fails with a typed
//! "no space left" error, the library keeps whole batches only, and the
//! transfer resumes by itself once space returns.

use std::time::{Duration, Instant};

use sync_actors::{EngineConfig, SyncEvent};
use sync_core::{DeviceId, Fingerprint, Seq};
use sync_storage::Store;
use sync_storage::testing::SmallDisk;

use crate::harness::{
    assert_converged, connect, generate, shutdown, spawn_devices_at, wait_event, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(180);
/// Records per batch (the default): every watermark B commits is a multiple.
const BATCH: u64 = 10_000;
/// A's records: pushed batches (under the 100K bulk threshold).
const ENTRIES: u64 = 60_000;
/// Room left on B's disk once its library exists: two batches of these
/// synthetic entries (~3 MiB of WAL each, measured on tmpfs with 16 KiB pages).
const ROOM_KIB: u64 = 6_144;
/// Sessions refused for lack of space before space returns: more than the
/// supervisor's `max_attempts` (8), so giving up would show.
const REFUSALS: usize = 10;
/// B's disk once space returns.
const GROWN_KIB: u64 = 256 * 1024;

/// The fingerprint and live entry count of `owner`'s records with `seq <= last`, as `store` holds them.
async fn prefix_of(store: &Store, owner: DeviceId, last: Seq) -> (Fingerprint, u64) {
    let mut fp = Fingerprint::default();
    let mut entries = 0;
    let mut cursor = Seq::ZERO;
    while cursor < last {
        let page = store
            .records_after(owner, cursor, 10_000)
            .await
            .expect("records");
        let Some(l) = page.last() else { break };
        cursor = l.seq();
        for r in page.iter().filter(|r| r.seq() <= last) {
            fp.add(&r.id_bytes(), r.seq(), r.deleted());
            entries += u64::from(matches!(r, sync_core::Record::Entry(e) if !e.deleted));
        }
    }
    (fp, entries)
}

/// Waits until B closes a session because its disk is full; returns the cause.
async fn refused_for_space(events: &mut tokio::sync::broadcast::Receiver<SyncEvent>) -> String {
    let seen = wait_event(events, WAIT, |e| {
        matches!(e, SyncEvent::PeerDisconnected { cause: Some(c), .. }
            if c.contains("no space left on the disk holding"))
    })
    .await;
    match seen.last() {
        Some(SyncEvent::PeerDisconnected {
            cause: Some(cause), ..
        }) => cause.clone(),
        other => unreachable!("{other:?}"),
    }
}

/// Asserts B holds whole batches of A only: its watermark is a batch boundary
/// (below `stopped_before`, when given), and its rows are exactly A's
/// records up to it (read in one transaction). Returns the watermark seq.
async fn assert_whole_batches(
    a: &crate::harness::Device,
    b: &crate::harness::Device,
    stopped_before: Option<Seq>,
) -> Seq {
    let held = b.store().summary(a.id).await.expect("summary");
    if let Some(end) = stopped_before {
        assert!(held.seq < end, "the transfer did not stop: {held:?}");
    }
    assert_eq!(
        held.seq.0 % BATCH,
        0,
        "watermark {} is not a batch boundary",
        held.seq
    );
    let (fp, entries) = prefix_of(&a.store(), a.id, held.seq).await;
    assert_eq!(held.fingerprint, fp, "B holds part of a batch");
    assert_eq!(held.entries, entries);
    held.seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_disk_fills_mid_transfer_then_resumes_when_space_returns() {
    let root = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(GROWN_KIB);
    let b_dir = match &disk {
        Some(d) => d.path().join("device-1"),
        None => {
            eprintln!("cannot mount a tmpfs (not root?): falling back to PRAGMA max_page_count");
            root.path().join("device-1")
        }
    };
    // Backoff capped low, so ten refused sessions take seconds, not minutes.
    let configure = |c: &mut EngineConfig| c.backoff_max = Duration::from_millis(400);
    let devices = spawn_devices_at(&[root.path().join("device-0"), b_dir], configure).await;
    let (a, b) = (&devices[0], &devices[1]);
    let range = generate(a, ENTRIES, 11).await;

    // B's disk fills up a couple of batches into the transfer.
    match &disk {
        Some(d) => d.resize(d.used_kib() + ROOM_KIB),
        None => b
            .store()
            .cap_pages_for_tests(Some((ROOM_KIB / 16) as u32))
            .await
            .expect("cap pages"),
    }
    let mut events = b.engine.subscribe();
    let started = Instant::now();
    connect(b, a).await;
    let cause = refused_for_space(&mut events).await;
    assert!(cause.contains("library.db"), "{cause}");
    assert!(cause.contains("free some space"), "{cause}");
    // The page cap lasts only until the writer connection is reopened, which
    // the failure does: without a mount the transfer may go on at once.
    let stopped_before = disk.as_ref().map(|_| range.last);
    let held = assert_whole_batches(a, b, stopped_before).await;
    eprintln!(
        "disk full after {:?}, B holds seq {} of {}",
        started.elapsed(),
        held,
        range.last
    );

    // The dialer keeps reconnecting while the disk is full; every session is
    // refused the same way and the library stays put.
    // Regression (found here): each refused session reset the redial
    // backoff, so B redialed every ~170 ms for as long as the disk stayed
    // full. Now the gaps grow: before the last refusal B waited at least
    // backoff(REFUSALS - 1).
    if disk.is_some() {
        let mut last = Instant::now();
        let mut gap = Duration::ZERO;
        for _ in 1..REFUSALS {
            refused_for_space(&mut events).await;
            gap = last.elapsed();
            last = Instant::now();
        }
        let mut config = EngineConfig::new(&b.dir);
        configure(&mut config);
        let floor = config.backoff(REFUSALS as u32 - 1);
        assert!(gap >= floor, "redial did not back off: {gap:?} < {floor:?}");
        assert_eq!(assert_whole_batches(a, b, stopped_before).await, held);
    }

    // Space returns: the transfer resumes with nobody asking and converges.
    let grown = Instant::now();
    match &disk {
        Some(d) => d.resize(GROWN_KIB),
        None => b
            .store()
            .cap_pages_for_tests(None)
            .await
            .expect("uncap pages"),
    }
    wait_for_watermark(b, a.id, range.last, WAIT).await;
    eprintln!("converged {:?} after space returned", grown.elapsed());
    assert_converged(a, b).await;
    shutdown(&devices).await;
}
