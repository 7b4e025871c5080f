//! Verification reads and repairs: owner digests, the audit of stored
//! digests against the rows, reconciliation buckets and items, records at
//! given seqs, and the repair transaction that is committed only when its
//! result has the digest its source claimed.

use std::collections::{BTreeMap, HashMap};

use sea_orm::sqlx::sqlite::{SqliteArguments, SqliteConnection};
use sea_orm::sqlx::{self, Arguments as _, Connection as _, Row as _};
use sync_core::digest::{Element, LtHash, OwnerDigest, RangeFp, bucket_of};
use sync_core::{DeviceId, Location, LocationId, Record, Seq, Watermark};
use tracing::Instrument;

use crate::Store;
use crate::bulk::{self, db_err};
use crate::digest::{self, DigestDelta};
use crate::error::{Result, StorageError};
use crate::rows::{ENTRY_COLUMNS, entry_from_row, i2u, id16, u2i};
use crate::write::{split_records, write_records};

/// Records read per page when digesting an owner from its rows.
const AUDIT_PAGE: usize = 10_000;
/// Seqs per `IN (...)` list.
const SEQS_PER_STMT: usize = 500;

/// An owner whose stored digest did not match its rows (now corrected).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditFinding {
    /// Whose records.
    pub owner: DeviceId,
    /// What the stored digest said: records and digest id.
    pub stored: (u64, sync_core::digest::DigestId),
    /// What the rows hold.
    pub actual: (u64, sync_core::digest::DigestId),
}

/// An owner's digest as computed from its rows.
struct Computed {
    lthash: LtHash,
    records: i64,
    buckets: BTreeMap<u64, RangeFp>,
}

impl Store {
    /// What this device holds of `owner` (watermark, records, digest),
    /// read in one transaction; `None` if nothing is held.
    pub async fn owner_digest(&self, owner: DeviceId) -> Result<Option<OwnerDigest>> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let mut txn = conn.begin().await.map_err(db_err)?;
        let d = digest::owner_digest(&mut txn, owner).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(d)
    }

    /// [`Store::owner_digest`] of every owner held (this device included),
    /// all from one read transaction.
    pub async fn owner_digests(&self) -> Result<Vec<OwnerDigest>> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let mut txn = conn.begin().await.map_err(db_err)?;
        let owners: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT owner FROM owner_state ORDER BY owner")
                .fetch_all(&mut *txn)
                .await
                .map_err(db_err)?;
        let mut out = Vec::with_capacity(owners.len());
        for o in owners {
            let owner = DeviceId::from_bytes(id16(&o)?);
            if let Some(d) = digest::owner_digest(&mut txn, owner).await? {
                out.push(d);
            }
        }
        txn.commit().await.map_err(db_err)?;
        Ok(out)
    }

    /// Digests, from their rows, the owners that have no digest yet (a
    /// library made before digests existed). Run when the library opens.
    pub(crate) async fn digest_undigested_owners(&self) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        let owners: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT owner FROM owner_state WHERE owner NOT IN (SELECT owner FROM owner_digest)",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        drop(conn);
        for o in owners {
            let owner = DeviceId::from_bytes(id16(&o)?);
            let computed = self.compute(owner).await?;
            tracing::info!(owner = %owner.fmt_short(), records = computed.records, "digested");
            self.store_computed(owner, &computed).await?;
        }
        Ok(())
    }

    /// Recomputes every owner's digest and buckets from its rows and
    /// compares them with the stored ones; a stored digest that differs
    /// (rows changed behind the engine's back, by another program or a
    /// damaged file) is replaced by the rows' own, so the next comparison
    /// with a peer says "differs" and repairs. Returns the owners that
    /// differed. Holds the write lock while it reads (about 1.7 s per
    /// million records).
    pub async fn audit_digests(&self) -> Result<Vec<AuditFinding>> {
        let span = tracing::info_span!("audit_digests", path = %self.path().display());
        async move {
            let _guard = self.inner.write_lock.lock().await;
            self.note_audited_version().await?;
            let owners: Vec<DeviceId> = self
                .owner_digests()
                .await?
                .into_iter()
                .map(|d| d.owner)
                .collect();
            let mut findings = Vec::new();
            for owner in owners {
                if let Some(f) = self.audit_owner(owner).await? {
                    findings.push(f);
                }
            }
            Ok(findings)
        }
        .instrument(span)
        .await
    }

    /// [`Store::audit_digests`] if another program committed to the file
    /// since the last audit of this process (or none ran yet); else nothing.
    pub async fn audit_if_changed(&self) -> Result<Vec<AuditFinding>> {
        let now = self.data_version().await?;
        let last = *self
            .inner
            .audited_version
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last == Some(now) {
            return Ok(Vec::new());
        }
        self.audit_digests().await
    }

    /// The writer connection's `PRAGMA data_version`.
    async fn data_version(&self) -> Result<i64> {
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_err)
    }

    /// Remembers the writer's data version as audited.
    async fn note_audited_version(&self) -> Result<()> {
        let v = self.data_version().await?;
        *self
            .inner
            .audited_version
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(v);
        Ok(())
    }

    /// Audits one owner (the caller holds the write lock).
    async fn audit_owner(&self, owner: DeviceId) -> Result<Option<AuditFinding>> {
        let computed = self.compute(owner).await?;
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        let (stored, records) = digest::stored(&mut conn, owner).await?;
        let buckets = buckets_in(&mut conn, owner).await?;
        drop(conn);
        if stored == computed.lthash && records == computed.records && buckets == computed.buckets {
            return Ok(None);
        }
        let finding = AuditFinding {
            owner,
            stored: (i2u(records), stored.id()),
            actual: (i2u(computed.records), computed.lthash.id()),
        };
        tracing::warn!(
            owner = %owner.fmt_short(),
            stored_records = records,
            actual_records = computed.records,
            stored = %finding.stored.1.fmt_short(),
            actual = %finding.actual.1.fmt_short(),
            "rows changed behind the engine's back: digest recomputed from the rows"
        );
        self.store_computed(owner, &computed).await?;
        Ok(Some(finding))
    }

    /// An owner's digest and buckets computed from its rows (paged reads).
    async fn compute(&self, owner: DeviceId) -> Result<Computed> {
        let mut c = Computed {
            lthash: LtHash::new(),
            records: 0,
            buckets: BTreeMap::new(),
        };
        let mut after = Seq::ZERO;
        loop {
            let page = self.records_after(owner, after, AUDIT_PAGE).await?;
            for r in &page {
                let el = Element::of(r);
                c.lthash.add(&el);
                c.records += 1;
                c.buckets
                    .entry(bucket_of(r.seq()))
                    .or_default()
                    .add(el.fp());
            }
            match page.last() {
                Some(r) if page.len() == AUDIT_PAGE => after = r.seq(),
                _ => break,
            }
        }
        Ok(c)
    }

    /// Replaces an owner's stored digest and buckets, in one transaction.
    async fn store_computed(&self, owner: DeviceId, c: &Computed) -> Result<()> {
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        let mut txn = conn.begin().await.map_err(db_err)?;
        let pruned = digest::pruned(&mut txn, owner).await?;
        digest::clear_owner(&mut txn, owner).await?;
        let mut delta = DigestDelta::default();
        delta.set(c.lthash.clone(), c.records, c.buckets.clone());
        digest::save(&mut txn, HashMap::from([(owner, delta)])).await?;
        digest::set_pruned(&mut txn, owner, pruned).await?;
        txn.commit().await.map_err(db_err)?;
        Ok(())
    }

    /// The non-empty buckets of an owner: bucket number to fingerprint.
    pub async fn recon_buckets(&self, owner: DeviceId) -> Result<BTreeMap<u64, RangeFp>> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        buckets_in(&mut conn, owner).await
    }

    /// The records of `owner` with `lo <= seq < hi` as reconciliation items:
    /// `(seq, id, fingerprint)`, in seq order.
    pub async fn recon_items(
        &self,
        owner: DeviceId,
        lo: Seq,
        hi: Seq,
    ) -> Result<Vec<(Seq, [u8; 16], u128)>> {
        if hi <= lo {
            return Ok(Vec::new());
        }
        let span = usize::try_from(hi.0 - lo.0).unwrap_or(usize::MAX);
        let after = Seq(lo.0.saturating_sub(1));
        let mut out = Vec::new();
        let records = if lo == Seq::ZERO {
            self.records_after(owner, Seq::ZERO, span).await?
        } else {
            self.records_after(owner, after, span).await?
        };
        for r in records {
            if r.seq() >= lo && r.seq() < hi {
                out.push((r.seq(), r.id_bytes(), Element::fp_of(&r)));
            }
        }
        Ok(out)
    }

    /// The records of `owner` at `seqs` (those still held at them) and the
    /// owner's digest, from one read transaction: what a repair source sends.
    pub async fn records_at(
        &self,
        owner: DeviceId,
        seqs: &[Seq],
    ) -> Result<(Vec<Record>, Option<OwnerDigest>)> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        let mut txn = conn.begin().await.map_err(db_err)?;
        let records = rows_at(&mut txn, owner, seqs).await?;
        let d = digest::owner_digest(&mut txn, owner).await?;
        txn.commit().await.map_err(db_err)?;
        Ok((records, d))
    }

    /// Repairs this device's copy of a remote owner in ONE transaction:
    /// removes its records at `extra` seqs (held here, not at the source),
    /// writes `records` through the checked write path ("higher seq wins",
    /// owner checks), and commits only if the result is exactly what the
    /// source claimed (`expected`: records and digest), then moves the
    /// watermark to `expected.watermark`. Any other result is refused with
    /// [`StorageError::RepairMismatch`] and nothing is written: a lying
    /// source cannot make this device delete or overwrite anything.
    pub async fn apply_repair(
        &self,
        expected: OwnerDigest,
        extra: &[Seq],
        records: Vec<Record>,
    ) -> Result<Watermark> {
        let owner = expected.owner;
        let span = tracing::info_span!(
            "apply_repair",
            owner = %owner.fmt_short(),
            seq = expected.watermark.seq.0,
            extra = extra.len(),
            records = records.len()
        );
        async move {
            if self.inner.device.get().map(|d| d.device_id) == Some(owner) {
                return Err(StorageError::LocalOwner { owner });
            }
            let (locs, ents) = split_records(owner, Seq::ZERO, expected.watermark.seq, &records)?;
            let _guard = self.inner.write_lock.lock().await;
            let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
            let mut txn = conn.begin().await.map_err(db_err)?;
            if bulk::owner_state(&mut txn, owner)
                .await?
                .is_some_and(|s| s.local)
            {
                return Err(StorageError::LocalOwner { owner });
            }
            remove_at(&mut txn, owner, extra).await?;
            write_records(&mut txn, owner, &locs, &ents).await?;
            let (lthash, held) = digest::stored(&mut txn, owner).await?;
            let got = lthash.id();
            if got != expected.digest || i2u(held) != expected.records {
                return Err(StorageError::RepairMismatch {
                    owner,
                    want: expected.records,
                    want_digest: expected.digest.fmt_short(),
                    got: i2u(held),
                    got_digest: got.fmt_short(),
                });
            }
            bulk::set_watermark(&mut txn, owner, expected.watermark).await?;
            txn.commit().await.map_err(db_err)?;
            tracing::info!(records = held, "repaired: identical to the source");
            Ok(expected.watermark)
        }
        .instrument(span)
        .await
        .map_err(|e: StorageError| e.disk_full_at(self.path()))
    }
}

/// The stored buckets of an owner.
async fn buckets_in(
    conn: &mut SqliteConnection,
    owner: DeviceId,
) -> Result<BTreeMap<u64, RangeFp>> {
    let rows =
        sqlx::query("SELECT bucket, records, fp FROM recon_bucket WHERE owner = ? ORDER BY bucket")
            .bind(owner.to_bytes().to_vec())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
    let mut out = BTreeMap::new();
    for row in &rows {
        let b: i64 = row.try_get(0).map_err(db_err)?;
        out.insert(i2u(b), digest::bucket_fp(row, 1)?);
    }
    Ok(out)
}

/// An `IN (?, ...)` list of seqs after the owner argument.
fn seq_args(owner: DeviceId, seqs: &[Seq]) -> Result<(String, SqliteArguments)> {
    let mut a = SqliteArguments::default();
    a.add(owner.to_bytes().to_vec())
        .map_err(|e| StorageError::Db(sea_orm::DbErr::Custom(format!("encode argument: {e}"))))?;
    for s in seqs {
        a.add(u2i(s.0)).map_err(|e| {
            StorageError::Db(sea_orm::DbErr::Custom(format!("encode argument: {e}")))
        })?;
    }
    Ok((vec!["?"; seqs.len()].join(","), a))
}

/// The records of `owner` at `seqs`, in the caller's transaction.
async fn rows_at(
    conn: &mut SqliteConnection,
    owner: DeviceId,
    seqs: &[Seq],
) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for chunk in seqs.chunks(SEQS_PER_STMT) {
        let (list, a) = seq_args(owner, chunk)?;
        let rows = sqlx::query_with(
            sqlx::AssertSqlSafe(format!(
                "SELECT {ENTRY_COLUMNS} FROM entry WHERE owner = ? AND seq IN ({list})"
            )),
            a,
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for row in &rows {
            out.push(Record::Entry(entry_from_row(row)?));
        }
        let (list, a) = seq_args(owner, chunk)?;
        let rows = sqlx::query_with(
            sqlx::AssertSqlSafe(format!(
                "SELECT id, owner, path, name, seq, deleted FROM location WHERE owner = ? AND seq IN ({list})"
            )),
            a,
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(db_err)?;
        for row in &rows {
            let id: Vec<u8> = row.try_get(0).map_err(db_err)?;
            let o: Vec<u8> = row.try_get(1).map_err(db_err)?;
            out.push(Record::Location(Location {
                id: LocationId::from_bytes(id16(&id)?),
                owner: DeviceId::from_bytes(id16(&o)?),
                path: row.try_get(2).map_err(db_err)?,
                name: row.try_get(3).map_err(db_err)?,
                seq: Seq(i2u(row.try_get(4).map_err(db_err)?)),
                deleted: row.try_get(5).map_err(db_err)?,
            }));
        }
    }
    out.sort_by_key(|r| r.seq());
    Ok(out)
}

/// Deletes the records of `owner` at `seqs`, taking them out of its digest.
async fn remove_at(conn: &mut SqliteConnection, owner: DeviceId, seqs: &[Seq]) -> Result<()> {
    let gone = rows_at(conn, owner, seqs).await?;
    let mut delta = DigestDelta::default();
    for r in &gone {
        delta.sub(&Element::of(r), r.seq());
    }
    for chunk in seqs.chunks(SEQS_PER_STMT) {
        for table in ["entry", "location"] {
            let (list, a) = seq_args(owner, chunk)?;
            sqlx::query_with(
                sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE owner = ? AND seq IN ({list})"
                )),
                a,
            )
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        }
    }
    digest::save(conn, HashMap::from([(owner, delta)])).await
}

impl Store {
    /// Keeps `statement` (an owner-signed digest statement, encoded by the
    /// caller, who verified it) as the latest of `owner` unless one of a
    /// higher seq is kept already.
    pub async fn save_statement(&self, owner: DeviceId, seq: Seq, statement: &[u8]) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        let mut conn = self.inner.writer_pool.acquire().await.map_err(db_err)?;
        sqlx::query(
            "INSERT INTO owner_statement (owner, seq, statement) VALUES (?, ?, ?) \
             ON CONFLICT(owner) DO UPDATE SET seq = excluded.seq, statement = excluded.statement \
             WHERE excluded.seq >= owner_statement.seq",
        )
        .bind(owner.to_bytes().to_vec())
        .bind(u2i(seq.0))
        .bind(statement.to_vec())
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    /// The latest statement kept for `owner` (see [`Store::save_statement`]).
    pub async fn statement(&self, owner: DeviceId) -> Result<Option<Vec<u8>>> {
        let mut conn = self.inner.reader_pool.acquire().await.map_err(db_err)?;
        sqlx::query_scalar("SELECT statement FROM owner_statement WHERE owner = ?")
            .bind(owner.to_bytes().to_vec())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_err)
    }
}
