//! `TrustStore`: the pinned certificate fingerprints of trusted peers,
//! each bound to a DeviceId (or to be bound at the first handshake),
//! persisted as JSON.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use sync_core::DeviceId;

use crate::error::NetError;
use crate::fingerprint::CertFingerprint;
use crate::identity::write_atomic;

/// The file format version.
const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct TrustFile {
    version: u32,
    peers: Vec<TrustEntry>,
}

#[derive(Serialize, Deserialize)]
struct TrustEntry {
    fingerprint: CertFingerprint,
    device: Option<DeviceId>,
}

#[derive(Debug, Default)]
struct Inner {
    path: Option<PathBuf>,
    peers: HashMap<CertFingerprint, Option<DeviceId>>,
}

/// The set of trusted peers: certificate fingerprint → DeviceId (`None`:
/// learn the DeviceId at the first handshake, then bind and persist it).
/// Cheap to clone; clones share the same state, so pins made through one
/// are seen by listeners and dialers holding another.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    inner: Arc<RwLock<Inner>>,
}

/// Outcome of binding a DeviceId to a fingerprint at first handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Bind {
    /// The fingerprint is not (or no longer) trusted.
    Untrusted,
    /// The fingerprint is bound to this DeviceId (now or before).
    Bound(DeviceId),
}

impl TrustStore {
    /// Loads the store kept in `path`; empty if the file is absent. Changes
    /// are written back to `path`.
    pub fn load(path: &Path) -> Result<TrustStore, NetError> {
        let peers = match std::fs::read(path) {
            Ok(bytes) => {
                let file: TrustFile = serde_json::from_slice(&bytes)
                    .map_err(|e| NetError::Trust(format!("parse {}: {e}", path.display())))?;
                if file.version != FORMAT_VERSION {
                    return Err(NetError::Trust(format!(
                        "{}: unknown format version {}",
                        path.display(),
                        file.version
                    )));
                }
                file.peers
                    .into_iter()
                    .map(|e| (e.fingerprint, e.device))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(NetError::Trust(format!("read {}: {e}", path.display()))),
        };
        Ok(TrustStore {
            inner: Arc::new(RwLock::new(Inner {
                path: Some(path.to_path_buf()),
                peers,
            })),
        })
    }

    /// An empty store that is never persisted (tests, in-memory setups).
    pub fn in_memory() -> TrustStore {
        TrustStore::default()
    }

    /// Pins `fp`, bound to `device` (`None`: bind at the first handshake),
    /// replacing any previous binding, and persists the store.
    pub fn trust(&self, fp: CertFingerprint, device: Option<DeviceId>) -> Result<(), NetError> {
        let mut inner = self.write();
        inner.peers.insert(fp, device);
        inner.persist()
    }

    /// Removes the pin of `fp` (future handshakes with it are refused) and
    /// persists the store. Returns whether it was pinned.
    pub fn untrust(&self, fp: &CertFingerprint) -> Result<bool, NetError> {
        let mut inner = self.write();
        let was = inner.peers.remove(fp).is_some();
        if was {
            inner.persist()?;
        }
        Ok(was)
    }

    /// `None`: `fp` is not trusted. `Some(None)`: trusted, DeviceId not yet
    /// learned. `Some(Some(d))`: trusted as device `d`.
    pub fn lookup(&self, fp: &CertFingerprint) -> Option<Option<DeviceId>> {
        self.read().peers.get(fp).copied()
    }

    /// Every pin, sorted by fingerprint.
    pub fn entries(&self) -> Vec<(CertFingerprint, Option<DeviceId>)> {
        let mut all: Vec<_> = self.read().peers.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_by_key(|(fp, _)| *fp);
        all
    }

    /// Binds `device` to `fp` if it is trusted and not yet bound (then
    /// persists); returns the binding in force.
    pub(crate) fn bind_if_unbound(
        &self,
        fp: &CertFingerprint,
        device: DeviceId,
    ) -> Result<Bind, NetError> {
        let mut inner = self.write();
        match inner.peers.get(fp).copied() {
            None => Ok(Bind::Untrusted),
            Some(Some(bound)) => Ok(Bind::Bound(bound)),
            Some(None) => {
                inner.peers.insert(*fp, Some(device));
                if let Err(e) = inner.persist() {
                    inner.peers.insert(*fp, None);
                    return Err(e);
                }
                tracing::info!(fingerprint = %fp.short(), device = %device, "bound device to pinned certificate");
                Ok(Bind::Bound(device))
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn persist(&self) -> Result<(), NetError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut peers: Vec<TrustEntry> = self
            .peers
            .iter()
            .map(|(fp, dev)| TrustEntry {
                fingerprint: *fp,
                device: *dev,
            })
            .collect();
        peers.sort_by_key(|e| e.fingerprint);
        let json = serde_json::to_vec_pretty(&TrustFile {
            version: FORMAT_VERSION,
            peers,
        })
        .map_err(|e| NetError::Trust(format!("serialize: {e}")))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| NetError::Trust(format!("create {}: {e}", dir.display())))?;
        }
        write_atomic(path, &json, false).map_err(|e| match e {
            NetError::Identity(m) => NetError::Trust(m),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/trust.json");
        let store = TrustStore::load(&path).unwrap();
        assert!(store.entries().is_empty());
        let a = CertFingerprint::of_der(b"a");
        let b = CertFingerprint::of_der(b"b");
        let dev = DeviceId::new_v7();
        store.trust(a, Some(dev)).unwrap();
        store.trust(b, None).unwrap();
        assert_eq!(store.lookup(&a), Some(Some(dev)));
        assert_eq!(store.lookup(&b), Some(None));
        assert_eq!(store.lookup(&CertFingerprint::of_der(b"c")), None);

        let again = TrustStore::load(&path).unwrap();
        assert_eq!(again.entries(), store.entries());

        let dev2 = DeviceId::new_v7();
        assert_eq!(store.bind_if_unbound(&b, dev2).unwrap(), Bind::Bound(dev2));
        assert_eq!(store.bind_if_unbound(&b, dev).unwrap(), Bind::Bound(dev2));
        assert_eq!(
            TrustStore::load(&path).unwrap().lookup(&b),
            Some(Some(dev2))
        );

        assert!(store.untrust(&a).unwrap());
        assert_eq!(TrustStore::load(&path).unwrap().lookup(&a), None);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(TrustStore::load(&path), Err(NetError::Trust(_))));
    }
}
