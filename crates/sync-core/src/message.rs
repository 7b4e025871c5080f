//! The wire protocol: one `Message` enum, postcard-encoded inside frames.
//!
//! Variant order is the wire tag: append new variants at the end and bump
//! [`PROTOCOL_VERSION`] when a change is not backwards compatible.
//!
//! # Bounds
//!
//! A frame decompresses to at most `Limits::max_decompressed` (64 MiB), and
//! postcard builds each field at the length the bytes declare. Byte and
//! string fields (`Hello.name`, `StateBatch.payload`, `SnapshotChunk.data`,
//! `Error.message`, the names and paths of a `StateChange`'s record) take no
//! more memory than the wire bytes that hold them, so the frame limits
//! bound them. A list of structs is another matter: each element may be
//! larger in memory than on the wire. The one such field, the list of
//! `Watermarks`, is bounded by [`MAX_OWNERS`]: its deserializer refuses a
//! longer list from its declared length, before reading or allocating for
//! it, and the codec refuses to encode one. A list field added to
//! [`Message`] needs a bound of its own.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::id::{DeviceId, IndexId, LibraryId, LocationId, Seq, SnapshotId, TransferId};
use crate::model::Record;

/// The protocol version carried by `Hello`; peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The most owners one [`Message::Watermarks`] may list: 65,536.
///
/// An owner is a device of the library; a user's library has a handful, so
/// 65,536 is generous by four orders of magnitude. The bound is there
/// because an entry is 18 bytes on the wire (16-byte id, two one-byte
/// varints) and 32 in memory: a 64 MiB payload of them built a 119 MiB
/// `Vec`, more while it grew. At the bound the list takes 2 MiB in memory,
/// at least 1.1 MiB on the wire. A receiver refuses a longer list before
/// allocating for it; a sender refuses to encode one.
pub const MAX_OWNERS: usize = 1 << 16;

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
    /// A signed digest statement failed verification, was signed by
    /// another device than its sender claims, or contradicts the sender's
    /// own claim.
    BadStatement,
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
    /// What the sender holds of each owner: `(owner, index, seq)`, at most
    /// [`MAX_OWNERS`] of them. Sent after `Hello`, and again after any bulk
    /// load completes.
    Watermarks(#[serde(deserialize_with = "owners")] Vec<(DeviceId, IndexId, Seq)>),
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
    /// What the sender holds of each owner, its own records first: the
    /// watermark, record count and digest of each copy, at most
    /// [`MAX_OWNERS`], read in one transaction; and the owner-signed
    /// statement of its own records. Sent before `Watermarks` when a
    /// session opens and again when a transfer between the two completes.
    Digests {
        /// One claim per owner held.
        #[serde(deserialize_with = "claims")]
        claims: Vec<crate::digest::OwnerDigest>,
        /// The sender's signed statement about its own records.
        statement: Option<crate::digest::SignedStatement>,
    },
    /// A reconciliation round about `owner`'s records (the sender's own),
    /// from seq 0 to `upto`: the receiver answers with `ReconReply`.
    ReconRequest {
        /// The repair this round belongs to.
        transfer: TransferId,
        /// Whose records (the sender's own).
        owner: DeviceId,
        /// The owner's current IndexId.
        index_id: IndexId,
        /// The last seq of the span both sides reconcile.
        upto: Seq,
        /// The ranges and fingerprints.
        round: crate::reconcile::ReconMessage,
    },
    /// The receiver's answer to a `ReconRequest`.
    ReconReply {
        /// The repair.
        transfer: TransferId,
        /// The ranges and fingerprints.
        round: crate::reconcile::ReconMessage,
    },
    /// The records the receiver's copy of the sender's records lacks, the
    /// seqs of those it holds and must drop, and the claim its copy must
    /// then match exactly: committed in one transaction only if it does,
    /// and acknowledged with `BatchAck` (the receiver's watermark either way).
    RepairBatch {
        /// The repair.
        transfer: TransferId,
        /// The sender's own records as they are: watermark, count, digest.
        claim: crate::digest::OwnerDigest,
        /// Seqs the receiver holds that the sender does not, at most
        /// [`crate::records::BatchLimits`]' default record count.
        #[serde(deserialize_with = "repair_seqs")]
        extra: Vec<Seq>,
        /// Records in `payload`.
        count: u32,
        /// The records (`records::encode_records`).
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
}

impl Message {
    /// Number of variants: tags at or above it are unknown.
    pub const VARIANT_COUNT: u32 = 16;

    /// The wire tag of [`Message::Watermarks`].
    pub(crate) const WATERMARKS_TAG: u32 = 1;

    /// Why a peer would refuse this message for its size, if it would: a
    /// `Watermarks` of more than [`MAX_OWNERS`] owners. Checked by the
    /// codec before encoding.
    pub(crate) fn over_bounds(&self) -> Option<String> {
        match self {
            Message::Watermarks(list) if list.len() > MAX_OWNERS => {
                Some(too_many_owners(list.len() as u64))
            }
            Message::Digests { claims, .. } if claims.len() > MAX_OWNERS => {
                Some(too_many_owners(claims.len() as u64))
            }
            Message::RepairBatch { extra, .. } if extra.len() > MAX_REPAIR_SEQS => Some(format!(
                "a repair dropping {} records exceeds the maximum of {MAX_REPAIR_SEQS}",
                extra.len()
            )),
            Message::ReconRequest { round, .. } | Message::ReconReply { round, .. } => {
                round.over_limits().map(|e| e.to_string())
            }
            _ => None,
        }
    }

    /// Why `payload`, a message that failed to deserialize, was refused,
    /// if it declares a list longer than its bound. postcard drops the
    /// message of a deserializer's error, so the codec asks here to report
    /// the bound instead of "Serde Deserialization Error".
    pub(crate) fn declared_over_bounds(payload: &[u8]) -> Option<String> {
        // The tag and a sequence length are both varints.
        let ((tag, declared), _) = postcard::take_from_bytes::<(u32, u64)>(payload).ok()?;
        (tag == Self::WATERMARKS_TAG && declared > MAX_OWNERS as u64)
            .then(|| too_many_owners(declared))
    }

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
            Message::Digests { .. } => "digests",
            Message::ReconRequest { .. } => "recon_request",
            Message::ReconReply { .. } => "recon_reply",
            Message::RepairBatch { .. } => "repair_batch",
        }
    }
}

/// Size of one uncompressed snapshot chunk: chunk `i` covers bytes
/// `i * SNAPSHOT_CHUNK_SIZE ..` of the snapshot file.
pub const SNAPSHOT_CHUNK_SIZE: usize = 1 << 20;

/// The refusal of a `Watermarks` list of `len` owners.
fn too_many_owners(len: u64) -> String {
    format!("a watermarks list of {len} owners exceeds the maximum of {MAX_OWNERS}")
}

/// Deserializes the `Watermarks` list, at most [`MAX_OWNERS`] entries.
fn owners<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(DeviceId, IndexId, Seq)>, D::Error> {
    d.deserialize_seq(BoundedVec::<_, MAX_OWNERS>(PhantomData))
}

/// The most seqs a `RepairBatch` may ask to drop (the batch record limit).
pub const MAX_REPAIR_SEQS: usize = 65_536;

/// The bounded seq list of `RepairBatch`.
fn repair_seqs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Seq>, D::Error> {
    d.deserialize_seq(BoundedVec::<_, MAX_REPAIR_SEQS>(PhantomData))
}

/// The bounded claim list of `Digests`.
fn claims<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<crate::digest::OwnerDigest>, D::Error> {
    d.deserialize_seq(BoundedVec::<_, MAX_OWNERS>(PhantomData))
}

/// A visitor of a sequence of at most `MAX` elements. A declared length
/// above `MAX` (postcard gives it up front, as `size_hint`) is refused
/// before anything is read or allocated; the capacity reserved is never
/// more than `MAX` elements, and a sequence without a length hint is
/// refused at its `MAX + 1`th element.
struct BoundedVec<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedVec<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let hint = seq.size_hint();
        if let Some(len) = hint.filter(|&len| len > MAX) {
            return Err(serde::de::Error::invalid_length(len, &self));
        }
        let mut out = Vec::with_capacity(hint.unwrap_or(0).min(MAX));
        while let Some(value) = seq.next_element()? {
            if out.len() == MAX {
                return Err(serde::de::Error::invalid_length(MAX + 1, &self));
            }
            out.push(value);
        }
        Ok(out)
    }
}
