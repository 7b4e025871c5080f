//! Reads: paging records by seq, counts, summaries with fingerprints, locations.

use sea_orm::sqlx::{self, Connection as _, Row as _};
use sea_orm::{ConnectionTrait, TransactionTrait, Value};
use sync_core::model::micros;
use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, Fingerprint, IndexId, Location, LocationId, Record, Seq,
};
use tracing::Instrument;

use crate::bulk::db_err;
use crate::error::{Result, StorageError};
use crate::rows::{
    ENTRY_COLUMNS, LOCATION_COLUMNS, blob, col, entry_from_row, i2u, id16, location_from_row,
    query, query_one, u2i,
};
use crate::types::OwnerSummary;
use crate::{Store, owner_state};

/// Rows per page when scanning an owner for its fingerprint.
const SCAN_PAGE: i64 = 50_000;

/// Entry rows packed by one [`ENTRY_PACK`] statement (~130 bytes each).
pub(crate) const PACK_PAGE: usize = 10_000;

/// One page of an owner's entries with ?2 < seq <= ?3, in seq order (the
/// `(owner, seq)` index range), packed by SQLite column by column: one
/// aggregate per column, so a page is ONE row to fetch (rows one by one
/// through sqlx cost ~4 us each, measured). Columns: the row count; the raw
/// 16-byte ids, locations and (non-NULL) parents, concatenated; `,`
/// separated decimal "shapes" (`octet_length(name) * 32 + kind * 8 +
/// deleted * 4 + parent NULL * 2 + inode NULL`), sizes, (non-NULL) inodes,
/// created_at, modified_at and seqs; the names concatenated; and the
/// number of rows whose blobs are not 16 bytes (the page is then refused).
/// One aggregate per column avoids building each row with a chain of `||`
/// (which copies the growing row string at every step: 2x slower).
macro_rules! entry_pack_columns {
    () => {
        "count(*), \
    CAST(group_concat(id, '') AS BLOB), \
    CAST(group_concat(location, '') AS BLOB), \
    CAST(group_concat(parent, '') AS BLOB), \
    CAST(group_concat(octet_length(name) * 32 + kind * 8 + deleted * 4 \
        + (parent IS NULL) * 2 + (inode IS NULL), ',') AS BLOB), \
    CAST(group_concat(size, ',') AS BLOB), \
    CAST(group_concat(inode, ',') AS BLOB), \
    CAST(group_concat(created_at, ',') AS BLOB), \
    CAST(group_concat(modified_at, ',') AS BLOB), \
    CAST(group_concat(seq, ',') AS BLOB), \
    CAST(group_concat(name, '') AS BLOB), \
    sum(length(id) != 16 OR length(location) != 16 \
        OR (parent IS NOT NULL AND length(parent) != 16))"
    };
}
const ENTRY_PACK: &str = concat!(
    "SELECT ",
    entry_pack_columns!(),
    " FROM entry WHERE owner = ? AND seq > ? AND seq <= ?"
);

/// One page of a snapshot file's entries of owner ?1 with id > ?2, at most
/// ?3, in id order (the primary key), packed as [`ENTRY_PACK`] packs.
pub(crate) const SNAPSHOT_ENTRY_PACK: &str = concat!(
    "SELECT ",
    entry_pack_columns!(),
    " FROM (SELECT * FROM entry WHERE owner = ? AND id > ? ORDER BY id LIMIT ?)"
);

/// The count and the highest seq of the next page of an owner's entries
/// (seq > ?2, at most ?3 rows), from the `(owner, seq)` index alone. The
/// page is then packed as the seq range `(?2, max]`: aggregating a plain
/// index range scan is cheaper than aggregating an `ORDER BY .. LIMIT`
/// subquery (no co-routine copying every row).
const ENTRY_PAGE_BOUND: &str = "SELECT count(*), max(seq) FROM \
    (SELECT seq FROM entry WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?)";

impl Store {
    /// Records (entries and locations) of `owner` with seq > `after`, in seq
    /// order, at most `limit`, read in one read transaction.
    ///
    /// Runs on one reader connection through sqlx directly, in one explicit
    /// read transaction: the entries come packed by SQLite, one row per page
    /// (see [`ENTRY_PACK`]), so a 10K-record page costs two statements
    /// instead of 10K sea-orm rows (~4 us per row before, ~1.2 us now).
    pub async fn records_after(
        &self,
        owner: DeviceId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Record>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        // One read transaction for every statement below: entries and
        // locations come from the same snapshot of the library.
        let mut txn = conn.begin().await.map_err(db_err)?;
        let owner_id = owner.to_bytes().to_vec();
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let loc_rows = sqlx::query(
            "SELECT id, owner, path, name, seq, deleted FROM location \
             WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(owner_id.clone())
        .bind(u2i(after.0))
        .bind(lim)
        .fetch_all(&mut *txn)
        .await
        .map_err(db_err)?;
        let mut locs = Vec::with_capacity(loc_rows.len());
        for row in &loc_rows {
            let id: Vec<u8> = row.try_get(0).map_err(db_err)?;
            let owner: Vec<u8> = row.try_get(1).map_err(db_err)?;
            locs.push(Location {
                id: LocationId::from_bytes(id16(&id)?),
                owner: DeviceId::from_bytes(id16(&owner)?),
                path: row.try_get(2).map_err(db_err)?,
                name: row.try_get(3).map_err(db_err)?,
                seq: Seq(i2u(row.try_get(4).map_err(db_err)?)),
                deleted: row.try_get(5).map_err(db_err)?,
            });
        }
        drop(loc_rows);

        let mut ents: Vec<Entry> = Vec::with_capacity(limit.min(PACK_PAGE));
        let mut cursor = u2i(after.0);
        let mut remaining = limit;
        while remaining > 0 {
            let want = remaining.min(PACK_PAGE);
            let bound = sqlx::query(ENTRY_PAGE_BOUND)
                .bind(owner_id.clone())
                .bind(cursor)
                .bind(want as i64)
                .fetch_one(&mut *txn)
                .await
                .map_err(db_err)?;
            let expect: i64 = bound.try_get(0).map_err(db_err)?;
            let Some(max_seq) = bound.try_get::<Option<i64>, _>(1).map_err(db_err)? else {
                break;
            };
            let row = sqlx::query(ENTRY_PACK)
                .bind(owner_id.clone())
                .bind(cursor)
                .bind(max_seq)
                .fetch_one(&mut *txn)
                .await
                .map_err(db_err)?;
            let got = unpack_page(&row, &mut ents)?;
            // More rows than counted only if several share the page's last
            // seq (never written so; they are all returned).
            if (got as i64) < expect {
                return Err(StorageError::Corrupt(format!(
                    "entry page of {got} rows, the index counts {expect}"
                )));
            }
            if got == 0 {
                break;
            }
            // Stored seqs are i64 bit patterns, ordered as i64 by SQLite.
            cursor = ents.last().map_or(cursor, |e| u2i(e.seq.0));
            remaining = remaining.saturating_sub(got);
            if got < want {
                break;
            }
        }
        txn.commit().await.map_err(db_err)?;
        // The subquery's ORDER BY fixes the aggregate's input order in
        // practice; re-sort if it ever does not (stable and cheap when sorted).
        if !ents.is_sorted_by_key(|e| u2i(e.seq.0)) {
            ents.sort_by_key(|e| u2i(e.seq.0));
        }

        // Merge the two seq-ordered lists.
        let mut out = Vec::with_capacity(limit.min(locs.len() + ents.len()));
        let mut li = locs.into_iter().peekable();
        let mut ei = ents.into_iter().peekable();
        while out.len() < limit {
            let take_loc = match (li.peek(), ei.peek()) {
                (Some(l), Some(e)) => u2i(l.seq.0) <= u2i(e.seq.0),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let next = if take_loc {
                li.next().map(Record::Location)
            } else {
                ei.next().map(Record::Entry)
            };
            match next {
                Some(r) => out.push(r),
                None => break,
            }
        }
        Ok(out)
    }

    /// Number of records of `owner` with seq > `after`.
    pub async fn count_after(&self, owner: DeviceId, after: Seq) -> Result<u64> {
        let row = query_one(
            &self.inner.reader,
            "SELECT (SELECT count(*) FROM entry WHERE owner = ?1 AND seq > ?2) \
                  + (SELECT count(*) FROM location WHERE owner = ?1 AND seq > ?2)",
            vec![blob(owner.to_bytes()), Value::BigInt(Some(u2i(after.0)))],
        )
        .await?;
        Ok(match row {
            Some(r) => i2u(col::<i64>(&r, 0)?),
            None => 0,
        })
    }

    /// What is held of `owner`: counts, seq (max seq when local, watermark
    /// when remote) and the fingerprint of every record, read consistently.
    /// An owner nothing is held of gives an empty summary (IndexId 0).
    pub async fn summary(&self, owner: DeviceId) -> Result<OwnerSummary> {
        let span = tracing::debug_span!("summary", owner = %owner.fmt_short());
        async move {
            let txn = self.inner.reader.begin().await?;
            let s = summary_in(&txn, owner).await?;
            txn.commit().await?;
            tracing::debug!(entries = s.entries, tombstones = s.tombstones, "summary");
            Ok(s)
        }
        .instrument(span)
        .await
    }

    /// Summaries of the local owner first, then of every remote owner (by id).
    pub async fn summaries(&self) -> Result<Vec<OwnerSummary>> {
        let txn = self.inner.reader.begin().await?;
        let rows = query(
            &txn,
            "SELECT owner FROM owner_state ORDER BY local DESC, owner",
            vec![],
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let owner = DeviceId::from_bytes(id16(&col::<Vec<u8>>(&row, 0)?)?);
            out.push(summary_in(&txn, owner).await?);
        }
        txn.commit().await?;
        Ok(out)
    }

    /// Every location of every owner (tombstones included).
    pub async fn locations(&self) -> Result<Vec<Location>> {
        let rows = query(
            &self.inner.reader,
            format!("SELECT {LOCATION_COLUMNS} FROM location ORDER BY id"),
            vec![],
        )
        .await?;
        rows.iter().map(location_from_row).collect()
    }

    /// Every entry row of a location, tombstones included, in id order.
    pub async fn location_entries(&self, location: LocationId) -> Result<Vec<Entry>> {
        self.entries_of(location, false).await
    }

    /// The live entries (no tombstones) of a location, in id order: what an
    /// index walk compares the folder with. Its memory follows the folder,
    /// not the history of deletes.
    pub async fn live_location_entries(&self, location: LocationId) -> Result<Vec<Entry>> {
        self.entries_of(location, true).await
    }

    async fn entries_of(&self, location: LocationId, live_only: bool) -> Result<Vec<Entry>> {
        use futures::TryStreamExt as _;
        // Streamed row by row: collecting the rows first (sea-orm) held
        // ~2 KB per row at once, which set the indexer's peak memory.
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let live = if live_only { " AND deleted = 0" } else { "" };
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM entry WHERE location = ?{live} ORDER BY id");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(location.to_bytes().to_vec())
            .fetch(&mut *conn);
        let mut entries = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(db_err)? {
            entries.push(entry_from_row(&row)?);
        }
        Ok(entries)
    }
}

/// The summary of `owner` inside an open (read) transaction.
///
/// Fetching 1M rows one by one through sqlx costs ~2.7 us per row, so
/// SQLite packs each page of rows into one blob: per row the 16 raw id
/// bytes, the deleted digit, the seq in decimal, then `,` (neither digits,
/// `-` nor the fixed-width prefix can be confused with the separator).
async fn summary_in<C: ConnectionTrait>(c: &C, owner: DeviceId) -> Result<OwnerSummary> {
    let state = owner_state(c, owner).await?;
    let mut fp = Fingerprint::default();
    let (mut entries, mut tombstones) = (0u64, 0u64);
    for table in ["location", "entry"] {
        // `+owner` keeps the planner on the primary key: a sequential scan
        // in id order, paged by id.
        let sql = format!(
            "SELECT count(*), CAST(group_concat(id || deleted || seq || ',', '') AS BLOB), max(id) \
             FROM (SELECT id, seq, deleted FROM {table} WHERE +owner = ? AND id > ? \
             ORDER BY id LIMIT ?)"
        );
        let mut from: Vec<u8> = Vec::new();
        loop {
            let row = query_one(
                c,
                sql.clone(),
                vec![
                    blob(owner.to_bytes()),
                    Value::Bytes(Some(from.clone())),
                    Value::BigInt(Some(SCAN_PAGE)),
                ],
            )
            .await?;
            let Some(row) = row else { break };
            let n: i64 = col(&row, 0)?;
            if n == 0 {
                break;
            }
            let packed: Vec<u8> = col(&row, 1)?;
            let (live, dead) = fold_packed(&packed, n as u64, &mut fp)?;
            if table == "entry" {
                entries += live;
                tombstones += dead;
            }
            from = col(&row, 2)?;
            if n < SCAN_PAGE {
                break;
            }
        }
    }
    Ok(OwnerSummary {
        owner,
        local: state.is_some_and(|s| s.local),
        index_id: state.map_or(IndexId(0), |s| s.watermark.index_id),
        seq: state.map_or(Seq::ZERO, |s| s.watermark.seq),
        entries,
        tombstones,
        fingerprint: fp,
    })
}

/// Adds `n` packed rows (`id[16] deleted-digit seq-decimal ','`) to `fp`;
/// returns (live, deleted) counts.
fn fold_packed(packed: &[u8], n: u64, fp: &mut Fingerprint) -> Result<(u64, u64)> {
    let bad = || crate::StorageError::Corrupt("malformed packed summary rows".into());
    let (mut live, mut dead) = (0u64, 0u64);
    let mut at = 0usize;
    while at < packed.len() {
        let id: [u8; 16] = packed
            .get(at..at + 16)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(bad)?;
        let deleted = match packed.get(at + 16) {
            Some(b'0') => false,
            Some(b'1') => true,
            _ => return Err(bad()),
        };
        at += 17;
        let mut neg = false;
        let mut v: u64 = 0;
        if packed.get(at) == Some(&b'-') {
            neg = true;
            at += 1;
        }
        loop {
            match packed.get(at) {
                Some(b',') => break,
                Some(d @ b'0'..=b'9') => v = v.wrapping_mul(10).wrapping_add(u64::from(d - b'0')),
                _ => return Err(bad()),
            }
            at += 1;
        }
        at += 1;
        // The stored i64 bit pattern of the u64 seq.
        let seq = if neg { v.wrapping_neg() } else { v };
        fp.add(&id, Seq(seq), deleted);
        if deleted {
            dead += 1;
        } else {
            live += 1;
        }
    }
    if live + dead != n {
        return Err(bad());
    }
    Ok((live, dead))
}

/// A cursor over one packed column (see [`ENTRY_PACK`]).
struct Packed<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Packed<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Packed { buf, at: 0 }
    }

    fn bad() -> StorageError {
        StorageError::Corrupt("malformed packed entry rows".into())
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).ok_or_else(Self::bad)?;
        let s = self.buf.get(self.at..end).ok_or_else(Self::bad)?;
        self.at += n;
        Ok(s)
    }

    fn id(&mut self) -> Result<[u8; 16]> {
        self.bytes(16)?.try_into().map_err(|_| Self::bad())
    }

    /// The next decimal i64 of a `,` separated list.
    fn int(&mut self) -> Result<i64> {
        let neg = self.buf.get(self.at) == Some(&b'-');
        if neg {
            self.at += 1;
        }
        let mut v: u64 = 0;
        let mut digits = 0;
        while let Some(&d) = self.buf.get(self.at) {
            self.at += 1;
            match d {
                b',' => break,
                b'0'..=b'9' => {
                    v = v.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                    digits += 1;
                }
                _ => return Err(Self::bad()),
            }
        }
        if digits == 0 {
            return Err(Self::bad());
        }
        // Two's complement: `-9223372036854775808` wraps to i64::MIN.
        Ok(if neg { v.wrapping_neg() } else { v } as i64)
    }

    fn done(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// Appends the entries of one packed page row (see [`ENTRY_PACK`]) to
/// `out`; returns how many.
pub(crate) fn unpack_page(row: &sqlx::sqlite::SqliteRow, out: &mut Vec<Entry>) -> Result<usize> {
    let n: i64 = row.try_get(0).map_err(db_err)?;
    let n = usize::try_from(n).map_err(|_| Packed::bad())?;
    if n == 0 {
        return Ok(0);
    }
    let malformed: i64 = row.try_get(11).map_err(db_err)?;
    if malformed > 0 {
        return Err(StorageError::Corrupt(format!(
            "{malformed} entry rows with ids that are not 16 bytes"
        )));
    }
    let mut cols: [&[u8]; 10] = [&[]; 10];
    for (i, c) in cols.iter_mut().enumerate() {
        *c = row
            .try_get::<Option<&[u8]>, _>(i + 1)
            .map_err(db_err)?
            .unwrap_or_default();
    }
    unpack_entries(&cols, n, out)
}

/// Appends the `n` entries of a packed page (the 10 packed columns of
/// [`ENTRY_PACK`] after the count) to `out`; returns `n`.
fn unpack_entries(cols: &[&[u8]; 10], n: usize, out: &mut Vec<Entry>) -> Result<usize> {
    let [
        ids,
        locs,
        parents,
        shapes,
        sizes,
        inodes,
        created,
        modified,
        seqs,
        names,
    ] = cols.map(Packed::new);
    let (mut ids, mut locs, mut parents, mut shapes) = (ids, locs, parents, shapes);
    let (mut sizes, mut inodes, mut created, mut modified) = (sizes, inodes, created, modified);
    let (mut seqs, mut names) = (seqs, names);
    out.reserve(n.min(PACK_PAGE));
    for _ in 0..n {
        let shape = u64::try_from(shapes.int()?).map_err(|_| Packed::bad())?;
        let code = ((shape >> 3) & 3) as u8;
        let kind = EntryKind::from_code(code)
            .ok_or_else(|| StorageError::Corrupt(format!("unknown entry kind {code}")))?;
        let id = EntryId::from_bytes(ids.id()?);
        let location = LocationId::from_bytes(locs.id()?);
        let parent = if shape & 2 == 0 {
            Some(EntryId::from_bytes(parents.id()?))
        } else {
            None
        };
        let size = i2u(sizes.int()?);
        let inode = if shape & 1 == 0 {
            Some(i2u(inodes.int()?))
        } else {
            None
        };
        let created_at = micros::from_micros(created.int()?);
        let modified_at = micros::from_micros(modified.int()?);
        let seq = Seq(i2u(seqs.int()?));
        let len = usize::try_from(shape >> 5).map_err(|_| Packed::bad())?;
        let name = std::str::from_utf8(names.bytes(len)?)
            .map_err(|_| StorageError::Corrupt("entry name is not UTF-8".into()))?
            .to_owned();
        out.push(Entry {
            id,
            location,
            parent,
            name,
            kind,
            size,
            inode,
            created_at,
            modified_at,
            seq,
            deleted: shape & 4 != 0,
        });
    }
    let all = [
        &ids, &locs, &parents, &shapes, &sizes, &inodes, &created, &modified, &seqs, &names,
    ];
    if !all.iter().all(|c| c.done()) {
        return Err(Packed::bad());
    }
    Ok(n)
}
