//! Tests over real TLS on loopback, the in-memory transport and the fault wrapper.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sync_core::{DeviceId, ErrorCode, FrameCodec, LibraryId, Message, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::dial_inner;
use crate::test_support::{
    FloodPlan, FloodRound, Stall, closed_within, config, connect, connect_from, defaults_of,
    eventually, exchange, good_client, mutual, open_fds, pin, raw_tls, wm,
};
use crate::{Identity, Listener, NetConfig, NetError, TrustStore, dial, memory_pair};

fn frame(msg: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default().encode_frame(msg, &mut buf).unwrap();
    buf.to_vec()
}

fn hello(cfg: &NetConfig) -> Message {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        device: cfg.identity.device_id,
        library: cfg.library,
        name: cfg.name.clone(),
    }
}

/// A server and a listener on loopback.
async fn server() -> (NetConfig, Listener) {
    let cfg = config(LibraryId::new_v7(), "server");
    let listener = Listener::bind("127.0.0.1:0", cfg.clone()).await.unwrap();
    (cfg, listener)
}

/// The listener still serves a good peer.
async fn still_serving(server: &NetConfig, listener: &Listener) {
    let client = good_client(server);
    let (mut c, mut s) = connect(listener, &client).await;
    assert_eq!(s.peer.device, client.identity.device_id);
    exchange(&mut c, &mut s).await;
}

#[tokio::test]
async fn trusted_pair_exchanges_frames() {
    let (scfg, listener) = server().await;
    let client = good_client(&scfg);
    let (mut c, mut s) = connect(&listener, &client).await;
    assert_eq!(c.peer.device, scfg.identity.device_id);
    assert_eq!(c.peer.fingerprint, scfg.identity.fingerprint);
    assert_eq!(c.peer.name, "server");
    assert_eq!(s.peer.device, client.identity.device_id);
    assert_eq!(s.peer.fingerprint, client.identity.fingerprint);
    assert!(s.peer.addr.starts_with("127.0.0.1:"));
    exchange(&mut c, &mut s).await;

    // Many frames, some large (compressed and not), then a clean close.
    let (_, mut rd, wr) = s.split();
    let big = Message::SnapshotChunk {
        id: sync_core::SnapshotId::new_v7(),
        index: 3,
        hash: [9; 32],
        data: (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
    };
    let sender = {
        let big = big.clone();
        let w = c.writer();
        tokio::spawn(async move {
            for i in 0..100 {
                w.send(wm(i)).await.unwrap();
            }
            w.send(big).await.unwrap();
            w.close().await;
            w.bytes_sent()
        })
    };
    for i in 0..100 {
        assert_eq!(c_recv_none_check(&mut rd).await, wm(i));
    }
    assert_eq!(rd.recv().await.unwrap(), Some(big));
    assert_eq!(rd.recv().await.unwrap(), None);
    assert!(sender.await.unwrap() > 1_000);
    assert!(matches!(c.send(wm(1)).await, Err(NetError::Closed)));
    drop(wr);
}

async fn c_recv_none_check(rd: &mut crate::ConnReader) -> Message {
    rd.recv().await.unwrap().expect("message")
}

#[tokio::test]
async fn server_unknown_to_client_is_refused() {
    let (scfg, listener) = server().await;
    let client = config(scfg.library, "client");
    pin(&scfg, &client); // the server trusts the client, not the reverse
    let err = dial(&listener.local_addr().to_string(), &client)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::UnknownCertificate), "{err:?}");
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn client_unknown_to_server_is_refused() {
    let (scfg, listener) = server().await;
    let client = config(scfg.library, "client");
    pin(&client, &scfg); // the client trusts the server, not the reverse
    let err = dial(&listener.local_addr().to_string(), &client)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::NotTrustedByPeer), "{err:?}");
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn a_hello_device_id_other_than_the_pin_is_refused_at_handshake() {
    // The client claims device Y with a certificate the server pinned to X.
    let (scfg, listener) = server().await;
    let client = config(scfg.library, "client");
    pin(&client, &scfg);
    let x = DeviceId::new_v7();
    scfg.trust.trust(client.identity.fingerprint, x).unwrap();
    let addr = listener.local_addr().to_string();
    // The client's own checks pass; the server's refusal arrives as the first frame.
    match dial(&addr, &client).await {
        Ok(mut conn) => {
            let err = conn.recv().await.unwrap_err();
            assert!(
                matches!(
                    err,
                    NetError::Refused {
                        code: ErrorCode::IdentityMismatch,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        Err(err) => assert!(
            matches!(err, NetError::Refused { .. } | NetError::Io(_)),
            "{err:?}"
        ),
    }
    still_serving(&scfg, &listener).await;

    // The dialer detects a server claiming another device: typed error.
    let client2 = config(scfg.library, "client2");
    pin(&scfg, &client2);
    client2.trust.trust(scfg.identity.fingerprint, x).unwrap();
    let (dialed, accepted) = tokio::join!(dial(&addr, &client2), listener.accept());
    // The server's checks passed, so it accepted; the dialer's refusal is its first frame.
    let err = accepted.unwrap().recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Refused {
                code: ErrorCode::IdentityMismatch,
                ..
            }
        ),
        "{err:?}"
    );
    match dialed.unwrap_err() {
        NetError::IdentityMismatch { claimed, pinned } => {
            assert_eq!(claimed, scfg.identity.device_id);
            assert_eq!(pinned, x);
        }
        other => panic!("{other:?}"),
    }
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn wrong_protocol_version() {
    let (scfg, listener) = server().await;
    let client = good_client(&scfg);
    let addr = listener.local_addr().to_string();
    let err = dial_inner(&addr, &client, PROTOCOL_VERSION + 1, None)
        .await
        .unwrap_err();
    match err {
        NetError::ProtocolMismatch { ours, theirs } => {
            assert_eq!(ours, PROTOCOL_VERSION + 1);
            assert_eq!(theirs, PROTOCOL_VERSION);
        }
        other => panic!("{other:?}"),
    }
    still_serving(&scfg, &listener).await;

    // Raw: the server answers a foreign version with Hello, then a typed Error.
    let mut tls = raw_tls(&addr, &client).await;
    let mut bad = hello(&client);
    if let Message::Hello { protocol, .. } = &mut bad {
        *protocol = 99;
    }
    tls.write_all(&frame(&bad)).await.unwrap();
    let mut got = Vec::new();
    let _ = tls.read_to_end(&mut got).await;
    let mut buf = BytesMut::from(&got[..]);
    let mut codec = FrameCodec::default();
    use tokio_util::codec::Decoder;
    assert!(matches!(
        codec.decode(&mut buf).unwrap(),
        Some(Message::Hello { .. })
    ));
    assert!(matches!(
        codec.decode(&mut buf).unwrap(),
        Some(Message::Error {
            code: ErrorCode::ProtocolMismatch,
            ..
        })
    ));
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn other_library() {
    let (scfg, listener) = server().await;
    let client = config(LibraryId::new_v7(), "client");
    mutual(&scfg, &client);
    let err = dial(&listener.local_addr().to_string(), &client)
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::LibraryMismatch), "{err:?}");
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn garbage_instead_of_tls() {
    let (scfg, listener) = server().await;
    let addr = listener.local_addr().to_string();
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), sock.read_to_end(&mut sink)).await;
    let mut sock = TcpStream::connect(&addr).await.unwrap();
    sock.write_all(&[0xFF; 4096]).await.unwrap();
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn garbage_after_handshake_is_a_decode_error() {
    let (scfg, listener) = server().await;
    let client = good_client(&scfg);
    let addr = listener.local_addr().to_string();
    let mut tls = raw_tls(&addr, &client).await;
    let mut bytes = frame(&hello(&client));
    bytes.extend_from_slice(&frame(&wm(5)));
    bytes.extend_from_slice(&[0, 0, 0, 4, 0x80, 1, 2, 3, 4]); // unknown flags
    tls.write_all(&bytes).await.unwrap();
    let mut s = listener.accept().await.unwrap();
    assert_eq!(s.recv().await.unwrap(), Some(wm(5)));
    let err = s.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Decode(sync_core::DecodeError::UnknownFlags(0x80))
        ),
        "{err:?}"
    );
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn oversized_frame_header() {
    let (scfg, listener) = server().await;
    let client = good_client(&scfg);
    let addr = listener.local_addr().to_string();
    // After Hello: the reader refuses it before allocating.
    let mut tls = raw_tls(&addr, &client).await;
    let mut bytes = frame(&hello(&client));
    bytes.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0]);
    tls.write_all(&bytes).await.unwrap();
    let mut s = listener.accept().await.unwrap();
    let err = s.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Decode(sync_core::DecodeError::FrameTooLarge { .. })
        ),
        "{err:?}"
    );
    // Instead of Hello: the handshake fails (Hello is held to 64 KiB).
    let mut tls = raw_tls(&addr, &client).await;
    tls.write_all(&[0, 1, 0, 0, 0]).await.unwrap();
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn stalls_mid_frame_and_mid_handshake() {
    let (mut scfg, _) = server().await;
    scfg.idle_timeout = Duration::from_millis(300);
    scfg.handshake_timeout = Duration::from_millis(1500);
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let client = good_client(&scfg);
    let addr = listener.local_addr().to_string();

    // Mid-frame: Hello, then 3 bytes of a header, then nothing.
    let mut tls = raw_tls(&addr, &client).await;
    let mut bytes = frame(&hello(&client));
    bytes.extend_from_slice(&[0, 0, 0]);
    tls.write_all(&bytes).await.unwrap();
    let mut s = listener.accept().await.unwrap();
    let t = Instant::now();
    let err = s.recv().await.unwrap_err();
    assert!(matches!(err, NetError::Idle), "{err:?}");
    assert!(t.elapsed() >= Duration::from_millis(250));

    // Mid-handshake: several stallers (TCP only, half a TLS hello) do not block a good peer.
    let mut stallers = Vec::new();
    for i in 0..4 {
        let mut sock = TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            sock.write_all(&[0x16, 0x03, 0x01, 0x01]).await.unwrap();
        }
        stallers.push(sock);
    }
    let t = Instant::now();
    still_serving(&scfg, &listener).await;
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "blocked by stallers"
    );
    // The stallers are dropped by the server after handshake_timeout.
    for mut sock in stallers {
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), sock.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "staller not dropped");
    }
    still_serving(&scfg, &listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections() {
    let (scfg, listener) = server().await;
    let addr = listener.local_addr().to_string();
    let clients: Vec<NetConfig> = (0..50).map(|_| good_client(&scfg)).collect();
    let server_task = tokio::spawn(async move {
        let mut echoes = Vec::new();
        for _ in 0..50 {
            let conn = listener.accept().await.unwrap();
            echoes.push(tokio::spawn(async move {
                let (_, mut rd, wr) = conn.split();
                while let Some(msg) = rd.recv().await.unwrap() {
                    wr.send(msg).await.unwrap();
                }
                wr.close().await;
            }));
        }
        for e in echoes {
            e.await.unwrap();
        }
        listener
    });
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let conn = dial(&addr, &c).await.unwrap();
            let (_, mut rd, wr) = conn.split();
            for j in 0..10 {
                wr.send(wm(i as u64 * 100 + j)).await.unwrap();
            }
            for j in 0..10 {
                assert_eq!(rd.recv().await.unwrap(), Some(wm(i as u64 * 100 + j)));
            }
            wr.close().await;
            assert_eq!(rd.recv().await.unwrap(), None);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let listener = server_task.await.unwrap();
    still_serving(&scfg, &listener).await;
}

#[tokio::test]
async fn keepalive_holds_an_idle_connection_open() {
    let (mut scfg, _) = server().await;
    scfg.idle_timeout = Duration::from_millis(400);
    scfg.keepalive_interval = Duration::from_millis(100);
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let mut client = good_client(&scfg);
    client.idle_timeout = Duration::from_millis(400);
    client.keepalive_interval = Duration::from_millis(100);
    let (c, mut s) = connect(&listener, &client).await;
    let (_, mut crd, cwr) = c.split();
    let waiting = tokio::spawn(async move {
        let got = s.recv().await;
        (got, s)
    });
    let client_reader = tokio::spawn(async move { crd.recv().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        !waiting.is_finished(),
        "server reader gave up on a live connection"
    );
    assert!(
        !client_reader.is_finished(),
        "client reader gave up on a live connection"
    );
    let before = cwr.bytes_sent();
    assert!(before > 0, "keepalives were written");
    cwr.send(wm(3)).await.unwrap();
    let (got, _s) = waiting.await.unwrap();
    assert_eq!(got.unwrap(), Some(wm(3)));
    client_reader.abort();

    // Without keepalives, the same idle connection times out.
    let mut quiet = good_client(&scfg);
    quiet.keepalive_interval = Duration::from_secs(3600);
    let (_c, mut s) = connect(&listener, &quiet).await;
    let err = s.recv().await.unwrap_err();
    assert!(matches!(err, NetError::Idle), "{err:?}");
}

#[tokio::test]
async fn a_pin_written_by_another_process_counts_at_the_next_handshake() {
    // The server's store is kept in a file; pins are added and removed
    // through another handle on that file (as `lsync trust` and `lsync
    // untrust` do beside `lsync serve`), never through the server's.
    let dir = tempfile::tempdir().unwrap();
    let library = LibraryId::new_v7();
    let sdev = DeviceId::new_v7();
    let sid = Identity::load_or_create(&dir.path().join("server"), sdev).unwrap();
    let spath = dir.path().join("server/trust.json");
    let strust = TrustStore::load(&spath, sdev).unwrap();
    let scfg = NetConfig::new(Arc::new(sid), strust, library, "server".into());
    let cdev = DeviceId::new_v7();
    let cid = Identity::load_or_create(&dir.path().join("client"), cdev).unwrap();
    let ctrust = TrustStore::load(&dir.path().join("client/trust.json"), cdev).unwrap();
    let client = NetConfig::new(Arc::new(cid), ctrust, library, "client".into());
    pin(&client, &scfg);
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let addr = listener.local_addr().to_string();
    let err = dial(&addr, &client).await.unwrap_err();
    assert!(matches!(err, NetError::NotTrustedByPeer), "{err:?}");

    let cli = TrustStore::load(&spath, sdev).unwrap();
    cli.trust(client.identity.fingerprint, cdev).unwrap();
    let (mut c, mut s) = connect(&listener, &client).await;
    exchange(&mut c, &mut s).await;
    assert_eq!(s.peer.device, cdev);
    assert_eq!(scfg.trust.lookup(&client.identity.fingerprint), Some(cdev));

    // The same certificate claiming another device is refused.
    let mut other = (*client.identity).clone();
    other.device_id = DeviceId::new_v7();
    let mut liar = client.clone();
    liar.identity = Arc::new(other);
    if let Ok(mut conn) = dial(&addr, &liar).await {
        let err = conn.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                NetError::Refused {
                    code: ErrorCode::IdentityMismatch,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    // Removed elsewhere: refused from the next handshake.
    cli.untrust_device(cdev).unwrap();
    let err = dial(&addr, &client).await.unwrap_err();
    assert!(matches!(err, NetError::NotTrustedByPeer), "{err:?}");
    assert_eq!(scfg.trust.lookup(&client.identity.fingerprint), None);
}

#[tokio::test]
async fn a_megabyte_refusal_from_a_peer_is_cut_before_it_is_logged() {
    let library = LibraryId::new_v7();
    let a = config(library, "a");
    let b = config(library, "b");
    mutual(&a, &b);
    let (mut ca, cb) = memory_pair(&a, &b).await.unwrap();
    let huge = format!("evil\n{}", "z".repeat(1 << 20));
    cb.send(Message::Error {
        code: ErrorCode::Storage,
        message: huge.clone(),
    })
    .await
    .unwrap();
    match ca.recv().await.unwrap_err() {
        NetError::Refused { message, .. } => {
            assert!(message.len() < 400, "{} bytes", message.len());
            assert!(message.starts_with("evil\\nzzz"), "{message}");
            assert!(
                message.ends_with(&format!("({} bytes)", huge.len())),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn too_many_connections_are_refused() {
    let (mut scfg, _) = server().await;
    scfg.max_connections = 1;
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let addr = listener.local_addr().to_string();
    let client = good_client(&scfg);
    let (c, s) = connect(&listener, &client).await;
    let err = dial(&addr, &client).await.unwrap_err();
    assert!(matches!(err, NetError::TooManyConnections), "{err:?}");
    drop((c, s));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match dial(&addr, &client).await {
            Ok(_c) => break,
            Err(NetError::TooManyConnections) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test]
async fn memory_pair_checks_like_the_network() {
    let library = LibraryId::new_v7();
    let a = config(library, "a");
    let b = config(library, "b");
    mutual(&a, &b);
    let (mut ca, mut cb) = memory_pair(&a, &b).await.unwrap();
    assert_eq!(ca.peer.addr, "memory");
    assert_eq!(ca.peer.device, b.identity.device_id);
    assert_eq!(cb.peer.device, a.identity.device_id);
    exchange(&mut ca, &mut cb).await;

    let stranger = config(library, "stranger");
    pin(&stranger, &a);
    assert!(matches!(
        memory_pair(&stranger, &a).await,
        Err(NetError::UnknownCertificate)
    ));

    let elsewhere = config(LibraryId::new_v7(), "elsewhere");
    mutual(&elsewhere, &a);
    assert!(matches!(
        memory_pair(&elsewhere, &a).await,
        Err(NetError::LibraryMismatch)
    ));

    let liar = config(library, "liar");
    pin(&liar, &a);
    a.trust
        .trust(liar.identity.fingerprint, DeviceId::new_v7())
        .unwrap();
    let err = memory_pair(&liar, &a).await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::IdentityMismatch { .. }
                | NetError::Refused {
                    code: ErrorCode::IdentityMismatch,
                    ..
                }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn oversized_message_is_an_encode_error() {
    let library = LibraryId::new_v7();
    let mut a = config(library, "a");
    a.limits.max_frame = 1024;
    let b = config(library, "b");
    mutual(&a, &b);
    let (ca, _cb) = memory_pair(&a, &b).await.unwrap();
    let huge = Message::SnapshotChunk {
        id: sync_core::SnapshotId::new_v7(),
        index: 0,
        hash: [0; 32],
        data: (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect(),
    };
    assert!(matches!(ca.send(huge).await, Err(NetError::Encode(_))));
}

#[tokio::test]
async fn try_send_reports_a_full_queue() {
    let library = LibraryId::new_v7();
    let mut a = config(library, "a");
    a.outbound_queue = 2;
    let b = config(library, "b");
    mutual(&a, &b);
    let (ca, _cb) = memory_pair(&a, &b).await.unwrap();
    // Nobody reads b: the pipe fills, then the queue.
    let payload = Message::SnapshotChunk {
        id: sync_core::SnapshotId::new_v7(),
        index: 0,
        hash: [0; 32],
        data: (0..100_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect(),
    };
    let mut full = false;
    for _ in 0..64 {
        match ca.writer().try_send(payload.clone()) {
            Ok(()) => tokio::task::yield_now().await,
            Err(NetError::QueueFull) => {
                full = true;
                break;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(full);
}

// ---- Admission: floods of unauthenticated sockets ----

/// A TLS connection to `to` from `from` with `cfg`'s identity, skipping our `Hello` logic.
async fn tls_from(
    from: [u8; 4],
    to: SocketAddr,
    cfg: &NetConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls = crate::tls::client_config(cfg).unwrap();
    let name = rustls::pki_types::ServerName::try_from(crate::tls::SERVER_NAME).unwrap();
    let sock = connect_from(from, to).await?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, sock)
        .await
}

/// The stalls of these floods, in turn (no stranger's handshakes).
const STALLS: [Stall; 5] = [
    Stall::Silent,
    Stall::HalfHello,
    Stall::HelloThenSilence,
    Stall::Drip,
    Stall::Garbage,
];

/// Floods the listener with 200 stalled sockets from `sources` while a
/// trusted peer dials `dials` times; checks every dial, the bounds, and
/// that the file descriptors and the listener's service come back.
async fn flood_round(
    listener: &Arc<Listener>,
    scfg: &NetConfig,
    client: &NetConfig,
    sources: Vec<[u8; 4]>,
    dials: u64,
) -> FloodRound {
    let plan = FloodPlan {
        sources: sources.into_iter().map(IpAddr::from).collect(),
        held: 200,
        stalls: &STALLS,
        stranger: None,
        dials,
        dial_within: Duration::from_secs(2),
        spread_ms: 100,
    };
    let round = crate::test_support::flood_round(listener, scfg, client, plan).await;
    let per_ip = round.during.peak_handshaking_per_ip;
    assert!(per_ip <= scfg.max_handshaking_per_ip, "{per_ip}");
    eventually("fds return to baseline", || {
        open_fds() <= round.baseline + 4
    })
    .await;
    still_serving(scfg, listener).await;
    round
}

impl std::fmt::Display for FloodRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let latencies = &self.latencies;
        write!(
            f,
            "{} attacker sockets opened; peak handshaking {}, waiting {}; \
             fds above baseline at most {}; trusted dials: median {:?}, max {:?}",
            self.opened,
            self.peak_handshaking,
            self.peak_waiting,
            self.max_fds,
            latencies[latencies.len() / 2],
            latencies[latencies.len() - 1]
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stderr)] // the figures RELIABILITY.md reports
async fn handshake_flood_cannot_starve_a_trusted_peer() {
    // Default limits and timeouts: a starved dial would wait out `handshake_timeout`.
    let mut scfg = config(LibraryId::new_v7(), "server");
    let defaults = defaults_of(&scfg);
    scfg.handshake_timeout = defaults.handshake_timeout;
    let mut client = good_client(&scfg);
    client.handshake_timeout = defaults.handshake_timeout;
    let listener = Arc::new(Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap());

    // 4 hosts: each fills its share of handshakes, and the trusted peer
    // (with none running) takes a place from one at once.
    let few = (2..6).map(|h| [127, 0, 0, h]).collect();
    let few = flood_round(&listener, &scfg, &client, few, 20).await;
    // 24 hosts, one handshake each: the trusted peer waits for a stale one.
    let many = (10..34).map(|h| [127, 0, 0, h]).collect();
    let many = flood_round(&listener, &scfg, &client, many, 10).await;

    let s = listener.stats();
    assert_eq!(
        s.accepted,
        s.authenticated + s.failed + s.timed_out + s.evicted + s.shed + s.refused_busy,
        "every socket is accounted for: {s:?}"
    );
    assert_eq!((s.refused_busy, s.timed_out), (0, 0), "{s:?}");
    eprintln!("flood from 4 hosts: {few}\nflood from 24 hosts: {many}\nlistener: {s:?}");
}

#[tokio::test]
async fn unauthenticated_connections_per_ip_are_capped() {
    let mut scfg = config(LibraryId::new_v7(), "server");
    scfg.max_waiting = 8;
    scfg.max_handshaking_per_ip = 4;
    scfg.handshake_timeout = Duration::from_secs(10);
    scfg.handshake_grace = Duration::from_secs(10); // no eviction here: only the caps
    let listener = Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap();
    let to = listener.local_addr();

    // One host: 4 run, 8 wait, and each of 6 more closes the oldest waiting one.
    let mut socks = Vec::new();
    for n in 1..=18u64 {
        socks.push(connect_from([127, 0, 0, 2], to).await.unwrap());
        eventually("accepted", || listener.stats().accepted == n).await;
    }
    let s = listener.stats();
    assert_eq!((s.handshaking, s.waiting, s.shed), (4, 8, 6), "{s:?}");
    assert_eq!(s.peak_handshaking_per_ip, 4);
    for (i, sock) in socks.iter_mut().enumerate() {
        let shed = (4..10).contains(&i);
        let wait = if shed { 500 } else { 100 };
        let closed = closed_within(sock, Duration::from_millis(wait)).await;
        assert_eq!(closed, shed, "socket {i}");
    }

    // Another host runs its handshakes at once, and so does a trusted peer.
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(connect_from([127, 0, 0, 3], to).await.unwrap());
    }
    eventually("the second host runs", || listener.stats().handshaking == 8).await;
    let t = Instant::now();
    still_serving(&scfg, &listener).await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let s = listener.stats();
    assert_eq!((s.evicted, s.shed, s.authenticated), (0, 6, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_handshakes_queues_and_stale_ones_make_way() {
    let mut scfg = config(LibraryId::new_v7(), "server");
    scfg.max_handshaking = 2;
    scfg.handshake_grace = Duration::from_millis(300);
    let listener = Arc::new(Listener::bind("127.0.0.1:0", scfg.clone()).await.unwrap());
    let addr = listener.local_addr().to_string();

    // 12 trusted dials at once through 2 handshake slots: all queue, none is evicted.
    let clients: Vec<NetConfig> = (0..12).map(|_| good_client(&scfg)).collect();
    let server = {
        let listener = listener.clone();
        tokio::spawn(async move {
            let mut conns = Vec::new();
            for _ in 0..12 {
                conns.push(listener.accept().await.unwrap());
            }
            conns
        })
    };
    let dials = clients.iter().map(|c| dial(&addr, c));
    for conn in futures::future::join_all(dials).await {
        conn.unwrap();
    }
    drop(server.await.unwrap());
    let s = listener.stats();
    assert_eq!((s.authenticated, s.evicted), (12, 0), "{s:?}");

    // Two silent sockets hold both slots; a trusted dial waits until they are stale, then one makes way.
    let to = listener.local_addr();
    let mut a = connect_from([127, 0, 0, 2], to).await.unwrap();
    let mut b = connect_from([127, 0, 0, 3], to).await.unwrap();
    eventually("stallers run", || listener.stats().handshaking == 2).await;
    let t = Instant::now();
    still_serving(&scfg, &listener).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(listener.stats().evicted, 1);
    let a_closed = closed_within(&mut a, Duration::from_millis(100)).await;
    let b_closed = closed_within(&mut b, Duration::from_millis(100)).await;
    assert!(a_closed != b_closed, "exactly one staller was evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_certificate_flood_is_refused_and_does_not_block_a_trusted_peer() {
    let (scfg, listener) = server().await;
    let listener = Arc::new(listener);
    let to = listener.local_addr();
    let addr = to.to_string();
    // Strangers trust the server; the server has pinned none of them.
    let strangers: Vec<NetConfig> = (0..4)
        .map(|i| {
            let c = config(scfg.library, &format!("stranger{i}"));
            pin(&c, &scfg);
            c
        })
        .collect();
    const EACH: usize = 25;
    let mut flood = tokio::task::JoinSet::new();
    for (i, stranger) in strangers.into_iter().enumerate() {
        let addr = addr.clone();
        flood.spawn(async move {
            for _ in 0..EACH {
                if i < 2 {
                    // With `dial`, from the trusted peer's own address.
                    let err = dial(&addr, &stranger).await.unwrap_err();
                    assert!(matches!(err, NetError::NotTrustedByPeer), "{err:?}");
                } else {
                    // Raw TLS from other hosts: TLS completes on our side, then the alert.
                    let from = [127, 0, 0, 2 + i as u8];
                    let mut tls = tls_from(from, to, &stranger).await.unwrap();
                    let _ = tls.write_all(&frame(&hello(&stranger))).await;
                    let mut sink = Vec::new();
                    let err = tls.read_to_end(&mut sink).await.unwrap_err();
                    let err = crate::error::map_io_error(err);
                    assert!(matches!(err, NetError::NotTrustedByPeer), "{err:?}");
                }
            }
        });
    }
    let client = good_client(&scfg);
    for i in 0..10 {
        let t = Instant::now();
        let (c, s) = tokio::join!(dial(&addr, &client), async {
            tokio::time::timeout(Duration::from_secs(5), listener.accept()).await
        });
        let took = t.elapsed();
        let (mut c, mut s) = (c.unwrap(), s.expect("accept timed out").unwrap());
        exchange(&mut c, &mut s).await;
        assert!(took < Duration::from_secs(2), "dial {i} took {took:?}");
    }
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    eventually("refusals are counted", || {
        listener.stats().failed == 4 * EACH as u64
    })
    .await;
    let s = listener.stats();
    assert_eq!(
        (s.authenticated, s.accepted),
        (10, 10 + 4 * EACH as u64),
        "{s:?}"
    );
    assert_eq!((s.evicted, s.shed, s.timed_out), (0, 0, 0), "{s:?}");
}

#[cfg(feature = "test-utils")]
mod faults {
    use super::*;
    use crate::fault::{FaultPlan, dial_with_faults, memory_pair_with_faults};

    fn pair_configs() -> (NetConfig, NetConfig) {
        let library = LibraryId::new_v7();
        let a = config(library, "a");
        let b = config(library, "b");
        mutual(&a, &b);
        (a, b)
    }

    #[tokio::test]
    async fn cut_after_frames() {
        let (a, b) = pair_configs();
        let plan = FaultPlan {
            cut_after_frames: Some(3),
            ..FaultPlan::default()
        };
        let (ca, mut cb) = memory_pair_with_faults(&a, &b, plan, FaultPlan::default())
            .await
            .unwrap();
        for i in 0..5 {
            let _ = ca.send(wm(i)).await;
        }
        for i in 0..3 {
            assert_eq!(cb.recv().await.unwrap(), Some(wm(i)));
        }
        assert_eq!(cb.recv().await.unwrap(), None);
        // The writer has stopped: sends fail.
        let deadline = Instant::now() + Duration::from_secs(2);
        while ca.send(wm(9)).await.is_ok() {
            assert!(Instant::now() < deadline, "writer still alive after cut");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Reads on the cut side fail too.
        let (_, mut ra, _) = ca.split();
        assert!(ra.recv().await.is_err());
    }

    #[tokio::test]
    async fn cut_after_bytes_mid_frame() {
        let (a, b) = pair_configs();
        let one = frame(&wm(0)).len() as u64;
        let plan = FaultPlan {
            cut_after_bytes: Some(one + 3),
            ..FaultPlan::default()
        };
        let (ca, mut cb) = memory_pair_with_faults(&a, &b, plan, FaultPlan::default())
            .await
            .unwrap();
        ca.send(wm(0)).await.unwrap();
        ca.send(wm(1)).await.unwrap();
        assert_eq!(cb.recv().await.unwrap(), Some(wm(0)));
        let err = cb.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                NetError::Decode(sync_core::DecodeError::Truncated { have: 3, .. })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn flipped_byte_is_a_decode_error() {
        let (a, b) = pair_configs();
        let plan = FaultPlan {
            flip_byte_at: Some(0),
            ..FaultPlan::default()
        };
        let (ca, mut cb) = memory_pair_with_faults(&a, &b, plan, FaultPlan::default())
            .await
            .unwrap();
        ca.send(wm(0)).await.unwrap();
        let err = cb.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                NetError::Decode(sync_core::DecodeError::FrameTooLarge { .. })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn delay_holds_writes_back() {
        let (a, b) = pair_configs();
        let plan = FaultPlan {
            delay: Some(Duration::from_millis(200)),
            ..FaultPlan::default()
        };
        let (mut ca, mut cb) = memory_pair_with_faults(&a, &b, FaultPlan::default(), plan)
            .await
            .unwrap();
        let t = Instant::now();
        cb.send(wm(1)).await.unwrap();
        assert_eq!(ca.recv().await.unwrap(), Some(wm(1)));
        assert!(
            t.elapsed() >= Duration::from_millis(190),
            "{:?}",
            t.elapsed()
        );
        // The other direction is not delayed.
        let t = Instant::now();
        ca.send(wm(2)).await.unwrap();
        assert_eq!(cb.recv().await.unwrap(), Some(wm(2)));
        assert!(t.elapsed() < Duration::from_millis(150));
    }

    #[tokio::test]
    async fn tls_flipped_byte_breaks_the_record() {
        let (scfg, listener) = server().await;
        let client = good_client(&scfg);
        let addr = listener.local_addr().to_string();
        let plan = FaultPlan {
            flip_byte_at: Some(10),
            ..FaultPlan::default()
        };
        let (c, s) = tokio::join!(dial_with_faults(&addr, &client, plan), listener.accept());
        let (c, mut s) = (c.unwrap(), s.unwrap());
        c.send(wm(1)).await.unwrap();
        let err = s.recv().await.unwrap_err();
        assert!(matches!(err, NetError::Tls(_)), "{err:?}");
        still_serving(&scfg, &listener).await;
    }

    #[tokio::test]
    async fn tls_cut_after_records() {
        let (scfg, listener) = server().await;
        let client = good_client(&scfg);
        let addr = listener.local_addr().to_string();
        let plan = FaultPlan {
            cut_after_frames: Some(2),
            ..FaultPlan::default()
        };
        let (c, s) = tokio::join!(dial_with_faults(&addr, &client, plan), listener.accept());
        let (c, mut s) = (c.unwrap(), s.unwrap());
        for i in 0..4 {
            // Sends after the cut fail: the writer task has stopped.
            let _ = c.send(wm(i)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(s.recv().await.unwrap(), Some(wm(0)));
        assert_eq!(s.recv().await.unwrap(), Some(wm(1)));
        // TCP closed without close_notify: an error, not a clean close.
        assert!(s.recv().await.is_err());
        still_serving(&scfg, &listener).await;
    }
}
