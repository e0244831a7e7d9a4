//! The directory authority (`allium dirauth`).
//!
//! Every `interval_secs` (`I`), aligned to the clock (`period_offset_secs`
//! after its multiples), the authorities agree on the consensus that
//! becomes valid at the next boundary `V`, in the
//! last `voting_secs` (`D`) before it, while every known relay's
//! reachability is tested all along:
//!
//! 1. at `V - D`: sign a vote with the reachability found so far, push it
//!    to the other authorities (`POST /vote`);
//! 2. at `V - D/2`: fetch the votes still missing (`GET /vote/V`); with
//!    votes from more than half of the authorities fetch the descriptors
//!    they name that this one lacks (`GET /descriptors/...`), compute the
//!    consensus ([`allium_proto::vote::compute_consensus`]), sign it and
//!    push the detached signature (`POST /signature`);
//! 3. at `V - D/4` and at `V`: fetch missing signatures
//!    (`GET /signature/V`), then publish the consensus if more than half of
//!    the authorities signed it; otherwise keep serving the last one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_proto::doc::{
    AuthSigned, CONSENSUS_DOMAIN, MAX_CONSENSUS_RELAYS, VOTE_DOMAIN, VerifiedDescriptor,
};
use allium_proto::policy::is_private;
use allium_proto::vote::shared_random::{self, Round, SharedRandom};
use allium_proto::vote::{Vote, VoteRelay, compute_consensus, listed};
use allium_proto::{
    AuthorityKey, AuthoritySig, LinkKey, OnionKey, RelayFlags, RelayId, UnverifiedConsensus,
    UnverifiedDescriptor, short_id,
};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cache::ConsensusCache;
use crate::descstore::{DescriptorStore, VoteStore};
use crate::keys::Signer;
use crate::metrics::{self, AuthStats};
use crate::serve::{self, HttpLimits, RateLimiter, host_key};
use crate::{AuthorityEntry, DirError, http, measure, reach, store, unix_now};

/// `allium dirauth` configuration (TOML). See `examples/dirauth.toml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub nickname: String,
    /// Where the directory HTTP server listens.
    pub listen: SocketAddr,
    /// The signing key, its certificate and the state live here.
    pub data_dir: PathBuf,
    /// Every authority of the network, this one included.
    pub authorities: Vec<AuthorityEntry>,
    /// A consensus is made every this many seconds.
    pub interval_secs: u64,
    /// A consensus stays valid for this many intervals.
    pub valid_intervals: u64,
    /// Each period's votes are made this many seconds before it starts
    /// (the consensus is computed halfway from there, the signatures are
    /// gathered at three quarters): the shorter, the fresher what the
    /// votes say of the relays, as long as the votes, the missing
    /// descriptors and the signatures still cross in time. At most the
    /// interval; by default the interval, at most 600 s. Every authority
    /// of a network must use the same: one that votes later than the
    /// others compute is left out of their consensus.
    pub voting_secs: Option<u64>,
    /// Periods start this many seconds after a multiple of the interval
    /// (less than the interval; 0 by default). Every authority of a network
    /// must use the same. A test network sets it so that its first votes
    /// fall just after its new relays were tested, not up to a period
    /// later (as Tor's `TestingV3AuthVotingStartOffset`).
    pub period_offset_secs: u64,
    /// Descriptors older than this are dropped.
    pub descriptor_max_age_secs: u64,
    /// Relays held at most. When the table is full, a new relay takes the
    /// place of one that was tested and found unreachable; with none, it
    /// is refused (Running relays keep their places).
    pub max_relays: usize,
    /// List relays at private addresses (loopback, RFC 1918...), and test
    /// and measure them there: only for a test network on one machine.
    /// Otherwise an uploader could make the authority probe its own
    /// network.
    pub allow_private_addresses: bool,
    /// Relay identities (hex) this authority refuses to list.
    pub reject: Vec<String>,
    /// Relay identities (hex) this authority votes BadExit.
    pub bad_exits: Vec<String>,
    /// Guard needs this much continuous reachability and bandwidth.
    pub guard_min_uptime_secs: u64,
    pub guard_min_bandwidth: u32,
    /// Stable needs this much continuous reachability.
    pub stable_min_uptime_secs: u64,
    /// Fast needs this much bandwidth.
    pub fast_min_bandwidth: u32,
    /// HSDir (stores onion service descriptors) needs this much continuous
    /// reachability, as Tor's `MinUptimeHidServDirectoryV2`.
    pub hsdir_min_uptime_secs: u64,
    /// HTTP requests allowed per second from one address, and the burst.
    pub requests_per_sec: u32,
    pub request_burst: u32,
    /// Open HTTP connections at most, in all and from one host (an IPv6
    /// /64 counts as one host); more are closed at once.
    pub max_connections: usize,
    pub max_connections_per_addr: usize,
    /// Relays on one IP address voted Running at most (the ones Running
    /// longest); the others are listed without Running, Guard or Stable.
    pub max_relays_per_addr: usize,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address.
    pub metrics_allow_remote: bool,
    /// One bandwidth measurement lasts at most this long, and sends at
    /// most this many bytes (see `measure.rs`).
    pub measure_ms: u64,
    pub measure_max_bytes: u64,
    /// Each relay is measured again after this many seconds; a measurement
    /// is voted for three times as long.
    pub remeasure_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nickname: "auth".into(),
            listen: "127.0.0.1:7000".parse().expect("valid address"),
            data_dir: PathBuf::from("allium-dirauth"),
            authorities: vec![],
            interval_secs: 3600,
            valid_intervals: 3,
            voting_secs: None,
            period_offset_secs: 0,
            descriptor_max_age_secs: 48 * 3600,
            max_relays: MAX_CONSENSUS_RELAYS,
            allow_private_addresses: false,
            reject: vec![],
            bad_exits: vec![],
            guard_min_uptime_secs: 8 * 24 * 3600,
            guard_min_bandwidth: 2_000_000,
            stable_min_uptime_secs: 5 * 24 * 3600,
            fast_min_bandwidth: 100_000,
            hsdir_min_uptime_secs: 96 * 3600,
            requests_per_sec: 20,
            request_burst: 200,
            max_connections: 1024,
            max_connections_per_addr: 16,
            max_relays_per_addr: 2,
            metrics_listen: None,
            metrics_allow_remote: false,
            measure_ms: 1000,
            measure_max_bytes: 64 << 20,
            remeasure_secs: 6 * 3600,
        }
    }
}

impl AuthConfig {
    /// How long before its period a round votes: `voting_secs`, or the
    /// interval, at most 600 s.
    pub fn voting(&self) -> u64 {
        self.voting_secs
            .unwrap_or(DEFAULT_VOTING_SECS)
            .min(self.interval_secs)
    }

    /// The first period to start after `now` (seconds since the epoch).
    pub fn period_after(&self, now: u64) -> u64 {
        let (i, off) = (self.interval_secs.max(1), self.period_offset_secs);
        (now.saturating_sub(off) / i + 1) * i + off
    }

    /// Whether the values are usable: the periods, `max_relays`, the
    /// metrics address (keys and files are checked when loaded).
    pub fn check(&self) -> Result<(), DirError> {
        if self.interval_secs < 2 || self.valid_intervals == 0 {
            return Err(DirError::Config(
                "interval_secs must be at least 2 and valid_intervals positive".into(),
            ));
        }
        if self
            .voting_secs
            .is_some_and(|v| !(2..=self.interval_secs).contains(&v))
        {
            return Err(DirError::Config(
                "voting_secs must be at least 2 and at most interval_secs".into(),
            ));
        }
        if self.period_offset_secs >= self.interval_secs {
            return Err(DirError::Config(
                "period_offset_secs must be less than interval_secs".into(),
            ));
        }
        allium_link::metrics::check_listen(self.metrics_listen, self.metrics_allow_remote)
            .map_err(|e| match e {
                allium_link::LinkError::Config(why) => DirError::Config(why),
                other => DirError::Config(other.to_string()),
            })?;
        if !(1..=MAX_CONSENSUS_RELAYS).contains(&self.max_relays) {
            return Err(DirError::Config(format!(
                "max_relays must be 1 to {MAX_CONSENSUS_RELAYS} (what a vote may list)"
            )));
        }
        Ok(())
    }
}

#[derive(Default, Clone, Copy)]
struct Reach {
    ok_at: Option<u64>,
    running_since: Option<u64>,
    /// When it is to be tested next (0: never tested, first of all).
    due_at: u64,
}

struct Pending {
    valid_after: u64,
    doc: AuthSigned,
    /// The body's SHA-256, which signatures sign.
    digest: [u8; 32],
}

/// The votes for one period by authority: parsed and as received.
type VotesOfPeriod = BTreeMap<[u8; 32], (Vote, Bytes)>;

#[derive(Default)]
struct AuthState {
    descriptors: BTreeMap<[u8; 32], Arc<VerifiedDescriptor>>,
    /// By digest: the descriptors that the votes held name, which this
    /// authority had when it voted or fetched from another authority for
    /// a consensus (a relay may have replaced or dropped one since).
    named: HashMap<[u8; 32], Arc<VerifiedDescriptor>>,
    reach: HashMap<[u8; 32], Reach>,
    /// Our bandwidth measurements: bytes per second, when, and at which
    /// address (a relay that moves is measured again).
    measured: HashMap<[u8; 32], (u32, u64, SocketAddr)>,
    /// When each relay was last measured or tried.
    measure_tried: HashMap<[u8; 32], u64>,
    /// Votes by period, then by authority: parsed and as received.
    votes: BTreeMap<u64, VotesOfPeriod>,
    /// Our detached signature by period.
    own_sigs: BTreeMap<u64, Bytes>,
    pending: Option<Pending>,
    /// Our secret for a shared-random run: the run, the secret.
    sr_secret: Option<(u64, [u8; 32])>,
    /// The shared-random part of the latest consensus we published, and
    /// its valid-after.
    sr_held: Option<(u64, SharedRandom)>,
    /// When a reachability test last could not be made (said once a
    /// minute).
    reach_not_made: Option<u64>,
}

/// Where our shared-random secret is kept.
const SR_SECRET_FILE: &str = "state/shared-random";

/// How long before its period a round votes, when `voting_secs` is not
/// set and the interval is longer: Tor's vote and distribution delays.
const DEFAULT_VOTING_SECS: u64 = 600;

/// Relays retested at once, at most ([`Authority::reach_loop`]).
const REACH_AT_ONCE: usize = 64;
/// Retests a second an authority aims at, at most: past this many relays
/// per period, the period between a relay's tests grows with the table.
/// (A real network's 50,000 relays need 84 a second at the 10-minute
/// floor; a test network's 3-second period would otherwise have its
/// authorities spend a core each testing a few thousand relays.)
const RETESTS_PER_SEC: u64 = 100;

/// A running authority's shared state.
pub struct Authority {
    cfg: AuthConfig,
    pinned: Vec<AuthorityKey>,
    identity: [u8; 32],
    signer: Mutex<Signer>,
    rejected: Vec<[u8; 32]>,
    bad_exits: Vec<[u8; 32]>,
    state: Mutex<AuthState>,
    /// Descriptors on disk; taken before `state` is let go, so that writes
    /// land in the order of the changes they record.
    disk: Mutex<DescriptorStore>,
    /// Votes on disk, one file each, written with `state` let go.
    vote_disk: VoteStore,
    limiter: Mutex<RateLimiter>,
    stats: Arc<AuthStats>,
    /// The published consensus, its predecessors and the diffs from them.
    cache: Arc<ConsensusCache>,
    /// Relays in the table, as of the last scan for tests.
    held: std::sync::atomic::AtomicUsize,
    /// The valid-after of the voting round in progress: when its
    /// consensus is to be published.
    publishing: std::sync::atomic::AtomicU64,
}

fn parse_id(s: &str) -> Result<[u8; 32], DirError> {
    hex::decode(s.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| DirError::Config(format!("{s:?} is not a 64-digit hex relay identity")))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn sleep_until_unix_ms(target_ms: u64) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if target_ms > now_ms {
        tokio::time::sleep(Duration::from_millis(target_ms - now_ms)).await;
    }
}

impl Authority {
    /// Load the signing key, certificate and persisted state. No network.
    pub fn new(cfg: AuthConfig) -> Result<Self, DirError> {
        cfg.check()?;
        let signer = Signer::load(&cfg.data_dir)?;
        let pinned = crate::authority_keys(&cfg.authorities)?;
        let identity = signer.parsed.identity;
        if !pinned.contains(&AuthorityKey(identity)) {
            return Err(DirError::Config(format!(
                "this authority's identity {} is not in its own authorities list",
                hex::encode(identity)
            )));
        }
        let rejected = cfg
            .reject
            .iter()
            .map(|s| parse_id(s))
            .collect::<Result<_, _>>()?;
        let bad_exits = cfg
            .bad_exits
            .iter()
            .map(|s| parse_id(s))
            .collect::<Result<_, _>>()?;
        let mut st = AuthState::default();
        let now = unix_now();
        let mut disk = DescriptorStore::new(&cfg.data_dir.join("state"));
        for (file, d) in disk.load()? {
            match UnverifiedDescriptor::parse(&d)
                .and_then(|u| u.verify(now, cfg.descriptor_max_age_secs))
            {
                Ok(v)
                    if v.desc.identity == file
                        && (cfg.allow_private_addresses || !is_private(v.desc.addr.ip())) =>
                {
                    st.descriptors.insert(v.desc.identity, Arc::new(v));
                }
                // Too old by now, or not what it should be.
                _ => disk.remove(&file)?,
            }
        }
        let cache = Arc::new(ConsensusCache::default());
        if let Ok(b) = std::fs::read(cfg.data_dir.join("state/consensus")) {
            let (valid_until, held) = match UnverifiedConsensus::parse(&b).and_then(|u| {
                let at = u.peek().valid_after;
                u.verify(&pinned, at)
            }) {
                Ok(c) => (c.valid_until, Some((c.valid_after, c.shared_random))),
                Err(_) => (0, None),
            };
            st.sr_held = held;
            cache.install(Bytes::from(b), valid_until);
        }
        if let Ok(b) = std::fs::read(cfg.data_dir.join(SR_SECRET_FILE)) {
            st.sr_secret = postcard::from_bytes(&b).ok();
        }
        let vote_disk = VoteStore::new(&cfg.data_dir.join("state"));
        for v in vote_disk.load()? {
            if let Ok(vote) = Vote::verify(&v, &pinned, now) {
                st.votes
                    .entry(vote.valid_after)
                    .or_default()
                    .insert(vote.authority, (vote, Bytes::from(v)));
            }
        }
        info!(descriptors = st.descriptors.len(), "authority state loaded");
        let limiter = RateLimiter::new(cfg.requests_per_sec, cfg.request_burst, Instant::now());
        Ok(Authority {
            cfg,
            pinned,
            identity,
            signer: Mutex::new(signer),
            rejected,
            bad_exits,
            held: st.descriptors.len().into(),
            state: Mutex::new(st),
            disk: Mutex::new(disk),
            vote_disk,
            limiter: Mutex::new(limiter),
            stats: Arc::default(),
            cache,
            publishing: 0.into(),
        })
    }

    /// This authority's identity key (what clients pin).
    pub fn identity(&self) -> [u8; 32] {
        self.identity
    }

    /// The counters behind this authority's metrics.
    pub fn stats(&self) -> &Arc<AuthStats> {
        &self.stats
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Keep a vote taken or made on disk (so that a restart within the
    /// round does not lose it): its own file, written without the state.
    fn persist_vote(&self, valid_after: u64, authority: &[u8; 32], bytes: &[u8]) {
        if let Err(e) = self.vote_disk.put(valid_after, authority, bytes) {
            warn!("persisting a vote: {e}");
        }
    }

    /// Take an uploaded descriptor. `Err` holds the HTTP status and reason.
    pub fn accept_descriptor(
        &self,
        body: &[u8],
        now: u64,
    ) -> Result<&'static str, (StatusCode, String)> {
        let bad =
            |e: allium_proto::Error| (StatusCode::BAD_REQUEST, format!("descriptor rejected: {e}"));
        let v = UnverifiedDescriptor::parse(body)
            .map_err(bad)?
            .verify(now, self.cfg.descriptor_max_age_secs)
            .map_err(bad)?;
        if !self.cfg.allow_private_addresses && is_private(v.desc.addr.ip()) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "descriptor rejected: address {} is not public",
                    v.desc.addr.ip()
                ),
            ));
        }
        if self.rejected.contains(&v.desc.identity) {
            return Err((
                StatusCode::FORBIDDEN,
                "descriptor rejected: relay identity is rejected by this authority".into(),
            ));
        }
        let mut st = lock(&self.state);
        let mut evicted = None;
        let full = st.descriptors.len() >= self.cfg.max_relays.max(1);
        let stale = if full && !st.descriptors.contains_key(&v.desc.identity) {
            // Stale descriptors do not count toward a full table.
            Self::drop_stale(&mut st, self.cfg.descriptor_max_age_secs, now)
        } else {
            Vec::new()
        };
        match st.descriptors.get(&v.desc.identity) {
            Some(old) if old.digest == v.digest => return Ok("already known"),
            Some(old) if old.desc.published >= v.desc.published => {
                return Err((
                    StatusCode::CONFLICT,
                    "descriptor rejected: not newer than the one held (replay?)".into(),
                ));
            }
            None if st.descriptors.len() >= self.cfg.max_relays.max(1) => {
                let Some(out) = self.evictable(&st, now) else {
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "descriptor rejected: relay table full of relays reachable or not tested yet".into(),
                    ));
                };
                debug!(id = %short_id(&out), "unreachable relay dropped to make room");
                st.descriptors.remove(&out);
                st.reach.remove(&out);
                evicted = Some(out);
            }
            _ => {}
        }
        let id = v.desc.identity;
        let (nickname, short) = (v.desc.nickname.clone(), short_id(&id));
        let bytes = v.bytes.clone();
        if st.descriptors.insert(id, Arc::new(v)).is_none() {
            info!(relay = %nickname, id = %short, "descriptor of a new relay accepted");
        } else {
            // Relays republish on a schedule: routine.
            debug!(relay = %nickname, id = %short, "descriptor updated");
        }
        AuthStats::set(&self.stats.descriptors_held, st.descriptors.len() as u64);
        // To disk one record at a time, in the order of the table's
        // changes, with the table free for readers meanwhile.
        let mut disk = lock(&self.disk);
        drop(st);
        let written = stale
            .iter()
            .chain(&evicted)
            .try_for_each(|out| disk.remove(out))
            .and_then(|()| disk.put(&id, &bytes));
        if let Err(e) = written {
            warn!("persisting descriptors: {e}");
        }
        Ok("accepted")
    }

    /// The relay to drop when the table is full: among those tested and not
    /// reached within [`Authority::reach_window`], the one unreachable longest (then
    /// published earliest). Relays not tested yet and Running relays are
    /// never dropped.
    fn evictable(&self, st: &AuthState, now: u64) -> Option<[u8; 32]> {
        st.descriptors
            .values()
            .filter_map(|d| {
                let r = st.reach.get(&d.desc.identity)?;
                let reached = r.ok_at.unwrap_or(0);
                (reached + self.reach_window() < now).then_some((
                    reached,
                    d.desc.published,
                    d.desc.identity,
                ))
            })
            .min()
            .map(|(_, _, id)| id)
    }

    /// The period a vote sent now should be for.
    fn upcoming(&self, now: u64) -> u64 {
        self.cfg.period_after(now)
    }

    /// Take a vote pushed by another authority.
    pub fn accept_vote(&self, body: &[u8], now: u64) -> Result<&'static str, (StatusCode, String)> {
        let v = Vote::verify(body, &self.pinned, now)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("vote rejected: {e}")))?;
        let expected = self.upcoming(now);
        if v.valid_after < expected {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "vote rejected: for period {} which is over (replay?)",
                    v.valid_after
                ),
            ));
        }
        if v.valid_after > expected + self.cfg.interval_secs {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("vote rejected: future-dated period {}", v.valid_after),
            ));
        }
        // Periods start at multiples of the interval (plus the offset): any
        // other time would be one more slot a vote could fill.
        if v.valid_after % self.cfg.interval_secs != self.cfg.period_offset_secs {
            return Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "vote rejected: {} is not the start of a period",
                    v.valid_after
                ),
            ));
        }
        let mut st = lock(&self.state);
        let slot = st.votes.entry(v.valid_after).or_default();
        match slot.get(&v.authority) {
            Some((_, old)) if old.as_ref() == body => return Ok("already known"),
            Some(_) => {
                return Err((
                    StatusCode::CONFLICT,
                    "vote rejected: a different vote from that authority is held".into(),
                ));
            }
            None => {}
        }
        debug!(from = %short_id(&v.authority), period = v.valid_after, "vote accepted");
        let (va, authority) = (v.valid_after, v.authority);
        slot.insert(v.authority, (v, Bytes::copy_from_slice(body)));
        drop(st);
        self.persist_vote(va, &authority, body);
        Ok("accepted")
    }

    /// Take a detached signature on the consensus being assembled.
    pub fn accept_signature(
        &self,
        body: &[u8],
        now: u64,
    ) -> Result<&'static str, (StatusCode, String)> {
        let s: AuthoritySig = postcard::from_bytes(body)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("signature rejected: {e}")))?;
        let mut st = lock(&self.state);
        let Some(p) = st.pending.as_mut() else {
            return Err((
                StatusCode::CONFLICT,
                "signature rejected: no consensus being assembled".into(),
            ));
        };
        s.check_digest(CONSENSUS_DOMAIN, &p.digest, &self.pinned, now)
            .map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("signature rejected: {e} (a different consensus?)"),
                )
            })?;
        p.doc.add(s);
        Ok("accepted")
    }

    /// Our measurement of relay `id`, if recent enough to vote.
    fn measurement(&self, st: &AuthState, id: &[u8; 32], now: u64) -> Option<u32> {
        let addr = st.descriptors.get(id)?.desc.addr;
        st.measured
            .get(id)
            .filter(|(_, at, a)| at + 3 * self.cfg.remeasure_secs >= now && *a == addr)
            .map(|(bw, _, _)| *bw)
    }

    /// Fast and Guard go by what we measured (at most what the relay
    /// declares), never by what it declares alone.
    fn flags_for(&self, d: &VerifiedDescriptor, r: Reach, measured: Option<u32>, now: u64) -> u16 {
        let desc = &d.desc;
        let mut f = RelayFlags::VALID;
        let running = r.ok_at.is_some_and(|t| t + self.reach_window() >= now);
        let up = r.running_since.map_or(0, |t| now.saturating_sub(t));
        if running {
            f |= RelayFlags::RUNNING;
        }
        let ports = desc.exit_policy.summary();
        if ports.allows(80) && ports.allows(443) {
            f |= RelayFlags::EXIT;
        }
        let bw = measured.map(|m| m.min(desc.bandwidth));
        if bw.is_some_and(|b| b >= self.cfg.fast_min_bandwidth) {
            f |= RelayFlags::FAST;
        }
        if running && up >= self.cfg.stable_min_uptime_secs {
            f |= RelayFlags::STABLE;
        }
        if running && up >= self.cfg.hsdir_min_uptime_secs {
            f |= RelayFlags::HSDIR;
        }
        if running
            && up >= self.cfg.guard_min_uptime_secs
            && bw.is_some_and(|b| b >= self.cfg.guard_min_bandwidth)
        {
            f |= RelayFlags::GUARD;
        }
        if self.bad_exits.contains(&desc.identity) {
            f |= RelayFlags::BAD_EXIT;
        }
        f
    }

    /// How often each relay's reachability is tested: every period, and at
    /// least every 10 minutes, but no more than [`RETESTS_PER_SEC`] tests
    /// a second.
    fn retest_secs(&self) -> u64 {
        let held = self.held.load(std::sync::atomic::Ordering::Relaxed) as u64;
        self.cfg
            .interval_secs
            .clamp(1, 600)
            .max(held.div_ceil(RETESTS_PER_SEC))
    }

    /// Seconds until relay `id` is tested again: the retest period less up
    /// to a quarter of it, by the relay's identity, so that relays first
    /// tested together (a network started at once) drift apart instead of
    /// coming due in the same second each period, thousands of handshakes
    /// at a time.
    fn retest_in(&self, id: &[u8; 32]) -> u64 {
        let every = self.retest_secs();
        let spread = u64::from_le_bytes(id[..8].try_into().unwrap_or_default());
        every - spread % (every / 4 + 1)
    }

    /// A relay reached within this long counts as Running: two retests
    /// and the time one may take (the tests are spread over time, so the
    /// last one of a relay may have come just before the previous vote).
    fn reach_window(&self) -> u64 {
        2 * self.retest_secs() + reach::REACH_TIMEOUT.as_secs()
    }

    /// Keep every relay's reachability fresh, spread over time instead of
    /// all at the start of a round: a relay is tested again when
    /// [`Authority::retest_in`] says, the earliest due first, at most
    /// [`REACH_AT_ONCE`] at a time (so the tests of a large network fit a
    /// file-descriptor limit and never hold up a vote). A relay new to the
    /// table, never tested, comes first, as soon as a test is free to start
    /// (within a quarter of a second of its upload when fewer are running):
    /// one found unreachable gives its place in a full table to a newcomer
    /// without waiting for a round. (A second loop that tested newcomers alone ran
    /// beside this one, and most newcomers were tested by both: at 5,000
    /// new relays, thousands of handshakes twice over.)
    ///
    /// The table is scanned for due relays only when a quarter of the
    /// slots are free (or none is taken), and every finished test is
    /// recorded at once: one scan per completed test made the loop, not
    /// the network, the limit (about 65 tests a second at 10,000 relays,
    /// too few to keep them all Running).
    async fn reach_loop(&self) {
        let mut set = tokio::task::JoinSet::new();
        let mut flying: std::collections::HashSet<[u8; 32]> = Default::default();
        loop {
            if set.len() <= REACH_AT_ONCE - REACH_AT_ONCE / 4 {
                let now = unix_now();
                let due: Vec<([u8; 32], SocketAddr, LinkKey)> = {
                    let st = lock(&self.state);
                    self.held
                        .store(st.descriptors.len(), std::sync::atomic::Ordering::Relaxed);
                    let mut due: Vec<(u64, &Arc<VerifiedDescriptor>)> = st
                        .descriptors
                        .values()
                        .filter(|d| !flying.contains(&d.desc.identity))
                        .filter_map(|d| {
                            let at = st.reach.get(&d.desc.identity).map_or(0, |r| r.due_at);
                            (at <= now).then_some((at, d))
                        })
                        .collect();
                    due.sort_by_key(|(t, _)| *t);
                    due.into_iter()
                        .take(REACH_AT_ONCE - set.len())
                        .map(|(_, d)| (d.desc.identity, d.desc.addr, d.desc.link_key))
                        .collect()
                };
                for (id, addr, key) in due {
                    flying.insert(id);
                    set.spawn(async move { (id, reach::test_relay(addr, RelayId(id), key).await) });
                }
            }
            if set.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            if let Ok(Some(Ok(first))) =
                tokio::time::timeout(Duration::from_millis(250), set.join_next()).await
            {
                let mut done = vec![first];
                while let Some(Ok(next)) = set.try_join_next() {
                    done.push(next);
                }
                for (id, _) in &done {
                    flying.remove(id);
                }
                self.record_all(done).await;
            }
        }
    }

    /// Record the tests in `done`; wait a second if any was not made (so
    /// that an authority out of descriptors does not retry at once).
    async fn record_all(&self, done: Vec<([u8; 32], reach::Verdict)>) {
        let mut made = true;
        for (id, r) in done {
            made &= self.record_reach(id, r);
        }
        if !made {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// What a reachability test of relay `id` found. False if the test
    /// was not made ([`reach::Verdict::NotMade`]): nothing is recorded, the relay
    /// is tested again soon, and the caller should wait a little.
    fn record_reach(&self, id: [u8; 32], r: reach::Verdict) -> bool {
        let now = unix_now();
        let mut st = lock(&self.state);
        if !st.descriptors.contains_key(&id) {
            return true;
        }
        let reached = match r {
            reach::Verdict::Reached => Ok(()),
            reach::Verdict::Unreachable(err) => Err(err),
            reach::Verdict::NotMade(why) => {
                if st.reach_not_made.is_none_or(|t| now >= t + 60) {
                    warn!(
                        "reachability tests not made: {why} (this authority's own limit, not the relays')"
                    );
                    st.reach_not_made = Some(now);
                }
                return false;
            }
        };
        let e = st.reach.entry(id).or_default();
        e.due_at = now + self.retest_in(&id);
        match reached {
            Ok(()) => {
                e.ok_at = Some(now);
                e.running_since.get_or_insert(now);
            }
            Err(err) => {
                if e.running_since.is_some() {
                    info!(id = %short_id(&id), "relay unreachable: {err}");
                }
                e.running_since = None;
            }
        }
        true
    }

    /// At most [`AuthConfig::max_relays_per_addr`] Running relays per IP
    /// address (an IPv4 address in any of its IPv6 forms counts as itself,
    /// and an IPv6 /64 as one address): the ones Running longest (then the
    /// lowest identities) keep
    /// the flag; the others lose Running, Guard, Stable and HSDir, so that
    /// one host cannot fill the network, or a stretch of the services'
    /// ring, with relays.
    fn limit_per_addr(&self, st: &AuthState, relays: &mut [VoteRelay]) {
        let max = self.cfg.max_relays_per_addr.max(1);
        let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        for (i, r) in relays.iter().enumerate() {
            if let (true, Some(d)) = (
                r.flags.has(RelayFlags::RUNNING),
                st.descriptors.get(&r.identity),
            ) {
                by_ip.entry(host_key(d.desc.addr.ip())).or_default().push(i);
            }
        }
        for (ip, mut idx) in by_ip {
            if idx.len() <= max {
                continue;
            }
            idx.sort_by_key(|&i| {
                let since = st
                    .reach
                    .get(&relays[i].identity)
                    .and_then(|r| r.running_since);
                (since.unwrap_or(u64::MAX), relays[i].identity)
            });
            debug!(%ip, relays = idx.len(), max, "too many relays on one address");
            for &i in &idx[max..] {
                let f = &mut relays[i].flags;
                *f = RelayFlags(
                    f.0 & !(RelayFlags::RUNNING
                        | RelayFlags::GUARD
                        | RelayFlags::STABLE
                        | RelayFlags::HSDIR),
                );
            }
        }
    }

    /// The relay to measure next, among those reachable in the last two
    /// rounds: the one whose last try is oldest, once `remeasure_secs` have
    /// passed (a failed try is repeated after a voting interval, at most a
    /// minute). A
    /// relay never tried ranks as if tried one period ago, so a flood of
    /// new relays cannot starve the others.
    fn next_to_measure(&self, now: u64) -> Option<([u8; 32], SocketAddr, LinkKey, OnionKey)> {
        let st = lock(&self.state);
        let period = self.cfg.remeasure_secs;
        st.descriptors
            .values()
            .filter(|d| !self.rejected.contains(&d.desc.identity))
            .filter(|d| {
                st.reach
                    .get(&d.desc.identity)
                    .and_then(|r| r.ok_at)
                    .is_some_and(|t| t + self.reach_window() >= now)
            })
            .filter_map(|d| {
                let id = d.desc.identity;
                let tried = st.measure_tried.get(&id).copied();
                let ok = st.measured.get(&id).is_some_and(|m| Some(m.1) == tried);
                // A failed try is repeated after a voting interval, at most
                // a minute: a relay must not wait long for its first figure.
                let retry = period.min(60).min(self.cfg.interval_secs);
                let wait = if ok { period } else { retry };
                let due = tried.is_none_or(|t| t + wait <= now);
                due.then_some((tried.unwrap_or(now.saturating_sub(period)), id, d))
            })
            .min_by_key(|(t, id, _)| (*t, *id))
            .map(|(_, id, d)| (id, d.desc.addr, d.desc.link_key, d.desc.onion_key))
    }

    /// Measure relays one at a time, forever: each measurement is followed
    /// by a pause as long as it may last, so measuring takes at most half
    /// of the time and one relay's capacity at once.
    async fn measure_loop(&self) {
        let pause = Duration::from_millis(self.cfg.measure_ms.max(10));
        let limits = measure::Limits {
            duration: pause,
            max_bytes: self.cfg.measure_max_bytes,
        };
        loop {
            let now = unix_now();
            let Some((id, addr, link_key, onion_key)) = self.next_to_measure(now) else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let r = measure::measure(addr, RelayId(id), &link_key, &onion_key, limits).await;
            {
                let mut st = lock(&self.state);
                st.measure_tried.insert(id, now);
                match r {
                    Ok(bw) => {
                        debug!(id = %short_id(&id), bytes_per_sec = bw, "relay measured");
                        st.measured.insert(id, (bw, now, addr));
                    }
                    // A failure is no reason to keep an older, better figure.
                    Err(e) => {
                        info!(id = %short_id(&id), "measurement failed: {e}");
                        st.measured.remove(&id);
                    }
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Our vote for the period starting at `valid_after`, signed.
    pub fn make_vote(&self, valid_after: u64, now: u64) -> Vec<u8> {
        let mut st = lock(&self.state);
        let stale = Self::drop_stale(&mut st, self.cfg.descriptor_max_age_secs, now);
        AuthStats::set(&self.stats.descriptors_held, st.descriptors.len() as u64);
        let AuthState {
            descriptors,
            measured,
            measure_tried,
            reach,
            ..
        } = &mut *st;
        measured.retain(|id, _| descriptors.contains_key(id));
        reach.retain(|id, _| descriptors.contains_key(id));
        measure_tried.retain(|id, _| descriptors.contains_key(id));
        let mut relays: Vec<VoteRelay> = st
            .descriptors
            .values()
            .filter(|d| !self.rejected.contains(&d.desc.identity))
            .map(|d| VoteRelay {
                identity: d.desc.identity,
                digest: d.digest,
                flags: RelayFlags(self.flags_for(
                    d,
                    st.reach.get(&d.desc.identity).copied().unwrap_or_default(),
                    self.measurement(&st, &d.desc.identity, now),
                    now,
                )),
                bandwidth: d.desc.bandwidth,
                measured: self.measurement(&st, &d.desc.identity, now),
            })
            .collect();
        self.limit_per_addr(&st, &mut relays);
        let interval = self.cfg.interval_secs;
        let round = Round::of(valid_after, interval);
        let secret = self.sr_secret(&mut st, round.run);
        let held = st.sr_held.as_ref().map(|(va, sr)| (*va, sr));
        let vote = Vote {
            authority: self.identity,
            valid_after,
            interval,
            valid_intervals: self.cfg.valid_intervals,
            relays,
            shared_random: shared_random::vote(round, interval, &self.identity, &secret, held),
        };
        let mut doc = vote.to_document();
        {
            let s = lock(&self.signer);
            doc.add(AuthoritySig::make(VOTE_DOMAIN, &doc.body, &s.cert, &s.key));
        }
        let bytes = doc.to_bytes();
        // Keep what the votes held name (those of other periods are gone
        // by now), and what this one does.
        let named: HashSet<[u8; 32]> = (st.votes.values().flat_map(|m| m.values()))
            .flat_map(|(v, _)| v.relays.iter().map(|r| r.digest))
            .collect();
        let AuthState {
            named: held,
            descriptors,
            ..
        } = &mut *st;
        held.retain(|d, _| named.contains(d));
        for r in &vote.relays {
            if let Some(d) = descriptors.get(&r.identity) {
                held.entry(d.digest).or_insert_with(|| d.clone());
            }
        }
        st.votes
            .entry(valid_after)
            .or_default()
            .insert(self.identity, (vote, Bytes::from(bytes.clone())));
        let mut disk = lock(&self.disk);
        drop(st);
        for id in stale {
            if let Err(e) = disk.remove(&id) {
                warn!("removing a stale descriptor: {e}");
            }
        }
        drop(disk);
        self.persist_vote(valid_after, &self.identity, &bytes);
        bytes
    }

    /// Our secret for shared-random run `run`: a new one for each run, kept
    /// on disk (0600) so that a restart does not lose our reveal.
    fn sr_secret(&self, st: &mut AuthState, run: u64) -> [u8; 32] {
        if let Some((r, s)) = st.sr_secret
            && r == run
        {
            return s;
        }
        use rand::RngExt;
        let mut secret = [0u8; 32];
        rand::rng().fill(&mut secret);
        st.sr_secret = Some((run, secret));
        let bytes = postcard::to_stdvec(&(run, secret)).unwrap_or_default();
        if let Err(e) = store::write_atomic(&self.cfg.data_dir.join(SR_SECRET_FILE), &bytes, 0o600)
        {
            warn!("persisting the shared-random secret: {e}");
        }
        secret
    }

    /// Forget the descriptors older than `max_age`; their relays.
    fn drop_stale(st: &mut AuthState, max_age: u64, now: u64) -> Vec<[u8; 32]> {
        let mut stale = Vec::new();
        st.descriptors.retain(|id, d| {
            let fresh = d.desc.published.saturating_add(max_age) >= now;
            if !fresh {
                stale.push(*id);
            }
            fresh
        });
        stale
    }

    fn peers(&self) -> Vec<(AuthorityKey, SocketAddr, String)> {
        self.cfg
            .authorities
            .iter()
            .filter_map(|a| a.parse_key().ok().map(|k| (k, a.addr, a.name.clone())))
            .filter(|(k, _, _)| k.0 != self.identity)
            .collect()
    }

    /// Fetch missing votes; if more than half of the authorities voted,
    /// compute and sign the consensus. Returns our detached signature.
    pub async fn assemble(&self, valid_after: u64) -> Option<Vec<u8>> {
        for (k, addr, name) in self.peers() {
            let have = lock(&self.state)
                .votes
                .get(&valid_after)
                .is_some_and(|m| m.contains_key(&k.0));
            if have {
                continue;
            }
            match http::fetch_vote(addr, valid_after).await {
                Ok(b) => match Vote::verify(&b, &self.pinned, unix_now()) {
                    Ok(v) if v.authority == k.0 && v.valid_after == valid_after => {
                        lock(&self.state)
                            .votes
                            .entry(valid_after)
                            .or_default()
                            .insert(v.authority, (v, Bytes::from(b)));
                    }
                    Ok(_) => {
                        warn!(authority = %name, "fetched vote is for another period or author")
                    }
                    Err(e) => warn!(authority = %name, "fetched vote rejected: {e}"),
                },
                Err(e) => debug!(authority = %name, "no vote: {e}"),
            }
        }
        let votes: Vec<Vote> = lock(&self.state)
            .votes
            .get(&valid_after)
            .map(|m| m.values().map(|(v, _)| v.clone()).collect())
            .unwrap_or_default();
        if 2 * votes.len() <= self.pinned.len() {
            warn!(
                votes = votes.len(),
                authorities = self.pinned.len(),
                "not enough votes for a consensus"
            );
            return None;
        }
        let held = self.descriptors_for(&votes).await;
        let c = match compute_consensus(&votes, |d| held.get(d).map(|v| &**v)) {
            Ok(c) => c,
            Err(e) => {
                warn!("computing consensus: {e}");
                return None;
            }
        };
        debug!(
            valid_after,
            relays = c.relays.len(),
            running = c
                .relays
                .iter()
                .filter(|r| r.flags.has(RelayFlags::RUNNING))
                .count(),
            "consensus computed"
        );
        let mut doc = c.to_document();
        let sig = {
            let s = lock(&self.signer);
            AuthoritySig::make(CONSENSUS_DOMAIN, &doc.body, &s.cert, &s.key)
        };
        let sig_bytes = postcard::to_stdvec(&sig).ok()?;
        doc.add(sig);
        let digest = doc.digest();
        let mut st = lock(&self.state);
        st.pending = Some(Pending {
            valid_after,
            doc,
            digest,
        });
        st.own_sigs
            .insert(valid_after, Bytes::from(sig_bytes.clone()));
        Some(sig_bytes)
    }

    /// The descriptors a consensus of `votes` needs, by digest: those we
    /// hold, and those we lack fetched from the other authorities (each
    /// checked: signature, key binding, digest, identity). A relay whose
    /// descriptor no one gives is left out of our consensus.
    async fn descriptors_for(&self, votes: &[Vote]) -> HashMap<[u8; 32], Arc<VerifiedDescriptor>> {
        let wanted = listed(votes);
        let (mut held, mut missing) = (HashMap::new(), HashMap::new());
        {
            let st = lock(&self.state);
            for (id, digest) in wanted {
                let d = st
                    .named
                    .get(&digest)
                    .or_else(|| st.descriptors.get(&id).filter(|d| d.digest == digest));
                match d {
                    Some(d) => _ = held.insert(digest, d.clone()),
                    None => _ = missing.insert(digest, id),
                }
            }
        }
        for (_, addr, name) in self.peers() {
            if missing.is_empty() {
                break;
            }
            let asked: Vec<[u8; 32]> = missing.keys().copied().collect();
            for chunk in asked.chunks(http::DESCRIPTORS_PER_FETCH) {
                let got = match http::fetch_descriptors(addr, chunk).await {
                    Ok(got) => got,
                    Err(e) => {
                        debug!(authority = %name, "fetching descriptors: {e}");
                        break;
                    }
                };
                for b in got {
                    let d = UnverifiedDescriptor::parse(&b).and_then(|u| u.verify_unclocked());
                    match d {
                        Ok(d) if missing.get(&d.digest) == Some(&d.desc.identity) => {
                            missing.remove(&d.digest);
                            held.insert(d.digest, Arc::new(d));
                        }
                        Ok(_) => warn!(authority = %name, "sent a descriptor not asked for"),
                        Err(e) => warn!(authority = %name, "sent a bad descriptor: {e}"),
                    }
                }
            }
        }
        if !missing.is_empty() {
            warn!(
                relays = missing.len(),
                "descriptors named by a majority of votes not found: left out of our consensus"
            );
        }
        let mut st = lock(&self.state);
        for (digest, d) in &held {
            st.named.entry(*digest).or_insert_with(|| d.clone());
        }
        held
    }

    /// The descriptors of `digests` this authority holds for the votes
    /// (see [`AuthState::named`]), as received, in no particular order.
    pub fn named_descriptors(&self, digests: &[[u8; 32]]) -> Vec<Vec<u8>> {
        let st = lock(&self.state);
        digests
            .iter()
            .filter_map(|d| st.named.get(d).map(|v| v.bytes.clone()))
            .collect()
    }

    /// Fetch the detached signatures we do not have yet.
    pub async fn collect_signatures(&self, valid_after: u64) {
        for (k, addr, name) in self.peers() {
            let have = lock(&self.state).pending.as_ref().is_some_and(|p| {
                p.valid_after == valid_after
                    && p.doc.signatures.iter().any(|s| s.identity() == Some(k.0))
            });
            if have {
                continue;
            }
            match http::fetch_signature(addr, valid_after).await {
                Ok(b) => {
                    if let Err((_, why)) = self.accept_signature(&b, unix_now()) {
                        warn!(authority = %name, "{why}");
                    }
                }
                Err(e) => debug!(authority = %name, "no signature: {e}"),
            }
        }
    }

    /// Publish the assembled consensus if enough authorities signed it.
    pub fn publish(&self, valid_after: u64) -> Result<usize, String> {
        // Checked and written with the state let go: at 50,000 relays the
        // consensus is megabytes.
        let (bytes, n) = {
            let st = lock(&self.state);
            let p = st
                .pending
                .as_ref()
                .filter(|p| p.valid_after == valid_after)
                .ok_or("no consensus assembled")?;
            (p.doc.to_bytes(), p.doc.signatures.len())
        };
        let c = UnverifiedConsensus::parse(&bytes)
            .and_then(|u| u.verify(&self.pinned, valid_after))
            .map_err(|e| e.to_string())?;
        AuthStats::inc(&self.stats.consensuses_published);
        AuthStats::set(&self.stats.consensus_valid_after, valid_after);
        AuthStats::set(&self.stats.consensus_relays, c.relays.len() as u64);
        AuthStats::set(&self.stats.consensus_signatures, n as u64);
        if let Err(e) =
            store::write_atomic(&self.cfg.data_dir.join("state/consensus"), &bytes, 0o644)
        {
            warn!("persisting consensus: {e}");
        }
        self.cache.install(Bytes::from(bytes), c.valid_until);
        let mut st = lock(&self.state);
        st.sr_held = Some((c.valid_after, c.shared_random));
        st.votes
            .retain(|va, _| *va + 2 * self.cfg.interval_secs > valid_after);
        st.own_sigs
            .retain(|va, _| *va + 2 * self.cfg.interval_secs > valid_after);
        Ok(n)
    }

    /// Pick up a signing key certified while running.
    fn reload_signer(&self) {
        match Signer::load(&self.cfg.data_dir) {
            Ok(s) if s.parsed.identity == self.identity => {
                let mut cur = lock(&self.signer);
                if cur.cert != s.cert {
                    info!(valid_until = s.parsed.valid_until, "new signing key loaded");
                    *cur = s;
                }
            }
            Ok(_) => warn!("signing.cert names another identity; keeping the current key"),
            Err(e) => warn!("reloading signing key: {e}"),
        }
        let until = lock(&self.signer).parsed.valid_until;
        if until < unix_now() + 7 * 24 * 3600 {
            warn!(
                valid_until = until,
                "the signing-key certificate expires soon: run `allium dirauth certify`"
            );
        }
    }

    /// How long before its period a round votes (`voting_secs`).
    fn voting_ms(&self) -> u64 {
        1000 * self.cfg.voting()
    }

    /// One voting round for the consensus valid at `va`.
    async fn round(&self, va: u64) {
        let d_ms = self.voting_ms();
        let va_ms = va * 1000;
        {
            // Keep votes and signatures of the last two periods only, even
            // when no consensus gets published.
            let mut st = lock(&self.state);
            let keep_from = va.saturating_sub(2 * self.cfg.interval_secs);
            st.votes.retain(|p, _| *p >= keep_from);
            st.own_sigs.retain(|p, _| *p >= keep_from);
            drop(st);
            if let Err(e) = self.vote_disk.prune(keep_from) {
                warn!("removing old votes: {e}");
            }
        }
        sleep_until_unix_ms(va_ms - d_ms).await;
        self.reload_signer();
        let vote = self.make_vote(va, unix_now());
        for (_, addr, name) in self.peers() {
            if let Err(e) = http::post_vote(addr, vote.clone()).await {
                debug!(authority = %name, "pushing vote: {e}");
            }
        }
        sleep_until_unix_ms(va_ms - d_ms / 2).await;
        if let Some(sig) = self.assemble(va).await {
            for (_, addr, name) in self.peers() {
                if let Err(e) = http::post_signature(addr, sig.clone()).await {
                    debug!(authority = %name, "pushing signature: {e}");
                }
            }
        }
        sleep_until_unix_ms(va_ms - d_ms / 4).await;
        self.collect_signatures(va).await;
        sleep_until_unix_ms(va_ms).await;
        self.collect_signatures(va).await;
        let published = self.publish(va);
        if published.is_ok() {
            // Off the voting path: the next round's vote must not wait for
            // compression (seconds at level 19 for thousands of relays).
            // A fetch that comes first waits for its diff instead.
            let cache = self.cache.clone();
            tokio::spawn(async move { cache.make_diffs().await });
        }
        match published {
            // Every few seconds on a test network: not worth a line there.
            Ok(n) if self.cfg.interval_secs < 60 => {
                debug!(signatures = n, valid_after = va, "consensus published")
            }
            Ok(n) => info!(signatures = n, valid_after = va, "consensus published"),
            Err(e) => {
                AuthStats::inc(&self.stats.consensuses_missed);
                warn!(valid_after = va, "no new consensus: {e}")
            }
        }
    }

    /// Seconds from `now` until this authority is to publish its next
    /// consensus (at least 1: a round past its time is still collecting
    /// signatures); what it tells fetchers when it has none to serve.
    pub fn next_consensus_in(&self, now: u64) -> u64 {
        self.publishing.load(Relaxed).saturating_sub(now).max(1)
    }

    /// The published consensus.
    pub fn consensus_bytes(&self) -> Option<Bytes> {
        self.cache.current()
    }

    /// The published consensus, its predecessors and the diffs from them.
    pub fn cache(&self) -> &ConsensusCache {
        &self.cache
    }

    /// Make the current consensus' diffs (see [`ConsensusCache::make_diffs`]).
    pub async fn make_diffs(&self) {
        self.cache.make_diffs().await
    }

    /// Our own vote for the period starting at `va`.
    pub fn own_vote(&self, va: u64) -> Option<Bytes> {
        lock(&self.state)
            .votes
            .get(&va)
            .and_then(|m| m.get(&self.identity))
            .map(|(_, b)| b.clone())
    }

    /// Our detached consensus signature for the period starting at `va`.
    pub fn own_signature(&self, va: u64) -> Option<Bytes> {
        lock(&self.state).own_sigs.get(&va).cloned()
    }

    /// Whether `ip` may make another request now (the rate limiter).
    pub(crate) fn allow(&self, ip: IpAddr) -> bool {
        lock(&self.limiter).allow(ip, Instant::now())
    }

    /// Bind the listener and serve until an error.
    pub async fn run(self: Arc<Self>) -> Result<(), DirError> {
        let listener = allium_link::listen::bind(self.cfg.listen)
            .map_err(|e| DirError::Config(format!("cannot listen on {}: {e}", self.cfg.listen)))?;
        self.serve(listener).await
    }

    /// Serve HTTP and vote on an already bound listener.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), DirError> {
        info!(addr = %self.cfg.listen, identity = %hex::encode(self.identity), "directory authority listening");
        let sched = self.clone();
        let schedule = async move {
            // The stored consensus, compressed, until the next is published.
            sched.make_diffs().await;
            let mut last = 0;
            loop {
                let va = sched
                    .upcoming(unix_now())
                    .max(last + sched.cfg.interval_secs);
                sched.publishing.store(va, Relaxed);
                sched.round(va).await;
                last = va;
            }
        };
        let metrics = async {
            match self.cfg.metrics_listen {
                Some(a) => allium_link::metrics::serve(
                    a,
                    metrics::registry(self.stats.clone(), self.cache.clone()),
                )
                .await
                .map_err(|e| DirError::Config(e.to_string())),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = serve::http(self.clone(), listener, HttpLimits::default()) => r,
            r = metrics => r,
            () = schedule => Ok(()),
            () = self.measure_loop() => Ok(()),
            () = self.reach_loop() => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::diff;
    use allium_proto::RelayDescriptor;
    use allium_proto::ntor::OnionSecret;
    use allium_proto::policy::ExitPolicy;
    use ed25519_dalek::SigningKey;

    fn desc(k: &SigningKey, published: u64) -> Vec<u8> {
        let onion = OnionSecret::new(x25519_dalek::StaticSecret::from([2; 32]));
        RelayDescriptor {
            nickname: "r1".into(),
            identity: k.verifying_key().to_bytes(),
            link_key: LinkKey([1; 32]),
            onion_key: onion.public(),
            onion_crosscert: onion.crosscert(&k.verifying_key().to_bytes()),
            addr: "127.0.0.1:9".parse().unwrap(),
            bandwidth: 1000,
            exit_policy: ExitPolicy::default_exit(),
            family: vec![],
            published,
        }
        .sign(k)
        .to_bytes()
    }

    pub(crate) fn authority(dir: &std::path::Path) -> AuthConfig {
        let id = crate::keys::keygen(&dir.join("identity.key"), &dir.join("srv"), 1, unix_now())
            .unwrap();
        AuthConfig {
            data_dir: dir.join("srv"),
            authorities: vec![AuthorityEntry {
                name: "a".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                key: hex::encode(id),
            }],
            interval_secs: 60,
            allow_private_addresses: true,
            ..Default::default()
        }
    }

    #[test]
    fn votes_are_made_voting_secs_before_the_period() {
        let d = tempfile::tempdir().unwrap();
        let base = authority(d.path());
        let with = |interval_secs, voting_secs| {
            Authority::new(AuthConfig {
                interval_secs,
                voting_secs,
                ..base.clone()
            })
            .map(|a| a.voting_ms())
        };
        assert_eq!(with(60, None).unwrap(), 60_000, "the interval");
        assert_eq!(with(3600, None).unwrap(), 600_000, "at most 10 minutes");
        assert_eq!(with(11, Some(4)).unwrap(), 4_000);
        assert!(with(11, Some(12)).is_err(), "longer than the interval");
        assert!(with(11, Some(1)).is_err());
    }

    #[test]
    fn periods_start_at_the_offset_and_votes_for_others_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            interval_secs: 60,
            period_offset_secs: 7,
            ..authority(d.path())
        };
        assert!(
            Authority::new(AuthConfig {
                period_offset_secs: 60,
                ..cfg.clone()
            })
            .is_err(),
            "an offset of a whole interval"
        );
        let a = Authority::new(cfg).unwrap();
        assert_eq!(a.upcoming(120), 127);
        assert_eq!(a.upcoming(126), 127);
        assert_eq!(a.upcoming(127), 187);
        let now = unix_now();
        let va = a.upcoming(now);
        assert_eq!(va % 60, 7);
        assert_eq!(
            a.accept_vote(&a.make_vote(va, now), now).unwrap(),
            "already known"
        );
        let aligned = va - 7 + 60;
        assert_eq!(
            a.accept_vote(&a.make_vote(aligned, now), now).unwrap_err(),
            (
                StatusCode::BAD_REQUEST,
                format!("vote rejected: {aligned} is not the start of a period")
            )
        );
        // The shared random round of a period is that of the period
        // without the offset.
        assert_eq!(Round::of(va, 60), Round::of(va - 7, 60));
    }

    #[test]
    fn retests_slow_down_past_a_hundred_a_second() {
        let d = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            interval_secs: 3,
            ..authority(d.path())
        };
        let a = Authority::new(cfg).unwrap();
        let at = |held: usize| {
            a.held.store(held, std::sync::atomic::Ordering::Relaxed);
            (a.retest_secs(), a.reach_window())
        };
        // A small network is tested every period, as before.
        assert_eq!(at(6), (3, 11));
        assert_eq!(at(300), (3, 11));
        // 2,000 relays every 20 s, 5,000 every 50 s: 100 tests a second.
        assert_eq!(at(2000), (20, 45));
        assert_eq!(at(5000), (50, 105));
        // Relays come due again within the last quarter of the period,
        // spread by identity.
        let ids = (0..=255u8).map(|i| {
            let mut id = [i; 32];
            id[1] = i.wrapping_mul(37);
            id
        });
        let waits: std::collections::BTreeSet<u64> = ids.map(|id| a.retest_in(&id)).collect();
        assert_eq!((waits.first(), waits.last()), (Some(&38), Some(&50)));
        assert_eq!(waits.len(), 13);
        at(6);
        assert_eq!(a.retest_in(&[1; 32]), 3);
    }

    #[test]
    fn accepts_rejects_votes_alone_and_survives_restart() {
        let d = tempfile::tempdir().unwrap();
        let cfg = authority(d.path());
        let a = Authority::new(cfg.clone()).unwrap();
        let now = unix_now();
        let k = SigningKey::from_bytes(&[4; 32]);
        assert_eq!(
            a.accept_descriptor(&desc(&k, now), now).unwrap(),
            "accepted"
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now), now).unwrap(),
            "already known"
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now - 10), now).unwrap_err().0,
            StatusCode::CONFLICT
        );
        let mut forged = desc(&k, now + 1);
        let n = forged.len();
        forged[n - 70] ^= 1;
        assert_eq!(
            a.accept_descriptor(&forged, now).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now + 7200), now)
                .unwrap_err()
                .0,
            StatusCode::BAD_REQUEST
        );

        // A lone authority is a majority of one.
        let va = a.upcoming(now);
        let vote = a.make_vote(va, now);
        assert_eq!(a.accept_vote(&vote, now).unwrap(), "already known");
        let mut forged_vote = vote.clone();
        let n = forged_vote.len();
        forged_vote[n - 1] ^= 1;
        assert_eq!(
            a.accept_vote(&forged_vote, now).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            a.accept_vote(&vote[..n - 1], now).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert!(tokio_test_block(a.assemble(va)).is_some());
        assert_eq!(a.publish(va).unwrap(), 1);
        // Our own old vote pushed back later is a replay.
        assert_eq!(
            a.accept_vote(&vote, va + 60).unwrap_err().0,
            StatusCode::CONFLICT
        );
        // A vote for a time that starts no period is refused (found by the
        // `dirauth` fuzz target).
        let odd = a.make_vote(va + 1, now);
        assert_eq!(
            a.accept_vote(&odd, now).unwrap_err(),
            (
                StatusCode::BAD_REQUEST,
                format!("vote rejected: {} is not the start of a period", va + 1)
            )
        );
        // So is a vote for a period far ahead.
        let ahead = a.make_vote(va + 10 * a.cfg.interval_secs, now);
        assert_eq!(
            a.accept_vote(&ahead, now).unwrap_err(),
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "vote rejected: future-dated period {}",
                    va + 10 * a.cfg.interval_secs
                )
            )
        );
        drop(a);
        let b = Authority::new(cfg).unwrap();
        let c = UnverifiedConsensus::parse(&b.consensus_bytes().unwrap())
            .unwrap()
            .verify(&[AuthorityKey(b.identity())], va)
            .unwrap();
        assert_eq!(c.relays.len(), 1);
        assert!(!c.relays[0].flags.has(RelayFlags::RUNNING), "never reached");
        assert!(c.relays[0].flags.has(RelayFlags::EXIT));
    }

    /// Descriptors kept by an older authority in one file are taken over
    /// into the log; a stored descriptor gone stale, or torn by a power
    /// failure, is dropped.
    #[test]
    fn descriptors_persist_in_one_log_and_old_state_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let cfg = authority(d.path());
        let now = unix_now();
        let key = |i: u8| SigningKey::from_bytes(&[i; 32]);
        let id = |i: u8| key(i).verifying_key().to_bytes();
        let old = vec![desc(&key(1), now), desc(&key(2), now)];
        let state = cfg.data_dir.join("state");
        store::write_atomic(
            &state.join("descriptors"),
            &postcard::to_stdvec(&old).unwrap(),
            0o600,
        )
        .unwrap();
        let a = Authority::new(cfg.clone()).unwrap();
        assert_eq!(lock(&a.state).descriptors.len(), 2);
        assert!(!state.join("descriptors").exists());
        let newer = desc(&key(1), now + 1);
        a.accept_descriptor(&newer, now + 1).unwrap();
        let on_disk = |a: &Authority| lock(&a.disk).load().unwrap();
        let mut want = vec![(id(1), newer.clone()), (id(2), old[1].clone())];
        want.sort();
        assert_eq!(on_disk(&a), want);
        drop(a);
        // Relay 2's descriptor is stale by the next start, and relay 1's
        // next upload was torn by a power failure.
        let mut disk = DescriptorStore::new(&state);
        disk.put(&id(2), &desc(&key(2), now - 49 * 3600)).unwrap();
        disk.put(&id(1), &desc(&key(1), now + 2)).unwrap();
        let log = state.join("descriptors.log");
        let len = std::fs::metadata(&log).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let b = Authority::new(cfg.clone()).unwrap();
        let held: Vec<[u8; 32]> = lock(&b.state).descriptors.keys().copied().collect();
        assert_eq!(held, vec![id(1)]);
        assert_eq!(on_disk(&b), vec![(id(1), newer.clone())]);
        // Relay 1 uploads again.
        let again = desc(&key(1), now + 3);
        b.accept_descriptor(&again, now + 3).unwrap();
        drop(b);
        let c = Authority::new(cfg).unwrap();
        assert_eq!(on_disk(&c), vec![(id(1), again)]);
    }

    /// An authority serves its consensus as a diff from each of the last
    /// few, and compressed; a fetcher holding the last one gets the exact
    /// signed bytes from a diff a fraction of their size, and one holding
    /// something else gets the whole consensus.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_consensus_comes_as_a_diff() {
        let d = tempfile::tempdir().unwrap();
        let a = Arc::new(Authority::new(authority(d.path())).unwrap());
        let now = unix_now();
        let key = |i: u8| SigningKey::from_bytes(&[i; 32]);
        for i in 1..=40 {
            a.accept_descriptor(&desc(&key(i), now), now).unwrap();
        }
        let publish = async |va: u64, now: u64| {
            a.make_vote(va, now);
            a.assemble(va).await.unwrap();
            a.publish(va).unwrap();
            a.make_diffs().await;
            a.consensus_bytes().unwrap()
        };
        let va = a.upcoming(now);
        let first = publish(va, now).await;
        // One relay republishes: the next consensus differs in it alone
        // (and in its times and signature).
        a.accept_descriptor(&desc(&key(1), now + 1), now + 1)
            .unwrap();
        let second = publish(va + a.cfg.interval_secs, now + 1).await;
        assert_ne!(first, second);

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve::http(a.clone(), l, HttpLimits::default()));
        let max = allium_proto::doc::MAX_CONSENSUS_LEN;
        let path = format!("/consensus/diff/{}", hex::encode(diff::digest(&first)));
        let sent = http::request(addr, "GET", &path, vec![], max)
            .await
            .unwrap();
        eprintln!(
            "consensus of 40 relays: {} bytes; diff after one republished: {} bytes",
            second.len(),
            sent.len()
        );
        assert!(
            sent.len() * 10 < second.len(),
            "a diff of {} bytes for a consensus of {}",
            sent.len(),
            second.len()
        );
        let auths = [AuthorityEntry {
            name: "a".into(),
            addr,
            key: hex::encode(a.identity()),
        }];
        let keys = [AuthorityKey(a.identity())];
        let (c, got) = http::fetch_verified_consensus(&auths, &keys, Some(&first))
            .await
            .unwrap();
        assert_eq!(got, second);
        assert_eq!(c.valid_after, va + a.cfg.interval_secs);
        // A base the authority does not hold: the whole consensus.
        let (_, got) = http::fetch_verified_consensus(&auths, &keys, Some(b"another"))
            .await
            .unwrap();
        assert_eq!(got, second);
        // Compressed alone.
        let z = http::request(addr, "GET", "/consensus/zstd", vec![], max)
            .await
            .unwrap();
        assert_eq!(diff::decode(None, &z, max).unwrap(), second);
        let bad = http::request(addr, "GET", "/consensus/diff/00", vec![], max).await;
        assert!(bad.is_err());
    }

    #[test]
    fn at_most_two_running_relays_per_address() {
        let d = tempfile::tempdir().unwrap();
        let a = Authority::new(authority(d.path())).unwrap();
        let now = unix_now();
        // Four relays on 127.0.0.1, all reachable, Running since different
        // times; one elsewhere.
        let keys: Vec<SigningKey> = (1..=5).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
        for (i, k) in keys.iter().enumerate() {
            let mut b = desc(k, now);
            if i == 4 {
                let u = UnverifiedDescriptor::parse(&b).unwrap();
                let mut dd = u.descriptor().clone();
                dd.addr = "127.0.0.2:9".parse().unwrap();
                b = dd.sign(k).to_bytes();
            }
            a.accept_descriptor(&b, now).unwrap();
            let mut st = lock(&a.state);
            let r = st.reach.entry(k.verifying_key().to_bytes()).or_default();
            r.ok_at = Some(now);
            r.running_since = Some(now - 100 * (i as u64 + 1));
        }
        let va = a.upcoming(now);
        let vote = Vote::verify(&a.make_vote(va, now), &[AuthorityKey(a.identity())], now).unwrap();
        let running: Vec<[u8; 32]> = vote
            .relays
            .iter()
            .filter(|r| r.flags.has(RelayFlags::RUNNING))
            .map(|r| r.identity)
            .collect();
        // The two Running longest on 127.0.0.1 (keys 4 and 3), and the
        // relay on its own address.
        let id = |i: usize| keys[i].verifying_key().to_bytes();
        let mut want = vec![id(2), id(3), id(4)];
        want.sort();
        let mut got = running.clone();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(vote.relays.len(), 5, "the others are still listed");
    }

    /// A test the authority could not make (out of descriptors) leaves a
    /// relay's standing as it was; one the relay failed ends it.
    #[test]
    fn a_test_not_made_is_no_verdict_on_the_relay() {
        let d = tempfile::tempdir().unwrap();
        let a = Authority::new(authority(d.path())).unwrap();
        let now = unix_now();
        let k = SigningKey::from_bytes(&[7; 32]);
        let id = k.verifying_key().to_bytes();
        a.accept_descriptor(&desc(&k, now), now).unwrap();
        let standing = || {
            let st = lock(&a.state);
            st.reach.get(&id).map(|r| (r.running_since, r.due_at))
        };
        assert!(a.record_reach(id, reach::Verdict::Reached));
        let before = standing();
        assert!(before.unwrap().0.is_some());
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(allium_link::listen::out_of_local_resources(&emfile));
        assert!(!a.record_reach(id, reach::Verdict::NotMade(emfile.to_string())));
        assert_eq!(standing(), before);
        let refused = DirError::Http {
            addr: "127.0.0.1:9".into(),
            why: "connection refused".into(),
        };
        assert!(a.record_reach(id, reach::Verdict::Unreachable(refused)));
        assert_eq!(standing().unwrap().0, None);
    }

    #[test]
    fn relays_at_private_addresses_are_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let a = Authority::new(AuthConfig {
            allow_private_addresses: false,
            ..authority(d.path())
        })
        .unwrap();
        let now = unix_now();
        let k = SigningKey::from_bytes(&[9; 32]);
        let at = |addr: &str| {
            let u = UnverifiedDescriptor::parse(&desc(&k, now)).unwrap();
            let mut dd = u.descriptor().clone();
            dd.addr = addr.parse().unwrap();
            dd.sign(&k).to_bytes()
        };
        for private in [
            "127.0.0.1:9",
            "10.1.2.3:443",
            "[::ffff:192.168.1.1]:80",
            "[fe80::1]:9",
        ] {
            let r = a.accept_descriptor(&at(private), now);
            assert_eq!(r.unwrap_err().0, StatusCode::BAD_REQUEST, "{private}");
        }
        assert!(lock(&a.state).descriptors.is_empty());
        assert_eq!(
            a.accept_descriptor(&at("192.0.2.7:9001"), now),
            Ok("accepted")
        );
    }

    #[test]
    fn a_full_table_keeps_reachable_relays_and_drops_unreachable_ones() {
        let d = tempfile::tempdir().unwrap();
        let a = Authority::new(AuthConfig {
            max_relays: 3,
            ..authority(d.path())
        })
        .unwrap();
        let now = unix_now();
        let key = |i: u8| SigningKey::from_bytes(&[i; 32]);
        let id = |i: u8| key(i).verifying_key().to_bytes();
        for i in 1..=3 {
            a.accept_descriptor(&desc(&key(i), now), now).unwrap();
        }
        // Relays 1 and 2 were reached just now; 3 not tested yet.
        for i in [1, 2] {
            lock(&a.state).reach.entry(id(i)).or_default().ok_at = Some(now);
        }
        let refused = a.accept_descriptor(&desc(&key(4), now), now);
        assert_eq!(refused.unwrap_err().0, StatusCode::SERVICE_UNAVAILABLE);
        // Relay 3 is tested and found unreachable: a newcomer takes its place.
        lock(&a.state).reach.entry(id(3)).or_default();
        a.accept_descriptor(&desc(&key(4), now), now).unwrap();
        let held: Vec<[u8; 32]> = lock(&a.state).descriptors.keys().copied().collect();
        let mut want = vec![id(1), id(2), id(4)];
        want.sort();
        assert_eq!(held, want);
        // On disk, the relays held: the evicted one's record is gone.
        let on_disk: Vec<[u8; 32]> = lock(&a.disk)
            .load()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(on_disk, want);
        // Known relays still update their descriptors in a full table.
        assert_eq!(
            a.accept_descriptor(&desc(&key(1), now + 1), now + 1),
            Ok("accepted")
        );
        // Two days on, the table holds only stale descriptors: they make
        // way for a newcomer, in memory and on disk.
        let later = now + a.cfg.descriptor_max_age_secs + 2;
        assert_eq!(
            a.accept_descriptor(&desc(&key(5), later), later),
            Ok("accepted")
        );
        let held: Vec<[u8; 32]> = lock(&a.state).descriptors.keys().copied().collect();
        assert_eq!(held, vec![id(5)]);
        assert_eq!(lock(&a.disk).load().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_new_relay_is_tested_soon_after_its_upload() {
        let d = tempfile::tempdir().unwrap();
        let a = Authority::new(AuthConfig {
            max_relays: 1,
            ..authority(d.path())
        })
        .unwrap();
        let now = unix_now();
        // Relay 1 at a closed port, then relay 2: the table is full until
        // relay 1 has been tested, which happens without waiting for a
        // voting round.
        a.accept_descriptor(&desc(&SigningKey::from_bytes(&[1; 32]), now), now)
            .unwrap();
        let second = desc(&SigningKey::from_bytes(&[2; 32]), now);
        assert_eq!(
            a.accept_descriptor(&second, now).unwrap_err().0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let probing = a.reach_loop();
        tokio::pin!(probing);
        let tested = async {
            while lock(&a.state).reach.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            () = &mut probing => unreachable!(),
            r = tokio::time::timeout(Duration::from_secs(10), tested) => r.unwrap(),
        }
        assert_eq!(a.accept_descriptor(&second, now + 200), Ok("accepted"));
    }

    fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}
