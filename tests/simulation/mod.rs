//! The simulation of issue 13: seeded, model-based schedules over the whole
//! public API. 2-5 devices with real SQLite files, linked in memory with
//! faults (and over TLS when both dial at once), run random operations:
//! commits of every `LocalChange` kind, index runs of real folders changed
//! between runs (renames, file/folder swaps, names that are not UTF-8,
//! unreadable folders), restarts, restores of an earlier copy, links cut,
//! delayed and stalled. After each schedule every device must equal the
//! model record by record (`check.rs`); after each operation, `synced_with`
//! true must mean equal libraries.
//!
//! A failing schedule is run again to confirm it, shrunk to the shortest
//! operation list that still fails, and printed with the command that
//! replays it:
//!
//! ```sh
//! SIM_SEED=7 cargo test -p sync-tests --test main simulation::replay -- --ignored --nocapture
//! SIM_SEED=7 SIM_KEEP=3,9,12 cargo test -p sync-tests --test main simulation::replay -- --ignored --nocapture
//! SIM_SCHEDULES=1000 cargo test -p sync-tests --test main simulation::long_run -- --ignored --nocapture
//! ```
//!
//! Variables: `SIM_SEED` (one seed), `SIM_SCHEDULES` and `SIM_FIRST_SEED`
//! (a window of seeds), `SIM_OPS` (operations per schedule, default 40),
//! `SIM_KEEP` (replay only these operation indices), `SIM_SKIP` (kinds left
//! out, e.g. `restore,dial_both`; empty: none), `SIM_SHRINK_SECS` (shrink
//! budget, 0: no shrink), `SIM_QUIESCE_SECS`.

mod check;
mod driver;
mod findings;
mod folders;
mod model;
mod ops;
mod resolve;
mod shrink;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_net::fault::FaultLog;

use driver::{Failure, Sim};
use ops::{Generator, Kind, Op, Schedule};
use shrink::{Budget, shrink};

/// Kinds the CI run leaves out while the engine bugs they find are being
/// fixed (issue 13): `restore` (item 3, an owner restored from a copy),
/// `dial_both` (item 5, now and then: no session is left). Item 4's kinds
/// (`index_concurrent`, `non_utf8`) run since its fix landed. Empty this
/// list as the fixes land. `SIM_SKIP` overrides it (`SIM_SKIP=` runs every kind).
const CI_SKIP: &str = "";

/// Schedules the CI test runs, from seed [`CI_FIRST_SEED`].
const CI_SCHEDULES: u64 = 20;
/// The first seed of the CI window.
const CI_FIRST_SEED: u64 = 1_300;

/// How a run is configured (from the environment).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Operations per schedule.
    pub ops: usize,
    /// Kinds left out.
    pub skip: BTreeSet<Kind>,
    /// How long quiescence may take.
    pub quiesce: Duration,
    /// The shrink budget (`None`: report the whole list).
    pub shrink: Option<Budget>,
    /// Only these operation indices (a replay of a shrunk list).
    pub keep: Option<Vec<usize>>,
}

fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl SimConfig {
    /// The configuration from `SIM_*`, with `default_skip` unless `SIM_SKIP` is set.
    pub fn from_env(default_skip: &str, shrink_secs: u64) -> SimConfig {
        let skip = std::env::var("SIM_SKIP").unwrap_or_else(|_| default_skip.to_string());
        let skip = Kind::parse_list(&skip).unwrap_or_else(|e| panic!("SIM_SKIP: {e}"));
        let shrink_secs = var("SIM_SHRINK_SECS").unwrap_or(shrink_secs);
        let keep = std::env::var("SIM_KEEP")
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
        SimConfig {
            ops: var("SIM_OPS").unwrap_or(40),
            skip,
            quiesce: Duration::from_secs(var("SIM_QUIESCE_SECS").unwrap_or(30)),
            shrink: (shrink_secs > 0).then(|| Budget {
                attempts: 200,
                time: Duration::from_secs(shrink_secs),
            }),
            keep,
        }
    }
}

/// A failing schedule, confirmed and shrunk.
#[derive(Clone, Debug)]
pub struct Finding {
    /// Its seed.
    pub seed: u64,
    /// What failed first.
    pub failure: Failure,
    /// Runs of the same list that failed again, of those tried.
    pub confirmed: (usize, usize),
    /// The shrunk list: indices into the schedule, and the operations.
    pub shrunk: Option<(Vec<usize>, Vec<Op>, Failure)>,
}

/// Figures summed over a run.
#[derive(Debug, Default)]
pub struct Counts {
    /// Schedules run (shrink and confirm runs not counted).
    pub schedules: u64,
    /// Operations run, by kind (a commit counts once per change).
    pub ops: BTreeMap<Kind, u64>,
    /// Folder changes with nothing to change, or refused by the filesystem.
    pub fs_skipped: u64,
    /// Records compared after quiescence.
    pub records: u64,
    /// `synced_with` answers of true seen by the probe.
    pub synced_claims: u64,
    /// Of those, answers made while the peer had committed more than it
    /// had advertised (not a failure: the claim is only as new as the
    /// peer's last `Watermarks`).
    pub synced_stale: u64,
    /// Link faults that fired.
    pub fired: Arc<FaultLog>,
    /// Whether mode 000 made folders unreadable here.
    pub unreadable_effective: bool,
    /// Findings.
    pub findings: Vec<Finding>,
}

impl Counts {
    fn line(&self, wall: Duration) -> String {
        let ops: Vec<String> = self
            .ops
            .iter()
            .map(|(k, n)| format!("{}={n}", k.name()))
            .collect();
        format!(
            "simulation: schedules={} ops={} [{}] fs_skipped={} faults_fired[{:?}] \
             unreadable_effective={} synced_claims={} (stale {}) records_compared={} \
             findings={} wall={:.0}s",
            self.schedules,
            self.ops.values().sum::<u64>(),
            ops.join(" "),
            self.fs_skipped,
            self.fired.counts(),
            self.unreadable_effective,
            self.synced_claims,
            self.synced_stale,
            self.records,
            self.findings.len(),
            wall.as_secs_f64()
        )
    }
}

/// The command that replays a list.
fn replay_command(seed: u64, config: &SimConfig, keep: Option<&[usize]>) -> String {
    let keep = keep
        .map(|k| {
            let k: Vec<String> = k.iter().map(usize::to_string).collect();
            format!(" SIM_KEEP={}", k.join(","))
        })
        .unwrap_or_default();
    let skip: Vec<&str> = config.skip.iter().map(|k| k.name()).collect();
    format!(
        "SIM_SEED={seed} SIM_OPS={}{keep} SIM_SKIP={} cargo test -p sync-tests --test main \
         simulation::replay -- --ignored --nocapture",
        config.ops,
        skip.join(",")
    )
}

/// Runs `ops` on a fresh set of `devices` devices.
async fn run_ops(
    seed: u64,
    devices: usize,
    ops: &[Op],
    config: &SimConfig,
    counts: &mut Counts,
) -> Result<u64, Failure> {
    let mut sim = Sim::start(seed, devices, config, counts)
        .await
        .map_err(|message| Failure { at: None, message })?;
    let result = sim.run(ops).await;
    sim.stop().await;
    result
}

/// Words of a failure message without numbers or ids: failures with the
/// same signature are taken to be the same fault while shrinking.
fn signature(f: &Failure) -> String {
    f.message
        .split_whitespace()
        .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .take(6)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The operations of `schedule` at `keep`.
fn select(schedule: &Schedule, keep: &[usize]) -> Vec<Op> {
    keep.iter()
        .filter_map(|i| schedule.ops.get(*i).cloned())
        .collect()
}

/// Confirms a failure (two more runs) and shrinks it.
async fn investigate(schedule: &Schedule, failure: Failure, config: &SimConfig) -> Finding {
    let mut scratch = Counts::default();
    let all: Vec<usize> = config
        .keep
        .clone()
        .unwrap_or_else(|| (0..schedule.ops.len()).collect());
    let ops = select(schedule, &all);
    let mut again = 0;
    for _ in 0..2 {
        let r = run_ops(schedule.seed, schedule.devices, &ops, config, &mut scratch).await;
        again += usize::from(r.is_err());
    }
    let mut finding = Finding {
        seed: schedule.seed,
        failure: failure.clone(),
        confirmed: (again, 2),
        shrunk: None,
    };
    let Some(budget) = config.shrink else {
        return finding;
    };
    let want = signature(&failure);
    let last = Rc::new(RefCell::new(failure));
    let shrunk = shrink(all.len(), budget, |k: Vec<usize>| {
        let picked: Vec<usize> = k.iter().map(|i| all[*i]).collect();
        let ops = select(schedule, &picked);
        let (last, want) = (last.clone(), want.clone());
        async move {
            let mut scratch = Counts::default();
            match run_ops(schedule.seed, schedule.devices, &ops, config, &mut scratch).await {
                Err(f) if signature(&f) == want => {
                    *last.borrow_mut() = f;
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let keep: Vec<usize> = shrunk.keep.iter().map(|i| all[*i]).collect();
    let ops = select(schedule, &keep);
    finding.shrunk = Some((keep, ops, last.borrow().clone()));
    finding
}

/// Prints a finding, with the commands that replay it.
fn report(f: &Finding, config: &SimConfig) {
    eprintln!(
        "simulation: FINDING seed {} at op {:?}: {}\n  failed again {}/{} runs\n  replay: {}",
        f.seed,
        f.failure.at,
        f.failure.message,
        f.confirmed.0,
        f.confirmed.1,
        replay_command(f.seed, config, config.keep.as_deref())
    );
    if let Some((keep, ops, last)) = &f.shrunk {
        eprintln!(
            "  shrunk to {} ops: {}\n  failing with: {}\n  shrunk ops:",
            ops.len(),
            replay_command(f.seed, config, Some(keep)),
            last.message
        );
        for (i, op) in keep.iter().zip(ops) {
            eprintln!("    [{i}] {op:?}");
        }
    }
}

/// Runs one seed's schedule; a failure is investigated and recorded.
async fn run_seed(seed: u64, config: &SimConfig, counts: &mut Counts) {
    let schedule = Generator::schedule(seed, config.ops, &config.skip);
    let ops = match &config.keep {
        Some(keep) => select(&schedule, keep),
        None => schedule.ops.clone(),
    };
    let started = Instant::now();
    let result = run_ops(seed, schedule.devices, &ops, config, counts).await;
    counts.schedules += 1;
    match result {
        Ok(records) => {
            counts.records += records;
            eprintln!(
                "simulation: seed {seed}: {} devices, {} ops, {records} records compared, ok ({:.1}s)",
                schedule.devices,
                ops.len(),
                started.elapsed().as_secs_f64()
            );
        }
        Err(failure) => {
            let finding = investigate(&schedule, failure, config).await;
            report(&finding, config);
            counts.findings.push(finding);
        }
    }
}

/// The seeds to run: `SIM_SEED`, or `SIM_SCHEDULES` from `SIM_FIRST_SEED`.
fn seeds(default_first: u64, default_count: u64) -> Vec<u64> {
    if let Some(seed) = var("SIM_SEED") {
        return vec![seed];
    }
    let first = var("SIM_FIRST_SEED").unwrap_or(default_first);
    (first..first + var("SIM_SCHEDULES").unwrap_or(default_count)).collect()
}

/// Runs `f` on a thread of its own, without the capabilities that let
/// root read a folder of mode 000 (see `folders.rs`), on a 2-worker runtime.
fn on_sim_thread<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(bool) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::Builder::new()
        .name("simulation".into())
        .spawn(move || {
            let probe = tempfile::tempdir().expect("tempdir");
            let unreadable = folders::drop_dac_capabilities(probe.path());
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f(unreadable))
        })
        .expect("simulation thread")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs the seeds, prints the figures and every finding; fails on a finding.
fn run(default_skip: &'static str, first: u64, count: u64, shrink_secs: u64) {
    on_sim_thread(move |unreadable| async move {
        let config = SimConfig::from_env(default_skip, shrink_secs);
        let skipped: Vec<&str> = config.skip.iter().map(|k| k.name()).collect();
        eprintln!("simulation: skipping [{}]", skipped.join(","));
        let mut counts = Counts {
            unreadable_effective: unreadable,
            ..Counts::default()
        };
        let started = Instant::now();
        for seed in seeds(first, count) {
            run_seed(seed, &config, &mut counts).await;
        }
        eprintln!("{}", counts.line(started.elapsed()));
        let seeds: Vec<u64> = counts.findings.iter().map(|f| f.seed).collect();
        assert!(
            counts.findings.is_empty(),
            "{} findings, seeds {seeds:?} (see above)",
            counts.findings.len()
        );
        assert!(counts.records > 0, "no records compared");
    });
}

/// The CI run: a window of schedules with the kinds of open bugs left out.
#[test]
fn simulation_schedules_match_the_model() {
    crate::harness::init_tracing();
    run(CI_SKIP, CI_FIRST_SEED, CI_SCHEDULES, 60);
}

/// One seed (`SIM_SEED`), or a shrunk list of it (`SIM_KEEP`), every kind.
#[test]
#[ignore = "replays a seed: SIM_SEED=<seed> [SIM_KEEP=i,j,...]"]
fn replay() {
    crate::harness::init_tracing();
    assert!(var::<u64>("SIM_SEED").is_some(), "set SIM_SEED");
    run("", 0, 1, 0);
}

/// The long run: `SIM_SCHEDULES` (default 200) schedules of every kind.
#[test]
#[ignore = "long run: SIM_SCHEDULES=1000"]
fn long_run() {
    crate::harness::init_tracing();
    run("", 0, 200, 180);
}
