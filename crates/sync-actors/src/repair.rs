//! Repair: a peer's copy of this device's records differs from them (its
//! `Digests` says so), or holds another IndexId of them. Instead of a full
//! resend, this device finds the differing records by range-based set
//! reconciliation over seq buckets (`sync_core::reconcile`, this device
//! initiating) and sends only those, with the digest the peer's copy must
//! then have: the peer commits the repair only if it does.
//!
//! Both sides answer each round from their persisted bucket fingerprints
//! plus the items of the few buckets a round needs, never a full scan.

use std::time::Duration;

use sync_core::digest::{OwnerDigest, bucket_start};
use sync_core::reconcile::{Found, Item, ReconMessage, Reconciler, Role, View};
use sync_core::{DeviceId, Message as Wire, Record, Seq, TransferId, encode_records};
use sync_net::ConnWriter;
use sync_storage::Store;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span};

use crate::broadcaster::Totals;
use crate::error::EngineError;
use crate::shared::SharedRef;

/// The most records one repair moves (the batch limit of the protocol);
/// a larger difference is a resend.
pub(crate) const MAX_REPAIR_RECORDS: usize = 65_536;
/// How long the peer may take to answer one round, or to commit the repair.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

/// What reaches a running repair from its session.
pub(crate) enum RepairInbound {
    /// The peer's answer to a round.
    Round(ReconMessage),
    /// The peer's watermark after it applied (or refused) the repair.
    Ack(Seq),
}

/// One repair of the peer's copy of this device's records.
pub(crate) struct RepairPlan {
    pub transfer: TransferId,
    pub peer: DeviceId,
    /// What the peer claimed to hold of this device's records.
    pub claim: OwnerDigest,
    pub writer: ConnWriter,
}

/// Loads into `view` the items of `buckets` of `owner`'s records.
pub(crate) async fn load_buckets(
    store: &Store,
    owner: DeviceId,
    view: &mut View,
    buckets: Vec<u64>,
) -> Result<(), EngineError> {
    for b in buckets {
        let items = store
            .recon_items(owner, bucket_start(b), bucket_start(b.saturating_add(1)))
            .await?
            .into_iter()
            .map(|(seq, id, fp)| Item { seq, id, fp })
            .collect();
        view.load_items(b, items)
            .map_err(|e| EngineError::Repair(format!("reconciliation view: {e}")))?;
    }
    Ok(())
}

/// A view of `owner`'s records held here, up to `max_seq`.
pub(crate) async fn view_of(
    store: &Store,
    owner: DeviceId,
    max_seq: Seq,
) -> Result<View, EngineError> {
    Ok(View::new(store.recon_buckets(owner).await?, max_seq))
}

/// Runs a repair to its end: rounds, then the differing records, then the
/// peer's acknowledgement. `Ok` carries what moved.
pub(crate) async fn run(
    shared: SharedRef,
    plan: RepairPlan,
    mut inbox: mpsc::Receiver<RepairInbound>,
) -> Result<Totals, EngineError> {
    let span = info_span!(
        "repair",
        peer = %plan.peer.fmt_short(),
        transfer = %plan.transfer.fmt_short(),
        owner = %shared.me().fmt_short()
    );
    async move {
        let me = shared.me();
        let local = shared.store.local_watermark().await?;
        // The span covers what either side holds.
        let upto = local.seq.max(plan.claim.watermark.seq);
        let mut view = view_of(&shared.store, me, local.seq).await?;
        let mut rec = Reconciler::new(Role::Initiator, upto);
        let need = rec.buckets_needed_to_initiate(&view);
        load_buckets(&shared.store, me, &mut view, need).await?;
        let mut msg = rec.initiate(&view).map_err(recon_err)?;
        let mut found = Found::default();
        let mut bytes = 0u64;
        loop {
            bytes += send_round(&plan, local.index_id, upto, msg).await?;
            let reply = match next(&mut inbox).await? {
                RepairInbound::Round(m) => m,
                RepairInbound::Ack(_) => {
                    return Err(EngineError::Protocol {
                        peer: plan.peer,
                        what: "an ack of a repair before the repair".into(),
                    });
                }
            };
            let need = rec.buckets_needed(&view, &reply);
            load_buckets(&shared.store, me, &mut view, need).await?;
            let (answer, f) = rec.respond(&view, &reply).map_err(recon_err)?;
            found.merge(f);
            if rec.is_done() || answer.ranges.is_empty() {
                break;
            }
            msg = answer;
        }
        info!(
            rounds = rec.rounds(),
            send = found.extra.len(),
            drop = found.need.len(),
            "differences found"
        );
        send_repair(&shared, &plan, local, found, &mut inbox, bytes).await
    }
    .instrument(span)
    .await
}

/// Sends one round; returns its size in bytes (as encoded for the frame).
async fn send_round(
    plan: &RepairPlan,
    index_id: sync_core::IndexId,
    upto: Seq,
    round: ReconMessage,
) -> Result<u64, EngineError> {
    let size = round.encode().map(|b| b.len() as u64).unwrap_or(0);
    plan.writer
        .send(Wire::ReconRequest {
            transfer: plan.transfer,
            owner: plan.claim.owner,
            index_id,
            upto,
            round,
        })
        .await?;
    Ok(size)
}

/// The next message for the repair, within the round timeout.
async fn next(inbox: &mut mpsc::Receiver<RepairInbound>) -> Result<RepairInbound, EngineError> {
    match tokio::time::timeout(ROUND_TIMEOUT, inbox.recv()).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(EngineError::Repair("abandoned".into())),
        Err(_) => Err(EngineError::Repair(
            "the peer did not answer in time".into(),
        )),
    }
}

/// Reads the records the peer lacks with this device's digest (one read
/// transaction), sends them with the seqs the peer must drop, and waits
/// for the peer's watermark.
async fn send_repair(
    shared: &SharedRef,
    plan: &RepairPlan,
    local: sync_core::Watermark,
    found: Found,
    inbox: &mut mpsc::Receiver<RepairInbound>,
    bytes: u64,
) -> Result<Totals, EngineError> {
    if found.extra.len() > MAX_REPAIR_RECORDS || found.need.len() > MAX_REPAIR_RECORDS {
        return Err(EngineError::Repair(format!(
            "difference too large ({} to send, {} to drop; at most {MAX_REPAIR_RECORDS})",
            found.extra.len(),
            found.need.len()
        )));
    }
    let (records, claim) = shared.store.records_at(shared.me(), &found.extra).await?;
    let claim = claim.ok_or(EngineError::Repair("no digest of this device".into()))?;
    if claim.watermark != local {
        return Err(EngineError::Repair(
            "this device committed during the repair: it starts again".into(),
        ));
    }
    let count = records.len() as u32;
    let payload = encode(records).await?;
    let sent = payload.len() as u64;
    plan.writer
        .send(Wire::RepairBatch {
            transfer: plan.transfer,
            claim,
            extra: found.need,
            count,
            payload,
        })
        .await?;
    loop {
        match next(inbox).await? {
            RepairInbound::Ack(seq) if seq == claim.watermark.seq => {
                return Ok(Totals {
                    records: u64::from(count),
                    bytes: bytes + sent,
                    acked: seq,
                });
            }
            RepairInbound::Ack(seq) => {
                return Err(EngineError::Repair(format!(
                    "the peer did not commit it (it holds seq {seq})"
                )));
            }
            RepairInbound::Round(_) => {}
        }
    }
}

/// Encodes records on the blocking pool.
async fn encode(records: Vec<Record>) -> Result<Vec<u8>, EngineError> {
    tokio::task::spawn_blocking(move || encode_records(&records))
        .await
        .map_err(|e| EngineError::Repair(format!("encode task: {e}")))
}

/// A reconciliation error of this side (a peer's shows up on its side).
fn recon_err(e: sync_core::reconcile::ReconError) -> EngineError {
    EngineError::Repair(format!("reconciliation: {e}"))
}
