//! The proxy front ends: SOCKS4, SOCKS4a and SOCKS5 on one port (told apart
//! by the first byte, as Tor's SocksPort does) and HTTP CONNECT, parsed by
//! the sans-IO code in `allium_proto` and driven here over TCP, one task
//! per connection.

use std::net::SocketAddr;
use std::time::Duration;

use allium_link::listen::Slot;
use allium_proto::httpconnect;
use allium_proto::relaymsg::TargetAddr;
use allium_proto::socks::{ReplyCode, SocksCmd, SocksServer, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info};

use crate::circuit::{Stream, StreamData};
use crate::{Client, ClientError, Isolation};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_HANDSHAKE: usize = 1024;
/// The most optimistic data a stream takes with its BEGIN.
pub(crate) const MAX_EARLY: usize = 16 * 1024;

/// Which protocol a listener speaks.
#[derive(Clone, Copy, Debug)]
pub enum Front {
    Socks,
    HttpConnect,
}

pub async fn serve(client: Client, listener: TcpListener, index: usize, front: Front) {
    let gate = allium_link::listen::Gate::process();
    loop {
        let (s, _, slot) = allium_link::listen::accept(&listener, &gate).await;
        let c = client.clone();
        tokio::spawn(
            async move {
                let r = match front {
                    Front::Socks => handle_socks(c, s, slot, index).await,
                    Front::HttpConnect => handle_http(c, s, slot, index).await,
                };
                if let Err(e) = r {
                    debug!("proxy connection: {e}");
                }
            }
            .in_current_span(),
        );
    }
}

/// Run the SOCKS handshake; returns the request and bytes read past it.
async fn socks_handshake(
    s: &mut TcpStream,
) -> Result<Option<(allium_proto::socks::SocksRequest, Vec<u8>)>, ClientError> {
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
                return Ok(Some((request, buf)));
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

async fn handle_socks(
    client: Client,
    mut s: TcpStream,
    slot: Slot,
    index: usize,
) -> Result<(), ClientError> {
    s.set_nodelay(true)?;
    let head = tokio::time::timeout(HANDSHAKE_TIMEOUT, socks_handshake(&mut s));
    let Some((req, early)) = slot
        .unless_shed(head)
        .await
        .ok_or(ClientError::Timeout("SOCKS handshake (shed to make room)"))?
        .map_err(|_| ClientError::Timeout("SOCKS handshake"))??
    else {
        return Ok(());
    };
    slot.busy();
    let iso = Isolation {
        listener: index,
        auth: req.auth.clone(),
    };
    match req.cmd {
        SocksCmd::Resolve => {
            let TargetAddr::Host(h) = req.addr.clone() else {
                s.write_all(&req.reply(ReplyCode::ADDRTYPE_NOT_SUPPORTED, None))
                    .await?;
                return Ok(());
            };
            match client.resolve(h, &iso).await {
                Ok(addrs) => {
                    let a = addrs.first().map(|ip| SocketAddr::new(*ip, 0));
                    s.write_all(&req.reply(ReplyCode::SUCCEEDED, a)).await?;
                }
                Err(e) => s.write_all(&req.reply(e.socks_reply(), None)).await?,
            }
            Ok(())
        }
        SocksCmd::Connect => {
            let early = early_bytes(&s, early);
            let r = connect(&client, req.addr.clone(), req.port, &iso, early).await;
            let code = r
                .as_ref()
                .map_or_else(ClientError::socks_reply, |_| ReplyCode::SUCCEEDED);
            s.write_all(&req.reply(code, None)).await?;
            match r {
                Ok(stream) => relay_bytes(s, stream).await,
                Err(_) => Ok(()),
            }
        }
    }
}

async fn handle_http(
    client: Client,
    mut s: TcpStream,
    slot: Slot,
    index: usize,
) -> Result<(), ClientError> {
    s.set_nodelay(true)?;
    let head = async {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            match httpconnect::parse(&buf) {
                Ok(Some((n, req))) => return Ok::<_, ClientError>(Some((req, buf[n..].to_vec()))),
                Ok(None) => {}
                Err(r) => {
                    debug!("HTTP CONNECT refused: {}", r.why);
                    s.write_all(&r.response).await?;
                    return Ok(None);
                }
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&tmp[..n]);
        }
    };
    let Some((req, early)) = slot
        .unless_shed(tokio::time::timeout(HANDSHAKE_TIMEOUT, head))
        .await
        .ok_or(ClientError::Timeout("HTTP request (shed to make room)"))?
        .map_err(|_| ClientError::Timeout("HTTP request"))??
    else {
        return Ok(());
    };
    slot.busy();
    let iso = Isolation {
        listener: index,
        auth: req.auth.clone(),
    };
    let early = early_bytes(&s, early);
    let r = connect(&client, req.addr, req.port, &iso, early).await;
    let code = r
        .as_ref()
        .map_or_else(ClientError::socks_reply, |_| ReplyCode::SUCCEEDED);
    s.write_all(&httpconnect::response(code)).await?;
    match r {
        Ok(stream) => relay_bytes(s, stream).await,
        Err(_) => Ok(()),
    }
}

/// Optimistic data: what the application sent right behind its request
/// (`early`, read with it), and what more has already arrived, read
/// without waiting; at most [`MAX_EARLY`] bytes. It goes with the BEGIN,
/// so a request sent without waiting for the proxy's answer (as browsers
/// built for Tor do) reaches the server a round trip sooner.
fn early_bytes(s: &TcpStream, mut early: Vec<u8>) -> Vec<u8> {
    let room = MAX_EARLY.saturating_sub(early.len());
    if room > 0 {
        let mut tmp = vec![0u8; room];
        if let Ok(n) = s.try_read(&mut tmp) {
            early.extend_from_slice(&tmp[..n]);
        }
    }
    early
}

async fn connect(
    client: &Client,
    addr: TargetAddr,
    port: u16,
    iso: &Isolation,
    early: Vec<u8>,
) -> Result<Stream, ClientError> {
    let r = client.connect(addr, port, iso, early).await;
    if let Err(e) = &r {
        info!(code = e.socks_reply().0, "stream failed: {e}");
    }
    r
}

/// Shuttle bytes between the application and the stream until either ends.
pub async fn relay_bytes<S>(s: S, stream: Stream) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    shuttle(s, stream, false).await
}

/// Shuttle bytes between a service's local server and a client's stream:
/// as an exit does, the stream ends (END) once the server has closed and
/// all it sent has gone.
pub async fn serve_bytes<S>(s: S, stream: Stream) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    shuttle(s, stream, true).await
}

/// With `end_with_app`, the application's end of its writing ends the
/// stream (the stream drops, and its END goes out after its data);
/// otherwise only the far end's END or the circuit's end does.
async fn shuttle<S>(s: S, mut stream: Stream, end_with_app: bool) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(s);
    let mut buf = vec![0u8; 32 * 1024];
    let mut app_open = true;
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        tokio::select! {
            n = r.read(&mut buf), if app_open => match n {
                Ok(0) | Err(_) if end_with_app => return Ok(()),
                Ok(0) | Err(_) => app_open = false,
                Ok(n) => stream.send(&buf[..n]).await?,
            },
            d = stream.recv() => match d {
                Some(StreamData::Data(d)) => {
                    // Write what has arrived in one go.
                    out.clear();
                    out.extend_from_slice(&d);
                    let mut ended = false;
                    while out.len() < 60 * 1024 {
                        match stream.try_recv().await {
                            Some(StreamData::Data(d)) => out.extend_from_slice(&d),
                            Some(StreamData::End(_)) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    w.write_all(&out).await?;
                    if ended {
                        let _ = w.shutdown().await;
                        return Ok(());
                    }
                }
                Some(StreamData::End(_)) | None => {
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            },
        }
    }
}
