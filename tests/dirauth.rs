//! Directory authorities that vote: a 3-authority testnet on loopback.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allium::testnet::{Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_directory::{DirError, http, unix_now};
use allium_proto::{Consensus, RelayFlags, UnverifiedConsensus};

async fn fetch(addr: SocketAddr) -> (Vec<u8>, Consensus, usize) {
    let b = http::fetch_consensus(addr).await.unwrap();
    let u = UnverifiedConsensus::parse(&b).unwrap();
    let n = u.doc.signatures.len();
    (b.clone(), u.peek().clone(), n)
}

/// The consensus all of `addrs` serve, if they serve the same bytes, each
/// signed by three.
async fn agreed(addrs: &[SocketAddr]) -> Option<Consensus> {
    let mut docs = Vec::new();
    for a in addrs {
        docs.push(fetch(*a).await);
    }
    let all = docs.iter().all(|d| d.0 == docs[0].0 && d.2 == 3);
    all.then(|| docs.swap_remove(0).1)
}

/// Poll `f` every 250 ms until it holds, for at most `secs`.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, secs: u64, mut f: F) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn status(r: Result<(), DirError>) -> u16 {
    match r {
        Err(DirError::Status { status, .. }) => status,
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_authorities_vote_and_survive_failures() {
    let opts = TestnetOptions {
        relays: 5,
        exits: 2,
        valid_intervals: 4,
        ..Default::default()
    };
    let interval = opts.interval_secs;
    let net = Testnet::start(opts).await.unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let addrs: Vec<SocketAddr> = net.authorities.iter().map(|a| a.addr).collect();

    // All three serve the same bytes, signed by all three.
    eventually(
        "three byte-identical consensuses with three signatures",
        20,
        async || agreed(&addrs).await.is_some(),
    )
    .await;

    // Votes name descriptors by digest: a relay whose descriptor reached
    // two authorities of three is listed by all three, the third fetching
    // the descriptor from the others for its consensus.
    let key = ed25519_dalek::SigningKey::from_bytes(&[0x5a; 32]);
    let identity = key.verifying_key().to_bytes();
    let onion = allium_proto::ntor::OnionSecret::new(x25519_dalek::StaticSecret::from([0x5b; 32]));
    let desc = allium_proto::RelayDescriptor {
        nickname: "uploadedtotwo".into(),
        identity,
        link_key: allium_proto::LinkKey([7; 32]),
        onion_key: onion.public(),
        onion_crosscert: onion.crosscert(&identity),
        addr: "127.0.0.1:9".parse().unwrap(),
        bandwidth: 1000,
        exit_policy: allium_proto::policy::ExitPolicy::reject_all(),
        family: vec![],
        published: unix_now(),
    }
    .sign(&key);
    let digest: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &desc.body,
    ))
    .into();
    for a in &addrs[..2] {
        http::post_descriptor(*a, desc.to_bytes()).await.unwrap();
    }
    eventually(
        "the relay listed by all three, in one consensus",
        20,
        async || {
            agreed(&addrs).await.is_some_and(|c| {
                c.relay(&identity)
                    .is_some_and(|r| r.descriptor_digest == digest)
            })
        },
    )
    .await;
    let got = http::fetch_descriptors(addrs[2], &[digest, [0; 32]])
        .await
        .unwrap();
    assert_eq!(
        got,
        [desc.to_bytes()],
        "auth2 holds what it fetched; no other"
    );
    for bad in ["00", "zz", &vec![hex::encode([1; 32]); 65].join("+")] {
        assert!(
            matches!(
                http::exchange(
                    tokio::net::TcpStream::connect(addrs[0]).await.unwrap(),
                    &addrs[0].to_string(),
                    "GET",
                    &format!("/descriptors/{bad}"),
                    vec![],
                    1 << 20
                )
                .await,
                Err(DirError::Status { status: 400, .. })
            ),
            "{bad}"
        );
    }

    // Bad input gets a 4xx with a reason.
    let (_, c0, _) = fetch(addrs[0]).await;
    let old_vote = http::fetch_vote(addrs[0], c0.valid_after).await.unwrap();
    assert_eq!(
        status(http::post_vote(addrs[1], old_vote.clone()).await),
        409,
        "replayed vote"
    );
    let mut forged = old_vote.clone();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(
        status(http::post_vote(addrs[1], forged).await),
        400,
        "forged vote"
    );
    assert_eq!(
        status(http::post_vote(addrs[1], vec![1, 2, 3]).await),
        400,
        "garbage vote"
    );
    assert_eq!(
        status(http::post_descriptor(addrs[1], vec![0; 20_000]).await),
        413,
        "oversized descriptor"
    );
    assert_eq!(
        status(http::post_descriptor(addrs[1], vec![9; 100]).await),
        400,
        "malformed descriptor"
    );

    // A signing key certified mid-run: the next consensus carries it, and
    // clients (which pin identity keys only) keep accepting.
    let cert = net.rotate_signing_key(0).unwrap();
    eventually(
        "a consensus signed with auth0's new signing key",
        20,
        async || {
            let b = http::fetch_consensus(addrs[0]).await.unwrap();
            let u = UnverifiedConsensus::parse(&b).unwrap();
            u.report(&[], 0)
                .iter()
                .any(|s| s.signing_key == Some(cert.signing_key))
        },
    )
    .await;
    let c = net.client.refresh_consensus().await.unwrap();
    assert!(c.relays.len() >= 5);

    // A relay that stops answering loses Running, and clients stop choosing it.
    let gone = net.relays[4].identity;
    net.stop_relay(4);
    eventually("relay4 without Running", 20, async || {
        let c = net.client.refresh_consensus().await.unwrap();
        c.relay(&gone)
            .is_some_and(|r| !r.flags.has(RelayFlags::RUNNING))
    })
    .await;
    for _ in 0..10 {
        let circ = net.client.build_circuit(&ExitTarget::Any).await.unwrap();
        assert!(
            circ.path.iter().all(|r| r.identity != gone),
            "a stopped relay was chosen"
        );
    }

    // One authority down: the other two still make a consensus clients accept.
    net.stop_authority(2);
    let stopped_at = unix_now();
    eventually("a consensus from two authorities", 20, async || {
        let (_, c, n) = fetch(addrs[0]).await;
        c.valid_after > stopped_at + interval && n == 2
    })
    .await;
    let c = net.client.refresh_consensus().await.unwrap();
    assert!(c.valid_after > stopped_at);

    // Two down: no new consensus; the last one is used until it expires.
    net.stop_authority(1);
    let (_, last, _) = fetch(addrs[0]).await;
    net.client.refresh_consensus().await.unwrap();
    let wait = last.valid_until.saturating_sub(unix_now()) + 2;
    assert!(net.client.consensus().is_some());
    tokio::time::sleep(Duration::from_secs(wait.min(60))).await;
    // Had it published alone, it would serve a valid consensus: it serves
    // none, the last having expired, and says when its next round ends.
    match http::fetch_consensus(addrs[0]).await {
        Err(DirError::NotYet { why, secs }) => {
            assert!(why.ends_with(": no consensus that is still valid"), "{why}");
            assert!((1..=interval).contains(&secs), "next due in {secs} s");
        }
        other => panic!("one authority alone must not publish: {other:?}"),
    }
    assert!(
        net.client.consensus().is_none(),
        "an expired consensus is not used"
    );
    let err = net
        .client
        .refresh_consensus()
        .await
        .expect_err("no valid consensus exists")
        .to_string();
    assert!(
        err.contains("no consensus yet") && err.contains("no consensus that is still valid"),
        "{err}"
    );

    net.shutdown().await;
}

/// The authorities make a shared random value from all three reveals
/// (doc/protocol.md section 8.1), agree on it, and with it place the
/// HSDir relays on the services' ring (section 11.2). A run is 24
/// intervals (72 s here): the test watches from the first run whose
/// commitments it sees to the start of the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authorities_agree_a_shared_random_value_from_their_reveals() {
    use allium_proto::vote::shared_random::{self, Round};
    let opts = TestnetOptions {
        relays: 5,
        exits: 2,
        ..Default::default()
    };
    let interval = opts.interval_secs;
    let run_secs = 24 * interval;
    let net = Testnet::start(opts).await.unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let addrs: Vec<SocketAddr> = net.authorities.iter().map(|a| a.addr).collect();

    // (run, its value, its last three reveals) once seen.
    let mut revealed: Option<(u64, [u8; 32], Vec<shared_random::SrEntry>)> = None;
    let mut committed_runs = Vec::new();
    let mut hsdirs_seen = false;
    let start = Instant::now();
    let mut checked = false;
    while start.elapsed() < Duration::from_secs(3 * run_secs + 30) {
        let (_, c, _) = fetch(addrs[0]).await;
        let round = Round::of(c.valid_after, interval);
        let sr = &c.shared_random;
        // Every consensus knows the ring of the period it is in, and every
        // relay that has been Running is on it.
        let period = c.period_at(c.valid_after);
        let ring = c
            .hsdir_ring(period)
            .expect("the ring of the current period");
        let running = c
            .relays
            .iter()
            .filter(|r| r.flags.has(RelayFlags::RUNNING))
            .count();
        hsdirs_seen |= running == 5 && ring.len() == 5;
        if !round.reveals() && sr.commits.len() == 3 {
            committed_runs.push(round.run);
        }
        if round.reveals() && committed_runs.contains(&round.run) {
            // Reveals only ever match the agreed commitments.
            for e in &sr.reveals {
                let want = shared_random::commitment(round.run, &e.authority, &e.value);
                assert!(
                    sr.commits
                        .iter()
                        .any(|x| x.authority == e.authority && x.value == want)
                );
            }
            if sr.reveals.len() == 3 {
                revealed = Some((round.run, sr.current, sr.reveals.clone()));
            }
        }
        if let Some((run, value, reveals)) = &revealed
            && round.run == run + 1
        {
            assert_eq!(sr.previous, *value);
            assert_eq!(
                sr.current,
                shared_random::value(round.run, reveals, value),
                "the value of run {} is made of run {run}'s three reveals",
                round.run
            );
            // The three authorities serve the same value.
            for a in &addrs[1..] {
                let (_, other, _) = fetch(*a).await;
                if other.valid_after == c.valid_after {
                    assert_eq!(other.shared_random.current, sr.current);
                }
            }
            checked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        hsdirs_seen,
        "every Running relay got HSDir and is on the ring"
    );
    assert!(
        checked,
        "no run with all three reveals followed by the next run's value \
         (runs with commitments seen: {committed_runs:?}, reveals: {revealed:?})"
    );
}
