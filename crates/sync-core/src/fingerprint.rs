//! `Fingerprint`: an order-independent hash of an owner's records.

use std::fmt;

use crate::id::Seq;

/// An order-independent accumulator over `(id, seq, deleted)`: the wrapping
/// sum of each record's 128-bit xxh3 hash. Two replicas holding the same
/// versions of the same records have equal fingerprints, whatever the order
/// they were applied in; `remove` undoes `add`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Fingerprint(pub u128);

impl Fingerprint {
    /// The hash of one record version.
    pub fn record_hash(id: &[u8; 16], seq: Seq, deleted: bool) -> u128 {
        let mut buf = [0u8; 25];
        buf[..16].copy_from_slice(id);
        buf[16..24].copy_from_slice(&seq.0.to_le_bytes());
        buf[24] = u8::from(deleted);
        xxhash_rust::xxh3::xxh3_128(&buf)
    }

    /// Adds a record version.
    pub fn add(&mut self, id: &[u8; 16], seq: Seq, deleted: bool) {
        self.0 = self.0.wrapping_add(Self::record_hash(id, seq, deleted));
    }

    /// Removes a record version previously added.
    pub fn remove(&mut self, id: &[u8; 16], seq: Seq, deleted: bool) {
        self.0 = self.0.wrapping_sub(Self::record_hash(id, seq, deleted));
    }

    /// Combines two fingerprints of disjoint sets.
    pub fn merge(&mut self, other: Fingerprint) {
        self.0 = self.0.wrapping_add(other.0);
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> [u8; 16] {
        [n; 16]
    }

    #[test]
    fn order_independent() {
        let mut a = Fingerprint::default();
        let mut b = Fingerprint::default();
        for n in 0..50u8 {
            a.add(&id(n), Seq(n as u64), n % 3 == 0);
        }
        for n in (0..50u8).rev() {
            b.add(&id(n), Seq(n as u64), n % 3 == 0);
        }
        assert_eq!(a, b);
        assert_ne!(a, Fingerprint::default());
    }

    #[test]
    fn add_then_remove_restores() {
        let mut a = Fingerprint::default();
        a.add(&id(1), Seq(1), false);
        let before = a;
        a.add(&id(2), Seq(7), true);
        assert_ne!(a, before);
        a.remove(&id(2), Seq(7), true);
        assert_eq!(a, before);
    }

    #[test]
    fn different_seq_or_tombstone_differs() {
        let mut a = Fingerprint::default();
        let mut b = Fingerprint::default();
        let mut c = Fingerprint::default();
        a.add(&id(1), Seq(1), false);
        b.add(&id(1), Seq(2), false);
        c.add(&id(1), Seq(1), true);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn hex_is_32_digits() {
        let mut a = Fingerprint::default();
        a.add(&id(9), Seq(3), false);
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(a.to_hex(), a.to_string());
    }
}
