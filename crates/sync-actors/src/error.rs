//! The engine's error type.

use sync_core::DeviceId;

/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The data directory holds no initialized device.
    #[error("data directory {0} holds no device: run `lsync --data DIR init` first")]
    NotInitialized(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] sync_storage::StorageError),
    /// The network failed.
    #[error(transparent)]
    Net(#[from] sync_net::NetError),
    /// A peer sent something we refuse.
    #[error("peer {peer} sent {what}")]
    Protocol {
        /// The peer.
        peer: DeviceId,
        /// What was wrong.
        what: String,
    },
    /// A repair could not run to its end (it is retried like a transfer).
    #[error("repair: {0}")]
    Repair(String),
    /// A peer is not connected.
    #[error("peer {0} is not connected")]
    NotConnected(DeviceId),
    /// The engine has shut down.
    #[error("the engine is shut down")]
    Shutdown,
    /// A transfer task panicked.
    #[error("transfer task panicked: {0}")]
    Panicked(String),
    /// A folder could not be indexed at all (missing, not a folder).
    #[error("cannot index {0}")]
    Index(String),
    /// Starting the engine's thread failed.
    #[error("engine thread: {0}")]
    Thread(String),
}
