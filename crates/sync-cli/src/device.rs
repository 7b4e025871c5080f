//! Device commands: `init`, `id`, `trust`, `index`, `status`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde_json::json;
use sync_actors::{EngineConfig, SyncEngine, init_device};
use sync_core::{DeviceId, LibraryId};
use sync_net::{CertFingerprint, Identity, TrustStore};
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
    let name =
        name.unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "device".to_string()));
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let (device, fingerprint) = init_device(data, &name, library).await?;
    println!("device_id   {}", device.device_id);
    println!("library_id  {}", device.library_id);
    println!("fingerprint {fingerprint}");
    Ok(())
}

fn load_identity(data: &Path) -> anyhow::Result<Identity> {
    let config = EngineConfig::new(data);
    Identity::load(&config.identity_dir()).map_err(|e| {
        anyhow::anyhow!(
            "{} holds no device identity ({e}): run `lsync --data {} init` first",
            data.display(),
            data.display()
        )
    })
}

/// `lsync id`.
pub async fn id(data: &Path, json: bool) -> anyhow::Result<()> {
    let identity = load_identity(data)?;
    let (_, device) = open_store(data).await?;
    if json {
        println!(
            "{}",
            json!({"device_id": identity.device_id.to_string(), "fingerprint": identity.fingerprint.to_string()})
        );
    } else {
        println!("device_id   {}", identity.device_id);
        println!("library_id  {}", device.library_id);
        println!("fingerprint {}", identity.fingerprint);
    }
    Ok(())
}

/// `lsync trust`.
pub fn trust(data: &Path, fingerprint: &str, device: Option<String>) -> anyhow::Result<()> {
    load_identity(data)?;
    let fp: CertFingerprint = fingerprint
        .parse()
        .map_err(|e| anyhow::anyhow!("bad fingerprint {fingerprint:?}: {e}"))?;
    let device = match device {
        Some(d) => Some(
            d.parse::<DeviceId>()
                .map_err(|e| anyhow::anyhow!("bad device id {d:?}: {e}"))?,
        ),
        None => None,
    };
    let store = TrustStore::load(&EngineConfig::new(data).trust_path())?;
    store.trust(fp, device)?;
    println!("trusted {fp}");
    Ok(())
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
