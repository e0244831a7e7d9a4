//! The relay's Prometheus metrics (served by [`allium_link::metrics`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use allium_link::limits::QueueMem;
use allium_link::metrics::{Family, SnapshotCollector, Value};
use prometheus_client::registry::Registry;

use crate::RelayStats;

fn c(v: &AtomicU64) -> u64 {
    RelayStats::get(v)
}

const REASONS: [&str; 16] = [
    "none",
    "protocol",
    "internal",
    "requested",
    "other",
    "other",
    "connect_failed",
    "other",
    "channel_closed",
    "finished",
    "timeout",
    "destroyed",
    "no_such_service",
    "cell_auth",
    "resource_limit",
    "flow_control",
];

/// A relay's metrics.
pub fn relay_registry(
    stats: Arc<RelayStats>,
    mem: Arc<QueueMem>,
    cache: Arc<allium_directory::cache::ConsensusCache>,
    services: Arc<allium_directory::hsdir::ServiceDirectory>,
    points: Arc<crate::rendezvous::Points>,
) -> Registry {
    let mut r = Registry::with_prefix("allium_relay");
    r.register_collector(Box::new(SnapshotCollector(move || {
        let s = &stats;
        let created = c(&s.circuits_created);
        let destroyed = c(&s.circuits_destroyed);
        // Codes the protocol does not define count as "other".
        let mut sums = std::collections::BTreeMap::<&str, u64>::new();
        for (i, v) in s.destroyed_by_reason.iter().enumerate() {
            if c(v) > 0 {
                *sums
                    .entry(REASONS.get(i).copied().unwrap_or("other"))
                    .or_default() += c(v);
            }
        }
        let by_reason = sums
            .into_iter()
            .map(|(r, n)| (Some(("reason", r)), Value::Counter(n)))
            .collect::<Vec<_>>();
        vec![
            Family::counter(
                "cells_relayed",
                "Cells peeled or wrapped and passed on",
                c(&s.cells_relayed),
            ),
            Family::counter(
                "cells_delivered",
                "Cells for this relay (stream and control messages)",
                c(&s.cells_delivered),
            ),
            Family::counter(
                "cells_originated",
                "Cells this relay originated",
                c(&s.cells_originated),
            ),
            Family::counter(
                "cells_dropped",
                "Cells dropped (unknown circuit, or queued on a dying one)",
                c(&s.cells_dropped),
            ),
            Family::counter("link_read_bytes", "Link bytes read", c(&s.link_bytes_read)),
            Family::counter(
                "link_written_bytes",
                "Link bytes written",
                c(&s.link_bytes_written),
            ),
            Family::counter(
                "exit_bytes",
                "Stream payload bytes exchanged with exit targets",
                c(&s.exit_bytes),
            ),
            Family::counter("circuits_created", "Circuits created", created),
            Family {
                name: "circuits_destroyed",
                help: "Circuits destroyed, by reason",
                values: if by_reason.is_empty() {
                    vec![(Some(("reason", "none")), Value::Counter(0))]
                } else {
                    by_reason
                },
            },
            Family::gauge(
                "circuits_open",
                "Circuits open now",
                created.saturating_sub(destroyed) as i64,
            ),
            Family::counter(
                "streams_opened",
                "Streams opened (exit and BEGIN_DIR)",
                c(&s.streams_opened),
            ),
            Family::counter(
                "dir_streams_opened",
                "BEGIN_DIR streams opened to this relay's consensus cache",
                c(&s.dir_streams),
            ),
            cache.served_family(),
            Family::gauge(
                "service_descriptors_held",
                "Onion service descriptors this relay stores now",
                services.len() as i64,
            ),
            Family {
                name: "service_descriptor_requests",
                help: "Service descriptor uploads stored or refused, fetches served or missed, and descriptors dropped to make room",
                values: [
                    ("stored", &services.stored),
                    ("refused", &services.refused),
                    ("served", &services.served),
                    ("missed", &services.missed),
                    ("evicted", &services.evicted),
                ]
                .into_iter()
                .map(|(r, v)| (Some(("result", r)), Value::Counter(c(v))))
                .collect(),
            },
            Family {
                name: "service_points",
                help: "Onion service circuits: introduction points established, introductions passed on or refused, rendezvous points established and joined",
                values: [
                    ("intro_established", &points.stats.intros_established),
                    ("introduce_sent", &points.stats.introductions_sent),
                    ("introduce_refused", &points.stats.introductions_refused),
                    ("rendezvous_established", &points.stats.rendezvous_established),
                    ("rendezvous_joined", &points.stats.rendezvous_joined),
                ]
                .into_iter()
                .map(|(r, v)| (Some(("event", r)), Value::Counter(c(v))))
                .collect(),
            },
            Family::gauge(
                "streams_open",
                "Streams open now (exit and BEGIN_DIR)",
                c(&s.streams_opened).saturating_sub(c(&s.streams_closed)) as i64,
            ),
            Family::gauge(
                "queued_bytes",
                "Bytes of cells queued in the relay",
                mem.total() as i64,
            ),
            Family::gauge(
                "queued_bytes_limit",
                "The queued-cell memory cap",
                mem.cap() as i64,
            ),
            Family::counter(
                "oom_kills",
                "Circuits killed to stay under the queued-cell memory cap",
                c(&s.oom_kills),
            ),
            Family::counter(
                "dos_refused_connections",
                "Connections refused by the per-address limit",
                c(&s.dos_refused_connections),
            ),
            Family::counter(
                "dos_refused_circuits",
                "CREATEs refused by the per-address circuit rate",
                c(&s.dos_refused_circuits),
            ),
            Family::counter(
                "link_handshake_failures",
                "Inbound link handshakes that failed",
                c(&s.link_handshake_failures),
            ),
            Family::counter(
                "circuit_handshake_failures",
                "CREATEs whose handshake failed",
                c(&s.circuit_handshake_failures),
            ),
            Family::counter(
                "cell_auth_failures",
                "Cells that failed onion-layer authentication",
                c(&s.cell_auth_failures),
            ),
            Family::counter(
                "flow_control_violations",
                "Circuits closed because a peer broke flow control",
                c(&s.flow_control_violations),
            ),
        ]
    })));
    r
}
