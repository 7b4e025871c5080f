//! Walking a real folder and diffing it against what the library holds.
//!
//! Follows no symlinks (records them as symlinks). Compares each path with
//! the stored entry by inode, size, mtime and kind: an unchanged folder
//! yields no change and stamps no seq. Names and the location path are
//! stored losslessly ([`sync_core::names`]), and stored children are
//! matched by that encoded name, so undecodable names neither collide nor
//! come back as new entries on every rescan. Two stored live entries with
//! one name in one folder (left by the lossy names of old) are one too
//! many: the newer is tombstoned.
//!
//! A path that cannot be read is never taken for deleted; only one that
//! vanished (`NotFound`) is. A child whose metadata cannot be read keeps
//! its stored entry and everything below it unchanged, a folder that
//! cannot be listed keeps its stored children, and an error no path can
//! be given for keeps every stored entry the run did not see. Each is
//! counted in the report, the first few named.

use std::collections::hash_map::Entry as Slot;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sync_core::names::encode_os;
use sync_core::{DeviceId, Entry, EntryId, EntryKind, Location, LocationId, Seq};
use sync_storage::LocalChange;

/// How many unreadable paths a report names.
const SKIPPED_PATHS_KEPT: usize = 5;
/// The longest description of an unreadable path a report holds, in
/// characters (a path may be 4 KiB; the report goes to logs).
const SKIPPED_PATH_CHARS: usize = 300;
/// Folder depth beyond which an entry's ancestry is not followed.
const MAX_DEPTH: usize = 4096;

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
    /// Stored entries kept unchanged because they, or a folder above them,
    /// could not be read.
    pub kept: u64,
    /// The first unreadable paths, with why (each shortened for logs).
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

/// How a path of [`UnreadablePaths`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// Its metadata (`symlink_metadata`) cannot be read.
    Metadata,
    /// It is a folder whose listing (`read_dir`) cannot be read.
    Listing,
}

/// Paths an index walk treats as unreadable although they are not, with
/// `PermissionDenied`: the test double for failures a test cannot cause,
/// since tests run as root and root reads through permission bits.
/// Clones share one set; empty unless a test fills it.
#[derive(Clone, Debug, Default)]
pub struct UnreadablePaths(Arc<Mutex<HashMap<PathBuf, Unreadable>>>);

impl UnreadablePaths {
    /// Makes reading the metadata of `path` fail (it must exist; a
    /// symlink is taken as itself).
    pub fn fail_metadata(&self, path: &Path) {
        self.insert(path, Unreadable::Metadata);
    }

    /// Makes listing the folder `path` fail (it must exist).
    pub fn fail_listing(&self, path: &Path) {
        self.insert(path, Unreadable::Listing);
    }

    /// Makes every path readable again.
    pub fn clear(&self) {
        self.paths().clear();
    }

    fn insert(&self, path: &Path, how: Unreadable) {
        // The walk sees canonical paths; the last component stays as it is.
        let parent = path.parent().and_then(|p| p.canonicalize().ok());
        let path = match (parent, path.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => path.to_path_buf(),
        };
        self.paths().insert(path, how);
    }

    fn paths(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Unreadable>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn time_of(secs: i64, nanos: i64) -> DateTime<Utc> {
    sync_core::model::truncate_to_micros(
        DateTime::from_timestamp(secs, nanos.clamp(0, 999_999_999) as u32).unwrap_or_default(),
    )
}

/// The stored name of `path`: its last component, losslessly encoded.
fn name_of(path: &Path) -> String {
    encode_os(path.file_name().unwrap_or(path.as_os_str()))
}

fn kind_of(ft: std::fs::FileType) -> EntryKind {
    if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File
    }
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
    let none = UnreadablePaths::default();
    plan_index_with(owner, root, location, existing, progress, &none)
}

/// [`plan_index`], with the paths of `unreadable` failing as if they
/// could not be read.
pub fn plan_index_with(
    owner: DeviceId,
    root: &Path,
    location: Option<Location>,
    existing: Vec<Entry>,
    progress: &dyn Fn(u64) -> bool,
    unreadable: &UnreadablePaths,
) -> std::io::Result<WalkPlan> {
    let started = Instant::now();
    let root = root.canonicalize()?;
    if !std::fs::symlink_metadata(&root)?.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a folder", root.display()),
        ));
    }
    let (location, change) = open_location(owner, &root, location);
    let inject = unreadable.paths().clone();
    let mut walk = Walk::new(location.id, existing, change.into_iter().collect(), inject);
    let mut visited = 0u64;
    let mut items = walkdir::WalkDir::new(&root).follow_links(false).into_iter();
    while let Some(item) = items.next() {
        let step = match item {
            Err(e) => walk.on_error(&e),
            Ok(item) => {
                visited += 1;
                if visited.is_multiple_of(4096) && !progress(visited) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::Interrupted,
                        "index run cancelled",
                    ));
                }
                walk.on_entry(&item)
            }
        };
        if step == Step::SkipFolder {
            items.skip_current_dir();
        }
    }
    progress(visited);
    let mut plan = walk.finish();
    plan.report.seconds = started.elapsed().as_secs_f64();
    Ok(plan)
}

/// The location to index `root` into, and the change that creates or
/// revives it, if any.
fn open_location(
    owner: DeviceId,
    root: &Path,
    location: Option<Location>,
) -> (Location, Option<LocalChange>) {
    match location {
        Some(l) if !l.deleted => (l, None),
        Some(mut l) => {
            l.deleted = false;
            (l.clone(), Some(LocalChange::Location(l)))
        }
        None => {
            let l = Location {
                id: LocationId::new_v7(),
                owner,
                path: encode_os(root.as_os_str()),
                name: name_of(root),
                seq: Seq::ZERO,
                deleted: false,
            };
            (l.clone(), Some(LocalChange::Location(l)))
        }
    }
}

/// What the walk does after a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Go on.
    Next,
    /// Do not descend into the folder just seen.
    SkipFolder,
}

/// The state of one walk.
struct Walk {
    location: LocationId,
    /// Stored entries not seen yet, by parent and encoded name.
    by_key: HashMap<(Option<EntryId>, String), Entry>,
    parent_of: HashMap<EntryId, Option<EntryId>>,
    changes: Vec<LocalChange>,
    report: IndexReport,
    seen: HashSet<EntryId>,
    /// Stored entries that could not be read, or folders that could not be
    /// listed: everything stored below them is kept.
    kept: HashSet<EntryId>,
    /// An error no path could be given for: nothing unseen is deleted.
    keep_all: bool,
    /// The folders walked, by path.
    dir_ids: HashMap<PathBuf, EntryId>,
    inject: HashMap<PathBuf, Unreadable>,
}

impl Walk {
    fn new(
        location: LocationId,
        existing: Vec<Entry>,
        mut changes: Vec<LocalChange>,
        inject: HashMap<PathBuf, Unreadable>,
    ) -> Self {
        let mut report = IndexReport {
            location_id: location,
            ..IndexReport::default()
        };
        let parent_of = existing.iter().map(|e| (e.id, e.parent)).collect();
        let mut by_key = HashMap::with_capacity(existing.len());
        // In id order, so the oldest of two live namesakes stays.
        for e in existing {
            match by_key.entry((e.parent, e.name.clone())) {
                Slot::Vacant(slot) => {
                    slot.insert(e);
                }
                Slot::Occupied(mut slot) if slot.get().deleted => {
                    slot.insert(e);
                }
                Slot::Occupied(_) if !e.deleted => {
                    report.deleted += 1;
                    changes.push(LocalChange::DeleteEntry(e.id));
                }
                Slot::Occupied(_) => {}
            }
        }
        Walk {
            location,
            by_key,
            parent_of,
            changes,
            report,
            seen: HashSet::new(),
            kept: HashSet::new(),
            keep_all: false,
            dir_ids: HashMap::new(),
            inject,
        }
    }

    /// One path the walk yielded.
    fn on_entry(&mut self, item: &walkdir::DirEntry) -> Step {
        let path = item.path();
        let kind = kind_of(item.file_type());
        let skip = if kind == EntryKind::Dir {
            Step::SkipFolder
        } else {
            Step::Next
        };
        let parent = if item.depth() == 0 {
            None
        } else {
            match path.parent().and_then(|p| self.dir_ids.get(p)) {
                Some(&id) => Some(id),
                // Below a folder already skipped.
                None => return skip,
            }
        };
        let name = name_of(path);
        let meta = match self.metadata(item) {
            Ok(meta) => meta,
            Err(e) => {
                self.note_skipped(path, &e);
                if e.kind() != std::io::ErrorKind::NotFound {
                    self.keep(parent, name);
                }
                // Vanished: not seen, so deleted with what lies below it.
                return skip;
            }
        };
        let id = self.upsert(parent, name, kind, &meta);
        if kind != EntryKind::Dir {
            return Step::Next;
        }
        if self.inject.get(path) == Some(&Unreadable::Listing) {
            self.note_skipped(path, &injected());
            self.kept.insert(id);
            return Step::SkipFolder;
        }
        self.dir_ids.insert(path.to_path_buf(), id);
        Step::Next
    }

    /// An error the walk yielded: a folder it could not list, a child
    /// whose type it could not read, or (without a path) a listing that
    /// broke off.
    fn on_error(&mut self, err: &walkdir::Error) -> Step {
        self.report.skipped += 1;
        let cause = err
            .io_error()
            .map_or_else(|| err.to_string(), ToString::to_string);
        let shown = err
            .path()
            .map_or("(a listing)".into(), |p| p.display().to_string());
        self.note(format!("{shown}: {cause}"));
        if err
            .io_error()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            // Vanished during the walk: deleted.
            return Step::Next;
        }
        let Some(path) = err.path() else {
            self.keep_all = true;
            return Step::Next;
        };
        if let Some(&id) = self.dir_ids.get(path) {
            // A folder that could not be listed keeps its stored children.
            self.kept.insert(id);
            return Step::Next;
        }
        match path.parent().and_then(|p| self.dir_ids.get(p)).copied() {
            Some(parent) => self.keep(Some(parent), name_of(path)),
            // The root itself.
            None => self.keep_all = true,
        }
        Step::Next
    }

    fn metadata(&self, item: &walkdir::DirEntry) -> std::io::Result<std::fs::Metadata> {
        if self.inject.get(item.path()) == Some(&Unreadable::Metadata) {
            return Err(injected());
        }
        item.metadata().map_err(|e| {
            e.into_io_error()
                .unwrap_or_else(|| std::io::Error::other("metadata unavailable"))
        })
    }

    /// Keeps the stored entry of a child that could not be read as it is,
    /// with everything stored below it.
    fn keep(&mut self, parent: Option<EntryId>, name: String) {
        if let Some(old) = self.by_key.remove(&(parent, name)) {
            self.report.kept += 1;
            self.seen.insert(old.id);
            self.kept.insert(old.id);
        }
    }

    fn note_skipped(&mut self, path: &Path, err: &std::io::Error) {
        self.report.skipped += 1;
        self.note(format!("{}: {err}", path.display()));
    }

    fn note(&mut self, text: String) {
        if self.report.skipped_paths.len() < SKIPPED_PATHS_KEPT {
            self.report.skipped_paths.push(shorten(text));
        }
    }

    /// Matches a readable path with its stored entry (by parent and name)
    /// and plans what changed; returns the entry's id.
    fn upsert(
        &mut self,
        parent: Option<EntryId>,
        name: String,
        kind: EntryKind,
        meta: &std::fs::Metadata,
    ) -> EntryId {
        let modified_at = time_of(meta.mtime(), meta.mtime_nsec());
        let size = if kind == EntryKind::Dir {
            0
        } else {
            meta.len()
        };
        let inode = Some(meta.ino());
        let key = (parent, name);
        let id = match self.by_key.remove(&key) {
            Some(old) => {
                let same = !old.deleted
                    && old.kind == kind
                    && old.size == size
                    && old.inode == inode
                    && old.modified_at == modified_at;
                if !same {
                    self.report.updated += u64::from(!old.deleted);
                    self.report.created += u64::from(old.deleted);
                    self.changes.push(LocalChange::Entry(Entry {
                        kind,
                        size,
                        inode,
                        modified_at,
                        deleted: false,
                        ..old.clone()
                    }));
                }
                old.id
            }
            None => {
                let id = EntryId::new_v7();
                let created_at = meta
                    .created()
                    .ok()
                    .map(|t| sync_core::model::truncate_to_micros(t.into()))
                    .unwrap_or(modified_at);
                self.report.created += 1;
                self.changes.push(LocalChange::Entry(Entry {
                    id,
                    location: self.location,
                    parent,
                    name: key.1,
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
        self.seen.insert(id);
        id
    }

    /// True if `id` or a folder above it could not be read.
    fn under_kept(&self, mut id: EntryId) -> bool {
        for _ in 0..MAX_DEPTH {
            if self.kept.contains(&id) {
                return true;
            }
            match self.parent_of.get(&id).copied().flatten() {
                Some(p) => id = p,
                None => return false,
            }
        }
        false
    }

    /// Tombstones what was stored but not seen, unless it was kept.
    fn finish(mut self) -> WalkPlan {
        let unseen = std::mem::take(&mut self.by_key);
        let mut live_left = 0u64;
        for old in unseen.into_values() {
            if old.deleted {
                continue;
            }
            if self.keep_all || self.under_kept(old.id) {
                live_left += 1;
                continue;
            }
            self.report.deleted += 1;
            self.changes.push(LocalChange::DeleteEntry(old.id));
        }
        self.report.kept += live_left;
        self.report.entries = self.seen.len() as u64 + live_left;
        WalkPlan {
            changes: self.changes,
            report: self.report,
        }
    }
}

fn injected() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "permission denied (injected by a test)",
    )
}

/// `text` cut to [`SKIPPED_PATH_CHARS`] characters.
fn shorten(text: String) -> String {
    match text.char_indices().nth(SKIPPED_PATH_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}
