//! `BulkFetchJob`: everything a peer sends of its own records on one
//! session — pushed batches, single changes, the bulk notice followed by
//! pulling with `FetchRequest`, and snapshot downloads — decoded off the
//! arbiter thread and applied through the single writer, in order.
//!
//! An acknowledgement is sent only after the commit that holds the rows and
//! the watermark. A refused batch (gap, foreign owner, wrong index) applies
//! nothing: the peer gets a typed `Error` and the session closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix::prelude::*;
use futures::StreamExt;
use sync_core::digest::OwnerDigest;
use sync_core::{
    BatchLimits, DeviceId, ErrorCode, Hash, IndexId, Message as Wire, Record, Seq, SnapshotId,
    Strategy, TransferId, Watermark, decode_records,
};
use sync_net::ConnWriter;
use sync_storage::{Checkpoint, SnapshotDownload, SnapshotOfferInfo, StorageError, TransferState};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::broadcaster::panic_message;
use crate::events::{Direction, SyncEvent};
use crate::peer_session::{InboundEnded, PeerSession};
use crate::shared::SharedRef;

/// One inbound frame about the peer's records.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), ()>")]
pub(crate) enum Inbound {
    /// A pushed or pulled batch.
    Batch {
        transfer: TransferId,
        index_id: IndexId,
        after: Seq,
        last: Seq,
        count: u32,
        payload: Vec<u8>,
    },
    /// One record.
    Change {
        index_id: IndexId,
        after: Seq,
        record: Box<Record>,
    },
    /// The peer holds many new records: pull them.
    Bulk {
        index_id: IndexId,
        entry_count: u64,
        max_seq: Seq,
    },
    /// A snapshot is ready.
    Offer(SnapshotOfferInfo),
    /// One snapshot chunk.
    Chunk {
        id: SnapshotId,
        index: u32,
        hash: Hash,
        data: Vec<u8>,
    },
    /// The records a repair sends, the seqs to drop, and the claim the
    /// result must match.
    Repair {
        transfer: TransferId,
        claim: OwnerDigest,
        extra: Vec<Seq>,
        count: u32,
        payload: Vec<u8>,
    },
}

/// Finish the queued work, then stop.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Drain;

/// The actor that receives one peer's records on one session.
pub(crate) struct BulkFetchJob {
    shared: SharedRef,
    peer: DeviceId,
    writer: ConnWriter,
    session: Addr<PeerSession>,
    peer_max: Arc<AtomicU64>,
    queue: Option<mpsc::Sender<Inbound>>,
    reported: bool,
    task: Option<tokio::task::AbortHandle>,
}

impl BulkFetchJob {
    pub fn new(
        shared: SharedRef,
        peer: DeviceId,
        writer: ConnWriter,
        session: Addr<PeerSession>,
        peer_max: Arc<AtomicU64>,
    ) -> Self {
        BulkFetchJob {
            shared,
            peer,
            writer,
            session,
            peer_max,
            queue: None,
            reported: false,
            task: None,
        }
    }

    fn report(&mut self, cause: Option<String>) {
        if !self.reported {
            self.reported = true;
            self.session.do_send(InboundEnded { cause });
        }
    }
}

impl Actor for BulkFetchJob {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Two frames queued: one decoding while one applies.
        let (tx, rx) = mpsc::channel(2);
        self.queue = Some(tx);
        let span = info_span!(
            "receive",
            peer = %self.peer.fmt_short(),
            owner = %self.peer.fmt_short(),
        );
        let receiver = Receiver {
            shared: self.shared.clone(),
            owner: self.peer,
            writer: self.writer.clone(),
            peer_max: self.peer_max.clone(),
            pull: None,
            push: None,
            download: None,
        };
        let handle = actix_rt::spawn(receiver.run(rx).instrument(span));
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, act, ctx| {
            let cause = match res {
                Ok(Ok(())) => None,
                Ok(Err(cause)) => Some(cause),
                Err(e) if e.is_panic() => {
                    Some(format!("receive task panicked: {}", panic_message(e)))
                }
                Err(_) => Some("receive task cancelled".into()),
            };
            act.report(cause);
            ctx.stop();
        }));
    }
}

impl Drop for BulkFetchJob {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        self.report(Some("receive job stopped".into()));
    }
}

impl Handler<Inbound> for BulkFetchJob {
    type Result = ResponseFuture<Result<(), ()>>;

    fn handle(&mut self, msg: Inbound, _: &mut Context<Self>) -> Self::Result {
        let queue = self.queue.clone();
        // Awaiting a full queue is the backpressure that reaches the socket.
        Box::pin(async move {
            match queue {
                Some(q) => q.send(msg).await.map_err(|_| ()),
                None => Err(()),
            }
        })
    }
}

/// Stop at once: queued frames are dropped unapplied and the work in
/// progress is cancelled (its transaction rolls back). For a revoked peer,
/// whose records must not be written once its pin is gone.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Abort;

impl Handler<Abort> for BulkFetchJob {
    type Result = ();
    fn handle(&mut self, _: Abort, _: &mut Context<Self>) {
        self.queue = None;
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Handler<Drain> for BulkFetchJob {
    type Result = ();
    fn handle(&mut self, _: Drain, _: &mut Context<Self>) {
        // Dropping the sender lets the task finish what is queued, then end.
        self.queue = None;
    }
}

/// A pull in progress (bulk strategy).
struct Pull {
    transfer: TransferId,
    target: Seq,
    start: Seq,
    started: Instant,
    records: u64,
    bytes: u64,
}

/// A pushed transfer being received.
struct Push {
    transfer: TransferId,
    start: Seq,
    target: Seq,
    started: Instant,
    records: u64,
    bytes: u64,
}

/// A snapshot download in progress.
struct Download {
    transfer: TransferId,
    offer: SnapshotOfferInfo,
    download: SnapshotDownload,
    started: Instant,
    bytes: u64,
}

/// The receive task's state.
struct Receiver {
    shared: SharedRef,
    owner: DeviceId,
    writer: ConnWriter,
    peer_max: Arc<AtomicU64>,
    pull: Option<Pull>,
    push: Option<Push>,
    download: Option<Download>,
}

/// A decoded frame, ready to apply.
enum Ready {
    Batch {
        transfer: TransferId,
        index_id: IndexId,
        after: Seq,
        last: Seq,
        bytes: u64,
        records: Vec<Record>,
    },
    Other(Inbound),
}

/// Why the receive task stops: sent to the peer as a typed error.
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Self {
        let code = match &e {
            StorageError::Gap { .. } => ErrorCode::Gap,
            StorageError::WrongIndex { .. } => ErrorCode::WrongIndex,
            StorageError::ForeignOwner { .. } | StorageError::LocalOwner { .. } => {
                ErrorCode::ForeignOwner
            }
            StorageError::BadRange { .. } | StorageError::DuplicateRecord { .. } => {
                ErrorCode::Malformed
            }
            StorageError::Db(_) | StorageError::Io(_) | StorageError::DiskFull { .. } => {
                ErrorCode::Storage
            }
            _ => ErrorCode::BadSnapshot,
        };
        Refusal {
            code,
            message: e.to_string(),
        }
    }
}

/// Decodes a payload of `count` records on the blocking pool, for no more
/// records than it declares (so the payload's size limit follows the
/// count too: a frame cannot make us allocate beyond what it claims); a
/// count above the protocol's maximum is refused unread.
async fn decode_counted(count: u32, payload: Vec<u8>) -> Result<Vec<Record>, Refusal> {
    // A protocol-wide limit, not this device's batch size: peers may be
    // configured differently.
    let protocol = BatchLimits::default();
    if count as usize > protocol.max_records {
        return Err(Refusal {
            code: ErrorCode::Malformed,
            message: sync_core::DecodeError::TooManyRecords {
                count: u64::from(count),
                max: protocol.max_records as u64,
            }
            .to_string(),
        });
    }
    let limits = BatchLimits {
        max_records: (count as usize).min(protocol.max_records),
        ..protocol
    };
    let records = tokio::task::spawn_blocking(move || decode_records(&payload, &limits))
        .await
        .map_err(|e| Refusal {
            code: ErrorCode::Malformed,
            message: format!("decode task: {e}"),
        })?
        .map_err(|e| Refusal {
            code: ErrorCode::Malformed,
            message: e.to_string(),
        })?;
    if records.len() as u64 != u64::from(count) {
        return Err(Refusal {
            code: ErrorCode::Malformed,
            message: format!("batch declares {count} records but holds {}", records.len()),
        });
    }
    Ok(records)
}

impl Receiver {
    async fn run(mut self, rx: mpsc::Receiver<Inbound>) -> Result<(), String> {
        // Decode the next batch on the blocking pool while this one applies.
        let decoded = tokio_stream_from(rx)
            .map(move |msg| async move {
                match msg {
                    Inbound::Batch {
                        transfer,
                        index_id,
                        after,
                        last,
                        count,
                        payload,
                    } => {
                        let bytes = payload.len() as u64;
                        let records = decode_counted(count, payload).await?;
                        Ok(Ready::Batch {
                            transfer,
                            index_id,
                            after,
                            last,
                            bytes,
                            records,
                        })
                    }
                    other => Ok(Ready::Other(other)),
                }
            })
            .buffered(2);
        futures::pin_mut!(decoded);
        while let Some(item) = decoded.next().await {
            let result = match item {
                Ok(ready) => self.apply(ready).await,
                Err(refusal) => Err(refusal),
            };
            if let Err(refusal) = result {
                warn!(
                    // This job receives the peer's own records: the peer is the owner.
                    peer = %self.owner.fmt_short(),
                    code = ?refusal.code,
                    cause = %sync_core::untrusted::for_log(&refusal.message),
                    "refusing peer data"
                );
                let _ = self
                    .writer
                    .send(Wire::Error {
                        code: refusal.code,
                        message: refusal.message.clone(),
                    })
                    .await;
                self.fail_checkpoints(&refusal.message).await;
                return Err(refusal.message);
            }
        }
        Ok(())
    }

    async fn apply(&mut self, ready: Ready) -> Result<(), Refusal> {
        match ready {
            Ready::Batch {
                transfer,
                index_id,
                after,
                last,
                bytes,
                records,
            } => {
                self.apply_batch(transfer, index_id, after, last, bytes, records)
                    .await
            }
            Ready::Other(Inbound::Change {
                index_id,
                after,
                record,
            }) => {
                let last = record.seq();
                let wm = self
                    .shared
                    .store
                    .apply_batch(self.owner, index_id, after, last, vec![*record])
                    .await?;
                self.applied(1, wm);
                self.ack(TransferId::default(), wm.seq).await
            }
            Ready::Other(Inbound::Bulk {
                index_id,
                entry_count,
                max_seq,
            }) => self.start_pull(index_id, entry_count, max_seq).await,
            Ready::Other(Inbound::Offer(offer)) => self.start_download(offer).await,
            Ready::Other(Inbound::Chunk {
                id,
                index,
                hash,
                data,
            }) => self.chunk(id, index, hash, data).await,
            Ready::Other(Inbound::Repair {
                transfer,
                claim,
                extra,
                count,
                payload,
            }) => self.repair(transfer, claim, extra, count, payload).await,
            Ready::Other(Inbound::Batch { .. }) => Ok(()),
        }
    }

    fn applied(&self, records: u64, watermark: Watermark) {
        self.shared.emit(SyncEvent::Applied {
            owner: self.owner,
            records,
            watermark,
        });
        // Caught up with what the peer advertised: compare digests.
        if watermark.seq.0 >= self.peer_max.load(Ordering::Relaxed) {
            crate::verify::send_digests_soon(self.shared.clone(), self.owner, self.writer.clone());
        }
    }

    /// Applies a repair: committed only if the result matches the claim.
    /// A result that does not match writes nothing and is acknowledged
    /// with the unchanged watermark (the source's records may have moved;
    /// it tries again), and digests go back so both sides see the state.
    async fn repair(
        &mut self,
        transfer: TransferId,
        claim: OwnerDigest,
        extra: Vec<Seq>,
        count: u32,
        payload: Vec<u8>,
    ) -> Result<(), Refusal> {
        let records = decode_counted(count, payload).await?;
        let n = records.len() as u64;
        match self.shared.store.apply_repair(claim, &extra, records).await {
            Ok(wm) => {
                self.applied(n, wm);
                self.ack(transfer, wm.seq).await
            }
            Err(e @ StorageError::RepairMismatch { .. }) => {
                warn!(peer = %self.owner.fmt_short(), cause = %e, "repair refused: nothing written");
                let held = self
                    .shared
                    .store
                    .watermark(self.owner)
                    .await?
                    .map_or(Seq::ZERO, |w| w.seq);
                crate::verify::send_digests_soon(
                    self.shared.clone(),
                    self.owner,
                    self.writer.clone(),
                );
                self.ack(transfer, held).await
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn ack(&self, transfer: TransferId, last: Seq) -> Result<(), Refusal> {
        self.writer
            .send(Wire::BatchAck { transfer, last })
            .await
            .map_err(|e| Refusal {
                code: ErrorCode::Unexpected,
                message: format!("link lost: {e}"),
            })
    }

    async fn send(&self, msg: Wire) -> Result<(), Refusal> {
        self.writer.send(msg).await.map_err(|e| Refusal {
            code: ErrorCode::Unexpected,
            message: format!("link lost: {e}"),
        })
    }

    async fn watermark_now(&self) -> Result<Seq, Refusal> {
        Ok(self
            .shared
            .store
            .watermark(self.owner)
            .await?
            .map(|w| w.seq)
            .unwrap_or(Seq::ZERO))
    }

    async fn checkpoint(
        &self,
        transfer: TransferId,
        strategy: Strategy,
        last: Seq,
        snapshot: Option<(SnapshotId, u32)>,
        state: TransferState,
        started: chrono::DateTime<chrono::Utc>,
    ) {
        let c = Checkpoint {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive.into(),
            strategy,
            last_acked: last,
            snapshot: snapshot.map(|s| s.0),
            next_chunk: snapshot.map(|s| s.1).unwrap_or(0),
            attempts: 1,
            state,
            started_at: started,
            updated_at: chrono::Utc::now(),
        };
        if let Err(e) = self.shared.store.save_checkpoint(&c).await {
            warn!(cause = %e, "checkpoint not saved");
        }
    }

    async fn fail_checkpoints(&self, cause: &str) {
        let now = chrono::Utc::now();
        if let Some(p) = &self.pull {
            self.checkpoint(
                p.transfer,
                Strategy::Bulk,
                p.start,
                None,
                TransferState::Failed,
                now,
            )
            .await;
        }
        if let Some(d) = &self.download {
            let next = d.download.next_chunk();
            self.checkpoint(
                d.transfer,
                Strategy::Snapshot,
                Seq::ZERO,
                Some((d.offer.id, next)),
                TransferState::Failed,
                now,
            )
            .await;
        }
        debug!(cause, "receive checkpoints marked failed");
    }

    async fn apply_batch(
        &mut self,
        transfer: TransferId,
        index_id: IndexId,
        after: Seq,
        last: Seq,
        bytes: u64,
        records: Vec<Record>,
    ) -> Result<(), Refusal> {
        let count = records.len() as u64;
        let span = info_span!("apply", transfer = %transfer.fmt_short(), after = %after, last = %last, count, bytes);
        let wm = self
            .shared
            .store
            .apply_batch(self.owner, index_id, after, last, records)
            .instrument(span)
            .await?;
        sync_core::crash_point("apply.batch");
        self.applied(count, wm);
        self.ack(transfer, wm.seq).await?;
        // Batches carry the sender's transfer id; while a pull is open, the
        // batches are the pulled ones (one sender per owner and session).
        if let Some(p) = self.pull.as_mut() {
            p.records += count;
            p.bytes += bytes;
            return self.after_pull_batch(wm).await;
        }
        self.track_push(transfer, after, wm, count, bytes).await
    }

    async fn track_push(
        &mut self,
        transfer: TransferId,
        after: Seq,
        wm: Watermark,
        count: u64,
        bytes: u64,
    ) -> Result<(), Refusal> {
        let peer_max = Seq(self.peer_max.load(Ordering::Relaxed));
        if self.push.as_ref().is_none_or(|p| p.transfer != transfer) {
            let target = peer_max.max(wm.seq);
            self.shared.emit(SyncEvent::TransferStarted {
                transfer,
                peer: self.owner,
                owner: self.owner,
                direction: Direction::Receive,
                strategy: Strategy::Batches,
                total: target.0.saturating_sub(after.0),
            });
            self.push = Some(Push {
                transfer,
                start: after,
                target,
                started: Instant::now(),
                records: 0,
                bytes: 0,
            });
        }
        let Some(p) = self.push.as_mut() else {
            return Ok(());
        };
        p.records += count;
        p.bytes += bytes;
        p.target = p.target.max(peer_max);
        self.shared.emit(SyncEvent::TransferProgress {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            done: wm.seq.0.saturating_sub(p.start.0),
            total: p.target.0.saturating_sub(p.start.0),
            bytes: p.bytes,
        });
        if wm.seq >= p.target {
            let big = p.records >= self.shared.config.batch_size as u64 * 10;
            self.shared.emit(SyncEvent::TransferCompleted {
                transfer,
                peer: self.owner,
                owner: self.owner,
                direction: Direction::Receive,
                strategy: Strategy::Batches,
                records: p.records,
                bytes: p.bytes,
                seconds: p.started.elapsed().as_secs_f64(),
            });
            self.push = None;
            if big {
                self.checkpoint_wal().await;
            }
        }
        Ok(())
    }

    async fn start_pull(
        &mut self,
        index_id: IndexId,
        entry_count: u64,
        max_seq: Seq,
    ) -> Result<(), Refusal> {
        let held = self.shared.store.watermark(self.owner).await?;
        let after = match held {
            Some(w) if w.index_id == index_id => w.seq,
            _ => Seq::ZERO,
        };
        if after >= max_seq {
            // Already held: say so, so the sender's pull completes.
            return self.ack(TransferId::default(), after).await;
        }
        let transfer = TransferId::new_v7();
        info!(transfer = %transfer.fmt_short(), entry_count, max_seq = %max_seq, "pulling bulk");
        self.shared.emit(SyncEvent::TransferStarted {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            strategy: Strategy::Bulk,
            total: max_seq.0 - after.0,
        });
        self.checkpoint(
            transfer,
            Strategy::Bulk,
            after,
            None,
            TransferState::Running,
            chrono::Utc::now(),
        )
        .await;
        self.pull = Some(Pull {
            transfer,
            target: max_seq,
            start: after,
            started: Instant::now(),
            records: 0,
            bytes: 0,
        });
        self.send(Wire::FetchRequest {
            transfer,
            owner: self.owner,
            index_id,
            location: None,
            after,
            max_batches: self.shared.config.credit_window.max(1),
        })
        .await
    }

    async fn after_pull_batch(&mut self, wm: Watermark) -> Result<(), Refusal> {
        let Some(p) = self.pull.as_ref() else {
            return Ok(());
        };
        let (transfer, target, start) = (p.transfer, p.target, p.start);
        self.shared.emit(SyncEvent::TransferProgress {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            done: wm.seq.0.saturating_sub(start.0),
            total: target.0.saturating_sub(start.0),
            bytes: p.bytes,
        });
        if wm.seq >= target {
            let (records, bytes, secs) = (p.records, p.bytes, p.started.elapsed().as_secs_f64());
            self.shared.emit(SyncEvent::TransferCompleted {
                transfer,
                peer: self.owner,
                owner: self.owner,
                direction: Direction::Receive,
                strategy: Strategy::Bulk,
                records,
                bytes,
                seconds: secs,
            });
            self.checkpoint(
                transfer,
                Strategy::Bulk,
                wm.seq,
                None,
                TransferState::Completed,
                chrono::Utc::now(),
            )
            .await;
            self.pull = None;
            return self.after_bulk_load().await;
        }
        // One batch applied: grant one more.
        self.send(Wire::FetchRequest {
            transfer,
            owner: self.owner,
            index_id: wm.index_id,
            location: None,
            after: wm.seq,
            max_batches: 1,
        })
        .await
    }

    async fn start_download(&mut self, offer: SnapshotOfferInfo) -> Result<(), Refusal> {
        if offer.owner != self.owner {
            return Err(Refusal {
                code: ErrorCode::ForeignOwner,
                message: format!(
                    "snapshot of owner {} offered by peer {}",
                    offer.owner, self.owner
                ),
            });
        }
        let held = self.watermark_now().await?;
        let download = self.shared.store.begin_download(&offer).await?;
        let transfer = TransferId::new_v7();
        let from = download.next_chunk();
        info!(
            transfer = %transfer.fmt_short(),
            snapshot = %offer.id.fmt_short(),
            chunks = offer.chunks,
            from_chunk = from,
            held = %held,
            "downloading snapshot"
        );
        self.shared.emit(SyncEvent::TransferStarted {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            strategy: Strategy::Snapshot,
            total: offer.entries,
        });
        self.checkpoint(
            transfer,
            Strategy::Snapshot,
            held,
            Some((offer.id, from)),
            TransferState::Running,
            chrono::Utc::now(),
        )
        .await;
        let complete = download.is_complete();
        self.download = Some(Download {
            transfer,
            offer,
            download,
            started: Instant::now(),
            bytes: 0,
        });
        if complete {
            return self.import().await;
        }
        self.send(Wire::SnapshotRequest {
            id: offer.id,
            from_chunk: from,
        })
        .await
    }

    async fn chunk(
        &mut self,
        id: SnapshotId,
        index: u32,
        hash: Hash,
        data: Vec<u8>,
    ) -> Result<(), Refusal> {
        let Some(d) = self.download.as_mut() else {
            return Err(Refusal {
                code: ErrorCode::Unexpected,
                message: format!("snapshot chunk {index} without an offer"),
            });
        };
        if d.offer.id != id {
            return Err(Refusal {
                code: ErrorCode::Unexpected,
                message: format!("chunk of snapshot {id}, expected {}", d.offer.id),
            });
        }
        d.bytes += data.len() as u64;
        d.download.write_chunk(index, hash, &data).await?;
        let (transfer, next, chunks, entries, bytes) = (
            d.transfer,
            d.download.next_chunk(),
            d.offer.chunks.max(1),
            d.offer.entries,
            d.bytes,
        );
        // `entries` and `chunks` are the peer's claims: the product is taken
        // in u128, where it cannot overflow (it did in u64 for an offer of
        // 2^63 entries); the share fits in u64 while `next <= chunks`.
        let done = u64::try_from(u128::from(entries) * u128::from(next) / u128::from(chunks))
            .map_err(|_| Refusal {
                code: ErrorCode::BadSnapshot,
                message: format!("chunk {next} of {chunks} is past the end of the snapshot"),
            })?;
        self.shared.emit(SyncEvent::TransferProgress {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            done,
            total: entries,
            bytes,
        });
        if d.download.is_complete() {
            return self.import().await;
        }
        Ok(())
    }

    async fn import(&mut self) -> Result<(), Refusal> {
        let Some(d) = self.download.take() else {
            return Ok(());
        };
        let (transfer, offer, started, bytes) = (d.transfer, d.offer, d.started, d.bytes);
        let span = info_span!("import", snapshot = %offer.id.fmt_short(), entries = offer.entries);
        let wm = self
            .shared
            .store
            .import_snapshot(d.download)
            .instrument(span)
            .await
            // SQLite refusing the peer's file is `BadSnapshot` (storage
            // reads it on its own connection); a `Db` error is this library's.
            .map_err(Refusal::from)?;
        self.shared.emit(SyncEvent::SnapshotImported {
            owner: self.owner,
            snapshot: offer.id,
            entries: offer.entries,
            watermark: wm,
        });
        self.shared.emit(SyncEvent::TransferCompleted {
            transfer,
            peer: self.owner,
            owner: self.owner,
            direction: Direction::Receive,
            strategy: Strategy::Snapshot,
            records: offer.entries,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        });
        self.checkpoint(
            transfer,
            Strategy::Snapshot,
            wm.seq,
            Some((offer.id, offer.chunks)),
            TransferState::Completed,
            chrono::Utc::now(),
        )
        .await;
        self.after_bulk_load().await
    }

    /// After a bulk load: fold the WAL back into the library, then tell the
    /// peer what this device now holds (it plans the tail from that).
    async fn after_bulk_load(&self) -> Result<(), Refusal> {
        self.checkpoint_wal().await;
        let msg = self
            .shared
            .watermarks_message()
            .await
            .map_err(|e| Refusal {
                code: ErrorCode::Storage,
                message: e.to_string(),
            })?;
        self.send(msg).await
    }

    /// After a bulk load, folds the WAL back into the library so the next
    /// small commit does not pay for the backlog.
    async fn checkpoint_wal(&self) {
        if let Err(e) = self.shared.store.checkpoint().await {
            warn!(cause = %e, "WAL checkpoint failed");
        }
    }
}

/// A stream over an mpsc receiver.
fn tokio_stream_from<T>(rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}
