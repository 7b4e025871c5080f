//! Record-batch payloads: `encode_records` / `decode_records`.
//!
//! The one function pair every caller uses, so the layout can change
//! without touching them. The layout is columnar, then lz4: ids split into a
//! delta-coded time-ordered high half and a raw random low half, parents as
//! back-references into the batch, names sharing a prefix with the previous
//! name, delta-coded seqs, inodes and timestamps. Columns of like values
//! compress far better than rows (row-wise lz4 measured 29 B/entry on a real
//! root filesystem).
//!
//! Decoding trusts nothing it reads before checking it: the decompressed
//! size against [`BatchLimits::decompressed_limit`] (and, in
//! [`decompress_checked`], against what the block's bytes can expand to,
//! before its buffer is allocated), the record count
//! against `max_records` before any per-record column, every column's
//! declared length against the count (and against the bytes left) before
//! anything is allocated for it, and the text the records decode to
//! (names, paths) against the same limit as the decompressed payload. So a
//! payload costs its decompressed buffer, at most as much again in text and
//! a few hundred bytes per record it may hold, whatever its columns claim.
//! Byte columns are borrowed from the decompressed buffer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::codec::{compress, decompress_checked};
use crate::error::DecodeError;
use crate::id::{DeviceId, EntryId, LocationId, Seq};
use crate::model::{Entry, EntryKind, Location, Record, micros};

/// Layout byte of the columnar format.
const LAYOUT_COLUMNAR_V1: u8 = 1;

const FLAG_KIND_MASK: u8 = 0b0000_0011;
const FLAG_DELETED: u8 = 0b0000_0100;
const FLAG_INODE: u8 = 0b0000_1000;

/// Decompressed bytes a batch may take per record it may hold. An entry's
/// columns take at most 110 bytes besides its name (a synthetic tree's take
/// 46 with it); the budget is the batch's, not each record's: 65,536
/// records with 400-byte names fit.
const BYTES_PER_RECORD: usize = 512;
/// Decompressed bytes a batch may take beyond [`BYTES_PER_RECORD`] per
/// record: the layout byte, length prefixes, a few long location paths.
const BATCH_OVERHEAD: usize = 64 << 10;
/// The fewest bytes a location record takes: two ids, two empty strings,
/// a one-byte seq and the tombstone flag.
const MIN_LOCATION_BYTES: usize = 16 + 16 + 1 + 1 + 1 + 1;

/// Limits applied when decoding a batch from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most records in one batch, locations and entries (default 65,536).
    pub max_records: usize,
    /// Largest decompressed payload (default 64 MiB); see
    /// [`BatchLimits::decompressed_limit`] for the limit that applies.
    pub max_decompressed: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_records: 1 << 16,
            max_decompressed: 64 << 20,
        }
    }
}

impl BatchLimits {
    /// The most bytes a payload may decompress to, and the most bytes of
    /// text (entry names, location paths and names) its records may decode
    /// to: 512 bytes per record of `max_records` plus 64 KiB, or
    /// `max_decompressed` if that is less. 32 MiB and 64 KiB by default: a
    /// batch of few records cannot make the receiver allocate for many.
    ///
    /// ```
    /// use sync_core::BatchLimits;
    /// assert_eq!(BatchLimits::default().decompressed_limit(), (32 << 20) + (64 << 10));
    /// let small = BatchLimits { max_records: 100, ..BatchLimits::default() };
    /// assert_eq!(small.decompressed_limit(), 100 * 512 + (64 << 10));
    /// ```
    pub fn decompressed_limit(&self) -> usize {
        self.max_records
            .saturating_mul(BYTES_PER_RECORD)
            .saturating_add(BATCH_OVERHEAD)
            .min(self.max_decompressed)
    }
}

/// The encoded form. Decoding does not deserialize it (postcard would
/// allocate each column at the length it declares): [`read_columns`] reads
/// the same fields in the same order, bounding each. A field added here
/// must be added there; the round-trip tests fail until it is.
#[derive(Serialize, Default)]
#[cfg_attr(test, derive(Deserialize))]
struct Columns {
    layout: u8,
    locations: Vec<Location>,
    /// Distinct locations referenced by entries, 16 bytes each.
    loc_table: ByteBuf,
    count: u32,
    /// High 8 bytes of each id (big-endian u64), wrapping delta to the previous.
    id_hi: Vec<i64>,
    /// Low 8 bytes of each id, raw.
    id_lo: ByteBuf,
    /// Index into `loc_table`.
    loc: Vec<u32>,
    /// 0: no parent; 1: next id of `extern_parents`; else `2 + zigzag(i - j)`
    /// where `j` is the parent's index in this batch.
    parent: Vec<u64>,
    extern_parents: ByteBuf,
    /// Bytes shared with the previous name.
    name_prefix: Vec<u32>,
    /// Length of the rest, stored in `names`.
    name_suffix: Vec<u32>,
    names: ByteBuf,
    /// Kind (bits 0-1), deleted (bit 2), inode present (bit 3).
    flags: ByteBuf,
    size: Vec<u64>,
    /// Delta to the previous present inode.
    inode: Vec<i64>,
    created: Vec<i64>,
    modified: Vec<i64>,
    seq: Vec<i64>,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The inverse of [`zigzag`]; total (no value of `v` overflows).
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn split_id(id: &EntryId) -> (u64, [u8; 8]) {
    let b = id.to_bytes();
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&b[..8]);
    lo.copy_from_slice(&b[8..]);
    (u64::from_be_bytes(hi), lo)
}

fn shared_prefix(a: &str, b: &str) -> usize {
    let mut n = a
        .as_bytes()
        .iter()
        .zip(b.as_bytes())
        .take_while(|(x, y)| x == y)
        .count();
    while !b.is_char_boundary(n) {
        n -= 1;
    }
    n.min(u32::MAX as usize)
}

/// Encodes records (of one owner) as a compressed batch payload.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut c = Columns {
        layout: LAYOUT_COLUMNAR_V1,
        ..Columns::default()
    };
    let entries: Vec<&Entry> = records
        .iter()
        .filter_map(|r| match r {
            Record::Entry(e) => Some(e),
            Record::Location(_) => None,
        })
        .collect();
    c.locations = records
        .iter()
        .filter_map(|r| match r {
            Record::Location(l) => Some(l.clone()),
            Record::Entry(_) => None,
        })
        .collect();
    let n = entries.len();
    c.count = n as u32;
    let index_of: std::collections::HashMap<EntryId, usize> =
        entries.iter().enumerate().map(|(i, e)| (e.id, i)).collect();
    let mut loc_ids: Vec<LocationId> = Vec::new();
    c.id_hi.reserve(n);
    c.id_lo.reserve(n * 8);
    let (mut prev_hi, mut prev_inode, mut prev_created, mut prev_modified, mut prev_seq) =
        (0u64, 0u64, 0i64, 0i64, 0u64);
    let mut prev_name: &str = "";
    for (i, e) in entries.iter().enumerate() {
        let (hi, lo) = split_id(&e.id);
        c.id_hi.push(hi.wrapping_sub(prev_hi) as i64);
        prev_hi = hi;
        c.id_lo.extend_from_slice(&lo);

        let li = match loc_ids.iter().rposition(|l| *l == e.location) {
            Some(li) => li,
            None => {
                loc_ids.push(e.location);
                loc_ids.len() - 1
            }
        };
        c.loc.push(li as u32);

        c.parent.push(match e.parent {
            None => 0,
            Some(p) => match index_of.get(&p) {
                Some(&j) if j != i => 2 + zigzag(i as i64 - j as i64),
                _ => {
                    c.extern_parents.extend_from_slice(&p.to_bytes());
                    1
                }
            },
        });

        let prefix = shared_prefix(prev_name, &e.name);
        c.name_prefix.push(prefix as u32);
        let suffix = &e.name.as_bytes()[prefix..];
        c.name_suffix.push(suffix.len() as u32);
        c.names.extend_from_slice(suffix);
        prev_name = &e.name;

        let mut flags = e.kind.code();
        if e.deleted {
            flags |= FLAG_DELETED;
        }
        if let Some(inode) = e.inode {
            flags |= FLAG_INODE;
            c.inode.push(inode.wrapping_sub(prev_inode) as i64);
            prev_inode = inode;
        }
        c.flags.push(flags);
        c.size.push(e.size);
        let created = micros::to_micros(&e.created_at);
        let modified = micros::to_micros(&e.modified_at);
        c.created.push(created.wrapping_sub(prev_created));
        c.modified.push(modified.wrapping_sub(prev_modified));
        prev_created = created;
        prev_modified = modified;
        c.seq.push(e.seq.0.wrapping_sub(prev_seq) as i64);
        prev_seq = e.seq.0;
    }
    for l in &loc_ids {
        c.loc_table.extend_from_slice(&l.to_bytes());
    }
    // Serializing plain vectors into memory cannot fail.
    let raw = postcard::to_stdvec(&c).unwrap_or_default();
    compress(&raw)
}

/// A column whose declared length is not the one the batch needs.
fn wrong_len(column: &'static str, len: u64, count: usize) -> DecodeError {
    DecodeError::ColumnLength {
        column,
        len,
        count: count as u64,
    }
}

/// A cursor over the decompressed batch. Values are decoded by postcard,
/// one at a time; every length prefix is read and checked before anything
/// is allocated for what it announces.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// One postcard value (a varint, an id, a bool), which allocates nothing.
    fn value<T: Deserialize<'a>>(&mut self, what: &'static str) -> Result<T, DecodeError> {
        let (v, rest) = postcard::take_from_bytes::<T>(self.rest)
            .map_err(|e| DecodeError::Malformed(format!("{what}: {e}")))?;
        self.rest = rest;
        Ok(v)
    }

    /// A length prefix: postcard writes a sequence's length as a varint
    /// `usize`, the same bytes as a `u64` of that value.
    fn len(&mut self, column: &'static str) -> Result<u64, DecodeError> {
        self.value::<u64>(column)
    }

    /// Refuses `len` values of at least `each` bytes when fewer bytes are left.
    fn room(&self, column: &'static str, len: usize, each: usize) -> Result<(), DecodeError> {
        match len.checked_mul(each) {
            Some(need) if need <= self.rest.len() => Ok(()),
            _ => Err(DecodeError::Malformed(format!(
                "column `{column}` declares {len} values, only {} bytes are left",
                self.rest.len()
            ))),
        }
    }

    /// A length prefix that must be `expected`, with room for as many values.
    fn exact_len(&mut self, column: &'static str, expected: usize) -> Result<usize, DecodeError> {
        let len = self.len(column)?;
        if len != expected as u64 {
            return Err(wrong_len(column, len, expected));
        }
        self.room(column, expected, 1)?;
        Ok(expected)
    }

    /// A column of exactly `expected` varints; the vector is allocated only
    /// after the declared length is found to be `expected`.
    fn varints<T: Deserialize<'a>>(
        &mut self,
        column: &'static str,
        expected: usize,
    ) -> Result<Vec<T>, DecodeError> {
        let len = self.exact_len(column, expected)?;
        let mut values = Vec::with_capacity(len);
        for _ in 0..len {
            values.push(self.value(column)?);
        }
        Ok(values)
    }

    /// The next `len` bytes, borrowed.
    fn take(&mut self, column: &'static str, len: u64) -> Result<&'a [u8], DecodeError> {
        let split = usize::try_from(len)
            .ok()
            .and_then(|len| self.rest.split_at_checked(len));
        let Some((bytes, rest)) = split else {
            return Err(DecodeError::Malformed(format!(
                "column `{column}` declares {len} bytes, only {} are left",
                self.rest.len()
            )));
        };
        self.rest = rest;
        Ok(bytes)
    }

    /// A byte column of any length (bounded by the buffer), borrowed.
    fn bytes(&mut self, column: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.len(column)?;
        self.take(column, len)
    }

    /// A byte column of exactly `expected` bytes, borrowed.
    fn bytes_exact(
        &mut self,
        column: &'static str,
        expected: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.exact_len(column, expected)?;
        self.take(column, len as u64)
    }

    /// A string, charged to `text` before it is copied out of the buffer.
    fn string(&mut self, what: &'static str, text: &mut Budget) -> Result<String, DecodeError> {
        let bytes = self.bytes(what)?;
        text.charge(what, bytes.len())?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Malformed(format!("{what} is not UTF-8")))
    }

    /// A location record, field by field in `Location`'s order (its derived
    /// encoding), so that its strings are charged before they are allocated.
    fn location(&mut self, text: &mut Budget) -> Result<Location, DecodeError> {
        Ok(Location {
            id: self.value::<LocationId>("location id")?,
            owner: self.value::<DeviceId>("location owner")?,
            path: self.string("location path", text)?,
            name: self.string("location name", text)?,
            seq: Seq(self.value::<u64>("location seq")?),
            deleted: self.value::<bool>("location deleted")?,
        })
    }
}

/// Bytes of text the records of a batch may still decode to. Names share
/// prefixes with the previous name, so a few bytes can name many long
/// records: the budget refuses the batch before the string is allocated.
struct Budget {
    left: usize,
    max: usize,
}

impl Budget {
    fn new(max: usize) -> Self {
        Budget { left: max, max }
    }

    fn charge(&mut self, what: &'static str, len: usize) -> Result<(), DecodeError> {
        self.left = self.left.checked_sub(len).ok_or_else(|| {
            DecodeError::Malformed(format!(
                "{what}: the batch's text exceeds the limit of {} bytes",
                self.max
            ))
        })?;
        Ok(())
    }
}

/// The columns of a batch as read, byte columns borrowed from the
/// decompressed buffer. Every column has been checked against the count.
struct Decoded<'a> {
    locations: Vec<Location>,
    loc_table: &'a [u8],
    count: usize,
    id_hi: Vec<i64>,
    id_lo: &'a [u8],
    loc: Vec<u32>,
    parent: Vec<u64>,
    extern_parents: &'a [u8],
    name_prefix: Vec<u32>,
    name_suffix: Vec<u32>,
    names: &'a [u8],
    flags: &'a [u8],
    size: Vec<u64>,
    inode: Vec<i64>,
    created: Vec<i64>,
    modified: Vec<i64>,
    seq: Vec<i64>,
}

/// Reads the fields of [`Columns`] in their order, each bounded before it
/// is allocated: locations by `max_records`, the count with them, then
/// every column by the count (the inode column by the flags that announce
/// an inode, parent ids by the parents that refer to one, name bytes by
/// the suffix lengths).
fn read_columns<'a>(
    r: &mut Reader<'a>,
    limits: &BatchLimits,
    text: &mut Budget,
) -> Result<Decoded<'a>, DecodeError> {
    let max = limits.max_records;
    let too_many = |count: u64| DecodeError::TooManyRecords {
        count,
        max: max as u64,
    };
    let layout: u8 = r.value("layout")?;
    if layout != LAYOUT_COLUMNAR_V1 {
        return Err(DecodeError::Malformed(format!(
            "unknown batch layout {layout}"
        )));
    }
    let declared = r.len("locations")?;
    let n_locations = usize::try_from(declared)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| too_many(declared))?;
    r.room("locations", n_locations, MIN_LOCATION_BYTES)?;
    let mut locations = Vec::with_capacity(n_locations);
    for _ in 0..n_locations {
        locations.push(r.location(text)?);
    }
    let loc_table = r.bytes("loc_table")?;
    if loc_table.len() % 16 != 0 {
        return Err(DecodeError::Malformed(
            "location table is not whole ids".into(),
        ));
    }
    let count: u32 = r.value("count")?;
    let total = u64::from(count) + n_locations as u64;
    if total > max as u64 {
        return Err(too_many(total));
    }
    // Within `max_records`, so it fits.
    let n = count as usize;
    // The encoder lists only the locations its entries use.
    if loc_table.len() / 16 > n {
        return Err(wrong_len("loc_table", (loc_table.len() / 16) as u64, n));
    }
    let id_hi = r.varints("id_hi", n)?;
    let id_lo_len = n
        .checked_mul(8)
        .ok_or_else(|| DecodeError::Malformed("id_lo overflows".into()))?;
    let id_lo = r.bytes_exact("id_lo", id_lo_len)?;
    let loc = r.varints("loc", n)?;
    let parent: Vec<u64> = r.varints("parent", n)?;
    let externs = parent.iter().filter(|&&p| p == 1).count();
    let externs_len = externs
        .checked_mul(16)
        .ok_or_else(|| DecodeError::Malformed("extern_parents overflows".into()))?;
    let extern_parents = r.bytes_exact("extern_parents", externs_len)?;
    let name_prefix = r.varints("name_prefix", n)?;
    let name_suffix: Vec<u32> = r.varints("name_suffix", n)?;
    // At most `n` values below 2^32 each: no overflow in u64.
    let suffix_total: u64 = name_suffix.iter().map(|&l| u64::from(l)).sum();
    let names_len = usize::try_from(suffix_total)
        .map_err(|_| DecodeError::Malformed("name bytes overflow".into()))?;
    let names = r.bytes_exact("names", names_len)?;
    let flags = r.bytes_exact("flags", n)?;
    let size = r.varints("size", n)?;
    let with_inode = flags.iter().filter(|&&f| f & FLAG_INODE != 0).count();
    let inode = r.varints("inode", with_inode)?;
    let created = r.varints("created", n)?;
    let modified = r.varints("modified", n)?;
    let seq = r.varints("seq", n)?;
    Ok(Decoded {
        locations,
        loc_table,
        count: n,
        id_hi,
        id_lo,
        loc,
        parent,
        extern_parents,
        name_prefix,
        name_suffix,
        names,
        flags,
        size,
        inode,
        created,
        modified,
        seq,
    })
}

/// 16 bytes of a column as an id.
fn id16(column: &'static str, bytes: &[u8]) -> Result<[u8; 16], DecodeError> {
    <[u8; 16]>::try_from(bytes)
        .map_err(|_| DecodeError::Malformed(format!("{column} is not whole ids")))
}

/// A timestamp of the batch. The deltas are summed wrapping, the exact
/// inverse of the encoder (two valid timestamps can be further apart than
/// `i64::MAX` microseconds); a sum outside chrono's range is no timestamp
/// any encoder wrote.
fn timestamp(i: usize, column: &str, us: i64) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| {
        DecodeError::Malformed(format!(
            "{column} of record {i} ({us} µs) is outside the representable range"
        ))
    })
}

/// Decodes a batch payload made by [`encode_records`]: locations first,
/// then entries in their encoded order. Every length is checked against
/// the limits before anything is allocated for it, every column against
/// the record count, every reference against the batch before use, and
/// arithmetic on decoded values cannot overflow.
pub fn decode_records(payload: &[u8], limits: &BatchLimits) -> Result<Vec<Record>, DecodeError> {
    let max_bytes = limits.decompressed_limit();
    let raw = decompress_checked(payload, max_bytes)?;
    let mut text = Budget::new(max_bytes);
    let mut reader = Reader { rest: &raw };
    let c = read_columns(&mut reader, limits, &mut text)?;
    if !reader.rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} trailing bytes after the batch",
            reader.rest.len()
        )));
    }
    let n = c.count;

    // Ids first: parents refer to them. The high halves are wrapping
    // deltas, like the encoder's: every u64 is an id half, so the sum is
    // exact, never an overflow.
    let mut ids = Vec::with_capacity(n);
    let mut hi = 0u64;
    for (d, lo) in c.id_hi.iter().zip(c.id_lo.chunks_exact(8)) {
        hi = hi.wrapping_add(*d as u64);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(lo);
        ids.push(EntryId::from_bytes(b));
    }

    // Within `max_records`: checked by `read_columns`.
    let mut out = Vec::with_capacity(n + c.locations.len());
    out.extend(c.locations.into_iter().map(Record::Location));
    let entries_from = out.len();
    let n_locs = c.loc_table.len() / 16;
    let mut externs = c.extern_parents.chunks_exact(16);
    let mut names = c.names;
    let mut inodes = c.inode.iter();
    // Inodes, seqs: wrapping deltas of u64s (seqs above i64::MAX are
    // valid), exact for the same reason as the ids.
    let (mut prev_inode, mut prev_created, mut prev_modified, mut prev_seq) =
        (0u64, 0i64, 0i64, 0u64);
    for i in 0..n {
        let li = c.loc[i] as usize;
        if li >= n_locs {
            return Err(DecodeError::BadReference {
                column: "loc",
                index: li as u64,
            });
        }
        let location = LocationId::from_bytes(id16("loc_table", &c.loc_table[li * 16..][..16])?);
        let parent = match c.parent[i] {
            0 => None,
            1 => {
                let Some(p) = externs.next() else {
                    return Err(DecodeError::BadReference {
                        column: "extern_parents",
                        index: i as u64,
                    });
                };
                Some(EntryId::from_bytes(id16("extern_parents", p)?))
            }
            v @ 2.. => {
                // `i - distance`, where the distance may be anything.
                let j = (i as i64)
                    .checked_sub(unzigzag(v - 2))
                    .and_then(|j| usize::try_from(j).ok())
                    .filter(|&j| j < n && j != i)
                    .ok_or(DecodeError::BadReference {
                        column: "parent",
                        index: v,
                    })?;
                Some(ids[j])
            }
        };

        let prev_name: &[u8] = match out.last() {
            Some(Record::Entry(e)) if out.len() > entries_from => e.name.as_bytes(),
            _ => b"",
        };
        let prefix = c.name_prefix[i] as usize;
        let suffix_len = c.name_suffix[i] as usize;
        if prefix > prev_name.len() {
            return Err(DecodeError::BadReference {
                column: "name_prefix",
                index: prefix as u64,
            });
        }
        let Some((suffix, rest)) = names.split_at_checked(suffix_len) else {
            return Err(DecodeError::BadReference {
                column: "names",
                index: i as u64,
            });
        };
        names = rest;
        // Both below 2^32: no overflow. Charged before it is allocated.
        let len = prefix + suffix_len;
        text.charge("names", len)?;
        let mut name_bytes = Vec::with_capacity(len);
        name_bytes.extend_from_slice(&prev_name[..prefix]);
        name_bytes.extend_from_slice(suffix);
        let name = String::from_utf8(name_bytes)
            .map_err(|_| DecodeError::Malformed(format!("name of record {i} is not UTF-8")))?;

        let flags = c.flags[i];
        if flags & !(FLAG_KIND_MASK | FLAG_DELETED | FLAG_INODE) != 0 {
            return Err(DecodeError::Malformed(format!(
                "record {i} has unknown flags {flags:#04x}"
            )));
        }
        let kind = EntryKind::from_code(flags & FLAG_KIND_MASK)
            .ok_or(DecodeError::UnknownKind(flags & FLAG_KIND_MASK))?;
        let inode = if flags & FLAG_INODE != 0 {
            let Some(d) = inodes.next() else {
                return Err(wrong_len("inode", c.inode.len() as u64, i + 1));
            };
            prev_inode = prev_inode.wrapping_add(*d as u64);
            Some(prev_inode)
        } else {
            None
        };
        prev_created = prev_created.wrapping_add(c.created[i]);
        prev_modified = prev_modified.wrapping_add(c.modified[i]);
        prev_seq = prev_seq.wrapping_add(c.seq[i] as u64);
        out.push(Record::Entry(Entry {
            id: ids[i],
            location,
            parent,
            name,
            kind,
            size: c.size[i],
            inode,
            created_at: timestamp(i, "created_at", prev_created)?,
            modified_at: timestamp(i, "modified_at", prev_modified)?,
            seq: Seq(prev_seq),
            deleted: flags & FLAG_DELETED != 0,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::DeviceId;
    use chrono::{TimeZone, Utc};

    fn sample(n: usize) -> Vec<Record> {
        let loc = LocationId::new_v7();
        let root = EntryId::new_v7();
        let mut out = vec![Record::Location(Location {
            id: loc,
            owner: DeviceId::new_v7(),
            path: "/home/me".into(),
            name: "me".into(),
            seq: Seq(1),
            deleted: false,
        })];
        let t = Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap();
        for i in 0..n {
            out.push(Record::Entry(Entry {
                id: if i == 0 { root } else { EntryId::new_v7() },
                location: loc,
                parent: if i == 0 { None } else { Some(root) },
                name: format!("IMG_{i:04}.jpg"),
                kind: if i % 10 == 0 {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                },
                size: 1000 + i as u64 * 37,
                inode: if i % 7 == 0 {
                    None
                } else {
                    Some(5000 + i as u64)
                },
                created_at: t,
                modified_at: t + chrono::Duration::microseconds(i as i64),
                seq: Seq(2 + i as u64),
                deleted: i % 13 == 0,
            }));
        }
        out
    }

    #[test]
    fn round_trip() {
        let recs = sample(500);
        let bytes = encode_records(&recs);
        assert_eq!(
            decode_records(&bytes, &BatchLimits::default()).unwrap(),
            recs
        );
    }

    #[test]
    fn empty_round_trip() {
        let bytes = encode_records(&[]);
        assert!(
            decode_records(&bytes, &BatchLimits::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn too_many_records_refused() {
        let bytes = encode_records(&sample(100));
        let limits = BatchLimits {
            max_records: 50,
            ..BatchLimits::default()
        };
        assert!(matches!(
            decode_records(&bytes, &limits),
            Err(DecodeError::TooManyRecords {
                count: 101,
                max: 50
            })
        ));
    }

    #[test]
    fn bad_parent_reference_refused() {
        let recs = sample(3);
        let raw = lz4_flex::block::decompress_size_prepended(&encode_records(&recs)).unwrap();
        let mut c: Columns = postcard::from_bytes(&raw).unwrap();
        c.parent[1] = 2 + zigzag(40);
        let bytes = compress(&postcard::to_stdvec(&c).unwrap());
        assert!(matches!(
            decode_records(&bytes, &BatchLimits::default()),
            Err(DecodeError::BadReference {
                column: "parent",
                ..
            })
        ));
    }

    #[test]
    fn column_length_mismatch_refused() {
        let recs = sample(3);
        let raw = lz4_flex::block::decompress_size_prepended(&encode_records(&recs)).unwrap();
        let mut c: Columns = postcard::from_bytes(&raw).unwrap();
        c.size.pop();
        let bytes = compress(&postcard::to_stdvec(&c).unwrap());
        assert!(matches!(
            decode_records(&bytes, &BatchLimits::default()),
            Err(DecodeError::ColumnLength { column: "size", .. })
        ));
    }

    #[test]
    fn unknown_kind_refused() {
        let recs = sample(3);
        let raw = lz4_flex::block::decompress_size_prepended(&encode_records(&recs)).unwrap();
        let mut c: Columns = postcard::from_bytes(&raw).unwrap();
        c.flags[0] = 3;
        let bytes = compress(&postcard::to_stdvec(&c).unwrap());
        assert!(matches!(
            decode_records(&bytes, &BatchLimits::default()),
            Err(DecodeError::UnknownKind(3))
        ));
    }

    #[test]
    fn oversized_declared_size_refused() {
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&[0u8; 8]);
        assert!(matches!(
            decode_records(&bytes, &BatchLimits::default()),
            Err(DecodeError::DecompressedTooLarge { .. })
        ));
    }

    /// Re-encodes `c` as a payload.
    fn payload(c: &Columns) -> Vec<u8> {
        compress(&postcard::to_stdvec(c).unwrap())
    }

    fn columns(recs: &[Record]) -> Columns {
        let raw = lz4_flex::block::decompress_size_prepended(&encode_records(recs)).unwrap();
        postcard::from_bytes(&raw).unwrap()
    }

    /// The deltas of ids, inodes, seqs and timestamps wrap on purpose:
    /// values at both ends of their ranges, in any order, come back exact.
    #[test]
    fn extreme_values_round_trip() {
        let loc = LocationId::new_v7();
        let ends = [
            DateTime::<Utc>::MIN_UTC,
            truncate(DateTime::<Utc>::MAX_UTC),
            DateTime::<Utc>::UNIX_EPOCH,
        ];
        let values = [0, u64::MAX, 1, u64::MAX - 1, i64::MAX as u64 + 1, 0];
        let mut recs = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&v.to_be_bytes());
            id[8..].copy_from_slice(&(!v).to_be_bytes());
            recs.push(Record::Entry(Entry {
                id: EntryId::from_bytes(id),
                location: loc,
                parent: None,
                name: format!("{v}"),
                kind: EntryKind::File,
                size: *v,
                inode: Some(values[values.len() - 1 - i]),
                created_at: ends[i % 3],
                modified_at: ends[(i + 1) % 3],
                seq: Seq(*v),
                deleted: false,
            }));
        }
        let bytes = encode_records(&recs);
        assert_eq!(
            decode_records(&bytes, &BatchLimits::default()).unwrap(),
            recs
        );
    }

    fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
        crate::model::truncate_to_micros(t)
    }

    /// A back-reference of `u64::MAX` is a distance of `-i64::MAX`: `i -
    /// distance` overflowed (a panic in debug builds, garbage in release).
    #[test]
    fn overflowing_parent_back_reference_refused() {
        let mut c = columns(&sample(3));
        for v in [
            u64::MAX,
            u64::MAX - 1,
            2 + zigzag(i64::MIN + 2),
            2 + zigzag(2),
        ] {
            c.parent[1] = v;
            assert!(
                matches!(
                    decode_records(&payload(&c), &BatchLimits::default()),
                    Err(DecodeError::BadReference { column: "parent", index }) if index == v
                ),
                "{v}"
            );
        }
        // A back-reference to itself.
        c.parent[1] = 2 + zigzag(0);
        assert!(matches!(
            decode_records(&payload(&c), &BatchLimits::default()),
            Err(DecodeError::BadReference {
                column: "parent",
                ..
            })
        ));
    }

    /// Timestamp deltas summing outside chrono's range: no encoder wrote
    /// them (`from_micros` would have saturated them to another value).
    #[test]
    fn out_of_range_timestamp_refused() {
        let mut c = columns(&sample(3));
        c.created[1] = i64::MAX;
        assert!(matches!(
            decode_records(&payload(&c), &BatchLimits::default()),
            Err(DecodeError::Malformed(m)) if m.contains("created_at of record 1")
        ));
        let mut c = columns(&sample(3));
        c.modified[0] = i64::MIN;
        assert!(matches!(
            decode_records(&payload(&c), &BatchLimits::default()),
            Err(DecodeError::Malformed(m)) if m.contains("modified_at of record 0")
        ));
    }

    /// Every location the table lists is used; a reference past it is refused.
    #[test]
    fn location_references_are_checked() {
        let mut c = columns(&sample(3));
        c.loc[2] = 1;
        assert!(matches!(
            decode_records(&payload(&c), &BatchLimits::default()),
            Err(DecodeError::BadReference {
                column: "loc",
                index: 1
            })
        ));
        let mut c = columns(&sample(1));
        c.loc_table.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_records(&payload(&c), &BatchLimits::default()),
            Err(DecodeError::ColumnLength {
                column: "loc_table",
                len: 2,
                count: 1
            })
        ));
    }

    /// The decompressed limit follows `max_records`: a payload sized for
    /// 100 records is refused when 10 are allowed, before decompression.
    #[test]
    fn decompressed_limit_follows_max_records() {
        let recs = sample(3000);
        let bytes = encode_records(&recs);
        let declared = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        let limits = BatchLimits {
            max_records: 10,
            ..BatchLimits::default()
        };
        assert!(declared > limits.decompressed_limit());
        assert!(matches!(
            decode_records(&bytes, &limits),
            Err(DecodeError::DecompressedTooLarge { .. })
        ));
        assert_eq!(
            decode_records(&bytes, &BatchLimits::default()).unwrap(),
            recs
        );
    }
}
