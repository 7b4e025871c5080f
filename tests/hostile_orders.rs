//! Hostile message orders: a trusted peer sends random sequences of
//! well-formed messages (every variant, with ids, owners, seqs and payloads
//! drawn from small pools so that they collide: replays, acks of unknown
//! transfers, pulls of others' records, offers and chunks out of order, a
//! second `Hello`, `Error`s) to a live engine over real TLS. Whatever the
//! order, the engine must stay up and keep serving others, keep its own
//! records untouched, and never hold a record above its watermark of the
//! record's owner.
//!
//! Bounded in CI (`HOSTILE_ORDER_CASES`, default 40); proptest reports a
//! failing case's seed and shrinks the sequence.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sync_core::{
    DeviceId, ErrorCode, IndexId, LibraryId, LocationId, Message, PROTOCOL_VERSION, Record, Seq,
    SnapshotId, TransferId, encode_records,
};
use sync_net::dial;

use crate::harness::{
    Device, assert_converged, generate, shutdown, spawn_devices, synthetic_records,
    wait_for_watermark,
};

/// Pools the messages draw from.
struct Pools {
    owners: [DeviceId; 4],
    transfers: [TransferId; 3],
    snapshots: [SnapshotId; 2],
    records: Vec<Record>,
}

/// One message from five random bytes: the variant, then its fields.
fn message(p: &Pools, [kind, a, b, c, d]: [u8; 5]) -> Message {
    let owner = p.owners[usize::from(a) % p.owners.len()];
    let index = IndexId(u64::from(b % 2) + 1);
    let seq = |x: u8| Seq(u64::from(x % 24));
    let transfer = p.transfers[usize::from(c) % p.transfers.len()];
    let snapshot = p.snapshots[usize::from(d) % p.snapshots.len()];
    let n = p.records.len();
    // A slice of the owner's records, possibly misattributed by `owner`.
    let start = usize::from(c) % n;
    let end = (start + usize::from(d % 6)).min(n);
    let slice = &p.records[start..end];
    match kind % 12 {
        0 => Message::Hello {
            protocol: PROTOCOL_VERSION,
            device: owner,
            library: LibraryId::new_v7(),
            name: "again".into(),
        },
        1 => Message::Watermarks(vec![(owner, index, seq(c))]),
        2 => Message::StateChange {
            owner,
            index_id: index,
            after: seq(c),
            record: p.records[usize::from(d) % n].clone(),
        },
        3 => Message::StateBatch {
            transfer,
            owner,
            index_id: index,
            after: seq(c),
            last: seq(c.wrapping_add(d)),
            count: slice.len() as u32,
            payload: encode_records(slice),
        },
        4 => Message::BatchAck {
            transfer,
            last: seq(d),
        },
        5 => Message::BulkIndexComplete {
            owner,
            index_id: index,
            location: None,
            entry_count: u64::from(d),
            max_seq: seq(c),
            indexed_at: 0,
        },
        6 => Message::FetchRequest {
            transfer,
            owner,
            index_id: index,
            location: (d % 2 == 0).then(LocationId::new_v7),
            after: seq(c),
            max_batches: u32::from(d % 5),
        },
        7 => Message::SnapshotOffer {
            id: snapshot,
            owner,
            index_id: index,
            max_seq: seq(c),
            entries: u64::from(d),
            bytes: u64::from(d) * 97 + 1,
            chunks: 1,
            hash: [d; 32],
        },
        8 => Message::SnapshotRequest {
            id: snapshot,
            from_chunk: u32::from(d % 3),
        },
        9 => Message::SnapshotChunk {
            id: snapshot,
            index: u32::from(c % 3),
            hash: [c; 32],
            data: sync_core::codec::compress(&vec![d; usize::from(d) * 7]),
        },
        10 => Message::Error {
            code: [ErrorCode::Gap, ErrorCode::Busy, ErrorCode::Storage][usize::from(d) % 3],
            message: "hostile".into(),
        },
        _ => Message::Keepalive,
    }
}

/// The library's invariant for every owner: no record above the watermark.
async fn nothing_above_watermarks(device: &Device) {
    let store = device.store();
    for (owner, w) in store.watermarks().await.expect("watermarks") {
        let above = store.records_after(owner, w.seq, 1).await.expect("records");
        assert!(
            above.is_empty(),
            "owner {} holds records above its watermark {w:?}",
            owner.fmt_short()
        );
    }
}

#[test]
fn random_message_orders_from_a_trusted_peer_break_nothing() {
    let cases = std::env::var("HOSTILE_ORDER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let devices = rt.block_on(spawn_devices(3, |_| {}));
    let (a, mallory, carol) = (&devices[0], &devices[1], &devices[2]);
    let own = rt.block_on(generate(a, 500, 3));
    let own_before = rt.block_on(a.store().summary(a.id)).expect("own summary");
    let addr = rt
        .block_on(a.engine.listen("127.0.0.1:0"))
        .expect("listen")
        .to_string();
    let records = synthetic_records(mallory.id, 20, 8, Seq(1));
    let pools = Pools {
        owners: [mallory.id, a.id, carol.id, DeviceId::new_v7()],
        transfers: [
            TransferId::new_v7(),
            TransferId::new_v7(),
            TransferId::from_bytes([0; 16]),
        ],
        snapshots: [SnapshotId::new_v7(), SnapshotId::new_v7()],
        records,
    };

    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let sequences = proptest::collection::vec(any::<[u8; 5]>(), 1..14);
    let net = mallory.engine.net_config();
    let result = runner.run(&sequences, |seq| {
        rt.block_on(async {
            let conn = dial(&addr, &net).await.expect("dial");
            let (_, mut reader, writer) = conn.split();
            for bytes in &seq {
                if writer.send(message(&pools, *bytes)).await.is_err() {
                    break;
                }
            }
            // Read what comes back for a moment (refusals end it early).
            let _ = tokio::time::timeout(Duration::from_millis(150), async {
                while let Ok(Some(_)) = reader.recv().await {}
            })
            .await;
        });
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }

    rt.block_on(async {
        // Give the engine a moment to finish what the last case started.
        tokio::time::sleep(Duration::from_millis(300)).await;
        nothing_above_watermarks(a).await;
        let own_after = a.store().summary(a.id).await.expect("own summary");
        assert_eq!(own_before, own_after, "A's own records changed");
        // A still serves: Carol syncs A's records.
        let addr_carol = a.engine.listen("127.0.0.1:0").await.expect("listen");
        carol
            .engine
            .connect(&addr_carol.to_string())
            .await
            .expect("carol connects");
        wait_for_watermark(carol, a.id, own.last, Duration::from_secs(60)).await;
        assert_converged(a, carol).await;
        nothing_above_watermarks(carol).await;
        shutdown(&devices).await;
    });
}
