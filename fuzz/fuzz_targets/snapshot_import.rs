//! Fuzz target: a small valid snapshot file (exported once by a real
//! `sync_storage::Store`), mutated by the fuzz input, offered to a second
//! store with its size and hashes recomputed so every content check is
//! reached: `begin_download`, `write_chunk` per chunk, `import_snapshot`.
//! Any outcome is fine except a panic, or a failure that changed the
//! receiving store's `summary(owner)` / `watermark(owner)`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use sync_core::{
    DeviceId, Entry, EntryId, EntryKind, Hash, LibraryId, Location, LocationId,
    SNAPSHOT_CHUNK_SIZE, Seq, SnapshotId,
};
use sync_storage::{LocalChange, SnapshotManifest, SnapshotOfferInfo, Store};

struct Fixture {
    rt: tokio::runtime::Runtime,
    receiver: Store,
    manifest: SnapshotManifest,
    original: Vec<u8>,
    // Kept alive for the process: the stores live in it.
    _dir: tempfile::TempDir,
    _sender: Store,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let (sender, receiver, manifest) = rt.block_on(async {
            let library = LibraryId::new_v7();
            let a = Store::open(&dir.path().join("a").join("library.db"))
                .await
                .expect("open a");
            let me = a.create_device("a", library).await.expect("device a").device_id;
            let b = Store::open(&dir.path().join("b").join("library.db"))
                .await
                .expect("open b");
            b.create_device("b", library).await.expect("device b");
            let loc = Location {
                id: LocationId::new_v7(),
                owner: me,
                path: "/home/me/photos".into(),
                name: "photos".into(),
                seq: Seq(0),
                deleted: false,
            };
            let t = chrono_now();
            let mut changes = vec![LocalChange::Location(loc.clone())];
            let mut ids = Vec::new();
            for i in 0..40u64 {
                let id = EntryId::new_v7();
                ids.push(id);
                changes.push(LocalChange::Entry(Entry {
                    id,
                    location: loc.id,
                    parent: if i == 0 { None } else { Some(ids[0]) },
                    name: format!("IMG_{i:04}.jpg"),
                    kind: if i % 10 == 0 { EntryKind::Dir } else { EntryKind::File },
                    size: 1000 * i,
                    inode: (i % 7 != 0).then_some(1_000 + i),
                    created_at: t,
                    modified_at: t,
                    seq: Seq(0),
                    deleted: false,
                }));
            }
            changes.push(LocalChange::DeleteEntry(ids[5]));
            a.commit_local(me, changes).await.expect("commit");
            let m = a.export_snapshot(me).await.expect("export");
            (a, b, m)
        });
        let original = std::fs::read(&manifest.path).expect("read snapshot");
        Fixture {
            rt,
            receiver,
            manifest,
            original,
            _dir: dir,
            _sender: sender,
        }
    })
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("timestamp")
}

/// Applies the fuzz input to the snapshot bytes. Byte 0 picks the mode; the
/// rest is read as 4-byte groups `(offset: u24 LE, value: u8)`.
fn mutate(original: &[u8], input: &[u8]) -> Vec<u8> {
    let mut file = original.to_vec();
    let Some((&mode, rest)) = input.split_first() else {
        return file;
    };
    let groups = rest.chunks_exact(4);
    match mode % 4 {
        // Xor single bytes.
        0 | 1 => {
            for g in groups {
                let at = u32::from_le_bytes([g[0], g[1], g[2], 0]) as usize % file.len();
                file[at] ^= g[3].max(1);
            }
        }
        // Overwrite a run with the input's tail at an offset from its head.
        2 => {
            if rest.len() >= 3 {
                let at = u32::from_le_bytes([rest[0], rest[1], rest[2], 0]) as usize % file.len();
                let run = &rest[3..];
                let end = (at + run.len()).min(file.len());
                file[at..end].copy_from_slice(&run[..end - at]);
            }
        }
        // Truncate (or extend with the input), then xor.
        _ => {
            if rest.len() >= 3 {
                let at = u32::from_le_bytes([rest[0], rest[1], rest[2], 0]) as usize
                    % (file.len() + 4096);
                file.resize(at, 0);
                if file.len() > original.len() {
                    let from = original.len().min(file.len());
                    for (d, s) in file[from..].iter_mut().zip(rest.iter().cycle()) {
                        *d = *s;
                    }
                }
                for g in rest[3..].chunks_exact(4) {
                    if file.is_empty() {
                        break;
                    }
                    let at = u32::from_le_bytes([g[0], g[1], g[2], 0]) as usize % file.len();
                    file[at] ^= g[3].max(1);
                }
            }
        }
    }
    file
}

async fn offer_and_import(
    store: &Store,
    manifest: &SnapshotManifest,
    file: &[u8],
) -> sync_storage::Result<sync_core::Watermark> {
    let hash: Hash = Sha256::digest(file).into();
    let offer = SnapshotOfferInfo {
        id: SnapshotId::new_v7(),
        bytes: file.len() as u64,
        chunks: file.len().div_ceil(SNAPSHOT_CHUNK_SIZE) as u32,
        hash,
        ..manifest.offer()
    };
    let id = offer.id;
    let result = async {
        let mut d = store.begin_download(&offer).await?;
        for (i, raw) in file.chunks(SNAPSHOT_CHUNK_SIZE).enumerate() {
            let h: Hash = Sha256::digest(raw).into();
            d.write_chunk(i as u32, h, &sync_core::codec::compress(raw))
                .await?;
        }
        store.import_snapshot(d).await
    }
    .await;
    // A failed import keeps its part file to resume: remove it so the fuzzer
    // does not fill the disk.
    let _ = std::fs::remove_file(store.incoming_dir().join(format!("{id}.part")));
    let _ = std::fs::remove_file(store.incoming_dir().join(format!("{id}.next")));
    result
}

fuzz_target!(|input: &[u8]| {
    let f = fixture();
    let owner: DeviceId = f.manifest.owner;
    let file = mutate(&f.original, input);
    f.rt.block_on(async {
        let before = (
            f.receiver.summary(owner).await.expect("summary"),
            f.receiver.watermark(owner).await.expect("watermark"),
        );
        let result = offer_and_import(&f.receiver, &f.manifest, &file).await;
        let after = (
            f.receiver.summary(owner).await.expect("summary"),
            f.receiver.watermark(owner).await.expect("watermark"),
        );
        if let Err(e) = result {
            assert_eq!(before, after, "a refused snapshot ({e}) changed the receiver");
        }
    });
});
