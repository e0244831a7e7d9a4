//! Consensuses this process verified lately, so that one it fetches
//! again (the same bytes, checked against the same keys) is checked and
//! held once.
//!
//! A relay or client alone fetches each consensus once and gains nothing
//! here. A process that runs many of them (`allium testnet`, the bench's
//! clients) fetched the same consensus once per relay: at 5,000 relays,
//! 5,000 parses and signature checks of a 5,000-entry document each period,
//! and 5,000 copies of its bytes and of the parsed document held by each
//! relay's cache (several consensuses' worth). Now the bytes are compared
//! with those remembered, and a consensus seen before is the same [`Arc`]
//! and the same [`Bytes`]: its memory is shared, whoever holds it. The
//! memory holds neither itself (weak references only): a consensus nobody
//! holds any more is freed, and checked again if it comes back.
//!
//! The verdict is reused only for the same bytes (compared whole) and the
//! same pinned keys, and only within the times it holds for
//! ([`UnverifiedConsensus::verify_window`]: the consensus' validity within
//! that of the certificates that counted). Outside them, or for anything
//! else, the document is checked in full.

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, Weak};

use allium_proto::{AuthorityKey, Consensus};
use bytes::Bytes;

use crate::diff;

/// Consensuses remembered (a few periods' worth: relays change over
/// within a period).
pub const KEEP: usize = 4;

struct Seen {
    digest: [u8; 32],
    keys: Vec<AuthorityKey>,
    trusted: RangeInclusive<u64>,
    consensus: Weak<Consensus>,
    bytes: Weak<Vec<u8>>,
}

/// The owner of a remembered consensus' bytes: every [`Bytes`] handed out
/// for it shares this one allocation.
struct Owned(Arc<Vec<u8>>);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Remembered verdicts: the process's (behind [`consensus`]), or a test's own.
#[derive(Default)]
pub struct Memory {
    seen: Mutex<VecDeque<Seen>>,
}

static PROCESS: Memory = Memory {
    seen: Mutex::new(VecDeque::new()),
};

/// [`Memory::consensus`] with the process's memory.
pub fn consensus<E>(
    bytes: Vec<u8>,
    keys: &[AuthorityKey],
    now: u64,
    verify: impl FnOnce(&[u8]) -> Result<(Consensus, RangeInclusive<u64>), E>,
) -> Result<(Arc<Consensus>, Bytes), E> {
    PROCESS.consensus(bytes, keys, now, verify)
}

impl Memory {
    fn seen(&self) -> std::sync::MutexGuard<'_, VecDeque<Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bytes` as a consensus trusted under `keys` at `now`: the one
    /// verified before from the same bytes and keys if `now` is within its
    /// verdict's times, else what `verify` makes of them (parse and
    /// verify, with the times its verdict holds for), remembered if it is
    /// trusted.
    pub fn consensus<E>(
        &self,
        bytes: Vec<u8>,
        keys: &[AuthorityKey],
        now: u64,
        verify: impl FnOnce(&[u8]) -> Result<(Consensus, RangeInclusive<u64>), E>,
    ) -> Result<(Arc<Consensus>, Bytes), E> {
        // The same bytes, compared as they are: hashing a megabyte for
        // each of thousands of fetchers was most of such a process's work.
        let held = self.seen().iter().find_map(|s| {
            let b = s.bytes.upgrade()?;
            (s.keys == keys && s.trusted.contains(&now) && *b == bytes)
                .then(|| Some((s.consensus.upgrade()?, b)))?
        });
        if let Some((c, b)) = held {
            return Ok((c, Bytes::from_owner(Owned(b))));
        }
        let digest = diff::digest(&bytes);
        let same = |s: &Seen| s.digest == digest && s.keys == keys;
        let (c, trusted) = verify(&bytes)?;
        let (c, b) = (Arc::new(c), Arc::new(bytes));
        let mut all = self.seen();
        all.retain(|s| !same(s) && s.consensus.strong_count() > 0);
        if all.len() >= KEEP {
            all.pop_front();
        }
        all.push_back(Seen {
            digest,
            keys: keys.to_vec(),
            trusted,
            consensus: Arc::downgrade(&c),
            bytes: Arc::downgrade(&b),
        });
        Ok((c, Bytes::from_owner(Owned(b))))
    }

    /// The SHA-256 of `bytes` ([`diff::digest`]), remembered if they are
    /// the very bytes of a consensus remembered here (as handed out, not a
    /// copy): every relay of such a process names the consensus it holds
    /// as a diff's base, and its cache names it for its own fetchers.
    pub fn digest(&self, bytes: &[u8]) -> [u8; 32] {
        let held = self.seen().iter().find_map(|s| {
            let b = s.bytes.upgrade()?;
            // Alive, so no other allocation can be at that address.
            (b.as_ptr() == bytes.as_ptr() && b.len() == bytes.len()).then_some(s.digest)
        });
        held.unwrap_or_else(|| diff::digest(bytes))
    }
}

/// [`Memory::digest`] with the process's memory.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    PROCESS.digest(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(valid_after: u64) -> Consensus {
        Consensus {
            valid_after,
            fresh_until: valid_after + 10,
            valid_until: valid_after + 30,
            relays: vec![],
            weights: Default::default(),
            shared_random: Default::default(),
        }
    }

    #[test]
    fn the_same_bytes_and_keys_are_checked_once_within_the_verdicts_times() {
        let m = Memory::default();
        let keys = [AuthorityKey([1; 32])];
        let other = [AuthorityKey([2; 32])];
        let b = |tag: u8| vec![tag; 4];
        let checks = std::cell::Cell::new(0);
        let check = |t: u64| {
            checks.set(checks.get() + 1);
            Ok::<_, ()>((doc(t), t..=t + 30))
        };
        let (c1, b1) = m.consensus(b(1), &keys, 100, |_| check(100)).unwrap();
        let (c2, b2) = m.consensus(b(1), &keys, 120, |_| check(100)).unwrap();
        // The second fetch is the same document and the same memory.
        assert!(Arc::ptr_eq(&c1, &c2));
        assert_eq!(b1.as_ptr(), b2.as_ptr());
        // Other keys, other bytes, or a time outside the verdict's: checked.
        m.consensus(b(1), &other, 120, |_| check(100)).unwrap();
        m.consensus(b(2), &keys, 120, |_| check(100)).unwrap();
        let (c3, b3) = m.consensus(b(1), &keys, 131, |_| check(131)).unwrap();
        assert!(!Arc::ptr_eq(&c1, &c3));
        assert_eq!(checks.get(), 4);
        let (c4, _) = m.consensus(b(1), &keys, 140, |_| check(131)).unwrap();
        assert!(Arc::ptr_eq(&c3, &c4));
        assert_eq!(checks.get(), 4);
        // Nobody holds it any more: freed, and checked again.
        drop((c1, c2, c3, c4, b1, b2, b3));
        m.consensus(b(1), &keys, 140, |_| check(131)).unwrap();
        assert_eq!(checks.get(), 5);
        // A refusal is not remembered.
        let refused = m.consensus(b(3), &keys, 100, |_| Err::<(Consensus, _), _>("forged"));
        assert_eq!(refused.err(), Some("forged"));
        let (c5, _) = m
            .consensus(b(3), &keys, 100, |_| Ok::<_, ()>((doc(7), 0..=200)))
            .unwrap();
        assert_eq!(c5.valid_after, 7);
    }

    #[test]
    fn a_remembered_consensus_is_named_by_its_digest() {
        let m = Memory::default();
        let keys = [AuthorityKey([1; 32])];
        let bytes = vec![9u8; 1000];
        let (c, b) = m
            .consensus(bytes.clone(), &keys, 100, |_| {
                Ok::<_, ()>((doc(100), 100..=130))
            })
            .unwrap();
        // Its own bytes, and a copy of them: the same name.
        assert_eq!(m.digest(&b), diff::digest(&bytes));
        assert_eq!(m.digest(&bytes), diff::digest(&bytes));
        // Other bytes at the address of none remembered.
        assert_eq!(m.digest(&b[1..]), diff::digest(&bytes[1..]));
        drop((c, b));
        assert_eq!(m.digest(&bytes), diff::digest(&bytes));
    }
}
