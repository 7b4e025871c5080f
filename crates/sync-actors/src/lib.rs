//! The sync engine: actix actors, the transfer supervisor, and the
//! host-facing [`SyncEngine`] handle with its event bus.
//!
//! The host drives the engine with async methods and [`HostEvent`]s and
//! watches it through [`SyncEvent`]s and tracing spans. Actors stay private:
//!
//! | actor | owns |
//! |---|---|
//! | `Indexer` | commits of this device's records |
//! | `PeerSession` | one authenticated connection |
//! | `BatchBroadcaster` | one outgoing transfer |
//! | `BulkFetchJob` | everything received from one peer on one session |
//! | `SnapshotExporter` | snapshot files and serving their chunks |
//! | `TransferSupervisor` | strategy choice, restarts with backoff |
#![warn(clippy::print_stdout)]

mod broadcaster;
mod bulk_fetch;
mod config;
mod engine;
mod error;
mod events;
mod gc;
mod indexer;
mod peer_session;
mod repair;
mod shared;
mod snapshot_exporter;
mod supervisor;
mod verify;

pub use config::{EngineConfig, Faults};
pub use engine::{EngineStatus, SyncEngine, init_device};
pub use error::EngineError;
pub use events::{Direction, HostEvent, SyncEvent};
pub use gc::Collected;
pub use indexer::Progress;
pub use indexer::walk::{IndexReport, Unreadable, UnreadablePaths, plan_index, plan_index_with};
pub use supervisor::{PeerStatus, SessionOrigin, TransferStatus};
