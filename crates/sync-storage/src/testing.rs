//! Test support (feature `test-utils`): a small real filesystem that fills
//! up, for the disk-full tests of this crate and of the workspace; and a
//! write to a library file from outside the engine.

use std::path::Path;

/// A size-limited tmpfs mounted on a temporary directory: a real disk that
/// fills up. Unmounted (lazily) on drop. Mounting needs root.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `kib` KiB, or `None` where mounting is not permitted.
    pub fn mount(kib: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    /// Resizes the filesystem (not below what it holds).
    pub fn resize(&self, kib: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount to {kib} KiB failed");
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// KiB held by the files on it (tmpfs allocates whole pages).
    pub fn used_kib(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::read_dir(dir)
                .expect("read dir")
                .map(|e| {
                    let e = e.expect("dir entry");
                    let m = e.metadata().expect("metadata");
                    if m.is_dir() {
                        walk(&e.path())
                    } else {
                        m.blocks() * 512
                    }
                })
                .sum()
        }
        walk(self.path()).div_ceil(1024)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs `sql` on the library file at `db_path` through a plain connection
/// of its own, as another program would (the `sqlite3` shell): none of the
/// engine's connection state, none of its temp triggers.
pub async fn write_outside(db_path: &Path, sql: &str) -> crate::Result<u64> {
    use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db_path)
        .busy_timeout(std::time::Duration::from_secs(30));
    let mut conn = opts.connect().await.map_err(crate::bulk::db_err)?;
    let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .map_err(crate::bulk::db_err)?;
    conn.close().await.map_err(crate::bulk::db_err)?;
    Ok(done.rows_affected())
}
