//! `lsync demo`: two devices in a temporary directory, paired; device A gets
//! a location, B connects and syncs with live progress; then A changes and
//! deletes a few entries and B receives them live; a summary follows.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sync_actors::{EngineConfig, SyncEngine, init_device};
use sync_core::{Record, Seq};
use sync_net::TrustStore;
use sync_storage::LocalChange;

use crate::cli::DemoArgs;
use crate::generate::generate_into;
use crate::sync::ProgressWatch;

/// Entries changed, and deleted, live after the bulk sync.
const LIVE_CHANGES: usize = 5;

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let quiet = args.json;
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let (dir_a, dir_b) = (tmp.path().join("device-a"), tmp.path().join("device-b"));
    let (a, fp_a) = init_device(&dir_a, "device-a", None).await?;
    let (b, fp_b) = init_device(&dir_b, "device-b", Some(a.library_id)).await?;
    TrustStore::load(&EngineConfig::new(&dir_a).trust_path(), a.device_id)?
        .trust(fp_b, b.device_id)?;
    TrustStore::load(&EngineConfig::new(&dir_b).trust_path(), b.device_id)?
        .trust(fp_a, a.device_id)?;
    if !quiet {
        eprintln!(
            "device A {} and device B {} paired",
            a.device_id, b.device_id
        );
    }

    let engine_a = SyncEngine::start(EngineConfig::new(&dir_a)).await?;
    let entries = match &args.path {
        Some(path) => {
            let report = engine_a.index(path, None).await?;
            if !quiet {
                eprintln!(
                    "device A indexed {}: {} entries in {:.2}s",
                    path.display(),
                    report.entries,
                    report.seconds
                );
            }
            report.entries
        }
        None => {
            let started = Instant::now();
            generate_into(&engine_a.store(), a.device_id, args.entries, 1, quiet).await?;
            if !quiet {
                eprintln!(
                    "device A generated {} entries in {:.2}s",
                    args.entries,
                    started.elapsed().as_secs_f64()
                );
            }
            args.entries
        }
    };
    let addr = engine_a.listen("127.0.0.1:0").await?;

    let engine_b = SyncEngine::start(EngineConfig::new(&dir_b)).await?;
    let watcher = ProgressWatch::start(&engine_b, quiet);
    let started = Instant::now();
    engine_b.connect(&addr.to_string()).await?;
    if !engine_b
        .wait_synced(a.device_id, Duration::from_secs(600))
        .await?
    {
        bail!("device B did not sync within 10 minutes");
    }
    let seconds = started.elapsed().as_secs_f64();
    let wire = engine_a
        .peers()
        .await?
        .iter()
        .map(|p| p.bytes_sent)
        .sum::<u64>();

    // Live: A renames a few entries and deletes a few; B receives them.
    let store_a = engine_a.store();
    let sample: Vec<_> = store_a
        .records_after(a.device_id, Seq::ZERO, 1000)
        .await?
        .into_iter()
        .filter_map(|r| match r {
            Record::Entry(e) if e.parent.is_some() && !e.deleted => Some(e),
            _ => None,
        })
        .rev()
        .take(LIVE_CHANGES * 2)
        .collect();
    let mut changes = Vec::new();
    for (i, e) in sample.iter().enumerate() {
        if i % 2 == 0 {
            let mut e = e.clone();
            e.name = format!("renamed-{}", e.name);
            e.size += 1;
            changes.push(LocalChange::Entry(e));
        } else {
            changes.push(LocalChange::DeleteEntry(e.id));
        }
    }
    let live_started = Instant::now();
    let range = engine_a.commit(changes).await?;
    let store_b = engine_b.store();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = store_b.watermark(a.device_id).await?.map(|w| w.seq);
        if held >= Some(range.last) {
            break;
        }
        if Instant::now() > deadline {
            bail!("live changes did not arrive within 30s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let live_seconds = live_started.elapsed().as_secs_f64();

    let sum_a = store_a.summary(a.device_id).await?;
    let sum_b = store_b.summary(a.device_id).await?;
    let matched = sum_a.fingerprint == sum_b.fingerprint
        && sum_a.entries == sum_b.entries
        && sum_a.tombstones == sum_b.tombstones;
    engine_b.shutdown().await?;
    engine_a.shutdown().await?;
    let moved = watcher.finish().await;
    let strategy = moved
        .strategies
        .iter()
        .filter(|s| *s != "individual")
        .cloned()
        .collect::<Vec<_>>()
        .join("+");
    let rate = entries as f64 / seconds.max(1e-9);
    if args.json {
        println!(
            "{}",
            json!({
                "strategy": strategy,
                "entries": entries,
                "wire_bytes": wire,
                "seconds": seconds,
                "entries_per_second": rate,
                "live_changes": range.last.0 + 1 - range.first.0,
                "live_seconds": live_seconds,
                "fingerprint_a": sum_a.fingerprint.to_hex(),
                "fingerprint_b": sum_b.fingerprint.to_hex(),
                "fingerprints_match": matched,
            })
        );
    } else {
        println!();
        println!("{:<22} {}", "strategy", strategy);
        println!("{:<22} {}", "entries", entries);
        println!(
            "{:<22} {} ({:.1} B/entry)",
            "bytes on the wire",
            wire,
            wire as f64 / entries.max(1) as f64
        );
        println!("{:<22} {:.2}", "seconds", seconds);
        println!("{:<22} {:.0}", "entries/s", rate);
        println!(
            "{:<22} {} in {:.1} ms",
            "live changes",
            range.last.0 + 1 - range.first.0,
            live_seconds * 1000.0
        );
        println!("{:<22} {}", "fingerprint A", sum_a.fingerprint);
        println!("{:<22} {}", "fingerprint B", sum_b.fingerprint);
        println!("{:<22} {}", "fingerprints match", matched);
    }
    if !matched {
        bail!("fingerprints differ");
    }
    Ok(())
}
