//! `SnapshotExporter`: builds database snapshots of this device's records,
//! caches them while the owner's max seq is unchanged (so an interrupted
//! download resumes against the same file), and serves their chunks.

use std::collections::HashMap;

use actix::prelude::*;
use sync_core::{DeviceId, ErrorCode, Message as Wire, SnapshotId, Watermark};
use sync_net::ConnWriter;
use sync_storage::SnapshotManifest;
use tracing::{Instrument, info, info_span, warn};

use crate::error::EngineError;
use crate::shared::SharedRef;

/// Export (or reuse) a snapshot of this device's records.
#[derive(Message)]
#[rtype(result = "Result<SnapshotManifest, EngineError>")]
pub(crate) struct Export;

/// Stream chunks `from_chunk..` of snapshot `id` to a peer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ServeChunks {
    pub id: SnapshotId,
    pub from_chunk: u32,
    pub peer: DeviceId,
    pub writer: ConnWriter,
}

/// The snapshot actor.
pub(crate) struct SnapshotExporter {
    shared: SharedRef,
    latest: Option<(Watermark, SnapshotManifest)>,
    manifests: HashMap<SnapshotId, SnapshotManifest>,
    serving: HashMap<DeviceId, tokio::task::AbortHandle>,
}

impl SnapshotExporter {
    pub fn new(shared: SharedRef) -> Self {
        SnapshotExporter {
            shared,
            latest: None,
            manifests: HashMap::new(),
            serving: HashMap::new(),
        }
    }
}

/// Snapshots of this device kept on disk: the newest serves new peers,
/// the one before it finishes downloads already under way.
pub(crate) const KEEP_SNAPSHOTS: usize = 2;

impl Actor for SnapshotExporter {
    type Context = Context<Self>;
}

impl Handler<Export> for SnapshotExporter {
    type Result = ResponseActFuture<Self, Result<SnapshotManifest, EngineError>>;

    fn handle(&mut self, _: Export, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        let cached = self.latest.clone();
        Box::pin(
            async move {
                let local = shared.store.local_watermark().await?;
                if let Some((w, m)) = cached
                    && w == local
                    && m.path.exists()
                {
                    return Ok((local, m, true));
                }
                let span = info_span!("export", owner = %shared.me().fmt_short(), max_seq = %local.seq);
                let m = shared
                    .store
                    .export_snapshot(shared.me())
                    .instrument(span)
                    .await?;
                info!(snapshot = %m.id.fmt_short(), entries = m.entries, bytes = m.bytes, chunks = m.chunks.len(), "snapshot exported");
                // Superseded snapshots go, off the offer's path: in line, the
                // prune delayed the offer by 0.5-1 s at 1M entries (measured
                // with `lsync bench`), for a few rows and files.
                let store = shared.store.clone();
                actix_rt::spawn(async move {
                    if let Err(e) = store.prune_snapshots(KEEP_SNAPSHOTS, false).await {
                        warn!(cause = %e, "cannot prune old snapshots");
                    }
                });
                Ok::<_, EngineError>((local, m, false))
            }
            .into_actor(self)
            .map(|res, act, _| {
                let (w, m, _reused) = res?;
                act.manifests.retain(|_, old| old.path.exists());
                act.manifests.insert(m.id, m.clone());
                act.latest = Some((w, m.clone()));
                Ok(m)
            }),
        )
    }
}

impl Handler<ServeChunks> for SnapshotExporter {
    type Result = ();

    fn handle(&mut self, msg: ServeChunks, _: &mut Context<Self>) {
        if let Some(old) = self.serving.remove(&msg.peer) {
            old.abort();
        }
        let shared = self.shared.clone();
        let cached = self.manifests.get(&msg.id).cloned();
        let span = info_span!(
            "serve_snapshot",
            peer = %msg.peer.fmt_short(),
            snapshot = %msg.id.fmt_short(),
            from_chunk = msg.from_chunk
        );
        let task = actix_rt::spawn(
            async move {
                let manifest = match cached {
                    Some(m) => Some(m),
                    None => shared.store.snapshot_manifest(msg.id).await.ok().flatten(),
                };
                let Some(m) = manifest else {
                    warn!(peer = %msg.peer.fmt_short(), "unknown snapshot requested");
                    let _ = msg
                        .writer
                        .send(Wire::Error {
                            code: ErrorCode::BadSnapshot,
                            message: format!("unknown snapshot {}", msg.id),
                        })
                        .await;
                    return;
                };
                for index in msg.from_chunk..m.chunks.len() as u32 {
                    let (hash, data) = match shared.store.read_snapshot_chunk(&m, index).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(cause = %e, index, "snapshot chunk unreadable");
                            let _ = msg
                                .writer
                                .send(Wire::Error {
                                    code: ErrorCode::BadSnapshot,
                                    message: e.to_string(),
                                })
                                .await;
                            return;
                        }
                    };
                    let chunk = Wire::SnapshotChunk {
                        id: m.id,
                        index,
                        hash,
                        data,
                    };
                    // The bounded outbound queue is the brake.
                    if msg.writer.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            .instrument(span),
        );
        self.serving.insert(msg.peer, task.abort_handle());
    }
}
