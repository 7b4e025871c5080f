//! Verification: the `Digests` each side sends (what it holds of every
//! owner, with the digest of exactly those records), the comparison with
//! this device's own copies, and the per-peer, per-owner result that
//! `status` and `SyncEvent::Verified` report.
//!
//! "Verified identical at S" is said only when both hold the same IndexId
//! of an owner up to the same seq S and their digests (LtHash16 over every
//! replicated field of every record) and record counts are equal: it is a
//! statement about contents, not about watermarks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sync_core::digest::{DigestStatement, OwnerDigest, SignedStatement, Verification};
use sync_core::{DeviceId, Message};
use sync_net::ConnWriter;

use crate::error::EngineError;
use crate::events::SyncEvent;
use crate::shared::{Shared, SharedRef};

/// The least time between two `Digests` sent to one peer after transfers
/// (a burst of live changes sends one, then one more when it settles).
pub(crate) const DIGESTS_INTERVAL: Duration = Duration::from_millis(500);

/// What this device knows about its peers' copies: their latest claims and
/// the verification of each owner both hold.
#[derive(Default)]
pub(crate) struct Verifications {
    inner: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Per peer: its latest claim per owner.
    claims: HashMap<DeviceId, HashMap<DeviceId, OwnerDigest>>,
    /// Per (peer, owner): the comparison of the peer's copy with ours.
    results: HashMap<(DeviceId, DeviceId), Verification>,
    /// Per peer: when `Digests` were last sent, and whether one more is due.
    sent: HashMap<DeviceId, (Instant, bool)>,
    /// The last statement this device signed of its own records, and when.
    signed: Option<(SignedStatement, Instant)>,
}

impl Verifications {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The peer's latest claim about `owner`'s records.
    pub(crate) fn claim(&self, peer: DeviceId, owner: DeviceId) -> Option<OwnerDigest> {
        self.state()
            .claims
            .get(&peer)
            .and_then(|c| c.get(&owner))
            .copied()
    }

    /// Every verification result with `peer`, by owner.
    pub(crate) fn of_peer(&self, peer: DeviceId) -> Vec<(DeviceId, Verification)> {
        let mut out: Vec<_> = self
            .state()
            .results
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|((_, o), v)| (*o, *v))
            .collect();
        out.sort_by_key(|(o, _)| *o);
        out
    }

    /// Forgets a peer whose session ended.
    pub(crate) fn forget(&self, peer: DeviceId) {
        let mut st = self.state();
        st.claims.remove(&peer);
        st.results.retain(|(p, _), _| *p != peer);
        st.sent.remove(&peer);
    }

    /// Whether a `Digests` may go to `peer` now; if not, marks one due and
    /// returns the wait (the caller sends it then, once).
    pub(crate) fn pace(&self, peer: DeviceId) -> Result<(), Option<Duration>> {
        let mut st = self.state();
        let now = Instant::now();
        match st.sent.get_mut(&peer) {
            Some((last, due)) if now.duration_since(*last) < DIGESTS_INTERVAL => {
                if *due {
                    return Err(None);
                }
                *due = true;
                Err(Some(DIGESTS_INTERVAL - now.duration_since(*last)))
            }
            _ => {
                st.sent.insert(peer, (now, false));
                Ok(())
            }
        }
    }

    /// The delayed send `pace` asked for is going out now.
    pub(crate) fn paced_send(&self, peer: DeviceId) {
        self.state().sent.insert(peer, (Instant::now(), false));
    }
}

/// Sends `Digests` to `peer` now, or once when the pace allows (a send
/// already due covers this one).
pub(crate) fn send_digests_soon(shared: SharedRef, peer: DeviceId, writer: ConnWriter) {
    let wait = match shared.verify.pace(peer) {
        Ok(()) => None,
        Err(None) => return,
        Err(Some(wait)) => Some(wait),
    };
    actix_rt::spawn(async move {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
            shared.verify.paced_send(peer);
        }
        match digests_message(&shared).await {
            Ok(msg) => {
                let _ = writer.send(msg).await;
            }
            Err(e) => tracing::warn!(peer = %peer.fmt_short(), cause = %e, "digests not sent"),
        }
    });
}

/// Audits the stored digests against the rows if another program wrote
/// the library since the last audit, and says which owners changed.
pub(crate) async fn audit(shared: &Shared) -> Result<(), EngineError> {
    for f in shared.store.audit_if_changed().await? {
        shared.emit(SyncEvent::RowsChangedOutside {
            owner: f.owner,
            stored_records: f.stored.0,
            actual_records: f.actual.0,
        });
    }
    Ok(())
}

/// The `Digests` message: every copy this device holds, its own first,
/// with the signed statement of its own records.
pub(crate) async fn digests_message(shared: &Shared) -> Result<Message, EngineError> {
    let me = shared.me();
    let mut claims = shared.store.owner_digests().await?;
    claims.sort_by_key(|d| (d.owner != me, d.owner));
    let statement = own_statement(shared, claims.first().filter(|d| d.owner == me));
    Ok(Message::Digests { claims, statement })
}

/// The least time between two signatures of this device's own digest:
/// a statement is signed when the digest moved, at most this often (the
/// last one goes out meanwhile; the next `Digests` carries the newer).
pub(crate) const SIGN_INTERVAL: Duration = Duration::from_secs(1);

/// The signed statement of this device's own digest: re-signed when it
/// moved, at most every [`SIGN_INTERVAL`].
fn own_statement(shared: &Shared, own: Option<&OwnerDigest>) -> Option<SignedStatement> {
    let own = own?;
    let statement = DigestStatement {
        library: shared.net.library,
        owner: own.owner,
        index_id: own.watermark.index_id,
        seq: own.watermark.seq,
        records: own.records,
        digest: own.digest,
        pruned: own.pruned,
    };
    let mut st = shared.verify.state();
    match &st.signed {
        Some((s, _)) if s.statement == statement => return Some(s.clone()),
        Some((s, at)) if at.elapsed() < SIGN_INTERVAL => return Some(s.clone()),
        _ => {}
    }
    match shared.net.identity.sign_statement(statement) {
        Ok(signed) => {
            st.signed = Some((signed.clone(), Instant::now()));
            Some(signed)
        }
        Err(e) => {
            tracing::warn!(cause = %e, "digest statement not signed");
            st.signed.as_ref().map(|(s, _)| s.clone())
        }
    }
}

/// Checks a peer's signed statement about its own records against its
/// pinned certificate and against its claim in the same message, and
/// keeps it. A forged or contradicting statement is the peer's error.
pub(crate) async fn on_statement(
    shared: &Shared,
    peer: DeviceId,
    claims: &[OwnerDigest],
    signed: SignedStatement,
) -> Result<(), String> {
    let s = signed.statement;
    if s.owner != peer {
        return Err(format!(
            "a statement signed for {}, not by the peer itself",
            s.owner.fmt_short()
        ));
    }
    shared
        .net
        .trust
        .verify_statement_pinned(&signed, shared.net.library)
        .map_err(|e| format!("digest statement refused: {e}"))?;
    let contradicts = claims.iter().any(|c| {
        c.owner == peer
            && c.watermark == sync_core::Watermark::new(s.index_id, s.seq)
            && (c.digest != s.digest || c.records != s.records)
    });
    if contradicts {
        return Err("a claim that contradicts the peer's own signed statement".into());
    }
    let bytes = postcard::to_allocvec(&signed).map_err(|e| e.to_string())?;
    if let Err(e) = shared.store.save_statement(peer, s.seq, &bytes).await {
        tracing::warn!(peer = %peer.fmt_short(), cause = %e, "statement not kept");
    }
    Ok(())
}

/// Drops the peer's own tombstones up to the collection point its claim
/// announces, if this device's copy of the same IndexId has not yet: the
/// two digests then cover the same records. Only tombstones go.
async fn follow_collection(
    shared: &Shared,
    peer: DeviceId,
    claims: &[OwnerDigest],
) -> Result<(), EngineError> {
    let Some(theirs) = claims.iter().find(|c| c.owner == peer) else {
        return Ok(());
    };
    let Some(mine) = shared.store.owner_digest(peer).await? else {
        return Ok(());
    };
    if mine.watermark.index_id != theirs.watermark.index_id || theirs.pruned <= mine.pruned {
        return Ok(());
    }
    // Never past what this copy holds: beyond it, the deletes it has not
    // heard of come first (or a repair, if they were collected).
    let upto = theirs.pruned.min(mine.watermark.seq);
    if upto <= mine.pruned {
        return Ok(());
    }
    let dropped = shared.store.prune_tombstones(peer, upto).await?;
    shared.emit(SyncEvent::TombstonesCollected {
        owner: peer,
        upto,
        dropped,
    });
    Ok(())
}

/// What a peer's `Digests` told this device.
pub(crate) struct Compared {
    /// The peer's copy of this device's own records differs from them at
    /// the same seq, or holds another IndexId of them: a repair is due.
    pub repair_mine: Option<OwnerDigest>,
}

/// Compares a peer's claims with this device's copies, records the results
/// and emits `Verified` for each that changed.
pub(crate) async fn on_digests(
    shared: &Shared,
    peer: DeviceId,
    claims: Vec<OwnerDigest>,
) -> Result<Compared, EngineError> {
    let me = shared.me();
    follow_collection(shared, peer, &claims).await?;
    let mine: HashMap<DeviceId, OwnerDigest> = shared
        .store
        .owner_digests()
        .await?
        .into_iter()
        .map(|d| (d.owner, d))
        .collect();
    let mut changed = Vec::new();
    let mut repair_mine = None;
    {
        let mut st = shared.verify.state();
        let held = st.claims.entry(peer).or_default();
        held.clear();
        for c in &claims {
            held.insert(c.owner, *c);
        }
        for c in &claims {
            let Some(m) = mine.get(&c.owner) else {
                continue;
            };
            let v = Verification::of(m, c);
            if c.owner == me && matches!(v, Verification::Differs { .. }) {
                repair_mine = Some(*c);
            }
            if st.results.insert((peer, c.owner), v) != Some(v) {
                changed.push((c.owner, v));
            }
        }
    }
    for (owner, v) in changed {
        match v {
            Verification::Differs { seq } => tracing::warn!(
                peer = %peer.fmt_short(),
                owner = %owner.fmt_short(),
                seq = seq.0,
                "copies differ at the same seq"
            ),
            _ => tracing::debug!(
                peer = %peer.fmt_short(),
                owner = %owner.fmt_short(),
                state = %v.describe(),
                "verification"
            ),
        }
        shared.emit(SyncEvent::Verified {
            peer,
            owner,
            state: v,
        });
    }
    Ok(Compared { repair_mine })
}
