//! Peak allocation of `decode_records` on hostile batch payloads, measured
//! by the counting global allocator of `support`, and the replay of the `record_batch`
//! fuzz regressions (`fuzz/regressions/record_batch/`) under it.
//!
//! A payload may only cost what the limits allow: the decompressed buffer
//! (at most [`BatchLimits::decompressed_limit`]) and columns bounded by the
//! record count, never what a column's length prefix claims.
//!
//! The allocator counts every allocation of this test binary, so the tests
//! take one lock and measure one at a time.

use std::path::PathBuf;

use sync_core::codec::compress;
use sync_core::records::BatchLimits;
use sync_core::{DecodeError, Record, decode_records, encode_records};

mod support;
use support::{MIB, lock, measure, varint};

/// The ceiling of the security issue: no payload may make the decoder
/// allocate this much.
const CEILING: usize = 128 * MIB;

/// Decodes `payload` under `limits`, returning the outcome and the peak.
fn decode_measured(
    payload: &[u8],
    limits: &BatchLimits,
) -> (Result<Vec<Record>, DecodeError>, usize) {
    measure(|| decode_records(payload, limits))
}

/// [`decode_measured`], and prints the outcome and the peak as `case`.
fn decode_printed(
    case: &str,
    payload: &[u8],
    limits: &BatchLimits,
) -> (Result<Vec<Record>, DecodeError>, usize) {
    let (outcome, peak) = decode_measured(payload, limits);
    let what = match &outcome {
        Ok(r) => format!("{} records", r.len()),
        Err(e) => format!("{e:?}"),
    };
    eprintln!(
        "{case}: payload {} B, peak {:.2} MiB: {what}",
        payload.len(),
        peak as f64 / MIB as f64
    );
    (outcome, peak)
}

// ---------------------------------------------------------------- payloads

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A length-prefixed column: `declared` as the prefix, then `body`.
fn column(declared: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 10);
    varint(&mut out, declared);
    out.extend_from_slice(body);
    out
}

/// A column of varints.
fn varints(values: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    for v in values {
        varint(&mut body, *v);
    }
    column(values.len() as u64, &body)
}

fn scalar(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    varint(&mut out, v);
    out
}

/// The columns of the batch layout, in their encoded order; `layout` and
/// `count` are scalars, every other one is length-prefixed.
const FIELDS: [&str; 18] = [
    "layout",
    "locations",
    "loc_table",
    "count",
    "id_hi",
    "id_lo",
    "loc",
    "parent",
    "extern_parents",
    "name_prefix",
    "name_suffix",
    "names",
    "flags",
    "size",
    "inode",
    "created",
    "modified",
    "seq",
];

/// A batch spelled out field by field, so that one field can be replaced.
#[derive(Clone)]
struct Raw(Vec<(&'static str, Vec<u8>)>);

impl Raw {
    /// A valid batch of one file entry, `a`, in one location, no location
    /// record, no parent, no inode, seq 2.
    fn one_entry() -> Raw {
        Raw(vec![
            ("layout", scalar(1)),
            ("locations", column(0, &[])),
            ("loc_table", column(16, &[7; 16])),
            ("count", scalar(1)),
            ("id_hi", varints(&[zigzag(42)])),
            ("id_lo", column(8, &[9; 8])),
            ("loc", varints(&[0])),
            ("parent", varints(&[0])),
            ("extern_parents", column(0, &[])),
            ("name_prefix", varints(&[0])),
            ("name_suffix", varints(&[1])),
            ("names", column(1, b"a")),
            ("flags", column(1, &[0])),
            ("size", varints(&[0])),
            ("inode", column(0, &[])),
            ("created", varints(&[0])),
            ("modified", varints(&[0])),
            ("seq", varints(&[zigzag(2)])),
        ])
    }

    fn set(mut self, field: &str, bytes: Vec<u8>) -> Raw {
        let slot = self
            .0
            .iter_mut()
            .find(|(name, _)| *name == field)
            .expect("a field of the layout");
        slot.1 = bytes;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|(_, b)| b.iter().copied()).collect()
    }

    fn payload(&self) -> Vec<u8> {
        compress(&self.bytes())
    }
}

/// The brief's payload: a one-record batch whose `id_hi` column holds
/// `values` zero varints (one byte each, eight as an `i64`).
fn oversized_id_hi(values: usize) -> Vec<u8> {
    Raw::one_entry()
        .set("id_hi", column(values as u64, &vec![0; values]))
        .payload()
}

/// A batch of `n` entries whose first name is `len` bytes and every later
/// one shares all of it with its predecessor: a few bytes that decode to
/// `n * len` bytes of names.
fn name_amplifier(n: usize, len: usize) -> Vec<u8> {
    let mut prefix = vec![0u64];
    prefix.extend(std::iter::repeat_n(len as u64, n - 1));
    let mut suffix = vec![len as u64];
    suffix.extend(std::iter::repeat_n(0, n - 1));
    let zeros = vec![0u64; n];
    let ids: Vec<u64> = (0..n).map(|_| zigzag(1)).collect();
    Raw::one_entry()
        .set("count", scalar(n as u64))
        .set("id_hi", varints(&ids))
        .set("id_lo", column(8 * n as u64, &vec![1; 8 * n]))
        .set("loc", varints(&zeros))
        .set("parent", varints(&zeros))
        .set("name_prefix", varints(&prefix))
        .set("name_suffix", varints(&suffix))
        .set("names", column(len as u64, &vec![b'a'; len]))
        .set("flags", column(n as u64, &vec![0; n]))
        .set("size", varints(&zeros))
        .set("created", varints(&zeros))
        .set("modified", varints(&zeros))
        .set("seq", varints(&vec![zigzag(1); n]))
        .payload()
}

/// Two entries; the second's parent is a back-reference `u64::MAX`, whose
/// distance (`-i64::MAX`) overflowed `i - distance`.
fn parent_overflow() -> Vec<u8> {
    Raw::one_entry()
        .set("count", scalar(2))
        .set("id_hi", varints(&[zigzag(42), zigzag(1)]))
        .set("id_lo", column(16, &[9; 16]))
        .set("loc", varints(&[0, 0]))
        .set("parent", varints(&[0, u64::MAX]))
        .set("name_prefix", varints(&[0, 0]))
        .set("name_suffix", varints(&[1, 1]))
        .set("names", column(2, b"ab"))
        .set("flags", column(2, &[1, 0]))
        .set("size", varints(&[0, 0]))
        .set("created", varints(&[0, 0]))
        .set("modified", varints(&[0, 0]))
        .set("seq", varints(&[zigzag(2), zigzag(1)]))
        .payload()
}

// ---------------------------------------------------------------- tests

#[test]
fn the_hand_built_batch_is_valid() {
    // The hostile cases below differ from this batch in one field: it must
    // decode, or they would prove nothing.
    let _g = lock();
    let records = decode_records(&Raw::one_entry().payload(), &BatchLimits::default())
        .expect("the one-entry batch decodes");
    assert_eq!(records.len(), 1);
    let Record::Entry(e) = &records[0] else {
        panic!("an entry");
    };
    assert_eq!((e.name.as_str(), e.seq.0), ("a", 2));
    assert_eq!(
        decode_records(&encode_records(&records), &BatchLimits::default()).expect("re-encoded"),
        records
    );
}

/// The payload: about 260 KiB that decompress to 64 MiB of one-byte
/// varints in a column declared for 64 Mi values of a one-record batch.
/// Before the fix postcard built a 512 MiB `Vec<i64>` before the column
/// lengths were checked.
#[test]
fn a_column_longer_than_the_count_is_refused_before_it_is_allocated() {
    let _g = lock();
    let payload = oversized_id_hi(64 * MIB - 100);
    // With a record limit that lets the payload decompress in full, so the
    // column bound itself is what is measured.
    let wide = BatchLimits {
        max_records: 1 << 20,
        ..BatchLimits::default()
    };
    assert_eq!(wide.decompressed_limit(), 64 * MIB);
    let (outcome, peak) = decode_printed("id_hi of 64 Mi values, 1 record", &payload, &wide);
    assert!(
        matches!(
            outcome,
            Err(DecodeError::ColumnLength {
                column: "id_hi",
                count: 1,
                ..
            })
        ),
        "{outcome:?}"
    );
    // The decompressed buffer and next to nothing else.
    assert!(peak < 64 * MIB + MIB, "peak {peak} B");
    assert!(peak < CEILING);

    // Under the default limits the same payload cannot even decompress:
    // 65,536 records may take 32 MiB, not 64.
    let (outcome, peak) = decode_printed(
        "id_hi of 64 Mi values, default limits",
        &payload,
        &BatchLimits::default(),
    );
    assert!(
        matches!(outcome, Err(DecodeError::DecompressedTooLarge { .. })),
        "{outcome:?}"
    );
    assert!(peak < MIB, "peak {peak} B");
}

/// Each length-prefixed column in turn declares 4 Mi values and holds them
/// (zero bytes, valid values of every column), in a one-record batch.
#[test]
fn every_oversized_column_is_refused_within_its_decompressed_size() {
    let _g = lock();
    let big = 4 * MIB;
    let mut checked = 0;
    let mut failures = Vec::new();
    for field in FIELDS {
        if field == "layout" || field == "count" {
            continue;
        }
        let raw = Raw::one_entry().set(field, column(big as u64, &vec![0; big]));
        let payload = raw.payload();
        let (outcome, peak) = decode_printed(
            &format!("{field} of 4 Mi values"),
            &payload,
            &BatchLimits::default(),
        );
        match (&outcome, field) {
            (Err(DecodeError::TooManyRecords { .. }), "locations") => {}
            (Err(DecodeError::ColumnLength { column, .. }), _) if *column == field => {}
            _ => failures.push(format!("{field}: unexpected outcome {outcome:?}")),
        }
        // The decompressed copy (4 MiB and a few bytes) and no column.
        if peak >= big + MIB / 4 {
            failures.push(format!("{field}: peak {peak} B"));
        }
        checked += 1;
    }
    assert_eq!(checked, 16);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Each length-prefixed column in turn declares far more values than the
/// payload holds (2^40, then u64::MAX), in a one-record batch.
#[test]
fn every_column_declaring_more_than_the_payload_is_refused_cheaply() {
    let _g = lock();
    for declared in [1u64 << 40, u64::MAX] {
        for field in FIELDS {
            if field == "layout" || field == "count" {
                continue;
            }
            let payload = Raw::one_entry().set(field, column(declared, &[])).payload();
            let (outcome, peak) = decode_measured(&payload, &BatchLimits::default());
            assert!(
                matches!(
                    outcome,
                    Err(DecodeError::ColumnLength { .. }
                        | DecodeError::TooManyRecords { .. }
                        | DecodeError::Malformed(_))
                ),
                "{field} declaring {declared}: {outcome:?}"
            );
            assert!(
                peak < 64 << 10,
                "{field} declaring {declared}: peak {peak} B"
            );
        }
    }
}

/// Huge declared record counts: refused against `max_records` before any
/// per-record column, whatever the columns declare.
#[test]
fn a_huge_record_count_is_refused_before_any_column() {
    let _g = lock();
    for count in [u64::from(u32::MAX), 65_537, 1 << 20] {
        let payload = Raw::one_entry().set("count", scalar(count)).payload();
        let (outcome, peak) =
            decode_printed(&format!("count {count}"), &payload, &BatchLimits::default());
        assert!(
            matches!(outcome, Err(DecodeError::TooManyRecords { count: c, max: 65_536 }) if c == count),
            "{outcome:?}"
        );
        assert!(peak < 64 << 10, "peak {peak} B");
    }
    // A count above u32 does not fit the field.
    let payload = Raw::one_entry().set("count", scalar(1 << 40)).payload();
    let (outcome, _) = decode_measured(&payload, &BatchLimits::default());
    assert!(
        matches!(outcome, Err(DecodeError::Malformed(_))),
        "{outcome:?}"
    );
    // The largest count allowed, with columns sized for one record: the
    // first column is refused, and nothing was reserved for 65,536 records.
    let payload = Raw::one_entry().set("count", scalar(65_536)).payload();
    let (outcome, peak) = decode_printed(
        "count 65,536, columns of one",
        &payload,
        &BatchLimits::default(),
    );
    assert!(
        matches!(
            outcome,
            Err(DecodeError::ColumnLength {
                column: "loc_table" | "id_hi",
                ..
            })
        ),
        "{outcome:?}"
    );
    assert!(peak < 64 << 10, "peak {peak} B");
    // As many location records as the limit allows, declared and absent.
    let payload = Raw::one_entry()
        .set("locations", column(65_536, &[]))
        .payload();
    let (outcome, peak) = decode_measured(&payload, &BatchLimits::default());
    assert!(
        matches!(outcome, Err(DecodeError::Malformed(_))),
        "{outcome:?}"
    );
    assert!(peak < 64 << 10, "peak {peak} B");
}

/// Names share a prefix with the previous name: 4,096 names of 64 KiB from
/// 64 KiB of name bytes would be 256 MiB of strings. Decoded text is
/// bounded like the decompressed payload.
#[test]
fn names_cannot_expand_past_the_limit_through_shared_prefixes() {
    let _g = lock();
    let payload = name_amplifier(4096, 64 << 10);
    let limits = BatchLimits::default();
    let (outcome, peak) = decode_printed("4,096 names of 64 KiB", &payload, &limits);
    assert!(
        matches!(&outcome, Err(DecodeError::Malformed(m)) if m.contains("text")),
        "{outcome:?}"
    );
    assert!(
        peak < limits.decompressed_limit() + 4 * MIB,
        "peak {peak} B"
    );
    assert!(peak < CEILING);
    // The same shape within the limit decodes, and round-trips.
    let payload = name_amplifier(64, 1000);
    let records = decode_records(&payload, &limits).expect("64 names of 1000 bytes decode");
    assert_eq!(records.len(), 64);
    assert_eq!(
        decode_records(&encode_records(&records), &limits).expect("re-encoded"),
        records
    );
}

/// A parent back-reference of `u64::MAX` is a distance of `-i64::MAX`:
/// `i - distance` overflowed (a panic in debug builds).
#[test]
fn a_parent_back_reference_that_overflows_is_refused() {
    let _g = lock();
    let outcome = decode_records(&parent_overflow(), &BatchLimits::default());
    assert!(
        matches!(
            outcome,
            Err(DecodeError::BadReference {
                column: "parent",
                index: u64::MAX
            })
        ),
        "{outcome:?}"
    );
}

/// A block that declares more than lz4 can expand its bytes to (255 times)
/// is refused before its buffer is allocated.
#[test]
fn an_lz4_block_declaring_more_than_it_can_hold_is_refused_unallocated() {
    let _g = lock();
    let mut payload = (30 * MIB as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(&[0xff; 64]);
    let (outcome, peak) =
        decode_printed("64 B declaring 30 MiB", &payload, &BatchLimits::default());
    assert!(matches!(outcome, Err(DecodeError::Lz4(_))), "{outcome:?}");
    assert!(peak < 64 << 10, "peak {peak} B");
}

// ---------------------------------------------------------------- regressions

/// `fuzz/regressions/record_batch/`: inputs of the `record_batch` fuzz target.
fn regressions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/record_batch")
}

/// The regressions this file knows, and the refusal each must get: (file,
/// what the bytes are).
const KNOWN: [(&str, &str); 3] = [
    ("oversized-id_hi-column", "id_hi"),
    ("parent-backref-overflow", "parent"),
    ("name-prefix-amplification", "text"),
];

/// Replays every input of the `record_batch` fuzz target's regressions the
/// way the target does (as the payload, and lz4-wrapped): no panic, at most
/// the limit's worth of allocation, and whatever decodes round-trips.
#[test]
fn record_batch_fuzz_regressions_replay_cleanly() {
    let _g = lock();
    let limits = BatchLimits::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(regressions_dir())
        .expect("fuzz/regressions/record_batch exists")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= KNOWN.len(), "{files:?}");
    for path in &files {
        let data = std::fs::read(path).expect("a regression file");
        for (how, payload) in [("as is", data.clone()), ("lz4-wrapped", compress(&data))] {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let (outcome, peak) = decode_printed(&format!("{name:?} {how}"), &payload, &limits);
            assert!(
                peak < limits.decompressed_limit() * 2 + 16 * MIB && peak < CEILING,
                "{path:?} {how}: peak {peak} B"
            );
            match outcome {
                Ok(records) => assert_eq!(
                    decode_records(&encode_records(&records), &limits).ok(),
                    Some(records),
                    "{path:?} {how}: decoded records must round-trip"
                ),
                Err(e) => assert!(
                    !matches!(e, DecodeError::Io(_)),
                    "{path:?} {how}: unexpected {e:?}"
                ),
            }
        }
    }
}

/// The known regressions are refused for the reason they were saved for.
#[test]
fn known_record_batch_regressions_get_their_refusal() {
    let _g = lock();
    for (file, reason) in KNOWN {
        let data = std::fs::read(regressions_dir().join(file)).expect("the regression file");
        let outcome = decode_records(&data, &BatchLimits::default());
        let ok = match &outcome {
            Err(DecodeError::ColumnLength { column, .. }) => *column == reason,
            Err(DecodeError::BadReference { column, .. }) => *column == reason,
            Err(DecodeError::Malformed(m)) => m.contains(reason),
            _ => false,
        };
        assert!(
            ok,
            "{file}: expected a refusal for {reason}, got {outcome:?}"
        );
    }
}

/// Writes the regression files from the builders above. Run by hand with
/// `cargo test -p sync-core --test alloc_limits -- --ignored` after changing
/// a builder; the files are committed.
#[test]
#[ignore = "writes fuzz/regressions/record_batch/"]
fn write_record_batch_regressions() {
    let dir = regressions_dir();
    std::fs::create_dir_all(&dir).expect("the regressions directory");
    let files = [
        // 16 MiB of one-byte varints declared as one record's id_hi: a
        // 128 MiB Vec<i64> before the fix.
        ("oversized-id_hi-column", oversized_id_hi(16 * MIB)),
        ("parent-backref-overflow", parent_overflow()),
        // 4,096 names of 64 KiB through shared prefixes: 256 MiB of names.
        ("name-prefix-amplification", name_amplifier(4096, 64 << 10)),
    ];
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("a regression file");
    }
}
