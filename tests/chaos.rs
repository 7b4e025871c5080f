//! Seeded chaos schedules over the in-memory transport: each schedule syncs
//! one device's library to another through a series of links, each link
//! with random faults in both directions (cuts at a frame or a byte,
//! delays, stalls, flipped bytes, duplicated and swapped frames), with live
//! updates and deletes committed and engines restarted between links. After
//! each schedule the two libraries must be equal record by record.
//!
//! A schedule is a pure function of its seed. On failure the seed is in the
//! test output; rerun one schedule with
//! `CHAOS_SEED=<seed> cargo test -p sync-tests chaos_link -- --nocapture`,
//! and a longer run with `CHAOS_SCHEDULES=200 cargo test --release -p sync-tests
//! chaos_link -- --nocapture` (`CHAOS_FIRST_SEED` moves the window).
//! Killed processes are in `crash.rs`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use sync_actors::EngineConfig;
use sync_core::{Record, Seq};

use sync_net::fault::{FaultLog, FaultPlan, memory_pair_with_faults};
use sync_storage::LocalChange;

use crate::harness::{
    Device, assert_converged, generate, shutdown, spawn_devices, synthetic_records,
};

/// Schedules run by default (in CI); `CHAOS_SCHEDULES` overrides.
const DEFAULT_SCHEDULES: u64 = 10;
/// How long one schedule may take to converge once its faults are over.
const CONVERGE: Duration = Duration::from_secs(120);

/// The seeds to run: `CHAOS_SEED` alone, or `CHAOS_SCHEDULES` seeds from
/// `CHAOS_FIRST_SEED`.
pub fn seeds(default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = var("CHAOS_SEED") {
        return vec![seed];
    }
    let first = var("CHAOS_FIRST_SEED").unwrap_or(0);
    let count = var("CHAOS_SCHEDULES").unwrap_or(default_count);
    (first..first + count).collect()
}

/// What a record-by-record comparison of one owner's records found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordCheck {
    /// Records of the owner compared.
    pub compared: u64,
    /// Records the owner has and the receiver lacks.
    pub lost: u64,
    /// Records the receiver holds more than once, or holds and the owner doesn't.
    pub duplicated: u64,
    /// Records the receiver holds at an older seq than the owner.
    pub older: u64,
    /// Records at the same seq whose content differs.
    pub differing: u64,
}

impl RecordCheck {
    /// Adds another comparison's counts.
    pub fn add(&mut self, o: RecordCheck) {
        self.compared += o.compared;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.older += o.older;
        self.differing += o.differing;
    }

    /// Whether nothing was lost, duplicated, older or different.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.older == 0 && self.differing == 0
    }
}

fn record_key(r: &Record) -> (u8, [u8; 16]) {
    match r {
        Record::Location(l) => (0, l.id.to_bytes()),
        Record::Entry(e) => (1, e.id.to_bytes()),
    }
}

/// Compares every record (tombstones included) of `owner` on both stores.
pub fn compare_records(on_owner: &[Record], on_receiver: &[Record]) -> RecordCheck {
    let mut check = RecordCheck {
        compared: on_owner.len() as u64,
        ..RecordCheck::default()
    };
    let mut held: HashMap<(u8, [u8; 16]), &Record> = HashMap::with_capacity(on_receiver.len());
    for r in on_receiver {
        if held.insert(record_key(r), r).is_some() {
            check.duplicated += 1;
        }
    }
    let mut seen = 0u64;
    for want in on_owner {
        match held.get(&record_key(want)) {
            None => check.lost += 1,
            Some(got) => {
                seen += 1;
                if got.seq() < want.seq() {
                    check.older += 1;
                } else if *got != want {
                    check.differing += 1;
                }
            }
        }
    }
    check.duplicated += held.len() as u64 - seen;
    check
}

/// Loads both sides' records of `owner` and compares them.
pub async fn check_records(owner: &Device, receiver: &Device) -> RecordCheck {
    let all = |d: &Device| {
        let store = d.store();
        let id = owner.id;
        async move {
            store
                .records_after(id, Seq::ZERO, usize::MAX)
                .await
                .expect("records")
        }
    };
    compare_records(&all(owner).await, &all(receiver).await)
}

/// Figures summed over the schedules of one run.
#[derive(Debug, Default)]
struct Tally {
    schedules: u64,
    links: u64,
    restarts: u64,
    live_commits: u64,
    /// Faults planned into links, by kind (a trigger may not be reached).
    faults: BTreeMap<&'static str, u64>,
    /// Faults that fired.
    fired: Arc<FaultLog>,
    records: RecordCheck,
}

impl Tally {
    fn line(&self) -> String {
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "chaos_link: schedules={} links={} restarts={} live_commits={} planned[{}] \
             fired[{:?}] records_compared={} lost={} duplicated={} older={} differing={}",
            self.schedules,
            self.links,
            self.restarts,
            self.live_commits,
            faults.join(" "),
            self.fired.counts(),
            self.records.compared,
            self.records.lost,
            self.records.duplicated,
            self.records.older,
            self.records.differing,
        )
    }
}

/// A random fault plan for one direction of one link; counts its faults.
fn random_plan(rng: &mut StdRng, tally: &mut Tally) -> FaultPlan {
    let mut plan = FaultPlan {
        log: tally.fired.clone(),
        ..FaultPlan::default()
    };
    let kinds = rng.random_range(0..=2);
    for _ in 0..kinds {
        let kind = match rng.random_range(0..8) {
            0 => {
                plan.cut_after_frames = Some(rng.random_range(1..60));
                "cut_at_frame"
            }
            1 => {
                plan.cut_after_bytes = Some(rng.random_range(64..800_000));
                "cut_at_byte"
            }
            2 => {
                plan.delay = Some(Duration::from_millis(rng.random_range(1..8)));
                "delay"
            }
            3 => {
                let stall = Duration::from_millis(rng.random_range(100..2_500));
                plan.stall_before_frame = Some((rng.random_range(0..40), stall));
                "stall"
            }
            4 => {
                plan.flip_byte_at = Some(rng.random_range(0..400_000));
                "flip_byte"
            }
            5 | 6 => {
                plan.duplicate_frames
                    .extend((0..rng.random_range(1..4)).map(|_| rng.random_range(0..60)));
                "duplicate_frame"
            }
            _ => {
                plan.swap_frames
                    .extend((0..rng.random_range(1..3)).map(|_| rng.random_range(0..60)));
                "swap_frames"
            }
        };
        *tally.faults.entry(kind).or_default() += 1;
    }
    plan
}

/// Commits a few random updates and deletes of existing entries on `owner`.
async fn live_changes(owner: &Device, rng: &mut StdRng) -> u64 {
    let records = owner
        .store()
        .records_after(owner.id, Seq::ZERO, usize::MAX)
        .await
        .expect("records");
    let entries: Vec<_> = records
        .into_iter()
        .filter_map(|r| match r {
            Record::Entry(e) if !e.deleted => Some(e),
            _ => None,
        })
        .collect();
    if entries.is_empty() {
        return 0;
    }
    let n = rng.random_range(1..40);
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        let e = &entries[rng.random_range(0..entries.len())];
        if rng.random_bool(0.3) {
            changes.push(LocalChange::DeleteEntry(e.id));
        } else {
            let mut e = e.clone();
            e.size += rng.random_range(1..1000);
            e.name = format!("{}-v{}", e.name, rng.random_range(0..1000));
            changes.push(LocalChange::Entry(e));
        }
    }
    owner.engine.commit(changes).await.expect("live commit");
    1
}

/// The engine configuration of a schedule, drawn from its seed.
#[derive(Clone, Copy, Debug)]
struct Shape {
    entries: u64,
    batch_size: usize,
    credit_window: u32,
    /// Thresholds push this schedule to batches, a bulk pull or a snapshot.
    mode: &'static str,
}

impl Shape {
    fn draw(rng: &mut StdRng) -> Shape {
        let mode = ["batches", "bulk", "snapshot"][rng.random_range(0..3)];
        Shape {
            entries: rng.random_range(3_000..25_000),
            batch_size: [250, 500, 1_000, 2_000][rng.random_range(0..4)],
            credit_window: rng.random_range(1..6),
            mode,
        }
    }

    fn configure(self, c: &mut EngineConfig) {
        c.batch_size = self.batch_size;
        c.credit_window = self.credit_window;
        c.backoff_base = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(200);
        c.max_attempts = 1_000;
        match self.mode {
            "bulk" => {
                c.thresholds.bulk_from = 1_000;
                c.thresholds.snapshot_from = u64::MAX;
            }
            "snapshot" => {
                c.thresholds.bulk_from = 1_000;
                c.thresholds.snapshot_from = 1_000;
            }
            _ => {}
        }
    }
}

/// One link between the schedule's two devices.
struct Link {
    /// Set once both sessions have ended.
    ended: Arc<AtomicBool>,
}

impl Link {
    fn is_finished(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

async fn attach_link(a: &Device, b: &Device, plans: (FaultPlan, FaultPlan)) -> Link {
    let mut na = a.engine.net_config();
    let mut nb = b.engine.net_config();
    // Short timeouts, so stalls longer than them end links.
    for n in [&mut na, &mut nb] {
        n.idle_timeout = Duration::from_millis(1_500);
        n.keepalive_interval = Duration::from_millis(300);
    }
    let (ca, cb) = memory_pair_with_faults(&na, &nb, plans.0, plans.1)
        .await
        .expect("memory pair");
    let closed_a = a.engine.attach(ca).await.expect("attach a");
    let closed_b = b.engine.attach(cb).await.expect("attach b");
    let ended = Arc::new(AtomicBool::new(false));
    let flag = ended.clone();
    tokio::spawn(async move {
        let _ = closed_a.await;
        let _ = closed_b.await;
        flag.store(true, Ordering::SeqCst);
    });
    Link { ended }
}

async fn caught_up(a: &Device, b: &Device) -> bool {
    let want = a.store().local_watermark().await.expect("local watermark");
    let held = b.store().watermark(a.id).await.expect("watermark");
    held.is_some_and(|w| w.seq >= want.seq && w.index_id == want.index_id)
}

/// Runs one schedule; returns its record check.
async fn run_schedule(seed: u64, tally: &mut Tally) -> RecordCheck {
    let mut rng = StdRng::seed_from_u64(seed);
    let shape = Shape::draw(&mut rng);
    eprintln!(
        "chaos_link: schedule seed {seed} {shape:?} (rerun: CHAOS_SEED={seed} cargo test -p sync-tests chaos_link -- --nocapture)"
    );
    let mut devices = spawn_devices(2, |c| shape.configure(c)).await;
    generate(&devices[0], shape.entries, seed).await;
    let mut link: Option<Link> = None;
    let steps = rng.random_range(4..12);
    for _ in 0..steps {
        if rng.random_bool(0.3) {
            tally.live_commits += live_changes(&devices[0], &mut rng).await;
        }
        if rng.random_bool(0.12) {
            let which = rng.random_range(0..2);
            devices[which].restart(|c| shape.configure(c)).await;
            tally.restarts += 1;
            link = None;
        }
        if link.as_ref().is_none_or(|l| l.is_finished()) {
            let plans = (random_plan(&mut rng, tally), random_plan(&mut rng, tally));
            link = Some(attach_link(&devices[0], &devices[1], plans).await);
            tally.links += 1;
        }
        // Let the link run a random while (or end by itself).
        let run_for = Duration::from_millis(rng.random_range(50..1_500));
        let deadline = tokio::time::Instant::now() + run_for;
        while tokio::time::Instant::now() < deadline
            && !link.as_ref().is_some_and(|l| l.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The faults are over: clean links until B has all of A.
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !caught_up(&devices[0], &devices[1]).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {seed}: did not converge within {CONVERGE:?} after the faults"
        );
        if link.as_ref().is_none_or(|l| l.is_finished()) {
            let clean = (FaultPlan::default(), FaultPlan::default());
            link = Some(attach_link(&devices[0], &devices[1], clean).await);
            tally.links += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a, b) = (&devices[0], &devices[1]);
    assert_converged(a, b).await;
    let check = check_records(a, b).await;
    assert!(check.clean(), "seed {seed}: {check:?}");
    shutdown(&devices).await;
    check
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_link_schedules_converge_with_nothing_lost_or_duplicated() {
    let mut tally = Tally::default();
    for seed in seeds(DEFAULT_SCHEDULES) {
        let check = run_schedule(seed, &mut tally).await;
        tally.records.add(check);
        tally.schedules += 1;
    }
    eprintln!("{}", tally.line());
    assert!(tally.records.clean(), "{}", tally.line());
    // A run whose faults never fired would prove little.
    let fired = tally.fired.counts();
    let total =
        fired.cuts + fired.flips + fired.delays + fired.stalls + fired.duplicates + fired.swaps;
    assert!(
        tally.schedules < 4 || total >= tally.schedules,
        "only {total} faults fired: {}",
        tally.line()
    );
}

#[test]
fn record_comparison_sees_lost_older_differing_and_duplicated_records() {
    let owner = synthetic_records(sync_core::DeviceId::new_v7(), 6, 1, Seq(10));
    assert!(compare_records(&owner, &owner).clean());
    let mut receiver = owner.clone();
    receiver.remove(1); // lost
    if let Record::Entry(e) = &mut receiver[1] {
        e.seq = Seq(e.seq.0 - 1); // older
    }
    if let Record::Entry(e) = &mut receiver[2] {
        e.name.push('x'); // differing
    }
    receiver.push(receiver[3].clone()); // duplicated
    let check = compare_records(&owner, &receiver);
    assert_eq!(
        check,
        RecordCheck {
            compared: 7,
            lost: 1,
            duplicated: 1,
            older: 1,
            differing: 1,
        }
    );
}
