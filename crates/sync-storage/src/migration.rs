//! Schema migrations (sea-orm-migration), each run inside a transaction.
//!
//! Tables are written as SQL rather than derived from entities:
//! `Schema::create_table_from_entity` omits unique keys and indexes, and the
//! hot tables want `WITHOUT ROWID` (the 16-byte UUIDv7 key is the row's
//! b-tree key, so an upsert touches one b-tree fewer) and CHECK constraints.
//! Ids are 16-byte blobs; u64 values (seq, size, inode, index_id) are stored
//! as `i64` bit-casts; timestamps as `i64` microseconds.

use sea_orm::DbErr;
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};

/// The migrator of the library database.
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(M0001Initial), Box::new(M0002Digests)]
    }
}

/// The initial schema.
struct M0001Initial;

impl MigrationName for M0001Initial {
    fn name(&self) -> &str {
        "m0001_initial"
    }
}

/// Statements of the initial schema, in order.
const INITIAL: &[&str] = &[
    "CREATE TABLE library (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE device (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        library_id BLOB NOT NULL REFERENCES library(id),
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )",
    "CREATE TABLE owner_state (
        owner BLOB PRIMARY KEY NOT NULL CHECK (length(owner) = 16),
        local INTEGER NOT NULL CHECK (local IN (0, 1)),
        index_id INTEGER NOT NULL,
        seq INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE UNIQUE INDEX owner_state_one_local ON owner_state (local) WHERE local = 1",
    "CREATE TABLE location (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        owner BLOB NOT NULL CHECK (length(owner) = 16),
        path TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL CHECK (deleted IN (0, 1))
    ) WITHOUT ROWID",
    "CREATE INDEX location_owner_seq ON location (owner, seq)",
    "CREATE TABLE entry (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        owner BLOB NOT NULL,
        location BLOB NOT NULL,
        parent BLOB,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL CHECK (kind BETWEEN 0 AND 2),
        size INTEGER NOT NULL,
        inode INTEGER,
        created_at INTEGER NOT NULL,
        modified_at INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL CHECK (deleted IN (0, 1))
    ) WITHOUT ROWID",
    "CREATE INDEX entry_owner_seq ON entry (owner, seq)",
    "CREATE INDEX entry_location ON entry (location)",
    "CREATE TABLE checkpoint (
        transfer BLOB PRIMARY KEY NOT NULL CHECK (length(transfer) = 16),
        peer BLOB NOT NULL,
        owner BLOB NOT NULL,
        direction INTEGER NOT NULL CHECK (direction IN (0, 1)),
        strategy TEXT NOT NULL,
        last_acked INTEGER NOT NULL,
        snapshot BLOB,
        next_chunk INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        state INTEGER NOT NULL CHECK (state IN (0, 1, 2)),
        started_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )",
    "CREATE TABLE snapshot (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        owner BLOB NOT NULL,
        index_id INTEGER NOT NULL,
        max_seq INTEGER NOT NULL,
        records INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        hash BLOB NOT NULL CHECK (length(hash) = 32),
        chunk_hashes BLOB NOT NULL,
        path TEXT NOT NULL,
        created_at INTEGER NOT NULL
    )",
];

#[allow(elided_lifetimes_in_paths)] // async_trait cannot name the lifetime
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0001Initial {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in INITIAL {
            sea_orm::ConnectionTrait::execute_unprepared(db, sql).await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        // SQLite has transactional DDL: a failed migration leaves nothing behind.
        Some(true)
    }
}

/// Per-owner content digests and range fingerprints (see `digest.rs`);
/// the rows of a library made before it are digested when it is opened.
/// Also what tombstone collection needs: the local seq reached by each
/// minute (`seq_time`, the age of a seq) and what each peer acknowledged
/// of this device's records (`peer_holds`).
struct M0002Digests;

impl MigrationName for M0002Digests {
    fn name(&self) -> &str {
        "m0002_digests"
    }
}

/// Statements of the digest tables.
const DIGESTS: &[&str] = &[
    "CREATE TABLE owner_digest (
        owner BLOB PRIMARY KEY NOT NULL CHECK (length(owner) = 16),
        lthash BLOB NOT NULL CHECK (length(lthash) = 2048),
        records INTEGER NOT NULL CHECK (records >= 0),
        pruned INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID",
    "CREATE TABLE seq_time (
        minute INTEGER PRIMARY KEY NOT NULL,
        seq INTEGER NOT NULL
    )",
    "CREATE TABLE peer_holds (
        peer BLOB PRIMARY KEY NOT NULL CHECK (length(peer) = 16),
        index_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE TABLE recon_bucket (
        owner BLOB NOT NULL CHECK (length(owner) = 16),
        bucket INTEGER NOT NULL,
        records INTEGER NOT NULL,
        fp BLOB NOT NULL CHECK (length(fp) = 16),
        PRIMARY KEY (owner, bucket)
    ) WITHOUT ROWID",
    "CREATE TABLE owner_statement (
        owner BLOB PRIMARY KEY NOT NULL CHECK (length(owner) = 16),
        seq INTEGER NOT NULL,
        statement BLOB NOT NULL
    ) WITHOUT ROWID",
];

#[allow(elided_lifetimes_in_paths)] // async_trait cannot name the lifetime
#[sea_orm_migration::async_trait::async_trait]
impl MigrationTrait for M0002Digests {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for sql in DIGESTS {
            sea_orm::ConnectionTrait::execute_unprepared(db, sql).await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Schema of a snapshot file: one owner's records plus one manifest row.
/// The column lists are checked on import.
pub(crate) const SNAPSHOT_SCHEMA: &[&str] = &[
    "CREATE TABLE manifest (
        format INTEGER NOT NULL,
        owner BLOB NOT NULL,
        index_id INTEGER NOT NULL,
        max_seq INTEGER NOT NULL,
        records INTEGER NOT NULL
    )",
    "CREATE TABLE location (
        id BLOB PRIMARY KEY NOT NULL,
        owner BLOB NOT NULL,
        path TEXT NOT NULL,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL
    ) WITHOUT ROWID",
    "CREATE TABLE entry (
        id BLOB PRIMARY KEY NOT NULL,
        owner BLOB NOT NULL,
        location BLOB NOT NULL,
        parent BLOB,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER NOT NULL,
        inode INTEGER,
        created_at INTEGER NOT NULL,
        modified_at INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        deleted INTEGER NOT NULL
    ) WITHOUT ROWID",
];

/// Format number written into a snapshot's manifest row.
pub(crate) const SNAPSHOT_FORMAT: i64 = 1;
