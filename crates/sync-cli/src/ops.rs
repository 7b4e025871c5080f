//! The bodies of the commands that change a library (`index`, `generate`,
//! `trust`, `untrust`) and of `status`, run against an engine: one started
//! in this process, or the engine a running `serve`/`connect` holds, when
//! the command came in over its control socket (see `control.rs`).

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use serde_json::json;
use sync_actors::{EngineStatus, IndexReport, PeerStatus, SyncEngine};
use sync_core::DeviceId;
use sync_core::digest::OwnerDigest;
use sync_net::{CertFingerprint, TrustStore};
use sync_storage::OwnerSummary;

use crate::generate::commit_synthetic;
use crate::output::Output;

/// `index PATH`: indexes the folder, reports what changed.
pub async fn index(
    engine: &SyncEngine,
    path: &Path,
    json: bool,
    out: &dyn Output,
) -> anyhow::Result<()> {
    out.start("indexing", json);
    let report = engine.index(path, Some(out.progress_sink())).await;
    out.finish();
    let report = report?;
    print_index(path, &report, json, out);
    Ok(())
}

fn print_index(path: &Path, report: &IndexReport, json: bool, out: &dyn Output) {
    if json {
        out.line(
            &json!({
                "location_id": report.location_id.to_string(),
                "entries": report.entries,
                "created": report.created,
                "updated": report.updated,
                "deleted": report.deleted,
                "skipped": report.skipped,
                "kept": report.kept,
                "seconds": report.seconds,
            })
            .to_string(),
        );
    } else {
        out.line(&format!(
            "indexed {}: {} entries ({} created, {} updated, {} deleted, {} skipped) in {:.2}s",
            path.display(),
            report.entries,
            report.created,
            report.updated,
            report.deleted,
            report.skipped,
            report.seconds
        ));
    }
    if report.skipped > 0 {
        out.warn(&format!(
            "skipped {} unreadable paths, first ones:",
            report.skipped
        ));
        for p in &report.skipped_paths {
            out.warn(&format!("  {p}"));
        }
    }
}

/// `generate N`: a synthetic location committed through the engine, so
/// connected peers receive it as it is committed.
pub async fn generate(
    engine: &SyncEngine,
    entries: u64,
    seed: u64,
    json: bool,
    out: &dyn Output,
) -> anyhow::Result<()> {
    let started = Instant::now();
    out.start("generating", json);
    let tick = out.progress_sink();
    let commit = |changes| async move {
        engine.commit(changes).await?;
        Ok(())
    };
    let owner = engine.device().device_id;
    let location = commit_synthetic(owner, entries, seed, commit, &|n| tick(n)).await;
    out.finish();
    let location = location?;
    let seconds = started.elapsed().as_secs_f64();
    if json {
        out.line(
            &json!({"location_id": location.to_string(), "entries": entries, "seconds": seconds})
                .to_string(),
        );
    } else {
        out.line(&format!(
            "generated {entries} entries in location {location} in {seconds:.2}s"
        ));
    }
    Ok(())
}

fn parse_fingerprint(text: &str) -> anyhow::Result<CertFingerprint> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("bad fingerprint {text:?}: {e}"))
}

fn parse_device(text: &str) -> anyhow::Result<DeviceId> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("bad device id {text:?}: {e}"))
}

/// Warns about what the engine would refuse the trust store for.
fn warn_problems(trust: &TrustStore, out: &dyn Output) {
    for p in trust.problems().unwrap_or_default() {
        out.warn(&format!("warning: {p}"));
    }
}

/// `trust FINGERPRINT --device ID` on `trust`, the store of the device whose
/// own certificate is `own`.
pub fn trust(
    trust: &TrustStore,
    own: CertFingerprint,
    fingerprint: &str,
    device: &str,
    out: &dyn Output,
) -> anyhow::Result<()> {
    let fp = parse_fingerprint(fingerprint)?;
    let device = parse_device(device)?;
    if fp == own {
        bail!("certificate {fp} is this device's own: pin the other device's fingerprint");
    }
    if trust.trust(fp, device)? {
        out.line(&format!("trusted {fp} as device {device}"));
    } else {
        out.line(&format!("already trusted: {fp} as device {device}"));
    }
    warn_problems(trust, out);
    Ok(())
}

/// `untrust FINGERPRINT|DEVICE` on `trust`: a running engine closes the
/// peer's sessions at once.
pub fn untrust(trust: &TrustStore, peer: &str, out: &dyn Output) -> anyhow::Result<()> {
    if let Ok(fp) = peer.parse::<CertFingerprint>() {
        let device = trust.lookup(&fp);
        if !trust.untrust(&fp)? {
            bail!("certificate {fp} is not pinned (`lsync trusted` lists the pins)");
        }
        match device {
            Some(d) => out.line(&format!("untrusted device {d} (certificate {fp})")),
            None => out.line(&format!("untrusted certificate {fp}")),
        }
    } else if let Ok(device) = peer.parse::<DeviceId>() {
        match trust.untrust_device(device)? {
            Some(fp) => out.line(&format!("untrusted device {device} (certificate {fp})")),
            None => bail!("device {device} is not pinned (`lsync trusted` lists the pins)"),
        }
    } else {
        bail!(
            "{peer:?} is neither a certificate fingerprint (64 hex digits) nor a device id (a UUID)"
        );
    }
    warn_problems(trust, out);
    Ok(())
}

/// What `status` shows: the owners held and, when an engine is running,
/// its connected peers.
pub struct StatusView<'a> {
    /// This device.
    pub device: DeviceId,
    /// Its name.
    pub name: &'a str,
    /// Every owner held.
    pub owners: &'a [OwnerSummary],
    /// Every owner held: records and content digest.
    pub digests: &'a [OwnerDigest],
    /// The running engine's peers (`None`: not reached through it).
    pub peers: Option<&'a [PeerStatus]>,
    /// The pid of the engine that holds the library (`Some(None)`: it
    /// wrote no pid); `None` when none does.
    pub held_by: Option<Option<u32>>,
}

/// `status` of a running engine.
pub async fn status(engine: &SyncEngine, json: bool, out: &dyn Output) -> anyhow::Result<()> {
    let EngineStatus {
        owners,
        peers,
        digests,
        ..
    } = engine.status().await?;
    let device = engine.device();
    print_status(
        &StatusView {
            device: device.device_id,
            name: &device.name,
            owners: &owners,
            digests: &digests,
            peers: Some(&peers),
            held_by: Some(Some(std::process::id())),
        },
        json,
        out,
    );
    Ok(())
}

/// Prints `status`: a table, or one JSON object.
pub fn print_status(view: &StatusView<'_>, json: bool, out: &dyn Output) {
    if json {
        let owners: Vec<_> = view
            .owners
            .iter()
            .map(|o| {
                let d = view.digests.iter().find(|d| d.owner == o.owner);
                json!({
                    "digest": d.map(|d| d.digest.to_string()),
                    "records": d.map(|d| d.records),
                    "device_id": o.owner.to_string(),
                    "local": o.local,
                    "index_id": o.index_id.to_string(),
                    "seq": o.seq.0,
                    "entries": o.entries,
                    "tombstones": o.tombstones,
                    "fingerprint": o.fingerprint.to_hex(),
                })
            })
            .collect();
        // One shape whether an engine runs or not: `serving`, its pid
        // (null if none, or unknown) and its peers (null if not reached).
        let doc = json!({
            "device_id": view.device.to_string(),
            "owners": owners,
            "serving": view.peers.is_some() || view.held_by.is_some(),
            "engine_pid": view.held_by.flatten(),
            "peers": view.peers.map(|p| serde_json::to_value(p).unwrap_or_default()),
        });
        out.line(&doc.to_string());
        return;
    }
    out.line(&format!("device {} ({})", view.device, view.name));
    out.line(&format!(
        "{:<38} {:>6} {:>12} {:>10} {:>10}  digest",
        "owner", "local", "seq", "entries", "tombstones"
    ));
    for o in view.owners {
        let digest = view
            .digests
            .iter()
            .find(|d| d.owner == o.owner)
            .map(|d| d.digest.fmt_short())
            .unwrap_or_else(|| "-".into());
        out.line(&format!(
            "{:<38} {:>6} {:>12} {:>10} {:>10}  {}",
            o.owner.to_string(),
            o.local,
            o.seq.0,
            o.entries,
            o.tombstones,
            digest
        ));
    }
    match (view.peers, view.held_by) {
        (None, Some(pid)) => out.line(&format!(
            "an engine ({}) holds this library without a control socket: its peers are not shown",
            pid.map(|p| format!("pid {p}"))
                .unwrap_or_else(|| "pid unknown".into())
        )),
        (None, None) => out.line("not serving: no engine runs on this library"),
        (Some([]), _) => out.line("serving; no peer connected"),
        (Some(peers), _) => {
            out.line("connected peers:");
            for p in peers {
                out.line(&format!("  {}", describe_peer(p)));
                for line in describe_verification(view.device, p) {
                    out.line(&format!("    {line}"));
                }
            }
        }
    }
}

/// One line about a connected peer.
fn describe_peer(p: &PeerStatus) -> String {
    let holds = p
        .holds_of_me
        .map(|w| format!("holds my seq {}", w.seq.0))
        .unwrap_or_else(|| "holds nothing of mine yet".into());
    format!(
        "{} ({}) at {} ({:?}): {holds}; {}; {} bytes sent",
        p.peer,
        p.name,
        p.addr,
        p.origin,
        describe_transfer(p),
        p.bytes_sent
    )
}

/// `status` lines about how a peer's copies compare with this device's,
/// one per owner both hold: "my records: verified identical at 42",
/// "records of 1a2b3c4d: behind (10 of 42)".
pub fn describe_verification(me: DeviceId, p: &PeerStatus) -> Vec<String> {
    p.verification
        .iter()
        .map(|(owner, v)| {
            let whose = if *owner == me {
                "my records".to_string()
            } else if *owner == p.peer {
                "its records".to_string()
            } else {
                format!("records of {}", owner.fmt_short())
            };
            format!("{whose}: {}", v.describe())
        })
        .collect()
}

/// One line for `status` about a connected peer's outgoing transfer, e.g.
/// `sending batch 1200/5000 (attempt 2)` or `gave up after 8 attempts:
/// CAUSE; retrying at 12:00:05 UTC`.
pub fn describe_transfer(peer: &sync_actors::PeerStatus) -> String {
    use sync_actors::TransferStatus;
    let at = |t: &chrono::DateTime<chrono::Utc>| t.format("%H:%M:%S UTC").to_string();
    match &peer.transfer {
        TransferStatus::Idle => "idle".to_string(),
        TransferStatus::Sending {
            strategy,
            attempt,
            acked,
            total,
            ..
        } => {
            let retry = if *attempt > 1 {
                format!(" (attempt {attempt})")
            } else {
                String::new()
            };
            format!("sending {strategy}, acked seq {acked}, {total} records{retry}")
        }
        TransferStatus::Retrying {
            attempts,
            cause,
            retry_at,
        } => format!(
            "failed {attempts}x ({}); resuming at {}",
            sync_core::untrusted::for_log(cause),
            at(retry_at)
        ),
        TransferStatus::GaveUp {
            attempts,
            cause,
            retry_at,
        } => format!(
            "gave up after {attempts} attempts ({}); retrying at {}",
            sync_core::untrusted::for_log(cause),
            at(retry_at)
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use sync_actors::{EngineConfig, EngineError, init_device};
    use sync_storage::StorageError;

    use super::*;

    /// Attack: drop an engine's handle without `shutdown`, then start a
    /// second engine on its library. The first engine's thread (actors,
    /// connections to the library) goes on running, so the library must
    /// stay locked: the lock belongs to that thread, not to the handle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_engine_handle_keeps_its_library_locked() {
        let dir = tempfile::tempdir().unwrap();
        init_device(dir.path(), "a", None).await.unwrap();
        let first = SyncEngine::start(EngineConfig::new(dir.path()))
            .await
            .unwrap();
        drop(first);
        match SyncEngine::start(EngineConfig::new(dir.path())).await {
            Err(EngineError::Storage(StorageError::InUse { pid, .. })) => {
                assert_eq!(pid, Some(std::process::id()));
            }
            Err(e) => panic!("unexpected: {e}"),
            Ok(_) => panic!("a second engine runs beside the dropped one's thread"),
        }
    }

    use sync_actors::{PeerStatus, SessionOrigin, TransferStatus};

    fn peer(transfer: TransferStatus) -> PeerStatus {
        PeerStatus {
            peer: sync_core::DeviceId::new_v7(),
            name: "peer".into(),
            addr: "127.0.0.1:1".into(),
            origin: SessionOrigin::Dialed,
            holds_of_me: None,
            advertised: None,
            outgoing: None,
            transfer,
            bytes_sent: 0,
            verification: Vec::new(),
        }
    }

    #[test]
    fn a_given_up_transfer_says_why_and_when_it_is_tried_again() {
        let retry_at = chrono::DateTime::from_timestamp(43_205, 0).expect("time");
        let line = describe_transfer(&peer(TransferStatus::GaveUp {
            attempts: 8,
            cause: "no space left".into(),
            retry_at,
        }));
        assert_eq!(
            line,
            "gave up after 8 attempts (no space left); retrying at 12:00:05 UTC"
        );
        assert_eq!(describe_transfer(&peer(TransferStatus::Idle)), "idle");
        let sending = describe_transfer(&peer(TransferStatus::Sending {
            transfer: sync_core::TransferId::new_v7(),
            strategy: sync_core::Strategy::Batches,
            attempt: 2,
            acked: sync_core::Seq(1_200),
            total: 5_000,
        }));
        assert_eq!(
            sending,
            "sending batch, acked seq 1200, 5000 records (attempt 2)"
        );
    }
}
