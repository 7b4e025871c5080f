//! Admission control under floods from many sources, IPv6 grouping and the
//! per-device cap, over real TLS on loopback.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sync_core::LibraryId;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::test_support::{
    FloodPlan, FloodRound, Stall, closed_within, config, connect_from, connect_timed, defaults_of,
    eventually, exchange, flood_round, good_client, pin, raw_tls,
};
use crate::{Listener, NetError};

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

/// The stalls of this flood, in turn: every kind, strangers' handshakes too.
const STALLS: [Stall; 6] = [
    Stall::Silent,
    Stall::HalfHello,
    Stall::Garbage,
    Stall::HelloThenSilence,
    Stall::Stranger,
    Stall::Drip,
];

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
        let defaults = defaults_of(&scfg);
        scfg.handshake_timeout = defaults.handshake_timeout;
        scfg.idle_timeout = defaults.idle_timeout;
        let mut client = good_client(&scfg);
        client.handshake_timeout = defaults.handshake_timeout;
        let listener = Arc::new(Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap());
        let stranger = config(scfg.library, "stranger");
        pin(&stranger, &scfg);
        let plan = FloodPlan {
            sources: (0..SOURCES)
                .map(|i| IpAddr::from([127, 0, 0, 2 + i]))
                .collect(),
            held: HELD,
            stalls: &STALLS,
            stranger: Some(crate::tls::client_config(&stranger).unwrap()),
            dials: DIALS,
            dial_within: scfg.handshake_timeout,
            spread_ms: 200,
        };
        let FloodRound {
            opened,
            per_source,
            peak_handshaking,
            peak_waiting,
            max_fds,
            during,
            latencies,
            ..
        } = flood_round(&listener, &scfg, &client, plan).await;

        // The flood came from every source, and was refused all along.
        for (i, n) in per_source.iter().enumerate() {
            assert!(*n > 0, "source {i} never connected");
        }
        assert!(during.failed > 0, "{during:?}");
        // The trusted client still connects once the attackers have left.
        let (mut c, mut s, _) = connect_timed(&listener, &client).await;
        exchange(&mut c, &mut s).await;

        eprintln!(
            "flood from {SOURCES} sources: {opened} attacker sockets opened; \
             peak handshaking {peak_handshaking}, waiting {peak_waiting}; \
             fds above baseline at most {max_fds}; {DIALS} trusted dials: \
             median {:?}, p90 {:?}, max {:?}\nlistener: {during:?}",
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
    cfg: &crate::NetConfig,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = raw_tls(&to.to_string(), cfg).await;
    // TLS 1.3: the server learns the handshake is complete from our Finished.
    tls.flush().await.unwrap();
    tls
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
        let (c, s, _) = connect_timed(&listener, &greedy).await;
        assert_eq!(s.peer.device, greedy.identity.device_id, "connection {i}");
        held.push((c, s));
    }
    let st = listener.stats();
    assert_eq!(st.connections, PER_DEVICE, "{st:?}");
    assert_eq!(st.replaced, (many - PER_DEVICE) as u64, "{st:?}");
    assert_eq!(st.peak_connections_per_device, PER_DEVICE, "{st:?}");
    assert_eq!(st.refused_busy, 0, "{st:?}");

    let (mut c, mut s, _) = connect_timed(&listener, &other).await;
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
    let (mut c, mut s, _) = connect_timed(&listener, &other).await;
    exchange(&mut c, &mut s).await;
    let st = listener.stats();
    assert_eq!(st.connections, PER_DEVICE + 1, "{st:?}");
    assert_eq!(st.peak_connections_per_device, PER_DEVICE, "{st:?}");
    assert_eq!(st.replaced, (many - PER_DEVICE) as u64, "{st:?}");
    assert_eq!(st.refused_busy, 0, "{st:?}");
    let (old, newest) = stalled.split_at_mut(many - PER_DEVICE);
    for (i, tls) in old.iter_mut().enumerate() {
        assert!(
            closed_within(tls, Duration::from_secs(1)).await,
            "stalled connection {i} still open"
        );
    }
    for (i, tls) in newest.iter_mut().enumerate() {
        assert!(
            !closed_within(tls, Duration::from_millis(100)).await,
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
    let (mut c, mut s, _) = connect_timed(&listener, &client).await;
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
    let (mut c, mut s, _) = connect_timed(&listener, &client).await;
    exchange(&mut c, &mut s).await;
    assert!(
        s.peer.addr.starts_with("[::ffff:127.0.0.1]"),
        "{}",
        s.peer.addr
    );
}
