//! The listener's admission control: which accepted sockets run a TLS
//! handshake now, which wait, and which are closed, so that a peer that
//! opens many connections or stalls its handshake cannot starve trusted peers.
//!
//! Until its TLS handshake completes (which takes a pinned certificate) a
//! socket is unauthenticated, and it is either *running* a handshake or
//! *waiting* for one (accepted, nothing read yet):
//! - at most `max_handshaking` run at once, at most `max_handshaking_per_ip`
//!   of them from one source (IP address), each holding one of the
//!   `max_connections` slots that authenticated connections also hold;
//! - at most `max_waiting` wait; a newcomer beyond that closes the oldest
//!   waiting socket of the source with the most waiting;
//! - the accept loop never waits: it accepts, then starts waiting sockets
//!   by priority, the source with the fewest running handshakes first
//!   (so a flood's sources queue behind a peer that has none), then the
//!   oldest;
//! - when a waiting socket needs a place that running handshakes hold, the
//!   oldest handshake of the source running the most loses its place, if it
//!   is *stale* (older than `handshake_grace`) or its source runs at least
//!   two more than the waiting socket's; otherwise the socket waits. A LAN
//!   handshake takes milliseconds, so a legitimate burst from one source is
//!   queued, not evicted, while stalled sockets are recycled: at once when
//!   a peer with fewer handshakes waits, else every `handshake_grace`;
//! - when every slot is held by an authenticated connection, the next
//!   waiting socket is refused with `Error { Busy }` (a refusal runs like a
//!   handshake, without a slot).
//!
//! So a trusted peer from a source without running handshakes starts its
//! handshake at once when the flood comes from at most `max_handshaking / 2`
//! sources; from more, it waits for stale handshakes, about one
//! `handshake_grace` per `max_handshaking` flooding sources.
//! The listener holds at most `max_waiting + max_connections +
//! max_handshaking` sockets (the last term: `Busy` refusals).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::NetConfig;
use crate::error::NetError;

/// What a [`Listener`](crate::Listener) has done with the sockets it
/// accepted, and what it holds now.
///
/// Every accepted socket ends as exactly one of `authenticated`, `failed`,
/// `timed_out`, `evicted`, `shed` or `refused_busy`, or is still counted in
/// `waiting`, `handshaking` or `connections`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// TCP connections accepted.
    pub accepted: u64,
    /// Connections that passed TLS and `Hello` and were handed to `accept`.
    pub authenticated: u64,
    /// Handshakes that failed: not TLS, unknown certificate, `Hello` mismatch, closed.
    pub failed: u64,
    /// Sockets whose handshake did not finish (or start) within `handshake_timeout`.
    pub timed_out: u64,
    /// Running handshakes closed to start a waiting socket: stale ones (older
    /// than `handshake_grace`), or those of a source running at least two
    /// more than the waiting socket's.
    pub evicted: u64,
    /// Waiting sockets closed because `max_waiting` sockets were already waiting.
    pub shed: u64,
    /// Sockets refused with `Error { Busy }`: every slot held an authenticated connection.
    pub refused_busy: u64,
    /// Sockets waiting for a handshake now.
    pub waiting: usize,
    /// Handshakes (and `Busy` refusals) running now, TLS not yet complete.
    pub handshaking: usize,
    /// Slots held now past TLS: `Hello` exchanges and authenticated connections.
    pub connections: usize,
    /// The most sockets held at once (`waiting + handshaking + connections`).
    pub peak_open: usize,
    /// The most handshakes running at once from one source.
    pub peak_handshaking_per_ip: usize,
}

/// How long log lines about refused, evicted or failed handshakes are
/// counted before the limit starts again.
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Such lines logged at `warn` per window; the rest go to `debug`.
const LOG_LOUD_PER_WINDOW: u32 = 5;

/// Logs at `warn` when `$loud`, else at `debug`.
macro_rules! gated {
    ($loud:expr, $($arg:tt)+) => {
        if $loud {
            tracing::warn!($($arg)+)
        } else {
            tracing::debug!($($arg)+)
        }
    };
}

/// Keeps a flood of refusals from flooding the log.
#[derive(Debug)]
struct LogGate {
    window: Instant,
    loud: u32,
    quiet: u64,
}

impl LogGate {
    fn new() -> LogGate {
        LogGate {
            window: Instant::now(),
            loud: 0,
            quiet: 0,
        }
    }

    /// Whether the next line may be a `warn`; reports the lines demoted in the last window.
    fn loud(&mut self, stats: &ListenerStats) -> bool {
        if self.window.elapsed() >= LOG_WINDOW {
            if self.quiet > 0 {
                tracing::warn!(
                    demoted = self.quiet,
                    evicted = stats.evicted,
                    shed = stats.shed,
                    failed = stats.failed,
                    timed_out = stats.timed_out,
                    refused_busy = stats.refused_busy,
                    "more handshake refusals, logged at debug"
                );
            }
            *self = LogGate::new();
        }
        if self.loud < LOG_LOUD_PER_WINDOW {
            self.loud += 1;
            true
        } else {
            self.quiet += 1;
            false
        }
    }
}

/// The source a socket is charged to: its IP address (an IPv4-mapped IPv6
/// address counts as the IPv4 one). Not an IPv6 prefix: the hosts of a LAN
/// share one /64.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A socket running its handshake (or a `Busy` refusal).
#[derive(Debug)]
struct Running {
    id: u64,
    source: IpAddr,
    peer: SocketAddr,
    started: Instant,
    /// Its `max_connections` slot; `None` for a `Busy` refusal.
    slot: Option<OwnedSemaphorePermit>,
    /// Closes its socket (set right after its task is spawned).
    abort: Option<AbortHandle>,
}

/// An accepted socket waiting for a handshake.
#[derive(Debug)]
struct Waiting {
    source: IpAddr,
    peer: SocketAddr,
    sock: TcpStream,
    deadline: Instant,
}

/// A socket the accept loop must start now.
#[derive(Debug)]
pub(crate) struct Start {
    /// Its entry in the table, for [`Admission::spawned`] and the task's reports.
    pub id: u64,
    pub sock: TcpStream,
    pub peer: SocketAddr,
    /// The end of its `handshake_timeout`, counted from its arrival.
    pub deadline: Instant,
    /// Refuse it with `Error { Busy }` instead of a handshake.
    pub busy: bool,
}

/// Why a handshake ended without a connection.
pub(crate) enum Outcome {
    Failed(NetError),
    TimedOut,
}

/// Where the slot of a socket about to start comes from.
enum SlotFrom {
    Free,
    Victim,
    /// None: every slot is authenticated; refuse with `Busy`.
    Busy,
}

#[derive(Debug)]
struct Table {
    /// Oldest first.
    running: Vec<Running>,
    /// Oldest first.
    waiting: Vec<Waiting>,
    running_per_source: HashMap<IpAddr, usize>,
    waiting_per_source: HashMap<IpAddr, usize>,
    next_id: u64,
    stats: ListenerStats,
    gate: LogGate,
    closed: bool,
}

fn bump(map: &mut HashMap<IpAddr, usize>, source: IpAddr) -> usize {
    let n = map.entry(source).or_insert(0);
    *n += 1;
    *n
}

fn drop_one(map: &mut HashMap<IpAddr, usize>, source: &IpAddr) {
    if let Some(n) = map.get_mut(source) {
        *n -= 1;
        if *n == 0 {
            map.remove(source);
        }
    }
}

impl Table {
    fn loud(&mut self) -> bool {
        self.gate.loud(&self.stats)
    }

    fn running_of(&self, source: &IpAddr) -> usize {
        self.running_per_source.get(source).copied().unwrap_or(0)
    }

    fn waiting_of(&self, source: &IpAddr) -> usize {
        self.waiting_per_source.get(source).copied().unwrap_or(0)
    }

    fn remove_running(&mut self, index: usize) -> Running {
        let r = self.running.remove(index);
        drop_one(&mut self.running_per_source, &r.source);
        r
    }

    fn remove_waiting(&mut self, index: usize) -> Waiting {
        let w = self.waiting.remove(index);
        drop_one(&mut self.waiting_per_source, &w.source);
        w
    }

    /// The oldest running entry `pick` selects, of the source running the most.
    fn busiest(&self, pick: impl Fn(usize, &Running) -> bool) -> Option<usize> {
        let most = self
            .running
            .iter()
            .enumerate()
            .filter(|(i, r)| pick(*i, r))
            .map(|(_, r)| self.running_of(&r.source))
            .max()?;
        self.running
            .iter()
            .enumerate()
            .position(|(i, r)| pick(i, r) && self.running_of(&r.source) == most)
    }

    /// The handshakes to evict so that the waiting socket from `source` can
    /// start, and where its slot comes from; `None` if it must wait.
    ///
    /// A handshake may be evicted when it is stale, or when its source runs
    /// at least two more than `source` (the swap leaves the sources no less
    /// fair); a source at its own cap only recycles its own stale ones.
    fn plan(
        &self,
        source: IpAddr,
        caps: &Caps,
        free_slots: usize,
        now: Instant,
    ) -> Option<(Vec<usize>, SlotFrom)> {
        let stale = |r: &Running| now.saturating_duration_since(r.started) >= caps.grace;
        let ours = self.running_of(&source);
        let evictable = |r: &Running| stale(r) || self.running_of(&r.source) >= ours + 2;
        let mut victims: Vec<usize> = Vec::new();
        if ours >= caps.per_source {
            let own = self
                .running
                .iter()
                .position(|r| r.source == source && stale(r))?;
            victims.push(own);
        }
        if self.running.len() - victims.len() >= caps.handshaking {
            victims.push(self.busiest(|i, r| !victims.contains(&i) && evictable(r))?);
        }
        let from = if free_slots > 0 {
            SlotFrom::Free
        } else if victims.iter().any(|&i| self.running[i].slot.is_some()) {
            SlotFrom::Victim
        } else if let Some(v) =
            self.busiest(|i, r| !victims.contains(&i) && r.slot.is_some() && evictable(r))
        {
            victims.push(v);
            SlotFrom::Victim
        } else if self.running.iter().all(|r| r.slot.is_none()) {
            SlotFrom::Busy
        } else {
            return None; // young handshakes hold the slots: wait for them
        };
        Some((victims, from))
    }

    /// Closes the running handshake at `index` for a waiting socket; returns its slot.
    fn evict(&mut self, index: usize) -> Option<OwnedSemaphorePermit> {
        let mut r = self.remove_running(index);
        if let Some(abort) = r.abort.take() {
            abort.abort();
        }
        // A refusal was already counted as `refused_busy`.
        if r.slot.is_some() {
            self.stats.evicted += 1;
        }
        let loud = self.loud();
        gated!(loud, peer = %r.peer, age = ?r.started.elapsed(), "stale handshake evicted");
        r.slot.take()
    }

    fn open(&self, caps: &Caps, free_slots: usize) -> usize {
        let refusing = self.running.iter().filter(|r| r.slot.is_none()).count();
        self.waiting.len() + caps.connections.saturating_sub(free_slots) + refusing
    }
}

/// The limits, from [`NetConfig`].
#[derive(Debug)]
struct Caps {
    connections: usize,
    handshaking: usize,
    per_source: usize,
    waiting: usize,
    grace: Duration,
    timeout: Duration,
}

/// The listener's admission state, shared by the accept loop, the handshake
/// tasks and [`Listener::stats`](crate::Listener::stats).
#[derive(Debug)]
pub(crate) struct Admission {
    table: Mutex<Table>,
    slots: std::sync::Arc<Semaphore>,
    /// Wakes the accept loop: a running handshake ended or left the table.
    changed: Notify,
    caps: Caps,
}

impl Admission {
    pub(crate) fn new(config: &NetConfig) -> Admission {
        Admission {
            table: Mutex::new(Table {
                running: Vec::new(),
                waiting: Vec::new(),
                running_per_source: HashMap::new(),
                waiting_per_source: HashMap::new(),
                next_id: 0,
                stats: ListenerStats::default(),
                gate: LogGate::new(),
                closed: false,
            }),
            slots: std::sync::Arc::new(Semaphore::new(config.max_connections)),
            changed: Notify::new(),
            caps: Caps {
                connections: config.max_connections,
                handshaking: config.max_handshaking.max(1),
                per_source: config.max_handshaking_per_ip.max(1),
                waiting: config.max_waiting.max(1),
                grace: config.handshake_grace,
                timeout: config.handshake_timeout,
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters the socket just accepted (if any) as waiting, starts every
    /// waiting socket that can start now (evicting for them), then closes
    /// waiting sockets beyond `max_waiting` and past their deadline. One
    /// step under one lock, so the caps hold at every instant.
    pub(crate) fn admit(&self, arrived: Option<(TcpStream, SocketAddr)>) -> Vec<Start> {
        let mut t = self.lock();
        let now = Instant::now();
        if let Some((sock, peer)) = arrived {
            t.stats.accepted += 1;
            if t.closed {
                return Vec::new();
            }
            let source = source_of(peer.ip());
            t.waiting.push(Waiting {
                source,
                peer,
                sock,
                deadline: now + self.caps.timeout,
            });
            bump(&mut t.waiting_per_source, source);
        }
        while let Some(i) = t.waiting.iter().position(|w| w.deadline <= now) {
            let w = t.remove_waiting(i);
            t.stats.timed_out += 1;
            let loud = t.loud();
            gated!(loud, peer = %w.peer, "waited for a handshake slot until the handshake timeout, closing");
        }
        let mut starts = Vec::new();
        while let Some(start) = self.start_one(&mut t, now) {
            starts.push(start);
        }
        while t.waiting.len() > self.caps.waiting {
            let most = t.waiting_per_source.values().copied().max().unwrap_or(0);
            let Some(i) = t
                .waiting
                .iter()
                .position(|w| t.waiting_of(&w.source) == most)
            else {
                break;
            };
            let w = t.remove_waiting(i);
            t.stats.shed += 1;
            let loud = t.loud();
            gated!(loud, peer = %w.peer, max = self.caps.waiting, "too many sockets waiting for a handshake, closing");
        }
        let open = t.open(&self.caps, self.slots.available_permits());
        t.stats.peak_open = t.stats.peak_open.max(open);
        starts
    }

    /// Starts the next waiting socket, if one can start now (evicting for it).
    fn start_one(&self, t: &mut Table, now: Instant) -> Option<Start> {
        // The oldest waiting socket of each source: fewest running, then
        // fewest waiting (a flood's sources queue more), then oldest.
        let mut seen = Vec::new();
        let mut order = Vec::new();
        for (i, w) in t.waiting.iter().enumerate() {
            if !seen.contains(&w.source) {
                seen.push(w.source);
                order.push((t.running_of(&w.source), t.waiting_of(&w.source), i));
            }
        }
        order.sort_unstable();
        let free = self.slots.available_permits();
        let (index, mut victims, from) = order.into_iter().find_map(|(_, _, i)| {
            let (victims, from) = t.plan(t.waiting[i].source, &self.caps, free, now)?;
            Some((i, victims, from))
        })?;
        let w = t.remove_waiting(index);
        victims.sort_unstable_by(|a, b| b.cmp(a));
        let mut freed = None;
        for v in victims {
            if let Some(slot) = t.evict(v) {
                freed.get_or_insert(slot);
            }
        }
        let slot = match from {
            SlotFrom::Free => self.slots.clone().try_acquire_owned().ok(),
            SlotFrom::Victim => freed,
            SlotFrom::Busy => None,
        };
        let busy = slot.is_none();
        let id = t.next_id;
        t.next_id += 1;
        t.running.push(Running {
            id,
            source: w.source,
            peer: w.peer,
            started: now,
            slot,
            abort: None,
        });
        let running = bump(&mut t.running_per_source, w.source);
        t.stats.peak_handshaking_per_ip = t.stats.peak_handshaking_per_ip.max(running);
        if busy {
            t.stats.refused_busy += 1;
            let loud = t.loud();
            gated!(loud, peer = %w.peer, max = self.caps.connections, "too many connections, refusing");
        }
        Some(Start {
            id,
            sock: w.sock,
            peer: w.peer,
            deadline: w.deadline,
            busy,
        })
    }

    /// When the accept loop should look again even if nothing happens: a
    /// handshake turns stale or a waiting socket times out. `None` if nothing waits.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        let t = self.lock();
        let now = Instant::now();
        let deadline = t.waiting.iter().map(|w| w.deadline).min()?;
        let stale = t
            .running
            .iter()
            .map(|r| r.started + self.caps.grace)
            .filter(|at| *at > now)
            .min();
        Some(stale.map_or(deadline, |s| s.min(deadline)))
    }

    /// Resolves when a running handshake ended or left the table.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }

    /// Records the task running `id`, so that it can be evicted.
    pub(crate) fn spawned(&self, id: u64, abort: AbortHandle) {
        let mut t = self.lock();
        // Not found: the task already ended and removed itself.
        if let Some(r) = t.running.iter_mut().find(|r| r.id == id) {
            r.abort = Some(abort);
        }
    }

    /// The handshake's TLS completed (the peer holds a pinned certificate):
    /// it leaves the table with its slot. `None` if it was evicted meanwhile.
    pub(crate) fn leave_table(&self, id: u64) -> Option<OwnedSemaphorePermit> {
        let mut t = self.lock();
        let i = t.running.iter().position(|r| r.id == id)?;
        let slot = t.remove_running(i).slot;
        drop(t);
        self.changed.notify_one();
        slot
    }

    /// The running entry `id` ended without a connection (`None`: a refusal
    /// was sent). Nothing is counted if it was evicted meanwhile.
    pub(crate) fn finish(&self, id: u64, peer: SocketAddr, outcome: Option<Outcome>) {
        let mut t = self.lock();
        let Some(i) = t.running.iter().position(|r| r.id == id) else {
            return;
        };
        t.remove_running(i);
        drop(t);
        self.changed.notify_one();
        if let Some(outcome) = outcome {
            self.report(peer, outcome);
        }
    }

    /// Counts and logs a handshake that ended without a connection.
    pub(crate) fn report(&self, peer: SocketAddr, outcome: Outcome) {
        let mut t = self.lock();
        let error = match outcome {
            Outcome::Failed(e) => {
                t.stats.failed += 1;
                e
            }
            Outcome::TimedOut => {
                t.stats.timed_out += 1;
                NetError::HandshakeTimeout
            }
        };
        let loud = t.loud();
        drop(t);
        gated!(loud, peer = %peer, error = %error, "handshake failed");
    }

    /// Counts a connection handed to `accept`.
    pub(crate) fn authenticated(&self) {
        self.lock().stats.authenticated += 1;
    }

    pub(crate) fn stats(&self) -> ListenerStats {
        let t = self.lock();
        let free = self.slots.available_permits();
        let running_slots = t.running.iter().filter(|r| r.slot.is_some()).count();
        ListenerStats {
            waiting: t.waiting.len(),
            handshaking: t.running.len(),
            connections: self
                .caps
                .connections
                .saturating_sub(free)
                .saturating_sub(running_slots),
            ..t.stats
        }
    }

    /// Closes every waiting socket and running handshake (the listener is dropped).
    pub(crate) fn close(&self) {
        let mut t = self.lock();
        t.closed = true;
        for r in t.running.drain(..) {
            if let Some(abort) = r.abort {
                abort.abort();
            }
        }
        t.waiting.clear();
        t.running_per_source.clear();
        t.waiting_per_source.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_address_and_mapped_ipv4_is_ipv4() {
        let v4: IpAddr = "192.168.1.7".parse().unwrap();
        assert_eq!(source_of(v4), v4);
        let mapped: IpAddr = "::ffff:192.168.1.7".parse().unwrap();
        assert_eq!(source_of(mapped), v4);
        let a: IpAddr = "fe80::1".parse().unwrap();
        let b: IpAddr = "fe80::2".parse().unwrap();
        assert_ne!(source_of(a), source_of(b));
    }
}
