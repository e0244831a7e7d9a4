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
pub mod limits;
pub mod metrics;
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
    /// Link bytes read and written (Noise frames).
    pub link_bytes_read: AtomicU64,
    pub link_bytes_written: AtomicU64,
    /// Circuits destroyed, by DESTROY reason code (codes above 15 count as 15).
    pub destroyed_by_reason: [AtomicU64; 16],
    /// Cells dropped: for unknown circuits, or queued on a circuit that died.
    pub cells_dropped: AtomicU64,
    /// Circuits killed because queued cells exceeded the memory cap.
    pub oom_kills: AtomicU64,
    /// Connections refused by the per-address limit.
    pub dos_refused_connections: AtomicU64,
    /// CREATEs refused by the per-address circuit rate.
    pub dos_refused_circuits: AtomicU64,
    /// Link handshakes and circuit handshakes that failed.
    pub link_handshake_failures: AtomicU64,
    pub circuit_handshake_failures: AtomicU64,
    /// Circuits closed because a peer broke flow control.
    pub flow_control_violations: AtomicU64,
    pub streams_closed: AtomicU64,
}

impl RelayStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub(crate) fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn destroyed(&self, reason: u8) {
        Self::inc(&self.circuits_destroyed, 1);
        Self::inc(&self.destroyed_by_reason[(reason as usize).min(15)], 1);
    }
}
