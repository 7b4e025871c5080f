//! A snapshot file's schema, read from the bytes of its first page before SQLite parses it.
//!
//! SQLite parses every `CREATE` statement of a file's `sqlite_master` when
//! it opens the file, before any statement (or progress handler) of ours
//! runs, and a parse can be made quadratic: one extra table declaring tens
//! of thousands of `UNIQUE(c COLLATE xN)` constraints kept a core busy for
//! minutes (found by attacking the import). So the schema is read here,
//! from the file's first page, as SQLite's file format lays it out: it must
//! be a single leaf page of the schema table (a snapshot's three rows take
//! ~1 KB), with no overflow, in UTF-8, and its rows must equal the
//! snapshot schema. Only then does SQLite see the file.
//!
//! Format: <https://www.sqlite.org/fileformat2.html> (the database header,
//! b-tree pages, the record format).

/// Bytes of the database header at the start of page 1.
const HEADER: usize = 100;
/// B-tree page type of a table leaf page.
const TABLE_LEAF: u8 = 0x0d;
/// Most rows a snapshot's schema page may hold.
const MAX_ROWS: usize = 16;

/// One row of `sqlite_master`: type, name, tbl_name, sql.
pub(crate) type MasterRow = (String, String, String, Option<String>);

/// Why the first page is not a snapshot schema.
pub(crate) type Refusal = String;

/// The rows of the schema table held on the file's first page, sorted by
/// (type, name). `head` is the start of the file (at least its first page).
pub(crate) fn schema_rows(head: &[u8]) -> Result<Vec<MasterRow>, Refusal> {
    if head.len() < HEADER + 8 {
        return Err("the file is shorter than a database header".into());
    }
    let page_size = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65_536,
        n => usize::from(n),
    };
    if !page_size.is_power_of_two() || !(512..=65_536).contains(&page_size) {
        return Err(format!("page size {page_size}"));
    }
    let usable = page_size - usize::from(head[20]);
    if usable < 480 {
        return Err(format!("{usable} usable bytes per page"));
    }
    let encoding = u32::from_be_bytes([head[56], head[57], head[58], head[59]]);
    if encoding != 1 {
        return Err(format!("text encoding {encoding}, expected UTF-8 (1)"));
    }
    let page = head
        .get(..page_size)
        .ok_or_else(|| "the file is shorter than one page".to_string())?;
    if page[HEADER] != TABLE_LEAF {
        return Err("the schema does not fit on the first page".into());
    }
    let cells = usize::from(u16::from_be_bytes([page[HEADER + 3], page[HEADER + 4]]));
    if cells > MAX_ROWS {
        return Err(format!("{cells} schema rows"));
    }
    let mut rows = Vec::with_capacity(cells);
    for i in 0..cells {
        let at = HEADER + 8 + 2 * i;
        let ptr = page
            .get(at..at + 2)
            .ok_or_else(|| "a cell pointer past the page".to_string())?;
        let cell = usize::from(u16::from_be_bytes([ptr[0], ptr[1]]));
        rows.push(schema_row(page, cell, usable)?);
    }
    rows.sort();
    Ok(rows)
}

/// The schema row in the table-leaf cell at `cell`.
fn schema_row(page: &[u8], cell: usize, usable: usize) -> Result<MasterRow, Refusal> {
    let mut at = cell;
    let payload = varint(page, &mut at)?;
    varint(page, &mut at)?; // rowid
    // Larger payloads spill to overflow pages (U - 35 for a table leaf).
    if payload > (usable - 35) as u64 {
        return Err("a schema row longer than a page".into());
    }
    let end = at + payload as usize;
    let record = page
        .get(at..end)
        .ok_or_else(|| "a schema row past the page".to_string())?;
    let mut cols = record_columns(record)?.into_iter();
    let mut text = |what: &str| match cols.next() {
        Some(Column::Text(t)) => Ok(Some(t)),
        Some(Column::Null) => Ok(None),
        _ => Err(format!("schema column {what} is not text")),
    };
    let kind = text("type")?;
    let name = text("name")?;
    let table = text("tbl_name")?;
    match cols.next() {
        Some(Column::Int) => {}
        _ => return Err("schema column rootpage is not an integer".into()),
    }
    let sql = match cols.next() {
        Some(Column::Text(t)) => Some(t),
        Some(Column::Null) => None,
        _ => return Err("schema column sql is not text".into()),
    };
    if cols.next().is_some() {
        return Err("a schema row with more than five columns".into());
    }
    match (kind, name, table) {
        (Some(k), Some(n), Some(t)) => Ok((k, n, t, sql)),
        _ => Err("a schema row without a type, name or table".into()),
    }
}

/// A column value of a schema record, as far as the check needs it.
enum Column {
    Null,
    Int,
    Text(String),
    Other,
}

/// The columns of a record (header of serial types, then the values).
fn record_columns(record: &[u8]) -> Result<Vec<Column>, Refusal> {
    let mut at = 0;
    let header = varint(record, &mut at)? as usize;
    if header > record.len() || header < at {
        return Err("a schema record header past its record".into());
    }
    let mut types = Vec::new();
    while at < header {
        types.push(varint(record, &mut at)?);
        if types.len() > 8 {
            return Err("a schema record with too many columns".into());
        }
    }
    let mut body = header;
    let mut cols = Vec::with_capacity(types.len());
    for t in types {
        let len = match t {
            0 | 8 | 9 => 0,
            1..=4 => t as usize,
            5 => 6,
            6 | 7 => 8,
            12.. => ((t - 12) / 2) as usize,
            _ => return Err(format!("reserved serial type {t}")),
        };
        let end = body
            .checked_add(len)
            .ok_or_else(|| "a schema value past its record".to_string())?;
        let value = record
            .get(body..end)
            .ok_or_else(|| "a schema value past its record".to_string())?;
        body = end;
        cols.push(match t {
            0 => Column::Null,
            1..=6 | 8 | 9 => Column::Int,
            13.. if t % 2 == 1 => Column::Text(
                String::from_utf8(value.to_vec())
                    .map_err(|_| "schema text that is not UTF-8".to_string())?,
            ),
            _ => Column::Other,
        });
    }
    Ok(cols)
}

/// An SQLite varint (big-endian, 7 bits a byte, the ninth byte whole) at `at`.
fn varint(buf: &[u8], at: &mut usize) -> Result<u64, Refusal> {
    let mut v = 0u64;
    for i in 0..9 {
        let b = *buf
            .get(*at)
            .ok_or_else(|| "a varint past its page".to_string())?;
        *at += 1;
        if i == 8 {
            return Ok((v << 8) | u64::from(b));
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_as_sqlite_writes_them() {
        let cases: [(&[u8], u64); 4] = [
            (&[0x05], 5),
            (&[0x81, 0x00], 128),
            (&[0xff, 0x7f], 16_383),
            (&[0xff; 9], u64::MAX),
        ];
        for (bytes, want) in cases {
            let mut at = 0;
            assert_eq!(varint(bytes, &mut at), Ok(want));
            assert_eq!(at, bytes.len());
        }
        assert!(varint(&[0x80], &mut 0).is_err(), "cut short");
    }

    #[test]
    fn short_and_odd_headers_are_refused() {
        assert!(schema_rows(&[0u8; 50]).is_err());
        let mut head = vec![0u8; 4096];
        head[16..18].copy_from_slice(&3000u16.to_be_bytes());
        assert!(schema_rows(&head).unwrap_err().contains("page size"));
        head[16..18].copy_from_slice(&4096u16.to_be_bytes());
        head[56..60].copy_from_slice(&2u32.to_be_bytes());
        assert!(schema_rows(&head).unwrap_err().contains("UTF-8"));
        head[56..60].copy_from_slice(&1u32.to_be_bytes());
        head[HEADER] = 0x05; // an interior table page: the schema spills
        assert!(schema_rows(&head).unwrap_err().contains("first page"));
    }
}
