//! The library on SQLite through sea-orm: schema, migrations, bulk apply, snapshots.
//!
//! A [`Store`] holds one writer connection (every write is serialized
//! through it, in transactions of at most 10K records) and a small pool of
//! read connections (WAL lets readers run beside the writer). Records are
//! upserted with multi-row statements and "higher seq wins", so applying a
//! batch is idempotent and order-insensitive, and the owner's watermark
//! moves in the same transaction as its rows.
//!
//! ```no_run
//! # async fn demo() -> sync_storage::Result<()> {
//! use sync_storage::Store;
//! let store = Store::open(std::path::Path::new("/tmp/lib/library.db")).await?;
//! let me = store.create_device("laptop", sync_core::LibraryId::new_v7()).await?;
//! let summary = store.summary(me.device_id).await?;
//! assert_eq!(summary.entries, 0);
//! # Ok(()) }
//! ```
#![warn(clippy::print_stdout)]

mod audit;
mod bulk;
mod checkpoint;
mod digest;
mod error;
mod gc;
mod import;
mod lock;
mod migration;
mod perms;
mod read;
mod rows;
mod schema_page;
mod snapshot;
mod types;
mod write;

#[cfg(test)]
mod digest_tests;
#[cfg(test)]
mod hostile_snapshot_tests;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
use sea_orm::{DatabaseConnection, SqlxSqliteConnector};
use sea_orm_migration::MigratorTrait;
use sync_core::{DeviceId, IndexId, LibraryId, Seq, Watermark};
use tracing::Instrument;

pub use audit::AuditFinding;
pub use error::{Result, StorageError};
pub use import::{MAX_NAME_BYTES, MAX_PATH_BYTES};
pub use lock::{DirLock, LOCK_FILE};
pub use migration::Migrator;
pub use snapshot::{SNAPSHOT_BYTES_PER_RECORD, SnapshotDownload, max_snapshot_bytes};
pub use types::{
    Checkpoint, ChunkInfo, DeviceInfo, Direction, LocalChange, OwnerSummary, SeqRange,
    SnapshotManifest, SnapshotOfferInfo, TransferState,
};

use perms::private_file;
use rows::{blob, col, exec, i2u, id16, query, query_one, u2i};

/// Read connections in the pool (the machine class has 2 cores).
const READ_POOL: u32 = 3;
/// Page size of a new library file (an existing file keeps its own).
const PAGE_SIZE: u32 = 16_384;
/// WAL pages after which a commit checkpoints (64 MiB at 16 KiB pages).
const WAL_AUTOCHECKPOINT_PAGES: &str = "4096";
/// Bytes the WAL file is cut back to when it restarts (64 MiB).
const WAL_SIZE_LIMIT: &str = "67108864";
/// How long a connection waits on a lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The library database. Cheap to clone (an `Arc` inside), `Send + Sync`.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// One connection: every write goes through it, in order.
    writer: DatabaseConnection,
    /// The same single-connection pool as `writer`, for the bulk write
    /// transactions that bind through sqlx directly (see `bulk`).
    writer_pool: SqlitePool,
    /// A small pool of read-only connections.
    reader: DatabaseConnection,
    /// The same pool as `reader`, for reads that fetch through sqlx
    /// directly (see `read::records_after`).
    reader_pool: SqlitePool,
    /// `PRAGMA data_version` of the writer when the digests were last
    /// audited: it moves only when another connection (another program)
    /// commits to the file.
    audited_version: std::sync::Mutex<Option<i64>>,
    /// Held across multi-statement write work (transactions, ATTACH .. DETACH)
    /// so nothing interleaves on the writer connection.
    write_lock: tokio::sync::Mutex<()>,
    db_path: PathBuf,
    snapshots_dir: PathBuf,
    incoming_dir: PathBuf,
    /// The local device, once known (it never changes afterwards).
    device: OnceLock<DeviceInfo>,
    /// Tests: runs with the download's path once its private copy is made.
    #[cfg(test)]
    import_hook: std::sync::Mutex<Option<ImportHook>>,
}

/// A test's action on a download's file during its import.
#[cfg(test)]
pub(crate) type ImportHook = Box<dyn Fn(&Path) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("db_path", &self.inner.db_path)
            .field("device", &self.inner.device.get().map(|d| d.device_id))
            .finish()
    }
}

/// What the library holds of one owner (`owner_state` row).
#[derive(Clone, Copy, Debug)]
pub(crate) struct OwnerState {
    pub(crate) local: bool,
    pub(crate) watermark: Watermark,
}

/// Whether the writer connection handed back to the pool may be reused.
///
/// SQLite rolls a transaction back by itself when a COMMIT fails with
/// `SQLITE_FULL` (a full disk), or when such a statement cannot be undone
/// alone; sqlx does not notice, its own ROLLBACK then fails, and it keeps
/// counting the transaction as open: every later `begin` becomes a
/// savepoint of a transaction that does not exist (seen on a full tmpfs: a
/// batch applied after space returned was reported committed, yet readers
/// never saw it). A connection still counted in a transaction once its
/// pending rollback has run is closed instead; the pool opens a fresh one.
async fn writer_in_sync(conn: &mut SqliteConnection) -> std::result::Result<bool, sqlx::Error> {
    // The worker runs commands in order: the queued rollback of a dropped
    // transaction has run when the ping returns.
    conn.ping().await?;
    let in_sync = !conn.is_in_transaction();
    if !in_sync {
        tracing::warn!("writer connection left in a transaction SQLite already ended: reopened");
    }
    Ok(in_sync)
}

/// The data directory, `snapshots/` and `incoming/` owner-only (0700); the
/// library file and its WAL owner-only (0600), created so if new (SQLite
/// would create it 0644, and its -wal and -shm files take its mode).
fn make_private(dir: &Path, snapshots: &Path, incoming: &Path, db_path: &Path) -> Result<()> {
    for d in [dir, snapshots, incoming] {
        perms::private_dir(d)?;
    }
    match private_file(db_path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut name = db_path.as_os_str().to_os_string();
            perms::tighten(db_path, perms::FILE_MODE)?;
            for side in ["-wal", "-shm"] {
                name.push(side);
                perms::tighten(Path::new(&name), perms::FILE_MODE)?;
                name = db_path.as_os_str().to_os_string();
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Base connect options of the library file.
fn connect_options(db_path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(db_path)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(false)
        .statement_cache_capacity(256)
        .disable_statement_logging()
}

impl Store {
    /// Opens (creating if needed) the library at `db_path`: WAL,
    /// `synchronous=NORMAL`, one writer connection plus a small read pool,
    /// migrations run in a transaction. Snapshots live in `snapshots/` and
    /// downloads in `incoming/` beside the file.
    pub async fn open(db_path: &Path) -> Result<Store> {
        let span = tracing::info_span!("store_open", path = %db_path.display());
        async move {
            let dir = match db_path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let snapshots_dir = dir.join("snapshots");
            let incoming_dir = dir.join("incoming");
            make_private(&dir, &snapshots_dir, &incoming_dir, db_path)?;

            let writer_opts = connect_options(db_path)
                .create_if_missing(true)
                // Only takes effect when the file is created (sqlx sets it
                // before journal_mode). 16 KiB pages measured ~25% faster bulk
                // apply than 4 KiB: a quarter of the WAL frames (two write
                // syscalls and a wal-index entry each), b-tree splits and
                // page-cache lookups for the same bytes.
                .page_size(PAGE_SIZE)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // 32 MiB page cache (the bulk apply touches the b-tree tails;
                // 64 MiB measured no faster) and no mmap: mmap'ed file pages
                // count in the process's RSS (256 MiB mmap put the sender at
                // ~285 MB for 1M entries); reads through the page cache cost
                // a pread per 16 KiB page, lost in the noise of the bench.
                .pragma("cache_size", "-32768")
                .pragma("temp_store", "MEMORY")
                // Fewer, larger checkpoints than the default 1000 pages: pages
                // rewritten by consecutive batches (index tails) are copied
                // back once, not per commit. 4096 pages = 64 MiB of WAL at 16
                // KiB pages (8192 let a 1M apply leave a 136 MB WAL and the
                // next commit stall on its checkpoint); `journal_size_limit`
                // cuts the file back to 64 MiB when the WAL restarts, so it
                // stays bounded. Bulk transfers end with `Store::checkpoint`.
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)
                .pragma("journal_size_limit", WAL_SIZE_LIMIT)
                .pragma("mmap_size", "0");
            let writer_pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .after_release(|conn, _| Box::pin(writer_in_sync(conn)))
                // A replaced writer gets the digest's temp triggers again
                // (the first one gets them after the migrations, below).
                .after_connect(|conn, _| Box::pin(digest::install_temp_schema(conn)))
                .connect_with(writer_opts)
                .await
                .map_err(|e| sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e.into())))?;
            let writer = SqlxSqliteConnector::from_sqlx_sqlite_pool(writer_pool.clone());
            Migrator::up(&writer, None).await?;
            {
                let mut conn = writer_pool.acquire().await.map_err(bulk::db_err)?;
                digest::install_temp_schema(&mut conn)
                    .await
                    .map_err(bulk::db_err)?;
            }

            let reader_opts = connect_options(db_path)
                .read_only(true)
                .row_buffer_size(1024)
                // 8 MiB page cache per reader, no mmap: RSS stays bounded
                // (3 readers + the writer <= ~60 MiB of cache) whatever the
                // library's size.
                .pragma("cache_size", "-8192")
                .pragma("mmap_size", "0");
            let reader_pool = SqlitePoolOptions::new()
                .max_connections(READ_POOL)
                .min_connections(0)
                .connect_with(reader_opts)
                .await
                .map_err(|e| sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e.into())))?;
            let reader = SqlxSqliteConnector::from_sqlx_sqlite_pool(reader_pool.clone());

            let store = Store {
                inner: Arc::new(Inner {
                    writer,
                    writer_pool,
                    reader,
                    reader_pool,
                    write_lock: tokio::sync::Mutex::new(()),
                    audited_version: std::sync::Mutex::new(None),
                    db_path: db_path.to_path_buf(),
                    snapshots_dir,
                    incoming_dir,
                    device: OnceLock::new(),
                    #[cfg(test)]
                    import_hook: std::sync::Mutex::new(None),
                }),
            };
            if let Some(d) = store.load_device().await? {
                let _ = store.inner.device.set(d);
            }
            store.digest_undigested_owners().await?;
            tracing::debug!("library open");
            Ok(store)
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(db_path))
    }

    /// Closes the connections (the WAL is checkpointed when the writer closes).
    pub async fn close(&self) {
        self.inner.reader.close_by_ref().await.ok();
        self.inner.writer.close_by_ref().await.ok();
    }

    /// Checkpoints the WAL into the library file and truncates it to zero
    /// bytes (`PRAGMA wal_checkpoint(TRUNCATE)` on the writer). Call it when
    /// a bulk transfer completes and at shutdown: the next commit then starts
    /// a fresh WAL instead of paying for the backlog. Readers in progress may
    /// keep part of the WAL alive; that is not an error (the rest is copied
    /// back, and the next checkpoint finishes the job).
    pub async fn checkpoint(&self) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        let mut conn = self
            .inner
            .writer_pool
            .acquire()
            .await
            .map_err(bulk::db_err)?;
        let (busy, log, done): (i64, i64, i64) =
            sea_orm::sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| bulk::db_err(e).disk_full_at(self.path()))?;
        tracing::debug!(busy, log, done, "wal checkpoint");
        Ok(())
    }

    /// Caps the library file at its current size plus `extra_pages` pages
    /// (`PRAGMA max_page_count` on the writer; `None` lifts the cap): writes
    /// past it fail with `SQLITE_FULL`, as on a full disk. The cap lasts as
    /// long as the writer connection: the one reopened after a failed
    /// transaction (see `writer_in_sync`) has none. Only for tests on
    /// machines that cannot mount a small filesystem.
    #[doc(hidden)]
    pub async fn cap_pages_for_tests(&self, extra_pages: Option<u32>) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        let mut conn = self
            .inner
            .writer_pool
            .acquire()
            .await
            .map_err(bulk::db_err)?;
        let (pages,): (i64,) = sea_orm::sqlx::query_as("PRAGMA page_count")
            .fetch_one(&mut *conn)
            .await
            .map_err(bulk::db_err)?;
        // SQLite's own upper bound (the default) when uncapped.
        let max = extra_pages.map_or(4_294_967_294, |extra| pages + i64::from(extra));
        let sql = format!("PRAGMA max_page_count = {max}");
        sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(bulk::db_err)?;
        Ok(())
    }

    /// Tests: sets the action run on a download's part file after its
    /// private copy is made, before any check reads the copy.
    #[cfg(test)]
    pub(crate) fn set_import_hook(&self, hook: Option<ImportHook>) {
        if let Ok(mut h) = self.inner.import_hook.lock() {
            *h = hook;
        }
    }

    #[cfg(test)]
    pub(crate) fn run_import_hook(&self, part: &Path) {
        if let Ok(h) = self.inner.import_hook.lock()
            && let Some(hook) = h.as_ref()
        {
            hook(part);
        }
    }

    /// The library file.
    pub fn path(&self) -> &Path {
        &self.inner.db_path
    }

    /// Where exported snapshot files are kept.
    pub fn snapshots_dir(&self) -> &Path {
        &self.inner.snapshots_dir
    }

    /// Where snapshot downloads are kept until imported.
    pub fn incoming_dir(&self) -> &Path {
        &self.inner.incoming_dir
    }

    async fn load_device(&self) -> Result<Option<DeviceInfo>> {
        let row = query_one(
            &self.inner.writer,
            "SELECT id, library_id, name FROM device LIMIT 1",
            vec![],
        )
        .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(DeviceInfo {
                device_id: DeviceId::from_bytes(id16(&col::<Vec<u8>>(&row, 0)?)?),
                library_id: LibraryId::from_bytes(id16(&col::<Vec<u8>>(&row, 1)?)?),
                name: col(&row, 2)?,
            })),
        }
    }

    /// The local device, if created.
    pub async fn device(&self) -> Result<Option<DeviceInfo>> {
        if let Some(d) = self.inner.device.get() {
            return Ok(Some(d.clone()));
        }
        self.load_device().await
    }

    /// The local device id, or `NotInitialized`.
    pub(crate) fn local_id(&self) -> Result<DeviceId> {
        self.inner
            .device
            .get()
            .map(|d| d.device_id)
            .ok_or(StorageError::NotInitialized)
    }

    /// Creates the local device (a new UUIDv7) in `library`, with its owner
    /// state at a fresh random IndexId and seq 0. Refused if one exists.
    pub async fn create_device(&self, name: &str, library: LibraryId) -> Result<DeviceInfo> {
        self.create_device_inner(name, library)
            .await
            .map_err(|e| e.disk_full_at(self.path()))
    }

    async fn create_device_inner(&self, name: &str, library: LibraryId) -> Result<DeviceInfo> {
        let _guard = self.inner.write_lock.lock().await;
        if let Some(d) = self.load_device().await? {
            return Err(StorageError::AlreadyInitialized {
                device: d.device_id,
                name: d.name,
            });
        }
        let info = DeviceInfo {
            device_id: DeviceId::new_v7(),
            library_id: library,
            name: name.to_owned(),
        };
        let now = chrono::Utc::now().timestamp_micros();
        let txn = sea_orm::TransactionTrait::begin(&self.inner.writer).await?;
        exec(
            &txn,
            "INSERT INTO library (id, created_at) VALUES (?, ?) ON CONFLICT(id) DO NOTHING",
            vec![blob(library.to_bytes()), now.into()],
        )
        .await?;
        exec(
            &txn,
            "INSERT INTO device (id, library_id, name, created_at) VALUES (?, ?, ?, ?)",
            vec![
                blob(info.device_id.to_bytes()),
                blob(library.to_bytes()),
                name.into(),
                now.into(),
            ],
        )
        .await?;
        // A row of this id held as a remote owner (impossible for a fresh v7 id) is replaced.
        exec(
            &txn,
            "INSERT OR REPLACE INTO owner_state (owner, local, index_id, seq) VALUES (?, 1, ?, 0)",
            vec![
                blob(info.device_id.to_bytes()),
                u2i(IndexId::random().0).into(),
            ],
        )
        .await?;
        // The empty digest of its records, so that opening the library
        // (a `status` beside a running engine) never has one to write.
        exec(
            &txn,
            "INSERT OR REPLACE INTO owner_digest (owner, lthash, records, pruned) VALUES (?, ?, 0, 0)",
            vec![
                blob(info.device_id.to_bytes()),
                sync_core::digest::LtHash::new().to_bytes().into(),
            ],
        )
        .await?;
        txn.commit().await?;
        let _ = self.inner.device.set(info.clone());
        tracing::info!(device = %info.device_id.fmt_short(), "device created");
        Ok(info)
    }

    /// This device's IndexId and max seq.
    pub async fn local_watermark(&self) -> Result<Watermark> {
        let me = self.local_id()?;
        match owner_state(&self.inner.reader, me).await? {
            Some(s) => Ok(s.watermark),
            None => Err(StorageError::NotInitialized),
        }
    }

    /// The held watermark of a remote owner (`None` if nothing is held);
    /// for the local owner, [`Store::local_watermark`].
    pub async fn watermark(&self, owner: DeviceId) -> Result<Option<Watermark>> {
        Ok(owner_state(&self.inner.reader, owner)
            .await?
            .map(|s| s.watermark))
    }

    /// Every remote owner held, with its watermark, by owner id.
    pub async fn watermarks(&self) -> Result<Vec<(DeviceId, Watermark)>> {
        let rows = query(
            &self.inner.reader,
            "SELECT owner, index_id, seq FROM owner_state WHERE local = 0 ORDER BY owner",
            vec![],
        )
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    DeviceId::from_bytes(id16(&col::<Vec<u8>>(row, 0)?)?),
                    Watermark::new(IndexId(i2u(col(row, 1)?)), Seq(i2u(col(row, 2)?))),
                ))
            })
            .collect()
    }
}

/// The `owner_state` row of `owner`, if any.
pub(crate) async fn owner_state<C: sea_orm::ConnectionTrait>(
    c: &C,
    owner: DeviceId,
) -> Result<Option<OwnerState>> {
    let row = query_one(
        c,
        "SELECT local, index_id, seq FROM owner_state WHERE owner = ?",
        vec![blob(owner.to_bytes())],
    )
    .await?;
    match row {
        None => Ok(None),
        Some(row) => Ok(Some(OwnerState {
            local: col(&row, 0)?,
            watermark: Watermark::new(IndexId(i2u(col(&row, 1)?)), Seq(i2u(col(&row, 2)?))),
        })),
    }
}
