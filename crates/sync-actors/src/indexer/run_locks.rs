//! One lock per folder being indexed, so that runs of one folder take turns.
//!
//! Two runs of one new folder at once each found no location and each made
//! one, with every entry twice. A run now holds its folder's lock (keyed by
//! canonical path) from looking the location up to committing; the next
//! run of that folder waits, then rescans and finds the first one's work.
//! Runs of different folders do not wait for each other: each diffs its own
//! location, and their commits are serialised by the store's one writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

type Locks = Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>;

/// The locks of the folders being indexed (or waited for) right now.
#[derive(Clone, Default)]
pub(crate) struct RunLocks(Locks);

/// Held while one run of a folder goes on; the folder's lock is forgotten
/// when no run holds or awaits it.
pub(crate) struct RunGuard {
    locks: Locks,
    root: PathBuf,
    guard: Option<OwnedMutexGuard<()>>,
}

impl RunLocks {
    /// Waits until no other run of `root` (a canonical path) goes on.
    pub async fn lock(&self, root: &Path) -> RunGuard {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(root.to_path_buf()).or_default().clone()
        };
        RunGuard {
            locks: self.0.clone(),
            root: root.to_path_buf(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// How many folders have a lock (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map holds it: nobody runs or waits (a new run would
        // need the map's mutex, held here, to take a clone).
        if locks
            .get(&self.root)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn runs_of_one_folder_take_turns_and_others_do_not_wait() {
        let locks = RunLocks::default();
        let first = locks.lock(Path::new("/a")).await;
        let waiting = tokio::spawn({
            let locks = locks.clone();
            async move { drop(locks.lock(Path::new("/a")).await) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a second run of /a did not wait");
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock(Path::new("/b")))
            .await
            .expect("a run of /b waited for /a");
        drop(other);
        drop(first);
        waiting.await.expect("second run");
        assert_eq!(locks.len(), 0, "locks of finished runs are forgotten");
    }
}
