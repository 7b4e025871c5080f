//! `PeerSession`: one authenticated connection. Sends `Watermarks`, routes
//! inbound frames (the peer's records to its `BulkFetchJob`, acks and pulls
//! to the `TransferSupervisor`, snapshot requests to the
//! `SnapshotExporter`), and owns the bounded outbound queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use sync_core::reconcile::{ReconMessage, Reconciler, Role, View};
use sync_core::untrusted::for_log;
use sync_core::{DeviceId, ErrorCode, Message as Wire, Seq, TransferId};
use sync_net::{ConnReader, ConnWriter, NetError, PeerInfo};
use sync_storage::SnapshotOfferInfo;
use tokio::sync::oneshot;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::bulk_fetch::{Abort, BulkFetchJob, Drain, Inbound};
use crate::events::SyncEvent;
use crate::shared::SharedRef;
use crate::snapshot_exporter::{ServeChunks, SnapshotExporter};
use crate::supervisor::{
    AckReceived, FetchReceived, PeerWatermarks, RepairWanted, SessionClosed, SessionOpened,
    SessionOrigin, TransferSupervisor,
};

/// The job receiving the peer's records ended (`cause` is `None` when it
/// drained cleanly).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct InboundEnded {
    pub cause: Option<String>,
}

/// The reader ended: the link closed or failed.
#[derive(Message)]
#[rtype(result = "()")]
struct ReaderEnded {
    cause: Option<String>,
}

/// Close the session gracefully: queued inbound work finishes first.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CloseSession {
    pub cause: Option<String>,
}

/// The peer's pin was removed: stop reading now, drop what it queued
/// unapplied (the writer is aborted too), then close.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RevokeSession {
    pub cause: String,
}

/// One connection's actor.
pub(crate) struct PeerSession {
    shared: SharedRef,
    peer: PeerInfo,
    generation: u64,
    origin: SessionOrigin,
    writer: ConnWriter,
    reader: Option<ConnReader>,
    supervisor: Addr<TransferSupervisor>,
    exporter: Addr<SnapshotExporter>,
    job: Option<Addr<BulkFetchJob>>,
    reader_task: Option<tokio::task::AbortHandle>,
    cause: Option<String>,
    closing: bool,
    on_close: Option<oneshot::Sender<Option<String>>>,
    span: tracing::Span,
}

impl PeerSession {
    /// A session over an authenticated connection; `on_close` hears when it ends.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: SharedRef,
        peer: PeerInfo,
        reader: ConnReader,
        writer: ConnWriter,
        generation: u64,
        origin: SessionOrigin,
        supervisor: Addr<TransferSupervisor>,
        exporter: Addr<SnapshotExporter>,
        on_close: Option<oneshot::Sender<Option<String>>>,
    ) -> Self {
        let span =
            info_span!("session", peer = %peer.device.fmt_short(), addr = %peer.addr, ?origin);
        PeerSession {
            shared,
            peer,
            generation,
            origin,
            writer,
            reader: Some(reader),
            supervisor,
            exporter,
            job: None,
            reader_task: None,
            cause: None,
            closing: false,
            on_close,
            span,
        }
    }

    fn begin_close(&mut self, cause: Option<String>, ctx: &mut Context<Self>) {
        if self.cause.is_none() {
            self.cause = cause;
        }
        if self.closing {
            return;
        }
        self.closing = true;
        if let Some(task) = &self.reader_task {
            task.abort();
        }
        match &self.job {
            // Let the job finish what is queued; it reports InboundEnded.
            Some(job) if job.connected() => job.do_send(Drain),
            _ => ctx.stop(),
        }
        // Never hang on a stuck job.
        ctx.run_later(std::time::Duration::from_secs(10), |_, ctx| ctx.stop());
    }
}

impl Actor for PeerSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        info!(name = %self.peer.name, "peer connected");
        let peer_max = Arc::new(AtomicU64::new(0));
        let job = BulkFetchJob::new(
            self.shared.clone(),
            self.peer.device,
            self.writer.clone(),
            ctx.address(),
            peer_max.clone(),
        )
        .start();
        self.job = Some(job.clone());
        self.supervisor.do_send(SessionOpened {
            peer: self.peer.clone(),
            generation: self.generation,
            origin: self.origin,
            writer: self.writer.clone(),
            session: ctx.address(),
        });
        self.shared.emit(SyncEvent::PeerConnected {
            peer: self.peer.device,
            name: self.peer.name.clone(),
            addr: self.peer.addr.clone(),
        });
        let Some(reader) = self.reader.take() else {
            return;
        };
        let route = Router {
            shared: self.shared.clone(),
            peer: self.peer.device,
            generation: self.generation,
            writer: self.writer.clone(),
            supervisor: self.supervisor.clone(),
            exporter: self.exporter.clone(),
            job,
            peer_max,
            recon: tokio::sync::Mutex::new(None),
        };
        let session = ctx.address();
        let task = actix_rt::spawn(
            async move {
                let cause = route.run(reader).await;
                session.do_send(ReaderEnded { cause });
            }
            .instrument(self.span.clone()),
        );
        self.reader_task = Some(task.abort_handle());
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let _enter = self.span.clone().entered();
        if let Some(task) = &self.reader_task {
            task.abort();
        }
        info!(
            cause = self.cause.as_deref().unwrap_or("closed"),
            "peer disconnected"
        );
        self.supervisor.do_send(SessionClosed {
            peer: self.peer.device,
            generation: self.generation,
        });
        self.shared.emit(SyncEvent::PeerDisconnected {
            peer: self.peer.device,
            cause: self.cause.clone(),
        });
        let writer = self.writer.clone();
        actix_rt::spawn(async move { writer.close().await });
        if let Some(tx) = self.on_close.take() {
            let _ = tx.send(self.cause.clone());
        }
    }
}

impl Handler<InboundEnded> for PeerSession {
    type Result = ();
    fn handle(&mut self, msg: InboundEnded, ctx: &mut Context<Self>) {
        self.job = None;
        if self.cause.is_none() {
            self.cause = msg.cause;
        }
        if self.closing {
            ctx.stop();
        } else {
            // The receive side failed: close, and let the dialer reconnect
            // and resume from the watermark.
            let cause = self.cause.clone();
            self.begin_close(cause, ctx);
        }
    }
}

impl Handler<ReaderEnded> for PeerSession {
    type Result = ();
    fn handle(&mut self, msg: ReaderEnded, ctx: &mut Context<Self>) {
        self.begin_close(msg.cause, ctx);
    }
}

impl Handler<RevokeSession> for PeerSession {
    type Result = ();
    fn handle(&mut self, msg: RevokeSession, ctx: &mut Context<Self>) {
        self.writer.abort();
        // Nothing more of a revoked peer is written: frames it queued before
        // the pin went are dropped, not drained (found by the attack review).
        if let Some(job) = &self.job {
            job.do_send(Abort);
        }
        // The cause replaces any earlier one: this is why the session ends.
        self.cause = Some(msg.cause.clone());
        self.begin_close(Some(msg.cause), ctx);
    }
}

impl Handler<CloseSession> for PeerSession {
    type Result = ();
    fn handle(&mut self, msg: CloseSession, ctx: &mut Context<Self>) {
        self.begin_close(msg.cause, ctx);
    }
}

/// Routes one connection's inbound frames.
struct Router {
    shared: SharedRef,
    peer: DeviceId,
    generation: u64,
    writer: ConnWriter,
    supervisor: Addr<TransferSupervisor>,
    exporter: Addr<SnapshotExporter>,
    job: Addr<BulkFetchJob>,
    peer_max: Arc<AtomicU64>,
    /// The reconciliation this device is answering: the repair, its state
    /// and its view of the peer's records.
    recon: tokio::sync::Mutex<Option<(TransferId, Reconciler, View)>>,
}

impl Router {
    /// Reads until the link ends; returns why, or `None` for a clean close.
    async fn run(self, mut reader: ConnReader) -> Option<String> {
        // Digests first (rows another program changed are found before
        // they are claimed), so that the peer's plan for this device's
        // records, made when `Watermarks` arrives, knows what it holds.
        if let Err(e) = crate::verify::audit(&self.shared).await {
            warn!(cause = %e, "digest audit failed");
        }
        match crate::verify::digests_message(&self.shared).await {
            Ok(msg) => {
                if let Err(e) = self.writer.send(msg).await {
                    return Some(format!("link lost: {e}"));
                }
            }
            Err(e) => return Some(e.to_string()),
        }
        match self.shared.watermarks_message().await {
            Ok(msg) => {
                if let Err(e) = self.writer.send(msg).await {
                    return Some(format!("link lost: {e}"));
                }
            }
            Err(e) => return Some(e.to_string()),
        }
        loop {
            let received = tokio::select! {
                r = reader.recv() => r,
                // A broken write side means a broken link, even while the
                // peer is silent: stop instead of waiting for the idle timeout.
                _ = self.writer.closed() => return Some("link lost: the connection's writer stopped".into()),
            };
            let msg = match received {
                Ok(Some(msg)) => msg,
                Ok(None) => return None,
                Err(NetError::Refused { code, message }) => {
                    // The connection already bounded the peer's text; this
                    // keeps any other source of a refusal just as safe.
                    let message = for_log(&message);
                    warn!(peer = %self.peer.fmt_short(), ?code, %message, "peer refused");
                    return Some(format!("peer refused: {code:?}: {message}"));
                }
                Err(e) => {
                    warn!(peer = %self.peer.fmt_short(), cause = %e, "link failed");
                    return Some(e.to_string());
                }
            };
            if let Err(refusal) = self.route(msg).await {
                warn!(peer = %self.peer.fmt_short(), code = ?refusal.0, cause = %refusal.1, "refusing peer");
                let _ = self
                    .writer
                    .send(Wire::Error {
                        code: refusal.0,
                        message: refusal.1.clone(),
                    })
                    .await;
                return Some(refusal.1);
            }
        }
    }

    fn own(&self, owner: DeviceId, what: &str) -> Result<(), (ErrorCode, String)> {
        if owner != self.peer {
            return Err((
                ErrorCode::ForeignOwner,
                format!(
                    "{what} of owner {} from peer {}: a peer may only send its own records",
                    owner, self.peer
                ),
            ));
        }
        Ok(())
    }

    /// Answers one reconciliation round about the peer's records, from this
    /// device's copy of them (persisted buckets plus the items of the
    /// buckets the round needs).
    async fn answer_round(
        &self,
        transfer: TransferId,
        owner: DeviceId,
        upto: Seq,
        round: ReconMessage,
    ) -> Result<(), (ErrorCode, String)> {
        let storage = |e: crate::error::EngineError| (ErrorCode::Storage, e.to_string());
        let mut guard = self.recon.lock().await;
        if guard.as_ref().is_none_or(|r| r.0 != transfer) {
            let held = self
                .shared
                .store
                .watermark(owner)
                .await
                .map_err(|e| storage(e.into()))?
                .map_or(Seq::ZERO, |w| w.seq);
            let view = crate::repair::view_of(&self.shared.store, owner, held)
                .await
                .map_err(storage)?;
            *guard = Some((transfer, Reconciler::new(Role::Responder, upto), view));
        }
        let Some((_, rec, view)) = guard.as_mut() else {
            return Ok(());
        };
        let need = rec.buckets_needed(view, &round);
        crate::repair::load_buckets(&self.shared.store, owner, view, need)
            .await
            .map_err(storage)?;
        let (reply, _) = rec.respond(view, &round).map_err(|e| {
            (
                ErrorCode::Malformed,
                format!("reconciliation round refused: {e}"),
            )
        })?;
        self.writer
            .send(Wire::ReconReply {
                transfer,
                round: reply,
            })
            .await
            .map_err(|e| (ErrorCode::Unexpected, format!("link lost: {e}")))
    }

    async fn to_job(&self, msg: Inbound) -> Result<(), (ErrorCode, String)> {
        match self.job.send(msg).await {
            Ok(Ok(())) => Ok(()),
            _ => Err((ErrorCode::Storage, "receive job ended".into())),
        }
    }

    async fn route(&self, msg: Wire) -> Result<(), (ErrorCode, String)> {
        match msg {
            Wire::Watermarks(list) => {
                let me = self.shared.me();
                let holds = list
                    .iter()
                    .find(|(owner, _, _)| *owner == me)
                    .map(|(_, i, s)| sync_core::Watermark::new(*i, *s));
                if let Some((_, _, s)) = list.iter().find(|(owner, _, _)| *owner == self.peer) {
                    self.peer_max.store(s.0, Ordering::Relaxed);
                }
                let advertised = list
                    .iter()
                    .find(|(owner, _, _)| *owner == self.peer)
                    .map(|(_, i, s)| sync_core::Watermark::new(*i, *s));
                self.supervisor.do_send(PeerWatermarks {
                    peer: self.peer,
                    generation: self.generation,
                    holds_of_me: holds,
                    advertised,
                });
                Ok(())
            }
            Wire::StateChange {
                owner,
                index_id,
                after,
                record,
            } => {
                self.own(owner, "change")?;
                self.to_job(Inbound::Change {
                    index_id,
                    after,
                    record: Box::new(record),
                })
                .await
            }
            Wire::StateBatch {
                transfer,
                owner,
                index_id,
                after,
                last,
                count,
                payload,
            } => {
                self.own(owner, "batch")?;
                self.to_job(Inbound::Batch {
                    transfer,
                    index_id,
                    after,
                    last,
                    count,
                    payload,
                })
                .await
            }
            Wire::BulkIndexComplete {
                owner,
                index_id,
                entry_count,
                max_seq,
                ..
            } => {
                self.own(owner, "bulk notice")?;
                if max_seq.0 > self.peer_max.load(Ordering::Relaxed) {
                    self.peer_max.store(max_seq.0, Ordering::Relaxed);
                }
                self.to_job(Inbound::Bulk {
                    index_id,
                    entry_count,
                    max_seq,
                })
                .await
            }
            Wire::SnapshotOffer {
                id,
                owner,
                index_id,
                max_seq,
                entries,
                bytes,
                chunks,
                hash,
            } => {
                self.own(owner, "snapshot")?;
                self.to_job(Inbound::Offer(SnapshotOfferInfo {
                    id,
                    owner,
                    index_id,
                    max_seq,
                    entries,
                    bytes,
                    chunks,
                    hash,
                }))
                .await
            }
            Wire::SnapshotChunk {
                id,
                index,
                hash,
                data,
            } => {
                self.to_job(Inbound::Chunk {
                    id,
                    index,
                    hash,
                    data,
                })
                .await
            }
            Wire::BatchAck { transfer, last } => {
                self.supervisor.do_send(AckReceived {
                    peer: self.peer,
                    generation: self.generation,
                    transfer,
                    last,
                });
                Ok(())
            }
            Wire::FetchRequest {
                transfer,
                owner,
                after,
                max_batches,
                ..
            } => {
                if owner != self.shared.me() {
                    return Err((
                        ErrorCode::ForeignOwner,
                        format!("pull of owner {owner}: this device serves only its own records"),
                    ));
                }
                self.supervisor.do_send(FetchReceived {
                    peer: self.peer,
                    generation: self.generation,
                    transfer,
                    after,
                    max_batches,
                });
                Ok(())
            }
            Wire::SnapshotRequest { id, from_chunk } => {
                self.exporter.do_send(ServeChunks {
                    id,
                    from_chunk,
                    peer: self.peer,
                    writer: self.writer.clone(),
                });
                Ok(())
            }
            Wire::Hello { .. } => Err((ErrorCode::Unexpected, "second hello".into())),
            Wire::Error { code, message } => {
                let message = for_log(&message).into_owned();
                debug!(?code, %message, "peer error frame");
                Err((code, message))
            }
            Wire::Keepalive => Ok(()),
            Wire::ReconRequest {
                transfer,
                owner,
                upto,
                round,
                ..
            } => {
                self.own(owner, "reconciliation")?;
                self.answer_round(transfer, owner, upto, round).await
            }
            Wire::ReconReply { transfer, round } => {
                // A reply to a repair that has ended is stale, not wrong.
                if let Some(inbox) = self.shared.repairs.get(&transfer) {
                    let _ = inbox.try_send(crate::repair::RepairInbound::Round(round));
                }
                Ok(())
            }
            Wire::RepairBatch {
                transfer,
                claim,
                extra,
                count,
                payload,
            } => {
                self.own(claim.owner, "repair")?;
                self.to_job(Inbound::Repair {
                    transfer,
                    claim,
                    extra,
                    count,
                    payload,
                })
                .await
            }
            Wire::Digests { claims, statement } => {
                if let Some(signed) = statement {
                    crate::verify::on_statement(&self.shared, self.peer, &claims, signed)
                        .await
                        .map_err(|e| (ErrorCode::BadStatement, e))?;
                }
                let compared = crate::verify::on_digests(&self.shared, self.peer, claims)
                    .await
                    .map_err(|e| (ErrorCode::Storage, e.to_string()))?;
                if let Some(claim) = compared.repair_mine {
                    self.supervisor.do_send(RepairWanted {
                        peer: self.peer,
                        generation: self.generation,
                        claim,
                    });
                }
                Ok(())
            }
        }
    }
}
