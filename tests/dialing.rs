//! Two devices that dial each other: over real TLS on loopback, through a
//! small TCP relay the test can cut, both keep exactly one session (the
//! one the lower device id dialed), and keep it up when it is cut or when
//! the lower id stops dialing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use sync_actors::SessionOrigin;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::harness::{Device, generate, shutdown, spawn_devices, wait_for_watermark};

/// Seeds run by default (in CI); `DIALING_SEEDS` overrides.
const DEFAULT_SEEDS: u64 = 40;
/// How long a pair may take to settle or to deliver a commit.
const WAIT: Duration = Duration::from_secs(30);

/// A loopback TCP relay to a target that can move, whose live connections
/// the test can cut at once (both sockets closed, as a lost link would).
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    cut: Arc<Mutex<CancellationToken>>,
}

impl Relay {
    async fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay = Relay {
            addr: listener.local_addr().expect("relay addr"),
            target: Arc::new(Mutex::new(target)),
            cut: Arc::new(Mutex::new(CancellationToken::new())),
        };
        let (target, cut) = (relay.target.clone(), relay.cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *target.lock().unwrap();
                let cut = cut.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        relay
    }

    /// Closes every connection relayed so far; later ones pass.
    fn cut(&self) {
        let old = std::mem::take(&mut *self.cut.lock().unwrap());
        old.cancel();
    }

    /// Relays later connections to `target`.
    fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// Two devices listening, each reachable through a relay, ordered
/// `(lower id, higher id)`, with the relay to each.
async fn pair() -> (Vec<Device>, Relay, Relay) {
    let mut devices = spawn_devices(2, |_| {}).await;
    devices.sort_by_key(|d| d.id);
    let mut relays = Vec::new();
    for d in &devices {
        let addr = d.engine.listen("127.0.0.1:0").await.expect("listen");
        relays.push(Relay::to(addr).await);
    }
    let to_hi = relays.pop().expect("relay");
    let to_lo = relays.pop().expect("relay");
    (devices, to_lo, to_hi)
}

/// The origins of `device`'s sessions.
async fn origins(device: &Device) -> Vec<SessionOrigin> {
    let peers = device.engine.peers().await.expect("peers");
    peers.iter().map(|p| p.origin).collect()
}

/// Waits until each device holds one session, over the same connection
/// (one dialed it, the other accepted it); with `lower_dialed`, the one
/// the lower id dialed.
async fn wait_one_link(lo: &Device, hi: &Device, lower_dialed: bool) {
    use SessionOrigin::{Accepted, Dialed};
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (l, h) = (origins(lo).await, origins(hi).await);
        let settled = match (l.as_slice(), h.as_slice()) {
            ([Dialed], [Accepted]) => true,
            ([Accepted], [Dialed]) => !lower_dialed,
            _ => false,
        };
        if settled {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled: lower id has {l:?}, higher id has {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A commit on each side arrives at the other.
async fn commits_cross(lo: &Device, hi: &Device, seed: u64) {
    let on_lo = generate(lo, 5, seed).await;
    let on_hi = generate(hi, 5, seed + 1).await;
    wait_for_watermark(hi, lo.id, on_lo.last, WAIT).await;
    wait_for_watermark(lo, hi.id, on_hi.last, WAIT).await;
}

/// Dials `to` from `from` after `delay`.
async fn dial_after(from: &Device, to: &Relay, delay: Duration) {
    tokio::time::sleep(delay).await;
    from.engine
        .connect(&to.addr.to_string())
        .await
        .expect("connect");
}

/// Both devices dial each other, in a random order with random delays
/// shorter than a handshake, so that the handshakes overlap (the race).
async fn dial_each_other(lo: &Device, hi: &Device, to_lo: &Relay, to_hi: &Relay, rng: &mut StdRng) {
    let d1 = Duration::from_micros(rng.random_range(0..3_000));
    let d2 = Duration::from_micros(rng.random_range(0..3_000));
    tokio::join!(dial_after(lo, to_hi, d1), dial_after(hi, to_lo, d2));
}

// Regression: each side kept its newer session and closed the link the
// other kept; both redial loops then stood down, leaving no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_dialing_each_other_keep_one_session() {
    let count = std::env::var("DIALING_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    for seed in 0..count {
        let mut rng = StdRng::seed_from_u64(seed);
        let (devices, to_lo, to_hi) = pair().await;
        let (lo, hi) = (&devices[0], &devices[1]);
        dial_each_other(lo, hi, &to_lo, &to_hi, &mut rng).await;
        wait_one_link(lo, hi, true).await;
        commits_cross(lo, hi, seed * 10).await;
        // Still the one session once traffic has flowed.
        wait_one_link(lo, hi, true).await;
        shutdown(&devices).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_reconnects_after_the_kept_link_is_cut() {
    let mut rng = StdRng::seed_from_u64(7);
    let (devices, to_lo, to_hi) = pair().await;
    let (lo, hi) = (&devices[0], &devices[1]);
    dial_each_other(lo, hi, &to_lo, &to_hi, &mut rng).await;
    wait_one_link(lo, hi, true).await;
    for round in 0..4 {
        // Both redial loops live on: whichever dial lands first is kept
        // (the other stands by, or loses the tie-break).
        let before = lo.engine.subscribe();
        to_hi.cut();
        to_lo.cut();
        wait_disconnected(before).await;
        wait_one_link(lo, hi, false).await;
        commits_cross(lo, hi, 100 + round * 10).await;
    }
    shutdown(&devices).await;
}

// The higher id's redial loop stands by while the lower id's session is
// kept; it must dial again once nobody else does (here the lower id
// restarted and dials no one), or the pair would stay apart for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_higher_id_dials_again_when_the_lower_id_stops_dialing() {
    let mut rng = StdRng::seed_from_u64(11);
    let (mut devices, to_lo, to_hi) = pair().await;
    {
        let (lo, hi) = (&devices[0], &devices[1]);
        dial_each_other(lo, hi, &to_lo, &to_hi, &mut rng).await;
        wait_one_link(lo, hi, true).await;
    }
    devices[0].restart(|_| {}).await;
    let addr = devices[0]
        .engine
        .listen("127.0.0.1:0")
        .await
        .expect("listen");
    to_lo.retarget(addr);
    let (lo, hi) = (&devices[0], &devices[1]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while origins(hi).await != [SessionOrigin::Dialed] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the higher id never dialed again: it has {:?}",
            origins(hi).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origins(lo).await, [SessionOrigin::Accepted]);
    commits_cross(lo, hi, 200).await;
    shutdown(&devices).await;
}

/// Waits for a `PeerDisconnected` on the bus `events` listens to.
async fn wait_disconnected(mut events: tokio::sync::broadcast::Receiver<sync_actors::SyncEvent>) {
    crate::harness::wait_event(&mut events, WAIT, |e| {
        matches!(e, sync_actors::SyncEvent::PeerDisconnected { .. })
    })
    .await;
}
