//! Reachability tests: can the authority complete a link handshake with a
//! relay at its advertised address, in which the relay proves the identity
//! and link key of its signed descriptor?

use std::net::SocketAddr;
use std::time::Duration;

use allium_link::LinkError;
use allium_link::listen::out_of_local_resources;
use allium_proto::{LinkKey, RelayId};

use crate::DirError;

pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a reachability test found.
#[derive(Debug)]
pub enum Verdict {
    /// The relay completed the handshake as its descriptor says.
    Reached,
    /// It did not (refused, timed out, the wrong keys): not Running.
    Unreachable(DirError),
    /// The authority could not make the test for want of its own
    /// resources (out of file descriptors or local ports): no verdict on
    /// the relay, whatever its standing was. An authority flooded until it
    /// runs out of descriptors must not vote the relays it cannot test
    /// down.
    NotMade(String),
}

/// An NK handshake with `link_key` at `addr` in which the responder proves
/// identity `id`: only the holder of both secrets can complete it.
pub async fn test_relay(addr: SocketAddr, id: RelayId, link_key: LinkKey) -> Verdict {
    let work = allium_link::channel::handshake_nk(addr, None, &id, &link_key);
    let why = match tokio::time::timeout(REACH_TIMEOUT, work).await {
        Ok(Ok(_)) => return Verdict::Reached,
        Ok(Err(LinkError::Io(e))) if out_of_local_resources(&e) => {
            return Verdict::NotMade(e.to_string());
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "handshake timed out".into(),
    };
    Verdict::Unreachable(DirError::Http {
        addr: addr.to_string(),
        why,
    })
}
