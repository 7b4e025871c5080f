//! Row helpers: value conversions (ids as 16-byte blobs, u64 as i64
//! bit-casts, timestamps as microseconds) and fixed-shape multi-row statements.

use std::sync::OnceLock;

use sea_orm::{ConnectionTrait, DbBackend, ExecResult, QueryResult, Statement, Value};
use sync_core::model::micros;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Seq};

use crate::error::{Result, StorageError};

/// Entry rows per multi-row statement: 12 * 1000 bound parameters,
/// well under SQLite's 32766. Full chunks share one cached prepared statement.
pub(crate) const ENTRY_ROWS_PER_STMT: usize = 1000;
/// Location rows per multi-row statement.
pub(crate) const LOCATION_ROWS_PER_STMT: usize = 500;
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

/// An entry from a row selected with [`ENTRY_COLUMNS`].
pub(crate) fn entry_from_row(row: &QueryResult) -> Result<Entry> {
    let kind_code: i64 = col(row, 4)?;
    let kind = u8::try_from(kind_code)
        .ok()
        .and_then(EntryKind::from_code)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown entry kind {kind_code}")))?;
    let parent: Option<Vec<u8>> = col(row, 2)?;
    Ok(Entry {
        id: EntryId::from_bytes(id16(&col::<Vec<u8>>(row, 0)?)?),
        location: LocationId::from_bytes(id16(&col::<Vec<u8>>(row, 1)?)?),
        parent: match parent {
            Some(p) => Some(EntryId::from_bytes(id16(&p)?)),
            None => None,
        },
        name: col(row, 3)?,
        kind,
        size: i2u(col(row, 5)?),
        inode: col::<Option<i64>>(row, 6)?.map(i2u),
        created_at: micros::from_micros(col(row, 7)?),
        modified_at: micros::from_micros(col(row, 8)?),
        seq: Seq(i2u(col(row, 9)?)),
        deleted: col(row, 10)?,
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

/// Builds `INSERT ... VALUES (?, ...) x rows ON CONFLICT(id) DO UPDATE ... WHERE higher seq`.
///
/// Parameters are anonymous `?`: sqlx asks `sqlite3_bind_parameter_name`
/// for every parameter, and with numbered `?NNN` parameters that lookup is a
/// linear scan, making a 12K-parameter statement quadratic (measured 5K rows/s).
fn upsert_sql(table: &str, columns: &str, per_row: usize, rows: usize, set: &str) -> String {
    let mut row = String::with_capacity(per_row * 2 + 2);
    row.push('(');
    for k in 0..per_row {
        if k > 0 {
            row.push(',');
        }
        row.push('?');
    }
    row.push(')');
    let mut sql = String::with_capacity(300 + rows * (row.len() + 1));
    sql.push_str("INSERT INTO ");
    sql.push_str(table);
    sql.push_str(" (");
    sql.push_str(columns);
    sql.push_str(") VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push_str(&row);
    }
    sql.push_str(" ON CONFLICT(id) DO UPDATE SET ");
    sql.push_str(set);
    sql.push_str(" WHERE excluded.seq > ");
    sql.push_str(table);
    sql.push_str(".seq AND excluded.owner = ");
    sql.push_str(table);
    sql.push_str(".owner");
    sql
}

/// Entry upsert: 12 parameters per row.
fn entry_upsert_sql(rows: usize) -> String {
    upsert_sql(
        "entry",
        "id, owner, location, parent, name, kind, size, inode, created_at, modified_at, seq, deleted",
        12,
        rows,
        "location = excluded.location, parent = excluded.parent, name = excluded.name, \
         kind = excluded.kind, size = excluded.size, inode = excluded.inode, \
         created_at = excluded.created_at, modified_at = excluded.modified_at, \
         seq = excluded.seq, deleted = excluded.deleted",
    )
}

/// Location upsert: 6 parameters per row.
fn location_upsert_sql(rows: usize) -> String {
    upsert_sql(
        "location",
        "id, owner, path, name, seq, deleted",
        6,
        rows,
        "path = excluded.path, name = excluded.name, seq = excluded.seq, deleted = excluded.deleted",
    )
}

fn push_entry(values: &mut Vec<Value>, owner: &[u8; 16], e: &Entry) {
    values.push(blob(e.id.to_bytes()));
    values.push(blob(*owner));
    values.push(blob(e.location.to_bytes()));
    values.push(Value::Bytes(e.parent.map(|p| p.to_bytes().to_vec())));
    values.push(Value::String(Some(e.name.clone())));
    values.push(Value::BigInt(Some(i64::from(e.kind.code()))));
    values.push(Value::BigInt(Some(u2i(e.size))));
    values.push(Value::BigInt(e.inode.map(u2i)));
    values.push(Value::BigInt(Some(micros::to_micros(&e.created_at))));
    values.push(Value::BigInt(Some(micros::to_micros(&e.modified_at))));
    values.push(Value::BigInt(Some(u2i(e.seq.0))));
    values.push(Value::Bool(Some(e.deleted)));
}

/// The SQL and values of one entry upsert statement.
fn entry_statement(owner: &[u8; 16], chunk: &[&Entry]) -> (String, Vec<Value>) {
    static FULL: OnceLock<String> = OnceLock::new();
    let sql = if chunk.len() == ENTRY_ROWS_PER_STMT {
        FULL.get_or_init(|| entry_upsert_sql(ENTRY_ROWS_PER_STMT))
            .clone()
    } else {
        entry_upsert_sql(chunk.len())
    };
    let mut values = Vec::with_capacity(chunk.len() * 12);
    for e in chunk {
        push_entry(&mut values, owner, e);
    }
    (sql, values)
}

/// Upserts entries of `owner` ("higher seq wins", never across owners) with
/// fixed-size multi-row statements: chunks of [`ENTRY_ROWS_PER_STMT`] rows
/// and one remainder statement (prepared statements are cached by SQL
/// text). Callers sort by id for b-tree locality. The next statement's
/// values are built while SQLite runs the current one (on sqlx's worker thread).
pub(crate) async fn upsert_entries<C: ConnectionTrait>(
    c: &C,
    owner: DeviceId,
    entries: &[&Entry],
) -> Result<()> {
    let owner = owner.to_bytes();
    let chunks: Vec<&[&Entry]> = entries.chunks(ENTRY_ROWS_PER_STMT).collect();
    let mut next = chunks.first().map(|ch| entry_statement(&owner, ch));
    let mut i = 0;
    while let Some((sql, values)) = next.take() {
        i += 1;
        let following = chunks.get(i).copied();
        let (done, built) = tokio::join!(exec(c, sql, values), async {
            following.map(|ch| entry_statement(&owner, ch))
        });
        done?;
        next = built;
    }
    Ok(())
}

/// Upserts locations of `owner` ("higher seq wins", never across owners).
pub(crate) async fn upsert_locations<C: ConnectionTrait>(
    c: &C,
    owner: DeviceId,
    locations: &[&Location],
) -> Result<()> {
    for chunk in locations.chunks(LOCATION_ROWS_PER_STMT) {
        let mut values = Vec::with_capacity(chunk.len() * 6);
        for l in chunk {
            values.push(blob(l.id.to_bytes()));
            values.push(blob(owner.to_bytes()));
            values.push(Value::String(Some(l.path.clone())));
            values.push(Value::String(Some(l.name.clone())));
            values.push(Value::BigInt(Some(u2i(l.seq.0))));
            values.push(Value::Bool(Some(l.deleted)));
        }
        exec(c, location_upsert_sql(chunk.len()), values).await?;
    }
    Ok(())
}

/// Tombstones rows of `table` owned by `owner` in place: `(id, seq)` pairs.
pub(crate) async fn tombstone<C: ConnectionTrait>(
    c: &C,
    table: &str,
    owner: DeviceId,
    rows: &[([u8; 16], Seq)],
) -> Result<()> {
    for chunk in rows.chunks(IDS_PER_STMT) {
        let mut sql = format!("UPDATE {table} SET deleted = 1, seq = d.column2 FROM (VALUES ");
        let mut values = Vec::with_capacity(1 + chunk.len() * 2);
        for (i, (id, seq)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?, ?)");
            values.push(blob(*id));
            values.push(Value::BigInt(Some(u2i(seq.0))));
        }
        sql.push_str(&format!(
            ") AS d WHERE {table}.id = d.column1 AND {table}.owner = ?"
        ));
        values.push(blob(owner.to_bytes()));
        exec(c, sql, values).await?;
    }
    Ok(())
}

/// Owners of the given location ids that are stored (missing ids are absent from the result).
pub(crate) async fn location_owners<C: ConnectionTrait>(
    c: &C,
    ids: &[LocationId],
) -> Result<Vec<(LocationId, DeviceId)>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(IDS_PER_STMT) {
        let placeholders = vec!["?"; chunk.len()].join(",");
        let rows = query(
            c,
            format!("SELECT id, owner FROM location WHERE id IN ({placeholders})"),
            chunk.iter().map(|id| blob(id.to_bytes())).collect(),
        )
        .await?;
        for row in rows {
            out.push((
                LocationId::from_bytes(id16(&col::<Vec<u8>>(&row, 0)?)?),
                DeviceId::from_bytes(id16(&col::<Vec<u8>>(&row, 1)?)?),
            ));
        }
    }
    Ok(out)
}
