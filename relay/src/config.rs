//! `allium relay` configuration (TOML). See `examples/relay.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;

use allium_directory::AuthorityEntry;
use allium_proto::policy::ExitPolicy;
use serde::{Deserialize, Serialize};

use crate::RelayError;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// 1-19 ASCII letters or digits.
    pub nickname: String,
    /// Where the relay listens for links.
    pub listen: SocketAddr,
    /// The address published in the descriptor (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Keys live in `data_dir/keys` (mode 0600).
    pub data_dir: PathBuf,
    pub authorities: Vec<AuthorityEntry>,
    /// Declared bandwidth in bytes per second.
    pub bandwidth: u32,
    /// Be an exit with the default exit policy (reject private addresses and
    /// abuse-prone ports, accept the rest).
    pub exit: bool,
    /// Explicit exit policy rules, first match wins (overrides `exit`), e.g.
    /// `["accept *:80", "accept *:443", "reject *:*"]`.
    pub exit_policy: Vec<String>,
    /// Identities (hex) of relays in the same family.
    pub family: Vec<String>,
    /// Republish the descriptor this often.
    pub publish_interval_secs: u64,
    /// Log a heartbeat (uptime, circuits, bytes relayed, refusals) this
    /// often; 0 for never. SIGUSR1 asks for one at any time.
    pub heartbeat_secs: u64,
    /// Rotate the onion key this often; the previous one stays valid for one
    /// more period.
    pub onion_key_lifetime_secs: u64,
    /// Cap on the bytes of cells queued in the relay (like Tor's
    /// MaxMemInQueues): above it, the circuits whose queued data has waited
    /// longest are killed.
    pub max_queued_bytes: u64,
    /// Relayed bytes per second, each way (token buckets on link traffic
    /// read and written); 0 for no limit. The declared bandwidth is at most
    /// this.
    pub bandwidth_rate: u64,
    /// Bucket size in bytes (default: one second of `bandwidth_rate`).
    pub bandwidth_burst: u64,
    /// Client connections one address may hold open (Tor: 50).
    pub dos_max_connections_per_addr: u32,
    /// Circuits one client address may create per second, on average
    /// (Tor: 3), and in a burst (Tor: 90). Refused before any public-key work.
    pub dos_circuit_rate: f64,
    pub dos_circuit_burst: u32,
    /// Also serve the consensus this relay caches over plain HTTP here, as
    /// a fallback directory that clients with no consensus may be
    /// configured with (off by default; clients that hold one ask their
    /// guards over BEGIN_DIR streams instead).
    pub dir_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address.
    pub metrics_allow_remote: bool,
    /// Show destinations and client addresses in logs and error messages
    /// (Tor's `SafeLogging 0`); otherwise they read `[scrubbed]`.
    pub unsafe_logging: bool,
    /// Extend circuits to relays at private addresses (loopback, RFC 1918,
    /// link-local...): only for a test network on one machine. Otherwise a
    /// relay is no way into the private network it stands in.
    pub allow_private_addresses: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            nickname: "Unnamed".into(),
            listen: "127.0.0.1:9001".parse().expect("valid address"),
            advertise: None,
            data_dir: PathBuf::from("allium-relay"),
            authorities: vec![],
            bandwidth: 10_000_000,
            exit: false,
            exit_policy: vec![],
            family: vec![],
            publish_interval_secs: 3600,
            heartbeat_secs: 6 * 3600,
            onion_key_lifetime_secs: 7 * 24 * 3600,
            max_queued_bytes: 512 << 20,
            bandwidth_rate: 0,
            bandwidth_burst: 0,
            dos_max_connections_per_addr: 50,
            dos_circuit_rate: 3.0,
            dos_circuit_burst: 90,
            dir_listen: None,
            metrics_listen: None,
            allow_private_addresses: false,
            metrics_allow_remote: false,
            unsafe_logging: false,
        }
    }
}

impl RelayConfig {
    pub fn policy(&self) -> Result<ExitPolicy, RelayError> {
        if !self.exit_policy.is_empty() {
            return ExitPolicy::parse_rules(&self.exit_policy)
                .map_err(|e| RelayError::Config(e.to_string()));
        }
        Ok(if self.exit {
            ExitPolicy::default_exit()
        } else {
            ExitPolicy::reject_all()
        })
    }

    pub fn advertised(&self) -> Result<SocketAddr, RelayError> {
        let a = self.advertise.unwrap_or(self.listen);
        if a.ip().is_unspecified() {
            return Err(RelayError::Config(
                "listen is a wildcard address: set advertise".into(),
            ));
        }
        Ok(a)
    }

    /// The bandwidth the descriptor declares: the configured figure, but no
    /// more than the rate limit.
    pub fn declared_bandwidth(&self) -> u32 {
        if self.bandwidth_rate > 0 {
            (self.bandwidth as u64).min(self.bandwidth_rate) as u32
        } else {
            self.bandwidth
        }
    }

    pub fn family_ids(&self) -> Result<Vec<[u8; 32]>, RelayError> {
        self.family
            .iter()
            .map(|s| {
                hex::decode(s.trim())
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| {
                        RelayError::Config(format!("family entry {s:?} is not 64 hex digits"))
                    })
            })
            .collect()
    }

    pub fn check(&self) -> Result<(), RelayError> {
        if !allium_proto::doc::valid_nickname(&self.nickname) {
            return Err(RelayError::Config(
                "nickname must be 1-19 ASCII letters or digits".into(),
            ));
        }
        if self.publish_interval_secs == 0 || self.onion_key_lifetime_secs == 0 {
            return Err(RelayError::Config("intervals must be positive".into()));
        }
        if self.max_queued_bytes < (1 << 20) {
            return Err(RelayError::Config(
                "max_queued_bytes must be at least 1 MiB".into(),
            ));
        }
        if !(self.dos_circuit_rate >= 0.0 && self.dos_circuit_rate.is_finite())
            || self.dos_max_connections_per_addr == 0
        {
            return Err(RelayError::Config("bad DoS limits".into()));
        }
        allium_link::metrics::check_listen(self.metrics_listen, self.metrics_allow_remote)?;
        self.policy()?;
        self.advertised()?;
        self.family_ids()?;
        allium_directory::authority_keys(&self.authorities)?;
        Ok(())
    }
}
