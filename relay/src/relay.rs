//! The relay process: keys, listener, descriptor publication.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use allium_directory::{http, unix_now, unix_now_ms};
use allium_proto::doc::MAX_DESCRIPTOR_LEN;
use allium_proto::policy::ExitPolicy;
use allium_proto::{
    ConsensusRelay, LinkKey, RelayDescriptor, RelayId, SignedDocument, UnverifiedDescriptor,
};
use hickory_resolver::TokioResolver;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use crate::keys::{KeyStore, OnionKeySet};
use crate::netview::NetView;
use crate::{RelayConfig, RelayError, RelayStats, circuit};
use allium_directory::cache;
use allium_link::channel::{self, ChannelEnv, ChannelHandle, CreateHandler, LinkIdentity};
use allium_link::limits::{DosGuard, QueueMem, TokenBucket};

/// Everything circuits of this relay share.
pub struct RelayCtx {
    pub nickname: String,
    pub link: LinkIdentity,
    pub identity_pub: [u8; 32],
    pub onion: RwLock<OnionKeySet>,
    pub policy: ExitPolicy,
    pub channels: ChannelManager,
    pub resolver: Option<TokioResolver>,
    pub stats: Arc<RelayStats>,
    /// Set to true when the relay stops; every channel watches it.
    pub stop: tokio::sync::watch::Sender<bool>,
    pub mem: Arc<QueueMem>,
    pub dos: Arc<DosGuard>,
    /// The consensus, to check extend targets and relay links against.
    pub net: Arc<NetView>,
    /// This relay's own addresses, which its exit streams never reach.
    pub own_ips: Vec<std::net::IpAddr>,
    /// Whether circuits may be extended to private addresses.
    pub allow_private_addresses: bool,
    /// The ORPort self-test's view of inbound links.
    pub self_test: Arc<crate::selftest::Inbound>,
    /// This relay's introduction and rendezvous circuits.
    pub points: Arc<crate::rendezvous::Points>,
}

/// Stops the relay's channels when the serving future goes away.
struct StopOnDrop(Arc<RelayCtx>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.send_replace(true);
    }
}

/// Open channels to other relays, by identity.
#[derive(Default)]
pub struct ChannelManager {
    map: Mutex<HashMap<RelayId, ChannelHandle>>,
}

impl ChannelManager {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RelayId, ChannelHandle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this relay holds an open link to `id` that it opened, and
    /// if so whether that link carries circuits.
    pub fn opened_to(&self, id: &RelayId) -> Option<bool> {
        self.lock()
            .get(id)
            .filter(|h| !h.is_closed() && h.we_opened())
            .map(ChannelHandle::carries_circuits)
    }

    /// Close the link to `id` this relay opened if it carries no circuit
    /// ([`ChannelHandle::close_if_idle`]); the link, if there is one.
    pub fn close_if_idle(&self, id: &RelayId) -> Option<ChannelHandle> {
        let m = self.lock();
        let h = m.get(id).filter(|h| !h.is_closed() && h.we_opened())?;
        h.close_if_idle();
        Some(h.clone())
    }

    pub fn insert(&self, id: RelayId, h: ChannelHandle) {
        let mut m = self.lock();
        m.retain(|_, h| !h.is_closed());
        m.insert(id, h);
    }

    /// An open channel to relay `id`, reusing one if there is one. A new
    /// one is used only if the far end proves that identity.
    pub async fn get_or_connect(
        ctx: &Arc<RelayCtx>,
        id: RelayId,
        link_key: &LinkKey,
        addr: SocketAddr,
    ) -> Result<ChannelHandle, RelayError> {
        if let Some(h) = ctx
            .channels
            .lock()
            .get(&id)
            .filter(|h| !h.is_closed())
            .cloned()
        {
            return Ok(h);
        }
        let h =
            channel::connect_xk(addr, id, link_key, &ctx.link, Some(create_handler(ctx))).await?;
        ctx.channels.insert(id, h.clone());
        Ok(h)
    }
}

/// Spawns a circuit task for each CREATE a peer sends.
pub fn create_handler(ctx: &Arc<RelayCtx>) -> CreateHandler {
    let ctx = ctx.clone();
    Arc::new(move |nc| {
        tokio::spawn(circuit::run(ctx.clone(), nc).in_current_span());
    })
}

/// [`create_handler`] for links the peer opened, which the ORPort
/// self-test watches.
fn inbound_create_handler(ctx: &Arc<RelayCtx>) -> CreateHandler {
    let ctx = ctx.clone();
    Arc::new(move |nc| {
        ctx.self_test.arrived(&nc.create, nc.chan.peer().is_some());
        tokio::spawn(circuit::run(ctx.clone(), nc).in_current_span());
    })
}

/// A relay, built inert by [`Relay::new`] and started by [`Relay::run`].
pub struct Relay {
    cfg: RelayConfig,
    keys: KeyStore,
    ctx: Arc<RelayCtx>,
    standing: crate::status::Standing,
}

impl Relay {
    /// Load or create keys and check the configuration; no network yet.
    pub fn new(cfg: RelayConfig) -> Result<Self, RelayError> {
        cfg.check()?;
        allium_link::safelog::set_unsafe_logging(cfg.unsafe_logging);
        let keys = KeyStore::new(&cfg.data_dir);
        let identity = keys.identity()?;
        let link_secret = keys.link()?;
        let onion = keys.onion(unix_now())?;
        let resolver = match TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("no DNS resolver ({e}): only address literals and localhost can be reached");
                None
            }
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stats = Arc::new(RelayStats::default());
        let mem = QueueMem::new(cfg.max_queued_bytes as usize, stats.clone());
        let burst = if cfg.bandwidth_burst > 0 {
            cfg.bandwidth_burst
        } else {
            cfg.bandwidth_rate
        };
        // Reads may run a quarter over the rate: what a relay forwards it
        // reads first, so a read limit equal to the write limit would leave
        // its queues in the kernel's buffers (first come, first served)
        // rather than in its circuits' queues, where quiet circuits go
        // first.
        let bucket = (cfg.bandwidth_rate > 0)
            .then(|| TokenBucket::new(cfg.bandwidth_rate / 4 * 5, burst / 4 * 5));
        let write_bucket =
            (cfg.bandwidth_rate > 0).then(|| TokenBucket::new(cfg.bandwidth_rate, burst));
        let dos = Arc::new(DosGuard::new(
            cfg.dos_max_connections_per_addr,
            cfg.dos_circuit_rate,
            cfg.dos_circuit_burst,
            stats.clone(),
        ));
        let net = Arc::new(NetView::new(
            cfg.authorities.clone(),
            allium_directory::authority_keys(&cfg.authorities)?,
        ));
        let listed = net.clone();
        let ctx = Arc::new(RelayCtx {
            nickname: cfg.nickname.clone(),
            identity_pub: identity.verifying_key().to_bytes(),
            link: LinkIdentity {
                identity,
                link_secret,
                stop: Some(stop_rx),
                env: ChannelEnv {
                    mem: Some(mem.clone()),
                    bucket,
                    write_bucket,
                    stats: Some(stats.clone()),
                    idle_close: Some(allium_link::channel::IDLE_CLOSE),
                },
                bind: Some(cfg.listen.ip()).filter(|ip| !ip.is_unspecified()),
                known_relay: Some(Arc::new(move |id, ip| listed.is_relay_at(id, ip))),
            },
            onion: RwLock::new(onion),
            policy: cfg.policy()?,
            channels: ChannelManager::default(),
            resolver,
            stats,
            stop,
            mem,
            dos,
            net,
            allow_private_addresses: cfg.allow_private_addresses,
            self_test: Arc::default(),
            points: Arc::default(),
            own_ips: [Some(cfg.listen.ip()), cfg.advertise.map(|a| a.ip())]
                .into_iter()
                .flatten()
                .filter(|ip| !ip.is_unspecified())
                .collect(),
        });
        let relay = Relay {
            cfg,
            keys,
            ctx,
            standing: Default::default(),
        };
        relay.descriptor(unix_now())?;
        Ok(relay)
    }

    pub fn identity(&self) -> [u8; 32] {
        self.ctx.identity_pub
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.ctx.stats.clone()
    }

    /// The consensus cache the relay serves over BEGIN_DIR streams.
    pub fn dir_cache(&self) -> Arc<cache::ConsensusCache> {
        self.ctx.net.cache().clone()
    }

    /// The onion service descriptors the relay stores.
    pub fn service_directory(&self) -> Arc<allium_directory::hsdir::ServiceDirectory> {
        self.ctx.net.service_directory()
    }

    /// Its introduction and rendezvous circuits.
    pub fn points(&self) -> Arc<crate::rendezvous::Points> {
        self.ctx.points.clone()
    }

    /// The relay's queued-cell accounting.
    pub fn queue_mem(&self) -> Arc<QueueMem> {
        self.ctx.mem.clone()
    }

    pub fn nickname(&self) -> &str {
        &self.cfg.nickname
    }

    /// The signed descriptor for `now`; an error if it is too large for
    /// the authorities to take.
    pub fn descriptor(&self, now: u64) -> Result<SignedDocument, RelayError> {
        let onion = self.ctx.onion.read().unwrap_or_else(|p| p.into_inner());
        let d = RelayDescriptor {
            nickname: self.cfg.nickname.clone(),
            identity: self.ctx.identity_pub,
            link_key: self.ctx.link.link_pub(),
            onion_key: onion.current.public(),
            onion_crosscert: onion.current.crosscert(&self.ctx.identity_pub),
            addr: self.cfg.advertised()?,
            bandwidth: self.cfg.declared_bandwidth(),
            exit_policy: self.ctx.policy.clone(),
            family: self.cfg.family_ids()?,
            published: now,
        };
        let doc = d.sign(&self.ctx.link.identity);
        let len = doc.to_bytes().len();
        if len > MAX_DESCRIPTOR_LEN {
            return Err(RelayError::Config(format!(
                "the descriptor would be {len} bytes, over the authorities' limit of {MAX_DESCRIPTOR_LEN}: shorten exit_policy or family"
            )));
        }
        Ok(doc)
    }

    /// Upload the descriptor to every authority; true if all took it. A
    /// failure is logged at INFO while `quiet` (an authority that is not up
    /// yet is normal at start), at WARN once it persists.
    async fn publish(&self, quiet: bool) -> bool {
        let doc = match self.descriptor(unix_now()) {
            Ok(d) => d.to_bytes(),
            Err(e) => {
                warn!("building descriptor: {e}");
                return false;
            }
        };
        let mut all = true;
        let mut accepted = 0;
        for a in &self.cfg.authorities {
            match http::post_descriptor(a.addr, doc.clone()).await {
                Ok(()) => {
                    accepted += 1;
                    debug!(authority = %a.name, "descriptor published")
                }
                Err(e) => {
                    if quiet {
                        info!(authority = %a.name, "publishing descriptor (will retry): {e}");
                    } else {
                        warn!(authority = %a.name, "publishing descriptor: {e}");
                    }
                    all = false;
                }
            }
        }
        if !self.cfg.authorities.is_empty() {
            self.standing.uploaded(accepted, self.cfg.authorities.len());
        }
        all
    }

    /// Say how each new consensus lists this relay, when that changes, and
    /// the heartbeat every `heartbeat_secs` and on SIGUSR1.
    async fn report(&self) {
        let mut consensus = self.ctx.net.subscribe();
        let beats = self.cfg.heartbeat_secs > 0;
        let period = Duration::from_secs(self.cfg.heartbeat_secs.max(1));
        let mut next_beat = tokio::time::Instant::now() + period;
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok();
        let addr = self.cfg.advertised().unwrap_or(self.cfg.listen);
        // The ORPort self-test: once the consensus lists this relay here
        // and the other relays have had time to fetch it
        // ([`first_test_in`]), then hourly; while it fails, again after
        // 10 s, 20 s, 40 s, then every minute.
        let mut test: Option<tokio::task::JoinHandle<crate::selftest::Verdict>> = None;
        let mut next_test = tokio::time::Instant::now();
        let mut tried = false;
        let mut failures = 0u32;
        // Whether the consensus before the one held listed this relay here,
        // and whether the one held does.
        let (mut listed_before, mut listed) = (false, false);
        loop {
            let asked = async {
                match usr1.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let idle = test.is_none();
            let tested = async {
                match test.as_mut() {
                    Some(t) => t
                        .await
                        .unwrap_or_else(|e| crate::selftest::Verdict::Unknown(e.to_string())),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = consensus.changed() => {
                    if r.is_err() {
                        return std::future::pending().await;
                    }
                    let c = consensus.borrow_and_update().clone();
                    if let Some(c) = c {
                        self.standing.listed(&c, &self.ctx.identity_pub, addr);
                        (listed_before, listed) = (listed, self.listed_at(&c, addr));
                        if !tried && listed {
                            let wait = first_test_in(&c, unix_now_ms(), rand::random());
                            next_test = tokio::time::Instant::now() + wait;
                            tried = true;
                        } else if test.is_none() && tried && tokio::time::Instant::now() >= next_test {
                            test = self.start_self_test(&c, addr, !listed_before);
                        }
                    }
                }
                // Due again between consensuses (hourly ones, in a real network).
                () = tokio::time::sleep_until(next_test), if idle && tried => {
                    next_test = tokio::time::Instant::now() + retest_after(failures.max(3));
                    if let Some(c) = self.ctx.net.consensus() {
                        test = self.start_self_test(&c, addr, !listed_before);
                    }
                }
                r = tested => {
                    test = None;
                    let ok = matches!(r, crate::selftest::Verdict::Reachable(_));
                    self.standing.self_tested(r);
                    failures = if ok { 0 } else { failures.saturating_add(1) };
                    next_test = tokio::time::Instant::now() + retest_after(failures);
                }
                () = tokio::time::sleep_until(next_beat), if beats => {
                    self.heartbeat();
                    next_beat += period;
                }
                Some(()) = asked => self.heartbeat(),
            }
        }
    }

    /// Whether `c` lists this relay at `addr`.
    fn listed_at(&self, c: &allium_proto::Consensus, addr: SocketAddr) -> bool {
        let me = self.ctx.identity_pub;
        c.relays.iter().any(|r| r.identity == me && r.addr == addr)
    }

    /// Start the self-test through a Running relay other than this one, if
    /// `c` lists this relay at `addr`; `newly` if the consensus before did
    /// not (other relays may still hold that one).
    fn start_self_test(
        &self,
        c: &allium_proto::Consensus,
        addr: SocketAddr,
        newly: bool,
    ) -> Option<tokio::task::JoinHandle<crate::selftest::Verdict>> {
        use allium_proto::RelayFlags;
        use rand::seq::IndexedRandom;
        let me = self.ctx.identity_pub;
        if !self.listed_at(c, addr) {
            return None;
        }
        // A relay that would reuse a link this one opened proves nothing:
        // go through one that must open its own, if there is one, else
        // through one whose link from this relay carries no circuit (each
        // ranked once: links come and go meanwhile).
        let channels = &self.ctx.channels;
        let ranked: Vec<(u8, &ConsensusRelay)> = c
            .relays
            .iter()
            .filter(|r| r.identity != me && r.flags.has(RelayFlags::RUNNING))
            .map(|r| match channels.opened_to(&RelayId(r.identity)) {
                None => (0, r),
                Some(false) => (1, r),
                Some(true) => (2, r),
            })
            .collect();
        let best = ranked.iter().map(|(k, _)| *k).min()?;
        let others: Vec<&ConsensusRelay> = ranked
            .into_iter()
            .filter_map(|(k, r)| (k == best).then_some(r))
            .collect();
        let via = *others.choose(&mut rand::rng())?;
        // With no such relay (a small network, where this one opened links
        // to all the others), close the link to the one chosen if it
        // carries no circuit, so that it opens its own (waiting at most 2 s
        // for the close; a link that stays makes the test inconclusive).
        let closing = self.ctx.channels.close_if_idle(&RelayId(via.identity));
        let via = crate::selftest::Hop::from(via);
        let desc = self.descriptor(unix_now()).ok()?;
        let d = UnverifiedDescriptor::parse(&desc.to_bytes()).ok()?;
        let mine = crate::selftest::Hop::from(d.descriptor());
        let inbound = self.ctx.self_test.clone();
        let lag_until = if newly {
            crate::selftest::others_may_lag_until(c)
        } else {
            0
        };
        Some(tokio::spawn(async move {
            if let Some(h) = closing {
                h.closed_within(Duration::from_secs(2)).await;
            }
            crate::selftest::through(&via, &mine, &inbound)
                .await
                .unless_lagging(lag_until, unix_now_ms())
        }))
    }

    fn heartbeat(&self) {
        let s = &self.ctx.stats;
        let open = RelayStats::get(&s.circuits_created)
            .saturating_sub(RelayStats::get(&s.circuits_destroyed));
        info!("{}", self.standing.heartbeat(s, open));
    }

    fn maybe_rotate_onion(&self) -> bool {
        let now = unix_now();
        let mut set = self.ctx.onion.write().unwrap_or_else(|p| p.into_inner());
        if now < set.created + self.cfg.onion_key_lifetime_secs {
            return false;
        }
        match self.keys.rotate_onion(&mut set, now) {
            Ok(()) => {
                info!("onion key rotated");
                true
            }
            Err(e) => {
                warn!("rotating onion key: {e}");
                false
            }
        }
    }

    /// Bind the listener and serve until an error.
    pub async fn run(self) -> Result<(), RelayError> {
        let listener = allium_link::listen::bind(self.cfg.listen).map_err(|e| {
            RelayError::Config(format!("cannot listen on {}: {e}", self.cfg.listen))
        })?;
        self.serve(listener).await
    }

    /// Serve on an already bound listener.
    pub async fn serve(self, listener: TcpListener) -> Result<(), RelayError> {
        let _stop = StopOnDrop(self.ctx.clone());
        info!(nickname = %self.cfg.nickname, id = %allium_proto::short_id(&self.ctx.identity_pub), "relay listening");
        if self.cfg.authorities.is_empty() {
            warn!(
                "no directory authorities configured: this relay publishes its descriptor nowhere, \
                 is in no consensus and so carries no client's traffic, and checks the relays it \
                 extends to by their identity proof alone"
            );
        }
        let ctx = self.ctx.clone();
        let accept = async move {
            let gate = allium_link::listen::Gate::process();
            loop {
                let (s, peer, slot) = allium_link::listen::accept(&listener, &gate).await;
                // Refused before any handshake work: just close.
                let Some(conn) = ctx.dos.connection(peer.ip()) else {
                    drop(s);
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(
                    async move {
                        // The link holds its place for as long as it lives.
                        let slot = std::sync::Arc::new(slot);
                        let conn = conn.hold(slot.clone());
                        let hs =
                            channel::accept(s, &ctx.link, inbound_create_handler(&ctx), Some(conn));
                        let Some(r) = slot.unless_shed(hs).await else {
                            debug!("inbound link shed during its handshake to make room");
                            return;
                        };
                        slot.busy();
                        match r {
                            Ok(h) => {
                                if let Some(id) = h.peer() {
                                    ctx.channels.insert(id, h);
                                }
                            }
                            Err(e) => {
                                RelayStats::inc(&ctx.stats.link_handshake_failures, 1);
                                debug!("inbound link failed: {e}");
                            }
                        }
                    }
                    .in_current_span(),
                );
            }
            #[allow(unreachable_code)]
            Ok::<(), RelayError>(())
        };
        let publish = async {
            let period = Duration::from_secs(self.cfg.publish_interval_secs);
            let check = Duration::from_secs(self.cfg.onion_key_lifetime_secs.clamp(1, 60));
            let mut last = None::<Instant>;
            // After a failed upload, try again soon, backing off to the period.
            let mut retry: Option<(Instant, Duration)> = None;
            let mut failed_in_a_row = 0u32;
            loop {
                let rotated = self.maybe_rotate_onion();
                let now = Instant::now();
                let due = rotated
                    || last.is_none_or(|t| now >= t + period)
                    || retry.is_some_and(|(at, _)| now >= at);
                if due {
                    let ok = self.publish(failed_in_a_row < 3).await;
                    failed_in_a_row = if ok { 0 } else { failed_in_a_row + 1 };
                    last = Some(now);
                    retry = if ok {
                        None
                    } else {
                        let wait =
                            retry.map_or(Duration::from_secs(1), |(_, w)| (w * 2).min(period));
                        Some((now + wait, wait))
                    };
                }
                let mut sleep = check.min(period);
                if let Some((at, _)) = retry {
                    sleep = sleep.min(at.saturating_duration_since(Instant::now()));
                }
                tokio::time::sleep(sleep).await;
            }
        };
        let metrics = async {
            match self.cfg.metrics_listen {
                Some(a) => {
                    allium_link::metrics::serve(
                        a,
                        crate::metrics::relay_registry(
                            self.ctx.stats.clone(),
                            self.ctx.mem.clone(),
                            self.ctx.net.cache().clone(),
                            self.ctx.net.service_directory(),
                            self.ctx.points.clone(),
                        ),
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let dir = async {
            let Some(addr) = self.cfg.dir_listen else {
                return std::future::pending().await;
            };
            let l = tokio::net::TcpListener::bind(addr).await?;
            info!(%addr, "serving the consensus as a fallback directory");
            self.serve_dir(l).await
        };
        tokio::select! {
            r = accept => r,
            r = dir => r,
            () = publish => Ok(()),
            () = self.ctx.net.run() => Ok(()),
            () = self.report() => Ok(()),
            r = metrics => r.map_err(RelayError::from),
        }
    }

    /// Answer consensus requests on `l` (`dir_listen`) from the cache, one
    /// per connection, each within [`cache::STREAM_TIMEOUT`], under the same
    /// per-address and process-wide connection limits as the ORPort.
    async fn serve_dir(&self, l: tokio::net::TcpListener) -> Result<(), RelayError> {
        let gate = allium_link::listen::Gate::process();
        loop {
            let (s, peer, slot) = allium_link::listen::accept(&l, &gate).await;
            let Some(conn) = self.ctx.dos.connection(peer.ip()) else {
                continue;
            };
            let cache = self.ctx.net.cache().clone();
            tokio::spawn(
                async move {
                    let _conn = conn;
                    slot.busy();
                    // Consensuses only: services are reached over circuits.
                    cache::serve_stream(cache, None, s).await;
                }
                .in_current_span(),
            );
        }
    }
}

/// How long from `now_ms` (milliseconds since the UNIX epoch) until the
/// first self-test once consensus `c` lists the relay: not before the
/// other relays may have fetched it (a relay still holding the one before
/// refuses to extend to one it does not list, which proves nothing), then
/// at a moment `r` picks in the caches' fetch window, so that the relays a
/// new consensus lists together do not all test at once.
fn first_test_in(c: &allium_proto::Consensus, now_ms: u64, r: u64) -> Duration {
    let from = crate::selftest::others_may_lag_until(c).max(now_ms);
    let spread = allium_directory::http::cache_spread_ms(c).max(1);
    Duration::from_millis(from - now_ms + r % spread)
}

/// When the ORPort self-test runs again after `failures` failures in a row:
/// an hour after a success, then 10 s, 20 s, 40 s, and every minute.
fn retest_after(failures: u32) -> Duration {
    if failures == 0 {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs((10u64 << (failures - 1).min(3)).min(60))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failing_self_test_is_retried_soon_then_every_minute() {
        let secs: Vec<u64> = (0..6).map(|f| super::retest_after(f).as_secs()).collect();
        assert_eq!(secs, [3600, 10, 20, 40, 60, 60]);
    }

    /// The first test comes once the others may hold the consensus that
    /// lists the relay (its caches' window and 10 s after it takes effect),
    /// spread over the caches' window; at once plus the spread if that
    /// time is past.
    #[test]
    fn the_first_self_test_waits_for_the_others_to_fetch_the_consensus() {
        let c = allium_proto::Consensus {
            valid_after: 1000,
            fresh_until: 1008,
            valid_until: 1024,
            relays: vec![],
            weights: Default::default(),
            shared_random: Default::default(),
        };
        let ms = |now, r| super::first_test_in(&c, now, r).as_millis();
        // The window is an eighth of the 8 s period: 1 s.
        assert_eq!(ms(1_000_000, 0), 11_000);
        assert_eq!(ms(1_000_500, 999), 11_499);
        assert_eq!(ms(1_000_500, 1000), 10_500);
        assert_eq!(ms(1_020_000, 250), 250);
    }
}
