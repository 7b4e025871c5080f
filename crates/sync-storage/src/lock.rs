//! One engine per data directory: an exclusive, non-blocking `flock` on the
//! data directory itself, and the holder's pid in `<dir>/engine.lock`.
//!
//! The lock is taken on the directory, not on a file in it. A lock file can
//! be deleted while its engine runs (by hand, by a cleanup script), and a
//! second engine would then create and lock a new file of the same name:
//! two engines on one library. The directory cannot be removed while it
//! holds the library, and renaming it moves the library along with its
//! lock. (A directory `flock` needs a local filesystem; so does SQLite's
//! WAL mode, which the library uses.)
//!
//! The kernel drops the lock when its holder exits however it exits (a
//! crash, `kill -9`), so there is never a stale lock to clean up. The pid
//! file is only there to name the holder in the error; it is written after
//! the lock is taken, atomically (a private temporary file renamed over
//! it), so whatever was planted at its name (a symlink, a FIFO) is replaced,
//! never followed, and a reader never sees it half written.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use crate::error::{Result, StorageError};
use crate::perms;

/// The pid file's name inside a data directory.
pub const LOCK_FILE: &str = "engine.lock";

/// How long [`DirLock::acquire`] retries a lock held by someone else: a
/// [`DirLock::holder`] probe (a `status`) holds a shared lock for a moment,
/// and an engine starting right then must not fail for it.
const PROBE_GRACE: Duration = Duration::from_millis(100);

/// An exclusive hold on a data directory, released when dropped (or when
/// the process ends).
#[derive(Debug)]
pub struct DirLock {
    /// The locked directory, open.
    dir: File,
    /// The pid file.
    path: PathBuf,
}

/// Opens `dir` itself (never a FIFO or a file by that name).
fn open_dir(dir: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK)
        .open(dir)
}

impl DirLock {
    /// Takes the lock of `dir` (created owner-only if absent), or fails
    /// with [`StorageError::InUse`] naming the holder's pid once it has
    /// stayed held for a moment (see [`PROBE_GRACE`]).
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        perms::private_dir(dir)?;
        let handle = open_dir(dir)?;
        let deadline = Instant::now() + PROBE_GRACE;
        loop {
            match flock(&handle, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                    if Instant::now() >= deadline {
                        return Err(StorageError::InUse {
                            dir: dir.display().to_string(),
                            pid: read_pid(dir),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(StorageError::Io(e.into())),
            }
        }
        let path = dir.join(LOCK_FILE);
        let pid = format!("{}\n", std::process::id());
        perms::write_atomic(&path, pid.as_bytes()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
        })?;
        tracing::debug!(dir = %dir.display(), "data directory locked");
        Ok(DirLock { dir: handle, path })
    }

    /// Whether an engine holds `dir`, and its pid if it wrote one:
    /// `None` when the directory is free. Probes with a shared lock taken
    /// and dropped at once (a [`DirLock::acquire`] racing it retries).
    pub fn holder(dir: &Path) -> Option<Option<u32>> {
        let handle = open_dir(dir).ok()?;
        match flock(&handle, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = flock(&handle, FlockOperation::Unlock);
                None
            }
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Some(read_pid(dir)),
            Err(_) => None,
        }
    }

    /// The pid file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock; say so explicitly first,
        // so a duplicated descriptor (none is made) could not keep it.
        let _ = flock(&self.dir, FlockOperation::Unlock);
    }
}

/// The pid written by the lock's holder, if it wrote one yet (it is
/// written right after the lock is taken). Never follows a symlink or
/// blocks on a FIFO planted at the pid file's name.
fn read_pid(dir: &Path) -> Option<u32> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.join(LOCK_FILE))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn second_lock_names_the_holder_and_drop_releases_it() {
        let dir = tempfile::TempDir::new().unwrap();
        let held = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(StorageError::InUse { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock taken: {other:?}"),
        }
        let err = DirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        assert_eq!(DirLock::holder(dir.path()), Some(Some(std::process::id())));
        drop(held);
        assert_eq!(DirLock::holder(dir.path()), None);
        DirLock::acquire(dir.path()).unwrap();
    }

    /// Attack: delete `engine.lock` while an engine runs, then start a
    /// second one. A lock on the file let it lock a new file of the same
    /// name; the lock on the directory keeps it out.
    #[test]
    fn deleting_the_lock_file_lets_no_second_engine_in() {
        let dir = tempfile::TempDir::new().unwrap();
        let _held = DirLock::acquire(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(LOCK_FILE)).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(StorageError::InUse { pid, .. }) => assert_eq!(pid, None, "the pid file is gone"),
            other => panic!("a second engine took the library: {other:?}"),
        }
        assert_eq!(DirLock::holder(dir.path()), Some(None));
    }

    /// Attack: `status` probing the lock (a shared lock for a moment) at
    /// the instant an engine starts. The engine must not fail for it.
    #[test]
    fn a_status_probe_never_makes_an_engine_start_fail() {
        let dir = tempfile::TempDir::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let (dir, stop) = (dir.path().to_path_buf(), stop.clone());
            std::thread::spawn(move || {
                let mut probes = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _ = DirLock::holder(&dir);
                    probes += 1;
                }
                probes
            })
        };
        for i in 0..300 {
            let lock = DirLock::acquire(dir.path());
            assert!(lock.is_ok(), "start {i} failed beside a probe: {lock:?}");
        }
        stop.store(true, Ordering::Relaxed);
        assert!(prober.join().unwrap() > 0);
    }

    /// Attack: a symlink planted at `engine.lock` (pointing at a file of
    /// the user's), or a FIFO there. The engine replaces it, never writes or
    /// chmods through it, and `status` does not hang reading it.
    #[test]
    fn a_symlink_or_fifo_planted_at_the_lock_file_is_replaced_not_followed() {
        let dir = tempfile::TempDir::new().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, b"keep me").unwrap();
        std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&precious, data.join(LOCK_FILE)).unwrap();
        let held = DirLock::acquire(&data).unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
        let mode = std::fs::metadata(&precious).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        let meta = std::fs::symlink_metadata(data.join(LOCK_FILE)).unwrap();
        assert!(meta.is_file(), "the symlink was replaced by the pid file");
        assert_eq!(DirLock::holder(&data), Some(Some(std::process::id())));

        // A FIFO at the pid file's name while the lock is held: the probe
        // must answer (pid unknown), not block opening it.
        std::fs::remove_file(data.join(LOCK_FILE)).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(data.join(LOCK_FILE))
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let probe_dir = data.clone();
        std::thread::spawn(move || {
            let _ = tx.send(DirLock::holder(&probe_dir));
        });
        let answer = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(answer, Ok(Some(None)), "the probe hung on the FIFO");
        drop(held);
        // And the next engine replaces the FIFO.
        let _again = DirLock::acquire(&data).unwrap();
        assert!(
            std::fs::symlink_metadata(data.join(LOCK_FILE))
                .unwrap()
                .is_file()
        );
    }
}
