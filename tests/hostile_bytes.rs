//! Bounded property-based fuzzing of the hostile-byte surfaces: random and
//! mutated frames into `FrameCodec`, random and mutated batch payloads into
//! `decode_records`, mutated snapshot chunks into `SnapshotDownload`. Each
//! property runs a fixed number of cases so the suite stays fast; the
//! open-ended fuzzing lives in `fuzz/` (cargo-fuzz).

use std::sync::OnceLock;

use bytes::BytesMut;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use sync_core::codec::{compress, decompress_checked};
use sync_core::synthetic::SyntheticTree;
use sync_core::{
    BatchLimits, DecodeError, DeviceId, Entry, EntryId, EntryKind, ErrorCode, FrameCodec, Hash,
    IndexId, LibraryId, Limits, Location, LocationId, Message, PROTOCOL_VERSION, Record,
    SNAPSHOT_CHUNK_SIZE, Seq, SnapshotId, TransferId, decode_records, encode_records,
};
use sync_storage::{
    LocalChange, OwnerSummary, SnapshotManifest, SnapshotOfferInfo, StorageError, Store,
};
use tokio_util::codec::Decoder;

/// Cases per property: bounded, so the whole file runs in seconds.
const CASES: u32 = 256;
/// Cases of the snapshot property (each case touches SQLite and fsyncs).
const SNAPSHOT_CASES: u32 = 128;

// ---------------------------------------------------------------- mutation

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Mutation {
    Xor { at: usize, mask: u8 },
    Set { at: usize, value: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(at, mask)| Mutation::Xor { at, mask }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..6)
}

fn apply(bytes: &[u8], edits: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in edits {
        let len = out.len();
        match m {
            Mutation::Xor { at, mask } if len > 0 => out[at % len] ^= mask,
            Mutation::Set { at, value } if len > 0 => out[at % len] = *value,
            Mutation::Insert { at, bytes } => {
                let at = at % (len + 1);
                out.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove { at, len: n } if len > 0 => {
                let at = at % len;
                out.drain(at..(at + n).min(len));
            }
            Mutation::Truncate { at } => out.truncate(at % (len + 1)),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------- frames

/// The errors a byte stream can legitimately earn from the frame codec.
fn is_frame_error(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::FrameTooLarge { .. }
            | DecodeError::EmptyPayload
            | DecodeError::UnknownFlags(_)
            | DecodeError::Truncated { .. }
            | DecodeError::DecompressedTooLarge { .. }
            | DecodeError::Lz4(_)
            | DecodeError::UnknownTag(_)
            | DecodeError::Malformed(_)
    ) && !e.to_string().is_empty()
}

/// Feeds `data` in pieces of `splits` sizes like `FramedRead`, then
/// `decode_eof`. Returns the messages decoded and the error that ended the
/// stream, if any. Panics (fails the test) on a panic inside the codec.
fn decode_stream(
    codec: &mut FrameCodec,
    data: &[u8],
    splits: &[usize],
) -> (Vec<Message>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = data;
    let mut sizes = splits.iter().cycle();
    while !rest.is_empty() {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn small_limits() -> Limits {
    Limits {
        max_frame: 256,
        max_decompressed: 1024,
        compress_threshold: 32,
    }
}

fn sample_records(owner: DeviceId, n: u64, seed: u64) -> Vec<Record> {
    let tree = SyntheticTree::new(owner, n, seed);
    let mut loc = tree.location();
    loc.seq = Seq(1);
    let mut out = vec![Record::Location(loc)];
    out.extend(tree.enumerate().map(|(i, mut e)| {
        e.seq = Seq(i as u64 + 2);
        e.deleted = i % 13 == 5;
        Record::Entry(e)
    }));
    out
}

/// A stream of valid frames covering plain and lz4-compressed frames.
fn valid_stream(seed: u64) -> (Vec<Message>, Vec<u8>) {
    let owner = DeviceId::new_v7();
    let records = sample_records(owner, 1 + seed % 40, seed);
    let msgs = vec![
        Message::Hello {
            protocol: PROTOCOL_VERSION,
            device: owner,
            library: LibraryId::new_v7(),
            name: "laptop".into(),
        },
        Message::Watermarks(vec![(owner, IndexId(7), Seq(seed))]),
        Message::StateBatch {
            transfer: TransferId::new_v7(),
            owner,
            index_id: IndexId(7),
            after: Seq(0),
            last: Seq(records.len() as u64),
            count: records.len() as u32,
            payload: encode_records(&records),
        },
        Message::SnapshotChunk {
            id: SnapshotId::new_v7(),
            index: 0,
            hash: [9; 32],
            data: vec![b'a'; 600 + seed as usize % 400],
        },
        // A frame the codec compresses (batches and chunks go as they are).
        Message::Error {
            code: ErrorCode::Malformed,
            message: "bad ".repeat(150 + seed as usize % 100),
        },
        Message::Keepalive,
    ];
    let mut buf = BytesMut::new();
    let codec = FrameCodec::default();
    for m in &msgs {
        codec.encode_frame(m, &mut buf).unwrap();
    }
    (msgs, buf.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_bytes_into_the_frame_codec_get_typed_errors(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        splits in proptest::collection::vec(1usize..64, 0..6),
        small in any::<bool>(),
    ) {
        let mut codec = FrameCodec::new(if small { small_limits() } else { Limits::default() });
        let (_, err) = decode_stream(&mut codec, &data, &splits);
        if let Some(e) = err {
            prop_assert!(is_frame_error(&e), "unexpected error {e:?}");
        }
    }

    #[test]
    fn mutated_valid_frames_get_typed_errors_or_decode(
        seed in any::<u64>(),
        edits in mutations(),
        splits in proptest::collection::vec(1usize..512, 0..6),
    ) {
        let (msgs, stream) = valid_stream(seed);
        // The unmutated stream decodes to exactly its messages.
        let (got, err) = decode_stream(&mut FrameCodec::default(), &stream, &splits);
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(&got, &msgs);

        let mutated = apply(&stream, &edits);
        let (got, err) = decode_stream(&mut FrameCodec::default(), &mutated, &splits);
        if let Some(e) = err {
            prop_assert!(is_frame_error(&e), "unexpected error {e:?}");
        }
        // Whatever decodes re-encodes to a frame that decodes to itself.
        for m in got {
            let mut buf = BytesMut::new();
            if FrameCodec::default().encode_frame(&m, &mut buf).is_ok() {
                prop_assert_eq!(FrameCodec::default().decode(&mut buf).unwrap(), Some(m));
            }
        }
    }
}

// ---------------------------------------------------------------- batches

/// Decodes `payload`; if it decodes, its records must round-trip.
fn decode_and_round_trip(payload: &[u8]) -> Result<Option<Vec<Record>>, TestCaseError> {
    match decode_records(payload, &BatchLimits::default()) {
        Ok(records) => {
            let again = decode_records(&encode_records(&records), &BatchLimits::default());
            prop_assert!(again.is_ok(), "re-encoded batch refused: {again:?}");
            prop_assert_eq!(again.as_ref().ok(), Some(&records));
            Ok(Some(records))
        }
        Err(e) => {
            prop_assert!(
                !matches!(e, DecodeError::Io(_) | DecodeError::CountMismatch { .. }),
                "unexpected error {e:?}"
            );
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_batch_payloads_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        decode_and_round_trip(&data)?;
        // Behind a valid lz4 layer, so the columnar decoder is reached.
        decode_and_round_trip(&compress(&data))?;
    }

    #[test]
    fn mutated_valid_batches_never_panic_and_round_trip(
        seed in any::<u64>(),
        n in 0u64..60,
        edits in mutations(),
        inner in any::<bool>(),
    ) {
        let records = sample_records(DeviceId::new_v7(), n, seed);
        let payload = encode_records(&records);
        prop_assert_eq!(decode_and_round_trip(&payload)?, Some(records));
        let mutated = if inner {
            // Mutate the columns, keep the lz4 layer valid.
            let raw = decompress_checked(&payload, usize::MAX).unwrap();
            compress(&apply(&raw, &edits))
        } else {
            apply(&payload, &edits)
        };
        decode_and_round_trip(&mutated)?;
    }
}

// ---------------------------------------------------------------- snapshots

/// A sender that exported a small snapshot, and a receiver, on one runtime.
struct Fixture {
    rt: tokio::runtime::Runtime,
    receiver: Store,
    manifest: SnapshotManifest,
    original: Vec<u8>,
    _sender: Store,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (sender, receiver, manifest) = rt.block_on(async {
            let library = LibraryId::new_v7();
            let a = Store::open(&dir.path().join("a").join("library.db"))
                .await
                .unwrap();
            let me = a.create_device("a", library).await.unwrap().device_id;
            let b = Store::open(&dir.path().join("b").join("library.db"))
                .await
                .unwrap();
            b.create_device("b", library).await.unwrap();
            let loc = Location {
                id: LocationId::new_v7(),
                owner: me,
                path: "/home/me/photos".into(),
                name: "photos".into(),
                seq: Seq(0),
                deleted: false,
            };
            let t = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
            let mut changes = vec![LocalChange::Location(loc.clone())];
            let root = EntryId::new_v7();
            for i in 0..40u64 {
                changes.push(LocalChange::Entry(Entry {
                    id: if i == 0 { root } else { EntryId::new_v7() },
                    location: loc.id,
                    parent: (i > 0).then_some(root),
                    name: format!("IMG_{i:04}.jpg"),
                    kind: if i % 10 == 0 {
                        EntryKind::Dir
                    } else {
                        EntryKind::File
                    },
                    size: 1000 * i,
                    inode: (i % 7 != 0).then_some(1000 + i),
                    created_at: t,
                    modified_at: t,
                    seq: Seq(0),
                    deleted: false,
                }));
            }
            a.commit_local(me, changes).await.unwrap();
            let m = a.export_snapshot(me).await.unwrap();
            (a, b, m)
        });
        let original = std::fs::read(&manifest.path).unwrap();
        Fixture {
            rt,
            receiver,
            manifest,
            original,
            _sender: sender,
            _dir: dir,
        }
    })
}

type Observed = (OwnerSummary, Option<sync_core::Watermark>);

async fn observe(s: &Store, owner: DeviceId) -> Observed {
    (
        s.summary(owner).await.unwrap(),
        s.watermark(owner).await.unwrap(),
    )
}

fn sha(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Offers `file` (size and hashes recomputed) and writes it chunk by chunk
/// with `data_of(raw chunk)` as the block and the genuine chunk hash.
async fn offer(
    s: &Store,
    manifest: &SnapshotManifest,
    file: &[u8],
    block: impl Fn(&[u8]) -> Vec<u8>,
    hash: Hash,
) -> Result<sync_core::Watermark, StorageError> {
    let offer = SnapshotOfferInfo {
        id: SnapshotId::new_v7(),
        bytes: file.len() as u64,
        chunks: file.len().div_ceil(SNAPSHOT_CHUNK_SIZE) as u32,
        hash,
        ..manifest.offer()
    };
    let id = offer.id;
    let result = async {
        let mut d = s.begin_download(&offer).await?;
        for (i, raw) in file.chunks(SNAPSHOT_CHUNK_SIZE).enumerate() {
            d.write_chunk(i as u32, sha(raw), &block(raw)).await?;
        }
        s.import_snapshot(d).await
    }
    .await;
    for ext in ["part", "next"] {
        let _ = std::fs::remove_file(s.incoming_dir().join(format!("{id}.{ext}")));
    }
    result
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(SNAPSHOT_CASES))]

    #[test]
    fn mutated_snapshot_chunks_are_refused_without_changing_the_receiver(
        edits in mutations(),
        raw_side in any::<bool>(),
    ) {
        let f = fixture();
        let owner = f.manifest.owner;
        let original = &f.original;
        prop_assert_eq!(original.len(), f.manifest.bytes as usize);
        prop_assert_eq!(f.manifest.chunks.len(), 1, "the fixture is one chunk");
        f.rt.block_on(async {
            let before = observe(&f.receiver, owner).await;

            // 1. The genuine offer and hashes, a mutated block: write_chunk refuses.
            let genuine = compress(original);
            let bad_block = if raw_side {
                compress(&apply(original, &edits))
            } else {
                apply(&genuine, &edits)
            };
            let same = decompress_checked(&bad_block, SNAPSHOT_CHUNK_SIZE)
                .is_ok_and(|raw| raw == *original);
            if !same {
                let e = offer(&f.receiver, &f.manifest, original, |_| bad_block.clone(), f.manifest.hash)
                    .await
                    .unwrap_err();
                prop_assert!(
                    matches!(
                        e,
                        StorageError::CorruptChunk { index: 0, .. }
                            | StorageError::ChunkHashMismatch { index: 0 }
                    ),
                    "unexpected error {e:?}"
                );
                prop_assert_eq!(&observe(&f.receiver, owner).await, &before);
            }

            // 2. A mutated file offered with recomputed hashes: the chunks are
            //    accepted, the content checks decide; a refusal changes nothing.
            let file = apply(original, &edits);
            let result = offer(&f.receiver, &f.manifest, &file, compress, sha(&file)).await;
            if let Err(e) = result {
                prop_assert_eq!(&observe(&f.receiver, owner).await, &before, "after {:?}", e);
            }
            Ok(())
        })?;
    }
}
