//! Device commands: `init`, `id`, `invite`, `join`, `trust`, `untrust`,
//! `trusted`, `index`, `status`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::json;
use sync_actors::{EngineConfig, SyncEngine, init_device};
use sync_core::{DeviceId, LibraryId};
use sync_net::{CertFingerprint, Identity, Invite, TrustStore, check_address};
use sync_storage::{DeviceInfo, Store};

use crate::cli::Tuning;
use crate::progress;

/// Opens an initialized device's store, or says how to create one.
pub async fn open_store(data: &Path) -> anyhow::Result<(Store, DeviceInfo)> {
    let config = EngineConfig::new(data);
    if !config.db_path().exists() {
        bail!(
            "{} holds no device: run `lsync --data {} init` first",
            data.display(),
            data.display()
        );
    }
    let store = Store::open(&config.db_path())
        .await
        .with_context(|| format!("cannot open the library in {}", data.display()))?;
    let Some(device) = store.device().await? else {
        bail!(
            "{} holds no device: run `lsync --data {} init` first",
            data.display(),
            data.display()
        );
    };
    Ok((store, device))
}

/// Starts an engine on an initialized data directory.
pub async fn start_engine(data: &Path) -> anyhow::Result<SyncEngine> {
    start_tuned(data, Tuning::default()).await
}

/// [`start_engine`] with tuning options applied.
pub async fn start_tuned(data: &Path, tuning: Tuning) -> anyhow::Result<SyncEngine> {
    open_store(data).await?;
    let mut config = EngineConfig::new(data);
    tuning.apply(&mut config);
    Ok(SyncEngine::start(config).await?)
}

/// The device created in `data`, if there is one.
async fn existing_device(data: &Path) -> anyhow::Result<Option<DeviceInfo>> {
    let config = EngineConfig::new(data);
    if !config.db_path().exists() {
        return Ok(None);
    }
    let store = Store::open(&config.db_path())
        .await
        .with_context(|| format!("cannot open the library in {}", data.display()))?;
    let device = store.device().await;
    store.close().await;
    Ok(device?)
}

fn default_name(name: Option<String>) -> String {
    name.unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "device".to_string()))
}

/// `lsync init`.
pub async fn init(
    data: &Path,
    name: Option<String>,
    library: Option<String>,
) -> anyhow::Result<()> {
    let library = match library {
        Some(l) => Some(
            l.parse::<LibraryId>()
                .map_err(|e| anyhow::anyhow!("bad library id {l:?}: {e}"))?,
        ),
        None => None,
    };
    if let (Some(existing), Some(wanted)) = (existing_device(data).await?, library)
        && existing.library_id != wanted
    {
        bail!(
            "{} already holds device {} of library {}; a device cannot move to library {wanted}: use a fresh --data directory",
            data.display(),
            existing.device_id,
            existing.library_id
        );
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let (device, fingerprint) = init_device(data, &default_name(name), library).await?;
    println!("device_id   {}", device.device_id);
    println!("library_id  {}", device.library_id);
    println!("fingerprint {fingerprint}");
    Ok(())
}

fn load_identity(data: &Path) -> anyhow::Result<Identity> {
    let dir = EngineConfig::new(data).identity_dir();
    let present = |f: &str| dir.join(f).symlink_metadata().is_ok();
    if !present(sync_net::KEY_FILE) && !present(sync_net::DEVICE_ID_FILE) {
        bail!(
            "{} holds no device identity: run `lsync --data {} init` first",
            data.display(),
            data.display()
        );
    }
    // An identity that is there but unusable (say, a key others can read)
    // is reported as it is: `init` would not fix it.
    Ok(Identity::load(&dir)?)
}

/// `lsync id`.
pub async fn id(data: &Path, json: bool) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let (_, device) = open_store(data).await?;
    if json {
        println!(
            "{}",
            json!({
                "device_id": identity.device_id.to_string(),
                "library_id": device.library_id.to_string(),
                "fingerprint": identity.fingerprint.to_string(),
            })
        );
    } else {
        println!("device_id   {}", identity.device_id);
        println!("library_id  {}", device.library_id);
        println!("fingerprint {}", identity.fingerprint);
    }
    Ok(())
}

/// The device's trust store, for a change: a file that breaks the rules
/// is opened with its valid pins so that `trust` and `untrust` can repair it.
fn trust_store(data: &Path, me: DeviceId) -> anyhow::Result<TrustStore> {
    let (store, _) = TrustStore::load_lenient(&EngineConfig::new(data).trust_path(), me)?;
    Ok(store)
}

/// Warns (stderr) about what the engine would refuse the trust store for.
fn warn_problems(store: &TrustStore) {
    for p in store.problems().unwrap_or_default() {
        eprintln!("warning: {p}");
    }
}

fn parse_fingerprint(text: &str) -> anyhow::Result<CertFingerprint> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("bad fingerprint {text:?}: {e}"))
}

fn parse_device(text: &str) -> anyhow::Result<DeviceId> {
    text.parse()
        .map_err(|e| anyhow::anyhow!("bad device id {text:?}: {e}"))
}

/// `lsync trust FINGERPRINT --device ID`.
pub async fn trust(data: &Path, fingerprint: &str, device: &str) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let fp = parse_fingerprint(fingerprint)?;
    let device = parse_device(device)?;
    if fp == identity.fingerprint {
        bail!("certificate {fp} is this device's own: pin the other device's fingerprint");
    }
    let store = trust_store(data, identity.device_id)?;
    if store.trust(fp, device)? {
        println!("trusted {fp} as device {device}");
    } else {
        println!("already trusted: {fp} as device {device}");
    }
    warn_problems(&store);
    Ok(())
}

/// `lsync untrust FINGERPRINT|DEVICE`.
pub async fn untrust(data: &Path, peer: &str) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let store = trust_store(data, identity.device_id)?;
    if let Ok(fp) = peer.parse::<CertFingerprint>() {
        let device = store.lookup(&fp);
        if !store.untrust(&fp)? {
            bail!("certificate {fp} is not pinned (`lsync trusted` lists the pins)");
        }
        match device {
            Some(d) => println!("untrusted device {d} (certificate {fp})"),
            None => println!("untrusted certificate {fp}"),
        }
    } else if let Ok(device) = peer.parse::<DeviceId>() {
        match store.untrust_device(device)? {
            Some(fp) => println!("untrusted device {device} (certificate {fp})"),
            None => bail!("device {device} is not pinned (`lsync trusted` lists the pins)"),
        }
    } else {
        bail!(
            "{peer:?} is neither a certificate fingerprint (64 hex digits) nor a device id (a UUID)"
        );
    }
    warn_problems(&store);
    Ok(())
}

/// `lsync trusted`.
pub async fn trusted(data: &Path, json: bool) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let (store, problems) =
        TrustStore::load_lenient(&EngineConfig::new(data).trust_path(), identity.device_id)?;
    let pins = store.entries();
    if json {
        let pins: Vec<_> = pins
            .iter()
            .map(|(fp, d)| json!({"device_id": d.to_string(), "fingerprint": fp.to_string()}))
            .collect();
        let problems: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        println!("{}", json!({"peers": pins, "problems": problems}));
    } else {
        for (fp, d) in &pins {
            println!("{d}  {fp}");
        }
        if pins.is_empty() {
            println!("no peer is pinned: pair with `lsync invite` and `lsync join`");
        }
        for p in &problems {
            eprintln!("warning: {p}");
        }
    }
    Ok(())
}

/// `lsync invite`.
pub async fn invite(data: &Path, address: Option<String>, json: bool) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let (store, device) = open_store(data).await?;
    store.close().await;
    if let Some(a) = &address {
        check_address(a)?;
    }
    let invite = Invite {
        reply: false,
        library: device.library_id,
        device: identity.device_id,
        fingerprint: identity.fingerprint,
        address,
    };
    if json {
        println!(
            "{}",
            json!({
                "invite": invite.to_string(),
                "device_id": invite.device.to_string(),
                "library_id": invite.library.to_string(),
                "fingerprint": invite.fingerprint.to_string(),
                "address": invite.address,
            })
        );
    } else {
        println!("{invite}");
        eprintln!("on the other device, run: lsync --data DIR join {invite}");
    }
    Ok(())
}

/// `lsync join STRING`.
pub async fn join(
    data: &Path,
    text: &str,
    name: Option<String>,
    address: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let invite: Invite = text.parse()?;
    if let Some(a) = &address {
        check_address(a)?;
    }
    let (device, created) = match existing_device(data).await? {
        Some(d) if d.library_id != invite.library => bail!(
            "{} holds device {} of library {}, but the pairing string is for library {}: \
             join with a fresh --data directory",
            data.display(),
            d.device_id,
            d.library_id,
            invite.library
        ),
        Some(d) => (d, false),
        None => {
            std::fs::create_dir_all(data)
                .with_context(|| format!("cannot create {}", data.display()))?;
            let (d, _) = init_device(data, &default_name(name), Some(invite.library)).await?;
            (d, true)
        }
    };
    let identity = load_identity(data)?;
    if invite.device == identity.device_id || invite.fingerprint == identity.fingerprint {
        bail!(
            "this pairing string is this device's own: run `lsync join` with it on the other device"
        );
    }
    let store = trust_store(data, identity.device_id)?;
    let added = store.trust(invite.fingerprint, invite.device)?;
    warn_problems(&store);
    let reply = Invite {
        reply: true,
        library: device.library_id,
        device: identity.device_id,
        fingerprint: identity.fingerprint,
        address,
    };
    let trust_command = format!(
        "lsync trust {} --device {}",
        identity.fingerprint, identity.device_id
    );
    if json {
        println!(
            "{}",
            json!({
                "created": created,
                "device_id": identity.device_id.to_string(),
                "library_id": device.library_id.to_string(),
                "fingerprint": identity.fingerprint.to_string(),
                "pinned": {
                    "device_id": invite.device.to_string(),
                    "fingerprint": invite.fingerprint.to_string(),
                    "address": invite.address,
                },
                "already_pinned": !added,
                "reply": (!invite.reply).then(|| reply.to_string()),
                "trust_command": trust_command,
            })
        );
        return Ok(());
    }
    if created {
        println!(
            "created device {} ({}) in library {}",
            identity.device_id, device.name, device.library_id
        );
    }
    let verb = if added { "pinned" } else { "already pinned" };
    println!(
        "{verb} device {} (certificate {})",
        invite.device, invite.fingerprint
    );
    if invite.reply {
        println!("paired: both devices pin each other");
    } else {
        println!("now pin this device on the other one; run there:");
        println!("  lsync --data DIR join {reply}");
        println!("or, in a script:");
        println!(
            "  lsync --data DIR trust {} --device {}",
            identity.fingerprint, identity.device_id
        );
    }
    // Only a checked address is printed inside a command (the parser
    // checked it too): the user pastes the line into a shell.
    if let Some(addr) = invite
        .address
        .as_deref()
        .filter(|a| check_address(a).is_ok())
    {
        let when = if invite.reply {
            "sync with it"
        } else {
            "once it pins this device and serves, sync with it"
        };
        println!(
            "{when}: lsync --data {} connect {addr} --until-synced",
            shell_quote(&data.display().to_string())
        );
    }
    Ok(())
}

/// `text` as one shell word: as is when it holds only `[A-Za-z0-9_./-]`,
/// else in single quotes (a `'` in it written `'\''`).
fn shell_quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./-".contains(&b))
    {
        return text.to_string();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `lsync index`.
pub async fn index(data: &Path, path: &Path, json: bool) -> anyhow::Result<()> {
    let engine = start_engine(data).await?;
    let bar = progress::counter("indexing", json);
    let tick = bar.clone();
    let report = engine
        .index(path, Some(Arc::new(move |n| tick.set_position(n))))
        .await;
    bar.finish_and_clear();
    engine.shutdown().await?;
    let report = report?;
    if json {
        println!(
            "{}",
            json!({
                "location_id": report.location_id.to_string(),
                "entries": report.entries,
                "created": report.created,
                "updated": report.updated,
                "deleted": report.deleted,
                "skipped": report.skipped,
                "seconds": report.seconds,
            })
        );
    } else {
        println!(
            "indexed {}: {} entries ({} created, {} updated, {} deleted, {} skipped) in {:.2}s",
            path.display(),
            report.entries,
            report.created,
            report.updated,
            report.deleted,
            report.skipped,
            report.seconds
        );
    }
    if report.skipped > 0 {
        eprintln!("skipped {} unreadable paths, first ones:", report.skipped);
        for p in &report.skipped_paths {
            eprintln!("  {p}");
        }
    }
    Ok(())
}

/// `lsync status`.
pub async fn status(data: &Path, json: bool) -> anyhow::Result<()> {
    let (store, device) = open_store(data).await?;
    let owners = store.summaries().await?;
    if json {
        let owners: Vec<_> = owners
            .iter()
            .map(|o| {
                json!({
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
        println!(
            "{}",
            json!({"device_id": device.device_id.to_string(), "owners": owners})
        );
    } else {
        println!("device {} ({})", device.device_id, device.name);
        println!(
            "{:<38} {:>6} {:>12} {:>10} {:>10}  fingerprint",
            "owner", "local", "seq", "entries", "tombstones"
        );
        for o in owners {
            println!(
                "{:<38} {:>6} {:>12} {:>10} {:>10}  {}",
                o.owner.to_string(),
                o.local,
                o.seq.0,
                o.entries,
                o.tombstones,
                o.fingerprint
            );
        }
    }
    Ok(())
}

/// One line for `status` about a connected peer's outgoing transfer, e.g.
/// `sending batch 1200/5000 (attempt 2)` or `gave up after 8 attempts:
/// CAUSE; retrying at 12:00:05 UTC`.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "for `status` once it reaches a running engine (the control socket)"
    )
)]
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
    use super::*;
    use sync_actors::{PeerStatus, SessionOrigin, TransferStatus};

    fn peer(transfer: TransferStatus) -> PeerStatus {
        PeerStatus {
            peer: DeviceId::new_v7(),
            name: "peer".into(),
            addr: "127.0.0.1:1".into(),
            origin: SessionOrigin::Dialed,
            holds_of_me: None,
            advertised: None,
            outgoing: None,
            transfer,
            bytes_sent: 0,
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
