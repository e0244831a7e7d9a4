//! Entry guards: a small persisted sample of Guard relays, used in order.
//!
//! Compared with Tor's guard specification (proposal 271; see
//! `doc/client.md`): the sample is drawn by guard-position weight and kept
//! in `data_dir/guards` across restarts; the first usable entry in sample
//! order is the guard for every circuit (Tor's "primary guards", with one
//! in use at a time); an entry that fails is retried with exponential
//! backoff instead of being dropped; entries leave the sample when they
//! leave the consensus or when their lifetime ends, and the sample is
//! refilled to its size.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use allium_proto::{Consensus, ConsensusRelay, RelayFlags};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    identity: [u8; 32],
    /// When it joined the sample (UNIX seconds).
    added: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    stored: Stored,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The guard sample and what is known about each guard's reachability.
pub struct GuardSet {
    entries: Vec<Entry>,
    file: PathBuf,
    size: usize,
    lifetime: u64,
    retry: Duration,
}

/// Longest wait before a failed guard is tried again.
const MAX_RETRY: Duration = Duration::from_secs(3600);

impl GuardSet {
    pub fn load(file: PathBuf, size: usize, lifetime: u64, retry: Duration) -> Self {
        let stored: Vec<Stored> = std::fs::read(&file)
            .ok()
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let entries = stored
            .into_iter()
            .map(|stored| Entry {
                stored,
                failures: 0,
                retry_at: None,
            })
            .collect();
        GuardSet {
            entries,
            file,
            size: size.max(1),
            lifetime,
            retry,
        }
    }

    fn save(&self) {
        let list: Vec<&Stored> = self.entries.iter().map(|e| &e.stored).collect();
        match postcard::to_stdvec(&list) {
            Ok(b) => {
                if let Err(e) = allium_directory::store::write_atomic(&self.file, &b, 0o600) {
                    warn!("saving guards: {e}");
                }
            }
            Err(e) => warn!("encoding guards: {e}"),
        }
    }

    /// Drop guards that left the consensus or outlived their lifetime, and
    /// fill the sample up again.
    pub fn update(&mut self, c: &Consensus, now: u64) {
        let before: Vec<[u8; 32]> = self.ids();
        self.entries.retain(|e| {
            c.relay(&e.stored.identity).is_some() && e.stored.added + self.lifetime > now
        });
        if self.entries.len() < self.size {
            let have = self.ids();
            for g in path::sample_guards(&mut rand::rng(), c, self.size - self.entries.len(), &have)
            {
                info!(guard = %g.nickname, "guard added to the sample");
                self.entries.push(Entry {
                    stored: Stored {
                        identity: g.identity,
                        added: now,
                    },
                    failures: 0,
                    retry_at: None,
                });
            }
        }
        if self.ids() != before {
            self.save();
        }
    }

    /// The sample, in order.
    pub fn ids(&self) -> Vec<[u8; 32]> {
        self.entries.iter().map(|e| e.stored.identity).collect()
    }

    /// The guard to use now: the first entry that is listed Running and
    /// Guard and is not waiting for a retry.
    pub fn pick(&self, c: &Consensus) -> Option<ConsensusRelay> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|e| e.retry_at.is_none_or(|t| now >= t))
            .find_map(|e| {
                c.relay(&e.stored.identity)
                    .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::GUARD))
            })
            .cloned()
    }

    /// The guard could not be reached: try the next one, and this one again
    /// after a backoff.
    pub fn failed(&mut self, id: &[u8; 32]) {
        if let Some(e) = self.entries.iter_mut().find(|e| &e.stored.identity == id) {
            e.failures = e.failures.saturating_add(1);
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
            if e.failures > 0 {
                info!("guard reachable again");
            }
            e.failures = 0;
            e.retry_at = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(i: u8) -> ConsensusRelay {
        ConsensusRelay {
            nickname: format!("g{i}"),
            identity: [i; 32],
            link_key: allium_proto::LinkKey([0; 32]),
            onion_key: allium_proto::OnionKey([0; 32]),
            addr: format!("127.{i}.0.1:9000").parse().unwrap(),
            flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::GUARD),
            bandwidth: 1000,
            declared_bandwidth: 1000,
            measured_bandwidth: Some(1000),
            exit_ports: Default::default(),
            family: None,
            descriptor_digest: [0; 32],
        }
    }

    fn consensus(ids: &[u8]) -> Consensus {
        Consensus {
            valid_after: 0,
            fresh_until: 0,
            valid_until: 0,
            relays: ids.iter().map(|&i| relay(i)).collect(),
            weights: Default::default(),
        }
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
        // A failed guard is skipped, then tried again.
        g.failed(&first);
        assert_eq!(g.pick(&c).unwrap().identity, sample[1]);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(g.pick(&c).unwrap().identity, first);
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
}
