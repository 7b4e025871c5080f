//! `BatchBroadcaster`: one outgoing transfer of this device's records to one
//! peer. Pages records by seq, encodes and compresses them off the arbiter
//! thread, keeps the credit window, and records acknowledgements.
//!
//! The work runs in a task the actor watches: if it panics, the actor sees
//! `JoinError::is_panic` and reports it to the `TransferSupervisor`, which
//! restarts the transfer from the last acknowledged batch.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use actix::prelude::*;
use sync_core::{DeviceId, IndexId, Message as Wire, Seq, Strategy, TransferId, encode_records};
use sync_net::ConnWriter;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span};

use crate::events::{Direction, SyncEvent};
use crate::shared::SharedRef;
use crate::supervisor::{Outcome, TransferEnded, TransferSupervisor};

/// How the receiver paces the transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pace {
    /// One `StateChange` per record.
    Individual,
    /// Pushed batches under the sender's credit window.
    Push,
    /// Batches only as the receiver grants them with `FetchRequest`.
    Pull,
}

/// What one outgoing transfer must do.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub transfer: TransferId,
    pub peer: DeviceId,
    pub generation: u64,
    pub strategy: Strategy,
    pub pace: Pace,
    pub index_id: IndexId,
    /// The peer's acknowledged watermark: records after it are sent.
    pub start: Seq,
    /// The owner's max seq when the transfer started.
    pub end: Seq,
    /// Records pending at the start.
    pub total: u64,
    /// Credits granted at the start (pull: by the first `FetchRequest`).
    pub initial_credits: u32,
    /// The pulling transfer's id, if any.
    pub pull_transfer: Option<TransferId>,
}

/// Control messages into the transfer task.
#[derive(Debug)]
pub(crate) enum Control {
    /// The peer committed up to this seq.
    Ack(Seq),
    /// The peer grants batches (pull); a new `pull` id restarts from `after`.
    Grant {
        pull: TransferId,
        after: Seq,
        credits: u32,
    },
}

/// Sent by the supervisor: an acknowledgement or a grant for this transfer.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Forward(pub Control);

/// Stops the transfer (session gone or shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Cancel;

/// Totals of a finished transfer.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Totals {
    pub records: u64,
    pub bytes: u64,
    pub acked: Seq,
}

/// The actor owning one outgoing transfer.
pub(crate) struct BatchBroadcaster {
    shared: SharedRef,
    plan: Plan,
    writer: ConnWriter,
    supervisor: Addr<TransferSupervisor>,
    control: Option<mpsc::UnboundedSender<Control>>,
    reported: bool,
    task: Option<tokio::task::AbortHandle>,
}

impl BatchBroadcaster {
    pub fn new(
        shared: SharedRef,
        plan: Plan,
        writer: ConnWriter,
        supervisor: Addr<TransferSupervisor>,
    ) -> Self {
        BatchBroadcaster {
            shared,
            plan,
            writer,
            supervisor,
            control: None,
            reported: false,
            task: None,
        }
    }

    fn report(&mut self, outcome: Outcome) {
        if !self.reported {
            self.reported = true;
            self.supervisor.do_send(TransferEnded {
                peer: self.plan.peer,
                transfer: self.plan.transfer,
                generation: self.plan.generation,
                outcome,
            });
        }
    }
}

impl Actor for BatchBroadcaster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.control = Some(tx);
        let span = info_span!(
            "transfer",
            transfer = %self.plan.transfer.fmt_short(),
            peer = %self.plan.peer.fmt_short(),
            owner = %self.shared.me().fmt_short(),
            strategy = %self.plan.strategy,
            direction = "send",
        );
        let fut = run(
            self.shared.clone(),
            self.plan.clone(),
            self.writer.clone(),
            rx,
        )
        .instrument(span);
        let handle = actix_rt::spawn(fut);
        self.task = Some(handle.abort_handle());
        ctx.spawn(handle.into_actor(self).map(|res, act, ctx| {
            let outcome = match res {
                Ok(Ok(totals)) => Outcome::Completed(totals),
                Ok(Err(cause)) => Outcome::Failed(cause),
                Err(e) if e.is_panic() => Outcome::Panicked(panic_message(e)),
                Err(_) => Outcome::Failed("transfer cancelled".into()),
            };
            act.report(outcome);
            ctx.stop();
        }));
    }
}

impl Drop for BatchBroadcaster {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        // An actor that is dropped without reporting (its handler panicked,
        // its arbiter stopped) still tells the supervisor.
        self.report(Outcome::Failed("broadcaster stopped".into()));
    }
}

impl Handler<Forward> for BatchBroadcaster {
    type Result = ();
    fn handle(&mut self, msg: Forward, _: &mut Context<Self>) {
        if let Some(tx) = &self.control {
            let _ = tx.send(msg.0);
        }
    }
}

impl Handler<Cancel> for BatchBroadcaster {
    type Result = ();
    fn handle(&mut self, _: Cancel, ctx: &mut Context<Self>) {
        if let Some(task) = &self.task {
            task.abort();
        }
        self.report(Outcome::Failed("cancelled".into()));
        ctx.stop();
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into()),
        Err(e) => e.to_string(),
    }
}

/// The transfer loop. Sends while credits remain, then waits for acks or
/// grants; finishes when the peer has acknowledged `end`.
async fn run(
    shared: SharedRef,
    plan: Plan,
    writer: ConnWriter,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Result<Totals, String> {
    let started = Instant::now();
    let me = shared.me();
    let window = shared.config.credit_window.max(1);
    let batch_size = shared.config.batch_size.max(1);
    let mut cursor = plan.start;
    let mut acked = plan.start;
    let mut in_flight: VecDeque<Seq> = VecDeque::new();
    let mut credits: u64 = match plan.pace {
        Pace::Individual => u64::MAX,
        Pace::Push => u64::from(window),
        Pace::Pull => u64::from(plan.initial_credits),
    };
    let mut pull = plan.pull_transfer;
    let mut totals = Totals::default();
    let mut batches_sent = 0u32;

    if plan.pace == Pace::Pull && pull.is_none() {
        // Tell the peer; it pulls when it wants.
        let local = shared
            .store
            .local_watermark()
            .await
            .map_err(|e| e.to_string())?;
        writer
            .send(Wire::BulkIndexComplete {
                owner: me,
                index_id: plan.index_id,
                location: None,
                entry_count: plan.total,
                max_seq: plan.end,
                indexed_at: chrono::Utc::now().timestamp_micros(),
            })
            .await
            .map_err(|e| format!("link lost: {e}"))?;
        debug!(max_seq = %local.seq, "bulk notice sent");
    }

    loop {
        if acked >= plan.end {
            totals.acked = acked;
            let secs = started.elapsed().as_secs_f64();
            debug!(
                records = totals.records,
                bytes = totals.bytes,
                secs,
                "transfer acknowledged"
            );
            return Ok(totals);
        }
        while credits > 0 && cursor < plan.end {
            let page = shared
                .store
                .records_after(me, cursor, batch_size)
                .await
                .map_err(|e| e.to_string())?;
            let full = page.len() == batch_size;
            let page: Vec<_> = page.into_iter().filter(|r| r.seq() <= plan.end).collect();
            let last = match page.last() {
                Some(r) if full && r.seq() < plan.end => r.seq(),
                _ => plan.end,
            };
            let count = page.len() as u64;
            if plan.pace == Pace::Individual {
                let mut after = cursor;
                for record in page {
                    let seq = record.seq();
                    writer
                        .send(Wire::StateChange {
                            owner: me,
                            index_id: plan.index_id,
                            after,
                            record,
                        })
                        .await
                        .map_err(|e| format!("link lost: {e}"))?;
                    after = seq;
                }
                if after < last {
                    // Records above `after` moved past `end` meanwhile: nothing
                    // left in (after, end], so the peer may advance to `end`.
                    writer
                        .send(Wire::StateBatch {
                            transfer: plan.transfer,
                            owner: me,
                            index_id: plan.index_id,
                            after,
                            last,
                            count: 0,
                            payload: encode_records(&[]),
                        })
                        .await
                        .map_err(|e| format!("link lost: {e}"))?;
                }
                in_flight.push_back(last);
            } else {
                let span = info_span!("batch", after = %cursor, last = %last, count, bytes = tracing::field::Empty);
                let payload = tokio::task::spawn_blocking(move || encode_records(&page))
                    .await
                    .map_err(|e| format!("encode task: {e}"))?;
                span.record("bytes", payload.len());
                totals.bytes += payload.len() as u64;
                writer
                    .send(Wire::StateBatch {
                        transfer: plan.transfer,
                        owner: me,
                        index_id: plan.index_id,
                        after: cursor,
                        last,
                        count: count as u32,
                        payload,
                    })
                    .instrument(span)
                    .await
                    .map_err(|e| format!("link lost: {e}"))?;
                in_flight.push_back(last);
                batches_sent += 1;
                sync_core::crash_point("send.batch");
                if let Some(n) = shared.config.faults.panic_sender_after_batches
                    && batches_sent >= n
                    && !shared.panic_injected.swap(true, Ordering::SeqCst)
                {
                    panic!("injected fault: sender panics after {n} batches");
                }
            }
            totals.records += count;
            cursor = last;
            credits = credits.saturating_sub(1);
            shared.emit(SyncEvent::TransferProgress {
                transfer: plan.transfer,
                peer: plan.peer,
                owner: me,
                direction: Direction::Send,
                done: totals.records,
                total: plan.total.max(totals.records),
                bytes: totals.bytes,
            });
        }
        let Some(msg) = control.recv().await else {
            return Err("transfer cancelled".into());
        };
        match msg {
            Control::Ack(last) => {
                if last > acked {
                    acked = last;
                }
                while in_flight.front().is_some_and(|l| *l <= last) {
                    in_flight.pop_front();
                    if plan.pace == Pace::Push {
                        credits += 1;
                    }
                }
            }
            Control::Grant {
                pull: id,
                after,
                credits: c,
            } => {
                if pull != Some(id) {
                    // A new pull (the receiver restarted): resume where it stands.
                    pull = Some(id);
                    cursor = after;
                    acked = after;
                    in_flight.clear();
                    credits = u64::from(c);
                } else {
                    credits += u64::from(c);
                }
            }
        }
    }
}
