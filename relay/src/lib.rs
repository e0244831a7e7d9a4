//! Allium relay: accepts links, answers circuit handshakes, peels and adds
//! onion layers, forwards cells, and as an exit opens TCP streams within its
//! exit policy.
//!
//! It also holds the channel code (Noise links driven by one owner task),
//! which the client reuses. It does not choose paths; it has no notion of
//! time other than its descriptor schedule and onion-key rotation.

pub mod channel;
pub mod circuit;
pub mod config;
pub mod exit;
pub mod keys;
pub mod relay;

use std::sync::atomic::{AtomicU64, Ordering};

pub use config::RelayConfig;
pub use relay::Relay;

/// Errors of the relay crate.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Proto(#[from] allium_proto::Error),
    #[error(transparent)]
    Dir(#[from] allium_directory::DirError),
    #[error("channel closed")]
    ChannelClosed,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("bad config: {0}")]
    Config(String),
}

/// Counters a relay keeps (no addresses, no per-user values).
#[derive(Default, Debug)]
pub struct RelayStats {
    pub circuits_created: AtomicU64,
    pub circuits_destroyed: AtomicU64,
    /// Cells this relay peeled or wrapped and passed on.
    pub cells_relayed: AtomicU64,
    /// Cells delivered to or originated by this relay.
    pub cells_delivered: AtomicU64,
    pub cells_originated: AtomicU64,
    pub cell_auth_failures: AtomicU64,
    pub streams_opened: AtomicU64,
    /// Circuits that carried at least one stream (exits only).
    pub circuits_with_streams: AtomicU64,
    pub exit_bytes: AtomicU64,
}

impl RelayStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub(crate) fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}
