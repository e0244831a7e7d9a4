//! Restricted middles for onion-service circuits ("vanguards-lite", as
//! Tor's proposal 333): the second hop of every circuit that must end at a
//! chosen relay (a service directory, an introduction point, a rendezvous
//! point) is one of a small set of relays kept for days.
//!
//! Without them, anyone can make a service (or a client) build circuit
//! after circuit to a relay of their choosing: the attacker names the
//! rendezvous point, and each new circuit draws a fresh middle, so a
//! relay the attacker runs soon lands next to the guard and learns it
//! (guard discovery). With a fixed set, the attacker must first become one
//! of [`SIZE`] relays chosen for days, not one of thousands chosen per
//! circuit.
//!
//! Each member is drawn by middle-position weight and kept for a lifetime
//! of `max(X, Y)` with `X` and `Y` uniform in 1 to 12 days (8 1/3 days on
//! average, skewed long, as Tor's), or until it leaves the consensus or
//! stops being Running, or this client finds it unreachable itself: it is
//! also one of the client's guards, a connection to it failed (or three
//! CREATEs went unanswered), and another guard has answered since (see
//! [`crate::guards::GuardSet::unreachable`]). The authorities would drop
//! it within a voting period or two, and until then every circuit whose
//! only fitting member it is fails. A replacement is drawn among the
//! others; a later draw may pick it again. The set is kept in
//! `data_dir/vanguards` (postcard: a list of identity and expiry time,
//! 0600) across restarts, so a crash or restart an attacker provokes does
//! not draw new ones.

use std::path::PathBuf;

use allium_proto::{Consensus, short_id};
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::path;

/// Relays in the set.
pub const SIZE: usize = 4;
/// A member's lifetime: the larger of two draws in this range (seconds).
pub const LIFETIME: std::ops::RangeInclusive<u64> = 24 * 3600..=12 * 24 * 3600;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Member {
    identity: [u8; 32],
    /// When it leaves the set (UNIX seconds).
    expires: u64,
}

/// A new member's lifetime: the larger of two uniform draws in
/// [`LIFETIME`]: 8 1/3 days on average, more often long than short.
fn lifetime<R: Rng + ?Sized>(rng: &mut R) -> u64 {
    rng.random_range(LIFETIME).max(rng.random_range(LIFETIME))
}

pub struct Vanguards {
    members: Vec<Member>,
    file: PathBuf,
}

impl Vanguards {
    /// The set kept in `file`; empty if it is missing or unreadable (a
    /// list longer than [`SIZE`] is cut to it).
    pub fn load(file: PathBuf) -> Self {
        let mut members: Vec<Member> = std::fs::read(&file)
            .ok()
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        members.truncate(SIZE);
        Vanguards { members, file }
    }

    /// Drop members that expired, are no longer listed Running and Valid,
    /// or are in `unreachable` (relays this client could not connect to),
    /// and draw new ones up to [`SIZE`], none of those (saving the set if
    /// it changed).
    pub fn update<R: Rng + ?Sized>(
        &mut self,
        rng: &mut R,
        c: &Consensus,
        now: u64,
        unreachable: &[[u8; 32]],
    ) {
        let before = self.members.clone();
        self.members.retain(|m| {
            m.expires > now
                && c.relay(&m.identity).is_some_and(path::usable)
                && !unreachable.contains(&m.identity)
        });
        let mut have: Vec<[u8; 32]> = self.ids();
        have.extend_from_slice(unreachable);
        let want = SIZE.saturating_sub(self.members.len());
        for r in path::sample_middles(rng, c, want, &have) {
            let life = lifetime(rng);
            info!(relay = %r.nickname, id = %short_id(&r.identity), days = life / 86400, "restricted middle added for onion-service circuits");
            self.members.push(Member {
                identity: r.identity,
                expires: now + life,
            });
        }
        if self.members != before {
            self.save();
        }
    }

    /// The members' identities.
    pub fn ids(&self) -> Vec<[u8; 32]> {
        self.members.iter().map(|m| m.identity).collect()
    }

    fn save(&self) {
        crate::guards::save(&self.file, &self.members, "restricted middles");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::path::tests::{consensus_of, relay};
    use allium_proto::RelayFlags;
    use rand::SeedableRng;

    #[test]
    fn four_middles_kept_for_days_across_restarts_replaced_when_gone() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("vanguards");
        let mut c = consensus_of((1..=40).map(|i| relay(i, 1000, 0)).collect());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let now = 1_000_000;
        let mut v = Vanguards::load(file.clone());
        v.update(&mut rng, &c, now, &[]);
        let first = v.ids();
        assert_eq!(first.len(), SIZE);
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), SIZE, "four different relays");
        for m in &v.members {
            assert!((now + LIFETIME.start()..=now + LIFETIME.end()).contains(&m.expires));
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A restart keeps them; so do more updates within their lifetime.
        let mut again = Vanguards::load(file.clone());
        again.update(&mut rng, &c, now + 3600, &[]);
        assert_eq!(again.ids(), first);

        // One leaves the consensus, one stops being Running: both replaced.
        c.relays.retain(|r| r.identity != first[0]);
        let i = c
            .relays
            .iter()
            .position(|r| r.identity == first[1])
            .unwrap();
        c.relays[i].flags = RelayFlags(RelayFlags::VALID);
        again.update(&mut rng, &c, now + 7200, &[]);
        let ids = again.ids();
        assert_eq!(ids.len(), SIZE);
        assert!(!ids.contains(&first[0]) && !ids.contains(&first[1]));
        assert!(ids.contains(&first[2]) && ids.contains(&first[3]));

        // Past the longest lifetime every one is new.
        again.update(&mut rng, &c, now + 7200 + LIFETIME.end() + 1, &[]);
        assert!(again.ids().iter().all(|id| !ids.contains(id)));

        // The larger of two draws: three in four past the middle of the
        // range, and 8 1/3 days on average.
        let draws: Vec<u64> = (0..4000).map(|_| lifetime(&mut rng)).collect();
        let long = draws
            .iter()
            .filter(|&&l| l > (LIFETIME.start() + LIFETIME.end()) / 2)
            .count();
        assert!((2850..3150).contains(&long), "{long}");
        let mean_days = draws.iter().sum::<u64>() as f64 / 4000.0 / 86400.0;
        assert!((7.9..8.6).contains(&mean_days), "{mean_days}");
    }

    /// A member this client could not reach itself is replaced, by a
    /// relay that is none of those: here the one relay left.
    #[test]
    fn a_member_found_unreachable_is_replaced_by_a_reachable_one() {
        let d = tempfile::tempdir().unwrap();
        let c = consensus_of((1..=SIZE as u8 + 2).map(|i| relay(i, 1000, 0)).collect());
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut v = Vanguards::load(d.path().join("vanguards"));
        v.update(&mut rng, &c, 1000, &[]);
        let ids = v.ids();
        let spare: Vec<[u8; 32]> = (c.relays.iter())
            .map(|r| r.identity)
            .filter(|id| !ids.contains(id))
            .collect();
        assert_eq!(spare.len(), 2);
        v.update(&mut rng, &c, 1001, &[ids[2], spare[0]]);
        let after = v.ids();
        assert_eq!(after.len(), SIZE);
        assert!(after.contains(&spare[1]), "the one reachable relay left");
        assert!(!after.contains(&ids[2]) && !after.contains(&spare[0]));
        assert!([ids[0], ids[1], ids[3]].iter().all(|id| after.contains(id)));
    }
}
