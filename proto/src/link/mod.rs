//! The link layer: Noise over TCP (`doc/protocol.md` section 1, "Links").
//!
//! The initiator first sends one byte naming the pattern: [`LINK_NK`] (a
//! client to its guard: the client stays anonymous) or [`LINK_XK`] (relay to
//! relay). Every message after that, handshake and transport, is a frame:
//! `len u16 (big endian) | noise message[len]`. A transport message's
//! plaintext is 1 to [`MAX_CELLS_PER_FRAME`] whole cells, so the link's
//! AEAD is paid once per batch.
//!
//! Both patterns make the responder prove its Ed25519 relay identity inside
//! the handshake (its second message), and XK makes the initiator prove its
//! own in the third: a link is bound to identities, not only to link keys.
//!
//! The handshakes are step machines ([`Initiator`], [`Responder`]) that the
//! caller feeds with the bytes it reads and drains of the bytes to write:
//!
//! ```text
//! let mut buf = Vec::new();
//! let link = loop {
//!     match hs.step(&mut buf)? {
//!         Action::Send(bytes) => socket.write_all(&bytes),
//!         Action::Recv => socket.read_into(&mut buf),   // appends
//!         Action::Done(unverified) => break unverified.verify(&expected)?,
//!     }
//! };
//! // `buf` keeps any transport bytes that arrived with the last message.
//! ```
//!
//! The initiator's result is an [`UnverifiedLink`]: only
//! [`UnverifiedLink::verify`] with the identity the caller meant to reach
//! gives its [`LinkTransport`]. Snow is used for the handshakes only and is
//! not visible outside this module; the transport is [`LinkTransport`],
//! which seals and opens frames in place.

mod handshake;
mod noise;
mod transport;

pub use handshake::{Action, Initiator, Link, LinkKeys, Responder, UnverifiedLink};
pub use transport::LinkTransport;

/// The primitives the link handshakes hand snow, so that
/// `proto/tests/external_vectors.rs` can run published Noise vectors (with
/// their own keys and prologue) on them. Not part of the API.
#[doc(hidden)]
pub use noise::Resolver as NoiseResolver;

use crate::aead::TAG_LEN;
use crate::cell::CELL_LEN;

pub const LINK_NK: u8 = 1;
pub const LINK_XK: u8 = 2;
pub const NK_PARAMS: &str = "Noise_NK_25519_AESGCM_SHA256";
pub const XK_PARAMS: &str = "Noise_XK_25519_AESGCM_SHA256";
pub const PROLOGUE: &[u8] = b"allium link v1";
/// Domain of the responder's identity proof (both patterns, message 2).
pub const RESPONDER_AUTH_DOMAIN: &[u8] = b"allium link responder v1\0";
/// Domain of the XK initiator's identity proof (message 3).
pub const XK_AUTH_DOMAIN: &[u8] = b"allium link xk v1\0";
/// `identity[32] | sig[64]`.
pub const AUTH_LEN: usize = 96;
/// The longest handshake message accepted (the longest sent is 160 bytes).
pub const MAX_HANDSHAKE_MSG: usize = 256;
pub const MAX_FRAME: usize = 65535;
pub const MAX_CELLS_PER_FRAME: usize = (MAX_FRAME - TAG_LEN) / CELL_LEN;
/// The shortest transport message: one cell and its tag.
pub const MIN_TRANSPORT_MSG: usize = CELL_LEN + TAG_LEN;

/// The length of the frame at the start of `buf`, if its prefix is there:
/// `Ok(Some(len))` where `len` is the Noise message length (the frame is
/// `2 + len` bytes), `Ok(None)` while fewer than 2 bytes are buffered.
pub fn frame_len(buf: &[u8], min: usize, max: usize) -> Result<Option<usize>, crate::Error> {
    let Some(prefix) = buf.get(..2) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([prefix[0], prefix[1]]) as usize;
    if len < min || len > max {
        return Err(crate::Error::Link(format!(
            "frame of {len} bytes (expected {min} to {max})"
        )));
    }
    Ok(Some(len))
}
