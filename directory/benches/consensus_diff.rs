//! Consensus diffs at scale: a network of N relays (default 10,000)
//! through one real authority, then 1% of them republishing, as in an hour
//! of a real network. Prints the authority's work per period (time and
//! CPU to vote, compute and sign, bytes written), the consensus' size,
//! compressed, the diff's size and the time to make and apply it.
//!
//! `cargo bench -p allium-directory --bench consensus_diff [-- N]`

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_directory::auth::{AuthConfig, Authority};
use allium_directory::{AuthorityEntry, diff, unix_now};
use allium_proto::ntor::OnionSecret;
use allium_proto::policy::ExitPolicy;
use allium_proto::{LinkKey, RelayDescriptor};
use ed25519_dalek::SigningKey;

/// This process's CPU time (user and system) so far, and the bytes it
/// has handed to `write` calls, from /proc.
fn usage() -> (Duration, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command's closing parenthesis; utime and stime
    // are the 12th and 13th of them, in clock ticks of 10 ms.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    let wchar = io
        .lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .parse()
        .unwrap();
    (Duration::from_millis((f[0] + f[1]) * 10), wchar)
}

fn desc(i: u32, published: u64) -> Vec<u8> {
    let mut seed = [0u8; 32];
    seed[..4].copy_from_slice(&i.to_le_bytes());
    let k = SigningKey::from_bytes(&seed);
    seed[4] = 1;
    let onion = OnionSecret::new(x25519_dalek::StaticSecret::from(seed));
    let id = k.verifying_key().to_bytes();
    RelayDescriptor {
        nickname: format!("relay{i}"),
        identity: id,
        link_key: LinkKey(seed),
        onion_key: onion.public(),
        onion_crosscert: onion.crosscert(&id),
        addr: format!("10.{}.{}.{}:9001", i >> 16, (i >> 8) & 255, i & 255)
            .parse()
            .unwrap(),
        bandwidth: 1_000_000 + i * 1000,
        exit_policy: if i.is_multiple_of(5) {
            ExitPolicy::default_exit()
        } else {
            ExitPolicy::reject_all()
        },
        family: vec![],
        published,
    }
    .sign(&k)
    .to_bytes()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    // Key files and descriptors on a memory file system where there is one.
    let shm = std::path::Path::new("/dev/shm");
    let d = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let now = unix_now();
    let id =
        allium_directory::keys::keygen(&d.path().join("identity.key"), &d.path().join("a"), 1, now)
            .unwrap();
    let a = Arc::new(
        Authority::new(AuthConfig {
            data_dir: d.path().join("a"),
            authorities: vec![AuthorityEntry {
                name: "a".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                key: hex::encode(id),
            }],
            interval_secs: 3600,
            allow_private_addresses: true,
            max_relays: n as usize,
            ..Default::default()
        })
        .unwrap(),
    );
    let descs: Vec<Vec<u8>> = (0..n).map(|i| desc(i, now - 60)).collect();
    let (t, (cpu0, w0)) = (Instant::now(), usage());
    for d in &descs {
        a.accept_descriptor(d, now).unwrap();
    }
    let (uploads, (cpu1, w1)) = (t.elapsed(), usage());
    println!(
        "{n} uploads                   {uploads:.2?}, {:.2?} CPU, {} bytes written ({:.0} per upload)",
        cpu1 - cpu0,
        w1 - w0,
        (w1 - w0) as f64 / f64::from(n)
    );
    let va = (now / 3600 + 1) * 3600;
    let publish = async |va: u64, now: u64| {
        let (t, (cpu0, w0)) = (Instant::now(), usage());
        a.make_vote(va, now);
        let voted = t.elapsed();
        a.assemble(va).await.unwrap();
        let assembled = t.elapsed();
        a.publish(va).unwrap();
        let (published, (cpu1, w1)) = (t.elapsed(), usage());
        println!(
            "period: vote {voted:.2?}, compute and sign {:.2?}, publish {:.2?}; {:.2?} CPU in all; {} bytes written ({:.0} per relay)",
            assembled - voted,
            published - assembled,
            cpu1 - cpu0,
            w1 - w0,
            (w1 - w0) as f64 / f64::from(n)
        );
        let t = Instant::now();
        a.make_diffs().await;
        (a.consensus_bytes().unwrap(), t.elapsed())
    };
    let (first, _) = publish(va, now).await;
    for i in (0..n).step_by(100) {
        a.accept_descriptor(&desc(i, now), now).unwrap();
    }
    let (second, made) = publish(va + 3600, now).await;
    let z = a.cache().diff(None).unwrap();
    let d1 = a.cache().diff(Some(diff::digest(&first))).unwrap();
    let t = Instant::now();
    let back = diff::decode(Some(&first), &d1, allium_proto::doc::MAX_CONSENSUS_LEN).unwrap();
    let applied = t.elapsed();
    assert_eq!(back, second);
    // Then every relay republishes (a new digest each).
    for i in 0..n {
        a.accept_descriptor(&desc(i, now + 1), now + 1).unwrap();
    }
    let (third, _) = publish(va + 7200, now + 1).await;
    let d_all = a.cache().diff(Some(diff::digest(&second))).unwrap();
    let d_two = a.cache().diff(Some(diff::digest(&first))).unwrap();
    assert_eq!(
        diff::decode(Some(&second), &d_all, allium_proto::doc::MAX_CONSENSUS_LEN).unwrap(),
        third
    );
    let per = |b: usize| b as f64 / f64::from(n);
    println!("relays                         {n}");
    println!(
        "consensus                      {} bytes ({:.0} per relay)",
        second.len(),
        per(second.len())
    );
    println!(
        "compressed alone               {} bytes ({:.0} per relay)",
        z.len(),
        per(z.len())
    );
    println!(
        "diff after 1% republished      {} bytes ({:.1} per relay)",
        d1.len(),
        per(d1.len())
    );
    println!(
        "diff after all republished     {} bytes ({:.1} per relay); from two back {} bytes",
        d_all.len(),
        per(d_all.len()),
        d_two.len()
    );
    println!("making both (one base)         {made:.2?}");
    println!("applying the diff              {applied:.2?}");

    // What a relay's cache makes, at its cheaper level, when first asked.
    let level = allium_directory::cache::RELAY_LEVEL;
    let t = Instant::now();
    let r1 = diff::encode_at(level, Some(&first), &second).unwrap();
    let r1_made = t.elapsed();
    let t = Instant::now();
    let rz = diff::encode_at(level, None, &second).unwrap();
    let rz_made = t.elapsed();
    println!(
        "relay cache (level {level}): diff after 1% {} bytes in {r1_made:.2?}; compressed alone {} bytes in {rz_made:.2?}",
        r1.len(),
        rz.len()
    );

    // Bytes the authorities serve per hour (one consensus an hour), from
    // these sizes: before directory caches, every client fetched the whole
    // consensus from them; now only relays do, each one diff an hour, and
    // clients fetch diffs from their guards (and their first consensus,
    // compressed, from fallback directories).
    let clients: u64 = std::env::var("CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let before = clients * second.len() as u64;
    let now_auth = u64::from(n) * d1.len() as u64;
    let caches = clients * r1.len() as u64;
    println!(
        "per hour, {clients} clients: authorities served {before} bytes before caches, {now_auth} now ({:.4}% of before); guards serve {caches} in all",
        100.0 * now_auth as f64 / before as f64
    );
}
