//! The wire protocol: one `Message` enum, postcard-encoded inside frames.
//!
//! Variant order is the wire tag: append new variants at the end and bump
//! [`PROTOCOL_VERSION`] when a change is not backwards compatible.

use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, IndexId, LibraryId, LocationId, Seq, SnapshotId, TransferId};
use crate::model::Record;

/// The protocol version carried by `Hello`; peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Why a peer refused something; sent in `Message::Error` before closing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ErrorCode {
    /// `Hello.protocol` differs from ours.
    ProtocolMismatch,
    /// `Hello.library` differs from ours.
    LibraryMismatch,
    /// The DeviceId in `Hello` is not the one pinned for the certificate.
    IdentityMismatch,
    /// A frame or payload could not be decoded.
    Malformed,
    /// A batch or change does not follow what we hold (gap).
    Gap,
    /// Records of an owner other than the authenticated peer.
    ForeignOwner,
    /// A batch for an IndexId we do not hold.
    WrongIndex,
    /// A snapshot failed verification.
    BadSnapshot,
    /// An unexpected message for the session's state.
    Unexpected,
    /// The receiver could not store what it was sent (disk full, IO error).
    Storage,
    /// The peer is shutting down.
    Shutdown,
    /// Too many connections.
    Busy,
}

/// One message of the sync protocol.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Message {
    /// First frame each way after TLS: version and library must match, and
    /// `device` must be the DeviceId pinned for the peer's certificate.
    Hello {
        /// Protocol version ([`PROTOCOL_VERSION`]).
        protocol: u32,
        /// The sender's device id.
        device: DeviceId,
        /// The library both sides must share.
        library: LibraryId,
        /// Human-readable device name.
        name: String,
    },
    /// What the sender holds of each owner: `(owner, index, seq)`.
    /// Sent after `Hello`, and again after any bulk load completes.
    Watermarks(Vec<(DeviceId, IndexId, Seq)>),
    /// One record, for small live changes. Accepted only if
    /// `after <= receiver's watermark` for `owner` and `index_id`.
    StateChange {
        /// The owner of the record (must be the authenticated peer).
        owner: DeviceId,
        /// The owner's sequence.
        index_id: IndexId,
        /// The seq the receiver must already hold for this change to be contiguous.
        after: Seq,
        /// The record; its seq is the new watermark.
        record: Record,
    },
    /// All records of `owner` with `after < seq <= last`, columnar and
    /// lz4-compressed (`records::encode_records`).
    StateBatch {
        /// The transfer this batch belongs to.
        transfer: TransferId,
        /// The owner of the records (must be the authenticated peer).
        owner: DeviceId,
        /// The owner's sequence.
        index_id: IndexId,
        /// Exclusive lower bound; must be `<=` the receiver's watermark.
        after: Seq,
        /// Inclusive upper bound; the receiver's watermark afterwards.
        last: Seq,
        /// Number of records in `payload`.
        count: u32,
        /// The encoded records.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The receiver committed everything up to `last` (rows and watermark, one transaction).
    BatchAck {
        /// The transfer acknowledged.
        transfer: TransferId,
        /// The receiver's watermark after the commit.
        last: Seq,
    },
    /// A tiny notice that an owner holds many new records; the peer pulls
    /// with `FetchRequest` when it wants.
    BulkIndexComplete {
        /// The owner whose records are available.
        owner: DeviceId,
        /// The owner's sequence.
        index_id: IndexId,
        /// The location that was indexed, if the notice is about one.
        location: Option<LocationId>,
        /// Number of records above the receiver's watermark.
        entry_count: u64,
        /// The owner's max seq.
        max_seq: Seq,
        /// When indexing finished, microseconds since the epoch.
        indexed_at: i64,
    },
    /// Pull: send me up to `max_batches` batches of `owner` after `after`.
    /// The credit window for on-demand and bulk loading.
    FetchRequest {
        /// The pulling transfer.
        transfer: TransferId,
        /// The owner to pull.
        owner: DeviceId,
        /// The sequence the puller holds (must match the owner's current one).
        index_id: IndexId,
        /// Restrict to one location (`None`: all of the owner's records).
        location: Option<LocationId>,
        /// The puller's watermark.
        after: Seq,
        /// How many batches the puller grants.
        max_batches: u32,
    },
    /// A database snapshot of an owner's records is ready to download.
    SnapshotOffer {
        /// Snapshot id.
        id: SnapshotId,
        /// The owner whose records it holds.
        owner: DeviceId,
        /// The owner's sequence.
        index_id: IndexId,
        /// Highest seq in the snapshot: the watermark after import.
        max_seq: Seq,
        /// Number of records.
        entries: u64,
        /// Size of the snapshot file.
        bytes: u64,
        /// Number of chunks.
        chunks: u32,
        /// SHA-256 of the whole snapshot file.
        hash: Hash,
    },
    /// Send the chunks of snapshot `id` starting at `from_chunk` (resumable).
    SnapshotRequest {
        /// Snapshot id.
        id: SnapshotId,
        /// First chunk wanted.
        from_chunk: u32,
    },
    /// One chunk of a snapshot file, lz4-compressed.
    SnapshotChunk {
        /// Snapshot id.
        id: SnapshotId,
        /// Chunk index.
        index: u32,
        /// SHA-256 of the uncompressed chunk.
        hash: Hash,
        /// The lz4-compressed chunk (size prepended).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A typed refusal; the sender closes the connection afterwards.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Keeps an idle connection alive.
    Keepalive,
}

impl Message {
    /// Number of variants: tags at or above it are unknown.
    pub const VARIANT_COUNT: u32 = 12;

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Watermarks(_) => "watermarks",
            Message::StateChange { .. } => "state_change",
            Message::StateBatch { .. } => "state_batch",
            Message::BatchAck { .. } => "batch_ack",
            Message::BulkIndexComplete { .. } => "bulk_index_complete",
            Message::FetchRequest { .. } => "fetch_request",
            Message::SnapshotOffer { .. } => "snapshot_offer",
            Message::SnapshotRequest { .. } => "snapshot_request",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
            Message::Error { .. } => "error",
            Message::Keepalive => "keepalive",
        }
    }
}

/// Size of one uncompressed snapshot chunk: chunk `i` covers bytes
/// `i * SNAPSHOT_CHUNK_SIZE ..` of the snapshot file.
pub const SNAPSHOT_CHUNK_SIZE: usize = 1 << 20;
