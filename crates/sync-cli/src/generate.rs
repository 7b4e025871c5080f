//! `lsync generate`: a synthetic, realistic location committed in bulk.

use std::path::Path;

use sync_core::synthetic::SyntheticTree;
use sync_core::{DeviceId, LocationId};
use sync_storage::{LocalChange, Store};

use crate::control::{self, Request, Route};
use crate::ops;
use crate::output::Terminal;
use crate::progress;

/// Entries committed per commit.
const CHUNK: usize = 50_000;

/// Commits a synthetic location of `entries` entries of `owner` through
/// `commit`, the location first and then chunks of [`CHUNK`] entries;
/// `tick` is told the entries committed so far. Returns the location id.
pub async fn commit_synthetic<F, Fut>(
    owner: DeviceId,
    entries: u64,
    seed: u64,
    mut commit: F,
    tick: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<LocationId>
where
    F: FnMut(Vec<LocalChange>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut tree = SyntheticTree::new(owner, entries, seed);
    let location = tree.location();
    commit(vec![LocalChange::Location(location.clone())]).await?;
    let mut done = 0u64;
    loop {
        let chunk: Vec<LocalChange> = tree.by_ref().take(CHUNK).map(LocalChange::Entry).collect();
        if chunk.is_empty() {
            break;
        }
        done += chunk.len() as u64;
        commit(chunk).await?;
        tick(done);
    }
    Ok(location.id)
}

/// Generates `entries` entries for `owner` straight into `store` (no
/// engine runs on it, or it is told later); returns the location id.
pub async fn generate_into(
    store: &Store,
    owner: DeviceId,
    entries: u64,
    seed: u64,
    quiet: bool,
) -> anyhow::Result<LocationId> {
    let bar = progress::bar(entries, "generating", quiet);
    let commit = |changes| async move {
        store.commit_local(owner, changes).await?;
        Ok(())
    };
    let location = commit_synthetic(owner, entries, seed, commit, &|n| bar.set_position(n)).await;
    bar.finish_and_clear();
    location
}

/// Runs `lsync generate`: inside the running engine if one holds the
/// library (its peers receive the entries as they are committed), else in
/// an engine started for the run.
pub async fn run(data: &Path, entries: u64, seed: u64, json: bool) -> anyhow::Result<()> {
    let request = Request::Generate {
        entries,
        seed,
        json,
    };
    let engine = match control::route(data, &request).await? {
        Route::Forwarded => return Ok(()),
        Route::Local(engine) => engine,
    };
    let result = ops::generate(&engine, entries, seed, json, &Terminal::default()).await;
    engine.shutdown().await?;
    result
}
