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
    /// Rotate the onion key this often; the previous one stays valid for one
    /// more period.
    pub onion_key_lifetime_secs: u64,
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
            onion_key_lifetime_secs: 7 * 24 * 3600,
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
        self.policy()?;
        self.advertised()?;
        self.family_ids()?;
        allium_directory::authority_keys(&self.authorities)?;
        Ok(())
    }
}
