//! Test support (feature `test-utils`): a small real filesystem that fills
//! up, for the disk-full tests of this crate and of the workspace.

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
