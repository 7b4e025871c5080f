//! Range-based set reconciliation of one owner's records by seq
//! (negentropy-style): find the records two copies disagree on in traffic
//! proportional to the difference.
//!
//! The initiator (the replica, B) and the responder (the source, A)
//! exchange [`ReconMessage`]s covering the session's span `[0, upto]`.
//! Each range carries a fingerprint, a list of items, or a skip. A range
//! whose fingerprints agree is skipped; one that differs is split into
//! [`ReconConfig::branching`] sub-ranges (on bucket boundaries while it
//! spans several buckets, so its fingerprints come from the persisted
//! bucket table; by item rank inside a bucket), and a range the responder
//! holds at most [`ReconConfig::item_threshold`] items of is listed
//! instead (the initiator lists only what it holds almost nothing of, or
//! where the responder holds many: its list costs a list back). Items
//! compare by `(seq, fp)`: an item of A without its equal in B is one B
//! *needs*, an item of B without its equal in A one B *has extra*. The
//! initiator learns both halves ([`Found`]); the responder learns those of
//! the ranges the initiator listed.
//!
//! Nothing here does IO: before answering a message, the caller loads the
//! buckets [`Reconciler::buckets_needed`] lists into its [`View`].
//!
//! ```
//! use sync_core::Seq;
//! use sync_core::reconcile::{Item, Reconciler, Role, View};
//!
//! let item = |seq: u64, fp: u128| Item { seq: Seq(seq), id: [0; 16], fp };
//! let a = View::from_items((1..=5000).map(|s| item(s, u128::from(s) * 7919))).unwrap();
//! let b = View::from_items((1..=5000).filter(|&s| s != 42).map(|s| item(s, u128::from(s) * 7919))).unwrap();
//! let mut init = Reconciler::new(Role::Initiator, Seq(5000));
//! let mut resp = Reconciler::new(Role::Responder, Seq(5000));
//! let mut msg = init.initiate(&b).unwrap();
//! let mut need = Vec::new();
//! while !msg.is_empty() {
//!     let (reply, _) = resp.respond(&a, &msg).unwrap();
//!     let (next, found) = init.respond(&b, &reply).unwrap();
//!     need.extend(found.need);
//!     msg = next;
//! }
//! assert_eq!(need, vec![Seq(42)]);
//! ```

mod view;
mod wire;

use std::collections::BTreeSet;

use thiserror::Error;

use crate::digest::{RangeFp, bucket_start};
use crate::id::Seq;

pub use view::{Item, NeedItems, View, ViewError};
pub use wire::{
    Body, MAX_ITEMS, MAX_ITEMS_PER_BODY, MAX_RANGES, Range, ReconMessage, WireFp, WireItem,
};

use view::sum_items;

/// The most messages one side answers in a session: a peer that keeps
/// splitting past it never converges (an honest session over a million
/// records and a few hundred differences answers three or four).
pub const MAX_ROUNDS: u32 = 16;
/// The largest branching factor a [`ReconConfig`] may ask for.
pub const MAX_BRANCHING: usize = 64;
/// A sub-range holding at most this many items is listed, not fingerprinted.
const LEAF_ITEMS: u64 = 1;

/// Which side of a session this is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Role {
    /// Sends the first message and learns both halves (the replica, B).
    Initiator,
    /// Answers (the source, A).
    Responder,
}

/// How ranges are split and when they are listed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ReconConfig {
    /// Sub-ranges a differing range splits into (2 to [`MAX_BRANCHING`]).
    pub branching: usize,
    /// A differing range holding at most this many of our items is listed
    /// (1 to [`MAX_ITEMS_PER_BODY`]).
    pub item_threshold: usize,
}

impl Default for ReconConfig {
    /// Tuned on a million dense records with a hundred differences
    /// (`reconcile::tests::tune_million`): 12 reaches single buckets in
    /// three levels up to 1,728 buckets (1.7 million seqs) and leaves
    /// about 7 items a leaf, which a threshold of 24 lists with margin;
    /// three round trips, 42 KB (16: three round trips, 47 KB; 6: four,
    /// 35 KB; 4: five or six, 32 KB).
    fn default() -> Self {
        ReconConfig {
            branching: 12,
            item_threshold: 24,
        }
    }
}

impl ReconConfig {
    /// The config with both values brought into their ranges.
    fn clamped(self) -> ReconConfig {
        ReconConfig {
            branching: self.branching.clamp(2, MAX_BRANCHING),
            item_threshold: self.item_threshold.clamp(1, MAX_ITEMS_PER_BODY),
        }
    }
}

/// What a round found, by seq, oriented from the initiator (B): `need`
/// are seqs of the responder's items B lacks, `extra` seqs of B's items
/// the responder lacks. A seq in both is one the two hold differently.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Found {
    /// Seqs of the responder's items the initiator lacks.
    pub need: Vec<Seq>,
    /// Seqs of the initiator's items the responder lacks.
    pub extra: Vec<Seq>,
}

impl Found {
    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.need.is_empty() && self.extra.is_empty()
    }

    /// Adds another round's findings.
    pub fn merge(&mut self, other: Found) {
        self.need.extend(other.need);
        self.extra.extend(other.extra);
    }
}

/// Why a message or a call was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Error)]
pub enum ReconError {
    /// The view lacks a bucket's items: load it and call again.
    #[error(transparent)]
    NeedItems(#[from] NeedItems),
    /// `initiate` on a responder, or twice.
    #[error("initiate is for an initiator that has not started")]
    CannotInitiate,
    /// `respond` on an initiator that has not initiated.
    #[error("respond before initiate")]
    NotStarted,
    /// The peer kept the conversation going past [`MAX_ROUNDS`].
    #[error("no convergence after {max} rounds")]
    TooManyRounds {
        /// [`MAX_ROUNDS`].
        max: u32,
    },
    /// More ranges than [`MAX_RANGES`].
    #[error("{count} ranges exceed the maximum of {max}")]
    TooManyRanges {
        /// Ranges in the message.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More items than [`MAX_ITEMS_PER_BODY`] in a body or [`MAX_ITEMS`]
    /// in a message.
    #[error("{count} items exceed the maximum of {max}")]
    TooManyItems {
        /// Items in the body or message.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A range ends at or before its start (the previous range's end).
    #[error("range [{lower}, {upper}) is out of order")]
    OutOfOrder {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
    },
    /// A range reaches past the session's `upto`.
    #[error("range ending at {upper} reaches past upto {upto}")]
    PastUpto {
        /// The range's exclusive upper bound.
        upper: Seq,
        /// The session's last seq.
        upto: Seq,
    },
    /// The first message does not cover the session's span `[0, upto]`.
    #[error("the first message ends at {upper}, not after upto {upto}")]
    SpanMismatch {
        /// Where the message's last range ends.
        upper: Seq,
        /// The session's last seq.
        upto: Seq,
    },
    /// A range other than a skip outside what we asked about (a range we
    /// skipped or listed, or one straddling two of ours).
    #[error("range [{lower}, {upper}) was not asked about")]
    Unrequested {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
    },
    /// A fingerprint counts more records than the range has seqs.
    #[error("range [{lower}, {upper}) cannot hold {count} records")]
    CountOverflow {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
        /// The claimed count.
        count: u64,
    },
    /// A fingerprint of no records with a non-zero sum.
    #[error("range [{lower}, {upper}): a fingerprint of no records with a sum")]
    BadFingerprint {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
    },
    /// An items body lists more items than the range has seqs.
    #[error("range [{lower}, {upper}) cannot hold {count} items")]
    ItemsOverflow {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
        /// Items listed.
        count: usize,
    },
    /// Items not by strictly increasing seq (unsorted or duplicate).
    #[error("range [{lower}, {upper}): item seq {seq} out of order or repeated")]
    ItemsUnsorted {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
        /// The offending seq.
        seq: Seq,
    },
    /// An item whose seq is outside its range.
    #[error("item seq {seq} outside range [{lower}, {upper})")]
    ItemOutsideRange {
        /// The range's lower bound.
        lower: Seq,
        /// Its upper bound.
        upper: Seq,
        /// The item's seq.
        seq: Seq,
    },
}

/// One side of a reconciliation session over `[0, upto]`.
#[derive(Clone, Debug)]
pub struct Reconciler {
    /// The role and the config.
    policy: Policy,
    /// `upto + 1`: the exclusive end of the span.
    end: u64,
    /// Ranges of our last message the peer must answer, by seq.
    open: Vec<(u64, u64)>,
    /// Messages answered.
    rounds: u32,
    /// Whether the first message has gone (initiator) or come (responder).
    started: bool,
}

impl Reconciler {
    /// A session over `[0, upto]` with the default config. Both sides must
    /// agree on `upto` (the responder refuses a first message that does
    /// not end after it). `upto` must be below `u64::MAX`.
    pub fn new(role: Role, upto: Seq) -> Reconciler {
        Reconciler::with_config(role, upto, ReconConfig::default())
    }

    /// A session with this config (clamped into range).
    pub fn with_config(role: Role, upto: Seq, config: ReconConfig) -> Reconciler {
        let end = upto.0.saturating_add(1);
        let open = match role {
            Role::Initiator => Vec::new(),
            Role::Responder => vec![(0, end)],
        };
        Reconciler {
            policy: Policy {
                role,
                config: config.clamped(),
            },
            end,
            open,
            rounds: 0,
            started: false,
        }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.policy.role
    }

    /// The config in use.
    pub fn config(&self) -> ReconConfig {
        self.policy.config
    }

    /// The session's last seq.
    pub fn upto(&self) -> Seq {
        Seq(self.end - 1)
    }

    /// Messages answered so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// Whether the conversation is over for this side: nothing we sent
    /// awaits an answer.
    pub fn is_done(&self) -> bool {
        self.started && self.open.is_empty()
    }

    /// The first message: the span `[0, upto]` split into sub-ranges with
    /// our fingerprints (or our items, if we hold few). Load
    /// [`Reconciler::buckets_needed_to_initiate`] first.
    pub fn initiate(&mut self, view: &View) -> Result<ReconMessage, ReconError> {
        if self.policy.role != Role::Initiator || self.started {
            return Err(ReconError::CannotInitiate);
        }
        let mut round = Round::new(view, self.policy);
        round.open_span(0, self.end)?;
        let (message, open, _) = round.finish();
        self.open = open;
        self.started = true;
        Ok(message)
    }

    /// Answers a peer's message: the reply and what this round found. An
    /// empty reply ends the conversation: a responder sends it (the
    /// initiator is waiting for it), an initiator need not; nobody answers
    /// an empty message. Load [`Reconciler::buckets_needed`] first; a
    /// missing bucket is [`ReconError::NeedItems`] and changes nothing.
    pub fn respond(
        &mut self,
        view: &View,
        msg: &ReconMessage,
    ) -> Result<(ReconMessage, Found), ReconError> {
        if self.policy.role == Role::Initiator && !self.started {
            return Err(ReconError::NotStarted);
        }
        if self.rounds >= MAX_ROUNDS {
            return Err(ReconError::TooManyRounds { max: MAX_ROUNDS });
        }
        let incoming = self.validate(msg)?;
        let mut round = Round::new(view, self.policy);
        for (i, range) in incoming.iter().enumerate() {
            round.answer(range, incoming.len() - i - 1)?;
        }
        let (reply, open, found) = round.finish();
        self.open = open;
        self.rounds += 1;
        self.started = true;
        Ok((reply, found))
    }

    /// The buckets whose items `initiate` needs and `view` lacks.
    pub fn buckets_needed_to_initiate(&self, view: &View) -> Vec<u64> {
        self.policy.range_needs(view, 0, self.end, None)
    }

    /// The buckets whose items answering `msg` may need and `view` lacks:
    /// the partial buckets at the ends of each range we must fingerprint,
    /// and the buckets of each range we must list or split inside a
    /// bucket. Exact when ranges are bucket-aligned or inside one bucket.
    pub fn buckets_needed(&self, view: &View, msg: &ReconMessage) -> Vec<u64> {
        let mut needed = BTreeSet::new();
        let mut lo = 0u64;
        for range in msg.ranges.iter().take(MAX_RANGES) {
            let hi = range.upper.0;
            if hi <= lo || hi > self.end {
                break;
            }
            match &range.body {
                Body::Skip => {}
                Body::Fingerprint(theirs) => {
                    needed.extend(self.policy.range_needs(view, lo, hi, Some(*theirs)));
                }
                Body::Items(_) => needed.extend(view.items_needs(lo, hi)),
            }
            lo = hi;
        }
        needed.into_iter().collect()
    }

    /// The message's ranges, once every rule holds.
    fn validate<'m>(&self, msg: &'m ReconMessage) -> Result<Vec<Incoming<'m>>, ReconError> {
        if let Some(why) = msg.over_limits() {
            return Err(why);
        }
        let mut incoming = Vec::with_capacity(msg.ranges.len());
        let (mut lo, mut open) = (0u64, 0usize);
        for range in &msg.ranges {
            self.check_range(&mut open, lo, range)?;
            incoming.push(Incoming {
                lo,
                hi: range.upper.0,
                body: &range.body,
            });
            lo = range.upper.0;
        }
        if !self.started && lo != self.end {
            return Err(ReconError::SpanMismatch {
                upper: Seq(lo),
                upto: self.upto(),
            });
        }
        Ok(incoming)
    }

    /// Refuses a range starting at `lo` that is out of order, past the
    /// span, not asked about, or impossible; `open` walks our open ranges.
    fn check_range(&self, open: &mut usize, lo: u64, range: &Range) -> Result<(), ReconError> {
        let hi = range.upper.0;
        if hi <= lo {
            return Err(ReconError::OutOfOrder {
                lower: Seq(lo),
                upper: range.upper,
            });
        }
        if hi > self.end {
            return Err(ReconError::PastUpto {
                upper: range.upper,
                upto: self.upto(),
            });
        }
        if range.body == Body::Skip {
            return Ok(());
        }
        self.check_requested(open, lo, hi)?;
        check_body(lo, hi, &range.body)
    }

    /// Refuses `[lo, hi)` unless one of our open ranges holds it; `at`
    /// walks `open` along the message.
    fn check_requested(&self, at: &mut usize, lo: u64, hi: u64) -> Result<(), ReconError> {
        while self.open.get(*at).is_some_and(|&(_, end)| end <= lo) {
            *at += 1;
        }
        match self.open.get(*at) {
            Some(&(start, end)) if start <= lo && hi <= end => Ok(()),
            _ => Err(ReconError::Unrequested {
                lower: Seq(lo),
                upper: Seq(hi),
            }),
        }
    }
}

/// Refuses a body that cannot be true of `[lo, hi)`.
fn check_body(lo: u64, hi: u64, body: &Body) -> Result<(), ReconError> {
    let (lower, upper) = (Seq(lo), Seq(hi));
    let width = hi - lo;
    match body {
        Body::Skip => Ok(()),
        Body::Fingerprint(fp) if fp.count > width => Err(ReconError::CountOverflow {
            lower,
            upper,
            count: fp.count,
        }),
        Body::Fingerprint(fp) if fp.count == 0 && fp.sum != 0 => {
            Err(ReconError::BadFingerprint { lower, upper })
        }
        Body::Fingerprint(_) => Ok(()),
        Body::Items(items) => check_items(lo, hi, items),
    }
}

/// Refuses items too many for `[lo, hi)`, outside it, or not strictly
/// increasing.
fn check_items(lo: u64, hi: u64, items: &[WireItem]) -> Result<(), ReconError> {
    let (lower, upper) = (Seq(lo), Seq(hi));
    if items.len() as u64 > hi - lo {
        return Err(ReconError::ItemsOverflow {
            lower,
            upper,
            count: items.len(),
        });
    }
    let mut prev: Option<Seq> = None;
    for item in items {
        if item.seq.0 < lo || item.seq.0 >= hi {
            return Err(ReconError::ItemOutsideRange {
                lower,
                upper,
                seq: item.seq,
            });
        }
        if prev.is_some_and(|p| item.seq <= p) {
            return Err(ReconError::ItemsUnsorted {
                lower,
                upper,
                seq: item.seq,
            });
        }
        prev = Some(item.seq);
    }
    Ok(())
}

/// A validated range of an incoming message.
struct Incoming<'m> {
    lo: u64,
    hi: u64,
    body: &'m Body,
}

/// What to do with a range whose fingerprint we computed.
enum Action {
    /// Equal: nothing to do.
    Skip,
    /// The responder holds none: all our items there are extra.
    Extras,
    /// List our items.
    List,
    /// Split into sub-ranges.
    Split,
}

/// The role and config: the decisions both `respond` and
/// `buckets_needed` make.
#[derive(Clone, Copy, Debug)]
struct Policy {
    role: Role,
    config: ReconConfig,
}

impl Policy {
    /// What to do with a range of ours, given the peer's fingerprint
    /// (`None`: the first message, nothing to compare with).
    ///
    /// A responder lists a range it holds few of: the initiator then has
    /// both halves. An initiator's list costs twice (the responder lists
    /// back), so it splits instead unless it holds almost nothing there
    /// or the responder holds many (all of which it must send anyway).
    fn decide(&self, ours: RangeFp, theirs: Option<WireFp>) -> Action {
        let threshold = self.config.item_threshold as u64;
        let few = ours.count <= threshold;
        match theirs {
            Some(theirs) if WireFp::from(ours) == theirs => Action::Skip,
            Some(theirs) if theirs.count == 0 && self.role == Role::Initiator => Action::Extras,
            Some(theirs) if theirs.count == 0 => Action::List,
            Some(theirs) if self.role == Role::Initiator => {
                let list = ours.count <= LEAF_ITEMS || (few && theirs.count > threshold);
                if list { Action::List } else { Action::Split }
            }
            _ if few => Action::List,
            _ => Action::Split,
        }
    }

    /// The buckets that answering a fingerprint of `[lo, hi)` may need.
    fn range_needs(&self, view: &View, lo: u64, hi: u64, theirs: Option<WireFp>) -> Vec<u64> {
        let mut needed = view.fp_needs(lo, hi);
        let in_one_bucket = view.bucket_counts(lo, hi).len() < 2;
        let list_or_split_inside = if needed.is_empty() {
            match view.fingerprint(Seq(lo), Seq(hi)) {
                Ok(ours) => match self.decide(ours, theirs) {
                    Action::Skip => false,
                    Action::Extras | Action::List => true,
                    Action::Split => in_one_bucket,
                },
                Err(_) => true,
            }
        } else {
            let (min, max) = view.count_bounds(lo, hi);
            let threshold = self.config.item_threshold as u64;
            let theirs_empty = theirs.is_some_and(|fp| fp.count == 0);
            let may_list = min <= threshold || theirs_empty;
            let may_split = max > LEAF_ITEMS && !theirs_empty;
            may_list || (may_split && in_one_bucket)
        };
        if list_or_split_inside {
            needed.extend(view.items_needs(lo, hi));
        }
        needed
    }
}

/// One message being built in answer to another.
struct Round<'a> {
    view: &'a View,
    policy: Policy,
    out: Vec<Range>,
    items_used: usize,
    found: Found,
}

impl<'a> Round<'a> {
    fn new(view: &'a View, policy: Policy) -> Round<'a> {
        Round {
            view,
            policy,
            out: Vec::new(),
            items_used: 0,
            found: Found::default(),
        }
    }

    /// Appends a range ending at `upper`, merging consecutive skips.
    fn push(&mut self, upper: u64, body: Body) {
        if body == Body::Skip
            && let Some(last) = self.out.last_mut().filter(|last| last.body == Body::Skip)
        {
            last.upper = Seq(upper);
            return;
        }
        self.items_used += body.item_count();
        self.out.push(Range {
            upper: Seq(upper),
            body,
        });
    }

    /// Ranges this range may take, leaving one for each of the `rest`.
    fn room(&self, rest: usize) -> usize {
        MAX_RANGES.saturating_sub(self.out.len() + rest)
    }

    /// The first message's content for the span.
    fn open_span(&mut self, lo: u64, hi: u64) -> Result<(), ReconError> {
        let ours = self.view.fingerprint(Seq(lo), Seq(hi))?;
        match self.policy.decide(ours, None) {
            Action::List => {
                let items = self.view.items(Seq(lo), Seq(hi))?;
                self.list(hi, &items, 0);
                Ok(())
            }
            _ => self.split(lo, hi, ours, 0),
        }
    }

    /// Answers one incoming range; `rest` ranges follow it.
    fn answer(&mut self, range: &Incoming<'_>, rest: usize) -> Result<(), ReconError> {
        match range.body {
            Body::Skip => {
                self.push(range.hi, Body::Skip);
                Ok(())
            }
            Body::Fingerprint(theirs) => self.on_fingerprint(range.lo, range.hi, *theirs, rest),
            Body::Items(theirs) => self.on_items(range.lo, range.hi, theirs, rest),
        }
    }

    /// Answers the peer's fingerprint of `[lo, hi)`.
    fn on_fingerprint(
        &mut self,
        lo: u64,
        hi: u64,
        theirs: WireFp,
        rest: usize,
    ) -> Result<(), ReconError> {
        let ours = self.view.fingerprint(Seq(lo), Seq(hi))?;
        match self.policy.decide(ours, Some(theirs)) {
            Action::Skip => self.push(hi, Body::Skip),
            Action::Extras => {
                let items = self.view.items(Seq(lo), Seq(hi))?;
                self.found.extra.extend(items.iter().map(|item| item.seq));
                self.push(hi, Body::Skip);
            }
            Action::List => {
                let items = self.view.items(Seq(lo), Seq(hi))?;
                self.list(hi, &items, rest);
            }
            Action::Split => self.split(lo, hi, ours, rest)?,
        }
        Ok(())
    }

    /// Answers the peer's items of `[lo, hi)`: records both halves; a
    /// responder whose items differ lists its own.
    fn on_items(
        &mut self,
        lo: u64,
        hi: u64,
        theirs: &[WireItem],
        rest: usize,
    ) -> Result<(), ReconError> {
        let ours = self.view.items(Seq(lo), Seq(hi))?;
        let (only_ours, only_theirs) = diff(&ours, theirs);
        let same = only_ours.is_empty() && only_theirs.is_empty();
        let (need, extra) = match self.policy.role {
            Role::Initiator => (only_theirs, only_ours),
            Role::Responder => (only_ours, only_theirs),
        };
        self.found.need.extend(need);
        self.found.extra.extend(extra);
        if same || self.policy.role == Role::Initiator {
            self.push(hi, Body::Skip);
        } else {
            self.list(hi, &ours, rest);
        }
        Ok(())
    }

    /// Lists our `items` of the range ending at `hi` in bodies of at most
    /// [`MAX_ITEMS_PER_BODY`]; past the message's budget, the rest of the
    /// range goes as a fingerprint for the peer to ask again.
    fn list(&mut self, hi: u64, items: &[Item], rest: usize) {
        let mut left = items;
        loop {
            let take = MAX_ITEMS_PER_BODY.min(MAX_ITEMS.saturating_sub(self.items_used));
            if left.len() <= take {
                self.push(hi, Body::Items(left.iter().map(WireItem::from).collect()));
                return;
            }
            if take == 0 || self.room(rest) < 2 {
                self.push(hi, Body::Fingerprint(sum_items(left).into()));
                return;
            }
            let (now, later) = left.split_at(take);
            let cut = later.first().map_or(hi, |item| item.seq.0);
            self.push(cut, Body::Items(now.iter().map(WireItem::from).collect()));
            left = later;
        }
    }

    /// Splits `[lo, hi)` (our fingerprint `ours`) into sub-ranges with
    /// our fingerprints, or our items where we hold almost none.
    fn split(&mut self, lo: u64, hi: u64, ours: RangeFp, rest: usize) -> Result<(), ReconError> {
        let cuts = cuts(self.view, lo, hi, self.policy.config.branching)?;
        if cuts.is_empty() {
            let items = self.view.items(Seq(lo), Seq(hi))?;
            self.list(hi, &items, rest);
            return Ok(());
        }
        if cuts.len() + 1 > self.room(rest) {
            self.push(hi, Body::Fingerprint(ours.into()));
            return Ok(());
        }
        let mut from = lo;
        for to in cuts.into_iter().chain([hi]) {
            let fp = self.view.fingerprint(Seq(from), Seq(to))?;
            let body = self.child_body(from, to, fp);
            self.push(to, body);
            from = to;
        }
        Ok(())
    }

    /// A sub-range's body: its items if we hold at most [`LEAF_ITEMS`]
    /// and have them at hand, else its fingerprint.
    fn child_body(&self, lo: u64, hi: u64, fp: RangeFp) -> Body {
        if fp.count == 0 {
            return Body::Items(Vec::new());
        }
        let affordable = self.items_used as u64 + fp.count <= MAX_ITEMS as u64;
        if fp.count <= LEAF_ITEMS
            && affordable
            && let Ok(items) = self.view.items(Seq(lo), Seq(hi))
        {
            return Body::Items(items.iter().map(WireItem::from).collect());
        }
        Body::Fingerprint(fp.into())
    }

    /// The message, the ranges of it the peer must answer, and the findings.
    fn finish(mut self) -> (ReconMessage, Vec<(u64, u64)>, Found) {
        while self.out.last().is_some_and(|last| last.body == Body::Skip) {
            self.out.pop();
        }
        let mut open = Vec::new();
        let mut lo = 0u64;
        for range in &self.out {
            let awaits = match range.body {
                Body::Skip => false,
                Body::Fingerprint(_) => true,
                Body::Items(_) => self.policy.role == Role::Initiator,
            };
            if awaits {
                open.push((lo, range.upper.0));
            }
            lo = range.upper.0;
        }
        (ReconMessage { ranges: self.out }, open, self.found)
    }
}

/// Cut points strictly inside `(lo, hi)` for at most `branching`
/// sub-ranges: on bucket boundaries, balanced by count, while the range
/// meets two non-empty buckets or more; else by rank of our items.
fn cuts(view: &View, lo: u64, hi: u64, branching: usize) -> Result<Vec<u64>, NeedItems> {
    let buckets = view.bucket_counts(lo, hi);
    if buckets.len() >= 2 {
        return Ok(bucket_cuts(&buckets, branching));
    }
    let items = view.items(Seq(lo), Seq(hi))?;
    let (n, m) = (items.len(), branching.min(items.len()));
    Ok((1..m).map(|j| items[j * n / m].seq.0).collect())
}

/// Bucket boundaries grouping `buckets` (two or more, with counts) into
/// at most `branching` runs of about equal counts.
fn bucket_cuts(buckets: &[(u64, u64)], branching: usize) -> Vec<u64> {
    if buckets.len() <= branching {
        return buckets
            .iter()
            .skip(1)
            .map(|&(b, _)| bucket_start(b).0)
            .collect();
    }
    let total: u128 = buckets.iter().map(|&(_, c)| u128::from(c)).sum();
    let parts = branching as u128;
    let mut cuts = Vec::new();
    let (mut acc, mut next) = (0u128, 1u128);
    for &(bucket, count) in buckets {
        if next < parts && acc * parts >= next * total && acc > 0 {
            cuts.push(bucket_start(bucket).0);
            while next < parts && acc * parts >= next * total {
                next += 1;
            }
        }
        acc += u128::from(count);
    }
    if cuts.is_empty()
        && let Some(&(last, _)) = buckets.last()
    {
        cuts.push(bucket_start(last).0);
    }
    cuts
}

/// Seqs of `ours` without an equal `(seq, fp)` in `theirs`, and of
/// `theirs` without one in `ours` (both sorted by seq).
fn diff(ours: &[Item], theirs: &[WireItem]) -> (Vec<Seq>, Vec<Seq>) {
    let (mut only_ours, mut only_theirs) = (Vec::new(), Vec::new());
    let mut ours = ours.iter().map(WireItem::from).peekable();
    let mut theirs = theirs.iter().copied().peekable();
    loop {
        match (ours.peek().copied(), theirs.peek().copied()) {
            (Some(a), Some(b)) if a.seq == b.seq => {
                if a.fp != b.fp {
                    only_ours.push(a.seq);
                    only_theirs.push(b.seq);
                }
                ours.next();
                theirs.next();
            }
            (Some(a), Some(b)) if a.seq < b.seq => {
                only_ours.push(a.seq);
                ours.next();
            }
            (Some(a), None) => {
                only_ours.push(a.seq);
                ours.next();
            }
            (_, Some(b)) => {
                only_theirs.push(b.seq);
                theirs.next();
            }
            (None, None) => break,
        }
    }
    (only_ours, only_theirs)
}

#[cfg(test)]
mod tests;
