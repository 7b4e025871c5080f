//! `Indexer`: walks real folders into locations, and commits this device's
//! own changes (creates, updates, deletes) in bulk with new seqs, then
//! reports them so transfers start.

pub mod walk;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use sync_storage::{LocalChange, SeqRange};
use tracing::{Instrument, info, info_span};

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
}

impl Indexer {
    pub fn new(shared: SharedRef, supervisor: Addr<TransferSupervisor>) -> Self {
        Indexer { shared, supervisor }
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
        let count = msg.0.len();
        let span = info_span!("commit", owner = %shared.me().fmt_short(), count);
        Box::pin(
            async move {
                let guard = CommitGuard::new(&shared, msg.0.len());
                let range = shared.store.commit_local(shared.me(), msg.0).await;
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
            .instrument(span),
        )
    }
}

impl Handler<IndexPath> for Indexer {
    type Result = ResponseFuture<Result<walk::IndexReport, EngineError>>;

    fn handle(&mut self, msg: IndexPath, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        let supervisor = self.supervisor.clone();
        let span =
            info_span!("index", path = %msg.path.display(), location = tracing::field::Empty);
        Box::pin(
            async move {
                let started = Instant::now();
                let me = shared.me();
                let root = msg
                    .path
                    .canonicalize()
                    .map_err(|e| EngineError::Index(format!("{}: {e}", msg.path.display())))?;
                let root_str = root.to_string_lossy().into_owned();
                let location = shared
                    .store
                    .locations()
                    .await?
                    .into_iter()
                    .find(|l| l.owner == me && l.path == root_str);
                tracing::Span::current().record(
                    "location",
                    tracing::field::display(
                        location
                            .as_ref()
                            .map(|l| l.id.fmt_short())
                            .unwrap_or_default(),
                    ),
                );
                let existing = match &location {
                    // Live entries only: a path deleted and created again gets a new id.
                    Some(l) => shared.store.live_location_entries(l.id).await?,
                    None => Vec::new(),
                };
                let progress = msg.progress.clone();
                let stop = shared.shutdown.clone();
                let plan = tokio::task::spawn_blocking(move || {
                    // A walk cannot be dropped mid-way: it checks for shutdown.
                    let report = |n: u64| {
                        sync_core::crash_point("index.walk");
                        if let Some(p) = &progress {
                            p(n)
                        }
                        !stop.is_cancelled()
                    };
                    walk::plan_index(me, &root, location, existing, &report)
                })
                .await
                .map_err(|e| EngineError::Index(format!("walk task: {e}")))?
                .map_err(|e| EngineError::Index(format!("{}: {e}", msg.path.display())))?;
                let mut report = plan.report;
                if !plan.changes.is_empty() {
                    let guard = CommitGuard::new(&shared, plan.changes.len());
                    let range = shared.store.commit_local(me, plan.changes).await;
                    drop(guard);
                    if range.is_err() {
                        supervisor.do_send(Pump(None));
                    }
                    let range = range?;
                    if range.first <= range.last {
                        shared.emit(SyncEvent::LocalCommitted {
                            owner: me,
                            first: range.first,
                            last: range.last,
                        });
                        supervisor.do_send(Pump(None));
                    }
                }
                report.seconds = started.elapsed().as_secs_f64();
                info!(
                    entries = report.entries,
                    created = report.created,
                    updated = report.updated,
                    deleted = report.deleted,
                    skipped = report.skipped,
                    "indexed"
                );
                Ok(report)
            }
            .instrument(span),
        )
    }
}
