//! What one side knows of an owner's records to answer a reconciliation
//! round: the persisted fingerprint of every non-empty bucket, and the
//! items of the buckets loaded so far.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::digest::{BUCKET_SHIFT, RangeFp, bucket_of, bucket_start};
use crate::id::Seq;

/// One record as reconciliation sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Item {
    /// The record's seq in its owner's timeline.
    pub seq: Seq,
    /// The record's id (an entry's or a location's 16 bytes).
    pub id: [u8; 16],
    /// The record's [`crate::digest::Element::fp`].
    pub fp: u128,
}

/// The items of a bucket are needed and not loaded.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Error)]
#[error("the items of bucket {0} are not loaded")]
pub struct NeedItems(pub u64);

/// Why a view refused items it was given (a local error, not a peer's).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
pub enum ViewError {
    /// An item loaded for a bucket has a seq of another bucket.
    #[error("seq {seq} is not in bucket {bucket}")]
    OutsideBucket {
        /// The bucket being loaded.
        bucket: u64,
        /// The item's seq.
        seq: Seq,
    },
    /// Two items share a seq.
    #[error("two items have seq {0}")]
    DuplicateSeq(Seq),
}

/// One side's knowledge of an owner's records: every non-empty bucket's
/// [`RangeFp`], the highest seq held, and the items of the buckets loaded
/// on demand ([`View::load_items`]).
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Fingerprint of every non-empty bucket, by bucket number.
    buckets: BTreeMap<u64, RangeFp>,
    /// The highest seq of any record held (or above).
    max_seq: Seq,
    /// Items of the loaded buckets, sorted by seq.
    loaded: BTreeMap<u64, Vec<Item>>,
}

/// The first seq after a bucket (saturating: no range reaches `u64::MAX`).
pub(crate) fn bucket_end(bucket: u64) -> u64 {
    bucket_start(bucket).0.saturating_add(1 << BUCKET_SHIFT)
}

/// The fingerprint of a list of items.
pub(crate) fn sum_items(items: &[Item]) -> RangeFp {
    let mut fp = RangeFp::default();
    for item in items {
        fp.add(item.fp);
    }
    fp
}

impl View {
    /// A view of the persisted bucket table, nothing loaded. `max_seq` is
    /// the highest seq the side holds (its watermark): a bucket's
    /// fingerprint then also covers a range that ends past `max_seq`
    /// without loading it. Pass `Seq(u64::MAX)` when unknown.
    pub fn new(buckets: BTreeMap<u64, RangeFp>, max_seq: Seq) -> View {
        let buckets = buckets
            .into_iter()
            .filter(|(_, fp)| fp.count != 0)
            .collect();
        View {
            buckets,
            max_seq,
            loaded: BTreeMap::new(),
        }
    }

    /// A view of these items, every bucket loaded (tests, small owners).
    pub fn from_items(items: impl IntoIterator<Item = Item>) -> Result<View, ViewError> {
        let mut by_bucket: BTreeMap<u64, Vec<Item>> = BTreeMap::new();
        for item in items {
            by_bucket.entry(bucket_of(item.seq)).or_default().push(item);
        }
        let mut view = View::default();
        for (bucket, items) in by_bucket {
            view.load_items(bucket, items)?;
        }
        Ok(view)
    }

    /// Loads the items of a bucket (any order). The bucket's fingerprint
    /// becomes their sum, so a view stays consistent if the rows changed
    /// since the table was read; `max_seq` rises to the highest seq loaded.
    pub fn load_items(&mut self, bucket: u64, mut items: Vec<Item>) -> Result<(), ViewError> {
        items.sort_unstable_by_key(|item| item.seq);
        if let Some(item) = items.iter().find(|item| bucket_of(item.seq) != bucket) {
            return Err(ViewError::OutsideBucket {
                bucket,
                seq: item.seq,
            });
        }
        if let Some(pair) = items.windows(2).find(|pair| pair[0].seq == pair[1].seq) {
            return Err(ViewError::DuplicateSeq(pair[0].seq));
        }
        let fp = sum_items(&items);
        if fp.count == 0 {
            self.buckets.remove(&bucket);
        } else {
            self.buckets.insert(bucket, fp);
        }
        if let Some(last) = items.last() {
            self.max_seq = self.max_seq.max(last.seq);
        }
        self.loaded.insert(bucket, items);
        Ok(())
    }

    /// The fingerprint of every non-empty bucket.
    pub fn buckets(&self) -> &BTreeMap<u64, RangeFp> {
        &self.buckets
    }

    /// The highest seq held.
    pub fn max_seq(&self) -> Seq {
        self.max_seq
    }

    /// Whether a bucket's items are loaded.
    pub fn is_loaded(&self, bucket: u64) -> bool {
        self.loaded.contains_key(&bucket)
    }

    /// How many buckets have their items loaded.
    pub fn loaded_buckets(&self) -> usize {
        self.loaded.len()
    }

    /// The fingerprint of the records with `lo <= seq < hi`. Whole buckets
    /// come from the table; a bucket the range covers in part needs its
    /// items loaded.
    pub fn fingerprint(&self, lo: Seq, hi: Seq) -> Result<RangeFp, NeedItems> {
        let mut fp = RangeFp::default();
        for (bucket, seg_lo, seg_hi, whole) in self.segments(lo.0, hi.0) {
            fp.merge(self.segment_fp(bucket, seg_lo, seg_hi, whole)?);
        }
        Ok(fp)
    }

    /// The items with `lo <= seq < hi`, by seq; every bucket holding some
    /// of them needs its items loaded.
    pub fn items(&self, lo: Seq, hi: Seq) -> Result<Vec<Item>, NeedItems> {
        let mut out = Vec::new();
        for (bucket, seg_lo, seg_hi, _) in self.segments(lo.0, hi.0) {
            out.extend_from_slice(self.segment_items(bucket, seg_lo, seg_hi)?);
        }
        Ok(out)
    }

    /// Buckets whose items [`View::fingerprint`] of the range lacks.
    pub(crate) fn fp_needs(&self, lo: u64, hi: u64) -> Vec<u64> {
        self.segments(lo, hi)
            .filter(|&(bucket, _, _, whole)| !whole && !self.is_loaded(bucket))
            .map(|(bucket, ..)| bucket)
            .collect()
    }

    /// Buckets whose items [`View::items`] of the range lacks.
    pub(crate) fn items_needs(&self, lo: u64, hi: u64) -> Vec<u64> {
        self.segments(lo, hi)
            .filter(|&(bucket, ..)| !self.is_loaded(bucket))
            .map(|(bucket, ..)| bucket)
            .collect()
    }

    /// Bounds on the number of records in the range, without loading.
    pub(crate) fn count_bounds(&self, lo: u64, hi: u64) -> (u64, u64) {
        let (mut min, mut max) = (0u64, 0u64);
        for (bucket, seg_lo, seg_hi, whole) in self.segments(lo, hi) {
            match self.segment_fp(bucket, seg_lo, seg_hi, whole) {
                Ok(fp) => {
                    min = min.saturating_add(fp.count);
                    max = max.saturating_add(fp.count);
                }
                Err(_) => {
                    let all = self.buckets.get(&bucket).map_or(0, |fp| fp.count);
                    max = max.saturating_add(all);
                }
            }
        }
        (min, max)
    }

    /// The non-empty buckets the range meets, with their whole counts.
    pub(crate) fn bucket_counts(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.segments(lo, hi)
            .filter_map(|(bucket, ..)| self.buckets.get(&bucket).map(|fp| (bucket, fp.count)))
            .collect()
    }

    /// The part of each non-empty bucket that `[lo, hi)` meets, below
    /// `max_seq`: `(bucket, seg_lo, seg_hi, whole)`, where `whole` says the
    /// part holds all of the bucket's records.
    fn segments(&self, lo: u64, hi: u64) -> impl Iterator<Item = (u64, u64, u64, bool)> + '_ {
        let hi = hi.min(self.max_seq.0.saturating_add(1));
        let span = (lo < hi).then(|| bucket_of(Seq(lo))..=bucket_of(Seq(hi - 1)));
        span.into_iter()
            .flat_map(move |span| self.buckets.range(span))
            .map(move |(&bucket, _)| {
                let (start, end) = (bucket_start(bucket).0, bucket_end(bucket));
                let (seg_lo, seg_hi) = (lo.max(start), hi.min(end));
                let whole = seg_lo == start && (seg_hi == end || seg_hi > self.max_seq.0);
                (bucket, seg_lo, seg_hi, whole)
            })
    }

    /// The fingerprint of one bucket's part.
    fn segment_fp(&self, bucket: u64, lo: u64, hi: u64, whole: bool) -> Result<RangeFp, NeedItems> {
        if whole {
            return Ok(self.buckets.get(&bucket).copied().unwrap_or_default());
        }
        self.segment_items(bucket, lo, hi).map(sum_items)
    }

    /// The loaded items of one bucket's part.
    fn segment_items(&self, bucket: u64, lo: u64, hi: u64) -> Result<&[Item], NeedItems> {
        let items = self.loaded.get(&bucket).ok_or(NeedItems(bucket))?;
        let from = items.partition_point(|item| item.seq.0 < lo);
        let to = items.partition_point(|item| item.seq.0 < hi);
        Ok(&items[from..to.max(from)])
    }
}
