//! Whole-system tests: a real testnet on loopback, real HTTP through it.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_client::{Client, ClientConfig, Isolation};
use allium_directory::AuthorityEntry;
use allium_proto::socks::SocksAuth;
use allium_relay::RelayStats;
use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIG: usize = 4 << 20;

/// Deterministic pseudo-random bytes (SHA-256 in counter mode).
fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&Sha256::digest(
            [seed.to_be_bytes(), i.to_be_bytes()].concat(),
        ));
        i += 1;
    }
    out.truncate(len);
    out
}

async fn http_server() -> SocketAddr {
    let big = Arc::new(blob(1, BIG));
    let app = Router::new()
        .route(
            "/blob",
            get(move || {
                let b = big.clone();
                async move { b.to_vec() }
            }),
        )
        .route(
            "/small/{n}",
            get(|Path(n): Path<u64>| async move { blob(n, 50_000 + n as usize * 997) }),
        );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

/// A raw SOCKS5 CONNECT; returns the reply code.
async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> u8 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let SocketAddr::V4(t) = target else {
        panic!("v4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    r[1]
}

fn processed(s: &RelayStats) -> u64 {
    RelayStats::get(&s.cells_relayed)
        + RelayStats::get(&s.cells_delivered)
        + RelayStats::get(&s.cells_originated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_network_end_to_end() {
    let web = http_server().await;
    let net = Testnet::start(TestnetOptions {
        http_connect: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    // A request that comes before the client has a consensus waits for
    // the network instead of failing.
    assert!(net.client.consensus().is_none(), "too late to test");
    let (code, _early) = common::socks5(net.socks_addr, "localhost", web.port()).await;
    assert_eq!(code, 0, "SOCKS reply to a request sent during bootstrap");
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    assert_eq!(net.client.bootstrap_phase(), allium_client::Phase::Done);
    let proxy = net.socks_addr;

    // 4 MiB through SOCKS5 with a real HTTP client; the hostname goes to the exit.
    let want = Sha256::digest(blob(1, BIG));
    let t = Instant::now();
    let body = common::hyper_get(proxy, "localhost", web.port(), "/blob", None).await;
    println!("4 MiB fetch through three relays: {:?}", t.elapsed());
    assert_eq!(body.len(), BIG);
    assert_eq!(Sha256::digest(&body), want);

    // Service names and Tor's names never reach an exit: a mistyped
    // address and a Tor name get F6, a valid address nobody published F0
    // (asked of service directories only, on BEGIN_DIR streams), and no
    // exit opens a stream for any of them.
    let opened = || -> u64 {
        net.relays
            .iter()
            .map(|r| {
                RelayStats::get(&r.stats.streams_opened) - RelayStats::get(&r.stats.dir_streams)
            })
            .sum()
    };
    let before = opened();
    let good = "5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwdiuab.allium.alt";
    for (host, want) in [
        (good.to_string(), 0xf0),
        (good.replacen('5', "6", 1), 0xf6),
        (
            "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion".into(),
            0xf6,
        ),
    ] {
        let (code, _) = common::socks5(proxy, &host, 80).await;
        assert_eq!(code, want, "SOCKS reply for {host}");
    }
    assert_eq!(opened(), before, "a service or Tor name reached an exit");

    // Three distinct relays each carried those cells.
    let carried = net.client.circuit_paths().into_iter().any(|path| {
        let distinct =
            path.len() == 3 && path[0] != path[1] && path[1] != path[2] && path[0] != path[2];
        distinct
            && path.iter().all(|id| {
                net.relays
                    .iter()
                    .find(|r| &r.identity == id)
                    .is_some_and(|r| processed(&r.stats) >= (BIG / 488) as u64)
            })
    });
    assert!(
        carried,
        "no circuit of three distinct relays carried the 4 MiB"
    );

    // The same with curl, if it is installed.
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "120",
                "--socks5-hostname",
                &proxy.to_string(),
            ])
            .arg(format!("http://127.0.0.1:{}/blob", web.port()))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(Sha256::digest(&out.stdout), want);
        // The same bytes through SOCKS4a and through the HTTP CONNECT port.
        let http_proxy = format!("http://{}", net.http_addr.unwrap());
        for args in [
            vec!["--socks4a", &proxy.to_string()],
            vec!["-p", "-x", &http_proxy],
        ] {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "120"])
                .args(&args)
                .arg(format!("http://localhost:{}/blob", web.port()))
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "curl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(Sha256::digest(&out.stdout), want, "curl {args:?}");
        }
    }

    // 20 concurrent streams, each with its own content.
    let mut set = tokio::task::JoinSet::new();
    for n in 0..20u64 {
        set.spawn(async move {
            (
                n,
                common::hyper_get(proxy, "127.0.0.1", web.port(), &format!("/small/{n}"), None)
                    .await,
            )
        });
    }
    let mut done = 0;
    while let Some(r) = set.join_next().await {
        let (n, b) = r.unwrap();
        assert_eq!(
            &b[..],
            &blob(n, 50_000 + n as usize * 997)[..],
            "stream {n}"
        );
        done += 1;
    }
    assert_eq!(done, 20);

    // Failures map to RFC 1928 codes.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    assert_eq!(
        socks_connect(proxy, closed).await,
        5,
        "closed port: connection refused"
    );
    assert_eq!(
        socks_connect(proxy, "127.0.0.1:25".parse().unwrap()).await,
        2,
        "port 25: not allowed by ruleset"
    );

    // Different SOCKS credentials never share a circuit.
    let iso = |u: &str| Isolation {
        listener: 0,
        auth: SocksAuth::UserPass {
            user: u.into(),
            pass: b"x".to_vec(),
        },
    };
    let a1 = net
        .client
        .circuit_for(&ExitTarget::Any, &iso("alice"))
        .await
        .unwrap();
    let a2 = net
        .client
        .circuit_for(&ExitTarget::Any, &iso("alice"))
        .await
        .unwrap();
    let b1 = net
        .client
        .circuit_for(&ExitTarget::Any, &iso("bob"))
        .await
        .unwrap();
    assert_eq!(a1.serial, a2.serial);
    assert_ne!(a1.serial, b1.serial);
    let body = common::hyper_get(
        proxy,
        "localhost",
        web.port(),
        "/small/3",
        Some(("carol", "pw")),
    )
    .await;
    assert_eq!(&body[..], &blob(3, 50_000 + 3 * 997)[..]);

    // Every circuit built respects the /16 and family rules (the testnet
    // puts relays on distinct /16s and declares two families).
    let cons = net.client.consensus().unwrap();
    assert!(
        cons.relays.iter().any(|r| r.family.is_some()),
        "families declared"
    );
    for _ in 0..30 {
        let c = net.client.build_circuit(&ExitTarget::Any).await.unwrap();
        for (i, j) in [(0, 1), (1, 2), (0, 2)] {
            assert!(
                allium_client::path::compatible(&c.path[i], &c.path[j]),
                "{} with {}",
                c.path[i].nickname,
                c.path[j].nickname
            );
        }
    }

    // Circuit build time, measured on warm channels.
    let mut times = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        net.client.build_circuit(&ExitTarget::Any).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!("3-hop circuit build, median of 9: {:?}", times[4]);

    // A restarted client starts from its cached consensus, without a fetch.
    let again = Client::new(net.client_config.clone()).unwrap();
    let cached = again.consensus().expect("cached consensus");
    assert_eq!(cached.relays.len(), net.relays.len());

    // A client pinned to the wrong authority key refuses the consensus and
    // says why: the keys are wrong, not merely "no consensus".
    let wrong = ClientConfig {
        authorities: vec![AuthorityEntry {
            name: "auth0".into(),
            addr: net.authorities[0].addr,
            key: hex::encode([7u8; 32]),
        }],
        ..ClientConfig::default()
    };
    let err = Client::new(wrong)
        .unwrap()
        .refresh_consensus()
        .await
        .expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("none of which this config pins: check the keys in `authorities`"),
        "{msg}"
    );

    net.shutdown().await;
}

/// A relay extends only to relays the consensus lists, where it lists
/// them; and a RELAY cell it cannot authenticate makes it destroy the
/// circuit and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_extend_only_to_listed_relays_and_destroy_on_a_forged_cell() {
    use allium_proto::cell::{Cell, CellCmd, DestroyReason, PAYLOAD_LEN};
    use common::{ExtendTo, RawCirc, lone_relay};

    let net = Testnet::start(TestnetOptions {
        relays: 3,
        exits: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let cons = net.client.consensus().unwrap();
    let listed = |i: usize| {
        cons.relays
            .iter()
            .find(|r| r.identity == net.relays[i].identity)
            .unwrap()
            .clone()
    };
    let (r, other) = (listed(2), listed(0));
    let chan =
        allium_link::channel::connect_nk(r.addr, &allium_proto::RelayId(r.identity), &r.link_key)
            .await
            .unwrap();
    let open = || RawCirc::open(chan.clone(), &r.identity, &r.onion_key);

    // A relay outside the consensus, though it would prove its identity.
    let outsider = lone_relay(|_| {}).await;
    let d = &outsider.desc;
    let mut to = ExtendTo {
        identity: d.identity,
        onion_key: d.onion_key,
        link_key: d.link_key,
        addr: d.addr,
    };
    let mut c = open().await.unwrap();
    assert_eq!(c.extend(&to).await, Err(DestroyReason::CONNECT_FAILED));
    assert_eq!(RelayStats::get(&outsider.stats.circuits_created), 0);
    // A listed relay, named at another address.
    (to.identity, to.onion_key, to.link_key) = (other.identity, other.onion_key, other.link_key);
    let mut c = open().await.unwrap();
    assert_eq!(c.extend(&to).await, Err(DestroyReason::CONNECT_FAILED));
    // The same relay where the consensus lists it.
    to.addr = other.addr;
    let mut c = open().await.unwrap();
    assert_eq!(c.extend(&to).await, Ok(()));
    // The client's DESTROY reason does not travel on: the next relay hears
    // only that the circuit is gone.
    let by_reason = |i: usize, r: DestroyReason| {
        RelayStats::get(&net.relays[i].stats.destroyed_by_reason[r.0 as usize])
    };
    let (destroyed, odd) = (
        by_reason(0, DestroyReason::DESTROYED),
        by_reason(0, DestroyReason::NO_SUCH_SERVICE),
    );
    c.chan
        .send(Cell::destroy(c.id, DestroyReason::NO_SUCH_SERVICE))
        .await
        .unwrap();
    for _ in 0..200 {
        if by_reason(0, DestroyReason::DESTROYED) > destroyed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(by_reason(0, DestroyReason::DESTROYED), destroyed + 1);
    assert_eq!(by_reason(0, DestroyReason::NO_SUCH_SERVICE), odd);

    // A relay never extends back to the hop the circuit came from: the
    // relay asked (`other`) destroys the circuit for the client's fault.
    let protocol = by_reason(0, DestroyReason::PROTOCOL);
    let mut c = open().await.unwrap();
    assert_eq!(c.extend(&to).await, Ok(()));
    let back = ExtendTo {
        identity: r.identity,
        onion_key: r.onion_key,
        link_key: r.link_key,
        addr: r.addr,
    };
    assert_eq!(c.extend(&back).await, Err(DestroyReason::DESTROYED));
    assert_eq!(by_reason(0, DestroyReason::PROTOCOL), protocol + 1);

    let target = &net.relays[2];
    let before = RelayStats::get(&target.stats.cell_auth_failures);
    let mut c = open().await.unwrap();
    let forged = Cell {
        circ_id: c.id,
        cmd: CellCmd::RELAY,
        payload: Box::new([0x5a; PAYLOAD_LEN]),
    };
    c.chan.send(forged).await.unwrap();
    assert_eq!(c.recv().await.err(), Some(DestroyReason::CELL_AUTH));
    assert_eq!(
        RelayStats::get(&target.stats.cell_auth_failures),
        before + 1
    );
    net.shutdown().await;
}

/// Two relays declare the most bandwidth there is; the authorities measure
/// every relay, and the consensus weighs each by what was measured: the
/// liars hold exactly the share of exit weight their measured capacity
/// gives them, not the 80% their word would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_are_weighted_by_measurement_not_by_their_word() {
    let honest = 1_000_000_000;
    let net = Testnet::start(TestnetOptions {
        relays: 6,
        exits: 4,
        // Relays 0 and 1 (both exits) lie.
        declared: vec![u32::MAX, u32::MAX, honest, honest, honest, honest],
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let liars = [net.relays[0].identity, net.relays[1].identity];
    let mut measured = None;
    for _ in 0..300 {
        if let Some(c) = net.client.consensus()
            && c.relays.len() == 6
            && c.relays.iter().all(|r| r.measured_bandwidth.is_some())
        {
            measured = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = measured.expect("every relay measured by a majority within a minute");
    for r in &c.relays {
        let m = r.measured_bandwidth.unwrap();
        assert!(m > 100_000, "{} measured at {m} bytes/s", r.nickname);
        assert_eq!(r.bandwidth, m.min(r.declared_bandwidth));
    }
    let exits: Vec<_> = c
        .relays
        .iter()
        .filter(|r| r.flags.has(allium_proto::RelayFlags::EXIT))
        .collect();
    assert_eq!(exits.len(), 4);
    let share = |f: &dyn Fn(&allium_proto::ConsensusRelay) -> u64| {
        let liar: u64 = exits
            .iter()
            .filter(|r| liars.contains(&r.identity))
            .map(|r| f(r))
            .sum();
        let all: u64 = exits.iter().map(|r| f(r)).sum();
        liar as f64 / all as f64
    };
    let weight_share = share(&|r| r.bandwidth as u64);
    let measured_share = share(&|r| r.measured_bandwidth.unwrap() as u64);
    let declared_share = share(&|r| r.declared_bandwidth as u64);
    assert!(
        weight_share <= measured_share + 1e-9,
        "liars hold {weight_share:.3} of the exit weight, measured {measured_share:.3}"
    );
    assert!(declared_share > 0.8, "what their word alone would give");
    net.shutdown().await;
}
