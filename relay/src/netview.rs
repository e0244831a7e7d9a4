//! The relay's view of the network: the consensus, fetched and verified
//! against the pinned authority keys as a client does, refreshed at each
//! fresh-until.
//!
//! A relay needs it to check what peers claim: it extends circuits only to
//! relays the consensus lists, at the address and link key listed there
//! (so a relay cannot be used to reach arbitrary hosts), and it exempts
//! links from listed relays, at their listed address, from the per-address
//! circuit rate that every other link pays.
//!
//! It is also what the relay serves as a directory cache: clients fetch
//! the consensus from their guards over BEGIN_DIR streams, and only relays
//! fetch from the authorities.
//!
//! A relay configured with no authorities (an isolated test relay) has no
//! view: its extends rest on the identity proof of the link handshake alone.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_directory::cache::ConsensusCache;
use allium_directory::hsdir::{DirView, ServiceDirectory};
use allium_directory::{AuthorityEntry, http, unix_now, unix_now_ms};
use allium_proto::{AuthorityKey, Consensus, ConsensusRelay, RelayId};
use tokio::sync::{Notify, Semaphore, SemaphorePermit, watch};
use tokio::time::Instant;
use tracing::{debug, info};

/// Fetches asked for by lookups of unlisted relays (only while the
/// consensus is due for refresh) happen at most this often.
const POKE_INTERVAL: Duration = Duration::from_secs(5);
/// The longest wait for a newer consensus once the one held is stale.
const STALE_MAX: u64 = 60;
/// How long a lookup of an unlisted relay waits for a fresher consensus.
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// The relays of one process fetch at most this many consensuses at once,
/// in turn, and as many more that extends wait for. A relay fetches one at
/// a time anyway; a test network runs thousands in one process. When a
/// consensus first lists them all, each fetches about a megabyte within a
/// second or two: side by side, all of them held it only seconds later,
/// and no circuit could be extended through them until then. In turn, the
/// first relays hold it within a second, and a relay that an extend waits
/// for goes first ([`take_turn`]).
const TURNS: usize = 4;
static FETCHES: Semaphore = Semaphore::const_new(TURNS);
static FIRST: Semaphore = Semaphore::const_new(TURNS);

/// What the consensus says of a relay.
#[derive(Debug)]
pub enum Listing {
    Listed(Box<ConsensusRelay>),
    NotListed,
    /// No authorities are configured: nothing to check against.
    NoDirectory,
}

pub struct NetView {
    auths: Vec<AuthorityEntry>,
    keys: Vec<AuthorityKey>,
    current: watch::Sender<Option<Arc<Consensus>>>,
    poke: Notify,
    /// What this relay serves to clients as a directory cache: the
    /// consensuses it verified, and diffs between them.
    cache: Arc<ConsensusCache>,
    /// The onion service descriptors this relay stores.
    services: Arc<ServiceDirectory>,
}

impl NetView {
    pub fn new(auths: Vec<AuthorityEntry>, keys: Vec<AuthorityKey>) -> Self {
        NetView {
            auths,
            keys,
            current: watch::Sender::new(None),
            poke: Notify::new(),
            cache: Arc::new(ConsensusCache::new(allium_directory::cache::RELAY_LEVEL)),
            services: Arc::default(),
        }
    }

    /// The consensus cache this relay serves over BEGIN_DIR streams.
    pub fn cache(&self) -> &Arc<ConsensusCache> {
        &self.cache
    }

    /// The service descriptors this relay (`me`) stores and serves over
    /// BEGIN_DIR streams, with the consensus it holds (none before it holds
    /// one: nothing is stored then).
    pub fn services(&self, me: [u8; 32]) -> Option<DirView> {
        Some(DirView {
            dir: self.services.clone(),
            consensus: self.consensus()?,
            me,
        })
    }

    /// The service descriptors this relay stores.
    pub fn service_directory(&self) -> Arc<ServiceDirectory> {
        self.services.clone()
    }

    fn enabled(&self) -> bool {
        !self.auths.is_empty()
    }

    /// Every new consensus, as it arrives.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Consensus>>> {
        self.current.subscribe()
    }

    /// The current consensus, if it is still valid.
    pub fn consensus(&self) -> Option<Arc<Consensus>> {
        self.current
            .borrow()
            .clone()
            .filter(|c| unix_now() <= c.valid_until)
    }

    fn find(&self, id: &RelayId) -> Option<ConsensusRelay> {
        let c = self.consensus()?;
        c.relays
            .binary_search_by(|r| r.identity.cmp(&id.0))
            .ok()
            .map(|i| c.relays[i].clone())
    }

    /// Is `id` a listed relay whose listed address is `ip`?
    pub fn is_relay_at(&self, id: &RelayId, ip: IpAddr) -> bool {
        let Some(c) = self.consensus() else {
            return false;
        };
        c.relays
            .binary_search_by(|r| r.identity.cmp(&id.0))
            .is_ok_and(|i| c.relays[i].addr.ip() == ip)
    }

    /// What the consensus says of `id`. An unlisted relay may be newer than
    /// our consensus: ask for a fresh one and wait a little for it.
    pub async fn lookup(&self, id: &RelayId) -> Listing {
        if !self.enabled() {
            return Listing::NoDirectory;
        }
        if let Some(r) = self.find(id) {
            return Listing::Listed(Box::new(r));
        }
        // A fresher consensus can only exist once ours is due for refresh:
        // before that an unlisted relay is simply not listed (so clients
        // cannot make relays fetch the consensus at will).
        if self.consensus().is_some_and(|c| unix_now() < c.fresh_until) {
            return Listing::NotListed;
        }
        let mut rx = self.current.subscribe();
        rx.mark_unchanged();
        self.poke.notify_one();
        let _ = tokio::time::timeout(LOOKUP_WAIT, rx.changed()).await;
        match self.find(id) {
            Some(r) => Listing::Listed(Box::new(r)),
            None => Listing::NotListed,
        }
    }

    /// Keep the consensus fresh: fetch at fresh-until, on a poke (at most
    /// every [`POKE_INTERVAL`]), and retry failures as clients do
    /// ([`http::retry_wait`]: no tight loop while the directory is down,
    /// and at bootstrap a fetch when the authorities say the consensus is due).
    pub async fn run(&self) {
        if !self.enabled() {
            return std::future::pending().await;
        }
        let mut announced = false;
        let (mut failures, mut stale) = (0u32, 0u32);
        let (mut poked, mut last) = (None, None);
        loop {
            let turn = take_turn([&FETCHES, &FIRST], &self.poke, poked, last).await;
            let fetched = Instant::now();
            last = Some(fetched);
            // The consensus held is the base of the next diff.
            let held = self.cache.current();
            let fetched_now =
                http::fetch_verified_consensus(&self.auths, &self.keys, held.as_deref()).await;
            drop(turn);
            let wait = match fetched_now {
                Ok((c, bytes)) => {
                    failures = 0;
                    let newer = self
                        .consensus()
                        .is_none_or(|old| old.valid_after < c.valid_after);
                    if newer {
                        stale = 0;
                        self.cache.install(bytes, c.valid_until);
                        if !announced {
                            info!(relays = c.relays.len(), "consensus verified");
                            announced = true;
                        }
                        self.current.send_replace(Some(c.clone()));
                    } else {
                        // Nothing newer: still wake those waiting for it.
                        self.current.send_modify(|_| {});
                    }
                    let wait;
                    (wait, stale) = next_fetch(&c, unix_now_ms(), stale, rand::random());
                    wait
                }
                Err(e) => {
                    if !http::warn_if_wrong_keys(&e) {
                        debug!("fetching the consensus: {e}");
                    }
                    self.current.send_modify(|_| {});
                    failures = failures.saturating_add(1);
                    let have = self.consensus().is_some();
                    http::retry_wait(&e, failures, have, rand::random())
                }
            };
            // Poked: fetch at the time planned or POKE_INTERVAL after the
            // last fetch began, whichever comes first.
            let due = Instant::now() + wait;
            poked = tokio::select! {
                () = tokio::time::sleep_until(due) => None,
                () = self.poke.notified() => Some(due.min(fetched + POKE_INTERVAL)),
            };
        }
    }
}

/// Wait for a turn among the fetches of `turns[0]`. Once an extend waits
/// for this fetch (`poke` comes, or came: `poked` says from when on it may
/// be made), take one of the turns of `turns[1]`, kept for such fetches,
/// if it comes first: never sooner than [`POKE_INTERVAL`] after the `last`
/// fetch began.
async fn take_turn<'a>(
    turns: [&'a Semaphore; 2],
    poke: &Notify,
    poked: Option<Instant>,
    last: Option<Instant>,
) -> Option<SemaphorePermit<'a>> {
    if let Some(from) = poked {
        tokio::time::sleep_until(from).await;
    }
    let in_turn = turns[0].acquire();
    tokio::pin!(in_turn);
    if poked.is_none() {
        tokio::select! {
            turn = &mut in_turn => return turn.ok(),
            () = poke.notified() => {}
        }
    }
    let first = async {
        if let Some(last) = last {
            tokio::time::sleep_until(last + POKE_INTERVAL).await;
        }
        turns[1].acquire().await
    };
    tokio::select! {
        turn = in_turn => turn.ok(),
        turn = first => turn.ok(),
    }
}

/// How long until a relay fetches again after one that gave consensus `c`
/// at `now_ms` (milliseconds since the UNIX epoch), and the new count of
/// stale answers in a row; `r` is a random number. A fresh consensus is
/// fetched again at a random millisecond in [`http::cache_spread_ms`]
/// after it stops being fresh (relays
/// are the clients' caches: they must have the next one early, but not all
/// at once, even with periods of seconds); a stale one backs off from 1 s,
/// doubling up to [`STALE_MAX`], while the authorities are late (`stale`
/// counts answers that brought nothing newer; the caller resets it on one
/// that did).
fn next_fetch(c: &Consensus, now_ms: u64, stale: u32, r: u64) -> (Duration, u32) {
    if c.fresh_until.saturating_mul(1000) > now_ms {
        (http::after_fresh(c, now_ms, http::cache_spread_ms(c), r), 0)
    } else {
        (
            Duration::from_secs((1u64 << stale.min(6)).min(STALE_MAX)),
            stale.saturating_add(1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fetch_waits_its_turn_unless_an_extend_waits_for_it() {
        let (turns, first) = (Semaphore::new(1), Semaphore::new(1));
        let poke = Notify::new();
        let within = |f| tokio::time::timeout(Duration::from_secs(60), f);
        let take = |poked, last| take_turn([&turns, &first], &poke, poked, last);
        let held = turns.acquire().await.unwrap();
        // All turns taken: no turn before a poke.
        assert!(
            within(take(None, None)).await.is_err(),
            "a turn while all were taken"
        );
        // A poke goes first, on a turn kept for it, but not sooner than
        // POKE_INTERVAL after the last fetch began.
        let last = Instant::now();
        poke.notify_one();
        let poked = within(take(None, Some(last))).await;
        let poked = poked.expect("the poked fetch went first").unwrap();
        assert_eq!(last.elapsed(), POKE_INTERVAL);
        // No more of them than the turns kept for them.
        let last = Instant::now();
        let from = Some(last + Duration::from_secs(2));
        assert!(
            within(take(from, Some(last))).await.is_err(),
            "beyond the turns kept"
        );
        drop(poked);
        // Poked while asleep, every turn in turn taken: the kept turn, at
        // POKE_INTERVAL.
        let last = Instant::now();
        let again = take(Some(last + Duration::from_secs(2)), Some(last)).await;
        assert!(again.is_some());
        assert_eq!(last.elapsed(), POKE_INTERVAL);
        drop(again);
        // Poked while waiting in turn: a turn given back before
        // POKE_INTERVAL is taken then, the place in the queue kept.
        let last = Instant::now();
        poke.notify_one();
        let give_back = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(held);
        };
        let (turn, ()) = tokio::join!(take(None, Some(last)), give_back);
        assert!(turn.is_some());
        assert_eq!(last.elapsed(), Duration::from_secs(1));
        // Poked while asleep, the turns free: at the time given, not before.
        drop(turn);
        let t0 = Instant::now();
        assert!(
            take(Some(t0 + Duration::from_secs(2)), None)
                .await
                .is_some()
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }

    #[test]
    fn relays_fetch_early_in_the_period_and_back_off_while_it_is_stale() {
        let c = Consensus {
            valid_after: 3600,
            fresh_until: 7200,
            valid_until: 3 * 3600,
            relays: vec![],
            weights: Default::default(),
            shared_random: Default::default(),
        };
        let ms = |w: Duration| u64::try_from(w.as_millis()).unwrap();
        let waits: Vec<u64> = (0..1000)
            .map(|r| ms(next_fetch(&c, 3_700_000, 0, r * 449).0))
            .collect();
        assert!(waits.iter().all(|w| (3_500_000..3_950_000).contains(w)));
        assert!(waits.iter().any(|w| *w >= 3_900_000));
        let mut stale = 0;
        let mut seen = Vec::new();
        for _ in 0..8 {
            let w;
            (w, stale) = next_fetch(&c, 7_300_000, stale, 0);
            seen.push(w.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(
            next_fetch(&c, 7_100_000, stale, 0),
            (Duration::from_secs(100), 0)
        );
        // A period of 3 s: relays of the same second still spread their
        // fetches over its first 375 ms, and none fetches before it starts.
        let c = Consensus {
            valid_after: 3,
            fresh_until: 6,
            valid_until: 12,
            ..c
        };
        let at: std::collections::BTreeSet<u64> = (0..1000)
            .map(|r| 5_250 + ms(next_fetch(&c, 5_250, 0, r).0))
            .collect();
        assert_eq!(at.first(), Some(&6_000));
        assert_eq!(at.last(), Some(&6_374));
        assert_eq!(at.len(), 375);
    }
}
