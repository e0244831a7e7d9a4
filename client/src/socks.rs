//! The SOCKS5 front end: sans-IO parser from `allium_proto::socks`, driven
//! here over TCP, one task per connection.

use std::net::SocketAddr;
use std::time::Duration;

use allium_proto::relaymsg::TargetAddr;
use allium_proto::socks::{self, ReplyCode, SocksCmd, SocksServer, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info};

use crate::circuit::{DATA_MAX, StreamData};
use crate::{Client, ClientError, Isolation};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HANDSHAKE: usize = 1024;

pub async fn serve(client: Client, listener: TcpListener, index: usize) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        let c = client.clone();
        tokio::spawn(
            async move {
                if let Err(e) = handle(c, s, index).await {
                    debug!("SOCKS connection: {e}");
                }
            }
            .in_current_span(),
        );
    }
}

async fn handshake(s: &mut TcpStream) -> Result<Option<socks::SocksRequest>, ClientError> {
    let mut p = SocksServer::new();
    let mut buf = Vec::new();
    let mut tmp = [0u8; 512];
    loop {
        match p.step(&buf) {
            Step::NeedMore => {
                if buf.len() > MAX_HANDSHAKE {
                    return Ok(None);
                }
                let n = s.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            Step::Reply { consumed, reply } => {
                buf.drain(..consumed);
                s.write_all(&reply).await?;
            }
            Step::Done { consumed, request } => {
                buf.drain(..consumed);
                return Ok(Some(request));
            }
            Step::Fail { reply, why } => {
                debug!("SOCKS request refused: {why}");
                if let Some(r) = reply {
                    s.write_all(&r).await?;
                }
                return Ok(None);
            }
        }
    }
}

async fn handle(client: Client, mut s: TcpStream, index: usize) -> Result<(), ClientError> {
    s.set_nodelay(true)?;
    let Some(req) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut s))
        .await
        .map_err(|_| ClientError::Timeout("SOCKS handshake"))??
    else {
        return Ok(());
    };
    let iso = Isolation {
        listener: index,
        auth: req.auth.clone(),
    };
    match req.cmd {
        SocksCmd::Resolve => {
            let TargetAddr::Host(h) = req.addr else {
                s.write_all(&socks::reply(ReplyCode::ADDRTYPE_NOT_SUPPORTED, None))
                    .await?;
                return Ok(());
            };
            match client.resolve(h, &iso).await {
                Ok(addrs) => {
                    let a = addrs.first().map(|ip| SocketAddr::new(*ip, 0));
                    s.write_all(&socks::reply(ReplyCode::SUCCEEDED, a)).await?;
                }
                Err(e) => s.write_all(&socks::reply(e.socks_reply(), None)).await?,
            }
            Ok(())
        }
        SocksCmd::Connect => {
            let stream = match client.connect(req.addr.clone(), req.port, &iso).await {
                Ok(st) => st,
                Err(e) => {
                    info!(code = e.socks_reply().0, "stream failed: {e}");
                    s.write_all(&socks::reply(e.socks_reply(), None)).await?;
                    return Ok(());
                }
            };
            s.write_all(&socks::reply(ReplyCode::SUCCEEDED, None))
                .await?;
            relay_bytes(s, stream).await
        }
    }
}

/// Shuttle bytes between the application and the stream until either ends.
async fn relay_bytes(s: TcpStream, mut stream: crate::circuit::Stream) -> Result<(), ClientError> {
    let (mut r, mut w) = s.into_split();
    let mut buf = vec![0u8; DATA_MAX * 8];
    let mut app_open = true;
    loop {
        tokio::select! {
            n = r.read(&mut buf), if app_open => match n {
                Ok(0) | Err(_) => app_open = false,
                Ok(n) => stream.send(&buf[..n]).await?,
            },
            d = stream.rx.recv() => match d {
                Some(StreamData::Data(d)) => w.write_all(&d).await?,
                Some(StreamData::End(_)) | None => {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            },
        }
    }
}
