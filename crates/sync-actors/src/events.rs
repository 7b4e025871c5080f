//! The event bus: `HostEvent`s in from the host, `SyncEvent`s out to observers.
//! Data never travels on the bus, so an observer that lags loses nothing.

use serde::Serialize;
use sync_core::{DeviceId, IndexId, LocationId, Seq, SnapshotId, Strategy, TransferId, Watermark};
use sync_net::CertFingerprint;

/// Which way a transfer moves records, seen from this device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub enum Direction {
    /// This device sends its own records.
    Send,
    /// This device receives a peer's records.
    Receive,
}

impl From<Direction> for sync_storage::Direction {
    fn from(d: Direction) -> Self {
        match d {
            Direction::Send => sync_storage::Direction::Send,
            Direction::Receive => sync_storage::Direction::Receive,
        }
    }
}

/// What the host tells the engine.
#[derive(Clone, Debug)]
pub enum HostEvent {
    /// The host committed entries of this device to the library itself.
    EntriesCommitted {
        /// The owner (this device).
        owner: DeviceId,
        /// The location, if one.
        location: Option<LocationId>,
        /// Records committed.
        count: u64,
        /// The owner's max seq afterwards.
        max_seq: Seq,
    },
    /// The host finished indexing a location.
    LocationIndexed {
        /// The owner (this device).
        owner: DeviceId,
        /// The location.
        location: LocationId,
        /// Entries in the location.
        entries: u64,
        /// The owner's max seq afterwards.
        max_seq: Seq,
    },
    /// A peer can be reached at this address: connect and keep reconnecting.
    PeerAddressKnown {
        /// `host:port`.
        addr: String,
    },
}

/// What the engine tells observers.
#[derive(Clone, Debug, Serialize)]
pub enum SyncEvent {
    /// An authenticated session started.
    PeerConnected {
        /// The peer.
        peer: DeviceId,
        /// Its name.
        name: String,
        /// Its address.
        addr: String,
    },
    /// A session ended.
    PeerDisconnected {
        /// The peer.
        peer: DeviceId,
        /// Why, if it was not a clean close.
        cause: Option<String>,
    },
    /// A peer's pin was removed from the trust store (`lsync untrust`, or
    /// another handle on `trust.json`): its sessions were closed at once
    /// and its next handshakes are refused.
    PeerRevoked {
        /// The peer.
        peer: DeviceId,
        /// The certificate it authenticated with.
        fingerprint: CertFingerprint,
    },
    /// A connection was refused (untrusted peer, bad hello, ...).
    PeerRefused {
        /// Address, when known.
        addr: String,
        /// Why.
        cause: String,
    },
    /// This device committed its own records.
    LocalCommitted {
        /// The owner (this device).
        owner: DeviceId,
        /// First seq stamped.
        first: Seq,
        /// Last seq stamped.
        last: Seq,
    },
    /// This device went back in time (its library was restored from a
    /// backup, or lost commits to a power loss): a peer holds more of its
    /// records, under its current IndexId, than it has. It restarted its
    /// IndexId (rows and seqs kept), so every peer replaces all its rows
    /// rather than keep old records under seqs that now name others.
    IndexRestarted {
        /// The IndexId given up.
        old: IndexId,
        /// The new IndexId.
        new: IndexId,
        /// The peer that showed it.
        peer: DeviceId,
        /// The seq of `old` the peer holds.
        peer_seq: Seq,
        /// This device's max seq.
        local_seq: Seq,
    },
    /// A peer's copy of an owner's records was compared with this
    /// device's (when the two exchange `Digests`: at session start and after
    /// transfers), and the result changed.
    Verified {
        /// The peer.
        peer: DeviceId,
        /// Whose records.
        owner: DeviceId,
        /// Identical at a seq, behind, ahead, another index, or differing.
        state: sync_core::digest::Verification,
    },
    /// Rows of an owner were changed behind the engine's back (another
    /// program wrote the library file): its digest now follows the rows,
    /// and peers repair the difference.
    RowsChangedOutside {
        /// Whose records.
        owner: DeviceId,
        /// Records the digest counted before.
        stored_records: u64,
        /// Records the rows hold.
        actual_records: u64,
    },
    /// Tombstones of an owner were collected up to a seq: this device's own
    /// (older than the horizon, acknowledged by every peer holding them),
    /// or a peer's, following the point its owner announced.
    TombstonesCollected {
        /// Whose records.
        owner: DeviceId,
        /// The collection point.
        upto: Seq,
        /// Tombstones dropped.
        dropped: u64,
    },
    /// A transfer started.
    TransferStarted {
        /// Transfer id.
        transfer: TransferId,
        /// The peer.
        peer: DeviceId,
        /// Whose records.
        owner: DeviceId,
        /// Send or receive.
        direction: Direction,
        /// Chosen strategy.
        strategy: Strategy,
        /// Records (sender) or seqs (receiver) to move.
        total: u64,
    },
    /// A transfer moved forward.
    TransferProgress {
        /// Transfer id.
        transfer: TransferId,
        /// The peer.
        peer: DeviceId,
        /// Whose records.
        owner: DeviceId,
        /// Send or receive.
        direction: Direction,
        /// Done so far (rising).
        done: u64,
        /// Total.
        total: u64,
        /// Payload bytes so far.
        bytes: u64,
    },
    /// A transfer finished.
    TransferCompleted {
        /// Transfer id.
        transfer: TransferId,
        /// The peer.
        peer: DeviceId,
        /// Whose records.
        owner: DeviceId,
        /// Send or receive.
        direction: Direction,
        /// The strategy used.
        strategy: Strategy,
        /// Records moved.
        records: u64,
        /// Payload bytes moved.
        bytes: u64,
        /// Wall time.
        seconds: f64,
    },
    /// A transfer failed.
    TransferFailed {
        /// Transfer id.
        transfer: TransferId,
        /// The peer.
        peer: DeviceId,
        /// Whose records.
        owner: DeviceId,
        /// Send or receive.
        direction: Direction,
        /// Whether the supervisor will restart it.
        will_retry: bool,
        /// Attempts so far.
        attempt: u32,
        /// Why.
        cause: String,
    },
    /// Received records were committed (rows and watermark in one transaction).
    Applied {
        /// The peer they came from (their owner).
        owner: DeviceId,
        /// Records in the commit.
        records: u64,
        /// The watermark afterwards.
        watermark: Watermark,
    },
    /// A snapshot was verified and imported.
    SnapshotImported {
        /// The peer it came from (its owner).
        owner: DeviceId,
        /// The snapshot.
        snapshot: SnapshotId,
        /// Records imported.
        entries: u64,
        /// The watermark afterwards.
        watermark: Watermark,
    },
}
