//! State shared by every actor of one engine: the store, the device, the
//! configuration, the event bus and the shutdown signal.

use std::collections::HashSet;
use std::sync::Arc;

use sync_core::{DeviceId, Message};
use sync_net::NetConfig;
use sync_storage::{DeviceInfo, Store};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::events::SyncEvent;

/// Everything the actors of one engine share. Cheap to clone behind an `Arc`.
pub(crate) struct Shared {
    pub store: Store,
    pub device: DeviceInfo,
    pub config: EngineConfig,
    pub net: NetConfig,
    pub events: broadcast::Sender<SyncEvent>,
    pub shutdown: CancellationToken,
    /// The peers with a session now (kept by the supervisor), so that a
    /// redial loop stands by while its peer is connected another way.
    pub connected: watch::Sender<HashSet<DeviceId>>,
    /// Commits of this engine in progress: a bulk commit spans several
    /// transactions, and planning a transfer in the middle would pick a
    /// strategy for a fraction of it.
    pub commits_in_flight: std::sync::atomic::AtomicUsize,
    /// What peers hold and how it compares with this device's copies.
    pub verify: crate::verify::Verifications,
    /// The inbox of each running repair, by transfer id.
    pub repairs: dashmap::DashMap<
        sync_core::TransferId,
        tokio::sync::mpsc::Sender<crate::repair::RepairInbound>,
    >,
    /// Set once an injected sender panic has fired (`Faults`), so the retry runs clean.
    pub panic_injected: std::sync::atomic::AtomicBool,
}

pub(crate) type SharedRef = Arc<Shared>;

impl Shared {
    /// This device's id: the owner of its records.
    pub fn me(&self) -> DeviceId {
        self.device.device_id
    }

    /// Publishes an event; having no subscriber is fine.
    pub fn emit(&self, event: SyncEvent) {
        let _ = self.events.send(event);
    }

    /// The `Watermarks` message: this device's own sequence and max seq,
    /// then what it holds of every remote owner.
    pub async fn watermarks_message(&self) -> Result<Message, EngineError> {
        let local = self.store.local_watermark().await?;
        let mut list = vec![(self.me(), local.index_id, local.seq)];
        for (owner, w) in self.store.watermarks().await? {
            list.push((owner, w.index_id, w.seq));
        }
        Ok(Message::Watermarks(list))
    }
}

/// Changes above which `commit_local` spans several transactions.
const MULTI_TRANSACTION_COMMIT: usize = 10_000;

/// Counts a multi-transaction commit as in flight while it lives. Small
/// commits are one transaction: planning never sees half of one, and
/// deferring for them would stall live changes committed back to back.
pub(crate) struct CommitGuard(Option<SharedRef>);

impl CommitGuard {
    pub fn new(shared: &SharedRef, changes: usize) -> Self {
        if changes <= MULTI_TRANSACTION_COMMIT {
            return CommitGuard(None);
        }
        shared
            .commits_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        CommitGuard(Some(shared.clone()))
    }
}

impl Drop for CommitGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared
                .commits_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
