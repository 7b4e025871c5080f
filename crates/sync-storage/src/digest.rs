//! Per-owner content digests kept beside the rows: the LtHash of every
//! owner's records (`owner_digest`) and its range fingerprints per bucket
//! of 1,024 seqs (`recon_bucket`), changed in the same transaction as the
//! rows they cover.
//!
//! How a write learns what it replaced without reading rows first: the
//! writer connection (and only it) carries TEMP triggers that copy the old
//! and new version of every updated `entry` and `location` row into TEMP
//! tables. Inserts need no trigger: a multi-row upsert's rows that the
//! triggers did not see were inserted. The upsert's DO UPDATE always runs
//! (a losing record rewrites the row with its own values), so a lost
//! record shows up too, as an unchanged pair. The temp objects live on the
//! engine's connection, never in the library file: another program opening
//! the file (the `sqlite3` shell) sees none of them, and what it changes
//! behind the engine's back is found by [`Store::audit_digests`].

use std::collections::{BTreeMap, HashMap};

use sea_orm::sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sea_orm::sqlx::{self, Arguments as _, Row as _};
use sync_core::digest::{Element, LtHash, OwnerDigest, RangeFp, bucket_of};
use sync_core::model::micros;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Record, Seq};

use crate::bulk::db_err;
use crate::error::{Result, StorageError};
use crate::rows::{i2u, id16, u2i};

/// The writer connection's TEMP tables and triggers (see the module doc).
pub(crate) const TEMP_SCHEMA: &[&str] = &[
    "CREATE TEMP TABLE IF NOT EXISTS changed_entry (
        id, owner,
        o_location, o_parent, o_name, o_kind, o_size, o_inode, o_created, o_modified, o_seq, o_deleted,
        n_location, n_parent, n_name, n_kind, n_size, n_inode, n_created, n_modified, n_seq, n_deleted)",
    "CREATE TEMP TRIGGER IF NOT EXISTS entry_changed AFTER UPDATE ON main.entry BEGIN
        INSERT INTO changed_entry VALUES (OLD.id, OLD.owner,
            OLD.location, OLD.parent, OLD.name, OLD.kind, OLD.size, OLD.inode,
            OLD.created_at, OLD.modified_at, OLD.seq, OLD.deleted,
            NEW.location, NEW.parent, NEW.name, NEW.kind, NEW.size, NEW.inode,
            NEW.created_at, NEW.modified_at, NEW.seq, NEW.deleted);
    END",
    "CREATE TEMP TABLE IF NOT EXISTS changed_location (
        id, owner, o_path, o_name, o_seq, o_deleted, n_path, n_name, n_seq, n_deleted)",
    "CREATE TEMP TRIGGER IF NOT EXISTS location_changed AFTER UPDATE ON main.location BEGIN
        INSERT INTO changed_location VALUES (OLD.id, OLD.owner,
            OLD.path, OLD.name, OLD.seq, OLD.deleted, NEW.path, NEW.name, NEW.seq, NEW.deleted);
    END",
];

/// Creates the temp objects on a writer connection, once the library's
/// tables exist (a new file gets them after its migrations).
pub(crate) async fn install_temp_schema(conn: &mut SqliteConnection) -> sqlx::Result<()> {
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('entry', 'location')",
    )
    .fetch_one(&mut *conn)
    .await?;
    if tables == 2 {
        for sql in TEMP_SCHEMA {
            sqlx::query(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// What one transaction changes in one owner's digest.
#[derive(Default)]
pub(crate) struct DigestDelta {
    lthash: LtHash,
    records: i64,
    /// Per bucket, wrapping: a count may pass through zero mid-transaction.
    buckets: HashMap<u64, RangeFp>,
}

impl DigestDelta {
    /// A record version now held.
    pub(crate) fn add(&mut self, el: &Element, seq: Seq) {
        self.lthash.add(el);
        self.records += 1;
        self.buckets.entry(bucket_of(seq)).or_default().add(el.fp());
    }

    /// A record version no longer held.
    pub(crate) fn sub(&mut self, el: &Element, seq: Seq) {
        self.lthash.sub(el);
        self.records -= 1;
        self.buckets.entry(bucket_of(seq)).or_default().sub(el.fp());
    }

    /// A delta that sets a cleared owner to a digest computed elsewhere.
    pub(crate) fn set(&mut self, lthash: LtHash, records: i64, buckets: BTreeMap<u64, RangeFp>) {
        self.lthash = lthash;
        self.records = records;
        self.buckets = buckets.into_iter().collect();
    }
}

/// One updated row as the triggers saw it: its old and new version.
pub(crate) struct Changed {
    pub(crate) owner: DeviceId,
    pub(crate) old: Record,
    pub(crate) new: Record,
}

/// Takes (and clears) the row versions the triggers captured since the last call.
pub(crate) async fn take_changed(conn: &mut SqliteConnection) -> Result<Vec<Changed>> {
    let mut out = Vec::new();
    let rows = sqlx::query("SELECT * FROM temp.changed_entry")
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    for row in &rows {
        let id = EntryId::from_bytes(id16(&get::<Vec<u8>>(row, 0)?)?);
        let owner = DeviceId::from_bytes(id16(&get::<Vec<u8>>(row, 1)?)?);
        out.push(Changed {
            owner,
            old: Record::Entry(entry_at(row, id, 2)?),
            new: Record::Entry(entry_at(row, id, 12)?),
        });
    }
    let rows = sqlx::query("SELECT * FROM temp.changed_location")
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
    for row in &rows {
        let id = LocationId::from_bytes(id16(&get::<Vec<u8>>(row, 0)?)?);
        let owner = DeviceId::from_bytes(id16(&get::<Vec<u8>>(row, 1)?)?);
        let at = |k: usize| -> Result<Location> {
            Ok(Location {
                id,
                owner,
                path: get(row, k)?,
                name: get(row, k + 1)?,
                seq: Seq(i2u(get(row, k + 2)?)),
                deleted: get(row, k + 3)?,
            })
        };
        out.push(Changed {
            owner,
            old: Record::Location(at(2)?),
            new: Record::Location(at(6)?),
        });
    }
    if !out.is_empty() {
        sqlx::query("DELETE FROM temp.changed_entry")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        sqlx::query("DELETE FROM temp.changed_location")
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(out)
}

/// A column of a captured row.
fn get<'r, T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>>(
    row: &'r SqliteRow,
    i: usize,
) -> Result<T> {
    row.try_get(i)
        .map_err(|e| StorageError::Corrupt(format!("captured row: {e}")))
}

/// The entry version stored from column `k` of a captured row.
fn entry_at(row: &SqliteRow, id: EntryId, k: usize) -> Result<Entry> {
    let kind_code: i64 = get(row, k + 3)?;
    let kind = u8::try_from(kind_code)
        .ok()
        .and_then(EntryKind::from_code)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown entry kind {kind_code}")))?;
    let parent: Option<Vec<u8>> = get(row, k + 1)?;
    Ok(Entry {
        id,
        location: LocationId::from_bytes(id16(&get::<Vec<u8>>(row, k)?)?),
        parent: parent
            .map(|p| id16(&p).map(EntryId::from_bytes))
            .transpose()?,
        name: get(row, k + 2)?,
        kind,
        size: i2u(get(row, k + 4)?),
        inode: get::<Option<i64>>(row, k + 5)?.map(i2u),
        created_at: micros::from_micros(get(row, k + 6)?),
        modified_at: micros::from_micros(get(row, k + 7)?),
        seq: Seq(i2u(get(row, k + 8)?)),
        deleted: get(row, k + 9)?,
    })
}

/// Corrects a delta that already added every upserted record: for a row
/// the upsert updated, the old version goes (a winner) or the incoming
/// one was never stored (a loser: the pair is unchanged).
pub(crate) fn correct_upserts(
    owner: DeviceId,
    delta: &mut HashMap<DeviceId, DigestDelta>,
    changed: Vec<Changed>,
    incoming: impl Fn(&Record) -> Option<Record>,
) -> Result<()> {
    for c in changed {
        // An id already stored under another owner: the upsert left that
        // row alone, and the whole write is refused (its digest would
        // count a record that is not stored).
        if c.owner != owner {
            return Err(StorageError::ForeignOwner {
                owner,
                detail: format!(
                    "record {} is stored under another owner",
                    hex::encode(&c.old.id_bytes()[12..])
                ),
            });
        }
        let d = delta.entry(c.owner).or_default();
        if c.old.seq() == c.new.seq() {
            // Lost: the stored row kept its version; the incoming record
            // (added in full beforehand) is not held.
            let lost = incoming(&c.old).ok_or_else(|| {
                StorageError::Corrupt("an updated row matches no upserted record".into())
            })?;
            d.sub(&Element::of(&lost), lost.seq());
        } else {
            d.sub(&Element::of(&c.old), c.old.seq());
        }
    }
    Ok(())
}

/// Applies in-place updates (tombstones): each old version goes, each new one comes.
pub(crate) fn apply_updates(delta: &mut HashMap<DeviceId, DigestDelta>, changed: Vec<Changed>) {
    for c in changed {
        let d = delta.entry(c.owner).or_default();
        d.sub(&Element::of(&c.old), c.old.seq());
        d.add(&Element::of(&c.new), c.new.seq());
    }
}

/// Writes a transaction's deltas into `owner_digest` and `recon_bucket`.
pub(crate) async fn save(
    conn: &mut SqliteConnection,
    deltas: HashMap<DeviceId, DigestDelta>,
) -> Result<()> {
    for (owner, d) in deltas {
        save_one(conn, owner, d).await?;
    }
    Ok(())
}

/// One owner's part of [`save`].
async fn save_one(conn: &mut SqliteConnection, owner: DeviceId, d: DigestDelta) -> Result<()> {
    let (mut lthash, records) = stored(conn, owner).await?;
    lthash.merge(&d.lthash);
    let records = records + d.records;
    if records < 0 {
        return Err(StorageError::Corrupt(format!(
            "digest of {} counts {records} records",
            owner.fmt_short()
        )));
    }
    write_digest(conn, owner, &lthash, records).await?;
    let touched: BTreeMap<u64, RangeFp> = d
        .buckets
        .into_iter()
        .filter(|(_, fp)| *fp != RangeFp::default())
        .collect();
    update_buckets(conn, owner, touched).await
}

/// The stored digest and record count of an owner (empty if none yet).
pub(crate) async fn stored(conn: &mut SqliteConnection, owner: DeviceId) -> Result<(LtHash, i64)> {
    let row = sqlx::query("SELECT lthash, records FROM owner_digest WHERE owner = ?")
        .bind(owner.to_bytes().to_vec())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    match row {
        None => Ok((LtHash::new(), 0)),
        Some(row) => {
            let bytes: Vec<u8> = get(&row, 0)?;
            let lthash = LtHash::from_bytes(&bytes).ok_or_else(|| {
                StorageError::Corrupt(format!("digest of {} is not 2048 bytes", owner.fmt_short()))
            })?;
            Ok((lthash, get(&row, 1)?))
        }
    }
}

/// Writes an owner's digest row.
pub(crate) async fn write_digest(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    lthash: &LtHash,
    records: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO owner_digest (owner, lthash, records) VALUES (?, ?, ?) \
         ON CONFLICT(owner) DO UPDATE SET lthash = excluded.lthash, records = excluded.records",
    )
    .bind(owner.to_bytes().to_vec())
    .bind(lthash.to_bytes())
    .bind(records)
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Adds deltas to bucket rows (read, add, write; a bucket left empty is deleted).
async fn update_buckets(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    touched: BTreeMap<u64, RangeFp>,
) -> Result<()> {
    let keys: Vec<u64> = touched.keys().copied().collect();
    for chunk in keys.chunks(500) {
        let mut current: HashMap<u64, RangeFp> = HashMap::new();
        let placeholders = vec!["?"; chunk.len()].join(",");
        let mut a = SqliteArguments::default();
        a.add(owner.to_bytes().to_vec()).map_err(encode)?;
        for b in chunk {
            a.add(u2i(*b)).map_err(encode)?;
        }
        let rows = sqlx::query_with(
            sqlx::AssertSqlSafe(format!(
                "SELECT bucket, records, fp FROM recon_bucket WHERE owner = ? AND bucket IN ({placeholders})"
            )),
            a,
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for row in &rows {
            current.insert(i2u(get(row, 0)?), bucket_fp(row, 1)?);
        }
        for b in chunk {
            let mut fp = current.remove(b).unwrap_or_default();
            fp.merge(touched[b]);
            write_bucket(conn, owner, *b, fp).await?;
        }
    }
    Ok(())
}

/// A bucket's fingerprint from columns `k` (records) and `k + 1` (fp).
pub(crate) fn bucket_fp(row: &SqliteRow, k: usize) -> Result<RangeFp> {
    let count: i64 = get(row, k)?;
    let fp: Vec<u8> = get(row, k + 1)?;
    let sum: [u8; 16] = fp
        .as_slice()
        .try_into()
        .map_err(|_| StorageError::Corrupt("bucket fingerprint is not 16 bytes".into()))?;
    Ok(RangeFp {
        count: i2u(count),
        sum: u128::from_le_bytes(sum),
    })
}

/// Writes (or, when empty, deletes) one bucket row.
async fn write_bucket(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    bucket: u64,
    fp: RangeFp,
) -> Result<()> {
    let q = if fp.count == 0 && fp.sum == 0 {
        sqlx::query("DELETE FROM recon_bucket WHERE owner = ? AND bucket = ?")
            .bind(owner.to_bytes().to_vec())
            .bind(u2i(bucket))
    } else {
        sqlx::query(
            "INSERT INTO recon_bucket (owner, bucket, records, fp) VALUES (?, ?, ?, ?) \
             ON CONFLICT(owner, bucket) DO UPDATE SET records = excluded.records, fp = excluded.fp",
        )
        .bind(owner.to_bytes().to_vec())
        .bind(u2i(bucket))
        .bind(u2i(fp.count))
        .bind(fp.sum.to_le_bytes().to_vec())
    };
    q.execute(&mut *conn).await.map_err(db_err)?;
    Ok(())
}

/// An argument that failed to encode.
fn encode(e: sqlx::error::BoxDynError) -> StorageError {
    StorageError::Db(sea_orm::DbErr::Custom(format!("encode argument: {e}")))
}

/// Forgets an owner's digest and buckets (its rows were dropped).
pub(crate) async fn clear_owner(conn: &mut SqliteConnection, owner: DeviceId) -> Result<()> {
    sqlx::query("DELETE FROM recon_bucket WHERE owner = ?")
        .bind(owner.to_bytes().to_vec())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    write_digest(conn, owner, &LtHash::new(), 0).await?;
    sqlx::query("UPDATE owner_digest SET pruned = 0 WHERE owner = ?")
        .bind(owner.to_bytes().to_vec())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// The digest summary of an owner as stored, with its watermark, in the
/// caller's transaction (`None` if the owner is not held).
pub(crate) async fn owner_digest(
    conn: &mut SqliteConnection,
    owner: DeviceId,
) -> Result<Option<OwnerDigest>> {
    let Some(state) = crate::bulk::owner_state(conn, owner).await? else {
        return Ok(None);
    };
    let (lthash, records) = stored(conn, owner).await?;
    Ok(Some(OwnerDigest {
        owner,
        watermark: state.watermark,
        records: i2u(records),
        digest: lthash.id(),
        pruned: pruned(conn, owner).await?,
    }))
}

/// The tombstone collection point of an owner's copy (0 if none).
pub(crate) async fn pruned(conn: &mut SqliteConnection, owner: DeviceId) -> Result<Seq> {
    let v: Option<i64> = sqlx::query_scalar("SELECT pruned FROM owner_digest WHERE owner = ?")
        .bind(owner.to_bytes().to_vec())
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(Seq(v.map_or(0, i2u)))
}

/// Raises an owner's collection point (never lowers it).
pub(crate) async fn set_pruned(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    upto: Seq,
) -> Result<()> {
    sqlx::query("UPDATE owner_digest SET pruned = max(pruned, ?) WHERE owner = ?")
        .bind(u2i(upto.0))
        .bind(owner.to_bytes().to_vec())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}
