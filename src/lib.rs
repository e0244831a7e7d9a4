//! The `allium` command: directory authority, relay, client, and the
//! one-command local network (`allium testnet`), which also serves the
//! whole-system tests.

pub mod bench;
pub mod check;
pub mod show;
pub mod testnet;

/// The log filter for a `RUST_LOG`-style `spec` (default `info`). The DNS
/// resolver's own log lines name the hosts it resolves, which are the
/// clients' destinations: they are off unless `spec` names the resolver.
/// Allium's own lines scrub destinations (`allium_link::safelog`).
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = spec.unwrap_or("info");
    let quiet = if spec.contains("hickory") {
        String::new()
    } else {
        ",hickory_proto=off,hickory_resolver=off".into()
    };
    tracing_subscriber::EnvFilter::try_new(format!("{spec}{quiet}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info{quiet}")))
}
