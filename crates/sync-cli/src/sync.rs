//! `lsync serve` and `lsync connect`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::ProgressBar;
use serde_json::json;
use sync_actors::{Direction, SyncEngine, SyncEvent};
use sync_core::{DeviceId, TransferId};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::Tuning;
use crate::control::ControlServer;
use crate::device::{start_engine, start_tuned};
use crate::progress;

/// Waits for SIGINT or SIGTERM.
pub async fn until_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The engine's control socket; without one (a data directory path too
/// long for a socket name, say) it still serves, and says what that costs.
fn control_socket(data: &Path, engine: &SyncEngine) -> Option<ControlServer> {
    match ControlServer::start(data, engine.clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!(
                "warning: no control socket ({e:#}): other lsync commands on {} are refused while this runs",
                data.display()
            );
            None
        }
    }
}

/// `lsync serve`: listens, indexes the folders given (one after another,
/// while serving; again every `rescan` seconds if given), and syncs until
/// SIGINT or SIGTERM.
pub async fn serve(
    data: &Path,
    listen: &str,
    folders: &[PathBuf],
    rescan: Option<f64>,
    tuning: Tuning,
) -> anyhow::Result<()> {
    let rescan = match rescan {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            bail!("--rescan needs a positive number of seconds")
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let engine = start_tuned(data, tuning).await?;
    let control = control_socket(data, &engine);
    let addr = engine.listen(listen).await?;
    eprintln!("listening on {addr} as {}", engine.device().device_id);
    let watcher = ProgressWatch::start(&engine, true);
    let indexer = engine.clone();
    let folders = folders.to_vec();
    let indexing = tokio::spawn(async move {
        if folders.is_empty() {
            return;
        }
        loop {
            for folder in &folders {
                match indexer.index(folder, None).await {
                    Ok(r) => tracing::info!(
                        folder = %folder.display(),
                        entries = r.entries,
                        created = r.created,
                        updated = r.updated,
                        deleted = r.deleted,
                        skipped = r.skipped,
                        "folder indexed"
                    ),
                    Err(e) => tracing::error!(folder = %folder.display(), "cannot index: {e}"),
                }
            }
            match rescan {
                Some(every) => tokio::time::sleep(every).await,
                None => return,
            }
        }
    });
    until_signal().await?;
    drop(control);
    indexing.abort();
    watcher.finish().await;
    engine.shutdown().await?;
    Ok(())
}

/// Totals of what a session moved, from the event bus.
#[derive(Default)]
pub struct Moved {
    /// The strategies used, in order.
    pub strategies: Vec<String>,
    /// Records moved (both directions).
    pub records: u64,
    /// Payload bytes moved (both directions).
    pub bytes: u64,
}

/// Watches an engine's events, drawing a bar per transfer, until stopped.
pub struct ProgressWatch {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Moved>,
}

impl ProgressWatch {
    /// Starts watching (bars hidden when `quiet`).
    pub fn start(engine: &SyncEngine, quiet: bool) -> ProgressWatch {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(show_progress(engine.subscribe(), quiet, stopped));
        ProgressWatch {
            stop: Some(stop),
            task,
        }
    }

    /// Stops watching and returns what moved.
    pub async fn finish(mut self) -> Moved {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap_or_default()
    }
}

/// Draws a bar per transfer; returns the totals when stopped or when the
/// event bus closes.
async fn show_progress(
    mut rx: tokio::sync::broadcast::Receiver<SyncEvent>,
    quiet: bool,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Moved {
    let mut bars: HashMap<TransferId, ProgressBar> = HashMap::new();
    // Owners whose records arrive in a transfer (counted when it completes);
    // records applied outside one are individual changes, counted as applied.
    let mut receiving: HashMap<TransferId, DeviceId> = HashMap::new();
    let mut moved = Moved::default();
    loop {
        let next = tokio::select! {
            biased;
            e = rx.recv() => e,
            _ = &mut stop => {
                // Drain what is already queued, then stop.
                match rx.try_recv() {
                    Ok(e) => Ok(e),
                    Err(_) => return moved,
                }
            }
        };
        let event = match next {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return moved,
        };
        match event {
            SyncEvent::TransferStarted {
                transfer,
                strategy,
                total,
                direction,
                owner,
                ..
            } => {
                if direction == Direction::Receive {
                    receiving.insert(transfer, owner);
                }
                let label = match direction {
                    Direction::Send => format!("send {strategy}"),
                    Direction::Receive => format!("recv {strategy}"),
                };
                moved.strategies.push(strategy.to_string());
                bars.insert(transfer, progress::bar(total, &label, quiet));
            }
            SyncEvent::TransferProgress {
                transfer,
                done,
                total,
                ..
            } => {
                if let Some(b) = bars.get(&transfer) {
                    b.set_length(total.max(done));
                    b.set_position(done);
                }
            }
            SyncEvent::TransferCompleted {
                transfer,
                records,
                bytes,
                ..
            } => {
                receiving.remove(&transfer);
                moved.records += records;
                moved.bytes += bytes;
                if let Some(b) = bars.remove(&transfer) {
                    b.finish_and_clear();
                }
            }
            SyncEvent::Applied { owner, records, .. }
                if !receiving.values().any(|o| *o == owner) =>
            {
                moved.records += records;
                if !moved.strategies.iter().any(|s| s == "individual") {
                    moved.strategies.push("individual".into());
                }
            }
            SyncEvent::TransferFailed {
                transfer, cause, ..
            } => {
                receiving.remove(&transfer);
                if let Some(b) = bars.remove(&transfer) {
                    b.abandon_with_message(cause);
                }
            }
            _ => {}
        }
    }
}

/// `lsync connect`.
pub async fn connect(
    data: &Path,
    addr: &str,
    until_synced: bool,
    json: bool,
    timeout: u64,
) -> anyhow::Result<()> {
    let engine = start_engine(data).await?;
    let control = control_socket(data, &engine);
    let started = Instant::now();
    let watcher = ProgressWatch::start(&engine, json);
    let peer = match engine.connect(addr).await {
        Ok(p) => p,
        Err(e) => {
            drop(control);
            engine.shutdown().await?;
            bail!("cannot connect to {addr}: {e}");
        }
    };
    if !until_synced {
        eprintln!(
            "connected to {} ({}); Ctrl-C to stop",
            peer.device, peer.name
        );
        until_signal().await?;
        drop(control);
        engine.shutdown().await?;
        return Ok(());
    }
    let synced = engine
        .wait_synced(peer.device, Duration::from_secs(timeout))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let wire: u64 = engine
        .peers()
        .await?
        .iter()
        .find(|p| p.peer == peer.device)
        .map(|p| p.bytes_sent)
        .unwrap_or(0);
    drop(control);
    engine.shutdown().await?;
    let moved = watcher.finish().await;
    if !synced {
        bail!("not synced with {} after {timeout}s", peer.device);
    }
    let strategy = if moved.strategies.is_empty() {
        "up_to_date".to_string()
    } else {
        moved.strategies.join("+")
    };
    if json {
        println!(
            "{}",
            json!({
                "peer": peer.device.to_string(),
                "strategy": strategy,
                "records": moved.records,
                "bytes": moved.bytes.max(wire),
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "synced with {} ({}): {} records, {} bytes, strategy {}, {:.2}s",
            peer.device,
            peer.name,
            moved.records,
            moved.bytes.max(wire),
            strategy,
            seconds
        );
    }
    Ok(())
}
