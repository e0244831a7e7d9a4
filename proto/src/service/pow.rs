//! A proof of work for introductions (doc/protocol.md section 11.5): a
//! service under a flood of introductions asks clients, in its
//! descriptor, to pay for theirs, and serves those that paid most first.
//!
//! The puzzle is hashcash over Argon2id (RFC 9106), a memory-hard
//! function: each attempt fills 1 MiB, so a GPU or a custom chip gains
//! little over the client's CPU, and the service checks a solution with
//! one attempt.
//!
//! ```text
//! h     = Argon2id(password = "allium introduce pow v1" | auth_key | E | u32(effort) | nonce[16],
//!                  salt = seed[32], m = 1024 KiB, t = 1, p = 1, 32 bytes)
//! valid = u32(h[0..4]) · effort ≤ 2^32 - 1
//! ```
//!
//! `auth_key` names the introduction point and `E` is the client's
//! ephemeral key of the introduction (section 11.4), so a solution serves
//! one introduction at one point only (the service drops an `E` a point
//! has seen); `seed` is the service's, from its descriptor, and
//! changes every few hours, so solutions cannot be made long before they
//! are used. A client needs `effort` attempts on average.
//!
//! ```
//! use allium_proto::service::pow::{Solver, verify};
//! let mut s = Solver::new();
//! let (seed, point, key) = ([1; 32], [2; 32], [3; 32]);
//! let pow = s.solve(&seed, &point, &key, 4, &mut rand::rng(), 1 << 12).unwrap();
//! assert!(verify(&mut s, &seed, &point, &key, &pow));
//! ```

use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};

const DOMAIN: &[u8] = b"allium introduce pow v1";
/// Memory of one attempt, in KiB.
pub const MEMORY_KIB: u32 = 1024;
/// The highest effort a service asks or takes, and a client pays (Tor's
/// client cap): about 4 s of one core.
pub const MAX_EFFORT: u32 = 10_000;

/// What a service's descriptor says of its puzzle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowParams {
    pub seed: [u8; 32],
    /// The effort the service suggests now; 0: none needed.
    pub effort: u32,
}

/// A solution, as an introduction carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pow {
    pub effort: u32,
    /// The first 4 bytes of the seed it was made for.
    pub seed_head: [u8; 4],
    pub nonce: [u8; 16],
}

/// Memory for attempts, reused from one to the next.
pub struct Solver {
    argon: Argon2<'static>,
    memory: Vec<Block>,
}

impl std::fmt::Debug for Solver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Solver")
    }
}

impl Default for Solver {
    fn default() -> Self {
        Self::new()
    }
}

impl Solver {
    pub fn new() -> Self {
        let params = Params::new(MEMORY_KIB, 1, 1, Some(32)).expect("valid Argon2 parameters");
        Solver {
            argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
            memory: vec![Block::default(); MEMORY_KIB as usize],
        }
    }

    /// One attempt: the hash of `nonce`, for the introduction through the
    /// point `auth_key` whose ephemeral key is `client_key`.
    pub fn hash(
        &mut self,
        seed: &[u8; 32],
        auth_key: &[u8; 32],
        client_key: &[u8; 32],
        effort: u32,
        nonce: &[u8; 16],
    ) -> [u8; 32] {
        let mut password = [0u8; DOMAIN.len() + 32 + 32 + 4 + 16];
        let (d, rest) = password.split_at_mut(DOMAIN.len());
        d.copy_from_slice(DOMAIN);
        rest[..32].copy_from_slice(auth_key);
        rest[32..64].copy_from_slice(client_key);
        rest[64..68].copy_from_slice(&effort.to_be_bytes());
        rest[68..].copy_from_slice(nonce);
        let mut out = [0u8; 32];
        self.argon
            .hash_password_into_with_memory(&password, seed, &mut out, &mut self.memory)
            .expect("fixed lengths within Argon2's bounds");
        out
    }

    /// A solution of `effort` for the introduction through `auth_key`
    /// whose ephemeral key is `client_key`, within `max_attempts` attempts
    /// (a solution takes `effort` on average; `None` past the bound).
    pub fn solve(
        &mut self,
        seed: &[u8; 32],
        auth_key: &[u8; 32],
        client_key: &[u8; 32],
        effort: u32,
        rng: &mut impl rand_core::CryptoRng,
        max_attempts: u64,
    ) -> Option<Pow> {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let start = u128::from_be_bytes(nonce);
        for i in 0..max_attempts {
            let nonce = start.wrapping_add(u128::from(i)).to_be_bytes();
            if meets(
                &self.hash(seed, auth_key, client_key, effort, &nonce),
                effort,
            ) {
                let mut seed_head = [0u8; 4];
                seed_head.copy_from_slice(&seed[..4]);
                return Some(Pow {
                    effort,
                    seed_head,
                    nonce,
                });
            }
        }
        None
    }
}

/// Does hash `h` meet `effort`?
pub fn meets(h: &[u8; 32], effort: u32) -> bool {
    let r = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    u64::from(r) * u64::from(effort) <= u64::from(u32::MAX)
}

/// Is `pow` a solution for the introduction through `auth_key` whose
/// ephemeral key is `client_key`, under `seed`? (One attempt's work.)
pub fn verify(
    solver: &mut Solver,
    seed: &[u8; 32],
    auth_key: &[u8; 32],
    client_key: &[u8; 32],
    pow: &Pow,
) -> bool {
    pow.effort > 0
        && pow.effort <= MAX_EFFORT
        && pow.seed_head == seed[..4]
        && meets(
            &solver.hash(seed, auth_key, client_key, pow.effort, &pow.nonce),
            pow.effort,
        )
}

/// The effort a service suggests, from what its introductions met over
/// the last period (Tor's proposal 327 in spirit): doubled (at least 1)
/// while introductions that paid what it suggested are dropped for want
/// of a turn (those that paid less cost nothing to send, and must not
/// move it); lowered by a third, down to nothing, while none wait; never
/// below the operator's floor nor above [`MAX_EFFORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffortControl {
    pub suggested: u32,
    pub floor: u32,
}

impl EffortControl {
    pub fn new(floor: u32) -> Self {
        EffortControl {
            suggested: floor.min(MAX_EFFORT),
            floor: floor.min(MAX_EFFORT),
        }
    }

    /// Update at the end of a period in which `dropped` introductions that
    /// paid at least the suggestion found no turn, with `waiting` still
    /// waiting and `served_mean` the mean effort of those served. Returns
    /// the new suggestion.
    pub fn update(&mut self, dropped: u64, waiting: usize, served_mean: u32) -> u32 {
        let s = self.suggested;
        let next = if dropped > 0 {
            s.saturating_mul(2).max(served_mean).max(1)
        } else if waiting == 0 {
            s - s.div_ceil(3)
        } else {
            s
        };
        self.suggested = next.clamp(self.floor, MAX_EFFORT);
        self.suggested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [1; 32];
    const POINT: [u8; 32] = [2; 32];
    const KEY: [u8; 32] = [3; 32];

    #[test]
    fn a_solution_is_bound_to_its_seed_point_key_effort_and_nonce() {
        let mut s = Solver::new();
        let pow = s
            .solve(&SEED, &POINT, &KEY, 16, &mut rand::rng(), 1 << 12)
            .unwrap();
        assert_eq!(pow.effort, 16);
        assert!(verify(&mut s, &SEED, &POINT, &KEY, &pow));
        let h = s.hash(&SEED, &POINT, &KEY, 16, &pow.nonce);
        // Every input goes into the hash, so with another the solution
        // meets the bar only by chance (1 in 16 here): what verify says
        // follows that hash.
        let mut seed = SEED;
        seed[31] = 9;
        for (seed, point, key) in [
            (seed, POINT, KEY),
            (SEED, [4; 32], KEY),
            (SEED, POINT, [5; 32]),
        ] {
            let other = s.hash(&seed, &point, &key, 16, &pow.nonce);
            assert_ne!(other, h);
            assert_eq!(verify(&mut s, &seed, &point, &key, &pow), meets(&other, 16));
        }
        // A seed whose first bytes differ is not the one named.
        assert!(!verify(&mut s, &[4; 32], &POINT, &KEY, &pow));
        // No effort, or past the cap: refused outright.
        for effort in [0, MAX_EFFORT + 1] {
            assert!(!verify(&mut s, &SEED, &POINT, &KEY, &Pow { effort, ..pow }));
        }
    }

    #[test]
    fn a_claim_of_more_effort_than_was_spent_fails() {
        // A nonce that meets effort 1 for these inputs: claimed as the
        // highest effort it is a fresh attempt at that bar (these fixed
        // inputs miss it).
        let mut s = Solver::new();
        let nonce = [7; 16];
        assert!(meets(&s.hash(&SEED, &POINT, &KEY, 1, &nonce), 1));
        let cheap = Pow {
            effort: 1,
            seed_head: [1; 4],
            nonce,
        };
        assert!(verify(&mut s, &SEED, &POINT, &KEY, &cheap));
        let claimed = Pow {
            effort: MAX_EFFORT,
            ..cheap
        };
        assert!(!meets(
            &s.hash(&SEED, &POINT, &KEY, MAX_EFFORT, &nonce),
            MAX_EFFORT
        ));
        assert!(!verify(&mut s, &SEED, &POINT, &KEY, &claimed));
    }

    #[test]
    fn the_bar_is_the_effort() {
        let h = |r: u32| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&r.to_be_bytes());
            h
        };
        assert!(meets(&h(u32::MAX), 1));
        assert!(meets(&h(u32::MAX / 2), 2));
        assert!(!meets(&h(u32::MAX / 2 + 1), 2));
        assert!(meets(&h(0), u32::MAX));
        assert!(!meets(&h(1 << 16), 1 << 16));
    }

    #[test]
    fn the_suggested_effort_rises_under_load_and_falls_when_idle() {
        let mut c = EffortControl::new(0);
        assert_eq!(c.update(0, 0, 0), 0, "no load, no puzzle");
        assert_eq!(c.update(5, 10, 0), 1, "dropped introductions turn it on");
        assert_eq!(c.update(5, 10, 1), 2);
        assert_eq!(c.update(1, 10, 40), 40, "at least what clients paid");
        assert_eq!(c.update(0, 3, 40), 40, "held while some wait");
        assert_eq!(c.update(0, 0, 40), 26, "a third less when none wait");
        for _ in 0..20 {
            c.update(0, 0, 0);
        }
        assert_eq!(c.suggested, 0, "off again once idle");
        for _ in 0..40 {
            c.update(1, 1, u32::MAX);
        }
        assert_eq!(c.suggested, MAX_EFFORT);
        let mut floor = EffortControl::new(8);
        assert_eq!(floor.update(0, 0, 0), 8, "never below the floor");
    }
}
