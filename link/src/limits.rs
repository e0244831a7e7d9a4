//! What keeps a relay bounded: the queued-cell memory cap with its circuit
//! killer, the bandwidth token bucket, and per-address DoS limits.
//!
//! None of these takes a lock per cell: queue accounting and the token
//! bucket are atomics; the DoS table is locked once per connection or
//! CREATE, and the killer's registry once per circuit and per kill round.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::warn;

use crate::RelayStats;

/// Bytes one queued cell is counted as.
pub const CELL_BYTES: usize = allium_proto::cell::CELL_LEN;

fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// All queued cells of one relay, against a cap (Tor's MaxMemInQueues).
pub struct QueueMem {
    cap: usize,
    total: AtomicUsize,
    peak: AtomicUsize,
    epoch: Instant,
    next_id: AtomicU64,
    registry: Mutex<HashMap<u64, Weak<CircAcct>>>,
    killing: AtomicBool,
    stats: Arc<RelayStats>,
}

impl QueueMem {
    pub fn new(cap: usize, stats: Arc<RelayStats>) -> Arc<Self> {
        Arc::new(QueueMem {
            cap,
            total: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            epoch: Instant::now(),
            next_id: AtomicU64::new(1),
            registry: Mutex::new(HashMap::new()),
            killing: AtomicBool::new(false),
            stats,
        })
    }

    /// Bytes of cells queued now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
    /// The most ever queued at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
    pub fn cap(&self) -> usize {
        self.cap
    }
    /// True while queued cells are at or over the cap: edges stop reading.
    pub fn full(&self) -> bool {
        self.total() >= self.cap
    }

    /// Count bytes queued outside any one circuit (a channel's queue).
    pub fn add_shared(&self, n: usize) {
        let t = self.total.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(t, Ordering::Relaxed);
        // Start killing a little below the cap, so that what arrives while
        // the victims wind down still fits.
        if t > self.cap / 10 * 9 {
            self.relieve();
        }
    }
    pub fn sub_shared(&self, n: usize) {
        self.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// A new circuit's account.
    pub fn account(self: &Arc<Self>) -> Arc<CircAcct> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let acct = Arc::new(CircAcct {
            id,
            mem: self.clone(),
            queued: AtomicUsize::new(0),
            since: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            kill: Notify::new(),
        });
        let mut reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        reg.insert(id, Arc::downgrade(&acct));
        acct
    }

    /// Near the cap (90%): kill the circuits whose queued data has waited
    /// longest until what stays queued fits in 75% of the cap.
    fn relieve(&self) {
        if self.killing.swap(true, Ordering::Acquire) {
            return;
        }
        let now = now_ms(self.epoch);
        // Chosen once the lock is released: a circuit may end meanwhile,
        // leaving the account upgraded here as its last reference, whose
        // drop takes the lock.
        let live: Vec<Arc<CircAcct>> = {
            let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
            reg.values().filter_map(Weak::upgrade).collect()
        };
        let mut victims: Vec<(u64, usize, Arc<CircAcct>)> = live
            .into_iter()
            .filter(|a| !a.killed.load(Ordering::Relaxed))
            .filter_map(|a| {
                let q = a.queued.load(Ordering::Relaxed);
                (q > 0).then(|| (now.saturating_sub(a.since.load(Ordering::Relaxed)), q, a))
            })
            .collect();
        victims.sort_by_key(|v| std::cmp::Reverse(v.0));
        let mut left = self.total();
        let target = self.cap / 4 * 3;
        let mut killed = 0;
        for (age, q, a) in victims {
            if left <= target {
                break;
            }
            a.killed.store(true, Ordering::Relaxed);
            a.kill.notify_one();
            left = left.saturating_sub(q);
            killed += 1;
            tracing::debug!(
                age_ms = age,
                queued = q,
                "killing circuit to free queue memory"
            );
        }
        if killed > 0 {
            RelayStats::inc(&self.stats.oom_kills, killed);
            warn!(
                killed,
                queued = self.total(),
                cap = self.cap,
                "queued cells over the memory cap: killed the circuits with the oldest queued data"
            );
        }
        self.killing.store(false, Ordering::Release);
    }
}

/// One circuit's share of [`QueueMem`]. Its age is the time since its queue
/// was last empty or last made progress, whichever is later: the circuits
/// that have held data longest without moving it are killed first.
pub struct CircAcct {
    id: u64,
    mem: Arc<QueueMem>,
    queued: AtomicUsize,
    since: AtomicU64,
    killed: AtomicBool,
    kill: Notify,
}

impl CircAcct {
    pub fn add(&self, n: usize) {
        if self.queued.fetch_add(n, Ordering::Relaxed) == 0 {
            self.since.store(now_ms(self.mem.epoch), Ordering::Relaxed);
        }
        self.mem.add_shared(n);
    }

    /// `n` bytes left the queue (the circuit made progress).
    pub fn sub(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::Relaxed);
        if before > n {
            self.since.store(now_ms(self.mem.epoch), Ordering::Relaxed);
        }
        self.mem.sub_shared(n);
    }

    /// The relay's queues are at the cap.
    pub fn mem_full(&self) -> bool {
        self.mem.full()
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Resolves when the memory cap picked this circuit to die.
    pub async fn killed(&self) {
        loop {
            let n = self.kill.notified();
            if self.killed.load(Ordering::Relaxed) {
                return;
            }
            n.await;
        }
    }
}

impl Drop for CircAcct {
    fn drop(&mut self) {
        let q = self.queued.swap(0, Ordering::Relaxed);
        self.mem.sub_shared(q);
        let mut reg = self.mem.registry.lock().unwrap_or_else(|p| p.into_inner());
        reg.remove(&self.id);
    }
}

/// A token bucket on relayed bytes (rate and burst per second), refilled
/// by the time that has passed whenever it is asked (no timer: a link that
/// waits for it sleeps just as long as its share takes to come, to the
/// millisecond); readers and writers take a grant before they move bytes
/// and wait while it is empty.
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    state: Mutex<Tokens>,
}

struct Tokens {
    /// Below zero while quiet links have overdrawn it.
    tokens: f64,
    at: tokio::time::Instant,
}

/// How far below empty quiet links may take a bucket.
pub const QUIET_DEBT: i64 = 256 * 1024;
/// The most a quiet link takes at once.
pub const QUIET_MAX: usize = 16 * 1024;
/// The least a busy link is granted (unless it asks for less).
pub const MIN_GRANT: usize = 16 * 1024;

impl TokenBucket {
    /// `rate` bytes per second with bursts up to `burst` bytes; it starts
    /// full.
    pub fn new(rate: u64, burst: u64) -> Arc<Self> {
        let rate = rate.max(1);
        let burst = burst.max(rate / 100).max(64 * 1024);
        Arc::new(TokenBucket {
            rate,
            burst,
            state: Mutex::new(Tokens {
                tokens: burst as f64,
                at: tokio::time::Instant::now(),
            }),
        })
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Refill for the time passed, then look at or change the tokens.
    fn with<R>(&self, f: impl FnOnce(&mut f64) -> R) -> R {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        let secs = now.saturating_duration_since(s.at).as_secs_f64();
        s.at = now;
        s.tokens = (s.tokens + secs * self.rate as f64).min(self.burst as f64);
        f(&mut s.tokens)
    }

    /// Take up to `max` bytes of what is there now, or nothing while there
    /// is less than [`MIN_GRANT`] (or `max`): a reader reads at most that
    /// much, so readers woken together cannot overdraw the bucket, and
    /// none moves a few bytes at a time. Give back what was not read with
    /// [`TokenBucket::refund`].
    pub fn take_up_to(&self, max: usize) -> usize {
        self.with(|t| {
            let there = t.max(0.0) as usize;
            if there < max.min(MIN_GRANT) {
                return 0;
            }
            let granted = there.min(max);
            *t -= granted as f64;
            granted
        })
    }

    /// Take `n` bytes, at most [`QUIET_MAX`], for a link that moves little
    /// (a request, a few SENDMEs), even from an empty bucket, down to
    /// [`QUIET_DEBT`] below empty; busy links, which take with
    /// [`TokenBucket::take_up_to`], wait until that is refilled. So a busy
    /// link cannot starve the quiet links of the same relay (which carry
    /// the requests and acknowledgements its own traffic waits for), and
    /// the rate still holds over time, overdrawn by [`QUIET_DEBT`] at most.
    /// 0 when even that is spent.
    pub fn take_quiet(&self, n: usize) -> usize {
        let n = n.min(QUIET_MAX);
        self.with(|t| {
            if *t - n as f64 >= -(QUIET_DEBT as f64) {
                *t -= n as f64;
                n
            } else {
                0
            }
        })
    }

    pub fn refund(&self, n: usize) {
        if n > 0 {
            self.with(|t| *t += n as f64);
        }
    }

    /// Resolves once the bucket holds [`MIN_GRANT`] again.
    pub async fn refilled(&self) {
        // Each wait ends when the debt is paid: bounded by the rate.
        let min = MIN_GRANT as f64;
        loop {
            let wait = self.with(|t| {
                (*t < min).then(|| Duration::from_secs_f64((min - *t) / self.rate as f64))
            });
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// Per-address limits (Tor's DoS mitigation defaults): concurrent
/// connections, and circuit creations as a token bucket.
pub struct DosGuard {
    max_conns: u32,
    circ_rate: f64,
    circ_burst: f64,
    table: Mutex<HashMap<IpAddr, DosEntry>>,
    stats: Arc<RelayStats>,
}

struct DosEntry {
    conns: u32,
    tokens: f64,
    at: Instant,
}

/// Addresses the table tracks at most; beyond, idle entries are dropped
/// first and then new addresses are refused connections.
const DOS_TABLE_MAX: usize = 65_536;

impl DosGuard {
    pub fn new(max_conns: u32, circ_rate: f64, circ_burst: u32, stats: Arc<RelayStats>) -> Self {
        DosGuard {
            max_conns,
            circ_rate,
            circ_burst: circ_burst as f64,
            table: Mutex::new(HashMap::new()),
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, DosEntry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection from `ip` arrived; `None` if it must be refused. The
    /// returned guard counts it until dropped.
    pub fn connection(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut t = self.lock();
        if t.len() >= DOS_TABLE_MAX && !t.contains_key(&ip) {
            let burst = self.circ_burst;
            t.retain(|_, e| e.conns > 0 || e.tokens < burst);
            if t.len() >= DOS_TABLE_MAX {
                RelayStats::inc(&self.stats.dos_refused_connections, 1);
                return None;
            }
        }
        let e = t.entry(ip).or_insert_with(|| DosEntry {
            conns: 0,
            tokens: self.circ_burst,
            at: Instant::now(),
        });
        if e.conns >= self.max_conns {
            RelayStats::inc(&self.stats.dos_refused_connections, 1);
            return None;
        }
        e.conns += 1;
        Some(ConnGuard {
            guard: self.clone(),
            ip,
            slot: None,
        })
    }

    /// May `ip` create a circuit now? Spends one token if so.
    pub fn allow_circuit(&self, ip: IpAddr) -> bool {
        let mut t = self.lock();
        let Some(e) = t.get_mut(&ip) else {
            return true;
        };
        let now = Instant::now();
        e.tokens = (e.tokens + now.duration_since(e.at).as_secs_f64() * self.circ_rate)
            .min(self.circ_burst);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            true
        } else {
            RelayStats::inc(&self.stats.dos_refused_circuits, 1);
            false
        }
    }
}

/// Holds one counted connection of an address.
pub struct ConnGuard {
    guard: Arc<DosGuard>,
    ip: IpAddr,
    /// The connection's place among the process' inbound connections.
    slot: Option<Arc<crate::listen::Slot>>,
}

impl ConnGuard {
    /// Hold `slot` for as long as the connection lives.
    pub fn hold(mut self, slot: Arc<crate::listen::Slot>) -> Self {
        self.slot = Some(slot);
        self
    }
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
    pub fn allow_circuit(&self) -> bool {
        self.guard.allow_circuit(self.ip)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut t = self.guard.lock();
        if let Some(e) = t.get_mut(&self.ip) {
            e.conns = e.conns.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cap_kills_oldest_first() {
        let stats = Arc::new(RelayStats::default());
        let mem = QueueMem::new(12 * CELL_BYTES, stats.clone());
        let old = mem.account();
        old.add(4 * CELL_BYTES);
        std::thread::sleep(Duration::from_millis(20));
        let young = mem.account();
        young.add(4 * CELL_BYTES);
        assert!(!old.killed.load(Ordering::Relaxed));
        young.add(3 * CELL_BYTES);
        assert!(old.killed.load(Ordering::Relaxed), "oldest data dies first");
        assert!(!young.killed.load(Ordering::Relaxed));
        assert_eq!(RelayStats::get(&stats.oom_kills), 1);
        drop(old);
        assert_eq!(mem.total(), 7 * CELL_BYTES);
        young.sub(7 * CELL_BYTES);
        assert_eq!(mem.total(), 0);
        assert_eq!(mem.peak(), 11 * CELL_BYTES);
    }

    /// Circuits that end while the cap is being enforced: the account the
    /// cap looked at may be the last reference, and dropping it takes the
    /// registry's lock. Both threads must finish (a deadlock here stopped
    /// a whole relay).
    #[test]
    fn accounts_dropped_while_the_cap_is_enforced_do_not_deadlock() {
        let mem = QueueMem::new(100 * CELL_BYTES, Arc::new(RelayStats::default()));
        let (done, finished) = std::sync::mpsc::channel();
        for role in 0..2 {
            let (mem, done) = (mem.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..200_000 {
                    if role == 0 {
                        // A circuit comes and goes (nothing queued).
                        drop(mem.account());
                    } else {
                        // Another crosses 90% of the cap and back.
                        mem.add_shared(95 * CELL_BYTES);
                        mem.sub_shared(95 * CELL_BYTES);
                    }
                }
                let _ = done.send(());
            });
        }
        for _ in 0..2 {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a thread deadlocked on the registry");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_grants_no_more_than_it_holds() {
        let b = TokenBucket::new(1000, 100_000);
        assert_eq!(b.take_up_to(60_000), 60_000);
        assert_eq!(b.take_up_to(60_000), 40_000, "only what is left");
        assert_eq!(b.take_up_to(60_000), 0);
        assert_eq!(b.take_up_to(1), 0, "empty");
        b.refund(5_000);
        assert_eq!(b.take_up_to(60_000), 0, "less than MIN_GRANT");
        assert_eq!(b.take_up_to(4_000), 4_000, "all it asks for");
        // Time refills it at the rate, up to the burst.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(b.take_up_to(60_000), 21_000);
        tokio::time::advance(Duration::from_secs(1000)).await;
        assert_eq!(b.take_up_to(200_000), 100_000);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_links_overdraw_a_little_and_everyone_waits_it_off() {
        let b = TokenBucket::new(100_000, 100_000);
        assert_eq!(b.take_up_to(1 << 20), 100_000);
        // Empty: a busy link gets nothing, a quiet one its few bytes, down
        // to QUIET_DEBT below empty and no further.
        assert_eq!(b.take_up_to(1000), 0);
        let mut quiet = 0;
        while b.take_quiet(QUIET_MAX) > 0 {
            quiet += QUIET_MAX;
        }
        assert_eq!(quiet as i64, QUIET_DEBT);
        // The debt is paid off at the rate before a busy link goes again.
        let t = tokio::time::Instant::now();
        b.refilled().await;
        let waited = t.elapsed().as_secs_f64();
        let due = (QUIET_DEBT + MIN_GRANT as i64) as f64 / 100_000.0;
        assert!((due..due + 0.01).contains(&waited), "waited {waited} s");
        assert!(b.take_up_to(1000) > 0);
    }

    #[test]
    fn dos_limits_per_address() {
        let stats = Arc::new(RelayStats::default());
        let g = Arc::new(DosGuard::new(2, 0.0, 3, stats.clone()));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let c1 = g.connection(a).unwrap();
        let _c2 = g.connection(a).unwrap();
        assert!(g.connection(a).is_none());
        assert!(g.connection(b).is_some());
        drop(c1);
        let c3 = g.connection(a).unwrap();
        assert!(c3.allow_circuit() && c3.allow_circuit() && c3.allow_circuit());
        assert!(!c3.allow_circuit());
        assert!(g.allow_circuit(b));
        assert_eq!(RelayStats::get(&stats.dos_refused_connections), 1);
        assert_eq!(RelayStats::get(&stats.dos_refused_circuits), 1);
    }
}
