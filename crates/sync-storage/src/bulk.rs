//! Bulk writes straight through sqlx on the writer connection, bypassing sea-orm.
//!
//! sea-orm's raw statements clone every bound `Value` and sqlx copies it
//! again into its own argument buffer: for a 1000-row entry upsert that was
//! ~20 allocations per row, as much CPU as SQLite's own work. Here the
//! arguments are built once, directly as sqlx arguments (ids as blobs,
//! names as `Arc<str>`, the owner bound once per statement), and the next
//! statement's arguments are built while SQLite runs the current one on
//! sqlx's worker thread. The transactions of `apply_batch` and
//! `commit_local` run entirely here, on one pinned writer connection.

use std::sync::{Arc, OnceLock};

use sea_orm::sqlx::sqlite::{SqliteArguments, SqliteConnection};
use sea_orm::sqlx::{self, Arguments as _, Row as _};
use sync_core::digest::Element;
use sync_core::model::micros;
use sync_core::{DeviceId, Entry, IndexId, Location, LocationId, Seq, Watermark};

use crate::OwnerState;
use crate::digest::{self, DigestDelta};
use crate::error::{Result, StorageError};
use crate::rows::{IDS_PER_STMT, i2u, id16, u2i};

/// Entry rows per multi-row statement: 11 parameters per row (the owner is
/// bound once), well under SQLite's 32766. Full chunks share one cached
/// prepared statement.
pub(crate) const ENTRY_ROWS_PER_STMT: usize = 1000;
/// Location rows per multi-row statement (5 parameters per row).
pub(crate) const LOCATION_ROWS_PER_STMT: usize = 500;

/// A sqlx error as a storage error (the same shape sea-orm gives it).
pub(crate) fn db_err(e: sqlx::Error) -> StorageError {
    StorageError::Db(sea_orm::DbErr::Exec(sea_orm::RuntimeErr::SqlxError(
        e.into(),
    )))
}

/// An argument that failed to encode (never happens for the plain types bound here).
fn encode_err(e: sqlx::error::BoxDynError) -> StorageError {
    StorageError::Db(sea_orm::DbErr::Custom(format!("encode argument: {e}")))
}

/// A 16-byte id as an owned blob argument.
fn id_arg(id: [u8; 16]) -> Vec<u8> {
    id.to_vec()
}

/// Builds `INSERT INTO t (cols) SELECT c1, ?, c2.. FROM (VALUES (?..) x rows)
/// WHERE true ON CONFLICT(id) DO UPDATE SET c = CASE WHEN <wins> THEN
/// excluded.c ELSE c END ...`, where a record wins with a higher seq of
/// the same owner.
///
/// The update always runs, so the digest's triggers see every conflicting
/// row: a loser as an unchanged pair (see `digest.rs`). `select` names the
/// VALUES columns (`columnN`) with the owner `?` in its place. Parameters
/// are anonymous `?`: sqlx asks `sqlite3_bind_parameter_name` for every
/// parameter, and with numbered `?NNN` parameters that lookup is a linear
/// scan, making a 12K-parameter statement quadratic. (`WHERE true` resolves
/// the parsing ambiguity of an upsert on `INSERT ... SELECT`.)
fn upsert_sql(
    table: &str,
    columns: &str,
    select: &str,
    per_row: usize,
    rows: usize,
    set: &[&str],
) -> String {
    let mut row = String::with_capacity(per_row * 2 + 2);
    row.push('(');
    for k in 0..per_row {
        if k > 0 {
            row.push(',');
        }
        row.push('?');
    }
    row.push(')');
    let mut sql = String::with_capacity(1200 + rows * (row.len() + 1));
    sql.push_str("INSERT INTO ");
    sql.push_str(table);
    sql.push_str(" (");
    sql.push_str(columns);
    sql.push_str(") SELECT ");
    sql.push_str(select);
    sql.push_str(" FROM (VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&row);
    }
    sql.push_str(") WHERE true ON CONFLICT(id) DO UPDATE SET ");
    let wins = format!("excluded.seq > {table}.seq AND excluded.owner = {table}.owner");
    for (i, c) in set.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "{c} = CASE WHEN {wins} THEN excluded.{c} ELSE {table}.{c} END"
        ));
    }
    sql
}

/// Entry upsert of `rows` rows.
fn entry_upsert_sql(rows: usize) -> String {
    upsert_sql(
        "entry",
        "id, owner, location, parent, name, kind, size, inode, created_at, modified_at, seq, deleted",
        "column1, ?, column2, column3, column4, column5, column6, column7, column8, column9, \
         column10, column11",
        11,
        rows,
        &[
            "location",
            "parent",
            "name",
            "kind",
            "size",
            "inode",
            "created_at",
            "modified_at",
            "deleted",
            "seq",
        ],
    )
}

/// Location upsert of `rows` rows.
fn location_upsert_sql(rows: usize) -> String {
    upsert_sql(
        "location",
        "id, owner, path, name, seq, deleted",
        "column1, ?, column2, column3, column4, column5",
        5,
        rows,
        &["path", "name", "deleted", "seq"],
    )
}

/// The SQL of a `rows`-row statement: the full-size one is built once
/// (and, being the same text, prepared once by sqlx's statement cache).
fn sized_sql(
    full: &'static OnceLock<String>,
    full_rows: usize,
    rows: usize,
    build: fn(usize) -> String,
) -> sqlx::SqlStr {
    use sqlx::SqlSafeStr as _;
    if rows == full_rows {
        full.get_or_init(|| build(full_rows))
            .as_str()
            .into_sql_str()
    } else {
        sqlx::AssertSqlSafe(build(rows)).into_sql_str()
    }
}

/// The SQL and arguments of one entry upsert statement.
fn entry_statement(owner: &[u8; 16], chunk: &[&Entry]) -> Result<(sqlx::SqlStr, SqliteArguments)> {
    static FULL: OnceLock<String> = OnceLock::new();
    let sql = sized_sql(&FULL, ENTRY_ROWS_PER_STMT, chunk.len(), entry_upsert_sql);
    let mut a = SqliteArguments::default();
    a.reserve(1 + chunk.len() * 11, 0);
    a.add(id_arg(*owner)).map_err(encode_err)?;
    for e in chunk {
        a.add(id_arg(e.id.to_bytes())).map_err(encode_err)?;
        a.add(id_arg(e.location.to_bytes())).map_err(encode_err)?;
        a.add(e.parent.map(|p| id_arg(p.to_bytes())))
            .map_err(encode_err)?;
        a.add(Arc::<str>::from(e.name.as_str()))
            .map_err(encode_err)?;
        a.add(i64::from(e.kind.code())).map_err(encode_err)?;
        a.add(u2i(e.size)).map_err(encode_err)?;
        a.add(e.inode.map(u2i)).map_err(encode_err)?;
        a.add(micros::to_micros(&e.created_at))
            .map_err(encode_err)?;
        a.add(micros::to_micros(&e.modified_at))
            .map_err(encode_err)?;
        a.add(u2i(e.seq.0)).map_err(encode_err)?;
        a.add(e.deleted).map_err(encode_err)?;
    }
    Ok((sql, a))
}

/// Upserts entries of `owner` ("higher seq wins", never across owners) with
/// fixed-size multi-row statements: chunks of [`ENTRY_ROWS_PER_STMT`] rows
/// and one remainder statement. Callers sort by id for b-tree locality. The
/// next statement's arguments are built while SQLite runs the current one
/// (on sqlx's worker thread).
pub(crate) async fn upsert_entries(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    entries: &[&Entry],
    delta: &mut DigestDelta,
) -> Result<()> {
    let owner = owner.to_bytes();
    let mut chunks = entries.chunks(ENTRY_ROWS_PER_STMT);
    let mut current = chunks.next();
    let mut next = current.map(|ch| entry_statement(&owner, ch)).transpose()?;
    while let Some((sql, args)) = next.take() {
        let hashed = current.take();
        let following = chunks.next();
        // While SQLite runs this statement (on sqlx's worker thread): its
        // records join the digest, and the next statement is built.
        let (done, built) = tokio::join!(sqlx::query_with(sql, args).execute(&mut *conn), async {
            for e in hashed.into_iter().flatten() {
                delta.add(&Element::of_entry(e), e.seq);
            }
            following.map(|ch| entry_statement(&owner, ch)).transpose()
        });
        done.map_err(db_err)?;
        next = built?;
        current = following;
    }
    Ok(())
}

/// Upserts locations of `owner` ("higher seq wins", never across owners).
pub(crate) async fn upsert_locations(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    locations: &[&Location],
    delta: &mut DigestDelta,
) -> Result<()> {
    static FULL: OnceLock<String> = OnceLock::new();
    for l in locations {
        delta.add(&Element::of_location(l), l.seq);
    }
    for chunk in locations.chunks(LOCATION_ROWS_PER_STMT) {
        let sql = sized_sql(
            &FULL,
            LOCATION_ROWS_PER_STMT,
            chunk.len(),
            location_upsert_sql,
        );
        let mut a = SqliteArguments::default();
        a.reserve(1 + chunk.len() * 5, 0);
        a.add(id_arg(owner.to_bytes())).map_err(encode_err)?;
        for l in chunk {
            a.add(id_arg(l.id.to_bytes())).map_err(encode_err)?;
            a.add(Arc::<str>::from(l.path.as_str()))
                .map_err(encode_err)?;
            a.add(Arc::<str>::from(l.name.as_str()))
                .map_err(encode_err)?;
            a.add(u2i(l.seq.0)).map_err(encode_err)?;
            a.add(l.deleted).map_err(encode_err)?;
        }
        sqlx::query_with(sql, a)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// Tombstones rows of `table` owned by `owner` in place: `(id, seq)` pairs.
pub(crate) async fn tombstone(
    conn: &mut SqliteConnection,
    table: &str,
    owner: DeviceId,
    rows: &[([u8; 16], Seq)],
) -> Result<()> {
    for chunk in rows.chunks(IDS_PER_STMT) {
        let mut sql = format!("UPDATE {table} SET deleted = 1, seq = d.column2 FROM (VALUES ");
        let mut a = SqliteArguments::default();
        a.reserve(1 + chunk.len() * 2, 0);
        for (i, (id, seq)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?, ?)");
            a.add(id_arg(*id)).map_err(encode_err)?;
            a.add(u2i(seq.0)).map_err(encode_err)?;
        }
        sql.push_str(&format!(
            ") AS d WHERE {table}.id = d.column1 AND {table}.owner = ?"
        ));
        a.add(id_arg(owner.to_bytes())).map_err(encode_err)?;
        sqlx::query_with(sqlx::AssertSqlSafe(sql), a)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// Owners of the given location ids that are stored (missing ids are absent from the result).
pub(crate) async fn location_owners(
    conn: &mut SqliteConnection,
    ids: &[LocationId],
) -> Result<Vec<(LocationId, DeviceId)>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(IDS_PER_STMT) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let mut a = SqliteArguments::default();
        for id in chunk {
            a.add(id_arg(id.to_bytes())).map_err(encode_err)?;
        }
        let rows = sqlx::query_with(
            sqlx::AssertSqlSafe(format!(
                "SELECT id, owner FROM location WHERE id IN ({placeholders})"
            )),
            a,
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for row in rows {
            let id: Vec<u8> = row.try_get(0).map_err(db_err)?;
            let owner: Vec<u8> = row.try_get(1).map_err(db_err)?;
            out.push((
                LocationId::from_bytes(id16(&id)?),
                DeviceId::from_bytes(id16(&owner)?),
            ));
        }
    }
    Ok(out)
}

/// Ids of the live entries of `owner` in `location`, in id order.
pub(crate) async fn live_entries_of(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    location: LocationId,
) -> Result<Vec<[u8; 16]>> {
    let rows = sqlx::query(
        "SELECT id FROM entry WHERE location = ? AND owner = ? AND deleted = 0 ORDER BY id",
    )
    .bind(id_arg(location.to_bytes()))
    .bind(id_arg(owner.to_bytes()))
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    rows.iter()
        .map(|r| {
            let id: Vec<u8> = r.try_get(0).map_err(db_err)?;
            id16(&id)
        })
        .collect()
}

/// The first of `ids` that holds an entry of an owner other than `owner`
/// (an entry that arrived before its location, from someone else).
pub(crate) async fn foreign_entry_location(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    ids: &[LocationId],
) -> Result<Option<LocationId>> {
    for id in ids {
        let found = sqlx::query("SELECT 1 FROM entry WHERE location = ? AND owner != ? LIMIT 1")
            .bind(id_arg(id.to_bytes()))
            .bind(id_arg(owner.to_bytes()))
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)?;
        if found.is_some() {
            return Ok(Some(*id));
        }
    }
    Ok(None)
}

/// The `owner_state` row of `owner`, if any.
pub(crate) async fn owner_state(
    conn: &mut SqliteConnection,
    owner: DeviceId,
) -> Result<Option<OwnerState>> {
    let row = sqlx::query("SELECT local, index_id, seq FROM owner_state WHERE owner = ?")
        .bind(id_arg(owner.to_bytes()))
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?;
    match row {
        None => Ok(None),
        Some(row) => Ok(Some(OwnerState {
            local: row.try_get(0).map_err(db_err)?,
            watermark: Watermark::new(
                IndexId(i2u(row.try_get(1).map_err(db_err)?)),
                Seq(i2u(row.try_get(2).map_err(db_err)?)),
            ),
        })),
    }
}

/// Sets the watermark of a remote owner (never touches the local owner's row).
pub(crate) async fn set_watermark(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    w: Watermark,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO owner_state (owner, local, index_id, seq) VALUES (?, 0, ?, ?) \
         ON CONFLICT(owner) DO UPDATE SET index_id = excluded.index_id, seq = excluded.seq \
         WHERE owner_state.local = 0",
    )
    .bind(id_arg(owner.to_bytes()))
    .bind(u2i(w.index_id.0))
    .bind(u2i(w.seq.0))
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    Ok(())
}

/// Sets the local owner's max seq.
pub(crate) async fn set_local_seq(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    seq: Seq,
) -> Result<()> {
    sqlx::query("UPDATE owner_state SET seq = ? WHERE owner = ? AND local = 1")
        .bind(u2i(seq.0))
        .bind(id_arg(owner.to_bytes()))
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Sets the local owner's IndexId (its seq and rows stay).
pub(crate) async fn set_local_index(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    index_id: IndexId,
) -> Result<()> {
    sqlx::query("UPDATE owner_state SET index_id = ? WHERE owner = ? AND local = 1")
        .bind(u2i(index_id.0))
        .bind(id_arg(owner.to_bytes()))
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Deletes every entry and location of `owner`, and its digest.
pub(crate) async fn drop_owner_rows(conn: &mut SqliteConnection, owner: DeviceId) -> Result<()> {
    digest::clear_owner(conn, owner).await?;
    for sql in [
        "DELETE FROM entry WHERE owner = ?",
        "DELETE FROM location WHERE owner = ?",
    ] {
        sqlx::query(sql)
            .bind(id_arg(owner.to_bytes()))
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(())
}
