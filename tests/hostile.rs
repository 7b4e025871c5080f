//! Hostile peers: a trusted device sending another owner's records, gaps,
//! malformed payloads, replays, snapshots with a wrong hash or a wrong
//! schema; an untrusted device. Each is refused with a typed error, logged
//! with the peer, nothing is applied, and the device keeps serving others.

use std::time::Duration;

use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, ErrorCode, IndexId, Location, LocationId, Message, Record,
    Seq, TransferId, encode_records,
};
use sync_net::{ConnReader, ConnWriter, NetError, dial};

use crate::harness::{
    Device, assert_converged, assert_logged, connect, generate, shutdown, spawn_devices,
    wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);

fn location(owner: DeviceId, seq: u64) -> Location {
    Location {
        id: LocationId::new_v7(),
        owner,
        path: "/x".into(),
        name: "x".into(),
        seq: Seq(seq),
        deleted: false,
    }
}

fn entry(location: LocationId, seq: u64) -> Entry {
    Entry {
        id: EntryId::new_v7(),
        location,
        parent: None,
        name: format!("file-{seq}"),
        kind: EntryKind::File,
        size: seq,
        inode: Some(seq),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        modified_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        seq: Seq(seq),
        deleted: false,
    }
}

fn batch(owner: DeviceId, index: IndexId, after: u64, last: u64, records: &[Record]) -> Message {
    Message::StateBatch {
        transfer: TransferId::new_v7(),
        owner,
        index_id: index,
        after: Seq(after),
        last: Seq(last),
        count: records.len() as u32,
        payload: encode_records(records),
    }
}

/// Dials `target` as `from`, with raw access to the frames.
async fn raw(from: &Device, target: &Device) -> (ConnReader, ConnWriter) {
    let addr = target.engine.listen("127.0.0.1:0").await.unwrap();
    let conn = dial(&addr.to_string(), &from.engine.net_config())
        .await
        .unwrap();
    let (_, reader, writer) = conn.split();
    (reader, writer)
}

/// Reads until the peer refuses; returns the refusal's code.
async fn refusal(reader: &mut ConnReader) -> ErrorCode {
    tokio::time::timeout(WAIT, async {
        loop {
            match reader.recv().await {
                Ok(Some(_)) => continue,
                Err(NetError::Refused { code, .. }) => return code,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    })
    .await
    .expect("refused in time")
}

/// Reads until an ack arrives; returns its `last`.
async fn ack(reader: &mut ConnReader) -> Seq {
    tokio::time::timeout(WAIT, async {
        loop {
            match reader.recv().await {
                Ok(Some(Message::BatchAck { last, .. })) => return last,
                Ok(Some(_)) => continue,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    })
    .await
    .expect("acked in time")
}

async fn nothing_held(target: &Device, owner: DeviceId) {
    assert_eq!(target.store().watermark(owner).await.unwrap(), None);
    let s = target.store().summary(owner).await.unwrap();
    assert_eq!((s.entries, s.tombstones), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_owners_records_are_refused_and_nothing_applied() {
    let devices = spawn_devices(3, |_| {}).await;
    let (a, mallory, carol) = (&devices[0], &devices[1], &devices[2]);

    // A batch claiming to be Carol's, sent by Mallory.
    let (mut r, w) = raw(mallory, a).await;
    let loc = location(carol.id, 1);
    let records = vec![
        Record::Location(loc.clone()),
        Record::Entry(entry(loc.id, 2)),
    ];
    w.send(batch(carol.id, IndexId(9), 0, 2, &records))
        .await
        .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::ForeignOwner);
    nothing_held(a, carol.id).await;
    let peer = format!("peer={}", mallory.id.fmt_short());
    assert_logged(&["refusing peer", &peer, "ForeignOwner"]).await;

    // Mallory's own batch smuggling a location owned by Carol.
    let (mut r, w) = raw(mallory, a).await;
    let loc = location(carol.id, 1);
    w.send(batch(
        mallory.id,
        IndexId(9),
        0,
        1,
        &[Record::Location(loc)],
    ))
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::ForeignOwner);
    nothing_held(a, mallory.id).await;
    nothing_held(a, carol.id).await;

    // A pull of records this device does not own.
    let (mut r, w) = raw(mallory, a).await;
    w.send(Message::FetchRequest {
        transfer: TransferId::new_v7(),
        owner: carol.id,
        index_id: IndexId(1),
        location: None,
        after: Seq(0),
        max_batches: 4,
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::ForeignOwner);

    // The device keeps serving others: Carol syncs normally.
    let range = generate(a, 300, 1).await;
    connect(carol, a).await;
    wait_for_watermark(carol, a.id, range.last, WAIT).await;
    assert_converged(a, carol).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_malformed_payloads_and_replays() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, mallory) = (&devices[0], &devices[1]);
    let index = IndexId(77);
    let loc = location(mallory.id, 1);

    // A gap: records after seq 100 while A holds nothing.
    let (mut r, w) = raw(mallory, a).await;
    let records = vec![
        Record::Entry(entry(loc.id, 101)),
        Record::Entry(entry(loc.id, 102)),
    ];
    w.send(batch(mallory.id, index, 100, 102, &records))
        .await
        .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::Gap);
    nothing_held(a, mallory.id).await;
    let peer = format!("peer={}", mallory.id.fmt_short());
    assert_logged(&["refusing peer data", &peer, "Gap"]).await;

    // Random bytes as a payload.
    let (mut r, w) = raw(mallory, a).await;
    w.send(Message::StateBatch {
        transfer: TransferId::new_v7(),
        owner: mallory.id,
        index_id: index,
        after: Seq(0),
        last: Seq(3),
        count: 3,
        payload: vec![7, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::Malformed);
    nothing_held(a, mallory.id).await;

    // A count that disagrees with the payload.
    let (mut r, w) = raw(mallory, a).await;
    let mut lying = batch(mallory.id, index, 0, 1, &[Record::Location(loc.clone())]);
    if let Message::StateBatch { count, .. } = &mut lying {
        *count = 5;
    }
    w.send(lying).await.unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::Malformed);
    nothing_held(a, mallory.id).await;
    assert_logged(&["refusing peer data", &peer, "Malformed"]).await;

    // A valid batch, then its replay: acknowledged, state unchanged.
    let (mut r, w) = raw(mallory, a).await;
    let good = vec![
        Record::Location(loc.clone()),
        Record::Entry(entry(loc.id, 2)),
    ];
    w.send(batch(mallory.id, index, 0, 2, &good)).await.unwrap();
    assert_eq!(ack(&mut r).await, Seq(2));
    let before = a.store().summary(mallory.id).await.unwrap();
    w.send(batch(mallory.id, index, 0, 2, &good)).await.unwrap();
    assert_eq!(ack(&mut r).await, Seq(2));
    let after = a.store().summary(mallory.id).await.unwrap();
    assert_eq!(before.fingerprint, after.fingerprint);
    assert_eq!(after.entries, 1);
    // An older version of an entry never overwrites the newer one.
    let mut old = match &good[1] {
        Record::Entry(e) => e.clone(),
        Record::Location(_) => unreachable!(),
    };
    old.seq = Seq(1);
    old.name = "older".into();
    w.send(batch(mallory.id, index, 0, 2, &[Record::Entry(old)]))
        .await
        .unwrap();
    assert_eq!(ack(&mut r).await, Seq(2));
    assert_eq!(
        a.store().summary(mallory.id).await.unwrap().fingerprint,
        after.fingerprint
    );
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_device_is_refused() {
    let trusted = spawn_devices(1, |_| {}).await;
    let strangers = spawn_devices(1, |_| {}).await;
    let addr = trusted[0].engine.listen("127.0.0.1:0").await.unwrap();
    let err = strangers[0].engine.connect(&addr.to_string()).await;
    assert!(err.is_err(), "a stranger connected");
    assert!(trusted[0].engine.peers().await.unwrap().is_empty());
    trusted[0].engine.shutdown().await.unwrap();
    strangers[0].engine.shutdown().await.unwrap();
}

/// Offers `file` to `a` as a snapshot of `mallory`'s records, with
/// `whole_hash` as the file's hash, serves its chunks as they are asked
/// for, and returns `a`'s refusal.
async fn offer_snapshot(
    a: &Device,
    mallory: &Device,
    file: &[u8],
    whole_hash: [u8; 32],
    entries: u64,
    max_seq: Seq,
    index_id: IndexId,
) -> ErrorCode {
    use sha2::{Digest, Sha256};
    let chunk = sync_core::SNAPSHOT_CHUNK_SIZE;
    let chunks: Vec<&[u8]> = file.chunks(chunk).collect();
    let id = sync_core::SnapshotId::new_v7();
    let (mut r, w) = raw(mallory, a).await;
    w.send(Message::SnapshotOffer {
        id,
        owner: mallory.id,
        index_id,
        max_seq,
        entries,
        bytes: file.len() as u64,
        chunks: chunks.len() as u32,
        hash: whole_hash,
    })
    .await
    .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match r.recv().await {
                Ok(Some(Message::SnapshotRequest {
                    id: want,
                    from_chunk,
                })) => {
                    assert_eq!(want, id);
                    for (i, c) in chunks.iter().enumerate().skip(from_chunk as usize) {
                        w.send(Message::SnapshotChunk {
                            id,
                            index: i as u32,
                            hash: Sha256::digest(c).into(),
                            data: sync_core::codec::compress(c),
                        })
                        .await
                        .unwrap();
                    }
                }
                Ok(Some(_)) => continue,
                Err(NetError::Refused { code, .. }) => return code,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    })
    .await
    .expect("refused in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_with_a_wrong_hash_or_schema_are_refused_and_nothing_applied() {
    use sha2::{Digest, Sha256};
    let devices = spawn_devices(3, |_| {}).await;
    let (a, mallory, carol) = (&devices[0], &devices[1], &devices[2]);
    let peer = format!("peer={}", mallory.id.fmt_short());
    // A genuine snapshot of Mallory's records, offered with a wrong hash.
    let range = generate(mallory, 3_000, 4).await;
    let m = mallory.store().export_snapshot(mallory.id).await.unwrap();
    let file = std::fs::read(&m.path).unwrap();
    let mut wrong = m.hash;
    wrong[0] ^= 1;
    let code = offer_snapshot(a, mallory, &file, wrong, m.entries, m.max_seq, m.index_id).await;
    assert_eq!(code, ErrorCode::BadSnapshot);
    nothing_held(a, mallory.id).await;
    assert_logged(&["refusing peer data", &peer, "BadSnapshot"]).await;

    // A SQLite file of another schema (Mallory's whole library), with
    // every hash right, so only the schema check can refuse it.
    mallory.store().checkpoint().await.unwrap();
    let other = std::fs::read(mallory.dir.join("library.db")).unwrap();
    let hash: [u8; 32] = Sha256::digest(&other).into();
    let code = offer_snapshot(a, mallory, &other, hash, m.entries, m.max_seq, m.index_id).await;
    assert_eq!(code, ErrorCode::BadSnapshot);
    nothing_held(a, mallory.id).await;
    let left: Vec<_> = std::fs::read_dir(a.store().incoming_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "a refused download leaves no files: {left:?}"
    );

    // A keeps serving others, and Mallory's real records still arrive.
    let own = generate(a, 300, 5).await;
    connect(carol, a).await;
    wait_for_watermark(carol, a.id, own.last, WAIT).await;
    assert_converged(a, carol).await;
    connect(a, mallory).await;
    wait_for_watermark(a, mallory.id, range.last, WAIT).await;
    assert_converged(mallory, a).await;
    shutdown(&devices).await;
}
