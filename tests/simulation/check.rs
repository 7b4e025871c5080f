//! The invariants, read through the public `Store` API: every device
//! equals the model record by record; no two records of an owner share a
//! seq; no watermark passes a record not held; `synced_with` never says
//! true while two libraries differ.

use std::collections::BTreeMap;

use sync_core::{DeviceId, Record, Seq, Watermark};
use sync_storage::Store;

use super::model::{Key, Model, first_difference, key, own_records};
use crate::chaos::{RecordCheck, compare_records};

/// One device as the checks see it.
pub struct View {
    /// Its id.
    pub id: DeviceId,
    /// Its store.
    pub store: Store,
}

/// Every record (tombstones included) of `owner` held by `store`.
async fn held(store: &Store, owner: DeviceId) -> Result<Vec<Record>, String> {
    own_records(store, owner, Seq::ZERO).await
}

/// No two records share a seq.
pub fn seqs_unique(owner: DeviceId, on: DeviceId, records: &[Record]) -> Result<(), String> {
    let mut seen: BTreeMap<Seq, &Record> = BTreeMap::new();
    for r in records {
        if let Some(other) = seen.insert(r.seq(), r) {
            return Err(format!(
                "device {} holds two records of {} at seq {}: {other:?} and {r:?}",
                on.fmt_short(),
                owner.fmt_short(),
                r.seq()
            ));
        }
    }
    Ok(())
}

/// Every record of the owner at or below the watermark is held, at its seq
/// or a later one.
pub fn watermark_covers(watermark: Seq, own: &[Record], replica: &[Record]) -> Result<(), String> {
    let held: BTreeMap<Key, Seq> = replica.iter().map(|r| (key(r), r.seq())).collect();
    match own
        .iter()
        .find(|r| r.seq() <= watermark && held.get(&key(r)).is_none_or(|s| *s < r.seq()))
    {
        Some(r) => Err(format!(
            "watermark {watermark} passes a record not held: {r:?} (held at {:?})",
            held.get(&key(r))
        )),
        None => Ok(()),
    }
}

/// The owner's own store against the model: exactly its records (content
/// only if the owner started a new IndexId, which re-stamps nothing the
/// model can predict).
async fn owner_matches_model(owner: &View, model: &Model) -> Result<Vec<Record>, String> {
    let own = held(&owner.store, owner.id).await?;
    seqs_unique(owner.id, owner.id, &own)?;
    let want = model.owner(owner.id);
    let local = owner
        .store
        .local_watermark()
        .await
        .map_err(|e| e.to_string())?;
    let strip = |m: BTreeMap<Key, Record>, strip: bool| -> BTreeMap<Key, Record> {
        m.into_iter()
            .map(|(k, mut r)| {
                if strip {
                    match &mut r {
                        Record::Location(l) => l.seq = Seq::ZERO,
                        Record::Entry(e) => e.seq = Seq::ZERO,
                    }
                }
                (k, r)
            })
            .collect()
    };
    let restamped = local.index_id != want.watermark.index_id;
    let got = strip(own.iter().map(|r| (key(r), r.clone())).collect(), restamped);
    let expected = strip(want.records.clone(), restamped);
    if got != expected {
        return Err(format!(
            "owner {} differs from the model: {}",
            owner.id.fmt_short(),
            first_difference(&expected, &got)
        ));
    }
    if !restamped && local != want.watermark {
        return Err(format!(
            "owner {} at {local:?}, model {:?}",
            owner.id.fmt_short(),
            want.watermark
        ));
    }
    Ok(own)
}

/// A replica's copy of `owner` equals the owner's records.
async fn replica_matches(
    owner: DeviceId,
    own: &[Record],
    replica: &View,
) -> Result<RecordCheck, String> {
    let copy = held(&replica.store, owner).await?;
    seqs_unique(owner, replica.id, &copy)?;
    let wm = replica
        .store
        .watermark(owner)
        .await
        .map_err(|e| e.to_string())?;
    let wm_seq = wm.map(|w| w.seq).unwrap_or(Seq::ZERO);
    watermark_covers(wm_seq, own, &copy).map_err(|e| {
        format!(
            "device {} of owner {}: {e}",
            replica.id.fmt_short(),
            owner.fmt_short()
        )
    })?;
    let check = compare_records(own, &copy);
    if !check.clean() {
        return Err(format!(
            "device {} holds owner {} differently: {check:?}",
            replica.id.fmt_short(),
            owner.fmt_short()
        ));
    }
    let max = own.iter().map(Record::seq).max().unwrap_or(Seq::ZERO);
    if wm_seq < max {
        return Err(format!(
            "device {} holds owner {} up to {wm_seq}, owner at {max}",
            replica.id.fmt_short(),
            owner.fmt_short()
        ));
    }
    Ok(check)
}

/// After quiescence: every owner equals the model, every other device
/// equals the owner. Returns the records compared.
pub async fn check_quiesced(views: &[View], model: &Model) -> Result<u64, String> {
    let mut compared = 0;
    for owner in views {
        let own = owner_matches_model(owner, model).await?;
        compared += own.len() as u64;
        for replica in views.iter().filter(|v| v.id != owner.id) {
            compared += replica_matches(owner.id, &own, replica).await?.compared;
        }
    }
    Ok(compared)
}

/// What `a.synced_with(b)` claimed, and what `a` knew of `b` when it did.
pub struct Claim {
    /// `a.synced_with(b)`.
    pub synced: bool,
    /// `b`'s max seq as `b` last advertised it to `a` (`PeerStatus::advertised`).
    pub advertised: Option<Watermark>,
}

/// Every record of `own` at or below `upto` is in `copy`, at its seq with
/// its content, or at a later seq.
fn covers_up_to(upto: Seq, own: &[Record], copy: &[Record]) -> Option<String> {
    let held: BTreeMap<Key, &Record> = copy.iter().map(|r| (key(r), r)).collect();
    own.iter()
        .filter(|r| r.seq() <= upto)
        .find_map(|r| match held.get(&key(r)) {
            None => Some(format!("lacks {r:?}")),
            Some(h) if h.seq() < r.seq() => Some(format!("holds {h:?} older than {r:?}")),
            Some(h) if h.seq() == r.seq() && *h != r => Some(format!("holds {h:?} for {r:?}")),
            _ => None,
        })
}

/// If `a` says it is synced with `b`: `b` holds exactly `a`'s records (`a`
/// knows its own and `b`'s acknowledgements), and `a` holds `b`'s records
/// up to what `b` last advertised. Returns whether `b` holds records above
/// that advertisement which `a` lacks (a claim that is only stale: `a`
/// cannot know of `b`'s commits before `b` says so).
pub async fn synced_implies_equal(a: &View, b: &View, claim: &Claim) -> Result<bool, String> {
    if !claim.synced {
        return Ok(false);
    }
    let (a_own, b_copy) = (held(&a.store, a.id).await?, held(&b.store, a.id).await?);
    let check = compare_records(&a_own, &b_copy);
    if !check.clean() {
        return Err(format!(
            "{}.synced_with({}) is true while {} holds {}'s records differently: {check:?}",
            a.id.fmt_short(),
            b.id.fmt_short(),
            b.id.fmt_short(),
            a.id.fmt_short()
        ));
    }
    let (b_own, a_copy) = (held(&b.store, b.id).await?, held(&a.store, b.id).await?);
    let b_index = b
        .store
        .local_watermark()
        .await
        .map_err(|e| e.to_string())?
        .index_id;
    let upto = match claim.advertised {
        Some(w) if w.index_id == b_index => w.seq,
        _ => Seq::ZERO,
    };
    if let Some(e) = covers_up_to(upto, &b_own, &a_copy) {
        return Err(format!(
            "{}.synced_with({}) is true while, of {}'s records up to its advertised {upto}, it {e}",
            a.id.fmt_short(),
            b.id.fmt_short(),
            b.id.fmt_short()
        ));
    }
    Ok(!compare_records(&b_own, &a_copy).clean())
}

/// Mid-schedule: `replica`'s watermark of `owner` passes no record of
/// the owner it does not hold. Read in this order (the replica's watermark,
/// its records, the owner's records) the check is sound while transfers
/// run: watermarks and records only move forward, and a record the owner
/// replaced since has a seq above the watermark read.
pub async fn watermark_holds(owner: &View, replica: &View) -> Result<(), String> {
    let wm = replica
        .store
        .watermark(owner.id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(wm) = wm else { return Ok(()) };
    let copy = held(&replica.store, owner.id).await?;
    let own = held(&owner.store, owner.id).await?;
    let index = owner
        .store
        .local_watermark()
        .await
        .map_err(|e| e.to_string())?
        .index_id;
    if wm.index_id != index {
        return Ok(());
    }
    seqs_unique(owner.id, replica.id, &copy)?;
    watermark_covers(wm.seq, &own, &copy).map_err(|e| {
        format!(
            "device {} of owner {}: {e}",
            replica.id.fmt_short(),
            owner.id.fmt_short()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::synthetic_records;

    #[test]
    fn seq_and_watermark_checks_see_a_shared_seq_and_a_record_passed_over() {
        let owner = DeviceId::new_v7();
        let own = synthetic_records(owner, 5, 3, Seq(1));
        assert!(seqs_unique(owner, owner, &own).is_ok());
        let mut twice = own.clone();
        if let Record::Entry(e) = &mut twice[2] {
            e.seq = Seq(1);
        }
        assert!(seqs_unique(owner, owner, &twice).is_err());
        assert!(watermark_covers(Seq(6), &own, &own).is_ok());
        let lacking: Vec<Record> = own.iter().filter(|r| r.seq() != Seq(4)).cloned().collect();
        assert!(watermark_covers(Seq(3), &own, &lacking).is_ok());
        assert!(watermark_covers(Seq(4), &own, &lacking).is_err());
    }
}
