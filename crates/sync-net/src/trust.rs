//! `TrustStore`: the pinned certificate fingerprints of trusted peers, each
//! bound to exactly one DeviceId, persisted as JSON in `trust.json`.
//!
//! The rules: a device id is pinned to at most one certificate, a
//! certificate to at most one id, never to this device's own id, and a pin
//! is never replaced in place (remove it first). Every change is a
//! read-modify-write of the file under an advisory lock (`flock` on
//! `trust.json.lock` beside it), written to a unique temporary file in the
//! same directory, fsynced, renamed over the old one, and the directory
//! fsynced: processes sharing the file (`lsync trust` beside `lsync serve`)
//! never lose each other's changes, and a crash leaves the old file or the
//! new one. A running process sees changes made elsewhere through
//! [`TrustStore::refresh`] (the engine calls it every second, and the TLS
//! verifier at every handshake) and [`TrustStore::subscribe`].

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use sync_core::DeviceId;
use tokio::sync::watch;

use crate::error::NetError;
use crate::fingerprint::CertFingerprint;
use crate::identity::{create_private_dir, sync_dir};

/// The file format version (format 1 also allowed pins without a device id;
/// those are refused now, see [`NetError::UnboundPin`]).
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct TrustFile {
    version: u32,
    peers: Vec<TrustEntry>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
struct TrustEntry {
    fingerprint: CertFingerprint,
    /// `None` only in files written by older versions.
    #[serde(default)]
    device: Option<DeviceId>,
}

/// What identifies one version of the file: a rename gives a new inode, so
/// a change is seen even within the mtime's granularity.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The file's version: `None` when it does not exist.
type FileState = Option<Stamp>;

#[derive(Debug)]
struct State {
    pins: HashMap<CertFingerprint, DeviceId>,
    /// The file version `pins` was read from (or written as).
    seen: FileState,
    /// A file version that could not be used (warned about once).
    bad: Option<FileState>,
    /// Bumped whenever `pins` changes.
    generation: u64,
}

#[derive(Debug)]
struct Shared {
    path: Option<PathBuf>,
    me: DeviceId,
    state: RwLock<State>,
    changes: watch::Sender<u64>,
}

/// The set of trusted peers: certificate fingerprint ↔ DeviceId, one to one.
/// Cheap to clone; clones share the same state, so pins made through one
/// are seen by listeners and dialers holding another.
#[derive(Clone, Debug)]
pub struct TrustStore {
    shared: Arc<Shared>,
}

impl TrustStore {
    /// Loads the store kept in `path` for device `me` (empty if the file is
    /// absent); changes are written back to `path`. A file that pins `me`,
    /// pins one id or one certificate twice, or holds a pin without a
    /// device id is refused with a message saying how to fix it.
    pub fn load(path: &Path, me: DeviceId) -> Result<TrustStore, NetError> {
        let (entries, seen) = read_file(path)?;
        let pins = validate(&entries, me, path)?;
        Ok(TrustStore::new(Some(path.to_path_buf()), me, pins, seen))
    }

    /// Like [`TrustStore::load`], but a file that breaks the rules is
    /// loaded with its valid pins only, and what is wrong with the others
    /// is returned beside the store: for tools that repair a file `load`
    /// refuses (`lsync trust` and `lsync untrust` can replace or remove the
    /// pins it names). Only an unreadable or unparseable file is an error.
    pub fn load_lenient(
        path: &Path,
        me: DeviceId,
    ) -> Result<(TrustStore, Vec<NetError>), NetError> {
        let (entries, seen) = read_file(path)?;
        let (pins, problems) = lenient(&entries, me, path);
        Ok((
            TrustStore::new(Some(path.to_path_buf()), me, pins, seen),
            problems,
        ))
    }

    /// The problems [`TrustStore::load`] would refuse the file for now
    /// (empty for an in-memory store).
    pub fn problems(&self) -> Result<Vec<NetError>, NetError> {
        let Some(path) = &self.shared.path else {
            return Ok(Vec::new());
        };
        let (entries, _) = read_file(path)?;
        Ok(lenient(&entries, self.shared.me, path).1)
    }

    /// An empty store for device `me` that is never persisted (tests,
    /// in-memory setups).
    pub fn in_memory(me: DeviceId) -> TrustStore {
        TrustStore::new(None, me, HashMap::new(), None)
    }

    fn new(
        path: Option<PathBuf>,
        me: DeviceId,
        pins: HashMap<CertFingerprint, DeviceId>,
        seen: FileState,
    ) -> TrustStore {
        let (changes, _) = watch::channel(0);
        TrustStore {
            shared: Arc::new(Shared {
                path,
                me,
                state: RwLock::new(State {
                    pins,
                    seen,
                    bad: None,
                    generation: 0,
                }),
                changes,
            }),
        }
    }

    /// The device this store belongs to (never pinned).
    pub fn me(&self) -> DeviceId {
        self.shared.me
    }

    /// The file the store is kept in (`None`: in memory only).
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// Pins `fp` as device `device` and persists the store. `Ok(true)`:
    /// pinned now; `Ok(false)`: this exact pin was already there. Refused:
    /// our own id ([`NetError::OwnDevice`]), an id pinned to another
    /// certificate ([`NetError::DeviceAlreadyPinned`]), a certificate
    /// pinned to another id ([`NetError::FingerprintAlreadyPinned`]); remove
    /// the old pin first ([`TrustStore::untrust`]). A pin without a device
    /// id left by an older version is replaced.
    pub fn trust(&self, fp: CertFingerprint, device: DeviceId) -> Result<bool, NetError> {
        if device == self.shared.me {
            return Err(NetError::OwnDevice { device });
        }
        self.mutate(|entries| {
            if let Some(other) = entries
                .iter()
                .find(|e| e.device == Some(device) && e.fingerprint != fp)
            {
                return Err(NetError::DeviceAlreadyPinned {
                    device,
                    fingerprint: other.fingerprint,
                });
            }
            match entries.iter_mut().find(|e| e.fingerprint == fp) {
                Some(e) => match e.device {
                    Some(d) if d == device => Ok(false),
                    Some(d) => Err(NetError::FingerprintAlreadyPinned {
                        fingerprint: fp,
                        device: d,
                    }),
                    None => {
                        e.device = Some(device);
                        Ok(true)
                    }
                },
                None => {
                    entries.push(TrustEntry {
                        fingerprint: fp,
                        device: Some(device),
                    });
                    Ok(true)
                }
            }
        })
    }

    /// Removes the pin of certificate `fp` (future handshakes with it are
    /// refused; a running engine closes its sessions) and persists the
    /// store. Returns whether it was pinned.
    pub fn untrust(&self, fp: &CertFingerprint) -> Result<bool, NetError> {
        self.mutate(|entries| {
            let before = entries.len();
            entries.retain(|e| e.fingerprint != *fp);
            Ok(entries.len() != before)
        })
    }

    /// Removes the pin of device `device`; returns the certificate it was
    /// pinned to, if it was.
    pub fn untrust_device(&self, device: DeviceId) -> Result<Option<CertFingerprint>, NetError> {
        self.mutate(|entries| {
            let found = entries
                .iter()
                .find(|e| e.device == Some(device))
                .map(|e| e.fingerprint);
            entries.retain(|e| e.device != Some(device));
            Ok(found)
        })
    }

    /// The device `fp` is pinned to, if it is trusted.
    pub fn lookup(&self, fp: &CertFingerprint) -> Option<DeviceId> {
        self.read().pins.get(fp).copied()
    }

    /// The certificate pinned for `device`, if it is trusted.
    pub fn fingerprint_of(&self, device: DeviceId) -> Option<CertFingerprint> {
        self.read()
            .pins
            .iter()
            .find(|(_, d)| **d == device)
            .map(|(fp, _)| *fp)
    }

    /// Every pin, sorted by fingerprint.
    pub fn entries(&self) -> Vec<(CertFingerprint, DeviceId)> {
        let mut all: Vec<_> = self.read().pins.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_by_key(|(fp, _)| *fp);
        all
    }

    /// A receiver whose value changes whenever the pins change (through any
    /// handle, or after [`TrustStore::refresh`] read another process's
    /// change).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Re-reads the file if it changed since it was last read or written
    /// (one `stat` otherwise); returns whether the pins changed. A file
    /// that cannot be parsed keeps the pins in force (a warning is logged
    /// once per version of the file); one that parses but breaks the rules
    /// keeps only its valid pins, so a removal always takes effect.
    pub fn refresh(&self) -> Result<bool, NetError> {
        let Some(path) = &self.shared.path else {
            return Ok(false);
        };
        let now = stamp_of(path)?;
        {
            let st = self.read();
            if st.seen == now || st.bad == Some(now) {
                return Ok(false);
            }
        }
        match read_file(path) {
            Ok((entries, seen)) => {
                let (pins, problems) = lenient(&entries, self.shared.me, path);
                for p in &problems {
                    tracing::warn!(path = %path.display(), "ignoring pin: {p}");
                }
                Ok(self.install(pins, seen))
            }
            Err(e) => {
                let mut st = self.write();
                if st.bad != Some(now) {
                    tracing::warn!(path = %path.display(), cause = %e, "cannot reload the trust store; the pins in force are kept");
                    st.bad = Some(now);
                }
                Ok(false)
            }
        }
    }

    /// Replaces the pins with `pins`, read from file version `seen`;
    /// notifies subscribers if they changed.
    fn install(&self, pins: HashMap<CertFingerprint, DeviceId>, seen: FileState) -> bool {
        let mut st = self.write();
        st.seen = seen;
        st.bad = None;
        if st.pins == pins {
            return false;
        }
        st.pins = pins;
        st.generation += 1;
        let generation = st.generation;
        drop(st);
        self.shared.changes.send_replace(generation);
        true
    }

    /// Applies `change` to the pins: in memory, or as a read-modify-write
    /// of the file under its lock.
    fn mutate<T>(
        &self,
        change: impl FnOnce(&mut Vec<TrustEntry>) -> Result<T, NetError>,
    ) -> Result<T, NetError> {
        let me = self.shared.me;
        let Some(path) = &self.shared.path else {
            let mut st = self.write();
            let mut entries = to_entries(&st.pins);
            let out = change(&mut entries)?;
            let pins = validate(&entries, me, Path::new("(memory)"))?;
            if pins != st.pins {
                st.pins = pins;
                st.generation += 1;
                let generation = st.generation;
                drop(st);
                self.shared.changes.send_replace(generation);
            }
            return Ok(out);
        };
        let _lock = FileLock::acquire(path)?;
        let (mut entries, seen) = read_file(path)?;
        let before = entries.clone();
        let out = change(&mut entries)?;
        let seen = if entries != before {
            write_file(path, &entries)?;
            stamp_of(path)?
        } else {
            seen
        };
        let (pins, _) = lenient(&entries, me, path);
        self.install(pins, seen);
        Ok(out)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.shared.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.shared.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn trust_err(path: &Path, what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Trust(format!("{what} {}: {e}", path.display()))
}

fn to_entries(pins: &HashMap<CertFingerprint, DeviceId>) -> Vec<TrustEntry> {
    pins.iter()
        .map(|(fp, d)| TrustEntry {
            fingerprint: *fp,
            device: Some(*d),
        })
        .collect()
}

fn stamp(m: &fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }
}

fn stamp_of(path: &Path) -> Result<FileState, NetError> {
    // The entry itself, never what a symlink there points to.
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(stamp(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(trust_err(path, "stat", e)),
    }
}

/// The largest trust store read, in bytes (a real one with thousands of
/// pins is well under a megabyte).
const MAX_TRUST_FILE: u64 = 16 * 1024 * 1024;

/// Reads the file's entries as they are (nothing checked but the syntax
/// and the version) and the version read; absent: no entries. The file is
/// opened with `O_NOFOLLOW | O_NONBLOCK` and must be a regular file of at
/// most [`MAX_TRUST_FILE`] bytes: a symlink is refused, not followed, and a
/// FIFO or a device is refused without blocking or reading without end.
fn read_file(path: &Path) -> Result<(Vec<TrustEntry>, FileState), NetError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(NetError::Trust(format!(
                "{} is a symbolic link: the trust store is never read through one; \
                 replace it with the file itself",
                path.display()
            )));
        }
        Err(e) => return Err(trust_err(path, "read", e)),
    };
    let meta = file.metadata().map_err(|e| trust_err(path, "stat", e))?;
    if !meta.is_file() {
        return Err(NetError::Trust(format!(
            "{} is not a regular file (a FIFO, a device or a directory): \
             the trust store must be a plain file; remove it",
            path.display()
        )));
    }
    if meta.len() > MAX_TRUST_FILE {
        return Err(NetError::TrustFileTooLarge {
            path: path.display().to_string(),
            len: meta.len(),
            max: MAX_TRUST_FILE,
        });
    }
    let seen = Some(stamp(&meta));
    let mut bytes = Vec::new();
    // Bounded even if the file grows while it is read.
    file.take(MAX_TRUST_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| trust_err(path, "read", e))?;
    if bytes.len() as u64 > MAX_TRUST_FILE {
        return Err(NetError::TrustFileTooLarge {
            path: path.display().to_string(),
            len: bytes.len() as u64,
            max: MAX_TRUST_FILE,
        });
    }
    let file: TrustFile =
        serde_json::from_slice(&bytes).map_err(|e| trust_err(path, "parse", e))?;
    if file.version != FORMAT_VERSION {
        return Err(NetError::Trust(format!(
            "{}: unknown format version {} (this lsync reads version {FORMAT_VERSION})",
            path.display(),
            file.version
        )));
    }
    Ok((file.peers, seen))
}

/// Checks every rule; the first broken one is the error.
fn validate(
    entries: &[TrustEntry],
    me: DeviceId,
    path: &Path,
) -> Result<HashMap<CertFingerprint, DeviceId>, NetError> {
    let (pins, mut problems) = lenient(entries, me, path);
    if problems.is_empty() {
        Ok(pins)
    } else {
        Err(problems.remove(0))
    }
}

/// The pins that break no rule, and what is wrong with the others: a pin
/// without a device, of our own id, or of an id or a certificate that
/// appears twice is left out (every copy of it: which one is right cannot
/// be told).
fn lenient(
    entries: &[TrustEntry],
    me: DeviceId,
    path: &Path,
) -> (HashMap<CertFingerprint, DeviceId>, Vec<NetError>) {
    let mut problems = Vec::new();
    let mut fp_count: HashMap<CertFingerprint, usize> = HashMap::new();
    let mut dev_count: HashMap<DeviceId, usize> = HashMap::new();
    for e in entries {
        *fp_count.entry(e.fingerprint).or_default() += 1;
        if let Some(d) = e.device {
            *dev_count.entry(d).or_default() += 1;
        }
    }
    let mut pins = HashMap::new();
    let mut reported: HashSet<CertFingerprint> = HashSet::new();
    for e in entries {
        let Some(device) = e.device else {
            problems.push(NetError::UnboundPin {
                path: path.display().to_string(),
                fingerprint: e.fingerprint,
            });
            continue;
        };
        if device == me {
            problems.push(NetError::Trust(format!(
                "{}: certificate {} is pinned to this device's own id {me}; remove it: `lsync untrust {}`",
                path.display(),
                e.fingerprint,
                e.fingerprint
            )));
            continue;
        }
        if fp_count[&e.fingerprint] > 1 {
            if reported.insert(e.fingerprint) {
                problems.push(NetError::Trust(format!(
                    "{}: certificate {} is pinned more than once; remove it and pin it again: `lsync untrust {}`",
                    path.display(),
                    e.fingerprint,
                    e.fingerprint
                )));
            }
            continue;
        }
        if dev_count[&device] > 1 {
            problems.push(NetError::Trust(format!(
                "{}: device {device} is pinned to more than one certificate ({} among them); \
                 remove the wrong one: `lsync untrust <fingerprint>`",
                path.display(),
                e.fingerprint
            )));
            continue;
        }
        pins.insert(e.fingerprint, device);
    }
    (pins, problems)
}

/// Writes the entries: a unique temp file (O_EXCL, mode 0600) in the same
/// directory, fsync, rename over `path`, fsync of the directory.
fn write_file(path: &Path, entries: &[TrustEntry]) -> Result<(), NetError> {
    let mut peers = entries.to_vec();
    peers.sort_by_key(|e| e.fingerprint);
    let mut json = serde_json::to_vec_pretty(&TrustFile {
        version: FORMAT_VERSION,
        peers,
    })
    .map_err(|e| NetError::Trust(format!("serialize: {e}")))?;
    json.push(b'\n');
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".trust.json.")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| trust_err(&dir, "create a temporary file in", e))?;
    tmp.write_all(&json)
        .map_err(|e| trust_err(tmp.path(), "write", e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| trust_err(tmp.path(), "sync", e))?;
    tmp.persist(path)
        .map_err(|e| trust_err(path, "rename into", e.error))?;
    sync_dir(&dir).map_err(|e| match e {
        NetError::Identity(m) => NetError::Trust(m),
        other => other,
    })
}

/// The directory holding `path` (created, private, if it is missing).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// An exclusive `flock` on `<file>.lock`, held until dropped.
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock, NetError> {
        let dir = parent_dir(path);
        if !dir.exists() {
            create_private_dir(&dir).map_err(|e| match e {
                NetError::Identity(m) => NetError::Trust(m),
                other => other,
            })?;
        }
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".lock");
        let lock_path = path.with_file_name(name);
        let mut opts = fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600).custom_flags(libc::O_NOFOLLOW);
        }
        let file = opts.open(&lock_path).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                lock_in_the_way(&lock_path, "a symlink")
            } else {
                trust_err(&lock_path, "open", e)
            }
        })?;
        if !file
            .metadata()
            .map_err(|e| trust_err(&lock_path, "stat", e))?
            .is_file()
        {
            return Err(lock_in_the_way(&lock_path, "not a regular file"));
        }
        file.lock().map_err(|e| trust_err(&lock_path, "lock", e))?;
        Ok(FileLock { _file: file })
    }
}

/// The error for a lock file that cannot be used as one: it says what is
/// there and how to fix it (nothing is kept in a lock file).
fn lock_in_the_way(lock_path: &Path, what: &str) -> NetError {
    NetError::Trust(format!(
        "{} is {what}, and the trust store's lock file is never followed or used through one: \
         remove it (`rm {}`; it holds nothing) and try again",
        lock_path.display(),
        lock_path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(tag: &str) -> CertFingerprint {
        CertFingerprint::of_der(tag.as_bytes())
    }

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/trust.json");
        let me = DeviceId::new_v7();
        let store = TrustStore::load(&path, me).unwrap();
        assert!(store.entries().is_empty());
        let (a, b) = (fp("a"), fp("b"));
        let (da, db) = (DeviceId::new_v7(), DeviceId::new_v7());
        assert!(store.trust(a, da).unwrap());
        assert!(store.trust(b, db).unwrap());
        assert!(
            !store.trust(a, da).unwrap(),
            "the same pin again is a no-op"
        );
        assert_eq!(store.lookup(&a), Some(da));
        assert_eq!(store.fingerprint_of(db), Some(b));
        assert_eq!(store.lookup(&fp("c")), None);

        let again = TrustStore::load(&path, me).unwrap();
        assert_eq!(again.entries(), store.entries());

        assert!(store.untrust(&a).unwrap());
        assert!(!store.untrust(&a).unwrap());
        assert_eq!(store.untrust_device(db).unwrap(), Some(b));
        assert!(TrustStore::load(&path, me).unwrap().entries().is_empty());
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        std::fs::write(&path, b"{not json").unwrap();
        let me = DeviceId::new_v7();
        assert!(matches!(
            TrustStore::load(&path, me),
            Err(NetError::Trust(_))
        ));
    }

    #[test]
    fn binding_to_our_own_device_id_is_refused() {
        let me = DeviceId::new_v7();
        for store in [
            TrustStore::in_memory(me),
            TrustStore::load(&tempfile::tempdir().unwrap().path().join("t.json"), me).unwrap(),
        ] {
            let err = store.trust(fp("peer"), me).unwrap_err();
            assert!(
                matches!(err, NetError::OwnDevice { device } if device == me),
                "{err}"
            );
            assert!(err.to_string().contains("this device"), "{err}");
            assert!(store.entries().is_empty());
        }
        // A file that pins our own id (written by hand, or by an older
        // version) is refused at load, and its pin is never used.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let other = TrustStore::load(&path, DeviceId::new_v7()).unwrap();
        other.trust(fp("x"), me).unwrap();
        let err = TrustStore::load(&path, me).unwrap_err();
        assert!(err.to_string().contains("own id"), "{err}");
        assert!(err.to_string().contains("lsync untrust"), "{err}");
    }

    #[test]
    fn binding_a_device_already_bound_to_another_fingerprint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = TrustStore::load(&dir.path().join("trust.json"), DeviceId::new_v7()).unwrap();
        let victim = DeviceId::new_v7();
        store.trust(fp("victim"), victim).unwrap();
        // An attacker who learned the victim's id (it is in the victim's
        // certificate) cannot get its own certificate pinned as the victim.
        let err = store.trust(fp("attacker"), victim).unwrap_err();
        match &err {
            NetError::DeviceAlreadyPinned {
                device,
                fingerprint,
            } => {
                assert_eq!(*device, victim);
                assert_eq!(*fingerprint, fp("victim"));
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("lsync untrust"), "{err}");
        assert_eq!(store.lookup(&fp("attacker")), None);
        assert_eq!(store.lookup(&fp("victim")), Some(victim));
        // After an explicit untrust, the id can be pinned to a new certificate.
        store.untrust_device(victim).unwrap();
        assert!(store.trust(fp("new key"), victim).unwrap());
    }

    #[test]
    fn re_trust_cannot_rebind_a_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let store = TrustStore::load(&path, me).unwrap();
        let (first, second) = (DeviceId::new_v7(), DeviceId::new_v7());
        store.trust(fp("peer"), first).unwrap();
        let err = store.trust(fp("peer"), second).unwrap_err();
        assert!(
            matches!(err, NetError::FingerprintAlreadyPinned { device, .. } if device == first),
            "{err:?}"
        );
        assert_eq!(
            TrustStore::load(&path, me).unwrap().lookup(&fp("peer")),
            Some(first)
        );
        store.untrust(&fp("peer")).unwrap();
        assert!(store.trust(fp("peer"), second).unwrap());
    }

    #[test]
    fn legacy_unbound_pins_are_refused_with_a_clear_message_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let kept = DeviceId::new_v7();
        std::fs::write(
            &path,
            format!(
                r#"{{"version":1,"peers":[{{"fingerprint":"{}","device":null}},{{"fingerprint":"{}","device":"{kept}"}}]}}"#,
                fp("legacy"),
                fp("kept")
            ),
        )
        .unwrap();
        let err = TrustStore::load(&path, me).unwrap_err();
        assert!(
            matches!(err, NetError::UnboundPin { fingerprint, .. } if fingerprint == fp("legacy"))
        );
        let text = err.to_string();
        assert!(
            text.contains("--device") && text.contains("lsync untrust"),
            "{text}"
        );
        // The fixes the message names work on the refused file: a handle
        // made for the CLI (the file's rules are checked per change).
        let (cli, problems) = TrustStore::load_lenient(&path, me).unwrap();
        assert_eq!(problems.len(), 1);
        assert_eq!(cli.lookup(&fp("legacy")), None, "never used unbound");
        assert_eq!(cli.lookup(&fp("kept")), Some(kept));
        let legacy_device = DeviceId::new_v7();
        assert!(cli.trust(fp("legacy"), legacy_device).unwrap());
        assert!(cli.problems().unwrap().is_empty());
        let store = TrustStore::load(&path, me).unwrap();
        assert_eq!(store.lookup(&fp("legacy")), Some(legacy_device));
        assert_eq!(store.lookup(&fp("kept")), Some(kept));
    }

    #[test]
    fn concurrent_trust_from_two_handles_keeps_both_pins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let handles: Vec<_> = (0..2)
            .map(|h| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // Each thread its own handle, as two processes would.
                    let store = TrustStore::load(&path, me).unwrap();
                    for i in 0..25 {
                        store
                            .trust(fp(&format!("{h}-{i}")), DeviceId::new_v7())
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let all = TrustStore::load(&path, me).unwrap().entries();
        assert_eq!(all.len(), 50, "pins were lost");
        // No temporary file is left behind; the lock file stays.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["trust.json", "trust.json.lock"], "{names:?}");
    }

    #[test]
    fn a_change_through_one_handle_does_not_bring_back_a_pin_removed_through_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let engine = TrustStore::load(&path, me).unwrap();
        let cli = TrustStore::load(&path, me).unwrap();
        engine.trust(fp("a"), DeviceId::new_v7()).unwrap();
        cli.trust(fp("b"), DeviceId::new_v7()).unwrap();
        cli.untrust(&fp("a")).unwrap();
        // The engine's handle still caches `a`; its next change must not
        // write it back.
        engine.trust(fp("c"), DeviceId::new_v7()).unwrap();
        let on_disk = TrustStore::load(&path, me).unwrap();
        assert_eq!(on_disk.lookup(&fp("a")), None);
        assert!(on_disk.lookup(&fp("b")).is_some());
        assert!(on_disk.lookup(&fp("c")).is_some());
        assert_eq!(
            engine.lookup(&fp("a")),
            None,
            "the change refreshed the cache"
        );
    }

    #[test]
    fn refresh_sees_another_handles_changes_and_notifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let engine = TrustStore::load(&path, me).unwrap();
        let mut changes = engine.subscribe();
        assert!(!engine.refresh().unwrap());
        let cli = TrustStore::load(&path, me).unwrap();
        let peer = DeviceId::new_v7();
        cli.trust(fp("p"), peer).unwrap();
        assert_eq!(engine.lookup(&fp("p")), None);
        assert!(engine.refresh().unwrap());
        assert_eq!(engine.lookup(&fp("p")), Some(peer));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(!engine.refresh().unwrap(), "nothing changed since");
        cli.untrust(&fp("p")).unwrap();
        assert!(engine.refresh().unwrap());
        assert_eq!(engine.lookup(&fp("p")), None);
        assert!(changes.has_changed().unwrap());

        // A file broken by hand keeps the pins in force...
        cli.trust(fp("q"), peer).unwrap();
        engine.refresh().unwrap();
        std::fs::write(&path, b"{oops").unwrap();
        assert!(!engine.refresh().unwrap());
        assert_eq!(engine.lookup(&fp("q")), Some(peer));
        // ...and one that parses drops every pin that breaks a rule.
        std::fs::write(
            &path,
            format!(
                r#"{{"version":1,"peers":[{{"fingerprint":"{}","device":null}}]}}"#,
                fp("q")
            ),
        )
        .unwrap();
        assert!(engine.refresh().unwrap());
        assert_eq!(engine.lookup(&fp("q")), None);
        // A deleted file is an empty store.
        cli.trust(fp("r"), DeviceId::new_v7()).unwrap();
        engine.refresh().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(engine.refresh().unwrap());
        assert!(engine.entries().is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn trust_json_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let store = TrustStore::load(&path, DeviceId::new_v7()).unwrap();
        store.trust(fp("a"), DeviceId::new_v7()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("trust.json.lock")), 0o600);
        // Still 0600 after a rewrite of a file someone made world-readable.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        store.trust(fp("b"), DeviceId::new_v7()).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    /// F2: a symlink at trust.json is refused, not followed.
    #[test]
    fn f2_a_symlinked_trust_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("elsewhere.json");
        let store = TrustStore::load(&real, DeviceId::new_v7()).unwrap();
        store.trust(fp("a"), DeviceId::new_v7()).unwrap();
        let path = dir.path().join("trust.json");
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let e = TrustStore::load(&path, DeviceId::new_v7()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("symbolic link"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(TrustStore::load_lenient(&path, DeviceId::new_v7()).is_err());
    }

    /// F2: a FIFO at trust.json is refused at once, by `load` and by
    /// `refresh` (the TLS verifier's), instead of blocking forever.
    #[test]
    fn f2_a_fifo_at_trust_json_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let me = DeviceId::new_v7();
        let store = TrustStore::load(&path, me).unwrap();
        store.trust(fp("a"), DeviceId::new_v7()).unwrap();
        std::fs::remove_file(&path).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let (p, s) = (path.clone(), store.clone());
        std::thread::spawn(move || {
            let loaded = TrustStore::load(&p, me)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let refreshed = s.refresh().map_err(|e| e.to_string());
            let _ = tx.send((loaded, refreshed));
        });
        let (loaded, refreshed) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO at trust.json blocked");
        let text = loaded.unwrap_err();
        assert!(text.contains("not a regular file"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        // The refresh keeps the pins in force.
        assert_eq!(refreshed, Ok(false));
        assert_eq!(store.entries().len(), 1);
    }

    /// F2: a file larger than any trust store is refused unread, with a
    /// typed error naming it.
    #[test]
    fn f2_an_oversized_trust_json_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(MAX_TRUST_FILE + 1).unwrap();
        let e = TrustStore::load(&path, DeviceId::new_v7()).unwrap_err();
        assert!(
            matches!(&e, NetError::TrustFileTooLarge { path: p, len, max }
                if *p == path.display().to_string() && *len == MAX_TRUST_FILE + 1 && *max == MAX_TRUST_FILE),
            "{e:?}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    /// F3: a dangling symlink at trust.json.lock made `untrust` fail with a
    /// bare ELOOP, so a compromised peer could not be removed; the error
    /// now says what is there and how to fix it.
    #[test]
    fn f3_a_symlinked_lock_file_is_reported_with_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        let store = TrustStore::load(&path, DeviceId::new_v7()).unwrap();
        store.trust(fp("bad"), DeviceId::new_v7()).unwrap();
        let lock = dir.path().join("trust.json.lock");
        std::fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &lock).unwrap();
        let e = store.untrust(&fp("bad")).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, NetError::Trust(_)), "{e:?}");
        assert!(text.contains("is a symlink"), "{text}");
        assert!(text.contains(&format!("rm {}", lock.display())), "{text}");
        assert!(
            !dir.path().join("nowhere").exists(),
            "the link was followed"
        );
        // Following the advice works.
        std::fs::remove_file(&lock).unwrap();
        assert!(store.untrust(&fp("bad")).unwrap());
        assert!(store.entries().is_empty());
        // A lock path that is not a regular file is reported the same way.
        std::fs::remove_file(&lock).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(&lock)
            .status()
            .unwrap();
        assert!(status.success());
        let text = store
            .trust(fp("x"), DeviceId::new_v7())
            .unwrap_err()
            .to_string();
        assert!(text.contains("remove it"), "{text}");
    }
}
