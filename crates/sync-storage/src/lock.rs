//! One engine per data directory: an exclusive, non-blocking `flock` on
//! `<dir>/engine.lock`, holding the pid of the process that took it.
//!
//! The kernel drops the lock when its holder exits however it exits (a
//! crash, `kill -9`), so there is never a stale lock to clean up; the pid
//! written in the file is only there to name the holder in the error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::error::{Result, StorageError};
use crate::perms;

/// The lock file's name inside a data directory.
pub const LOCK_FILE: &str = "engine.lock";

/// An exclusive hold on a data directory, released when dropped (or when
/// the process ends).
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock of `dir` (created owner-only if absent), or fails at
    /// once with [`StorageError::InUse`] naming the holder's pid.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        perms::private_dir(dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = perms::private_open(&path)?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                return Err(StorageError::InUse {
                    dir: dir.display().to_string(),
                    pid: read_pid(&mut file),
                });
            }
            return Err(StorageError::Io(e.into()));
        }
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_data()?;
        tracing::debug!(path = %path.display(), "data directory locked");
        Ok(DirLock { file, path })
    }

    /// Whether an engine holds `dir`, and its pid if it wrote one:
    /// `None` when the directory is free. Probes with a shared lock taken
    /// and dropped at once (a `lock` never blocks on it for longer).
    pub fn holder(dir: &Path) -> Option<Option<u32>> {
        let mut file = std::fs::File::open(dir.join(LOCK_FILE)).ok()?;
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => {
                let _ = flock(&file, FlockOperation::Unlock);
                None
            }
            Err(_) => Some(read_pid(&mut file)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; say so explicitly first, so a
        // duplicated descriptor (none is made) could not keep it.
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

/// The pid written by the lock's holder, if it wrote one yet (it is
/// written right after the lock is taken).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
}
