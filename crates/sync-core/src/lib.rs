//! The model, wire protocol, frame codec and strategy choice of the sync engine.
//!
//! This crate does no IO and knows nothing of actix, sea-orm or sockets:
//! it is the vocabulary every other crate speaks.
//!
//! ```
//! use sync_core::{choose_strategy, PeerHolding, Strategy, Thresholds};
//!
//! let t = Thresholds::default();
//! assert_eq!(choose_strategy(PeerHolding::Nothing, 1_000_000, &t), Strategy::Snapshot);
//! assert_eq!(choose_strategy(PeerHolding::UpTo(sync_core::Seq(10)), 50, &t), Strategy::Individual);
//! ```
#![warn(clippy::print_stdout)]

pub mod codec;
pub mod crash;
pub mod digest;
mod error;
mod fingerprint;
mod id;
pub mod message;
pub mod model;
pub mod names;
pub mod reconcile;
pub mod records;
mod strategy;
pub mod synthetic;
pub mod untrusted;

pub use codec::{FrameCodec, Limits};
pub use crash::crash_point;
pub use error::{DecodeError, EncodeError};
pub use fingerprint::Fingerprint;
pub use id::{
    DeviceId, EntryId, IndexId, LibraryId, LocationId, Seq, SnapshotId, TransferId, Watermark,
};
pub use message::{ErrorCode, Hash, Message, PROTOCOL_VERSION, SNAPSHOT_CHUNK_SIZE};
pub use model::{Entry, EntryKind, Location, Record};
pub use records::{BatchLimits, decode_records, encode_records};
pub use strategy::{PeerHolding, Strategy, Thresholds, choose_strategy};
