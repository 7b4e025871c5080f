//! Measures bulk apply: N generated entries of one remote owner applied in
//! 10K-record batches to a fresh library, then `summary()`, snapshot export
//! and import on those rows.
//!
//! `cargo run --release -p sync-storage --example apply_bench -- 1000000`
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, IndexId, LibraryId, Location, LocationId, Record, Seq,
};
use sync_storage::Store;

const BATCH: u64 = 10_000;

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
    let store = Store::open(&dir.path().join("a").join("library.db")).await?;
    store.create_device("bench", LibraryId::new_v7()).await?;
    let owner = DeviceId::new_v7();
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
    let m = store.export_snapshot(owner).await?;
    println!(
        "export_snapshot: {} records, {} bytes, {} chunks in {:.2} s",
        m.entries,
        m.bytes,
        m.chunks.len(),
        t.elapsed().as_secs_f64()
    );

    let other = Store::open(&dir.path().join("b").join("library.db")).await?;
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
    Ok(())
}
