//! An authority held to 1,024 file descriptors tests the reachability of
//! 10,000 relays and votes every one of them Running: its tests run a
//! bounded number at a time (doc/protocol.md section 7), where testing all
//! at once left nearly half of such a network unreachable.
//!
//! The test runs its own binary twice more, by role: the relays, as link
//! responders with one listener each at its own loopback address, each
//! proving its own identity in the handshake (under the hard descriptor
//! limit); and the authority, under `ulimit -n 1024`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_directory::auth::{AuthConfig, Authority};
use allium_directory::{AuthorityEntry, unix_now};
use allium_link::channel::{self, LinkIdentity};
use allium_proto::ntor::OnionSecret;
use allium_proto::policy::ExitPolicy;
use allium_proto::vote::Vote;
use allium_proto::{AuthorityKey, RelayDescriptor, RelayFlags};
use ed25519_dalek::SigningKey;
use x25519_dalek::StaticSecret;

const RELAYS: usize = 10_000;
/// The voting interval: relays are retested every interval, and Running
/// means reached within two of them (and a test's timeout).
const INTERVAL: u64 = 60;
const FD_LIMIT: u64 = 1024;
const ROLE: &str = "ALLIUM_REACH_ROLE";
const NAME: &str = "ten_thousand_relays_are_tested_within_a_1024_descriptor_limit";

/// Relay `i`'s keys: identity, link secret.
fn keys(i: usize) -> (SigningKey, StaticSecret) {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
    seed[8] = 0x1d;
    let id = SigningKey::from_bytes(&seed);
    seed[8] = 0x11;
    (id, StaticSecret::from(seed))
}

/// Relay `i`'s address: one loopback address each.
fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((
        [
            127,
            20 + (i / 62_500) as u8,
            (i / 250 % 250) as u8,
            (i % 250 + 1) as u8,
        ],
        9030,
    ))
}

/// This test binary in `role`, under the descriptor limit `ulimit` sets.
fn spawn_role(role: &str, ulimit: &str) -> Child {
    Command::new("sh")
        .args([
            "-c",
            &format!(
                "ulimit -n {ulimit} && exec \"$0\" --exact {NAME} --nocapture --test-threads=1"
            ),
        ])
        .arg(std::env::current_exe().unwrap())
        .env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The soft descriptor limit in force (`/proc/self/limits`).
fn fd_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// The child: every relay's listener, answering link handshakes, until
/// its parent closes stdin.
fn responders() {
    let got = fd_limit();
    assert!(
        got >= RELAYS as u64 + 200,
        "the responders need {} file descriptors; the hard limit is {got}",
        RELAYS + 200
    );
    let rt = runtime();
    rt.block_on(async {
        for i in 0..RELAYS {
            let (identity, link_secret) = keys(i);
            let me = Arc::new(LinkIdentity {
                identity,
                link_secret,
                stop: None,
                env: Default::default(),
                bind: None,
                known_relay: None,
            });
            let l = tokio::net::TcpListener::bind(addr(i)).await.unwrap();
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let me = me.clone();
                    tokio::spawn(async move {
                        let _ = channel::accept(s, &me, Arc::new(|_| {}), None).await;
                    });
                }
            });
        }
        println!("responders ready");
        // Until the parent goes.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
        })
        .await
        .unwrap();
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Kills the child by its pid when the test ends, however it ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ten_thousand_relays_are_tested_within_a_1024_descriptor_limit() {
    match std::env::var(ROLE).as_deref() {
        Ok("responders") => return responders(),
        Ok("authority") => return authority(),
        _ => {}
    }
    let mut child = spawn_role("responders", "$(ulimit -Hn)");
    let out = child.stdout.take().unwrap();
    let responders = Reaper(child);
    let mut lines = BufReader::new(out).lines();
    let started = Instant::now();
    loop {
        let line = lines
            .next()
            .expect("the responders exited before they were ready")
            .unwrap();
        if line.contains("responders ready") {
            break;
        }
    }
    eprintln!("{RELAYS} responders ready in {:?}", started.elapsed());
    let mut child = spawn_role("authority", &FD_LIMIT.to_string());
    let out = child.stdout.take().unwrap();
    let mut authority = Reaper(child);
    let text = std::io::read_to_string(out).unwrap();
    let status = authority.0.wait().unwrap();
    eprintln!("{text}");
    assert!(status.success(), "the authority's run failed: {text}");
    assert!(text.contains("all 10000 Running"), "{text}");
    drop(responders);
}

/// The authority, under 1,024 descriptors: takes every relay's descriptor,
/// runs, and votes until all of them are Running.
fn authority() {
    assert_eq!(fd_limit(), FD_LIMIT);
    let started = Instant::now();
    let rt = runtime();
    rt.block_on(async {
        let d = tempfile::tempdir().unwrap();
        let id = allium_directory::keys::keygen(
            &d.path().join("identity.key"),
            &d.path().join("srv"),
            1,
            unix_now(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = AuthConfig {
            data_dir: d.path().join("srv"),
            listen: listener.local_addr().unwrap(),
            authorities: vec![AuthorityEntry {
                name: "a".into(),
                addr: listener.local_addr().unwrap(),
                key: hex::encode(id),
            }],
            interval_secs: INTERVAL,
            allow_private_addresses: true,
            max_relays: RELAYS,
            ..Default::default()
        };
        let a = Arc::new(Authority::new(cfg).unwrap());
        let now = unix_now();
        let onion = OnionSecret::new(StaticSecret::from([2; 32]));
        for i in 0..RELAYS {
            let (k, link) = keys(i);
            let identity = k.verifying_key().to_bytes();
            let desc = RelayDescriptor {
                nickname: format!("r{i}"),
                identity,
                link_key: allium_proto::LinkKey(x25519_dalek::PublicKey::from(&link).to_bytes()),
                onion_key: onion.public(),
                onion_crosscert: onion.crosscert(&identity),
                addr: addr(i),
                bandwidth: 1000,
                exit_policy: ExitPolicy::default_exit(),
                family: vec![],
                published: now,
            }
            .sign(&k)
            .to_bytes();
            a.accept_descriptor(&desc, now).unwrap();
        }
        println!("{RELAYS} descriptors taken in {:?}", started.elapsed());
        tokio::spawn(a.clone().serve(listener));

        let pinned = [AuthorityKey(id)];
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let now = unix_now();
            let va = now - now % INTERVAL + INTERVAL;
            let v = Vote::verify(&a.make_vote(va, now), &pinned, now).unwrap();
            let running = v
                .relays
                .iter()
                .filter(|r| r.flags.has(RelayFlags::RUNNING))
                .count();
            if std::env::var_os("ALLIUM_REACH_VERBOSE").is_some() {
                println!("{:?}: {running} Running", started.elapsed());
            }
            if running == RELAYS {
                println!("all {RELAYS} Running after {:?}", started.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{running} of {RELAYS} relays voted Running within 180 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
