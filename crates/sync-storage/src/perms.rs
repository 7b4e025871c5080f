//! Owner-only files and directories: a library names every path its user indexed.
//!
//! The data directory, `snapshots/` and `incoming/` are 0700; the library,
//! snapshot files, downloads and their state files 0600. New files are
//! created exclusively (`O_EXCL`) and never through a symlink
//! (`O_NOFOLLOW`); temporary files get unique names.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of private directories.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of private files.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its parents) if needed and makes it owner-only.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    tighten(dir, DIR_MODE)
}

/// Creates a new file at `path`, owner-only, failing if anything (a file or
/// a symlink) is already there.
pub(crate) fn private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Opens `path` for reading and writing, creating it owner-only if absent;
/// never through a symlink. An existing file is made owner-only.
pub(crate) fn private_open(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(f)
}

/// Removes group and other bits from an existing `path` (a no-op if absent).
pub(crate) fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 && !m.file_type().is_symlink() => {
            std::fs::set_permissions(path, Permissions::from_mode(mode))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A temporary name beside `path`, unique to this process and call.
pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Bytes available to this process on the filesystem holding `path`.
pub(crate) fn available_bytes(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes `bytes` to `path` atomically: a unique owner-only temporary file,
/// synced, renamed over `path`, then the directory synced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = temp_beside(path);
    let result = (|| {
        let mut f = private_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
