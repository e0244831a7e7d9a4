//! A relay's store of onion service descriptors (doc/protocol.md section
//! 11.3): `POST /service/<hex blinded key>` files one, `GET` the same path
//! reads it, over BEGIN_DIR streams only.
//!
//! A directory takes a descriptor only if the blinded key in the path
//! signed it, it is for the current or the next period of the network, and
//! the directory is on the ring where that key's descriptors go (one place
//! of slack per point, for consensuses that differ by a relay); a higher
//! revision replaces a lower one. It keeps each until half a period after
//! its period ends, at most [`MAX_BYTES`] in all: when full, the
//! descriptors used longest ago (stored or served) make room. It never
//! learns which service a descriptor belongs to, and it logs and counts
//! descriptors without their keys.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use allium_proto::Consensus;
use allium_proto::service::BlindedKey;
use allium_proto::service::descriptor::{MAX_LEN, UnverifiedServiceDescriptor};
use allium_proto::service::ring::SPREAD_STORE;
use bytes::Bytes;
use hyper::StatusCode;

use crate::auth::lock;

/// Descriptor bytes a directory holds at most (about 2,000 of the largest).
pub const MAX_BYTES: usize = 16 * 1024 * 1024;

struct Entry {
    bytes: Bytes,
    revision: u64,
    /// When its period ends.
    expires: u64,
    /// When it was last stored or served.
    used: u64,
}

#[derive(Default)]
struct Store {
    by_key: HashMap<BlindedKey, Entry>,
    /// The same keys by expiry, to drop the expired without a scan.
    by_expiry: BTreeSet<(u64, BlindedKey)>,
    bytes: usize,
}

impl Store {
    fn remove(&mut self, key: &BlindedKey) {
        if let Some(e) = self.by_key.remove(key) {
            self.by_expiry.remove(&(e.expires, *key));
            self.bytes -= e.bytes.len();
        }
    }

    fn expire(&mut self, now: u64) {
        while let Some(&(t, k)) = self.by_expiry.first()
            && t <= now
        {
            self.remove(&k);
        }
    }
}

/// The descriptors a relay holds for services.
pub struct ServiceDirectory {
    store: Mutex<Store>,
    /// Bytes held at most.
    limit: usize,
    /// Descriptors taken, refused, served, and asked for but not held.
    pub stored: AtomicU64,
    pub refused: AtomicU64,
    pub served: AtomicU64,
    pub missed: AtomicU64,
    /// Held descriptors dropped to make room.
    pub evicted: AtomicU64,
}

/// What a directory needs to take a descriptor: its store, the consensus
/// it holds, and its own identity.
#[derive(Clone)]
pub struct DirView {
    pub dir: Arc<ServiceDirectory>,
    pub consensus: Arc<Consensus>,
    pub me: [u8; 32],
}

type Refusal = (StatusCode, &'static str);

impl Default for ServiceDirectory {
    fn default() -> Self {
        Self::with_limit(MAX_BYTES)
    }
}

/// The blinded key a path names.
fn key_of(path: &str) -> Result<BlindedKey, Refusal> {
    let h = path
        .strip_prefix("/service/")
        .ok_or((StatusCode::NOT_FOUND, "no such document"))?;
    let mut k = [0u8; 32];
    hex::decode_to_slice(h, &mut k)
        .map_err(|_| (StatusCode::BAD_REQUEST, "a blinded key: 64 hex digits"))?;
    Ok(BlindedKey(k))
}

impl ServiceDirectory {
    /// A store of at most `limit` bytes of descriptors.
    pub fn with_limit(limit: usize) -> Self {
        ServiceDirectory {
            store: Mutex::default(),
            limit,
            stored: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            served: AtomicU64::new(0),
            missed: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// Descriptors held now.
    pub fn len(&self) -> usize {
        lock(&self.store).by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every descriptor held, as stored.
    pub fn descriptors(&self) -> Vec<Bytes> {
        lock(&self.store)
            .by_key
            .values()
            .map(|e| e.bytes.clone())
            .collect()
    }

    /// File `body` under the key `path` names, at time `now`, as the
    /// directory `me` of `consensus`.
    pub fn post(
        &self,
        path: &str,
        body: &[u8],
        now: u64,
        consensus: &Consensus,
        me: &[u8; 32],
    ) -> Result<(), Refusal> {
        let r = self.take(path, body, now, consensus, me);
        let counter = if r.is_ok() {
            &self.stored
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn take(
        &self,
        path: &str,
        body: &[u8],
        now: u64,
        consensus: &Consensus,
        me: &[u8; 32],
    ) -> Result<(), Refusal> {
        let key = key_of(path)?;
        if body.len() > MAX_LEN {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "a descriptor is at most 8 KiB",
            ));
        }
        let u = UnverifiedServiceDescriptor::parse(body)
            .map_err(|_| (StatusCode::BAD_REQUEST, "not a service descriptor"))?;
        if u.blinded_key() != key {
            return Err((StatusCode::BAD_REQUEST, "filed under another key"));
        }
        let d = u.verify().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                "not signed by the blinded key it is filed under",
            )
        })?;
        let period = d.period();
        let here = consensus.period_at(now);
        if period.length != here.length
            || !(period.number == here.number || period.number == here.number + 1)
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "not for the current or the next period",
            ));
        }
        let ring = consensus.hsdir_ring(period).ok_or((
            StatusCode::SERVICE_UNAVAILABLE,
            "this directory does not know that period's ring yet",
        ))?;
        if !ring
            .responsible(&key, SPREAD_STORE + 1)
            .iter()
            .any(|r| r.identity == *me)
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "this directory is not where that key's descriptors go",
            ));
        }
        let mut s = lock(&self.store);
        s.expire(now);
        if let Some(e) = s.by_key.get(&key)
            && e.revision >= d.revision()
        {
            return Err((StatusCode::CONFLICT, "a revision as high is held"));
        }
        s.remove(&key);
        let need = d.bytes().len();
        if s.bytes + need > self.limit {
            // Room from the descriptors used longest ago.
            let mut by_use: Vec<(u64, BlindedKey)> =
                s.by_key.iter().map(|(k, e)| (e.used, *k)).collect();
            by_use.sort_unstable();
            for (_, k) in by_use {
                if s.bytes + need <= self.limit {
                    break;
                }
                s.remove(&k);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Half a period past the period's end: a client that took the
        // period from its clock just before the end asks its directories
        // one after another, each a few round trips away, and the last
        // asked would otherwise have dropped it by then (as would all of
        // them for a client whose clock runs a little late).
        let expires = period.end().saturating_add(period.length / 2);
        s.bytes += need;
        s.by_expiry.insert((expires, key));
        s.by_key.insert(
            key,
            Entry {
                bytes: Bytes::copy_from_slice(d.bytes()),
                revision: d.revision(),
                expires,
                used: now,
            },
        );
        Ok(())
    }

    /// The descriptor filed under the key `path` names, if held at `now`.
    pub fn get(&self, path: &str, now: u64) -> Result<Bytes, Refusal> {
        let key = key_of(path)?;
        let found = {
            let mut s = lock(&self.store);
            s.expire(now);
            s.by_key.get_mut(&key).map(|e| {
                e.used = now;
                e.bytes.clone()
            })
        };
        match found {
            Some(b) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                Ok(b)
            }
            None => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                Err((StatusCode::NOT_FOUND, "no descriptor under that key"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_proto::service::descriptor::{IntroPoint, ServiceInfo, build};
    use allium_proto::service::{ServiceAddress, TimePeriod};
    use allium_proto::{ConsensusRelay, RelayFlags};
    use ed25519_dalek::SigningKey;

    const NOW: u64 = 1_800_000_000;
    const INTERVAL: u64 = 3600;

    fn info() -> ServiceInfo {
        ServiceInfo {
            intro_points: vec![IntroPoint {
                relay: [1; 32],
                auth_key: [2; 32],
                enc_key: [3; 32],
            }],
            pow: None,
        }
    }

    /// A consensus at NOW with `n` service directories, relays 1 to n.
    fn consensus(n: u8) -> Consensus {
        let relays = (1..=n)
            .map(|i| ConsensusRelay {
                nickname: format!("r{i}"),
                identity: [i; 32],
                link_key: allium_proto::LinkKey([i; 32]),
                onion_key: allium_proto::OnionKey([i; 32]),
                addr: ([127, 0, 0, i], 9000).into(),
                flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::HSDIR),
                bandwidth: 1000,
                declared_bandwidth: 1000,
                measured_bandwidth: None,
                exit_ports: Default::default(),
                family: None,
                descriptor_digest: [0; 32],
            })
            .collect();
        Consensus {
            valid_after: NOW,
            fresh_until: NOW + INTERVAL,
            valid_until: NOW + 3 * INTERVAL,
            relays,
            weights: Default::default(),
            shared_random: Default::default(),
        }
    }

    fn doc(service: u8, revision: u64, period: TimePeriod) -> (String, Vec<u8>) {
        let id = SigningKey::from_bytes(&[service; 32]);
        let a = ServiceAddress::from_key(&id.verifying_key().to_bytes()).unwrap();
        let path = format!("/service/{}", hex::encode(a.blinded(period).0));
        (
            path,
            build(&id, period, revision, &info(), &[], &mut rand::rng()),
        )
    }

    #[test]
    fn stores_the_highest_revision_until_half_a_period_after_its_period_ends() {
        let (c, me) = (consensus(4), [1; 32]);
        let dir = ServiceDirectory::default();
        let p = TimePeriod::at(NOW, INTERVAL);
        let (path, d1) = doc(7, 1, p);
        assert!(dir.get(&path, NOW).is_err());
        dir.post(&path, &d1, NOW, &c, &me).unwrap();
        assert_eq!(dir.get(&path, NOW).unwrap(), d1);
        let (_, d2) = doc(7, 2, p);
        dir.post(&path, &d2, NOW, &c, &me).unwrap();
        assert_eq!(dir.get(&path, NOW).unwrap(), d2);
        // A replay of the older one is refused.
        assert_eq!(
            dir.post(&path, &d1, NOW, &c, &me).unwrap_err().0,
            StatusCode::CONFLICT
        );
        // The next period's is taken ahead once the consensus places it;
        // one for two periods on is not.
        let va = p.start() + p.length / 2;
        let later = Consensus {
            valid_after: va,
            fresh_until: va + INTERVAL,
            valid_until: va + 3 * INTERVAL,
            ..consensus(4)
        };
        let (next_path, next) = doc(7, 1, p.next());
        dir.post(&next_path, &next, later.valid_after, &later, &me)
            .unwrap();
        let (far_path, far) = doc(7, 1, p.next().next());
        assert!(
            dir.post(&far_path, &far, later.valid_after, &later, &me)
                .is_err()
        );
        // Still there just after the period ends; gone half a period later.
        assert_eq!(dir.get(&path, p.end() + 1).unwrap(), d2);
        assert!(dir.get(&path, p.end() + p.length / 2).is_err());
        assert_eq!(dir.stored.load(Ordering::Relaxed), 3);
        assert_eq!(dir.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refuses_what_the_key_in_the_path_did_not_sign() {
        let (c, me) = (consensus(4), [1; 32]);
        let dir = ServiceDirectory::default();
        let p = TimePeriod::at(NOW, INTERVAL);
        let (path, d) = doc(7, 1, p);
        let (other_path, _) = doc(8, 1, p);
        assert!(dir.post(&other_path, &d, NOW, &c, &me).is_err());
        let mut bad = d.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(dir.post(&path, &bad, NOW, &c, &me).is_err());
        assert!(dir.post("/service/xyz", &d, NOW, &c, &me).is_err());
        assert!(
            dir.post(&path, &vec![0; MAX_LEN + 1], NOW, &c, &me)
                .is_err()
        );
        assert!(dir.is_empty());
    }

    /// A directory takes only the keys whose points it follows on the ring
    /// (five places per point), so a flood of made-up keys spreads over
    /// the whole ring instead of filling one directory.
    #[test]
    fn takes_only_keys_it_is_responsible_for() {
        let c = consensus(40);
        let p = TimePeriod::at(NOW, INTERVAL);
        let (path, d) = doc(7, 1, p);
        let ring = c.hsdir_ring(p).unwrap();
        let key = UnverifiedServiceDescriptor::parse(&d)
            .unwrap()
            .blinded_key();
        let ours: Vec<[u8; 32]> = ring
            .responsible(&key, SPREAD_STORE + 1)
            .iter()
            .map(|r| r.identity)
            .collect();
        assert_eq!(ours.len(), 2 * (SPREAD_STORE + 1));
        let mut taken = 0;
        for i in 1..=40u8 {
            let dir = ServiceDirectory::default();
            let r = dir.post(&path, &d, NOW, &c, &[i; 32]);
            assert_eq!(r.is_ok(), ours.contains(&[i; 32]), "relay {i}: {r:?}");
            taken += usize::from(r.is_ok());
        }
        assert_eq!(taken, ours.len());
    }

    /// When full, the descriptors used longest ago make room; one that was
    /// just served stays.
    #[test]
    fn a_full_directory_drops_what_was_used_longest_ago() {
        let (c, me) = (consensus(4), [1; 32]);
        let p = TimePeriod::at(NOW, INTERVAL);
        let docs: Vec<(String, Vec<u8>)> = (10..15).map(|s| doc(s, 1, p)).collect();
        let size = docs[0].1.len();
        let dir = ServiceDirectory::with_limit(3 * size);
        for (i, (path, d)) in docs[..3].iter().enumerate() {
            dir.post(path, d, NOW + i as u64, &c, &me).unwrap();
        }
        // The first is fetched: now the second is the one used longest ago.
        dir.get(&docs[0].0, NOW + 5).unwrap();
        dir.post(&docs[3].0, &docs[3].1, NOW + 6, &c, &me).unwrap();
        assert!(dir.get(&docs[1].0, NOW + 7).is_err());
        for i in [0, 2, 3] {
            assert!(dir.get(&docs[i].0, NOW + 7).is_ok(), "{i}");
        }
        assert_eq!(dir.evicted.load(Ordering::Relaxed), 1);
        assert_eq!(dir.len(), 3);
    }
}
