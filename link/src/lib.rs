//! Allium links: what relays and clients both stand on.
//!
//! * [`channel`]: a Noise link to one peer (the handshakes of
//!   `allium_proto::link`, driven over TCP), run by one owner task that reads,
//!   writes and routes cells to circuits.
//! * [`limits`]: the queued-cell memory cap and its circuit killer, the
//!   bandwidth token bucket, and per-address DoS limits.
//! * [`listen`]: admission of inbound connections, shedding the oldest
//!   idle one when full, and one-request HTTP serving with timeouts.
//! * [`metrics`]: serving Prometheus metrics over HTTP.
//! * [`safelog`]: destinations and client addresses kept out of logs.
//! * [`sched`]: which circuit a channel sends from next.
//! * [`shaping`]: link delay and rate for test networks (off otherwise).
//! * [`RelayStats`]: the counters a relay keeps.
//!
//! It does **not** know about circuits beyond routing their cells by id, and
//! makes no decisions about which peers to link to: relays and clients do.

pub mod channel;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod safelog;
pub mod sched;
pub mod shaping;

use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of links.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Proto(#[from] allium_proto::Error),
    #[error("channel closed")]
    ChannelClosed,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer broke the link protocol.
    #[error("the peer misbehaved: {0}")]
    PeerMisbehaved(String),
    #[error("bad config: {0}")]
    Config(String),
    #[error("no free circuit id on this channel")]
    NoCircuitId,
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
    /// BEGIN_DIR streams opened (to this relay's consensus cache).
    pub dir_streams: AtomicU64,
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
    /// Links closed because the peer did not read what it was sent.
    pub links_stalled: AtomicU64,
}

impl RelayStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn destroyed(&self, reason: u8) {
        Self::inc(&self.circuits_destroyed, 1);
        // Codes past the table share slot 4, which no reason uses.
        let slot = if (reason as usize) < 16 {
            reason as usize
        } else {
            4
        };
        Self::inc(&self.destroyed_by_reason[slot], 1);
    }
}
