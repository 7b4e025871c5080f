//! Hostile snapshot files: a peer's SQLite file rewritten as an attacker would.
//!
//! Each file starts as a real `export_snapshot` file and is rewritten with
//! SQL (views, triggers, virtual tables, extra objects, forged rows,
//! corrupt pages), then offered with its size and hashes recomputed so
//! every check is reached. Each must be refused with a typed snapshot
//! error, within a bounded time, with every row of every owner of the
//! receiving library unchanged (all fields, not only fingerprints).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use sync_core::{DeviceId, IndexId, Location, Record, Seq};
use tempfile::TempDir;

use crate::import::{open_untrusted, untrusted_err};
use crate::tests::{batch, device, entry, location, offer_file, populated};
use crate::*;

/// Longest a refusal may take (a hang guard; refusals take milliseconds).
const BOUND: Duration = Duration::from_secs(30);

/// A receiver holding its own rows and a third owner's, and a sender's
/// genuine snapshot.
struct Scene {
    dir: TempDir,
    a: Store,
    me: DeviceId,
    b: Store,
    b_loc: Location,
    c_recs: Vec<Record>,
    m: SnapshotManifest,
}

async fn scene() -> Scene {
    let dir = TempDir::new().unwrap();
    let (a, me) = populated(&dir, "a", 300).await;
    let (b, b_id) = device(&dir, "b").await;
    let b_loc = location(b_id, 0);
    b.commit_local(
        b_id,
        vec![
            LocalChange::Location(b_loc.clone()),
            LocalChange::Entry(entry(b_loc.id, 1, 0)),
            LocalChange::Entry(entry(b_loc.id, 2, 0)),
        ],
    )
    .await
    .unwrap();
    let c = DeviceId::new_v7();
    let (_, c_recs) = batch(c, 20);
    b.apply_batch(c, IndexId(9), Seq(0), Seq(21), c_recs.clone())
        .await
        .unwrap();
    let m = a.export_snapshot(me).await.unwrap();
    Scene {
        dir,
        a,
        me,
        b,
        b_loc,
        c_recs,
        m,
    }
}

/// Every row of every owner, every field, and the watermarks.
async fn dump(s: &Store) -> String {
    let mut out = format!("{:?}\n{:?}\n", s.summaries().await, s.watermarks().await);
    for l in s.locations().await.unwrap() {
        out += &format!("{l:?}\n");
        for e in s.location_entries(l.id).await.unwrap() {
            out += &format!("  {e:?}\n");
        }
    }
    out
}

fn x(bytes: [u8; 16]) -> String {
    format!("x'{}'", hex::encode(bytes))
}

impl Scene {
    /// A copy of the genuine snapshot with `sql` run on it.
    async fn rewrite(&self, name: &str, sql: &str) -> PathBuf {
        let to = self.dir.path().join(name);
        std::fs::copy(&self.m.path, &to).unwrap();
        let conn = sea_orm::Database::connect(format!("sqlite://{}", to.display()))
            .await
            .unwrap();
        conn.execute_unprepared(sql).await.unwrap();
        conn.close().await.unwrap();
        to
    }

    /// Offers `file` as the sender's snapshot; the library must not change.
    async fn refused(&self, file: &Path, records: u64) -> StorageError {
        let before = dump(&self.b).await;
        let started = Instant::now();
        let got = tokio::time::timeout(
            BOUND,
            offer_file(
                &self.b,
                file,
                self.me,
                self.m.index_id,
                self.m.max_seq,
                records,
            ),
        )
        .await
        .expect("refused within the bound");
        let e = got.expect_err("a hostile snapshot must be refused");
        assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
        assert_eq!(dump(&self.b).await, before, "the library changed: {e}");
        assert!(
            !matches!(e, StorageError::Db(_) | StorageError::Io(_)),
            "a snapshot fault, not the library's: {e:?}"
        );
        e
    }
}

fn is_schema(e: &StorageError) -> bool {
    matches!(e, StorageError::WrongSchema(_))
}

/// The reported attack: `location` and `entry` as views of two tables
/// switched on `total_changes()` showed honest rows to the checking
/// connection and forged ones (the receiver's location renamed and
/// tombstoned, a row under the receiver's owner, a third owner's entry
/// rewritten, a location of an unknown owner) to the writer's copy.
#[tokio::test]
async fn snapshot_views_switched_on_total_changes_are_refused() {
    let s = scene().await;
    let unknown = DeviceId::new_v7();
    let c_entry = match &s.c_recs[1] {
        Record::Entry(e) => e.clone(),
        Record::Location(_) => unreachable!(),
    };
    let sql = format!(
        "ALTER TABLE location RENAME TO location_real;
         ALTER TABLE entry RENAME TO entry_real;
         CREATE TABLE location_forged AS SELECT * FROM location_real;
         INSERT INTO location_forged VALUES ({bl}, {b}, '/pwned', 'pwned', 1, 1);
         INSERT INTO location_forged VALUES ({ul}, {u}, '/x', 'x', 1, 0);
         CREATE TABLE entry_forged AS SELECT * FROM entry_real;
         UPDATE entry_forged SET owner = {c}, id = {ce}, name = 'pwned', seq = 999999
           WHERE rowid = 1;
         CREATE VIEW location AS
           SELECT * FROM location_real WHERE total_changes() = 0
           UNION ALL SELECT * FROM location_forged WHERE total_changes() > 0;
         CREATE VIEW entry AS
           SELECT * FROM entry_real WHERE total_changes() = 0
           UNION ALL SELECT * FROM entry_forged WHERE total_changes() > 0;",
        bl = x(s.b_loc.id.to_bytes()),
        b = x(s.b_loc.owner.to_bytes()),
        ul = x(sync_core::LocationId::new_v7().to_bytes()),
        u = x(unknown.to_bytes()),
        c = x(c_entry.id.to_bytes()),
        ce = x(c_entry.id.to_bytes()),
    );
    let file = s.rewrite("views.db", &sql).await;
    let e = s.refused(&file, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
    assert!(e.to_string().contains("view `location`"), "{e}");
}

#[tokio::test]
async fn snapshot_triggers_are_refused() {
    let s = scene().await;
    let file = s
        .rewrite(
            "trigger.db",
            "CREATE TRIGGER t AFTER INSERT ON manifest BEGIN DELETE FROM entry; END;",
        )
        .await;
    let e = s.refused(&file, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
}

/// A virtual table named `entry` (fts5) or `location` (rtree): the module
/// would run code of its own on every read.
#[tokio::test]
async fn snapshot_virtual_tables_are_refused() {
    let s = scene().await;
    let fts = s
        .rewrite(
            "fts5.db",
            "ALTER TABLE entry RENAME TO entry_real;
             CREATE VIRTUAL TABLE entry USING fts5(id, owner, location, parent, name, kind,
               size, inode, created_at, modified_at, seq, deleted);
             INSERT INTO entry SELECT * FROM entry_real;
             DROP TABLE entry_real;",
        )
        .await;
    let e = s.refused(&fts, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
    let rtree = s
        .rewrite(
            "rtree.db",
            "CREATE VIRTUAL TABLE spatial USING rtree(id, x0, x1);",
        )
        .await;
    let e = s.refused(&rtree, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
}

#[tokio::test]
async fn snapshot_extra_objects_are_refused() {
    let s = scene().await;
    for (name, sql) in [
        ("index.db", "CREATE INDEX extra ON entry(name);"),
        ("table.db", "CREATE TABLE extra (x INTEGER);"),
        ("view.db", "CREATE VIEW extra AS SELECT 1;"),
        (
            "altered.db",
            // Same columns, other declarations: the SQL text differs.
            "ALTER TABLE manifest ADD COLUMN note TEXT;",
        ),
    ] {
        let file = s.rewrite(name, sql).await;
        let e = s.refused(&file, s.m.entries).await;
        assert!(is_schema(&e), "{name}: {e:?}");
    }
}

/// A view that never ends (a recursive CTE) or would run for hours (a
/// cross join) in place of a table: refused before anything reads it.
#[tokio::test]
async fn snapshot_never_ending_views_are_refused_in_bounded_time() {
    let s = scene().await;
    let endless = s
        .rewrite(
            "endless.db",
            "ALTER TABLE location RENAME TO location_real;
             CREATE VIEW location AS WITH RECURSIVE c(n) AS
               (SELECT 1 UNION ALL SELECT n + 1 FROM c)
               SELECT l.* FROM c, location_real l;",
        )
        .await;
    let e = s.refused(&endless, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
    let cross = s
        .rewrite(
            "cross.db",
            "ALTER TABLE entry RENAME TO entry_real;
             CREATE VIEW entry AS SELECT e1.* FROM entry_real e1, entry_real e2,
               entry_real e3, entry_real e4, entry_real e5;",
        )
        .await;
    let e = s.refused(&cross, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
}

/// The second line of defence: any statement on a downloaded file is
/// interrupted at its deadline (here a never-ending CTE and a cross join
/// run on the untrusted connection directly).
#[tokio::test]
async fn untrusted_queries_are_interrupted_at_their_deadline() {
    let s = scene().await;
    for sql in [
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c",
        "SELECT count(*) FROM entry a, entry b, entry c, entry d, entry e",
    ] {
        let started = Instant::now();
        let mut conn = open_untrusted(&s.m.path, started + Duration::from_millis(300))
            .await
            .unwrap();
        let got: std::result::Result<i64, _> =
            sea_orm::sqlx::query_scalar(sea_orm::sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut conn)
                .await;
        let e = got.expect_err("ran to the end");
        assert!(e.to_string().contains("interrupt"), "{sql}: {e}");
        assert!(started.elapsed() < Duration::from_secs(10), "{sql}");
        let e = untrusted_err(e, started);
        assert!(matches!(e, StorageError::BadSnapshot(_)), "{e:?}");
        assert!(e.to_string().contains("deadline"), "{e}");
    }
}

/// Rows with the exact schema but forged content: another owner's rows,
/// the receiver's own location id, a third owner's location id.
#[tokio::test]
async fn snapshot_rows_of_other_owners_are_refused() {
    let s = scene().await;
    let c_loc = match &s.c_recs[0] {
        Record::Location(l) => l.id,
        Record::Entry(_) => unreachable!(),
    };
    let cases = [
        (
            "other-owner.db",
            format!(
                "UPDATE location SET owner = {};",
                x(DeviceId::new_v7().to_bytes())
            ),
        ),
        (
            "receiver-location.db",
            format!(
                "UPDATE entry SET location = {bl}; UPDATE location SET id = {bl}, path = '/pwned';",
                bl = x(s.b_loc.id.to_bytes())
            ),
        ),
        (
            "third-location.db",
            format!(
                "UPDATE entry SET location = {cl}; UPDATE location SET id = {cl}, deleted = 1;",
                cl = x(c_loc.to_bytes())
            ),
        ),
        (
            "orphan.db",
            format!(
                "UPDATE entry SET location = {} WHERE id = (SELECT min(id) FROM entry);",
                x(sync_core::LocationId::new_v7().to_bytes())
            ),
        ),
        (
            "long-name.db",
            format!(
                "UPDATE entry SET name = '{}' WHERE id = (SELECT min(id) FROM entry);",
                "n".repeat(MAX_NAME_BYTES as usize + 1)
            ),
        ),
        (
            "text-seq.db",
            // INTEGER affinity keeps '12' an integer; a blob stays a blob.
            "UPDATE entry SET seq = x'0c' WHERE id = (SELECT min(id) FROM entry);".into(),
        ),
    ];
    for (name, sql) in cases {
        let file = s.rewrite(name, &sql).await;
        let e = s.refused(&file, s.m.entries).await;
        assert!(
            matches!(
                e,
                StorageError::ManifestMismatch(_) | StorageError::ForeignOwner { .. }
            ),
            "{name}: {e:?}"
        );
    }
}

/// An entry id of a third owner inside the sender's snapshot never
/// rewrites the third owner's row (upserts never cross owners), and the
/// whole import is refused: the sender's digest would otherwise count a
/// record that is not stored, and the third owner's lose one that is.
#[tokio::test]
async fn snapshot_entry_with_a_third_owners_id_leaves_it_alone() {
    let s = scene().await;
    let c_entry = match &s.c_recs[1] {
        Record::Entry(e) => e.clone(),
        Record::Location(_) => unreachable!(),
    };
    let c_owner = match &s.c_recs[0] {
        Record::Location(l) => l.owner,
        Record::Entry(_) => unreachable!(),
    };
    let before = s.b.summary(c_owner).await.unwrap();
    let file = s
        .rewrite(
            "steal.db",
            &format!(
                "UPDATE entry SET id = {}, name = 'pwned' WHERE id = (SELECT min(id) FROM entry);",
                x(c_entry.id.to_bytes())
            ),
        )
        .await;
    let mine_before = s.b.owner_digest(s.me).await.unwrap();
    let c_digest = s.b.owner_digest(c_owner).await.unwrap();
    let e = offer_file(&s.b, &file, s.me, s.m.index_id, s.m.max_seq, s.m.entries)
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::ForeignOwner { .. }), "{e:?}");
    assert_eq!(s.b.summary(c_owner).await.unwrap(), before);
    assert_eq!(s.b.owner_digest(s.me).await.unwrap(), mine_before);
    assert_eq!(s.b.owner_digest(c_owner).await.unwrap(), c_digest);
    assert_eq!(s.b.audit_digests().await.unwrap(), vec![]);
    let held = s.b.location_entries(c_entry.location).await.unwrap();
    let kept = held.iter().find(|e| e.id == c_entry.id).unwrap();
    assert_eq!(kept, &c_entry, "the third owner's entry is untouched");
}

/// A download changed after it was verified (between check and copy, the
/// old design's window): the import reads only its private copy, so the
/// honest content lands, never the replacement.
#[tokio::test]
async fn snapshot_changed_between_check_and_copy_imports_the_checked_bytes() {
    let s = scene().await;
    let forged = s
        .rewrite(
            "forged.db",
            "UPDATE entry SET name = 'pwned', seq = seq + 1;",
        )
        .await;
    let forged_bytes = std::fs::read(&forged).unwrap();
    s.b.set_import_hook(Some(Box::new(move |part: &Path| {
        std::fs::write(part, &forged_bytes).unwrap();
    })));
    crate::tests::transfer(&s.a, &s.m, &s.b).await.unwrap();
    s.b.set_import_hook(None);
    let (held, own) = (
        s.b.summary(s.me).await.unwrap(),
        s.a.summary(s.me).await.unwrap(),
    );
    assert_eq!(
        (held.fingerprint, held.entries, held.tombstones, held.seq),
        (own.fingerprint, own.entries, own.tombstones, own.seq)
    );
    for l in s.a.locations().await.unwrap() {
        assert_eq!(
            s.b.location_entries(l.id).await.unwrap(),
            s.a.location_entries(l.id).await.unwrap()
        );
    }
}

/// A page of the file damaged (hashes recomputed, so only SQLite can tell):
/// refused by `quick_check` or cell checks, never half-read.
#[tokio::test]
async fn snapshot_with_a_corrupt_page_is_refused() {
    let s = scene().await;
    let mut bytes = std::fs::read(&s.m.path).unwrap();
    let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
    let page = if page == 1 { 65_536 } else { page };
    assert!(bytes.len() > 6 * page, "{} bytes", bytes.len());
    // The header of the fourth page: a b-tree page of one of the tables.
    for b in &mut bytes[3 * page..3 * page + 12] {
        *b = 0xff;
    }
    let file = s.dir.path().join("corrupt.db");
    std::fs::write(&file, &bytes).unwrap();
    let e = s.refused(&file, s.m.entries).await;
    assert!(
        matches!(
            e,
            StorageError::BadSnapshot(_) | StorageError::WrongSchema(_)
        ),
        "{e:?}"
    );
}

/// Text in UTF-16: refused (every check assumes UTF-8).
#[tokio::test]
async fn snapshot_in_utf16_is_refused() {
    let s = scene().await;
    let file = s.dir.path().join("utf16.db");
    {
        let conn = sea_orm::Database::connect(format!("sqlite://{}?mode=rwc", file.display()))
            .await
            .unwrap();
        conn.execute_unprepared("PRAGMA encoding = 'UTF-16le'")
            .await
            .unwrap();
        for sql in crate::migration::SNAPSHOT_SCHEMA {
            conn.execute_unprepared(sql).await.unwrap();
        }
        // The genuine manifest row (rows are not needed: the encoding is
        // refused before anything is counted).
        conn.execute_unprepared(&format!(
            "INSERT INTO manifest VALUES (1, {}, {}, {}, {});",
            x(s.me.to_bytes()),
            s.m.index_id.0 as i64,
            s.m.max_seq.0,
            s.m.entries
        ))
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    let e = s.refused(&file, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
    assert!(e.to_string().contains("UTF-8"), "{e}");
}

/// Disk exhaustion by offers: an offer larger than its record count
/// allows is refused before a byte is written; a new offer of the same
/// owner removes the superseded partial; week-old partials expire.
#[tokio::test]
async fn snapshot_offers_cannot_exhaust_the_disk() {
    let s = scene().await;
    let mut huge = s.m.offer();
    huge.id = sync_core::SnapshotId::new_v7();
    huge.bytes = max_snapshot_bytes(huge.entries) + 1;
    huge.chunks = huge.bytes.div_ceil(sync_core::SNAPSHOT_CHUNK_SIZE as u64) as u32;
    let e = s.b.begin_download(&huge).await.unwrap_err();
    assert!(matches!(e, StorageError::BadOffer(_)), "{e}");
    // More records than seqs.
    let mut liar = s.m.offer();
    liar.entries = liar.max_seq.0 + 1;
    let e = s.b.begin_download(&liar).await.unwrap_err();
    assert!(matches!(e, StorageError::BadOffer(_)), "{e}");
    // Far more than the disk holds, with a record count to match.
    huge.entries = 1 << 40;
    huge.max_seq = Seq(1 << 41);
    huge.bytes = 1 << 52;
    huge.chunks = u32::MAX;
    let e = s.b.begin_download(&huge).await.unwrap_err();
    assert!(matches!(e, StorageError::BadOffer(_)), "{e}");
    huge.bytes = u64::from(u32::MAX - 1) * sync_core::SNAPSHOT_CHUNK_SIZE as u64;
    huge.chunks = u32::MAX - 1;
    let e = s.b.begin_download(&huge).await.unwrap_err();
    assert!(matches!(e, StorageError::DiskFull { .. }), "{e}");
    let files = || std::fs::read_dir(s.b.incoming_dir()).unwrap().count();
    assert_eq!(files(), 0, "nothing written");

    // One chunk of the genuine offer, then a newer offer of the same owner.
    let mut d = s.b.begin_download(&s.m.offer()).await.unwrap();
    let (h, data) = s.a.read_snapshot_chunk(&s.m, 0).await.unwrap();
    d.write_chunk(0, h, &data).await.unwrap();
    drop(d);
    assert_eq!(files(), 2);
    let newer = s.a.export_snapshot(s.me).await.unwrap();
    let d = s.b.begin_download(&newer.offer()).await.unwrap();
    drop(d);
    let names: Vec<String> = std::fs::read_dir(s.b.incoming_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with(&newer.id.to_string())),
        "{names:?}"
    );

    // A week-old partial expires at the next prune.
    let state = s.b.incoming_dir().join(format!("{}.next", newer.id));
    let old = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&state)
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(s.b.prune_downloads().await.unwrap(), 1);
    assert_eq!(files(), 0);
}

/// Data directory, `snapshots/`, `incoming/` owner-only; the library, its
/// WAL, snapshot files and downloads owner-only, and an existing library
/// readable by others tightened when opened.
#[tokio::test]
async fn library_snapshot_and_download_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let s = scene().await;
    let data = s.b.path().parent().unwrap().to_path_buf();
    for d in [
        &data,
        &s.b.snapshots_dir().to_path_buf(),
        &s.b.incoming_dir().to_path_buf(),
    ] {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(s.b.path()), 0o600);
    let wal = PathBuf::from(format!("{}-wal", s.b.path().display()));
    assert_eq!(mode(&wal), 0o600);
    assert_eq!(mode(&s.m.path), 0o600, "exported snapshot");
    let mut d = s.b.begin_download(&s.m.offer()).await.unwrap();
    let (h, data_) = s.a.read_snapshot_chunk(&s.m, 0).await.unwrap();
    d.write_chunk(0, h, &data_).await.unwrap();
    drop(d);
    for e in std::fs::read_dir(s.b.incoming_dir()).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    // An existing library left readable by others is tightened on open.
    s.b.close().await;
    std::fs::set_permissions(s.b.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let again = Store::open(s.b.path()).await.unwrap();
    assert_eq!(mode(again.path()), 0o600);
    assert_eq!(mode(&data), 0o700);
}

/// Found by attacking the import: SQLite parses a file's whole schema when
/// it opens it, before any statement (and so any deadline) of ours runs,
/// and one extra table declaring N `UNIQUE(c COLLATE xN)` constraints makes
/// that parse quadratic (36,000 took 11 s, 120,000 several minutes). The
/// schema is now read from the first page's bytes: a schema that does not
/// fit there (here its row spills to overflow pages) is refused before
/// SQLite opens the file.
#[tokio::test]
async fn a_schema_that_is_slow_to_parse_is_refused_before_sqlite_parses_it() {
    let s = scene().await;
    let uniques: Vec<String> = (0..60_000)
        .map(|i| format!("UNIQUE(c0 COLLATE x{i})"))
        .collect();
    let sql = format!(
        "PRAGMA writable_schema = ON;
         INSERT INTO sqlite_master VALUES ('table', 'z', 'z',
           (SELECT rootpage FROM sqlite_master WHERE name = 'manifest'),
           'CREATE TABLE z(c0, {})');",
        uniques.join(", ")
    );
    let file = s.rewrite("slow-parse.db", &sql).await;
    let started = Instant::now();
    let e = s.refused(&file, s.m.entries).await;
    assert!(is_schema(&e), "{e:?}");
    assert!(e.to_string().contains("schema page"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}",
        started.elapsed()
    );
}

/// Found by attacking the import: a location name that is not UTF-8 was
/// reported as this library's own database error (`Storage`), not the
/// file's fault.
#[tokio::test]
async fn snapshot_text_that_is_not_utf8_is_the_files_fault() {
    let s = scene().await;
    let file = s
        .rewrite(
            "bad-utf8.db",
            "UPDATE location SET name = CAST(x'ff' AS TEXT);",
        )
        .await;
    let e = s.refused(&file, s.m.entries).await;
    assert!(matches!(e, StorageError::BadSnapshot(_)), "{e:?}");
}

/// A genuine export's schema sits on its first page and reads back, from
/// the bytes, as exactly the snapshot schema.
#[tokio::test]
async fn a_genuine_snapshot_schema_reads_from_its_first_page() {
    let s = scene().await;
    let bytes = std::fs::read(&s.m.path).unwrap();
    let rows = crate::schema_page::schema_rows(&bytes).unwrap();
    // Three WITHOUT ROWID tables: their primary keys are the tables, no
    // autoindex rows.
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows.iter().any(|r| r.1 == "entry" && r.0 == "table"));
}

/// The first-page reader takes hostile bytes: random overwrites of a
/// genuine schema page never panic it, and what it accepts stays within
/// its row bound (the comparison with the reference schema comes after).
#[tokio::test]
async fn mutated_schema_pages_never_panic_the_page_reader() {
    use proptest::prelude::*;
    let s = scene().await;
    let page: Vec<u8> = std::fs::read(&s.m.path).unwrap()[..4096].to_vec();
    assert_eq!(crate::schema_page::schema_rows(&page).unwrap().len(), 3);
    let mut runner = proptest::test_runner::TestRunner::default();
    runner
        .run(
            &proptest::collection::vec((0usize..4096, any::<u8>()), 1..16),
            |edits| {
                let mut bytes = page.clone();
                for (at, b) in edits {
                    bytes[at] = b;
                }
                if let Ok(rows) = crate::schema_page::schema_rows(&bytes) {
                    prop_assert!(rows.len() <= 16);
                }
                Ok(())
            },
        )
        .unwrap();
}
