//! The shared test harness: devices in temporary directories, paired with
//! each other, running real engines over real SQLite files.

use std::path::PathBuf;
use std::time::Duration;

use sync_actors::{EngineConfig, SyncEngine, SyncEvent, init_device};
use sync_core::synthetic::SyntheticTree;
use sync_core::{DeviceId, LibraryId, Location, Record, Seq};
use sync_net::TrustStore;
use sync_storage::{LocalChange, OwnerSummary, SeqRange, Store};
use tempfile::TempDir;

/// One device of a test.
pub struct Device {
    /// Its data directory (removed when the test ends).
    pub dir: PathBuf,
    /// Its running engine.
    pub engine: SyncEngine,
    /// Its id.
    pub id: DeviceId,
    _tmp: std::sync::Arc<TempDir>,
}

impl Device {
    /// The device's store.
    pub fn store(&self) -> Store {
        self.engine.store()
    }

    /// Restarts the engine (as after a crash or a restart of the process).
    pub async fn restart(&mut self, configure: impl Fn(&mut EngineConfig)) {
        let _ = self.engine.shutdown().await;
        let mut config = EngineConfig::new(&self.dir);
        configure(&mut config);
        self.engine = SyncEngine::start(config).await.expect("restart engine");
    }
}

/// Warnings and errors logged in this process, one line each
/// ("message field=value ..."), so tests can check what was logged.
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records WARN and ERROR events into [`WARNINGS`].
struct CaptureWarnings;

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CaptureWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut line = Line(String::new());
            event.record(&mut line);
            WARNINGS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line.0);
        }
    }
}

/// Logs to the test's output (`RUST_LOG` selects, default `warn`), and
/// captures warnings for [`assert_logged`]; once per process.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter};
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(env),
        )
        .with(CaptureWarnings.with_filter(LevelFilter::WARN))
        .try_init();
}

/// Waits (a few seconds at most) for a logged warning that contains every
/// one of `parts`, e.g. `["refusing peer data", "peer=1a2b3c4d"]`.
pub async fn assert_logged(parts: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = WARNINGS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)));
        if found {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warning logged with {parts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` devices of one library, every pair trusting each other, engines started.
pub async fn spawn_devices(n: usize, configure: impl Fn(&mut EngineConfig)) -> Vec<Device> {
    let tmp = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| tmp.path().join(format!("device-{i}")))
        .collect();
    spawn_in(tmp, &dirs, configure).await
}

/// Devices of one library in `dirs`, every pair trusting each other,
/// engines started; each device holds `tmp` alive.
async fn spawn_in(
    tmp: std::sync::Arc<TempDir>,
    dirs: &[PathBuf],
    configure: impl Fn(&mut EngineConfig),
) -> Vec<Device> {
    init_tracing();
    let library = LibraryId::new_v7();
    let mut made = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let (info, fp) = init_device(dir, &format!("device-{i}"), Some(library))
            .await
            .expect("init device");
        made.push((dir.clone(), info, fp));
    }
    for (dir, info, _) in &made {
        let trust = TrustStore::load(&EngineConfig::new(dir).trust_path(), info.device_id)
            .expect("trust store");
        for (_, other, fp) in &made {
            if other.device_id != info.device_id {
                trust.trust(*fp, other.device_id).expect("trust");
            }
        }
    }
    let mut devices = Vec::new();
    for (dir, info, _) in made {
        let mut config = EngineConfig::new(&dir);
        configure(&mut config);
        let engine = SyncEngine::start(config).await.expect("start engine");
        devices.push(Device {
            dir,
            engine,
            id: info.device_id,
            _tmp: tmp.clone(),
        });
    }
    devices
}

/// A synthetic location of `owner` and its `entries` entries as records,
/// numbered with consecutive seqs from `first` (as a peer would send them).
pub fn synthetic_records(owner: DeviceId, entries: u64, seed: u64, first: Seq) -> Vec<Record> {
    let mut tree = SyntheticTree::new(owner, entries, seed);
    let mut records = vec![Record::Location(tree.location())];
    records.extend(tree.by_ref().map(Record::Entry));
    for (i, r) in records.iter_mut().enumerate() {
        let seq = Seq(first.0 + i as u64);
        match r {
            Record::Location(l) => l.seq = seq,
            Record::Entry(e) => e.seq = seq,
        }
    }
    records
}

/// A synthetic location of `owner` and the local changes that create it
/// and its `entries` entries (the location first).
pub fn synthetic_changes(owner: DeviceId, entries: u64, seed: u64) -> (Location, Vec<LocalChange>) {
    let mut tree = SyntheticTree::new(owner, entries, seed);
    let location = tree.location();
    let mut changes = vec![LocalChange::Location(location.clone())];
    changes.extend(tree.by_ref().map(LocalChange::Entry));
    (location, changes)
}

/// Commits a synthetic location of `entries` entries on `device`.
pub async fn generate(device: &Device, entries: u64, seed: u64) -> SeqRange {
    let (_, changes) = synthetic_changes(device.id, entries, seed);
    device.engine.commit(changes).await.expect("commit")
}

/// Connects `a` to `b` over real TLS on loopback.
pub async fn connect(a: &Device, b: &Device) {
    let addr = b.engine.listen("127.0.0.1:0").await.expect("listen");
    a.engine.connect(&addr.to_string()).await.expect("connect");
}

/// Waits until `device` holds `owner` up to `seq`; panics after `timeout`.
pub async fn wait_for_watermark(device: &Device, owner: DeviceId, seq: Seq, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let held = device.store().watermark(owner).await.expect("watermark");
        if held.is_some_and(|w| w.seq >= seq) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "device {} holds {:?} of {}, wanted {}",
            device.id.fmt_short(),
            held,
            owner.fmt_short(),
            seq
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts the receiver holds exactly what the owner holds of its records.
pub async fn assert_converged(owner: &Device, receiver: &Device) -> OwnerSummary {
    let want = owner
        .store()
        .summary(owner.id)
        .await
        .expect("owner summary");
    let got = receiver
        .store()
        .summary(owner.id)
        .await
        .expect("receiver summary");
    assert_same_state(&want, &got);
    want
}

/// Asserts a receiver's summary of an owner equals the owner's own:
/// fingerprint, counts, watermark and index (not the `local` flag).
pub fn assert_same_state(want: &OwnerSummary, got: &OwnerSummary) {
    assert_eq!(got.fingerprint, want.fingerprint, "fingerprints differ");
    assert_eq!(got.entries, want.entries, "entry counts differ");
    assert_eq!(got.tombstones, want.tombstones, "tombstone counts differ");
    assert_eq!(
        got.seq, want.seq,
        "watermark differs from the owner's max seq"
    );
    assert_eq!(got.index_id, want.index_id, "index ids differ");
}

/// Collects events until `pred` returns true for one; panics after `timeout`.
pub async fn wait_event(
    rx: &mut tokio::sync::broadcast::Receiver<SyncEvent>,
    timeout: Duration,
    mut pred: impl FnMut(&SyncEvent) -> bool,
) -> Vec<SyncEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(e)) => {
                let done = pred(&e);
                seen.push(e);
                if done {
                    return seen;
                }
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => panic!("event bus closed: {e}"),
            Err(_) => panic!("timed out waiting for an event; saw {} events", seen.len()),
        }
    }
}

/// Shuts every device's engine down gracefully.
pub async fn shutdown(devices: &[Device]) {
    for d in devices {
        d.engine.shutdown().await.expect("shutdown");
    }
}

/// Like [`spawn_devices`], but device `i` keeps its data in `dirs[i]` (for
/// example a directory on a small filesystem the test mounted). The caller
/// owns the directories and keeps them alive until the devices shut down.
pub async fn spawn_devices_at(
    dirs: &[PathBuf],
    configure: impl Fn(&mut EngineConfig),
) -> Vec<Device> {
    // `Device` holds a temporary directory; these devices live elsewhere.
    let tmp = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    spawn_in(tmp, dirs, configure).await
}
