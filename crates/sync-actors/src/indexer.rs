//! `Indexer`: walks real folders into locations, and commits this device's
//! own changes (creates, updates, deletes) in bulk with new seqs, then
//! reports them so transfers start.
//!
//! Index runs of one folder (by canonical path, however the caller spelt
//! it) take turns (`run_locks.rs`): the second waits for the first, then
//! rescans into the same location and finds nothing new. Joining the
//! running walk instead would save that rescan but hand the second caller
//! a report, and a view of the folder, older than its own call.

mod run_locks;
pub mod walk;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use sync_core::names::{decode_os, encode_os};
use sync_core::{DeviceId, Location};
use sync_storage::{LocalChange, SeqRange};
use tracing::{Instrument, info, info_span, warn};

use crate::error::EngineError;
use crate::events::SyncEvent;
use crate::shared::{CommitGuard, SharedRef};
use crate::supervisor::{Pump, TransferSupervisor};

/// Commit changes of this device's records.
#[derive(Message)]
#[rtype(result = "Result<SeqRange, EngineError>")]
pub(crate) struct Commit(pub Vec<LocalChange>);

/// Called with the number of paths walked so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Index a folder as a location of this device.
#[derive(Message)]
#[rtype(result = "Result<walk::IndexReport, EngineError>")]
pub(crate) struct IndexPath {
    pub path: PathBuf,
    pub progress: Option<Progress>,
}

/// The indexer actor.
pub(crate) struct Indexer {
    shared: SharedRef,
    supervisor: Addr<TransferSupervisor>,
    runs: run_locks::RunLocks,
}

impl Indexer {
    pub fn new(shared: SharedRef, supervisor: Addr<TransferSupervisor>) -> Self {
        Indexer {
            shared,
            supervisor,
            runs: run_locks::RunLocks::default(),
        }
    }
}

impl Actor for Indexer {
    type Context = Context<Self>;
}

impl Handler<Commit> for Indexer {
    type Result = ResponseFuture<Result<SeqRange, EngineError>>;

    fn handle(&mut self, msg: Commit, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        let supervisor = self.supervisor.clone();
        let span = info_span!("commit", owner = %shared.me().fmt_short(), count = msg.0.len());
        Box::pin(commit(shared, supervisor, msg.0).instrument(span))
    }
}

/// Commits `changes` of this device's records, tells the host and pumps
/// the supervisor.
async fn commit(
    shared: SharedRef,
    supervisor: Addr<TransferSupervisor>,
    changes: Vec<LocalChange>,
) -> Result<SeqRange, EngineError> {
    let guard = CommitGuard::new(&shared, changes.len());
    let range = shared.store.commit_local(shared.me(), changes).await;
    drop(guard);
    if range.is_err() {
        // Part of a multi-transaction commit may have landed.
        supervisor.do_send(Pump(None));
    }
    let range = range?;
    info!(first = %range.first, last = %range.last, "committed");
    if range.first <= range.last {
        shared.emit(SyncEvent::LocalCommitted {
            owner: shared.me(),
            first: range.first,
            last: range.last,
        });
        supervisor.do_send(Pump(None));
    }
    Ok(range)
}

impl Handler<IndexPath> for Indexer {
    type Result = ResponseFuture<Result<walk::IndexReport, EngineError>>;

    fn handle(&mut self, msg: IndexPath, _: &mut Context<Self>) -> Self::Result {
        let run = IndexRun {
            shared: self.shared.clone(),
            supervisor: self.supervisor.clone(),
            runs: self.runs.clone(),
        };
        let span = info_span!(
            "index",
            device = %self.shared.me().fmt_short(),
            path = %msg.path.display(),
            location = tracing::field::Empty,
        );
        Box::pin(run.index(msg).instrument(span))
    }
}

/// What one index run needs of the indexer.
struct IndexRun {
    shared: SharedRef,
    supervisor: Addr<TransferSupervisor>,
    runs: run_locks::RunLocks,
}

impl IndexRun {
    /// Walks `msg.path` into its location (found by canonical path, made
    /// if there is none) and commits the changes, after any other run of
    /// the same folder.
    async fn index(self, msg: IndexPath) -> Result<walk::IndexReport, EngineError> {
        let started = Instant::now();
        let cannot = |e: std::io::Error| EngineError::Index(format!("{}: {e}", msg.path.display()));
        let root = tokio::fs::canonicalize(&msg.path).await.map_err(cannot)?;
        let _turn = self.runs.lock(&root).await;
        if self.shared.shutdown.is_cancelled() {
            return Err(EngineError::Shutdown);
        }
        let location = self.find_location(&root).await?;
        let existing = match &location {
            // Live entries only: a path deleted and created again gets a new id.
            Some(l) => self.shared.store.live_location_entries(l.id).await?,
            None => Vec::new(),
        };
        let plan = self
            .walk(root, location, existing, msg.progress)
            .await?
            .map_err(cannot)?;
        let mut report = plan.report;
        let location = report.location_id.fmt_short();
        tracing::Span::current().record("location", tracing::field::display(location));
        if !plan.changes.is_empty() {
            commit(self.shared.clone(), self.supervisor.clone(), plan.changes).await?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        log_report(&report);
        Ok(report)
    }

    /// This device's location of the folder `root` (canonical): the one
    /// whose stored path is `root`, else one whose stored path leads to
    /// `root` (stored otherwise spelt, or through a symlink); live ones
    /// first.
    async fn find_location(&self, root: &Path) -> Result<Option<Location>, EngineError> {
        let me = self.shared.me();
        let locations = self.shared.store.locations().await?;
        let root = root.to_path_buf();
        tokio::task::spawn_blocking(move || choose_location(locations, me, &root))
            .await
            .map_err(|e| EngineError::Index(format!("location lookup task: {e}")))
    }

    /// Plans the changes on the blocking pool.
    async fn walk(
        &self,
        root: PathBuf,
        location: Option<Location>,
        existing: Vec<sync_core::Entry>,
        progress: Option<Progress>,
    ) -> Result<std::io::Result<walk::WalkPlan>, EngineError> {
        let me = self.shared.me();
        let stop = self.shared.shutdown.clone();
        let unreadable = self.shared.config.faults.unreadable.clone();
        tokio::task::spawn_blocking(move || {
            // A walk cannot be dropped mid-way: it checks for shutdown.
            let report = |n: u64| {
                sync_core::crash_point("index.walk");
                if let Some(p) = &progress {
                    p(n)
                }
                !stop.is_cancelled()
            };
            walk::plan_index_with(me, &root, location, existing, &report, &unreadable)
        })
        .await
        .map_err(|e| EngineError::Index(format!("walk task: {e}")))
    }
}

/// The location of `me` for the canonical folder `root` among `locations`
/// (see [`IndexRun::find_location`]); canonicalises stored paths only if
/// none is `root` as it stands.
fn choose_location(locations: Vec<Location>, me: DeviceId, root: &Path) -> Option<Location> {
    let text = encode_os(root.as_os_str());
    let mine: Vec<Location> = locations.into_iter().filter(|l| l.owner == me).collect();
    let leads_to_root = |l: &Location| {
        Path::new(&decode_os(&l.path))
            .canonicalize()
            .is_ok_and(|p| p == root)
    };
    if let Some(l) = mine.iter().find(|l| l.path == text && !l.deleted) {
        return Some(l.clone());
    }
    mine.into_iter()
        .filter(|l| l.path == text || leads_to_root(l))
        .min_by_key(|l| (l.deleted, l.path != text))
}

fn log_report(report: &walk::IndexReport) {
    info!(
        entries = report.entries,
        created = report.created,
        updated = report.updated,
        deleted = report.deleted,
        skipped = report.skipped,
        kept = report.kept,
        "indexed"
    );
    if report.skipped > 0 {
        warn!(
            skipped = report.skipped,
            kept = report.kept,
            first = report.skipped_paths.first().map_or("", String::as_str),
            "unreadable paths skipped, their stored entries kept"
        );
    }
}
