//! `allium testnet`: a whole network on loopback in one process.
//!
//! Layout: `authorities` directory authorities that vote, N relays (the
//! first `exits` of them exits that may reach loopback), and a client with
//! a SOCKS5 port. Each role has its own data directory; with
//! `--data-dir` (and `--init-only`) each also gets its `config.toml`, so
//! the network can also run one process per role. Each authority's
//! offline identity key is kept in `authN/offline/identity.key` (a real
//! operator keeps it elsewhere).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allium_client::{Client, ClientConfig};
use allium_directory::{AuthConfig, Authority, AuthorityEntry, keys, unix_now};
use allium_proto::RelayFlags;
use allium_proto::policy::DEFAULT_REJECTED_PORTS;
use allium_relay::{Relay, RelayConfig, RelayStats};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error(transparent)]
    Dir(#[from] allium_directory::DirError),
    #[error(transparent)]
    Relay(#[from] allium_relay::RelayError),
    #[error(transparent)]
    Client(#[from] allium_client::ClientError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

fn other(s: &str) -> TestnetError {
    TestnetError::Other(s.to_string())
}

/// Relays made at once when a testnet starts.
const MAKE_PARALLEL: usize = 64;

/// Worker threads of the authorities' own runtime.
const AUTHORITY_THREADS: usize = 2;
/// Worker threads of the client's own runtime.
const CLIENT_THREADS: usize = 1;

/// Open files a testnet may need per role: a relay's listener, both ends
/// of its links to other relays and of the authorities' tests of it, its
/// uploads and fetches.
const FILES_PER_ROLE: u64 = 8;

/// Raise the process's limit of open files towards what `roles` roles
/// need, as far as the system lets it: the soft limit, and the hard one
/// where the process may. A 5,000-relay network at 20,000 ran out:
/// listeners shed connections and reachability tests and self-tests
/// failed. Says so when it gets fewer.
fn raise_file_limit(roles: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let want = roles as u64 * FILES_PER_ROLE + 1024;
    let had = getrlimit(Resource::Nofile);
    let (soft, hard) = (
        had.current.unwrap_or(u64::MAX),
        had.maximum.unwrap_or(u64::MAX),
    );
    if soft >= want {
        return;
    }
    let to = |current: u64, maximum: u64| Rlimit {
        current: Some(current),
        maximum: Some(maximum),
    };
    if setrlimit(Resource::Nofile, to(want, hard.max(want))).is_ok() {
        return;
    }
    let reachable = want.min(hard);
    let limit = match setrlimit(Resource::Nofile, to(reachable, hard)) {
        Ok(()) => reachable,
        Err(_) => soft,
    };
    tracing::warn!(
        limit,
        "few open files allowed for {} roles: connections may be shed and tests fail (`ulimit -n`)",
        roles
    );
}

/// A runtime some roles run on apart from the rest, as they would on
/// machines of their own; dropped without waiting for its threads, since
/// a testnet is dropped in async code.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn new(name: &str, threads: usize) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(OwnRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("running until dropped").handle()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Options of `allium testnet`.
#[derive(Clone, Debug)]
pub struct TestnetOptions {
    pub authorities: usize,
    pub relays: usize,
    pub exits: usize,
    /// SOCKS listener (default: a free loopback port).
    pub socks: Option<SocketAddr>,
    /// An HTTP CONNECT proxy listener, if wanted.
    pub http_connect: Option<SocketAddr>,
    /// Keep everything here (default: a temporary directory, removed at the end).
    pub data_dir: Option<PathBuf>,
    /// First of the consecutive loopback ports to use (default: find a free block).
    pub base_port: Option<u16>,
    /// Consensus interval of the authorities, seconds.
    pub interval_secs: u64,
    /// A consensus stays valid for this many intervals.
    pub valid_intervals: u64,
    /// Delay (and rate) every link of the network adds to what it sends
    /// (`allium_link::shaping`; process-wide while the network runs).
    pub shaping: Option<allium_link::shaping::Shaping>,
    /// The bandwidth relay `i` declares is `declared[i]` if given
    /// (default 50 MB/s).
    pub declared: Vec<u32>,
    /// Every relay's `bandwidth_rate` (bytes per second), if limited.
    pub relay_rate: Option<u64>,
}

/// The voting period (seconds) `allium testnet` gives a network of
/// `relays` relays: 3, and one more per 500 relays past 1,000. Each relay
/// fetches each consensus, of one entry per relay, so a period's work in
/// one process grows as the square of the relays.
pub fn interval_for(relays: usize) -> u64 {
    3 + (relays.saturating_sub(1000) as u64).div_ceil(500)
}

/// How long before each period `allium testnet`'s authorities vote: 2 s
/// (the least allowed), and one more per 10,000 relays. On threads of
/// their own, the votes of 5,000 relays cross in tens of milliseconds, and
/// the consensus is computed in as few; a longer interval (for the relays'
/// fetches) need not delay the votes.
pub fn voting_for(relays: usize) -> u64 {
    2 + relays as u64 / 10_000
}

/// How long after `allium testnet` starts its authorities will have tested
/// its relays: 2 s, and 1.7 ms a relay (on two cores, 5,000 relays end
/// their uploads at about 6 s and the authorities' 15,000 first tests at
/// about 10 s).
fn tested_after_ms(relays: usize) -> u64 {
    2000 + 17 * relays as u64 / 10
}

/// The period offset (`period_offset_secs`) that has a network started at
/// `start_ms` vote at once past [`tested_after_ms`], `voting_secs` before
/// a period of `interval_secs`. Rounds aligned to the clock alone would
/// vote anywhere up to a period later.
fn period_offset(start_ms: u64, relays: usize, voting_secs: u64, interval_secs: u64) -> u64 {
    let vote_ms = start_ms + tested_after_ms(relays);
    (vote_ms.div_ceil(1000) + voting_secs) % interval_secs
}

impl Default for TestnetOptions {
    fn default() -> Self {
        TestnetOptions {
            authorities: 3,
            relays: 6,
            exits: 2,
            socks: None,
            http_connect: None,
            data_dir: None,
            base_port: None,
            interval_secs: 3,
            valid_intervals: 20,
            declared: vec![],
            relay_rate: None,
            shaping: None,
        }
    }
}

/// The configs of every role.
pub struct Plan {
    pub dir: PathBuf,
    pub auths: Vec<AuthConfig>,
    pub relays: Vec<RelayConfig>,
    pub client: ClientConfig,
}

/// Exit policy of testnet exits: the default rejected ports, then loopback,
/// then no other private address, then everything else.
pub fn testnet_exit_policy() -> Vec<String> {
    let mut v: Vec<String> = DEFAULT_REJECTED_PORTS
        .iter()
        .map(|&(a, b)| {
            if a == b {
                format!("reject *:{a}")
            } else {
                format!("reject *:{a}-{b}")
            }
        })
        .collect();
    v.push("accept 127.0.0.0/8:*".into());
    v.push("accept [::1]/128:*".into());
    v.push("reject private:*".into());
    v.push("accept *:*".into());
    v
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn identity_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("auth{i}/offline/identity.key"))
}

/// Make (or reuse) each authority's identity and signing keys; return the
/// identities in hex.
fn authority_keys(opts: &TestnetOptions, dir: &Path) -> Result<Vec<String>, TestnetError> {
    (0..opts.authorities)
        .map(|i| {
            let idp = identity_path(dir, i);
            let data = dir.join(format!("auth{i}"));
            let id = if idp.exists() {
                if keys::Signer::load(&data).is_err() {
                    keys::certify(&idp, &data, 12, unix_now())?;
                }
                keys::fingerprint(&idp)?
            } else {
                keys::keygen(&idp, &data, 12, unix_now())?
            };
            Ok(hex::encode(id))
        })
        .collect()
}

/// Relay `i` listens on its own loopback /16 (`127.(i+1).0.1`), so that
/// the client's /16 rule is exercised rather than switched off; past 254
/// relays, on through the third octet (`127.(i%254+1).(i/254).1`): every
/// relay its own address, as authorities vote at most two per address
/// Running.
fn relay_addr(base: u16, n_auth: usize, i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, (i % 254 + 1) as u8, (i / 254) as u8, 1),
        base + (n_auth + i) as u16,
    ))
}

/// Every address the network listens on, for a block starting at `base`.
fn all_addrs(opts: &TestnetOptions, base: u16) -> Vec<SocketAddr> {
    let mut v: Vec<SocketAddr> = (0..opts.authorities)
        .map(|i| loopback(base + i as u16))
        .collect();
    v.extend((0..opts.relays).map(|i| relay_addr(base, opts.authorities, i)));
    v.push(loopback(base + (opts.authorities + opts.relays) as u16));
    v.extend(fallbacks(opts, base).into_iter().map(|(_, a)| a));
    v
}

/// Fallback directories: the first [`FALLBACKS`] relays that are not
/// exits serve their consensus cache over HTTP (relay index, address), on
/// their own address, at the ports after the SOCKS port.
fn fallbacks(opts: &TestnetOptions, base: u16) -> Vec<(usize, SocketAddr)> {
    (0..FALLBACKS.min(opts.relays.saturating_sub(opts.exits)))
        .map(|k| {
            let i = opts.exits + k;
            let port = base + (opts.authorities + opts.relays + 1 + k) as u16;
            (
                i,
                SocketAddr::new(relay_addr(base, opts.authorities, i).ip(), port),
            )
        })
        .collect()
}

/// Relays that are also fallback directories.
const FALLBACKS: usize = 2;

/// The families the testnet declares: relays 2 and 3, and relays 1 and 5
/// (an exit and a non-exit), when there are at least 6 relays.
fn families(n_relays: usize) -> Vec<(usize, usize)> {
    if n_relays >= 6 {
        vec![(2, 3), (1, 5)]
    } else {
        vec![]
    }
}

/// Make (or reuse) the relays' identity keys; return them in hex.
fn relay_keys(opts: &TestnetOptions, dir: &Path) -> Result<Vec<String>, TestnetError> {
    (0..opts.relays)
        .map(|i| {
            let ks = allium_relay::keys::KeyStore::new(&dir.join(format!("relay{i}")));
            Ok(hex::encode(ks.identity()?.verifying_key().to_bytes()))
        })
        .collect()
}

/// Make the configs (no files; keys already made).
pub fn plan(
    opts: &TestnetOptions,
    dir: &Path,
    base: u16,
    auth_keys: &[String],
    relay_ids: &[String],
) -> Result<Plan, TestnetError> {
    if opts.relays < 3 || opts.exits < 1 || opts.exits >= opts.relays || opts.authorities < 1 {
        return Err(other(
            "need an authority, at least 3 relays, at least 1 exit and at least 2 non-exits",
        ));
    }
    let n_auth = opts.authorities;
    let authorities: Vec<AuthorityEntry> = (0..n_auth)
        .map(|i| AuthorityEntry {
            name: format!("auth{i}"),
            addr: loopback(base + i as u16),
            key: auth_keys[i].clone(),
        })
        .collect();
    let auths = (0..n_auth)
        .map(|i| AuthConfig {
            nickname: format!("auth{i}"),
            listen: loopback(base + i as u16),
            data_dir: dir.join(format!("auth{i}")),
            authorities: authorities.clone(),
            interval_secs: opts.interval_secs,
            voting_secs: Some(voting_for(opts.relays).min(opts.interval_secs)),
            valid_intervals: opts.valid_intervals,
            descriptor_max_age_secs: 600,
            guard_min_uptime_secs: 0,
            guard_min_bandwidth: 0,
            stable_min_uptime_secs: 0,
            hsdir_min_uptime_secs: 0,
            // Everything shares 127.0.0.1 here.
            allow_private_addresses: true,
            requests_per_sec: 10_000,
            request_burst: 10_000,
            max_connections: 16_384,
            max_connections_per_addr: 16_384,
            // Short measurements, once per network's life in practice (a
            // benchmark is not disturbed by them).
            measure_ms: 50,
            measure_max_bytes: 8 << 20,
            remeasure_secs: 900,
            ..AuthConfig::default()
        })
        .collect();
    let first_relay = base + n_auth as u16;
    let mut relays: Vec<RelayConfig> = (0..opts.relays)
        .map(|i| RelayConfig {
            nickname: format!("relay{i}"),
            listen: relay_addr(base, n_auth, i),
            family: families(opts.relays)
                .iter()
                .filter_map(|&(a, b)| {
                    if a == i {
                        Some(b)
                    } else if b == i {
                        Some(a)
                    } else {
                        None
                    }
                })
                .map(|j| relay_ids[j].clone())
                .collect(),
            data_dir: dir.join(format!("relay{i}")),
            authorities: authorities.clone(),
            bandwidth: opts.declared.get(i).copied().unwrap_or(50_000_000),
            bandwidth_rate: opts.relay_rate.unwrap_or(0),
            allow_private_addresses: true,
            exit_policy: if i < opts.exits {
                testnet_exit_policy()
            } else {
                vec![]
            },
            publish_interval_secs: 60,
            // One address (127.0.0.1) is every client of this network.
            dos_max_connections_per_addr: 1000,
            dos_circuit_rate: 1000.0,
            dos_circuit_burst: 20_000,
            ..RelayConfig::default()
        })
        .collect();
    let fallback_dirs = fallbacks(opts, base);
    for (i, a) in &fallback_dirs {
        relays[*i].dir_listen = Some(*a);
    }
    let client = ClientConfig {
        data_dir: dir.join("client"),
        authorities,
        fallback_dirs: fallback_dirs.into_iter().map(|(_, a)| a).collect(),
        guard_retry_secs: 1,
        socks_listen: vec![
            opts.socks
                .unwrap_or_else(|| loopback(first_relay + opts.relays as u16)),
        ],
        ..ClientConfig::default()
    };
    Ok(Plan {
        dir: dir.to_path_buf(),
        auths,
        relays,
        client,
    })
}

/// A directory for a network that goes with the process: in memory
/// (`/dev/shm`) where the machine has it and `TMPDIR` names no other
/// place, else in the temporary directory. A 5,000-relay network creates
/// 20,000 key files, and on a disk where many files were just deleted (the
/// network before's) creating them took 5 to 15 s.
fn temporary_dir() -> std::io::Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix("allium-testnet-");
    let shm = Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none()
        && shm.is_dir()
        && let Ok(d) = b.tempdir_in(shm)
    {
        return Ok(d);
    }
    b.tempdir()
}

/// A free block of ports (all of `all_addrs` bindable), held open.
pub async fn free_block(opts: &TestnetOptions) -> Result<(u16, Vec<TcpListener>), TestnetError> {
    let candidates: Vec<u16> = match opts.base_port {
        Some(p) => vec![p],
        None => (0..200).map(|i| 17100 + i * 100).collect(),
    };
    'outer: for base in candidates {
        let mut held = Vec::new();
        for a in all_addrs(opts, base) {
            match allium_link::listen::bind(a) {
                Ok(l) => held.push(l),
                Err(_) => continue 'outer,
            }
        }
        return Ok((base, held));
    }
    Err(other("no free block of loopback ports"))
}

fn write_toml<T: Serialize>(path: &Path, header: &str, cfg: &T) -> Result<(), TestnetError> {
    let body = toml::to_string(cfg).map_err(|e| TestnetError::Other(e.to_string()))?;
    allium_directory::store::private_dir(path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| TestnetError::Other(e.to_string()))?;
    std::fs::write(path, format!("# {header}\n{body}"))?;
    Ok(())
}

/// Write every role's config and a README of the commands (`--init-only`).
pub fn init(opts: &TestnetOptions, dir: &Path) -> Result<Plan, TestnetError> {
    std::fs::create_dir_all(dir)?;
    // Absolute paths in the configs, so each role runs from any directory.
    let dir = &std::fs::canonicalize(dir)?;
    let keys = authority_keys(opts, dir)?;
    let ids = relay_keys(opts, dir)?;
    let p = plan(opts, dir, opts.base_port.unwrap_or(17000), &keys, &ids)?;
    for r in &p.relays {
        Relay::new(r.clone())?; // create its keys now
    }
    write_configs(&p, opts)?;
    Ok(p)
}

/// Write each role's `config.toml` and a README of the commands.
fn write_configs(p: &Plan, opts: &TestnetOptions) -> Result<(), TestnetError> {
    let mut readme = format!(
        "# Allium test network\n\n{} authorities, {} relays ({} exits) and a client on 127.0.0.1.\n\
         Run each role in its own terminal, from this directory:\n\n",
        p.auths.len(),
        p.relays.len(),
        opts.exits
    );
    for a in &p.auths {
        write_toml(
            &a.data_dir.join("config.toml"),
            &format!("allium dirauth --config {}/config.toml", a.nickname),
            a,
        )?;
        readme.push_str(&format!(
            "    allium dirauth --config {}/config.toml\n",
            a.nickname
        ));
    }
    for r in &p.relays {
        write_toml(
            &r.data_dir.join("config.toml"),
            &format!("allium relay --config {}/config.toml", r.nickname),
            r,
        )?;
        readme.push_str(&format!(
            "    allium relay --config {}/config.toml\n",
            r.nickname
        ));
    }
    write_toml(
        &p.dir.join("client/config.toml"),
        "allium client --config client/config.toml",
        &p.client,
    )?;
    readme.push_str(&format!(
        "    allium client --config client/config.toml\n\nThen: curl --socks5-hostname {} http://127.0.0.1:PORT/\n\n\
         Inspect the consensus: allium consensus show --authority http://{} --config client/config.toml\n\n\
         Each authority's offline identity key is in authN/offline/identity.key; a new signing key:\n\n    \
         allium dirauth --config auth0/config.toml certify --identity auth0/offline/identity.key --months 12\n",
        p.client.socks_listen[0],
        p.auths[0].listen,
    ));
    std::fs::write(p.dir.join("README.md"), readme)?;
    Ok(())
}

/// An authority of a running testnet.
pub struct AuthorityInfo {
    pub name: String,
    pub addr: SocketAddr,
    pub identity: [u8; 32],
    pub data_dir: PathBuf,
    pub identity_key: PathBuf,
    task: AbortHandle,
}

/// A relay of a running testnet.
pub struct RelayInfo {
    pub config: RelayConfig,
    pub nickname: String,
    pub identity: [u8; 32],
    pub addr: SocketAddr,
    pub stats: Arc<RelayStats>,
    /// The relay's queued-cell accounting.
    pub mem: Arc<allium_link::limits::QueueMem>,
    /// What it serves as a directory cache.
    pub dir_cache: Arc<allium_directory::cache::ConsensusCache>,
    /// The onion service descriptors it stores.
    pub services: Arc<allium_directory::hsdir::ServiceDirectory>,
    /// Its introduction and rendezvous circuits.
    pub points: Arc<allium_relay::rendezvous::Points>,
    task: AbortHandle,
}

/// A running in-process testnet.
pub struct Testnet {
    /// Whether this network turned link shaping on (and turns it off).
    shaped: bool,
    pub authorities: Vec<AuthorityInfo>,
    pub relays: Vec<RelayInfo>,
    pub client: Client,
    pub client_config: ClientConfig,
    pub socks_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    tasks: JoinSet<(String, Result<(), String>)>,
    /// After `tasks`: dropped once they are aborted.
    _authority_rt: OwnRuntime,
    _client_rt: OwnRuntime,
    _tmp: Option<tempfile::TempDir>,
}

impl Testnet {
    /// Start every role and return once they are listening (not yet ready).
    pub async fn start(opts: TestnetOptions) -> Result<Testnet, TestnetError> {
        if opts.shaping.is_some() {
            allium_link::shaping::set(opts.shaping);
        }
        let tmp = match &opts.data_dir {
            Some(_) => None,
            None => Some(temporary_dir()?),
        };
        let dir = match (&opts.data_dir, &tmp) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => return Err(other("no directory")),
        };
        std::fs::create_dir_all(&dir)?;
        if tmp.is_some() {
            // Nothing of it outlives the process: no file waits for the disk.
            allium_directory::store::set_durable(false);
        }
        let began = std::time::Instant::now();
        let began_ms = allium_directory::unix_now_ms();
        raise_file_limit(opts.authorities + opts.relays + 1);
        let (base, held) = free_block(&opts).await?;
        let keys = authority_keys(&opts, &dir)?;
        let ids = relay_keys(&opts, &dir)?;
        let mut p = plan(&opts, &dir, base, &keys, &ids)?;
        for a in &mut p.auths {
            a.period_offset_secs =
                period_offset(began_ms, opts.relays, a.voting(), a.interval_secs);
        }
        tracing::debug!(took = ?began.elapsed(), "testnet ports and identity keys");
        // The fallback directories' ports are the last held; the relays
        // bind them themselves.
        let mut held = held;
        drop(held.split_off(held.len() - fallbacks(&opts, base).len()));
        let mut held = held.into_iter();
        let mut next_port = || held.next().ok_or_else(|| other("port block"));
        let mut tasks = JoinSet::new();

        // The authorities get threads of their own: among the tasks of
        // thousands of relays on the same threads, their voting rounds ran
        // seconds late and consensuses were lost.
        let authority_rt = OwnRuntime::new("authority", AUTHORITY_THREADS)?;
        let mut authorities = Vec::new();
        for (i, ac) in p.auths.iter().enumerate() {
            let l = next_port()?.into_std()?;
            let a = Arc::new(Authority::new(ac.clone())?);
            let identity = a.identity();
            let name = ac.nickname.clone();
            let span = tracing::info_span!("dirauth", name = %name);
            let n = name.clone();
            let serve = async move {
                let served = match TcpListener::from_std(l) {
                    Ok(l) => a.serve(l).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (n, served)
            };
            let task = tasks.spawn_on(serve.instrument(span), authority_rt.handle());
            authorities.push(AuthorityInfo {
                name,
                addr: ac.listen,
                identity,
                data_dir: ac.data_dir.clone(),
                identity_key: identity_path(&dir, i),
                task,
            });
        }
        // Made side by side: each writes and syncs its key files, which
        // one after another take most of a large network's start.
        let mut making = JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(MAKE_PARALLEL));
        for (i, rc) in p.relays.iter().enumerate() {
            let (rc, gate) = (rc.clone(), gate.clone());
            making.spawn(async move {
                let _turn = gate.acquire_owned().await;
                let made = tokio::task::spawn_blocking(move || Relay::new(rc)).await;
                (i, made)
            });
        }
        let mut made: Vec<Option<Relay>> = (0..p.relays.len()).map(|_| None).collect();
        while let Some(done) = making.join_next().await {
            let (i, r) = done.map_err(|e| other(&e.to_string()))?;
            made[i] = Some(r.map_err(|e| other(&e.to_string()))??);
        }
        tracing::debug!(took = ?began.elapsed(), "testnet relays made");
        let mut relays = Vec::new();
        for (rc, relay) in p.relays.iter().zip(made) {
            let l = next_port()?;
            let relay = relay.ok_or_else(|| other("a relay was not made"))?;
            let name = rc.nickname.clone();
            let span = tracing::info_span!("relay", name = %name);
            let (identity, stats, mem) = (relay.identity(), relay.stats(), relay.queue_mem());
            let dir_cache = relay.dir_cache();
            let services = relay.service_directory();
            let points = relay.points();
            let n = name.clone();
            let task = tasks.spawn(
                async move { (n, relay.serve(l).await.map_err(|e| e.to_string())) }
                    .instrument(span),
            );
            relays.push(RelayInfo {
                config: rc.clone(),
                nickname: name,
                identity,
                addr: rc.listen,
                stats,
                mem,
                dir_cache,
                services,
                points,
                task,
            });
        }
        let socks_listener = match opts.socks {
            Some(a) => TcpListener::bind(a).await?,
            None => next_port()?,
        };
        p.client.socks_listen = vec![socks_listener.local_addr()?];
        let http_listener = match opts.http_connect {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let http_addr = http_listener.as_ref().map(|l| l.local_addr()).transpose()?;
        p.client.http_connect_listen = http_addr.into_iter().collect();
        // Configs for running each role on its own, kept only in a
        // directory the user named: nobody can run from a temporary one (a
        // 5,000-relay network's configs took seconds to write).
        if opts.data_dir.is_some() {
            write_configs(&p, &opts)?;
        }
        // The client too, as a user's machine: its fetch and first
        // circuit waited behind the relays' tasks for seconds.
        let client_rt = OwnRuntime::new("client", CLIENT_THREADS)?;
        let client = {
            // Whatever it spawns runs there too.
            let _in = client_rt.handle().enter();
            Client::new(p.client.clone())?
        };
        let socks_addr = socks_listener.local_addr()?;
        let socks_listener = socks_listener.into_std()?;
        let http_listener = http_listener.map(|l| l.into_std()).transpose()?;
        let c = client.clone();
        let serve = async move {
            let listeners = (
                TcpListener::from_std(socks_listener),
                http_listener.map(TcpListener::from_std).transpose(),
            );
            let served = match listeners {
                (Ok(socks), Ok(http)) => c
                    .serve(vec![socks], http.into_iter().collect())
                    .await
                    .map_err(|e| e.to_string()),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            };
            ("client".to_string(), served)
        };
        tasks.spawn_on(
            serve.instrument(tracing::info_span!("client")),
            client_rt.handle(),
        );
        Ok(Testnet {
            shaped: opts.shaping.is_some(),
            authorities,
            relays,
            client,
            client_config: p.client.clone(),
            socks_addr,
            http_addr,
            tasks,
            _authority_rt: authority_rt,
            _client_rt: client_rt,
            _tmp: tmp,
        })
    }

    /// Host a demo onion service: a small web page on loopback, published
    /// by a client of its own (in `service/` beside the testnet's client).
    /// Returns its address; it is reachable once its descriptor is filed
    /// (its log says "service reachable").
    pub async fn host_demo_service(
        &mut self,
    ) -> Result<allium_proto::service::ServiceAddress, TestnetError> {
        use allium_client::service::{PortMap, ServiceConfig};
        let web = TcpListener::bind("127.0.0.1:0").await?;
        let target = web.local_addr()?;
        self.tasks.spawn(async move {
            loop {
                let Ok((mut s, _)) = web.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 2048];
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                    let body = "Hello from an Allium onion service.\n";
                    let head = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
        let svc = ServiceConfig {
            ports: vec![PortMap {
                virtual_port: 80,
                target,
            }],
            ..ServiceConfig::default()
        };
        let data_dir = self
            .client_config
            .data_dir
            .parent()
            .map(|p| p.join("service"))
            .ok_or_else(|| other("the client's data directory has no parent"))?;
        let (_, address) = allium_client::service::load_identity(&data_dir, &svc)?;
        let cfg = ClientConfig {
            data_dir,
            socks_listen: vec![],
            http_connect_listen: vec![],
            control_listen: None,
            metrics_listen: None,
            services: vec![svc],
            ..self.client_config.clone()
        };
        let host = Client::new(cfg)?;
        self.tasks.spawn(
            async move {
                (
                    "service".to_string(),
                    host.serve(vec![], vec![]).await.map_err(|e| e.to_string()),
                )
            }
            .instrument(tracing::info_span!("service")),
        );
        Ok(address)
    }

    /// Wait until the client has a verified consensus listing every relay
    /// as Running, and has built a circuit.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), TestnetError> {
        let start = std::time::Instant::now();
        loop {
            let running = self.client.consensus().map_or(0, |c| {
                c.relays
                    .iter()
                    .filter(|r| r.flags.has(RelayFlags::RUNNING))
                    .count()
            });
            if running >= self.relays.len() {
                break;
            }
            if start.elapsed() > timeout {
                return Err(other(
                    "the consensus did not list every relay as Running in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = timeout.saturating_sub(start.elapsed());
        tokio::time::timeout(left, self.client.wait_bootstrapped())
            .await
            .map_err(|_| other("the client built no circuit in time"))
    }

    /// Stop authority `i` (its HTTP server and its votes).
    pub fn stop_authority(&self, i: usize) {
        self.authorities[i].task.abort();
    }

    /// Stop relay `i`: it closes its links and stops answering.
    pub fn stop_relay(&self, i: usize) {
        self.relays[i].task.abort();
    }

    /// Start relay `i` again, with its keys, on its address.
    pub async fn restart_relay(&mut self, i: usize) -> Result<(), TestnetError> {
        let rc = self.relays[i].config.clone();
        let l = TcpListener::bind(rc.listen).await?;
        let relay = Relay::new(rc.clone())?;
        let name = rc.nickname.clone();
        self.relays[i].stats = relay.stats();
        self.relays[i].dir_cache = relay.dir_cache();
        self.relays[i].services = relay.service_directory();
        self.relays[i].points = relay.points();
        let span = tracing::info_span!("relay", name = %name);
        self.relays[i].task = self.tasks.spawn(
            async move { (name, relay.serve(l).await.map_err(|e| e.to_string())) }.instrument(span),
        );
        Ok(())
    }

    /// Certify a new signing key for authority `i` with its offline
    /// identity key; the authority picks it up at its next round.
    pub fn rotate_signing_key(
        &self,
        i: usize,
    ) -> Result<allium_proto::AuthorityCert, TestnetError> {
        let a = &self.authorities[i];
        Ok(keys::certify(&a.identity_key, &a.data_dir, 12, unix_now())?)
    }

    /// Wait until a role's task ends (which is an error) and report it.
    pub async fn wait_failure(&mut self) -> String {
        match self.tasks.join_next().await {
            Some(Ok((name, Ok(())))) => format!("{name} stopped"),
            Some(Ok((name, Err(e)))) => format!("{name} failed: {e}"),
            Some(Err(e)) => format!("a task ended: {e}"),
            None => "no tasks".into(),
        }
    }

    /// Stop everything; the temporary directory goes with `self`.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        if self.shaped {
            allium_link::shaping::set(None);
        }
        if self._tmp.is_some() {
            allium_directory::store::set_durable(true);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_testnets_vote_less_often() {
        let secs: Vec<u64> = [6, 1000, 1001, 2000, 3000, 5000]
            .into_iter()
            .map(super::interval_for)
            .collect();
        assert_eq!(secs, [3, 3, 4, 5, 7, 11]);
        let voting: Vec<u64> = [6, 5000, 9999, 10_000, 50_000]
            .into_iter()
            .map(super::voting_for)
            .collect();
        assert_eq!(voting, [2, 2, 2, 3, 7]);
    }

    #[test]
    fn the_first_votes_fall_when_the_relays_are_tested() {
        // 5,000 relays started at 1000.2 s: tested by 1010.7 s, so the
        // vote at 1011 s is for the period at 1013 s.
        let off = super::period_offset(1_000_200, 5000, 2, 11);
        assert_eq!(off, 1013 % 11);
        // Whatever the start, the first vote at or past the tests (one
        // `voting_secs` before a period of the authorities' schedule) comes
        // within a second of them, not up to a period later.
        for start_ms in (0..30_000).step_by(77) {
            let cfg = super::AuthConfig {
                interval_secs: 11,
                voting_secs: Some(2),
                period_offset_secs: super::period_offset(start_ms, 5000, 2, 11),
                ..Default::default()
            };
            let tested = start_ms + 10_500;
            // The first period voted on at or after `tested`.
            let va = cfg.period_after((tested + 2000).div_ceil(1000) - 1);
            let vote_ms = (va - 2) * 1000;
            assert!(vote_ms >= tested, "started at {start_ms} ms");
            assert!(vote_ms - tested < 1000, "started at {start_ms} ms");
        }
    }
}
