//! `TransferSupervisor`: knows every session and every outgoing transfer.
//! Chooses a strategy (sync-core's `choose_strategy`) on every connect and
//! every commit, starts transfers, watches them — including panics, which
//! actix's own `Supervisor` does not see — and restarts a failed transfer
//! from the peer's last acknowledged batch with exponential backoff, giving
//! up after `max_attempts` with a clear event (and planning it afresh after
//! `retry_after_giving_up`, since an idle owner commits nothing that would
//! replan it). A lost link is resumed by the
//! next session, from the watermark the peer reports. Two sessions to one
//! peer in opposite directions settle on the one the lower device id
//! dialed (`keep_newer`); a peer holding more of this device's current
//! index than it has restarts the index (`restart_index`).

use std::collections::HashMap;
use std::time::Instant;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sync_core::digest::{OwnerDigest, Verification};
use sync_core::{
    DeviceId, IndexId, Message as Wire, PeerHolding, Seq, Strategy, TransferId, Watermark,
    choose_strategy,
};
use sync_net::{ConnWriter, PeerInfo};
use sync_storage::{Checkpoint, TransferState};
use tracing::{debug, info, warn};

use crate::broadcaster::{BatchBroadcaster, Cancel, Control, Forward, Pace, Plan, Totals};
use crate::error::EngineError;
use crate::events::{Direction, SyncEvent};
use crate::peer_session::{CloseSession, PeerSession, RevokeSession};
use crate::shared::SharedRef;
use crate::snapshot_exporter::{Export, SnapshotExporter};

/// How often the supervisor looks for commits made outside this engine.
const LOCAL_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// How a transfer ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Completed(Totals),
    Failed(String),
    Panicked(String),
}

/// How a session's connection came to be, seen from this device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum SessionOrigin {
    /// This device dialed the peer (`SyncEngine::connect` and its redials).
    Dialed,
    /// The peer dialed this device's listener.
    Accepted,
    /// The host handed over a connection (`SyncEngine::attach`).
    Attached,
}

/// Which of two live sessions to one peer stays: `true` for the newer.
///
/// Two devices that dial each other at once each hold both connections,
/// and each used to keep its newer one, closing the link the other kept
/// (then both redial loops stood down: no session at all). Sessions of
/// opposite directions are therefore settled by a rule both sides compute
/// alike: the connection dialed by the lower device id stays. Otherwise
/// the newer session replaces the older (a redial after a silent loss).
fn keep_newer(me: DeviceId, peer: DeviceId, older: SessionOrigin, newer: SessionOrigin) -> bool {
    let dialer = if newer == SessionOrigin::Dialed {
        me
    } else {
        peer
    };
    !opposite(older, newer) || dialer == me.min(peer)
}

/// Whether one session was dialed by this device and the other by the peer.
fn opposite(a: SessionOrigin, b: SessionOrigin) -> bool {
    use SessionOrigin::{Accepted, Dialed};
    matches!((a, b), (Dialed, Accepted) | (Accepted, Dialed))
}

/// A session started (sent by `PeerSession`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SessionOpened {
    pub peer: PeerInfo,
    pub generation: u64,
    pub origin: SessionOrigin,
    pub writer: ConnWriter,
    pub session: Addr<PeerSession>,
}

/// A session ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct SessionClosed {
    pub peer: DeviceId,
    pub generation: u64,
}

/// The peer's `Watermarks`.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PeerWatermarks {
    pub peer: DeviceId,
    pub generation: u64,
    pub holds_of_me: Option<Watermark>,
    pub advertised: Option<Watermark>,
}

/// The peer's copy of this device's records differs from them (its
/// `Digests` says so): a repair is due.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RepairWanted {
    pub peer: DeviceId,
    pub generation: u64,
    /// What the peer claims to hold of this device's records.
    pub claim: OwnerDigest,
}

/// The peer acknowledged a batch or change.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct AckReceived {
    pub peer: DeviceId,
    pub generation: u64,
    pub transfer: TransferId,
    pub last: Seq,
}

/// The peer pulls (`FetchRequest`).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FetchReceived {
    pub peer: DeviceId,
    pub generation: u64,
    pub transfer: TransferId,
    pub after: Seq,
    pub max_batches: u32,
}

/// Re-evaluate what to send (after a commit): one peer, or all.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Pump(pub Option<DeviceId>);

/// An outgoing transfer ended.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct TransferEnded {
    pub peer: DeviceId,
    pub transfer: TransferId,
    pub generation: u64,
    pub outcome: Outcome,
}

/// The trust store changed: close the sessions of peers no longer pinned
/// as the certificate and device they authenticated with.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct TrustChanged;

/// Close every session (shutdown).
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct CloseAll;

/// The state of every session.
#[derive(Message)]
#[rtype(result = "Vec<PeerStatus>")]
pub(crate) struct GetPeers;

/// One connected peer, as the engine sees it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// The peer.
    pub peer: DeviceId,
    /// Its name.
    pub name: String,
    /// Its address.
    pub addr: String,
    /// Who dialed the session's connection.
    pub origin: SessionOrigin,
    /// What it holds of this device's records (from its watermarks and acks).
    pub holds_of_me: Option<Watermark>,
    /// Its own sequence and max seq, as it last advertised.
    pub advertised: Option<Watermark>,
    /// The outgoing transfer, if one runs.
    pub outgoing: Option<(TransferId, Strategy)>,
    /// What the outgoing transfer is doing (running, backing off, given up).
    pub transfer: TransferStatus,
    /// Frame bytes written to this peer on this session.
    pub bytes_sent: u64,
    /// Per owner both hold: how the peer's copy compares with this
    /// device's (from the `Digests` they last exchanged).
    pub verification: Vec<(DeviceId, Verification)>,
}

/// What a peer's outgoing transfer is doing, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum TransferStatus {
    /// No transfer runs: the peer is up to date, or its watermarks have not
    /// arrived yet.
    Idle,
    /// A transfer runs.
    Sending {
        /// Its id.
        transfer: TransferId,
        /// Its strategy.
        strategy: Strategy,
        /// Its attempt (1 unless it failed before).
        attempt: u32,
        /// The highest seq of this device the peer acknowledged.
        acked: Seq,
        /// Records the transfer moves.
        total: u64,
    },
    /// The transfer failed and resumes, from the peer's watermark, after a backoff.
    Retrying {
        /// Attempts so far.
        attempts: u32,
        /// Why the last one failed.
        cause: String,
        /// When it resumes.
        retry_at: DateTime<Utc>,
    },
    /// The transfer failed `attempts` times and was given up; it is planned
    /// afresh at `retry_at`, or sooner on a commit or a new session.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed.
        cause: String,
        /// When it is tried again.
        retry_at: DateTime<Utc>,
    },
}

/// The last failure of a peer's outgoing transfer, until another one starts.
struct Failure {
    attempts: u32,
    cause: String,
    retry_at: DateTime<Utc>,
    gave_up: bool,
}

impl Failure {
    fn new(attempts: u32, cause: String, delay: std::time::Duration, gave_up: bool) -> Self {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        Failure {
            attempts,
            cause,
            retry_at: Utc::now()
                .checked_add_signed(delay)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            gave_up,
        }
    }
}

enum OutKind {
    Broadcast(Addr<BatchBroadcaster>, Pace),
    Snapshot {
        max_seq: Seq,
        index_id: IndexId,
    },
    /// A repair task (`repair.rs`); its inbox is in `Shared::repairs`.
    Repair,
}

struct Outgoing {
    transfer: TransferId,
    index_id: IndexId,
    strategy: Strategy,
    kind: OutKind,
    attempt: u32,
    total: u64,
    started: Instant,
    started_at: DateTime<Utc>,
}

struct PeerState {
    info: PeerInfo,
    generation: u64,
    origin: SessionOrigin,
    writer: ConnWriter,
    session: Option<Addr<PeerSession>>,
    holds_of_me: Option<Watermark>,
    advertised: Option<Watermark>,
    watermarks_seen: bool,
    outgoing: Option<Outgoing>,
    /// The last failure, until a transfer starts again.
    failure: Option<Failure>,
    pumping: bool,
    waiting: bool,
    repump: bool,
    /// The peer's pin was removed: nothing more is planned for it.
    revoked: bool,
    /// This device's watermark as last told to the peer by a plan (the
    /// session's opening `Watermarks` aside).
    told: Option<Watermark>,
    /// The peer's copy of this device's records differs: repair it next.
    repair_wanted: Option<OwnerDigest>,
    /// Repairs tried on this session (a copy that keeps differing after
    /// [`MAX_REPAIRS`] is left as it is, and says so).
    repairs: u32,
}

impl PeerState {
    /// What the outgoing transfer to this peer is doing.
    fn transfer_status(&self) -> TransferStatus {
        if let Some(out) = &self.outgoing {
            let acked = self
                .holds_of_me
                .filter(|h| h.index_id == out.index_id)
                .map_or(Seq::ZERO, |h| h.seq);
            return TransferStatus::Sending {
                transfer: out.transfer,
                strategy: out.strategy,
                attempt: out.attempt,
                acked,
                total: out.total,
            };
        }
        match &self.failure {
            None => TransferStatus::Idle,
            Some(f) if f.gave_up => TransferStatus::GaveUp {
                attempts: f.attempts,
                cause: f.cause.clone(),
                retry_at: f.retry_at,
            },
            Some(f) => TransferStatus::Retrying {
                attempts: f.attempts,
                cause: f.cause.clone(),
                retry_at: f.retry_at,
            },
        }
    }
}

/// What a peer holds after acknowledging `last` of sequence `index_id`.
/// Keeps what `peer` acknowledged of this device's records, for
/// tombstone collection (in the background; a lost write only delays it).
fn save_peer_holds(shared: &SharedRef, peer: DeviceId, held: Option<Watermark>) {
    let Some(held) = held else {
        return;
    };
    let store = shared.store.clone();
    actix_rt::spawn(async move {
        if let Err(e) = store.save_peer_holds(peer, held).await {
            warn!(peer = %peer.fmt_short(), cause = %e, "acknowledged watermark not kept");
        }
    });
}

fn advance(held: Option<Watermark>, index_id: IndexId, last: Seq) -> Watermark {
    match held {
        Some(h) if h.index_id == index_id => Watermark::new(index_id, h.seq.max(last)),
        _ => Watermark::new(index_id, last),
    }
}

/// Repairs of one peer's copy per session before it is left differing.
const MAX_REPAIRS: u32 = 3;
/// Records a peer must hold of another IndexId of this device's records
/// for a repair to replace the resend (below it, resending is as cheap).
const REPAIR_MIN_RECORDS: u64 = 1_000;

/// The supervisor actor.
pub(crate) struct TransferSupervisor {
    shared: SharedRef,
    exporter: Addr<SnapshotExporter>,
    peers: HashMap<DeviceId, PeerState>,
    /// A failed transfer to resume, by peer: its id and attempts so far.
    resume: HashMap<DeviceId, (TransferId, u32)>,
    /// The local watermark last seen, to notice commits made by another
    /// process on the same library (e.g. `lsync index` beside `lsync serve`).
    last_local: Option<Watermark>,
    /// The local IndexId is being restarted: nothing is planned meanwhile.
    restarting: bool,
}

impl TransferSupervisor {
    pub fn new(shared: SharedRef, exporter: Addr<SnapshotExporter>) -> Self {
        TransferSupervisor {
            shared,
            exporter,
            peers: HashMap::new(),
            resume: HashMap::new(),
            last_local: None,
            restarting: false,
        }
    }

    fn save_checkpoint(
        shared: &SharedRef,
        peer: DeviceId,
        out: &Outgoing,
        last: Seq,
        state: TransferState,
    ) {
        // Live changes are tiny transfers whose resume point is the peer's
        // watermark; a checkpoint row per change would put a second write on
        // the single writer for every commit (measured: live p99 140 ms).
        if out.strategy == Strategy::Individual {
            return;
        }
        let c = Checkpoint {
            transfer: out.transfer,
            peer,
            owner: shared.me(),
            direction: Direction::Send.into(),
            strategy: out.strategy,
            last_acked: last,
            snapshot: None,
            next_chunk: 0,
            attempts: out.attempt,
            state,
            started_at: out.started_at,
            updated_at: Utc::now(),
        };
        let store = shared.store.clone();
        actix_rt::spawn(async move {
            if let Err(e) = store.save_checkpoint(&c).await {
                warn!(cause = %e, "checkpoint not saved");
            }
        });
    }

    /// The state of `peer`'s session, if it is still session `generation`.
    fn session_state(&mut self, peer: DeviceId, generation: u64) -> Option<&mut PeerState> {
        self.peers
            .get_mut(&peer)
            .filter(|st| st.generation == generation)
    }

    fn pump(&mut self, peer: DeviceId, ctx: &mut Context<Self>) {
        let restarting = self.restarting;
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        // A commit in flight pumps again when it ends (the Indexer sends Pump).
        let committing = self
            .shared
            .commits_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0;
        if st.revoked {
            return;
        }
        // A restart of the local index pumps every peer when it ends.
        if !st.watermarks_seen
            || st.outgoing.is_some()
            || st.pumping
            || st.waiting
            || committing
            || restarting
        {
            st.repump = true;
            return;
        }
        st.pumping = true;
        st.repump = false;
        let holds = st.holds_of_me;
        let generation = st.generation;
        let (writer, told) = (st.writer.clone(), st.told);
        let shared = self.shared.clone();
        ctx.spawn(
            async move {
                let local = shared.store.local_watermark().await?;
                if told != Some(local) && local.seq > Seq::ZERO {
                    // Say how far this device's records now go before any of
                    // them leave: the peer must not count itself synced with
                    // this device midway through them (what the session
                    // opened with is older than this commit).
                    let own = vec![(shared.me(), local.index_id, local.seq)];
                    writer.send(Wire::Watermarks(own)).await?;
                }
                let holding = PeerHolding::from_watermark(holds, local.index_id);
                let start = holding.seq();
                let pending = if local.seq > start {
                    shared.store.count_after(shared.me(), start).await?
                } else {
                    0
                };
                // Behind this device's tombstone collection point: the
                // deletes it has not seen are gone, only a repair tells it.
                let pruned = shared
                    .store
                    .owner_digest(shared.me())
                    .await?
                    .map_or(Seq::ZERO, |d| d.pruned);
                let behind_collection =
                    matches!(holding, PeerHolding::UpTo(held) if held < pruned);
                if behind_collection {
                    info!(peer = %peer.fmt_short(), held = start.0, pruned = pruned.0, "peer behind the tombstone collection point");
                }
                Ok::<_, EngineError>((local, holding, pending, behind_collection))
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                let thresholds = act.shared.config.thresholds;
                let me = act.shared.me();
                let live = act.session_state(peer, generation).is_some();
                let repair = match &res {
                    Ok((local, PeerHolding::UpTo(held), _, _)) if *held > local.seq => false,
                    Ok((_, holding, _, behind)) => {
                        live && act.repair_due(peer, *holding, *behind)
                    }
                    Err(_) => false,
                };
                let res = res.map(|(local, holding, pending, _)| (local, holding, pending));
                let Some(st) = act.session_state(peer, generation) else {
                    return;
                };
                st.pumping = false;
                if let Ok((local, _, _)) = &res {
                    st.told = Some(*local);
                }
                match res {
                    Err(e) => {
                        warn!(peer = %peer.fmt_short(), cause = %e, "cannot plan a transfer");
                        // Try again later rather than leave commits unsent.
                        st.repump = false;
                        let delay = act.shared.config.backoff_max;
                        ctx.run_later(delay, move |act, ctx| act.pump(peer, ctx));
                    }
                    Ok((local, PeerHolding::UpTo(held), _)) if held > local.seq => {
                        act.restart_index(peer, held, local, ctx);
                    }
                    Ok((local, _, _)) if repair => act.start_repair(peer, local, ctx),
                    Ok((local, holding, pending)) => {
                        let strategy =
                            choose_strategy(holding, pending, &thresholds);
                        debug!(peer = %peer.fmt_short(), ?holding, pending, %strategy, "strategy chosen");
                        match strategy {
                            Strategy::UpToDate if holding == PeerHolding::OtherIndex => {
                                st.failure = None;
                                send_empty_reset(me, st, local);
                            }
                            Strategy::UpToDate => {
                                // Whatever failed before, nothing is missing now.
                                st.failure = None;
                                if st.repump {
                                    act.pump(peer, ctx);
                                }
                            }
                            Strategy::Snapshot => act.start_snapshot(peer, local, pending, ctx),
                            s => act.start_broadcast(
                                peer,
                                s,
                                local,
                                holding.seq(),
                                pending,
                                None,
                                ctx,
                            ),
                        }
                    }
                }
            }),
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn start_broadcast(
        &mut self,
        peer: DeviceId,
        strategy: Strategy,
        local: Watermark,
        start: Seq,
        total: u64,
        pull: Option<(TransferId, u32)>,
        ctx: &mut Context<Self>,
    ) {
        let (transfer, attempt) = self.next_transfer(peer);
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        let pace = match strategy {
            Strategy::Individual => Pace::Individual,
            Strategy::Bulk => Pace::Pull,
            _ => Pace::Push,
        };
        let plan = Plan {
            transfer,
            peer,
            generation: st.generation,
            strategy,
            pace,
            index_id: local.index_id,
            start,
            end: local.seq,
            total,
            initial_credits: pull.map(|p| p.1).unwrap_or(0),
            pull_transfer: pull.map(|p| p.0),
        };
        info!(
            peer = %peer.fmt_short(),
            transfer = %transfer.fmt_short(),
            %strategy,
            start = %start,
            end = %local.seq,
            total,
            attempt,
            "transfer started"
        );
        let addr =
            BatchBroadcaster::new(self.shared.clone(), plan, st.writer.clone(), ctx.address())
                .start();
        let out = Outgoing {
            transfer,
            index_id: local.index_id,
            strategy,
            kind: OutKind::Broadcast(addr, pace),
            attempt,
            total,
            started: Instant::now(),
            started_at: Utc::now(),
        };
        self.begin_outgoing(peer, out, start);
    }

    /// Whether the next transfer to `peer` is a repair: its copy of this
    /// device's records differs from them, holds another IndexId of enough
    /// records that reconciling beats a resend, or is behind this device's
    /// tombstone collection point (deletes it never saw are gone).
    fn repair_due(
        &mut self,
        peer: DeviceId,
        holding: PeerHolding,
        behind_collection: bool,
    ) -> bool {
        let me = self.shared.me();
        let claim = self.shared.verify.claim(peer, me);
        let Some(st) = self.peers.get_mut(&peer) else {
            return false;
        };
        if st.repairs >= MAX_REPAIRS {
            if st.repair_wanted.take().is_some() {
                warn!(peer = %peer.fmt_short(), repairs = st.repairs, "the peer's copy still differs; not repaired again on this session");
            }
            return false;
        }
        if st.repair_wanted.is_some() || (behind_collection && claim.is_some()) {
            return true;
        }
        holding == PeerHolding::OtherIndex && claim.is_some_and(|c| c.records >= REPAIR_MIN_RECORDS)
    }

    /// Starts a repair of the peer's copy of this device's records.
    fn start_repair(&mut self, peer: DeviceId, local: Watermark, ctx: &mut Context<Self>) {
        let me = self.shared.me();
        let (transfer, attempt) = self.next_transfer(peer);
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        let claim = st
            .repair_wanted
            .take()
            .or_else(|| self.shared.verify.claim(peer, me));
        let Some(claim) = claim else {
            warn!(peer = %peer.fmt_short(), "a repair without the peer's digests: not started");
            return;
        };
        st.repairs += 1;
        let generation = st.generation;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.shared.repairs.insert(transfer, tx);
        let plan = crate::repair::RepairPlan {
            transfer,
            peer,
            claim,
            writer: st.writer.clone(),
        };
        info!(peer = %peer.fmt_short(), transfer = %transfer.fmt_short(), held = claim.watermark.seq.0, records = claim.records, "repair started");
        let out = Outgoing {
            transfer,
            index_id: local.index_id,
            strategy: Strategy::Repair,
            kind: OutKind::Repair,
            attempt,
            total: claim.records,
            started: Instant::now(),
            started_at: Utc::now(),
        };
        self.begin_outgoing(peer, out, claim.watermark.seq);
        let shared = self.shared.clone();
        let me_addr = ctx.address();
        actix_rt::spawn(async move {
            let result = crate::repair::run(shared.clone(), plan, rx).await;
            shared.repairs.remove(&transfer);
            let outcome = match result {
                Ok(totals) => Outcome::Completed(totals),
                Err(e) => Outcome::Failed(e.to_string()),
            };
            me_addr.do_send(TransferEnded {
                peer,
                transfer,
                generation,
                outcome,
            });
        });
    }

    /// The id and attempt number of the next transfer to `peer`: a failed
    /// one resumes under its id, else a new one starts.
    fn next_transfer(&mut self, peer: DeviceId) -> (TransferId, u32) {
        self.resume
            .remove(&peer)
            .unwrap_or_else(|| (TransferId::new_v7(), 1))
    }

    /// Records `out` as `peer`'s running transfer: checkpoint row, state, event.
    fn begin_outgoing(&mut self, peer: DeviceId, out: Outgoing, start: Seq) {
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        Self::save_checkpoint(&self.shared, peer, &out, start, TransferState::Running);
        self.shared.emit(SyncEvent::TransferStarted {
            transfer: out.transfer,
            peer,
            owner: self.shared.me(),
            direction: Direction::Send,
            strategy: out.strategy,
            total: out.total,
        });
        st.failure = None;
        st.outgoing = Some(out);
    }

    fn start_snapshot(
        &mut self,
        peer: DeviceId,
        local: Watermark,
        total: u64,
        ctx: &mut Context<Self>,
    ) {
        let (transfer, attempt) = self.next_transfer(peer);
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        let generation = st.generation;
        let out = Outgoing {
            transfer,
            index_id: local.index_id,
            strategy: Strategy::Snapshot,
            kind: OutKind::Snapshot {
                max_seq: local.seq,
                index_id: local.index_id,
            },
            attempt,
            total,
            started: Instant::now(),
            started_at: Utc::now(),
        };
        info!(peer = %peer.fmt_short(), transfer = %transfer.fmt_short(), total, "snapshot transfer started");
        self.begin_outgoing(peer, out, Seq::ZERO);
        ctx.spawn(
            self.exporter
                .send(Export)
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let manifest = match res {
                        Ok(Ok(m)) => m,
                        Ok(Err(e)) => {
                            return act.transfer_failed(
                                peer,
                                transfer,
                                generation,
                                e.to_string(),
                                ctx,
                            );
                        }
                        Err(e) => {
                            return act.transfer_failed(
                                peer,
                                transfer,
                                generation,
                                e.to_string(),
                                ctx,
                            );
                        }
                    };
                    let Some(st) = act.session_state(peer, generation) else {
                        return;
                    };
                    // Only the transfer that asked for this export offers it,
                    // on the session it was planned for.
                    match st.outgoing.as_mut() {
                        Some(out) if out.transfer == transfer => {
                            out.kind = OutKind::Snapshot {
                                max_seq: manifest.max_seq,
                                index_id: manifest.index_id,
                            };
                        }
                        _ => return,
                    }
                    let offer = Wire::SnapshotOffer {
                        id: manifest.id,
                        owner: manifest.owner,
                        index_id: manifest.index_id,
                        max_seq: manifest.max_seq,
                        entries: manifest.entries,
                        bytes: manifest.bytes,
                        chunks: manifest.chunks.len() as u32,
                        hash: manifest.hash,
                    };
                    let writer = st.writer.clone();
                    actix_rt::spawn(async move {
                        let _ = writer.send(offer).await;
                    });
                }),
        );
    }

    /// A transfer failed while its session lives: retry with backoff, or give up.
    fn transfer_failed(
        &mut self,
        peer: DeviceId,
        transfer: TransferId,
        generation: u64,
        cause: String,
        ctx: &mut Context<Self>,
    ) {
        let me = self.shared.me();
        let max_attempts = self.shared.config.max_attempts;
        let Some(st) = self.peers.get_mut(&peer) else {
            return;
        };
        if st.generation != generation {
            return;
        }
        let Some(out) = st.outgoing.take() else {
            return;
        };
        if out.transfer != transfer {
            st.outgoing = Some(out);
            return;
        }
        let acked = st.holds_of_me.map(|w| w.seq).unwrap_or(Seq::ZERO);
        if st.writer.is_closed() {
            // The link is gone, not the transfer: SessionClosed records the
            // resume point and the next session resumes from the watermark.
            st.outgoing = Some(out);
            return;
        }
        let will_retry = out.attempt < max_attempts;
        warn!(
            peer = %peer.fmt_short(),
            transfer = %transfer.fmt_short(),
            attempt = out.attempt,
            will_retry,
            %cause,
            "transfer failed"
        );
        self.shared.emit(SyncEvent::TransferFailed {
            transfer,
            peer,
            owner: me,
            direction: Direction::Send,
            will_retry,
            attempt: out.attempt,
            cause: cause.clone(),
        });
        if will_retry {
            self.retry_later(peer, generation, out, acked, cause, ctx);
        } else {
            self.give_up(peer, generation, out, acked, cause, ctx);
        }
    }

    /// `peer` holds seqs of this device's current IndexId above this
    /// device's own max seq: this device went back in time (a restored
    /// backup, commits lost to a power loss), and its next commits would
    /// reuse seqs that name other records on the peer, which "higher seq
    /// wins" would then keep. A new IndexId (rows and seqs kept) makes
    /// every peer replace all of this device's rows; then every peer is
    /// planned afresh. (A peer holding another IndexId with a higher seq
    /// holds an older index: it is replaced anyway, nothing restarts.)
    fn restart_index(
        &mut self,
        peer: DeviceId,
        peer_seq: Seq,
        local: Watermark,
        ctx: &mut Context<Self>,
    ) {
        if self.restarting {
            return;
        }
        self.restarting = true;
        let store = self.shared.store.clone();
        ctx.spawn(
            async move { store.restart_local_index(local.index_id).await }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    act.restarting = false;
                    match res {
                        Ok(new) if new.index_id != local.index_id => {
                            act.index_restarted(peer, peer_seq, local, new.index_id)
                        }
                        // Another restart came first: plan against it.
                        Ok(_) => {}
                        Err(e) => {
                            warn!(peer = %peer.fmt_short(), cause = %e, "cannot restart the local index");
                            let delay = act.shared.config.backoff_max;
                            ctx.run_later(delay, move |act, ctx| act.pump(peer, ctx));
                            return;
                        }
                    }
                    let peers: Vec<DeviceId> = act.peers.keys().copied().collect();
                    for p in peers {
                        act.pump(p, ctx);
                    }
                }),
        );
    }

    /// Logs and announces a restart of the local index.
    fn index_restarted(&mut self, peer: DeviceId, peer_seq: Seq, local: Watermark, new: IndexId) {
        warn!(
            device = %self.shared.me().fmt_short(),
            peer = %peer.fmt_short(),
            old = %local.index_id,
            new = %new,
            peer_seq = %peer_seq,
            local_seq = %local.seq,
            "this device went back in time (restored library or lost commits): \
             the peer holds more of its records than it has; new index started, \
             peers will replace its records"
        );
        self.last_local = None;
        self.shared.emit(SyncEvent::IndexRestarted {
            old: local.index_id,
            new,
            peer,
            peer_seq,
            local_seq: local.seq,
        });
        // Say so to every peer: what they saw advertised at session start
        // names the old index, and would never match what they hold again.
        let writers: Vec<ConnWriter> = self.peers.values().map(|st| st.writer.clone()).collect();
        let shared = self.shared.clone();
        actix_rt::spawn(async move {
            let msg = match shared.watermarks_message().await {
                Ok(msg) => msg,
                Err(e) => return warn!(cause = %e, "cannot announce the new index"),
            };
            for w in writers {
                let _ = w.send(msg.clone()).await;
            }
        });
    }

    /// Resumes a failed transfer under its id after its backoff.
    fn retry_later(
        &mut self,
        peer: DeviceId,
        generation: u64,
        out: Outgoing,
        acked: Seq,
        cause: String,
        ctx: &mut Context<Self>,
    ) {
        let delay = self.shared.config.backoff(out.attempt);
        Self::save_checkpoint(&self.shared, peer, &out, acked, TransferState::Running);
        self.resume.insert(peer, (out.transfer, out.attempt + 1));
        if let Some(st) = self.peers.get_mut(&peer) {
            st.waiting = true;
            st.failure = Some(Failure::new(out.attempt, cause, delay, false));
        }
        ctx.run_later(delay, move |act, ctx| {
            if let Some(st) = act.session_state(peer, generation) {
                st.waiting = false;
                act.pump(peer, ctx);
            }
        });
    }

    /// Gives a transfer up after its last attempt. Given up, not forgotten:
    /// it is planned afresh after `retry_after_giving_up` while this
    /// session lives, since an idle owner commits nothing that would replan
    /// it and its cause (a full disk, a peer's bug) may be gone by then. A
    /// commit replans it sooner, and a new session plans at once.
    fn give_up(
        &mut self,
        peer: DeviceId,
        generation: u64,
        out: Outgoing,
        acked: Seq,
        cause: String,
        ctx: &mut Context<Self>,
    ) {
        Self::save_checkpoint(&self.shared, peer, &out, acked, TransferState::Failed);
        let later = self.shared.config.retry_after_giving_up;
        let failure = Failure::new(out.attempt, cause, later, true);
        let retry_at = failure.retry_at;
        if let Some(st) = self.peers.get_mut(&peer) {
            st.failure = Some(failure);
        }
        ctx.run_later(later, move |act, ctx| {
            let Some(st) = act.session_state(peer, generation) else {
                return;
            };
            // Only if nothing planned it again in the meantime.
            if st.failure.as_ref().is_some_and(|f| f.retry_at == retry_at) {
                info!(peer = %peer.fmt_short(), "trying a given-up transfer again");
                act.pump(peer, ctx);
            }
        });
    }
}

impl Actor for TransferSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.shared.config.gc_interval, |act, ctx| {
            ctx.notify(CollectTombstones);
            let _ = act;
        });
        ctx.run_interval(LOCAL_POLL, |act, ctx| {
            let committing = act
                .shared
                .commits_in_flight
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0;
            if act.peers.is_empty() || committing {
                return;
            }
            let store = act.shared.store.clone();
            ctx.spawn(
                async move { store.local_watermark().await.ok() }
                    .into_actor(act)
                    .map(|local, act, ctx| {
                        if local.is_some() && local != act.last_local {
                            act.last_local = local;
                            let peers: Vec<DeviceId> = act.peers.keys().copied().collect();
                            for p in peers {
                                act.pump(p, ctx);
                            }
                        }
                    }),
            );
        });
        // Transfers that were running when the process died resume, under
        // their ids and attempt counts, when their peer is back.
        let store = self.shared.store.clone();
        let me = self.shared.me();
        ctx.spawn(
            async move { store.list_checkpoints().await }
                .into_actor(self)
                .map(move |res, act, _| {
                    for c in res.unwrap_or_default() {
                        if c.state == TransferState::Running
                            && c.owner == me
                            && c.direction == sync_storage::Direction::Send
                        {
                            act.resume.insert(c.peer, (c.transfer, c.attempts));
                        }
                    }
                }),
        );
    }
}

/// The peer holds rows of an older index of this device, and the current
/// index has no records: nothing would ever be sent, and the peer would
/// keep rows its owner no longer has (a library restored to an empty copy).
/// An empty batch after seq 0 of the current index makes it drop them (a
/// batch after 0 replaces an index). The peer is taken to hold `(index, 0)`
/// from now on: a refusal closes the session, and the next one starts from
/// the watermarks it exchanges.
fn send_empty_reset(me: DeviceId, st: &mut PeerState, local: Watermark) {
    let reset = Wire::StateBatch {
        transfer: TransferId::default(),
        owner: me,
        index_id: local.index_id,
        after: Seq::ZERO,
        last: Seq::ZERO,
        count: 0,
        payload: sync_core::encode_records(&[]),
    };
    match st.writer.try_send(reset) {
        Ok(()) => {
            info!(index = %local.index_id, "peer holds an older index of ours: empty reset sent");
            st.holds_of_me = Some(Watermark::new(local.index_id, Seq::ZERO));
        }
        Err(e) => warn!(cause = %e, "cannot send the empty reset"),
    }
}

impl Handler<SessionOpened> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: SessionOpened, _: &mut Context<Self>) {
        let peer = msg.peer.device;
        let me = self.shared.me();
        if let Some(old) = self.peers.get(&peer) {
            let (older, newer) = (old.origin, msg.origin);
            if !keep_newer(me, peer, older, newer) {
                info!(
                    peer = %peer.fmt_short(),
                    ?older,
                    ?newer,
                    "two sessions to one peer: keeping the one the lower device id dialed"
                );
                msg.session.do_send(CloseSession {
                    cause: Some(crate::engine::TIE_LOST.into()),
                });
                return;
            }
            let cause = if opposite(older, newer) {
                crate::engine::TIE_LOST
            } else {
                crate::engine::REPLACED
            };
            self.retire(peer, cause);
        }
        self.peers.insert(
            peer,
            PeerState {
                info: msg.peer,
                generation: msg.generation,
                origin: msg.origin,
                writer: msg.writer,
                session: Some(msg.session),
                holds_of_me: None,
                advertised: None,
                watermarks_seen: false,
                outgoing: None,
                failure: None,
                pumping: false,
                waiting: false,
                repump: false,
                revoked: false,
                told: None,
                repair_wanted: None,
                repairs: 0,
            },
        );
        self.publish_connected();
        // The pin may have gone between the handshake and now.
        self.revoke_untrusted();
    }
}

impl TransferSupervisor {
    /// Stops the work of an outgoing transfer whose session is gone.
    fn cancel(&self, out: Outgoing) {
        match out.kind {
            OutKind::Broadcast(addr, _) => addr.do_send(Cancel),
            // Dropping its inbox ends the repair task.
            OutKind::Repair => {
                self.shared.repairs.remove(&out.transfer);
            }
            OutKind::Snapshot { .. } => {}
        }
    }

    /// Closes `peer`'s current session, which another one replaces, with `cause`.
    fn retire(&mut self, peer: DeviceId, cause: &str) {
        let Some(old) = self.peers.remove(&peer) else {
            return;
        };
        if let Some(out) = old.outgoing {
            self.cancel(out);
        }
        if let Some(s) = old.session {
            s.do_send(CloseSession {
                cause: Some(cause.into()),
            });
        }
    }

    /// Tells the redial loops which peers have a session now.
    fn publish_connected(&self) {
        self.shared
            .connected
            .send_replace(self.peers.keys().copied().collect());
    }
}

impl TransferSupervisor {
    /// Closes at once the sessions of peers whose certificate is no longer
    /// pinned as the device they authenticated as; emits `PeerRevoked`.
    fn revoke_untrusted(&mut self) {
        let trust = &self.shared.net.trust;
        for (peer, st) in self.peers.iter_mut() {
            if st.revoked || trust.lookup(&st.info.fingerprint) == Some(*peer) {
                continue;
            }
            st.revoked = true;
            let fingerprint = st.info.fingerprint;
            warn!(
                peer = %peer.fmt_short(),
                fingerprint = %fingerprint.short(),
                "trust revoked: closing the session"
            );
            // Nothing more leaves for the peer: queued frames are dropped.
            st.writer.abort();
            if let Some(OutKind::Broadcast(addr, _)) = st.outgoing.as_ref().map(|o| &o.kind) {
                addr.do_send(Cancel);
            }
            if let Some(s) = &st.session {
                s.do_send(RevokeSession {
                    cause: format!(
                        "{}: certificate {} of device {peer} is no longer pinned",
                        crate::engine::REVOKED,
                        fingerprint.short()
                    ),
                });
            }
            self.shared.emit(SyncEvent::PeerRevoked {
                peer: *peer,
                fingerprint,
            });
        }
    }
}

impl Handler<TrustChanged> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, _: TrustChanged, _: &mut Context<Self>) {
        self.revoke_untrusted();
    }
}

impl Handler<SessionClosed> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: SessionClosed, _: &mut Context<Self>) {
        let Some(st) = self.peers.get(&msg.peer) else {
            return;
        };
        if st.generation != msg.generation {
            return;
        }
        let Some(st) = self.peers.remove(&msg.peer) else {
            return;
        };
        self.shared.verify.forget(msg.peer);
        save_peer_holds(&self.shared, msg.peer, st.holds_of_me);
        self.publish_connected();
        if let Some(out) = st.outgoing {
            let acked = st.holds_of_me.map(|w| w.seq).unwrap_or(Seq::ZERO);
            self.shared.emit(SyncEvent::TransferFailed {
                transfer: out.transfer,
                peer: msg.peer,
                owner: self.shared.me(),
                direction: Direction::Send,
                will_retry: true,
                attempt: out.attempt,
                cause: "link lost; resumes from the peer's watermark when it reconnects".into(),
            });
            Self::save_checkpoint(&self.shared, msg.peer, &out, acked, TransferState::Running);
            self.resume.insert(msg.peer, (out.transfer, out.attempt));
            self.cancel(out);
        }
    }
}

impl Handler<PeerWatermarks> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: PeerWatermarks, ctx: &mut Context<Self>) {
        let Some(st) = self.peers.get_mut(&msg.peer) else {
            return;
        };
        if st.generation != msg.generation {
            return;
        }
        st.watermarks_seen = true;
        st.advertised = msg.advertised;
        match (st.holds_of_me, msg.holds_of_me) {
            (Some(cur), Some(new)) if cur.index_id == new.index_id && cur.seq >= new.seq => {}
            (_, Some(new)) => st.holds_of_me = Some(new),
            (_, None) => {}
        }
        // A snapshot transfer ends when the peer reports holding it all.
        let done = match (&st.outgoing, st.holds_of_me) {
            (
                Some(Outgoing {
                    kind: OutKind::Snapshot { max_seq, index_id },
                    ..
                }),
                Some(h),
            ) => h.index_id == *index_id && h.seq >= *max_seq,
            _ => false,
        };
        if done && let Some(out) = st.outgoing.take() {
            let acked = st.holds_of_me.map(|w| w.seq).unwrap_or(Seq::ZERO);
            info!(peer = %msg.peer.fmt_short(), transfer = %out.transfer.fmt_short(), "snapshot transfer completed");
            self.shared.emit(SyncEvent::TransferCompleted {
                transfer: out.transfer,
                peer: msg.peer,
                owner: self.shared.me(),
                direction: Direction::Send,
                strategy: Strategy::Snapshot,
                records: out.total,
                bytes: 0,
                seconds: out.started.elapsed().as_secs_f64(),
            });
            Self::save_checkpoint(
                &self.shared,
                msg.peer,
                &out,
                acked,
                TransferState::Completed,
            );
        }
        self.pump(msg.peer, ctx);
    }
}

/// Collect this device's tombstones now, then tell every peer the new
/// collection point (their `Digests` follow it).
#[derive(Message)]
#[rtype(result = "Result<crate::gc::Collected, EngineError>")]
pub(crate) struct CollectTombstones;

impl Handler<CollectTombstones> for TransferSupervisor {
    type Result = ResponseFuture<Result<crate::gc::Collected, EngineError>>;
    fn handle(&mut self, _: CollectTombstones, _: &mut Context<Self>) -> Self::Result {
        let shared = self.shared.clone();
        let peers: Vec<(DeviceId, ConnWriter)> = self
            .peers
            .iter()
            .map(|(id, st)| (*id, st.writer.clone()))
            .collect();
        Box::pin(async move {
            let done = crate::gc::collect(&shared).await?;
            if done.dropped > 0 {
                for (peer, writer) in peers {
                    crate::verify::send_digests_soon(shared.clone(), peer, writer);
                }
            }
            Ok(done)
        })
    }
}

impl Handler<RepairWanted> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: RepairWanted, ctx: &mut Context<Self>) {
        let Some(st) = self.session_state(msg.peer, msg.generation) else {
            return;
        };
        st.repair_wanted = Some(msg.claim);
        self.pump(msg.peer, ctx);
    }
}

impl Handler<AckReceived> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: AckReceived, _: &mut Context<Self>) {
        let Some(st) = self.peers.get_mut(&msg.peer) else {
            return;
        };
        if st.generation != msg.generation {
            return;
        }
        // Acks of batches queued by a sender that has since failed still
        // count: they carry the peer's committed watermark.
        match (&st.outgoing, st.holds_of_me) {
            (Some(out), held) => st.holds_of_me = Some(advance(held, out.index_id, msg.last)),
            (None, Some(h)) => st.holds_of_me = Some(advance(Some(h), h.index_id, msg.last)),
            (None, None) => {}
        }
        if let Some(inbox) = self.shared.repairs.get(&msg.transfer) {
            let _ = inbox.try_send(crate::repair::RepairInbound::Ack(msg.last));
        }
        // Caught up with this device's records: compare digests.
        if st.told.is_some() && st.holds_of_me == st.told {
            crate::verify::send_digests_soon(self.shared.clone(), msg.peer, st.writer.clone());
        }
        // Changes are acknowledged with a nil transfer id.
        if let Some(out) = &st.outgoing
            && (out.transfer == msg.transfer || msg.transfer == TransferId::default())
            && let OutKind::Broadcast(addr, _) = &out.kind
        {
            addr.do_send(Forward(Control::Ack(msg.last)));
        }
    }
}

impl Handler<FetchReceived> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: FetchReceived, ctx: &mut Context<Self>) {
        let Some(st) = self.peers.get_mut(&msg.peer) else {
            return;
        };
        if st.generation != msg.generation {
            return;
        }
        match &st.outgoing {
            Some(Outgoing {
                kind: OutKind::Broadcast(addr, Pace::Pull),
                ..
            }) => {
                addr.do_send(Forward(Control::Grant {
                    pull: msg.transfer,
                    after: msg.after,
                    credits: msg.max_batches,
                }));
            }
            Some(_) => {
                debug!(peer = %msg.peer.fmt_short(), "pull while another transfer runs: ignored")
            }
            // A pull nobody serves is a leftover of a sender that is gone:
            // plan afresh; a new bulk notice resets the puller's target.
            None => self.pump(msg.peer, ctx),
        }
    }
}

impl Handler<Pump> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: Pump, ctx: &mut Context<Self>) {
        let peers: Vec<DeviceId> = match msg.0 {
            Some(p) => vec![p],
            None => self.peers.keys().copied().collect(),
        };
        for p in peers {
            self.pump(p, ctx);
        }
    }
}

impl Handler<TransferEnded> for TransferSupervisor {
    type Result = ();
    fn handle(&mut self, msg: TransferEnded, ctx: &mut Context<Self>) {
        let live = self
            .peers
            .get(&msg.peer)
            .is_some_and(|st| st.generation == msg.generation);
        if !live {
            // The session is gone; SessionClosed already recorded the resume point.
            return;
        }
        match msg.outcome {
            Outcome::Completed(totals) => {
                let Some(st) = self.peers.get_mut(&msg.peer) else {
                    return;
                };
                let Some(out) = st.outgoing.take() else {
                    return;
                };
                if out.transfer != msg.transfer {
                    st.outgoing = Some(out);
                    return;
                }
                st.holds_of_me = Some(advance(st.holds_of_me, out.index_id, totals.acked));
                save_peer_holds(&self.shared, msg.peer, st.holds_of_me);
                info!(
                    peer = %msg.peer.fmt_short(),
                    transfer = %out.transfer.fmt_short(),
                    strategy = %out.strategy,
                    records = totals.records,
                    bytes = totals.bytes,
                    "transfer completed"
                );
                self.shared.emit(SyncEvent::TransferCompleted {
                    transfer: out.transfer,
                    peer: msg.peer,
                    owner: self.shared.me(),
                    direction: Direction::Send,
                    strategy: out.strategy,
                    records: totals.records,
                    bytes: totals.bytes,
                    seconds: out.started.elapsed().as_secs_f64(),
                });
                Self::save_checkpoint(
                    &self.shared,
                    msg.peer,
                    &out,
                    totals.acked,
                    TransferState::Completed,
                );
                self.pump(msg.peer, ctx);
            }
            Outcome::Failed(cause) | Outcome::Panicked(cause) => {
                self.transfer_failed(msg.peer, msg.transfer, msg.generation, cause, ctx)
            }
        }
    }
}

impl Handler<CloseAll> for TransferSupervisor {
    type Result = usize;
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> usize {
        let mut n = 0;
        for st in self.peers.values() {
            if let Some(s) = &st.session {
                s.do_send(CloseSession {
                    cause: Some("shutdown".into()),
                });
                n += 1;
            }
        }
        n
    }
}

impl Handler<GetPeers> for TransferSupervisor {
    type Result = Vec<PeerStatus>;
    fn handle(&mut self, _: GetPeers, _: &mut Context<Self>) -> Vec<PeerStatus> {
        self.peers
            .values()
            .map(|st| PeerStatus {
                peer: st.info.device,
                name: st.info.name.clone(),
                addr: st.info.addr.clone(),
                origin: st.origin,
                holds_of_me: st.holds_of_me,
                advertised: st.advertised,
                outgoing: st.outgoing.as_ref().map(|o| (o.transfer, o.strategy)),
                transfer: st.transfer_status(),
                bytes_sent: st.writer.bytes_sent(),
                verification: self.shared.verify.of_peer(st.info.device),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_keep_the_connection_the_lower_id_dialed() {
        use SessionOrigin::{Accepted, Attached, Dialed};
        let (lo, hi) = {
            let (a, b) = (DeviceId::new_v7(), DeviceId::new_v7());
            (a.min(b), a.max(b))
        };
        // The lower id keeps its own dial, whichever opened first.
        assert!(keep_newer(lo, hi, Accepted, Dialed));
        assert!(!keep_newer(lo, hi, Dialed, Accepted));
        // The higher id keeps the one it accepted: the same connection.
        assert!(keep_newer(hi, lo, Dialed, Accepted));
        assert!(!keep_newer(hi, lo, Accepted, Dialed));
        // The same direction (a redial after a silent loss): the newer.
        for (me, peer) in [(lo, hi), (hi, lo)] {
            for origin in [Dialed, Accepted, Attached] {
                assert!(keep_newer(me, peer, origin, origin));
            }
            assert!(keep_newer(me, peer, Attached, Dialed));
            assert!(keep_newer(me, peer, Accepted, Attached));
        }
    }
}
