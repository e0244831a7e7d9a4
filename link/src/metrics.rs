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

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text (as `prometheus_client` writes it) in Prometheus' older
/// text format (0.0.4): a counter family is named as its samples are (with
/// `_total`), and there are no `# UNIT` or `# EOF` lines.
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                _ => (name.to_string(), "untyped"),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
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
        get(move |headers: axum::http::HeaderMap| {
            let r = registry.clone();
            async move {
                let mut body = String::new();
                if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &r) {
                    warn!("encoding metrics: {e}");
                }
                // OpenMetrics to those who ask for it (Prometheus does),
                // the older text format to everyone else.
                let open = headers
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("application/openmetrics-text"));
                if open {
                    ([(header::CONTENT_TYPE, OPENMETRICS)], body)
                } else {
                    (
                        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
                        prometheus_text(&body),
                    )
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `promtool check metrics` on `text`: `None` without promtool.
    fn promtool(text: &str) -> Option<Result<(), String>> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        p.stdin.take()?.write_all(text.as_bytes()).ok()?;
        let out = p.wait_with_output().ok()?;
        Some(if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&[out.stdout, out.stderr].concat()).into_owned())
        })
    }

    #[test]
    fn the_older_text_format_names_counters_as_their_samples() {
        let mut r = Registry::with_prefix("t");
        r.register_collector(Box::new(SnapshotCollector(|| {
            vec![
                Family::counter("cells", "Cells", 5),
                Family::gauge("open", "Open now", 2),
                Family {
                    name: "dropped",
                    help: "Dropped, by reason",
                    values: vec![
                        (Some(("reason", "a")), Value::Counter(1)),
                        (Some(("reason", "b")), Value::Counter(2)),
                    ],
                },
            ]
        })));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &r).unwrap();
        assert!(om.ends_with("# EOF\n"));
        assert_eq!(
            prometheus_text(&om),
            "# HELP t_cells_total Cells\n\
             # TYPE t_cells_total counter\n\
             t_cells_total 5\n\
             # HELP t_open Open now\n\
             # TYPE t_open gauge\n\
             t_open 2\n\
             # HELP t_dropped_total Dropped, by reason\n\
             # TYPE t_dropped_total counter\n\
             t_dropped_total{reason=\"a\"} 1\n\
             t_dropped_total{reason=\"b\"} 2\n"
        );
        // Prometheus' own checker, where it is installed (required in CI).
        match promtool(&prometheus_text(&om)) {
            Some(verdict) => verdict.unwrap(),
            None => assert!(
                std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
                "promtool is not installed"
            ),
        }
    }
}
