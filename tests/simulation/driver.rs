//! The driver: the state of one running schedule (devices, their links,
//! folders and copies, the model) and one method per kind of operation,
//! then the quiesce phase and the checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use sync_actors::{EngineConfig, SyncEngine};
use sync_core::{Entry, Location, LocationId};
use sync_net::fault::{FaultLog, FaultPlan, memory_pair_with_faults};
use sync_storage::LocalChange;
use tempfile::TempDir;

use super::check::{Claim, View, check_quiesced, synced_implies_equal, watermark_holds};
use super::folders::{self, check_index};
use super::model::{Model, Prediction};
use super::ops::{Change, Kind, LinkFault, Op};
use super::resolve::Resolver;
use super::{Counts, SimConfig};
use crate::harness::{Device, spawn_devices, synthetic_changes};

/// How the engines of a schedule are configured, drawn from its seed.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    batch_size: usize,
    individual_below: u64,
    bulk_from: u64,
    snapshot_from: u64,
}

impl Shape {
    /// The shape of `seed`'s schedule.
    pub fn of(seed: u64) -> Shape {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let (bulk_from, snapshot_from) = match rng.random_range(0..3) {
            0 => (u64::MAX, u64::MAX),
            1 => (120, u64::MAX),
            _ => (120, 150),
        };
        Shape {
            batch_size: [16, 64, 10_000][rng.random_range(0..3)],
            individual_below: [10, 100][rng.random_range(0..2)],
            bulk_from,
            snapshot_from,
        }
    }

    fn configure(self, c: &mut EngineConfig) {
        c.batch_size = self.batch_size;
        c.thresholds.individual_below = self.individual_below;
        c.thresholds.bulk_from = self.bulk_from;
        c.thresholds.snapshot_from = self.snapshot_from;
        c.backoff_base = Duration::from_millis(20);
        c.backoff_max = Duration::from_millis(500);
        c.max_attempts = 1_000;
    }
}

/// Why a schedule failed, and at which operation (`None`: at the end).
#[derive(Clone, Debug)]
pub struct Failure {
    /// The operation's index in the list run.
    pub at: Option<usize>,
    /// What was wrong.
    pub message: String,
}

/// One device of the simulation.
struct Node {
    device: Device,
    /// Where it listens (TLS on loopback, for dials).
    addr: SocketAddr,
    /// Its folders for index runs.
    folders: Vec<PathBuf>,
    /// A copy of its library taken while it was stopped.
    backup: Option<PathBuf>,
}

/// A link between two devices, as the simulation made it.
enum LinkState {
    /// In memory; set once both sessions ended.
    Memory(Arc<AtomicBool>),
    /// Both dialed each other over TLS (their redial loops keep it).
    Dialed,
}

/// A running schedule.
pub struct Sim<'a> {
    config: &'a SimConfig,
    shape: Shape,
    nodes: Vec<Node>,
    links: BTreeMap<(usize, usize), LinkState>,
    model: Model,
    counts: &'a mut Counts,
    fired: Arc<FaultLog>,
    /// Entries and times made by commits are numbered by this.
    made: u64,
    files: TempDir,
}

/// Maps any displayable error to a message.
fn msg<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

impl<'a> Sim<'a> {
    /// Starts `devices` paired engines with their folders.
    pub async fn start(
        seed: u64,
        devices: usize,
        config: &'a SimConfig,
        counts: &'a mut Counts,
    ) -> Result<Sim<'a>, String> {
        let shape = Shape::of(seed);
        let files = tempfile::tempdir().map_err(msg("tempdir"))?;
        let mut nodes = Vec::new();
        for (i, device) in spawn_devices(devices, |c| shape.configure(c))
            .await
            .into_iter()
            .enumerate()
        {
            let addr = listen(&device.engine).await?;
            let mut dirs = Vec::new();
            for f in 0..2 {
                let dir = files.path().join(format!("dev{i}-folder{f}"));
                std::fs::create_dir_all(&dir).map_err(msg("folder"))?;
                dirs.push(dir.canonicalize().map_err(msg("folder"))?);
            }
            nodes.push(Node {
                device,
                addr,
                folders: dirs,
                backup: None,
            });
        }
        let fired = counts.fired.clone();
        Ok(Sim {
            config,
            shape,
            nodes,
            links: BTreeMap::new(),
            model: Model::default(),
            counts,
            fired,
            made: 0,
            files,
        })
    }

    /// Runs `ops` in order, then quiesces and checks. Returns the records compared.
    pub async fn run(&mut self, ops: &[Op]) -> Result<u64, Failure> {
        let roster = self.roster();
        for (i, op) in ops.iter().enumerate() {
            let fail = |message| Failure {
                at: Some(i),
                message: format!("{message} [{roster}]"),
            };
            self.step(op).await.map_err(fail)?;
            for k in op.kinds() {
                *self.counts.ops.entry(k).or_default() += 1;
            }
            if !self.config.skip.contains(&Kind::SyncedProbe) {
                self.probe().await.map_err(fail)?;
            }
        }
        self.quiesce().await.map_err(|message| Failure {
            at: None,
            message: format!("{message} [{roster}]"),
        })
    }

    /// Which short id is which device, for messages.
    fn roster(&self) -> String {
        let ids: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}={}", n.device.id.fmt_short()))
            .collect();
        format!("devices {}", ids.join(" "))
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        let n = self.nodes.len();
        match op {
            Op::Commit { device, changes } => self.commit(device % n, changes).await,
            Op::BulkCommit { device, entries } => self.bulk_commit(device % n, *entries).await,
            Op::Fs {
                device,
                folder,
                change,
            } => {
                let root = &self.nodes[device % n].folders[folder % 2];
                match folders::apply(root, change) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => self.counts.fs_skipped += 1,
                }
                Ok(())
            }
            Op::Index {
                device,
                folder,
                concurrent,
            } => self.index(device % n, folder % 2, *concurrent).await,
            Op::Restart { device } => self.restart(device % n, None).await,
            Op::Backup { device } => self.backup(device % n).await,
            Op::Restore { device } => self.restore(device % n).await,
            Op::Link { a, b, fault } => self.link(a % n, b % n, *fault).await,
            Op::DialBoth { a, b } => self.dial_both(a % n, b % n).await,
            Op::Run { millis } => {
                tokio::time::sleep(Duration::from_millis(*millis)).await;
                Ok(())
            }
        }
    }

    fn view(&self, i: usize) -> View {
        let d = &self.nodes[i].device;
        View {
            id: d.id,
            store: d.store(),
        }
    }

    fn views(&self) -> Vec<View> {
        (0..self.nodes.len()).map(|i| self.view(i)).collect()
    }
}
async fn listen(engine: &SyncEngine) -> Result<SocketAddr, String> {
    engine.listen("127.0.0.1:0").await.map_err(msg("listen"))
}

/// Commits, bulk commits and index runs: the owner's own records.
impl Sim<'_> {
    async fn commit(&mut self, i: usize, changes: &[Change]) -> Result<(), String> {
        let owner = self.nodes[i].device.id;
        let base = self.model.owner(owner);
        let root = self.files.path().to_path_buf();
        let mut r = Resolver::new(owner, &base, &root, &mut self.made);
        for c in changes {
            r.add(c);
        }
        let changes = r.changes;
        if changes.is_empty() {
            return Ok(());
        }
        self.commit_changes(i, changes).await
    }

    async fn commit_changes(&mut self, i: usize, changes: Vec<LocalChange>) -> Result<(), String> {
        let d = &self.nodes[i].device;
        let prediction = Prediction::of(&self.model.owner(d.id), &changes);
        let range = d
            .engine
            .commit(changes)
            .await
            .map_err(|e| format!("commit on {}: {e}", d.id.fmt_short()))?;
        self.model
            .check_commit(d.id, &d.store(), &prediction, range)
            .await
    }

    async fn bulk_commit(&mut self, i: usize, entries: u64) -> Result<(), String> {
        self.made += 1;
        let (_, changes) = synthetic_changes(self.nodes[i].device.id, entries, self.made);
        self.commit_changes(i, changes).await
    }

    /// The owner's live locations at `path`, and the live entries of the
    /// one an index run would pick (the first by id).
    async fn indexed(&self, i: usize, path: &Path) -> Result<(Vec<Location>, Vec<Entry>), String> {
        let d = &self.nodes[i].device;
        let store = d.store();
        let at = path.to_string_lossy();
        let locations: Vec<Location> = store
            .locations()
            .await
            .map_err(msg("locations"))?
            .into_iter()
            .filter(|l| l.owner == d.id && l.path == at)
            .collect();
        let entries = match locations.first() {
            Some(l) => store
                .live_location_entries(l.id)
                .await
                .map_err(msg("entries"))?,
            None => Vec::new(),
        };
        let live = locations.into_iter().filter(|l| !l.deleted).collect();
        Ok((live, entries))
    }

    async fn index(&mut self, i: usize, folder: usize, concurrent: bool) -> Result<(), String> {
        let path = self.nodes[i].folders[folder].clone();
        let (_, before) = self.indexed(i, &path).await?;
        let engine = self.nodes[i].device.engine.clone();
        let report = if concurrent {
            let (a, b) = tokio::join!(engine.index(&path, None), engine.index(&path, None));
            b.map_err(msg("index"))?;
            a.map_err(msg("index"))?
        } else {
            engine.index(&path, None).await.map_err(msg("index"))?
        };
        let owner = self.nodes[i].device.id;
        self.model.adopt_new(owner, &engine.store()).await?;
        self.check_index_run(i, &path, report.location_id, &before)
            .await?;
        // An unchanged folder yields no change and stamps no seq.
        let again = engine.index(&path, None).await.map_err(msg("index"))?;
        let fresh = self.model.adopt_new(owner, &engine.store()).await?;
        if !fresh.is_empty() {
            return Err(format!(
                "indexing an unchanged folder again wrote {} records ({} created, {} updated, {} deleted), first {:?}",
                fresh.len(),
                again.created,
                again.updated,
                again.deleted,
                fresh[0]
            ));
        }
        Ok(())
    }

    async fn check_index_run(
        &self,
        i: usize,
        path: &Path,
        location: LocationId,
        before: &[Entry],
    ) -> Result<(), String> {
        let (live, after) = self.indexed(i, path).await?;
        if live.len() != 1 || live[0].id != location {
            return Err(format!(
                "{} live locations at {} after an index run into {}",
                live.len(),
                path.display(),
                location.fmt_short()
            ));
        }
        check_index(path, location, before, &after)
            .map_err(|e| format!("index of {}: {e}", path.display()))
    }
}

/// What is done to a stopped device's data directory.
type LibraryEdit<'f> = dyn Fn(&Path) -> std::io::Result<()> + 'f;

/// Restarts, copies and restores.
impl Sim<'_> {
    /// Stops device `i`, runs `between` on its data directory, starts it.
    async fn restart(&mut self, i: usize, between: Option<&LibraryEdit<'_>>) -> Result<(), String> {
        let node = &mut self.nodes[i];
        node.device
            .engine
            .shutdown()
            .await
            .map_err(msg("shutdown"))?;
        if let Some(f) = between {
            f(&node.device.dir).map_err(msg("library copy"))?;
        }
        let mut config = EngineConfig::new(&node.device.dir);
        self.shape.configure(&mut config);
        node.device.engine = SyncEngine::start(config).await.map_err(msg("start"))?;
        node.addr = listen(&node.device.engine).await?;
        self.links.retain(|(a, b), _| *a != i && *b != i);
        Ok(())
    }

    async fn backup(&mut self, i: usize) -> Result<(), String> {
        let to = self.files.path().join(format!("backup-{i}"));
        let copy = |dir: &Path| copy_library(dir, &to);
        self.restart(i, Some(&copy)).await?;
        self.nodes[i].backup = Some(self.files.path().join(format!("backup-{i}")));
        Ok(())
    }

    async fn restore(&mut self, i: usize) -> Result<(), String> {
        let Some(from) = self.nodes[i].backup.clone() else {
            return Ok(());
        };
        let put_back = |dir: &Path| copy_library(&from, dir);
        self.restart(i, Some(&put_back)).await?;
        let d = &self.nodes[i].device;
        self.model.restored.insert(d.id);
        self.model.adopt_all(d.id, &d.store()).await
    }
}

/// Library files: the database and its WAL (absent after a clean shutdown).
const LIBRARY_FILES: [&str; 3] = ["library.db", "library.db-wal", "library.db-shm"];

/// Replaces the library files in `to` with those of `from`.
fn copy_library(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for name in LIBRARY_FILES {
        let _ = std::fs::remove_file(to.join(name));
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name))?;
        }
    }
    Ok(())
}

/// Links: in memory with faults, and TLS dials.
impl Sim<'_> {
    fn pair(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    fn plan(&self, fault: LinkFault) -> FaultPlan {
        let mut plan = FaultPlan {
            log: self.fired.clone(),
            ..FaultPlan::default()
        };
        match fault {
            LinkFault::Clean => {}
            LinkFault::CutNow => plan.cut_after_frames = Some(0),
            LinkFault::CutAfterFrames(n) => plan.cut_after_frames = Some(n),
            LinkFault::DelayMs(ms) => plan.delay = Some(Duration::from_millis(ms)),
            LinkFault::Stall(frame, ms) => {
                plan.stall_before_frame = Some((frame, Duration::from_millis(ms)));
            }
        }
        plan
    }

    async fn link(&mut self, a: usize, b: usize, fault: LinkFault) -> Result<(), String> {
        if a == b {
            return Ok(());
        }
        let (ea, eb) = (&self.nodes[a].device.engine, &self.nodes[b].device.engine);
        let (mut na, mut nb) = (ea.net_config(), eb.net_config());
        for n in [&mut na, &mut nb] {
            n.idle_timeout = Duration::from_millis(1_500);
            n.keepalive_interval = Duration::from_millis(300);
        }
        let (ca, cb) = memory_pair_with_faults(&na, &nb, self.plan(fault), self.plan(fault))
            .await
            .map_err(msg("memory pair"))?;
        let closed_a = ea.attach(ca).await.map_err(msg("attach"))?;
        let closed_b = eb.attach(cb).await.map_err(msg("attach"))?;
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        tokio::spawn(async move {
            let _ = closed_a.await;
            let _ = closed_b.await;
            flag.store(true, Ordering::SeqCst);
        });
        self.links
            .insert(Self::pair(a, b), LinkState::Memory(ended));
        Ok(())
    }

    async fn dial_both(&mut self, a: usize, b: usize) -> Result<(), String> {
        if a == b {
            return Ok(());
        }
        let (na, nb) = (&self.nodes[a], &self.nodes[b]);
        let (to_b, to_a) = (nb.addr.to_string(), na.addr.to_string());
        let (ra, rb) = tokio::join!(
            na.device.engine.connect(&to_b),
            nb.device.engine.connect(&to_a)
        );
        ra.map_err(msg("dial"))?;
        rb.map_err(msg("dial"))?;
        self.links.insert(Self::pair(a, b), LinkState::Dialed);
        self.wait_session(a, b, DIAL_SETTLE).await?;
        // The session must outlast the replacements both dials cause.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.wait_session(a, b, Duration::from_millis(100)).await
    }

    /// Whether `a` lists `b` among its peers and `b` lists `a`.
    async fn has_session(&self, a: usize, b: usize) -> bool {
        let lists = |x: usize, y: usize| {
            let e = self.nodes[x].device.engine.clone();
            let id = self.nodes[y].device.id;
            async move {
                e.peers()
                    .await
                    .is_ok_and(|p| p.iter().any(|p| p.peer == id))
            }
        };
        lists(a, b).await && lists(b, a).await
    }

    /// Two devices that dialed each other keep a session (issue 13 item 5).
    async fn wait_session(&self, a: usize, b: usize, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        while !self.has_session(a, b).await {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "devices {a} and {b} dialed each other and have no session after {within:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// How long two devices that dialed each other may take to settle on a session.
const DIAL_SETTLE: Duration = Duration::from_secs(5);

/// The checks: after each operation, and after quiescence.
impl Sim<'_> {
    /// `synced_with` true implies equal libraries, on every pair.
    async fn probe(&mut self) -> Result<(), String> {
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    if !self.model.restored.contains(&self.nodes[a].device.id) {
                        watermark_holds(&self.view(a), &self.view(b)).await?;
                    }
                    let claim = self.claim(a, b).await?;
                    let stale = synced_implies_equal(&self.view(a), &self.view(b), &claim)
                        .await
                        .map_err(|e| format!("device {a} of device {b}: {e}"))?;
                    self.counts.synced_claims += u64::from(claim.synced);
                    self.counts.synced_stale += u64::from(stale);
                }
            }
        }
        Ok(())
    }

    /// What device `a` says of device `b`.
    async fn claim(&self, a: usize, b: usize) -> Result<Claim, String> {
        let engine = &self.nodes[a].device.engine;
        let peer = self.nodes[b].device.id;
        let advertised = engine
            .peers()
            .await
            .map_err(msg("peers"))?
            .into_iter()
            .find(|p| p.peer == peer)
            .and_then(|p| p.advertised);
        let synced = engine.synced_with(peer).await.map_err(msg("synced_with"))?;
        Ok(Claim { synced, advertised })
    }

    /// Links every pair that has none (clean, in memory).
    async fn heal(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let live = match self.links.get(&(a, b)) {
                    Some(LinkState::Memory(ended)) => !ended.load(Ordering::SeqCst),
                    Some(LinkState::Dialed) => true,
                    None => false,
                };
                if !live {
                    self.link(a, b, LinkFault::Clean).await?;
                }
            }
        }
        Ok(())
    }

    /// Whether every device says it is synced with every other.
    async fn all_synced(&self) -> Result<Vec<(usize, usize)>, String> {
        let mut not = Vec::new();
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    let peer = self.nodes[b].device.id;
                    let e = &self.nodes[a].device.engine;
                    if !e.synced_with(peer).await.map_err(msg("synced_with"))? {
                        not.push((a, b));
                    }
                }
            }
        }
        Ok(not)
    }

    /// Heals every link, waits until every pair is synced, checks. Returns
    /// the records compared.
    async fn quiesce(&mut self) -> Result<u64, String> {
        for (a, b) in self.dialed() {
            self.wait_session(a, b, DIAL_SETTLE).await?;
        }
        let deadline = tokio::time::Instant::now() + self.config.quiesce;
        loop {
            self.heal().await?;
            let not = self.all_synced().await?;
            if not.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let state = check_quiesced(&self.views(), &self.model).await.err();
                return Err(format!(
                    "not synced within {:?}: (a, b) with a.synced_with(b) false: {not:?}; libraries: {}",
                    self.config.quiesce,
                    state.unwrap_or_else(|| "equal".to_string())
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        check_quiesced(&self.views(), &self.model)
            .await
            .map_err(|e| format!("every pair synced, yet {e}"))
    }

    fn dialed(&self) -> Vec<(usize, usize)> {
        self.links
            .iter()
            .filter(|(_, s)| matches!(s, LinkState::Dialed))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Shuts every engine down and makes the folders removable.
    pub async fn stop(self) {
        for n in &self.nodes {
            let _ = n.device.engine.shutdown().await;
            for f in &n.folders {
                folders::unlock_all(f);
            }
        }
    }
}
