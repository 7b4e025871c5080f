//! Measures bulk apply: N generated entries of one remote owner applied in
//! 10K-record batches to a fresh library, then `summary()`, snapshot export
//! and import on those rows, then one `commit_local` of N local entries.
//! Also prints the full `records_after` scan in 10K-record pages, the WAL
//! size after the bulk apply, the first small commit afterwards, and the
//! process's peak RSS (`VmHWM`) after each phase.
//!
//! `cargo run --release -p sync-storage --example apply_bench -- 1000000`
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, IndexId, LibraryId, Location, LocationId, Record, Seq,
};
use sync_storage::{LocalChange, Store};

const BATCH: u64 = 10_000;

/// `VmHWM` (peak RSS) of this process in MB, from `/proc/self/status`.
fn peak_rss_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Size in MB of the WAL beside `db`.
fn wal_mb(db: &std::path::Path) -> f64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(wal).map_or(0.0, |m| m.len() as f64 / 1e6)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(n))
}

fn entries(loc: LocationId, parents: &[EntryId], from: u64, to: u64) -> Vec<Record> {
    let t = Utc
        .timestamp_opt(1_700_000_000, 0)
        .single()
        .unwrap_or_default();
    (from..to)
        .map(|i| {
            Record::Entry(Entry {
                id: EntryId::new_v7(),
                location: loc,
                parent: Some(parents[(i % parents.len() as u64) as usize]),
                name: format!("IMG_{i:08}.jpg"),
                kind: EntryKind::File,
                size: 1_000 + i * 37,
                inode: Some(10_000 + i),
                created_at: t,
                modified_at: t + chrono::Duration::microseconds(i as i64),
                seq: Seq(i + 2),
                deleted: false,
            })
        })
        .collect()
}

async fn run(n: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::TempDir::new()?;
    // APPLY_BENCH_DIR keeps the libraries there for later inspection.
    let root = std::env::var_os("APPLY_BENCH_DIR")
        .map_or_else(|| dir.path().to_path_buf(), std::path::PathBuf::from);
    let db_a = root.join("a").join("library.db");
    let store = Store::open(&db_a).await?;
    store.create_device("bench", LibraryId::new_v7()).await?;
    let owner = DeviceId::new_v7();
    println!("remote owner {owner}");
    let index = IndexId::random();
    let loc = Location {
        id: LocationId::new_v7(),
        owner,
        path: "/bench".into(),
        name: "bench".into(),
        seq: Seq(1),
        deleted: false,
    };
    let parents: Vec<EntryId> = (0..1000).map(|_| EntryId::new_v7()).collect();

    let mut applied = Duration::ZERO;
    let mut after = Seq(0);
    let mut from = 0;
    while from < n {
        let to = (from + BATCH).min(n);
        let mut batch = entries(loc.id, &parents, from, to);
        if from == 0 {
            batch.insert(0, Record::Location(loc.clone()));
        }
        let last = Seq(to + 1);
        let t = Instant::now();
        store.apply_batch(owner, index, after, last, batch).await?;
        applied += t.elapsed();
        after = last;
        from = to;
    }
    println!(
        "apply: {n} entries in {}-record batches: {:.2} s, {:.0} rows/s",
        BATCH,
        applied.as_secs_f64(),
        n as f64 / applied.as_secs_f64()
    );
    println!(
        "after apply: wal {:.1} MB, db {:.1} MB, peak RSS {} MB",
        wal_mb(&db_a),
        std::fs::metadata(&db_a)?.len() as f64 / 1e6,
        peak_rss_mb()
    );

    // The first small batch after the bulk apply (the old 128 MiB autocheckpoint
    // made this one stall).
    let small = entries(loc.id, &parents, n, n + 10);
    let t = Instant::now();
    store
        .apply_batch(owner, index, after, Seq(n + 11), small)
        .await?;
    println!(
        "small apply after bulk: {:.1} ms, wal {:.1} MB",
        t.elapsed().as_secs_f64() * 1e3,
        wal_mb(&db_a)
    );
    let t = Instant::now();
    store.checkpoint().await?;
    println!(
        "checkpoint: {:.1} ms, wal {:.1} MB",
        t.elapsed().as_secs_f64() * 1e3,
        wal_mb(&db_a)
    );

    let t = Instant::now();
    let s = store.summary(owner).await?;
    println!(
        "summary: {} entries, fingerprint {} in {:.3} s",
        s.entries,
        s.fingerprint,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let page = store.records_after(owner, Seq(n / 2), 10_000).await?;
    println!(
        "records_after: {} records in {:.3} s",
        page.len(),
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut read = 0usize;
    let mut from = Seq(0);
    loop {
        let page = store.records_after(owner, from, BATCH as usize).await?;
        let Some(last) = page.last() else { break };
        from = last.seq();
        read += page.len();
    }
    let took = t.elapsed().as_secs_f64();
    println!(
        "records_after scan: {read} records in {}-record pages: {took:.2} s, {:.0} rows/s, \
         {:.2} us/row, peak RSS {} MB",
        BATCH,
        read as f64 / took,
        took * 1e6 / read as f64,
        peak_rss_mb()
    );

    let t = Instant::now();
    let m = store.export_snapshot(owner).await?;
    println!(
        "export_snapshot: {} records, {} bytes, {} chunks in {:.2} s",
        m.entries,
        m.bytes,
        m.chunks.len(),
        t.elapsed().as_secs_f64()
    );

    let other = Store::open(&root.join("b").join("library.db")).await?;
    other.create_device("bench-b", LibraryId::new_v7()).await?;
    let t = Instant::now();
    let mut d = other.begin_download(&m.offer()).await?;
    while !d.is_complete() {
        let i = d.next_chunk();
        let (hash, data) = store.read_snapshot_chunk(&m, i).await?;
        d.write_chunk(i, hash, &data).await?;
    }
    let chunks_done = t.elapsed();
    let t = Instant::now();
    let w = other.import_snapshot(d).await?;
    println!(
        "snapshot transfer: chunks {:.2} s, verify+import {:.2} s, watermark seq {}",
        chunks_done.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        w.seq
    );
    let s2 = other.summary(owner).await?;
    println!(
        "imported summary matches: {}",
        s2.fingerprint == s.fingerprint && s2.entries == s.entries
    );

    let me = store
        .device()
        .await?
        .ok_or("bench device missing")?
        .device_id;
    let local = Location {
        id: LocationId::new_v7(),
        owner: me,
        path: "/local".into(),
        name: "local".into(),
        seq: Seq(0),
        deleted: false,
    };
    let mut changes = vec![LocalChange::Location(local.clone())];
    changes.extend(
        entries(local.id, &parents, 0, n)
            .into_iter()
            .filter_map(|r| match r {
                Record::Entry(e) => Some(LocalChange::Entry(e)),
                Record::Location(_) => None,
            }),
    );
    let t = Instant::now();
    let range = store.commit_local(me, changes).await?;
    let took = t.elapsed().as_secs_f64();
    println!(
        "commit_local: {} changes in {took:.2} s, {:.0} rows/s",
        range.len(),
        range.len() as f64 / took
    );
    println!(
        "end: wal {:.1} MB, peak RSS {} MB",
        wal_mb(&db_a),
        peak_rss_mb()
    );
    Ok(())
}
