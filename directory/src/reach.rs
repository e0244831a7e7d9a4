//! Reachability tests: can the authority complete a link handshake with a
//! relay at its advertised address, with the link key its signed
//! descriptor binds to its identity?

use std::net::SocketAddr;
use std::time::Duration;

use allium_proto::link::{self, LINK_NK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::DirError;

pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// An NK handshake with `link_key` at `addr`: only a holder of the key's
/// secret can complete it.
pub async fn test_relay(addr: SocketAddr, link_key: [u8; 32]) -> Result<(), DirError> {
    let fail = |why: String| DirError::Http {
        addr: addr.to_string(),
        why,
    };
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let _ = s.set_nodelay(true);
        let mut hs = link::nk_initiator(&mut rand::rng(), &link_key)?;
        let mut m1 = vec![LINK_NK];
        m1.extend(link::handshake_frame(&mut hs, &[])?);
        s.write_all(&m1).await.map_err(|e| fail(e.to_string()))?;
        let len = s.read_u16().await.map_err(|e| fail(e.to_string()))? as usize;
        let mut m2 = vec![0u8; len];
        s.read_exact(&mut m2)
            .await
            .map_err(|e| fail(e.to_string()))?;
        link::read_handshake(&mut hs, &m2)?;
        Ok(())
    };
    tokio::time::timeout(REACH_TIMEOUT, work)
        .await
        .map_err(|_| fail("handshake timed out".into()))?
}
