//! Peak allocation of the wire codec on hostile frames and blocks, measured
//! by the counting global allocator of `support`: lz4 blocks whose size prefix lies
//! (`decompress_checked`), `Watermarks` lists longer than [`MAX_OWNERS`],
//! and record batches decoded under the count their frame declares.
//!
//! A hostile input may only cost what its own bytes justify: a block at
//! most 255 times its size, a message its decompressed payload and lists
//! bounded by the protocol, a batch what its declared record count allows.
//!
//! The allocator counts every allocation of this test binary, so the tests
//! take one lock and measure one at a time.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use sync_core::codec::{FLAG_LZ4, compress, decompress_checked};
use sync_core::message::MAX_OWNERS;
use sync_core::records::BatchLimits;
use sync_core::synthetic::SyntheticTree;
use sync_core::{
    DecodeError, DeviceId, FrameCodec, IndexId, Limits, Message, Record, SNAPSHOT_CHUNK_SIZE, Seq,
    decode_records, encode_records,
};

mod support;
use support::{MIB, lock, measure, varint};

// ---------------------------------------------------------------- inputs

const KIB: usize = 1 << 10;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB as f64
}

/// A size-prepended lz4 block of `body` that declares `declared` bytes.
fn lying_block(declared: u32, body: &[u8]) -> Vec<u8> {
    let mut block = declared.to_le_bytes().to_vec();
    block.extend_from_slice(body);
    block
}

/// A complete frame around `payload`.
fn frame(flags: u8, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(payload);
    b
}

/// The postcard bytes of a `Watermarks` message that declares `declared`
/// entries and holds `held` copies of one 18-byte entry (a 16-byte id,
/// index 1, seq 1): the smallest entry on the wire.
fn watermarks_payload(declared: u64, held: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(16 + held * 18);
    varint(&mut raw, 1); // the `Watermarks` tag
    varint(&mut raw, declared);
    for _ in 0..held {
        raw.extend_from_slice(&[7; 16]);
        raw.extend_from_slice(&[1, 1]);
    }
    raw
}

/// `n` distinct watermark entries.
fn watermarks(n: usize) -> Vec<(DeviceId, IndexId, Seq)> {
    (0..n as u64)
        .map(|i| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&i.to_be_bytes());
            (DeviceId::from_bytes(id), IndexId(i), Seq(u64::MAX - i))
        })
        .collect()
}

fn decode_frame(buf: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
    FrameCodec::default().decode(buf)
}

// ---------------------------------------------------------------- lz4 blocks

/// Hole 1: `decompress_checked` allocated, zeroed, the size a block's
/// prefix declared (up to the limit) before decompressing, so a 68-byte
/// block cost 30 MiB per frame, batch or snapshot chunk. A block cannot
/// expand more than 255 times: one declaring more is refused unallocated.
#[test]
fn decompress_checked_refuses_a_lying_size_prefix_before_allocating() {
    let _g = lock();
    let block = lying_block(30 * MIB as u32, &[0xff; 64]);
    assert_eq!(block.len(), 68);

    let (outcome, peak) = measure(|| decompress_checked(&block, 64 * MIB));
    eprintln!("68 B block declaring 30 MiB: peak {peak} B: {outcome:?}");
    assert!(
        matches!(&outcome, Err(DecodeError::Lz4(m)) if m.contains("cannot expand")),
        "{outcome:?}"
    );
    assert!(peak < 4 * KIB, "peak {peak} B");

    // In a frame, under the codec's default 64 MiB limit.
    let mut buf = frame(FLAG_LZ4, &block);
    let (outcome, peak) = measure(|| decode_frame(&mut buf));
    eprintln!("frame of it: peak {peak} B: {outcome:?}");
    assert!(matches!(outcome, Err(DecodeError::Lz4(_))), "{outcome:?}");
    assert!(peak < 4 * KIB, "peak {peak} B");

    // As a snapshot chunk, whose limit is one chunk (1 MiB).
    let chunk = lying_block(SNAPSHOT_CHUNK_SIZE as u32, &[0xff; 64]);
    let (outcome, peak) = measure(|| decompress_checked(&chunk, SNAPSHOT_CHUNK_SIZE));
    eprintln!("68 B chunk declaring 1 MiB: peak {peak} B: {outcome:?}");
    assert!(matches!(outcome, Err(DecodeError::Lz4(_))), "{outcome:?}");
    assert!(peak < 4 * KIB, "peak {peak} B");

    // A genuine block of the same ratio class still decompresses, and
    // costs its output.
    let data = vec![0u8; 30 * MIB];
    let genuine = compress(&data);
    let (outcome, peak) = measure(|| decompress_checked(&genuine, 64 * MIB));
    eprintln!(
        "genuine {} B block of 30 MiB: peak {:.2} MiB",
        genuine.len(),
        mib(peak)
    );
    assert!(outcome.is_ok_and(|out| out == data));
    assert!(peak < 30 * MIB + KIB, "peak {peak} B");
}

// ---------------------------------------------------------------- watermarks

/// Hole 2: `Watermarks` was deserialized at whatever length it declared.
/// An entry is 18 bytes on the wire and 32 in memory, so a frame declaring
/// 4 Mi entries and holding the 3.7 Mi that fit in 64 MiB built a `Vec` of
/// 119 MiB (128 MiB of capacity, and the 64 MiB it grew from). Now the
/// declared length is refused before anything is read for it.
#[test]
fn a_watermarks_frame_declaring_4m_entries_is_refused_with_bounded_peak() {
    let _g = lock();
    let declared = 4u64 << 20;
    let max = Limits::default().max_decompressed;
    let held = (max - 8) / 18;
    let raw = watermarks_payload(declared, held);
    assert!(raw.len() <= max);
    let packed = compress(&raw);
    assert!(packed.len() <= Limits::default().max_frame);
    let mut buf = frame(FLAG_LZ4, &packed);
    drop(raw);

    let (outcome, peak) = measure(|| decode_frame(&mut buf));
    eprintln!(
        "watermarks declaring {declared}, holding {held} ({} B frame): peak {:.2} MiB: {outcome:?}",
        packed.len(),
        mib(peak)
    );
    assert!(
        matches!(&outcome, Err(DecodeError::Malformed(m)) if m.contains("4194304 owners") && m.contains("65536")),
        "{outcome:?}"
    );
    // The decompressed payload (held × 18 B, under 64 MiB) and next to
    // nothing else: no list.
    let payload = 8 + held * 18;
    assert!(peak < payload + MIB, "peak {peak} B");

    // One entry over the bound, declared and held in full, is refused
    // just as early: the payload's cost and nothing for the list.
    let raw = watermarks_payload(MAX_OWNERS as u64 + 1, MAX_OWNERS + 1);
    let mut buf = frame(0, &raw);
    let (outcome, peak) = measure(|| decode_frame(&mut buf));
    eprintln!(
        "watermarks of {} entries ({} B): peak {peak} B: {outcome:?}",
        MAX_OWNERS + 1,
        raw.len()
    );
    assert!(
        matches!(&outcome, Err(DecodeError::Malformed(m)) if m.contains("65537 owners")),
        "{outcome:?}"
    );
    assert!(peak < 4 * KIB, "peak {peak} B");
}

/// A legitimate `Watermarks`, as long as the bound allows, still
/// round-trips, at the cost of its decompressed payload and a list
/// allocated once at its length.
#[test]
fn a_legit_watermarks_message_still_round_trips() {
    let _g = lock();
    for n in [0, 1, 3, MAX_OWNERS] {
        let msg = Message::Watermarks(watermarks(n));
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(&msg, &mut buf)
            .expect("a list within the bound encodes");
        let (outcome, peak) = measure(|| decode_frame(&mut buf));
        eprintln!("watermarks of {n}: peak {:.2} MiB", mib(peak));
        assert_eq!(outcome.expect("decodes"), Some(msg), "{n}");
        // The decompressed payload (at most ~29 B an entry) and one list
        // of 32 B an entry: no growth by doubling.
        assert!(peak <= n * (29 + 32) + 4 * KIB, "{n}: peak {peak} B");
    }
}

// ---------------------------------------------------------------- batches

/// Hole 3: the bulk-fetch receiver decoded a batch under the default
/// limits and compared the records to the frame's declared `count` only
/// afterwards, so a batch declaring one record could make it decode
/// 65,536. It now decodes under `max_records: count` (refusing a count
/// above the protocol's maximum before decoding): the payload is refused
/// from its size prefix, before it is decompressed.
#[test]
fn a_batch_decoded_under_its_declared_count_cannot_allocate_beyond_it() {
    let _g = lock();
    let owner = DeviceId::from_bytes([3; 16]);
    let tree = SyntheticTree::new(owner, 65_535, 7);
    let mut records = vec![Record::Location(tree.location())];
    records.extend(tree.map(Record::Entry));
    assert_eq!(records.len(), BatchLimits::default().max_records);
    let payload = encode_records(&records);
    drop(records);

    // The old call site: the default limits, whatever the frame declared.
    let (outcome, before) = measure(|| decode_records(&payload, &BatchLimits::default()));
    let decoded = outcome.expect("a genuine batch decodes").len();
    eprintln!(
        "{} B batch of {decoded} records declared as 1, default limits: peak {:.2} MiB",
        payload.len(),
        mib(before)
    );

    // The call site now: the limit follows the declared count.
    let declared: u32 = 1;
    let limits = BatchLimits {
        max_records: (declared as usize).min(BatchLimits::default().max_records),
        ..BatchLimits::default()
    };
    let (outcome, after) = measure(|| decode_records(&payload, &limits));
    eprintln!("the same, max_records 1: peak {after} B: {outcome:?}");
    assert!(
        matches!(outcome, Err(DecodeError::DecompressedTooLarge { .. })),
        "{outcome:?}"
    );
    assert!(after < 4 * KIB, "peak {after} B");
    assert!(before > 100 * after, "{before} B vs {after} B");
}
