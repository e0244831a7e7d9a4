//! `allium client` configuration (TOML). See `examples/client.toml`.

use std::net::SocketAddr;
use std::path::PathBuf;

use allium_directory::AuthorityEntry;
use serde::{Deserialize, Serialize};

use crate::ClientError;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub data_dir: PathBuf,
    pub authorities: Vec<AuthorityEntry>,
    /// SOCKS5 listeners; loopback only unless `allow_non_loopback_socks`.
    pub socks_listen: Vec<SocketAddr>,
    /// HTTP CONNECT proxy listeners (loopback only, like SOCKS).
    pub http_connect_listen: Vec<SocketAddr>,
    pub allow_non_loopback_socks: bool,
    /// A circuit takes new streams for this long after its first use.
    pub max_circuit_dirtiness_secs: u64,
    /// Give up on a circuit build after this long until enough builds have
    /// been seen to learn a timeout (never more than this).
    pub circuit_build_timeout_secs: u64,
    /// The learned build timeout is never below this.
    pub circuit_build_timeout_min_ms: u64,
    /// Unused circuits kept ready for new streams.
    pub preemptive_circuits: usize,
    /// Guards in the persisted sample.
    pub guard_sample_size: usize,
    /// A guard leaves the sample after this long.
    pub guard_lifetime_secs: u64,
    /// A failed guard is tried again after this long, doubling each time.
    pub guard_retry_secs: u64,
    /// Give up on a stream that has not connected after this long.
    pub stream_timeout_secs: u64,
    /// Serve Prometheus metrics at `http://ADDR/metrics` (off by default).
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address.
    pub metrics_allow_remote: bool,
    /// Show destinations and client addresses in logs and error messages
    /// (Tor's `SafeLogging 0`); otherwise they read `[scrubbed]`.
    pub unsafe_logging: bool,
    /// Congestion control on circuits (Vegas, section 5.1 of the protocol);
    /// off, circuits use the old fixed window of 1000 cells (for
    /// comparison only: it caps a circuit at 1000 cells per round trip).
    pub congestion_control: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            data_dir: PathBuf::from("allium-client"),
            authorities: vec![],
            socks_listen: vec!["127.0.0.1:9150".parse().expect("valid address")],
            http_connect_listen: vec![],
            allow_non_loopback_socks: false,
            max_circuit_dirtiness_secs: 600,
            circuit_build_timeout_secs: 30,
            circuit_build_timeout_min_ms: 1000,
            preemptive_circuits: 2,
            guard_sample_size: 3,
            guard_lifetime_secs: 120 * 24 * 3600,
            guard_retry_secs: 30,
            stream_timeout_secs: 60,
            metrics_listen: None,
            metrics_allow_remote: false,
            unsafe_logging: false,
            congestion_control: true,
        }
    }
}

impl ClientConfig {
    /// The flow control this client asks every hop for.
    pub fn circ_params(&self) -> allium_proto::flow::CircParams {
        if self.congestion_control {
            allium_proto::flow::CircParams::default()
        } else {
            allium_proto::flow::CircParams::Fixed
        }
    }

    pub fn check(&self) -> Result<(), ClientError> {
        if self.authorities.is_empty() {
            return Err(ClientError::Config(
                "at least one authority is needed".into(),
            ));
        }
        allium_directory::authority_keys(&self.authorities)?;
        allium_link::metrics::check_listen(self.metrics_listen, self.metrics_allow_remote)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        for a in self.socks_listen.iter().chain(&self.http_connect_listen) {
            if !a.ip().is_loopback() && !self.allow_non_loopback_socks {
                return Err(ClientError::Config(format!(
                    "proxy listener {a} is not on loopback (set allow_non_loopback_socks to insist)"
                )));
            }
        }
        Ok(())
    }
}
