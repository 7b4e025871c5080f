//! Tests of the digest: homomorphism, sensitivity to every field, comparison.

use chrono::{TimeZone, Utc};

use super::*;
use crate::id::{EntryId, LocationId};
use crate::model::EntryKind;

fn entry(n: u8) -> Entry {
    Entry {
        id: EntryId::from_bytes([n; 16]),
        location: LocationId::from_bytes([200; 16]),
        parent: Some(EntryId::from_bytes([201; 16])),
        name: format!("file-{n}"),
        kind: EntryKind::File,
        size: 1000 + u64::from(n),
        inode: Some(77),
        created_at: Utc.timestamp_micros(1_700_000_000_000_001).unwrap(),
        modified_at: Utc.timestamp_micros(1_700_000_000_000_002).unwrap(),
        seq: Seq(u64::from(n) + 1),
        deleted: false,
    }
}

fn location() -> Location {
    Location {
        id: LocationId::from_bytes([200; 16]),
        owner: DeviceId::from_bytes([9; 16]),
        path: "/home/a".into(),
        name: "a".into(),
        seq: Seq(1),
        deleted: false,
    }
}

#[test]
fn the_digest_of_a_set_ignores_order_and_sub_undoes_add() {
    let els: Vec<Element> = (0..20).map(|n| Element::of_entry(&entry(n))).collect();
    let mut forward = LtHash::new();
    for e in &els {
        forward.add(e);
    }
    let mut backward = LtHash::new();
    for e in els.iter().rev() {
        backward.add(e);
    }
    assert_eq!(forward, backward);
    assert_ne!(forward.id(), DigestId::empty());
    for e in &els {
        forward.sub(e);
    }
    assert!(forward.is_empty());
    assert_eq!(forward.id(), DigestId::empty());
}

#[test]
fn every_replicated_field_changes_the_element() {
    let base = entry(3);
    let id = |e: &Entry| {
        let mut h = LtHash::new();
        h.add(&Element::of_entry(e));
        h.id()
    };
    let b = id(&base);
    type Change = Box<dyn Fn(&mut Entry)>;
    let variants: Vec<Change> = vec![
        Box::new(|e| e.id = EntryId::from_bytes([4; 16])),
        Box::new(|e| e.location = LocationId::from_bytes([4; 16])),
        Box::new(|e| e.parent = None),
        Box::new(|e| e.parent = Some(EntryId::from_bytes([4; 16]))),
        Box::new(|e| e.name.push('x')),
        Box::new(|e| e.kind = EntryKind::Dir),
        Box::new(|e| e.size += 1),
        Box::new(|e| e.inode = None),
        Box::new(|e| e.inode = Some(78)),
        Box::new(|e| e.created_at += chrono::Duration::microseconds(1)),
        Box::new(|e| e.modified_at += chrono::Duration::microseconds(1)),
        Box::new(|e| e.seq = Seq(99)),
        Box::new(|e| e.deleted = true),
    ];
    for (i, change) in variants.iter().enumerate() {
        let mut e = base.clone();
        change(&mut e);
        assert_ne!(id(&e), b, "change {i} left the digest unchanged");
    }
    let l = location();
    let lid = |l: &Location| {
        let mut h = LtHash::new();
        h.add(&Element::of_location(l));
        h.id()
    };
    let lb = lid(&l);
    for change in [
        |l: &mut Location| l.path.push('x'),
        |l: &mut Location| l.name.push('x'),
        |l: &mut Location| l.owner = DeviceId::from_bytes([1; 16]),
        |l: &mut Location| l.seq = Seq(2),
        |l: &mut Location| l.deleted = true,
    ] {
        let mut m = l.clone();
        change(&mut m);
        assert_ne!(lid(&m), lb);
    }
}

#[test]
fn length_prefixes_keep_field_boundaries() {
    // "ab" + "c" and "a" + "bc" as path and name must differ.
    let mut a = location();
    a.path = "ab".into();
    a.name = "c".into();
    let mut b = location();
    b.path = "a".into();
    b.name = "bc".into();
    assert_ne!(Element::of_location(&a).fp(), Element::of_location(&b).fp());
}

#[test]
fn stored_bytes_round_trip_and_wrong_lengths_are_refused() {
    let mut h = LtHash::new();
    h.add(&Element::of_entry(&entry(1)));
    let bytes = h.to_bytes();
    assert_eq!(bytes.len(), LTHASH_BYTES);
    assert_eq!(LtHash::from_bytes(&bytes), Some(h));
    assert_eq!(LtHash::from_bytes(&bytes[1..]), None);
    assert_eq!(LtHash::from_bytes(&[0u8; LTHASH_BYTES + 2]), None);
}

#[test]
fn range_fingerprints_are_additive() {
    let fps: Vec<u128> = (0..10).map(|n| Element::of_entry(&entry(n)).fp()).collect();
    let mut all = RangeFp::default();
    fps.iter().for_each(|f| all.add(*f));
    let mut left = RangeFp::default();
    let mut right = RangeFp::default();
    fps[..4].iter().for_each(|f| left.add(*f));
    fps[4..].iter().for_each(|f| right.add(*f));
    left.merge(right);
    assert_eq!(left, all);
    left.unmerge(right);
    let mut four = RangeFp::default();
    fps[..4].iter().for_each(|f| four.add(*f));
    assert_eq!(left, four);
    four.sub(fps[3]);
    assert_eq!(four.count, 3);
}

#[test]
fn comparison_names_each_state() {
    let owner = DeviceId::from_bytes([1; 16]);
    let idx = IndexId(5);
    let d = |seq: u64, digest: u8| OwnerDigest {
        owner,
        watermark: Watermark::new(idx, Seq(seq)),
        records: seq,
        digest: DigestId([digest; 32]),
        pruned: Seq(0),
    };
    assert_eq!(
        Verification::of(&d(4, 1), &d(4, 1)),
        Verification::Identical { seq: Seq(4) }
    );
    assert_eq!(
        Verification::of(&d(4, 1), &d(4, 2)),
        Verification::Differs { seq: Seq(4) }
    );
    assert!(matches!(
        Verification::of(&d(3, 1), &d(4, 1)),
        Verification::Behind { .. }
    ));
    assert!(matches!(
        Verification::of(&d(5, 1), &d(4, 1)),
        Verification::Ahead { .. }
    ));
    let mut other = d(4, 1);
    other.watermark.index_id = IndexId(6);
    assert_eq!(Verification::of(&d(4, 1), &other), Verification::OtherIndex);
    let mut fewer = d(4, 1);
    fewer.records = 3;
    assert_eq!(
        Verification::of(&d(4, 1), &fewer),
        Verification::Differs { seq: Seq(4) }
    );
}

#[test]
fn every_statement_field_is_signed() {
    let s = DigestStatement {
        library: LibraryId::from_bytes([1; 16]),
        owner: DeviceId::from_bytes([2; 16]),
        index_id: IndexId(3),
        seq: Seq(4),
        records: 5,
        digest: DigestId([6; 32]),
        pruned: Seq(2),
    };
    let base = s.signing_bytes();
    let mut v = s;
    v.library = LibraryId::from_bytes([9; 16]);
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.owner = DeviceId::from_bytes([9; 16]);
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.index_id = IndexId(9);
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.seq = Seq(9);
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.records = 9;
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.digest = DigestId([9; 32]);
    assert_ne!(v.signing_bytes(), base);
    let mut v = s;
    v.pruned = Seq(9);
    assert_ne!(v.signing_bytes(), base);
}

#[test]
fn the_short_fingerprint_is_the_elements_first_lanes() {
    let r = Record::Entry(entry(7));
    assert_eq!(Element::fp_of(&r), Element::of(&r).fp());
    let l = Record::Location(location());
    assert_eq!(Element::fp_of(&l), Element::of(&l).fp());
}
