//! Hosting an onion service (doc/protocol.md section 11.4): keep circuits
//! to a few introduction points, file a descriptor listing them on the
//! ring for this period and the next, and for each client's introduction
//! build a circuit to its rendezvous point and serve its streams from the
//! local addresses the configuration maps.
//!
//! A service runs inside a client ([`Client::run`] starts the
//! `[[services]]` of its configuration). Its identity key lives in its
//! directory (`dir/identity.key`, 0600, written atomically) with its
//! address beside it (`dir/hostname`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_directory::store::{self, KeyKind};
use allium_directory::unix_now;
use allium_proto::doc::RelayFlags;
use allium_proto::ntor::{self, OnionKeys, OnionSecret};
use allium_proto::relaymsg::{EndReason, Introduce, RelayMsg};
use allium_proto::service::auth::ClientAuthKey;
use allium_proto::service::descriptor::{
    self, IntroPoint, MAX_INTRO_POINTS, ServiceInfo, subcredential,
};
use allium_proto::service::intro::{self, IntroduceRequest};
use allium_proto::service::pow::{EffortControl, Pow, PowParams, Solver, verify};
use allium_proto::service::{ServiceAddress, TimePeriod};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, warn};
use x25519_dalek::StaticSecret;

use crate::ClientError;
use crate::circuit::{CircuitHandle, Incoming};
use crate::client::Client;
use crate::hsdir;
use crate::path::ExitTarget;

/// One service in a client's configuration (`[[services]]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's directory (under `data_dir` if relative): its
    /// identity key and `hostname`.
    pub dir: PathBuf,
    /// What a client's stream to each port reaches.
    pub ports: Vec<PortMap>,
    /// Introduction points kept.
    pub intro_points: usize,
    /// INTRODUCE1s per second each introduction point passes on, and the
    /// burst it allows.
    pub intro_rate: u32,
    pub intro_burst: u32,
    /// Answer a flood of introductions with a puzzle (section 11.5 of the
    /// protocol): the descriptor carries the service's seed and the
    /// effort it suggests (none until introductions find no turn), and
    /// introductions that paid more are served first.
    pub pow_defense: bool,
    /// The least effort an introduction must carry (0: none unless under
    /// load).
    pub pow_min_effort: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            dir: PathBuf::from("service"),
            ports: vec![],
            intro_points: 3,
            intro_rate: 25,
            intro_burst: 200,
            pow_defense: true,
            pow_min_effort: 0,
        }
    }
}

/// A virtual port and the local address behind it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortMap {
    pub virtual_port: u16,
    pub target: SocketAddr,
}

impl ServiceConfig {
    pub fn check(&self) -> Result<(), ClientError> {
        let bad =
            |why: String| ClientError::Config(format!("service {}: {why}", self.dir.display()));
        if self.ports.is_empty() {
            return Err(bad("no ports".into()));
        }
        if !(1..=MAX_INTRO_POINTS).contains(&self.intro_points) {
            return Err(bad(format!("intro_points must be 1 to {MAX_INTRO_POINTS}")));
        }
        if !(1..=intro::MAX_RATE).contains(&self.intro_rate)
            || !(1..=intro::MAX_BURST).contains(&self.intro_burst)
        {
            return Err(bad(format!(
                "intro_rate must be 1 to {}, intro_burst 1 to {}",
                intro::MAX_RATE,
                intro::MAX_BURST
            )));
        }
        if self.pow_min_effort > 0 && !self.pow_defense {
            return Err(bad("pow_min_effort needs pow_defense".into()));
        }
        if self.pow_min_effort > allium_proto::service::pow::MAX_EFFORT {
            return Err(bad(format!(
                "pow_min_effort above {} (what a client pays at most) shuts every client out",
                allium_proto::service::pow::MAX_EFFORT
            )));
        }
        Ok(())
    }

    fn dir_in(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.dir)
    }
}

/// The service's identity (created on first use) and its address, which
/// is written to `dir/hostname`.
pub fn load_identity(
    data_dir: &Path,
    cfg: &ServiceConfig,
) -> Result<(SigningKey, ServiceAddress), ClientError> {
    let dir = cfg.dir_in(data_dir);
    let key =
        store::load_or_create_key(&dir.join("identity.key"), KeyKind::ServiceIdentity, || {
            SigningKey::generate(&mut rand::rng()).to_bytes()
        })?;
    let identity = SigningKey::from_bytes(&key);
    let address = ServiceAddress::from_key(&identity.verifying_key().to_bytes())?;
    store::write_atomic(
        &dir.join("hostname"),
        format!("{address}\n").as_bytes(),
        0o644,
    )?;
    Ok((identity, address))
}

/// Clients listed in `authorized_clients/`, at most.
const MAX_AUTH_FILES: usize = 4096;

/// The clients the service admits, from the `NAME.auth` files in
/// `dir/authorized_clients/` (each `descriptor:x25519:<base32 key>`, as
/// Tor writes them); none, or no such directory: anyone who knows the
/// address. A file that does not hold a key is an error, and so is a
/// directory that holds no `.auth` file at all or more than it takes, so
/// that a typo never opens a service meant to be restricted.
pub fn load_authorized(
    data_dir: &Path,
    cfg: &ServiceConfig,
) -> Result<Vec<ClientAuthKey>, ClientError> {
    let dir = cfg.dir_in(data_dir).join("authorized_clients");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(ClientError::Config(format!("{}: {e}", dir.display()))),
    };
    let mut keys = Vec::new();
    let mut files = 0;
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("auth") {
            continue;
        }
        files += 1;
        if files > MAX_AUTH_FILES {
            return Err(ClientError::Config(format!(
                "{}: more than {MAX_AUTH_FILES} .auth files",
                dir.display()
            )));
        }
        let bad = |why: String| ClientError::Config(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("");
        let key = ClientAuthKey::parse(line).map_err(|e| bad(e.to_string()))?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(ClientError::Config(format!(
            "{}: no NAME.auth file in it (remove the directory to serve anyone who knows the address)",
            dir.display()
        )));
    }
    if keys.len() > descriptor::MAX_AUTH_CLIENTS {
        return Err(ClientError::Config(format!(
            "{}: {} clients, at most {} can be authorized",
            dir.display(),
            keys.len(),
            descriptor::MAX_AUTH_CLIENTS
        )));
    }
    Ok(keys)
}

/// Introductions one introduction point takes before the service replaces
/// it (so its replay cache stays bounded).
const MAX_INTRODUCTIONS: usize = 16_384;
/// Rendezvous circuits being built at once (more introductions wait).
const RENDEZVOUS_PARALLEL: usize = 16;
/// Streams queued for the service on one rendezvous circuit.
const INCOMING_QUEUE: usize = 64;
/// How long the service waits for a local server to accept.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rendezvous circuits a service keeps at once (more introductions are
/// dropped).
const MAX_RENDEZVOUS_CIRCUITS: usize = 512;
/// A rendezvous circuit with no stream for this long is closed (longer
/// than a client keeps using one, `max_circuit_dirtiness_secs`).
const IDLE_CLOSE: Duration = Duration::from_secs(15 * 60);
/// Descriptors are filed again this often even when nothing changed.
const REPUBLISH: Duration = Duration::from_secs(600);
/// How long a relay whose introduction point was given up is passed over
/// for a new one.
const INTRO_SHUNNED: Duration = Duration::from_secs(600);
/// At most one warning this often for introduction points that could not
/// be made (the rest at DEBUG).
const INTRO_WARN_EVERY: Duration = Duration::from_secs(60);
/// New circuits tried, over a point's life, on the same relay with the
/// same keys after its circuit closed, before the point is replaced (Tor's
/// `MAX_INTRO_POINT_CIRCUIT_RETRIES`): a guard or a middle that died
/// leaves the point and the descriptor that lists it as they were.
const INTRO_REBUILDS: u8 = 3;

/// Introductions waiting for a turn, at most (past it the one that paid
/// least is dropped).
const MAX_WAITING: usize = 1024;
/// The suggested effort is reviewed this often (Tor's
/// `HS_UPDATE_PERIOD`): a change files the descriptor again.
const POW_UPDATE: Duration = Duration::from_secs(300);
/// The puzzle's seed changes this often (the previous one still counts),
/// so solutions cannot be made long before they are used.
const SEED_LIFETIME: Duration = Duration::from_secs(3 * 3600);

/// The service's puzzle: its seeds and the effort it suggests.
struct PowState {
    seed: [u8; 32],
    previous: Option<[u8; 32]>,
    seeded: Instant,
    control: EffortControl,
    reviewed: Instant,
}

impl PowState {
    fn new(floor: u32) -> Self {
        PowState {
            seed: rand::random(),
            previous: None,
            seeded: Instant::now(),
            control: EffortControl::new(floor),
            reviewed: Instant::now(),
        }
    }

    /// What the descriptor says now, after a new seed or a review of the
    /// effort if one is due.
    fn params(&mut self, turns: &Turns) -> PowParams {
        if self.seeded.elapsed() >= SEED_LIFETIME {
            self.previous = Some(self.seed);
            self.seed = rand::random();
            self.seeded = Instant::now();
        }
        if self.reviewed.elapsed() >= POW_UPDATE {
            let (dropped, waiting, mean) = turns.review();
            let before = self.control.suggested;
            let now = self.control.update(dropped, waiting, mean);
            turns.lock().counted_from = now;
            if now != before {
                info!(
                    dropped,
                    waiting, "introductions now asked for effort {now} (was {before})"
                );
            }
            self.reviewed = Instant::now();
        }
        PowParams {
            seed: self.seed,
            effort: self.control.suggested,
        }
    }

    /// What checking a solution needs, copied out of the lock.
    fn checker(&self) -> PowCheck {
        PowCheck {
            seeds: [Some(self.seed), self.previous],
            floor: self.control.floor,
        }
    }
}

/// The service's seeds and floor, to check a solution against.
#[derive(Clone, Copy)]
struct PowCheck {
    seeds: [Option<[u8; 32]>; 2],
    floor: u32,
}

impl PowCheck {
    /// What can be told without hashing: no solution needed (`None`),
    /// the seed to check one against, or why it is dropped.
    fn precheck(&self, pow: Option<Pow>) -> Result<Option<([u8; 32], Pow)>, &'static str> {
        let Some(pow) = pow else {
            return if self.floor == 0 {
                Ok(None)
            } else {
                Err("an introduction without the effort the service requires")
            };
        };
        if pow.effort < self.floor {
            return Err("an introduction with less effort than the service requires");
        }
        let seed = self
            .seeds
            .into_iter()
            .flatten()
            .find(|s| s[..4] == pow.seed_head)
            .ok_or("a puzzle solution for a seed the service does not have")?;
        Ok(Some((seed, pow)))
    }
}

/// Turns to build rendezvous circuits: `free` at a time, then given to
/// the waiting introduction that paid the most effort (the oldest among
/// equals). At most `max_waiting` wait; past that the one that paid
/// least is dropped.
struct Turns {
    state: Mutex<TurnState>,
    max_waiting: usize,
}

impl TurnState {
    fn drop_of(&mut self, effort: u32) {
        if effort >= self.counted_from {
            self.dropped += 1;
        }
    }
}

#[derive(Default)]
struct TurnState {
    free: usize,
    seq: u64,
    waiting: std::collections::BTreeMap<(u32, std::cmp::Reverse<u64>), oneshot::Sender<Turn>>,
    /// Since the last review: introductions dropped that paid at least
    /// `counted_from` (the effort suggested), and those served with the
    /// sum of their efforts.
    counted_from: u32,
    dropped: u64,
    served: u64,
    served_effort: u64,
}

/// A turn: handed to the next waiting introduction when dropped (also
/// when it is dropped unreceived, as its waiter gives up).
struct Turn(Option<Arc<Turns>>);

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.release();
        }
    }
}

impl Turns {
    fn new(parallel: usize, max_waiting: usize) -> Arc<Self> {
        Arc::new(Turns {
            state: Mutex::new(TurnState {
                free: parallel,
                ..TurnState::default()
            }),
            max_waiting,
        })
    }

    fn release(self: &Arc<Self>) {
        let mut st = self.lock();
        while let Some(((effort, _), tx)) = st.waiting.pop_last() {
            match tx.send(Turn(Some(self.clone()))) {
                Ok(()) => {
                    st.served += 1;
                    st.served_effort += u64::from(effort);
                    return;
                }
                // Its waiter is gone: the turn goes to the next.
                Err(mut t) => t.0 = None,
            }
        }
        st.free += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TurnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a turn, with `effort` paid; `None` if dropped for one that
    /// paid more.
    async fn wait(self: &Arc<Self>, effort: u32) -> Option<Turn> {
        let rx = {
            let mut st = self.lock();
            if st.free > 0 && st.waiting.is_empty() {
                st.free -= 1;
                st.served += 1;
                st.served_effort += u64::from(effort);
                return Some(Turn(Some(self.clone())));
            }
            if st.waiting.len() >= self.max_waiting {
                st.waiting.retain(|_, tx| !tx.is_closed());
            }
            if st.waiting.len() >= self.max_waiting {
                match st.waiting.first_key_value() {
                    Some((&(least, _), _)) if least < effort => {
                        st.waiting.pop_first();
                        st.drop_of(least);
                    }
                    _ => {
                        st.drop_of(effort);
                        return None;
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            st.seq += 1;
            let key = (effort, std::cmp::Reverse(st.seq));
            st.waiting.insert(key, tx);
            rx
        };
        rx.await.ok()
    }

    /// Count an introduction of `effort` that gave up waiting.
    fn gave_up(&self, effort: u32) {
        self.lock().drop_of(effort);
    }

    /// Would an introduction of `effort` get a place (so that checking
    /// its solution is worth the work)?
    fn would_admit(&self, effort: u32) -> bool {
        let st = self.lock();
        st.free > 0
            || st.waiting.len() < self.max_waiting
            || st
                .waiting
                .first_key_value()
                .is_some_and(|(&(least, _), _)| least < effort)
    }

    /// Since the last review: introductions dropped, waiting now, and
    /// the mean effort of those served.
    fn review(&self) -> (u64, usize, u32) {
        let mut st = self.lock();
        let waiting = st.waiting.values().filter(|tx| !tx.is_closed()).count();
        let mean = st
            .served_effort
            .checked_div(st.served)
            .map_or(0, |m| m.min(u64::from(u32::MAX)) as u32);
        let dropped = std::mem::take(&mut st.dropped);
        st.served = 0;
        st.served_effort = 0;
        (dropped, waiting, mean)
    }
}

/// What an introduction point's circuit needs to answer introductions.
struct IntroKeys {
    auth: SigningKey,
    auth_key: [u8; 32],
    enc: OnionSecret,
    /// Clients' ephemeral keys seen: an introduction is taken once.
    seen: Mutex<HashSet<[u8; 32]>>,
    /// The point took its share of introductions: replace it.
    retired: AtomicBool,
}

struct IntroState {
    relay: [u8; 32],
    nickname: String,
    keys: Arc<IntroKeys>,
    circ: CircuitHandle,
    /// New circuits tried for this point after one closed.
    rebuilt: u8,
}

/// The service as its tasks share it.
struct Shared {
    client: Client,
    address: ServiceAddress,
    ports: Vec<PortMap>,
    /// Turns to build rendezvous circuits, by effort.
    turns: Arc<Turns>,
    /// The puzzle, if the service has one.
    pow: Option<Mutex<PowState>>,
    /// Solutions being checked now (one per core at most).
    checking: tokio::sync::Semaphore,
    /// Rendezvous circuits open now.
    live: std::sync::atomic::AtomicUsize,
}

/// What the service last filed: the introduction points' keys, the
/// period, whether the next period's descriptor went too, when, and the
/// puzzle.
#[derive(Clone, Debug, PartialEq)]
struct Filed {
    keys: Vec<[u8; 32]>,
    period: TimePeriod,
    with_next: bool,
    at: Instant,
    pow: Option<PowParams>,
}

impl Filed {
    /// Are the descriptors due again? `now` is what would be filed now:
    /// the period and puzzle of this moment (its `at` unused), `with_next`
    /// whether the next period's shared random value is known. A client
    /// whose clock is in the next period asks for that period's
    /// descriptor as soon as it begins, so it is filed as soon as it can
    /// be (halfway through this period), not when this one ends.
    fn due(last: Option<&Filed>, now: &Filed) -> bool {
        if now.keys.is_empty() {
            return false;
        }
        let Some(f) = last else { return true };
        f.keys != now.keys
            || f.period != now.period
            || (now.with_next && !f.with_next)
            || f.pow != now.pow
            || f.at.elapsed() >= REPUBLISH
    }
}

/// Run the service `cfg` inside `client` until the client stops.
pub async fn run(client: Client, cfg: ServiceConfig) -> Result<(), ClientError> {
    cfg.check()?;
    let (identity, address) = load_identity(&client.config().data_dir, &cfg)?;
    let authorized = load_authorized(&client.config().data_dir, &cfg)?;
    if authorized.is_empty() {
        info!(%address, "onion service starting");
    } else {
        info!(
            %address,
            "onion service starting, for {} authorized clients only",
            authorized.len()
        );
    }
    client.wait_bootstrapped().await;
    let shared = Arc::new(Shared {
        client: client.clone(),
        address,
        ports: cfg.ports.clone(),
        turns: Turns::new(RENDEZVOUS_PARALLEL, MAX_WAITING),
        pow: cfg
            .pow_defense
            .then(|| Mutex::new(PowState::new(cfg.pow_min_effort))),
        checking: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
        live: Default::default(),
    });
    let mut intros: Vec<IntroState> = Vec::new();
    let mut published: Option<Filed> = None;
    let mut reachable = false;
    // Relays whose introduction point was given up or could not be made,
    // and when: not chosen again for a while (one that died stays listed
    // until the authorities notice).
    let mut failed: Vec<([u8; 32], Instant)> = Vec::new();
    // When an introduction point that could not be made was last logged
    // as a warning: a network with too few relays for all of them fails
    // again every second.
    let mut warned: Option<Instant> = None;
    loop {
        failed.retain(|(_, at)| at.elapsed() < INTRO_SHUNNED);
        let before = intros.len();
        let mut k = 0;
        while k < intros.len() {
            let i = &intros[k];
            // (A retired point's circuit closes as its state drops.)
            if i.keys.retired.load(Ordering::Relaxed) {
                intros.remove(k);
                continue;
            }
            if !i.circ.is_closed() {
                k += 1;
                continue;
            }
            match rebuild(&shared, &cfg, i).await {
                Ok(again) => {
                    info!(%address, intro = %again.nickname, "introduction circuit lost; built again");
                    intros[k] = again;
                    k += 1;
                }
                // The service's own side of the path (its guard, a middle)
                // failed, not the point: again at the next look, while
                // rebuilds are left.
                Err(e) if !gives_up(&e, &i.relay) && i.rebuilt + 1 < INTRO_REBUILDS => {
                    debug!(intro = %i.nickname, "introduction circuit not built again yet: {e}");
                    intros[k].rebuilt += 1;
                    k += 1;
                }
                Err(e) => {
                    info!(%address, intro = %i.nickname, "introduction point lost ({e}); replacing it");
                    failed.push((i.relay, Instant::now()));
                    intros.remove(k);
                }
            }
        }
        let mut failures = 0;
        while intros.len() < cfg.intro_points && failures < 3 {
            match establish(&shared, &cfg, &intros, &mut failed).await {
                Ok(i) => {
                    debug!(intro = %i.nickname, "introduction point established");
                    intros.push(i);
                }
                Err(e) => {
                    failures += 1;
                    if warned.is_none_or(|t| t.elapsed() >= INTRO_WARN_EVERY) {
                        warned = Some(Instant::now());
                        warn!(%address, "introduction point: {e} (more such failures within a minute are logged at DEBUG)");
                    } else {
                        debug!(%address, "introduction point: {e}");
                    }
                }
            }
        }
        if intros.len() != before || published.is_none() {
            info!(
                %address,
                "introduction points established: {} of {}",
                intros.len(),
                cfg.intro_points
            );
        }
        let keys: Vec<[u8; 32]> = intros.iter().map(|i| i.keys.auth_key).collect();
        let pow = shared.pow.as_ref().map(|p| {
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .params(&shared.turns)
        });
        if let Some(c) = client.consensus() {
            let period = c.period_at(unix_now());
            let now = Filed {
                keys,
                period,
                // The next period's descriptor once the consensus has its
                // shared random value (from halfway through this one).
                with_next: c.shared_random_for(period.next()).is_some(),
                at: Instant::now(),
                pow,
            };
            if Filed::due(published.as_ref(), &now) {
                let info = ServiceInfo {
                    intro_points: intros
                        .iter()
                        .map(|i| IntroPoint {
                            relay: i.relay,
                            auth_key: i.keys.auth_key,
                            enc_key: i.keys.enc.public().0,
                        })
                        .collect(),
                    pow,
                };
                let mut stored = [0, 0];
                let periods = if now.with_next {
                    vec![period, period.next()]
                } else {
                    vec![period]
                };
                for (p, stored) in periods.into_iter().zip(&mut stored) {
                    // Counted from the period before, so that the first
                    // filing (halfway through it) is not 0 and one in the
                    // period's first second still replaces it.
                    let since = p.start().saturating_sub(p.length);
                    let revision = unix_now().saturating_sub(since);
                    let doc = descriptor::build(
                        &identity,
                        p,
                        revision,
                        &info,
                        &authorized,
                        &mut rand::rng(),
                    );
                    match hsdir::publish(&client, &address.blinded(p), p, &doc).await {
                        Ok(r) => {
                            info!(
                                %address,
                                period = p.number,
                                "descriptor uploaded to {} of {} service directories",
                                r.stored,
                                r.responsible
                            );
                            for (dir, why) in &r.failures {
                                debug!(directory = %dir, "descriptor not stored: {why}");
                            }
                            *stored = r.stored;
                        }
                        Err(e) => {
                            warn!(%address, period = p.number, "descriptor not uploaded: {e}")
                        }
                    }
                }
                if stored[0] > 0 {
                    published = Some(Filed {
                        with_next: now.with_next && stored[1] > 0,
                        ..now
                    });
                    if !reachable {
                        reachable = true;
                        info!(%address, "service reachable");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A new introduction point, on a relay none of `have` uses; a relay
/// that fails is added to `failed`.
async fn establish(
    shared: &Arc<Shared>,
    cfg: &ServiceConfig,
    have: &[IntroState],
    failed: &mut Vec<([u8; 32], Instant)>,
) -> Result<IntroState, ClientError> {
    let client = &shared.client;
    let c = client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
    // Not a relay already used; while another is left, not one that
    // failed lately, and then not one of the service's guards.
    let used: Vec<[u8; 32]> = have.iter().map(|i| i.relay).collect();
    let lately: Vec<[u8; 32]> = failed.iter().map(|f| f.0).collect();
    let relay = crate::rendezvous::pick_relay(&c, &used, &[&lately, &client.guards()])
        .ok_or_else(|| ClientError::NoPath("no relay left for an introduction point".into()))?;
    let made = establish_at(shared, cfg, relay.clone(), None).await;
    if made.is_err() {
        failed.push((relay.identity, Instant::now()));
    }
    made
}

/// The point `lost`, whose circuit closed, on a new circuit to the same
/// relay with the same keys; an error if [`INTRO_REBUILDS`] were tried
/// already, if the relay is no longer Running in the consensus, or if the
/// circuit cannot be made.
async fn rebuild(
    shared: &Arc<Shared>,
    cfg: &ServiceConfig,
    lost: &IntroState,
) -> Result<IntroState, ClientError> {
    if lost.rebuilt >= INTRO_REBUILDS {
        return Err(ClientError::Build(format!(
            "its circuit closed {} times",
            INTRO_REBUILDS + 1
        )));
    }
    let relay = shared
        .client
        .consensus()
        .and_then(|c| c.relay(&lost.relay).cloned())
        .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::VALID))
        .ok_or_else(|| ClientError::CannotEndAt {
            relay: lost.relay,
            why: format!("{} is not Running", lost.nickname),
        })?;
    let mut again = establish_at(shared, cfg, relay, Some(lost.keys.clone())).await?;
    again.rebuilt = lost.rebuilt + 1;
    Ok(again)
}

/// Whether `e`, from building a circuit to the introduction point on
/// `relay`, is about that relay: the extend to it failed, or no circuit
/// can end there (it is not Running, or it is the service's guard).
fn gives_up(e: &ClientError, relay: &[u8; 32]) -> bool {
    match e {
        ClientError::ExtendFailed { relay: r, .. } | ClientError::CannotEndAt { relay: r, .. } => {
            r == relay
        }
        _ => false,
    }
}

/// An introduction point on `relay`: with fresh keys, or `keys` again.
async fn establish_at(
    shared: &Arc<Shared>,
    cfg: &ServiceConfig,
    relay: allium_proto::ConsensusRelay,
    keys: Option<Arc<IntroKeys>>,
) -> Result<IntroState, ClientError> {
    let client = &shared.client;
    let circ = client
        .build_circuit(&ExitTarget::Relay(&relay.identity))
        .await?;
    let mut msgs = circ.service_messages().ok_or(ClientError::CircuitClosed)?;
    let keys = keys.unwrap_or_else(|| {
        let auth = SigningKey::generate(&mut rand::rng());
        Arc::new(IntroKeys {
            auth_key: auth.verifying_key().to_bytes(),
            auth,
            enc: OnionSecret::new(StaticSecret::random_from_rng(&mut rand::rng())),
            seen: Mutex::default(),
            retired: AtomicBool::new(false),
        })
    });
    circ.send_service(RelayMsg::EstablishIntro(intro::establish_intro(
        &keys.auth,
        &circ.binding,
        cfg.intro_rate,
        cfg.intro_burst,
    )))
    .await?;
    match tokio::time::timeout(crate::rendezvous::INTRO_TIMEOUT, msgs.recv()).await {
        Ok(Some(RelayMsg::IntroEstablished)) => {}
        Ok(Some(m)) => {
            return Err(ClientError::Build(format!(
                "{} answered ESTABLISH_INTRO with {:?}",
                relay.nickname,
                m.cmd()
            )));
        }
        Ok(None) => return Err(ClientError::CircuitClosed),
        Err(_) => return Err(ClientError::Timeout("ESTABLISH_INTRO")),
    }
    // Introductions, as they come: the task ends with the circuit (or
    // retires it after MAX_INTRODUCTIONS).
    let (sh, k, c2) = (shared.clone(), keys.clone(), circ.clone());
    // (Twice the burst: the point's bucket runs on its own clock, and
    // delays on the way can bunch what it passed on within its rate.)
    let (rate, burst) = (f64::from(cfg.intro_rate), 2.0 * f64::from(cfg.intro_burst));
    let name = relay.nickname.clone();
    tokio::spawn(
        async move {
            let mut taken = 0;
            // The rate the service asked for, held to by the service too:
            // a point that passes on more (hostile, or broken) costs the
            // service no work for the excess, and is replaced once the
            // excess reaches a burst.
            let (mut tokens, mut last, mut excess) = (burst, Instant::now(), 0.0);
            while let Some(m) = msgs.recv().await {
                if let RelayMsg::Introduce2(i) = m {
                    let refill = last.elapsed().as_secs_f64() * rate;
                    tokens = (tokens + refill).min(burst);
                    // Excess of long ago is forgiven at the same rate.
                    excess = (excess - refill).max(0.0);
                    last = Instant::now();
                    if tokens < 1.0 {
                        excess += 1.0;
                        if excess >= burst {
                            warn!(intro = %name, "introduction point passes on more than the rate asked; replacing it");
                            k.retired.store(true, Ordering::Relaxed);
                            break;
                        }
                        continue;
                    }
                    tokens -= 1.0;
                    taken += 1;
                    if taken > MAX_INTRODUCTIONS {
                        k.retired.store(true, Ordering::Relaxed);
                        break;
                    }
                    let (sh, k) = (sh.clone(), k.clone());
                    tokio::spawn(
                        async move {
                            if let Err(e) = introduced(&sh, &k, i).await {
                                debug!("introduction not answered: {e}");
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            // Dropping the last handle closes the circuit; the service's
            // loop sees it closed and replaces it.
            drop(c2);
        }
        .in_current_span(),
    );
    Ok(IntroState {
        relay: relay.identity,
        nickname: relay.nickname,
        keys,
        circ,
        rebuilt: 0,
    })
}

/// The effort an introduction through `auth_key` paid: its solution must
/// verify under one of the service's seeds and meet the service's floor.
/// Checked on a blocking thread, as many at once as the machine has
/// cores; one more is dropped.
async fn check_pow(
    shared: &Shared,
    auth_key: &[u8; 32],
    req: &IntroduceRequest,
    ephemeral: &[u8; 32],
) -> Result<u32, ClientError> {
    let Some(state) = &shared.pow else {
        return Ok(0);
    };
    let refused = |why: &str| ClientError::IntroductionFailed(why.into());
    let check = state.lock().unwrap_or_else(|p| p.into_inner()).checker();
    let Some((seed, pow)) = check.precheck(req.pow).map_err(refused)? else {
        return Ok(0);
    };
    let Ok(_slot) = shared.checking.try_acquire() else {
        return Err(refused(
            "as many puzzle solutions being checked as there are cores",
        ));
    };
    let (auth_key, key) = (*auth_key, *ephemeral);
    let ok = tokio::task::spawn_blocking(move || {
        thread_local!(static SOLVER: std::cell::RefCell<Solver> = std::cell::RefCell::new(Solver::new()));
        SOLVER.with(|s| verify(&mut s.borrow_mut(), &seed, &auth_key, &key, &pow))
    })
    .await
    .unwrap_or(false);
    if ok {
        Ok(pow.effort)
    } else {
        Err(refused("a puzzle solution that does not verify"))
    }
}

/// A client's introduction: check it, then meet the client at its
/// rendezvous point and serve the streams it opens.
async fn introduced(
    shared: &Arc<Shared>,
    keys: &IntroKeys,
    i: Introduce,
) -> Result<(), ClientError> {
    let client = &shared.client;
    let c = client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
    // The client's clock may put it in the period before or after ours.
    let now = c.period_at(unix_now());
    let around = [
        now,
        now.next(),
        TimePeriod {
            number: now.number.saturating_sub(1),
            length: now.length,
        },
    ];
    let opened = around.iter().find_map(|p| {
        let sub = subcredential(shared.address.key(), &shared.address.blinded(*p));
        intro::open(keys.enc.secret(), &keys.auth_key, &sub, &i.encrypted).ok()
    });
    let (req, ephemeral) = opened.ok_or_else(|| {
        ClientError::IntroductionFailed("an introduction that does not decrypt".into())
    })?;
    if !keys
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(ephemeral)
    {
        return Err(ClientError::IntroductionFailed(
            "a replayed introduction".into(),
        ));
    }
    // Cheap checks first, then the puzzle's (one Argon2 attempt).
    let rp = c
        .relay(&req.rp_identity)
        .filter(|r| r.link_key == req.rp_link_key && r.addr == req.rp_addr)
        .ok_or_else(|| {
            ClientError::RendezvousFailed("a rendezvous point not in the consensus as named".into())
        })?
        .clone();
    if shared.live.load(Ordering::Relaxed) >= MAX_RENDEZVOUS_CIRCUITS {
        return Err(ClientError::RendezvousFailed(
            "as many rendezvous circuits as the service keeps".into(),
        ));
    }
    let claimed = req.pow.map_or(0, |p| p.effort);
    if !shared.turns.would_admit(claimed) {
        shared.turns.gave_up(claimed);
        return Err(ClientError::RendezvousFailed(
            "as many introductions waiting, none of which paid less".into(),
        ));
    }
    let effort = check_pow(shared, &keys.auth_key, &req, &ephemeral).await?;
    let secrets = [&keys.enc];
    let (reply, hop_keys, params) = ntor::server(
        &mut rand::rng(),
        &OnionKeys {
            identity: keys.auth_key,
            keys: &secrets,
        },
        &req.onionskin,
    )?;
    // A client waits for the service for so long only.
    let _turn = match tokio::time::timeout(
        crate::rendezvous::RENDEZVOUS_TIMEOUT,
        shared.turns.wait(effort),
    )
    .await
    {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(ClientError::RendezvousFailed(
                "dropped for introductions that paid more effort".into(),
            ));
        }
        Err(_) => {
            shared.turns.gave_up(effort);
            return Err(ClientError::Timeout("a turn to build a rendezvous circuit"));
        }
    };
    let circ = client
        .build_circuit(&ExitTarget::Relay(&rp.identity))
        .await?;
    let (tx, mut rx) = mpsc::channel(INCOMING_QUEUE);
    circ.join_after(
        RelayMsg::Rendezvous1 {
            cookie: req.cookie,
            reply,
        },
        hop_keys.reversed(),
        params,
        Some(tx),
    )
    .await?;
    drop(_turn);
    debug!(rp = %rp.nickname, "joined a client at its rendezvous point");
    let sh = shared.clone();
    sh.live.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(
        async move {
            // Streams being served; the circuit closes once it has had
            // none for IDLE_CLOSE (or when the client closes it).
            let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut idle_since = Instant::now();
            loop {
                tokio::select! {
                    inc = rx.recv() => match inc {
                        Some(inc) => {
                            idle_since = Instant::now();
                            let (sh, active) = (sh.clone(), active.clone());
                            active.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(
                                async move {
                                    serve_stream(sh, inc).await;
                                    active.fetch_sub(1, Ordering::Relaxed);
                                }
                                .in_current_span(),
                            );
                        }
                        None => break,
                    },
                    () = tokio::time::sleep(Duration::from_secs(30)) => {
                        if active.load(Ordering::Relaxed) > 0 {
                            idle_since = Instant::now();
                        } else if idle_since.elapsed() >= IDLE_CLOSE {
                            debug!("closing an idle rendezvous circuit");
                            break;
                        }
                    }
                }
            }
            sh.live.fetch_sub(1, Ordering::Relaxed);
            drop(circ);
        }
        .in_current_span(),
    );
    Ok(())
}

/// Connect a client's stream to the local address its port maps to.
async fn serve_stream(shared: Arc<Shared>, inc: Incoming) {
    let Some(target) = shared
        .ports
        .iter()
        .find(|p| p.virtual_port == inc.port)
        .map(|p| p.target)
    else {
        debug!(
            port = inc.port,
            "a stream to a port the service does not map"
        );
        inc.refuse(EndReason::CONNECT_REFUSED).await;
        return;
    };
    let tcp = match tokio::time::timeout(
        LOCAL_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            warn!(port = inc.port, "local server refused: {e}");
            inc.refuse(EndReason::CONNECT_REFUSED).await;
            return;
        }
        Err(_) => {
            warn!(port = inc.port, "local server timed out");
            inc.refuse(EndReason::TIMEOUT).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    debug!(port = inc.port, "service stream connected");
    match inc.accept().await {
        Ok(stream) => {
            let mut tcp = tcp;
            if let Err(e) = crate::socks::serve_bytes(&mut tcp, stream).await {
                crate::socks::reset(&tcp);
                debug!("service stream: {e}");
            }
        }
        Err(e) => debug!("service stream: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A waiter for a turn with `effort`, reporting when it got one.
    fn waiter(
        turns: &Arc<Turns>,
        effort: u32,
        got: &mpsc::UnboundedSender<u32>,
    ) -> tokio::task::JoinHandle<Option<Turn>> {
        let (turns, got) = (turns.clone(), got.clone());
        tokio::spawn(async move {
            let t = turns.wait(effort).await;
            let _ = got.send(if t.is_some() { effort } else { 0 });
            t
        })
    }

    /// Only a failure about the point's own relay gives the point up: not
    /// a path with no middle (the service's side), nor another relay.
    #[test]
    fn a_point_is_given_up_only_for_its_own_relay() {
        let (point, other) = ([7; 32], [8; 32]);
        let end = |relay| ClientError::CannotEndAt {
            relay,
            why: String::new(),
        };
        let extend = |relay| ClientError::ExtendFailed {
            relay,
            why: String::new(),
        };
        assert!(gives_up(&end(point), &point));
        assert!(gives_up(&extend(point), &point));
        assert!(!gives_up(&end(other), &point));
        assert!(!gives_up(&extend(other), &point));
        assert!(!gives_up(
            &ClientError::NoPath("no middle available".into()),
            &point
        ));
        assert!(!gives_up(&ClientError::CircuitClosed, &point));
    }

    #[test]
    fn the_next_periods_descriptor_is_filed_as_soon_as_it_can_be() {
        let period = TimePeriod::at(1_000_000, 3);
        let filed = Filed {
            keys: vec![[1; 32]],
            period,
            with_next: false,
            at: Instant::now(),
            pow: None,
        };
        let same = filed.clone();
        assert!(Filed::due(None, &same));
        assert!(!Filed::due(Some(&filed), &same));
        // Halfway through the period the next one's value is known: due,
        // though nothing else changed; once filed with it, not again.
        let next_known = Filed {
            with_next: true,
            ..filed.clone()
        };
        assert!(Filed::due(Some(&filed), &next_known));
        assert!(!Filed::due(Some(&next_known), &next_known));
        assert!(!Filed::due(Some(&next_known), &same));
        // A new period, new introduction points: due; no points: never.
        let later = Filed {
            period: period.next(),
            ..filed.clone()
        };
        assert!(Filed::due(Some(&next_known), &later));
        let moved = Filed {
            keys: vec![[2; 32]],
            ..filed.clone()
        };
        assert!(Filed::due(Some(&filed), &moved));
        let none = Filed {
            keys: vec![],
            ..filed.clone()
        };
        assert!(!Filed::due(None, &none));
    }

    #[tokio::test]
    async fn turns_go_to_the_most_effort_and_a_full_queue_drops_the_least() {
        let turns = Turns::new(1, 3);
        let (tx, mut got) = mpsc::unbounded_channel();
        let first = turns.wait(0).await.expect("a free turn");
        let low = waiter(&turns, 1, &tx);
        tokio::task::yield_now().await;
        let mid = waiter(&turns, 5, &tx);
        tokio::task::yield_now().await;
        let mid2 = waiter(&turns, 5, &tx);
        tokio::task::yield_now().await;
        // The queue is full: one that paid more takes the place of the
        // least (which is told at once), one that paid less is refused.
        let high = waiter(&turns, 9, &tx);
        assert_eq!(got.recv().await, Some(0));
        assert!(low.await.unwrap().is_none());
        assert!(turns.wait(2).await.is_none());
        // Each released turn goes to the highest effort, then the oldest.
        drop(first);
        assert_eq!(got.recv().await, Some(9));
        drop(high.await.unwrap());
        assert_eq!(got.recv().await, Some(5));
        let t = mid.await.unwrap().expect("the older of the two");
        // One that gives up waiting passes its turn on.
        mid2.abort();
        let _ = mid2.await;
        drop(t);
        let again = turns.wait(3).await.expect("a free turn again");
        let (dropped, waiting, mean) = turns.review();
        assert_eq!((dropped, waiting), (2, 0));
        // Served: the first (0), then 9, 5 and 3.
        assert_eq!(mean, 17 / 4, "mean effort of those served");
        drop(again);
        assert_eq!(turns.lock().free, 1);
    }

    #[test]
    fn a_solution_counts_under_either_seed_and_at_its_own_point_only() {
        use allium_proto::service::pow::verify;
        let mut state = PowState::new(4);
        let (point, key) = ([2; 32], [3; 32]);
        let mut solver = Solver::new();
        let solve = |solver: &mut Solver, seed: [u8; 32], effort| {
            solver
                .solve(&seed, &point, &key, effort, &mut rand::rng(), 1 << 14)
                .unwrap()
        };
        let old = state.seed;
        let early = solve(&mut solver, old, 4);
        // A new seed: solutions for the previous one still count.
        state.seeded = Instant::now() - SEED_LIFETIME;
        let turns = Turns::new(1, 8);
        let params = state.params(&turns);
        assert_ne!(params.seed, old);
        assert_eq!(params.effort, 4, "the floor");
        let check = state.checker();
        let (seed, pow) = check.precheck(Some(early)).unwrap().unwrap();
        assert_eq!(seed, old);
        assert!(verify(&mut solver, &seed, &point, &key, &pow));
        // Not at another introduction point.
        // Not at another introduction point: its hash differs (and meets
        // the bar only by chance).
        let here = solver.hash(&seed, &point, &key, pow.effort, &pow.nonce);
        let there = solver.hash(&seed, &[9; 32], &key, pow.effort, &pow.nonce);
        assert_ne!(here, there);
        assert_eq!(
            verify(&mut solver, &seed, &[9; 32], &key, &pow),
            allium_proto::service::pow::meets(&there, pow.effort)
        );
        // Less than the floor, none at all, or a seed never used: dropped
        // before any hashing.
        let cheap = solve(&mut solver, params.seed, 2);
        assert!(check.precheck(Some(cheap)).is_err());
        assert!(check.precheck(None).is_err());
        let stranger = solve(&mut solver, [0xee; 32], 4);
        assert!(check.precheck(Some(stranger)).is_err());
        // With no floor, an introduction may pay nothing.
        let open = PowState::new(0).checker();
        assert_eq!(open.precheck(None), Ok(None));
        // After another rotation the first seed is gone.
        state.seeded = Instant::now() - SEED_LIFETIME;
        state.params(&turns);
        assert!(state.checker().precheck(Some(early)).is_err());
    }

    #[tokio::test]
    async fn a_turn_dropped_unreceived_goes_to_the_next() {
        let turns = Turns::new(1, 8);
        let (tx, mut got) = mpsc::unbounded_channel();
        let first = turns.wait(0).await.unwrap();
        let a = waiter(&turns, 7, &tx);
        tokio::task::yield_now().await;
        let b = waiter(&turns, 1, &tx);
        tokio::task::yield_now().await;
        // The turn is sent to `a`, which is cancelled before it runs.
        drop(first);
        a.abort();
        let _ = a.await;
        assert_eq!(got.recv().await, Some(1));
        drop(b.await.unwrap());
        assert_eq!(turns.lock().free, 1);
    }
}
