//! Content digests: each record's canonical hash, the per-owner LtHash
//! multiset digest, range fingerprints by seq bucket, and the owner-signed
//! statement a digest travels in.
//!
//! The owner digest is LtHash16 (Lewi et al., "Securing Update Propagation
//! with Homomorphic Hashing", 2019): a record becomes a vector of 1,024
//! 16-bit lanes (2,048 bytes of BLAKE3 output over its canonical bytes) and
//! a set is the lane-wise sum mod 2^16 of its records' vectors. Adding or
//! removing one record is one vector add or subtract, so the digest is kept
//! in the same transaction as the rows, in any order. Finding two different
//! sets with one sum is a short-vector problem in a 1,024-dimensional
//! lattice (about 200 bits of security per the paper); a plain sum of
//! 128- or 256-bit hashes falls to Wagner's generalised birthday attack,
//! because an adversary who chooses records can choose many.
//!
//! Range fingerprints (reconciliation) are weaker on purpose: a wrapping
//! sum of 128 bits per record and a count, per bucket of 1,024 seqs. They
//! only locate differences; whatever reconciliation concludes is accepted
//! only when the resulting copy matches the owner digest.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{DeviceId, IndexId, LibraryId, Seq, Watermark};
use crate::model::{Entry, Location, Record, micros};

/// Lanes of an LtHash16 vector.
pub const LANES: usize = 1024;
/// Bytes of an LtHash16 vector (two per lane, little-endian).
pub const LTHASH_BYTES: usize = LANES * 2;
/// Seqs per reconciliation bucket: `seq >> BUCKET_SHIFT` names a bucket.
pub const BUCKET_SHIFT: u32 = 10;

/// BLAKE3 key-derivation context of a record's lanes.
const RECORD_CONTEXT: &str = "lsync 2026-12 record lthash16 v1";
/// BLAKE3 key-derivation context of a digest's short id.
const DIGEST_CONTEXT: &str = "lsync 2026-12 owner digest id v1";

/// The reconciliation bucket of a seq.
pub fn bucket_of(seq: Seq) -> u64 {
    seq.0 >> BUCKET_SHIFT
}

/// The first seq of a bucket.
pub fn bucket_start(bucket: u64) -> Seq {
    Seq(bucket << BUCKET_SHIFT)
}

/// Appends the canonical bytes of an entry: every replicated field, fixed
/// widths, lengths before strings, timestamps in microseconds (as stored).
pub fn canonical_entry(e: &Entry, out: &mut Vec<u8>) {
    out.push(b'E');
    out.extend_from_slice(&e.id.to_bytes());
    out.extend_from_slice(&e.location.to_bytes());
    match e.parent {
        Some(p) => {
            out.push(1);
            out.extend_from_slice(&p.to_bytes());
        }
        None => out.push(0),
    }
    put_str(out, &e.name);
    out.push(e.kind.code());
    out.extend_from_slice(&e.size.to_le_bytes());
    match e.inode {
        Some(i) => {
            out.push(1);
            out.extend_from_slice(&i.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&micros::to_micros(&e.created_at).to_le_bytes());
    out.extend_from_slice(&micros::to_micros(&e.modified_at).to_le_bytes());
    out.extend_from_slice(&e.seq.0.to_le_bytes());
    out.push(u8::from(e.deleted));
}

/// Appends the canonical bytes of a location (see [`canonical_entry`]).
pub fn canonical_location(l: &Location, out: &mut Vec<u8>) {
    out.push(b'L');
    out.extend_from_slice(&l.id.to_bytes());
    out.extend_from_slice(&l.owner.to_bytes());
    put_str(out, &l.path);
    put_str(out, &l.name);
    out.extend_from_slice(&l.seq.0.to_le_bytes());
    out.push(u8::from(l.deleted));
}

/// A length-prefixed string.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// One record's LtHash vector: its contribution to an owner digest.
#[derive(Clone)]
pub struct Element {
    lanes: [u16; LANES],
}

impl Element {
    /// The vector of a record.
    pub fn of(record: &Record) -> Element {
        let mut buf = Vec::with_capacity(128);
        match record {
            Record::Entry(e) => canonical_entry(e, &mut buf),
            Record::Location(l) => canonical_location(l, &mut buf),
        }
        Element::of_canonical(&buf)
    }

    /// The vector of an entry.
    pub fn of_entry(e: &Entry) -> Element {
        let mut buf = Vec::with_capacity(128);
        canonical_entry(e, &mut buf);
        Element::of_canonical(&buf)
    }

    /// The vector of a location.
    pub fn of_location(l: &Location) -> Element {
        let mut buf = Vec::with_capacity(96);
        canonical_location(l, &mut buf);
        Element::of_canonical(&buf)
    }

    /// The vector of canonical record bytes.
    pub fn of_canonical(bytes: &[u8]) -> Element {
        let mut reader = blake3::Hasher::new_derive_key(RECORD_CONTEXT)
            .update(bytes)
            .finalize_xof();
        let mut raw = [0u8; LTHASH_BYTES];
        reader.fill(&mut raw);
        let mut lanes = [0u16; LANES];
        for (lane, pair) in lanes.iter_mut().zip(raw.chunks_exact(2)) {
            *lane = u16::from_le_bytes([pair[0], pair[1]]);
        }
        Element { lanes }
    }

    /// A record's range fingerprint without the rest of its vector (the
    /// first 16 bytes of the same output): equal to `Element::of(r).fp()`.
    pub fn fp_of(record: &Record) -> u128 {
        let mut buf = Vec::with_capacity(128);
        match record {
            Record::Entry(e) => canonical_entry(e, &mut buf),
            Record::Location(l) => canonical_location(l, &mut buf),
        }
        let mut reader = blake3::Hasher::new_derive_key(RECORD_CONTEXT)
            .update(&buf)
            .finalize_xof();
        let mut first = [0u8; 16];
        reader.fill(&mut first);
        u128::from_le_bytes(first)
    }

    /// The record's 128-bit range fingerprint (its first eight lanes).
    pub fn fp(&self) -> u128 {
        let mut v = 0u128;
        for lane in self.lanes[..8].iter().rev() {
            v = (v << 16) | u128::from(*lane);
        }
        v
    }
}

/// An LtHash16 multiset digest: the lane-wise sum of its records' vectors.
#[derive(Clone, PartialEq, Eq)]
pub struct LtHash {
    lanes: Box<[u16; LANES]>,
}

impl Default for LtHash {
    fn default() -> Self {
        LtHash::new()
    }
}

impl LtHash {
    /// The digest of the empty set.
    pub fn new() -> LtHash {
        LtHash {
            lanes: Box::new([0u16; LANES]),
        }
    }

    /// Adds one record.
    pub fn add(&mut self, e: &Element) {
        for (a, b) in self.lanes.iter_mut().zip(e.lanes.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// Removes one record (undoes [`LtHash::add`]).
    pub fn sub(&mut self, e: &Element) {
        for (a, b) in self.lanes.iter_mut().zip(e.lanes.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }

    /// Adds another digest (the union of two disjoint multisets).
    pub fn merge(&mut self, other: &LtHash) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// Subtracts another digest.
    pub fn unmerge(&mut self, other: &LtHash) {
        for (a, b) in self.lanes.iter_mut().zip(other.lanes.iter()) {
            *a = a.wrapping_sub(*b);
        }
    }

    /// Whether this is the digest of the empty set.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| *l == 0)
    }

    /// The 2,048 stored bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LTHASH_BYTES);
        for l in self.lanes.iter() {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out
    }

    /// From stored bytes; `None` unless exactly [`LTHASH_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Option<LtHash> {
        if bytes.len() != LTHASH_BYTES {
            return None;
        }
        let mut lanes = Box::new([0u16; LANES]);
        for (lane, pair) in lanes.iter_mut().zip(bytes.chunks_exact(2)) {
            *lane = u16::from_le_bytes([pair[0], pair[1]]);
        }
        Some(LtHash { lanes })
    }

    /// The 32-byte id of this digest: what peers compare and owners sign
    /// (BLAKE3 of the vector, so equal ids mean equal vectors).
    pub fn id(&self) -> DigestId {
        DigestId(blake3::derive_key(DIGEST_CONTEXT, &self.to_bytes()))
    }
}

impl fmt::Debug for LtHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LtHash({})", self.id())
    }
}

/// The 32-byte id of an owner digest (see [`LtHash::id`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DigestId(pub [u8; 32]);

impl DigestId {
    /// The id of the empty set's digest.
    pub fn empty() -> DigestId {
        LtHash::new().id()
    }

    /// The first 16 hex digits, for logs and `status`.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for DigestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DigestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestId({})", self.fmt_short())
    }
}

/// A range fingerprint: how many records, and the wrapping sum of their
/// [`Element::fp`]. Additive: the fingerprint of a union of disjoint
/// ranges is the sum of theirs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug, Serialize, Deserialize)]
pub struct RangeFp {
    /// Records in the range.
    pub count: u64,
    /// Wrapping sum of their fingerprints.
    pub sum: u128,
}

impl RangeFp {
    /// Adds one record's fingerprint.
    pub fn add(&mut self, fp: u128) {
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(fp);
    }

    /// Removes one record's fingerprint.
    pub fn sub(&mut self, fp: u128) {
        self.count = self.count.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(fp);
    }

    /// Adds a disjoint range.
    pub fn merge(&mut self, other: RangeFp) {
        self.count = self.count.wrapping_add(other.count);
        self.sum = self.sum.wrapping_add(other.sum);
    }

    /// Subtracts a range.
    pub fn unmerge(&mut self, other: RangeFp) {
        self.count = self.count.wrapping_sub(other.count);
        self.sum = self.sum.wrapping_sub(other.sum);
    }
}

/// What a device holds of one owner, as compared with a peer: the
/// watermark, the record count and the digest id, read in one transaction.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct OwnerDigest {
    /// Whose records.
    pub owner: DeviceId,
    /// The watermark the digest was taken at.
    pub watermark: Watermark,
    /// Records held (live and tombstones).
    pub records: u64,
    /// The digest of exactly those records.
    pub digest: DigestId,
    /// Tombstones with seq at or below this were collected from the copy
    /// (the owner's collection point, followed by its replicas).
    pub pruned: Seq,
}

/// How a replica's copy of an owner compares with a peer's copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Verification {
    /// Both hold the same IndexId up to the same seq, with equal digests:
    /// the two copies are identical.
    Identical {
        /// The seq both hold.
        seq: Seq,
    },
    /// This device holds less than the peer (a transfer is due).
    Behind {
        /// What this device holds.
        held: Seq,
        /// What the peer holds.
        theirs: Seq,
    },
    /// This device holds more than the peer.
    Ahead {
        /// What this device holds.
        held: Seq,
        /// What the peer holds.
        theirs: Seq,
    },
    /// The two hold another IndexId of the owner (a reset is due).
    OtherIndex,
    /// Same IndexId and seq, different contents: a repair is due.
    Differs {
        /// The seq both claim to hold.
        seq: Seq,
    },
}

impl Verification {
    /// Compares this device's copy with a peer's copy of the same owner.
    pub fn of(mine: &OwnerDigest, theirs: &OwnerDigest) -> Verification {
        let (a, b) = (mine.watermark, theirs.watermark);
        if a.index_id != b.index_id {
            return Verification::OtherIndex;
        }
        match a.seq.cmp(&b.seq) {
            std::cmp::Ordering::Less => Verification::Behind {
                held: a.seq,
                theirs: b.seq,
            },
            std::cmp::Ordering::Greater => Verification::Ahead {
                held: a.seq,
                theirs: b.seq,
            },
            std::cmp::Ordering::Equal
                if mine.digest == theirs.digest && mine.records == theirs.records =>
            {
                Verification::Identical { seq: a.seq }
            }
            std::cmp::Ordering::Equal => Verification::Differs { seq: a.seq },
        }
    }

    /// Words for `status`: "verified identical at 42", "behind (10 of 42)".
    pub fn describe(&self) -> String {
        match self {
            Verification::Identical { seq } => format!("verified identical at {}", seq.0),
            Verification::Behind { held, theirs } => {
                format!("behind ({} of {})", held.0, theirs.0)
            }
            Verification::Ahead { held, theirs } => format!("ahead ({} over {})", held.0, theirs.0),
            Verification::OtherIndex => "other index (reset due)".to_string(),
            Verification::Differs { seq } => format!("differs at {}", seq.0),
        }
    }
}

/// What an owner signs about its own records: "in library L, my records of
/// index I up to seq S are `records` records with digest D".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DigestStatement {
    /// The library the records belong to (a statement is not replayable
    /// into another library).
    pub library: LibraryId,
    /// The owner, who signs.
    pub owner: DeviceId,
    /// The owner's IndexId.
    pub index_id: IndexId,
    /// The owner's max seq when it signed.
    pub seq: Seq,
    /// Its records up to `seq` (live and tombstones).
    pub records: u64,
    /// The digest of those records.
    pub digest: DigestId,
    /// The owner's tombstone collection point (see [`OwnerDigest::pruned`]).
    pub pruned: Seq,
}

/// The domain prefix of a statement's signed bytes.
const STATEMENT_DOMAIN: &[u8] = b"lsync digest statement v2\0";

impl DigestStatement {
    /// The exact bytes a signature covers: a domain prefix, then every
    /// field at a fixed width.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATEMENT_DOMAIN.len() + 16 * 2 + 8 * 4 + 32);
        out.extend_from_slice(STATEMENT_DOMAIN);
        out.extend_from_slice(&self.library.to_bytes());
        out.extend_from_slice(&self.owner.to_bytes());
        out.extend_from_slice(&self.index_id.0.to_le_bytes());
        out.extend_from_slice(&self.seq.0.to_le_bytes());
        out.extend_from_slice(&self.records.to_le_bytes());
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.pruned.0.to_le_bytes());
        out
    }

    /// The statement as an [`OwnerDigest`] (what it claims the owner holds).
    pub fn claim(&self) -> OwnerDigest {
        OwnerDigest {
            owner: self.owner,
            watermark: Watermark::new(self.index_id, self.seq),
            records: self.records,
            digest: self.digest,
            pruned: self.pruned,
        }
    }
}

/// A statement with the owner's signature over [`DigestStatement::signing_bytes`]
/// and the owner's certificate (DER), whose SHA-256 must be the fingerprint
/// pinned for the owner: a receiver verifies it without asking whoever
/// forwarded it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedStatement {
    /// What is claimed.
    pub statement: DigestStatement,
    /// The owner's signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    /// The owner's certificate, DER.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
}

#[cfg(test)]
mod tests;
