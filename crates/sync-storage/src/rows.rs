//! Row helpers: value conversions (ids as 16-byte blobs, u64 as i64
//! bit-casts, timestamps as microseconds) and sea-orm statement shortcuts.
//! The bulk multi-row writes live in `bulk` (sqlx directly).

use sea_orm::{ConnectionTrait, DbBackend, ExecResult, QueryResult, Statement, Value};
use sync_core::model::micros;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Seq};

use crate::error::{Result, StorageError};

/// Ids per `IN (...)` / `VALUES` list in lookups and deletes.
pub(crate) const IDS_PER_STMT: usize = 500;

/// u64 stored as its i64 bit pattern.
pub(crate) fn u2i(v: u64) -> i64 {
    v as i64
}

/// i64 read back as the u64 it encodes.
pub(crate) fn i2u(v: i64) -> u64 {
    v as u64
}

/// A 16-byte id as a blob value.
pub(crate) fn blob(id: [u8; 16]) -> Value {
    Value::Bytes(Some(id.to_vec()))
}

/// 16 bytes from a blob column.
pub(crate) fn id16(v: &[u8]) -> Result<[u8; 16]> {
    v.try_into()
        .map_err(|_| StorageError::Corrupt(format!("id of {} bytes, expected 16", v.len())))
}

/// Executes one statement with values.
pub(crate) async fn exec<C: ConnectionTrait>(
    c: &C,
    sql: impl Into<String>,
    values: Vec<Value>,
) -> Result<ExecResult> {
    Ok(c.execute_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        sql,
        values,
    ))
    .await?)
}

/// Runs one query with values, returning all rows.
pub(crate) async fn query<C: ConnectionTrait>(
    c: &C,
    sql: impl Into<String>,
    values: Vec<Value>,
) -> Result<Vec<QueryResult>> {
    Ok(c.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        sql,
        values,
    ))
    .await?)
}

/// Runs one query with values, returning the first row.
pub(crate) async fn query_one<C: ConnectionTrait>(
    c: &C,
    sql: impl Into<String>,
    values: Vec<Value>,
) -> Result<Option<QueryResult>> {
    Ok(c.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Sqlite,
        sql,
        values,
    ))
    .await?)
}

/// Reads column `i` of a row.
pub(crate) fn col<T: sea_orm::TryGetable>(row: &QueryResult, i: usize) -> Result<T> {
    Ok(row.try_get_by_index::<T>(i)?)
}

/// Columns of an entry row, in the order `entry_from_row` reads them.
pub(crate) const ENTRY_COLUMNS: &str =
    "id, location, parent, name, kind, size, inode, created_at, modified_at, seq, deleted";

/// Columns of a location row, in the order `location_from_row` reads them.
pub(crate) const LOCATION_COLUMNS: &str = "id, owner, path, name, seq, deleted";

/// An entry from a row selected with [`ENTRY_COLUMNS`] (read straight
/// from sqlx: no intermediate copy of the row's values).
pub(crate) fn entry_from_row(row: &sea_orm::sqlx::sqlite::SqliteRow) -> Result<Entry> {
    use sea_orm::sqlx::Row as _;
    let get_err = |e: sea_orm::sqlx::Error| StorageError::Corrupt(format!("entry row: {e}"));
    let kind_code: i64 = row.try_get(4).map_err(get_err)?;
    let kind = u8::try_from(kind_code)
        .ok()
        .and_then(EntryKind::from_code)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown entry kind {kind_code}")))?;
    let id: &[u8] = row.try_get(0).map_err(get_err)?;
    let location: &[u8] = row.try_get(1).map_err(get_err)?;
    let parent: Option<&[u8]> = row.try_get(2).map_err(get_err)?;
    Ok(Entry {
        id: EntryId::from_bytes(id16(id)?),
        location: LocationId::from_bytes(id16(location)?),
        parent: match parent {
            Some(p) => Some(EntryId::from_bytes(id16(p)?)),
            None => None,
        },
        name: row.try_get(3).map_err(get_err)?,
        kind,
        size: i2u(row.try_get(5).map_err(get_err)?),
        inode: row.try_get::<Option<i64>, _>(6).map_err(get_err)?.map(i2u),
        created_at: micros::from_micros(row.try_get(7).map_err(get_err)?),
        modified_at: micros::from_micros(row.try_get(8).map_err(get_err)?),
        seq: Seq(i2u(row.try_get(9).map_err(get_err)?)),
        deleted: row.try_get(10).map_err(get_err)?,
    })
}

/// A location from a row selected with [`LOCATION_COLUMNS`].
pub(crate) fn location_from_row(row: &QueryResult) -> Result<Location> {
    Ok(Location {
        id: LocationId::from_bytes(id16(&col::<Vec<u8>>(row, 0)?)?),
        owner: DeviceId::from_bytes(id16(&col::<Vec<u8>>(row, 1)?)?),
        path: col(row, 2)?,
        name: col(row, 3)?,
        seq: Seq(i2u(col(row, 4)?)),
        deleted: col(row, 5)?,
    })
}
