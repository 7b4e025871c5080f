//! Tombstone collection of this device's own records: the point up to
//! which its tombstones go is the lower of the horizon (tombstones younger
//! than `EngineConfig::tombstone_horizon` stay) and what every trusted
//! peer known to hold its records has acknowledged. Replicas follow the
//! point the owner's `Digests` carry (`verify.rs`); a replica that was
//! behind it is repaired by reconciliation.

use sync_core::Seq;
use tracing::{Instrument, info, info_span};

use crate::error::EngineError;
use crate::events::SyncEvent;
use crate::shared::Shared;

/// What one collection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collected {
    /// The collection point: tombstones at or below it are gone.
    pub upto: Seq,
    /// Tombstones dropped by this run.
    pub dropped: u64,
}

/// Collects this device's tombstones as far as the horizon and its peers allow.
pub(crate) async fn collect(shared: &Shared) -> Result<Collected, EngineError> {
    let me = shared.me();
    let span = info_span!("collect_tombstones", device = %me.fmt_short());
    async move {
        let local = shared.store.local_watermark().await?;
        let horizon = chrono::Duration::from_std(shared.config.tombstone_horizon)
            .unwrap_or(chrono::Duration::MAX);
        let cutoff = chrono::Utc::now()
            .checked_sub_signed(horizon)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        // A zero horizon asks for no age at all (seqs are dated by minute).
        let mut upto = if shared.config.tombstone_horizon.is_zero() {
            local.seq
        } else {
            shared.store.local_seq_before(cutoff).await?
        };
        let holds = shared.store.peer_holds().await?;
        for (_, peer) in shared.net.trust.entries() {
            if let Some(w) = holds.get(&peer) {
                // A peer holding another IndexId of these records holds
                // them all the same: it waits for that peer.
                let acked = if w.index_id == local.index_id {
                    w.seq
                } else {
                    Seq::ZERO
                };
                upto = upto.min(acked);
            }
        }
        let current = shared
            .store
            .owner_digest(me)
            .await?
            .map_or(Seq::ZERO, |d| d.pruned);
        if upto <= current {
            return Ok(Collected {
                upto: current,
                dropped: 0,
            });
        }
        let dropped = shared.store.prune_tombstones(me, upto).await?;
        info!(upto = upto.0, dropped, "tombstones collected");
        shared.emit(SyncEvent::TombstonesCollected {
            owner: me,
            upto,
            dropped,
        });
        Ok(Collected { upto, dropped })
    }
    .instrument(span)
    .await
}
