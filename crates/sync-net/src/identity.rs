//! `Identity`: a device's key and self-signed certificate, kept in its data directory.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;

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

        let dir_meta = fs::metadata(dir).map_err(|e| err(dir, "stat", e))?;
        check_owner(dir, &dir_meta)?;
        tighten_dir(dir);
        let key_path = dir.join(KEY_FILE);
        let key_pem = read_private(&key_path)?;
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

    /// Writes the identity into `dir` (created with mode 0700 if needed,
    /// tightened to 0700 if it exists): the key first, created with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600 (an existing key, or a
    /// symlink planted in its place, is an error: a key is never
    /// overwritten), then the certificate and the device id, each through a
    /// unique temp file and a rename; every file and the directory fsynced.
    pub fn save(&self, dir: &Path) -> Result<(), NetError> {
        create_private_dir(dir)?;
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);
        let key_pem = pem_encode("PRIVATE KEY", &self.key_der);
        write_new_private(&dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_atomic(&dir.join(CERT_FILE), cert_pem.as_bytes())?;
        write_atomic(
            &dir.join(DEVICE_ID_FILE),
            format!("{}\n", self.device_id).as_bytes(),
        )?;
        sync_dir(dir)
    }

    /// The certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The device key, PKCS#8 DER (signing statements).
    pub(crate) fn key_pkcs8(&self) -> &[u8] {
        &self.key_der
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

/// Creates `dir` (and missing parents) with mode 0700, or sets an existing
/// one to 0700.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), NetError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(dir, "create", e))?;
    let mode = fs::metadata(dir)
        .map_err(|e| err(dir, "stat", e))?
        .permissions()
        .mode();
    if mode & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| err(dir, "chmod 700", e))?;
    }
    Ok(())
}

/// Tightens an identity directory open to group or others to 0700 (made
/// by an older version, or by hand), warning when it cannot.
fn tighten_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = fs::metadata(dir) else {
        return;
    };
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return;
    }
    match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), was = format!("{mode:o}"), "identity directory set to mode 700")
        }
        Err(e) => tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            cause = %e,
            "the identity directory is open to group or others: run `chmod 700 {}`",
            dir.display()
        ),
    }
}

/// fsyncs a directory, so that a rename or a creation in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), NetError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(dir, "sync", e))
}

/// An error message for a private file that is a symlink (`O_NOFOLLOW`).
fn io_err(path: &Path, what: &str, e: std::io::Error) -> NetError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        err(
            path,
            what,
            "it is a symbolic link, and a private file is never followed through one",
        )
    } else {
        err(path, what, e)
    }
}

/// Refuses `path` (the key file or the identity directory) when it is not
/// owned by this process's effective uid: its owner could read the key or
/// put another in its place (as root, a 0600 file of another user's is
/// still readable).
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), NetError> {
    use std::os::unix::fs::MetadataExt;
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(NetError::KeyOwner {
            path: path.display().to_string(),
            owner: meta.uid(),
            euid,
        });
    }
    Ok(())
}

/// Reads a private file (the key): not through a symlink, and refused when
/// another user owns it or group or others may read or write it.
fn read_private(path: &Path) -> Result<Vec<u8>, NetError> {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_err(path, "read", e))?;
    let meta = file.metadata().map_err(|e| err(path, "stat", e))?;
    check_owner(path, &meta)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NetError::KeyPermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| err(path, "read", e))?;
    Ok(data)
}

/// Creates `path` with `O_CREAT|O_EXCL|O_NOFOLLOW` and mode 0600, writes
/// `data` and fsyncs it. An existing file or symlink at `path` is an error.
fn write_new_private(path: &Path, data: &[u8]) -> Result<(), NetError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err(
                    path,
                    "create",
                    "a file (or a symlink) is already there; a device key is never overwritten",
                )
            } else {
                io_err(path, "create", e)
            }
        })?;
    file.write_all(data).map_err(|e| err(path, "write", e))?;
    file.sync_all().map_err(|e| err(path, "sync", e))
}

/// Writes a public file through a unique temp file (O_EXCL) in the same
/// directory, fsync and a rename; mode 0644.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), NetError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(path.file_name().unwrap_or_default());
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| err(dir, "create a temporary file in", e))?;
    tmp.write_all(data)
        .map_err(|e| err(tmp.path(), "write", e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| err(tmp.path(), "sync", e))?;
    tmp.persist(path)
        .map_err(|e| err(path, "rename into", e.error))?;
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

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn identity_dir_is_0700_and_key_file_0600() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("identity");
        Identity::load_or_create(&dir, DeviceId::new_v7()).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o644);
        // An existing, open directory is tightened when an identity is saved in it.
        let open = root.path().join("open");
        {
            use std::os::unix::fs::PermissionsExt;
            fs::create_dir(&open).unwrap();
            fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Identity::generate(DeviceId::new_v7())
            .unwrap()
            .save(&open)
            .unwrap();
        assert_eq!(mode(&open), 0o700);
        // And one left open by an older version is tightened when loaded.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Identity::load(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // No temporary file is left behind.
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CERT_FILE, DEVICE_ID_FILE, KEY_FILE]);
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused_with_a_chmod_hint() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dev = DeviceId::new_v7();
        Identity::load_or_create(dir.path(), dev).unwrap();
        let key = dir.path().join(KEY_FILE);
        for bad in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&key, fs::Permissions::from_mode(bad)).unwrap();
            let e = Identity::load(dir.path()).unwrap_err();
            assert!(
                matches!(e, NetError::KeyPermissions { mode, .. } if mode == bad),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", key.display())),
                "{text}"
            );
            assert!(Identity::load_or_create(dir.path(), dev).is_err());
        }
        fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Identity::load(dir.path()).is_ok(), "owner-only modes load");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identity::load(dir.path()).is_ok());
    }

    #[test]
    fn the_key_is_never_written_through_a_symlink_nor_over_a_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("identity");
        fs::create_dir(&dir).unwrap();
        let target = root.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.join(KEY_FILE)).unwrap();
        let id = Identity::generate(DeviceId::new_v7()).unwrap();
        let e = id.save(&dir).unwrap_err();
        assert!(matches!(e, NetError::Identity(_)), "{e:?}");
        assert!(!target.exists(), "the key was written through the symlink");
        // Reading does not follow one either.
        fs::write(&target, b"not a key").unwrap();
        fs::write(
            dir.join(CERT_FILE),
            pem_encode("CERTIFICATE", id.cert_der()),
        )
        .unwrap();
        fs::write(dir.join(DEVICE_ID_FILE), id.device_id.to_string()).unwrap();
        let e = Identity::load(&dir).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");

        // An existing key is never overwritten.
        let dir2 = root.path().join("identity2");
        id.save(&dir2).unwrap();
        let other = Identity::generate(id.device_id).unwrap();
        let e = other.save(&dir2).unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");
        assert_eq!(Identity::load(&dir2).unwrap().fingerprint, id.fingerprint);
    }

    /// F5: as root, a 0600 key of another user's is still readable; it and
    /// an identity directory another user owns are refused with a `chown`
    /// hint.
    #[test]
    #[allow(clippy::print_stdout)] // the note that the test was skipped
    fn f5_a_key_file_or_identity_dir_owned_by_another_user_is_refused() {
        let euid = rustix::process::geteuid().as_raw();
        if euid != 0 {
            println!("note: not root (uid {euid}), cannot chown to another user: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dev = DeviceId::new_v7();
        Identity::load_or_create(dir.path(), dev).unwrap();
        let key = dir.path().join(KEY_FILE);
        std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
        let e = Identity::load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, NetError::KeyOwner { owner: 65534, euid: 0, path } if *path == key.display().to_string()),
            "{e:?}"
        );
        assert!(e.to_string().contains("chown"), "{e}");
        assert!(Identity::load_or_create(dir.path(), dev).is_err());
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
        Identity::load(dir.path()).unwrap();

        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let e = Identity::load(dir.path()).unwrap_err();
        assert!(
            matches!(&e, NetError::KeyOwner { owner: 65534, path, .. } if *path == dir.path().display().to_string()),
            "{e:?}"
        );
        std::os::unix::fs::chown(dir.path(), Some(0), None).unwrap();
        Identity::load(dir.path()).unwrap();
    }
}
