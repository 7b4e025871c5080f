//! `lsync bench`: sender and receiver as two OS processes (two data
//! directories, TLS 1.3 over loopback) on a generated realistic location,
//! one pair per case (`batch`, `bulk`, `snapshot`, `live`), measured against
//! the `floor` (codec and storage apply in one process, no network) of the
//! same run. `--sweep` runs several sizes and writes `bench.svg` and
//! `bench.md`.

pub mod node;
mod plot;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{Value, json};
use sync_actors::{EngineConfig, init_device};
use sync_core::{DeviceId, Seq};
use sync_net::TrustStore;
use sync_storage::Store;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::cli::BenchArgs;
use crate::generate::generate_into;

/// Single changes committed one by one in the `live` case.
const LIVE_CHANGES: usize = 1_000;

/// Longest any one case may take before the bench gives up.
const CASE_TIMEOUT: Duration = Duration::from_secs(1_800);

/// A benchmark process's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Serves its location.
    Send,
    /// Dials the sender and receives.
    Recv,
    /// Codec and storage apply in one process, no network.
    Floor,
}

/// A benchmark case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Case {
    /// Pushed batches.
    Batch,
    /// Bulk notice, then pulled batches.
    Bulk,
    /// Snapshot export, transfer, import (and tail) to a new device.
    Snapshot,
    /// Single changes committed one by one; latency.
    Live,
    /// No network: encode, compress, decompress, decode, upsert.
    Floor,
}

impl Case {
    /// Lowercase name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Case::Batch => "batch",
            Case::Bulk => "bulk",
            Case::Snapshot => "snapshot",
            Case::Live => "live",
            Case::Floor => "floor",
        }
    }
}

/// Arguments of the hidden `lsync bench-node` (one benchmark process).
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Role of this process.
    #[arg(long, value_enum)]
    pub role: Role,
    /// The case (chooses the engine's thresholds).
    #[arg(long, value_enum)]
    pub case: Case,
    /// Receiver: the sender's address.
    #[arg(long)]
    pub connect: Option<String>,
    /// Receiver: the sender's device id.
    #[arg(long)]
    pub owner: Option<String>,
    /// Receiver: done once it holds the owner's records up to this seq.
    #[arg(long)]
    pub target: Option<u64>,
    /// Floor: directory of the fresh library.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// Case name.
    pub case: &'static str,
    /// Strategy the sender's supervisor chose (checked against the case).
    pub strategy: String,
    /// Measured span, seconds.
    pub seconds: f64,
    /// Entries (or live changes) per second.
    pub entries_per_second: f64,
    /// Frame bytes written by both processes (floor: compressed payloads).
    pub wire_bytes: u64,
    /// `wire_bytes` per entry (or live change).
    pub bytes_per_entry: f64,
    /// Peak RSS of the sender process, MB (floor: its one process).
    pub sender_peak_rss_mb: f64,
    /// Peak RSS of the receiver process, MB (floor: its one process).
    pub receiver_peak_rss_mb: f64,
    /// Peak anonymous RSS of the sender (heap, no mapped file pages), MB, sampled every 10 ms.
    pub sender_peak_anon_mb: f64,
    /// Peak anonymous RSS of the receiver, MB, sampled every 10 ms.
    pub receiver_peak_anon_mb: f64,
    /// CPU seconds the sender process used (start to end of the case).
    pub sender_cpu_seconds: f64,
    /// CPU seconds the receiver process used.
    pub receiver_cpu_seconds: f64,
    /// `seconds / floor_seconds` (none for `live`).
    pub ratio_to_floor: Option<f64>,
    /// Live: median commit-to-apply latency, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    /// Live: 99th percentile commit-to-apply latency, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// One run of every case at one size.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Entries in the generated location.
    pub entries: u64,
    /// The floor's seconds.
    pub floor_seconds: f64,
    /// The floor's stages, seconds: encode (+lz4), decode (+lz4), apply.
    pub floor_stages: [f64; 3],
    /// Reading the records from the sender's library (`Store::records_after`),
    /// seconds: not part of the floor, shown for comparison.
    pub floor_read_seconds: f64,
    /// Every case, floor first.
    pub cases: Vec<CaseResult>,
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.entries < 1_000 {
        bail!("--entries must be at least 1000 (the live case changes 1,000 entries)");
    }
    let sizes: Vec<u64> = if args.sweep {
        let mut s = vec![10_000, 100_000, args.entries];
        s.sort_unstable();
        s.dedup();
        s
    } else {
        vec![args.entries]
    };
    let mut reports = Vec::new();
    for n in sizes {
        if !args.json {
            eprintln!("bench: {n} entries");
        }
        let report = bench_once(n, args.json).await?;
        if !args.json {
            print_table(&report);
        }
        reports.push(report);
    }
    if args.sweep {
        plot::write_svg(Path::new("bench.svg"), &reports)?;
        std::fs::write("bench.md", plot::markdown(&reports)).context("cannot write bench.md")?;
        if !args.json {
            eprintln!("wrote bench.svg and bench.md");
        }
    }
    if args.json {
        if args.sweep {
            let runs: Vec<Value> = reports.iter().map(report_json).collect();
            println!("{}", json!({ "runs": runs }));
        } else if let Some(r) = reports.first() {
            println!("{}", report_json(r));
        }
    }
    Ok(())
}

/// The report as the documented JSON object.
fn report_json(r: &Report) -> Value {
    json!({
        "entries": r.entries,
        "floor_seconds": r.floor_seconds,
        "floor_stages": {"encode": r.floor_stages[0], "decode": r.floor_stages[1], "apply": r.floor_stages[2], "read_not_counted": r.floor_read_seconds},
        "cases": r.cases,
    })
}

/// Prints a readable table of one report.
fn print_table(r: &Report) {
    println!();
    println!(
        "{} entries; floor {:.2}s (encode {:.2}s, decode {:.2}s, apply {:.2}s; reading the rows, not counted: {:.2}s)",
        r.entries,
        r.floor_seconds,
        r.floor_stages[0],
        r.floor_stages[1],
        r.floor_stages[2],
        r.floor_read_seconds
    );
    println!(
        "{:<9} {:<17} {:>8} {:>11} {:>12} {:>8} {:>13} {:>13} {:>8} {:>8} {:>8}",
        "case",
        "strategy",
        "seconds",
        "entries/s",
        "wire bytes",
        "B/entry",
        "send MB(anon)",
        "recv MB(anon)",
        "x floor",
        "p50 ms",
        "p99 ms"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for c in &r.cases {
        println!(
            "{:<9} {:<17} {:>8.2} {:>11.0} {:>12} {:>8.1} {:>13} {:>13} {:>8} {:>8} {:>8}",
            c.case,
            c.strategy,
            c.seconds,
            c.entries_per_second,
            c.wire_bytes,
            c.bytes_per_entry,
            format!("{:.0} ({:.0})", c.sender_peak_rss_mb, c.sender_peak_anon_mb),
            format!(
                "{:.0} ({:.0})",
                c.receiver_peak_rss_mb, c.receiver_peak_anon_mb
            ),
            opt(c.ratio_to_floor, 2),
            opt(c.p50_ms, 2),
            opt(c.p99_ms, 2),
        );
    }
}

/// Copies a data directory (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// What the prepared sender holds.
struct Prepared {
    owner: DeviceId,
    max_seq: Seq,
}

/// Creates both devices in `root` (same library, trusting each other),
/// generates `n` entries on the sender, and makes a receiver that already
/// holds the location record (for `bulk`). Not timed.
async fn prepare(root: &Path, n: u64, quiet: bool) -> anyhow::Result<Prepared> {
    let (send, recv) = (root.join("send-base"), root.join("recv-base"));
    let (a, fp_a) = init_device(&send, "bench-sender", None).await?;
    let (b, fp_b) = init_device(&recv, "bench-receiver", Some(a.library_id)).await?;
    TrustStore::load(&EngineConfig::new(&send).trust_path(), a.device_id)?
        .trust(fp_b, b.device_id)?;
    TrustStore::load(&EngineConfig::new(&recv).trust_path(), b.device_id)?
        .trust(fp_a, a.device_id)?;
    let store = Store::open(&EngineConfig::new(&send).db_path()).await?;
    let started = Instant::now();
    generate_into(&store, a.device_id, n, 1, quiet).await?;
    let local = store.local_watermark().await?;
    let location = store.records_after(a.device_id, Seq::ZERO, 1).await?;
    store.close().await;
    if !quiet {
        eprintln!(
            "  generated {n} entries in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    // The bulk receiver: not a fresh device, it holds the location record.
    let bulk = root.join("recv-bulk");
    copy_dir(&recv, &bulk)?;
    let store = Store::open(&EngineConfig::new(&bulk).db_path()).await?;
    let last = location.first().map(|r| r.seq()).context("no location")?;
    store
        .apply_batch(a.device_id, local.index_id, Seq::ZERO, last, location)
        .await?;
    store.close().await;
    Ok(Prepared {
        owner: a.device_id,
        max_seq: local.seq,
    })
}

/// Runs every case at `n` entries.
async fn bench_once(n: u64, quiet: bool) -> anyhow::Result<Report> {
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let root = tmp.path();
    let prep = prepare(root, n, quiet).await?;
    let send_base = root.join("send-base");

    let floor = run_floor(&send_base, &root.join("floor")).await?;
    let floor_seconds = floor.seconds;
    if !quiet {
        eprintln!("  floor    {:.2}s", floor.seconds);
    }
    let mut cases = vec![floor.result(n)];

    for case in [Case::Batch, Case::Bulk, Case::Snapshot, Case::Live] {
        let (send, recv) = match case {
            // Live runs on the pair the batch case left in sync.
            Case::Live => (root.join("send-batch"), root.join("recv-batch")),
            Case::Bulk => {
                let send = root.join("send-bulk");
                copy_dir(&send_base, &send)?;
                (send, root.join("recv-bulk"))
            }
            _ => {
                let (send, recv) = (
                    root.join(format!("send-{}", case.as_str())),
                    root.join(format!("recv-{}", case.as_str())),
                );
                copy_dir(&send_base, &send)?;
                copy_dir(&root.join("recv-base"), &recv)?;
                (send, recv)
            }
        };
        if std::env::var_os("LSYNC_BENCH_TRACE").is_some() {
            for d in [&send, &recv] {
                let wal = std::fs::metadata(d.join("library.db-wal")).map_or(0, |m| m.len());
                let db = std::fs::metadata(d.join("library.db")).map_or(0, |m| m.len());
                eprintln!("bench: {} db {db} wal {wal}", d.display());
            }
        }
        if case == Case::Live {
            // The batch case's engines leave their WAL un-checkpointed (up to
            // the size of the database): checkpoint it untimed, so `live`
            // measures steady state and not the first commit's checkpoint.
            for d in [&send, &recv] {
                Store::open(&EngineConfig::new(d).db_path())
                    .await?
                    .close()
                    .await;
            }
        }
        let live = (case == Case::Live).then_some(LIVE_CHANGES);
        let target = Seq(prep.max_seq.0 + live.unwrap_or(0) as u64);
        let out = run_pair(case, &send, &recv, prep.owner, target, live).await?;
        let result = out.result(case, n, floor_seconds);
        if !quiet {
            eprintln!(
                "  {:<8} {:.2}s ({})",
                case.as_str(),
                result.seconds,
                result.strategy
            );
        }
        check_strategy(case, &result.strategy)?;
        cases.push(result);
        if case == Case::Bulk || case == Case::Snapshot {
            std::fs::remove_dir_all(&send).ok();
            std::fs::remove_dir_all(&recv).ok();
        }
    }
    Ok(Report {
        entries: n,
        floor_seconds,
        floor_stages: floor.stages,
        floor_read_seconds: floor.read,
        cases,
    })
}

/// Refuses a run whose sender chose another strategy than the case forces.
fn check_strategy(case: Case, strategy: &str) -> anyhow::Result<()> {
    let expected = match case {
        Case::Batch => "batch",
        Case::Bulk => "bulk",
        Case::Snapshot => "snapshot",
        Case::Live => "individual",
        Case::Floor => return Ok(()),
    };
    if strategy.split('+').next() != Some(expected) {
        bail!(
            "case {} used strategy {strategy:?}, not {expected}",
            case.as_str()
        );
    }
    Ok(())
}

/// MiB from KiB.
fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The floor's measurement.
struct Floor {
    seconds: f64,
    stages: [f64; 3],
    read: f64,
    bytes: u64,
    rss_kb: u64,
    anon_kb: u64,
    cpu: f64,
}

impl Floor {
    fn result(&self, n: u64) -> CaseResult {
        CaseResult {
            case: "floor",
            strategy: "-".into(),
            seconds: self.seconds,
            entries_per_second: n as f64 / self.seconds.max(1e-9),
            wire_bytes: self.bytes,
            bytes_per_entry: self.bytes as f64 / n.max(1) as f64,
            sender_peak_rss_mb: mb(self.rss_kb),
            receiver_peak_rss_mb: mb(self.rss_kb),
            sender_peak_anon_mb: mb(self.anon_kb),
            receiver_peak_anon_mb: mb(self.anon_kb),
            sender_cpu_seconds: self.cpu,
            receiver_cpu_seconds: self.cpu,
            ratio_to_floor: Some(1.0),
            p50_ms: None,
            p99_ms: None,
        }
    }
}

/// Which child a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Sender,
    Receiver,
}

/// Starts `lsync --data DIR bench-node ...` with piped stdin and stdout.
fn spawn_node(data: &Path, role: Role, case: Case, extra: &[String]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the lsync binary")?;
    let role = role.to_possible_value().map(|v| v.get_name().to_string());
    let mut cmd = Command::new(exe);
    cmd.arg("--data")
        .arg(data)
        .arg("bench-node")
        .arg("--role")
        .arg(role.unwrap_or_default())
        .arg("--case")
        .arg(case.as_str())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.spawn().context("cannot start a bench process")
}

/// Forwards a child's stdout lines (parsed JSON) to `tx`, then `None`.
fn forward(child: &mut Child, side: Side, tx: mpsc::UnboundedSender<(Side, Option<Value>)>) {
    let Some(stdout) = child.stdout.take() else {
        return;
    };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => {
                    if tx.send((side, Some(v))).is_err() {
                        return;
                    }
                }
                Err(_) => eprintln!("bench {side:?}: {line}"),
            }
        }
        let _ = tx.send((side, None));
    });
}

/// Runs the floor in its own process.
async fn run_floor(send: &Path, out: &Path) -> anyhow::Result<Floor> {
    let mut child = spawn_node(
        send,
        Role::Floor,
        Case::Floor,
        &["--out".into(), out.display().to_string()],
    )?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    forward(&mut child, Side::Sender, tx);
    drop(child.stdin.take());
    let mut found = None;
    while let Some((_, line)) = tokio::time::timeout(CASE_TIMEOUT, rx.recv())
        .await
        .context("the floor timed out")?
    {
        let Some(v) = line else { break };
        if v["ev"] == "floor" {
            found = Some(v);
        }
    }
    let status = child.wait().await?;
    let v = found.with_context(|| format!("the floor process failed ({status})"))?;
    std::fs::remove_dir_all(out).ok();
    Ok(Floor {
        seconds: v["seconds"].as_f64().unwrap_or(0.0),
        stages: [
            v["encode_seconds"].as_f64().unwrap_or(0.0),
            v["decode_seconds"].as_f64().unwrap_or(0.0),
            v["apply_seconds"].as_f64().unwrap_or(0.0),
        ],
        read: v["read_seconds"].as_f64().unwrap_or(0.0),
        bytes: v["bytes"].as_u64().unwrap_or(0),
        rss_kb: v["vmhwm_kb"].as_u64().unwrap_or(0),
        anon_kb: v["anon_kb"].as_u64().unwrap_or(0),
        cpu: v["cpu_s"].as_f64().unwrap_or(0.0),
    })
}

/// A running sender/receiver pair and every line they printed.
struct Pair {
    rx: mpsc::UnboundedReceiver<(Side, Option<Value>)>,
    sender_in: Option<ChildStdin>,
    receiver_in: Option<ChildStdin>,
    log: Vec<(Side, Value)>,
    /// Lines not yet matched by `expect`.
    pending: VecDeque<(Side, Value)>,
    deadline: tokio::time::Instant,
}

impl Pair {
    /// Waits for the next line `ev` from `side`, logging every line seen.
    async fn expect(&mut self, side: Side, ev: &str) -> anyhow::Result<Value> {
        if let Some(i) = self
            .pending
            .iter()
            .position(|(s, v)| *s == side && v["ev"] == ev)
        {
            return Ok(self.pending.remove(i).map(|p| p.1).unwrap_or_default());
        }
        loop {
            let (s, line) = match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
                Err(_) => bail!("timed out waiting for {ev} from the {side:?}"),
                Ok(None) => bail!("both bench processes ended before {ev}"),
                Ok(Some(x)) => x,
            };
            let Some(v) = line else {
                if s == side {
                    bail!("the {side:?} process ended before {ev}");
                }
                continue;
            };
            if v["ev"] == "transfer_failed" || std::env::var_os("LSYNC_BENCH_TRACE").is_some() {
                eprintln!("bench {s:?}: {v}");
            }
            self.log.push((s, v.clone()));
            if s == side && v["ev"] == ev {
                return Ok(v);
            }
            if !matches!(v["ev"].as_str(), Some("applied" | "committed")) {
                self.pending.push_back((s, v));
            }
        }
    }

    /// Sends one command line to a child.
    async fn tell(&mut self, side: Side, line: &str) -> anyhow::Result<()> {
        let pipe = match side {
            Side::Sender => self.sender_in.as_mut(),
            Side::Receiver => self.receiver_in.as_mut(),
        }
        .context("the process's input is closed")?;
        pipe.write_all(format!("{line}\n").as_bytes()).await?;
        pipe.flush().await?;
        Ok(())
    }
}

/// What one sender/receiver pair measured.
struct PairOutcome {
    strategy: String,
    seconds: f64,
    wire: u64,
    sender_rss_kb: u64,
    receiver_rss_kb: u64,
    sender_anon_kb: u64,
    receiver_anon_kb: u64,
    sender_cpu: f64,
    receiver_cpu: f64,
    latencies_ms: Vec<f64>,
}

impl PairOutcome {
    fn result(&self, case: Case, n: u64, floor_seconds: f64) -> CaseResult {
        let moved = if case == Case::Live {
            LIVE_CHANGES as u64
        } else {
            n
        };
        let pct = |p: f64| percentile(&self.latencies_ms, p);
        CaseResult {
            case: case.as_str(),
            strategy: self.strategy.clone(),
            seconds: self.seconds,
            entries_per_second: moved as f64 / self.seconds.max(1e-9),
            wire_bytes: self.wire,
            bytes_per_entry: self.wire as f64 / moved.max(1) as f64,
            sender_peak_rss_mb: mb(self.sender_rss_kb),
            receiver_peak_rss_mb: mb(self.receiver_rss_kb),
            sender_peak_anon_mb: mb(self.sender_anon_kb),
            receiver_peak_anon_mb: mb(self.receiver_anon_kb),
            sender_cpu_seconds: self.sender_cpu,
            receiver_cpu_seconds: self.receiver_cpu,
            ratio_to_floor: (case != Case::Live).then(|| self.seconds / floor_seconds.max(1e-9)),
            p50_ms: (case == Case::Live).then(|| pct(0.50)),
            p99_ms: (case == Case::Live).then(|| pct(0.99)),
        }
    }
}

/// Nearest-rank percentile of unsorted values (0 when empty).
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Starts the sender, then the receiver dialing it; measures until the
/// receiver holds `target`; collects wire bytes and peak RSS of both.
async fn run_pair(
    case: Case,
    send: &Path,
    recv: &Path,
    owner: DeviceId,
    target: Seq,
    live: Option<usize>,
) -> anyhow::Result<PairOutcome> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut sender = spawn_node(send, Role::Send, case, &[])?;
    forward(&mut sender, Side::Sender, tx.clone());
    let mut pair = Pair {
        rx,
        sender_in: sender.stdin.take(),
        receiver_in: None,
        log: Vec::new(),
        pending: VecDeque::new(),
        deadline: tokio::time::Instant::now() + CASE_TIMEOUT,
    };
    let ready = pair.expect(Side::Sender, "ready").await?;
    let addr = ready["addr"].as_str().context("no address")?.to_string();
    let mut receiver = spawn_node(
        recv,
        Role::Recv,
        case,
        &[
            "--connect".into(),
            addr,
            "--owner".into(),
            owner.to_string(),
            "--target".into(),
            target.0.to_string(),
        ],
    )?;
    forward(&mut receiver, Side::Receiver, tx);
    pair.receiver_in = receiver.stdin.take();

    let connected = pair.expect(Side::Receiver, "connected").await?;
    if let Some(k) = live {
        pair.tell(Side::Sender, &format!("live {k}")).await?;
    }
    let done = pair.expect(Side::Receiver, "done").await?;
    if live.is_some() {
        pair.expect(Side::Sender, "live_done").await?;
    }
    pair.tell(Side::Receiver, "stats").await?;
    let rstats = pair.expect(Side::Receiver, "stats").await?;
    pair.tell(Side::Sender, "stats").await?;
    let sstats = pair.expect(Side::Sender, "stats").await?;
    pair.receiver_in = None;
    let rexit = pair.expect(Side::Receiver, "exit").await?;
    pair.sender_in = None;
    let sexit = pair.expect(Side::Sender, "exit").await?;
    let (rs, ss) = (receiver.wait().await?, sender.wait().await?);
    if !rs.success() || !ss.success() {
        bail!("bench processes failed: receiver {rs}, sender {ss}");
    }

    let us = |v: &Value, k: &str| v[k].as_i64().unwrap_or(0);
    let strategies: Vec<String> = pair
        .log
        .iter()
        .filter(|(s, v)| {
            *s == Side::Sender && v["ev"] == "transfer_started" && v["direction"] == "send"
        })
        .filter_map(|(_, v)| v["strategy"].as_str().map(String::from))
        .collect();
    let mut strategy: Vec<String> = Vec::new();
    for s in strategies {
        if !strategy.contains(&s) {
            strategy.push(s);
        }
    }
    // Every receiver commit of the owner's records: (seq, time).
    let applies: Vec<(u64, i64)> = pair
        .log
        .iter()
        .filter(|(s, v)| *s == Side::Receiver && (v["ev"] == "applied" || v["ev"] == "imported"))
        .map(|(_, v)| (v["seq"].as_u64().unwrap_or(0), us(v, "t_us")))
        .collect();
    let end = applies.last().map_or(us(&done, "t_us"), |a| a.1);
    let (seconds, latencies_ms) = if live.is_some() {
        let commits: Vec<(u64, i64)> = pair
            .log
            .iter()
            .filter(|(s, v)| *s == Side::Sender && v["ev"] == "committed")
            .map(|(_, v)| (v["seq"].as_u64().unwrap_or(0), us(v, "started_us")))
            .collect();
        let mut lat = Vec::with_capacity(commits.len());
        for (seq, at) in &commits {
            let i = applies.partition_point(|(s, _)| s < seq);
            let Some((_, applied)) = applies.get(i) else {
                bail!("seq {seq} committed but never applied");
            };
            lat.push((applied - at) as f64 / 1000.0);
        }
        let first = commits.first().map_or(end, |c| c.1);
        ((end - first) as f64 / 1e6, lat)
    } else {
        ((end - us(&connected, "start_us")) as f64 / 1e6, Vec::new())
    };
    let kb =
        |a: &Value, b: &Value, k: &str| a[k].as_u64().unwrap_or(0).max(b[k].as_u64().unwrap_or(0));
    Ok(PairOutcome {
        strategy: strategy.join("+"),
        seconds,
        wire: sstats["bytes_sent"].as_u64().unwrap_or(0)
            + rstats["bytes_sent"].as_u64().unwrap_or(0),
        sender_rss_kb: kb(&sstats, &sexit, "vmhwm_kb"),
        receiver_rss_kb: kb(&rstats, &rexit, "vmhwm_kb"),
        sender_anon_kb: kb(&sstats, &sexit, "anon_kb"),
        receiver_anon_kb: kb(&rstats, &rexit, "anon_kb"),
        sender_cpu: sstats["cpu_s"].as_f64().unwrap_or(0.0),
        receiver_cpu: rstats["cpu_s"].as_f64().unwrap_or(0.0),
        latencies_ms,
    })
}
