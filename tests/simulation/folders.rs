//! Real folders for index runs: what the simulation sees of one on disk,
//! the changes it makes between runs, and the check that an index run's
//! live entries are the folder's tree (one live entry per path, names
//! round-tripped, what lies below an unreadable folder kept as it was).
//!
//! Folders are made unreadable with mode 000. As root that has no effect
//! unless the thread lacks `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH`:
//! the simulation drops them on its own thread before it starts a runtime
//! (every engine thread inherits the thread's capabilities), see
//! [`drop_dac_capabilities`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sync_core::{Entry, EntryId, EntryKind, LocationId};

use super::ops::{DIR_NAMES, FILE_NAMES, FsChange};

/// A path relative to the folder's root, one component per element.
pub type RelPath = Vec<OsString>;

/// What the simulation can read of a folder: every path it can list, and
/// the folders it cannot list (their contents unknown).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Paths below the root (the root itself is `[]`), with "is a folder".
    pub paths: BTreeMap<RelPath, bool>,
    /// Folders that could not be listed.
    pub locked: BTreeSet<RelPath>,
}

impl Seen {
    /// Reads `root` as the indexer would (no symlinks followed).
    pub fn read(root: &Path) -> std::io::Result<Seen> {
        let mut seen = Seen::default();
        seen.paths.insert(Vec::new(), true);
        seen.walk(root, Vec::new())?;
        Ok(seen)
    }

    fn walk(&mut self, dir: &Path, rel: RelPath) -> std::io::Result<()> {
        let list = match std::fs::read_dir(dir) {
            Ok(list) => list,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                self.locked.insert(rel);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for item in list {
            let item = item?;
            let is_dir = item.file_type()?.is_dir();
            let mut path = rel.clone();
            path.push(item.file_name());
            self.paths.insert(path.clone(), is_dir);
            if is_dir {
                self.walk(&item.path(), path)?;
            }
        }
        Ok(())
    }

    /// Folders that can be listed (the root included), in order.
    fn open_dirs(&self) -> Vec<RelPath> {
        self.paths
            .iter()
            .filter(|(p, d)| **d && !self.locked.contains(*p))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Paths other than the root.
    fn below_root(&self) -> Vec<(RelPath, bool)> {
        self.paths
            .iter()
            .filter(|(p, _)| !p.is_empty())
            .map(|(p, d)| (p.clone(), *d))
            .collect()
    }

    /// Whether a strict ancestor of `p` is locked.
    pub fn under_locked(&self, p: &[OsString]) -> bool {
        (0..p.len()).any(|n| self.locked.contains(&p[..n]))
    }
}

/// Joins a relative path onto `root`.
pub fn join(root: &Path, rel: &[OsString]) -> PathBuf {
    rel.iter().fold(root.to_path_buf(), |p, c| p.join(c))
}

/// Applies `change` to the folder at `root`. `Ok(false)`: nothing to
/// change (no candidate); an IO error: the change was refused by the
/// filesystem (counted, skipped).
pub fn apply(root: &Path, change: &FsChange) -> std::io::Result<bool> {
    let seen = Seen::read(root)?;
    let pick = |list: &[RelPath], i: usize| list.get(i % list.len().max(1)).cloned();
    match change {
        FsChange::CreateFile { dir, name, len } => {
            let Some(d) = pick(&seen.open_dirs(), *dir) else {
                return Ok(false);
            };
            let name = OsStr::from_bytes(FILE_NAMES[name % FILE_NAMES.len()]);
            let path = join(root, &d).join(name);
            if path.symlink_metadata().is_ok() {
                return Ok(false);
            }
            std::fs::write(path, vec![7u8; *len])?;
        }
        FsChange::CreateDir { dir, name } => {
            let Some(d) = pick(&seen.open_dirs(), *dir) else {
                return Ok(false);
            };
            let path = join(root, &d).join(DIR_NAMES[name % DIR_NAMES.len()]);
            if path.symlink_metadata().is_ok() {
                return Ok(false);
            }
            std::fs::create_dir(path)?;
        }
        FsChange::Write { pick: p, len } => {
            let files: Vec<RelPath> = seen
                .below_root()
                .into_iter()
                .filter(|(_, d)| !d)
                .map(|(p, _)| p)
                .collect();
            let Some(f) = pick(&files, *p) else {
                return Ok(false);
            };
            let path = join(root, &f);
            let old = std::fs::metadata(&path)?.len() as usize;
            let len = if *len == old { len + 1 } else { *len };
            std::fs::write(path, vec![9u8; len])?;
        }
        FsChange::Remove { pick: p } => {
            let all: Vec<(RelPath, bool)> = seen.below_root();
            let Some((path, dir)) = all.get(p % all.len().max(1)).cloned() else {
                return Ok(false);
            };
            remove(&join(root, &path), dir)?;
        }
        FsChange::Rename { pick: p, name } => {
            let all = seen.below_root();
            let Some((path, dir)) = all.get(p % all.len().max(1)).cloned() else {
                return Ok(false);
            };
            let new: OsString = if dir {
                DIR_NAMES[name % DIR_NAMES.len()].into()
            } else {
                OsString::from_vec(FILE_NAMES[name % FILE_NAMES.len()].to_vec())
            };
            let from = join(root, &path);
            let to = from.with_file_name(new);
            if to.symlink_metadata().is_ok() {
                return Ok(false);
            }
            std::fs::rename(from, to)?;
        }
        FsChange::Swap { pick: p } => {
            let all = seen.below_root();
            let Some((path, dir)) = all.get(p % all.len().max(1)).cloned() else {
                return Ok(false);
            };
            let full = join(root, &path);
            remove(&full, dir)?;
            if dir {
                std::fs::write(&full, b"was a folder")?;
            } else {
                std::fs::create_dir(&full)?;
            }
        }
        FsChange::Lock { pick: p } => {
            let dirs: Vec<RelPath> = seen
                .open_dirs()
                .into_iter()
                .filter(|d| !d.is_empty())
                .collect();
            let Some(d) = pick(&dirs, *p) else {
                return Ok(false);
            };
            std::fs::set_permissions(join(root, &d), std::fs::Permissions::from_mode(0o000))?;
        }
        FsChange::Unlock { pick: p } => {
            let locked: Vec<RelPath> = seen.locked.iter().cloned().collect();
            let Some(d) = pick(&locked, *p) else {
                return Ok(false);
            };
            std::fs::set_permissions(join(root, &d), std::fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(true)
}

fn remove(path: &Path, dir: bool) -> std::io::Result<()> {
    if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Makes every folder below `root` readable again (so it can be removed).
pub fn unlock_all(root: &Path) {
    for _ in 0..16 {
        let Ok(seen) = Seen::read(root) else { return };
        if seen.locked.is_empty() {
            return;
        }
        for d in &seen.locked {
            let _ = std::fs::set_permissions(join(root, d), std::fs::Permissions::from_mode(0o755));
        }
    }
}

/// Live entries of a location as a tree of stored names.
struct StoredTree {
    /// By path of stored names (the root entry is `[]`).
    by_path: BTreeMap<Vec<String>, Vec<Entry>>,
}

impl StoredTree {
    /// Builds the tree; a live entry whose parent is not live, or a second
    /// root, is an error.
    fn build(entries: &[Entry]) -> Result<StoredTree, String> {
        let by_id: BTreeMap<EntryId, &Entry> = entries.iter().map(|e| (e.id, e)).collect();
        let roots = entries.iter().filter(|e| e.parent.is_none()).count();
        if roots != 1 {
            return Err(format!("{roots} live root entries"));
        }
        let mut by_path: BTreeMap<Vec<String>, Vec<Entry>> = BTreeMap::new();
        for e in entries {
            let mut names = Vec::new();
            let mut at = e;
            while let Some(p) = at.parent {
                names.push(at.name.clone());
                at = by_id
                    .get(&p)
                    .ok_or_else(|| format!("live entry {:?} under an entry not live", e.name))?;
                if names.len() > 64 {
                    return Err(format!("a cycle of parents at {:?}", e.name));
                }
            }
            names.reverse();
            by_path.entry(names).or_default().push(e.clone());
        }
        Ok(StoredTree { by_path })
    }

    /// The entries directly below `dir`.
    fn children(&self, dir: &[String]) -> Vec<&Entry> {
        self.by_path
            .iter()
            .filter(|(p, _)| p.len() == dir.len() + 1 && p.starts_with(dir))
            .flat_map(|(_, es)| es.iter())
            .collect()
    }

    /// The entries strictly below `dir`, by id.
    fn subtree(&self, dir: &[String]) -> BTreeMap<EntryId, Entry> {
        self.by_path
            .iter()
            .filter(|(p, _)| p.len() > dir.len() && p.starts_with(dir))
            .flat_map(|(_, es)| es.iter().map(|e| (e.id, e.clone())))
            .collect()
    }
}

/// A path as stored names. Folders are made with UTF-8 names, but a swap
/// turns a file of any name into a folder (simulation seed 20035): those
/// are matched by the lossless encoding the indexer stores.
fn as_names(p: &[OsString]) -> Vec<String> {
    p.iter().map(|c| sync_core::names::encode_os(c)).collect()
}

/// Checks an index run of `root` into `location`: `before` were the
/// location's live entries before the run, `after` after it.
pub fn check_index(
    root: &Path,
    location: LocationId,
    before: &[Entry],
    after: &[Entry],
) -> Result<(), String> {
    let seen = Seen::read(root).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    if let Some(e) = after.iter().find(|e| e.location != location) {
        return Err(format!("entry {:?} of another location", e.name));
    }
    let tree = StoredTree::build(after)?;
    let old = StoredTree::build(before).ok();
    let root_name = root.file_name().and_then(OsStr::to_str).unwrap_or_default();
    match tree.by_path.get(&Vec::new()).map(Vec::as_slice) {
        Some([r]) if r.name == root_name && r.kind == EntryKind::Dir => {}
        other => return Err(format!("root entry {other:?}, folder {root_name:?}")),
    }
    let mut matched: BTreeSet<Vec<String>> = BTreeSet::new();
    matched.insert(Vec::new());
    for dir in seen.paths.iter().filter(|(_, d)| **d).map(|(p, _)| p) {
        if seen.under_locked(dir) {
            continue;
        }
        let names = as_names(dir);
        if seen.locked.contains(dir) {
            check_kept(&tree, old.as_ref(), &names)?;
            mark_subtree(&tree, &names, &mut matched);
            continue;
        }
        check_children(&seen, dir, &names, &tree, &mut matched)?;
    }
    if let Some((p, _)) = tree.by_path.iter().find(|(p, _)| !matched.contains(*p)) {
        return Err(format!("live entry at {p:?} not on disk"));
    }
    Ok(())
}

fn mark_subtree(tree: &StoredTree, dir: &[String], matched: &mut BTreeSet<Vec<String>>) {
    for p in tree.by_path.keys() {
        if p.len() > dir.len() && p.starts_with(dir) {
            matched.insert(p.clone());
        }
    }
}

/// Below an unreadable folder, the run keeps the entries as they were.
fn check_kept(tree: &StoredTree, old: Option<&StoredTree>, dir: &[String]) -> Result<(), String> {
    let was = old.map(|o| o.subtree(dir)).unwrap_or_default();
    let is = tree.subtree(dir);
    if was != is {
        return Err(format!(
            "below unreadable {dir:?}: {} entries before the run, {} after (kept ones must stay)",
            was.len(),
            is.len()
        ));
    }
    Ok(())
}

/// The stored children of one readable folder are its entries on disk:
/// each UTF-8 name exactly once with its kind; as many other names, each
/// once, none of them lossy.
fn check_children(
    seen: &Seen,
    dir: &[OsString],
    names: &[String],
    tree: &StoredTree,
    matched: &mut BTreeSet<Vec<String>>,
) -> Result<(), String> {
    let on_disk: Vec<(&OsString, bool)> = seen
        .paths
        .iter()
        .filter(|(p, _)| p.len() == dir.len() + 1 && p.starts_with(dir))
        .map(|(p, d)| (&p[p.len() - 1], *d))
        .collect();
    let stored = tree.children(names);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &stored {
        *counts.entry(e.name.as_str()).or_default() += 1;
    }
    if let Some((n, c)) = counts.iter().find(|(_, c)| **c > 1) {
        return Err(format!("{c} live entries named {n:?} in {names:?}"));
    }
    let mut others = 0usize;
    for (name, is_dir) in &on_disk {
        match name.to_str() {
            Some(s) => {
                let Some(e) = stored.iter().find(|e| e.name == s) else {
                    return Err(format!("{s:?} in {names:?} on disk, no live entry"));
                };
                let kind = if *is_dir {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                };
                if e.kind != kind {
                    return Err(format!(
                        "{s:?} in {names:?} is {kind:?}, stored {:?}",
                        e.kind
                    ));
                }
            }
            None => others += 1,
        }
    }
    let utf8: BTreeSet<&str> = on_disk.iter().filter_map(|(n, _)| n.to_str()).collect();
    let rest: Vec<&&Entry> = stored
        .iter()
        .filter(|e| !utf8.contains(e.name.as_str()))
        .collect();
    if rest.len() != others {
        return Err(format!(
            "{others} names that are not UTF-8 in {names:?} on disk, {} other live entries ({:?})",
            rest.len(),
            rest.iter().map(|e| &e.name).collect::<Vec<_>>()
        ));
    }
    if let Some(e) = rest.iter().find(|e| e.name.contains('\u{FFFD}')) {
        return Err(format!(
            "name {:?} in {names:?} is lossy: a name that is not UTF-8 must round-trip",
            e.name
        ));
    }
    for e in &stored {
        let mut p = names.to_vec();
        p.push(e.name.clone());
        matched.insert(p);
    }
    Ok(())
}

/// Drops `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH` from this thread's
/// effective set (threads it starts inherit it), so that mode 000 makes a
/// folder unreadable even as root. Returns whether a locked folder is now
/// unreadable here.
pub fn drop_dac_capabilities(probe_dir: &Path) -> bool {
    use rustix::thread::{CapabilitySet, capabilities, set_capabilities};
    if let Ok(mut sets) = capabilities(None) {
        sets.effective -= CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH;
        let _ = set_capabilities(None, sets);
    }
    let probe = probe_dir.join("probe");
    let _ = std::fs::create_dir(&probe);
    let _ = std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o000));
    let unreadable = std::fs::read_dir(&probe).is_err();
    let _ = std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755));
    let _ = std::fs::remove_dir(&probe);
    unreadable
}
