//! Onion services: descriptors filed on the ring of service directories
//! and found by the address alone (doc/protocol.md section 11), on a
//! testnet on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_client::{ClientError, hsdir};
use allium_directory::unix_now;
use allium_proto::service::ServiceAddress;
use allium_proto::service::descriptor::{IntroPoint, ServiceInfo, build};
use allium_proto::service::ring::SPREAD_FETCH;
use allium_proto::socks::ReplyCode;
use allium_proto::{RelayFlags, UnverifiedConsensus};
use common::library_client;
use ed25519_dalek::SigningKey;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_descriptor_filed_on_the_ring_is_found_by_the_address_alone() {
    let net = Testnet::start(TestnetOptions {
        relays: 8,
        exits: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    wait_for_ring(&net).await;

    // The service files its descriptor for this period, and for the next
    // one once the consensus places it.
    let identity = SigningKey::from_bytes(&[0x5e; 32]);
    let address = ServiceAddress::from_key(&identity.verifying_key().to_bytes()).unwrap();
    let info = ServiceInfo {
        intro_points: vec![IntroPoint {
            relay: net.relays[0].identity,
            auth_key: [0xa1; 32],
            enc_key: [0xe1; 32],
        }],
        pow: None,
    };
    let c = net.client.consensus().unwrap();
    let period = c.period_at(unix_now());
    let mut periods = vec![period];
    if c.shared_random_for(period.next()).is_some() {
        periods.push(period.next());
    }
    // Every store a directory took, those of the tries filed again too.
    let mut stores = 0;
    for p in &periods {
        let revision = unix_now().saturating_sub(p.start());
        // A directory whose consensus is older than the client's may not
        // know the next period's ring yet (503), for a voting period at
        // most: all are asked again, with a higher revision (as a service
        // would file one).
        let mut tries = 0;
        let done = loop {
            let doc = build(
                &identity,
                *p,
                revision + tries,
                &info,
                &[],
                &mut rand::rng(),
            );
            let done = hsdir::publish(&net.client, &address.blinded(*p), *p, &doc)
                .await
                .unwrap();
            let behind = |f: &(String, String)| f.1.contains("does not know that period's ring");
            tries += 1;
            stores += done.stored;
            if done.stored == done.responsible || tries == 20 || !done.failures.iter().all(behind) {
                break done;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        // 2 points x 4 directories, each relay once: all 8.
        assert_eq!(done.responsible, 8);
        assert_eq!(done.stored, 8, "{:?}", done.failures);
    }

    // Directories hold it under the blinded key only: no store holds the
    // address, its key, or what the descriptor lists.
    let mut held = 0;
    for r in &net.relays {
        for d in r.services.descriptors() {
            held += 1;
            for needle in [
                &address.key()[..],
                address.to_string().as_bytes(),
                &net.relays[0].identity[..],
                &[0xe1; 32][..],
            ] {
                assert!(!d.windows(needle.len()).any(|w| w == needle));
            }
        }
    }
    assert_eq!(held, 8 * periods.len());

    // A fresh client, knowing only the address, finds and reads it.
    let dir = tempfile::tempdir().unwrap();
    let fresh = library_client(&net, dir.path()).await;
    let started = Instant::now();
    assert_eq!(
        hsdir::fetch(&fresh, &address, unix_now()).await.unwrap(),
        info
    );
    eprintln!("descriptor fetched in {:?}", started.elapsed());

    // An address nobody published: not found, Tor's SOCKS code F0.
    let other = ServiceAddress::from_key(
        &SigningKey::from_bytes(&[0x5f; 32])
            .verifying_key()
            .to_bytes(),
    )
    .unwrap();
    let e = hsdir::fetch(&fresh, &other, unix_now()).await.unwrap_err();
    assert!(matches!(e, ClientError::DescriptorNotFound(_)), "{e}");
    assert_eq!(e.socks_reply(), ReplyCode::ONION_DESCRIPTOR_NOT_FOUND);
    assert!(e.to_string().contains("asked 6"), "{e}");

    // A directory a fetch may ask dies (not the client's first guard):
    // every fetch still succeeds, from the others.
    let c = fresh.consensus().unwrap();
    let period = c.period_at(unix_now());
    let asked: Vec<[u8; 32]> = c
        .hsdir_ring(period)
        .unwrap()
        .responsible(&address.blinded(period), SPREAD_FETCH)
        .iter()
        .map(|r| r.identity)
        .collect();
    let guard = fresh.guards()[0];
    let victim = net
        .relays
        .iter()
        .position(|r| asked.contains(&r.identity) && r.identity != guard)
        .unwrap();
    net.stop_relay(victim);
    // Directories are asked in random order: 12 fetches ask the dead one
    // first at least once with probability 1 - (5/6)^12, 89%.
    for _ in 0..12 {
        let started = Instant::now();
        assert_eq!(
            hsdir::fetch(&fresh, &address, unix_now()).await.unwrap(),
            info
        );
        eprintln!("with a directory down, fetched in {:?}", started.elapsed());
    }

    // Directories took uploads and served fetches, and counted the misses.
    let count = |f: fn(&allium_directory::hsdir::ServiceDirectory) -> u64| {
        net.relays.iter().map(|r| f(&r.services)).sum::<u64>()
    };
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(count(|s| s.stored.load(Relaxed)), stores as u64);
    assert!(count(|s| s.served.load(Relaxed)) >= 1);
    assert!(count(|s| s.missed.load(Relaxed)) >= 6);
    net.shutdown().await;
}

/// Wait until the client and every relay see all relays on the ring of
/// service directories, and as guards.
async fn wait_for_ring(net: &Testnet) {
    let n = net.relays.len();
    // Every relay Running long enough is a service directory (the testnet
    // asks no uptime for HSDir) and, once measured, a guard. Wait until the
    // client and every relay see all of them on the ring, and the client has a
    // guard other than any one directory: a circuit to a directory cannot
    // go through that directory as its guard.
    let ring_len =
        |c: &allium_proto::Consensus| c.hsdir_ring(c.period_at(unix_now())).map_or(0, |r| r.len());
    let start = Instant::now();
    loop {
        let c = net.client.consensus().unwrap();
        let guards = c
            .relays
            .iter()
            .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::GUARD))
            .count();
        let relays_see = net.relays.iter().all(|r| {
            r.dir_cache.current().is_some_and(|b| {
                UnverifiedConsensus::parse(&b).is_ok_and(|u| ring_len(u.peek()) == n)
            })
        });
        if ring_len(&c) == n && guards == n && relays_see {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ring of {}, {guards} guards, relays see all: {relays_see}",
            ring_len(&c)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A testnet of 8 relays with every one on the ring, and a local web
/// server of 4 MiB of random bytes: its address and the bytes' SHA-256.
async fn net_with_web() -> (
    Testnet,
    std::net::SocketAddr,
    sha2::digest::Output<sha2::Sha256>,
) {
    use sha2::{Digest, Sha256};
    let net = Testnet::start(TestnetOptions {
        relays: 8,
        exits: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    wait_for_ring(&net).await;
    let mut body = vec![0u8; 4 << 20];
    rand::RngExt::fill(&mut rand::rng(), &mut body[..]);
    let want = Sha256::digest(&body);
    (net, common::serve_bytes(body).await, want)
}

/// A hosted service with its own client, reading its address from its
/// directory once it has one.
async fn host_service(
    net: &Testnet,
    dir: &std::path::Path,
    target: std::net::SocketAddr,
    pow_min_effort: u32,
) -> (allium_client::Client, ServiceAddress) {
    use allium_client::service::{PortMap, ServiceConfig};
    let cfg = ServiceConfig {
        ports: vec![PortMap {
            virtual_port: 80,
            target,
        }],
        pow_min_effort,
        ..ServiceConfig::default()
    };
    let host = library_client(net, dir).await;
    let (_, address) = allium_client::service::load_identity(dir, &cfg).unwrap();
    tokio::spawn(allium_client::service::run(host.clone(), cfg));
    (host, address)
}

/// `curl --socks5-hostname` through `proxy` to `url`: the body.
async fn curl(proxy: std::net::SocketAddr, url: &str) -> Result<Vec<u8>, String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "60", "--socks5-hostname"])
        .arg(proxy.to_string())
        .arg(url)
        .output()
        .await
        .map_err(|e| format!("curl: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_fetches_from_a_service_by_its_address_and_it_survives_losing_an_intro_point_and_a_directory()
 {
    use sha2::{Digest, Sha256};
    let (net, web, want) = net_with_web().await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (host, address) = host_service(&net, dir.path(), web, 0).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("service/hostname")).unwrap(),
        format!("{address}\n")
    );
    let key = std::fs::metadata(dir.path().join("service/identity.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );

    // curl, by the address alone, through the testnet's SOCKS port: the
    // first fetch that works (the service is publishing meanwhile).
    let url = format!("http://{address}/");
    let mut tries = 0;
    let got = loop {
        tries += 1;
        match curl(net.socks_addr, &url).await {
            Ok(b) => break b,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "no fetch from the service after {tries} tries: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    eprintln!(
        "first fetch from the service {:?} after it started ({tries} tries)",
        started.elapsed()
    );
    assert_eq!(Sha256::digest(&got), want);

    // The same by a second stream on the same circuit, and by hyper's
    // HTTP/1.1 client over SOCKS5, as a browser-like client.
    assert_eq!(
        Sha256::digest(curl(net.socks_addr, &url).await.unwrap()),
        want
    );
    let text = address.to_string();
    assert_eq!(
        Sha256::digest(common::hyper_get(net.socks_addr, &text, 80, "/", None).await),
        want
    );

    // A mistyped address fails at once (F6); an address nobody publishes is
    // not found (F0).
    let typo = format!(
        "{}{}",
        if text.starts_with('a') { 'b' } else { 'a' },
        &text[1..]
    );
    let (code, _) = common::socks5(net.socks_addr, &typo, 80).await;
    assert_eq!(code, ReplyCode::ONION_ADDRESS_INVALID.0);
    let other = ServiceAddress::from_key(
        &SigningKey::from_bytes(&[0x77; 32])
            .verifying_key()
            .to_bytes(),
    )
    .unwrap();
    let (code, _) = common::socks5(net.socks_addr, &other.to_string(), 80).await;
    assert_eq!(code, ReplyCode::ONION_DESCRIPTOR_NOT_FOUND.0);
    // A port the service does not map: refused by the service.
    let (code, _) = common::socks5(net.socks_addr, &text, 81).await;
    assert_eq!(code, ReplyCode::CONNECTION_REFUSED.0);

    // Kill one of the service's introduction points and one of the
    // directories a fetch may ask (neither the host's nor the fresh
    // client's first guard): a fresh client still connects.
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = library_client(&net, fresh_dir.path()).await;
    let c = fresh.consensus().unwrap();
    let period = c.period_at(unix_now());
    let info = hsdir::fetch(&fresh, &address, unix_now()).await.unwrap();
    let t = Instant::now();
    assert_eq!(Sha256::digest(http_get(&fresh, &text).await.unwrap()), want);
    eprintln!("a fresh library client fetched 4 MiB in {:?}", t.elapsed());
    // The service's circuits to its introduction points go through its
    // restricted middles (those to points that are not exits: an exit
    // circuit may end at an exit), and so do ten circuits the fresh client
    // builds to one relay (a random middle would be one of them half the
    // time).
    let fp = |id: &[u8; 32]| <[u8; 20]>::try_from(&id[..20]).unwrap();
    let exits: Vec<[u8; 20]> = (net.relays.iter())
        .filter(|r| !r.config.exit_policy.is_empty())
        .map(|r| fp(&r.identity))
        .collect();
    let points: Vec<[u8; 20]> = (info.intro_points.iter())
        .map(|p| fp(&p.relay))
        .filter(|p| !exits.contains(p))
        .collect();
    let layer2: Vec<[u8; 20]> = host.vanguards().iter().map(fp).collect();
    assert_eq!(layer2.len(), allium_client::vanguards::SIZE);
    let to_points: Vec<_> = (host.events().circuit_status().into_iter())
        .filter(|l| l.path.len() == 3 && points.contains(&l.path[2].fingerprint))
        .collect();
    assert!(to_points.len() >= points.len().min(1));
    for l in to_points {
        assert!(layer2.contains(&l.path[1].fingerprint), "{}", l.path[1]);
    }
    let target = net.relays[net.relays.len() - 1].identity;
    let layer2 = fresh.vanguards();
    for _ in 0..10 {
        let circ = fresh
            .build_circuit(&ExitTarget::Relay(&target))
            .await
            .unwrap();
        let middle = circ.path[1].identity;
        assert!(layer2.contains(&middle), "{}", circ.path[1].nickname);
    }
    // Neither guard, and at most one of the two exits (a new client needs
    // one to bootstrap): an introduction point that is no exit if there is
    // one, and a directory that is no exit if the introduction point is.
    let guards = [fresh.guards()[0], host.guards()[0]];
    let exit = |i: usize| !net.relays[i].config.exit_policy.is_empty();
    let mut intros: Vec<usize> = (0..net.relays.len())
        .filter(|&i| {
            let id = net.relays[i].identity;
            info.intro_points.iter().any(|p| p.relay == id) && !guards.contains(&id)
        })
        .collect();
    intros.sort_by_key(|&i| exit(i));
    let intro = intros[0];
    let asked: Vec<[u8; 32]> = c
        .hsdir_ring(period)
        .unwrap()
        .responsible(&address.blinded(period), SPREAD_FETCH)
        .iter()
        .map(|r| r.identity)
        .collect();
    let hsdir = (0..net.relays.len())
        .find(|&i| {
            let id = net.relays[i].identity;
            i != intro && asked.contains(&id) && !guards.contains(&id) && !(exit(intro) && exit(i))
        })
        .unwrap();
    net.stop_relay(intro);
    net.stop_relay(hsdir);
    // (The first fresh client would use the circuit it has: another one
    // must find the service anew.)
    let killed = Instant::now();
    let again_dir = tempfile::tempdir().unwrap();
    let again = library_client(&net, again_dir.path()).await;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match http_get(&again, &text).await {
            Ok(body) => {
                assert_eq!(Sha256::digest(&body), want);
                break;
            }
            Err(e) => {
                eprintln!("after the kill, try {attempts}: {e}");
                assert!(
                    killed.elapsed() < Duration::from_secs(90),
                    "no connection {attempts} tries after the kill: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    eprintln!(
        "with an introduction point and a directory down, a fresh client connected {:?} after the kill ({attempts} tries)",
        killed.elapsed()
    );
    // Relays counted what they did, and no store holds the address.
    use std::sync::atomic::Ordering::Relaxed;
    let joined: u64 = net
        .relays
        .iter()
        .map(|r| r.points.stats.rendezvous_joined.load(Relaxed))
        .sum();
    assert!(joined >= 2, "{joined} rendezvous");
    for r in &net.relays {
        for d in r.services.descriptors() {
            assert!(!d.windows(32).any(|w| w == address.key()));
        }
    }
    net.shutdown().await;
}

/// A fresh client's first whole fetch of `/` from `address`, trying
/// every half second for at most `limit`; how many tries it took.
async fn fetch_fresh(net: &Testnet, address: &str, limit: Duration) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let client = library_client(net, dir.path()).await;
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match http_get(&client, address).await {
            Ok(_) => return tries,
            Err(e) => {
                assert!(start.elapsed() < limit, "no fetch in {tries} tries: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_whose_guard_dies_keeps_its_introduction_points() {
    let (net, web, _) = net_with_web().await;
    let dir = tempfile::tempdir().unwrap();
    let (host, address) = host_service(&net, dir.path(), web, 0).await;
    let text = address.to_string();
    fetch_fresh(&net, &text, Duration::from_secs(90)).await;
    let look = tempfile::tempdir().unwrap();
    let looker = library_client(&net, look.path()).await;
    let points = |info: ServiceInfo| {
        let mut v: Vec<([u8; 32], [u8; 32])> = (info.intro_points.iter())
            .map(|p| (p.relay, p.auth_key))
            .collect();
        v.sort();
        v
    };
    let before = points(hsdir::fetch(&looker, &address, unix_now()).await.unwrap());
    // Every introduction circuit goes through the service's first guard,
    // which is none of the points (guards are passed over for them while
    // other relays are left): they all close when it dies.
    let guard = host.guards()[0];
    assert!(before.iter().all(|p| p.0 != guard));
    let i = net.relays.iter().position(|r| r.identity == guard).unwrap();
    net.stop_relay(i);
    // The service builds each circuit again to the same point with the
    // same keys, through another guard: the descriptor the directories
    // hold stays right, and is not filed again with new points.
    let t = Instant::now();
    let tries = fetch_fresh(&net, &text, Duration::from_secs(90)).await;
    eprintln!(
        "with the service's guard down, a fresh client fetched {:?} after the kill ({tries} tries)",
        t.elapsed()
    );
    let look = tempfile::tempdir().unwrap();
    let looker = library_client(&net, look.path()).await;
    let after = points(hsdir::fetch(&looker, &address, unix_now()).await.unwrap());
    assert_eq!(after, before);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_for_listed_clients_with_a_puzzle_serves_them_and_answers_others_f4_or_f5() {
    use allium_proto::service::auth::ClientAuthSecret;
    use sha2::{Digest, Sha256};
    let (net, web, want) = net_with_web().await;

    // The service lists alice's key, as `allium client-auth` writes it.
    let dir = tempfile::tempdir().unwrap();
    let alice = ClientAuthSecret::generate(&mut rand::rng());
    let bob = ClientAuthSecret::generate(&mut rand::rng());
    let listed = dir.path().join("service/authorized_clients");
    std::fs::create_dir_all(&listed).unwrap();
    std::fs::write(listed.join("alice.auth"), format!("{}\n", alice.public())).unwrap();
    let started = Instant::now();
    // It also asks every introduction for effort 8 of its puzzle.
    let (_host, address) = host_service(&net, dir.path(), web, 8).await;
    let text = address.to_string();

    // Alice's client has her key and a SOCKS port of its own.
    let (_a, alice_client, alice_socks) = keyed_client(&net, &alice, &address).await;
    // Once the service has filed its descriptor, alice reads it...
    loop {
        match hsdir::fetch(&alice_client, &address, unix_now()).await {
            Ok(info) => {
                assert!(!info.intro_points.is_empty());
                assert_eq!(info.pow.map(|p| p.effort), Some(8));
                break;
            }
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "alice cannot read the descriptor: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // ... and hyper fetches the 4 MiB through her SOCKS port (her client
    // paid the effort: the service drops introductions that do not).
    assert_eq!(
        Sha256::digest(common::hyper_get(alice_socks, &text, 80, "/", None).await),
        want
    );
    // The testnet's client has no key: F4, on its SOCKS port.
    let (code, _) = common::socks5(net.socks_addr, &text, 80).await;
    assert_eq!(code, ReplyCode::ONION_MISSING_CLIENT_AUTH.0);
    // Bob has a key the service does not list: F5.
    let (_b, _bob_client, bob_socks) = keyed_client(&net, &bob, &address).await;
    let (code, _) = common::socks5(bob_socks, &text, 80).await;
    assert_eq!(code, ReplyCode::ONION_WRONG_CLIENT_AUTH.0);
    net.shutdown().await;
}

/// A client of `net` holding `key` for `address` in its
/// `service_auth_dir`, serving SOCKS on a free loopback port, bootstrapped.
async fn keyed_client(
    net: &Testnet,
    key: &allium_proto::service::auth::ClientAuthSecret,
    address: &ServiceAddress,
) -> (
    tempfile::TempDir,
    allium_client::Client,
    std::net::SocketAddr,
) {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("keys")).unwrap();
    std::fs::write(
        d.path().join("keys/svc.auth_private"),
        key.to_line(address).as_bytes(),
    )
    .unwrap();
    let cfg = allium_client::ClientConfig {
        data_dir: d.path().into(),
        socks_listen: vec![],
        service_auth_dir: Some("keys".into()),
        ..net.client_config.clone()
    };
    let client = allium_client::Client::new(cfg).unwrap();
    let socks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socks.local_addr().unwrap();
    tokio::spawn(client.clone().serve(vec![socks], vec![]));
    client.bootstrap(Duration::from_secs(30)).await.unwrap();
    (d, client, addr)
}

/// `GET /` from `host` through `client`'s library streams: the body.
async fn http_get(client: &allium_client::Client, host: &str) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = async {
        let mut s = client
            .open_stream(host, 80)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.map_err(|e| e.to_string())?;
        let at = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP head")?
            + 4;
        Ok::<_, String>(all[at..].to_vec())
    };
    tokio::time::timeout(Duration::from_secs(60), r)
        .await
        .unwrap_or_else(|_| Err("no whole answer in 60 s".to_string()))
}
