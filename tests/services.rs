//! Onion services: descriptors filed on the ring of service directories
//! and found by the address alone (doc/protocol.md section 11), on a
//! testnet on loopback.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
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
    // Every relay Running long enough is a service directory (the testnet
    // asks no uptime for HSDir) and, once measured, a guard. Wait until the
    // client and every relay see all 8 on the ring, and the client has a
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
                UnverifiedConsensus::parse(&b).is_ok_and(|u| ring_len(u.peek()) == 8)
            })
        });
        if ring_len(&c) == 8 && guards == 8 && relays_see {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ring of {}, {guards} guards, relays see all: {relays_see}",
            ring_len(&c)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

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
    };
    let c = net.client.consensus().unwrap();
    let period = c.period_at(unix_now());
    let mut periods = vec![period];
    if c.shared_random_for(period.next()).is_some() {
        periods.push(period.next());
    }
    for p in &periods {
        let revision = unix_now().saturating_sub(p.start());
        let doc = build(&identity, *p, revision, &info, &mut rand::rng());
        let done = hsdir::publish(&net.client, &address.blinded(*p), *p, &doc)
            .await
            .unwrap();
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
    assert_eq!(count(|s| s.stored.load(Relaxed)), 8 * periods.len() as u64);
    assert!(count(|s| s.served.load(Relaxed)) >= 1);
    assert!(count(|s| s.missed.load(Relaxed)) >= 6);
    net.shutdown().await;
}
