//! Allium client: fetches and verifies the consensus, chooses paths, builds
//! three-hop circuits over an NK link to the guard, and serves SOCKS5 on
//! loopback. Hostnames are sent to the exit and resolved there; the client
//! never resolves a name itself.
//!
//! It does not relay traffic for others and keeps no state beyond its data
//! directory.
//!
//! As a library: [`Client::new`] from a [`ClientConfig`], run
//! [`Client::serve`] (or just [`Client::consensus_loop`]) in a task, wait
//! for [`Client::wait_bootstrapped`] or call [`Client::bootstrap`], then
//! [`Client::open_stream`] gives an `AsyncRead + AsyncWrite` stream to a
//! host and port. Several clients can run in one process, each with its
//! own data directory.
//!
//! With `control_listen` set, [`Client::serve`] also serves a control
//! port that Tor's controllers (stem, nyx) speak to: see [`control`] and
//! `doc/control.md`.

pub mod circuit;
pub mod client;
pub mod config;
pub mod control;
pub mod dir;
pub mod events;
pub mod guards;
pub mod hsdir;
pub mod path;
pub mod pathbias;
pub mod rendezvous;
pub mod service;
pub mod socks;
pub mod vanguards;

pub use client::{Client, Isolation, Phase};
pub use config::ClientConfig;

use allium_link::safelog::Sensitive;
use allium_proto::relaymsg::EndReason;
use allium_proto::socks::ReplyCode;

/// Errors of the client crate, each with the SOCKS reply it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no usable consensus: {0}")]
    NoConsensus(String),
    #[error("no exit relay allows {0}")]
    NoExit(Sensitive<String>),
    #[error("no path: {0}")]
    NoPath(String),
    /// No circuit can end at `relay`: it is not Running, or every guard
    /// the client may use is it or shares its family or /16.
    #[error("no circuit can end at relay {}: {why}", hex::encode(&relay[..8]))]
    CannotEndAt { relay: [u8; 32], why: String },
    #[error("circuit build failed: {0}")]
    Build(String),
    /// The previous hop reports that it could not extend to `relay`. The
    /// client cannot check this (that hop may have caused or invented the
    /// failure), so it is not held against `relay`.
    #[error("{why}")]
    ExtendFailed { relay: [u8; 32], why: String },
    #[error("the exit ended the stream: {0:?}")]
    StreamEnded(EndReason),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("circuit closed")]
    CircuitClosed,
    #[error(transparent)]
    Link(#[from] allium_link::LinkError),
    #[error(transparent)]
    Proto(#[from] allium_proto::Error),
    #[error(transparent)]
    Dir(#[from] allium_directory::DirError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad config: {0}")]
    Config(String),
    /// A service name that is not a valid address (mistyped).
    #[error("invalid service address: {0}")]
    BadServiceAddress(#[from] allium_proto::service::AddressError),
    /// No introduction point passed the request on to the service.
    #[error("introduction failed: {0}")]
    IntroductionFailed(String),
    /// Every introduction point timed out.
    #[error("introduction timed out")]
    IntroductionTimedOut,
    /// The service did not come to the rendezvous point, or the circuit
    /// there failed.
    #[error("rendezvous failed: {0}")]
    RendezvousFailed(String),
    /// No directory responsible for the service had its descriptor.
    #[error("service descriptor not found: {0}")]
    DescriptorNotFound(String),
    /// A directory gave a descriptor that does not verify or decrypt.
    #[error("invalid service descriptor: {0}")]
    BadDescriptor(String),
    /// The service admits only the clients it lists, and this client has
    /// no key for it.
    #[error("client authorization missing: {0}")]
    ClientAuthMissing(String),
    /// This client's key for the service is not one the service lists.
    #[error("client authorization wrong: {0}")]
    ClientAuthWrong(String),
    /// A Tor `.onion` name: not ours, and never sent to an exit (whose
    /// resolver would pass it to the DNS).
    #[error("a Tor .onion name, which Allium cannot reach")]
    TorOnionName,
}

impl ClientError {
    /// The RFC 1928 reply code for this failure.
    pub fn socks_reply(&self) -> ReplyCode {
        match self {
            ClientError::NoExit(_) => ReplyCode::NOT_ALLOWED,
            ClientError::StreamEnded(r) => match *r {
                EndReason::EXIT_POLICY => ReplyCode::NOT_ALLOWED,
                EndReason::RESOLVE_FAILED | EndReason::NO_ROUTE => ReplyCode::HOST_UNREACHABLE,
                EndReason::CONNECT_REFUSED => ReplyCode::CONNECTION_REFUSED,
                EndReason::TIMEOUT => ReplyCode::TTL_EXPIRED,
                _ => ReplyCode::GENERAL_FAILURE,
            },
            ClientError::Timeout(_) => ReplyCode::TTL_EXPIRED,
            ClientError::BadServiceAddress(_) | ClientError::TorOnionName => {
                ReplyCode::ONION_ADDRESS_INVALID
            }
            ClientError::DescriptorNotFound(_) => ReplyCode::ONION_DESCRIPTOR_NOT_FOUND,
            ClientError::IntroductionFailed(_) => ReplyCode::ONION_INTRODUCTION_FAILED,
            ClientError::IntroductionTimedOut => ReplyCode::ONION_INTRODUCTION_TIMED_OUT,
            ClientError::RendezvousFailed(_) => ReplyCode::ONION_RENDEZVOUS_FAILED,
            ClientError::BadDescriptor(_) => ReplyCode::ONION_DESCRIPTOR_INVALID,
            ClientError::ClientAuthMissing(_) => ReplyCode::ONION_MISSING_CLIENT_AUTH,
            ClientError::ClientAuthWrong(_) => ReplyCode::ONION_WRONG_CLIENT_AUTH,
            _ => ReplyCode::GENERAL_FAILURE,
        }
    }
}
