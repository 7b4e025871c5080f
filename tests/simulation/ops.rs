//! The simulation's operations: what one step of a schedule does, the kinds
//! they are counted and disabled by, and the seeded generator.
//!
//! An operation names devices, folders and records by *pick* (an index
//! resolved modulo what exists when it runs), never by id: any sub-list of
//! a schedule is itself a valid schedule, which is what lets the shrinker
//! drop operations freely.

use std::collections::BTreeSet;

use rand::{Rng, SeedableRng, rngs::StdRng};

/// Names of committed entries and locations (small pools, so they collide).
pub const ENTRY_NAMES: &[&str] = &["a", "b", "notes.txt", "été", "日本", "a b"];

/// File names for index runs; the last three are not UTF-8 (and the first
/// two of them differ only in the byte a lossy conversion replaces).
pub const FILE_NAMES: &[&[u8]] = &[
    b"a",
    b"b",
    b"c.txt",
    "ü.md".as_bytes(),
    b"x\xff",
    b"x\xfe",
    b"\xc3(",
];

/// Whether `FILE_NAMES[name]` is UTF-8 (a rename picks from it for files).
fn is_utf8(name: usize) -> bool {
    std::str::from_utf8(FILE_NAMES[name % FILE_NAMES.len()]).is_ok()
}

/// Folder names for index runs (UTF-8: parents are matched by path).
pub const DIR_NAMES: &[&str] = &["d1", "d2", "sub", "été"];

/// What an operation is counted as, and can be disabled by
/// (`SIM_SKIP=restore,dial_both`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `LocalChange::Location` of a new location.
    CreateLocation,
    /// `LocalChange::Location` with a new name and path.
    RenameLocation,
    /// `LocalChange::DeleteLocation`.
    DeleteLocation,
    /// `LocalChange::Location` of a deleted location (un-delete).
    RecreateLocation,
    /// `LocalChange::Entry` of a new entry.
    CreateEntry,
    /// `LocalChange::Entry` with a new size and time.
    UpdateEntry,
    /// `LocalChange::Entry` with a new name.
    RenameEntry,
    /// `LocalChange::Entry` under another folder of its location.
    MoveEntry,
    /// `LocalChange::Entry` into another location of its owner.
    MoveEntryToLocation,
    /// `LocalChange::DeleteEntry`.
    DeleteEntry,
    /// `LocalChange::Entry` of a deleted entry (un-delete).
    UndeleteEntry,
    /// One commit of a synthetic location of 50-400 entries.
    BulkCommit,
    /// A change to an indexed folder on disk.
    FsChange,
    /// A file with a name that is not UTF-8.
    NonUtf8Name,
    /// A folder made unreadable (mode 000) or readable again.
    Unreadable,
    /// An index run of a real folder.
    Index,
    /// Two index runs of one folder at once.
    IndexConcurrent,
    /// Engine shutdown and start on the same data directory.
    Restart,
    /// A copy of a stopped device's library, kept for a later restore.
    Backup,
    /// A device's library replaced by its earlier copy.
    Restore,
    /// A new in-memory link between two devices (replacing theirs).
    Link,
    /// A link cut now.
    Cut,
    /// A link whose writes are delayed.
    Delay,
    /// A link that stalls longer than the idle timeout, or is cut at a frame.
    Stall,
    /// Both devices dial each other over TLS at once.
    DialBoth,
    /// The engines run a while.
    Run,
    /// After each operation: `synced_with` true implies equal libraries.
    SyncedProbe,
}

impl Kind {
    /// Every kind, in order.
    pub const ALL: &[Kind] = &[
        Kind::CreateLocation,
        Kind::RenameLocation,
        Kind::DeleteLocation,
        Kind::RecreateLocation,
        Kind::CreateEntry,
        Kind::UpdateEntry,
        Kind::RenameEntry,
        Kind::MoveEntry,
        Kind::MoveEntryToLocation,
        Kind::DeleteEntry,
        Kind::UndeleteEntry,
        Kind::BulkCommit,
        Kind::FsChange,
        Kind::NonUtf8Name,
        Kind::Unreadable,
        Kind::Index,
        Kind::IndexConcurrent,
        Kind::Restart,
        Kind::Backup,
        Kind::Restore,
        Kind::Link,
        Kind::Cut,
        Kind::Delay,
        Kind::Stall,
        Kind::DialBoth,
        Kind::Run,
        Kind::SyncedProbe,
    ];

    /// The kind's name in `SIM_SKIP` and in the figures.
    pub fn name(self) -> &'static str {
        match self {
            Kind::CreateLocation => "create_location",
            Kind::RenameLocation => "rename_location",
            Kind::DeleteLocation => "delete_location",
            Kind::RecreateLocation => "recreate_location",
            Kind::CreateEntry => "create_entry",
            Kind::UpdateEntry => "update_entry",
            Kind::RenameEntry => "rename_entry",
            Kind::MoveEntry => "move_entry",
            Kind::MoveEntryToLocation => "move_entry_to_location",
            Kind::DeleteEntry => "delete_entry",
            Kind::UndeleteEntry => "undelete_entry",
            Kind::BulkCommit => "bulk_commit",
            Kind::FsChange => "fs_change",
            Kind::NonUtf8Name => "non_utf8",
            Kind::Unreadable => "unreadable",
            Kind::Index => "index",
            Kind::IndexConcurrent => "index_concurrent",
            Kind::Restart => "restart",
            Kind::Backup => "backup",
            Kind::Restore => "restore",
            Kind::Link => "link",
            Kind::Cut => "cut",
            Kind::Delay => "delay",
            Kind::Stall => "stall",
            Kind::DialBoth => "dial_both",
            Kind::Run => "run",
            Kind::SyncedProbe => "synced_probe",
        }
    }

    /// The kinds named in a comma-separated list; an unknown name is an error.
    pub fn parse_list(list: &str) -> Result<BTreeSet<Kind>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Kind::ALL
                    .iter()
                    .copied()
                    .find(|k| k.name() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
                        format!("unknown kind {s:?}; kinds: {}", names.join(","))
                    })
            })
            .collect()
    }
}

/// One change of a commit, resolved against the device's own records when
/// it runs (picks are taken modulo the candidates; none: the change is dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new location named `ENTRY_NAMES[name]`.
    CreateLocation {
        /// Name pick.
        name: usize,
    },
    /// A live location gets a new name and path.
    RenameLocation {
        /// Location pick.
        pick: usize,
        /// Name pick.
        name: usize,
    },
    /// A live location is deleted (its live entries with it).
    DeleteLocation {
        /// Location pick.
        pick: usize,
    },
    /// A deleted location is committed again.
    RecreateLocation {
        /// Location pick.
        pick: usize,
    },
    /// A new entry in a committed (not indexed) location.
    CreateEntry {
        /// Location pick.
        location: usize,
        /// Parent pick among the location's live folders, and the root.
        parent: usize,
        /// Name pick.
        name: usize,
        /// A folder, else a file.
        dir: bool,
    },
    /// A live entry gets a new size and modification time.
    UpdateEntry {
        /// Entry pick.
        pick: usize,
        /// The new size.
        size: u64,
    },
    /// A live entry gets a new name.
    RenameEntry {
        /// Entry pick.
        pick: usize,
        /// Name pick.
        name: usize,
    },
    /// A live entry moves under another live folder of its location (or the root).
    MoveEntry {
        /// Entry pick.
        pick: usize,
        /// Parent pick.
        parent: usize,
    },
    /// A live entry moves to the root of another committed location.
    MoveEntryToLocation {
        /// Entry pick.
        pick: usize,
        /// Location pick.
        location: usize,
    },
    /// A live entry is deleted.
    DeleteEntry {
        /// Entry pick.
        pick: usize,
    },
    /// A deleted entry is committed again as it was.
    UndeleteEntry {
        /// Entry pick.
        pick: usize,
    },
}

impl Change {
    /// The change's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Change::CreateLocation { .. } => Kind::CreateLocation,
            Change::RenameLocation { .. } => Kind::RenameLocation,
            Change::DeleteLocation { .. } => Kind::DeleteLocation,
            Change::RecreateLocation { .. } => Kind::RecreateLocation,
            Change::CreateEntry { .. } => Kind::CreateEntry,
            Change::UpdateEntry { .. } => Kind::UpdateEntry,
            Change::RenameEntry { .. } => Kind::RenameEntry,
            Change::MoveEntry { .. } => Kind::MoveEntry,
            Change::MoveEntryToLocation { .. } => Kind::MoveEntryToLocation,
            Change::DeleteEntry { .. } => Kind::DeleteEntry,
            Change::UndeleteEntry { .. } => Kind::UndeleteEntry,
        }
    }
}

/// A change to a real folder between index runs. Picks resolve over what
/// the simulation can see of the folder when it runs; one that fails on
/// disk is skipped (and counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsChange {
    /// A new file `FILE_NAMES[name]` of `len` bytes in a readable folder.
    CreateFile {
        /// Folder pick (the root included).
        dir: usize,
        /// Name pick.
        name: usize,
        /// Length.
        len: usize,
    },
    /// A new folder `DIR_NAMES[name]` in a readable folder.
    CreateDir {
        /// Folder pick (the root included).
        dir: usize,
        /// Name pick.
        name: usize,
    },
    /// A file rewritten with another length.
    Write {
        /// File pick.
        pick: usize,
        /// New length.
        len: usize,
    },
    /// A file or folder removed (a folder with everything below it).
    Remove {
        /// Path pick.
        pick: usize,
    },
    /// A file or folder renamed in place.
    Rename {
        /// Path pick.
        pick: usize,
        /// Name pick (`DIR_NAMES` for folders, `FILE_NAMES` for files).
        name: usize,
    },
    /// A file replaced by a folder of the same name, or a folder by a file.
    Swap {
        /// Path pick.
        pick: usize,
    },
    /// A folder made unreadable (mode 000).
    Lock {
        /// Folder pick.
        pick: usize,
    },
    /// An unreadable folder made readable again.
    Unlock {
        /// Folder pick among the unreadable ones.
        pick: usize,
    },
}

/// A link's fault, in both directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFault {
    /// No fault.
    Clean,
    /// Cut as soon as anything is written after the `Hello` exchange.
    CutNow,
    /// Cut after this many frames.
    CutAfterFrames(u64),
    /// Every write delayed this many milliseconds.
    DelayMs(u64),
    /// Before this frame, a stall of this many milliseconds (past the 1.5 s
    /// idle timeout, the link ends).
    Stall(u64, u64),
}

impl LinkFault {
    /// The kind a link with this fault is counted as.
    pub fn kind(self) -> Kind {
        match self {
            LinkFault::Clean => Kind::Link,
            LinkFault::CutNow => Kind::Cut,
            LinkFault::DelayMs(_) => Kind::Delay,
            LinkFault::CutAfterFrames(_) | LinkFault::Stall(..) => Kind::Stall,
        }
    }
}

/// One step of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// One `SyncEngine::commit` of these changes on a device, of its own records.
    Commit {
        /// Device pick.
        device: usize,
        /// The changes, resolved in order.
        changes: Vec<Change>,
    },
    /// One commit of a synthetic location.
    BulkCommit {
        /// Device pick.
        device: usize,
        /// Entries in it.
        entries: u64,
    },
    /// A change to one of a device's folders on disk.
    Fs {
        /// Device pick.
        device: usize,
        /// Folder pick.
        folder: usize,
        /// What changes.
        change: FsChange,
    },
    /// `SyncEngine::index` of one of a device's folders.
    Index {
        /// Device pick.
        device: usize,
        /// Folder pick.
        folder: usize,
        /// Two runs at once.
        concurrent: bool,
    },
    /// Shutdown and start again on the same data directory.
    Restart {
        /// Device pick.
        device: usize,
    },
    /// Stop, copy the library aside, start.
    Backup {
        /// Device pick.
        device: usize,
    },
    /// Stop, put the last copy back, start (nothing without a copy).
    Restore {
        /// Device pick.
        device: usize,
    },
    /// A new in-memory link between two devices.
    Link {
        /// Device pick.
        a: usize,
        /// Device pick (another device).
        b: usize,
        /// Its fault.
        fault: LinkFault,
    },
    /// `a.connect(b)` and `b.connect(a)` over TLS at once.
    DialBoth {
        /// Device pick.
        a: usize,
        /// Device pick (another device).
        b: usize,
    },
    /// Let the engines run.
    Run {
        /// For this long.
        millis: u64,
    },
}

impl Op {
    /// The kinds this operation is counted as (a commit: one per change).
    pub fn kinds(&self) -> Vec<Kind> {
        match self {
            Op::Commit { changes, .. } => changes.iter().map(Change::kind).collect(),
            Op::BulkCommit { .. } => vec![Kind::BulkCommit],
            Op::Fs { change, .. } => vec![match change {
                FsChange::Lock { .. } | FsChange::Unlock { .. } => Kind::Unreadable,
                FsChange::CreateFile { name, .. } | FsChange::Rename { name, .. }
                    if !is_utf8(*name) =>
                {
                    Kind::NonUtf8Name
                }
                _ => Kind::FsChange,
            }],
            Op::Index { concurrent, .. } => vec![if *concurrent {
                Kind::IndexConcurrent
            } else {
                Kind::Index
            }],
            Op::Restart { .. } => vec![Kind::Restart],
            Op::Backup { .. } => vec![Kind::Backup],
            Op::Restore { .. } => vec![Kind::Restore],
            Op::Link { fault, .. } => vec![fault.kind()],
            Op::DialBoth { .. } => vec![Kind::DialBoth],
            Op::Run { .. } => vec![Kind::Run],
        }
    }
}

/// A schedule: how many devices, and the operations in order.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The seed it came from.
    pub seed: u64,
    /// Devices (2-5).
    pub devices: usize,
    /// The operations.
    pub ops: Vec<Op>,
}

/// Draws schedules from a seed, leaving out disabled kinds.
pub struct Generator<'a> {
    rng: StdRng,
    skip: &'a BTreeSet<Kind>,
}

impl<'a> Generator<'a> {
    /// A generator for `seed`.
    pub fn new(seed: u64, skip: &'a BTreeSet<Kind>) -> Self {
        Generator {
            rng: StdRng::seed_from_u64(seed),
            skip,
        }
    }

    /// The schedule of `seed`: 2-5 devices and `ops` operations.
    pub fn schedule(seed: u64, ops: usize, skip: &BTreeSet<Kind>) -> Schedule {
        let mut g = Generator::new(seed, skip);
        let devices = g.rng.random_range(2..=5);
        let mut list = Vec::with_capacity(ops);
        while list.len() < ops {
            if let Some(op) = g.op(devices) {
                list.push(op);
            }
        }
        Schedule {
            seed,
            devices,
            ops: list,
        }
    }

    fn pick(&mut self) -> usize {
        self.rng.random_range(0..64)
    }

    fn pair(&mut self, devices: usize) -> (usize, usize) {
        let a = self.rng.random_range(0..devices);
        let b = (a + self.rng.random_range(1..devices)) % devices;
        (a, b)
    }

    /// One operation, or `None` if the one drawn is disabled.
    fn op(&mut self, devices: usize) -> Option<Op> {
        let device = self.rng.random_range(0..devices);
        let op = match self.rng.random_range(0..100) {
            0..30 => self.commit(device)?,
            30..33 => Op::BulkCommit {
                device,
                entries: self.rng.random_range(50..400),
            },
            33..51 => Op::Fs {
                device,
                folder: self.rng.random_range(0..2),
                change: self.fs_change(),
            },
            51..62 => Op::Index {
                device,
                folder: self.rng.random_range(0..2),
                concurrent: self.rng.random_bool(0.15),
            },
            62..66 => Op::Restart { device },
            66..69 => Op::Backup { device },
            69..72 => Op::Restore { device },
            72..87 => {
                let (a, b) = self.pair(devices);
                Op::Link {
                    a,
                    b,
                    fault: self.fault(),
                }
            }
            87..91 => {
                let (a, b) = self.pair(devices);
                Op::DialBoth { a, b }
            }
            _ => Op::Run {
                millis: self.rng.random_range(20..400),
            },
        };
        op.kinds()
            .iter()
            .all(|k| !self.skip.contains(k))
            .then_some(op)
    }

    fn commit(&mut self, device: usize) -> Option<Op> {
        let n = self.rng.random_range(1..=4);
        let mut changes: Vec<Change> = (0..n).map(|_| self.change()).collect();
        changes.retain(|c| !self.skip.contains(&c.kind()));
        (!changes.is_empty()).then_some(Op::Commit { device, changes })
    }

    fn change(&mut self) -> Change {
        let (pick, name) = (self.pick(), self.rng.random_range(0..ENTRY_NAMES.len()));
        match self.rng.random_range(0..20) {
            0..2 => Change::CreateLocation { name },
            2 => Change::RenameLocation { pick, name },
            3 => Change::DeleteLocation { pick },
            4 => Change::RecreateLocation { pick },
            5..10 => Change::CreateEntry {
                location: pick,
                parent: self.pick(),
                name,
                dir: self.rng.random_bool(0.4),
            },
            10..12 => Change::UpdateEntry {
                pick,
                size: self.rng.random_range(0..1 << 20),
            },
            12..14 => Change::RenameEntry { pick, name },
            14..16 => Change::MoveEntry {
                pick,
                parent: self.pick(),
            },
            16 => Change::MoveEntryToLocation {
                pick,
                location: self.pick(),
            },
            17..19 => Change::DeleteEntry { pick },
            _ => Change::UndeleteEntry { pick },
        }
    }

    fn fs_change(&mut self) -> FsChange {
        let pick = self.pick();
        match self.rng.random_range(0..20) {
            0..6 => FsChange::CreateFile {
                dir: pick,
                name: self.rng.random_range(0..FILE_NAMES.len()),
                len: self.rng.random_range(0..64),
            },
            6..9 => FsChange::CreateDir {
                dir: pick,
                name: self.rng.random_range(0..DIR_NAMES.len()),
            },
            9..11 => FsChange::Write {
                pick,
                len: self.rng.random_range(0..64),
            },
            11..13 => FsChange::Remove { pick },
            13..15 => FsChange::Rename {
                pick,
                name: self.pick(),
            },
            15..17 => FsChange::Swap { pick },
            17..19 => FsChange::Lock { pick },
            _ => FsChange::Unlock { pick },
        }
    }

    fn fault(&mut self) -> LinkFault {
        match self.rng.random_range(0..10) {
            0..4 => LinkFault::Clean,
            4..6 => LinkFault::CutNow,
            6 => LinkFault::CutAfterFrames(self.rng.random_range(1..20)),
            7..9 => LinkFault::DelayMs(self.rng.random_range(1..20)),
            _ => LinkFault::Stall(
                self.rng.random_range(0..10),
                self.rng.random_range(200..2_500),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_a_function_of_its_seed_and_skips_disabled_kinds() {
        let none = BTreeSet::new();
        let a = Generator::schedule(7, 200, &none);
        let b = Generator::schedule(7, 200, &none);
        assert_eq!(a.ops, b.ops);
        assert_ne!(a.ops, Generator::schedule(8, 200, &none).ops);
        let skip = Kind::parse_list("restore,dial_both,create_entry").unwrap();
        let c = Generator::schedule(7, 300, &skip);
        let kinds: BTreeSet<Kind> = c.ops.iter().flat_map(Op::kinds).collect();
        assert!(kinds.is_disjoint(&skip), "{kinds:?}");
        assert!(kinds.contains(&Kind::Index) && kinds.contains(&Kind::Restart));
        assert!(Kind::parse_list("restore,bogus").is_err());
    }
}
