//! The ring of service directories (doc/protocol.md section 11.2).
//!
//! Each period, the relays the authorities flag HSDir (with Running and
//! Valid) are placed on a ring by a hash of their identity and the
//! network's shared random value for that period, which no single
//! authority chooses and nobody knows in advance. A service's descriptor
//! for the period is stored at [`REPLICAS`] points of the ring, computed
//! from its blinded key; at each point, on the [`SPREAD_STORE`] relays
//! that follow it. A client computes the same points from the address and
//! the consensus alone, and asks [`SPREAD_FETCH`] relays per point: no
//! index, no central lookup.
//!
//! ```text
//! relay position = SHA-256("allium hsdir relay" | identity | srv | u64(L) | u64(n))
//! point r        = SHA-256("allium hsdir store" | blinded key | u8(r) | u64(L) | u64(n)),  r = 1..REPLICAS
//! ```
//!
//! From each point, in order of replica, the directories are the first
//! relays at or after it, going round, skipping any already chosen for an
//! earlier replica.

use sha2::{Digest, Sha256};

use super::{BlindedKey, TimePeriod};
use crate::{ConsensusRelay, RelayFlags};

/// Points of the ring each descriptor is stored at (Tor's
/// `hsdir_n_replicas`).
pub const REPLICAS: u8 = 2;
/// Directories a service uploads to at each point (`hsdir_spread_store`).
pub const SPREAD_STORE: usize = 4;
/// Directories a client asks at each point (`hsdir_spread_fetch`).
pub const SPREAD_FETCH: usize = 3;
const RELAY_DOMAIN: &[u8] = b"allium hsdir relay";
const STORE_DOMAIN: &[u8] = b"allium hsdir store";

/// A relay's position on the ring of `period` under shared random value
/// `srv`.
pub fn relay_position(identity: &[u8; 32], srv: &[u8; 32], period: TimePeriod) -> [u8; 32] {
    Sha256::new()
        .chain_update(RELAY_DOMAIN)
        .chain_update(identity)
        .chain_update(srv)
        .chain_update(period.to_bytes())
        .finalize()
        .into()
}

/// Where replica `replica` (1..=[`REPLICAS`]) of the descriptor filed
/// under `key` is stored in `period`.
pub fn store_point(key: &BlindedKey, replica: u8, period: TimePeriod) -> [u8; 32] {
    Sha256::new()
        .chain_update(STORE_DOMAIN)
        .chain_update(key.0)
        .chain_update([replica])
        .chain_update(period.to_bytes())
        .finalize()
        .into()
}

/// The directories of one period, in ring order.
pub struct Ring<'a> {
    period: TimePeriod,
    nodes: Vec<([u8; 32], &'a ConsensusRelay)>,
}

impl<'a> Ring<'a> {
    /// The ring of `period` from the HSDir, Running, Valid relays among
    /// `relays`, placed by shared random value `srv`.
    pub fn new(
        relays: impl IntoIterator<Item = &'a ConsensusRelay>,
        srv: &[u8; 32],
        period: TimePeriod,
    ) -> Self {
        let want = RelayFlags::HSDIR | RelayFlags::RUNNING | RelayFlags::VALID;
        let mut nodes: Vec<_> = relays
            .into_iter()
            .filter(|r| r.flags.has(want))
            .map(|r| (relay_position(&r.identity, srv, period), r))
            .collect();
        nodes.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.identity.cmp(&b.1.identity)));
        Ring { period, nodes }
    }

    pub fn period(&self) -> TimePeriod {
        self.period
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The directories responsible for the descriptor filed under `key`:
    /// `spread` per replica, replica 1's first, each relay at most once
    /// (fewer if the ring is small).
    pub fn responsible(&self, key: &BlindedKey, spread: usize) -> Vec<&'a ConsensusRelay> {
        let mut out: Vec<&'a ConsensusRelay> = Vec::new();
        for replica in 1..=REPLICAS {
            let point = store_point(key, replica, self.period);
            let start = self.nodes.partition_point(|(p, _)| *p < point);
            let mut taken = 0;
            for i in 0..self.nodes.len() {
                if taken == spread {
                    break;
                }
                let r = self.nodes[(start + i) % self.nodes.len()].1;
                if !out.iter().any(|o| o.identity == r.identity) {
                    out.push(r);
                    taken += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ExitPorts;
    use crate::{LinkKey, OnionKey};

    fn relay(i: u8, flags: u16) -> ConsensusRelay {
        ConsensusRelay {
            nickname: format!("r{i}"),
            identity: [i; 32],
            link_key: LinkKey([i; 32]),
            onion_key: OnionKey([i; 32]),
            addr: ([127, 0, 0, 1], 9000 + u16::from(i)).into(),
            flags: RelayFlags(flags),
            bandwidth: 1000,
            declared_bandwidth: 1000,
            measured_bandwidth: None,
            exit_ports: ExitPorts::default(),
            family: None,
            descriptor_digest: [0; 32],
        }
    }

    const DIR: u16 = RelayFlags::HSDIR | RelayFlags::RUNNING | RelayFlags::VALID;

    #[test]
    fn only_running_valid_directories_are_on_the_ring() {
        let relays = [
            relay(1, DIR),
            relay(2, RelayFlags::RUNNING | RelayFlags::VALID),
            relay(3, RelayFlags::HSDIR | RelayFlags::VALID),
            relay(4, DIR | RelayFlags::GUARD),
        ];
        let ring = Ring::new(&relays, &[0; 32], TimePeriod::at(0, 3600));
        assert_eq!(ring.len(), 2);
        let key = BlindedKey([9; 32]);
        let mut got: Vec<u8> = ring
            .responsible(&key, SPREAD_STORE)
            .iter()
            .map(|r| r.identity[0])
            .collect();
        got.sort();
        assert_eq!(got, [1, 4]);
    }

    /// The directories follow each point in ring order, replica 1's first,
    /// and a relay chosen for replica 1 is skipped for replica 2.
    #[test]
    fn directories_follow_each_point_without_repeats() {
        let relays: Vec<_> = (1..=20).map(|i| relay(i, DIR)).collect();
        let period = TimePeriod::at(1_800_000_000, 3600);
        let srv = [5; 32];
        let ring = Ring::new(&relays, &srv, period);
        let key = BlindedKey([9; 32]);
        let chosen = ring.responsible(&key, SPREAD_STORE);
        assert_eq!(chosen.len(), REPLICAS as usize * SPREAD_STORE);
        let mut ids: Vec<_> = chosen.iter().map(|r| r.identity).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), chosen.len());
        // Recompute replica 1 by hand: the four positions at or after the
        // point, going round.
        let mut positions: Vec<([u8; 32], [u8; 32])> = relays
            .iter()
            .map(|r| (relay_position(&r.identity, &srv, period), r.identity))
            .collect();
        positions.sort();
        let point = store_point(&key, 1, period);
        let start = positions.iter().position(|(p, _)| *p >= point).unwrap_or(0);
        let first: Vec<_> = (0..SPREAD_STORE)
            .map(|i| positions[(start + i) % positions.len()].1)
            .collect();
        let got: Vec<_> = chosen[..SPREAD_STORE].iter().map(|r| r.identity).collect();
        assert_eq!(got, first);
        // The client's fetch set is the first SPREAD_FETCH of each replica's.
        let fetch = ring.responsible(&key, SPREAD_FETCH);
        assert_eq!(fetch[..SPREAD_FETCH], chosen[..SPREAD_FETCH]);
    }

    #[test]
    fn positions_move_with_the_shared_random_value_and_the_period() {
        let relays: Vec<_> = (1..=20).map(|i| relay(i, DIR)).collect();
        let p = TimePeriod::at(1_800_000_000, 3600);
        let key = BlindedKey([9; 32]);
        let ids = |srv: [u8; 32], p: TimePeriod| -> Vec<[u8; 32]> {
            Ring::new(&relays, &srv, p)
                .responsible(&key, SPREAD_STORE)
                .iter()
                .map(|r| r.identity)
                .collect()
        };
        let base = ids([5; 32], p);
        assert_ne!(base, ids([6; 32], p));
        assert_ne!(base, ids([5; 32], p.next()));
        // Fewer directories than wanted: each is used once.
        let small: Vec<_> = (1..=3).map(|i| relay(i, DIR)).collect();
        assert_eq!(
            Ring::new(&small, &[5; 32], p)
                .responsible(&key, SPREAD_STORE)
                .len(),
            3
        );
        assert!(
            Ring::new(&[], &[5; 32], p)
                .responsible(&key, SPREAD_STORE)
                .is_empty()
        );
    }
}
