//! A synthetic, realistic location: a deterministic tree of folders and
//! files (depth, fan-out, names and extensions like a real disk) for
//! benchmarks, tests and the demo. Pure: it yields records, it writes nothing.

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::id::{DeviceId, EntryId, LocationId, Seq};
use crate::model::{Entry, EntryKind, Location, micros};

const WORDS: &[&str] = &[
    "alpha",
    "archive",
    "backup",
    "beach",
    "budget",
    "build",
    "camera",
    "client",
    "config",
    "data",
    "design",
    "draft",
    "export",
    "family",
    "final",
    "holiday",
    "invoice",
    "landscape",
    "meeting",
    "notes",
    "old",
    "party",
    "portrait",
    "project",
    "raw",
    "release",
    "report",
    "scan",
    "screenshot",
    "shared",
    "summer",
    "test",
    "trip",
    "venue",
    "winter",
    "work",
];
const DIRS: &[&str] = &[
    "Documents",
    "Photos",
    "Music",
    "Projects",
    "Downloads",
    "src",
    "assets",
    "2019",
    "2020",
    "2021",
    "2022",
    "2023",
    "Camera Roll",
    "Invoices",
    "node_modules",
    "target",
    "lib",
    "images",
    "docs",
    "tests",
    "Archive",
    "Videos",
    "Screenshots",
    "Scans",
    "Backups",
];

/// A kind of file: a name pattern, an extension and a size range.
struct FileKind {
    ext: &'static str,
    numbered: &'static str,
    min_size: f64,
    max_size: f64,
}

const FILE_KINDS: &[FileKind] = &[
    FileKind {
        ext: "jpg",
        numbered: "IMG_",
        min_size: 3e5,
        max_size: 8e6,
    },
    FileKind {
        ext: "png",
        numbered: "Screenshot ",
        min_size: 2e4,
        max_size: 3e6,
    },
    FileKind {
        ext: "pdf",
        numbered: "",
        min_size: 3e4,
        max_size: 2e7,
    },
    FileKind {
        ext: "rs",
        numbered: "",
        min_size: 2e2,
        max_size: 6e4,
    },
    FileKind {
        ext: "js",
        numbered: "",
        min_size: 1e2,
        max_size: 2e5,
    },
    FileKind {
        ext: "json",
        numbered: "",
        min_size: 5e1,
        max_size: 5e5,
    },
    FileKind {
        ext: "mp3",
        numbered: "",
        min_size: 2e6,
        max_size: 1.2e7,
    },
    FileKind {
        ext: "txt",
        numbered: "",
        min_size: 1e1,
        max_size: 1e5,
    },
    FileKind {
        ext: "mov",
        numbered: "MOV_",
        min_size: 1e7,
        max_size: 2e9,
    },
    FileKind {
        ext: "docx",
        numbered: "",
        min_size: 1e4,
        max_size: 5e6,
    },
];

struct Frame {
    id: EntryId,
    depth: u32,
    files_left: u32,
    dirs_left: u32,
    kind: usize,
    counter: u32,
    time: i64,
}

/// Yields a location record, then its entries parent-first, deterministic for a seed.
pub struct SyntheticTree {
    rng: StdRng,
    owner: DeviceId,
    location: LocationId,
    total: u64,
    emitted: u64,
    stack: Vec<Frame>,
    inode: u64,
    clock_ms: u64,
    started: bool,
    seed: u64,
}

impl SyntheticTree {
    /// A tree of `entries` entries for `owner`, shaped by `seed`.
    pub fn new(owner: DeviceId, entries: u64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let location = LocationId::from_bytes(v7_bytes(&mut rng, 1_700_000_000_000));
        SyntheticTree {
            rng,
            owner,
            location,
            total: entries,
            emitted: 0,
            stack: Vec::new(),
            inode: 1_000_000 + seed % 1000,
            clock_ms: 1_700_000_000_000,
            started: false,
            seed,
        }
    }

    /// The location the entries belong to.
    pub fn location(&self) -> Location {
        Location {
            id: self.location,
            owner: self.owner,
            path: format!("/synthetic/{}", self.seed),
            name: format!("synthetic-{}", self.seed),
            seq: Seq::ZERO,
            deleted: false,
        }
    }

    fn next_id(&mut self) -> EntryId {
        // Time-ordered like UUIDv7: a millisecond every 64 ids.
        if self.emitted.is_multiple_of(64) {
            self.clock_ms += 1;
        }
        EntryId::from_bytes(v7_bytes(&mut self.rng, self.clock_ms))
    }

    fn new_dir_frame(&mut self, id: EntryId, depth: u32, time: i64) -> Frame {
        let files_left = if self.rng.random_bool(0.15) {
            0
        } else {
            self.rng.random_range(1..60)
        };
        let dirs_left = match depth {
            0 => 12,
            1..=2 => self.rng.random_range(2..8),
            3..=5 => self.rng.random_range(0..4),
            _ => u32::from(self.rng.random_bool(0.2)),
        };
        Frame {
            id,
            depth,
            files_left,
            dirs_left,
            kind: self.rng.random_range(0..FILE_KINDS.len()),
            counter: self.rng.random_range(1..2000),
            time,
        }
    }

    fn entry(
        &mut self,
        parent: Option<EntryId>,
        name: String,
        kind: EntryKind,
        size: u64,
        time: i64,
    ) -> Entry {
        let id = self.next_id();
        self.inode += 1 + u64::from(self.rng.random_bool(0.1)) * self.rng.random_range(1..50);
        self.emitted += 1;
        let modified = micros::from_micros(time);
        let created: DateTime<Utc> =
            micros::from_micros(time - self.rng.random_range(0..86_400_000_000i64));
        Entry {
            id,
            location: self.location,
            parent,
            name,
            kind,
            size,
            inode: Some(self.inode),
            created_at: created,
            modified_at: modified,
            seq: Seq::ZERO,
            deleted: false,
        }
    }
}

fn v7_bytes(rng: &mut StdRng, ms: u64) -> [u8; 16] {
    let mut b: [u8; 16] = rng.random();
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    b
}

impl Iterator for SyntheticTree {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        if self.emitted >= self.total {
            return None;
        }
        if !self.started {
            self.started = true;
            let time = 1_600_000_000_000_000 + self.rng.random_range(0..100_000_000_000_000i64);
            let root = self.entry(
                None,
                format!("synthetic-{}", self.seed),
                EntryKind::Dir,
                0,
                time,
            );
            let frame = self.new_dir_frame(root.id, 0, time);
            self.stack.push(frame);
            return Some(root);
        }
        loop {
            let Some(top) = self.stack.last_mut() else {
                // The tree ran out before `total`: start another top folder.
                let time = 1_600_000_000_000_000 + self.rng.random_range(0..100_000_000_000_000i64);
                let n = self.emitted;
                let root = self.entry(None, format!("more-{n}"), EntryKind::Dir, 0, time);
                let frame = self.new_dir_frame(root.id, 0, time);
                self.stack.push(frame);
                return Some(root);
            };
            if top.files_left > 0 {
                top.files_left -= 1;
                top.counter += 1;
                let kind = &FILE_KINDS[top.kind];
                let (parent, time, counter) = (top.id, top.time, top.counter);
                let name = if kind.numbered.is_empty() {
                    let w1 = WORDS[self.rng.random_range(0..WORDS.len())];
                    let w2 = WORDS[self.rng.random_range(0..WORDS.len())];
                    format!("{w1}-{w2}-{counter}.{}", kind.ext)
                } else {
                    format!("{}{counter:04}.{}", kind.numbered, kind.ext)
                };
                let size = (kind.min_size
                    * (kind.max_size / kind.min_size).powf(self.rng.random::<f64>()))
                    as u64;
                let t = time + self.rng.random_range(0..600_000_000i64);
                return Some(self.entry(Some(parent), name, EntryKind::File, size, t));
            }
            if top.dirs_left > 0 && top.depth < 9 {
                top.dirs_left -= 1;
                top.counter += 1;
                let (parent, depth, time, counter) = (top.id, top.depth, top.time, top.counter);
                let base = DIRS[self.rng.random_range(0..DIRS.len())];
                let name = format!("{base} {counter}");
                let t = time + self.rng.random_range(0..86_400_000_000i64 * 30);
                let dir = self.entry(Some(parent), name, EntryKind::Dir, 0, t);
                let frame = self.new_dir_frame(dir.id, depth + 1, t);
                self.stack.push(frame);
                return Some(dir);
            }
            self.stack.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_for_a_seed() {
        let owner = DeviceId::new_v7();
        let a: Vec<Entry> = SyntheticTree::new(owner, 2000, 7).collect();
        let b: Vec<Entry> = SyntheticTree::new(owner, 2000, 7).collect();
        let c: Vec<Entry> = SyntheticTree::new(owner, 2000, 8).collect();
        assert_eq!(a.len(), 2000);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn parents_come_first_and_names_are_unique_per_folder() {
        let owner = DeviceId::new_v7();
        let entries: Vec<Entry> = SyntheticTree::new(owner, 20_000, 1).collect();
        let mut seen = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for e in &entries {
            if let Some(p) = e.parent {
                assert!(seen.contains(&p), "parent after child");
            }
            assert!(
                names.insert((e.parent, e.name.clone())),
                "duplicate {}",
                e.name
            );
            seen.insert(e.id);
        }
        let depth_dirs = entries.iter().filter(|e| e.kind == EntryKind::Dir).count();
        assert!(depth_dirs > 100 && depth_dirs < 10_000);
    }

    #[test]
    fn ids_are_time_ordered() {
        let owner = DeviceId::new_v7();
        let entries: Vec<Entry> = SyntheticTree::new(owner, 5000, 3).collect();
        assert!(
            entries
                .windows(2)
                .all(|w| w[0].id.0.as_bytes()[..6] <= w[1].id.0.as_bytes()[..6])
        );
    }
}
