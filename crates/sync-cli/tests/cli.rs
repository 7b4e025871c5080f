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

/// Two devices of one library that pin each other, paired the way the
/// README says: `invite` on A, `join` on a fresh B, `join` of B's reply on A.
fn pair() -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&a, &["init", "--name", "a"]);
    let invite = ok(&a, &["invite"]).trim().to_string();
    let joined = ok_json(&b, &["join", &invite, "--name", "b", "--json"]);
    let reply = joined["reply"].as_str().unwrap().to_string();
    let out = ok(&a, &["join", &reply]);
    assert!(out.contains("paired"), "{out}");
    let id_a = ok_json(&a, &["id", "--json"]);
    Pair {
        _tmp: tmp,
        a,
        b,
        a_id: id_a["device_id"].as_str().unwrap().to_string(),
    }
}

/// `lsync id --json` of a device: (device id, fingerprint).
fn id_of(data: &Path) -> (String, String) {
    let v = ok_json(data, &["id", "--json"]);
    (
        v["device_id"].as_str().unwrap().to_string(),
        v["fingerprint"].as_str().unwrap().to_string(),
    )
}

/// The pins of a device, as (device id, fingerprint).
fn pins(data: &Path) -> Vec<(String, String)> {
    let v = ok_json(data, &["trusted", "--json"]);
    v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["device_id"].as_str().unwrap().to_string(),
                p["fingerprint"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Runs a command that must fail with one line on stderr; returns it.
fn fails(data: &Path, args: &[&str]) -> String {
    let out = run(data, args);
    assert!(!out.status.success(), "lsync {args:?} succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error:"), "{stderr}");
    stderr
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
    for field in [
        "fingerprint",
        "digest",
        "records",
        "entries",
        "tombstones",
        "seq",
        "index_id",
    ] {
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
    let out = ok_json(&pair.b, &["connect", &addr, "--until-synced", "--json"]);
    // Fewer than 100 changes travel one by one, and are counted as such.
    assert_eq!(out["strategy"], "individual", "{out}");
    assert_eq!(out["records"], 26, "{out}");
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
        (
            vec![
                "trust",
                "zz",
                "--device",
                "01a2342c-9821-7491-966f-a43b9e6316f9",
            ],
            "fingerprint",
        ),
        (vec!["join", "lsync-aaaa"], "pairing string"),
        (vec!["untrust", "nobody"], "neither"),
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
    make_world_writable(tmp.path());
    // The device belongs to the user who runs lsync: its files are owner-only.
    let as_user = |args: &[&str]| -> Output {
        let mut cmd = if is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_lsync"));
            c
        } else {
            lsync()
        };
        let out = cmd.arg("--data").arg(&data).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    as_user(&["init", "--name", "a"]);
    let index = |_: &Path| -> Value {
        let out = as_user(&["index", tree.to_str().unwrap(), "--json"]);
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

/// `serve` with its log (stderr, `info`) written to `log`.
fn serve_logged(data: &Path, addr: &str, log: &Path) -> Server {
    let child = lsync()
        .arg("--data")
        .arg(data)
        .args(["serve", "--listen", addr])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

/// Waits until `log` holds a line containing `needle`.
fn wait_log(log: &Path, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} never logged; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn invite_then_join_pairs_two_devices_that_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&a, &["init", "--name", "a"]);
    ok_json(&a, &["generate", "--entries", "3000", "--json"]);
    let addr = free_addr();
    let invite = ok_json(&a, &["invite", "--address", &addr, "--json"]);
    let (a_id, a_fp) = id_of(&a);
    assert_eq!(invite["device_id"], a_id.as_str());
    assert_eq!(invite["fingerprint"], a_fp.as_str());
    assert_eq!(invite["address"], addr.as_str());
    let text = invite["invite"].as_str().unwrap();
    assert!(text.starts_with("lsync-"), "{text}");

    // `join` on a fresh data directory creates the device in A's library.
    let joined = ok_json(&b, &["join", text, "--name", "b", "--json"]);
    assert_eq!(joined["created"], true);
    assert_eq!(joined["library_id"], invite["library_id"]);
    assert_eq!(joined["pinned"]["device_id"], a_id.as_str());
    assert_eq!(joined["pinned"]["address"], addr.as_str());
    let (b_id, b_fp) = id_of(&b);
    assert_eq!(pins(&b), vec![(a_id.clone(), a_fp.clone())]);
    assert_eq!(
        joined["trust_command"],
        format!("lsync trust {b_fp} --device {b_id}").as_str()
    );
    // The text output tells the user what to run on A.
    let again = ok(&b, &["join", text]);
    assert!(again.contains("already pinned"), "{again}");
    assert!(again.contains("join lsync-"), "{again}");
    assert!(
        again.contains(&format!("trust {b_fp} --device {b_id}")),
        "{again}"
    );
    assert!(again.contains(&format!("connect {addr}")), "{again}");

    // Before A pins B back, B is refused.
    let _server = serve(&a, &addr);
    fails(&b, &["connect", &addr, "--until-synced", "--timeout", "10"]);
    let out = ok(&a, &["join", joined["reply"].as_str().unwrap()]);
    assert!(out.contains("paired"), "{out}");
    assert_eq!(pins(&a), vec![(b_id.clone(), b_fp.clone())]);
    // A running `serve` takes the new pin without a restart.
    let synced = ok_json(&b, &["connect", &addr, "--until-synced", "--json"]);
    assert_eq!(synced["peer"], a_id.as_str());
    let pair = Pair {
        _tmp: tmp,
        a: a.clone(),
        b: b.clone(),
        a_id,
    };
    assert_same_owner_state(&pair);
    assert_eq!(owner_status(&b, &pair.a_id)["entries"], 3000);
}

#[test]
fn join_refuses_a_mistyped_string_another_library_and_its_own_invite() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    ok(&a, &["init", "--name", "a"]);
    let invite = ok(&a, &["invite"]).trim().to_string();
    // One character changed: refused, and nothing is created.
    let mut typo = invite.clone().into_bytes();
    let i = typo.len() / 2;
    typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let e = fails(&b, &["join", &typo]);
    assert!(e.contains("checksum") && e.contains("mistyped"), "{e}");
    assert!(
        !b.join("library.db").exists(),
        "a refused join created a device"
    );
    let e = fails(&b, &["join", &invite[..invite.len() - 3]]);
    assert!(e.contains("pairing string"), "{e}");
    // A device of another library cannot join.
    ok(&c, &["init", "--name", "c"]);
    let e = fails(&c, &["join", &invite]);
    assert!(e.contains("library"), "{e}");
    assert!(pins(&c).is_empty());
    // `init --library` on a device of another library is refused too
    // (it used to succeed silently, keeping the old library).
    let library = ok_json(&a, &["invite", "--json"])["library_id"]
        .as_str()
        .unwrap()
        .to_string();
    let e = fails(&c, &["init", "--library", &library]);
    assert!(e.contains("cannot move"), "{e}");
    // A device does not pin itself.
    let e = fails(&a, &["join", &invite]);
    assert!(e.contains("own"), "{e}");
    assert!(pins(&a).is_empty());
    // A bad address is refused before anything is printed.
    let e = fails(&a, &["invite", "--address", "no port"]);
    assert!(e.contains("HOST:PORT"), "{e}");
}

#[test]
fn trust_needs_a_device_id_and_never_rebinds_or_pins_itself() {
    let pair = pair();
    let (a_id, a_fp) = id_of(&pair.a);
    let (b_id, b_fp) = id_of(&pair.b);
    let other_fp = "ab".repeat(32);
    let other_id = "01a2342c-9821-7491-966f-a43b9e6316f9";
    // No more pins without a device id.
    let out = run(&pair.a, &["trust", &other_fp]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // B's certificate is pinned to B: re-trusting it as another id fails.
    let e = fails(&pair.a, &["trust", &b_fp, "--device", other_id]);
    assert!(e.contains("already pinned") && e.contains("untrust"), "{e}");
    // B's id is pinned to B's certificate: another certificate cannot claim it.
    let e = fails(&pair.a, &["trust", &other_fp, "--device", &b_id]);
    assert!(e.contains("already pinned") && e.contains(&b_fp), "{e}");
    // Never our own id, nor our own certificate.
    let e = fails(&pair.a, &["trust", &other_fp, "--device", &a_id]);
    assert!(e.contains("this device"), "{e}");
    let e = fails(&pair.a, &["trust", &a_fp, "--device", other_id]);
    assert!(e.contains("own"), "{e}");
    assert_eq!(pins(&pair.a), vec![(b_id.clone(), b_fp.clone())]);
    // The same pin again is fine; after an explicit untrust, B's id can be
    // pinned to a new certificate.
    ok(&pair.a, &["trust", &b_fp, "--device", &b_id]);
    let out = ok(&pair.a, &["untrust", &b_id]);
    assert!(out.contains(&b_fp), "{out}");
    fails(&pair.a, &["untrust", &b_id]);
    ok(&pair.a, &["trust", &other_fp, "--device", &b_id]);
    assert_eq!(pins(&pair.a), vec![(b_id, other_fp.clone())]);
    ok(&pair.a, &["untrust", &other_fp]);
    assert!(pins(&pair.a).is_empty());
}

#[test]
fn concurrent_lsync_trust_processes_keep_every_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let n = 12;
    let children: Vec<(Child, String, String)> = (0..n)
        .map(|i| {
            let fp = format!("{i:02x}").repeat(32);
            let dev = format!("01a2342c-9821-7491-966f-a43b9e63{i:04x}");
            let child = lsync()
                .arg("--data")
                .arg(&a)
                .args(["trust", &fp, "--device", &dev])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (child, fp, dev)
        })
        .collect();
    let mut want = Vec::new();
    for (child, fp, dev) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        want.push((dev, fp));
    }
    let mut got = pins(&a);
    got.sort();
    want.sort();
    assert_eq!(got, want, "a concurrent `lsync trust` lost a pin");
    // Nothing but the store and its lock file beside the data.
    let leftovers: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("trust") && n != "trust.json" && n != "trust.json.lock")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn untrust_while_serving_closes_the_session_and_the_peer_cannot_reconnect() {
    let pair = pair();
    let (b_id, _) = id_of(&pair.b);
    let addr = free_addr();
    let log = pair.a.join("serve.log");
    let _server = serve_logged(&pair.a, &addr, &log);
    // B stays connected (no --until-synced).
    let connected = Server(
        lsync()
            .arg("--data")
            .arg(&pair.b)
            .args(["connect", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_log(&log, "peer connected", Duration::from_secs(30));
    ok(&pair.a, &["untrust", &b_id]);
    // The running server notices within its poll and closes at once.
    wait_log(&log, "trust revoked", Duration::from_secs(5));
    wait_log(
        &log,
        "refusing unpinned certificate",
        Duration::from_secs(10),
    );
    // One engine per library: B's first `connect` must end before another.
    drop(connected);
    let e = fails(
        &pair.b,
        &["connect", &addr, "--until-synced", "--timeout", "5"],
    );
    assert!(e.contains("does not trust"), "{e}");
}

#[test]
fn a_trust_file_with_pins_without_device_ids_is_refused_until_fixed() {
    let pair = pair();
    let (a_id, a_fp) = id_of(&pair.a);
    // What an older `lsync trust FP` (without --device) wrote.
    std::fs::write(
        pair.b.join("trust.json"),
        format!(r#"{{"version":1,"peers":[{{"fingerprint":"{a_fp}","device":null}}]}}"#),
    )
    .unwrap();
    let addr = free_addr();
    let _server = serve(&pair.a, &addr);
    let e = fails(&pair.b, &["connect", &addr, "--until-synced"]);
    assert!(e.contains("no device id"), "{e}");
    assert!(e.contains(&format!("lsync trust {a_fp} --device")), "{e}");
    // `trusted` shows the problem; the fix it names works.
    let listed = ok_json(&pair.b, &["trusted", "--json"]);
    assert_eq!(listed["peers"].as_array().unwrap().len(), 0);
    assert_eq!(listed["problems"].as_array().unwrap().len(), 1);
    ok(&pair.b, &["trust", &a_fp, "--device", &a_id]);
    ok_json(&pair.b, &["connect", &addr, "--until-synced", "--json"]);
}

#[test]
fn a_device_key_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let identity = a.join("identity");
    let key = identity.join("device.key");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&identity), 0o700);
    assert_eq!(mode(&key), 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["id"],
        vec!["invite"],
        vec!["connect", "127.0.0.1:1", "--until-synced"],
    ] {
        let e = fails(&a, &args);
        assert!(
            e.contains(&format!("chmod 600 {}", key.display())),
            "{args:?}: {e}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    ok(&a, &["id"]);
}

/// F1: an address with shell metacharacters or invisible Unicode format
/// characters is refused by `invite --address` and `join --address`, and
/// the command `join` prints to paste into a shell holds only checked
/// values, the data directory shell-quoted.
#[test]
fn f1_invite_refuses_shell_injection_addresses_and_join_prints_only_checked_values() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b dir;$(x)");
    ok(&a, &["init", "--name", "a"]);
    for bad in [
        "x;touch${IFS}pwned;:1",
        "$(id>pwned)x:1",
        "a`id`|sh&:1",
        "192.168.1.20\u{202e}0077:7700",
        "10.0.0.1\u{200b}:7700",
        "127.0.0.1:7700:1",
    ] {
        let e = fails(&a, &["invite", "--address", bad]);
        assert!(e.contains("HOST:PORT"), "{bad:?}: {e}");
        assert!(
            e.chars()
                .all(|c| c == '\n' || (c.is_ascii() && !c.is_control())),
            "the refusal shows it escaped: {e:?}"
        );
    }
    let invite = ok(&a, &["invite", "--address", "127.0.0.1:7700"])
        .trim()
        .to_string();
    let e = fails(&b, &["join", &invite, "--address", "a`id`|sh&:1"]);
    assert!(e.contains("HOST:PORT"), "{e}");
    let out = ok(&b, &["join", &invite, "--name", "b"]);
    let quoted = format!("'{}'", b.display());
    assert!(
        out.contains(&format!(
            "lsync --data {quoted} connect 127.0.0.1:7700 --until-synced"
        )),
        "{out}"
    );
}

/// `lsync CMD` on `data` started in the background, stdout piped.
fn spawn_cmd(data: &Path, args: &[&str]) -> Child {
    lsync()
        .arg("--data")
        .arg(data)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a background command; its stdout as JSON.
fn finish_json(child: Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Issue 13 item 2: one engine per data directory, and the commands that
/// change a library run inside the engine that holds it (over its control
/// socket), so two processes never hand out one seq twice.
#[test]
fn commands_reach_the_serving_engine_and_a_second_engine_is_refused() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let pair = pair();
    let addr = free_addr();
    let mut server = serve(&pair.a, &addr);
    let pid = server.0.id().to_string();

    let second = run(&pair.a, &["serve", "--listen", &free_addr()]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second engine started");
    assert!(
        stderr.contains("in use by another engine") && stderr.contains(&pid),
        "{stderr}"
    );
    let socket = pair.a.join("control.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Three commands at once, all inside the serving engine.
    let tree = pair.a.parent().unwrap().join("tree");
    for i in 0..120 {
        write(&tree.join(format!("d{}/f{i}.txt", i % 7)), i);
    }
    let tree_arg = tree.to_str().unwrap().to_string();
    let g1 = spawn_cmd(
        &pair.a,
        &["generate", "--entries", "20000", "--seed", "1", "--json"],
    );
    let g2 = spawn_cmd(
        &pair.a,
        &["generate", "--entries", "5000", "--seed", "2", "--json"],
    );
    let ix = spawn_cmd(&pair.a, &["index", &tree_arg, "--json"]);
    let (g1, g2, ix) = (finish_json(g1), finish_json(g2), finish_json(ix));
    assert_eq!(g1["entries"], 20000);
    assert_eq!(g2["entries"], 5000);
    assert_eq!(ix["entries"], 128, "{ix}");

    let status = ok_json(&pair.a, &["status", "--json"]);
    assert_eq!(status["serving"], true, "{status}");
    let mine = owner_status(&pair.a, &pair.a_id);
    // Every change got its own seq: 2 locations + 25,000 entries from
    // `generate`, a location + 128 entries from `index`.
    assert_eq!(mine["seq"], 20_001 + 5_001 + 129, "{mine}");
    assert_eq!(mine["entries"], 25_000 + 128, "{mine}");

    // Pins change through the engine too.
    let fp = "ab".repeat(32);
    let dev = "01a2342c-9821-7491-966f-a43b9e630001";
    let out = ok(&pair.a, &["trust", &fp, "--device", dev]);
    assert!(out.contains("trusted"), "{out}");
    assert!(pins(&pair.a).iter().any(|(d, _)| d == dev));
    ok(&pair.a, &["untrust", dev]);
    assert!(!pins(&pair.a).iter().any(|(d, _)| d == dev));

    // B gets it all from the serving engine.
    ok_json(
        &pair.b,
        &[
            "connect",
            &addr,
            "--until-synced",
            "--json",
            "--timeout",
            "60",
        ],
    );
    assert_same_owner_state(&pair);

    // A killed engine leaves its socket behind: commands run locally.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    assert!(socket.exists(), "SIGKILL cannot remove the socket");
    let status = ok_json(&pair.a, &["status", "--json"]);
    assert_eq!(status["serving"], false, "{status}");
    let again = ok_json(&pair.a, &["index", &tree_arg, "--json"]);
    assert_eq!(again["created"], 0, "{again}");
    assert_eq!(again["entries"], 128, "{again}");
}

/// Issue 14: while a session is up, `status` on either side says how the
/// peer's copies compare, verified by content digests.
#[test]
fn status_shows_copies_verified_identical_with_a_connected_peer() {
    let pair = pair();
    ok_json(
        &pair.a,
        &["generate", "--entries", "3000", "--seed", "4", "--json"],
    );
    ok_json(
        &pair.b,
        &["generate", "--entries", "50", "--seed", "5", "--json"],
    );
    let addr = free_addr();
    let _server = serve(&pair.a, &addr);
    let connect = spawn_cmd(&pair.b, &["connect", &addr]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = ok(&pair.a, &["status"]);
        if text.contains("my records: verified identical at 3001")
            && text.contains("its records: verified identical at 51")
        {
            break text;
        }
        assert!(Instant::now() < deadline, "never verified:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let digest_of = |data: &Path, owner: &str| owner_status(data, owner)["digest"].clone();
    assert!(
        text.contains(&digest_of(&pair.a, &pair.a_id).as_str().unwrap()[..16]),
        "{text}"
    );
    let json = ok_json(&pair.a, &["status", "--json"]);
    let peer = &json["peers"][0];
    assert!(
        peer["verification"].to_string().contains("Identical"),
        "{peer}"
    );
    let mut connect = connect;
    connect.kill().unwrap();
    connect.wait().unwrap();
    assert_same_owner_state(&pair);
}

/// Bad input on the control socket: a malformed request and one longer
/// than the limit each get one `failed` answer and change nothing; the
/// engine goes on serving commands.
#[test]
fn the_control_socket_refuses_malformed_and_oversized_requests() {
    use std::io::{BufRead, BufReader, Write};
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let _server = serve(&a, &free_addr());
    let ask = |bytes: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(a.join("control.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = s.write_all(bytes);
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    };
    let malformed = ask(b"{\"command\": \"rm -rf\"}\n");
    assert!(
        malformed.contains("failed") && malformed.contains("malformed control request"),
        "{malformed}"
    );
    let mut huge = vec![b'x'; 70 * 1024];
    huge.push(b'\n');
    let oversized = ask(&huge);
    assert!(oversized.contains("longer than"), "{oversized}");
    let status = ok_json(&a, &["status", "--json"]);
    assert_eq!(status["serving"], true, "{status}");
    assert_eq!(status["owners"][0]["seq"], 0, "{status}");
}

/// One request line sent on `data`'s control socket; the answer's frames
/// up to `done` or `failed` (or the end of the connection).
fn ask_socket(data: &Path, request: &str) -> Vec<Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(data.join("control.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut frames = Vec::new();
    for line in BufReader::new(s).lines() {
        let frame: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let end = frame["frame"] == "done" || frame["frame"] == "failed";
        frames.push(frame);
        if end {
            break;
        }
    }
    frames
}

/// Attack: clients that connect to the control socket and never send a
/// request (a slow loris, or a stuck script). They held the command slots
/// until their 10 s deadline, so a real command hung behind them; now a
/// connection waiting for its request holds no slot, and past the bound of
/// open connections a new one is refused at once instead of hanging.
#[test]
fn idle_control_clients_cannot_starve_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let _server = serve(&a, &free_addr());
    let socket = a.join("control.sock");
    let mut idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    let started = Instant::now();
    let status = ok_json(&a, &["status", "--json"]);
    assert_eq!(status["serving"], true, "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "status waited {:?} behind idle clients",
        started.elapsed()
    );

    // Past the bound: refused at once, saying why.
    idle.extend((0..64).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()));
    let started = Instant::now();
    let out = run(&a, &["status", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("too many control connections"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(idle);
}

/// Attack: a request naming a relative path (the engine would resolve it
/// against its own working directory, not the client's) or a NUL byte is
/// refused; any absolute name, non-UTF-8 bytes included, is indexed.
#[test]
fn a_relative_index_path_over_the_socket_is_refused_and_any_absolute_name_works() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let _server = serve(&a, &free_addr());
    for path in [&b"."[..], b"tree", b"/tmp/a\0b"] {
        let request = serde_json::json!({"command": "index", "path": path, "json": true});
        let frames = ask_socket(&a, &request.to_string());
        let last = frames.last().unwrap();
        assert_eq!(last["frame"], "failed", "{path:?}: {frames:?}");
        let error = last["error"].as_str().unwrap();
        assert!(
            error.contains("relative") || error.contains("NUL"),
            "{error}"
        );
    }
    let status = ok_json(&a, &["status", "--json"]);
    assert_eq!(
        status["owners"][0]["seq"], 0,
        "nothing was indexed: {status}"
    );

    let odd = tmp
        .path()
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9 tree"));
    write(&odd.join("f.txt"), 3);
    let out = lsync()
        .arg("--data")
        .arg(&a)
        .arg("index")
        .arg(&odd)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["entries"], 2, "{report}");
}

/// Attack: a command in the moment a `serve` has taken the library's lock
/// but not yet bound its socket (or a serve that never binds one) used to
/// fail at once with "in use". It now waits for the socket a few seconds,
/// and if none comes, says the engine takes no commands.
#[test]
fn a_command_during_serve_startup_waits_for_its_socket() {
    use std::io::{BufRead, BufReader, Write};
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    // This process plays the engine: it holds the library...
    let lock = sync_storage::DirLock::acquire(&a).unwrap();
    let started = Instant::now();
    let out = run(&a, &["generate", "--entries", "10"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("in use by another engine")
            && stderr.contains(&format!("pid {}", std::process::id()))
            && stderr.contains("no control socket"),
        "{stderr}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "it did not wait"
    );

    // ...and binds its socket only after the command started.
    // (Left to itself it gives up within seconds.)
    let mut child = spawn_cmd(&a, &["generate", "--entries", "10", "--json"]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command gave up before the engine listened"
    );
    let listener = std::os::unix::net::UnixListener::bind(a.join("control.sock")).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    let mut request = String::new();
    BufReader::new(conn.try_clone().unwrap())
        .read_line(&mut request)
        .unwrap();
    assert!(request.contains("\"generate\""), "{request}");
    conn.write_all(
        b"{\"frame\":\"line\",\"text\":\"{\\\"answered\\\":true}\"}\n{\"frame\":\"done\"}\n",
    )
    .unwrap();
    drop(conn);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["answered"], true);
    drop(lock);
}

/// Attack: a script reading `status --json` got `serving` only while an
/// engine ran (absent otherwise). Both cases now have one shape:
/// `serving`, `engine_pid` and `peers` always there.
#[test]
fn status_json_has_one_shape_serving_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok(&a, &["init", "--name", "a"]);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let idle = ok_json(&a, &["status", "--json"]);
    assert_eq!(idle["serving"], false, "{idle}");
    assert!(
        idle["engine_pid"].is_null() && idle["peers"].is_null(),
        "{idle}"
    );
    let server = serve(&a, &free_addr());
    let serving = ok_json(&a, &["status", "--json"]);
    assert_eq!(serving["serving"], true, "{serving}");
    assert_eq!(serving["engine_pid"], server.0.id(), "{serving}");
    assert!(serving["peers"].is_array(), "{serving}");
    assert_eq!(keys(&idle), keys(&serving));
    // Held without a socket (it was removed): the pid, peers unknown.
    std::fs::remove_file(a.join("control.sock")).unwrap();
    let held = ok_json(&a, &["status", "--json"]);
    assert_eq!(held["serving"], true, "{held}");
    assert_eq!(held["engine_pid"], server.0.id(), "{held}");
    assert!(held["peers"].is_null(), "{held}");
    assert_eq!(keys(&idle), keys(&held));
}
