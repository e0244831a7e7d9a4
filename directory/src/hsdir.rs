//! A relay's store of onion service descriptors (doc/protocol.md section
//! 11.3): `POST /service/<hex blinded key>` files one, `GET` the same path
//! reads it, over BEGIN_DIR streams only.
//!
//! A directory takes a descriptor only if the blinded key in the path
//! signed it and it is for the current or the next period of the network;
//! a higher revision replaces a lower one. It keeps each until its period
//! ends, and at most [`MAX_BYTES`] in all. It never learns which service a
//! descriptor belongs to, and it logs and counts descriptors without their
//! keys.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use allium_proto::service::descriptor::{MAX_LEN, UnverifiedServiceDescriptor};
use allium_proto::service::{BlindedKey, TimePeriod};
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
}

#[derive(Default)]
struct Store {
    by_key: HashMap<BlindedKey, Entry>,
    bytes: usize,
}

/// The descriptors a relay holds for services.
#[derive(Default)]
pub struct ServiceDirectory {
    store: Mutex<Store>,
    /// Descriptors taken, refused, served, and asked for but not held.
    pub stored: AtomicU64,
    pub refused: AtomicU64,
    pub served: AtomicU64,
    pub missed: AtomicU64,
}

type Refusal = (StatusCode, &'static str);

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

    /// File `body` under the key `path` names, at time `now`, on a network
    /// that votes every `interval` seconds.
    pub fn post(&self, path: &str, body: &[u8], now: u64, interval: u64) -> Result<(), Refusal> {
        let r = self.take(path, body, now, interval);
        let counter = if r.is_ok() {
            &self.stored
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn take(&self, path: &str, body: &[u8], now: u64, interval: u64) -> Result<(), Refusal> {
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
        let here = TimePeriod::at(now, interval);
        if period.length != here.length
            || !(period.number == here.number || period.number == here.number + 1)
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "not for the current or the next period",
            ));
        }
        let mut s = lock(&self.store);
        s.by_key.retain(|_, e| e.expires > now);
        s.bytes = s.by_key.values().map(|e| e.bytes.len()).sum();
        let old = s.by_key.get(&key).map(|e| (e.revision, e.bytes.len()));
        if let Some((rev, _)) = old
            && rev >= d.revision()
        {
            return Err((StatusCode::CONFLICT, "a revision as high is held"));
        }
        let freed = old.map_or(0, |(_, n)| n);
        if s.bytes - freed + d.bytes().len() > MAX_BYTES {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "this directory is full"));
        }
        s.bytes = s.bytes - freed + d.bytes().len();
        s.by_key.insert(
            key,
            Entry {
                bytes: Bytes::copy_from_slice(d.bytes()),
                revision: d.revision(),
                expires: period.end(),
            },
        );
        Ok(())
    }

    /// The descriptor filed under the key `path` names, if held at `now`.
    pub fn get(&self, path: &str, now: u64) -> Result<Bytes, Refusal> {
        let key = key_of(path)?;
        let found = lock(&self.store)
            .by_key
            .get(&key)
            .filter(|e| e.expires > now)
            .map(|e| e.bytes.clone());
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
    use allium_proto::service::ServiceAddress;
    use allium_proto::service::descriptor::{IntroPoint, ServiceInfo, build};
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
        }
    }

    fn doc(revision: u64, period: TimePeriod) -> (String, Vec<u8>) {
        let id = SigningKey::from_bytes(&[7; 32]);
        let a = ServiceAddress::from_key(&id.verifying_key().to_bytes()).unwrap();
        let path = format!("/service/{}", hex::encode(a.blinded(period).0));
        (
            path,
            build(&id, period, revision, &info(), [revision as u8; 16]),
        )
    }

    #[test]
    fn stores_the_highest_revision_until_its_period_ends() {
        let dir = ServiceDirectory::default();
        let p = TimePeriod::at(NOW, INTERVAL);
        let (path, d1) = doc(1, p);
        assert!(dir.get(&path, NOW).is_err());
        dir.post(&path, &d1, NOW, INTERVAL).unwrap();
        assert_eq!(dir.get(&path, NOW).unwrap(), d1);
        let (_, d2) = doc(2, p);
        dir.post(&path, &d2, NOW, INTERVAL).unwrap();
        assert_eq!(dir.get(&path, NOW).unwrap(), d2);
        // A replay of the older one is refused.
        assert_eq!(
            dir.post(&path, &d1, NOW, INTERVAL).unwrap_err().0,
            StatusCode::CONFLICT
        );
        // The next period's is taken ahead; one for two periods on is not.
        let (next_path, next) = doc(1, p.next());
        dir.post(&next_path, &next, NOW, INTERVAL).unwrap();
        let (far_path, far) = doc(1, p.next().next());
        assert!(dir.post(&far_path, &far, NOW, INTERVAL).is_err());
        // Gone when the period ends.
        assert!(dir.get(&path, p.end()).is_err());
        assert_eq!(dir.stored.load(Ordering::Relaxed), 3);
        assert_eq!(dir.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn refuses_what_the_key_in_the_path_did_not_sign() {
        let dir = ServiceDirectory::default();
        let p = TimePeriod::at(NOW, INTERVAL);
        let (path, d) = doc(1, p);
        let (other_path, _) = doc(1, p.next());
        assert!(dir.post(&other_path, &d, NOW, INTERVAL).is_err());
        let mut bad = d.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(dir.post(&path, &bad, NOW, INTERVAL).is_err());
        assert!(dir.post("/service/xyz", &d, NOW, INTERVAL).is_err());
        assert!(
            dir.post(&path, &vec![0; MAX_LEN + 1], NOW, INTERVAL)
                .is_err()
        );
        assert!(dir.is_empty());
    }
}
