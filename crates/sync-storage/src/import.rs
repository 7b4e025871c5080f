//! Importing a downloaded snapshot: someone else's SQLite file, treated as hostile.
//!
//! The file is never attached to the library's writer. A snapshot is a
//! database file written by a peer, and SQLite runs whatever its schema
//! says: a `location` that is a view of two tables switched on
//! `total_changes()` shows honest rows to a checking connection and forged
//! rows to the writer's `INSERT ... SELECT` (found by attacking the
//! previous ATTACH-based import). So the import:
//!
//! 1. copies the download into a private file while hashing it (size,
//!    whole-file SHA-256 and the SQLite header are checked on the bytes
//!    actually copied: nothing can change them between check and use);
//! 2. reads the schema from the copy's first page as bytes ([`schema_page`])
//!    before SQLite opens the file: SQLite parses a whole schema at open,
//!    before any deadline can run, and a parse can be made quadratic;
//! 3. opens the copy on its own read-only, immutable connection with
//!    `trusted_schema=OFF`, `cell_size_check=ON`, `query_only=ON` and a
//!    progress handler that interrupts any statement past a deadline
//!    (scaled with the file's size), so no query on the file runs unbounded;
//! 4. requires `sqlite_master` (as SQLite sees it) to be exactly the snapshot schema (type,
//!    name, table and SQL text of every object, compared with the schema
//!    built by this version: no views, triggers, virtual tables, extra
//!    indexes or tables) and a clean `PRAGMA quick_check`;
//! 5. checks the manifest row against the offer and every row's owner,
//!    types, seq range and name lengths;
//! 6. streams the rows, in pages, from that same checked connection into
//!    the apply path batches use ([`split_records`], [`write_records`]):
//!    every record written under the offer's owner only, every entry in a
//!    location of that owner, "higher seq wins", all in ONE writer
//!    transaction with the watermark, so a refusal anywhere leaves the
//!    library as it was.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _, Row as _};
use sha2::{Digest, Sha256};
use sync_core::{DeviceId, Entry, IndexId, Location, LocationId, Record, Seq, Watermark};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::bulk::{self, db_err};
use crate::error::{Result, StorageError};
use crate::migration::{SNAPSHOT_FORMAT, SNAPSHOT_SCHEMA};
use crate::read::{PACK_PAGE, SNAPSHOT_ENTRY_PACK, unpack_page};
use crate::rows::{i2u, id16, u2i};
use crate::schema_page::{self, MasterRow};
use crate::snapshot::{SQLITE_MAGIC, SnapshotDownload};
use crate::types::SnapshotOfferInfo;
use crate::write::{split_records, write_records};
use crate::{Store, private_file};

/// Longest entry or location name a snapshot may hold, in bytes (file
/// systems allow 255 bytes, or 255 UTF-16 units: at most 765 bytes of UTF-8).
pub const MAX_NAME_BYTES: u64 = 1024;
/// Longest location path a snapshot may hold, in bytes.
pub const MAX_PATH_BYTES: u64 = 65_536;
/// VM instructions between two deadline checks of the progress handler.
const PROGRESS_OPS: i32 = 10_000;
/// The time every check of a snapshot file gets, whatever its size.
const DEADLINE_BASE: Duration = Duration::from_secs(10);
/// Bytes of snapshot file per extra second of deadline (a 1M-entry
/// snapshot of ~110 MB gets ~24 s; its checks and copy take ~2 s).
const DEADLINE_BYTES_PER_SEC: u64 = 8 << 20;
/// Location rows per streamed page (a path may be 64 KiB: ~1 MiB a page).
const LOCATION_PAGE: i64 = 16;
/// Pages read ahead of the writer.
const READ_AHEAD: usize = 2;

/// The start of a download kept for the schema check: a page at most.
const HEAD_BYTES: usize = 65_536;

/// The deadline of every statement run on a snapshot file of `bytes` bytes.
pub(crate) fn deadline_for(bytes: u64) -> Duration {
    DEADLINE_BASE + Duration::from_secs(bytes / DEADLINE_BYTES_PER_SEC)
}

/// The private copy made of a download before anything reads it: a name
/// of its own per import (two sessions may import the same offer at once),
/// removed afterwards and, after a crash, at the next start.
fn private_copy_path(part: &Path) -> PathBuf {
    crate::perms::temp_beside(part)
}

impl Store {
    /// Verifies a complete download against its offer and imports it in ONE
    /// transaction: "higher seq wins", watermark `(index_id, max_seq)` (the
    /// owner's old rows dropped first if the IndexId differs). The file is
    /// handled as hostile (see the module doc): a private copy, checked on a
    /// read-only connection with a deadline, exact schema, streamed into
    /// the batch apply path. The download's files are removed afterwards,
    /// unless it failed for want of chunks, space or IO (then it is kept to
    /// resume). Any failure leaves the library unchanged.
    pub async fn import_snapshot(&self, download: SnapshotDownload) -> Result<Watermark> {
        let offer = *download.offer();
        let span = tracing::info_span!(
            "import_snapshot",
            owner = %offer.owner.fmt_short(),
            snapshot = %offer.id.fmt_short(),
            records = offer.entries,
            bytes = offer.bytes
        );
        async move {
            let (part, state, next) = download.into_parts();
            let private = private_copy_path(&part);
            let result = self.import_checked(&part, &private, next, &offer).await;
            let _ = tokio::fs::remove_file(&private).await;
            // An imported download is done with; a refused one would be
            // refused again (same bytes): both go. One that failed for want
            // of chunks, space or IO stays, to resume.
            let keep = matches!(
                result,
                Err(StorageError::Truncated { .. }
                    | StorageError::DiskFull { .. }
                    | StorageError::Io(_))
            );
            if !keep {
                let _ = tokio::fs::remove_file(&part).await;
                let _ = tokio::fs::remove_file(&state).await;
            }
            match &result {
                Ok(w) => tracing::info!(index = %w.index_id, seq = w.seq.0, "snapshot imported"),
                Err(e) => tracing::warn!(cause = %e, kept = keep, "snapshot import refused"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn import_checked(
        &self,
        part: &Path,
        private: &Path,
        next: u32,
        offer: &SnapshotOfferInfo,
    ) -> Result<Watermark> {
        if self.inner.device.get().map(|d| d.device_id) == Some(offer.owner) {
            return Err(StorageError::LocalOwner { owner: offer.owner });
        }
        if next < offer.chunks {
            return Err(StorageError::Truncated {
                have: next,
                need: offer.chunks,
            });
        }
        let started = Instant::now();
        let deadline = started + deadline_for(offer.bytes);
        let (from, to, o) = (part.to_path_buf(), private.to_path_buf(), *offer);
        let head = tokio::task::spawn_blocking(move || copy_verified(&from, &to, &o))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))?
            .map_err(|e| e.disk_full_at(private))?;
        check_first_page(&head).await?;
        let copied = started.elapsed();
        #[cfg(test)]
        self.run_import_hook(part);
        let mut conn = open_untrusted(private, deadline).await?;
        let checked = check_file(&mut conn, offer, deadline).await;
        if let Err(e) = checked {
            conn.close().await.ok();
            return Err(e);
        }
        let checked = started.elapsed();
        sync_core::crash_point("import.verified");
        let w = self
            .apply_snapshot(conn, offer, deadline)
            .await
            .map_err(|e| e.disk_full_at(self.path()))?;
        sync_core::crash_point("import.copied");
        tracing::debug!(
            copy_ms = copied.as_millis() as u64,
            check_ms = (checked - copied).as_millis() as u64,
            apply_ms = (started.elapsed() - checked).as_millis() as u64,
            "snapshot import phases"
        );
        Ok(w)
    }

    /// Streams the checked file's rows into one writer transaction.
    async fn apply_snapshot(
        &self,
        conn: SqliteConnection,
        offer: &SnapshotOfferInfo,
        deadline: Instant,
    ) -> Result<Watermark> {
        let owner = offer.owner;
        let (tx, mut pages) = mpsc::channel(READ_AHEAD);
        let reader = tokio::spawn(
            read_pages(conn, owner, deadline, tx).instrument(tracing::Span::current()),
        );
        let _guard = self.inner.write_lock.lock().await;
        let mut wconn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        // Dropped without commit (a refusal or an error): rolled back.
        let mut txn = wconn.begin().await.map_err(db_err)?;
        let held = bulk::owner_state(&mut txn, owner).await?;
        if held.is_some_and(|s| s.local) {
            return Err(StorageError::LocalOwner { owner });
        }
        let reset = held.is_some_and(|s| s.watermark.index_id != offer.index_id);
        if reset {
            tracing::info!(index = %offer.index_id, "new index of owner: dropping its old rows");
            bulk::drop_owner_rows(&mut txn, owner).await?;
        }
        let mut count = 0u64;
        while let Some(page) = pages.recv().await {
            let page = page?;
            count += page.len() as u64;
            let (locs, ents) = split_records(owner, Seq::ZERO, offer.max_seq, &page)?;
            write_records(&mut txn, owner, &locs, &ents).await?;
        }
        reader
            .await
            .map_err(|e| StorageError::BadSnapshot(format!("snapshot reader failed: {e}")))?;
        if count != offer.entries {
            return Err(StorageError::ManifestMismatch(format!(
                "{count} records read from the file, the offer counts {}",
                offer.entries
            )));
        }
        let seq = match held {
            Some(s) if !reset => s.watermark.seq.max(offer.max_seq),
            _ => offer.max_seq,
        };
        let w = Watermark::new(offer.index_id, seq);
        bulk::set_watermark(&mut txn, owner, w).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(w)
    }
}

/// Copies `part` into a new private file `to` (created exclusively, mode
/// 0600, never through a symlink), hashing the bytes copied, and checks
/// size, whole-file hash and SQLite header against the offer.
fn copy_verified(part: &Path, to: &Path, offer: &SnapshotOfferInfo) -> Result<Vec<u8>> {
    let mut src = OpenOptions::new()
        .read(true)
        // Never open a download through a symlink planted in its place.
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)?;
    let mut dst = private_file(to)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    // The first page (at most 64 KiB): its schema is checked before
    // SQLite parses it (see `schema_page`).
    let mut head: Vec<u8> = Vec::with_capacity(HEAD_BYTES);
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let piece = &buf[..n];
        if head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - head.len()).min(n);
            head.extend_from_slice(&piece[..take]);
        }
        hasher.update(piece);
        dst.write_all(piece)?;
        bytes += n as u64;
        if bytes > offer.bytes {
            break;
        }
    }
    if bytes != offer.bytes {
        return Err(StorageError::SizeMismatch {
            have: bytes,
            expected: offer.bytes,
        });
    }
    let hash: [u8; 32] = hasher.finalize().into();
    if hash != offer.hash {
        return Err(StorageError::FileHashMismatch {
            have: hash,
            expected: offer.hash,
        });
    }
    if !head.starts_with(SQLITE_MAGIC) {
        return Err(StorageError::NotSqlite(
            "the file does not start with the SQLite header".into(),
        ));
    }
    dst.flush()?;
    Ok(head)
}

/// A snapshot error for a failure of SQLite on the untrusted file.
pub(crate) fn untrusted_err(e: sqlx::Error, deadline: Instant) -> StorageError {
    if Instant::now() >= deadline {
        StorageError::BadSnapshot(
            "checking the snapshot file ran past its deadline: refused".to_string(),
        )
    } else {
        StorageError::BadSnapshot(format!("SQLite refused the file: {e}"))
    }
}

/// Opens a downloaded file read-only (immutable: no journal, no -wal/-shm),
/// with SQLite's hardening on and every statement bounded by `deadline`.
pub(crate) async fn open_untrusted(path: &Path, deadline: Instant) -> Result<SqliteConnection> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true)
        .foreign_keys(false)
        .statement_cache_capacity(16)
        // Functions and virtual tables named by a schema never run.
        .pragma("trusted_schema", "OFF")
        // Cells checked for size as pages are read (corrupt b-trees).
        .pragma("cell_size_check", "ON")
        .pragma("query_only", "ON")
        .pragma("mmap_size", "0")
        .pragma("cache_size", "-8192")
        .disable_statement_logging();
    let mut conn = opts
        .connect()
        .await
        .map_err(|e| StorageError::NotSqlite(e.to_string()))?;
    let mut handle = conn
        .lock_handle()
        .await
        .map_err(|e| untrusted_err(e, deadline))?;
    // Returning false interrupts the running statement (SQLITE_INTERRUPT).
    handle.set_progress_handler(PROGRESS_OPS, move || Instant::now() < deadline);
    drop(handle);
    Ok(conn)
}

/// The objects a snapshot file must hold, exactly: the schema built by
/// this version in an in-memory database, read back from its `sqlite_master`.
async fn reference_schema() -> Result<&'static [MasterRow]> {
    static SCHEMA: tokio::sync::OnceCell<Vec<MasterRow>> = tokio::sync::OnceCell::const_new();
    let rows = SCHEMA
        .get_or_try_init(|| async {
            let mut c = SqliteConnectOptions::new()
                .in_memory(true)
                .connect()
                .await
                .map_err(db_err)?;
            for sql in SNAPSHOT_SCHEMA {
                sqlx::query(*sql).execute(&mut c).await.map_err(db_err)?;
            }
            let rows = master_rows(&mut c).await.map_err(db_err)?;
            c.close().await.ok();
            Ok::<_, StorageError>(rows)
        })
        .await?;
    Ok(rows.as_slice())
}

async fn master_rows(c: &mut SqliteConnection) -> sqlx::Result<Vec<MasterRow>> {
    sqlx::query_as("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
        .fetch_all(c)
        .await
}

/// Every check of the file, before the writer is touched.
async fn check_file(
    conn: &mut SqliteConnection,
    offer: &SnapshotOfferInfo,
    deadline: Instant,
) -> Result<()> {
    check_schema(conn, deadline).await?;
    let bad = |e| untrusted_err(e, deadline);
    let problems: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(10)")
        .fetch_all(&mut *conn)
        .await
        .map_err(bad)?;
    if problems.as_slice() != ["ok"] {
        return Err(StorageError::BadSnapshot(format!(
            "the file fails SQLite's quick_check: {}",
            problems.join("; ")
        )));
    }
    check_manifest(conn, offer, deadline).await?;
    check_rows(conn, offer, deadline).await
}

/// The schema as the file's first page holds it, before SQLite parses it:
/// exactly the snapshot schema, on one page, in UTF-8.
async fn check_first_page(head: &[u8]) -> Result<()> {
    let have = schema_page::schema_rows(head)
        .map_err(|why| StorageError::WrongSchema(format!("schema page: {why}")))?;
    schema_matches(&have, reference_schema().await?)
}

/// `have` must be the reference rows, exactly.
fn schema_matches(have: &[MasterRow], want: &[MasterRow]) -> Result<()> {
    if have == want {
        return Ok(());
    }
    let list = |rows: &[MasterRow], other: &[MasterRow]| {
        rows.iter()
            .filter(|r| !other.contains(r))
            .map(|(kind, name, _, _)| format!("{kind} `{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(StorageError::WrongSchema(format!(
        "the file's objects differ from the snapshot schema: \
         unexpected or altered [{}], missing [{}]",
        list(have, want),
        list(want, have)
    )))
}

/// The file's objects, as SQLite sees them, must be exactly the snapshot
/// schema. The first page was already compared byte for byte (including its
/// text encoding, in the header): this second look guards against a file
/// that `schema_page` reads one way and SQLite another.
async fn check_schema(conn: &mut SqliteConnection, deadline: Instant) -> Result<()> {
    // Any failure but the deadline is the schema's: a malformed CREATE, an
    // unknown module, text that is not UTF-8.
    let have = master_rows(conn).await.map_err(|e| {
        if Instant::now() < deadline {
            StorageError::WrongSchema(format!("unreadable schema: {e}"))
        } else {
            untrusted_err(e, deadline)
        }
    })?;
    schema_matches(&have, reference_schema().await?)
}

/// The single manifest row must describe the offer.
async fn check_manifest(
    conn: &mut SqliteConnection,
    offer: &SnapshotOfferInfo,
    deadline: Instant,
) -> Result<()> {
    let rows = sqlx::query(
        "SELECT format, owner, index_id, max_seq, records FROM manifest \
         WHERE typeof(format) = 'integer' AND typeof(owner) = 'blob' \
         AND typeof(index_id) = 'integer' AND typeof(max_seq) = 'integer' \
         AND typeof(records) = 'integer' LIMIT 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| untrusted_err(e, deadline))?;
    let [row] = rows.as_slice() else {
        return Err(StorageError::ManifestMismatch(format!(
            "{} well-typed manifest rows, expected 1",
            rows.len()
        )));
    };
    let get = |i: usize| row.try_get::<i64, _>(i).map_err(db_err);
    let format = get(0)?;
    if format != SNAPSHOT_FORMAT {
        return Err(StorageError::WrongSchema(format!(
            "snapshot format {format}"
        )));
    }
    let owner: Vec<u8> = row.try_get(1).map_err(db_err)?;
    let owner = DeviceId::from_bytes(
        id16(&owner).map_err(|e| StorageError::ManifestMismatch(e.to_string()))?,
    );
    let fields = [
        ("owner", owner.to_string(), offer.owner.to_string()),
        (
            "index id",
            IndexId(i2u(get(2)?)).to_string(),
            offer.index_id.to_string(),
        ),
        (
            "max seq",
            Seq(i2u(get(3)?)).to_string(),
            offer.max_seq.to_string(),
        ),
        (
            "record count",
            i2u(get(4)?).to_string(),
            offer.entries.to_string(),
        ),
    ];
    for (what, have, want) in fields {
        if have != want {
            return Err(StorageError::ManifestMismatch(format!(
                "{what} is {have} in the file, {want} in the offer"
            )));
        }
    }
    Ok(())
}

/// Every row: the offer's owner, 16-byte ids, seq in `1..=max_seq`, the
/// declared types, bounded names, entries in the snapshot's own locations,
/// and as many rows as the manifest counts.
async fn check_rows(
    conn: &mut SqliteConnection,
    offer: &SnapshotOfferInfo,
    deadline: Instant,
) -> Result<()> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM location) + (SELECT count(*) FROM entry), \
         (SELECT count(*) FROM location WHERE owner IS NOT ?1 OR typeof(id) != 'blob' \
            OR length(id) != 16 OR typeof(seq) != 'integer' OR seq <= 0 OR seq > ?2 \
            OR typeof(path) != 'text' OR typeof(name) != 'text' \
            OR octet_length(path) > ?3 OR octet_length(name) > ?4 \
            OR typeof(deleted) != 'integer' OR deleted NOT IN (0, 1)) \
         + (SELECT count(*) FROM entry WHERE owner IS NOT ?1 OR typeof(id) != 'blob' \
            OR length(id) != 16 OR typeof(location) != 'blob' OR length(location) != 16 \
            OR (parent IS NOT NULL AND (typeof(parent) != 'blob' OR length(parent) != 16)) \
            OR typeof(name) != 'text' OR octet_length(name) > ?4 \
            OR typeof(kind) != 'integer' OR kind NOT BETWEEN 0 AND 2 \
            OR typeof(size) != 'integer' OR typeof(inode) NOT IN ('integer', 'null') \
            OR typeof(created_at) != 'integer' OR typeof(modified_at) != 'integer' \
            OR typeof(seq) != 'integer' OR seq <= 0 OR seq > ?2 \
            OR typeof(deleted) != 'integer' OR deleted NOT IN (0, 1)), \
         (SELECT count(*) FROM entry WHERE location NOT IN (SELECT id FROM location))",
    )
    .bind(offer.owner.to_bytes().to_vec())
    .bind(u2i(offer.max_seq.0))
    .bind(u2i(MAX_PATH_BYTES))
    .bind(u2i(MAX_NAME_BYTES))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| untrusted_err(e, deadline))?;
    let get = |i: usize| row.try_get::<i64, _>(i).map_err(db_err);
    let count = i2u(get(0)?);
    if count != offer.entries {
        return Err(StorageError::ManifestMismatch(format!(
            "the manifest counts {} records, the file holds {count}",
            offer.entries
        )));
    }
    let bad = get(1)?;
    if bad > 0 {
        return Err(StorageError::ManifestMismatch(format!(
            "{bad} records of another owner, outside seq 1..={}, \
             of the wrong type or with names over {MAX_NAME_BYTES} bytes",
            offer.max_seq
        )));
    }
    let orphans = get(2)?;
    if orphans > 0 {
        return Err(StorageError::ManifestMismatch(format!(
            "{orphans} entries in locations the snapshot does not hold"
        )));
    }
    Ok(())
}

/// Reads the checked file in id order, locations first, and sends pages of
/// records to the writer; always closes the connection.
async fn read_pages(
    mut conn: SqliteConnection,
    owner: DeviceId,
    deadline: Instant,
    tx: mpsc::Sender<Result<Vec<Record>>>,
) {
    let result = send_pages(&mut conn, owner, deadline, &tx).await;
    conn.close().await.ok();
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
}

async fn send_pages(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    deadline: Instant,
    tx: &mpsc::Sender<Result<Vec<Record>>>,
) -> Result<()> {
    let bad = |e| untrusted_err(e, deadline);
    let mut cursor: Vec<u8> = Vec::new();
    loop {
        let rows = sqlx::query(
            "SELECT id, path, name, seq, deleted FROM location \
             WHERE owner = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(owner.to_bytes().to_vec())
        .bind(cursor.clone())
        .bind(LOCATION_PAGE)
        .fetch_all(&mut *conn)
        .await
        .map_err(bad)?;
        let Some(last) = rows.last() else { break };
        cursor = last.try_get(0).map_err(bad)?;
        let page = rows
            .iter()
            .map(|r| location_row(r, owner).map(Record::Location))
            .collect::<Result<Vec<_>>>()?;
        if tx.send(Ok(page)).await.is_err() {
            return Ok(());
        }
    }
    let mut cursor: Vec<u8> = Vec::new();
    loop {
        let row = sqlx::query(SNAPSHOT_ENTRY_PACK)
            .bind(owner.to_bytes().to_vec())
            .bind(cursor.clone())
            .bind(PACK_PAGE as i64)
            .fetch_one(&mut *conn)
            .await
            .map_err(bad)?;
        let mut ents: Vec<Entry> = Vec::new();
        let n = unpack_page(&row, &mut ents).map_err(|e| match e {
            StorageError::Corrupt(m) => StorageError::BadSnapshot(m),
            other => other,
        })?;
        let Some(max) = ents.iter().map(|e| e.id).max() else {
            break;
        };
        cursor = max.to_bytes().to_vec();
        if tx
            .send(Ok(ents.into_iter().map(Record::Entry).collect()))
            .await
            .is_err()
        {
            return Ok(());
        }
        if n < PACK_PAGE {
            break;
        }
    }
    Ok(())
}

/// A location row of the file (owner checked by [`check_rows`]).
fn location_row(r: &SqliteRow, owner: DeviceId) -> Result<Location> {
    // A value that does not decode (text that is not UTF-8) is the file's fault.
    let bad = |e: sqlx::Error| StorageError::BadSnapshot(format!("location row: {e}"));
    let id: Vec<u8> = r.try_get(0).map_err(bad)?;
    Ok(Location {
        id: LocationId::from_bytes(
            id16(&id).map_err(|e| StorageError::BadSnapshot(e.to_string()))?,
        ),
        owner,
        path: r.try_get(1).map_err(bad)?,
        name: r.try_get(2).map_err(bad)?,
        seq: Seq(i2u(r.try_get(3).map_err(bad)?)),
        deleted: r.try_get(4).map_err(bad)?,
    })
}
