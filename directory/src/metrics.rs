//! The authority's Prometheus metrics (served by [`allium_link::metrics`]):
//! documents received by kind and outcome, consensuses published, and what
//! the current consensus holds, consensuses served by form. Totals only:
//! no addresses.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use allium_link::metrics::{Family, SnapshotCollector, Value};

use crate::cache::ConsensusCache;
use axum::http::StatusCode;
use prometheus_client::registry::Registry;

/// What is uploaded to an authority.
pub const KINDS: [&str; 3] = ["descriptor", "vote", "signature"];

/// What became of an upload, by the status it was answered with.
pub const OUTCOMES: [&str; 7] = [
    "accepted",
    "already_known",
    "invalid",
    "rejected_identity",
    "conflict",
    "too_large",
    "table_full",
];

/// The outcome label of an answer.
pub fn outcome(status: StatusCode, body: &str) -> usize {
    match status {
        StatusCode::OK if body == "already known" => 1,
        StatusCode::OK => 0,
        StatusCode::FORBIDDEN => 3,
        // Not newer than the one held, a period that is over, a different
        // vote already held, no consensus being assembled.
        StatusCode::CONFLICT => 4,
        StatusCode::PAYLOAD_TOO_LARGE => 5,
        StatusCode::SERVICE_UNAVAILABLE => 6,
        _ => 2,
    }
}

/// The counters an authority keeps.
#[derive(Debug, Default)]
pub struct AuthStats {
    received: [[AtomicU64; OUTCOMES.len()]; KINDS.len()],
    pub consensuses_published: AtomicU64,
    pub consensuses_missed: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Of the last consensus published: valid-after, relays, signatures.
    pub consensus_valid_after: AtomicU64,
    pub consensus_relays: AtomicU64,
    pub consensus_signatures: AtomicU64,
    /// Descriptors held now.
    pub descriptors_held: AtomicU64,
}

impl AuthStats {
    /// Count an upload of `kind` (an index of [`KINDS`]) answered `status`.
    pub fn received(&self, kind: usize, status: StatusCode, body: &str) {
        self.received[kind][outcome(status, body)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    pub fn set(v: &AtomicU64, n: u64) {
        v.store(n, Ordering::Relaxed);
    }

    pub fn inc(v: &AtomicU64) {
        v.fetch_add(1, Ordering::Relaxed);
    }
}

/// An authority's metrics.
pub fn registry(stats: Arc<AuthStats>, cache: Arc<ConsensusCache>) -> Registry {
    let mut r = Registry::with_prefix("allium_dirauth");
    r.register_collector(Box::new(SnapshotCollector(move || {
        let s = &stats;
        let g = |v: &AtomicU64| AuthStats::get(v);
        let mut out: Vec<Family> = KINDS
            .iter()
            .enumerate()
            .map(|(k, kind)| Family {
                name: match *kind {
                    "descriptor" => "descriptors_received",
                    "vote" => "votes_received",
                    _ => "signatures_received",
                },
                help: match *kind {
                    "descriptor" => "Relay descriptors uploaded, by outcome",
                    "vote" => "Votes pushed by other authorities, by outcome",
                    _ => "Consensus signatures pushed by other authorities, by outcome",
                },
                values: OUTCOMES
                    .iter()
                    .enumerate()
                    .map(|(o, name)| {
                        (
                            Some(("outcome", *name)),
                            Value::Counter(g(&s.received[k][o])),
                        )
                    })
                    .collect(),
            })
            .collect();
        out.extend([
            Family::counter(
                "consensuses_published",
                "Consensuses published (signed by a majority)",
                g(&s.consensuses_published),
            ),
            Family::counter(
                "consensuses_missed",
                "Voting rounds that ended with no new consensus",
                g(&s.consensuses_missed),
            ),
            Family::counter(
                "requests_rate_limited",
                "HTTP connections answered 429 by the per-host rate limit",
                g(&s.rate_limited),
            ),
            Family::gauge(
                "consensus_valid_after_seconds",
                "Valid-after time of the last consensus published (Unix seconds)",
                g(&s.consensus_valid_after) as i64,
            ),
            Family::gauge(
                "consensus_relays",
                "Relays listed in the last consensus published",
                g(&s.consensus_relays) as i64,
            ),
            Family::gauge(
                "consensus_signatures",
                "Authority signatures on the last consensus published",
                g(&s.consensus_signatures) as i64,
            ),
            Family::gauge(
                "descriptors_held",
                "Relay descriptors this authority holds",
                g(&s.descriptors_held) as i64,
            ),
            cache.served_family(),
        ]);
        out
    })));
    r
}
