//! Admission control under floods from many sources, IPv6 grouping and the
//! per-device cap, over real TLS on loopback.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sync_core::{DeviceId, IndexId, LibraryId, Message, Seq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Connection, Identity, Listener, NetConfig, NetError, TrustStore, dial};

fn config(library: LibraryId, name: &str) -> NetConfig {
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

/// `a` pins `b`'s certificate, bound to `b`'s device.
fn pin(a: &NetConfig, b: &NetConfig) {
    a.trust
        .trust(b.identity.fingerprint, b.identity.device_id)
        .unwrap();
}

/// A client trusted by (and trusting) the server.
fn good_client(server: &NetConfig) -> NetConfig {
    let c = config(server.library, "client");
    pin(server, &c);
    pin(&c, server);
    c
}

fn wm(n: u64) -> Message {
    Message::Watermarks(vec![(DeviceId::from_bytes([1; 16]), IndexId(7), Seq(n))])
}

/// Frames flow both ways between the two ends.
async fn exchange(a: &mut Connection, b: &mut Connection) {
    a.send(wm(1)).await.unwrap();
    assert_eq!(b.recv().await.unwrap(), Some(wm(1)));
    b.send(wm(2)).await.unwrap();
    assert_eq!(a.recv().await.unwrap(), Some(wm(2)));
}

/// Dials and accepts; returns (client side, server side) and how long the dial took.
async fn connect(listener: &Listener, client: &NetConfig) -> (Connection, Connection, Duration) {
    let addr = listener.local_addr().to_string();
    let t = Instant::now();
    let (c, s) = tokio::join!(
        async {
            let c = dial(&addr, client).await;
            (c, t.elapsed())
        },
        tokio::time::timeout(Duration::from_secs(15), listener.accept())
    );
    let (c, took) = c;
    let stats = listener.stats();
    let c = c.unwrap_or_else(|e| panic!("dial failed after {took:?}: {e:?}; {stats:?}"));
    let s = s.expect("accept timed out").unwrap();
    (c, s, took)
}

/// A TCP connection to `to` from the local address `from` (port 0): on
/// Linux all of 127.0.0.0/8 is loopback, so the listener sees another host.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = match from {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(to).await
}

/// Set in a child process of this test binary to the one test it runs.
const ISOLATED: &str = "SYNC_NET_ISOLATED_TEST";

/// Runs the test `name` (of this module) in a child process of this test
/// binary, unless this is that child: its hundreds of sockets then do not
/// count in the file descriptors that other flood tests, running beside it
/// in this process, count as theirs. Returns whether it ran elsewhere (the
/// caller returns at once); panics if it failed there.
#[allow(clippy::print_stderr)] // the child's figures
async fn ran_in_child(name: &str) -> bool {
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let full = format!("{module}::{name}");
    if std::env::var(ISOLATED).is_ok_and(|v| v == full) {
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let child = tokio::process::Command::new(exe)
        .args([&full, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED, &full)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), child)
        .await
        .expect("the child test ran beyond its bound")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{full} failed in its child process");
    assert!(stdout.contains("1 passed"), "{full} did not run: {stdout}");
    true
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The bytes of a real TLS 1.3 ClientHello from `cfg`.
fn client_hello(cfg: &NetConfig) -> Vec<u8> {
    let tls = crate::tls::client_config(cfg).unwrap();
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
    let mut conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Polls `cond` every 5 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How a hostile socket stalls or spoils its handshake.
#[derive(Clone, Copy, Debug)]
enum Stall {
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
    /// (costs the listener a signature and a verification), refused.
    Stranger,
}

const STALLS: [Stall; 6] = [
    Stall::Silent,
    Stall::HalfHello,
    Stall::Garbage,
    Stall::HelloThenSilence,
    Stall::Stranger,
    Stall::Drip,
];

/// What the attackers share: the bytes they send and the stranger's TLS config.
struct Attack {
    to: SocketAddr,
    hello: Vec<u8>,
    stranger: Arc<rustls::ClientConfig>,
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
            let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
            let connector = tokio_rustls::TlsConnector::from(attack.stranger.clone());
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
/// [`Stall`] in turn), opening a new one as soon as the listener closes one,
/// until `stop`. Counts in `per_source` the connections each source made.
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
        let how = STALLS[(n / sources.len()) % STALLS.len()];
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

/// The `p`-th percentile of sorted `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    v[(v.len() - 1) * p / 100]
}

/// 128 distinct loopback sources flood the listener with stalled sockets,
/// garbage and refused TLS handshakes, holding far more sockets than it
/// has places: per-source caps never bind. Every dial of a trusted peer
/// must still succeed within its handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)] // the figures the report quotes
async fn a_flood_from_128_sources_cannot_keep_a_trusted_dial_out() {
    if ran_in_child("a_flood_from_128_sources_cannot_keep_a_trusted_dial_out").await {
        return;
    }
    const SOURCES: u8 = 128;
    const HELD: usize = 256;
    const DIALS: u64 = 30;
    let body = async {
        // Default limits and timeouts: a starved dial would wait out `handshake_timeout`.
        let mut scfg = config(LibraryId::new_v7(), "server");
        let defaults = NetConfig::new(
            scfg.identity.clone(),
            scfg.trust.clone(),
            scfg.library,
            String::new(),
        );
        scfg.handshake_timeout = defaults.handshake_timeout;
        scfg.idle_timeout = defaults.idle_timeout;
        let mut client = good_client(&scfg);
        client.handshake_timeout = defaults.handshake_timeout;
        let listener = Arc::new(Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap());
        let to = listener.local_addr();
        let stranger = config(scfg.library, "stranger");
        pin(&stranger, &scfg);
        let attack = Arc::new(Attack {
            to,
            hello: client_hello(&client),
            stranger: crate::tls::client_config(&stranger).unwrap(),
        });
        let sources: Vec<IpAddr> = (0..SOURCES)
            .map(|i| IpAddr::from([127, 0, 0, 2 + i]))
            .collect();
        let per_source = Arc::new((0..SOURCES).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let baseline = open_fds();
        let stop = Arc::new(AtomicBool::new(false));
        let attackers = tokio::spawn(flood(
            attack,
            sources,
            HELD,
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
            let (listener, sampling, max_fds) =
                (listener.clone(), sampling.clone(), max_fds.clone());
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
        for i in 0..DIALS {
            let (mut c, mut s, took) = connect(&listener, &client).await;
            exchange(&mut c, &mut s).await;
            assert!(
                took < scfg.handshake_timeout,
                "dial {i} took {took:?}, beyond the handshake timeout"
            );
            latencies.push(took);
            // Spread the dials over the flood, at varied phases of `handshake_grace`.
            tokio::time::sleep(Duration::from_millis(50 + i * 37 % 200)).await;
        }
        let during = listener.stats();
        sampling.store(false, Ordering::Relaxed);
        let (peak_handshaking, peak_waiting) = sampler.await.unwrap();
        stop.store(true, Ordering::Relaxed);
        let opened = attackers.await.unwrap();

        // The flood came from every source, and was refused all along.
        for (i, n) in per_source.iter().enumerate() {
            assert!(n.load(Ordering::Relaxed) > 0, "source {i} never connected");
        }
        assert_eq!(during.authenticated - before.authenticated, DIALS);
        assert!(during.evicted > 0 && during.shed > 0, "{during:?}");
        assert!(during.failed > 0, "{during:?}");
        // Bounded while it lasted.
        assert!(peak_handshaking <= scfg.max_handshaking);
        assert!(peak_waiting <= scfg.max_waiting);
        let cap = scfg.max_waiting + scfg.max_connections + scfg.max_handshaking;
        assert!(during.peak_open <= cap, "{} > {cap}", during.peak_open);
        let max_fds = max_fds.load(Ordering::Relaxed);
        assert!(
            max_fds <= baseline + HELD + cap + 16,
            "{max_fds} fds (baseline {baseline})"
        );
        // Back to baseline once the attackers leave.
        eventually("the listener drains", || {
            let s = listener.stats();
            s.waiting == 0 && s.handshaking == 0 && s.connections == 0
        })
        .await;
        let (mut c, mut s, _) = connect(&listener, &client).await;
        exchange(&mut c, &mut s).await;

        latencies.sort();
        eprintln!(
            "flood from {SOURCES} sources: {opened} attacker sockets opened; \
             peak handshaking {peak_handshaking}, waiting {peak_waiting}; \
             fds above baseline at most {}; {DIALS} trusted dials: \
             median {:?}, p90 {:?}, max {:?}\nlistener: {during:?}",
            max_fds - baseline,
            percentile(&latencies, 50),
            percentile(&latencies, 90),
            percentile(&latencies, 100),
        );
    };
    tokio::time::timeout(Duration::from_secs(120), body)
        .await
        .expect("the flood test ran beyond its bound");
}

/// A TLS session to `to` with `cfg`'s identity, that never sends `Hello`.
async fn tls_without_hello(
    to: SocketAddr,
    cfg: &NetConfig,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls = crate::tls::client_config(cfg).unwrap();
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
    let sock = TcpStream::connect(to).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls)
        .connect(name, sock)
        .await
        .unwrap();
    // TLS 1.3: the server learns the handshake is complete from our Finished.
    tls.flush().await.unwrap();
    tls
}

/// Whether `tls` is closed by the listener within `within`.
async fn tls_closed_within(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    within: Duration,
) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {} // the listener's Hello
        }
    }
}

/// One trusted device (compromised, or looping) opens many more
/// connections than the listener has slots and holds them all: it keeps at
/// most `MAX_CONNECTIONS_PER_DEVICE`, each newer one closing its oldest, so
/// a second trusted device still connects and exchanges frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trusted_device_cannot_hold_every_slot() {
    if ran_in_child("one_trusted_device_cannot_hold_every_slot").await {
        return;
    }
    use crate::admission::MAX_CONNECTIONS_PER_DEVICE as PER_DEVICE;
    let scfg = config(LibraryId::new_v7(), "server");
    assert_eq!(scfg.max_connections, 64);
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let greedy = good_client(&scfg);
    let other = good_client(&scfg);
    let many = scfg.max_connections + 16;

    // Authenticated connections, all held on both sides.
    let mut held = Vec::new();
    for i in 0..many {
        let (c, s, _) = connect(&listener, &greedy).await;
        assert_eq!(s.peer.device, greedy.identity.device_id, "connection {i}");
        held.push((c, s));
    }
    let st = listener.stats();
    assert_eq!(st.connections, PER_DEVICE, "{st:?}");
    assert_eq!(st.replaced, (many - PER_DEVICE) as u64, "{st:?}");
    assert_eq!(st.peak_connections_per_device, PER_DEVICE, "{st:?}");
    assert_eq!(st.refused_busy, 0, "{st:?}");

    let (mut c, mut s, _) = connect(&listener, &other).await;
    assert_eq!(s.peer.device, other.identity.device_id);
    exchange(&mut c, &mut s).await;

    // The older ones were closed on the listener's side; the newest still serve.
    let newest = held.split_off(many - PER_DEVICE);
    for (i, (_, s)) in held.iter_mut().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(1), s.recv()).await;
        assert!(
            matches!(r, Ok(Err(NetError::Io(_)))),
            "old connection {i}: {r:?}"
        );
    }
    for (mut c, mut s) in newest {
        exchange(&mut c, &mut s).await;
    }
    drop(held);
    drop((c, s));
    eventually("the slots are free", || listener.stats().connections == 0).await;
}

/// A trusted device that completes TLS and then never sends `Hello`, on
/// more sockets than the listener has slots: those sockets are past TLS,
/// charged to the device, so it holds at most `MAX_CONNECTIONS_PER_DEVICE`
/// of them and a second trusted device still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_device_stalling_its_hello_cannot_hold_every_slot() {
    if ran_in_child("a_trusted_device_stalling_its_hello_cannot_hold_every_slot").await {
        return;
    }
    use crate::admission::MAX_CONNECTIONS_PER_DEVICE as PER_DEVICE;
    let mut scfg = config(LibraryId::new_v7(), "server");
    // Longer than this test: no stalled Hello times out on its own.
    scfg.handshake_timeout = Duration::from_secs(30);
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let to = listener.local_addr();
    let greedy = good_client(&scfg);
    let other = good_client(&scfg);
    let many = scfg.max_connections + 16;
    let mut stalled = Vec::new();
    for _ in 0..many {
        stalled.push(tls_without_hello(to, &greedy).await);
    }
    eventually(
        "every stalled TLS session is past the handshake table",
        || listener.stats().handshaking == 0,
    )
    .await;
    let (mut c, mut s, _) = connect(&listener, &other).await;
    exchange(&mut c, &mut s).await;
    let st = listener.stats();
    assert_eq!(st.connections, PER_DEVICE + 1, "{st:?}");
    assert_eq!(st.peak_connections_per_device, PER_DEVICE, "{st:?}");
    assert_eq!(st.replaced, (many - PER_DEVICE) as u64, "{st:?}");
    assert_eq!(st.refused_busy, 0, "{st:?}");
    let (old, newest) = stalled.split_at_mut(many - PER_DEVICE);
    for (i, tls) in old.iter_mut().enumerate() {
        assert!(
            tls_closed_within(tls, Duration::from_secs(1)).await,
            "stalled connection {i} still open"
        );
    }
    for (i, tls) in newest.iter_mut().enumerate() {
        assert!(
            !tls_closed_within(tls, Duration::from_millis(100)).await,
            "newest stalled connection {i} closed early"
        );
    }
}

/// A flood of stalled sockets from `::1` on a real IPv6 socket: the /64
/// `::/64` is one source, held to its share of handshakes (the other
/// places stay free for other sources), and the waiting sockets beyond
/// `max_waiting` are its own, shed; then a trusted peer connects over IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)]
async fn an_ipv6_flood_from_one_64_is_one_source() {
    if ran_in_child("an_ipv6_flood_from_one_64_is_one_source").await {
        return;
    }
    let mut scfg = config(LibraryId::new_v7(), "server");
    scfg.handshake_grace = Duration::from_secs(10); // no eviction here: only the caps
    let Ok(listener) = Listener::bind("[::1]:0", scfg.clone()).await else {
        eprintln!("no IPv6 loopback on this machine: skipped");
        return;
    };
    let to = listener.local_addr();
    let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let flood = 100;
    let mut socks = Vec::new();
    for _ in 0..flood {
        socks.push(connect_from(lo6, to).await.unwrap());
    }
    eventually("all accepted", || listener.stats().accepted == flood as u64).await;
    let st = listener.stats();
    let per = scfg.max_handshaking_per_ip;
    let waiting = scfg.max_waiting;
    assert_eq!((st.handshaking, st.waiting), (per, waiting), "{st:?}");
    assert_eq!(st.shed, (flood - per - waiting) as u64, "{st:?}");
    assert_eq!(st.peak_handshaking_per_ip, per, "{st:?}");
    drop(socks);
    eventually("the stallers are gone", || {
        let st = listener.stats();
        st.handshaking == 0 && st.waiting == 0
    })
    .await;
    let client = good_client(&scfg);
    let (mut c, mut s, _) = connect(&listener, &client).await;
    exchange(&mut c, &mut s).await;
    assert!(s.peer.addr.starts_with("[::1]"), "{}", s.peer.addr);
}

/// On a listener bound to an IPv4-mapped IPv6 address, IPv4 peers arrive as
/// `::ffff:a.b.c.d`, all inside one /64: each still counts as its own
/// IPv4 source, so 8 hosts run 16 handshakes, not 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_peers_are_their_ipv4_sources() {
    let mut scfg = config(LibraryId::new_v7(), "server");
    scfg.handshake_grace = Duration::from_secs(10);
    let Ok(listener) = Listener::bind("[::ffff:127.0.0.1]:0", scfg.clone()).await else {
        return; // no dual-stack sockets on this machine
    };
    let to = listener.local_addr();
    assert!(to.is_ipv6(), "{to}");
    let v4 = SocketAddr::from(([127, 0, 0, 1], to.port()));
    let mut socks = Vec::new();
    for h in 0..8u8 {
        for _ in 0..2 {
            socks.push(
                connect_from(IpAddr::from([127, 0, 0, 2 + h]), v4)
                    .await
                    .unwrap(),
            );
        }
    }
    eventually("all accepted", || listener.stats().accepted == 16).await;
    let st = listener.stats();
    assert_eq!((st.handshaking, st.waiting), (16, 0), "{st:?}");
    assert_eq!(st.peak_handshaking_per_ip, 2, "{st:?}");
    let client = good_client(&scfg);
    drop(socks);
    let (mut c, mut s, _) = connect(&listener, &client).await;
    exchange(&mut c, &mut s).await;
    assert!(
        s.peer.addr.starts_with("[::ffff:127.0.0.1]"),
        "{}",
        s.peer.addr
    );
}
