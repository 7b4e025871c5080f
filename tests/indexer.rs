//! The indexer over real folders and real SQLite files (issue 13, item 4):
//! one location per folder however it is named and however many runs
//! overlap, lossless names, unreadable paths kept.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sync_actors::{Direction, IndexReport, SyncEngine, SyncEvent, UnreadablePaths};
use sync_core::names::decode_os;
use sync_core::{Entry, Location, Strategy};
use sync_storage::OwnerSummary;

use crate::harness::{
    Device, assert_converged, connect, shutdown, spawn_devices, wait_event, wait_for_watermark,
};

const WAIT: Duration = Duration::from_secs(60);

/// A folder of `dirs` folders of `files` files each; returns how many
/// entries indexing it makes (the root, the folders, the files).
fn make_tree(root: &Path, dirs: usize, files: usize) -> u64 {
    std::fs::create_dir_all(root).unwrap();
    for d in 0..dirs {
        let dir = root.join(format!("dir-{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..files {
            std::fs::write(dir.join(format!("file-{f:03}.txt")), [d as u8, f as u8]).unwrap();
        }
    }
    1 + dirs as u64 + (dirs * files) as u64
}

/// The locations of `device`'s own, live.
async fn own_locations(device: &Device) -> Vec<Location> {
    let all = device.store().locations().await.unwrap();
    all.into_iter()
        .filter(|l| l.owner == device.id && !l.deleted)
        .collect()
}

/// Every entry row of `location` held by `device`, tombstones included.
async fn rows(device: &Device, location: &Location) -> Vec<Entry> {
    device.store().location_entries(location.id).await.unwrap()
}

async fn index(engine: &SyncEngine, path: &Path) -> IndexReport {
    engine.index(path, None).await.expect("index")
}

/// Two `index` runs of one new folder at once made two locations with
/// the same path and every entry twice (2,102 live entries for 1,051
/// files). Runs of one folder, however the path is spelled, now take turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_index_runs_of_one_folder_make_one_location() {
    let devices = spawn_devices(1, |_| {}).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("photos");
    let expected = make_tree(&root, 30, 35);
    let link = tmp.path().join("photos-link");
    std::os::unix::fs::symlink(&root, &link).unwrap();
    let spellings: Vec<PathBuf> = vec![
        root.clone(),
        PathBuf::from(format!("{}/", root.display())),
        link,
        root.join("dir-000").join(".."),
    ];
    let (r0, r1, r2, r3) = tokio::join!(
        index(&a.engine, &spellings[0]),
        index(&a.engine, &spellings[1]),
        index(&a.engine, &spellings[2]),
        index(&a.engine, &spellings[3]),
    );
    let reports = [r0, r1, r2, r3];

    let locations = own_locations(a).await;
    assert_eq!(locations.len(), 1, "locations: {locations:?}");
    assert!(reports.iter().all(|r| r.location_id == locations[0].id));
    let created: u64 = reports.iter().map(|r| r.created).sum();
    assert_eq!(created, expected, "entries created over all runs");
    let held = rows(a, &locations[0]).await;
    assert_eq!(
        held.len() as u64,
        expected,
        "entry rows, tombstones included"
    );
    assert!(held.iter().all(|e| !e.deleted));
    shutdown(&devices).await;
}

/// Names that are not UTF-8 (and UTF-8 names near the escape range).
fn odd_names() -> Vec<OsString> {
    let raw: [&[u8]; 8] = [
        b"x\xff",
        b"x\xfe",
        "x\u{fffd}".as_bytes(),
        "x\u{ef80}".as_bytes(),
        b"x\xee\xbe",
        b"caf\xe9.txt",
        b"plain.txt",
        &[0xff; 255],
    ];
    raw.iter()
        .map(|b| OsStr::from_bytes(b).to_owned())
        .collect()
}

/// Writes every name of [`odd_names`] into `root` as a file, and into a
/// sub-folder with an undecodable name as well.
fn make_odd_tree(root: &Path) -> u64 {
    let sub = root.join(OsStr::from_bytes(b"d\xe9j\xe0"));
    std::fs::create_dir_all(&sub).unwrap();
    for name in odd_names() {
        std::fs::write(root.join(&name), b"top").unwrap();
        std::fs::write(sub.join(&name), b"sub").unwrap();
    }
    2 + 2 * odd_names().len() as u64
}

/// The disk names of `entries`' live rows, decoded, below the root.
fn decoded_names(entries: &[Entry]) -> BTreeSet<OsString> {
    entries
        .iter()
        .filter(|e| !e.deleted && e.parent.is_some())
        .map(|e| decode_os(&e.name))
        .collect()
}

/// Names were made with `to_string_lossy`, so `x\xff` and `x\xfe` in one
/// folder became one name and every rescan added entries. Names now keep
/// every byte, and a rescan of an unchanged folder changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_names_do_not_collide_and_rescans_add_nothing() {
    let devices = spawn_devices(1, |_| {}).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join(OsStr::from_bytes(b"root-\xff"));
    let expected = make_odd_tree(&root);

    let first = index(&a.engine, &root).await;
    assert_eq!(first.created, expected);
    let locations = own_locations(a).await;
    assert_eq!(locations.len(), 1);
    assert_eq!(decode_os(&locations[0].path), root.canonicalize().unwrap());
    let held = rows(a, &locations[0]).await;
    let mut want: BTreeSet<OsString> = odd_names().into_iter().collect();
    want.insert(OsStr::from_bytes(b"d\xe9j\xe0").to_owned());
    assert_eq!(decoded_names(&held), want);

    let before = a.store().summary(a.id).await.unwrap();
    for _ in 0..2 {
        let again = index(&a.engine, &root).await;
        assert_eq!((again.created, again.updated, again.deleted), (0, 0, 0));
        assert_eq!(again.entries, expected);
    }
    assert_same_summary(&before, &a.store().summary(a.id).await.unwrap());
    shutdown(&devices).await;
}

fn assert_same_summary(before: &OwnerSummary, after: &OwnerSummary) {
    assert_eq!(
        (after.seq, after.entries, after.tombstones),
        (before.seq, before.entries, before.tombstones),
        "a rescan of an unchanged folder changed the library"
    );
    assert_eq!(after.fingerprint, before.fingerprint);
}

/// A non-UTF-8 name indexed on A reaches B as A stored it (as individual
/// changes, and in a snapshot, which refuses names over 1,024 bytes: the
/// 255-byte undecodable name must fit), a rescan on A then adds nothing
/// and B still holds exactly what A holds.
async fn non_utf8_names_reach_a_peer(snapshot: bool) {
    let devices = spawn_devices(2, |c| {
        if snapshot {
            c.thresholds.snapshot_from = 1;
        }
    })
    .await;
    let (a, b) = (&devices[0], &devices[1]);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("odd");
    make_odd_tree(&root);
    index(&a.engine, &root).await;
    let mut events = a.engine.subscribe();
    connect(b, a).await;
    let started = wait_event(&mut events, WAIT, |e| {
        matches!(
            e,
            SyncEvent::TransferStarted {
                direction: Direction::Send,
                ..
            }
        )
    })
    .await;
    let want = if snapshot {
        Strategy::Snapshot
    } else {
        Strategy::Individual
    };
    assert!(matches!(
        started.last(),
        Some(SyncEvent::TransferStarted { strategy, .. }) if *strategy == want
    ));
    let held = a.store().summary(a.id).await.unwrap();
    wait_for_watermark(b, a.id, held.seq, WAIT).await;
    assert_converged(a, b).await;
    let location = own_locations(a).await.remove(0);
    let on_b = rows(b, &location).await;
    let names_b: BTreeSet<String> = on_b.iter().map(|e| e.name.clone()).collect();
    let names_a: BTreeSet<String> = rows(a, &location)
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names_b, names_a);
    assert!(decoded_names(&on_b).contains(OsStr::from_bytes(b"x\xfe")));

    let again = index(&a.engine, &root).await;
    assert_eq!((again.created, again.updated, again.deleted), (0, 0, 0));
    assert_same_summary(&held, &a.store().summary(a.id).await.unwrap());
    assert_converged(a, b).await;
    shutdown(&devices).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_names_reach_a_peer_as_individual_changes_and_rescans_add_nothing() {
    non_utf8_names_reach_a_peer(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_names_reach_a_peer_in_a_snapshot_and_rescans_add_nothing() {
    non_utf8_names_reach_a_peer(true).await;
}

/// A location stored under another spelling of its folder (a trailing
/// slash, a symlink) is the folder's location: indexing the folder reuses
/// it instead of making a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_stored_under_another_spelling_is_reused() {
    let devices = spawn_devices(1, |_| {}).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("music");
    let expected = make_tree(&root, 2, 3);
    let link = tmp.path().join("music-link");
    std::os::unix::fs::symlink(&root, &link).unwrap();
    let stored = Location {
        id: sync_core::LocationId::new_v7(),
        owner: a.id,
        path: format!("{}/", link.display()),
        name: "music".into(),
        seq: sync_core::Seq::ZERO,
        deleted: false,
    };
    a.engine
        .commit(vec![sync_storage::LocalChange::Location(stored.clone())])
        .await
        .unwrap();
    let first = index(&a.engine, &root).await;
    assert_eq!(first.location_id, stored.id);
    assert_eq!(first.created, expected);
    let again = index(&a.engine, &link).await;
    assert_eq!((again.location_id, again.created), (stored.id, 0));
    assert_eq!(own_locations(a).await.len(), 1);
    shutdown(&devices).await;
}

/// Two live entries with one name in one folder (what the lossy names
/// left behind) were never matched nor deleted: the newer is tombstoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_namesake_is_tombstoned_by_a_rescan() {
    let devices = spawn_devices(1, |_| {}).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("docs");
    let expected = make_tree(&root, 2, 3);
    index(&a.engine, &root).await;
    let location = own_locations(a).await.remove(0);
    let held = rows(a, &location).await;
    let file = held.iter().find(|e| e.name == "file-001.txt").unwrap();
    let twin = Entry {
        id: sync_core::EntryId::new_v7(),
        ..file.clone()
    };
    a.engine
        .commit(vec![sync_storage::LocalChange::Entry(twin.clone())])
        .await
        .unwrap();
    let again = index(&a.engine, &root).await;
    assert_eq!(
        (again.created, again.deleted, again.entries),
        (0, 1, expected)
    );
    let held = rows(a, &location).await;
    assert!(held.iter().any(|e| e.id == twin.id && e.deleted));
    assert!(held.iter().any(|e| e.id == file.id && !e.deleted));
    shutdown(&devices).await;
}

/// The live entries of `location` on `device` below (and with) `top`, by id.
async fn subtree(device: &Device, location: &Location, top: &str) -> Vec<Entry> {
    let held = rows(device, location).await;
    let top = held.iter().find(|e| e.name == top).unwrap().id;
    let mut ids = BTreeSet::from([top]);
    // Parents come before children in no particular order: iterate to a fixpoint.
    loop {
        let before = ids.len();
        for e in &held {
            if e.parent.is_some_and(|p| ids.contains(&p)) {
                ids.insert(e.id);
            }
        }
        if ids.len() == before {
            break;
        }
    }
    held.into_iter().filter(|e| ids.contains(&e.id)).collect()
}

/// A child whose metadata could not be read was taken for deleted and
/// tombstoned with everything below it. It is now kept as it was.
///
/// The failure is injected (`Faults::unreadable`): tests run as root,
/// and root reads metadata and lists folders through any permission bits,
/// so no real EACCES can be made here (nor an EIO without a broken disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_child_is_kept_with_its_subtree() {
    let unreadable = UnreadablePaths::default();
    let devices = spawn_devices(1, |c| c.faults.unreadable = unreadable.clone()).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("home");
    let expected = make_tree(&root, 3, 4);
    std::fs::create_dir(root.join("dir-000").join("inner")).unwrap();
    std::fs::write(root.join("dir-000").join("inner").join("deep.txt"), b"x").unwrap();
    let expected = expected + 2;
    index(&a.engine, &root).await;
    let location = own_locations(a).await.remove(0);
    let dir_before = subtree(a, &location, "dir-000").await;
    assert_eq!(dir_before.len(), 7);

    unreadable.fail_metadata(&root.join("dir-000"));
    unreadable.fail_metadata(&root.join("dir-001").join("file-000.txt"));
    // Really gone, but below an unreadable folder: nobody can tell.
    std::fs::remove_file(root.join("dir-000").join("file-003.txt")).unwrap();
    // Really gone and readable: deleted.
    std::fs::remove_file(root.join("dir-002").join("file-003.txt")).unwrap();
    let report = index(&a.engine, &root).await;
    assert_eq!((report.created, report.updated), (0, 1), "dir-002's mtime");
    assert_eq!(report.deleted, 1);
    assert_eq!((report.skipped, report.kept), (2, 8));
    assert_eq!(report.entries, expected - 1);
    assert_eq!(report.skipped_paths.len(), 2);
    assert_eq!(
        subtree(a, &location, "dir-000").await,
        dir_before,
        "kept unchanged"
    );

    // Readable again: what really went is deleted now, nothing else.
    unreadable.clear();
    let report = index(&a.engine, &root).await;
    assert_eq!((report.created, report.deleted, report.skipped), (0, 1, 0));
    assert_eq!(report.entries, expected - 2);
    shutdown(&devices).await;
}

/// A folder that could not be listed kept nothing of what was stored
/// below it once its children were taken for deleted; they are kept,
/// while its readable siblings are indexed as usual. Injected for the
/// reason given at [`unreadable_child_is_kept_with_its_subtree`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlistable_folder_keeps_its_stored_children() {
    let unreadable = UnreadablePaths::default();
    let devices = spawn_devices(1, |c| c.faults.unreadable = unreadable.clone()).await;
    let a = &devices[0];
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("work");
    let expected = make_tree(&root, 2, 5);
    index(&a.engine, &root).await;
    let location = own_locations(a).await.remove(0);
    let before = subtree(a, &location, "dir-001").await;

    unreadable.fail_listing(&root.join("dir-001"));
    std::fs::write(root.join("dir-000").join("new.txt"), b"new").unwrap();
    let report = index(&a.engine, &root).await;
    assert_eq!((report.created, report.deleted), (1, 0));
    assert_eq!((report.skipped, report.kept), (1, 5));
    assert_eq!(report.entries, expected + 1);
    assert_eq!(subtree(a, &location, "dir-001").await, before);
    shutdown(&devices).await;
}

/// The same with a real failure, in a process of its own: run as user
/// `nobody` (root reads through permission bits), a folder of mode 0444
/// lists its children's names, but every `symlink_metadata` of them fails
/// with EACCES. They and what lies below them are kept, not tombstoned.
#[test]
fn children_whose_metadata_a_user_cannot_read_are_kept_as_that_user() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    // `nobody` makes the device's data directory here.
    mode(tmp.path(), 0o777).unwrap();
    let (data, tree) = (tmp.path().join("data"), tmp.path().join("tree"));
    let hidden = tree.join("hidden");
    std::fs::create_dir_all(tree.join("ok")).unwrap();
    std::fs::create_dir_all(hidden.join("sub")).unwrap();
    for file in ["ok/a.txt", "hidden/b.txt", "hidden/sub/c.txt"] {
        std::fs::write(tree.join(file), file).unwrap();
    }
    let lsync = |args: &[&str]| -> serde_json::Value {
        let mut cmd = Command::new("setpriv");
        if is_root() {
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        }
        let out = cmd
            .arg(env!("CARGO_BIN_EXE_lsync-chaos"))
            .arg("--data")
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "lsync {args:?}: {stderr}");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let index = || lsync(&["index", tree.to_str().unwrap(), "--json"]);
    lsync(&["init", "--name", "a"]);
    assert_eq!(index()["entries"], 7);

    mode(&hidden, 0o444).unwrap();
    let second = index();
    mode(&hidden, 0o755).unwrap();
    assert_eq!(second["skipped"], 2, "{second}");
    assert_eq!(second["kept"], 3, "b.txt, sub and sub/c.txt: {second}");
    assert_eq!(second["deleted"], 0, "{second}");
    assert_eq!(second["entries"], 7, "{second}");
    let third = index();
    assert_eq!(
        (&third["created"], &third["skipped"]),
        (&0.into(), &0.into())
    );
}

/// True when the tests run as root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    })
}
