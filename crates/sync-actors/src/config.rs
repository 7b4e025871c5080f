//! Engine configuration.

use std::path::PathBuf;
use std::time::Duration;

use sync_core::Thresholds;

use crate::indexer::walk::UnreadablePaths;

/// Where an engine keeps its files and how it paces transfers.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The device's data directory: `library.db`, `identity/`, `trust.json`.
    pub data_dir: PathBuf,
    /// Strategy thresholds.
    pub thresholds: Thresholds,
    /// Records per `StateBatch` (default 10,000: SQLite commits 10K-20K rows per
    /// transaction best, measured).
    pub batch_size: usize,
    /// Unacknowledged batches a sender may have in flight (pushed), or a
    /// puller grants at first (bulk). The only brake: sending never sleeps.
    pub credit_window: u32,
    /// Attempts before a failing transfer is given up.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// After a transfer is given up, how long until it is tried again
    /// (default 60 s): an idle owner commits nothing that would replan it,
    /// and what made it fail (a full disk, a peer's bug) may be gone.
    pub retry_after_giving_up: Duration,
    /// Fault injection for tests.
    pub faults: Faults,
    /// Tombstones of this device's records younger than this are kept
    /// (default 30 days), whatever its peers acknowledged.
    pub tombstone_horizon: Duration,
    /// How often tombstones are collected (default one hour).
    pub gc_interval: Duration,
}

/// Faults injected on purpose, for tests of the supervisor.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Panic inside the sending transfer task once, after this many batches sent.
    pub panic_sender_after_batches: Option<u32>,
    /// Paths index walks treat as unreadable (tests run as root, whom
    /// permission bits do not stop).
    pub unreadable: UnreadablePaths,
}

impl EngineConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig {
            data_dir: data_dir.into(),
            thresholds: Thresholds::default(),
            batch_size: 10_000,
            credit_window: 4,
            max_attempts: 8,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            retry_after_giving_up: Duration::from_secs(60),
            tombstone_horizon: Duration::from_secs(30 * 24 * 3600),
            gc_interval: Duration::from_secs(3600),
            faults: Faults::default(),
        }
    }

    /// The library database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("library.db")
    }

    /// The identity directory (key and certificate).
    pub fn identity_dir(&self) -> PathBuf {
        self.data_dir.join("identity")
    }

    /// The trust store file.
    pub fn trust_path(&self) -> PathBuf {
        self.data_dir.join("trust.json")
    }

    /// Retry delay before attempt `attempt` (1-based), exponential and capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        (self.backoff_base * factor).min(self.backoff_max)
    }
}
