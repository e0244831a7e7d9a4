//! Time periods and blinded keys (doc/protocol.md section 11.1).
//!
//! A service never shows its identity key to the directories that store
//! its descriptor. For each time period it derives a blinded key from its
//! identity: anyone who knows the address can compute the blinded key's
//! public half for any period, but the blinded keys of two periods cannot
//! be linked to each other or to the address without it. The service alone
//! can sign with the blinded key, so a directory can still check that a
//! descriptor came from the key it is filed under.
//!
//! ```text
//! period length L = 24 * interval              (a day for hour-long intervals)
//! period number n = (t - L/2) / L              (periods start halfway through a shared-random run)
//! h  = SHA-512("allium service blinding" | A | u64(L) | u64(n))  reduced mod l
//! A' = h * A                                   (the blinded public key)
//! a' = h * a mod l,  prefix' = SHA-512("allium service blinding prefix" | prefix | h)[0..32]
//! ```
//!
//! ```
//! use allium_proto::service::{BlindedSigningKey, ServiceAddress, TimePeriod};
//! use ed25519_dalek::SigningKey;
//! let identity = SigningKey::from_bytes(&[7; 32]);
//! let address = ServiceAddress::from_key(&identity.verifying_key().to_bytes()).unwrap();
//! let period = TimePeriod::at(1_800_000_000, 3600);
//! // The service signs with its blinded key...
//! let signing = BlindedSigningKey::derive(&identity, period);
//! let sig = signing.sign(b"descriptor");
//! // ...and a client that knows only the address checks it.
//! assert!(address.blinded(period).verify(b"descriptor", &sig));
//! assert_ne!(address.blinded(period), address.blinded(period.next()));
//! ```

use curve25519_dalek::Scalar;
use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use super::ServiceAddress;

/// Voting intervals in one time period, as Tor's 24 one-hour intervals.
pub const INTERVALS_PER_PERIOD: u64 = 24;
const BLIND_DOMAIN: &[u8] = b"allium service blinding";
const PREFIX_DOMAIN: &[u8] = b"allium service blinding prefix";

/// A stretch of time during which a service keeps one blinded key and one
/// set of directories. Its length follows the network's voting interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimePeriod {
    pub number: u64,
    /// Seconds.
    pub length: u64,
}

impl TimePeriod {
    /// The length of a period for a network that votes every `interval`
    /// seconds.
    pub fn length_for(interval: u64) -> u64 {
        interval.saturating_mul(INTERVALS_PER_PERIOD).max(2)
    }

    /// The period that holds time `t` (seconds since the epoch) on a
    /// network that votes every `interval` seconds.
    pub fn at(t: u64, interval: u64) -> Self {
        let length = Self::length_for(interval);
        TimePeriod {
            number: t.saturating_sub(length / 2) / length,
            length,
        }
    }

    /// When the period begins (seconds since the epoch).
    pub fn start(&self) -> u64 {
        self.number
            .saturating_mul(self.length)
            .saturating_add(self.length / 2)
    }

    /// When the next period begins.
    pub fn end(&self) -> u64 {
        self.next().start()
    }

    pub fn next(&self) -> Self {
        TimePeriod {
            number: self.number.saturating_add(1),
            length: self.length,
        }
    }

    /// The 16 bytes that name the period in hashes: `u64(L) | u64(n)`.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.length.to_be_bytes());
        b[8..].copy_from_slice(&self.number.to_be_bytes());
        b
    }
}

/// A service's public key for one period: all that a directory, or anyone
/// without the address, ever sees of the service.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlindedKey(pub [u8; 32]);

impl BlindedKey {
    /// Does `sig` sign `msg` under this key (strict Ed25519: no small-order
    /// keys, no malleable signatures)?
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|k| k.verify_strict(msg, sig).is_ok())
    }
}

impl std::fmt::Debug for BlindedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlindedKey({})", hex::encode(&self.0[..8]))
    }
}

fn factor(identity: &[u8; 32], period: TimePeriod) -> Scalar {
    let h = Sha512::new()
        .chain_update(BLIND_DOMAIN)
        .chain_update(identity)
        .chain_update(period.to_bytes())
        .finalize();
    Scalar::from_bytes_mod_order_wide(&h.into())
}

impl ServiceAddress {
    /// The service's blinded key for `period`.
    pub fn blinded(&self, period: TimePeriod) -> BlindedKey {
        let h = factor(self.key(), period);
        // A ServiceAddress holds a point of the curve that is not of small
        // order (checked when it was made), so h * A is never the identity
        // unless h = 0 mod l, a 2^-252 chance.
        let a = CompressedEdwardsY(*self.key())
            .decompress()
            .unwrap_or_default();
        BlindedKey((h * a).compress().to_bytes())
    }
}

/// The secret half of a blinded key: the service signs its descriptors
/// with it.
pub struct BlindedSigningKey {
    secret: ExpandedSecretKey,
    public: VerifyingKey,
}

impl BlindedSigningKey {
    /// The blinded key of the service with identity `identity` for `period`.
    pub fn derive(identity: &SigningKey, period: TimePeriod) -> Self {
        let expanded = ExpandedSecretKey::from(identity.as_bytes());
        let h = factor(&identity.verifying_key().to_bytes(), period);
        let prefix = Sha512::new()
            .chain_update(PREFIX_DOMAIN)
            .chain_update(expanded.hash_prefix)
            .chain_update(h.to_bytes())
            .finalize();
        let mut hash_prefix = [0u8; 32];
        hash_prefix.copy_from_slice(&prefix[..32]);
        let secret = ExpandedSecretKey {
            scalar: h * expanded.scalar,
            hash_prefix,
        };
        let public = VerifyingKey::from(&secret);
        BlindedSigningKey { secret, public }
    }

    pub fn public(&self) -> BlindedKey {
        BlindedKey(self.public.to_bytes())
    }

    /// An Ed25519 signature of `msg` by the blinded key.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        raw_sign::<Sha512>(&self.secret, msg, &self.public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn address() -> ServiceAddress {
        ServiceAddress::from_key(&identity().verifying_key().to_bytes()).unwrap()
    }

    #[test]
    fn periods_start_halfway_through_a_run_and_follow_the_interval() {
        let p = TimePeriod::at(86_400 * 100 + 43_200, 3600);
        assert_eq!((p.number, p.length), (100, 86_400));
        assert_eq!(p.start(), 86_400 * 100 + 43_200);
        assert_eq!(TimePeriod::at(p.start() - 1, 3600).number, 99);
        assert_eq!(TimePeriod::at(p.end() - 1, 3600), p);
        assert_eq!(TimePeriod::at(p.end(), 3600), p.next());
        // A testnet voting every 3 s has 72 s periods.
        assert_eq!(TimePeriod::at(1000, 3).length, 72);
        assert_eq!(TimePeriod::at(0, 3).number, 0);
    }

    #[test]
    fn the_blinded_key_signs_and_the_address_alone_checks() {
        let period = TimePeriod::at(1_800_000_000, 3600);
        let key = BlindedSigningKey::derive(&identity(), period);
        assert_eq!(key.public(), address().blinded(period));
        let sig = key.sign(b"descriptor body");
        assert!(address().blinded(period).verify(b"descriptor body", &sig));
        assert!(!address().blinded(period).verify(b"descriptor bodY", &sig));
        // Not the identity's signature, and not valid for another period.
        assert!(
            identity()
                .verifying_key()
                .verify_strict(b"descriptor body", &sig)
                .is_err()
        );
        assert!(
            !address()
                .blinded(period.next())
                .verify(b"descriptor body", &sig)
        );
        // Signing is deterministic, as Ed25519.
        assert_eq!(key.sign(b"x"), key.sign(b"x"));
    }

    #[test]
    fn blinded_keys_differ_by_period_and_by_service() {
        let a = address();
        let other =
            ServiceAddress::from_key(&SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes())
                .unwrap();
        let p = TimePeriod::at(1_800_000_000, 3600);
        let keys = [
            a.blinded(p),
            a.blinded(p.next()),
            other.blinded(p),
            BlindedKey(*a.key()),
        ];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
        // The length is part of the period's name too.
        let q = TimePeriod {
            number: p.number,
            length: p.length + 1,
        };
        assert_ne!(a.blinded(p), a.blinded(q));
    }
}
