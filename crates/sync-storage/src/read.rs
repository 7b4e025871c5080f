//! Reads: paging records by seq, counts, summaries with fingerprints, locations.

use sea_orm::{ConnectionTrait, TransactionTrait, Value};
use sync_core::{DeviceId, Entry, Fingerprint, IndexId, Location, LocationId, Record, Seq};
use tracing::Instrument;

use crate::error::Result;
use crate::rows::{
    ENTRY_COLUMNS, LOCATION_COLUMNS, blob, col, entry_from_row, i2u, id16, location_from_row,
    query, query_one, u2i,
};
use crate::types::OwnerSummary;
use crate::{Store, owner_state};

/// Rows per page when scanning an owner for its fingerprint.
const SCAN_PAGE: i64 = 50_000;

impl Store {
    /// Records (entries and locations) of `owner` with seq > `after`, in seq
    /// order, at most `limit`, read in one read transaction.
    pub async fn records_after(
        &self,
        owner: DeviceId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Record>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lim = i64::try_from(limit).unwrap_or(i64::MAX);
        let txn = self.inner.reader.begin().await?;
        let params = || {
            vec![
                blob(owner.to_bytes()),
                Value::BigInt(Some(u2i(after.0))),
                Value::BigInt(Some(lim)),
            ]
        };
        let locs = query(
            &txn,
            format!(
                "SELECT {LOCATION_COLUMNS} FROM location WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?"
            ),
            params(),
        )
        .await?;
        let ents = query(
            &txn,
            format!(
                "SELECT {ENTRY_COLUMNS} FROM entry WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?"
            ),
            params(),
        )
        .await?;
        txn.commit().await?;
        let locs = locs
            .iter()
            .map(location_from_row)
            .collect::<Result<Vec<Location>>>()?;
        let ents = ents
            .iter()
            .map(entry_from_row)
            .collect::<Result<Vec<Entry>>>()?;
        // Merge the two seq-ordered lists.
        let mut out = Vec::with_capacity(limit.min(locs.len() + ents.len()));
        let mut li = locs.into_iter().peekable();
        let mut ei = ents.into_iter().peekable();
        while out.len() < limit {
            let take_loc = match (li.peek(), ei.peek()) {
                (Some(l), Some(e)) => l.seq <= e.seq,
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

    /// Every entry row of a location, tombstones included (the indexer diffs against it).
    pub async fn location_entries(&self, location: LocationId) -> Result<Vec<Entry>> {
        let rows = query(
            &self.inner.reader,
            format!("SELECT {ENTRY_COLUMNS} FROM entry WHERE location = ? ORDER BY id"),
            vec![blob(location.to_bytes())],
        )
        .await?;
        rows.iter().map(entry_from_row).collect()
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
