//! Allium's directory: the authority server and the HTTP client that relays
//! and clients use to reach it.
//!
//! The authority takes signed relay descriptors over HTTP, checks them, and
//! on a schedule builds, signs and serves a consensus of the fresh ones. It
//! persists its key and state in a data directory. This crate does not
//! decide paths or carry traffic.
//!
//! Several authorities vote: each consensus needs signatures from more
//! than half of them (`doc/protocol.md` sections 7 and 8).

pub mod auth;
pub mod cache;
pub mod descstore;
pub mod diff;
pub mod hsdir;
pub mod http;
pub mod keys;
pub mod measure;
pub mod metrics;
pub mod reach;
pub mod serve;
pub mod store;
pub mod verified;

pub use auth::{AuthConfig, Authority};

use std::net::SocketAddr;

use allium_proto::AuthorityKey;
use serde::{Deserialize, Serialize};

/// One directory authority as relays and clients are configured with it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorityEntry {
    pub name: String,
    /// Its directory HTTP address.
    pub addr: SocketAddr,
    /// Its public key, 64 hex digits (`allium dirauth fingerprint` prints it).
    pub key: String,
}

impl AuthorityEntry {
    pub fn parse_key(&self) -> Result<AuthorityKey, DirError> {
        hex::decode(self.key.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .map(AuthorityKey)
            .ok_or_else(|| {
                DirError::Config(format!(
                    "authority {}: key must be 64 hex digits",
                    self.name
                ))
            })
    }
}

/// The pinned keys of a list of authorities.
pub fn authority_keys(list: &[AuthorityEntry]) -> Result<Vec<AuthorityKey>, DirError> {
    list.iter().map(AuthorityEntry::parse_key).collect()
}

/// Errors of the directory crate.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad config: {0}")]
    Config(String),
    #[error("HTTP request to {addr} failed: {why}")]
    Http { addr: String, why: String },
    #[error("directory server answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error(transparent)]
    Proto(#[from] allium_proto::Error),
    #[error("no valid consensus: {0}")]
    NoConsensus(String),
    /// No directory asked had a consensus yet; the soonest said when it
    /// expects the next (its `Retry-After`), `secs` from now.
    #[error("no consensus yet ({why}); the next is due in {secs} s")]
    NotYet { why: String, secs: u64 },
    /// The authorities serve a consensus, signed by authorities this
    /// config does not pin: its `authorities` keys are wrong.
    #[error(
        "the authorities serve a consensus signed by {signers}, none of which this config pins: \
         check the keys in `authorities` (`allium dirauth fingerprint` prints an authority's)"
    )]
    UnpinnedSigners { signers: String },
}

impl DirError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        DirError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Seconds since the UNIX epoch.
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the UNIX epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
