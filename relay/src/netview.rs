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
use allium_directory::{AuthorityEntry, http, unix_now};
use allium_proto::{AuthorityKey, Consensus, ConsensusRelay, RelayId};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{debug, info};

/// Fetches asked for by lookups of unlisted relays (only while the
/// consensus is due for refresh) happen at most this often.
const POKE_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest wait between scheduled fetches (a consensus served past its
/// fresh-until must not make every relay refetch every second).
const MIN_REFRESH: u64 = 5;
/// How long a lookup of an unlisted relay waits for a fresher consensus.
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

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
}

impl NetView {
    pub fn new(auths: Vec<AuthorityEntry>, keys: Vec<AuthorityKey>) -> Self {
        NetView {
            auths,
            keys,
            current: watch::Sender::new(None),
            poke: Notify::new(),
            cache: Arc::default(),
        }
    }

    /// The consensus cache this relay serves over BEGIN_DIR streams.
    pub fn cache(&self) -> &Arc<ConsensusCache> {
        &self.cache
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
    /// ([`http::retry_after`]: no tight loop while the directory is down).
    pub async fn run(&self) {
        if !self.enabled() {
            return std::future::pending().await;
        }
        let mut announced = false;
        let mut failures = 0u32;
        loop {
            let fetched = Instant::now();
            // The consensus held is the base of the next diff.
            let held = self.cache.current();
            let fetched_now =
                http::fetch_verified_consensus(&self.auths, &self.keys, held.as_deref()).await;
            let wait = match fetched_now {
                Ok((c, bytes)) => {
                    failures = 0;
                    let newer = self
                        .consensus()
                        .is_none_or(|old| old.valid_after < c.valid_after);
                    if newer {
                        self.cache.install(bytes.into());
                        if !announced {
                            info!(relays = c.relays.len(), "consensus verified");
                            announced = true;
                        }
                        self.current.send_replace(Some(c.clone()));
                        self.cache.make_diffs().await;
                    } else {
                        // Nothing newer: still wake those waiting for it.
                        self.current.send_modify(|_| {});
                    }
                    Duration::from_secs(
                        c.fresh_until
                            .saturating_sub(unix_now())
                            .clamp(MIN_REFRESH, 3600),
                    )
                }
                Err(e) => {
                    if !http::warn_if_wrong_keys(&e) {
                        debug!("fetching the consensus: {e}");
                    }
                    self.current.send_modify(|_| {});
                    failures = failures.saturating_add(1);
                    let have = self.consensus().is_some();
                    Duration::from_secs(http::retry_after(failures, have, rand::random()))
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.poke.notified() => {
                    tokio::time::sleep_until(fetched + POKE_INTERVAL).await;
                }
            }
        }
    }
}
