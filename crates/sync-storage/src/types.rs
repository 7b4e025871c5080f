//! Plain data types of the storage API: device info, summaries, checkpoints, snapshot manifests.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use sync_core::{
    DeviceId, Entry, EntryId, Fingerprint, Hash, IndexId, LibraryId, Location, LocationId, Seq,
    SnapshotId, Strategy, TransferId,
};

/// The local device of a library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// This device's id.
    pub device_id: DeviceId,
    /// The library it belongs to.
    pub library_id: LibraryId,
    /// Human-readable name.
    pub name: String,
}

/// The seqs stamped by one `commit_local`: `first..=last`. `first > last` means empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRange {
    /// First seq stamped.
    pub first: Seq,
    /// Last seq stamped.
    pub last: Seq,
}

impl SeqRange {
    /// True when no seq was stamped.
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }

    /// Number of seqs in the range.
    pub fn len(&self) -> u64 {
        if self.is_empty() {
            0
        } else {
            self.last.0 - self.first.0 + 1
        }
    }
}

/// One local change, stamped with the next seq by `commit_local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalChange {
    /// Create or update a location (its `seq` and `deleted` are ignored).
    Location(Location),
    /// Create or update an entry (its `seq` and `deleted` are ignored).
    Entry(Entry),
    /// Tombstone an entry in place (other fields kept).
    DeleteEntry(EntryId),
    /// Tombstone a location in place, and each of its live entries under a
    /// seq of its own (a location that ends deleted leaves no live entries).
    DeleteLocation(LocationId),
}

/// What the library holds of one owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerSummary {
    /// The owner device.
    pub owner: DeviceId,
    /// True for this device.
    pub local: bool,
    /// The owner's IndexId (as held).
    pub index_id: IndexId,
    /// Max seq for the local owner, watermark seq for a remote one.
    pub seq: Seq,
    /// Live (non-deleted) entry rows.
    pub entries: u64,
    /// Deleted entry rows.
    pub tombstones: u64,
    /// Order-independent hash over every record (entries and locations, tombstones included).
    pub fingerprint: Fingerprint,
}

/// Direction of a transfer, seen from this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// We send records.
    Send,
    /// We receive records.
    Receive,
}

/// State of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferState {
    /// In progress (or interrupted, to be resumed).
    Running,
    /// Finished.
    Completed,
    /// Given up.
    Failed,
}

/// The persisted progress of one transfer, to resume after a crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Transfer id.
    pub transfer: TransferId,
    /// The other device.
    pub peer: DeviceId,
    /// Whose records travel.
    pub owner: DeviceId,
    /// Send or receive.
    pub direction: Direction,
    /// The strategy chosen.
    pub strategy: Strategy,
    /// Last seq acknowledged by the receiver.
    pub last_acked: Seq,
    /// The snapshot being transferred, if any.
    pub snapshot: Option<SnapshotId>,
    /// Next snapshot chunk to transfer.
    pub next_chunk: u32,
    /// Attempts so far.
    pub attempts: u32,
    /// State.
    pub state: TransferState,
    /// When the transfer started (microsecond precision when stored).
    pub started_at: DateTime<Utc>,
    /// Last update (microsecond precision when stored).
    pub updated_at: DateTime<Utc>,
}

/// One chunk of a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// SHA-256 of the uncompressed chunk.
    pub hash: Hash,
    /// Uncompressed length.
    pub len: u32,
}

/// An exported snapshot: a standalone SQLite file of one owner's records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotManifest {
    /// Snapshot id.
    pub id: SnapshotId,
    /// Whose records it holds.
    pub owner: DeviceId,
    /// The owner's IndexId.
    pub index_id: IndexId,
    /// Every record of the owner up to this seq.
    pub max_seq: Seq,
    /// Records (locations and entries) in the file.
    pub entries: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Chunks of `SNAPSHOT_CHUNK_SIZE` bytes (the last may be shorter).
    pub chunks: Vec<ChunkInfo>,
    /// SHA-256 of the whole file.
    pub hash: Hash,
    /// Where the file is.
    pub path: PathBuf,
}

impl SnapshotManifest {
    /// The offer a peer receives for this snapshot.
    pub fn offer(&self) -> SnapshotOfferInfo {
        SnapshotOfferInfo {
            id: self.id,
            owner: self.owner,
            index_id: self.index_id,
            max_seq: self.max_seq,
            entries: self.entries,
            bytes: self.bytes,
            chunks: self.chunks.len() as u32,
            hash: self.hash,
        }
    }
}

/// A snapshot as offered by a peer (the fields of `Message::SnapshotOffer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotOfferInfo {
    /// Snapshot id.
    pub id: SnapshotId,
    /// Whose records it holds.
    pub owner: DeviceId,
    /// The owner's IndexId.
    pub index_id: IndexId,
    /// Every record of the owner up to this seq.
    pub max_seq: Seq,
    /// Records in the file.
    pub entries: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Number of chunks.
    pub chunks: u32,
    /// SHA-256 of the whole file.
    pub hash: Hash,
}
