//! Transfer checkpoints: persisted progress, so a transfer resumes after a crash.

use sea_orm::Value;
use sync_core::model::micros;
use sync_core::{DeviceId, Seq, SnapshotId, Strategy, TransferId};

use crate::Store;
use crate::error::{Result, StorageError};
use crate::rows::{blob, col, exec, i2u, id16, query, u2i};
use crate::types::{Checkpoint, Direction, TransferState};

const COLUMNS: &str = "transfer, peer, owner, direction, strategy, last_acked, snapshot, \
                       next_chunk, attempts, state, started_at, updated_at";

fn strategy_from_str(s: &str) -> Result<Strategy> {
    [
        Strategy::UpToDate,
        Strategy::Individual,
        Strategy::Batches,
        Strategy::Bulk,
        Strategy::Snapshot,
    ]
    .into_iter()
    .find(|st| st.as_str() == s)
    .ok_or_else(|| StorageError::Corrupt(format!("unknown strategy {s:?}")))
}

fn from_row(row: &sea_orm::QueryResult) -> Result<Checkpoint> {
    let direction = match col::<i64>(row, 3)? {
        0 => Direction::Send,
        1 => Direction::Receive,
        d => return Err(StorageError::Corrupt(format!("unknown direction {d}"))),
    };
    let state = match col::<i64>(row, 9)? {
        0 => TransferState::Running,
        1 => TransferState::Completed,
        2 => TransferState::Failed,
        s => return Err(StorageError::Corrupt(format!("unknown transfer state {s}"))),
    };
    let snapshot: Option<Vec<u8>> = col(row, 6)?;
    let u32_col = |i: usize| -> Result<u32> {
        let v: i64 = col(row, i)?;
        u32::try_from(v)
            .map_err(|_| StorageError::Corrupt(format!("checkpoint value {v} out of range")))
    };
    Ok(Checkpoint {
        transfer: TransferId::from_bytes(id16(&col::<Vec<u8>>(row, 0)?)?),
        peer: DeviceId::from_bytes(id16(&col::<Vec<u8>>(row, 1)?)?),
        owner: DeviceId::from_bytes(id16(&col::<Vec<u8>>(row, 2)?)?),
        direction,
        strategy: strategy_from_str(&col::<String>(row, 4)?)?,
        last_acked: Seq(i2u(col(row, 5)?)),
        snapshot: match snapshot {
            Some(s) => Some(SnapshotId::from_bytes(id16(&s)?)),
            None => None,
        },
        next_chunk: u32_col(7)?,
        attempts: u32_col(8)?,
        state,
        started_at: micros::from_micros(col(row, 10)?),
        updated_at: micros::from_micros(col(row, 11)?),
    })
}

impl Store {
    /// Saves a checkpoint (insert or replace by transfer id).
    pub async fn save_checkpoint(&self, c: &Checkpoint) -> Result<()> {
        let _guard = self.inner.write_lock.lock().await;
        exec(
            &self.inner.writer,
            format!(
                "INSERT INTO checkpoint ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) \
                 ON CONFLICT(transfer) DO UPDATE SET peer = excluded.peer, owner = excluded.owner, \
                 direction = excluded.direction, strategy = excluded.strategy, \
                 last_acked = excluded.last_acked, snapshot = excluded.snapshot, \
                 next_chunk = excluded.next_chunk, attempts = excluded.attempts, \
                 state = excluded.state, started_at = excluded.started_at, \
                 updated_at = excluded.updated_at"
            ),
            vec![
                blob(c.transfer.to_bytes()),
                blob(c.peer.to_bytes()),
                blob(c.owner.to_bytes()),
                Value::BigInt(Some(match c.direction {
                    Direction::Send => 0,
                    Direction::Receive => 1,
                })),
                Value::String(Some(c.strategy.as_str().to_owned())),
                Value::BigInt(Some(u2i(c.last_acked.0))),
                Value::Bytes(c.snapshot.map(|s| s.to_bytes().to_vec())),
                Value::BigInt(Some(i64::from(c.next_chunk))),
                Value::BigInt(Some(i64::from(c.attempts))),
                Value::BigInt(Some(match c.state {
                    TransferState::Running => 0,
                    TransferState::Completed => 1,
                    TransferState::Failed => 2,
                })),
                Value::BigInt(Some(micros::to_micros(&c.started_at))),
                Value::BigInt(Some(micros::to_micros(&c.updated_at))),
            ],
        )
        .await
        .map_err(|e| e.disk_full_at(self.path()))?;
        Ok(())
    }

    /// The checkpoint of a transfer, if saved.
    pub async fn load_checkpoint(&self, transfer: TransferId) -> Result<Option<Checkpoint>> {
        let rows = query(
            &self.inner.reader,
            format!("SELECT {COLUMNS} FROM checkpoint WHERE transfer = ?"),
            vec![blob(transfer.to_bytes())],
        )
        .await?;
        rows.first().map(from_row).transpose()
    }

    /// Every saved checkpoint, oldest transfer first.
    pub async fn list_checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let rows = query(
            &self.inner.reader,
            format!("SELECT {COLUMNS} FROM checkpoint ORDER BY started_at, transfer"),
            vec![],
        )
        .await?;
        rows.iter().map(from_row).collect()
    }
}
