//! Database snapshots: export one owner's records into a standalone SQLite
//! file, serve it in chunks, download chunks resumably, verify and import.
//!
//! Export runs on its own pinned connection to the new file (ATTACH through
//! a pool would attach one pooled connection only), with the library
//! attached and read in one read transaction, so the file is consistent
//! with a single watermark. Importing a download (someone else's file) is
//! `import.rs`: it never attaches the file to the writer.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sea_orm::sqlx::ConnectOptions as _;
use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, SqlxSqliteConnector, TransactionTrait, Value};
use sha2::{Digest, Sha256};
use sync_core::{DeviceId, Hash, IndexId, SNAPSHOT_CHUNK_SIZE, Seq, SnapshotId};
use tracing::Instrument;

use crate::error::{Result, StorageError};
use crate::migration::{SNAPSHOT_FORMAT, SNAPSHOT_SCHEMA};
use crate::rows::{blob, col, exec, i2u, id16, query, query_one, u2i};
use crate::types::{ChunkInfo, SnapshotManifest, SnapshotOfferInfo};
use crate::{BUSY_TIMEOUT, Store, perms};

/// The first 16 bytes of every SQLite database file.
pub(crate) const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

fn io_err(e: tokio::task::JoinError) -> StorageError {
    StorageError::Io(std::io::Error::other(e))
}

fn sqlx_err(e: sea_orm::sqlx::Error) -> StorageError {
    StorageError::Db(sea_orm::DbErr::Conn(sea_orm::RuntimeErr::SqlxError(
        e.into(),
    )))
}

/// Number of chunks of a file of `bytes` bytes.
fn chunk_count(bytes: u64) -> u64 {
    bytes.div_ceil(SNAPSHOT_CHUNK_SIZE as u64)
}

/// Uncompressed length of chunk `index` of a file of `bytes` bytes.
fn chunk_len(bytes: u64, index: u32) -> u64 {
    let start = u64::from(index) * SNAPSHOT_CHUNK_SIZE as u64;
    bytes.saturating_sub(start).min(SNAPSHOT_CHUNK_SIZE as u64)
}

/// Size, whole-file SHA-256 and per-chunk SHA-256 of a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(u64, Hash, Vec<ChunkInfo>)> {
    let mut f = File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_SIZE];
    let mut bytes = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = f.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let piece = &buf[..filled];
        whole.update(piece);
        chunks.push(ChunkInfo {
            hash: Sha256::digest(piece).into(),
            len: filled as u32,
        });
        bytes += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok((bytes, whole.finalize().into(), chunks))
}

/// Reads chunk `index` of a file of `bytes` bytes.
pub(crate) fn read_chunk_at(path: &Path, bytes: u64, index: u32) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(
        u64::from(index) * SNAPSHOT_CHUNK_SIZE as u64,
    ))?;
    let mut buf = vec![0u8; chunk_len(bytes, index) as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// A single-connection pool on a snapshot file (the connection is pinned:
/// ATTACH and the transaction run on it).
async fn single_connection(opts: SqliteConnectOptions) -> Result<DatabaseConnection> {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(opts.busy_timeout(BUSY_TIMEOUT).disable_statement_logging())
        .await
        .map_err(sqlx_err)?;
    Ok(SqlxSqliteConnector::from_sqlx_sqlite_pool(pool))
}

impl Store {
    /// Exports every record of `owner` into a fresh SQLite file
    /// `snapshots/<id>.db` with a manifest row, chunks and hashes it, and
    /// records the manifest so [`Store::snapshot_manifest`] finds it again.
    pub async fn export_snapshot(&self, owner: DeviceId) -> Result<SnapshotManifest> {
        let id = SnapshotId::new_v7();
        let span = tracing::info_span!(
            "export_snapshot",
            owner = %owner.fmt_short(),
            snapshot = %id.fmt_short()
        );
        async move {
            let path = self.inner.snapshots_dir.join(format!("{id}.db"));
            let built = self
                .build_snapshot_file(owner, &path)
                .await
                .map_err(|e| e.disk_full_at(&path));
            let (index_id, max_seq, records) = match built {
                Ok(v) => v,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Err(e);
                }
            };
            sync_core::crash_point("export.built");
            let p = path.clone();
            let (bytes, hash, chunks) = tokio::task::spawn_blocking(move || {
                File::open(&p)?.sync_all()?;
                hash_file(&p)
            })
            .await
            .map_err(io_err)?
            .map_err(|e| StorageError::from(e).disk_full_at(&path))?;
            let manifest = SnapshotManifest {
                id,
                owner,
                index_id,
                max_seq,
                entries: records,
                bytes,
                chunks,
                hash,
                path,
            };
            sync_core::crash_point("export.hashed");
            self.save_manifest(&manifest)
                .await
                .map_err(|e| e.disk_full_at(self.path()))?;
            tracing::info!(
                records,
                bytes,
                chunks = manifest.chunks.len(),
                max_seq = max_seq.0,
                "snapshot exported"
            );
            Ok(manifest)
        }
        .instrument(span)
        .await
    }

    /// Writes the snapshot file: returns (index_id, max_seq, records).
    async fn build_snapshot_file(
        &self,
        owner: DeviceId,
        path: &Path,
    ) -> Result<(IndexId, Seq, u64)> {
        // Owner-only from the start: SQLite would create it 0644.
        perms::private_file(path)?;
        let conn = single_connection(
            SqliteConnectOptions::new()
                .filename(path)
                .journal_mode(SqliteJournalMode::Off)
                .synchronous(SqliteSynchronous::Off)
                .foreign_keys(false),
        )
        .await?;
        let result = async {
            let lib = self.inner.db_path.to_string_lossy().into_owned();
            exec(&conn, "ATTACH DATABASE ? AS lib", vec![lib.into()]).await?;
            let txn = conn.begin().await?;
            for sql in SNAPSHOT_SCHEMA {
                txn.execute_unprepared(sql).await?;
            }
            let row = query_one(
                &txn,
                "SELECT local, index_id, seq FROM lib.owner_state WHERE owner = ?",
                vec![blob(owner.to_bytes())],
            )
            .await?
            .ok_or(StorageError::UnknownOwner { owner })?;
            let index_id = IndexId(i2u(col(&row, 1)?));
            let max_seq = Seq(i2u(col(&row, 2)?));
            let params = || vec![blob(owner.to_bytes()), Value::BigInt(Some(u2i(max_seq.0)))];
            let locs = exec(
                &txn,
                "INSERT INTO main.location (id, owner, path, name, seq, deleted) \
                 SELECT id, owner, path, name, seq, deleted FROM lib.location \
                 WHERE owner = ?1 AND seq <= ?2 ORDER BY id",
                params(),
            )
            .await?
            .rows_affected();
            let ents = exec(
                &txn,
                "INSERT INTO main.entry (id, owner, location, parent, name, kind, size, inode, \
                 created_at, modified_at, seq, deleted) \
                 SELECT id, owner, location, parent, name, kind, size, inode, created_at, \
                 modified_at, seq, deleted FROM lib.entry \
                 WHERE owner = ?1 AND seq <= ?2 ORDER BY id",
                params(),
            )
            .await?
            .rows_affected();
            let records = locs + ents;
            exec(
                &txn,
                "INSERT INTO main.manifest (format, owner, index_id, max_seq, records) \
                 VALUES (?, ?, ?, ?, ?)",
                vec![
                    Value::BigInt(Some(SNAPSHOT_FORMAT)),
                    blob(owner.to_bytes()),
                    Value::BigInt(Some(u2i(index_id.0))),
                    Value::BigInt(Some(u2i(max_seq.0))),
                    Value::BigInt(Some(u2i(records))),
                ],
            )
            .await?;
            txn.commit().await?;
            exec(&conn, "DETACH DATABASE lib", vec![]).await?;
            Ok((index_id, max_seq, records))
        }
        .await;
        conn.close_by_ref().await.ok();
        result
    }

    async fn save_manifest(&self, m: &SnapshotManifest) -> Result<()> {
        let mut chunk_hashes = Vec::with_capacity(m.chunks.len() * 32);
        for c in &m.chunks {
            chunk_hashes.extend_from_slice(&c.hash);
        }
        let _guard = self.inner.write_lock.lock().await;
        exec(
            &self.inner.writer,
            "INSERT INTO snapshot (id, owner, index_id, max_seq, records, bytes, hash, \
             chunk_hashes, path, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            vec![
                blob(m.id.to_bytes()),
                blob(m.owner.to_bytes()),
                Value::BigInt(Some(u2i(m.index_id.0))),
                Value::BigInt(Some(u2i(m.max_seq.0))),
                Value::BigInt(Some(u2i(m.entries))),
                Value::BigInt(Some(u2i(m.bytes))),
                Value::Bytes(Some(m.hash.to_vec())),
                Value::Bytes(Some(chunk_hashes)),
                Value::String(Some(m.path.to_string_lossy().into_owned())),
                Value::BigInt(Some(chrono::Utc::now().timestamp_micros())),
            ],
        )
        .await?;
        Ok(())
    }

    /// Removes what interrupted or superseded exports left behind: every
    /// snapshot of an owner but the newest `keep` (manifest row and file),
    /// manifests whose file is gone, and, when `orphans` is set, files in
    /// `snapshots/` that no manifest names (an export killed before it
    /// saved its manifest). Set `orphans` only when no export can be
    /// running, e.g. at start. Returns the number of files removed.
    pub async fn prune_snapshots(&self, keep: usize, orphans: bool) -> Result<u64> {
        let rows = query(
            &self.inner.reader,
            "SELECT id, owner, path FROM snapshot ORDER BY owner, created_at DESC, id DESC",
            vec![],
        )
        .await?;
        let mut kept = std::collections::HashSet::new();
        let mut drop_ids = Vec::new();
        let (mut owner, mut rank) = (Vec::new(), 0usize);
        for row in &rows {
            let id: Vec<u8> = col(row, 0)?;
            let o: Vec<u8> = col(row, 1)?;
            let path = PathBuf::from(col::<String>(row, 2)?);
            if o != owner {
                (owner, rank) = (o, 0);
            }
            if rank < keep && path.exists() {
                // By name: the data dir may be spelled differently between runs.
                kept.insert(path.file_name().map(|n| n.to_os_string()));
                rank += 1;
            } else {
                drop_ids.push((id, path));
            }
        }
        let mut removed = 0u64;
        if !drop_ids.is_empty() {
            let _guard = self.inner.write_lock.lock().await;
            for (id, _) in &drop_ids {
                exec(
                    &self.inner.writer,
                    "DELETE FROM snapshot WHERE id = ?",
                    vec![Value::Bytes(Some(id.clone()))],
                )
                .await?;
            }
        }
        for (_, path) in &drop_ids {
            if tokio::fs::remove_file(path).await.is_ok() {
                removed += 1;
            }
        }
        if orphans {
            let mut dir = tokio::fs::read_dir(&self.inner.snapshots_dir).await?;
            while let Some(e) = dir.next_entry().await? {
                let path = e.path();
                if !kept.contains(&path.file_name().map(|n| n.to_os_string()))
                    && tokio::fs::remove_file(&path).await.is_ok()
                {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, kept = kept.len(), "old snapshot files removed");
        }
        Ok(removed)
    }

    /// Removes downloads the library no longer needs: those whose snapshot
    /// is covered by what is held of its owner (same index, watermark at or
    /// above the snapshot's max seq), as a crash after an import committed
    /// but before its files were removed leaves them; partial downloads
    /// untouched for a week; a crashed import's private copy. Returns the
    /// downloads removed. Downloads still useful are kept for resuming.
    pub async fn prune_downloads(&self) -> Result<u64> {
        let mut removed = 0;
        let mut dir = tokio::fs::read_dir(&self.inner.incoming_dir).await?;
        while let Some(e) = dir.next_entry().await? {
            let state = e.path();
            let ext = state
                .extension()
                .and_then(|x| x.to_str())
                .unwrap_or_default();
            if matches!(ext, "verify" | "tmp") {
                // A crashed import's private copy, a crashed state write.
                let _ = tokio::fs::remove_file(&state).await;
                continue;
            }
            if ext != "next" {
                continue;
            }
            let age = e
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a > DOWNLOAD_EXPIRY) {
                tracing::info!(download = %state.display(), "expired snapshot download removed");
                let _ = tokio::fs::remove_file(state.with_extension("part")).await;
                let _ = tokio::fs::remove_file(&state).await;
                removed += 1;
                continue;
            }
            let text = tokio::fs::read_to_string(&state).await.unwrap_or_default();
            let fields: Vec<&str> = text.split_whitespace().collect();
            let [_, _, _, owner, index, max_seq] = fields[..] else {
                continue;
            };
            let (Some(owner), Ok(index), Ok(max_seq)) = (
                hex::decode(owner).ok().and_then(|b| id16(&b).ok()),
                index.parse::<u64>(),
                max_seq.parse::<u64>(),
            ) else {
                continue;
            };
            let held = self.watermark(DeviceId::from_bytes(owner)).await?;
            if held.is_some_and(|w| w.index_id == IndexId(index) && w.seq >= Seq(max_seq)) {
                let _ = tokio::fs::remove_file(state.with_extension("part")).await;
                let _ = tokio::fs::remove_file(&state).await;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "downloads of snapshots already imported removed");
        }
        Ok(removed)
    }

    /// Removes partial downloads of the offer's owner other than this offer:
    /// an owner has at most one download in `incoming/`, so a peer's
    /// successive offers cannot fill the disk with abandoned partials.
    async fn discard_superseded(&self, offer: &SnapshotOfferInfo) -> Result<()> {
        let mut dir = tokio::fs::read_dir(&self.inner.incoming_dir).await?;
        while let Some(e) = dir.next_entry().await? {
            let state = e.path();
            if state.extension().is_none_or(|x| x != "next")
                || state.file_stem() == Some(std::ffi::OsStr::new(&offer.id.to_string()))
            {
                continue;
            }
            let text = tokio::fs::read_to_string(&state).await.unwrap_or_default();
            if state_owner(&text) == Some(offer.owner) {
                tracing::info!(download = %state.display(), "superseded snapshot download removed");
                let _ = tokio::fs::remove_file(state.with_extension("part")).await;
                let _ = tokio::fs::remove_file(&state).await;
            }
        }
        Ok(())
    }

    /// The manifest of a snapshot exported here, if known.
    pub async fn snapshot_manifest(&self, id: SnapshotId) -> Result<Option<SnapshotManifest>> {
        let row = query_one(
            &self.inner.reader,
            "SELECT owner, index_id, max_seq, records, bytes, hash, chunk_hashes, path \
             FROM snapshot WHERE id = ?",
            vec![blob(id.to_bytes())],
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let bytes = i2u(col(&row, 4)?);
        let hash: Vec<u8> = col(&row, 5)?;
        let hashes: Vec<u8> = col(&row, 6)?;
        if hashes.len() as u64 != chunk_count(bytes) * 32 {
            return Err(StorageError::Corrupt(format!(
                "snapshot {} lists {} chunk hash bytes for {bytes} bytes",
                id.fmt_short(),
                hashes.len()
            )));
        }
        let chunks = hashes
            .chunks_exact(32)
            .enumerate()
            .map(|(i, h)| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(h);
                ChunkInfo {
                    hash,
                    len: chunk_len(bytes, i as u32) as u32,
                }
            })
            .collect();
        Ok(Some(SnapshotManifest {
            id,
            owner: DeviceId::from_bytes(id16(&col::<Vec<u8>>(&row, 0)?)?),
            index_id: IndexId(i2u(col(&row, 1)?)),
            max_seq: Seq(i2u(col(&row, 2)?)),
            entries: i2u(col(&row, 3)?),
            bytes,
            chunks,
            hash: hash
                .try_into()
                .map_err(|_| StorageError::Corrupt("snapshot hash is not 32 bytes".into()))?,
            path: PathBuf::from(col::<String>(&row, 7)?),
        }))
    }

    /// Chunk `index` of an exported snapshot: (SHA-256 of the raw chunk,
    /// size-prepended lz4 block of it).
    pub async fn read_snapshot_chunk(
        &self,
        manifest: &SnapshotManifest,
        index: u32,
    ) -> Result<(Hash, Vec<u8>)> {
        let chunks = manifest.chunks.len() as u32;
        if index >= chunks {
            return Err(StorageError::NoSuchChunk { index, chunks });
        }
        let path = manifest.path.clone();
        let bytes = manifest.bytes;
        tokio::task::spawn_blocking(move || {
            let raw = read_chunk_at(&path, bytes, index)?;
            let hash: Hash = Sha256::digest(&raw).into();
            Ok((hash, sync_core::codec::compress(&raw)))
        })
        .await
        .map_err(io_err)?
    }

    /// Starts (or resumes) downloading an offered snapshot into
    /// `incoming/<id>.part`. A partial download of the same offer resumes at
    /// its persisted next chunk; the part file is cut back to that chunk.
    pub async fn begin_download(&self, offer: &SnapshotOfferInfo) -> Result<SnapshotDownload> {
        if offer.bytes == 0 || chunk_count(offer.bytes) != u64::from(offer.chunks) {
            return Err(StorageError::BadOffer(format!(
                "{} bytes do not make {} chunks of {} bytes",
                offer.bytes, offer.chunks, SNAPSHOT_CHUNK_SIZE
            )));
        }
        // Each record holds its own seq in 1..=max_seq.
        if offer.entries > offer.max_seq.0 {
            return Err(StorageError::BadOffer(format!(
                "{} records cannot have distinct seqs up to {}",
                offer.entries, offer.max_seq
            )));
        }
        let max = max_snapshot_bytes(offer.entries);
        if offer.bytes > max {
            return Err(StorageError::BadOffer(format!(
                "{} bytes for {} records: a snapshot of that many records is at most {max} bytes",
                offer.bytes, offer.entries
            )));
        }
        self.discard_superseded(offer).await?;
        let part = self.inner.incoming_dir.join(format!("{}.part", offer.id));
        let state = self.inner.incoming_dir.join(format!("{}.next", offer.id));
        let offer = *offer;
        let part_path = part.clone();
        let (file, next) = tokio::task::spawn_blocking(move || -> Result<(File, u32)> {
            let persisted = std::fs::read_to_string(&state).ok().and_then(|s| {
                let mut it = s.split_whitespace();
                let next: u32 = it.next()?.parse().ok()?;
                let hash = it.next()?;
                let bytes: u64 = it.next()?.parse().ok()?;
                (hash == hex::encode(offer.hash) && bytes == offer.bytes).then_some(next)
            });
            // Whole chunks on disk; the last chunk may be short, so a file of
            // the offer's full size holds every chunk.
            let len = match std::fs::symlink_metadata(&part) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e.into()),
            };
            let have = if len >= offer.bytes {
                u64::from(offer.chunks)
            } else {
                len / SNAPSHOT_CHUNK_SIZE as u64
            };
            let next =
                persisted.map_or(0, |n| u64::from(n).min(have).min(u64::from(offer.chunks))) as u32;
            let kept = (u64::from(next) * SNAPSHOT_CHUNK_SIZE as u64).min(offer.bytes);
            // The rest of the file, its private copy at import, and a reserve.
            let need = (offer.bytes - kept)
                .saturating_add(offer.bytes)
                .saturating_add(DOWNLOAD_RESERVE_BYTES);
            let free = perms::available_bytes(part.parent().unwrap_or(&part))?;
            if free < need {
                tracing::warn!(free, need, "no room for the snapshot download");
                return Err(StorageError::DiskFull { path: part });
            }
            let file = perms::private_open(&part)?;
            file.set_len(kept)?;
            file.sync_all()?;
            write_state(&state, next, &offer)?;
            Ok((file, next))
        })
        .await
        .map_err(io_err)?
        .map_err(|e| e.disk_full_at(&part_path))?;
        tracing::info!(
            snapshot = %offer.id.fmt_short(),
            next_chunk = next,
            chunks = offer.chunks,
            "snapshot download"
        );
        Ok(SnapshotDownload {
            offer,
            part: self.inner.incoming_dir.join(format!("{}.part", offer.id)),
            state: self.inner.incoming_dir.join(format!("{}.next", offer.id)),
            file,
            next,
        })
    }
}

/// Persists the next chunk to fetch (a unique temporary file, synced, then
/// renamed: never half-written, never a predictable temporary name).
fn write_state(state: &Path, next: u32, offer: &SnapshotOfferInfo) -> std::io::Result<()> {
    // `next hash bytes` resume the download; `owner index_id max_seq`
    // tell `prune_downloads` when the library no longer needs it.
    let line = format!(
        "{next} {} {} {} {} {}\n",
        hex::encode(offer.hash),
        offer.bytes,
        hex::encode(offer.owner.to_bytes()),
        offer.index_id.0,
        offer.max_seq.0
    );
    perms::write_atomic(state, line.as_bytes())
}

/// The owner named by a download's state file, if readable.
fn state_owner(text: &str) -> Option<DeviceId> {
    let owner = text.split_whitespace().nth(3)?;
    hex::decode(owner)
        .ok()
        .and_then(|b| id16(&b).ok())
        .map(DeviceId::from_bytes)
}

/// The largest snapshot file of `records` records this version accepts:
/// [`SNAPSHOT_BYTES_PER_RECORD`] per record (an entry row is at most ~1.2
/// KB with the longest name a snapshot may hold, and a b-tree page may be
/// half empty or spill a long row to an overflow page) plus the header,
/// schema and manifest pages.
pub fn max_snapshot_bytes(records: u64) -> u64 {
    SNAPSHOT_BASE_BYTES.saturating_add(records.saturating_mul(SNAPSHOT_BYTES_PER_RECORD))
}

/// Fixed part of [`max_snapshot_bytes`].
const SNAPSHOT_BASE_BYTES: u64 = 1 << 20;
/// Per-record part of [`max_snapshot_bytes`] (real snapshots: ~110 bytes).
pub const SNAPSHOT_BYTES_PER_RECORD: u64 = 8 << 10;
/// Space a download must leave free on its disk.
const DOWNLOAD_RESERVE_BYTES: u64 = 64 << 20;
/// A partial download untouched this long is removed at start.
const DOWNLOAD_EXPIRY: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// The in-progress download of one snapshot offer. Dropping it keeps the
/// partial file: `begin_download` of the same offer resumes it.
#[derive(Debug)]
pub struct SnapshotDownload {
    offer: SnapshotOfferInfo,
    part: PathBuf,
    state: PathBuf,
    file: File,
    next: u32,
}

impl SnapshotDownload {
    /// The snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.offer.id
    }

    /// The offer being downloaded.
    pub fn offer(&self) -> &SnapshotOfferInfo {
        &self.offer
    }

    /// The next chunk to fetch.
    pub fn next_chunk(&self) -> u32 {
        self.next
    }

    /// Chunks in the snapshot.
    pub fn chunks(&self) -> u32 {
        self.offer.chunks
    }

    /// True once every chunk is written.
    pub fn is_complete(&self) -> bool {
        self.next >= self.offer.chunks
    }

    /// Writes chunk `index` (which must be [`Self::next_chunk`]): `data` is
    /// the size-prepended lz4 block, `hash` the SHA-256 of the raw chunk.
    /// The chunk is verified, written, synced, and the next chunk persisted.
    pub async fn write_chunk(&mut self, index: u32, hash: Hash, data: &[u8]) -> Result<()> {
        if index != self.next {
            return Err(StorageError::ChunkOutOfOrder {
                expected: self.next,
                got: index,
            });
        }
        if index >= self.offer.chunks {
            return Err(StorageError::NoSuchChunk {
                index,
                chunks: self.offer.chunks,
            });
        }
        let want_len = chunk_len(self.offer.bytes, index) as usize;
        let data = data.to_vec();
        let mut file = self.file.try_clone()?;
        let state = self.state.clone();
        let offer = self.offer;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let raw =
                sync_core::codec::decompress_checked(&data, SNAPSHOT_CHUNK_SIZE).map_err(|e| {
                    StorageError::CorruptChunk {
                        index,
                        reason: e.to_string(),
                    }
                })?;
            if raw.len() != want_len {
                return Err(StorageError::CorruptChunk {
                    index,
                    reason: format!("{} bytes, expected {want_len}", raw.len()),
                });
            }
            let have: Hash = Sha256::digest(&raw).into();
            if have != hash {
                return Err(StorageError::ChunkHashMismatch { index });
            }
            file.seek(SeekFrom::Start(
                u64::from(index) * SNAPSHOT_CHUNK_SIZE as u64,
            ))?;
            file.write_all(&raw)?;
            file.sync_data()?;
            write_state(&state, index + 1, &offer)?;
            Ok(())
        })
        .await
        .map_err(io_err)?
        .map_err(|e| e.disk_full_at(&self.part))?;
        sync_core::crash_point("download.chunk");
        self.next = index + 1;
        Ok(())
    }

    /// The part file, the state file and the next chunk, for the import.
    pub(crate) fn into_parts(self) -> (PathBuf, PathBuf, u32) {
        drop(self.file);
        (self.part, self.state, self.next)
    }

    /// Abandons the download and removes its files.
    pub async fn discard(self) -> Result<()> {
        drop(self.file);
        let _ = tokio::fs::remove_file(&self.state).await;
        match tokio::fs::remove_file(&self.part).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}
