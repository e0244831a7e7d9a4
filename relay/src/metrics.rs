//! Prometheus metrics over HTTP (`GET /metrics`), for relays and clients.
//!
//! Off unless configured, and on loopback unless the operator says
//! otherwise. Only totals: no addresses, no per-circuit or per-user values.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::limits::QueueMem;
use crate::{RelayError, RelayStats};

/// One value of a scrape.
pub enum Value {
    Counter(u64),
    Gauge(i64),
}

/// A metric family: name, help, and values by an optional label.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub values: Vec<(Option<(&'static str, &'static str)>, Value)>,
}

impl Family {
    pub fn counter(name: &'static str, help: &'static str, v: u64) -> Self {
        Family {
            name,
            help,
            values: vec![(None, Value::Counter(v))],
        }
    }
    pub fn gauge(name: &'static str, help: &'static str, v: i64) -> Self {
        Family {
            name,
            help,
            values: vec![(None, Value::Gauge(v))],
        }
    }
}

/// Turns a snapshot function into a Prometheus collector.
pub struct SnapshotCollector<F>(pub F);

impl<F> std::fmt::Debug for SnapshotCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotCollector")
    }
}

impl<F> Collector for SnapshotCollector<F>
where
    F: Fn() -> Vec<Family> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for fam in (self.0)() {
            let Some((_, first)) = fam.values.first() else {
                continue;
            };
            let kind = match first {
                Value::Counter(_) => ConstCounter::new(0u64).metric_type(),
                Value::Gauge(_) => ConstGauge::new(0i64).metric_type(),
            };
            let mut me = encoder.encode_descriptor(fam.name, fam.help, None, kind)?;
            if let [(None, v)] = fam.values.as_slice() {
                encode_value(v, me)?;
                continue;
            }
            for (label, v) in &fam.values {
                let (k, val) = label.unwrap_or(("label", ""));
                let labels = [(k, val)];
                let fe = me.encode_family(&labels)?;
                encode_value(v, fe)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    v: &Value,
    enc: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match v {
        Value::Counter(c) => ConstCounter::new(*c).encode(enc),
        Value::Gauge(g) => ConstGauge::new(*g).encode(enc),
    }
}

/// Refuse a non-loopback metrics address unless explicitly allowed.
pub fn check_listen(addr: Option<SocketAddr>, allow_remote: bool) -> Result<(), RelayError> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !allow_remote => Err(RelayError::Config(format!(
            "metrics_listen {a} is not a loopback address (set metrics_allow_remote to allow it)"
        ))),
        _ => Ok(()),
    }
}

/// Serve `registry` at `http://listen/metrics` until the future is dropped.
pub async fn serve(listen: SocketAddr, registry: Registry) -> Result<(), RelayError> {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let r = registry.clone();
            async move {
                let mut body = String::new();
                if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &r) {
                    warn!("encoding metrics: {e}");
                }
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| RelayError::Config(format!("cannot listen on {listen} for metrics: {e}")))?;
    info!(%listen, "metrics at /metrics");
    axum::serve(l, app).await?;
    Ok(())
}

fn c(v: &AtomicU64) -> u64 {
    RelayStats::get(v)
}

const REASONS: [&str; 16] = [
    "none",
    "protocol",
    "internal",
    "requested",
    "4",
    "5",
    "connect_failed",
    "7",
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
pub fn relay_registry(stats: Arc<RelayStats>, mem: Arc<QueueMem>) -> Registry {
    let mut r = Registry::with_prefix("allium_relay");
    r.register_collector(Box::new(SnapshotCollector(move || {
        let s = &stats;
        let created = c(&s.circuits_created);
        let destroyed = c(&s.circuits_destroyed);
        let by_reason = s
            .destroyed_by_reason
            .iter()
            .enumerate()
            .filter(|(_, v)| c(v) > 0)
            .map(|(i, v)| (Some(("reason", REASONS[i])), Value::Counter(c(v))))
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
                "Exit streams opened",
                c(&s.streams_opened),
            ),
            Family::gauge(
                "streams_open",
                "Exit streams open now",
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
