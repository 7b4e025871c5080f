//! What the loopback tests share (`tests.rs`, `admission_tests.rs`):
//! configs and pins, dialling and exchanging frames, sockets from other
//! loopback hosts, and the flood harness: hostile sockets that stall or
//! spoil their handshakes while a trusted client dials through them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sync_core::{DeviceId, IndexId, LibraryId, Message, Seq};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Connection, Identity, Listener, ListenerStats, NetConfig, TrustStore, dial};

/// A fresh identity in `library`, trusting no one, with short timeouts.
pub(crate) fn config(library: LibraryId, name: &str) -> NetConfig {
    let identity = Identity::generate(DeviceId::new_v7()).unwrap();
    let me = identity.device_id;
    let mut c = NetConfig::new(
        Arc::new(identity),
        TrustStore::in_memory(me),
        library,
        name.to_string(),
    );
    c.handshake_timeout = Duration::from_secs(3);
    c.idle_timeout = Duration::from_secs(5);
    c
}

/// `cfg`'s identity, trust and library under the default limits and timeouts.
pub(crate) fn defaults_of(cfg: &NetConfig) -> NetConfig {
    NetConfig::new(
        cfg.identity.clone(),
        cfg.trust.clone(),
        cfg.library,
        String::new(),
    )
}

/// `a` pins `b`'s certificate, bound to `b`'s device.
pub(crate) fn pin(a: &NetConfig, b: &NetConfig) {
    a.trust
        .trust(b.identity.fingerprint, b.identity.device_id)
        .unwrap();
}

/// `a` and `b` pin each other.
pub(crate) fn mutual(a: &NetConfig, b: &NetConfig) {
    pin(a, b);
    pin(b, a);
}

/// A client trusted by (and trusting) the server.
pub(crate) fn good_client(server: &NetConfig) -> NetConfig {
    let c = config(server.library, "client");
    mutual(server, &c);
    c
}

pub(crate) fn wm(n: u64) -> Message {
    Message::Watermarks(vec![(DeviceId::from_bytes([1; 16]), IndexId(7), Seq(n))])
}

/// Frames flow both ways between the two ends.
pub(crate) async fn exchange(a: &mut Connection, b: &mut Connection) {
    a.send(wm(1)).await.unwrap();
    assert_eq!(b.recv().await.unwrap(), Some(wm(1)));
    b.send(wm(2)).await.unwrap();
    assert_eq!(a.recv().await.unwrap(), Some(wm(2)));
}

/// Dials and accepts, the accept bounded by `accept_within`; returns
/// (client side, server side) and how long the dial took.
async fn connect_within(
    listener: &Listener,
    client: &NetConfig,
    accept_within: Duration,
) -> (Connection, Connection, Duration) {
    let addr = listener.local_addr().to_string();
    let t = Instant::now();
    let (c, s) = tokio::join!(
        async {
            let c = dial(&addr, client).await;
            (c, t.elapsed())
        },
        tokio::time::timeout(accept_within, listener.accept())
    );
    let (c, took) = c;
    let stats = listener.stats();
    let c = c.unwrap_or_else(|e| panic!("dial failed after {took:?}: {e:?}; {stats:?}"));
    let s = s.expect("accept timed out").unwrap();
    (c, s, took)
}

/// Dials and accepts; returns (client side, server side).
pub(crate) async fn connect(listener: &Listener, client: &NetConfig) -> (Connection, Connection) {
    let (c, s, _) = connect_within(listener, client, Duration::from_secs(5)).await;
    (c, s)
}

/// Dials and accepts with room for a listener under load (an accept
/// bounded by 15 s); returns (client side, server side) and how long the
/// dial took.
pub(crate) async fn connect_timed(
    listener: &Listener,
    client: &NetConfig,
) -> (Connection, Connection, Duration) {
    connect_within(listener, client, Duration::from_secs(15)).await
}

/// A TLS stream to the listener that skips our `Hello` logic.
pub(crate) async fn raw_tls(
    addr: &str,
    cfg: &NetConfig,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls = crate::tls::client_config(cfg).unwrap();
    let sock = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, sock)
        .await
        .unwrap()
}

/// A TCP connection to `to` from the local address `from` (port 0): on
/// Linux all of 127.0.0.0/8 is loopback, so the listener sees another host.
pub(crate) async fn connect_from(
    from: impl Into<IpAddr>,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let from = from.into();
    let sock = match from {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(to).await
}

/// Open file descriptors of this process.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The bytes of a real TLS 1.3 ClientHello from `cfg`.
pub(crate) fn client_hello(cfg: &NetConfig) -> Vec<u8> {
    let tls = crate::tls::client_config(cfg).unwrap();
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Whether the listener closes `sock` (a TCP or TLS stream) within
/// `within`: EOF or reset. Whatever it sends before (a `Hello`) is read
/// and dropped.
pub(crate) async fn closed_within(sock: &mut (impl AsyncRead + Unpin), within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Polls `cond` every 5 ms for up to 10 s.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- The flood harness ----

/// How a hostile socket stalls or spoils its handshake.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stall {
    /// TCP only, not one byte.
    Silent,
    /// Half a ClientHello, then nothing.
    HalfHello,
    /// A whole ClientHello, then nothing (the listener waits for a certificate).
    HelloThenSilence,
    /// A ClientHello, one byte every 50 ms (slowloris).
    Drip,
    /// Not TLS: refused at once, and reopened at once.
    Garbage,
    /// A whole TLS handshake with a certificate the listener has not pinned
    /// (costs the listener a signature and a verification), refused. Needs
    /// [`FloodPlan::stranger`].
    Stranger,
}

/// What the attackers share: the bytes they send, the stranger's TLS
/// config and the stalls they take in turn.
struct Attack {
    to: SocketAddr,
    hello: Vec<u8>,
    stranger: Option<Arc<rustls::ClientConfig>>,
    stalls: &'static [Stall],
}

/// Opens one hostile connection from `from` and holds it until the listener
/// closes it; returns whether TCP connected.
async fn stall(attack: &Attack, from: IpAddr, how: Stall) -> bool {
    let Ok(mut sock) = connect_from(from, attack.to).await else {
        return false;
    };
    let hello = &attack.hello;
    let wrote = match how {
        Stall::Silent => Ok(()),
        Stall::HalfHello => sock.write_all(&hello[..hello.len() / 2]).await,
        Stall::HelloThenSilence => sock.write_all(hello).await,
        Stall::Garbage => sock.write_all(b"GET / HTTP/1.1\r\n\r\n").await,
        Stall::Drip => {
            for byte in hello.iter() {
                if sock.write_all(&[*byte]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
        Stall::Stranger => {
            let stranger = attack.stranger.clone().expect("a stranger's TLS config");
            let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
            let connector = tokio_rustls::TlsConnector::from(stranger);
            if let Ok(mut tls) = connector.connect(name, sock).await {
                let mut sink = Vec::new();
                let _ = tls.read_to_end(&mut sink).await;
            }
            return true;
        }
    };
    if wrote.is_ok() {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = sock.read(&mut buf).await {}
    }
    true
}

/// Keeps `held` hostile connections open from `sources` (every kind of
/// `attack.stalls` in turn), opening a new one as soon as the listener
/// closes one, until `stop`. Counts in `per_source` the connections each
/// source made; returns how many it opened.
async fn flood(
    attack: Arc<Attack>,
    sources: Vec<IpAddr>,
    held: usize,
    stop: Arc<AtomicBool>,
    per_source: Arc<Vec<AtomicU64>>,
) -> u64 {
    let slots = Arc::new(tokio::sync::Semaphore::new(held));
    let mut tasks = tokio::task::JoinSet::new();
    let mut opened = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(slot)) =
            tokio::time::timeout(Duration::from_millis(20), slots.clone().acquire_owned()).await
        else {
            continue;
        };
        let n = opened as usize;
        let s = n % sources.len();
        let from = sources[s];
        let how = attack.stalls[(n / sources.len()) % attack.stalls.len()];
        let (attack, per_source) = (attack.clone(), per_source.clone());
        tasks.spawn(async move {
            if stall(&attack, from, how).await {
                per_source[s].fetch_add(1, Ordering::Relaxed);
            }
            drop(slot);
        });
        opened += 1;
        while tasks.try_join_next().is_some() {}
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    opened // dropping `tasks` aborts them: every attacker socket closes
}

/// How [`flood_round`] floods the listener and dials through the flood.
pub(crate) struct FloodPlan {
    /// The hosts the hostile sockets come from.
    pub(crate) sources: Vec<IpAddr>,
    /// How many hostile sockets are held open at once.
    pub(crate) held: usize,
    /// The kinds of hostile socket, taken in turn.
    pub(crate) stalls: &'static [Stall],
    /// The TLS config of the [`Stall::Stranger`] sockets, if any.
    pub(crate) stranger: Option<Arc<rustls::ClientConfig>>,
    /// How many times the trusted client dials.
    pub(crate) dials: u64,
    /// How long each of those dials may take.
    pub(crate) dial_within: Duration,
    /// Dial `i` is followed by a pause of `50 + i * 37 % spread_ms` ms.
    pub(crate) spread_ms: u64,
}

/// What one flood round measured.
pub(crate) struct FloodRound {
    /// Hostile sockets opened.
    pub(crate) opened: u64,
    /// The hostile connections each source made, in the order of `sources`.
    pub(crate) per_source: Vec<u64>,
    pub(crate) peak_handshaking: usize,
    pub(crate) peak_waiting: usize,
    /// The open file descriptors of this process before the flood.
    pub(crate) baseline: usize,
    /// The most file descriptors open during the flood, above `baseline`.
    pub(crate) max_fds: usize,
    /// The listener's stats after the last dial, before the flood stopped.
    pub(crate) during: ListenerStats,
    /// How long each trusted dial took, sorted.
    pub(crate) latencies: Vec<Duration>,
}

/// Floods the listener as `plan` says while `client` dials through the
/// flood; checks every dial, the bounds while it lasted (handshakes,
/// waiting sockets, open sockets and file descriptors) and that the
/// listener drains once the attackers leave.
pub(crate) async fn flood_round(
    listener: &Arc<Listener>,
    scfg: &NetConfig,
    client: &NetConfig,
    plan: FloodPlan,
) -> FloodRound {
    let FloodPlan {
        sources,
        held,
        stalls,
        stranger,
        dials,
        dial_within,
        spread_ms,
    } = plan;
    let baseline = open_fds();
    let stop = Arc::new(AtomicBool::new(false));
    let per_source = Arc::new(
        sources
            .iter()
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>(),
    );
    let attack = Arc::new(Attack {
        to: listener.local_addr(),
        hello: client_hello(client),
        stranger,
        stalls,
    });
    let attackers = tokio::spawn(flood(
        attack,
        sources,
        held,
        stop.clone(),
        per_source.clone(),
    ));
    eventually("the flood fills the listener", || {
        let s = listener.stats();
        s.handshaking == scfg.max_handshaking && s.waiting == scfg.max_waiting
    })
    .await;

    let sampling = Arc::new(AtomicBool::new(true));
    let max_fds = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (listener, sampling, max_fds) = (listener.clone(), sampling.clone(), max_fds.clone());
        tokio::spawn(async move {
            let (mut handshaking, mut waiting) = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                let s = listener.stats();
                handshaking = s.handshaking.max(handshaking);
                waiting = s.waiting.max(waiting);
                max_fds.fetch_max(open_fds(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (handshaking, waiting)
        })
    };

    let before = listener.stats();
    let mut latencies = Vec::new();
    for i in 0..dials {
        let (mut c, mut s, took) = connect_timed(listener, client).await;
        exchange(&mut c, &mut s).await;
        assert!(
            took < dial_within,
            "dial {i} took {took:?}, beyond {dial_within:?}"
        );
        latencies.push(took);
        // Spread the dials over the flood, at varied phases of `handshake_grace`.
        tokio::time::sleep(Duration::from_millis(50 + i * 37 % spread_ms)).await;
    }
    let during = listener.stats();
    sampling.store(false, Ordering::Relaxed);
    let (peak_handshaking, peak_waiting) = sampler.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let opened = attackers.await.unwrap();

    // Bounded while it lasted.
    assert!(peak_handshaking <= scfg.max_handshaking);
    assert!(peak_waiting <= scfg.max_waiting);
    let cap = scfg.max_waiting + scfg.max_connections + scfg.max_handshaking;
    assert!(during.peak_open <= cap, "{} > {cap}", during.peak_open);
    let max_fds = max_fds.load(Ordering::Relaxed);
    // The attackers' and the trusted client's sockets live in this process too.
    assert!(
        max_fds <= baseline + held + cap + 16,
        "{max_fds} fds (baseline {baseline})"
    );
    assert!(during.evicted > 0 && during.shed > 0, "{during:?}");
    assert_eq!(during.authenticated - before.authenticated, dials);

    // Back to baseline once the attackers leave.
    eventually("the listener drains", || {
        let s = listener.stats();
        s.waiting == 0 && s.handshaking == 0 && s.connections == 0
    })
    .await;

    latencies.sort();
    FloodRound {
        opened,
        per_source: per_source
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect(),
        peak_handshaking,
        peak_waiting,
        baseline,
        max_fds: max_fds - baseline,
        during,
        latencies,
    }
}
