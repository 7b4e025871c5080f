//! Seeded crash schedules with real processes: two devices run the `lsync`
//! command line (built into this crate as `lsync-chaos`, with crash
//! points), and one of them is SIGKILLed at a moment drawn from the seed:
//! during indexing (the walk, or between the transactions of a commit),
//! a batched transfer (sender after a batch, receiver between apply and
//! ack), a snapshot export, a snapshot download, a snapshot import, or
//! after a random delay. The killed process is restarted, the sync runs to
//! the end, and the two libraries must then be equal record by record,
//! with the indexed folder fully present.
//!
//! One schedule: `CHAOS_SEED=<seed> cargo test -p sync-tests chaos_crash -- --nocapture`;
//! a longer run: `CHAOS_SCHEDULES=100 cargo test --release -p sync-tests chaos_crash -- --nocapture`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;
use sync_actors::EngineConfig;
use sync_core::{DeviceId, Seq};
use sync_storage::Store;

use crate::chaos::{RecordCheck, compare_records, seeds};
use crate::harness::assert_same_state;

/// Schedules run by default (in CI): one per kind of moment.
const DEFAULT_SCHEDULES: u64 = 12;
/// Longest a sync may take after the crash.
const SYNC_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) fn lsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lsync-chaos"));
    c.env_remove("RUST_LOG").env_remove("LSYNC_CRASH_AT");
    c
}

pub(crate) fn run(data: &Path, args: &[&str]) -> Output {
    lsync()
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run lsync")
}

pub(crate) fn ok(data: &Path, args: &[&str]) -> String {
    let out = run(data, args);
    assert!(
        out.status.success(),
        "lsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn ok_json(data: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&ok(data, args)).expect("JSON output")
}

/// What part of the sync the kill lands in, and on which side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moment {
    /// The sender's folder walk.
    IndexWalk,
    /// Between the transactions of the sender's index commit.
    IndexCommit,
    /// The receiver, while the sender indexes and serves.
    ApplyWhileIndexing,
    /// The sender, after sending a batch.
    SendBatch,
    /// The receiver, after applying a batch and before acking it.
    ApplyBatch,
    /// The sender, with the snapshot file written but not hashed.
    ExportBuilt,
    /// The sender, with the snapshot hashed but its manifest not saved.
    ExportHashed,
    /// The receiver, after saving a downloaded chunk.
    DownloadChunk,
    /// The receiver, with the snapshot verified, before copying it in.
    ImportVerified,
    /// The receiver, with the snapshot copied in, before removing the download.
    ImportCopied,
    /// The sender, after a random delay.
    SenderAtRandom,
    /// The receiver, after a random delay.
    ReceiverAtRandom,
}

const MOMENTS: [Moment; 12] = [
    Moment::IndexWalk,
    Moment::IndexCommit,
    Moment::ApplyWhileIndexing,
    Moment::SendBatch,
    Moment::ApplyBatch,
    Moment::ExportBuilt,
    Moment::ExportHashed,
    Moment::DownloadChunk,
    Moment::ImportVerified,
    Moment::ImportCopied,
    Moment::SenderAtRandom,
    Moment::ReceiverAtRandom,
];

/// What the sender syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A real folder of this many files, indexed by the serving sender.
    Folder(u64),
    /// Synthetic entries, generated before serving; batches.
    Batches(u64),
    /// Synthetic entries, sent as a snapshot (low thresholds).
    Snapshot(u64),
}

#[derive(Debug)]
struct Schedule {
    moment: Moment,
    source: Source,
    /// The crash point and hit, or a delay before SIGKILL.
    crash: Option<(&'static str, u64)>,
    delay: Duration,
    sender_dies: bool,
}

impl Schedule {
    fn draw(seed: u64) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let moment = MOMENTS[(seed % MOMENTS.len() as u64) as usize];
        let folder = Source::Folder(rng.random_range(14_000..24_000));
        let batches = Source::Batches(rng.random_range(10_000..30_000));
        let snapshot = Source::Snapshot(rng.random_range(40_000..70_000));
        let (source, crash, sender_dies) = match moment {
            Moment::IndexWalk => (folder, Some(("index.walk", rng.random_range(1..4))), true),
            Moment::IndexCommit => (folder, Some(("commit.txn", 1)), true),
            Moment::ApplyWhileIndexing => {
                (folder, Some(("apply.batch", rng.random_range(1..6))), false)
            }
            Moment::SendBatch => (batches, Some(("send.batch", rng.random_range(1..10))), true),
            Moment::ApplyBatch => (
                batches,
                Some(("apply.batch", rng.random_range(1..10))),
                false,
            ),
            Moment::ExportBuilt => (snapshot, Some(("export.built", 1)), true),
            Moment::ExportHashed => (snapshot, Some(("export.hashed", 1)), true),
            Moment::DownloadChunk => (
                snapshot,
                Some(("download.chunk", rng.random_range(1..4))),
                false,
            ),
            Moment::ImportVerified => (snapshot, Some(("import.verified", 1)), false),
            Moment::ImportCopied => (snapshot, Some(("import.copied", 1)), false),
            Moment::SenderAtRandom => ([batches, snapshot][rng.random_range(0..2)], None, true),
            Moment::ReceiverAtRandom => ([batches, snapshot][rng.random_range(0..2)], None, false),
        };
        Schedule {
            moment,
            source,
            crash,
            delay: Duration::from_millis(rng.random_range(50..450)),
            sender_dies,
        }
    }
}

/// Two devices of one library that trust each other.
struct Pair {
    /// Holds both data dirs, the folder and the logs (removed on drop).
    tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    a_id: DeviceId,
    folder: PathBuf,
}

/// `n` devices of one library, set up with the CLI under `root` (named
/// `a`, `b`, ...): the first and each other trust each other (a star, the
/// first one serving). Returns their data dirs and ids.
pub(crate) fn init_devices(root: &Path, n: usize) -> Vec<(PathBuf, DeviceId)> {
    let name = |i: usize| char::from(b'a' + i as u8).to_string();
    let first = root.join(name(0));
    let out = ok(&first, &["init", "--name", &name(0)]);
    let library = out
        .lines()
        .find_map(|l| l.strip_prefix("library_id"))
        .expect("library id")
        .trim()
        .to_string();
    let field = |v: &Value, k: &str| v[k].as_str().expect("id field").to_string();
    let trust = |dir: &Path, id: &Value| {
        let (fp, dev) = (field(id, "fingerprint"), field(id, "device_id"));
        ok(dir, &["trust", &fp, "--device", &dev]);
    };
    let id_first = ok_json(&first, &["id", "--json"]);
    let mut made = vec![(
        first.clone(),
        field(&id_first, "device_id").parse().expect("device id"),
    )];
    for i in 1..n {
        let dir = root.join(name(i));
        ok(&dir, &["init", "--name", &name(i), "--library", &library]);
        let id = ok_json(&dir, &["id", "--json"]);
        trust(&first, &id);
        trust(&dir, &id_first);
        made.push((dir, field(&id, "device_id").parse().expect("device id")));
    }
    made
}

fn pair() -> Pair {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut made = init_devices(tmp.path(), 2);
    let (b, _) = made.pop().expect("b");
    let (a, a_id) = made.pop().expect("a");
    let folder = tmp.path().join("folder");
    Pair {
        a_id,
        tmp,
        a,
        b,
        folder,
    }
}

/// A folder of `files` files in nested directories, shaped by the seed.
pub(crate) fn make_folder(root: &Path, files: u64, rng: &mut StdRng) -> u64 {
    let mut dirs = vec![root.to_path_buf()];
    std::fs::create_dir_all(root).expect("folder");
    let mut made = 1; // the root
    for i in 0..files {
        if i % 200 == 0 {
            let parent = dirs[rng.random_range(0..dirs.len())].clone();
            let dir = parent.join(format!("d{i}"));
            std::fs::create_dir(&dir).expect("dir");
            dirs.push(dir);
            made += 1;
        }
        let dir = &dirs[dirs.len() - 1 - rng.random_range(0..dirs.len().min(3))];
        std::fs::write(dir.join(format!("f{i}.dat")), i.to_le_bytes()).expect("file");
        made += 1;
    }
    made
}

/// A child process, killed if still running when dropped.
pub(crate) struct Proc {
    pub(crate) child: Child,
    log: PathBuf,
}

impl Proc {
    /// Exit status if it has exited.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn spawn(data: &Path, args: &[String], crash: Option<(&str, u64)>, log: &Path) -> Proc {
    let mut c = lsync();
    c.arg("--data").arg(data).args(args);
    if let Some((site, n)) = crash {
        c.env("LSYNC_CRASH_AT", format!("{site}:{n}"));
    }
    let out = std::fs::File::create(log).expect("log file");
    let child = c
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn lsync");
    Proc {
        child,
        log: log.to_path_buf(),
    }
}

pub(crate) fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

pub(crate) fn wait_listening(addr: &str, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(s) = p.exited() {
            panic!("serve exited before listening ({s}): {}", p.log());
        }
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Figures of one run of schedules.
#[derive(Debug, Default)]
struct Tally {
    schedules: u64,
    killed_sender: u64,
    killed_receiver: u64,
    not_reached: u64,
    records: RecordCheck,
}

/// Runs one schedule.
fn run_schedule(seed: u64, tally: &mut Tally) {
    let s = Schedule::draw(seed);
    eprintln!(
        "chaos_crash: schedule seed {seed} {s:?} (rerun: CHAOS_SEED={seed} cargo test -p sync-tests chaos_crash -- --nocapture)"
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let p = pair();
    let logs = p.tmp.path();
    let addr = free_addr();
    let mut serve_args = vec!["serve".to_string(), "--listen".into(), addr.clone()];
    let mut folder_entries = None;
    match s.source {
        Source::Folder(files) => {
            folder_entries = Some(make_folder(&p.folder, files, &mut rng));
            serve_args.extend(["--index".into(), p.folder.display().to_string()]);
        }
        Source::Batches(n) | Source::Snapshot(n) => {
            ok(
                &p.a,
                &[
                    "generate",
                    "--entries",
                    &n.to_string(),
                    "--seed",
                    &seed.to_string(),
                ],
            );
        }
    }
    serve_args.extend(["--batch-size".into(), "1000".into()]);
    if let Source::Snapshot(_) = s.source {
        serve_args.extend(["--bulk-from", "5000", "--snapshot-from", "5000"].map(String::from));
    }
    let connect_args: Vec<String> = [
        "connect",
        &addr,
        "--until-synced",
        "--json",
        "--timeout",
        "180",
    ]
    .map(String::from)
    .to_vec();

    let sender_crash = if s.sender_dies { s.crash } else { None };
    let receiver_crash = if s.sender_dies { None } else { s.crash };
    let mut sender = spawn(&p.a, &serve_args, sender_crash, &logs.join("a-1.log"));
    wait_listening(&addr, &mut sender);
    let mut receiver = spawn(&p.b, &connect_args, receiver_crash, &logs.join("b-1.log"));

    // Wait for the victim to die (crash point or delayed SIGKILL), or for
    // its part to end without reaching the crash point.
    let started = Instant::now();
    let indexed = |p: &Proc| p.log().contains("folder indexed");
    let mut full_sync_tried = false;
    let killed = loop {
        let victim = if s.sender_dies {
            &mut sender
        } else {
            &mut receiver
        };
        if s.crash.is_none() && started.elapsed() >= s.delay {
            victim.child.kill().expect("SIGKILL");
            victim.child.wait().expect("wait");
            break true;
        }
        if let Some(status) = victim.exited() {
            if status.signal() == Some(9) {
                break true;
            }
            assert!(
                !s.sender_dies && status.success(),
                "seed {seed}: victim exited with {status}: {}",
                victim.log()
            );
            if folder_entries.is_some() && !full_sync_tried {
                // Caught up with a partial index: sync again, same crash
                // point, until a sync starts after the index ended.
                full_sync_tried = indexed(&sender);
                receiver = spawn(&p.b, &connect_args, receiver_crash, &logs.join("b-0.log"));
                continue;
            }
            break false;
        }
        if s.sender_dies
            && let Some(status) = receiver.exited()
        {
            if !status.success() {
                // Its dial raced the sender's death: it is restarted below.
                let deadline = Instant::now() + Duration::from_secs(10);
                while sender.exited().is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "seed {seed}: receiver failed with the sender alive: {}",
                        receiver.log()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
            if folder_entries.is_none() || indexed(&sender) {
                break false;
            }
            // Caught up with a partial index: sync again later.
            receiver = spawn(&p.b, &connect_args, None, &logs.join("b-0.log"));
        }
        assert!(
            started.elapsed() < SYNC_TIMEOUT,
            "seed {seed}: nothing happened"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    if killed {
        if s.sender_dies {
            tally.killed_sender += 1;
        } else {
            tally.killed_receiver += 1;
        }
    } else {
        tally.not_reached += 1;
        eprintln!("chaos_crash: seed {seed}: the crash point was not reached");
    }

    // Restart whoever died, without a crash point.
    if killed && s.sender_dies {
        sender = spawn(&p.a, &serve_args, None, &logs.join("a-2.log"));
        wait_listening(&addr, &mut sender);
    }
    let receiver_failed = receiver.exited().is_some_and(|st| !st.success());
    if killed && (!s.sender_dies || receiver_failed) {
        receiver = spawn(&p.b, &connect_args, None, &logs.join("b-2.log"));
    }
    // A folder source: the sender's index must be complete before the
    // final sync (the receiver may have caught up with a partial index).
    if folder_entries.is_some() {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while !indexed(&sender) {
            assert!(
                sender.exited().is_none(),
                "seed {seed}: sender died: {}",
                sender.log()
            );
            assert!(Instant::now() < deadline, "seed {seed}: index never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let deadline = Instant::now() + SYNC_TIMEOUT;
    let status = loop {
        if let Some(st) = receiver.exited() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: receiver never synced"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "seed {seed}: receiver failed: {}",
        receiver.log()
    );
    // One more sync after everything is committed on the sender.
    let out = run(
        &p.b,
        &connect_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        out.status.success(),
        "seed {seed}: final sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sender);

    // Regression: an export killed before its manifest was saved left its
    // file behind for good. Now the restart removes it; one snapshot stays.
    let snapshots = std::fs::read_dir(p.a.join("snapshots")).map_or(0, |d| d.count());
    if killed && matches!(s.moment, Moment::ExportBuilt | Moment::ExportHashed) {
        assert_eq!(
            snapshots, 1,
            "seed {seed}: snapshot files left on the sender"
        );
    }
    assert!(
        snapshots <= 2,
        "seed {seed}: {snapshots} snapshot files on the sender"
    );
    let incoming: Vec<_> = std::fs::read_dir(p.b.join("incoming"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        incoming.is_empty(),
        "seed {seed}: download files left on the receiver: {incoming:?}"
    );
    let check = compare_stores(&p, folder_entries);
    assert!(check.clean(), "seed {seed}: {check:?}");
    tally.records.add(check);
    tally.schedules += 1;
}

/// Opens both libraries after the processes ended and compares the
/// sender's records on both, record by record; with a folder source, also
/// that every path of the folder is a live entry.
fn compare_stores(p: &Pair, folder_entries: Option<u64>) -> RecordCheck {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (pa, pb) = (
            EngineConfig::new(&p.a).db_path(),
            EngineConfig::new(&p.b).db_path(),
        );
        let a = Store::open(&pa).await.expect("open a");
        let b = Store::open(&pb).await.expect("open b");
        let on_a = a
            .records_after(p.a_id, Seq::ZERO, usize::MAX)
            .await
            .expect("a");
        let on_b = b
            .records_after(p.a_id, Seq::ZERO, usize::MAX)
            .await
            .expect("b");
        let (sa, sb) = (
            a.summary(p.a_id).await.expect("summary a"),
            b.summary(p.a_id).await.expect("summary b"),
        );
        assert!(sa.local && !sb.local);
        assert_same_state(&sa, &sb);
        if let Some(n) = folder_entries {
            assert_eq!(sa.entries, n, "the folder's paths are all indexed");
        }
        a.close().await;
        b.close().await;
        compare_records(&on_a, &on_b)
    })
}

#[test]
fn chaos_crash_schedules_kill_a_process_and_lose_nothing() {
    let mut tally = Tally::default();
    for seed in seeds(DEFAULT_SCHEDULES) {
        run_schedule(seed, &mut tally);
    }
    eprintln!(
        "chaos_crash: schedules={} killed_sender={} killed_receiver={} not_reached={} \
         records_compared={} lost={} duplicated={} older={} differing={}",
        tally.schedules,
        tally.killed_sender,
        tally.killed_receiver,
        tally.not_reached,
        tally.records.compared,
        tally.records.lost,
        tally.records.duplicated,
        tally.records.older,
        tally.records.differing
    );
    // A run where the kills mostly missed would prove little.
    assert!(
        tally.not_reached * 2 <= tally.schedules,
        "{} of {} schedules killed nothing",
        tally.not_reached,
        tally.schedules
    );
}
