//! Reachability tests: can the authority complete a link handshake with a
//! relay at its advertised address, in which the relay proves the identity
//! and link key of its signed descriptor?

use std::net::SocketAddr;
use std::time::Duration;

use allium_proto::{LinkKey, RelayId};

use crate::DirError;

pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// An NK handshake with `link_key` at `addr` in which the responder proves
/// identity `id`: only the holder of both secrets can complete it.
pub async fn test_relay(addr: SocketAddr, id: RelayId, link_key: LinkKey) -> Result<(), DirError> {
    let work = allium_link::channel::handshake_nk(addr, None, &id, &link_key);
    match tokio::time::timeout(REACH_TIMEOUT, work).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(DirError::Http {
            addr: addr.to_string(),
            why: e.to_string(),
        }),
        Err(_) => Err(DirError::Http {
            addr: addr.to_string(),
            why: "handshake timed out".into(),
        }),
    }
}
