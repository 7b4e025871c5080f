//! Load: one device (a real `lsync serve` process) serves 8 peers at once
//! while it keeps indexing a real folder that keeps changing (rescans every
//! half second; files added and a folder removed between rescans). All 8
//! peers converge on the sender's library record by record, and the
//! sender's peak resident memory stays bounded.
//!
//! `cargo test -p sync-tests load -- --nocapture` prints the figures;
//! `LOAD_ROUNDS=40` runs ten times longer.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{SeedableRng, rngs::StdRng};
use sync_actors::EngineConfig;
use sync_core::{DeviceId, Seq};
use sync_storage::Store;

use crate::chaos::{RecordCheck, compare_records};
use crate::crash::{Proc, free_addr, init_devices, make_folder, spawn, wait_listening};
use crate::harness::assert_same_state;

const PEERS: usize = 8;
/// A generous ceiling on the sender's peak RSS: far above what it needs
/// (see RELIABILITY.md), low enough to catch per-peer buffering of whole
/// transfers.
const RSS_CEILING_KB: u64 = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(300);

/// Paths under `root`, `root` included (what an index of it holds).
fn count_paths(root: &Path) -> u64 {
    let mut n = 1;
    for e in std::fs::read_dir(root).expect("read_dir") {
        let e = e.expect("dir entry");
        n += if e.file_type().expect("file type").is_dir() {
            count_paths(&e.path())
        } else {
            1
        };
    }
    n
}

/// A `/proc/<pid>/status` field in kB.
fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn indexed_runs(p: &Proc) -> usize {
    p.log().matches("folder indexed").count()
}

#[test]
fn one_device_serves_eight_peers_while_it_keeps_indexing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut made = init_devices(tmp.path(), PEERS + 1);
    let peers: Vec<PathBuf> = made.split_off(1).into_iter().map(|(d, _)| d).collect();
    let (a, a_id) = made.pop().expect("the serving device");

    let mut rng = StdRng::seed_from_u64(8);
    let folder = tmp.path().join("folder");
    make_folder(&folder, 30_000, &mut rng);
    let addr = free_addr();
    let serve_args: Vec<String> = [
        "serve",
        "--listen",
        &addr,
        "--index",
        &folder.display().to_string(),
        "--rescan",
        "0.5",
        "--batch-size",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let mut sender = spawn(&a, &serve_args, None, &tmp.path().join("a.log"));
    wait_listening(&addr, &mut sender);
    let pid = sender.child.id();
    let connect: Vec<String> = ["connect", &addr, "--until-synced", "--json"]
        .map(String::from)
        .to_vec();
    let log = |i: usize, n: usize| tmp.path().join(format!("peer-{i}-{n}.log"));
    let mut receivers: Vec<Proc> = (0..PEERS)
        .map(|i| spawn(&peers[i], &connect, None, &log(i, 0)))
        .collect();
    let mut sessions = PEERS as u64;
    let mut peak_rss = 0u64;
    // Keep every peer connected (a `connect --until-synced` that caught up
    // with the library as it was is started again) while the folder changes.
    let tend = |receivers: &mut Vec<Proc>, sessions: &mut u64, peak: &mut u64| {
        *peak = (*peak).max(proc_kb(pid, "VmRSS:"));
        for (i, r) in receivers.iter_mut().enumerate() {
            if let Some(status) = r.exited() {
                assert!(status.success(), "peer {i} failed: {}", r.log());
                *r = spawn(&peers[i], &connect, None, &log(i, *sessions as usize));
                *sessions += 1;
            }
        }
    };
    // `LOAD_ROUNDS` runs longer (peak memory should not grow with it).
    let rounds = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4u32);
    for round in 0..rounds {
        let until = Instant::now() + Duration::from_millis(700);
        while Instant::now() < until {
            tend(&mut receivers, &mut sessions, &mut peak_rss);
            std::thread::sleep(Duration::from_millis(25));
        }
        make_folder(&folder.join(format!("round{round}")), 2_000, &mut rng);
        if round >= 2 {
            // Deletes too: an earlier round's folder goes.
            std::fs::remove_dir_all(folder.join(format!("round{}", round - 2)))
                .expect("remove a round");
        }
    }
    // An index run that started after the last change, then one last sync
    // of every peer.
    let runs = indexed_runs(&sender);
    let deadline = Instant::now() + TIMEOUT;
    while indexed_runs(&sender) < runs + 2 {
        assert!(Instant::now() < deadline, "no rescan after the last change");
        tend(&mut receivers, &mut sessions, &mut peak_rss);
        std::thread::sleep(Duration::from_millis(25));
    }
    for (i, r) in receivers.iter_mut().enumerate() {
        while r.exited().is_none() {
            assert!(Instant::now() < deadline, "peer {i} never synced");
            peak_rss = peak_rss.max(proc_kb(pid, "VmRSS:"));
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    let finals: Vec<Proc> = (0..PEERS)
        .map(|i| spawn(&peers[i], &connect, None, &log(i, 999)))
        .collect();
    for (i, mut f) in finals.into_iter().enumerate() {
        let status = f.child.wait().expect("wait");
        assert!(status.success(), "peer {i}: final sync failed: {}", f.log());
    }
    let peak_hwm = proc_kb(pid, "VmHWM:").max(peak_rss);
    drop(sender);

    let want = count_paths(&folder);
    let check = compare_all(&a, &peers, a_id, want);
    eprintln!(
        "load: peers={PEERS} rounds={rounds} sessions={} entries={want} records_compared={} lost={} \
         duplicated={} older={} differing={} sender_peak_rss_kb={peak_hwm}",
        sessions + PEERS as u64,
        check.compared,
        check.lost,
        check.duplicated,
        check.older,
        check.differing,
    );
    assert!(check.clean(), "{check:?}");
    assert!(
        peak_hwm < RSS_CEILING_KB,
        "sender peak RSS {peak_hwm} kB above {RSS_CEILING_KB} kB"
    );
}

/// Compares every peer's copy of `owner` with the sender's, record by record.
fn compare_all(a: &Path, peers: &[PathBuf], owner: DeviceId, want_entries: u64) -> RecordCheck {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let open = |d: &Path| {
            let path = EngineConfig::new(d).db_path();
            async move { Store::open(&path).await.expect("open store") }
        };
        let sender = open(a).await;
        let summary = sender.summary(owner).await.expect("summary");
        assert_eq!(summary.entries, want_entries, "the folder is fully indexed");
        let records = sender
            .records_after(owner, Seq::ZERO, usize::MAX)
            .await
            .expect("records");
        let mut total = RecordCheck::default();
        for (i, p) in peers.iter().enumerate() {
            let store = open(p).await;
            let got = store.summary(owner).await.expect("summary");
            eprintln!("load: checking peer {i}");
            assert_same_state(&summary, &got);
            let held = store
                .records_after(owner, Seq::ZERO, usize::MAX)
                .await
                .expect("records");
            total.add(compare_records(&records, &held));
            store.close().await;
        }
        sender.close().await;
        total
    })
}
