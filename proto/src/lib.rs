//! Allium's protocol, as pure code.
//!
//! This crate holds every wire format (cells, relay messages, link frames,
//! SOCKS, the control protocol), the link and circuit handshakes, the onion-layer crypto, the
//! circuit core that client, relay and exit drive ([`circuit`]) and the
//! signed directory documents. It does **not** open sockets, read the clock, spawn
//! tasks or draw randomness on its own: callers pass in the time as UNIX
//! seconds and an `&mut impl CryptoRng`. Every byte it reads or writes is
//! described in `doc/protocol.md`.

pub mod aead;
pub mod cell;
pub mod circuit;
pub mod congestion;
pub mod control;
pub mod doc;
pub mod flow;
pub mod httpconnect;
pub mod link;
pub mod ntor;
pub mod onion;
pub mod policy;
pub mod relaymsg;
pub mod service;
pub mod socks;
pub mod vote;
pub mod wire;

pub use doc::{
    AuthSigned, AuthorityCert, AuthorityKey, AuthoritySig, Consensus, ConsensusRelay,
    PositionWeights, RelayDescriptor, RelayFlags, SignedDocument, UnverifiedConsensus,
    UnverifiedDescriptor,
};

/// Everything that can go wrong in this crate. Peer faults say what the peer
/// sent; none of them carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("message truncated")]
    Truncated,
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("{what} too large: {len} bytes, limit {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("bad signature on {0}")]
    BadSignature(&'static str),
    #[error("document not valid at this time: {0}")]
    Expired(String),
    #[error("not enough authority signatures: {valid} valid of {needed} needed")]
    NotEnoughSignatures { valid: usize, needed: usize },
    #[error("circuit handshake failed: {0}")]
    Handshake(&'static str),
    #[error("cell failed authentication (modified, replayed, reordered or dropped)")]
    CellAuth,
    #[error("link handshake failed: {0}")]
    Link(String),
    #[error("nonce counter exhausted")]
    CounterExhausted,
    /// A local fault of flow control: this side tried to send past its
    /// own window.
    #[error("flow control: {0}")]
    FlowControl(&'static str),
    /// A local fault: data for a stream that has ended or never was.
    #[error("no stream {0} on this circuit")]
    UnknownStream(u16),
    #[error("the peer misbehaved: {0}")]
    PeerMisbehaved(#[from] PeerMisbehaved),
}

/// What a peer did that the protocol forbids: always the peer's fault, and
/// it costs the peer the circuit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMisbehaved {
    #[error("sent DATA past the circuit window")]
    DataPastCircuitWindow,
    #[error("sent DATA on a stream past a window's worth after its XOFF")]
    DataPastXoff,
    #[error("sent a circuit SENDME for cells never sent")]
    SendmeUnowed,
    #[error("sent a circuit SENDME whose tag is not the one owed")]
    SendmeWrongTag,
    #[error("sent {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("asked to extend a circuit that already has a next hop")]
    ExtendTwice,
    #[error("asked a relay to extend to itself")]
    ExtendToSelf,
    #[error("asked a relay to extend back to the hop the circuit came from")]
    ExtendBack,
    #[error("sent more RELAY_EARLY cells than a circuit of the longest length needs")]
    TooManyHops,
}

impl PeerMisbehaved {
    /// The DESTROY reason that tells the peer what it did.
    pub fn destroy_reason(&self) -> cell::DestroyReason {
        use PeerMisbehaved::*;
        match self {
            DataPastCircuitWindow | DataPastXoff | SendmeUnowed | SendmeWrongTag => {
                cell::DestroyReason::FLOW_CONTROL
            }
            Unexpected { .. } | ExtendTwice | ExtendToSelf | ExtendBack | TooManyHops => {
                cell::DestroyReason::PROTOCOL
            }
        }
    }
}

impl Error {
    pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> Self {
        Error::Malformed {
            what,
            why: why.into(),
        }
    }
}

/// Hex of the first bytes of a key or id, for logs (never a secret).
pub fn short_id(id: &[u8; 32]) -> String {
    hex::encode(&id[..6])
}

/// A relay's Ed25519 identity key: the name its descriptor, its consensus
/// entry and its links are bound to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub [u8; 32]);

impl std::fmt::Debug for RelayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelayId({})", short_id(&self.0))
    }
}

impl std::fmt::Display for RelayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&short_id(&self.0))
    }
}

/// A 32-byte public key with its own name, so that one kind cannot be
/// passed where another is meant. On the wire (postcard) it is its 32
/// bytes, exactly as a bare array.
macro_rules! public_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub [u8; 32]);

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), short_id(&self.0))
            }
        }
    };
}

public_key! {
    /// A relay's X25519 link key: the Noise static key its links prove
    /// (`doc/protocol.md` section 1).
    LinkKey
}

public_key! {
    /// A relay's X25519 onion key: the key of its circuit handshakes
    /// (`doc/protocol.md` section 3).
    OnionKey
}
