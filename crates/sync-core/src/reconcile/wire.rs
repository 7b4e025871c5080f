//! The wire form of a reconciliation message, postcard-encoded and
//! delta-coded, every list bounded before it is allocated.
//!
//! ```text
//! message  = varint(ranges) range*
//! range    = varint(upper - lower) body        lower: the previous upper, 0 first
//! body     = varint(0)                          Skip
//!          | varint(1) varint(count) u64le(sum) Fingerprint
//!          | varint(2) varint(items) item*      Items
//! item     = varint(seq - prev) u64le(fp)       prev: the range's lower, then the previous seq
//! ```
//!
//! A fingerprint is 10 to 13 bytes, an item 9 or 10: the sums and
//! fingerprints are the low 64 bits of the 128-bit ones (wrapping sums
//! truncate exactly), fixed-width because they are random.

use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, SeqAccess, Unexpected, VariantAccess, Visitor};
use serde::ser::{self, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ReconError;
use super::view::Item;
use crate::digest::RangeFp;
use crate::id::Seq;

/// The most ranges one message may hold: 65,536 (2.5 MiB in memory, at
/// least 128 KiB on the wire).
pub const MAX_RANGES: usize = 1 << 16;
/// The most items one `Items` body may hold: 4,096 (four buckets' worth).
pub const MAX_ITEMS_PER_BODY: usize = 1 << 12;
/// The most items one message may hold in all: 262,144 (4 MiB in memory,
/// at least 2.25 MiB on the wire).
pub const MAX_ITEMS: usize = 1 << 18;

/// One message of a reconciliation: consecutive ranges of seqs from 0,
/// each named by its exclusive upper bound. What follows the last range
/// is skipped; a message without ranges ends the conversation.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ReconMessage {
    /// The ranges, by increasing upper bound.
    pub ranges: Vec<Range>,
}

/// One range of a message: from the previous range's upper bound (0 for
/// the first) to `upper`, exclusive.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Range {
    /// The exclusive upper bound.
    pub upper: Seq,
    /// What the sender says of the range.
    pub body: Body,
}

/// What the sender says of a range.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Body {
    /// Nothing more to do here.
    Skip,
    /// The sender's fingerprint of the range: answer if yours differs.
    Fingerprint(WireFp),
    /// All the sender's items in the range, by increasing seq.
    Items(Vec<WireItem>),
}

/// A [`RangeFp`] on the wire: the count and the low 64 bits of the sum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct WireFp {
    /// Records in the range.
    pub count: u64,
    /// Low 64 bits of the wrapping sum of their fingerprints.
    #[serde(with = "fixed64")]
    pub sum: u64,
}

impl From<RangeFp> for WireFp {
    fn from(fp: RangeFp) -> WireFp {
        WireFp {
            count: fp.count,
            sum: fp.sum as u64,
        }
    }
}

/// An item on the wire: its seq and the low 64 bits of its fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct WireItem {
    /// The record's seq.
    pub seq: Seq,
    /// Low 64 bits of its fingerprint.
    pub fp: u64,
}

impl From<&Item> for WireItem {
    fn from(item: &Item) -> WireItem {
        WireItem {
            seq: item.seq,
            fp: item.fp as u64,
        }
    }
}

impl Body {
    /// Items the body holds.
    pub fn item_count(&self) -> usize {
        match self {
            Body::Items(items) => items.len(),
            _ => 0,
        }
    }
}

impl ReconMessage {
    /// Whether the message has no ranges (it ends the conversation).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The postcard bytes of the message; refused over the limits.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// A message from postcard bytes, every list bounded before it is
    /// allocated; trailing bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<ReconMessage, postcard::Error> {
        match postcard::take_from_bytes(bytes)? {
            (msg, []) => Ok(msg),
            _ => Err(postcard::Error::DeserializeBadEncoding),
        }
    }

    /// Why the message exceeds [`MAX_RANGES`], [`MAX_ITEMS_PER_BODY`] or
    /// [`MAX_ITEMS`], if it does.
    pub fn over_limits(&self) -> Option<ReconError> {
        if self.ranges.len() > MAX_RANGES {
            return Some(ReconError::TooManyRanges {
                count: self.ranges.len(),
                max: MAX_RANGES,
            });
        }
        let mut total = 0usize;
        for range in &self.ranges {
            let count = range.body.item_count();
            if count > MAX_ITEMS_PER_BODY {
                return Some(ReconError::TooManyItems {
                    count,
                    max: MAX_ITEMS_PER_BODY,
                });
            }
            total += count;
        }
        (total > MAX_ITEMS).then_some(ReconError::TooManyItems {
            count: total,
            max: MAX_ITEMS,
        })
    }
}

/// A `u64` as 8 little-endian bytes (postcard would spend 10 on a random one).
mod fixed64 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        v.to_le_bytes().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        <[u8; 8]>::deserialize(d).map(u64::from_le_bytes)
    }
}

/// The names of [`Body`]'s variants, in wire-tag order.
const BODY_VARIANTS: &[&str] = &["Skip", "Fingerprint", "Items"];

impl Serialize for ReconMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(why) = self.over_limits() {
            return Err(ser::Error::custom(why));
        }
        let mut seq = s.serialize_seq(Some(self.ranges.len()))?;
        let mut lower = 0u64;
        for range in &self.ranges {
            let delta = range
                .upper
                .0
                .checked_sub(lower)
                .ok_or_else(|| ser::Error::custom("ranges out of order"))?;
            let body = BodyRef {
                lower,
                body: &range.body,
            };
            seq.serialize_element(&(delta, body))?;
            lower = range.upper.0;
        }
        seq.end()
    }
}

/// A body with its range's lower bound, which its items are coded from.
struct BodyRef<'a> {
    lower: u64,
    body: &'a Body,
}

impl Serialize for BodyRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.body {
            Body::Skip => s.serialize_unit_variant("Body", 0, "Skip"),
            Body::Fingerprint(fp) => s.serialize_newtype_variant("Body", 1, "Fingerprint", fp),
            Body::Items(items) => {
                let items = ItemsRef {
                    lower: self.lower,
                    items,
                };
                s.serialize_newtype_variant("Body", 2, "Items", &items)
            }
        }
    }
}

/// Items coded as seq deltas from the range's lower bound.
struct ItemsRef<'a> {
    lower: u64,
    items: &'a [WireItem],
}

impl Serialize for ItemsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.items.len()))?;
        let mut prev = self.lower;
        for item in self.items {
            let delta = item
                .seq
                .0
                .checked_sub(prev)
                .ok_or_else(|| ser::Error::custom("items out of order"))?;
            seq.serialize_element(&(delta, item.fp.to_le_bytes()))?;
            prev = item.seq.0;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for ReconMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ReconMessage, D::Error> {
        d.deserialize_seq(MessageVisitor)
    }
}

/// Reads the ranges, at most [`MAX_RANGES`] of them holding at most
/// [`MAX_ITEMS`] items.
struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = ReconMessage;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a reconciliation message of at most {MAX_RANGES} ranges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ReconMessage, A::Error> {
        let hint = seq.size_hint();
        if let Some(len) = hint.filter(|&len| len > MAX_RANGES) {
            return Err(de::Error::invalid_length(len, &self));
        }
        let mut ranges = Vec::with_capacity(hint.unwrap_or(0).min(MAX_RANGES));
        let mut items_left = MAX_ITEMS;
        let mut lower = 0u64;
        while let Some(range) = seq.next_element_seed(RangeSeed {
            lower,
            items_left: &mut items_left,
        })? {
            if ranges.len() == MAX_RANGES {
                return Err(de::Error::invalid_length(MAX_RANGES + 1, &self));
            }
            lower = range.upper.0;
            ranges.push(range);
        }
        Ok(ReconMessage { ranges })
    }
}

/// Reads one range after `lower`, its items charged to `items_left`.
struct RangeSeed<'a> {
    lower: u64,
    items_left: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for RangeSeed<'_> {
    type Value = Range;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Range, D::Error> {
        d.deserialize_tuple(2, self)
    }
}

impl<'de> Visitor<'de> for RangeSeed<'_> {
    type Value = Range;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a range: upper-bound delta and body")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Range, A::Error> {
        let delta: u64 = seq
            .next_element()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let upper = self
            .lower
            .checked_add(delta)
            .ok_or_else(|| de::Error::custom("range upper bound overflows"))?;
        let body = seq
            .next_element_seed(BodySeed {
                lower: self.lower,
                items_left: self.items_left,
            })?
            .ok_or_else(|| de::Error::custom("a range without a body"))?;
        Ok(Range {
            upper: Seq(upper),
            body,
        })
    }
}

/// Reads one body of a range starting at `lower`.
struct BodySeed<'a> {
    lower: u64,
    items_left: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = Body;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Body, D::Error> {
        d.deserialize_enum("Body", BODY_VARIANTS, self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = Body;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a range body")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Body, A::Error> {
        let (tag, variant) = data.variant::<Tag>()?;
        match tag {
            Tag::Skip => variant.unit_variant().map(|()| Body::Skip),
            Tag::Fingerprint => variant.newtype_variant().map(Body::Fingerprint),
            Tag::Items => variant
                .newtype_variant_seed(ItemsSeed {
                    lower: self.lower,
                    items_left: self.items_left,
                })
                .map(Body::Items),
        }
    }
}

/// The wire tag of a [`Body`].
enum Tag {
    Skip,
    Fingerprint,
    Items,
}

impl<'de> Deserialize<'de> for Tag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tag, D::Error> {
        d.deserialize_identifier(TagVisitor)
    }
}

/// Reads a [`Tag`] by index or by name.
struct TagVisitor;

impl Visitor<'_> for TagVisitor {
    type Value = Tag;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a body tag: 0, 1 or 2")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tag, E> {
        match v {
            0 => Ok(Tag::Skip),
            1 => Ok(Tag::Fingerprint),
            2 => Ok(Tag::Items),
            _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Tag, E> {
        match v {
            "Skip" => Ok(Tag::Skip),
            "Fingerprint" => Ok(Tag::Fingerprint),
            "Items" => Ok(Tag::Items),
            _ => Err(E::unknown_variant(v, BODY_VARIANTS)),
        }
    }
}

/// Reads the items of a range starting at `lower`: at most
/// [`MAX_ITEMS_PER_BODY`], and no more than the message has left.
struct ItemsSeed<'a> {
    lower: u64,
    items_left: &'a mut usize,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_> {
    type Value = Vec<WireItem>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<WireItem>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_> {
    type Value = Vec<WireItem>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = MAX_ITEMS_PER_BODY.min(*self.items_left);
        write!(f, "at most {max} items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<WireItem>, A::Error> {
        let max = MAX_ITEMS_PER_BODY.min(*self.items_left);
        let hint = seq.size_hint();
        if let Some(len) = hint.filter(|&len| len > max) {
            return Err(de::Error::invalid_length(len, &self));
        }
        let mut items = Vec::with_capacity(hint.unwrap_or(0).min(max));
        let mut prev = self.lower;
        while let Some((delta, fp)) = seq.next_element::<(u64, [u8; 8])>()? {
            if items.len() == max {
                return Err(de::Error::invalid_length(max + 1, &self));
            }
            prev = prev
                .checked_add(delta)
                .ok_or_else(|| de::Error::custom("item seq overflows"))?;
            items.push(WireItem {
                seq: Seq(prev),
                fp: u64::from_le_bytes(fp),
            });
        }
        *self.items_left -= items.len();
        Ok(items)
    }
}
