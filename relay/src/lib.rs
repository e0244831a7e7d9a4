//! Allium relay: accepts links, answers circuit handshakes, peels and adds
//! onion layers, forwards cells, and as an exit opens TCP streams within its
//! exit policy.
//!
//! Links (channels, limits, accounting) come from `allium_link`, which the
//! client uses too. It does not choose paths; it has no notion of time other
//! than its descriptor schedule and onion-key rotation.

pub mod circuit;
pub mod config;
pub mod exit;
pub mod keys;
pub mod metrics;
pub mod netview;
pub mod relay;
pub mod rendezvous;
pub mod selftest;
pub mod status;

pub use allium_link::{LinkError, RelayStats};
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
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A circuit holds more than its share of the relay's memory.
    #[error("over a resource limit: {0}")]
    ResourceLimit(String),
    #[error("bad config: {0}")]
    Config(String),
}
