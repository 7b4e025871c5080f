//! The listener's admission control: which accepted sockets run a TLS
//! handshake now, which wait, and which are closed, so that a peer that
//! opens many connections (from one address or from many) or stalls its
//! handshake cannot starve trusted peers; and how many slots one trusted
//! device may hold once past TLS.
//!
//! A *source* is what a socket is charged to: its IPv4 address (an
//! IPv4-mapped IPv6 address counts as the IPv4 one), or the /64 prefix of
//! its IPv6 address: whoever holds one IPv6 address holds its whole /64
//! (2^64 addresses), so per-address limits would mean nothing there. Hosts
//! behind one IPv4 NAT, or sharing one IPv6 /64 (one LAN segment), share
//! one source and its fate.
//!
//! Until its TLS handshake completes (which takes a pinned certificate) a
//! socket is unauthenticated, and it is either *running* a handshake or
//! *waiting* for one (accepted, nothing read yet):
//! - at most `max_handshaking` run at once, at most `max_handshaking_per_ip`
//!   of them from one source, each holding one of the `max_connections`
//!   slots that connections past TLS also hold;
//! - at most `max_waiting` wait; a newcomer beyond that closes (*sheds*) the
//!   oldest waiting socket of the source holding the most sockets (running
//!   and waiting), of those the one with the most strikes (below);
//! - the accept loop never waits: it accepts, then starts waiting sockets
//!   by priority: the source with the fewest running handshakes first (so
//!   a flood's sources queue behind a peer that has none), then the fewest
//!   waiting, then the fewest strikes, then the oldest socket;
//! - when a waiting socket needs a place that running handshakes hold, the
//!   oldest handshake of the source running the most (then with the most
//!   strikes) loses its place (*eviction*), if it is *stale* (older than
//!   `handshake_grace`) or its source runs at least two more than the
//!   waiting socket's; otherwise the socket waits. A LAN handshake takes
//!   milliseconds, so a legitimate burst from one source is queued, not
//!   evicted, while stalled sockets are recycled: at once when a peer with
//!   fewer handshakes waits, else every `handshake_grace`;
//! - each source has a *standing*: one strike for each of its sockets that
//!   was shed, evicted as stale, or failed or timed out in its TLS
//!   handshake (garbage, an unknown certificate, a stall), halved every
//!   `STRIKE_HALF_LIFE` (10 s). At most `MAX_STANDINGS` sources are
//!   remembered, those with the most strikes kept;
//! - when every slot is held past TLS, the next waiting socket is refused
//!   with `Error { Busy }` (a refusal runs like a handshake, without a slot).
//!
//! The per-source counts protect a trusted peer from a flood of a few
//! sources: they always hold more than the peer's one socket. A flood
//! from more sources than the listener has places (say 128 loopback
//! addresses) holds one socket or none per source, so the counts tie; the
//! strikes break the tie: every flood socket ends badly and strikes its
//! source, a trusted peer's socket does not. Its waiting socket is then
//! never the one shed, it starts at the next place that frees (a failed
//! handshake, or the next stale one: within `handshake_grace`), and it is
//! not evicted before it completes. What this does not cover: a flood from
//! the peer's own source, and, for about one `handshake_grace`, the first
//! sockets of sources never seen before (they tie with the peer's until
//! they fail), so an attacker with fresh sources to spare (more than
//! `MAX_STANDINGS`, or many /64s of one /48) can still delay a dial.
//!
//! Once TLS completes, the socket leaves the table with its slot, charged
//! to the device its certificate is pinned to, for its `Hello` exchange and
//! then as an authenticated connection. A device holds at most
//! `MAX_CONNECTIONS_PER_DEVICE` (4) of them: a newer one closes the
//! device's oldest (its reads and writes fail, its slot is free at once; the
//! socket itself closes when its owner drops it), as the engine replaces
//! an older session to a peer by a newer one. So one trusted device,
//! compromised or looping, holds at most that many slots past TLS (and at
//! most `max_handshaking` handshakes before it), and another trusted
//! device can always connect.
//!
//! The listener holds at most `max_waiting + max_connections +
//! max_handshaking` sockets (the last term: `Busy` refusals).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use sync_core::DeviceId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::NetConfig;
use crate::conn::BoxStream;
use crate::error::NetError;

/// The most connections past TLS (`Hello` exchanges and authenticated
/// connections) one device holds on a listener; a newer one closes its
/// oldest. The engine keeps one session per peer (a newer one replaces the
/// older), so two may overlap while one replaces the other.
pub(crate) const MAX_CONNECTIONS_PER_DEVICE: usize = 4;

/// A source's strikes are halved every this long.
pub(crate) const STRIKE_HALF_LIFE: Duration = Duration::from_secs(10);

/// The most sources whose standing is remembered; beyond it, those with the
/// fewest strikes are forgotten.
pub(crate) const MAX_STANDINGS: usize = 4096;

/// What a [`Listener`](crate::Listener) has done with the sockets it
/// accepted, and what it holds now.
///
/// Every accepted socket ends as exactly one of `authenticated`, `failed`,
/// `timed_out`, `evicted`, `shed` or `refused_busy`, or is still counted in
/// `waiting`, `handshaking` or `connections`. `replaced` counts, besides,
/// connections closed for a newer one of the same device.
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
    /// Waiting sockets closed because `max_waiting` sockets were already
    /// waiting: the oldest of the source holding the most.
    pub shed: u64,
    /// Sockets refused with `Error { Busy }`: every slot held an authenticated connection.
    pub refused_busy: u64,
    /// Connections past TLS (in their `Hello` exchange, or authenticated)
    /// closed because a newer one of the same device passed TLS while the
    /// device held `MAX_CONNECTIONS_PER_DEVICE` (4). One closed during its
    /// `Hello` is also counted in `failed`.
    pub replaced: u64,
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
    /// The most connections past TLS held at once by one device.
    pub peak_connections_per_device: usize,
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
                    replaced = stats.replaced,
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

/// The source a socket is charged to: its IPv4 address (an IPv4-mapped
/// IPv6 address counts as the IPv4 one), or its IPv6 address's /64 prefix
/// (the rest zeroed): one host holds a whole /64.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// A source's strikes, halved every [`STRIKE_HALF_LIFE`] since `since`.
#[derive(Clone, Copy, Debug)]
struct Standing {
    strikes: u32,
    since: Instant,
}

impl Standing {
    /// The strikes left at `now`.
    fn at(self, now: Instant) -> Standing {
        let elapsed = now.saturating_duration_since(self.since);
        let halvings = elapsed.as_nanos() / STRIKE_HALF_LIFE.as_nanos().max(1);
        if halvings == 0 {
            return self;
        }
        // u32 strikes are gone after 32 halvings.
        let n = u32::try_from(halvings.min(32)).unwrap_or(32);
        Standing {
            strikes: self.strikes.checked_shr(n).unwrap_or(0),
            since: self.since + STRIKE_HALF_LIFE * n,
        }
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

/// A connection past TLS: its `Hello` exchange, then authenticated.
#[derive(Debug)]
struct Held {
    id: u64,
    device: DeviceId,
    peer: SocketAddr,
    slot: Option<OwnedSemaphorePermit>,
    kill: Arc<Kill>,
}

/// Closes a [`HeldStream`] from outside: its reads and writes fail from then on.
#[derive(Debug, Default)]
struct Kill {
    fired: AtomicBool,
    read: AtomicWaker,
    write: AtomicWaker,
}

impl Kill {
    fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.read.wake();
        self.write.wake();
    }

    /// Whether it fired; else `waker` will be woken when it does.
    fn check(&self, waker: &AtomicWaker, cx: &Context<'_>) -> bool {
        if self.fired.load(Ordering::SeqCst) {
            return true;
        }
        waker.register(cx.waker());
        self.fired.load(Ordering::SeqCst)
    }
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
    /// Oldest first.
    held: Vec<Held>,
    running_per_source: HashMap<IpAddr, usize>,
    waiting_per_source: HashMap<IpAddr, usize>,
    standings: HashMap<IpAddr, Standing>,
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

    /// The strikes `source` holds at `now`.
    fn strikes_of(&self, source: &IpAddr, now: Instant) -> u32 {
        self.standings.get(source).map_or(0, |s| s.at(now).strikes)
    }

    /// Gives `source` a strike (see the module doc).
    fn strike(&mut self, source: IpAddr, now: Instant) {
        if self.standings.len() >= MAX_STANDINGS && !self.standings.contains_key(&source) {
            self.forget_standings(now);
        }
        let s = self.standings.entry(source).or_insert(Standing {
            strikes: 0,
            since: now,
        });
        *s = s.at(now);
        s.strikes = s.strikes.saturating_add(1);
    }

    /// Forgets the sources with no strikes left, then, if too many remain,
    /// the half with the fewest (a source forgotten starts clean).
    fn forget_standings(&mut self, now: Instant) {
        self.standings.retain(|_, s| {
            *s = s.at(now);
            s.strikes > 0
        });
        if self.standings.len() >= MAX_STANDINGS / 2 {
            let mut strikes: Vec<u32> = self.standings.values().map(|s| s.strikes).collect();
            let mid = strikes.len() / 2;
            let (_, median, _) = strikes.select_nth_unstable(mid);
            let median = *median;
            self.standings.retain(|_, s| s.strikes > median);
        }
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

    /// The oldest running entry `pick` selects, of the source running the
    /// most (then with the most strikes).
    fn busiest(&self, now: Instant, pick: impl Fn(usize, &Running) -> bool) -> Option<usize> {
        let load = |r: &Running| (self.running_of(&r.source), self.strikes_of(&r.source, now));
        let most = self
            .running
            .iter()
            .enumerate()
            .filter(|(i, r)| pick(*i, r))
            .map(|(_, r)| load(r))
            .max()?;
        self.running
            .iter()
            .enumerate()
            .position(|(i, r)| pick(i, r) && load(r) == most)
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
            victims.push(self.busiest(now, |i, r| !victims.contains(&i) && evictable(r))?);
        }
        let from = if free_slots > 0 {
            SlotFrom::Free
        } else if victims.iter().any(|&i| self.running[i].slot.is_some()) {
            SlotFrom::Victim
        } else if let Some(v) = self.busiest(now, |i, r| {
            !victims.contains(&i) && r.slot.is_some() && evictable(r)
        }) {
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
    fn evict(&mut self, index: usize, caps: &Caps, now: Instant) -> Option<OwnedSemaphorePermit> {
        let mut r = self.remove_running(index);
        if let Some(abort) = r.abort.take() {
            abort.abort();
        }
        // A refusal was already counted as `refused_busy`.
        if r.slot.is_some() {
            self.stats.evicted += 1;
            // A stale handshake is the source's doing; a fair share's swap is not.
            if now.saturating_duration_since(r.started) >= caps.grace {
                self.strike(r.source, now);
            }
        }
        let loud = self.loud();
        gated!(loud, peer = %r.peer, age = ?r.started.elapsed(), "stale handshake evicted");
        r.slot.take()
    }

    fn open(&self, caps: &Caps, free_slots: usize) -> usize {
        let refusing = self.running.iter().filter(|r| r.slot.is_none()).count();
        self.waiting.len() + caps.connections.saturating_sub(free_slots) + refusing
    }

    /// Removes the connection `index` past TLS, closing it if `kill`; its slot is free.
    fn remove_held(&mut self, index: usize, kill: bool) -> Held {
        let mut h = self.held.remove(index);
        if kill {
            h.kill.fire();
        }
        h.slot = None;
        h
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
/// tasks, the connections past TLS and [`Listener::stats`](crate::Listener::stats).
#[derive(Debug)]
pub(crate) struct Admission {
    table: Mutex<Table>,
    slots: Arc<Semaphore>,
    /// Wakes the accept loop: a running handshake ended or left the table, or a slot freed.
    changed: Notify,
    caps: Caps,
}

impl Admission {
    pub(crate) fn new(config: &NetConfig) -> Admission {
        Admission {
            table: Mutex::new(Table {
                running: Vec::new(),
                waiting: Vec::new(),
                held: Vec::new(),
                running_per_source: HashMap::new(),
                waiting_per_source: HashMap::new(),
                standings: HashMap::new(),
                next_id: 0,
                stats: ListenerStats::default(),
                gate: LogGate::new(),
                closed: false,
            }),
            slots: Arc::new(Semaphore::new(config.max_connections)),
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
            // The oldest waiting socket of the source holding the most
            // sockets (running and waiting), then with the most strikes.
            let load = |t: &Table, w: &Waiting| {
                let s = &w.source;
                (t.running_of(s) + t.waiting_of(s), t.strikes_of(s, now))
            };
            let Some(most) = t.waiting.iter().map(|w| load(&t, w)).max() else {
                break;
            };
            let Some(i) = t.waiting.iter().position(|w| load(&t, w) == most) else {
                break;
            };
            let w = t.remove_waiting(i);
            t.stats.shed += 1;
            t.strike(w.source, now);
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
        // fewest waiting (a flood's sources queue more), then fewest
        // strikes, then oldest.
        let mut seen = Vec::new();
        let mut order = Vec::new();
        for (i, w) in t.waiting.iter().enumerate() {
            if !seen.contains(&w.source) {
                seen.push(w.source);
                let s = &w.source;
                order.push((t.running_of(s), t.waiting_of(s), t.strikes_of(s, now), i));
            }
        }
        order.sort_unstable();
        let free = self.slots.available_permits();
        let (index, mut victims, from) = order.into_iter().find_map(|(_, _, _, i)| {
            let (victims, from) = t.plan(t.waiting[i].source, &self.caps, free, now)?;
            Some((i, victims, from))
        })?;
        let w = t.remove_waiting(index);
        victims.sort_unstable_by(|a, b| b.cmp(a));
        let mut freed = None;
        for v in victims {
            if let Some(slot) = t.evict(v, &self.caps, now) {
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

    /// Resolves when a running handshake ended or left the table, or a slot freed.
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

    /// The handshake's TLS completed and its certificate is pinned to
    /// `device`: it leaves the table with its slot, charged to `device`,
    /// whose oldest connection past TLS is closed if it already holds
    /// [`MAX_CONNECTIONS_PER_DEVICE`]. The stream must then run inside the
    /// returned ticket ([`HeldStream`]), which gives the slot back when
    /// dropped. `None` if it was evicted meanwhile, or holds no slot.
    pub(crate) fn leave_table(self: &Arc<Self>, id: u64, device: DeviceId) -> Option<Ticket> {
        let mut t = self.lock();
        let i = t.running.iter().position(|r| r.id == id)?;
        let r = t.remove_running(i);
        let Some(slot) = r.slot else {
            drop(t);
            self.changed.notify_one();
            return None;
        };
        let mut theirs = t.held.iter().filter(|h| h.device == device).count();
        while theirs >= MAX_CONNECTIONS_PER_DEVICE {
            let Some(j) = t.held.iter().position(|h| h.device == device) else {
                break;
            };
            let old = t.remove_held(j, true);
            t.stats.replaced += 1;
            theirs -= 1;
            let loud = t.loud();
            gated!(loud, peer = %old.peer, device = %device, max = MAX_CONNECTIONS_PER_DEVICE,
                "closing the device's oldest connection for a newer one");
        }
        let kill = Arc::new(Kill::default());
        t.held.push(Held {
            id,
            device,
            peer: r.peer,
            slot: Some(slot),
            kill: kill.clone(),
        });
        t.stats.peak_connections_per_device = t.stats.peak_connections_per_device.max(theirs + 1);
        drop(t);
        self.changed.notify_one();
        Some(Ticket {
            admission: self.clone(),
            id,
            kill,
        })
    }

    /// The connection `id` past TLS is gone: its slot is free.
    fn release(&self, id: u64) {
        let mut t = self.lock();
        if let Some(i) = t.held.iter().position(|h| h.id == id) {
            t.remove_held(i, false);
            drop(t);
            self.changed.notify_one();
        }
    }

    /// The running entry `id` ended without a connection (`None`: a refusal
    /// was sent). Nothing is counted if it was evicted meanwhile.
    pub(crate) fn finish(&self, id: u64, peer: SocketAddr, outcome: Option<Outcome>) {
        let mut t = self.lock();
        let Some(i) = t.running.iter().position(|r| r.id == id) else {
            return;
        };
        let r = t.remove_running(i);
        // A failed or timed-out TLS handshake (garbage, an unknown
        // certificate, a stall) is the source's doing.
        if outcome.is_some() {
            t.strike(r.source, Instant::now());
        }
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

    /// Closes every waiting socket and running handshake (the listener is
    /// dropped). Connections past TLS live on, each with its slot.
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
        t.standings.clear();
    }
}

/// A connection past TLS, as the admission table counts it: gives its slot
/// back when dropped, and is closed if its device opens too many.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    kill: Arc<Kill>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.id);
    }
}

/// The error a stream closed for a newer connection of its device fails with.
fn replaced() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed for a newer connection of the same device",
    )
}

/// A stream past TLS holding its [`Ticket`]: the slot is held as long as
/// the stream (the connection's reader and writer) lives, and once the
/// ticket is killed every read and write fails.
pub(crate) struct HeldStream {
    inner: BoxStream,
    ticket: Ticket,
}

impl HeldStream {
    pub(crate) fn new(inner: BoxStream, ticket: Ticket) -> HeldStream {
        HeldStream { inner, ticket }
    }

    /// Whether the ticket was killed; else this task (reading, or
    /// writing) is woken when it is.
    fn killed(&self, cx: &Context<'_>, write: bool) -> bool {
        let kill = &self.ticket.kill;
        kill.check(if write { &kill.write } else { &kill.read }, cx)
    }
}

impl AsyncRead for HeldStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(cx, false) {
            return Poll::Ready(Err(replaced()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HeldStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed(cx, true) {
            return Poll::Ready(Err(replaced()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(cx, true) {
            return Poll::Ready(Err(replaced()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed(cx, true) {
            return Poll::Ready(Err(replaced()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_an_ipv4_address_and_mapped_ipv4_is_ipv4() {
        let v4 = ip("192.168.1.7");
        assert_eq!(source_of(v4), v4);
        assert_eq!(source_of(ip("::ffff:192.168.1.7")), v4);
        assert_ne!(source_of(ip("192.168.1.8")), v4);
        // Each mapped address is its own source, not one /64 (::ffff:0:0/96 is in ::/64).
        assert_ne!(
            source_of(ip("::ffff:127.0.0.2")),
            source_of(ip("::ffff:127.0.0.3"))
        );
    }

    #[test]
    fn ipv6_sources_are_their_64_prefix() {
        let a = source_of(ip("2001:db8:1:2:3:4:5:6"));
        assert_eq!(a, ip("2001:db8:1:2::"));
        assert_eq!(source_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), a);
        assert_eq!(source_of(ip("2001:db8:1:2::1")), a);
        assert_ne!(source_of(ip("2001:db8:1:3::1")), a);
        assert_ne!(source_of(ip("2001:db9:1:2::1")), a);
        assert_eq!(source_of(ip("fe80::1")), source_of(ip("fe80::2")));
        assert_eq!(source_of(ip("::1")), ip("::"));
        assert_ne!(source_of(ip("::1")), source_of(ip("127.0.0.1")));
        let socket: SocketAddr = "[2001:db8:1:2:aaaa::9]:7070".parse().unwrap();
        assert_eq!(source_of(socket.ip()), a);
    }

    #[test]
    fn strikes_halve_every_half_life() {
        let t0 = Instant::now();
        let s = Standing {
            strikes: 9,
            since: t0,
        };
        assert_eq!(s.at(t0 + STRIKE_HALF_LIFE / 2).strikes, 9);
        assert_eq!(s.at(t0 + STRIKE_HALF_LIFE).strikes, 4);
        let later = s.at(t0 + STRIKE_HALF_LIFE * 3 + STRIKE_HALF_LIFE / 2);
        assert_eq!(later.strikes, 1);
        assert_eq!(later.since, t0 + STRIKE_HALF_LIFE * 3);
        assert_eq!(s.at(t0 + STRIKE_HALF_LIFE * 100).strikes, 0);
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod admission_tests;
