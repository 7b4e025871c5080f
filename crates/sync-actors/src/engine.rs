//! `SyncEngine`: the host-facing handle. Cloneable and `Send`, usable from
//! any tokio runtime: the actix System runs on its own thread, and every
//! method sends a typed message or spawns onto that thread and awaits the
//! reply.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use actix_rt::ArbiterHandle;
use sync_core::{DeviceId, LibraryId, Seq, Watermark};
use sync_net::{CertFingerprint, Connection, Identity, Listener, NetConfig, PeerInfo, TrustStore};
use sync_storage::{DeviceInfo, DirLock, LocalChange, OwnerSummary, SeqRange, Store};
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::events::{HostEvent, SyncEvent};
use crate::indexer::walk::IndexReport;
use crate::indexer::{Commit, IndexPath, Indexer, Progress};
use crate::peer_session::PeerSession;
use crate::shared::{Shared, SharedRef};
use crate::snapshot_exporter::{KEEP_SNAPSHOTS, SnapshotExporter};
use crate::supervisor::{
    CloseAll, GetPeers, PeerStatus, Pump, SessionOrigin, TransferSupervisor, TrustChanged,
};

/// What `status()` reports.
#[derive(Clone, Debug)]
pub struct EngineStatus {
    /// This device.
    pub device_id: DeviceId,
    /// The library.
    pub library_id: LibraryId,
    /// This device's sequence and max seq.
    pub local: Watermark,
    /// Every owner held: entries, tombstones, watermark, fingerprint.
    pub owners: Vec<OwnerSummary>,
    /// Every owner held: watermark, records and content digest.
    pub digests: Vec<sync_core::digest::OwnerDigest>,
    /// Connected peers.
    pub peers: Vec<PeerStatus>,
}

struct Actors {
    shared: SharedRef,
    supervisor: Addr<TransferSupervisor>,
    exporter: Addr<SnapshotExporter>,
    indexer: Addr<Indexer>,
    arbiter: ArbiterHandle,
    system: System,
}

struct Inner {
    actors: Actors,
    generation: Arc<AtomicU64>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The host's handle on a running engine.
#[derive(Clone)]
pub struct SyncEngine {
    inner: Arc<Inner>,
}

/// Creates a device in `data_dir`: the library database, a new DeviceId, and
/// its key and certificate. Returns the device and its certificate fingerprint.
pub async fn init_device(
    data_dir: &Path,
    name: &str,
    library: Option<LibraryId>,
) -> Result<(DeviceInfo, CertFingerprint), EngineError> {
    let config = EngineConfig::new(data_dir);
    let store = Store::open(&config.db_path()).await?;
    let device = match store.device().await? {
        Some(d) => d,
        None => {
            store
                .create_device(name, library.unwrap_or_else(LibraryId::new_v7))
                .await?
        }
    };
    let identity = Identity::load_or_create(&config.identity_dir(), device.device_id)?;
    Ok((device, identity.fingerprint))
}

async fn boot(config: EngineConfig) -> Result<Actors, EngineError> {
    let store = Store::open(&config.db_path()).await?;
    let device = store
        .device()
        .await?
        .ok_or_else(|| EngineError::NotInitialized(config.data_dir.display().to_string()))?;
    // Clear what a crash left behind, before any export can run (so files
    // no manifest names are orphans): files of an export killed before its
    // manifest was saved, superseded snapshots, and downloads of snapshots
    // whose import committed before the crash.
    if let Err(e) = store.prune_snapshots(KEEP_SNAPSHOTS, true).await {
        tracing::warn!(cause = %e, "cannot prune old snapshots");
    }
    if let Err(e) = store.prune_downloads().await {
        tracing::warn!(cause = %e, "cannot prune finished downloads");
    }
    let identity = Identity::load(&config.identity_dir())?;
    let trust = TrustStore::load(&config.trust_path(), device.device_id)?;
    let net = NetConfig::new(
        Arc::new(identity),
        trust,
        device.library_id,
        device.name.clone(),
    );
    let (events, _) = broadcast::channel(4096);
    let shared = Arc::new(Shared {
        store,
        device,
        config,
        net,
        events,
        shutdown: CancellationToken::new(),
        connected: tokio::sync::watch::Sender::new(Default::default()),
        verify: Default::default(),
        repairs: Default::default(),
        panic_injected: std::sync::atomic::AtomicBool::new(false),
        commits_in_flight: std::sync::atomic::AtomicUsize::new(0),
    });
    let exporter = SnapshotExporter::new(shared.clone()).start();
    let supervisor = TransferSupervisor::new(shared.clone(), exporter.clone()).start();
    let indexer = Indexer::new(shared.clone(), supervisor.clone()).start();
    actix_rt::spawn(
        watch_trust(shared.clone(), supervisor.clone()).instrument(info_span!("trust")),
    );
    Ok(Actors {
        shared,
        supervisor,
        exporter,
        indexer,
        arbiter: Arbiter::current(),
        system: System::current(),
    })
}

impl SyncEngine {
    /// Starts an engine for an initialized data directory, on its own thread.
    ///
    /// Takes the data directory's lock first (one engine per library, in
    /// any process): a second engine fails at once with
    /// [`sync_storage::StorageError::InUse`] naming the holder's pid. The
    /// lock is released by [`SyncEngine::shutdown`] (or when the process
    /// ends). The engine's thread owns it: a handle dropped without
    /// `shutdown` leaves that thread (its actors, its connections to the
    /// library) running, and so the library locked.
    pub async fn start(config: EngineConfig) -> Result<SyncEngine, EngineError> {
        let lock = DirLock::acquire(&config.data_dir)?;
        let (tx, rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("sync-engine".into())
            .spawn(move || {
                // Connections still held by tasks are dropped after the
                // System's runtime is gone; sqlx then spawns their return to
                // the pool, which needs *a* Tokio context. This idle runtime
                // is that context (entering a handle does not make
                // `System::new()`'s block_on nest inside a runtime).
                let fallback = tokio::runtime::Builder::new_current_thread().build();
                let _context = fallback.as_ref().ok().map(|rt| rt.enter());
                let system = System::new();
                let ok = system.block_on(async move {
                    let res = boot(config).await;
                    let ok = res.is_ok();
                    let _ = tx.send(res);
                    ok
                });
                if ok {
                    let _ = system.run();
                }
                // Another engine may open the library from now on.
                drop(lock);
            })
            .map_err(|e| EngineError::Thread(e.to_string()))?;
        let actors = match rx.await {
            Ok(Ok(actors)) => actors,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(EngineError::Thread("engine thread died at start".into())),
        };
        info!(device = %actors.shared.me().fmt_short(), "engine started");
        Ok(SyncEngine {
            inner: Arc::new(Inner {
                actors,
                generation: Arc::new(AtomicU64::new(1)),
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    fn actors(&self) -> &Actors {
        &self.inner.actors
    }

    /// This device.
    pub fn device(&self) -> &DeviceInfo {
        &self.actors().shared.device
    }

    /// This device's certificate fingerprint.
    pub fn fingerprint(&self) -> CertFingerprint {
        self.actors().shared.net.identity.fingerprint
    }

    /// The network configuration (identity, trust store, limits).
    pub fn net_config(&self) -> NetConfig {
        self.actors().shared.net.clone()
    }

    /// The library store (for reads by the host).
    pub fn store(&self) -> Store {
        self.actors().shared.store.clone()
    }

    /// Runs a future on the engine's thread and awaits its output.
    async fn on_engine<F, T>(&self, fut: F) -> Result<T, EngineError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let spawned = self.actors().arbiter.spawn(async move {
            let _ = tx.send(fut.await);
        });
        if !spawned {
            return Err(EngineError::Shutdown);
        }
        rx.await.map_err(|_| EngineError::Shutdown)
    }

    /// Accepts trusted peers on `addr` (e.g. `127.0.0.1:0`); returns the bound address.
    pub async fn listen(&self, addr: &str) -> Result<SocketAddr, EngineError> {
        let shared = self.actors().shared.clone();
        let supervisor = self.actors().supervisor.clone();
        let exporter = self.actors().exporter.clone();
        let generation = self.inner.generation.clone();
        let addr = addr.to_string();
        self.on_engine(async move {
            let listener = Listener::bind(&addr, shared.net.clone()).await?;
            let local = listener.local_addr();
            let span = info_span!("listen", addr = %local);
            actix_rt::spawn(
                async move {
                    loop {
                        tokio::select! {
                            _ = shared.shutdown.cancelled() => break,
                            res = listener.accept() => match res {
                                Ok(conn) => {
                                    start_session(&shared, &supervisor, &exporter, &generation, conn, SessionOrigin::Accepted, None);
                                }
                                Err(e) => {
                                    warn!(cause = %e, "accept failed");
                                    shared.emit(SyncEvent::PeerRefused { addr: String::new(), cause: e.to_string() });
                                }
                            }
                        }
                    }
                }
                .instrument(span),
            );
            Ok::<_, EngineError>(local)
        })
        .await?
    }

    /// Dials a peer, starts a session, and keeps reconnecting (with backoff)
    /// whenever the link drops, until shutdown. Transfers resume from the
    /// peer's watermark on each new session.
    pub async fn connect(&self, addr: &str) -> Result<PeerInfo, EngineError> {
        let shared = self.actors().shared.clone();
        let supervisor = self.actors().supervisor.clone();
        let exporter = self.actors().exporter.clone();
        let generation = self.inner.generation.clone();
        let addr = addr.to_string();
        self.on_engine(async move {
            let conn = sync_net::dial(&addr, &shared.net).await?;
            let info = conn.peer.clone();
            let (tx, rx) = oneshot::channel();
            let dialed = SessionOrigin::Dialed;
            start_session(
                &shared,
                &supervisor,
                &exporter,
                &generation,
                conn,
                dialed,
                Some(tx),
            );
            let span = info_span!("redial", addr = %addr, peer = %info.device.fmt_short());
            let peer = info.device;
            actix_rt::spawn(
                redial(shared, supervisor, exporter, generation, addr, peer, rx).instrument(span),
            );
            Ok::<_, EngineError>(info)
        })
        .await?
    }

    /// Starts a session over an already authenticated connection (for
    /// example an in-memory one). No reconnection: the caller owns the link.
    /// The returned receiver hears when the session ends.
    pub async fn attach(
        &self,
        conn: Connection,
    ) -> Result<oneshot::Receiver<Option<String>>, EngineError> {
        let shared = self.actors().shared.clone();
        let supervisor = self.actors().supervisor.clone();
        let exporter = self.actors().exporter.clone();
        let generation = self.inner.generation.clone();
        let (tx, rx) = oneshot::channel();
        self.on_engine(async move {
            let attached = SessionOrigin::Attached;
            start_session(
                &shared,
                &supervisor,
                &exporter,
                &generation,
                conn,
                attached,
                Some(tx),
            );
        })
        .await?;
        Ok(rx)
    }

    /// Commits changes of this device's own records (bulk, new seqs) and
    /// starts transfers to connected peers.
    pub async fn commit(&self, changes: Vec<LocalChange>) -> Result<SeqRange, EngineError> {
        self.actors()
            .indexer
            .send(Commit(changes))
            .await
            .map_err(|_| EngineError::Shutdown)?
    }

    /// Walks a real folder into a location of this device (creates,
    /// updates and deletes committed in bulk) and starts transfers.
    pub async fn index(
        &self,
        path: &Path,
        progress: Option<Progress>,
    ) -> Result<IndexReport, EngineError> {
        self.actors()
            .indexer
            .send(IndexPath {
                path: path.to_path_buf(),
                progress,
            })
            .await
            .map_err(|_| EngineError::Shutdown)?
    }

    /// Tells the engine what the host did.
    pub async fn publish(&self, event: HostEvent) -> Result<(), EngineError> {
        match event {
            HostEvent::EntriesCommitted { .. } | HostEvent::LocationIndexed { .. } => self
                .actors()
                .supervisor
                .send(Pump(None))
                .await
                .map_err(|_| EngineError::Shutdown),
            HostEvent::PeerAddressKnown { addr } => self.connect(&addr).await.map(|_| ()),
        }
    }

    /// Sync events: connections, transfers, progress, imports.
    pub fn subscribe(&self) -> broadcast::Receiver<SyncEvent> {
        self.actors().shared.events.subscribe()
    }

    /// Connected peers and their transfers (cheap).
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, EngineError> {
        self.actors()
            .supervisor
            .send(GetPeers)
            .await
            .map_err(|_| EngineError::Shutdown)
    }

    /// Collects this device's tombstones now (the engine also does every
    /// `EngineConfig::gc_interval`): those older than the horizon and
    /// acknowledged by every trusted peer known to hold them. Peers follow.
    pub async fn collect_tombstones(&self) -> Result<crate::gc::Collected, EngineError> {
        self.actors()
            .supervisor
            .send(crate::supervisor::CollectTombstones)
            .await
            .map_err(|_| EngineError::Shutdown)?
    }

    /// Everything: owners with fingerprints (reads every record) and peers.
    pub async fn status(&self) -> Result<EngineStatus, EngineError> {
        let store = self.store();
        let local = store.local_watermark().await?;
        let owners = store.summaries().await?;
        let digests = store.owner_digests().await?;
        Ok(EngineStatus {
            digests,
            device_id: self.device().device_id,
            library_id: self.device().library_id,
            local,
            owners,
            peers: self.peers().await?,
        })
    }

    /// Whether this device and `peer` hold each other's records as far as
    /// their last exchanged watermarks and acknowledgements show.
    pub async fn synced_with(&self, peer: DeviceId) -> Result<bool, EngineError> {
        let Some(p) = self.peers().await?.into_iter().find(|p| p.peer == peer) else {
            return Ok(false);
        };
        let store = self.store();
        let local = store.local_watermark().await?;
        // Exactly what this device has: a peer holding more of its current
        // index (this device went back in time) or rows of another index
        // is not in sync with it, even when this device holds nothing.
        let they_hold_mine = match p.holds_of_me {
            None => local.seq == Seq::ZERO,
            Some(h) if h.index_id == local.index_id => h.seq == local.seq,
            Some(h) => h.seq == Seq::ZERO && local.seq == Seq::ZERO,
        };
        let i_hold_theirs = match p.advertised {
            None => false,
            Some(adv) if adv.seq.0 == 0 => true,
            Some(adv) => store
                .watermark(peer)
                .await?
                .is_some_and(|w| w.index_id == adv.index_id && w.seq >= adv.seq),
        };
        Ok(they_hold_mine && i_hold_theirs && p.outgoing.is_none())
    }

    /// Waits until `synced_with(peer)` holds, polling; `false` on timeout.
    pub async fn wait_synced(
        &self,
        peer: DeviceId,
        timeout: Duration,
    ) -> Result<bool, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.synced_with(peer).await? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops gracefully: no new connections, sessions finish the batches
    /// they hold (commits are transactional; acks follow commits), then the
    /// actix System stops and its thread is joined.
    pub async fn shutdown(&self) -> Result<(), EngineError> {
        let actors = self.actors();
        actors.shared.shutdown.cancel();
        if let Ok(n) = actors.supervisor.send(CloseAll).await
            && n > 0
        {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                match self.peers().await {
                    Ok(p) if p.is_empty() => break,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(_) => break,
                }
            }
        }
        if let Err(e) = actors.shared.store.checkpoint().await {
            warn!(cause = %e, "WAL checkpoint at shutdown failed");
        }
        actors.system.stop();
        let thread = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // The thread has ended, and released the data directory's lock.
        info!("engine stopped");
        Ok(())
    }
}

/// Starts a `PeerSession` actor for a connection (on the engine thread).
fn start_session(
    shared: &SharedRef,
    supervisor: &Addr<TransferSupervisor>,
    exporter: &Addr<SnapshotExporter>,
    generation: &AtomicU64,
    conn: Connection,
    origin: SessionOrigin,
    on_close: Option<oneshot::Sender<Option<String>>>,
) {
    let (peer, reader, writer) = conn.split();
    let generation = generation.fetch_add(1, Ordering::Relaxed);
    PeerSession::new(
        shared.clone(),
        peer,
        reader,
        writer,
        generation,
        origin,
        supervisor.clone(),
        exporter.clone(),
        on_close,
    )
    .start();
}

/// Why a session closed when a newer one to the same peer took its place.
pub(crate) const REPLACED: &str = "replaced by a newer session";

/// Why a session closed when the peer dialed this device while this device
/// dialed it (or the other way round): both devices keep the connection
/// dialed by the lower device id (`supervisor::keep_newer`).
pub(crate) const TIE_LOST: &str =
    "closed: the peer is connected through the session dialed by the lower device id";

/// How a session closed because its peer's pin was removed begins.
pub(crate) const REVOKED: &str = "trust revoked";

/// How often the engine looks for changes another process made to
/// `trust.json` (one `stat` unless it changed).
const TRUST_POLL: Duration = Duration::from_secs(1);

/// Reloads the trust store when the file changes, and tells the supervisor
/// of every change (from the file, or made through this process's
/// handles), so that it closes the sessions of peers no longer pinned.
async fn watch_trust(shared: SharedRef, supervisor: Addr<TransferSupervisor>) {
    let trust = shared.net.trust.clone();
    let mut changes = trust.subscribe();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                supervisor.do_send(TrustChanged);
            }
            _ = tokio::time::sleep(TRUST_POLL) => {
                if let Err(e) = trust.refresh() {
                    warn!(cause = %e, "cannot check the trust store for changes");
                }
            }
        }
    }
}

/// A session that lasted this long resets the redial backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Keeps a dialed peer connected: after each session ends, dials again with
/// exponential backoff until shutdown. It stands by, without dialing, while
/// the peer is connected through another session (the one the lower device
/// id dialed, when both dial), and dials again once that one ends: a
/// device that lost the tie-break must not be left with no session and no
/// loop when the winner stops dialing (its engine restarted, say).
async fn redial(
    shared: SharedRef,
    supervisor: Addr<TransferSupervisor>,
    exporter: Addr<SnapshotExporter>,
    generation: Arc<AtomicU64>,
    addr: String,
    mut peer: DeviceId,
    mut closed: oneshot::Receiver<Option<String>>,
) {
    let mut attempt = 0u32;
    let mut since = tokio::time::Instant::now();
    loop {
        let cause = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            cause = &mut closed => cause.ok().flatten(),
        };
        // Only a session that held up resets the backoff: one that fails
        // right away (a full disk, a refusal) must not turn into a busy loop.
        if since.elapsed() >= STABLE_SESSION || cause.as_deref() == Some(TIE_LOST) {
            attempt = 0;
        }
        if cause.as_deref() == Some(REPLACED) {
            // A newer session this device dialed took over; its own loop redials.
            return;
        }
        if cause.as_deref().is_some_and(|c| c.starts_with(REVOKED)) {
            // The peer is no longer trusted: dialing it again is pointless.
            info!("peer revoked: not redialing");
            return;
        }
        loop {
            attempt += 1;
            let delay = shared.config.backoff(attempt);
            tokio::select! {
                _ = shared.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            match stand_by(&shared, peer).await {
                StandBy::Shutdown => return,
                // Connected until a moment ago: back off afresh, so that the
                // lower id's own redial (if it has one) can come first.
                StandBy::Waited => {
                    attempt = 0;
                    continue;
                }
                StandBy::NotConnected => {}
            }
            match sync_net::dial(&addr, &shared.net).await {
                Ok(conn) => {
                    info!(attempt, "reconnected");
                    peer = conn.peer.device;
                    let (tx, rx) = oneshot::channel();
                    let dialed = SessionOrigin::Dialed;
                    start_session(
                        &shared,
                        &supervisor,
                        &exporter,
                        &generation,
                        conn,
                        dialed,
                        Some(tx),
                    );
                    closed = rx;
                    since = tokio::time::Instant::now();
                    break;
                }
                Err(e) => {
                    warn!(attempt, cause = %e, "reconnect failed");
                    shared.emit(SyncEvent::PeerRefused {
                        addr: addr.clone(),
                        cause: e.to_string(),
                    });
                }
            }
        }
    }
}

/// How [`stand_by`] ended.
enum StandBy {
    /// The peer had no session: dial it.
    NotConnected,
    /// The peer had a session, which has ended since.
    Waited,
    /// The engine is stopping.
    Shutdown,
}

/// Waits while `peer` has a session (through any connection).
async fn stand_by(shared: &Shared, peer: DeviceId) -> StandBy {
    let mut connected = shared.connected.subscribe();
    if !connected.borrow_and_update().contains(&peer) {
        return StandBy::NotConnected;
    }
    info!("peer connected through another session: standing by");
    tokio::select! {
        _ = shared.shutdown.cancelled() => StandBy::Shutdown,
        _ = connected.wait_for(|peers| !peers.contains(&peer)) => StandBy::Waited,
    }
}
