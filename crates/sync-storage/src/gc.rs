//! Tombstone collection: what it needs to know (how old a local seq is,
//! what each peer acknowledged of this device's records) and the pruning
//! itself, which keeps the owner's digest exact.
//!
//! An owner collects its tombstones up to a point P (older than the
//! horizon and acknowledged by every peer known to hold its records) and
//! says P in its `Digests`; a replica then drops the same tombstones of
//! that owner, so the two digests stay equal. Only tombstones are ever
//! dropped this way, never a live record. A replica that was behind P
//! never hears of the deletes P covers: its copy differs from the
//! owner's, and the owner repairs it by reconciliation.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, Connection as _, Row as _};
use sync_core::digest::Element;
use sync_core::{DeviceId, IndexId, Record, Seq, Watermark};
use tracing::Instrument;

use crate::Store;
use crate::bulk::db_err;
use crate::digest::{self, DigestDelta};
use crate::error::Result;
use crate::rows::{ENTRY_COLUMNS, entry_from_row, i2u, id16, u2i};

/// Tombstones dropped per transaction.
const PRUNE_PER_TX: i64 = 10_000;

/// The minute of a time, as `seq_time` keys it.
fn minute(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

/// Notes, inside a local commit's transaction, that the local counter
/// reached `seq` in this minute.
pub(crate) async fn note_local_seq(conn: &mut sqlx::SqliteConnection, seq: Seq) -> Result<()> {
    sqlx::query(
        "INSERT INTO seq_time (minute, seq) VALUES (?, ?) \
         ON CONFLICT(minute) DO UPDATE SET seq = max(seq, excluded.seq)",
    )
    .bind(minute(Utc::now()))
    .bind(u2i(seq.0))
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

impl Store {
    /// The highest local seq committed in a minute that ended before
    /// `before`: every seq at or below it is older than `before`.
    pub async fn local_seq_before(&self, before: DateTime<Utc>) -> Result<Seq> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let v: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM seq_time WHERE minute < ?")
            .bind(minute(before))
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)?;
        Ok(Seq(v.map_or(0, i2u)))
    }

    /// Records what `peer` acknowledged of this device's records (kept
    /// across sessions: tombstone collection waits for it).
    pub async fn save_peer_holds(&self, peer: DeviceId, held: Watermark) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO peer_holds (peer, index_id, seq, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT(peer) DO UPDATE SET index_id = excluded.index_id, seq = excluded.seq, \
             updated_at = excluded.updated_at",
        )
        .bind(peer.to_bytes().to_vec())
        .bind(u2i(held.index_id.0))
        .bind(u2i(held.seq.0))
        .bind(Utc::now().timestamp())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// What each peer last acknowledged of this device's records.
    pub async fn peer_holds(&self) -> Result<HashMap<DeviceId, Watermark>> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let rows = sqlx::query("SELECT peer, index_id, seq FROM peer_holds")
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
        let mut out = HashMap::new();
        for row in &rows {
            let peer: Vec<u8> = row.try_get(0).map_err(db_err)?;
            let index: i64 = row.try_get(1).map_err(db_err)?;
            let seq: i64 = row.try_get(2).map_err(db_err)?;
            out.insert(
                DeviceId::from_bytes(id16(&peer)?),
                Watermark::new(IndexId(i2u(index)), Seq(i2u(seq))),
            );
        }
        Ok(out)
    }

    /// Drops `owner`'s tombstones (entries and locations) with seq at or
    /// below `upto`, taking them out of its digest, in transactions of
    /// 10K, and raises its collection point to `upto`. Live records are
    /// never touched. Returns how many were dropped.
    pub async fn prune_tombstones(&self, owner: DeviceId, upto: Seq) -> Result<u64> {
        let span =
            tracing::info_span!("prune_tombstones", owner = %owner.fmt_short(), upto = upto.0);
        async move {
            let mut dropped = 0u64;
            loop {
                let _guard = self.inner.write_lock.lock().await;
                let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
                let mut txn = conn.begin().await.map_err(db_err)?;
                let gone = tombstones_upto(&mut txn, owner, upto).await?;
                let mut delta = DigestDelta::default();
                for r in &gone {
                    delta.sub(&Element::of(r), r.seq());
                }
                delete_upto(&mut txn, owner, &gone).await?;
                digest::save(&mut txn, HashMap::from([(owner, delta)])).await?;
                let last = (gone.len() as i64) < PRUNE_PER_TX;
                if last {
                    digest::set_pruned(&mut txn, owner, upto).await?;
                }
                txn.commit().await.map_err(db_err)?;
                dropped += gone.len() as u64;
                if last {
                    break;
                }
            }
            if dropped > 0 {
                tracing::info!(dropped, "tombstones collected");
            }
            Ok(dropped)
        }
        .instrument(span)
        .await
        .map_err(|e: crate::StorageError| e.disk_full_at(self.path()))
    }
}

/// Up to [`PRUNE_PER_TX`] tombstones of `owner` with seq <= `upto`.
async fn tombstones_upto(
    conn: &mut sqlx::SqliteConnection,
    owner: DeviceId,
    upto: Seq,
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM entry WHERE owner = ? AND seq <= ? AND deleted = 1 \
         ORDER BY seq LIMIT ?"
    )))
    .bind(owner.to_bytes().to_vec())
    .bind(u2i(upto.0))
    .bind(PRUNE_PER_TX)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    for row in &rows {
        out.push(Record::Entry(entry_from_row(row)?));
    }
    let left = PRUNE_PER_TX - out.len() as i64;
    let rows = sqlx::query(
        "SELECT id, owner, path, name, seq, deleted FROM location \
         WHERE owner = ? AND seq <= ? AND deleted = 1 ORDER BY seq LIMIT ?",
    )
    .bind(owner.to_bytes().to_vec())
    .bind(u2i(upto.0))
    .bind(left)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    for row in &rows {
        let id: Vec<u8> = row.try_get(0).map_err(db_err)?;
        let o: Vec<u8> = row.try_get(1).map_err(db_err)?;
        out.push(Record::Location(sync_core::Location {
            id: sync_core::LocationId::from_bytes(id16(&id)?),
            owner: DeviceId::from_bytes(id16(&o)?),
            path: row.try_get(2).map_err(db_err)?,
            name: row.try_get(3).map_err(db_err)?,
            seq: Seq(i2u(row.try_get(4).map_err(db_err)?)),
            deleted: row.try_get(5).map_err(db_err)?,
        }));
    }
    Ok(out)
}

/// Deletes the given tombstones by id (still tombstones of `owner`).
async fn delete_upto(
    conn: &mut sqlx::SqliteConnection,
    owner: DeviceId,
    gone: &[Record],
) -> Result<()> {
    for r in gone {
        let table = match r {
            Record::Entry(_) => "entry",
            Record::Location(_) => "location",
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE id = ? AND owner = ? AND deleted = 1"
        )))
        .bind(r.id_bytes().to_vec())
        .bind(owner.to_bytes().to_vec())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    }
    Ok(())
}
