//! `Identity`: a device's key and self-signed certificate, kept in its data directory.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sync_core::DeviceId;

use crate::error::NetError;
use crate::fingerprint::CertFingerprint;

/// File holding the PEM certificate.
pub const CERT_FILE: &str = "device.crt";
/// File holding the PEM (PKCS#8) private key, mode 0600.
pub const KEY_FILE: &str = "device.key";
/// File holding the device id (one UUID line).
pub const DEVICE_ID_FILE: &str = "device.id";

/// Name in the certificate's subject alternative names (never checked: peers are pinned).
const SAN: &str = "lsync-device";

/// A device's identity: its DeviceId and the certificate (plus key) that
/// proves it in TLS.
#[derive(Clone)]
pub struct Identity {
    /// The device this identity belongs to.
    pub device_id: DeviceId,
    /// SHA-256 of the certificate: what peers pin.
    pub fingerprint: CertFingerprint,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn err(path: &Path, what: &str, e: impl fmt::Display) -> NetError {
    NetError::Identity(format!("{what} {}: {e}", path.display()))
}

impl Identity {
    /// A fresh ECDSA P-256 key and self-signed certificate, in memory only
    /// (tests, in-memory transports). The certificate's subject CN carries
    /// the device id.
    pub fn generate(device_id: DeviceId) -> Result<Identity, NetError> {
        let key = rcgen::KeyPair::generate()
            .map_err(|e| NetError::Identity(format!("generate key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(vec![SAN.to_string()])
            .map_err(|e| NetError::Identity(format!("certificate params: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("lsync {device_id}"));
        let cert = params
            .self_signed(&key)
            .map_err(|e| NetError::Identity(format!("self-sign certificate: {e}")))?;
        let cert_der = cert.der().to_vec();
        Ok(Identity {
            device_id,
            fingerprint: CertFingerprint::of_der(&cert_der),
            cert_der,
            key_der: key.serialize_der(),
        })
    }

    /// Loads the identity kept in `dir`, or creates one for `device_id`
    /// (`device.crt`, `device.key` with mode 0600, `device.id`) if none is there.
    ///
    /// An existing identity for another device id is an error: the caller's
    /// notion of who it is and the key on disk disagree.
    pub fn load_or_create(dir: &Path, device_id: DeviceId) -> Result<Identity, NetError> {
        let present = [CERT_FILE, KEY_FILE, DEVICE_ID_FILE]
            .iter()
            .filter(|f| dir.join(f).exists())
            .count();
        if present == 0 {
            let id = Identity::generate(device_id)?;
            id.save(dir)?;
            tracing::info!(dir = %dir.display(), device = %device_id, fingerprint = %id.fingerprint, "created device identity");
            return Ok(id);
        }
        let id = Identity::load(dir)?;
        if id.device_id != device_id {
            return Err(NetError::Identity(format!(
                "{} holds the identity of device {}, not {device_id}",
                dir.display(),
                id.device_id
            )));
        }
        Ok(id)
    }

    /// Loads the identity kept in `dir`; an error if any of its files is absent.
    pub fn load(dir: &Path) -> Result<Identity, NetError> {
        let id_path = dir.join(DEVICE_ID_FILE);
        let id_text = fs::read_to_string(&id_path).map_err(|e| err(&id_path, "read", e))?;
        let device_id: DeviceId = id_text
            .trim()
            .parse()
            .map_err(|e| err(&id_path, "parse", e))?;

        let cert_path = dir.join(CERT_FILE);
        let cert_pem = fs::read(&cert_path).map_err(|e| err(&cert_path, "read", e))?;
        let cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|e| err(&cert_path, "parse", e))?;

        let key_path = dir.join(KEY_FILE);
        let key_pem = fs::read(&key_path).map_err(|e| err(&key_path, "read", e))?;
        let key =
            PrivatePkcs8KeyDer::from_pem_slice(&key_pem).map_err(|e| err(&key_path, "parse", e))?;
        // Check the key is usable (and matches a supported algorithm) now, not at first dial.
        let pair = rcgen::KeyPair::try_from(key.secret_pkcs8_der())
            .map_err(|e| err(&key_path, "parse", e))?;

        let cert_der = cert.as_ref().to_vec();
        Ok(Identity {
            device_id,
            fingerprint: CertFingerprint::of_der(&cert_der),
            cert_der,
            key_der: pair.serialize_der(),
        })
    }

    /// Writes the identity into `dir` (created if needed): certificate and
    /// device id first, the key last with mode 0600, each via a temp file and rename.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        fs::create_dir_all(dir).map_err(|e| err(dir, "create", e))?;
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);
        let key_pem = pem_encode("PRIVATE KEY", &self.key_der);
        write_atomic(
            &dir.join(DEVICE_ID_FILE),
            format!("{}\n", self.device_id).as_bytes(),
            false,
        )?;
        write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes(), false)?;
        write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), true)?;
        Ok(())
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    pub(crate) fn rustls_cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub(crate) fn rustls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // chunks of an ASCII string are valid UTF-8
        let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Writes `data` to `path` through a temp file and a rename; `secret` files get mode 0600.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), NetError> {
    let tmp: PathBuf = {
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".tmp");
        path.with_file_name(name)
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts.open(&tmp).map_err(|e| err(&tmp, "create", e))?;
    file.write_all(data).map_err(|e| err(&tmp, "write", e))?;
    file.sync_all().map_err(|e| err(&tmp, "sync", e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| err(path, "rename into", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn create_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let dev = DeviceId::new_v7();
        let a = Identity::load_or_create(dir.path(), dev).unwrap();
        let b = Identity::load_or_create(dir.path(), dev).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.key_der, b.key_der);
        let c = Identity::load(dir.path()).unwrap();
        assert_eq!(c.device_id, dev);
        assert_eq!(c.fingerprint, a.fingerprint);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            Identity::load_or_create(dir.path(), DeviceId::new_v7()),
            Err(NetError::Identity(_))
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            Identity::load(empty.path()),
            Err(NetError::Identity(_))
        ));
    }
}
