//! Device commands: `init`, `id`, `invite`, `join`, `trust`, `untrust`,
//! `trusted`, `index`, `status`.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::json;
use sync_actors::{EngineConfig, SyncEngine, init_device};
use sync_core::{DeviceId, LibraryId};
use sync_net::{Identity, Invite, TrustStore, check_address};
use sync_storage::{DeviceInfo, Store};

use crate::cli::Tuning;
use crate::control::{self, Request, Route};
use crate::ops;
use crate::output::Terminal;

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

/// `lsync trust FINGERPRINT --device ID`: through the running engine if
/// one holds the library, else on the trust file directly.
pub async fn trust(data: &Path, fingerprint: &str, device: &str) -> anyhow::Result<()> {
    let request = Request::Trust {
        fingerprint: fingerprint.into(),
        device: device.into(),
    };
    if control::forward(data, &request).await?.is_some() {
        return Ok(());
    }
    let identity = load_identity(data)?;
    let store = trust_store(data, identity.device_id)?;
    ops::trust(
        &store,
        identity.fingerprint,
        fingerprint,
        device,
        &Terminal::default(),
    )
}

/// `lsync untrust FINGERPRINT|DEVICE`: a running engine closes the peer's
/// sessions at once (it is told directly, or sees the trust file change).
pub async fn untrust(data: &Path, peer: &str) -> anyhow::Result<()> {
    let request = Request::Untrust { peer: peer.into() };
    if control::forward(data, &request).await?.is_some() {
        return Ok(());
    }
    let identity = load_identity(data)?;
    let store = trust_store(data, identity.device_id)?;
    ops::untrust(&store, peer, &Terminal::default())
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

/// `lsync index`: inside the running engine if one holds the library,
/// else in an engine started for the run.
pub async fn index(data: &Path, path: &Path, json: bool) -> anyhow::Result<()> {
    let engine = match control::route(data, &Request::index(path, json)?).await? {
        Route::Forwarded => return Ok(()),
        Route::Local(engine) => engine,
    };
    let result = ops::index(&engine, path, json, &Terminal::default()).await;
    engine.shutdown().await?;
    result
}

/// `lsync status`: the running engine's view (owners and peers) if one
/// holds the library, else the library file's.
pub async fn status(data: &Path, json: bool) -> anyhow::Result<()> {
    if control::forward(data, &Request::Status { json })
        .await?
        .is_some()
    {
        return Ok(());
    }
    let (store, device) = open_store(data).await?;
    let owners = store.summaries().await?;
    let digests = store.owner_digests().await?;
    let view = ops::StatusView {
        device: device.device_id,
        name: &device.name,
        owners: &owners,
        digests: &digests,
        peers: None,
        held_by: sync_storage::DirLock::holder(data),
    };
    ops::print_status(&view, json, &Terminal::default());
    Ok(())
}
