//! Codec tests: property round-trips of every message and record batch,
//! and a table of hostile inputs, each with its own error variant.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use super::*;
use crate::id::*;
use crate::message::ErrorCode;
use crate::model::{Entry, EntryKind, Location, Record};
use crate::records::{BatchLimits, decode_records, encode_records};

fn arb_uuid() -> impl Strategy<Value = uuid::Uuid> {
    any::<[u8; 16]>().prop_map(uuid::Uuid::from_bytes)
}

fn arb_time() -> impl Strategy<Value = DateTime<Utc>> {
    (-62_135_596_800_000_000i64..253_402_300_799_000_000i64)
        .prop_map(crate::model::micros::from_micros)
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        (arb_uuid(), arb_uuid(), proptest::option::of(arb_uuid())),
        ".{0,40}",
        0u8..3,
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        (arb_time(), arb_time()),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |((id, loc, parent), name, kind, size, inode, (c, m), seq, deleted)| Entry {
                id: EntryId(id),
                location: LocationId(loc),
                parent: parent.map(EntryId),
                name,
                kind: EntryKind::from_code(kind).unwrap(),
                size,
                inode,
                created_at: c,
                modified_at: m,
                seq: Seq(seq),
                deleted,
            },
        )
}

fn arb_location() -> impl Strategy<Value = Location> {
    (
        arb_uuid(),
        arb_uuid(),
        ".{0,30}",
        ".{0,10}",
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(id, owner, path, name, seq, deleted)| Location {
            id: LocationId(id),
            owner: DeviceId(owner),
            path,
            name,
            seq: Seq(seq),
            deleted,
        })
}

fn arb_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        arb_entry().prop_map(Record::Entry),
        arb_location().prop_map(Record::Location)
    ]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::ProtocolMismatch),
        Just(ErrorCode::LibraryMismatch),
        Just(ErrorCode::IdentityMismatch),
        Just(ErrorCode::Malformed),
        Just(ErrorCode::Gap),
        Just(ErrorCode::ForeignOwner),
        Just(ErrorCode::WrongIndex),
        Just(ErrorCode::BadSnapshot),
        Just(ErrorCode::Unexpected),
        Just(ErrorCode::Storage),
        Just(ErrorCode::Shutdown),
        Just(ErrorCode::Busy),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    let dev = || arb_uuid().prop_map(DeviceId);
    prop_oneof![
        (any::<u32>(), dev(), arb_uuid(), ".{0,20}").prop_map(|(protocol, device, l, name)| {
            Message::Hello {
                protocol,
                device,
                library: LibraryId(l),
                name,
            }
        }),
        proptest::collection::vec((dev(), any::<u64>(), any::<u64>()), 0..8).prop_map(|v| {
            Message::Watermarks(
                v.into_iter()
                    .map(|(d, i, s)| (d, IndexId(i), Seq(s)))
                    .collect(),
            )
        }),
        (dev(), any::<u64>(), any::<u64>(), arb_record()).prop_map(|(owner, i, a, record)| {
            Message::StateChange {
                owner,
                index_id: IndexId(i),
                after: Seq(a),
                record,
            }
        }),
        (
            arb_uuid(),
            dev(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..3000)
        )
            .prop_map(|(t, owner, i, a, l, count, payload)| Message::StateBatch {
                transfer: TransferId(t),
                owner,
                index_id: IndexId(i),
                after: Seq(a),
                last: Seq(l),
                count,
                payload,
            }),
        (arb_uuid(), any::<u64>()).prop_map(|(t, l)| Message::BatchAck {
            transfer: TransferId(t),
            last: Seq(l)
        }),
        (
            dev(),
            any::<u64>(),
            proptest::option::of(arb_uuid()),
            any::<u64>(),
            any::<u64>(),
            any::<i64>()
        )
            .prop_map(|(owner, i, loc, n, m, at)| Message::BulkIndexComplete {
                owner,
                index_id: IndexId(i),
                location: loc.map(LocationId),
                entry_count: n,
                max_seq: Seq(m),
                indexed_at: at,
            }),
        (
            arb_uuid(),
            dev(),
            any::<u64>(),
            proptest::option::of(arb_uuid()),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(t, owner, i, loc, a, m)| Message::FetchRequest {
                transfer: TransferId(t),
                owner,
                index_id: IndexId(i),
                location: loc.map(LocationId),
                after: Seq(a),
                max_batches: m,
            }),
        (
            arb_uuid(),
            dev(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(id, owner, i, m, e, b, c, hash)| Message::SnapshotOffer {
                id: SnapshotId(id),
                owner,
                index_id: IndexId(i),
                max_seq: Seq(m),
                entries: e,
                bytes: b,
                chunks: c,
                hash,
            }),
        (arb_uuid(), any::<u32>()).prop_map(|(id, f)| Message::SnapshotRequest {
            id: SnapshotId(id),
            from_chunk: f
        }),
        (
            arb_uuid(),
            any::<u32>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(id, index, hash, data)| Message::SnapshotChunk {
                id: SnapshotId(id),
                index,
                hash,
                data,
            }),
        (arb_code(), ".{0,40}").prop_map(|(code, message)| Message::Error { code, message }),
        Just(Message::Keepalive),
    ]
}

fn encode(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode(msg, &mut buf).unwrap();
    buf
}

proptest! {
    #[test]
    fn every_message_round_trips(msg in arb_message()) {
        let mut buf = encode(&msg);
        let got = FrameCodec::default().decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(msg));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn partial_frames_wait_for_more(msg in arb_message(), cut in 0usize..64) {
        let full = encode(&msg);
        let cut = cut.min(full.len() - 1);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&full[..cut]);
        prop_assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&full[cut..]);
        prop_assert_eq!(codec.decode(&mut buf).unwrap(), Some(msg));
    }

    #[test]
    fn record_batches_round_trip(records in proptest::collection::vec(arb_record(), 0..60)) {
        let bytes = encode_records(&records);
        let got = decode_records(&bytes, &BatchLimits::default()).unwrap();
        // The layout keeps locations first, entries in their order.
        let mut want: Vec<Record> =
            records.iter().filter(|r| matches!(r, Record::Location(_))).cloned().collect();
        want.extend(records.iter().filter(|r| matches!(r, Record::Entry(_))).cloned());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = FrameCodec::default().decode(&mut buf);
        let _ = decode_records(&bytes, &BatchLimits::default());
    }
}

#[test]
fn entries_sharing_parents_and_names_round_trip() {
    let loc = LocationId::new_v7();
    let root = EntryId::new_v7();
    let mut records = Vec::new();
    for i in 0..300u64 {
        records.push(Record::Entry(Entry {
            id: if i == 0 { root } else { EntryId::new_v7() },
            location: loc,
            parent: (i > 0).then_some(root),
            name: format!("photo-{i:05}.jpg"),
            kind: EntryKind::File,
            size: i * 1000,
            inode: Some(1000 + i),
            created_at: crate::model::micros::from_micros(1_700_000_000_000_000 + i as i64),
            modified_at: crate::model::micros::from_micros(1_700_000_000_000_000 - i as i64),
            seq: Seq(i + 1),
            deleted: false,
        }));
    }
    let bytes = encode_records(&records);
    assert!(bytes.len() < records.len() * 25, "{} bytes", bytes.len());
    assert_eq!(
        decode_records(&bytes, &BatchLimits::default()).unwrap(),
        records
    );
}

fn frame(len: u32, flags: u8, payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&[flags]);
    b.extend_from_slice(payload);
    b
}

/// One hostile input, and whether the codec's error is the right variant.
struct Hostile {
    name: &'static str,
    bytes: BytesMut,
    eof: bool,
    check: fn(&DecodeError) -> bool,
}

#[test]
fn hostile_inputs_get_their_own_errors() {
    let valid = encode(&Message::Keepalive);
    let mut four_gib = vec![0xff, 0xff, 0xff, 0xff];
    four_gib.extend_from_slice(&[0u8; 16]);
    let cases = vec![
        Hostile {
            name: "oversized length header",
            bytes: frame(u32::MAX, 0, &[]),
            eof: false,
            check: |e| matches!(e, DecodeError::FrameTooLarge { len, .. } if *len == u32::MAX as u64),
        },
        Hostile {
            name: "lz4 block declaring 4 GiB",
            bytes: frame(four_gib.len() as u32, FLAG_LZ4, &four_gib),
            eof: false,
            check: |e| matches!(e, DecodeError::DecompressedTooLarge { declared, .. } if *declared == u32::MAX as u64),
        },
        Hostile {
            name: "truncated frame at end of stream",
            bytes: BytesMut::from(&valid[..valid.len() - 1]),
            eof: true,
            check: |e| matches!(e, DecodeError::Truncated { .. }),
        },
        Hostile {
            name: "truncated header at end of stream",
            bytes: BytesMut::from(&[0u8, 0][..]),
            eof: true,
            check: |e| matches!(e, DecodeError::Truncated { have: 2, need: 5 }),
        },
        Hostile {
            name: "unknown message tag",
            bytes: frame(1, 0, &[Message::VARIANT_COUNT as u8]),
            eof: false,
            check: |e| matches!(e, DecodeError::UnknownTag(t) if *t == Message::VARIANT_COUNT),
        },
        Hostile {
            name: "empty payload",
            bytes: frame(0, 0, &[]),
            eof: false,
            check: |e| matches!(e, DecodeError::EmptyPayload),
        },
        Hostile {
            name: "unknown flag bits",
            bytes: frame(1, 0x80, &[11]),
            eof: false,
            check: |e| matches!(e, DecodeError::UnknownFlags(0x80)),
        },
        Hostile {
            name: "corrupt lz4 block",
            bytes: frame(8, FLAG_LZ4, &[100, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            eof: false,
            check: |e| matches!(e, DecodeError::Lz4(_)),
        },
        Hostile {
            name: "random bytes as a message",
            bytes: frame(6, 0, &[0, 0xff, 0xff, 0xff, 0xff, 0xff]),
            eof: false,
            check: |e| matches!(e, DecodeError::Malformed(_)),
        },
        Hostile {
            name: "trailing bytes after a message",
            bytes: frame(2, 0, &[11, 0]),
            eof: false,
            check: |e| matches!(e, DecodeError::Malformed(_)),
        },
    ];
    for case in cases {
        let mut codec = FrameCodec::default();
        let mut buf = case.bytes;
        let started = Instant::now();
        let got = if case.eof {
            codec.decode_eof(&mut buf)
        } else {
            codec.decode(&mut buf)
        };
        match got {
            Err(e) => assert!((case.check)(&e), "{}: wrong error {e:?}", case.name),
            Ok(m) => panic!("{}: accepted as {m:?}", case.name),
        }
        // Refusals happen on the header: no decompression, no big allocation.
        assert!(started.elapsed() < Duration::from_secs(1), "{}", case.name);
    }
}

#[test]
fn oversized_header_reserves_nothing() {
    let mut buf = frame(u32::MAX, 0, &[]);
    let cap = buf.capacity();
    assert!(FrameCodec::default().decode(&mut buf).is_err());
    assert_eq!(buf.capacity(), cap);
}

#[test]
fn encoder_refuses_oversized_frames() {
    let codec = FrameCodec::new(Limits {
        max_frame: 64,
        ..Limits::default()
    });
    let fits = Message::Error {
        code: ErrorCode::Malformed,
        message: "x".repeat(40),
    };
    // Below the compression threshold, so 100 bytes stay 100 bytes.
    let big = Message::Error {
        code: ErrorCode::Malformed,
        message: "x".repeat(100),
    };
    assert!(codec.encode_frame(&fits, &mut BytesMut::new()).is_ok());
    assert!(matches!(
        codec.encode_frame(&big, &mut BytesMut::new()),
        Err(EncodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn compression_only_when_it_saves_space() {
    let big = Message::Error {
        code: ErrorCode::Malformed,
        message: "a".repeat(10_000),
    };
    let buf = encode(&big);
    assert_eq!(buf[4] & FLAG_LZ4, FLAG_LZ4);
    assert!(buf.len() < 1000);
    let small = encode(&Message::Keepalive);
    assert_eq!(small[4], 0);
    let noise: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let batch = Message::SnapshotChunk {
        id: SnapshotId::new_v7(),
        index: 0,
        hash: [0; 32],
        data: noise,
    };
    let buf = encode(&batch);
    let mut b = buf.clone();
    assert_eq!(FrameCodec::default().decode(&mut b).unwrap(), Some(batch));
    // Chunks and batch payloads are lz4 blocks already: never compressed
    // again, however compressible their bytes look.
    let chunk = Message::SnapshotChunk {
        id: SnapshotId::new_v7(),
        index: 1,
        hash: [0; 32],
        data: vec![b'a'; 4000],
    };
    let buf = encode(&chunk);
    assert_eq!(buf[4], 0, "a chunk frame is not compressed twice");
    let mut b = buf.clone();
    assert_eq!(FrameCodec::default().decode(&mut b).unwrap(), Some(chunk));
}

/// Regression (found by the `frame_decoder` fuzz target): a timestamp beyond
/// chrono's range saturated to `MAX_UTC`, which carries nanoseconds, so the
/// decoded message encoded to another one (the wire keeps microseconds).
#[test]
fn saturated_timestamps_encode_back_to_themselves() {
    use crate::model::micros::{from_micros, to_micros};
    for us in [i64::MAX, i64::MIN, i64::MAX - 1, i64::MIN + 1, 0, -1] {
        let t = from_micros(us);
        assert_eq!(from_micros(to_micros(&t)), t, "{us}");
    }
    // The fuzzer's input: mode byte 0, no splits, then this stream.
    let crash: &[u8] = &[
        0, 0, 0, 75, 0, 2, 61, 0, 0, 0, 0, 0, 128, 0, 5, 132, 142, 123, 255, 255, 255, 255, 255,
        255, 247, 255, 0, 255, 0, 1, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0, 128, 0, 5, 255, 255, 255, 255,
        255, 255, 247, 255, 255, 0, 255, 0, 1, 3, 11, 0, 0, 0, 0, 0, 0, 0, 12, 0, 3, 252, 255, 255,
        187, 253, 255, 255, 255, 255, 1, 0, 0, 2, 255, 255, 255, 255, 255,
    ];
    let mut buf = BytesMut::from(crash);
    let mut decoded = 0;
    while let Ok(Some(msg)) = FrameCodec::default().decode_eof(&mut buf) {
        let mut again = encode(&msg);
        assert_eq!(FrameCodec::default().decode(&mut again).unwrap(), Some(msg));
        decoded += 1;
    }
    assert!(decoded > 0, "the crash input holds a frame");
}

/// A size-prepended block of `body` declaring `declared` bytes.
fn lying_block(declared: u32, body: &[u8]) -> Vec<u8> {
    let mut block = declared.to_le_bytes().to_vec();
    block.extend_from_slice(body);
    block
}

/// Regression: `decompress_checked` allocated (zeroed) whatever the size
/// prefix declared, up to the limit, before decompressing: 68 bytes cost
/// 30 MiB. A block declaring more than 255 times its bytes is refused
/// first, by frames, batches and snapshot chunks alike.
#[test]
fn decompress_checked_refuses_a_size_prefix_beyond_lz4_expansion() {
    fn expansion(r: &Result<Vec<u8>, DecodeError>) -> bool {
        matches!(r, Err(DecodeError::Lz4(m)) if m.contains("cannot expand"))
    }
    let block = lying_block(30 << 20, &[0xff; 64]);
    assert_eq!(block.len(), 68);
    let got = decompress_checked(&block, 64 << 20);
    assert!(expansion(&got), "{got:?}");
    // The bound is exact: 255 bytes per byte of the block, one more is refused.
    let at = lying_block(64 * 255, &[0xff; 64]);
    let got = decompress_checked(&at, 64 << 20);
    assert!(
        matches!(&got, Err(DecodeError::Lz4(_))) && !expansion(&got),
        "{got:?}"
    );
    let above = lying_block(64 * 255 + 1, &[0xff; 64]);
    assert!(expansion(&decompress_checked(&above, 64 << 20)));
    // The limit is reported as before when the block declares more than it.
    assert!(matches!(
        decompress_checked(&lying_block(2 << 20, &[0; 64]), 1 << 20),
        Err(DecodeError::DecompressedTooLarge { declared, max }) if declared == 2 << 20 && max == 1 << 20
    ));
    // In a frame.
    let mut buf = frame(block.len() as u32, FLAG_LZ4, &block);
    let got = FrameCodec::default().decode(&mut buf);
    assert!(
        matches!(&got, Err(DecodeError::Lz4(m)) if m.contains("cannot expand")),
        "{got:?}"
    );
    // As a record batch.
    let got = decode_records(&block, &BatchLimits::default());
    assert!(
        matches!(&got, Err(DecodeError::Lz4(m)) if m.contains("cannot expand")),
        "{got:?}"
    );
}

/// The most compressible inputs stay within the bound: the check cannot
/// refuse what lz4 (this encoder or another) produced.
#[test]
fn the_most_compressible_blocks_expand_within_the_bound() {
    for len in [0, 1, 12, 13, 255, 4096, 65_536, 1 << 20, 16 << 20] {
        let data = vec![0u8; len];
        let block = compress(&data);
        let body = (block.len() - 4) as u64;
        assert!(len as u64 <= body * LZ4_MAX_EXPANSION, "{len} from {body}");
        assert_eq!(decompress_checked(&block, 16 << 20).unwrap(), data, "{len}");
    }
}

proptest! {
    #[test]
    fn runs_of_bytes_expand_within_the_bound(
        runs in proptest::collection::vec((any::<u8>(), 1usize..20_000), 0..16)
    ) {
        let data: Vec<u8> = runs.iter().flat_map(|&(b, n)| std::iter::repeat_n(b, n)).collect();
        let block = compress(&data);
        prop_assert!(data.len() as u64 <= (block.len() as u64 - 4) * LZ4_MAX_EXPANSION);
        prop_assert_eq!(decompress_checked(&block, 1 << 20).unwrap(), data);
    }
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

#[test]
fn watermarks_tag_is_its_variant_index() {
    let raw = postcard::to_stdvec(&Message::Watermarks(Vec::new())).unwrap();
    assert_eq!(raw, [Message::WATERMARKS_TAG as u8, 0]);
}

/// Regression: `Watermarks` was deserialized at whatever length it
/// declared. At most `MAX_OWNERS` entries now, on both sides.
#[test]
fn watermarks_are_bounded_by_max_owners() {
    use crate::message::MAX_OWNERS;
    let mut codec = FrameCodec::default();
    // The largest list allowed round-trips.
    let most = Message::Watermarks(watermarks(MAX_OWNERS));
    let mut buf = encode(&most);
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(most));
    assert!(buf.is_empty());

    // One more: the encoder refuses it.
    let over = Message::Watermarks(watermarks(MAX_OWNERS + 1));
    assert!(matches!(
        codec.encode_frame(&over, &mut BytesMut::new()),
        Err(EncodeError::Serialize(m)) if m.contains("65537 owners")
    ));
    // Spelled out by another encoder, the decoder refuses it, naming the bound.
    let raw = postcard::to_stdvec(&over).unwrap();
    let got = decode_message(&raw);
    assert!(
        matches!(&got, Err(DecodeError::Malformed(m)) if m.contains("65537 owners") && m.contains("65536")),
        "{got:?}"
    );
    // The bound is the deserializer's, not the codec's: postcard alone refuses it.
    assert!(postcard::from_bytes::<Message>(&raw).is_err());
    // A list declaring more than it holds.
    let mut short = vec![Message::WATERMARKS_TAG as u8];
    short.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    short.extend_from_slice(&raw[4..1000]);
    let got = decode_message(&short);
    assert!(
        matches!(&got, Err(DecodeError::Malformed(m)) if m.contains("4294967295 owners")),
        "{got:?}"
    );
    // Other malformed messages keep postcard's reason.
    let got = decode_message(&[Message::WATERMARKS_TAG as u8, 2, 0]);
    assert!(
        matches!(&got, Err(DecodeError::Malformed(m)) if !m.contains("owners")),
        "{got:?}"
    );
}
