//! `lsync generate`: a synthetic, realistic location committed in bulk.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use sync_core::synthetic::SyntheticTree;
use sync_core::{DeviceId, LocationId};
use sync_storage::{LocalChange, Store};

use crate::device::open_store;
use crate::progress;

/// Entries committed per `commit_local` call.
const CHUNK: usize = 50_000;

/// Generates `entries` entries for `owner` into `store`; returns the location id.
pub async fn generate_into(
    store: &Store,
    owner: DeviceId,
    entries: u64,
    seed: u64,
    quiet: bool,
) -> anyhow::Result<LocationId> {
    let mut tree = SyntheticTree::new(owner, entries, seed);
    let location = tree.location();
    store
        .commit_local(owner, vec![LocalChange::Location(location.clone())])
        .await?;
    let bar = progress::bar(entries, "generating", quiet);
    loop {
        let chunk: Vec<LocalChange> = tree.by_ref().take(CHUNK).map(LocalChange::Entry).collect();
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len() as u64;
        store.commit_local(owner, chunk).await?;
        bar.inc(n);
    }
    bar.finish_and_clear();
    Ok(location.id)
}

/// Runs `lsync generate`.
pub async fn run(data: &Path, entries: u64, seed: u64, json: bool) -> anyhow::Result<()> {
    let (store, device) = open_store(data).await?;
    let started = Instant::now();
    let location = generate_into(&store, device.device_id, entries, seed, json).await?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            json!({"location_id": location.to_string(), "entries": entries, "seconds": seconds})
        );
    } else {
        println!("generated {entries} entries in location {location} in {seconds:.2}s");
    }
    Ok(())
}
