//! Hostile paired peers speaking the verification messages: forged or
//! foreign signed statements, a repair of another owner's records, a
//! repair whose claim its records do not reach, reconciliation rounds
//! about another owner or out of order. Each is refused with a typed error
//! (or, for a repair that does not match, acknowledged with the unchanged
//! watermark), and nothing is written.

use std::time::Duration;

use sync_core::digest::{DigestId, DigestStatement, OwnerDigest};
use sync_core::reconcile::{Body, Range, ReconMessage};
use sync_core::{DeviceId, ErrorCode, IndexId, Message, Seq, TransferId, Watermark};
use sync_net::{ConnReader, ConnWriter, Identity, NetError, dial};

use crate::harness::{
    Device, assert_logged, connect, generate, shutdown, spawn_devices, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);

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

/// Reads until an ack of `transfer` arrives; returns its `last`.
async fn ack_of(reader: &mut ConnReader, transfer: TransferId) -> Seq {
    tokio::time::timeout(WAIT, async {
        loop {
            match reader.recv().await {
                Ok(Some(Message::BatchAck { transfer: t, last })) if t == transfer => return last,
                Ok(Some(_)) => continue,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    })
    .await
    .expect("acked in time")
}

/// A statement of `owner`'s records at `seq`, claiming `digest`.
fn statement(device: &Device, owner: DeviceId, seq: u64, digest: u8) -> DigestStatement {
    DigestStatement {
        library: device.engine.net_config().library,
        owner,
        index_id: IndexId(1),
        seq: Seq(seq),
        records: seq,
        digest: DigestId([digest; 32]),
        pruned: Seq(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_foreign_or_contradicting_statements_are_refused() {
    let devices = spawn_devices(3, |_| {}).await;
    let (a, mallory, carol) = (&devices[0], &devices[1], &devices[2]);
    let peer = format!("peer={}", mallory.id.fmt_short());

    // Signed by a key of Mallory's id that is not the pinned one.
    let impostor = Identity::generate(mallory.id).unwrap();
    let forged = impostor
        .sign_statement(statement(mallory, mallory.id, 5, 1))
        .unwrap();
    // Carol's genuine statement, forwarded by Mallory as its own message.
    let carols = carol
        .engine
        .net_config()
        .identity
        .sign_statement(statement(carol, carol.id, 5, 1))
        .unwrap();
    // Mallory's genuine statement, contradicted by its own claim.
    let genuine = mallory
        .engine
        .net_config()
        .identity
        .sign_statement(statement(mallory, mallory.id, 5, 1))
        .unwrap();
    let contradicting = OwnerDigest {
        digest: DigestId([2; 32]),
        ..genuine.statement.claim()
    };
    for (claims, signed) in [
        (vec![], forged),
        (vec![], carols),
        (vec![contradicting], genuine),
    ] {
        let (mut r, w) = raw(mallory, a).await;
        w.send(Message::Digests {
            claims,
            statement: Some(signed),
        })
        .await
        .unwrap();
        assert_eq!(refusal(&mut r).await, ErrorCode::BadStatement);
    }
    assert_logged(&["refusing peer", &peer, "BadStatement"]).await;
    assert_eq!(a.store().statement(mallory.id).await.unwrap(), None);
    assert_eq!(a.store().statement(carol.id).await.unwrap(), None);
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repairs_and_rounds_about_another_owner_are_refused() {
    let devices = spawn_devices(3, |_| {}).await;
    let (a, mallory, carol) = (&devices[0], &devices[1], &devices[2]);
    let range = generate(carol, 50, 1).await;
    connect(carol, a).await;
    wait_for_watermark(a, carol.id, range.last, WAIT).await;
    let before = a.store().owner_digest(carol.id).await.unwrap();

    let (mut r, w) = raw(mallory, a).await;
    let claim = OwnerDigest {
        owner: carol.id,
        watermark: Watermark::new(IndexId(1), range.last),
        records: 0,
        digest: DigestId::empty(),
        pruned: Seq(0),
    };
    w.send(Message::RepairBatch {
        transfer: TransferId::new_v7(),
        claim,
        extra: (1..=range.last.0).map(Seq).collect(),
        count: 0,
        payload: sync_core::encode_records(&[]),
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::ForeignOwner);

    let (mut r, w) = raw(mallory, a).await;
    w.send(Message::ReconRequest {
        transfer: TransferId::new_v7(),
        owner: carol.id,
        index_id: IndexId(1),
        upto: range.last,
        round: ReconMessage::default(),
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::ForeignOwner);
    assert_eq!(a.store().owner_digest(carol.id).await.unwrap(), before);
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_its_claim_does_not_justify_writes_nothing() {
    let devices = spawn_devices(2, |_| {}).await;
    let (a, mallory) = (&devices[0], &devices[1]);
    let range = generate(mallory, 200, 2).await;
    connect(mallory, a).await;
    wait_for_watermark(a, mallory.id, range.last, WAIT).await;
    let before = a.store().owner_digest(mallory.id).await.unwrap().unwrap();
    let all = |d: &Device| {
        let s = d.store();
        let id = mallory.id;
        async move { s.records_after(id, Seq(0), usize::MAX >> 1).await.unwrap() }
    };
    let records_before = all(a).await;

    // Drop every record A holds of Mallory, claiming an empty digest at a
    // higher seq that nothing reaches (the empty set's digest, but the
    // count says otherwise), and the same with a made-up digest.
    for digest in [DigestId::empty(), DigestId([7; 32])] {
        let (mut r, w) = raw(mallory, a).await;
        let transfer = TransferId::new_v7();
        let claim = OwnerDigest {
            owner: mallory.id,
            watermark: Watermark::new(before.watermark.index_id, Seq(range.last.0 + 10)),
            records: 1,
            digest,
            pruned: Seq(0),
        };
        w.send(Message::RepairBatch {
            transfer,
            claim,
            extra: (1..=range.last.0).map(Seq).collect(),
            count: 0,
            payload: sync_core::encode_records(&[]),
        })
        .await
        .unwrap();
        assert_eq!(
            ack_of(&mut r, transfer).await,
            range.last,
            "watermark unchanged"
        );
        assert_eq!(
            a.store().owner_digest(mallory.id).await.unwrap().unwrap(),
            before
        );
    }
    assert_eq!(all(a).await, records_before);
    assert_logged(&["repair refused: nothing written"]).await;

    // A round that reaches past the span it names is refused as malformed
    // (a round out of order cannot even be encoded).
    let (mut r, w) = raw(mallory, a).await;
    let round = ReconMessage {
        ranges: vec![Range {
            upper: Seq(range.last.0 + 1_000),
            body: Body::Skip,
        }],
    };
    w.send(Message::ReconRequest {
        transfer: TransferId::new_v7(),
        owner: mallory.id,
        index_id: before.watermark.index_id,
        upto: range.last,
        round,
    })
    .await
    .unwrap();
    assert_eq!(refusal(&mut r).await, ErrorCode::Malformed);
    assert_eq!(
        a.store().owner_digest(mallory.id).await.unwrap().unwrap(),
        before
    );
    shutdown(&devices).await;
}
