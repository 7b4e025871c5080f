//! `lsync bench-node`: one process of the benchmark. The sender serves its
//! generated location, the receiver dials it and reports every commit, the
//! floor runs the codec and the storage apply with no network. Each prints
//! JSON lines with wall-clock timestamps on stdout and obeys `stats` and
//! `live K` lines (or the end of input) on stdin.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sync_actors::{Direction, EngineConfig, SyncEngine, SyncEvent};
use sync_core::{BatchLimits, DeviceId, Record, Seq, Thresholds, decode_records, encode_records};
use sync_storage::{LocalChange, Store};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast::error::RecvError;

use super::{Case, NodeArgs, Role};

/// Records per page read by the floor (the engine's default batch size).
const FLOOR_BATCH: usize = 10_000;

/// Microseconds since the Unix epoch (comparable across processes on one machine).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A field of `/proc/self/status` in KiB, 0 if unknown.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// This process's peak resident set size in KiB (`VmHWM`), 0 if unknown.
pub fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:")
}

/// CPU time (user + system) of all this process's threads so far, seconds
/// (`/proc/self/stat`, in USER_HZ = 100 ticks per second on Linux).
pub fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces): state is
            // field 3, utime field 14, stime field 15.
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = f.get(11)?.parse().ok()?;
            let stime: u64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Highest anonymous RSS (`RssAnon`: heap and stacks, not mapped file
/// pages) sampled so far, KiB.
static PEAK_ANON_KB: AtomicU64 = AtomicU64::new(0);

/// Samples `RssAnon` every 10 ms into [`PEAK_ANON_KB`] (the kernel keeps no
/// peak of it; `VmHWM` also counts the SQLite file pages read through mmap).
fn sample_anon() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            PEAK_ANON_KB.fetch_max(status_kb("RssAnon:"), Ordering::Relaxed);
        }
    });
}

/// Peak anonymous RSS sampled so far (including now), KiB.
fn peak_anon_kb() -> u64 {
    PEAK_ANON_KB.fetch_max(status_kb("RssAnon:"), Ordering::Relaxed);
    PEAK_ANON_KB.load(Ordering::Relaxed)
}

/// Prints one JSON line on stdout, stamped with `t_us`.
fn emit(mut v: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert("t_us".into(), json!(now_us()));
    }
    println!("{v}");
}

/// The engine configuration that forces a case's strategy.
pub fn case_config(data: &Path, case: Case) -> EngineConfig {
    let mut config = EngineConfig::new(data);
    let base = Thresholds::default();
    config.thresholds = match case {
        // Never bulk, never snapshot: every pending record is pushed.
        Case::Batch => Thresholds {
            bulk_from: u64::MAX,
            snapshot_from: u64::MAX,
            ..base
        },
        // Anything above the individual threshold is announced and pulled.
        Case::Bulk => Thresholds {
            bulk_from: base.individual_below,
            snapshot_from: u64::MAX,
            ..base
        },
        // A fresh peer always gets a snapshot.
        Case::Snapshot => Thresholds {
            snapshot_from: 1,
            ..base
        },
        Case::Live | Case::Floor => base,
    };
    config
}

/// Runs one benchmark process.
pub async fn run(data: &Path, args: NodeArgs) -> anyhow::Result<()> {
    sample_anon();
    match args.role {
        Role::Send => send(data, args.case).await,
        Role::Recv => {
            let addr = args.connect.context("--connect is required")?;
            let owner: DeviceId = args
                .owner
                .context("--owner is required")?
                .parse()
                .map_err(|e| anyhow::anyhow!("bad --owner: {e}"))?;
            let target = Seq(args.target.context("--target is required")?);
            recv(data, args.case, &addr, owner, target).await
        }
        Role::Floor => {
            let out = args.out.context("--out is required")?;
            floor(data, &out).await
        }
    }
}

/// Prints the sync events worth a line: strategies, failures, commits.
fn print_event(e: &SyncEvent) {
    match e {
        SyncEvent::TransferStarted {
            strategy,
            direction,
            total,
            ..
        } => emit(json!({
            "ev": "transfer_started",
            "strategy": strategy.as_str(),
            "direction": if *direction == Direction::Send { "send" } else { "recv" },
            "total": total,
        })),
        SyncEvent::TransferFailed {
            cause, will_retry, ..
        } => emit(json!({"ev": "transfer_failed", "cause": cause, "will_retry": will_retry})),
        SyncEvent::PeerDisconnected { cause, .. } => {
            emit(json!({"ev": "disconnected", "cause": cause}))
        }
        _ => {}
    }
}

/// Frame bytes this engine wrote to all its peers.
async fn bytes_sent(engine: &SyncEngine) -> u64 {
    engine
        .peers()
        .await
        .map(|p| p.iter().map(|p| p.bytes_sent).sum())
        .unwrap_or(0)
}

/// Stdin commands, one per line; `None` at end of input.
type Commands = tokio::io::Lines<BufReader<tokio::io::Stdin>>;

fn commands() -> Commands {
    BufReader::new(tokio::io::stdin()).lines()
}

/// The sender: serves its library on loopback and obeys commands.
async fn send(data: &Path, case: Case) -> anyhow::Result<()> {
    let engine = SyncEngine::start(case_config(data, case)).await?;
    let me = engine.device().device_id;
    let store = engine.store();
    let max_seq = store.local_watermark().await?.seq;
    let watcher = {
        let mut rx = engine.subscribe();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => print_event(&e),
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                }
            }
        })
    };
    let addr = engine.listen("127.0.0.1:0").await?;
    emit(json!({"ev": "ready", "addr": addr.to_string(), "max_seq": max_seq.0}));
    let mut input = commands();
    while let Some(line) = input.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["stats"] => emit(json!({
                "ev": "stats",
                "bytes_sent": bytes_sent(&engine).await,
                "vmhwm_kb": peak_rss_kb(),
                "anon_kb": peak_anon_kb(),
                "cpu_s": cpu_seconds(),
            })),
            ["live", k] => {
                let k: usize = k.parse().context("bad live count")?;
                live(&engine, me, k).await?;
            }
            _ => bail!("unknown command {line:?}"),
        }
    }
    engine.shutdown().await?;
    watcher.abort();
    emit(json!({"ev": "exit", "vmhwm_kb": peak_rss_kb(), "anon_kb": peak_anon_kb()}));
    Ok(())
}

/// Commits `k` single-entry changes one by one (each awaited), printing the
/// time each commit returned, once the peer has said what it holds.
async fn live(engine: &SyncEngine, me: DeviceId, k: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let peers = engine.peers().await?;
        if peers.iter().any(|p| p.holds_of_me.is_some()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("no peer connected for the live case");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let entries: Vec<_> = engine
        .store()
        .records_after(me, Seq::ZERO, k + 1)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            Record::Entry(e) => Some(e),
            Record::Location(_) => None,
        })
        .collect();
    if entries.is_empty() {
        bail!("no entries to change");
    }
    for i in 0..k {
        let mut e = entries[i % entries.len()].clone();
        e.name = format!("{}~{i}", e.name);
        e.size += 1;
        let started = now_us();
        let range = engine.commit(vec![LocalChange::Entry(e)]).await?;
        emit(json!({"ev": "committed", "seq": range.last.0, "started_us": started}));
    }
    emit(json!({"ev": "live_done"}));
    Ok(())
}

/// The receiver: dials the sender, prints every commit of its records, says
/// `done` once it holds `target`, then obeys commands.
async fn recv(
    data: &Path,
    case: Case,
    addr: &str,
    owner: DeviceId,
    target: Seq,
) -> anyhow::Result<()> {
    let engine = SyncEngine::start(case_config(data, case)).await?;
    let store = engine.store();
    let mut rx = engine.subscribe();
    let start = now_us();
    engine.connect(addr).await?;
    emit(json!({"ev": "connected", "start_us": start}));
    let mut done = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !done {
        tokio::select! {
            e = rx.recv() => match e {
                Ok(e) => {
                    print_event(&e);
                    let reached = match &e {
                        SyncEvent::Applied { owner: o, records, watermark } if *o == owner => {
                            emit(json!({"ev": "applied", "seq": watermark.seq.0, "records": records}));
                            Some(watermark.seq)
                        }
                        SyncEvent::SnapshotImported { owner: o, entries, watermark, .. } if *o == owner => {
                            emit(json!({"ev": "imported", "seq": watermark.seq.0, "entries": entries}));
                            Some(watermark.seq)
                        }
                        _ => None,
                    };
                    if reached.is_some_and(|s| s >= target) {
                        done = true;
                    }
                }
                Err(RecvError::Lagged(n)) => emit(json!({"ev": "lagged", "missed": n})),
                Err(RecvError::Closed) => bail!("the engine stopped"),
            },
            _ = tick.tick() => {
                // Fallback for a lagged observer: the store's watermark.
                if let Some(w) = store.watermark(owner).await?
                    && w.seq >= target
                {
                    emit(json!({"ev": "applied", "seq": w.seq.0, "records": 0, "polled": true}));
                    done = true;
                }
            }
        }
    }
    emit(json!({"ev": "done"}));
    let mut input = commands();
    while let Some(line) = input.next_line().await? {
        match line.trim() {
            "stats" => emit(json!({
                "ev": "stats",
                "bytes_sent": bytes_sent(&engine).await,
                "vmhwm_kb": peak_rss_kb(),
                "anon_kb": peak_anon_kb(),
                "cpu_s": cpu_seconds(),
            })),
            _ => bail!("unknown command {line:?}"),
        }
    }
    engine.shutdown().await?;
    emit(json!({"ev": "exit", "vmhwm_kb": peak_rss_kb(), "anon_kb": peak_anon_kb()}));
    Ok(())
}

/// The floor: the sender's records, page by page (reads not timed), through
/// `encode_records` (columnar + lz4), `decode_records` (lz4 + columnar) and
/// `Store::apply_batch` (multi-row upserts, one transaction per page) into a
/// fresh library in `out`. No engine, no network, one process.
async fn floor(data: &Path, out: &Path) -> anyhow::Result<()> {
    let source = Store::open(&EngineConfig::new(data).db_path()).await?;
    let owner = source
        .device()
        .await?
        .context("the sender holds no device")?
        .device_id;
    let index_id = source.local_watermark().await?.index_id;
    let target = Store::open(&out.join("library.db")).await?;
    let limits = BatchLimits::default();
    let (mut read, mut encode, mut decode, mut apply) = (0f64, 0f64, 0f64, 0f64);
    let (mut bytes, mut records) = (0u64, 0u64);
    let mut after = Seq::ZERO;
    loop {
        let r0 = Instant::now();
        let page = source.records_after(owner, after, FLOOR_BATCH).await?;
        read += r0.elapsed().as_secs_f64();
        let Some(last) = page.last().map(Record::seq) else {
            break;
        };
        let t0 = Instant::now();
        let payload = encode_records(&page);
        let t1 = Instant::now();
        drop(page);
        let decoded = decode_records(&payload, &limits)?;
        let t2 = Instant::now();
        records += decoded.len() as u64;
        bytes += payload.len() as u64;
        target
            .apply_batch(owner, index_id, after, last, decoded)
            .await?;
        let t3 = Instant::now();
        encode += (t1 - t0).as_secs_f64();
        decode += (t2 - t1).as_secs_f64();
        apply += (t3 - t2).as_secs_f64();
        after = last;
    }
    target.close().await;
    source.close().await;
    emit(json!({
        "ev": "floor",
        "seconds": encode + decode + apply,
        "read_seconds": read,
        "encode_seconds": encode,
        "decode_seconds": decode,
        "apply_seconds": apply,
        "records": records,
        "bytes": bytes,
        "vmhwm_kb": peak_rss_kb(),
        "anon_kb": peak_anon_kb(),
        "cpu_s": cpu_seconds(),
    }));
    Ok(())
}
