//! Walking a real folder and diffing it against what the library holds.
//!
//! Follows no symlinks (records them as symlinks). Compares each path with
//! the stored entry by inode, size, mtime and kind: an unchanged folder
//! yields no change and stamps no seq. Unreadable files and folders are
//! counted and skipped, never fatal, and what was indexed below an
//! unreadable folder is kept, not deleted.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Seq};
use sync_storage::LocalChange;

/// How many unreadable paths a report names.
const SKIPPED_PATHS_KEPT: usize = 5;

/// What one index run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexReport {
    /// The location indexed.
    pub location_id: LocationId,
    /// Live entries in the location afterwards.
    pub entries: u64,
    /// New entries.
    pub created: u64,
    /// Changed entries.
    pub updated: u64,
    /// Entries that disappeared (tombstoned).
    pub deleted: u64,
    /// Unreadable files and folders, skipped.
    pub skipped: u64,
    /// The first unreadable paths, with why.
    pub skipped_paths: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// The result of a walk: the changes to commit and the report.
pub struct WalkPlan {
    /// Changes, parents before children.
    pub changes: Vec<LocalChange>,
    /// The report (seconds filled in by the caller after commit).
    pub report: IndexReport,
}

fn time_of(secs: i64, nanos: i64) -> DateTime<Utc> {
    sync_core::model::truncate_to_micros(
        DateTime::from_timestamp(secs, nanos.clamp(0, 999_999_999) as u32).unwrap_or_default(),
    )
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned())
}

/// Walks `root` and computes the changes against `location` and its stored
/// `existing` entries (`None`: a new location owned by `owner`).
/// `progress` is called with the number of paths seen so far; when it
/// returns `false` the walk stops with `ErrorKind::Interrupted` and nothing
/// is planned (the engine is shutting down).
pub fn plan_index(
    owner: DeviceId,
    root: &Path,
    location: Option<Location>,
    existing: Vec<Entry>,
    progress: &dyn Fn(u64) -> bool,
) -> std::io::Result<WalkPlan> {
    let started = Instant::now();
    let root = root.canonicalize()?;
    let meta = std::fs::symlink_metadata(&root)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a folder", root.display()),
        ));
    }
    let mut changes = Vec::new();
    let location = match location {
        Some(l) if !l.deleted => l,
        Some(mut l) => {
            l.deleted = false;
            changes.push(LocalChange::Location(l.clone()));
            l
        }
        None => {
            let l = Location {
                id: LocationId::new_v7(),
                owner,
                path: root.to_string_lossy().into_owned(),
                name: name_of(&root),
                seq: Seq::ZERO,
                deleted: false,
            };
            changes.push(LocalChange::Location(l.clone()));
            l
        }
    };
    let mut report = IndexReport {
        location_id: location.id,
        ..IndexReport::default()
    };
    let parent_of: HashMap<EntryId, Option<EntryId>> =
        existing.iter().map(|e| (e.id, e.parent)).collect();
    let mut by_key: HashMap<(Option<EntryId>, String), Entry> = existing
        .into_iter()
        .map(|e| ((e.parent, e.name.clone()), e))
        .collect();
    let mut seen: HashSet<EntryId> = HashSet::new();
    let mut unreadable: HashSet<EntryId> = HashSet::new();
    let mut dir_ids: HashMap<PathBuf, EntryId> = HashMap::new();
    let mut visited = 0u64;

    for item in walkdir::WalkDir::new(&root).follow_links(false) {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                report.skipped += 1;
                let path = e.path().map(Path::to_path_buf);
                if report.skipped_paths.len() < SKIPPED_PATHS_KEPT {
                    let shown = path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    report.skipped_paths.push(format!("{shown}: {e}"));
                }
                // A folder we cannot list keeps what was indexed below it.
                if let Some(id) = path.and_then(|p| dir_ids.get(&p).copied()) {
                    unreadable.insert(id);
                }
                continue;
            }
        };
        visited += 1;
        if visited.is_multiple_of(4096) && !progress(visited) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "index run cancelled",
            ));
        }
        let path = item.path();
        let parent = if item.depth() == 0 {
            None
        } else {
            path.parent().and_then(|p| dir_ids.get(p).copied())
        };
        if item.depth() > 0 && parent.is_none() {
            continue;
        }
        let meta = match item.metadata() {
            Ok(m) => m,
            Err(e) => {
                report.skipped += 1;
                if report.skipped_paths.len() < SKIPPED_PATHS_KEPT {
                    report
                        .skipped_paths
                        .push(format!("{}: {e}", path.display()));
                }
                continue;
            }
        };
        let ft = item.file_type();
        let kind = if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        let name = name_of(path);
        let modified_at = time_of(meta.mtime(), meta.mtime_nsec());
        let created_at = meta
            .created()
            .ok()
            .map(|t| sync_core::model::truncate_to_micros(t.into()))
            .unwrap_or(modified_at);
        let size = if kind == EntryKind::Dir {
            0
        } else {
            meta.len()
        };
        let inode = Some(meta.ino());
        let key = (parent, name);
        let id = match by_key.remove(&key) {
            Some(old) => {
                let same = !old.deleted
                    && old.kind == kind
                    && old.size == size
                    && old.inode == inode
                    && old.modified_at == modified_at;
                if !same {
                    report.updated += u64::from(!old.deleted);
                    report.created += u64::from(old.deleted);
                    changes.push(LocalChange::Entry(Entry {
                        kind,
                        size,
                        inode,
                        modified_at,
                        created_at: old.created_at,
                        deleted: false,
                        ..old.clone()
                    }));
                }
                old.id
            }
            None => {
                let id = EntryId::new_v7();
                report.created += 1;
                changes.push(LocalChange::Entry(Entry {
                    id,
                    location: location.id,
                    parent,
                    name: key.1.clone(),
                    kind,
                    size,
                    inode,
                    created_at,
                    modified_at,
                    seq: Seq::ZERO,
                    deleted: false,
                }));
                id
            }
        };
        seen.insert(id);
        if kind == EntryKind::Dir {
            dir_ids.insert(path.to_path_buf(), id);
        }
    }
    progress(visited);

    // What is left in `by_key` was not seen: deleted, unless it lies below
    // a folder that could not be read.
    let under_unreadable = |mut id: EntryId| -> bool {
        for _ in 0..4096 {
            if unreadable.contains(&id) {
                return true;
            }
            match parent_of.get(&id).copied().flatten() {
                Some(p) => id = p,
                None => return false,
            }
        }
        false
    };
    let mut live_left = 0u64;
    for old in by_key.into_values() {
        if old.deleted {
            continue;
        }
        if under_unreadable(old.id) {
            live_left += 1;
            continue;
        }
        report.deleted += 1;
        changes.push(LocalChange::DeleteEntry(old.id));
    }
    report.entries = seen.len() as u64 + live_left;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(WalkPlan { changes, report })
}
