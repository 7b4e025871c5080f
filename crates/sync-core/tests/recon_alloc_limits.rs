//! Peak allocation of decoding hostile reconciliation messages, measured by
//! the counting global allocator of `support`: declared lengths past
//! [`MAX_RANGES`], [`MAX_ITEMS_PER_BODY`] and [`MAX_ITEMS`] are refused
//! before anything is reserved for them, and a declared length within the
//! bounds reserves no more than the bound.
//!
//! The allocator counts every allocation of this test binary, so the tests
//! take one lock and measure one at a time.

use std::mem::size_of;

use sync_core::Seq;
use sync_core::reconcile::{
    Body, MAX_ITEMS, MAX_ITEMS_PER_BODY, MAX_RANGES, Range, ReconMessage, WireItem,
};

mod support;
use support::{MIB, lock, measure, varint};

const KIB: usize = 1 << 10;

/// A message of `n` ranges of [`MAX_ITEMS_PER_BODY`] items each.
fn full_bodies(n: usize) -> ReconMessage {
    let per = MAX_ITEMS_PER_BODY as u64;
    let ranges = (0..n as u64)
        .map(|k| Range {
            upper: Seq(per * (k + 1)),
            body: Body::Items(
                (per * k..per * (k + 1))
                    .map(|s| WireItem { seq: Seq(s), fp: s })
                    .collect(),
            ),
        })
        .collect();
    ReconMessage { ranges }
}

/// `n` skip ranges of width one, declared as `declared`.
fn skips(declared: u64, n: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    varint(&mut raw, declared);
    for _ in 0..n {
        raw.extend_from_slice(&[1, 0]);
    }
    raw
}

/// Appends a range of width `width` whose body declares `declared` items
/// and holds `held` of them.
fn items_range(raw: &mut Vec<u8>, width: u64, declared: u64, held: usize) {
    for v in [width, 2, declared] {
        varint(raw, v);
    }
    for k in 0..held {
        raw.push(u8::from(k > 0)); // seq delta
        raw.extend_from_slice(&[7; 8]);
    }
}

#[test]
fn ranges_declared_past_the_bound_are_refused_before_reserving() {
    let _g = lock();
    let raw = skips(MAX_RANGES as u64 + 1, MAX_RANGES + 1);
    let (outcome, peak) = measure(|| ReconMessage::decode(&raw));
    eprintln!("{} ranges declared and held: peak {peak} B", MAX_RANGES + 1);
    assert!(outcome.is_err());
    assert!(peak < KIB, "peak {peak} B");
    let within = skips(MAX_RANGES as u64, MAX_RANGES);
    let (outcome, peak) = measure(|| ReconMessage::decode(&within));
    assert_eq!(outcome.expect("within the bound").ranges.len(), MAX_RANGES);
    assert!(
        peak <= MAX_RANGES * size_of::<Range>() + KIB,
        "peak {peak} B"
    );
}

#[test]
fn a_short_message_declaring_many_ranges_reserves_nothing() {
    let _g = lock();
    let raw = skips(4 << 20, 1);
    let (outcome, peak) = measure(|| ReconMessage::decode(&raw));
    eprintln!("4 Mi ranges declared, one held: peak {peak} B");
    assert!(outcome.is_err());
    assert!(peak < KIB, "peak {peak} B");
}

#[test]
fn an_items_body_declared_past_the_bound_is_refused_before_reserving() {
    let _g = lock();
    let over = MAX_ITEMS_PER_BODY + 1;
    let mut raw = Vec::new();
    varint(&mut raw, 1);
    items_range(&mut raw, over as u64, over as u64, over);
    let (outcome, peak) = measure(|| ReconMessage::decode(&raw));
    eprintln!("{over} items declared and held: peak {peak} B");
    assert!(outcome.is_err());
    assert!(peak < KIB, "peak {peak} B");
}

#[test]
fn items_past_the_message_budget_are_refused_at_their_declared_length() {
    let _g = lock();
    let bodies = MAX_ITEMS / MAX_ITEMS_PER_BODY;
    let mut raw = full_bodies(bodies).encode().expect("within the bounds");
    // One range more, whose body declares a full body's items.
    let mut count = Vec::new();
    varint(&mut count, bodies as u64);
    let mut more = Vec::new();
    varint(&mut more, bodies as u64 + 1);
    assert_eq!(count.len(), more.len());
    raw[..count.len()].copy_from_slice(&more);
    items_range(
        &mut raw,
        MAX_ITEMS_PER_BODY as u64,
        MAX_ITEMS_PER_BODY as u64,
        MAX_ITEMS_PER_BODY,
    );
    let (outcome, peak) = measure(|| ReconMessage::decode(&raw));
    eprintln!("{MAX_ITEMS} items and {MAX_ITEMS_PER_BODY} more declared: peak {peak} B");
    assert!(outcome.is_err());
    // The items within the budget (16 B each) and the ranges, nothing for
    // the body past it.
    let held = MAX_ITEMS * size_of::<WireItem>() + (bodies + 1) * size_of::<Range>();
    assert!(peak < held + 4 * KIB, "peak {peak} B, held {held} B");
}

#[test]
fn a_legit_message_costs_its_lists_once() {
    let _g = lock();
    let msg = full_bodies(MAX_ITEMS / MAX_ITEMS_PER_BODY);
    let raw = msg.encode().expect("within the bounds");
    let (outcome, peak) = measure(|| ReconMessage::decode(&raw));
    eprintln!(
        "{MAX_ITEMS} items in {} B: peak {:.2} MiB",
        raw.len(),
        peak as f64 / MIB as f64
    );
    assert_eq!(outcome.expect("decodes"), msg);
    let lists = MAX_ITEMS * size_of::<WireItem>() + msg.ranges.len() * size_of::<Range>();
    assert!(peak <= lists + 4 * KIB, "peak {peak} B, lists {lists} B");
}
