//! What a relay tells its operator about where it stands, in plain words,
//! at INFO and only when it changes: how many authorities took its
//! descriptor, whether the consensus lists it, with which flags and weight,
//! or why not; and a heartbeat (every [`RelayConfig::heartbeat_secs`] and
//! on SIGUSR1) with uptime, circuits, bytes relayed, refusals and OOM kills.
//!
//! [`RelayConfig::heartbeat_secs`]: crate::RelayConfig::heartbeat_secs

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use allium_link::RelayStats;
use allium_proto::{Consensus, RelayFlags};
use tracing::info;

/// The last things said, so that each is said once per change.
#[derive(Debug)]
pub struct Standing {
    started: Instant,
    uploads: Mutex<Option<(usize, usize)>>,
    listing: Mutex<Option<String>>,
    reachable: Mutex<Option<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Standing {
    fn default() -> Self {
        Standing {
            started: Instant::now(),
            uploads: Mutex::new(None),
            listing: Mutex::new(None),
            reachable: Mutex::new(None),
        }
    }
}

impl Standing {
    /// An upload round: `accepted` of `of` authorities took the descriptor.
    pub fn uploaded(&self, accepted: usize, of: usize) {
        let mut last = lock(&self.uploads);
        if *last != Some((accepted, of)) {
            *last = Some((accepted, of));
            let majority = of / 2 + 1;
            let note = if accepted >= majority {
                "enough for the consensus to list it once they reach its ORPort"
            } else {
                "fewer than the majority a consensus needs: it will not be listed yet"
            };
            info!("descriptor accepted by {accepted} of {of} authorities ({note})");
        }
    }

    /// A new consensus: say how it lists this relay if that changed.
    pub fn listed(&self, c: &Consensus, me: &[u8; 32], addr: SocketAddr) {
        let line = listing(c, me, addr);
        let mut last = lock(&self.listing);
        if last.as_deref() != Some(line.as_str()) {
            info!("{line}");
            *last = Some(line);
        }
    }

    /// The self-test's verdict: said when it changes (a failure at WARN:
    /// clients cannot use a relay they cannot reach).
    pub fn self_tested(&self, r: crate::selftest::Verdict) {
        use crate::selftest::Verdict;
        let mut last = lock(&self.reachable);
        match r {
            Verdict::Reachable(took) if *last != Some(true) => {
                *last = Some(true);
                info!(
                    "ORPort reachable from outside: a circuit through another relay came back \
                     to it ({} ms)",
                    took.as_millis()
                );
            }
            Verdict::Unreachable(e) if *last != Some(false) => {
                *last = Some(false);
                tracing::warn!(
                    "ORPort not reachable from outside: {e}; clients cannot use this relay \
                     until it is (firewall, NAT, `advertise`)"
                );
            }
            Verdict::Unknown(e) => tracing::debug!("ORPort self-test inconclusive: {e}"),
            _ => {}
        }
    }

    /// The heartbeat line.
    pub fn heartbeat(&self, s: &RelayStats, circuits_open: u64) -> String {
        let g = |v: &std::sync::atomic::AtomicU64| RelayStats::get(v);
        format!(
            "heartbeat: up {}, {} circuits open ({} created), {} relayed ({} read, {} written), \
             {} to destinations; refused {} connections and {} circuits (DoS limits); \
             {} circuits killed to stay under the memory cap",
            uptime(self.started.elapsed()),
            circuits_open,
            g(&s.circuits_created),
            bytes(g(&s.link_bytes_read) + g(&s.link_bytes_written)),
            bytes(g(&s.link_bytes_read)),
            bytes(g(&s.link_bytes_written)),
            bytes(g(&s.exit_bytes)),
            g(&s.dos_refused_connections),
            g(&s.dos_refused_circuits),
            g(&s.oom_kills),
        )
    }
}

/// How `c` lists relay `me` (advertised at `addr`), in a sentence.
pub fn listing(c: &Consensus, me: &[u8; 32], addr: SocketAddr) -> String {
    let Some(r) = c.relays.iter().find(|r| &r.identity == me) else {
        return "not in the consensus: authorities list a relay once a majority of them \
                holds its descriptor and has reached its ORPort"
            .into();
    };
    let flags = r.flags.names().join(", ");
    if r.addr != addr {
        return format!(
            "listed at {} but advertising {addr}: a newer descriptor is not in the consensus yet \
             (flags {flags})",
            r.addr
        );
    }
    if !r.flags.has(RelayFlags::RUNNING) {
        return format!(
            "listed without Running (flags {flags}): the authorities could not reach the ORPort \
             at {addr}; check that it is open to the outside (firewall, NAT, `advertise`)"
        );
    }
    let weight = match r.measured_bandwidth {
        Some(_) => format!("weight {}/s, measured", bytes(r.bandwidth as u64)),
        None => format!(
            "weight {}/s until a majority of authorities has measured it",
            bytes(r.bandwidth as u64)
        ),
    };
    format!("listed in the consensus: flags {flags}; {weight}")
}

fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86400 => format!("{} days {} h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} min {} s", s / 60, s % 60),
    }
}

/// A byte count for people: B, KiB, MiB or GiB.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words() {
        assert_eq!(uptime(Duration::from_secs(3 * 3600 + 120)), "3 h 2 min");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        let s = Standing::default();
        let stats = RelayStats::default();
        RelayStats::inc(&stats.oom_kills, 2);
        let h = s.heartbeat(&stats, 5);
        assert!(h.contains("5 circuits open"), "{h}");
        assert!(h.contains("2 circuits killed"), "{h}");
    }
}
