//! Link shaping for test networks: every byte a link sends leaves a fixed
//! time after it was written (a one-way delay), optionally paced at a rate,
//! so that distance can be studied on one machine (these machines have no
//! `netem`). Both ends of a link delay what they send, so each direction
//! of a link is delayed once.
//!
//! It is off unless a test network turns it on ([`set`]: `allium testnet`
//! and `allium bench` with `--link-delay`, which pass it to the processes
//! they start through [`ENV`]). Off, it costs one atomic load per link
//! set up and nothing per byte. On, each link's socket is replaced by one
//! end of a loopback TCP pair whose other end a pump task forwards to the
//! real socket: order is kept, the incoming direction is passed on as it
//! arrives, and at most twice [`MAX_CHUNKS`] writes wait in each link's
//! delay line before the link's own writes block. A process that takes
//! shaping from [`ENV`] says so in its log.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The environment variable a test network passes shaping in:
/// `DELAY_MS` or `DELAY_MS,RATE_BYTES_PER_SEC`.
pub const ENV: &str = "ALLIUM_TEST_LINK_SHAPING";

/// Writes held in one link's delay line at most (each up to 64 KiB).
pub const MAX_CHUNKS: usize = 1024;

const CHUNK: usize = 64 * 1024;

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

/// The socket a link should use for `s`: `s` itself unless shaping is on.
pub(crate) async fn wrap(s: TcpStream) -> std::io::Result<TcpStream> {
    let Some(shaping) = current() else {
        return Ok(s);
    };
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let (inner, pump_end) = tokio::join!(TcpStream::connect(l.local_addr()?), l.accept());
    let (inner, (pump_end, from)) = (inner?, pump_end?);
    if from != inner.local_addr()? {
        return Err(std::io::Error::other(
            "another process took the link's delay line",
        ));
    }
    inner.set_nodelay(true)?;
    pump_end.set_nodelay(true)?;
    tokio::spawn(pump(pump_end, s, shaping));
    Ok(inner)
}

/// How long the far end may keep sending once the link has closed its
/// side and everything it sent has left.
const LINGER: Duration = Duration::from_secs(5);

/// Forward between the link's end of the pair and the real socket until
/// both directions are done (or the link's side is, and [`LINGER`] has
/// passed).
async fn pump(local: TcpStream, remote: TcpStream, shaping: Shaping) {
    let (mut local_rd, mut local_wr) = local.into_split();
    let (mut remote_rd, mut remote_wr) = remote.into_split();
    let incoming = async move {
        let _ = tokio::io::copy(&mut remote_rd, &mut local_wr).await;
        let _ = local_wr.shutdown().await;
    };
    // At most MAX_CHUNKS writes wait in the channel and as many in the
    // line: when both are full, the link's writes block, as on a real
    // socket whose peer is slow.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(MAX_CHUNKS);
    let take = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match local_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + shaping.delay;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let send = async move {
        // When the link is next free to send, at the rate if there is one.
        let mut free = Instant::now();
        let mut line: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        let mut batch = Vec::new();
        // With a rate, bytes leave a millisecond's worth at a time.
        let quantum = shaping
            .rate
            .map_or(CHUNK, |r| ((r / 1000) as usize).clamp(1, CHUNK));
        'run: loop {
            if line.is_empty() {
                match rx.recv().await {
                    Some(c) => line.push_back(c),
                    None => break,
                }
            }
            while line.len() < MAX_CHUNKS
                && let Ok(c) = rx.try_recv()
            {
                line.push_back(c);
            }
            let Some(&(due, _)) = line.front() else {
                continue;
            };
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
                continue;
            }
            // Everything due by now leaves together.
            let now = Instant::now();
            batch.clear();
            while let Some((due, b)) = line.front() {
                if *due > now || (!batch.is_empty() && batch.len() + b.len() > CHUNK) {
                    break;
                }
                if let Some((_, b)) = line.pop_front() {
                    batch.extend_from_slice(&b);
                }
            }
            for piece in batch.chunks(quantum) {
                if let Some(rate) = shaping.rate {
                    free = free.max(now);
                    if free > Instant::now() {
                        tokio::time::sleep_until(free).await;
                    }
                    free += Duration::from_secs_f64(piece.len() as f64 / rate as f64);
                }
                if remote_wr.write_all(piece).await.is_err() {
                    break 'run;
                }
            }
        }
        // Dropping `rx` here unblocks `take` if the far end failed.
        drop(rx);
        let _ = remote_wr.shutdown().await;
    };
    let outgoing = async {
        tokio::join!(take, send);
        tokio::time::sleep(LINGER).await;
    };
    tokio::pin!(incoming, outgoing);
    tokio::select! {
        () = &mut incoming => outgoing.await,
        () = &mut outgoing => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn what_is_sent_arrives_late_in_order_and_paced() {
        let (link_end, pump_end) = pair().await;
        let (real, mut far) = pair().await;
        let delay = Duration::from_millis(300);
        tokio::spawn(pump(
            pump_end,
            real,
            Shaping {
                delay,
                rate: Some(1_000_000),
            },
        ));
        let (mut rd, mut wr) = link_end.into_split();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let t0 = Instant::now();
        wr.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        far.read_exact(&mut got[..1]).await.unwrap();
        let first = t0.elapsed();
        far.read_exact(&mut got[1..]).await.unwrap();
        let last = t0.elapsed();
        assert_eq!(got, data, "bytes changed or reordered");
        assert!(first >= delay, "first byte after {first:?}");
        // At 1 MB/s, all but the last write take their time on the link.
        assert!(
            last >= delay + Duration::from_millis(130),
            "last byte after {last:?}"
        );
        // What comes back is not delayed by this end.
        let t1 = Instant::now();
        far.write_all(b"back").await.unwrap();
        let mut b = [0u8; 4];
        rd.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"back");
        assert!(t1.elapsed() < delay, "the incoming side was delayed");
        // Closing the link's end closes the far end, after the data.
        drop(wr);
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
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
