//! Tests of reconciliation: whole conversations between two views against
//! the true set difference, the wire form and its bounds, every refusal of
//! bad input, and the traffic for a million records.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::digest::{BUCKET_SHIFT, bucket_of};

/// A record's fingerprint as its content would give it: id, seq, version.
fn fp_of(id: [u8; 16], seq: u64, version: u8) -> u128 {
    let mut bytes = id.to_vec();
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.push(version);
    let hash = blake3::hash(&bytes);
    let mut low = [0u8; 16];
    low.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_le_bytes(low)
}

/// A record with id `n` at `seq`.
fn item(n: u64, seq: u64) -> Item {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    Item {
        seq: Seq(seq),
        id,
        fp: fp_of(id, seq, 0),
    }
}

/// The same record with other content.
fn corrupted(it: Item) -> Item {
    Item {
        fp: fp_of(it.id, it.seq.0, 1),
        ..it
    }
}

/// Storage of one side: the rows by bucket, loaded into a view on demand.
struct Store {
    rows: BTreeMap<u64, Vec<Item>>,
    max_seq: Seq,
    loaded: usize,
}

impl Store {
    fn new(items: &[Item]) -> Store {
        let mut rows: BTreeMap<u64, Vec<Item>> = BTreeMap::new();
        for it in items {
            rows.entry(bucket_of(it.seq)).or_default().push(*it);
        }
        let max_seq = items.iter().map(|it| it.seq).max().unwrap_or(Seq(0));
        Store {
            rows,
            max_seq,
            loaded: 0,
        }
    }

    /// The persisted bucket table, nothing loaded.
    fn view(&self) -> View {
        let table = self
            .rows
            .iter()
            .map(|(&b, items)| (b, view::sum_items(items)))
            .collect();
        View::new(table, self.max_seq)
    }

    fn load(&mut self, view: &mut View, buckets: &[u64]) {
        for &b in buckets {
            assert!(!view.is_loaded(b), "bucket {b} asked for twice");
            let rows = self.rows.get(&b).cloned().unwrap_or_default();
            view.load_items(b, rows).unwrap();
            self.loaded += 1;
        }
    }
}

/// What a whole conversation cost and found.
#[derive(Debug, Default)]
struct Outcome {
    found: Found,
    responder_found: Found,
    round_trips: usize,
    bytes_to_responder: usize,
    bytes_to_initiator: usize,
    loaded_initiator: usize,
    loaded_responder: usize,
    /// Encoded size of each message, in order.
    sizes: Vec<usize>,
}

impl Outcome {
    fn bytes(&self) -> usize {
        self.bytes_to_responder + self.bytes_to_initiator
    }
}

/// Encodes and decodes a message, counting its bytes.
fn over_the_wire(msg: &ReconMessage, bytes: &mut usize, sizes: &mut Vec<usize>) -> ReconMessage {
    let raw = msg.encode().unwrap();
    *bytes += raw.len();
    sizes.push(raw.len());
    ReconMessage::decode(&raw).unwrap()
}

/// Runs a whole conversation: B (`replica`) initiates, A (`source`) answers.
fn converse(source: &[Item], replica: &[Item], upto: u64, config: ReconConfig) -> Outcome {
    let (mut store_a, mut store_b) = (Store::new(source), Store::new(replica));
    let (mut view_a, mut view_b) = (store_a.view(), store_b.view());
    let mut b = Reconciler::with_config(Role::Initiator, Seq(upto), config);
    let mut a = Reconciler::with_config(Role::Responder, Seq(upto), config);
    let mut out = Outcome::default();
    let needed = b.buckets_needed_to_initiate(&view_b);
    store_b.load(&mut view_b, &needed);
    let mut msg = b.initiate(&view_b).unwrap();
    loop {
        let sent = over_the_wire(&msg, &mut out.bytes_to_responder, &mut out.sizes);
        out.round_trips += 1;
        let needed = a.buckets_needed(&view_a, &sent);
        store_a.load(&mut view_a, &needed);
        let (reply, found_a) = a.respond(&view_a, &sent).unwrap();
        out.responder_found.merge(found_a);
        let reply = over_the_wire(&reply, &mut out.bytes_to_initiator, &mut out.sizes);
        let needed = b.buckets_needed(&view_b, &reply);
        store_b.load(&mut view_b, &needed);
        let (next, found) = b.respond(&view_b, &reply).unwrap();
        out.found.merge(found);
        if reply.is_empty() || next.is_empty() {
            break;
        }
        msg = next;
    }
    assert!(b.is_done(), "the initiator still awaits answers");
    out.found.need.sort_unstable();
    out.found.extra.sort_unstable();
    out.loaded_initiator = store_b.loaded;
    out.loaded_responder = store_a.loaded;
    out
}

/// The true difference: seqs of `source`'s items `replica` lacks, and of
/// `replica`'s the source lacks, by `(seq, fp)`.
fn truth(source: &[Item], replica: &[Item]) -> Found {
    let key = |it: &Item| (it.seq, it.fp);
    let a: BTreeSet<_> = source.iter().map(key).collect();
    let b: BTreeSet<_> = replica.iter().map(key).collect();
    Found {
        need: a.difference(&b).map(|k| k.0).collect(),
        extra: b.difference(&a).map(|k| k.0).collect(),
    }
}

/// Whether every finding of `part` is in `whole`.
fn within(part: &Found, whole: &Found) -> bool {
    let need: BTreeSet<_> = whole.need.iter().collect();
    let extra: BTreeSet<_> = whole.extra.iter().collect();
    part.need.iter().all(|s| need.contains(s)) && part.extra.iter().all(|s| extra.contains(s))
}

/// Checks a conversation found exactly the difference.
fn assert_exact(source: &[Item], replica: &[Item], upto: u64, config: ReconConfig) -> Outcome {
    let out = converse(source, replica, upto, config);
    let want = truth(source, replica);
    assert_eq!(out.found.need, want.need, "need");
    assert_eq!(out.found.extra, want.extra, "extra");
    assert!(within(&out.responder_found, &want), "responder's findings");
    out
}

/// Dense items at seqs `1..=n`.
fn dense(n: u64) -> Vec<Item> {
    (1..=n).map(|s| item(s, s)).collect()
}

/// A source and a replica of `source` with `n` random differences of
/// every kind: missing in the replica, extra in it, corrupted in it, and
/// stale (the source re-stamped the record at a new seq, after every
/// other; the replica still holds it at the old one).
fn mutate(source: &[Item], n: usize, rng: &mut StdRng) -> (Vec<Item>, Vec<Item>) {
    let mut a = source.to_vec();
    let mut b = source.to_vec();
    let len = a.len();
    let mut picks: Vec<usize> = (0..len).collect();
    picks.shuffle(rng);
    let mut next = source.iter().map(|it| it.seq.0).max().unwrap_or(0);
    for (k, &i) in picks.iter().take(n.min(len)).enumerate() {
        match k % 4 {
            0 => b[i].seq = Seq(u64::MAX),
            1 => a[i].seq = Seq(u64::MAX),
            2 => b[i] = corrupted(b[i]),
            _ => {
                next += rng.random_range(1..4);
                a[i] = Item {
                    seq: Seq(next),
                    fp: fp_of(a[i].id, next, 2),
                    ..a[i]
                };
            }
        }
    }
    a.retain(|it| it.seq.0 != u64::MAX);
    b.retain(|it| it.seq.0 != u64::MAX);
    (a, b)
}

/// The highest seq of either side.
fn top(a: &[Item], b: &[Item]) -> u64 {
    a.iter().chain(b).map(|it| it.seq.0).max().unwrap_or(0)
}

#[test]
fn identical_sets_finish_in_one_round_trip() {
    let items = dense(5000);
    let out = assert_exact(&items, &items, 5000, ReconConfig::default());
    assert_eq!(out.round_trips, 1);
    assert!(out.found.is_empty());
    assert_eq!(out.bytes_to_initiator, 1, "the empty reply");
    assert_eq!((out.loaded_initiator, out.loaded_responder), (0, 0));
}

#[test]
fn empty_replica_learns_everything_in_one_round_trip() {
    let items = dense(20_000);
    let out = assert_exact(&items, &[], 20_000, ReconConfig::default());
    assert_eq!(out.round_trips, 1);
    assert_eq!(out.found.need.len(), 20_000);
    assert!(
        out.bytes_to_responder < 8,
        "{} bytes",
        out.bytes_to_responder
    );
}

#[test]
fn empty_source_leaves_everything_extra_in_one_round_trip() {
    let items = dense(20_000);
    let out = assert_exact(&[], &items, 20_000, ReconConfig::default());
    assert_eq!(out.round_trips, 1);
    assert_eq!(out.found.extra.len(), 20_000);
    assert_eq!(out.loaded_responder, 0);
}

#[test]
fn both_empty() {
    let out = assert_exact(&[], &[], 100, ReconConfig::default());
    assert_eq!(out.round_trips, 1);
    assert!(out.found.is_empty());
}

#[test]
fn records_past_upto_are_not_compared() {
    let a = dense(3000);
    let b: Vec<Item> = a.iter().copied().filter(|it| it.seq.0 <= 2000).collect();
    let out = converse(&a, &b, 2000, ReconConfig::default());
    assert!(out.found.is_empty(), "{:?}", out.found);
    assert_eq!(out.round_trips, 1);
}

#[test]
fn a_single_difference_loads_one_bucket_a_side() {
    let a = dense(100_000);
    let mut b = a.clone();
    b.remove(54_321);
    let out = assert_exact(&a, &b, 100_000, ReconConfig::default());
    assert_eq!(out.found.need, vec![Seq(54_322)]);
    assert_eq!((out.loaded_initiator, out.loaded_responder), (1, 1));
}

#[test]
fn many_differences_in_one_bucket() {
    let a = dense(10_000);
    let b: Vec<Item> = a
        .iter()
        .map(|it| {
            if (3000..3500).contains(&it.seq.0) {
                corrupted(*it)
            } else {
                *it
            }
        })
        .collect();
    let out = assert_exact(&a, &b, 10_000, ReconConfig::default());
    assert_eq!(out.found.need.len(), 500);
}

#[test]
fn a_replica_behind_by_a_tail() {
    let a = dense(50_000);
    let b: Vec<Item> = a.iter().copied().filter(|it| it.seq.0 <= 45_000).collect();
    let out = assert_exact(&a, &b, 50_000, ReconConfig::default());
    assert_eq!(out.found.need.len(), 5000);
}

#[test]
fn a_difference_past_the_message_budget_takes_several_messages() {
    let items = dense(600_000);
    let out = assert_exact(&items, &[], 600_000, ReconConfig::default());
    assert_eq!(out.round_trips, 3, "{} items a message at most", MAX_ITEMS);
}

#[test]
fn everything_differing_stays_within_the_limits() {
    let a = dense(300_000);
    let b: Vec<Item> = a.iter().map(|it| corrupted(*it)).collect();
    let config = ReconConfig {
        branching: 16,
        item_threshold: 24,
    };
    let out = assert_exact(&a, &b, 300_000, config);
    assert_eq!(out.found.need.len(), 300_000);
    assert!(out.round_trips as u32 <= MAX_ROUNDS);
}

/// Random sets of up to 20,000 items, dense or sparse in seq.
fn random_sets() -> impl Strategy<Value = (Vec<Item>, Vec<Item>)> {
    (0usize..20_000, 1u64..2000, 0usize..300, any::<u64>()).prop_map(|(n, gap, diffs, seed)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seq = 0u64;
        let source: Vec<Item> = (0..n as u64)
            .map(|i| {
                seq += rng.random_range(1..=gap);
                item(i, seq)
            })
            .collect();
        mutate(&source, diffs, &mut rng)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_differences_are_found_exactly((a, b) in random_sets()) {
        assert_exact(&a, &b, top(&a, &b), ReconConfig::default());
    }

    #[test]
    fn any_config_finds_them_exactly(
        (a, b) in random_sets(),
        branching in 2usize..=64,
        item_threshold in 1usize..=64,
    ) {
        assert_exact(&a, &b, top(&a, &b), ReconConfig { branching, item_threshold });
    }

    #[test]
    fn messages_survive_the_wire(msg in messages()) {
        let raw = msg.encode().unwrap();
        prop_assert_eq!(ReconMessage::decode(&raw).unwrap(), msg);
    }

    #[test]
    fn any_bytes_are_refused_or_answered_without_panic(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(msg) = ReconMessage::decode(&raw) {
            let view = View::from_items(dense(3000)).unwrap();
            let mut resp = Reconciler::new(Role::Responder, Seq(3000));
            let _ = resp.respond(&view, &msg);
            let _ = resp.buckets_needed(&view, &msg);
        }
    }
}

/// Valid random messages: increasing uppers, items inside their ranges.
fn messages() -> impl Strategy<Value = ReconMessage> {
    let body = prop_oneof![Just(0u8), Just(1u8), Just(2u8),];
    proptest::collection::vec((1u64..5000, body, any::<u64>(), 0usize..20), 0..50).prop_map(
        |ranges| {
            let mut lo = 0u64;
            let ranges = ranges
                .into_iter()
                .map(|(width, kind, r, n)| {
                    let hi = lo + width;
                    let body = match kind {
                        0 => Body::Skip,
                        1 => Body::Fingerprint(WireFp {
                            count: r % (width + 1),
                            sum: r,
                        }),
                        _ => Body::Items(
                            (0..n.min(width as usize) as u64)
                                .map(|k| WireItem {
                                    seq: Seq(lo + k),
                                    fp: r ^ k,
                                })
                                .collect(),
                        ),
                    };
                    lo = hi;
                    Range {
                        upper: Seq(hi),
                        body,
                    }
                })
                .collect();
            ReconMessage { ranges }
        },
    )
}

/// A message of these `(upper, body)` ranges.
fn msg(ranges: Vec<(u64, Body)>) -> ReconMessage {
    ReconMessage {
        ranges: ranges
            .into_iter()
            .map(|(upper, body)| Range {
                upper: Seq(upper),
                body,
            })
            .collect(),
    }
}

/// A wire item.
fn wi(seq: u64) -> WireItem {
    WireItem {
        seq: Seq(seq),
        fp: seq * 31,
    }
}

/// A fresh responder over `[0, 3000]` and its view.
fn responder() -> (Reconciler, View) {
    (
        Reconciler::new(Role::Responder, Seq(3000)),
        View::from_items(dense(3000)).unwrap(),
    )
}

/// The error a fresh responder gives `m`.
fn refusal(m: ReconMessage) -> ReconError {
    let (mut r, view) = responder();
    r.respond(&view, &m).unwrap_err()
}

const FP: Body = Body::Fingerprint(WireFp { count: 1, sum: 5 });

#[test]
fn ranges_out_of_order_are_refused() {
    let e = refusal(msg(vec![(10, FP), (10, FP), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::OutOfOrder {
            lower: Seq(10),
            upper: Seq(10)
        }
    );
    let e = refusal(msg(vec![(10, FP), (5, FP), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::OutOfOrder {
            lower: Seq(10),
            upper: Seq(5)
        }
    );
}

#[test]
fn a_range_past_upto_is_refused() {
    let e = refusal(msg(vec![(10, FP), (3002, FP)]));
    assert_eq!(
        e,
        ReconError::PastUpto {
            upper: Seq(3002),
            upto: Seq(3000)
        }
    );
}

#[test]
fn a_first_message_short_of_the_span_is_refused() {
    let e = refusal(msg(vec![(10, FP), (3000, FP)]));
    assert_eq!(
        e,
        ReconError::SpanMismatch {
            upper: Seq(3000),
            upto: Seq(3000)
        }
    );
    let e = refusal(ReconMessage::default());
    assert_eq!(
        e,
        ReconError::SpanMismatch {
            upper: Seq(0),
            upto: Seq(3000)
        }
    );
}

#[test]
fn ranges_not_asked_about_are_refused() {
    let view = View::from_items(dense(3000)).unwrap();
    let mut b = Reconciler::new(Role::Initiator, Seq(3000));
    let first = b.initiate(&view).unwrap();
    let (c1, c2) = (first.ranges[0].upper, first.ranges[1].upper);
    // One range straddling two of ours.
    let e = b
        .clone()
        .respond(&view, &msg(vec![(c2.0, FP)]))
        .unwrap_err();
    assert_eq!(
        e,
        ReconError::Unrequested {
            lower: Seq(0),
            upper: c2
        }
    );
    // After a round that settles the first range, it is closed.
    let mut b2 = b.clone();
    let ours = first.ranges[1].body.clone();
    let (_, _) = b2
        .respond(&view, &msg(vec![(c1.0, Body::Skip), (c2.0, ours)]))
        .unwrap();
    let e = b2.respond(&view, &msg(vec![(c1.0, FP)])).unwrap_err();
    assert_eq!(
        e,
        ReconError::Unrequested {
            lower: Seq(0),
            upper: c1
        }
    );
    // A responder's listed range is closed too.
    let (mut a, view_a) = responder();
    let small = msg(vec![(3001, Body::Items(vec![wi(1)]))]);
    let (reply, _) = a.respond(&view_a, &small).unwrap();
    assert!(matches!(reply.ranges[0].body, Body::Items(_)));
    let e = a.respond(&view_a, &msg(vec![(3001, FP)])).unwrap_err();
    assert_eq!(
        e,
        ReconError::Unrequested {
            lower: Seq(0),
            upper: Seq(3001)
        }
    );
}

#[test]
fn impossible_fingerprints_are_refused() {
    let fp = |count, sum| Body::Fingerprint(WireFp { count, sum });
    let e = refusal(msg(vec![(10, fp(11, 1)), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::CountOverflow {
            lower: Seq(0),
            upper: Seq(10),
            count: 11
        }
    );
    let e = refusal(msg(vec![(10, fp(0, 1)), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::BadFingerprint {
            lower: Seq(0),
            upper: Seq(10)
        }
    );
}

#[test]
fn bad_items_are_refused() {
    let items = |seqs: &[u64]| Body::Items(seqs.iter().map(|&s| wi(s)).collect());
    let e = refusal(msg(vec![(10, FP), (12, items(&[10, 11, 11])), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::ItemsOverflow {
            lower: Seq(10),
            upper: Seq(12),
            count: 3
        }
    );
    let e = refusal(msg(vec![(10, FP), (20, items(&[15, 12])), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::ItemsUnsorted {
            lower: Seq(10),
            upper: Seq(20),
            seq: Seq(12)
        }
    );
    let e = refusal(msg(vec![(10, FP), (20, items(&[12, 12])), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::ItemsUnsorted {
            lower: Seq(10),
            upper: Seq(20),
            seq: Seq(12)
        }
    );
    let e = refusal(msg(vec![(10, FP), (20, items(&[12, 20])), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::ItemOutsideRange {
            lower: Seq(10),
            upper: Seq(20),
            seq: Seq(20)
        }
    );
    let e = refusal(msg(vec![(10, FP), (20, items(&[9])), (3001, FP)]));
    assert_eq!(
        e,
        ReconError::ItemOutsideRange {
            lower: Seq(10),
            upper: Seq(20),
            seq: Seq(9)
        }
    );
}

#[test]
fn messages_over_the_limits_are_refused_in_memory() {
    let many: Vec<(u64, Body)> = (1..=MAX_RANGES as u64 + 1)
        .map(|u| (u, Body::Skip))
        .collect();
    let m = msg(many);
    let want = ReconError::TooManyRanges {
        count: MAX_RANGES + 1,
        max: MAX_RANGES,
    };
    assert_eq!(m.over_limits(), Some(want));
    assert!(m.encode().is_err(), "the sender refuses to encode it");
    let (mut r, view) = (
        Reconciler::new(Role::Responder, Seq(1 << 20)),
        View::from_items(dense(10)).unwrap(),
    );
    assert_eq!(r.respond(&view, &m).unwrap_err(), want);

    let body = Body::Items((0..=MAX_ITEMS_PER_BODY as u64).map(wi).collect());
    let e = refusal(msg(vec![(3001, body)]));
    assert_eq!(
        e,
        ReconError::TooManyItems {
            count: MAX_ITEMS_PER_BODY + 1,
            max: MAX_ITEMS_PER_BODY
        }
    );

    let bodies = MAX_ITEMS / MAX_ITEMS_PER_BODY + 1;
    let m = msg(full_bodies(bodies));
    let count = bodies * MAX_ITEMS_PER_BODY;
    assert_eq!(
        m.over_limits(),
        Some(ReconError::TooManyItems {
            count,
            max: MAX_ITEMS
        })
    );
}

/// `n` ranges of [`MAX_ITEMS_PER_BODY`] items each.
fn full_bodies(n: usize) -> Vec<(u64, Body)> {
    let per = MAX_ITEMS_PER_BODY as u64;
    (0..n as u64)
        .map(|k| {
            (
                per * (k + 1),
                Body::Items((per * k..per * (k + 1)).map(wi).collect()),
            )
        })
        .collect()
}

#[test]
fn declared_lengths_over_the_limits_are_refused_before_reading() {
    let varint = |v: u64| postcard::to_stdvec(&v).unwrap();
    // MAX_RANGES + 1 skips, declared and held; MAX_RANGES decode.
    for (n, ok) in [(MAX_RANGES, true), (MAX_RANGES + 1, false)] {
        let mut raw = varint(n as u64);
        raw.extend([1, 0].repeat(n));
        assert_eq!(ReconMessage::decode(&raw).is_ok(), ok, "{n} ranges");
    }
    // One range whose body declares and holds MAX_ITEMS_PER_BODY + 1 items.
    for (n, ok) in [(MAX_ITEMS_PER_BODY, true), (MAX_ITEMS_PER_BODY + 1, false)] {
        let mut raw = varint(1);
        raw.extend(varint(n as u64));
        raw.extend(varint(2));
        raw.extend(varint(n as u64));
        for k in 0..n {
            raw.push(u8::from(k > 0));
            raw.extend([7; 8]);
        }
        assert_eq!(ReconMessage::decode(&raw).is_ok(), ok, "{n} items");
    }
    // Bodies within their bound whose total passes MAX_ITEMS: the last
    // body's declared length is refused.
    let within = msg(full_bodies(MAX_ITEMS / MAX_ITEMS_PER_BODY));
    let mut raw = within.encode().unwrap();
    assert!(ReconMessage::decode(&raw).is_ok());
    let declared = postcard::to_stdvec(&(within.ranges.len() as u64)).unwrap();
    let more = postcard::to_stdvec(&(within.ranges.len() as u64 + 1)).unwrap();
    assert_eq!(declared.len(), more.len());
    raw[..declared.len()].copy_from_slice(&more);
    raw.extend(postcard::to_stdvec(&(1u64, 2u32, 1u64, 0u64, [0u8; 8])).unwrap());
    assert!(ReconMessage::decode(&raw).is_err());
}

#[test]
fn the_wire_is_compact() {
    let m = msg(vec![
        (1000, Body::Skip),
        (
            1064,
            Body::Fingerprint(WireFp {
                count: 64,
                sum: u64::MAX,
            }),
        ),
        (1068, Body::Items(vec![wi(1064), wi(1066)])),
    ]);
    let raw = m.encode().unwrap();
    // 1 count; 2 + 1 skip; 1 + 1 + 1 + 8 fingerprint; 1 + 1 + 1 + 2 × 9 items.
    assert_eq!(raw.len(), 1 + 3 + 11 + 21);
    assert_eq!(ReconMessage::decode(&raw).unwrap(), m);
    // A second range whose upper bound overflows.
    let over = [
        2, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0,
    ];
    assert!(ReconMessage::decode(&over).is_err());
    assert!(ReconMessage::decode(&over[..3]).is_err(), "truncated");
    let mut trailing = over[..3].to_vec();
    trailing[0] = 1;
    assert!(ReconMessage::decode(&trailing).is_ok());
    trailing.push(0);
    assert!(ReconMessage::decode(&trailing).is_err(), "trailing bytes");
}

#[test]
fn a_peer_that_never_converges_is_cut_off() {
    let view = View::from_items(dense(3000)).unwrap();
    let mut b = Reconciler::new(Role::Initiator, Seq(3000));
    let mut sent = b.initiate(&view).unwrap();
    let mut rounds = 0;
    let err = loop {
        // The liar answers each range it was asked about with a fingerprint
        // of its own that never matches.
        let mut lo = 0u64;
        let lies = sent
            .ranges
            .iter()
            .map(|r| {
                let width = r.upper.0 - lo;
                lo = r.upper.0;
                let body = match r.body {
                    Body::Skip => Body::Skip,
                    _ => Body::Fingerprint(WireFp {
                        count: width.min(1),
                        sum: 0xdead,
                    }),
                };
                Range {
                    upper: r.upper,
                    body,
                }
            })
            .collect();
        match b.respond(&view, &ReconMessage { ranges: lies }) {
            Ok((next, _)) => {
                rounds += 1;
                assert!(!next.is_empty(), "the liar keeps it going");
                sent = next;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(err, ReconError::TooManyRounds { max: MAX_ROUNDS });
    assert_eq!(rounds, MAX_ROUNDS);
}

#[test]
fn calls_out_of_turn_are_refused() {
    let view = View::from_items(dense(10)).unwrap();
    let mut a = Reconciler::new(Role::Responder, Seq(10));
    assert_eq!(a.initiate(&view).unwrap_err(), ReconError::CannotInitiate);
    let mut b = Reconciler::new(Role::Initiator, Seq(10));
    let e = b.respond(&view, &ReconMessage::default()).unwrap_err();
    assert_eq!(e, ReconError::NotStarted);
    b.initiate(&view).unwrap();
    assert_eq!(b.initiate(&view).unwrap_err(), ReconError::CannotInitiate);
}

#[test]
fn unloaded_buckets_are_asked_for_and_nothing_changes_meanwhile() {
    let a_items = dense(10_000);
    let mut b_items = a_items.clone();
    b_items[4321] = corrupted(b_items[4321]);
    let (mut store_a, mut store_b) = (Store::new(&a_items), Store::new(&b_items));
    let (mut view_a, mut view_b) = (store_a.view(), store_b.view());
    let differing = vec![bucket_of(Seq(4322))];
    let mut b = Reconciler::new(Role::Initiator, Seq(10_000));
    assert!(b.buckets_needed_to_initiate(&view_b).is_empty());
    let m1 = b.initiate(&view_b).unwrap();
    // Ten buckets, ten ranges: A splits the one that differs inside it.
    let mut a = Reconciler::new(Role::Responder, Seq(10_000));
    assert_eq!(a.buckets_needed(&view_a, &m1), differing);
    let before = a.clone();
    assert_eq!(
        a.respond(&view_a, &m1).unwrap_err(),
        ReconError::NeedItems(NeedItems(differing[0]))
    );
    assert_eq!(
        (a.rounds(), a.is_done()),
        (before.rounds(), before.is_done())
    );
    store_a.load(&mut view_a, &differing);
    let (m2, _) = a.respond(&view_a, &m1).unwrap();
    assert_eq!(b.buckets_needed(&view_b, &m2), differing);
    store_b.load(&mut view_b, &differing);
    let (m3, _) = b.respond(&view_b, &m2).unwrap();
    assert!(a.buckets_needed(&view_a, &m3).is_empty());
    let (m4, _) = a.respond(&view_a, &m3).unwrap();
    assert!(b.buckets_needed(&view_b, &m4).is_empty());
    let (m5, found) = b.respond(&view_b, &m4).unwrap();
    assert_eq!(
        found,
        Found {
            need: vec![Seq(4322)],
            extra: vec![Seq(4322)]
        }
    );
    assert!(m5.is_empty() && b.is_done());
}

#[test]
fn view_fingerprints_need_items_only_for_partial_buckets() {
    let items = dense(5000);
    let store = Store::new(&items);
    let mut view = store.view();
    let b = 1u64 << BUCKET_SHIFT;
    let whole = view.fingerprint(Seq(b), Seq(3 * b)).unwrap();
    assert_eq!(whole.count, 2 * b);
    assert_eq!(view.fingerprint(Seq(b + 1), Seq(3 * b)), Err(NeedItems(1)));
    assert_eq!(view.fingerprint(Seq(b), Seq(3 * b - 1)), Err(NeedItems(2)));
    // Past max_seq the last bucket counts as whole.
    assert_eq!(
        view.fingerprint(Seq(4 * b), Seq(9000)).unwrap().count,
        5000 - 4 * b + 1
    );
    assert_eq!(view.fingerprint(Seq(6000), Seq(9000)).unwrap().count, 0);
    assert_eq!(view.items(Seq(10), Seq(20)), Err(NeedItems(0)));
    view.load_items(1, store.rows[&1].clone()).unwrap();
    let part = view.fingerprint(Seq(b + 1), Seq(3 * b)).unwrap();
    assert_eq!(part.count, 2 * b - 1);
    assert_eq!(view.items(Seq(b + 1), Seq(b + 3)).unwrap().len(), 2);
}

#[test]
fn loading_refuses_foreign_or_repeated_seqs() {
    let mut view = View::default();
    let e = view.load_items(0, vec![item(1, 2000)]).unwrap_err();
    assert_eq!(
        e,
        ViewError::OutsideBucket {
            bucket: 0,
            seq: Seq(2000)
        }
    );
    let e = view
        .load_items(0, vec![item(1, 5), item(2, 5)])
        .unwrap_err();
    assert_eq!(e, ViewError::DuplicateSeq(Seq(5)));
    assert!(View::from_items([item(1, 5), item(2, 5)]).is_err());
}

/// Two dense sets of a million records with 100 differences: the size
/// goal (at most 6 round trips and 64 KB in all).
fn million(config: ReconConfig, seed: u64) -> Outcome {
    dense_with_differences(1_000_000, 100, config, seed)
}

/// Dense sets of `n` random fingerprints with `diffs` differences, a
/// third of each kind (missing, extra, corrupted).
fn dense_with_differences(n: u64, diffs: usize, config: ReconConfig, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let source: Vec<Item> = (1..=n)
        .map(|s| Item {
            seq: Seq(s),
            id: [0; 16],
            fp: rng.random(),
        })
        .collect();
    let mut a = source.clone();
    let mut b = source;
    let mut picks: Vec<usize> = (0..n as usize).collect();
    picks.shuffle(&mut rng);
    let picks = &picks[..diffs];
    for (k, &i) in picks.iter().enumerate() {
        match k % 3 {
            0 => b[i].seq = Seq(0),
            1 => a[i].seq = Seq(0),
            _ => b[i].fp = rng.random(),
        }
    }
    a.retain(|it| it.seq.0 != 0);
    b.retain(|it| it.seq.0 != 0);
    assert_exact(&a, &b, n, config)
}

#[test]
fn million_records_hundred_differences() {
    let out = million(ReconConfig::default(), 7);
    let differing: BTreeSet<u64> = out
        .found
        .need
        .iter()
        .chain(&out.found.extra)
        .map(|&s| bucket_of(s))
        .collect();
    eprintln!(
        "1M records, 100 differences: {} round trips, {} bytes ({} to the source, {} back), \
         buckets loaded: {} by the replica, {} by the source, of {} differing and 977 in all; \
         message sizes {:?}",
        out.round_trips,
        out.bytes(),
        out.bytes_to_responder,
        out.bytes_to_initiator,
        out.loaded_initiator,
        out.loaded_responder,
        differing.len(),
        out.sizes,
    );
    assert!(out.round_trips <= 6, "{} round trips", out.round_trips);
    assert!(out.bytes() <= 64_000, "{} bytes", out.bytes());
    // Each side loads the buckets that differ, and no other.
    assert_eq!(out.loaded_initiator, differing.len());
    assert_eq!(out.loaded_responder, differing.len());
}

/// Prints rounds and bytes for a grid of configs (`--ignored --nocapture`).
#[test]
#[ignore]
fn tune_million() {
    for branching in [4, 6, 8, 10, 12, 14, 16, 20] {
        for item_threshold in [4, 8, 16, 24, 32, 64] {
            let config = ReconConfig {
                branching,
                item_threshold,
            };
            let outs: Vec<Outcome> = (1..=4).map(|seed| million(config, seed)).collect();
            let rt = outs.iter().map(|o| o.round_trips).max().unwrap_or(0);
            let bytes = outs.iter().map(Outcome::bytes).sum::<usize>() / outs.len();
            let most = outs.iter().map(Outcome::bytes).max().unwrap_or(0);
            let loaded = outs
                .iter()
                .map(|o| o.loaded_initiator + o.loaded_responder)
                .sum::<usize>()
                / outs.len();
            eprintln!(
                "b={branching:2} t={item_threshold:2}: {rt} round trips, {bytes:6} bytes (max {most}), {loaded} loads"
            );
        }
    }
}

/// Prints rounds and bytes for other sizes (`--ignored --nocapture`).
#[test]
#[ignore]
fn tune_sizes() {
    for (n, diffs) in [
        (100_000, 10),
        (1_000_000, 10),
        (200_000, 100),
        (1_000_000, 1000),
        (2_000_000, 300),
    ] {
        for branching in [8, 10, 12, 16] {
            for item_threshold in [16, 24, 32] {
                let config = ReconConfig {
                    branching,
                    item_threshold,
                };
                let out = dense_with_differences(n, diffs, config, 1);
                eprintln!(
                    "n={n} d={diffs} b={branching:2} t={item_threshold:2}: {} round trips, {:6} bytes, {} loads",
                    out.round_trips,
                    out.bytes(),
                    out.loaded_initiator + out.loaded_responder
                );
            }
        }
    }
}
