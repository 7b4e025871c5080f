//! `StorageError`: one variant per kind of bad input, with messages meant for a user.

use std::path::{Path, PathBuf};

use sea_orm::sqlx;
use sync_core::{DeviceId, IndexId, Seq, SnapshotId};

/// SQLite's primary result code "database or disk is full" (`SQLITE_FULL`).
/// Extended codes keep the primary code in their low byte.
const SQLITE_FULL: i32 = 13;

/// Why a storage operation was refused or failed. Refusals leave the library unchanged.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A batch starts above what is held of the owner: applying it would leave a hole.
    #[error(
        "batch after seq {after} but only seq {held} of owner {} is held: gap",
        owner.fmt_short()
    )]
    Gap {
        /// The batch's owner.
        owner: DeviceId,
        /// The batch's `after`.
        after: Seq,
        /// The held watermark seq.
        held: Seq,
    },
    /// A batch continues another IndexId of the owner than the one held.
    #[error(
        "batch of owner {} continues index {got} after seq {after}, but index {held} is held; \
         only a batch after seq 0 may replace an index",
        owner.fmt_short()
    )]
    WrongIndex {
        /// The batch's owner.
        owner: DeviceId,
        /// The IndexId held.
        held: IndexId,
        /// The IndexId of the batch.
        got: IndexId,
        /// The batch's `after`.
        after: Seq,
    },
    /// A record does not belong to the owner it was sent for.
    #[error("record of owner {} refused: {detail}", owner.fmt_short())]
    ForeignOwner {
        /// The owner the records were sent for.
        owner: DeviceId,
        /// What is wrong.
        detail: String,
    },
    /// A batch holds two records of one id: refused whole (which one would win is not defined).
    #[error("batch of owner {} holds record {id} twice", owner.fmt_short())]
    DuplicateRecord {
        /// The owner the records were sent for.
        owner: DeviceId,
        /// The repeated id (short form).
        id: String,
    },
    /// A repair's result differs from the digest its source claimed:
    /// rolled back, nothing written.
    #[error(
        "repair of owner {} refused: the result would be {got} records with digest {got_digest}, \
         the source claimed {want} with {want_digest}",
        owner.fmt_short()
    )]
    RepairMismatch {
        /// Whose records.
        owner: DeviceId,
        /// Records the source claimed.
        want: u64,
        /// Digest the source claimed (short form).
        want_digest: String,
        /// Records the result would hold.
        got: u64,
        /// Digest of the result (short form).
        got_digest: String,
    },
    /// A record's seq lies outside the batch's range `(after, last]`, or the range is inverted.
    #[error("record seq {seq} outside the batch range ({after}, {last}]")]
    BadRange {
        /// The batch's `after`.
        after: Seq,
        /// The batch's `last`.
        last: Seq,
        /// The offending seq (equal to `after` when the range itself is inverted).
        seq: Seq,
    },
    /// Records of the local device sent to it from outside (only this device writes them).
    #[error("owner {} is this device: its records are only written locally", owner.fmt_short())]
    LocalOwner {
        /// The local device id.
        owner: DeviceId,
    },
    /// A local commit for an owner that is not this device.
    #[error(
        "owner {} is not this device ({}): only the local device commits local changes",
        owner.fmt_short(),
        local.fmt_short()
    )]
    NotLocalDevice {
        /// The owner given.
        owner: DeviceId,
        /// The local device.
        local: DeviceId,
    },
    /// Another engine holds this data directory (one engine per library).
    #[error(
        "data directory {dir} is in use by another engine ({}); one engine at a time may \
         open a library",
        pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid unknown".into())
    )]
    InUse {
        /// The data directory.
        dir: String,
        /// The holder's pid, as it wrote it in the lock file.
        pid: Option<u32>,
    },
    /// The library has no device yet: call `create_device` first.
    #[error("the library has no device yet (run init first)")]
    NotInitialized,
    /// `create_device` on a library that already has one.
    #[error("the library already has device {} ({name})", device.fmt_short())]
    AlreadyInitialized {
        /// The existing device.
        device: DeviceId,
        /// Its name.
        name: String,
    },
    /// An owner this library holds nothing of.
    #[error("no records of owner {} are held", owner.fmt_short())]
    UnknownOwner {
        /// The owner.
        owner: DeviceId,
    },
    /// A snapshot id with no manifest here.
    #[error("no snapshot {} here", id.fmt_short())]
    UnknownSnapshot {
        /// The snapshot id.
        id: SnapshotId,
    },
    /// A chunk index past the snapshot's last chunk.
    #[error("snapshot has {chunks} chunks, there is no chunk {index}")]
    NoSuchChunk {
        /// Requested index.
        index: u32,
        /// Chunks of the snapshot.
        chunks: u32,
    },
    /// A snapshot offer whose numbers do not fit together.
    #[error("bad snapshot offer: {0}")]
    BadOffer(String),
    /// Import of a download that lacks chunks.
    #[error("snapshot download is truncated: {have} of {need} chunks received")]
    Truncated {
        /// Chunks received.
        have: u32,
        /// Chunks in the offer.
        need: u32,
    },
    /// The snapshot file size differs from the offer.
    #[error("snapshot file holds {have} bytes, the offer says {expected}")]
    SizeMismatch {
        /// Bytes in the file.
        have: u64,
        /// Bytes in the offer.
        expected: u64,
    },
    /// A chunk other than the next one expected.
    #[error("snapshot chunk {got} arrived, chunk {expected} was expected")]
    ChunkOutOfOrder {
        /// The next chunk expected.
        expected: u32,
        /// The chunk received.
        got: u32,
    },
    /// A chunk that cannot be decompressed or has the wrong length.
    #[error("snapshot chunk {index} is corrupt: {reason}")]
    CorruptChunk {
        /// The chunk index.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A chunk whose SHA-256 differs from the hash sent with it.
    #[error("snapshot chunk {index} does not match its hash")]
    ChunkHashMismatch {
        /// The chunk index.
        index: u32,
    },
    /// The whole snapshot file's SHA-256 differs from the offer.
    #[error(
        "snapshot file hash {} differs from the offered {}",
        hex::encode(have),
        hex::encode(expected)
    )]
    FileHashMismatch {
        /// Hash of the file received.
        have: [u8; 32],
        /// Hash in the offer.
        expected: [u8; 32],
    },
    /// The snapshot file is not an SQLite database.
    #[error("snapshot file is not an SQLite database: {0}")]
    NotSqlite(String),
    /// The snapshot is SQLite but not a snapshot of this format.
    #[error("snapshot file does not have the snapshot schema: {0}")]
    WrongSchema(String),
    /// SQLite refused the snapshot file, or checking it ran past its deadline.
    #[error("snapshot file refused: {0}")]
    BadSnapshot(String),
    /// The snapshot's manifest row or content disagrees with the offer or itself.
    #[error("snapshot manifest disagrees: {0}")]
    ManifestMismatch(String),
    /// A stored value this version cannot read.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The disk holding the library (or a snapshot file) has no space left.
    /// The write that hit it was rolled back whole: the library holds what it
    /// held before, and the transfer resumes from its watermark once space returns.
    #[error(
        "no space left on the disk holding {}: free some space; \
         the transfer resumes from the last applied batch",
        path.display()
    )]
    DiskFull {
        /// The file whose write failed (the library, or a snapshot file).
        path: PathBuf,
    },
    /// The database refused or failed.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// Reading or writing a file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl StorageError {
    /// The error as [`StorageError::DiskFull`] at `path` when its cause is
    /// the disk running out of space, else unchanged. The one place that
    /// recognizes a full disk: SQLite's `SQLITE_FULL` (which is also what
    /// SQLite reports when a write of it fails with `ENOSPC`, and when
    /// `max_page_count` is reached) and io errors of kind `StorageFull`.
    pub(crate) fn disk_full_at(self, path: &Path) -> StorageError {
        let full = match &self {
            StorageError::Db(e) => db_out_of_space(e),
            StorageError::Io(e) => io_out_of_space(e),
            _ => false,
        };
        if full {
            tracing::debug!(path = %path.display(), cause = %self, "disk full");
            StorageError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            self
        }
    }
}

/// sea-orm keeps the sqlx error behind `RuntimeErr` (not as its `source`).
fn db_out_of_space(e: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => sqlx_out_of_space(e),
        _ => false,
    }
}

fn sqlx_out_of_space(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == SQLITE_FULL),
        sqlx::Error::Io(e) => io_out_of_space(e),
        _ => false,
    }
}

/// `ENOSPC` (and its Windows twin) is `StorageFull`; a full quota counts too.
fn io_out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, StorageError>;
