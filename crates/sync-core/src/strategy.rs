//! Strategy choice: how to bring a peer up to date, a pure function of what
//! it holds and how much it is missing.

use serde::{Deserialize, Serialize};

use crate::id::{IndexId, Seq, Watermark};

/// What a peer holds of one owner.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PeerHolding {
    /// Nothing at all.
    Nothing,
    /// Records of another (older) IndexId of the owner: they must be replaced.
    OtherIndex,
    /// Every record up to this seq of the owner's current IndexId.
    UpTo(Seq),
}

impl PeerHolding {
    /// What a peer holds, given its watermark (if any) and the owner's current IndexId.
    pub fn from_watermark(peer: Option<Watermark>, current: IndexId) -> PeerHolding {
        match peer {
            None => PeerHolding::Nothing,
            Some(w) if w.index_id != current => PeerHolding::OtherIndex,
            Some(w) if w.seq == Seq::ZERO => PeerHolding::Nothing,
            Some(w) => PeerHolding::UpTo(w.seq),
        }
    }

    /// The seq the peer holds in the current IndexId (zero unless `UpTo`).
    pub fn seq(self) -> Seq {
        match self {
            PeerHolding::UpTo(s) => s,
            _ => Seq::ZERO,
        }
    }
}

/// Thresholds of the strategy table (configuration).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Thresholds {
    /// Fewer pending records than this travel as individual `StateChange`s (default 100).
    pub individual_below: u64,
    /// At least this many pending records: bulk notice and pull (default 100,000).
    pub bulk_from: u64,
    /// A peer holding nothing of the owner, with at least this many records
    /// pending, gets a database snapshot (default 100,000).
    pub snapshot_from: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            individual_below: 100,
            bulk_from: 100_000,
            snapshot_from: 100_000,
        }
    }
}

/// How to bring a peer up to date with one owner.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Strategy {
    /// Nothing pending.
    UpToDate,
    /// Individual `StateChange` messages.
    Individual,
    /// Pushed `StateBatch`es under a credit window.
    Batches,
    /// `BulkIndexComplete`, then the peer pulls with `FetchRequest`.
    Bulk,
    /// A database snapshot, then the tail by batches.
    Snapshot,
    /// Range-based set reconciliation, then only the differing records
    /// (chosen by the supervisor when a peer's copy differs or holds
    /// another IndexId of mostly the same records; never by
    /// [`choose_strategy`]).
    Repair,
}

impl Strategy {
    /// Lowercase name, as in CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::UpToDate => "up_to_date",
            Strategy::Individual => "individual",
            Strategy::Batches => "batch",
            Strategy::Bulk => "bulk",
            Strategy::Snapshot => "snapshot",
            Strategy::Repair => "repair",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Chooses the strategy for a peer holding `peer` of an owner, with
/// `pending` records of the owner above what it holds.
pub fn choose_strategy(peer: PeerHolding, pending: u64, t: &Thresholds) -> Strategy {
    let fresh = matches!(peer, PeerHolding::Nothing | PeerHolding::OtherIndex);
    if fresh && pending >= t.snapshot_from {
        Strategy::Snapshot
    } else if pending == 0 {
        Strategy::UpToDate
    } else if pending < t.individual_below {
        Strategy::Individual
    } else if pending < t.bulk_from {
        Strategy::Batches
    } else {
        Strategy::Bulk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        individual_below: 100,
        bulk_from: 100_000,
        snapshot_from: 100_000,
    };

    #[test]
    fn every_row_and_boundary() {
        use PeerHolding::*;
        use Strategy::*;
        let cases = [
            (UpTo(Seq(5)), 0, UpToDate),
            (Nothing, 0, UpToDate),
            (UpTo(Seq(5)), 1, Individual),
            (UpTo(Seq(5)), 99, Individual),
            (UpTo(Seq(5)), 100, Batches),
            (UpTo(Seq(5)), 99_999, Batches),
            (UpTo(Seq(5)), 100_000, Bulk),
            (UpTo(Seq(5)), 5_000_000, Bulk),
            (Nothing, 50, Individual),
            (Nothing, 5_000, Batches),
            (Nothing, 99_999, Batches),
            (Nothing, 100_000, Snapshot),
            (Nothing, 1_000_000, Snapshot),
            (OtherIndex, 0, UpToDate),
            (OtherIndex, 1, Individual),
            (OtherIndex, 99_999, Batches),
            (OtherIndex, 100_000, Snapshot),
        ];
        for (peer, pending, want) in cases {
            assert_eq!(
                choose_strategy(peer, pending, &T),
                want,
                "{peer:?} {pending}"
            );
        }
    }

    #[test]
    fn thresholds_are_configuration() {
        let t = Thresholds {
            individual_below: 10,
            bulk_from: 1_000,
            snapshot_from: 500,
        };
        assert_eq!(
            choose_strategy(PeerHolding::UpTo(Seq(1)), 10, &t),
            Strategy::Batches
        );
        assert_eq!(
            choose_strategy(PeerHolding::Nothing, 600, &t),
            Strategy::Snapshot
        );
        assert_eq!(
            choose_strategy(PeerHolding::UpTo(Seq(1)), 600, &t),
            Strategy::Batches
        );
        assert_eq!(
            choose_strategy(PeerHolding::UpTo(Seq(1)), 1_000, &t),
            Strategy::Bulk
        );
    }

    #[test]
    fn holding_from_watermark() {
        let cur = IndexId(7);
        assert_eq!(PeerHolding::from_watermark(None, cur), PeerHolding::Nothing);
        assert_eq!(
            PeerHolding::from_watermark(Some(Watermark::new(IndexId(8), Seq(3))), cur),
            PeerHolding::OtherIndex
        );
        assert_eq!(
            PeerHolding::from_watermark(Some(Watermark::new(cur, Seq(3))), cur),
            PeerHolding::UpTo(Seq(3))
        );
        assert_eq!(
            PeerHolding::from_watermark(Some(Watermark::new(cur, Seq(0))), cur),
            PeerHolding::Nothing
        );
    }
}
