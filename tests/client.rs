//! The client under failures: guards, a relay dying mid-download.

#![allow(clippy::unwrap_used)]

mod common;

use common::{library_client, small_net};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_client::{Client, Isolation};
use allium_proto::relaymsg::TargetAddr;
use allium_proto::socks::SocksAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP server: `/slow` streams 16 KiB every 20 ms for up to 20 s,
/// anything else answers "ok" at once.
async fn server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if buf[..n].starts_with(b"GET /slow") {
                    let _ = s
                        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 16384000\r\n\r\n")
                        .await;
                    for _ in 0..1000 {
                        if s.write_all(&[7u8; 16384]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    a
}

/// GET `path` through SOCKS5 with username `user`; returns the body bytes
/// read before the stream ended, and whether it ended cleanly.
async fn get(proxy: SocketAddr, port: u16, path: &str, user: &str) -> (usize, bool) {
    let (body, end) = get_ending(proxy, port, path, user).await;
    (body, end.is_ok())
}

/// As [`get`], with how the connection ended: cleanly, or the error
/// (`TimedOut` if it did not end within a minute).
async fn get_ending(
    proxy: SocketAddr,
    port: u16,
    path: &str,
    user: &str,
) -> (usize, Result<(), std::io::ErrorKind>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let mut a = vec![1, user.len() as u8];
    a.extend_from_slice(user.as_bytes());
    a.extend_from_slice(&[1, b'x']);
    s.write_all(&a).await.unwrap();
    s.read_exact(&mut m).await.unwrap();
    let mut req = vec![5, 1, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    if r[1] != 0 {
        eprintln!("SOCKS reply {}", r[1]);
        return (0, Err(std::io::ErrorKind::ConnectionRefused));
    }
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    let end = match tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut all)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(std::io::ErrorKind::TimedOut),
    };
    let body = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| all.len() - i - 4);
    (body, end)
}

/// A ready testnet with one authority and `relays` relays.
fn iso(user: &str) -> Isolation {
    Isolation {
        listener: 0,
        auth: SocksAuth::UserPass {
            user: user.into(),
            pass: b"x".to_vec(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guards_persist_and_fail_over() {
    let mut net = Testnet::start(TestnetOptions {
        authorities: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    // Relays are Guards once the authority has measured them, one at a
    // time: the sample fills as they are.
    let start = Instant::now();
    while net.client.guards().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the sample never filled"
        );
        net.client.refresh_consensus().await.ok();
        net.client.build_circuit(&ExitTarget::Any).await.ok();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sample = net.client.guards();
    assert_eq!(sample.len(), 3);
    let first = sample[0];

    // The same sample, first guard first, after a restart.
    let again = Client::new(net.client_config.clone()).unwrap();
    again.refresh_consensus().await.unwrap();
    again.build_circuit(&ExitTarget::Any).await.unwrap();
    assert_eq!(again.guards(), sample);

    // Kill the first guard: circuits go through the next one.
    let i = net.relays.iter().position(|r| r.identity == first).unwrap();
    net.stop_relay(i);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Until the consensus stops listing it, the dead relay may be the
    // only exit a path through the next guard can have (the testnet has
    // two exits, and any relay may be a guard): a build may fail then.
    let mut built = 0;
    let start = Instant::now();
    while built < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no circuit through the next guard"
        );
        match net.client.build_circuit(&ExitTarget::Any).await {
            Ok(c) => {
                assert_ne!(c.path[0].identity, first, "a dead guard was used");
                built += 1;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    assert_eq!(
        net.client.guards()[0],
        first,
        "a failed guard stays in the sample"
    );

    // Bring it back: it is retried and used again once it answers and the
    // consensus lists it Running.
    net.restart_relay(i).await.unwrap();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guard was not retried"
        );
        net.client.refresh_consensus().await.ok();
        if let Ok(c) = net.client.build_circuit(&ExitTarget::Any).await
            && c.path[0].identity == first
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn middle_relay_dies_during_a_download() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("allium_client=debug,allium_relay=info")
        .with_test_writer()
        .try_init();
    let web = server().await;
    let net = small_net(6).await;
    let proxy = net.socks_addr;

    // The download's circuit is the one bound to user "dl".
    let circ = net
        .client
        .circuit_for(
            &ExitTarget::Addr(&TargetAddr::Host("localhost".into()), web.port()),
            &iso("dl"),
        )
        .await
        .unwrap();
    let middle = circ.path[1].identity;
    let dl = tokio::spawn(async move { get_ending(proxy, web.port(), "/slow", "dl").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let i = net
        .relays
        .iter()
        .position(|r| r.identity == middle)
        .unwrap();
    net.stop_relay(i);
    let (got, end) = tokio::time::timeout(Duration::from_secs(30), dl)
        .await
        .expect("the download must end")
        .unwrap();
    assert!(
        got > 0 && got < 16_384_000,
        "the download was cut short ({got} bytes)"
    );
    // Reset: not a hang, and not a clean end that would pass the part
    // that came for the whole.
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "how the application's connection ended"
    );

    // The next 20 requests all succeed, on fresh circuits, with no help.
    for n in 0..20 {
        let (body, ok) = get(proxy, web.port(), "/", "dl").await;
        assert!(ok && body == 2, "request {n} after the relay died");
    }
    assert!(circ.is_closed(), "the broken circuit is gone");
    net.shutdown().await;
}

/// `GET /` from the local server at `port` through `c`: the whole answer.
async fn fetch_ok(c: &Client, port: u16) -> Vec<u8> {
    let mut s = c.open_stream("localhost", port).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// Two independent library clients in one process, each with a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn library_clients_open_streams() {
    let web = server().await;
    let net = small_net(4).await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut clients = Vec::new();
    for d in &dirs {
        clients.push(library_client(&net, d.path()).await);
    }
    for c in &clients {
        let out = fetch_ok(c, web.port()).await;
        assert!(
            out.ends_with(b"\r\n\r\nok"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
    assert!(
        dirs.iter().all(|d| d.path().join("guards").exists()),
        "each client keeps its own state"
    );
    net.shutdown().await;
}

/// Different SOCKS credentials ride different circuits, as the exits see
/// it; RESOLVE goes through the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolation_seen_at_the_relays_and_resolve() {
    let web = server().await;
    let net = small_net(4).await;
    let carried = || {
        net.relays
            .iter()
            .map(|r| allium_relay::RelayStats::get(&r.stats.circuits_with_streams))
            .sum::<u64>()
    };
    let before = carried();
    assert_eq!(
        get(net.socks_addr, web.port(), "/", "alice").await,
        (2, true)
    );
    assert_eq!(
        get(net.socks_addr, web.port(), "/", "alice").await,
        (2, true)
    );
    assert_eq!(carried(), before + 1, "one user, one circuit");
    assert_eq!(get(net.socks_addr, web.port(), "/", "bob").await, (2, true));
    assert_eq!(
        carried(),
        before + 2,
        "another user, another circuit at the exit"
    );

    // Tor's SOCKS RESOLVE (F0): the exit resolves, the reply carries the address.
    let mut s = TcpStream::connect(net.socks_addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let mut req = vec![5, 0xf0, 0, 3, 9];
    req.extend_from_slice(b"localhost");
    req.extend_from_slice(&[0, 0]);
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!((r[1], r[3]), (0, 1));
    assert_eq!(&r[4..8], &[127, 0, 0, 1]);
    net.shutdown().await;
}

/// Six relays, two exits (0 and 1); relay 5 is in exit 1's family. A
/// client whose first guard is relay 5 loses exit 0: every path through
/// relay 5 then meets a dead exit, so its circuits go through its next
/// guard, to exit 1, while relay 5 stays its first guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guard_in_the_family_of_the_only_live_exit_is_passed_over() {
    use allium_proto::RelayFlags;
    let web = server().await;
    let net = Testnet::start(TestnetOptions {
        authorities: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let id = |i: usize| net.relays[i].identity;
    // Until `client`'s consensus lists relays 5, 2 and 3 as Guards (a
    // client that just bootstrapped may hold an older one from a cache).
    let guards_listed = async |client: &allium_client::Client| {
        let start = Instant::now();
        loop {
            client.refresh_consensus().await.ok();
            let c = client.consensus().unwrap();
            let guard = |i: usize| {
                c.relays
                    .iter()
                    .any(|r| r.identity == id(i) && r.flags.has(RelayFlags::GUARD))
            };
            if [5, 2, 3].into_iter().all(guard) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "relays 5, 2 and 3 never became Guards"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    guards_listed(&net.client).await;

    // A client whose sample is relays 5, 2 and 3, in that order (the
    // `guards` file: identity and time added, postcard).
    let d = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sample: Vec<([u8; 32], u64)> = [5, 2, 3].into_iter().map(|i| (id(i), now)).collect();
    std::fs::write(
        d.path().join("guards"),
        postcard::to_stdvec(&sample).unwrap(),
    )
    .unwrap();
    let client = library_client(&net, d.path()).await;
    guards_listed(&client).await;
    let c = client.build_circuit(&ExitTarget::Any).await.unwrap();
    assert_eq!(c.path[0].identity, id(5), "the seeded sample is used");
    assert_eq!(c.path[2].identity, id(0), "relay 5's only exit is 0");

    net.stop_relay(0);
    let start = Instant::now();
    for n in 0..5 {
        let c = client.build_circuit(&ExitTarget::Any).await.unwrap();
        assert_eq!(c.path[0].identity, id(2), "circuit {n}: the next guard");
        assert_eq!(c.path[2].identity, id(1), "circuit {n}: the live exit");
    }
    for n in 0..20 {
        let out = fetch_ok(&client, web.port()).await;
        assert!(out.ends_with(b"\r\n\r\nok"), "request {n}");
    }
    let took = start.elapsed();
    eprintln!("5 circuits and 20 requests with the guard's family exit only: {took:?}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_eq!(client.guards()[0], id(5), "the guard stays first");
    net.shutdown().await;
}

/// Polls `f` every 100 ms until it holds; panics after `secs` seconds.
async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client bootstraps from a fallback directory, then fetches every
/// consensus from its guards' directory caches, as diffs, ending with the
/// bytes the authorities serve; a guard whose cache serves a tampered
/// consensus is detected and not asked again, and the next guard serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_fetch_from_guard_caches_and_avoid_a_tampering_one() {
    use std::sync::atomic::Ordering::Relaxed;
    let net = small_net(6).await;
    let d = tempfile::tempdir().unwrap();
    let client = library_client(&net, d.path()).await;
    let stats = client.stats();
    let dir_streams_of = |r: &allium::testnet::RelayInfo| r.stats.dir_streams.load(Relaxed);
    let dir_streams = |i: usize| dir_streams_of(&net.relays[i]);
    until("three consensuses from caches", 60, || {
        stats.consensus_from_caches.load(Relaxed) >= 3
    })
    .await;
    // The first came from a fallback directory (a relay; so do later ones
    // when every guard's cache is still behind), none from the
    // authorities.
    assert!(stats.consensus_from_fallbacks.load(Relaxed) >= 1);
    assert_eq!(stats.consensus_from_authorities.load(Relaxed), 0);
    // Only guards serve directory requests (the testnet's own client
    // fetches from its guards too).
    let guards = client.guards();
    let any_guard = [guards.clone(), net.client.guards()].concat();
    let served_by: Vec<usize> = (0..net.relays.len())
        .filter(|&i| dir_streams(i) > 0)
        .collect();
    assert!(!served_by.is_empty());
    for &i in &served_by {
        assert!(
            any_guard.contains(&net.relays[i].identity),
            "{} is no guard but served the consensus",
            net.relays[i].nickname
        );
    }
    let diffs: u64 = net.relays.iter().map(|r| r.dir_cache.served()[2]).sum();
    assert!(diffs >= 1, "no consensus went out as a diff");

    // What the client holds is what the authority served whole for the
    // same period (the authority's, polled, by valid-after).
    let auth = net.authorities[0].addr;
    let keys = allium_directory::authority_keys(&net.client_config.authorities).unwrap();
    let cached = d.path().join("cached-consensus");
    let mut served = std::collections::HashMap::new();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let valid_after = |b: &[u8]| {
            allium_proto::UnverifiedConsensus::parse(b)
                .and_then(|u| u.verify(&keys, allium_directory::unix_now()))
                .unwrap()
                .valid_after
        };
        let full = allium_directory::http::fetch_consensus(auth).await.unwrap();
        served.insert(valid_after(&full), full);
        let held = std::fs::read(&cached).unwrap();
        let held_va = valid_after(&held);
        if let Some(full) = served.get(&held_va)
            && stats.consensus_from_caches.load(Relaxed) >= 4
        {
            assert!(
                held == *full,
                "the client holds other bytes than the authority served"
            );
            break;
        }
        assert!(
            Instant::now() < end,
            "the client never held a consensus seen at the authority"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The guard in use turns hostile: its cache serves consensuses with a
    // flipped byte (kept up as the relay installs real ones).
    let first = guards
        .iter()
        .find_map(|g| {
            served_by
                .iter()
                .copied()
                .find(|&i| net.relays[i].identity == *g)
        })
        .unwrap();
    let cache = net.relays[first].dir_cache.clone();
    let tamper = tokio::spawn(async move {
        let mut ours: Option<bytes::Bytes> = None;
        loop {
            if let Some(now) = cache.current().filter(|b| Some(b) != ours.as_ref()) {
                let mut b = now.to_vec();
                let mid = b.len() / 2;
                b[mid] ^= 1;
                let b = bytes::Bytes::from(b);
                cache.install(b.clone(), u64::MAX);
                ours = Some(b);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    until("the tampering cache is avoided", 60, || {
        stats.caches_avoided.load(Relaxed) >= 1
    })
    .await;
    // Asked again, it would be caught again. The next guard serves (and
    // fallbacks while every cache is behind, on a loaded machine).
    let from_caches = || stats.consensus_from_caches.load(Relaxed);
    let fetched = || from_caches() + stats.consensus_from_fallbacks.load(Relaxed);
    let (cached, all) = (from_caches(), fetched());
    until("two more consensuses, one from a cache", 90, || {
        from_caches() > cached && fetched() >= all + 2
    })
    .await;
    tamper.abort();
    assert_eq!(
        stats.caches_avoided.load(Relaxed),
        1,
        "asked the tampering cache again"
    );
    assert_eq!(stats.consensus_from_authorities.load(Relaxed), 0);
    let c = client.consensus().expect("a valid consensus");
    assert!(c.valid_after + 10 >= allium_directory::unix_now());
    net.shutdown().await;
}

/// An echo server on loopback: every connection gets back what it sends.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// Many streams on one circuit, all sending and receiving at once, keep
/// the circuit's command queue full: not a byte of any is lost, and none
/// stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_busy_streams_on_one_circuit_lose_nothing() {
    let port = echo().await.port();
    let net = Testnet::start(TestnetOptions {
        authorities: 1,
        relays: 3,
        // Links slower than the client: its circuit waits on its link
        // while the streams queue commands.
        relay_rate: Some(10_000_000),
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = library_client(&net, dir.path()).await;
    const STREAMS: usize = 200;
    const BYTES: usize = 64 * 1024;
    // Every stream open before any sends, so that they all send at once.
    let mut opened = Vec::new();
    for _ in 0..STREAMS {
        opened.push(c.open_stream("localhost", port).await.unwrap());
    }
    let mut tasks = Vec::new();
    for (i, s) in opened.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let body: Vec<u8> = (0..BYTES)
                .map(|k| (k * 31 + i * 7 + k / 997) as u8)
                .collect();
            let (mut r, mut w) = tokio::io::split(s);
            let sent = body.clone();
            let writer = tokio::spawn(async move {
                for chunk in sent.chunks(8 * 1024) {
                    w.write_all(chunk).await?;
                }
                Ok::<_, std::io::Error>(w)
            });
            let mut back = vec![0; BYTES];
            r.read_exact(&mut back).await.unwrap();
            drop(writer.await.unwrap().unwrap());
            (i, back == body)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await);
        }
        all
    })
    .await
    .expect("every echo back within two minutes");
    let bad: Vec<usize> = all
        .into_iter()
        .map(|t| t.unwrap())
        .filter(|(_, same)| !same)
        .map(|(i, _)| i)
        .collect();
    assert!(bad.is_empty(), "streams that came back different: {bad:?}");
    net.shutdown().await;
}

/// A server that sends all of its answer before it reads the request's
/// body, as many do: the exit must go on reading the answer while its
/// write of the body waits (the server reads nothing yet), or neither
/// end moves again. Through a plain TCP connection this works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_that_answers_before_it_reads_is_carried() {
    const ANSWER: usize = 32 << 20;
    const BODY: usize = 16 << 20;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(4).unwrap();
    let port = l.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let answer = vec![5u8; ANSWER];
        s.write_all(&answer).await.unwrap();
        let mut body = vec![0u8; BODY];
        s.read_exact(&mut body).await.unwrap();
        assert!(body.iter().all(|b| *b == 9), "the body as sent");
        s.write_all(b"ok").await.unwrap();
    });
    let net = small_net(3).await;
    let dir = tempfile::tempdir().unwrap();
    let c = library_client(&net, dir.path()).await;
    let s = c.open_stream("localhost", port).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&vec![9u8; BODY]).await.unwrap();
        w
    });
    let mut got = vec![0u8; ANSWER + 2];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got))
        .await
        .expect("the whole answer within 30 s")
        .unwrap();
    assert!(got[..ANSWER].iter().all(|b| *b == 5));
    assert_eq!(&got[ANSWER..], b"ok");
    drop(writer.await.unwrap());
    server.await.unwrap();
    net.shutdown().await;
}
