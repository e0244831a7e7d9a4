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
    /// Relays' fallback directories (their `dir_listen`), asked in random
    /// order before the authorities when no guard's cache answers (always
    /// at bootstrap). What they serve is verified against the authorities'
    /// keys.
    pub fallback_dirs: Vec<SocketAddr>,
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
    /// Serve the control port (a subset of Tor's control protocol, see
    /// `doc/control.md`) here; loopback only. Off by default.
    pub control_listen: Option<SocketAddr>,
    /// Also admit controllers with this password, given in Tor's
    /// `HashedControlPassword` form (`tor --hash-password` prints it).
    /// The cookie in `data_dir/control_auth_cookie` always admits.
    pub control_password_hash: Option<String>,
    /// Onion services this client hosts (`[[services]]`; see
    /// `examples/service.toml`).
    pub services: Vec<crate::service::ServiceConfig>,
    /// Keys for services that admit only the clients they list: one
    /// `NAME.auth_private` file per service, holding
    /// `<address>:descriptor:x25519:<base32 secret>` as Tor's
    /// `ClientOnionAuthDir` does (under `data_dir` if relative; read at
    /// each descriptor fetch). `allium client-auth` makes a key.
    pub service_auth_dir: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            data_dir: PathBuf::from("allium-client"),
            authorities: vec![],
            fallback_dirs: vec![],
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
            control_listen: None,
            control_password_hash: None,
            services: vec![],
            service_auth_dir: None,
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

    /// `control_password_hash`, parsed.
    pub fn control_password(
        &self,
    ) -> Result<Option<allium_proto::control::HashedPassword>, ClientError> {
        self.control_password_hash
            .as_deref()
            .map(allium_proto::control::HashedPassword::parse)
            .transpose()
            .map_err(|e| ClientError::Config(format!("control_password_hash: {e}")))
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
        if let Some(a) = self.control_listen
            && !a.ip().is_loopback()
        {
            return Err(ClientError::Config(format!(
                "control_listen {a} is not on loopback (the control port is for local controllers only)"
            )));
        }
        self.control_password()?;
        for s in &self.services {
            s.check()?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClientConfig {
        ClientConfig {
            authorities: vec![AuthorityEntry {
                name: "auth0".into(),
                addr: "127.0.0.1:7000".parse().unwrap(),
                key: "00".repeat(32),
            }],
            ..ClientConfig::default()
        }
    }

    #[test]
    fn the_control_port_is_loopback_only() {
        let mut c = cfg();
        c.check().unwrap();
        c.control_listen = Some("127.0.0.1:9151".parse().unwrap());
        c.check().unwrap();
        c.control_listen = Some("[::1]:9151".parse().unwrap());
        c.check().unwrap();
        c.control_listen = Some("0.0.0.0:9151".parse().unwrap());
        assert!(c.check().is_err());
        // Not even with the SOCKS override.
        c.allow_non_loopback_socks = true;
        assert!(c.check().is_err());
    }

    #[test]
    fn the_control_password_hash_is_checked() {
        let mut c = cfg();
        c.control_password_hash =
            Some("16:14671C693412AC5060F6903599CEC8B5A76FB4334E756CCCEE29607894".into());
        assert!(c.control_password().unwrap().is_some());
        c.control_password_hash = Some("correct horse".into());
        assert!(c.check().is_err());
    }
}
