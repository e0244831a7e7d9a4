//! Link shaping for test networks: every byte a link sends leaves a fixed
//! time after it was written (a one-way delay), optionally paced at a rate,
//! so that distance can be studied on one machine (these machines have no
//! `netem`). Both ends of a link delay what they send, so each direction
//! of a link is delayed once.
//!
//! It is off unless a test network turns it on ([`set`]: `allium testnet`
//! and `allium bench` with `--link-delay`, which pass it to the processes
//! they start through [`ENV`]). Off, it costs one lock per link set up
//! and nothing per byte. On, what a link writes goes into a delay
//! line in the process (each write copied once, with the time it is due)
//! and a task writes it to the socket when it is due, in order; at most
//! [`MAX_LINE`] bytes wait in a line before the link's own writes block, as
//! on a socket whose peer is slow. What arrives is read from the socket
//! as it comes. A process that takes shaping from [`ENV`] says so in its
//! log.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The environment variable a test network passes shaping in:
/// `DELAY_MS` or `DELAY_MS,RATE_BYTES_PER_SEC`.
pub const ENV: &str = "ALLIUM_TEST_LINK_SHAPING";

/// Bytes that wait in one link's delay line at most: 640 MB/s at 50 ms.
pub const MAX_LINE: usize = 32 << 20;

/// Bytes one write puts in the line, at most (a larger one is taken in
/// parts, as a socket takes what fits).
const CHUNK: usize = 256 * 1024;

/// How long the socket may refuse what is due before the line gives up
/// (a peer that reads nothing), as a channel's own write timeout.
const STALL: Duration = crate::channel::WRITE_TIMEOUT;

/// What every link of this process does to what it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shaping {
    /// One-way delay added to each byte sent.
    pub delay: Duration,
    /// Bytes per second each link sends at most, if limited.
    pub rate: Option<u64>,
}

impl Shaping {
    /// Parse the [`ENV`] form.
    pub fn parse(s: &str) -> Option<Shaping> {
        let mut parts = s.split(',');
        let ms: u64 = parts.next()?.trim().parse().ok()?;
        // A test network's delay: at most ten seconds.
        let delay = Duration::from_millis(ms).min(Duration::from_secs(10));
        let rate = match parts.next() {
            Some(r) => Some(r.trim().parse().ok().filter(|&r: &u64| r > 0)?),
            None => None,
        };
        parts.next().is_none().then_some(Shaping { delay, rate })
    }

    /// The [`ENV`] form.
    pub fn to_env(&self) -> String {
        match self.rate {
            Some(r) => format!("{},{r}", self.delay.as_millis()),
            None => self.delay.as_millis().to_string(),
        }
    }
}

static SHAPING: Mutex<Option<Shaping>> = Mutex::new(None);

/// Shape every link this process sets up from now on (`None`: none).
pub fn set(s: Option<Shaping>) {
    *SHAPING.lock().unwrap_or_else(|p| p.into_inner()) = s;
}

/// Shaping from [`ENV`], if it is set; an error if it is set but malformed.
pub fn from_env() -> Result<Option<Shaping>, String> {
    match std::env::var(ENV) {
        Ok(v) => Shaping::parse(&v)
            .map(Some)
            .ok_or_else(|| format!("{ENV}={v:?}: expected DELAY_MS or DELAY_MS,RATE")),
        Err(_) => Ok(None),
    }
}

fn current() -> Option<Shaping> {
    *SHAPING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The socket of a link: a TCP stream whose writes go through a delay
/// line when shaping is on.
pub struct LinkSocket {
    rd: OwnedReadHalf,
    wr: LinkWriter,
}

/// The sending side of a [`LinkSocket`].
pub enum LinkWriter {
    Direct(OwnedWriteHalf),
    Delayed(DelayLine),
}

impl LinkSocket {
    /// The socket a link should use for `s`: `s` itself unless shaping is
    /// on.
    pub fn new(s: TcpStream) -> LinkSocket {
        Self::shaped(s, current())
    }

    fn shaped(s: TcpStream, shaping: Option<Shaping>) -> LinkSocket {
        let (rd, wr) = s.into_split();
        let wr = match shaping {
            None => LinkWriter::Direct(wr),
            Some(shaping) => LinkWriter::Delayed(DelayLine::start(wr, shaping)),
        };
        LinkSocket { rd, wr }
    }

    /// Both sides, to read and write at once.
    pub fn split(&mut self) -> (&mut OwnedReadHalf, &mut LinkWriter) {
        (&mut self.rd, &mut self.wr)
    }
}

impl AsyncRead for LinkSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.rd).poll_read(cx, buf)
    }
}

impl AsyncWrite for LinkSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.wr).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.wr).poll_shutdown(cx)
    }
}

impl AsyncWrite for LinkWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWriter::Direct(w) => Pin::new(w).poll_write(cx, buf),
            LinkWriter::Delayed(d) => d.poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWriter::Direct(w) => Pin::new(w).poll_flush(cx),
            // What is in the line is as good as in a socket's buffer.
            LinkWriter::Delayed(_) => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWriter::Direct(w) => Pin::new(w).poll_shutdown(cx),
            LinkWriter::Delayed(d) => {
                d.close();
                Poll::Ready(Ok(()))
            }
        }
    }
}

/// The writes of one link waiting for their time, shared with the task
/// that sends them.
#[derive(Default)]
struct Line {
    /// Each write and when it is due, in order.
    q: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    /// The link will write no more: send what is left, then shut down.
    closed: bool,
    /// The socket failed or stalled: writes fail.
    failed: bool,
    /// The link, waiting for room.
    writer: Option<Waker>,
}

/// A link's delay line: writes wait here until they are due.
pub struct DelayLine {
    line: Arc<(Mutex<Line>, Notify)>,
    delay: Duration,
}

impl DelayLine {
    /// A line in front of `wr`, and the task that empties it.
    fn start(wr: OwnedWriteHalf, shaping: Shaping) -> DelayLine {
        let line = Arc::new((Mutex::new(Line::default()), Notify::new()));
        tokio::spawn(send(line.clone(), wr, shaping));
        DelayLine {
            line,
            delay: shaping.delay,
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let (line, wake) = &*self.line;
        let mut l = line.lock().unwrap_or_else(|p| p.into_inner());
        if l.failed || l.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if l.bytes >= MAX_LINE {
            l.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(CHUNK);
        l.q.push_back((Instant::now() + self.delay, buf[..n].to_vec()));
        l.bytes += n;
        if l.q.len() == 1 {
            wake.notify_one();
        }
        Poll::Ready(Ok(n))
    }

    fn close(&self) {
        let (line, wake) = &*self.line;
        line.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        wake.notify_one();
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.close();
    }
}

/// Write each write of the line to the socket when it is due, at the rate
/// if there is one; shut the socket's sending side down once the link has
/// closed and everything has left.
async fn send(line: Arc<(Mutex<Line>, Notify)>, mut wr: OwnedWriteHalf, shaping: Shaping) {
    let (shared, wake) = &*line;
    // When the link is next free to send, at the rate if there is one.
    let mut free = Instant::now();
    // With a rate, bytes leave a millisecond's worth at a time.
    let quantum = shaping
        .rate
        .map_or(CHUNK, |r| ((r / 1000) as usize).clamp(1, CHUNK));
    loop {
        let next = {
            let mut l = shared.lock().unwrap_or_else(|p| p.into_inner());
            let next = l.q.pop_front();
            if let Some((_, b)) = &next {
                l.bytes -= b.len();
                if let Some(w) = l.writer.take() {
                    w.wake();
                }
            } else if l.closed {
                break;
            }
            next
        };
        let Some((due, b)) = next else {
            wake.notified().await;
            continue;
        };
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        // Each write leaves as it was written, as it would without a line.
        for piece in b.chunks(quantum) {
            if let Some(rate) = shaping.rate {
                let now = Instant::now();
                if free > now {
                    tokio::time::sleep_until(free).await;
                } else {
                    free = now;
                }
                free += Duration::from_secs_f64(piece.len() as f64 / rate as f64);
            }
            match tokio::time::timeout(STALL, wr.write_all(piece)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let mut l = shared.lock().unwrap_or_else(|p| p.into_inner());
                    l.failed = true;
                    l.q.clear();
                    l.bytes = 0;
                    if let Some(w) = l.writer.take() {
                        w.wake();
                    }
                    return;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn what_is_sent_arrives_late_in_order_and_paced() {
        let (real, mut far) = pair().await;
        let delay = Duration::from_millis(300);
        let shaping = Shaping {
            delay,
            rate: Some(1_000_000),
        };
        let mut link = LinkSocket::shaped(real, Some(shaping));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let t0 = Instant::now();
        link.write_all(&data).await.unwrap();
        assert!(t0.elapsed() < delay, "the write waited for the line");
        let mut got = vec![0u8; data.len()];
        far.read_exact(&mut got[..1]).await.unwrap();
        let first = t0.elapsed();
        far.read_exact(&mut got[1..]).await.unwrap();
        let last = t0.elapsed();
        assert_eq!(got, data, "bytes changed or reordered");
        assert!(first >= delay, "first byte after {first:?}");
        // At 1 MB/s, all but the first millisecond's bytes take their
        // time on the link.
        assert!(
            last >= delay + Duration::from_millis(190),
            "last byte after {last:?}"
        );
        // What comes back is not delayed by this end.
        let t1 = Instant::now();
        far.write_all(b"back").await.unwrap();
        let mut b = [0u8; 4];
        link.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"back");
        assert!(t1.elapsed() < delay, "the incoming side was delayed");
        // Closing the link closes the far end, after the data.
        link.write_all(b"last").await.unwrap();
        drop(link);
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");
    }

    /// A full line blocks the link's writes until the peer takes bytes,
    /// and a peer that never reads fails the link's writes in the end.
    #[tokio::test(start_paused = true)]
    async fn a_full_line_blocks_and_a_stalled_peer_fails_it() {
        let (real, far) = pair().await;
        let shaping = Shaping {
            delay: Duration::from_millis(10),
            rate: None,
        };
        let mut link = LinkSocket::shaped(real, Some(shaping));
        let chunk = vec![7u8; CHUNK];
        let mut written = 0usize;
        let r = tokio::time::timeout(STALL * 3, async {
            loop {
                link.write_all(&chunk).await?;
                written += chunk.len();
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        })
        .await;
        let e = r.expect("the writes failed in time").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        // The line and the socket's buffers, not more.
        assert!(written >= MAX_LINE, "{written}");
        assert!(written < MAX_LINE + (64 << 20), "{written}");
        drop(far);
    }

    #[test]
    fn the_environment_form_round_trips() {
        let s = Shaping {
            delay: Duration::from_millis(20),
            rate: Some(5_000_000),
        };
        assert_eq!(Shaping::parse(&s.to_env()), Some(s));
        assert_eq!(
            Shaping::parse("50"),
            Some(Shaping {
                delay: Duration::from_millis(50),
                rate: None
            })
        );
        for bad in ["", "x", "20,", "20,0", "20,5,6", "-1"] {
            assert_eq!(Shaping::parse(bad), None, "{bad:?}");
        }
    }
}
