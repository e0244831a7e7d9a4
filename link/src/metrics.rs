//! Prometheus metrics over HTTP (`GET /metrics`), for relays and clients.
//!
//! Off unless configured, and on loopback unless the operator says
//! otherwise. Only totals: no addresses, no per-circuit or per-user values.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::LinkError;

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
pub fn check_listen(addr: Option<SocketAddr>, allow_remote: bool) -> Result<(), LinkError> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !allow_remote => Err(LinkError::Config(format!(
            "metrics_listen {a} is not a loopback address (set metrics_allow_remote to allow it)"
        ))),
        _ => Ok(()),
    }
}

/// Each scrape's request head must arrive within 10 s and its answer be
/// sent within 30 s.
const METRICS_HTTP: crate::listen::HttpLimits = crate::listen::HttpLimits {
    header: std::time::Duration::from_secs(10),
    lifetime: std::time::Duration::from_secs(30),
};

/// Serve `registry` at `http://listen/metrics` until the future is dropped
/// (one request a connection, admitted by the process' [`Gate`]).
///
/// [`Gate`]: crate::listen::Gate
pub async fn serve(listen: SocketAddr, registry: Registry) -> Result<(), LinkError> {
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
        .map_err(|e| LinkError::Config(format!("cannot listen on {listen} for metrics: {e}")))?;
    info!(%listen, "metrics at /metrics");
    let gate = crate::listen::Gate::process();
    loop {
        let (sock, _, slot) = crate::listen::accept(&l, &gate).await;
        tokio::spawn(crate::listen::serve_http(
            sock,
            slot,
            app.clone(),
            METRICS_HTTP,
        ));
    }
}
