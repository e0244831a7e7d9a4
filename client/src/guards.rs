//! Entry guards: a small persisted sample of Guard relays, used in order.
//!
//! Compared with Tor's guard specification (proposal 271; see
//! `doc/client.md`): the sample is drawn by guard-position weight and kept
//! in `data_dir/guards` across restarts; the first usable entry in sample
//! order is the guard for every circuit (Tor's "primary guards", with one
//! in use at a time); an entry that fails is retried with exponential
//! backoff instead of being dropped; entries leave the sample when they
//! leave the consensus or when their lifetime ends, and the sample is
//! refilled to its size. An entry listed without Running, or that this
//! client could not reach while another guard answered, stays (first
//! again when it is back), and another is drawn beside it, up to twice
//! the size in all.
//!
//! Each guard also has its path-bias counts (`pathbias.rs`): a guard whose
//! circuits fail far more than an honest guard's is disabled, stays in the
//! sample so it is not drawn again, and is replaced by a fresh draw. When
//! as many guards are disabled as the sample holds, the client's own
//! network is the likelier culprit: the counts start again, so a network
//! that fails every guard's circuits neither pushes the client from guard
//! to guard nor leaves it with none.
//!
//! Files: `guards` is the sample (postcard: a list of identity and time
//! added), unchanged from before path bias was counted; `pathbias` next to
//! it holds the counts (postcard: [`BIAS_FORMAT`], then a list of identity
//! and [`PathBias`]). A missing or unreadable `pathbias` starts every
//! count at zero; counts of guards not in the sample are dropped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use allium_proto::{Consensus, ConsensusRelay, RelayFlags, short_id};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::path;
use crate::pathbias::{PathBias, Verdict};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    identity: [u8; 32],
    /// When it joined the sample (UNIX seconds).
    added: u64,
}

/// The first byte of the `pathbias` file: the version of its format.
pub const BIAS_FORMAT: u8 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct StoredBias {
    identity: [u8; 32],
    bias: PathBias,
}

#[derive(Clone, Debug)]
struct Entry {
    stored: Stored,
    failures: u32,
    retry_at: Option<Instant>,
    /// When it last failed (a connection, or CREATEs left unanswered).
    failed_at: Option<Instant>,
    /// CREATEs in a row the guard left unanswered.
    unanswered: u32,
    bias: PathBias,
    /// The worst verdict logged for it since the process started.
    reported: Verdict,
}

impl Entry {
    fn new(stored: Stored) -> Self {
        Entry {
            stored,
            failures: 0,
            retry_at: None,
            failed_at: None,
            unanswered: 0,
            bias: PathBias::default(),
            reported: Verdict::Fine,
        }
    }
}

/// The guard sample and what is known about each guard's reachability and
/// path bias.
pub struct GuardSet {
    entries: Vec<Entry>,
    file: PathBuf,
    bias_file: PathBuf,
    /// Path-bias records not yet saved.
    unsaved: u32,
    size: usize,
    lifetime: u64,
    retry: Duration,
    /// When a guard last answered (reached, or a CREATE answered).
    answered_at: Option<Instant>,
}

/// CREATEs in a row a guard may leave unanswered before it is backed off
/// (one slow answer under load is no reason to leave a guard; a guard that
/// answers none would otherwise take every attempt of every build).
const UNANSWERED_BEFORE_BACKOFF: u32 = 3;

/// Longest wait before a failed guard is tried again.
const MAX_RETRY: Duration = Duration::from_secs(3600);

/// Path-bias counts are saved after this many records (and whenever a
/// verdict gets worse), so a crash loses a few circuits' worth at most.
const SAVE_BIAS_EVERY: u32 = 10;

impl GuardSet {
    /// The sample in `file` (`guards`) with the counts in `pathbias` next
    /// to it.
    pub fn load(file: PathBuf, size: usize, lifetime: u64, retry: Duration) -> Self {
        let stored: Vec<Stored> = std::fs::read(&file)
            .ok()
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let bias_file = file.with_file_name("pathbias");
        let bias = load_bias(&bias_file);
        let entries = stored
            .into_iter()
            .map(|stored| {
                let mut e = Entry::new(stored);
                if let Some(b) = bias.iter().find(|b| b.identity == e.stored.identity) {
                    e.bias = b.bias;
                }
                e
            })
            .collect();
        GuardSet {
            entries,
            file,
            bias_file,
            unsaved: 0,
            size: size.max(1),
            lifetime,
            retry,
            answered_at: None,
        }
    }

    fn save_bias(&mut self) {
        self.unsaved = 0;
        let list: Vec<StoredBias> = self
            .entries
            .iter()
            .map(|e| StoredBias {
                identity: e.stored.identity,
                bias: e.bias,
            })
            .collect();
        save(&self.bias_file, &(BIAS_FORMAT, list), "path-bias counts");
    }

    fn save(&self) {
        let list: Vec<&Stored> = self.entries.iter().map(|e| &e.stored).collect();
        save(&self.file, &list, "guards");
    }

    /// Drop guards that left the consensus or outlived their lifetime, and
    /// fill the sample up again: `size` guards listed Running, not
    /// disabled and not [`GuardSet::unreachable`], and at most `2 * size`
    /// entries in all.
    pub fn update(&mut self, c: &Consensus, now: u64) {
        let before: Vec<[u8; 32]> = self.ids();
        self.entries.retain(|e| {
            c.relay(&e.stored.identity).is_some() && e.stored.added + self.lifetime > now
        });
        let disabled = self.entries.iter().filter(|e| e.bias.disabled).count();
        if disabled >= self.size {
            // As many guards judged bad as the sample holds: this client's
            // own network is a likelier cause than so many attacking
            // guards, and a client left with no guard at all is worse off
            // than one that starts counting again.
            warn!(
                disabled,
                "path bias: as many guards failed too many circuits as the sample holds; suspecting this network rather than the guards, the counts start again"
            );
            for e in &mut self.entries {
                e.bias = PathBias::default();
                e.reported = Verdict::Fine;
            }
            self.save_bias();
        }
        // Entries the consensus lists but not as Running guards, and those
        // this client found unreachable itself, stay (they come first again
        // when they are back) but are not counted: a sample of three with
        // one down leaves a client (or a service) whose other guard shares
        // a family with the relay a circuit must end at without a way
        // there until the consensus drops the relay.
        let unreachable = self.unreachable();
        let enabled = (self.entries.iter())
            .filter(|e| !e.bias.disabled && !unreachable.contains(&e.stored.identity))
            .filter(|e| {
                c.relay(&e.stored.identity)
                    .is_some_and(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::GUARD))
            })
            .count();
        let room = (2 * self.size).saturating_sub(self.entries.len());
        let want = self.size.saturating_sub(enabled).min(room);
        if want > 0 {
            let have = self.ids();
            for g in path::sample_guards(&mut rand::rng(), c, want, &have) {
                info!(guard = %g.nickname, "guard added to the sample");
                self.entries.push(Entry::new(Stored {
                    identity: g.identity,
                    added: now,
                }));
            }
        }
        if self.ids() != before {
            self.save();
            self.save_bias();
        }
    }

    /// The sample, in order.
    pub fn ids(&self) -> Vec<[u8; 32]> {
        self.entries.iter().map(|e| e.stored.identity).collect()
    }

    /// The guard to use now: the first of [`GuardSet::usable`].
    pub fn pick(&self, c: &Consensus) -> Option<ConsensusRelay> {
        self.usable(c).into_iter().next()
    }

    /// The entries usable now, in order: listed Running and Guard, not
    /// waiting for a retry and not disabled for path bias.
    pub fn usable(&self, c: &Consensus) -> Vec<ConsensusRelay> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|e| !e.bias.disabled && e.retry_at.is_none_or(|t| now >= t))
            .filter_map(|e| {
                c.relay(&e.stored.identity)
                    .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::GUARD))
                    .cloned()
            })
            .collect()
    }

    /// The sampled guards this client itself could not reach (a connection
    /// failed, or CREATEs went unanswered) and waits to try again, when
    /// another guard has answered since: with none answering, the client's
    /// own network is the likelier cause.
    pub fn unreachable(&self) -> Vec<[u8; 32]> {
        let now = Instant::now();
        (self.entries.iter())
            .filter(|e| {
                e.retry_at.is_some_and(|t| now < t)
                    && e.failed_at
                        .zip(self.answered_at)
                        .is_some_and(|(f, a)| f < a)
            })
            .map(|e| e.stored.identity)
            .collect()
    }

    /// The guard could not be reached: try the next one, and this one again
    /// after a backoff.
    pub fn failed(&mut self, id: &[u8; 32]) {
        if let Some(e) = self.entries.iter_mut().find(|e| &e.stored.identity == id) {
            e.failures = e.failures.saturating_add(1);
            e.failed_at = Some(Instant::now());
            let wait = self
                .retry
                .saturating_mul(1 << e.failures.min(10).saturating_sub(1))
                .min(MAX_RETRY);
            e.retry_at = Some(Instant::now() + wait);
            warn!(failures = e.failures, retry_in = ?wait, "guard unreachable; using the next one meanwhile");
        }
    }

    pub fn succeeded(&mut self, id: &[u8; 32]) {
        if let Some(e) = self.entries.iter_mut().find(|e| &e.stored.identity == id) {
            self.answered_at = Some(Instant::now());
            if e.failures > 0 {
                info!("guard reachable again");
            }
            e.failures = 0;
            e.retry_at = None;
        }
    }

    /// A build through guard `id` got `hops` of its `of` hops built. With
    /// none, the guard did not answer the CREATE (or not in time) and path
    /// bias counts nothing; after [`UNANSWERED_BEFORE_BACKOFF`] in a row it
    /// is backed off as if unreachable ([`GuardSet::failed`]). Otherwise the guard answered (it is reachable) and the circuit
    /// counts for its path bias, failed unless every hop was built. The
    /// middle and the exit are not judged: whatever happened beyond the
    /// guard reached the client through the guard.
    pub fn record_build(&mut self, id: &[u8; 32], hops: usize, of: usize) {
        let Some(e) = self.entries.iter_mut().find(|e| &e.stored.identity == id) else {
            return;
        };
        if hops == 0 {
            e.unanswered += 1;
            if e.unanswered >= UNANSWERED_BEFORE_BACKOFF {
                e.unanswered = 0;
                self.failed(id);
            }
            return;
        }
        e.unanswered = 0;
        self.succeeded(id);
        self.record(id, |b| b.record_build(hops >= of));
    }

    /// The first stream or resolve on a circuit through guard `id` was
    /// `answered` by the exit, or timed out or lost its circuit.
    pub fn record_use(&mut self, id: &[u8; 32], answered: bool) {
        self.record(id, |b| b.record_use(answered));
    }

    fn record(&mut self, id: &[u8; 32], f: impl FnOnce(&mut PathBias)) {
        let Some(e) = self.entries.iter_mut().find(|e| &e.stored.identity == id) else {
            return;
        };
        if e.bias.disabled {
            return;
        }
        f(&mut e.bias);
        self.unsaved += 1;
        let verdict = e.bias.verdict();
        if verdict > e.reported {
            e.reported = verdict;
            let (built, answered) = e.bias.rates();
            let (attempts, uses) = (e.bias.attempts, e.bias.uses);
            let guard = short_id(id);
            match verdict {
                Verdict::Fine => {}
                Verdict::Notice => info!(
                    %guard, built, attempts, answered, uses,
                    "path bias: more circuits through this guard fail than through a healthy guard"
                ),
                Verdict::Warn => warn!(
                    %guard, built, attempts, answered, uses,
                    "path bias: most circuits through this guard fail; it may be attacking, or the network beyond it is failing"
                ),
                Verdict::Extreme => warn!(
                    %guard, built, attempts, answered, uses,
                    "path bias: this guard fails far too many circuits and may be attacking this client (failing circuits to steer it to colluding relays); it is disabled and the next guard is used"
                ),
            }
            self.save_bias();
        } else if self.unsaved >= SAVE_BIAS_EVERY {
            self.save_bias();
        }
    }

    /// Guard `id`'s path-bias counts, if it is in the sample.
    pub fn bias(&self, id: &[u8; 32]) -> Option<PathBias> {
        self.entries
            .iter()
            .find(|e| &e.stored.identity == id)
            .map(|e| e.bias)
    }
}

/// Write `value` to `file` (postcard, atomically, 0600); a failure is
/// logged as one to save `what`: the client goes on with what it holds.
pub(crate) fn save<T: Serialize + ?Sized>(file: &std::path::Path, value: &T, what: &str) {
    match postcard::to_stdvec(value) {
        Ok(b) => {
            if let Err(e) = allium_directory::store::write_atomic(file, &b, 0o600) {
                warn!("saving {what}: {e}");
            }
        }
        Err(e) => warn!("encoding {what}: {e}"),
    }
}

/// The counts in a `pathbias` file; none if it is missing, unreadable or
/// of another format.
fn load_bias(file: &std::path::Path) -> Vec<StoredBias> {
    let Ok(bytes) = std::fs::read(file) else {
        return Vec::new();
    };
    match postcard::from_bytes::<(u8, Vec<StoredBias>)>(&bytes) {
        Ok((BIAS_FORMAT, list)) => list,
        Ok((v, _)) => {
            warn!("path-bias counts in format {v}, not {BIAS_FORMAT}: starting again from zero");
            Vec::new()
        }
        Err(e) => {
            warn!("reading path-bias counts: {e}; starting again from zero");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consensus of Guard relays `ids`.
    fn consensus(ids: &[u8]) -> Consensus {
        let relay = |i| crate::path::tests::relay(i, 1000, RelayFlags::GUARD);
        crate::path::tests::consensus_of(ids.iter().map(|&i| relay(i)).collect())
    }

    #[test]
    fn persists_orders_retries_and_expires() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("guards");
        let c = consensus(&[1, 2, 3, 4, 5, 6]);
        let mut g = GuardSet::load(file.clone(), 3, 1000, Duration::from_millis(50));
        g.update(&c, 100);
        let sample = g.ids();
        assert_eq!(sample.len(), 3);
        let first = g.pick(&c).unwrap().identity;
        assert_eq!(first, sample[0]);
        // The same sample after a restart.
        let g2 = GuardSet::load(file.clone(), 3, 1000, Duration::from_millis(50));
        assert_eq!(g2.ids(), sample);
        // A failed guard is skipped, then tried again. It is said
        // unreachable once another guard answers, until then.
        g.failed(&first);
        assert_eq!(g.pick(&c).unwrap().identity, sample[1]);
        assert!(g.unreachable().is_empty(), "no guard answered since");
        g.succeeded(&sample[1]);
        assert_eq!(g.unreachable(), vec![first]);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(g.pick(&c).unwrap().identity, first);
        assert!(g.unreachable().is_empty());
        // Guards failing one after another with none answering (the
        // client's own network down) are none of them unreachable.
        for id in &sample {
            g.failed(id);
        }
        assert!(g.unreachable().is_empty());
        std::thread::sleep(Duration::from_millis(120));
        for id in &sample {
            g.succeeded(id);
        }
        // One listed without Running stays, and another is drawn beside it,
        // used until it is back; no more than twice the size in all.
        let mut h = GuardSet::load(d.path().join("g2"), 3, 1000, Duration::from_millis(50));
        h.update(&c, 100);
        let three = h.ids();
        let mut down = consensus(&[1, 2, 3, 4, 5, 6]);
        let j = down
            .relays
            .iter()
            .position(|r| r.identity == three[0])
            .unwrap();
        down.relays[j].flags = RelayFlags(RelayFlags::GUARD | RelayFlags::VALID);
        h.update(&down, 101);
        assert_eq!(h.ids().len(), 4);
        assert_eq!(h.ids()[..3], three[..]);
        assert_eq!(h.usable(&down).len(), 3);
        h.update(&c, 102);
        assert_eq!(
            h.pick(&c).unwrap().identity,
            three[0],
            "first again when back"
        );
        // Two this client could not reach while another answered, still
        // listed Running: of the four, two count; another is drawn.
        let listed = h.ids();
        h.failed(&listed[1]);
        h.failed(&listed[2]);
        h.succeeded(&listed[0]);
        h.update(&c, 103);
        assert_eq!(h.ids().len(), 5);
        assert_eq!(h.ids()[..4], listed[..]);
        std::thread::sleep(Duration::from_millis(80));
        h.update(&c, 104);
        assert_eq!(h.ids().len(), 5, "the sample keeps what it drew");
        let five = h.ids();
        let mut down = consensus(&[1, 2, 3, 4, 5, 6]);
        let four = &five[..4];
        for r in down
            .relays
            .iter_mut()
            .filter(|r| four.contains(&r.identity))
        {
            r.flags = RelayFlags(RelayFlags::GUARD | RelayFlags::VALID);
        }
        h.update(&down, 105);
        assert_eq!(h.ids().len(), 6, "one more, to twice the size");
        assert_eq!(h.usable(&down).len(), 2);
        // A guard that leaves the consensus leaves the sample, which refills.
        let without: Vec<u8> = (1..=6).filter(|i| [*i; 32] != first).collect();
        let c2 = consensus(&without);
        g.update(&c2, 200);
        assert!(!g.ids().contains(&first));
        assert_eq!(g.ids().len(), 3);
        // All expire after their lifetime.
        g.update(&c2, 5000);
        assert_eq!(g.ids().len(), 3);
        assert!(
            g.entries.iter().all(|e| e.stored.added == 5000),
            "every old entry expired and was replaced"
        );
    }

    /// `n` builds through `id`, the `i`th failing when `fail(i)` holds
    /// (at the second or third hop: the first was built either way).
    fn builds(g: &mut GuardSet, id: &[u8; 32], n: usize, fail: impl Fn(usize) -> bool) {
        for i in 0..n {
            g.record_build(id, if fail(i) { 1 + i % 2 } else { 3 }, 3);
        }
    }

    #[test]
    fn a_guard_failing_circuits_is_flagged_then_disabled_for_good() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("guards");
        let c = consensus(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let load = || GuardSet::load(file.clone(), 3, 1000, Duration::from_secs(30));
        let mut g = load();
        g.update(&c, 100);
        let sample = g.ids();
        let bad = sample[0];
        // 200 circuits each: the first guard fails 60% of them, the others 5%.
        for _ in 0..10 {
            builds(&mut g, &bad, 20, |i| i % 10 < 6);
            for good in &sample[1..] {
                builds(&mut g, good, 20, |i| i % 20 == 0);
            }
        }
        // CREATEs the guard does not answer are the backoff's business, not
        // path bias: the third in a row backs it off.
        g.record_build(&bad, 0, 3);
        g.record_build(&bad, 0, 3);
        assert_eq!(g.pick(&c).unwrap().identity, bad);
        g.record_build(&bad, 0, 3);
        assert_eq!(g.pick(&c).unwrap().identity, sample[1], "backed off");
        g.succeeded(&bad);
        let b = g.bias(&bad).unwrap();
        assert_eq!((b.attempts, b.successes), (200, 80));
        assert_eq!(b.verdict(), Verdict::Warn, "flagged");
        assert!(!b.disabled);
        for good in &sample[1..] {
            assert_eq!(g.bias(good).unwrap().verdict(), Verdict::Fine);
        }
        assert_eq!(g.pick(&c).unwrap().identity, bad, "flagged, still used");

        // It gets worse (9 circuits in 10 fail) until it is disabled.
        let mut n = 0;
        while !g.bias(&bad).unwrap().disabled {
            builds(&mut g, &bad, 1, |_| n % 10 != 0);
            n += 1;
            assert!(n < 200, "not disabled after {n} more circuits");
        }
        assert_eq!(g.bias(&bad).unwrap().verdict(), Verdict::Extreme);
        assert_eq!(g.pick(&c).unwrap().identity, sample[1], "the next guard");
        let frozen = g.bias(&bad).unwrap();
        builds(&mut g, &bad, 50, |_| false);
        assert_eq!(
            g.bias(&bad),
            Some(frozen),
            "a disabled guard is not counted"
        );

        // It stays in the sample, which gets a guard to replace it.
        g.update(&c, 200);
        let ids = g.ids();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[..3], sample[..]);

        // All of it survives a restart.
        let mut g2 = load();
        assert_eq!(g2.ids(), ids);
        for id in &ids {
            assert_eq!(g2.bias(id), g.bias(id));
        }
        assert!(g2.bias(&bad).unwrap().disabled);
        assert_eq!(g2.pick(&c).unwrap().identity, sample[1]);

        // As many disabled guards as the sample holds: the client suspects
        // its own network rather than every guard, and counts again from
        // zero instead of being left with no guard.
        for _ in 0..2 {
            g2.update(&c, 300);
            let next = g2.pick(&c).unwrap().identity;
            builds(&mut g2, &next, 1000, |_| true);
            assert!(g2.bias(&next).unwrap().disabled);
        }
        g2.update(&c, 300);
        assert!(g2.ids().iter().all(|id| !g2.bias(id).unwrap().disabled));
        assert_eq!(g2.pick(&c).unwrap().identity, sample[0]);
        assert_eq!(load().bias(&bad).unwrap(), PathBias::default(), "saved");
    }

    #[test]
    fn counts_in_another_format_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("guards");
        let c = consensus(&[1, 2, 3, 4]);
        let mut g = GuardSet::load(file.clone(), 3, 1000, Duration::from_secs(30));
        g.update(&c, 100);
        let first = g.ids()[0];
        builds(&mut g, &first, 60, |_| true);
        assert!(g.bias(&first).unwrap().disabled);
        // A later format, or a damaged file: the sample loads, the counts
        // start again.
        for bytes in [vec![BIAS_FORMAT + 1, 0], vec![BIAS_FORMAT, 0xff]] {
            std::fs::write(d.path().join("pathbias"), bytes).unwrap();
            let g2 = GuardSet::load(file.clone(), 3, 1000, Duration::from_secs(30));
            assert_eq!(g2.ids(), g.ids());
            assert_eq!(g2.bias(&first), Some(PathBias::default()));
        }
        // A sample without counts (as written before they existed) loads.
        std::fs::remove_file(d.path().join("pathbias")).unwrap();
        let g3 = GuardSet::load(file.clone(), 3, 1000, Duration::from_secs(30));
        assert_eq!(g3.ids(), g.ids());
        assert_eq!(g3.pick(&c).unwrap().identity, first);
    }
}
