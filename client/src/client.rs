//! The client: consensus, channels to guards, a pool of circuits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_directory::{http, unix_now, unix_now_ms};
use allium_link::channel::{self, ChannelHandle};
use allium_proto::relaymsg::TargetAddr;
use allium_proto::service::ServiceAddress;
use allium_proto::socks::SocksAuth;
use allium_proto::{AuthorityKey, Consensus, ConsensusRelay, RelayFlags, RelayId};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, warn};

use crate::circuit::{self, BuildFailure, CircuitHandle, Stream};
use crate::events::{Events, StreamWatch, build_failure_reason, stream_failure_reason};
use crate::guards::GuardSet;
use crate::path::{self, ExitTarget};
use crate::vanguards::Vanguards;
use crate::{ClientConfig, ClientError, dir};
use allium_proto::relaymsg::EndReason;

/// Streams with different isolation never share a circuit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Isolation {
    /// Which SOCKS listener the stream came from.
    pub listener: usize,
    pub auth: SocksAuth,
}

struct PooledCircuit {
    circ: CircuitHandle,
    /// Bound to the isolation of its first stream; `None` until then.
    isolation: Option<Isolation>,
    first_used: Option<Instant>,
}

struct Inner {
    cfg: ClientConfig,
    keys: Vec<AuthorityKey>,
    consensus: watch::Sender<Option<Arc<Consensus>>>,
    guard_channels: tokio::sync::Mutex<HashMap<[u8; 32], ChannelHandle>>,
    pool: Mutex<Vec<PooledCircuit>>,
    ready: watch::Sender<bool>,
    /// [`Client::bootstrap`] is running: requests wait for it.
    bootstrapping: AtomicBool,
    /// How far bootstrap has come: a [`Phase`] as its percentage.
    phase: AtomicU8,
    guards: Mutex<GuardSet>,
    /// The restricted middles of onion-service circuits.
    vanguards: Mutex<Vanguards>,
    cbt: Mutex<BuildTimes>,
    stats: Arc<ClientStats>,
    events: Arc<Events>,
    /// `max_circuit_dirtiness_secs`, as a controller may have changed it.
    dirtiness_secs: AtomicU64,
    /// Counts NEWNYM signals: a circuit built for a stream of an earlier
    /// generation is not pooled for later streams.
    generation: AtomicU64,
    started: Instant,
    /// Guards whose caches served what did not verify, until when (Unix
    /// seconds).
    bad_caches: Mutex<HashMap<[u8; 32], u64>>,
    /// Circuits to onion services, by address and isolation.
    services: Mutex<HashMap<(ServiceAddress, Isolation), ServiceSlot>>,
}

/// The circuit to one service and when it was built, built by one stream
/// at a time.
type ServiceSlot = Arc<tokio::sync::Mutex<Option<(CircuitHandle, Instant)>>>;

/// Counters a client keeps (totals only).
#[derive(Default, Debug)]
pub struct ClientStats {
    pub circuits_built: AtomicU64,
    pub circuit_build_failures: AtomicU64,
    pub streams_opened: AtomicU64,
    pub stream_failures: AtomicU64,
    /// Consensuses fetched (new or not) from authorities, from fallback
    /// directories and from guards' caches.
    pub consensus_from_authorities: AtomicU64,
    pub consensus_from_fallbacks: AtomicU64,
    pub consensus_from_caches: AtomicU64,
    /// Caches that served what did not verify.
    pub caches_avoided: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Recent circuit build times, for a learned build timeout.
pub struct BuildTimes {
    samples: std::collections::VecDeque<Duration>,
    default: Duration,
    floor: Duration,
}

impl BuildTimes {
    const KEEP: usize = 100;
    const MIN_SAMPLES: usize = 10;

    pub fn new(default: Duration, floor: Duration) -> Self {
        BuildTimes {
            samples: Default::default(),
            default,
            floor,
        }
    }

    pub fn record(&mut self, d: Duration) {
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(d);
    }

    /// Twice the 0.8 quantile of recent builds (at least the floor, at most
    /// the default), or the default before there are enough samples.
    pub fn timeout(&self) -> Duration {
        if self.samples.len() < Self::MIN_SAMPLES {
            return self.default;
        }
        let mut v: Vec<Duration> = self.samples.iter().copied().collect();
        v.sort();
        let q = v[(v.len() * 8 / 10).min(v.len() - 1)];
        (q * 2).clamp(self.floor, self.default)
    }
}

/// A client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Attempts at building one circuit, and the pause after the first failed
/// one (doubling after each): about 8 s in all, long enough for the
/// authorities to notice a relay that died (a stream waits for a circuit
/// rather than failing at the first bad path, as Tor's do). A build that
/// can end at another relay stops sooner ([`Client::build_circuit_or_move_on`]).
const BUILD_ATTEMPTS: usize = 6;
const BUILD_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Bootstrap phases, named as Tor's `Bootstrapped N% (tag)`: the value is
/// the percentage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    /// A consensus verified, with too few relays for a path yet.
    RequestingStatus = 25,
    /// A consensus verified with enough relays (fetched or cached).
    EnoughDirinfo = 50,
    /// A circuit is built: streams can be carried.
    Done = 100,
}

impl Phase {
    pub fn tag(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::RequestingStatus => "requesting_status",
            Phase::EnoughDirinfo => "enough_dirinfo",
            Phase::Done => "done",
        }
    }

    /// What Tor says of the phase (its bootstrap summaries).
    pub fn summary(self) -> &'static str {
        match self {
            Phase::Starting => "Starting",
            Phase::RequestingStatus => "Asking for networkstatus consensus",
            Phase::EnoughDirinfo => "Loaded enough directory info to build circuits",
            Phase::Done => "Done",
        }
    }

    fn from_percent(p: u8) -> Phase {
        match p {
            100 => Phase::Done,
            50 => Phase::EnoughDirinfo,
            25 => Phase::RequestingStatus,
            _ => Phase::Starting,
        }
    }
}

impl Client {
    /// How far bootstrap has come.
    pub fn bootstrap_phase(&self) -> Phase {
        Phase::from_percent(self.inner.phase.load(Ordering::Relaxed))
    }

    /// Enter `phase` (never going back) and say so.
    fn reached(&self, phase: Phase, what: &str, relays: Option<usize>) {
        let before = self.inner.phase.fetch_max(phase as u8, Ordering::Relaxed);
        if before < phase as u8 {
            let ev = &self.inner.events;
            ev.status(allium_proto::control::bootstrap_status(
                phase as u8,
                phase.tag(),
                phase.summary(),
            ));
            if phase == Phase::Done {
                ev.status("NOTICE CIRCUIT_ESTABLISHED".into());
            }
            match relays {
                Some(n) => info!(
                    relays = n,
                    "Bootstrapped {}% ({}): {what}",
                    phase as u8,
                    phase.tag()
                ),
                None => info!("Bootstrapped {}% ({}): {what}", phase as u8, phase.tag()),
            }
        }
    }

    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        cfg.check()?;
        allium_link::safelog::set_unsafe_logging(cfg.unsafe_logging);
        let keys = allium_directory::authority_keys(&cfg.authorities)?;
        let cached = dir::load_cached(&cfg.data_dir, &keys);
        let (consensus, _) = watch::channel(cached);
        let (ready, _) = watch::channel(false);
        let vanguards = Vanguards::load(cfg.data_dir.join("vanguards"));
        let guards = GuardSet::load(
            cfg.data_dir.join("guards"),
            cfg.guard_sample_size,
            cfg.guard_lifetime_secs,
            Duration::from_secs(cfg.guard_retry_secs),
        );
        let cbt = BuildTimes::new(
            Duration::from_secs(cfg.circuit_build_timeout_secs),
            Duration::from_millis(cfg.circuit_build_timeout_min_ms),
        );
        let dirtiness_secs = AtomicU64::new(cfg.max_circuit_dirtiness_secs);
        let client = Client {
            inner: Arc::new(Inner {
                cfg,
                keys,
                consensus,
                guard_channels: tokio::sync::Mutex::new(HashMap::new()),
                pool: Mutex::new(Vec::new()),
                ready,
                bootstrapping: AtomicBool::new(false),
                phase: AtomicU8::new(Phase::Starting as u8),
                guards: Mutex::new(guards),
                vanguards: Mutex::new(vanguards),
                cbt: Mutex::new(cbt),
                stats: Arc::new(ClientStats::default()),
                events: Arc::default(),
                dirtiness_secs,
                generation: AtomicU64::new(0),
                started: Instant::now(),
                bad_caches: Mutex::default(),
                services: Mutex::default(),
            }),
        };
        if let Some(c) = client.consensus() {
            client.reached(
                Phase::EnoughDirinfo,
                "using the cached consensus",
                Some(c.relays.len()),
            );
        }
        Ok(client)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// Fetch and verify a consensus once, install it and cache it on disk.
    pub async fn refresh_consensus(&self) -> Result<Arc<Consensus>, ClientError> {
        // The consensus held, as cached, is the base of a diff.
        let path = dir::cache_path(&self.inner.cfg.data_dir);
        let held = self.consensus();
        let (base, cached) = match &held {
            Some(held) => {
                let base = tokio::fs::read(&path).await.ok();
                let cached = self.fetch_from_caches(held, base.as_deref()).await;
                (base, cached)
            }
            None => (None, None),
        };
        // Still bootstrapping (nothing held that gives a circuit): an
        // answer that brings nothing newer sends it on to the next kind of
        // source, down to the authorities, which have the next consensus
        // first; the first such answer is kept in case none has one.
        let bootstrapping = held.as_deref().is_none_or(|c| !usable(c));
        let enough = |got: &(Arc<Consensus>, bytes::Bytes)| {
            !bootstrapping
                || held
                    .as_ref()
                    .is_none_or(|h| h.valid_after < got.0.valid_after)
        };
        let stats = &self.inner.stats;
        let mut stale = None;
        let from_caches = match cached {
            Some(got) if enough(&got) => Some(got),
            got => {
                stale = got.map(|g| (g, &stats.consensus_from_caches));
                None
            }
        };
        let found = match from_caches {
            Some(got) => Some((got, &stats.consensus_from_caches)),
            None => {
                let fallbacks = &self.inner.cfg.fallback_dirs;
                match dir::fetch_from_fallbacks(fallbacks, &self.inner.keys, base.as_deref()).await
                {
                    Some(got) if enough(&got) => Some((got, &stats.consensus_from_fallbacks)),
                    got => {
                        stale = stale.or(got.map(|g| (g, &stats.consensus_from_fallbacks)));
                        None
                    }
                }
            }
        };
        let ((c, bytes), source) = match found {
            Some(got) => got,
            None => {
                let got = dir::fetch_consensus(
                    &self.inner.cfg.authorities,
                    &self.inner.keys,
                    base.as_deref(),
                )
                .await;
                match (got, stale) {
                    (Ok(got), _) => (got, &stats.consensus_from_authorities),
                    (Err(e), Some(stale)) => {
                        debug!("no newer consensus from the authorities either: {e}");
                        stale
                    }
                    (Err(e), None) => return Err(e),
                }
            }
        };
        inc(source);
        let newer = self
            .consensus()
            .is_none_or(|old| old.valid_after < c.valid_after);
        if newer {
            if let Err(e) = allium_directory::store::write_atomic(&path, &bytes, 0o644) {
                warn!("caching the consensus: {e}");
            }
            self.inner.consensus.send_replace(Some(c.clone()));
        }
        Ok(c)
    }

    /// A consensus from the directory caches of the usable guards, asked in
    /// order (at most [`dir::CACHES_TRIED`], none that misbehaved lately),
    /// each over a one-hop circuit; `None` if none gave one.
    async fn fetch_from_caches(
        &self,
        held: &Consensus,
        base: Option<&[u8]>,
    ) -> Option<(Arc<Consensus>, bytes::Bytes)> {
        let now = unix_now();
        let caches: Vec<ConsensusRelay> = {
            let mut g = lock(&self.inner.guards);
            g.update(held, now);
            let usable = g.usable(held);
            let mut bad = lock(&self.inner.bad_caches);
            bad.retain(|_, until| *until > now);
            usable
                .into_iter()
                .filter(|r| !bad.contains_key(&r.identity))
                .take(dir::CACHES_TRIED)
                .collect()
        };
        for guard in caches {
            let name = guard.nickname.clone();
            let circ = match self.one_hop(&guard).await {
                Ok(c) => c,
                Err(e) => {
                    debug!(guard = %name, "no circuit to the directory cache: {e}");
                    continue;
                }
            };
            match dir::fetch_from_cache(&circ, &name, &self.inner.keys, held, base).await {
                Ok(got) => {
                    debug!(guard = %name, "consensus fetched from a directory cache");
                    return Some(got);
                }
                Err(dir::CacheFailure::Unavailable(e)) => {
                    debug!(guard = %name, "directory cache unavailable: {e}");
                }
                Err(dir::CacheFailure::Misbehaved(why)) => {
                    warn!(guard = %name, "directory cache avoided for an hour: {why}");
                    inc(&self.inner.stats.caches_avoided);
                    lock(&self.inner.bad_caches).insert(guard.identity, now + dir::BAD_CACHE_SECS);
                }
            }
        }
        None
    }

    /// A one-hop circuit to `guard`, for directory requests.
    async fn one_hop(&self, guard: &ConsensusRelay) -> Result<CircuitHandle, ClientError> {
        let chan = self.guard_channel(guard).await?;
        let timeout = lock(&self.inner.cbt).timeout();
        let ctl = self.inner.events.launch();
        let params = self.inner.cfg.circ_params();
        match circuit::build(chan, vec![guard.clone()], timeout, params, ctl.clone()).await {
            Ok(c) => Ok(c),
            Err(f) => {
                ctl.failed(&[], build_failure_reason(&f.error));
                Err(f.error)
            }
        }
    }

    /// The current consensus, if it is still valid.
    pub fn consensus(&self) -> Option<Arc<Consensus>> {
        self.inner
            .consensus
            .borrow()
            .clone()
            .filter(|c| unix_now() <= c.valid_until)
    }

    /// Keep the consensus fresh forever: refetch in the period after
    /// fresh-until ([`next_fetch`]), back off on failure ([`http::retry_wait`]),
    /// keep a still-valid one meanwhile.
    pub async fn consensus_loop(self) {
        let mut announced = false;
        let mut stale = 0;
        let mut missing = 0u32;
        loop {
            let held = self.consensus().map(|c| c.valid_after);
            let wait = match self.refresh_consensus().await {
                Ok(c) => {
                    missing = 0;
                    // Only answers that bring nothing new count as stale.
                    if held.is_none_or(|va| c.valid_after > va) {
                        stale = 0;
                    }
                    if usable(&c) {
                        self.reached(
                            Phase::EnoughDirinfo,
                            "consensus verified",
                            Some(c.relays.len()),
                        );
                        announced = true;
                    } else {
                        self.reached(
                            Phase::RequestingStatus,
                            "consensus verified, too few relays yet",
                            Some(c.relays.len()),
                        );
                    }
                    let wait;
                    (wait, stale) = next_fetch(&c, unix_now_ms(), stale, rand::random());
                    wait
                }
                Err(e) => {
                    // Waiting at start is normal; losing the one held is not.
                    if self.consensus().is_none() {
                        if announced {
                            warn!("no valid consensus: {e}");
                        } else {
                            info!("waiting for a consensus: {e}");
                        }
                    }
                    missing = missing.saturating_add(1);
                    let have = self.consensus().is_some();
                    match &e {
                        ClientError::Dir(e) => http::retry_wait(e, missing, have, rand::random()),
                        _ => Duration::from_secs(http::retry_after(missing, have, rand::random())),
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn guard_channel(&self, guard: &ConsensusRelay) -> Result<ChannelHandle, ClientError> {
        let mut g = self.inner.guard_channels.lock().await;
        if let Some(h) = g.get(&guard.identity).filter(|h| !h.is_closed()) {
            return Ok(h.clone());
        }
        let h = channel::connect_nk(guard.addr, &RelayId(guard.identity), &guard.link_key).await?;
        g.insert(guard.identity, h.clone());
        Ok(h)
    }

    /// Build a fresh circuit to an exit allowing `target`.
    pub async fn build_circuit(
        &self,
        target: &ExitTarget<'_>,
    ) -> Result<CircuitHandle, ClientError> {
        self.build_circuit_avoiding(target, &[]).await
    }

    /// Build a fresh circuit whose exit is none of `avoid_exits`.
    pub async fn build_circuit_avoiding(
        &self,
        target: &ExitTarget<'_>,
        avoid_exits: &[[u8; 32]],
    ) -> Result<CircuitHandle, ClientError> {
        self.build(target, avoid_exits, false).await
    }

    /// A fresh circuit ending at `relay`, for a caller that can end at
    /// another relay instead (an onion service's directory, introduction
    /// or rendezvous point of the client's choosing): given up at once
    /// when every path left goes through a relay that failed this build.
    /// In a small network an onion-service circuit's restricted middles
    /// may leave one that fits; waiting for the consensus to drop it took
    /// the retries' 8 s.
    pub(crate) async fn build_circuit_or_move_on(
        &self,
        relay: &[u8; 32],
    ) -> Result<CircuitHandle, ClientError> {
        self.build(&ExitTarget::Relay(relay), &[], true).await
    }

    async fn build(
        &self,
        target: &ExitTarget<'_>,
        avoid_exits: &[[u8; 32]],
        move_on: bool,
    ) -> Result<CircuitHandle, ClientError> {
        let mut last = None;
        let mut named = Vec::new();
        // The last extend failure, which ends a `move_on` build whose
        // every path left meets a relay that failed.
        let mut cornered = None;
        for attempt in 0..BUILD_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(BUILD_RETRY_PAUSE * (1 << (attempt - 1))).await;
            }
            // The latest consensus: a relay that died may have left it.
            let c = self
                .consensus()
                .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
            let (usable, unreachable) = {
                let mut g = lock(&self.inner.guards);
                g.update(&c, unix_now());
                (g.usable(&c), g.unreachable())
            };
            // Circuits to a chosen relay (onion services') go through the
            // restricted middles.
            let layer2 = if matches!(target, ExitTarget::Relay(_)) {
                let mut v = lock(&self.inner.vanguards);
                v.update(&mut rand::rng(), &c, unix_now(), &unreachable);
                v.ids()
            } else {
                Vec::new()
            };
            let (guard, p, avoids) = guard_and_path(
                &mut rand::rng(),
                &c,
                target,
                &usable,
                avoid_exits,
                &named,
                &layer2,
            )?;
            if move_on
                && !avoids
                && let Some(e) = cornered.take()
            {
                debug!("every path to the relay chosen meets one that failed: {e}");
                return Err(e);
            }
            let ctl = self.inner.events.launch();
            let chan = match self.guard_channel(&guard).await {
                Ok(ch) => ch,
                Err(e) => {
                    warn!(guard = %guard.nickname, "cannot reach guard: {e}");
                    lock(&self.inner.guards).failed(&guard.identity);
                    ctl.failed(&[], "CONNECTFAILED");
                    last = Some(e);
                    continue;
                }
            };
            let timeout = lock(&self.inner.cbt).timeout();
            let started = Instant::now();
            let params = self.inner.cfg.circ_params();
            match circuit::build(chan, p.to_vec(), timeout, params, ctl.clone()).await {
                Ok(circ) => {
                    inc(&self.inner.stats.circuits_built);
                    learn(
                        &mut lock(&self.inner.guards),
                        &guard.identity,
                        p.len(),
                        None,
                    );
                    lock(&self.inner.cbt).record(started.elapsed());
                    return Ok(circ);
                }
                Err(f) => {
                    inc(&self.inner.stats.circuit_build_failures);
                    ctl.failed(&p[..f.hops.min(p.len())], build_failure_reason(&f.error));
                    warn!(timeout = ?timeout, hops = f.hops, "circuit build failed: {}", f.error);
                    learn(
                        &mut lock(&self.inner.guards),
                        &guard.identity,
                        p.len(),
                        Some(&f),
                    );
                    if let ClientError::ExtendFailed { relay, .. } = &f.error {
                        // A circuit that must end at that relay cannot be
                        // built around it: say so now rather than retry.
                        if matches!(target, ExitTarget::Relay(id) if **id == *relay) {
                            return Err(f.error);
                        }
                        named.push(*relay);
                        cornered = Some(ClientError::ExtendFailed {
                            relay: *relay,
                            why: format!("{}, on every path left", f.error),
                        });
                    }
                    last = Some(f.error);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Build("no attempt made".into())))
    }

    /// Count the first stream or resolve on `circ` for its guard's path
    /// bias: answered if the exit answered (CONNECTED, RESOLVED or END,
    /// which only the last hop can send), not if it timed out or the
    /// circuit closed under it. Other errors are the client's own.
    fn judge_use<T>(&self, circ: &CircuitHandle, r: &Result<T, ClientError>) {
        let answered = match r {
            Ok(_) | Err(ClientError::StreamEnded(_)) => true,
            Err(ClientError::Timeout(_) | ClientError::CircuitClosed) => false,
            Err(_) => return,
        };
        if let Some(guard) = circ.path.first()
            && circ.first_use()
        {
            lock(&self.inner.guards).record_use(&guard.identity, answered);
        }
    }

    /// The guard sample, in order (first is the one in use when reachable).
    pub fn guards(&self) -> Vec<[u8; 32]> {
        lock(&self.inner.guards).ids()
    }

    /// The restricted middles of onion-service circuits (`vanguards.rs`).
    pub fn vanguards(&self) -> Vec<[u8; 32]> {
        lock(&self.inner.vanguards).ids()
    }

    /// The circuit build timeout in force now.
    pub fn build_timeout(&self) -> Duration {
        lock(&self.inner.cbt).timeout()
    }

    /// Build an unbound circuit for later streams (readiness and preemption).
    pub async fn build_preemptive(&self) -> Result<(), ClientError> {
        let circ = self.build_circuit(&ExitTarget::Any).await?;
        self.pool().push(PooledCircuit {
            circ,
            isolation: None,
            first_used: None,
        });
        Ok(())
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<PooledCircuit>> {
        self.inner.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The congestion windows of the circuits open now.
    pub fn circuit_cwnds(&self) -> Vec<u32> {
        self.pool()
            .iter()
            .filter(|p| !p.circ.is_closed())
            .map(|p| p.circ.cwnd())
            .collect()
    }

    /// The paths of the circuits open now (guard, middle, exit identities).
    pub fn circuit_paths(&self) -> Vec<Vec<[u8; 32]>> {
        self.pool()
            .iter()
            .filter(|p| !p.circ.is_closed())
            .map(|p| p.circ.path.iter().map(|r| r.identity).collect())
            .collect()
    }

    /// A circuit for a stream to `target` with `iso`: reuse or build.
    pub async fn circuit_for(
        &self,
        target: &ExitTarget<'_>,
        iso: &Isolation,
    ) -> Result<CircuitHandle, ClientError> {
        self.wait_network().await?;
        let dirty = self.max_circuit_dirtiness();
        let generation = self.inner.generation.load(Ordering::Relaxed);
        {
            let mut pool = self.pool();
            pool.retain(|p| {
                !p.circ.is_closed() && p.first_used.is_none_or(|t| t.elapsed() < dirty)
            });
            // A circuit already bound to this isolation first, then a
            // fresh one (a preemptive circuit may have come in meanwhile).
            let usable = |p: &PooledCircuit, bound: bool| {
                p.isolation.as_ref().map_or(!bound, |i| bound && i == iso)
                    && p.circ
                        .path
                        .last()
                        .is_some_and(|e| path::exit_allows(e, target))
            };
            let at = pool
                .iter()
                .position(|p| usable(p, true))
                .or_else(|| pool.iter().position(|p| usable(p, false)));
            let found = at.map(|i| &mut pool[i]);
            if let Some(p) = found {
                p.isolation = Some(iso.clone());
                p.first_used.get_or_insert_with(Instant::now);
                return Ok(p.circ.clone());
            }
        }
        let circ = self.build_circuit(target).await?;
        self.pool_used(&circ, iso, generation);
        Ok(circ)
    }

    /// Pool `circ`, built for a stream with `iso` when NEWNYM had been
    /// signalled `generation` times: for later streams of `iso`, unless a
    /// NEWNYM came meanwhile.
    fn pool_used(&self, circ: &CircuitHandle, iso: &Isolation, generation: u64) {
        let mut pool = self.pool();
        if self.inner.generation.load(Ordering::Relaxed) == generation {
            pool.push(PooledCircuit {
                circ: circ.clone(),
                isolation: Some(iso.clone()),
                first_used: Some(Instant::now()),
            });
        }
    }

    /// SIGNAL NEWNYM: new streams use new circuits. Every circuit that has
    /// carried a stream leaves the pool (its open streams go on); unused
    /// ones stay, as in Tor: nothing links them to earlier streams.
    pub fn new_identity(&self) {
        let mut pool = self.pool();
        self.inner.generation.fetch_add(1, Ordering::Relaxed);
        pool.retain(|p| p.first_used.is_none());
        info!("new identity: later streams use new circuits");
    }

    /// How long a circuit takes new streams after its first.
    pub fn max_circuit_dirtiness(&self) -> Duration {
        Duration::from_secs(self.inner.dirtiness_secs.load(Ordering::Relaxed))
    }

    /// Change [`Client::max_circuit_dirtiness`] (circuits in use included).
    pub fn set_max_circuit_dirtiness(&self, d: Duration) {
        self.inner
            .dirtiness_secs
            .store(d.as_secs(), Ordering::Relaxed);
    }

    /// What the client tells its controllers.
    pub fn events(&self) -> &Arc<Events> {
        &self.inner.events
    }

    /// How long since the client was made.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Open a stream to `addr:port` through the network, `early` sent
    /// right behind the BEGIN (optimistic data: what the application sent
    /// with its request). A BEGIN that fails for a reason another exit
    /// might not have (exit policy, name resolution, timeout) is tried
    /// once more on a fresh circuit through a different exit; with early
    /// bytes, only when the exit said it did not connect (END 2, 4 or 7),
    /// since after a timeout here or a closed circuit they may have
    /// reached the server already.
    pub async fn connect(
        &self,
        addr: TargetAddr,
        port: u16,
        iso: &Isolation,
        early: Vec<u8>,
    ) -> Result<Stream, ClientError> {
        let mut ctl = self
            .inner
            .events
            .new_stream(format!("{addr}:{port}"), false);
        let sent = early.len();
        let r = self.connect_inner(addr, port, iso, early, &mut ctl).await;
        inc(if r.is_ok() {
            &self.inner.stats.streams_opened
        } else {
            &self.inner.stats.stream_failures
        });
        match r {
            Ok(mut s) => {
                ctl.succeeded();
                // What went with the BEGIN counts as written.
                ctl.wrote(sent);
                s.watch(ctl);
                Ok(s)
            }
            Err(e) => {
                ctl.failed(stream_failure_reason(&e));
                Err(e)
            }
        }
    }

    async fn connect_inner(
        &self,
        addr: TargetAddr,
        port: u16,
        iso: &Isolation,
        early: Vec<u8>,
        ctl: &mut StreamWatch,
    ) -> Result<Stream, ClientError> {
        if let TargetAddr::Host(h) = &addr
            && let Some(service) = keep_local(h)?
        {
            return self.connect_service(service, port, iso, early, ctl).await;
        }
        let target = ExitTarget::Addr(&addr, port);
        let generation = self.inner.generation.load(Ordering::Relaxed);
        let circ = self.circuit_for(&target, iso).await?;
        ctl.sent(circ.serial);
        let t = Duration::from_secs(self.inner.cfg.stream_timeout_secs);
        let first = tokio::time::timeout(t, circ.begin(addr.clone(), port, early.clone()))
            .await
            .unwrap_or(Err(ClientError::Timeout("stream connect")));
        self.judge_use(&circ, &first);
        let not_connected = matches!(
            &first,
            Err(ClientError::StreamEnded(
                EndReason::EXIT_POLICY | EndReason::RESOLVE_FAILED | EndReason::TIMEOUT
            ))
        );
        let unknown = matches!(
            &first,
            Err(ClientError::Timeout(_)) | Err(ClientError::CircuitClosed)
        );
        let retry = not_connected || (unknown && early.is_empty());
        if !retry {
            return first;
        }
        debug!("stream failed at the exit; retrying once through another exit");
        let exit = circ
            .path
            .last()
            .map(|r| r.identity)
            .into_iter()
            .collect::<Vec<_>>();
        let circ = match self.build_circuit_avoiding(&target, &exit).await {
            Ok(c) => c,
            Err(_) => return first,
        };
        self.pool_used(&circ, iso, generation);
        if let Err(e) = &first {
            ctl.detached(stream_failure_reason(e));
        }
        ctl.sent(circ.serial);
        let second = tokio::time::timeout(t, circ.begin(addr, port, early))
            .await
            .unwrap_or(Err(ClientError::Timeout("stream connect")));
        self.judge_use(&circ, &second);
        second
    }

    /// A stream to `port` of the service at `address`, on the circuit to
    /// it that streams of this isolation share: built when there is none,
    /// or when the one there is older than `max_circuit_dirtiness_secs`
    /// (the old one closes once its streams end).
    async fn connect_service(
        &self,
        address: ServiceAddress,
        port: u16,
        iso: &Isolation,
        early: Vec<u8>,
        ctl: &mut StreamWatch,
    ) -> Result<Stream, ClientError> {
        self.prune_services();
        let slot = lock(&self.inner.services)
            .entry((address, iso.clone()))
            .or_default()
            .clone();
        let circ = {
            let mut slot = slot.lock().await;
            let dirty = self.max_circuit_dirtiness();
            match &*slot {
                Some((c, built)) if !c.is_closed() && built.elapsed() < dirty => c.clone(),
                _ => {
                    *slot = None;
                    let c = crate::rendezvous::connect(self, &address).await?;
                    *slot = Some((c.clone(), Instant::now()));
                    c
                }
            }
        };
        ctl.sent(circ.serial);
        let t = Duration::from_secs(self.inner.cfg.stream_timeout_secs);
        let to = TargetAddr::Host(address.to_string());
        tokio::time::timeout(t, circ.begin(to, port, early))
            .await
            .unwrap_or(Err(ClientError::Timeout("stream connect")))
    }

    /// Forget service circuits that are closed or past their dirtiness
    /// (each closes once its streams end), and their entries.
    fn prune_services(&self) {
        let dirty = self.max_circuit_dirtiness();
        lock(&self.inner.services).retain(|_, slot| match slot.try_lock() {
            // In use: being built, or a stream is being opened.
            Err(_) => true,
            Ok(s) => s
                .as_ref()
                .is_some_and(|(c, built)| !c.is_closed() && built.elapsed() < dirty),
        });
    }

    /// Keep `preemptive_circuits` unbound circuits ready and retire
    /// circuits past their dirtiness.
    pub async fn preemptive_loop(self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if self.consensus().is_none() {
                continue;
            }
            self.prune_services();
            let dirty = self.max_circuit_dirtiness();
            let ready = {
                let mut pool = self.pool();
                pool.retain(|p| {
                    !p.circ.is_closed() && p.first_used.is_none_or(|t| t.elapsed() < dirty)
                });
                pool.iter().filter(|p| p.isolation.is_none()).count()
            };
            if ready < self.inner.cfg.preemptive_circuits
                && let Err(e) = self.build_preemptive().await
            {
                debug!("preemptive circuit: {e}");
            }
        }
    }

    /// Open a stream to `host:port` (a name is resolved at the exit) as an
    /// `AsyncRead + AsyncWrite` byte stream, isolated from the proxy ports.
    pub async fn open_stream(
        &self,
        host: &str,
        port: u16,
    ) -> Result<crate::socks::AppStream, ClientError> {
        let addr = TargetAddr::from_host(host)?;
        let iso = Isolation {
            listener: usize::MAX,
            auth: SocksAuth::NoAuth,
        };
        let stream = self.connect(addr, port, &iso, Vec::new()).await?;
        let (app, mut ours) = tokio::io::duplex(64 * 1024);
        let (app, broke) = crate::socks::AppStream::new(app);
        tokio::spawn(
            async move {
                if let Err(e) = crate::socks::relay_bytes(&mut ours, stream).await {
                    broke.store(true, Ordering::Release);
                    debug!("library stream: {e}");
                }
            }
            .in_current_span(),
        );
        Ok(app)
    }

    /// Resolve a hostname at an exit.
    pub async fn resolve(&self, host: String, iso: &Isolation) -> Result<Vec<IpAddr>, ClientError> {
        let mut ctl = self.inner.events.new_stream(format!("{host}:0"), true);
        let r = async {
            if keep_local(&host)?.is_some() {
                // A service has no address to give.
                return Err(ClientError::StreamEnded(EndReason::RESOLVE_FAILED));
            }
            let circ = self.circuit_for(&ExitTarget::Any, iso).await?;
            ctl.sent(circ.serial);
            let t = Duration::from_secs(self.inner.cfg.stream_timeout_secs);
            let r = tokio::time::timeout(t, circ.resolve(host))
                .await
                .unwrap_or(Err(ClientError::Timeout("resolve")));
            self.judge_use(&circ, &r);
            r
        }
        .await;
        match &r {
            Ok(_) => ctl.succeeded(),
            Err(e) => ctl.failed(stream_failure_reason(e)),
        }
        r
    }

    /// A request that comes while the client bootstraps (a browser started
    /// with the client) waits for the first circuit, and one that comes
    /// with no consensus waits for one, up to the stream timeout, instead
    /// of failing at once.
    async fn wait_network(&self) -> Result<(), ClientError> {
        let bootstrapping =
            || self.inner.bootstrapping.load(Ordering::Relaxed) && !*self.inner.ready.borrow();
        if !bootstrapping() && self.consensus().is_some() {
            return Ok(());
        }
        let t = Duration::from_secs(self.inner.cfg.stream_timeout_secs);
        let waited = tokio::time::timeout(t, async {
            if bootstrapping() {
                let _ = self.inner.ready.subscribe().wait_for(|r| *r).await;
            }
            let valid = |c: &Option<Arc<Consensus>>| {
                c.as_ref().is_some_and(|c| unix_now() <= c.valid_until)
            };
            let _ = self.inner.consensus.subscribe().wait_for(valid).await;
        })
        .await;
        waited.map_err(|_| {
            ClientError::NoConsensus(format!(
                "the network is not reachable yet after waiting {} s",
                t.as_secs()
            ))
        })
    }

    /// Wait until [`Client::bootstrap`] has succeeded (as run by [`Client::serve`]).
    pub async fn wait_bootstrapped(&self) {
        let mut rx = self.inner.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Wait for a valid consensus, then for a working circuit.
    pub async fn bootstrap(&self, deadline: Duration) -> Result<(), ClientError> {
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.inner.bootstrapping.store(true, Ordering::Relaxed);
        let _running = Running(&self.inner.bootstrapping);
        let start = Instant::now();
        let mut last: Option<ClientError> = None;
        while start.elapsed() < deadline {
            if self.consensus().is_some() {
                match self.build_preemptive().await {
                    Ok(()) => {
                        self.reached(Phase::Done, "a circuit is ready", None);
                        self.inner.ready.send_replace(true);
                        return Ok(());
                    }
                    Err(e) => last = Some(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(last
            .unwrap_or_else(|| ClientError::NoConsensus("none fetched before the deadline".into())))
    }

    /// Run everything: consensus upkeep and the proxy listeners.
    pub async fn run(self) -> Result<(), ClientError> {
        info!("Bootstrapped 0% (starting)");
        let mut socks = Vec::new();
        for a in &self.inner.cfg.socks_listen {
            socks.push(tokio::net::TcpListener::bind(a).await?);
        }
        let mut http = Vec::new();
        for a in &self.inner.cfg.http_connect_listen {
            http.push(tokio::net::TcpListener::bind(a).await?);
        }
        self.serve(socks, http).await
    }

    /// The client's counters.
    pub fn stats(&self) -> Arc<ClientStats> {
        self.inner.stats.clone()
    }

    /// The client's Prometheus metrics (totals; no addresses or destinations).
    pub fn metrics_registry(&self) -> prometheus_client::registry::Registry {
        use allium_link::metrics::{Family, SnapshotCollector, Value};
        let me = self.clone();
        let mut r = prometheus_client::registry::Registry::with_prefix("allium_client");
        r.register_collector(Box::new(SnapshotCollector(move || {
            let s = &me.inner.stats;
            let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
            let open = me.pool().iter().filter(|p| !p.circ.is_closed()).count();
            vec![
                Family::counter("circuits_built", "Circuits built", g(&s.circuits_built)),
                Family::counter(
                    "circuit_build_failures",
                    "Circuit builds that failed",
                    g(&s.circuit_build_failures),
                ),
                Family::gauge("circuits_open", "Circuits in the pool", open as i64),
                Family::gauge(
                    "bootstrap_percent",
                    "How far bootstrap has come (0 starting, 25 requesting_status, 50 enough_dirinfo, 100 done)",
                    i64::from(me.inner.phase.load(Ordering::Relaxed)),
                ),
                Family::counter("streams_opened", "Streams opened", g(&s.streams_opened)),
                Family {
                    name: "consensus_fetches",
                    help: "Consensuses fetched, from the authorities, fallback directories or guards' directory caches",
                    values: vec![
                        (
                            Some(("from", "authority")),
                            Value::Counter(g(&s.consensus_from_authorities)),
                        ),
                        (
                            Some(("from", "fallback")),
                            Value::Counter(g(&s.consensus_from_fallbacks)),
                        ),
                        (
                            Some(("from", "cache")),
                            Value::Counter(g(&s.consensus_from_caches)),
                        ),
                    ],
                },
                Family::counter(
                    "directory_caches_avoided",
                    "Guards' directory caches avoided for serving a consensus that does not verify",
                    g(&s.caches_avoided),
                ),
                Family::counter(
                    "stream_failures",
                    "Streams that could not be opened",
                    g(&s.stream_failures),
                ),
                Family::gauge(
                    "consensus_relays",
                    "Relays in the current consensus",
                    me.consensus().map_or(0, |c| c.relays.len() as i64),
                ),
            ]
        })));
        r
    }

    /// Like [`Client::run`] on already bound SOCKS and HTTP CONNECT listeners.
    /// Each listener is its own isolation domain.
    pub async fn serve(
        self,
        socks: Vec<tokio::net::TcpListener>,
        http: Vec<tokio::net::TcpListener>,
    ) -> Result<(), ClientError> {
        use crate::socks::Front;
        let mut set = tokio::task::JoinSet::new();
        set.spawn(self.clone().consensus_loop().in_current_span());
        set.spawn(self.clone().preemptive_loop().in_current_span());
        let fronts = socks
            .into_iter()
            .map(|l| (l, Front::Socks))
            .chain(http.into_iter().map(|l| (l, Front::HttpConnect)));
        // Requests that come before the first circuit wait for it.
        self.inner.bootstrapping.store(true, Ordering::Relaxed);
        for (i, (l, front)) in fronts.enumerate() {
            info!(addr = %l.local_addr()?, ?front, "proxy listening");
            set.spawn(crate::socks::serve(self.clone(), l, i, front).in_current_span());
        }
        if let Some(a) = self.inner.cfg.control_listen {
            let port = crate::control::ControlPort::new(&self)?;
            let l = tokio::net::TcpListener::bind(a).await?;
            info!(addr = %l.local_addr()?, "control port listening");
            set.spawn(port.serve(l).in_current_span());
        }
        if let Some(a) = self.inner.cfg.metrics_listen {
            let me = self.clone();
            set.spawn(async move {
                if let Err(e) = allium_link::metrics::serve(a, me.metrics_registry()).await {
                    warn!("metrics: {e}");
                }
                std::future::pending::<()>().await
            });
        }
        for s in &self.inner.cfg.services {
            let (me, s) = (self.clone(), s.clone());
            set.spawn(
                async move {
                    if let Err(e) = crate::service::run(me, s).await {
                        warn!("onion service: {e}");
                    }
                    std::future::pending::<()>().await
                }
                .in_current_span(),
            );
        }
        let boot = self.clone();
        set.spawn(async move {
            if let Err(e) = boot.bootstrap(Duration::from_secs(3600)).await {
                warn!("bootstrap: {e}");
            }
            std::future::pending::<()>().await
        });
        set.join_next().await;
        Err(ClientError::Config("a client task ended".into()))
    }
}

/// A consensus must list this many relays as Running for a circuit to be
/// built.
const USABLE_RELAYS: usize = 3;

/// Whether consensus `c` can give a circuit: enough Running relays, a
/// guard and an exit among them. The first consensuses of a network just
/// started may list thousands of relays, none or few of them tested yet,
/// and no guard.
fn usable(c: &Consensus) -> bool {
    let running = || c.relays.iter().filter(|r| r.flags.has(RelayFlags::RUNNING));
    running().nth(USABLE_RELAYS - 1).is_some()
        && running().any(|r| r.flags.has(RelayFlags::GUARD))
        && running().any(|r| r.flags.has(RelayFlags::EXIT))
}

/// How long until the next consensus fetch after one that gave consensus
/// `c` at `now_ms` (milliseconds since the UNIX epoch), and the new count
/// of stale answers in a row; `r` is a random number.
///
/// A fresh consensus is fetched again at a random millisecond in the
/// period after it stops being fresh (one period long, and ending no later
/// than halfway to `valid_until`), so that a network's clients spread their
/// fetches evenly over the period instead of all asking at the moment the
/// next consensus appears; the one held stays valid meanwhile. A stale
/// one (an authority that has not made a newer one yet, or serves an old
/// one) backs off from 1 s, doubling up to 5 minutes, instead of asking
/// again every second; `stale` counts such answers that brought nothing
/// newer (the caller resets it on one that did). A consensus that is not
/// [`usable`] backs off no further than the caches' stretch of the period
/// (at least 1 s): a cache still behind when the client asked made it
/// wait 1 + 2 + 4 + 8 s for the consensus of a network just started.
///
/// A consensus that is not [`usable`] (a network just started) builds no
/// circuit: its holder, which can do nothing until it has the next,
/// fetches it as soon as it is out: in the first quarter of
/// [`http::cache_spread_ms`] (a thirty-second of the period), asking the
/// fallback directories and then the authorities when its guards' caches
/// are still behind ([`Client::refresh_consensus`]). Only a network just
/// started has such clients.
fn next_fetch(c: &Consensus, now_ms: u64, stale: u32, r: u64) -> (Duration, u32) {
    if c.fresh_until.saturating_mul(1000) > now_ms {
        if !usable(c) {
            let soon_ms = http::cache_spread_ms(c) / 4;
            return (http::after_fresh(c, now_ms, soon_ms, r), 0);
        }
        let spread = c
            .interval()
            .min(c.valid_until.saturating_sub(c.fresh_until) / 2)
            .min(3600);
        (http::after_fresh(c, now_ms, spread * 1000, r), 0)
    } else {
        let mut wait = Duration::from_secs((1u64 << stale.min(9)).min(300));
        if !usable(c) {
            wait = wait.min(Duration::from_millis(http::cache_spread_ms(c).max(1000)));
        }
        (wait, stale.saturating_add(1))
    }
}

/// A path through `guard` for `target`, with an exit that is none of
/// `avoid_exits` and a middle and exit that are none of `named` when others
/// can be had.
///
/// Nothing is avoided for longer. A failed build tells the client nothing
/// it can trust about the middle or the exit: every answer past the guard
/// comes through the guard, which can cause or invent an extend failure
/// (and a middle likewise for the exit). Avoiding relays on failed builds
/// would let one hop remove honest relays from the client's choices, one
/// failure at a time, until only its friends were left; the guard alone
/// answers for its circuits (path bias, `pathbias.rs`). `named` holds the
/// relays that the failed attempts of one build named, for that build's
/// remaining attempts only, so that a relay that is down does not take
/// every attempt of a build: it never shrinks the choices of any other
/// build, and each failure counts against the guard. `avoid_exits` is one
/// exit that failed a stream, for that stream's single retry.
///
/// Also whether the path avoids them all (false when none through `guard`
/// does).
pub(crate) fn choose_path_through<R: rand::Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    target: &ExitTarget<'_>,
    guard: &ConsensusRelay,
    avoid_exits: &[[u8; 32]],
    named: &[[u8; 32]],
    layer2: &[[u8; 32]],
) -> Result<([ConsensusRelay; 3], bool), ClientError> {
    let clean = |p: &[ConsensusRelay; 3]| {
        !avoid_exits.contains(&p[2].identity) && !p[1..].iter().any(|r| named.contains(&r.identity))
    };
    let avoid: Vec<[u8; 32]> = avoid_exits.iter().chain(named).copied().collect();
    let p = path::choose_path(rng, c, target, Some(guard), layer2, &avoid)?;
    let ok = clean(&p);
    Ok((p, ok))
}

/// The first of the `usable` guards (in sample order) through which a path
/// to `target` exists, with that path. A guard that cannot lead there (it is
/// the only exit allowing the target, or shares a family or /16 with every
/// such exit) is passed over for this circuit only, as Tor restricts its
/// guard choice by the exit; so is a guard through which every path meets
/// an exit to avoid or a relay this build's failures named (the only live
/// exit is in the guard's family), when a later guard has a path that does
/// not. The guard stays first in the sample. Also whether the path avoids
/// them all.
pub(crate) fn guard_and_path<R: rand::Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    target: &ExitTarget<'_>,
    usable: &[ConsensusRelay],
    avoid_exits: &[[u8; 32]],
    named: &[[u8; 32]],
    layer2: &[[u8; 32]],
) -> Result<(ConsensusRelay, [ConsensusRelay; 3], bool), ClientError> {
    let mut last = None;
    let mut fallback = None;
    for guard in usable {
        match choose_path_through(rng, c, target, guard, avoid_exits, named, layer2) {
            Ok((p, true)) => return Ok((guard.clone(), p, true)),
            Ok((p, false)) => {
                fallback.get_or_insert((guard.clone(), p, false));
            }
            // That no circuit through one guard can end at the target says
            // less than another guard's failure on the way there.
            Err(ClientError::CannotEndAt { .. }) if last.is_some() => {}
            Err(e) => last = Some(e),
        }
    }
    fallback.ok_or_else(|| {
        last.unwrap_or_else(|| {
            let guards = (c.relays.iter())
                .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::GUARD))
                .count();
            ClientError::NoPath(if guards == 0 {
                format!(
                    "the consensus lists no Running relay with the Guard flag (of {} relays): a network just started, or a stale consensus",
                    c.relays.len()
                )
            } else {
                "every guard in the sample failed recently".into()
            })
        })
    })
}

/// What a build through `guard` of a path of `len` hops teaches the client:
/// built, or `failure`. Only the guard's record changes, by how far the
/// build got. What the failure names (an extend failure naming a relay, a
/// DESTROY, a timeout at some hop) is not held against any later hop: it
/// came through the guard (see [`choose_path_through`]).
fn learn(guards: &mut GuardSet, guard: &[u8; 32], len: usize, failure: Option<&BuildFailure>) {
    guards.record_build(guard, failure.map_or(len, |f| f.hops), len);
}

/// Names that must never reach an exit: a service address (returned, to
/// be reached through the ring; a mistyped one fails here, before any
/// network work) or a Tor `.onion` name, which an exit would hand to the
/// DNS.
fn keep_local(host: &str) -> Result<Option<ServiceAddress>, ClientError> {
    if ServiceAddress::claims(host) {
        return Ok(Some(ServiceAddress::parse(host)?));
    }
    let h = host.trim_end_matches('.');
    let tld = h.rsplit('.').next().unwrap_or(h);
    if tld.eq_ignore_ascii_case("onion") {
        return Err(ClientError::TorOnionName);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::tests::relay;

    #[test]
    fn service_and_tor_names_stay_local() {
        let good = "5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwdiuab.allium.alt";
        let typo = good.replacen('5', "6", 1);
        let code = |h: &str| {
            keep_local(h)
                .map(|a| a.map(|a| a.to_string()))
                .map_err(|e| e.socks_reply().0)
        };
        assert_eq!(code(good), Ok(Some(good.to_string())));
        assert_eq!(
            code(&format!("www.{}", good.to_uppercase())),
            Ok(Some(good.to_string()))
        );
        assert_eq!(code(&typo), Err(0xf6));
        assert_eq!(code("broken.allium.alt."), Err(0xf6));
        assert_eq!(
            code("duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion"),
            Err(0xf6)
        );
        assert_eq!(code("x.ONION."), Err(0xf6));
        assert_eq!(code("example.com"), Ok(None));
        assert_eq!(code("onion.example"), Ok(None));
        assert_eq!(code("allium.alt.example"), Ok(None));
    }

    /// A consensus of three Running relays, the first a guard and the last
    /// an exit: the least that gives a circuit.
    fn usable_three() -> Consensus {
        use crate::path::tests::{consensus_of, relay};
        consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1000, 0),
            relay(3, 1000, RelayFlags::EXIT),
        ])
    }

    #[test]
    fn a_stale_consensus_backs_off() {
        // Fresh from 0 to 1000, valid until 3000.
        let mut c = usable_three();
        (c.valid_after, c.fresh_until, c.valid_until) = (0, 1000, 3000);
        let mut stale = 0;
        let waits: Vec<u64> = (0..8)
            .map(|_| {
                let (w, s) = next_fetch(&c, 1_000_000, stale, 0);
                stale = s;
                w.as_secs()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128]);
        assert_eq!(
            next_fetch(&c, 1_000_000, 20, 0),
            (Duration::from_secs(300), 21)
        );
        c.fresh_until = 1001;
        assert_eq!(
            next_fetch(&c, 1_000_000, stale, 0),
            (Duration::from_secs(1), 0)
        );
        // One that gives no circuit backs off to an eighth of its period
        // at most (125 s of 1,000 s here; 1 s at least).
        c.fresh_until = 1000;
        c.relays.retain(|r| !r.flags.has(RelayFlags::GUARD));
        let waits: Vec<u64> = (0..9)
            .map(|s| next_fetch(&c, 1_000_000, s, 0).0.as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 125, 125]);
        (c.valid_after, c.fresh_until, c.valid_until) = (996, 1000, 1010);
        assert_eq!(next_fetch(&c, 1_000_000, 5, 0).0, Duration::from_secs(1));
    }

    /// Clients fetch the next consensus at times spread evenly over the
    /// period after the one they hold stops being fresh.
    #[test]
    fn fetches_spread_over_the_next_period() {
        use crate::path::tests::{consensus_of, relay};
        let ms = |w: Duration| u64::try_from(w.as_millis()).unwrap();
        let mut c = usable_three();
        (c.valid_after, c.fresh_until, c.valid_until) = (3600, 7200, 14400);
        let mut by_minute = [0u32; 60];
        for r in 0..36_000u64 {
            let (w, stale) = next_fetch(&c, 3_600_000, 0, r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(stale, 0);
            let at = 3_600_000 + ms(w);
            assert!((7_200_000..10_800_000).contains(&at), "{at}");
            by_minute[((at - 7_200_000) / 60_000) as usize] += 1;
        }
        // 600 a minute if even; every minute within 20% of that.
        assert!(
            by_minute.iter().all(|&n| (480..720).contains(&n)),
            "{by_minute:?}"
        );
        // A short validity narrows the spread to half of what is left.
        c.valid_until = 8000;
        let latest = (0..1000u64)
            .map(|r| ms(next_fetch(&c, 7_000_000, 0, r * 400 + 399).0))
            .max()
            .unwrap();
        assert_eq!(latest, 200_000 + 399_999);
        // Periods of seconds spread to the millisecond: 3 s fresh, 6 s valid.
        (c.valid_after, c.fresh_until, c.valid_until) = (3, 6, 12);
        let at: std::collections::BTreeSet<u64> = (0..10_000u64)
            .map(|r| 4_500 + ms(next_fetch(&c, 4_500, 0, r).0))
            .collect();
        assert_eq!(at.len(), 3000);
        assert_eq!((at.first(), at.last()), (Some(&6_000), Some(&8_999)));
        // One that lists too few relays to build a circuit: the next is
        // fetched as soon as it is out, in the first 1/32 of the period.
        let few = Consensus {
            valid_after: 3,
            fresh_until: 6,
            valid_until: 12,
            ..consensus_of(vec![relay(1, 1000, 0), relay(2, 1000, 0)])
        };
        let at: std::collections::BTreeSet<u64> = (0..10_000u64)
            .map(|r| 4_500 + ms(next_fetch(&few, 4_500, 0, r).0))
            .collect();
        assert_eq!((at.first(), at.last()), (Some(&6_000), Some(&6_092)));
        // So is one that lists many relays, none of them Running yet, or
        // many Running and no guard.
        let untested = Consensus {
            relays: (1..=16)
                .map(|i| ConsensusRelay {
                    flags: RelayFlags(RelayFlags::VALID),
                    ..relay(i, 1000, 0)
                })
                .collect(),
            ..few
        };
        let no_guard = Consensus {
            relays: (1..=16).map(|i| relay(i, 1000, RelayFlags::EXIT)).collect(),
            ..untested.clone()
        };
        for c in [untested, no_guard] {
            let latest = (0..10_000u64)
                .map(|r| 4_500 + ms(next_fetch(&c, 4_500, 0, r).0))
                .max();
            assert_eq!(latest, Some(6_092));
        }
    }

    /// A circuit to relay 1 with guards 2 and 1 and no third relay: through
    /// 2 there is no middle, and no circuit can end at 1 through 1 itself.
    /// The first is the error: it is about the client's side of the path,
    /// not about relay 1 (a service gives up an introduction point only
    /// for the second).
    #[test]
    fn a_failure_on_the_way_outranks_a_guard_that_is_the_target() {
        use allium_proto::RelayFlags;
        use rand::SeedableRng;
        let c = crate::path::tests::consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1000, RelayFlags::GUARD),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let to = ExitTarget::Relay(&[1; 32]);
        for order in [
            [c.relays[1].clone(), c.relays[0].clone()],
            [c.relays[0].clone(), c.relays[1].clone()],
        ] {
            let e = guard_and_path(&mut rng, &c, &to, &order, &[], &[], &[]).unwrap_err();
            assert!(matches!(e, ClientError::NoPath(_)), "{e}");
        }
        let e = guard_and_path(&mut rng, &c, &to, &c.relays[..1], &[], &[], &[]).unwrap_err();
        assert!(
            matches!(e, ClientError::CannotEndAt { relay: [1, ..], .. }),
            "{e}"
        );
    }

    /// Three relays, all Guards, one of them the only exit: a client whose
    /// first guard is that exit builds through its next guard instead of
    /// failing every build.
    #[test]
    fn a_guard_that_is_the_only_exit_is_passed_over() {
        use allium_proto::RelayFlags;
        use rand::SeedableRng;
        let c = crate::path::tests::consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD | RelayFlags::EXIT),
            relay(2, 1000, RelayFlags::GUARD),
            relay(3, 1000, RelayFlags::GUARD),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let order = [
            c.relays[0].clone(),
            c.relays[2].clone(),
            c.relays[1].clone(),
        ];
        let any = ExitTarget::Any;
        assert!(matches!(
            choose_path_through(&mut rng, &c, &any, &order[0], &[], &[], &[]),
            Err(ClientError::NoExit(_))
        ));
        let (g, p, _) = guard_and_path(&mut rng, &c, &any, &order, &[], &[], &[]).unwrap();
        assert_eq!(g.identity, [3; 32]);
        let ids = p.map(|r| r.identity[0]);
        assert_eq!(ids, [3, 2, 1]);
        assert!(matches!(
            guard_and_path(&mut rng, &c, &any, &order[..1], &[], &[], &[]),
            Err(ClientError::NoExit(_))
        ));
        assert!(matches!(
            guard_and_path(&mut rng, &c, &any, &[], &[], &[], &[]),
            Err(ClientError::NoPath(m)) if m.contains("failed recently")
        ));
        // No guard at all in the consensus: said so, not blamed on guards.
        let mut none = c.clone();
        for r in &mut none.relays {
            r.flags = RelayFlags(r.flags.0 & !RelayFlags::GUARD);
        }
        assert!(matches!(
            guard_and_path(&mut rng, &none, &any, &[], &[], &[], &[]),
            Err(ClientError::NoPath(m)) if m.contains("no Running relay with the Guard flag")
        ));
    }

    /// A restricted middle that failed this build (it is down but still
    /// listed) is not chosen again while another fits, however much of the
    /// middle weight it carries; with no other, it is (and the path says
    /// it is not clean).
    #[test]
    fn a_middle_that_failed_the_build_is_not_chosen_again() {
        use allium_proto::RelayFlags;
        use rand::SeedableRng;
        let c = crate::path::tests::consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1_000_000, 0),
            relay(3, 1, 0),
            relay(4, 1000, 0),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (guard, target) = (c.relays[0].clone(), [4u8; 32]);
        let to = ExitTarget::Relay(&target);
        let layer2 = [[2u8; 32], [3; 32]];
        let middle = |named: &[[u8; 32]], rng: &mut rand::rngs::StdRng| {
            let (p, clean) =
                choose_path_through(rng, &c, &to, &guard, &[], named, &layer2).unwrap();
            (p[1].identity[0], clean)
        };
        assert_eq!(middle(&[], &mut rng), (2, true));
        for _ in 0..50 {
            assert_eq!(middle(&[[2; 32]], &mut rng), (3, true));
        }
        assert!(!middle(&[[2; 32], [3; 32]], &mut rng).1);
    }

    /// Six relays, two exits: exit 5 is in guard 1's family, exit 6 is
    /// down (avoided after its failure). The client keeps guard 1 in its
    /// sample but builds this circuit through guard 2, rather than failing.
    #[test]
    fn a_guard_whose_family_holds_the_only_live_exit_is_passed_over() {
        use allium_proto::RelayFlags;
        use rand::SeedableRng;
        let mut relays = vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1000, RelayFlags::GUARD),
            relay(3, 1000, 0),
            relay(4, 1000, 0),
            relay(5, 1000, RelayFlags::EXIT),
            relay(6, 1000, RelayFlags::EXIT),
        ];
        relays[0].family = Some(7);
        relays[4].family = Some(7);
        let c = crate::path::tests::consensus_of(relays);
        let order = [c.relays[0].clone(), c.relays[1].clone()];
        let any = ExitTarget::Any;
        let down = [[6; 32]];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..20 {
            let (g, p, _) = guard_and_path(&mut rng, &c, &any, &order, &down, &[], &[]).unwrap();
            assert_eq!(g.identity, [2; 32]);
            assert_eq!(p[2].identity, [5; 32]);
        }
        // With exit 6 back, guard 1 is used again.
        let (g, p, _) = guard_and_path(&mut rng, &c, &any, &order, &[], &[], &[]).unwrap();
        assert_eq!((g.identity, p[2].identity), ([1; 32], [6; 32]));
    }

    /// A circuit to a chosen relay whose only fitting restricted middle
    /// failed this build still gets a path, said not to avoid it (the
    /// build then gives up at once: see `Client::build_circuit_or_move_on`).
    #[test]
    fn a_path_through_the_only_restricted_middle_left_is_flagged() {
        use crate::path::tests::relay;
        use rand::SeedableRng;
        let c = crate::path::tests::consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1000, 0),
            relay(3, 1000, 0),
            relay(4, 1000, 0),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let to = ExitTarget::Relay(&[3; 32]);
        let guard = [c.relays[0].clone()];
        let layer2 = [[2; 32]];
        for named in [vec![], vec![[2; 32]]] {
            let (g, p, avoids) =
                guard_and_path(&mut rng, &c, &to, &guard, &[], &named, &layer2).unwrap();
            let ids = p.map(|r| r.identity[0]);
            assert_eq!((g.identity[0], ids), (1, [1, 2, 3]));
            assert_eq!(avoids, named.is_empty());
        }
    }

    #[test]
    fn build_timeout_is_learned() {
        let mut b = BuildTimes::new(Duration::from_secs(30), Duration::from_millis(500));
        assert_eq!(
            b.timeout(),
            Duration::from_secs(30),
            "default before samples"
        );
        for ms in 1..=100u64 {
            b.record(Duration::from_millis(ms * 10));
        }
        // 0.8 quantile of 10..1000 ms is 810 ms; twice that.
        assert_eq!(b.timeout(), Duration::from_millis(1620));
        for _ in 0..100 {
            b.record(Duration::from_millis(3));
        }
        assert_eq!(
            b.timeout(),
            Duration::from_millis(500),
            "never below the floor"
        );
    }

    /// Three guards, two exits and ten middles, of which relays 10 and 11
    /// (a fifth of the middle weight) collude with a guard. Guards and
    /// exits are scarce enough never to be middles.
    fn net() -> Consensus {
        use allium_proto::RelayFlags;
        let mut relays: Vec<ConsensusRelay> = (1..=3)
            .map(|i| relay(i, 1000, RelayFlags::GUARD))
            .chain((4..=5).map(|i| relay(i, 1500, RelayFlags::EXIT)))
            .chain((10..20).map(|i| relay(i, 1000, 0)))
            .collect();
        relays.sort_by_key(|r| r.identity);
        crate::path::tests::consensus_of(relays)
    }

    #[test]
    fn a_guard_cannot_steer_circuits_to_its_friends_by_failing_the_others() {
        use crate::pathbias::{MIN_ATTEMPTS, Verdict};
        use rand::{RngExt, SeedableRng};
        let seed = 11u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let c = net();
        let colluding = |r: &ConsensusRelay| r.identity[0] == 10 || r.identity[0] == 11;
        assert_eq!(
            path::Weights::new(&c).weight(&c.relays[0], path::Position::Middle),
            0
        );
        let d = tempfile::tempdir().unwrap();
        let mut guards = GuardSet::load(d.path().join("guards"), 3, 1000, Duration::from_secs(30));
        guards.update(&c, 100);
        let evil = guards.ids()[0];

        let n = 3000;
        let (mut middles, mut colluder_middles) = (0u32, 0u32);
        let (mut evil_attempts, mut evil_built) = (0u32, 0u32);
        let (mut honest_built, mut honest_colluders) = (0u32, 0u32);
        for _ in 0..n {
            guards.update(&c, 100);
            let g = guards.pick(&c).expect("a guard");
            let p = choose_path_through(&mut rng, &c, &ExitTarget::Any, &g, &[], &[], &[])
                .unwrap()
                .0;
            middles += 1;
            colluder_middles += u32::from(colluding(&p[1]));
            // The evil guard fails every circuit whose middle is not a
            // friend, as an extend failure naming that middle. Honest
            // guards lose one circuit in twenty, at the middle or the exit.
            let failed_at = if g.identity == evil {
                evil_attempts += 1;
                (!colluding(&p[1])).then_some(1)
            } else {
                (rng.random_range(0..20) == 0).then(|| rng.random_range(1..3))
            };
            let failure = failed_at.map(|hops| BuildFailure {
                hops,
                error: ClientError::ExtendFailed {
                    relay: p[hops].identity,
                    why: "extend failed".into(),
                },
            });
            learn(&mut guards, &g.identity, p.len(), failure.as_ref());
            if failure.is_none() {
                if g.identity == evil {
                    evil_built += 1;
                } else {
                    honest_built += 1;
                    honest_colluders += u32::from(colluding(&p[1]));
                }
            }
        }

        // The evil guard is found out after the minimum number of circuits,
        // having carried few; the honest ones are not blamed.
        let bias = guards.bias(&evil).unwrap();
        assert!(bias.disabled, "seed {seed}: {bias:?}");
        assert!(
            evil_attempts <= 2 * MIN_ATTEMPTS,
            "seed {seed}: {evil_attempts} attempts"
        );
        assert!(
            evil_built < MIN_ATTEMPTS / 2,
            "seed {seed}: {evil_built} built"
        );
        assert_ne!(guards.pick(&c).unwrap().identity, evil);
        for id in guards.ids().iter().filter(|id| **id != evil) {
            assert_eq!(
                guards.bias(id).unwrap().verdict(),
                Verdict::Fine,
                "seed {seed}"
            );
        }
        // The middles chosen, and those of the circuits built through the
        // other guards, are the friends at their weight share (a fifth),
        // not more.
        let share = f64::from(colluder_middles) / f64::from(middles);
        assert!(
            (share - 0.2).abs() < 0.03,
            "seed {seed}: chosen share {share}"
        );
        assert!(
            honest_built > n * 9 / 10,
            "seed {seed}: {honest_built} built"
        );
        let share = f64::from(honest_colluders) / f64::from(honest_built);
        assert!(
            (share - 0.2).abs() < 0.03,
            "seed {seed}: built share {share}"
        );
        let all = f64::from(honest_colluders + evil_built) / f64::from(honest_built + evil_built);
        assert!(all < 0.23, "seed {seed}: share of all built {all}");
    }
}
