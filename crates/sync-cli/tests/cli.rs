//! Process-level tests of the `lsync` binary: two devices on loopback,
//! a real folder tree indexed, changed and re-synced, a SIGKILL in the
//! middle of a large transfer, an untrusted device, and bad input.
//!
//! These live beside the binary (not in the workspace `tests/` crate)
//! because only here does cargo hand a test the binary's path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn lsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lsync"));
    c.env_remove("RUST_LOG");
    c
}

fn run(data: &Path, args: &[&str]) -> Output {
    lsync()
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run lsync")
}

fn ok_json(data: &Path, args: &[&str]) -> Value {
    let out = run(data, args);
    assert!(
        out.status.success(),
        "lsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lsync {args:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = run(data, args);
    assert!(
        out.status.success(),
        "lsync {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (bound then released).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Pair {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    a_id: String,
}

/// Two devices of one library that trust each other, set up with the CLI.
fn pair() -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let out = ok(&a, &["init", "--name", "a"]);
    let library = out
        .lines()
        .find_map(|l| l.strip_prefix("library_id"))
        .unwrap()
        .trim()
        .to_string();
    ok(&b, &["init", "--name", "b", "--library", &library]);
    let id_a = ok_json(&a, &["id", "--json"]);
    let id_b = ok_json(&b, &["id", "--json"]);
    let fp = |v: &Value| v["fingerprint"].as_str().unwrap().to_string();
    let dev = |v: &Value| v["device_id"].as_str().unwrap().to_string();
    assert_eq!(fp(&id_a).len(), 64);
    ok(&a, &["trust", &fp(&id_b), "--device", &dev(&id_b)]);
    // B learns A's device id at the first handshake.
    ok(&b, &["trust", &fp(&id_a)]);
    Pair {
        _tmp: tmp,
        a,
        b,
        a_id: dev(&id_a),
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data: &Path, addr: &str) -> Server {
    let child = lsync()
        .arg("--data")
        .arg(data)
        .args(["serve", "--listen", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it accepts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

/// The status entry of `owner` on a device.
fn owner_status(data: &Path, owner: &str) -> Value {
    let status = ok_json(data, &["status", "--json"]);
    status["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["device_id"] == owner)
        .cloned()
        .unwrap_or(Value::Null)
}

fn assert_same_owner_state(pair: &Pair) {
    let on_a = owner_status(&pair.a, &pair.a_id);
    let on_b = owner_status(&pair.b, &pair.a_id);
    assert_eq!(on_a["local"], true);
    assert_eq!(on_b["local"], false);
    for field in ["fingerprint", "entries", "tombstones", "seq", "index_id"] {
        assert_eq!(
            on_a[field], on_b[field],
            "{field} differs: {on_a} vs {on_b}"
        );
    }
}

fn write(path: &Path, bytes: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, vec![b'x'; bytes]).unwrap();
}

#[test]
fn two_devices_sync_a_real_folder_then_its_changes() {
    let pair = pair();
    let tree = tempfile::tempdir().unwrap();
    for d in 0..5 {
        for f in 0..20 {
            write(
                &tree.path().join(format!("dir{d}/sub/file{f}.txt")),
                d * 100 + f,
            );
        }
    }
    std::os::unix::fs::symlink("dir0", tree.path().join("link")).unwrap();
    let path = tree.path().to_str().unwrap();
    let report = ok_json(&pair.a, &["index", path, "--json"]);
    // 1 root + 5 dirs + 5 subs + 100 files + 1 symlink.
    assert_eq!(report["entries"], 112);
    assert_eq!(report["created"], 112);
    for key in ["location_id", "updated", "deleted", "skipped", "seconds"] {
        assert!(report.get(key).is_some(), "index --json lacks {key}");
    }
    // Indexing again changes nothing and stamps no seq.
    let seq = owner_status(&pair.a, &pair.a_id)["seq"].clone();
    let again = ok_json(&pair.a, &["index", path, "--json"]);
    assert_eq!(
        (
            again["created"].clone(),
            again["updated"].clone(),
            again["deleted"].clone()
        ),
        (0.into(), 0.into(), 0.into())
    );
    assert_eq!(owner_status(&pair.a, &pair.a_id)["seq"], seq);

    let addr = free_addr();
    let _server = serve(&pair.a, &addr);
    let out = ok_json(&pair.b, &["connect", &addr, "--until-synced", "--json"]);
    assert_eq!(out["peer"], pair.a_id.as_str());
    for key in ["strategy", "records", "bytes", "seconds"] {
        assert!(out.get(key).is_some(), "connect --json lacks {key}");
    }
    assert_same_owner_state(&pair);

    // Create, modify and delete files; re-index while the server runs.
    write(&tree.path().join("dir9/new.txt"), 10);
    write(&tree.path().join("dir1/sub/file3.txt"), 5000);
    std::fs::remove_dir_all(tree.path().join("dir2")).unwrap();
    let report = ok_json(&pair.a, &["index", path, "--json"]);
    // dir9 and its file are new; file3 and the root folder (its mtime) changed.
    assert_eq!(report["created"], 2);
    assert_eq!(report["updated"], 2);
    assert_eq!(report["deleted"], 22);
    ok_json(&pair.b, &["connect", &addr, "--until-synced", "--json"]);
    assert_same_owner_state(&pair);
    assert_eq!(owner_status(&pair.b, &pair.a_id)["tombstones"], 22);
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_after_restart() {
    let pair = pair();
    ok_json(&pair.a, &["generate", "--entries", "300000", "--json"]);
    let addr = free_addr();
    let _server = serve(&pair.a, &addr);
    let mut child = lsync()
        .arg("--data")
        .arg(&pair.b)
        .args(["connect", &addr, "--until-synced", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill B once the transfer is under way: chunks on disk or rows applied.
    let incoming = pair.b.join("incoming");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = std::fs::read_dir(&incoming)
            .map(|d| d.count() > 0)
            .unwrap_or(false);
        if started {
            break;
        }
        assert!(Instant::now() < deadline, "transfer never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = ok_json(&pair.b, &["connect", &addr, "--until-synced", "--json"]);
    assert!(
        out["strategy"].as_str().unwrap().contains("snapshot"),
        "{out}"
    );
    assert_same_owner_state(&pair);
    assert_eq!(owner_status(&pair.b, &pair.a_id)["entries"], 300000);
}

#[test]
fn a_sender_killed_mid_transfer_is_restarted_and_the_sync_completes() {
    let pair = pair();
    ok_json(&pair.a, &["generate", "--entries", "60000", "--json"]);
    let addr = free_addr();
    let server = serve(&pair.a, &addr);
    let b = pair.b.clone();
    let addr2 = addr.clone();
    let receiver = std::thread::spawn(move || {
        run(
            &b,
            &[
                "connect",
                &addr2,
                "--until-synced",
                "--json",
                "--timeout",
                "120",
            ],
        )
    });
    // Kill the sender as soon as B holds some of A's records.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = owner_status(&pair.b, &pair.a_id);
        if held["seq"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(server); // SIGKILL
    let _server = serve(&pair.a, &addr);
    let out = receiver.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_owner_state(&pair);
}

#[test]
fn an_untrusted_device_is_refused_with_one_clear_line() {
    let pair = pair();
    let addr = free_addr();
    let _server = serve(&pair.a, &addr);
    let tmp = tempfile::tempdir().unwrap();
    let stranger = tmp.path().join("c");
    ok(&stranger, &["init", "--name", "c"]);
    let out = run(&stranger, &["connect", &addr, "--until-synced"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error:"), "{stderr}");
}

#[test]
fn bad_input_gets_one_clear_line_and_a_failure_exit() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    for args in [
        vec!["status", "--json"],
        vec!["connect", "127.0.0.1:1", "--until-synced"],
        vec!["index", "/definitely/not/a/folder"],
    ] {
        let out = run(&missing, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("init"),
            "{args:?} should say how to create a device: {stderr}"
        );
    }
    let pair = pair();
    for (args, needle) in [
        (
            vec!["connect", "127.0.0.1:1", "--until-synced"],
            "127.0.0.1:1",
        ),
        (
            vec!["connect", "not an address", "--until-synced"],
            "not an address",
        ),
        (vec!["trust", "zz"], "fingerprint"),
        (
            vec!["index", "/definitely/not/a/folder"],
            "/definitely/not/a/folder",
        ),
    ] {
        let out = run(&pair.a, &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unreadable_folder_is_skipped_reported_and_its_entries_kept() {
    // Permissions do not stop root: as root, index as user `nobody`.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tree = tmp.path().join("tree");
    write(&tree.join("ok/a.txt"), 1);
    write(&tree.join("locked/b.txt"), 1);
    write(&tree.join("locked/c.txt"), 1);
    ok(&data, &["init", "--name", "a"]);
    make_world_writable(tmp.path());
    let index = |data: &Path| -> Value {
        let mut cmd = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_lsync"));
            c
        } else {
            lsync()
        };
        let out = cmd
            .arg("--data")
            .arg(data)
            .args(["index", tree.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = index(&data);
    assert_eq!(first["entries"], 6);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let second = index(&data);
    std::fs::set_permissions(tree.join("locked"), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(second["skipped"], 1, "{second}");
    // What was indexed below the unreadable folder is kept, not deleted.
    assert_eq!(second["deleted"], 0, "{second}");
    assert_eq!(second["entries"], 6, "{second}");
}

fn make_world_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in walk(root) {
        let mode = if entry.is_dir() { 0o777 } else { 0o666 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if root.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
