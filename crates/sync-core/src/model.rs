//! The replicated records: `Entry`, `Location`, and `Record` (either one).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, EntryId, LocationId, Seq};

/// What an entry is on disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[repr(u8)]
pub enum EntryKind {
    /// A regular file.
    File = 0,
    /// A directory.
    Dir = 1,
    /// A symbolic link (never followed).
    Symlink = 2,
}

impl EntryKind {
    /// The kind's one-byte code (storage and columnar batches).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The kind for a code, or `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<EntryKind> {
        match code {
            0 => Some(EntryKind::File),
            1 => Some(EntryKind::Dir),
            2 => Some(EntryKind::Symlink),
            _ => None,
        }
    }
}

/// Microsecond timestamps: the wire carries `i64` microseconds (postcard
/// spends 31 bytes on a default chrono timestamp).
pub mod micros {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Microseconds since the Unix epoch.
    pub fn to_micros(t: &DateTime<Utc>) -> i64 {
        t.timestamp_micros()
    }

    /// The timestamp for microseconds since the Unix epoch (saturating at
    /// the ends of chrono's range, truncated to whole microseconds so that
    /// a saturated value encodes back to itself; hostile input cannot panic).
    pub fn from_micros(us: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(us).unwrap_or_else(|| {
            let end = if us < 0 {
                DateTime::<Utc>::MIN_UTC
            } else {
                DateTime::<Utc>::MAX_UTC
            };
            DateTime::from_timestamp_micros(end.timestamp_micros()).unwrap_or(end)
        })
    }

    /// Serde `with` serializer.
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        to_micros(t).serialize(s)
    }

    /// Serde `with` deserializer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        i64::deserialize(d).map(from_micros)
    }
}

/// Truncates a timestamp to microsecond precision (what storage and the wire keep).
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    micros::from_micros(micros::to_micros(&t))
}

/// One file, folder or symlink of a location. A delete is a tombstone:
/// `deleted = true` with a new seq.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Stable id (UUIDv7 when created).
    pub id: EntryId,
    /// The location the entry belongs to.
    pub location: LocationId,
    /// The parent folder; `None` for the location's root. No foreign key:
    /// apply order never matters.
    pub parent: Option<EntryId>,
    /// File name (one path component).
    pub name: String,
    /// File, folder or symlink.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Inode number, where the platform has one.
    pub inode: Option<u64>,
    /// Creation time, microsecond precision.
    #[serde(with = "micros")]
    pub created_at: DateTime<Utc>,
    /// Modification time, microsecond precision.
    #[serde(with = "micros")]
    pub modified_at: DateTime<Utc>,
    /// The owner's seq of this version.
    pub seq: Seq,
    /// Tombstone flag.
    pub deleted: bool,
}

/// An indexed folder, owned by one device.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Location {
    /// Stable id (UUIDv7).
    pub id: LocationId,
    /// The owning device: the only one that writes this location's records.
    pub owner: DeviceId,
    /// Absolute path on the owner's disk.
    pub path: String,
    /// Display name.
    pub name: String,
    /// The owner's seq of this version.
    pub seq: Seq,
    /// Tombstone flag.
    pub deleted: bool,
}

/// One replicated record of an owner: a location or an entry.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Record {
    /// A location record.
    Location(Location),
    /// An entry record.
    Entry(Entry),
}

impl Record {
    /// The record's seq.
    pub fn seq(&self) -> Seq {
        match self {
            Record::Location(l) => l.seq,
            Record::Entry(e) => e.seq,
        }
    }

    /// The record's tombstone flag.
    pub fn deleted(&self) -> bool {
        match self {
            Record::Location(l) => l.deleted,
            Record::Entry(e) => e.deleted,
        }
    }

    /// The record's id as 16 raw bytes (for fingerprints).
    pub fn id_bytes(&self) -> [u8; 16] {
        match self {
            Record::Location(l) => l.id.to_bytes(),
            Record::Entry(e) => e.id.to_bytes(),
        }
    }
}
