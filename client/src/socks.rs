//! The proxy front ends: SOCKS4, SOCKS4a and SOCKS5 on one port (told apart
//! by the first byte, as Tor's SocksPort does) and HTTP CONNECT, parsed by
//! the sans-IO code in `allium_proto` and driven here over TCP, one task
//! per connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use allium_link::listen::Slot;
use allium_proto::httpconnect;
use allium_proto::relaymsg::{EndReason, TargetAddr};
use allium_proto::socks::{ReplyCode, SocksCmd, SocksServer, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
                Ok(stream) => relay_or_reset(s, stream).await,
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
        Ok(stream) => relay_or_reset(s, stream).await,
        Err(_) => Ok(()),
    }
}

/// [`relay_bytes`] over `s`, reset if the stream broke off.
async fn relay_or_reset(mut s: TcpStream, stream: Stream) -> Result<(), ClientError> {
    let r = relay_bytes(&mut s, stream).await;
    if r.is_err() {
        reset(&s);
    }
    r
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

/// Shuttle bytes between the application's connection `s` and the stream
/// until either ends. An error when the stream did not end whole (an END
/// other than DONE, or the circuit's end): the caller should then reset
/// `s` ([`reset`]), so that the application cannot take what it got for
/// all of it (the connection has not been shut down).
pub async fn relay_bytes<S>(s: S, stream: Stream) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    shuttle(s, stream, false).await
}

/// Shuttle bytes between a service's local server and a client's stream:
/// as an exit does, the stream ends (END DONE) once the server has closed
/// and all it sent has gone, and with the reason if reading from the
/// server failed. Errors as [`relay_bytes`].
pub async fn serve_bytes<S>(s: S, stream: Stream) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    shuttle(s, stream, true).await
}

/// A stream from [`Client::open_stream`]: where the stream broke off (an
/// END other than DONE, or its circuit's end), a read fails with
/// `ConnectionReset` instead of ending as if all had come.
pub struct AppStream {
    io: tokio::io::DuplexStream,
    broke: Arc<AtomicBool>,
}

impl AppStream {
    /// `io`, and the flag that says its stream broke off (set before the
    /// other end of `io` drops).
    pub(crate) fn new(io: tokio::io::DuplexStream) -> (Self, Arc<AtomicBool>) {
        let broke = Arc::new(AtomicBool::new(false));
        (
            AppStream {
                io,
                broke: broke.clone(),
            },
            broke,
        )
    }
}

impl AsyncRead for AppStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining());
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(()))
                if room > 0
                    && buf.filled().len() == before
                    && this.broke.load(Ordering::Acquire) =>
            {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the stream broke off",
                )))
            }
            r => r,
        }
    }
}

impl AsyncWrite for AppStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reset the application's connection (RST, not FIN): its stream broke
/// off, and a clean end would pass a truncated transfer off as whole.
pub(crate) fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// With `end_with_app`, the application's end of its writing ends the
/// stream (the stream drops, and its END goes out after its data);
/// otherwise only the far end's END or the circuit's end does.
///
/// Each direction moves on its own: a send that waits for room in the
/// circuit never stops what arrives from reaching the application, and a
/// write to an application that is not reading never stops what it sends
/// (an echo, or a protocol that answers as it reads, would otherwise wait
/// on the far end while the far end waits on it).
async fn shuttle<S>(s: S, mut stream: Stream, end_with_app: bool) -> Result<(), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(s);
    let sender = stream.sender();
    let mut buf = vec![0u8; 32 * 1024];
    let mut app_open = true;
    // Read from the application, not yet sent.
    let mut up: Vec<u8> = Vec::with_capacity(buf.len());
    // Arrived on the stream, written up to `written`.
    let mut down: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut written = 0;
    // How the stream ended, once it has.
    let mut end: Option<Result<(), ClientError>> = None;
    loop {
        if written == down.len()
            && let Some(end) = end.take()
        {
            if end.is_ok() {
                let _ = w.shutdown().await;
            }
            return end;
        }
        tokio::select! {
            n = r.read(&mut buf), if app_open && up.is_empty() => match n {
                Ok(0) if end_with_app => {
                    let _ = w.write_all(&down[written..]).await;
                    return end.unwrap_or(Ok(()));
                }
                Err(e) if end_with_app => {
                    stream.end_with(EndReason::for_io_error(&e));
                    return Err(e.into());
                }
                Ok(0) | Err(_) => app_open = false,
                Ok(n) => up.extend_from_slice(&buf[..n]),
            },
            sent = sender.send(&up), if !up.is_empty() => {
                sent?;
                up.clear();
            }
            d = stream.recv(), if written == down.len() && end.is_none() => {
                // Take what has arrived, to write in one go; how the
                // stream ended, if it did.
                down.clear();
                written = 0;
                let mut next = d;
                end = loop {
                    match next {
                        Some(StreamData::Data(d)) => down.extend_from_slice(&d),
                        Some(StreamData::End(EndReason::DONE)) => break Some(Ok(())),
                        Some(StreamData::End(r)) => break Some(Err(ClientError::StreamEnded(r))),
                        None => break Some(Err(ClientError::CircuitClosed)),
                    }
                    if down.len() >= 60 * 1024 {
                        break None;
                    }
                    match stream.try_recv().await {
                        Some(d) => next = Some(d),
                        None => break None,
                    }
                };
            }
            n = w.write(&down[written..]), if written < down.len() => match n? {
                0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                n => written += n,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit::CircCmd;

    /// Both ends of a loopback TCP connection: (ours, the application's).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        (ours, app)
    }

    /// What the application reads until its connection ends, and how it
    /// ended.
    async fn read_all(app: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Bounded: the far end ends within the test's few bytes.
        for _ in 0..1000 {
            match app.read(&mut buf).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
        panic!("no end");
    }

    /// A stream whose far end sent "hello", then `end` (None: its
    /// circuit died): what the application got, how its connection
    /// ended, and what the client's side returned.
    async fn after(end: Option<EndReason>) -> (Vec<u8>, std::io::Result<()>, bool) {
        let (ours, mut app) = pair().await;
        let (stream, data, _cmds) = Stream::detached(1);
        data.send((StreamData::Data(b"hello".to_vec()), 1)).unwrap();
        match end {
            Some(r) => data.send((StreamData::End(r), 0)).unwrap(),
            None => drop(data),
        }
        let r = relay_or_reset(ours, stream).await;
        let (got, how) = read_all(&mut app).await;
        (got, how, r.is_ok())
    }

    #[tokio::test]
    async fn a_stream_that_broke_off_resets_the_application_connection() {
        // END DONE: all came, and the connection ends cleanly.
        let (got, how, ok) = after(Some(EndReason::DONE)).await;
        assert_eq!(got, b"hello");
        assert!(how.is_ok() && ok, "{how:?}");
        // Any other END, or the circuit's end: what came is delivered,
        // then the connection is reset, so that no application can take
        // the transfer for whole.
        for end in [Some(EndReason::CONN_RESET), Some(EndReason::DESTROY), None] {
            let (got, how, ok) = after(end).await;
            assert_eq!(got, b"hello", "{end:?}");
            let kind = how.expect_err("a reset").kind();
            assert_eq!(kind, std::io::ErrorKind::ConnectionReset, "{end:?}");
            assert!(!ok);
        }
    }

    /// The END a service's stream sends when its local server's
    /// connection ends: cleanly, or reset.
    async fn service_end(reset_by_server: bool) -> EndReason {
        let (ours, server) = pair().await;
        let (stream, _data, mut cmds) = Stream::detached(7);
        if reset_by_server {
            server.set_zero_linger().unwrap();
        }
        drop(server);
        let _ = serve_bytes(ours, stream).await;
        // Bounded by the channel: the stream sent at most a few commands.
        while let Some(c) = cmds.recv().await {
            if let CircCmd::End(7, r) = c {
                return r;
            }
        }
        panic!("no END");
    }

    #[tokio::test]
    async fn a_service_stream_ends_with_why_its_server_connection_ended() {
        assert_eq!(service_end(false).await, EndReason::DONE);
        assert_eq!(service_end(true).await, EndReason::CONN_RESET);
    }

    /// While a send waits for room at the circuit (none is made here:
    /// nothing seals what was sent), what arrives still reaches the
    /// application, and the application is still read once room comes.
    #[tokio::test]
    async fn what_arrives_reaches_the_application_while_a_send_waits() {
        let (ours, mut app) = pair().await;
        let (stream, data, mut cmds) = Stream::detached(1);
        let room = stream.room();
        let shuttle = tokio::spawn(relay_or_reset(ours, stream));
        // More than the stream's room: the third chunk waits.
        let chunk = vec![7u8; 32 * 1024];
        for _ in 0..3 {
            app.write_all(&chunk).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        data.send((StreamData::Data(b"answer".to_vec()), 1))
            .unwrap();
        let mut got = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
            .await
            .expect("the answer, while the send waits")
            .unwrap();
        assert_eq!(&got, b"answer");
        // Everything the application wrote goes to the circuit once the
        // first chunks are sealed (as the circuit would: their room back).
        let mut sent = 0;
        while sent < 3 * chunk.len() {
            let c = tokio::time::timeout(Duration::from_secs(5), cmds.recv()).await;
            if let CircCmd::Data(1, d) = c.expect("the rest, once there is room").unwrap() {
                sent += d.len();
                room.add_permits(1);
            }
        }
        data.send((StreamData::End(EndReason::DONE), 0)).unwrap();
        assert!(shuttle.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_library_stream_that_broke_off_fails_its_last_read() {
        let (app, mut ours) = tokio::io::duplex(1024);
        let (mut app, broke) = AppStream::new(app);
        ours.write_all(b"hi").await.unwrap();
        broke.store(true, Ordering::Release);
        drop(ours);
        let mut got = [0u8; 2];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        let e = app.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
        // Without the flag, the end is a clean one.
        let (app, ours) = tokio::io::duplex(1024);
        let (mut app, _) = AppStream::new(app);
        drop(ours);
        assert_eq!(app.read(&mut [0u8; 8]).await.unwrap(), 0);
    }
}
