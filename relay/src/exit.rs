//! Exit streams: resolve at the exit, check the exit policy, connect, and
//! shuttle bytes between the TCP connection and the circuit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use allium_proto::flow::{CIRC_INCREMENT, SENDME_CELL_RANDOM, STREAM_WINDOW};
use allium_proto::onion::BACKWARD_CAPACITY;
use allium_proto::relaymsg::{EndReason, HEADER_LEN, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit, mpsc};
use tracing::debug;

use crate::RelayStats;
use crate::relay::RelayCtx;
use allium_link::limits::{CELL_BYTES, CircAcct};

/// Forward DATA cells queued toward one stream: its whole window, so an
/// honest client never finds it full (one that does loses the circuit).
pub const STREAM_QUEUE: usize = STREAM_WINDOW as usize + 8;
/// How often a stream paused by a full relay looks again.
const FULL_RECHECK: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most payload one backward DATA message carries.
pub const DATA_MAX: usize = BACKWARD_CAPACITY - HEADER_LEN;

/// From the circuit to a stream task.
pub enum StreamCmd {
    Data(Vec<u8>),
}

/// From a stream task to its circuit.
pub enum StreamEvent {
    Connected(u16, IpAddr),
    /// Bytes read from the target. `acked`: this is a DATA cell whose tag a
    /// circuit SENDME will carry, so its padding is to be random.
    Data {
        sid: u16,
        data: Vec<u8>,
        acked: bool,
    },
    /// Forward DATA cells of this stream written to the target.
    Consumed(u16, u32),
    End(u16, EndReason),
    Resolved(u16, Vec<IpAddr>),
}

/// What a circuit's exit streams share with it: the backward circuit
/// window, the numbering of backward DATA cells, and the event queue.
///
/// The event queue is unbounded by type but not in fact: DATA events are
/// bounded by the circuit window (a stream task holds permits before it
/// queues one), the rest by the stream limit.
pub struct CircShared {
    pub window: Semaphore,
    seq: Mutex<u64>,
    pub ev: mpsc::UnboundedSender<StreamEvent>,
    pub acct: Option<Arc<CircAcct>>,
}

impl CircShared {
    pub fn new(
        window: u32,
        ev: mpsc::UnboundedSender<StreamEvent>,
        acct: Option<Arc<CircAcct>>,
    ) -> Self {
        CircShared {
            window: Semaphore::new(window as usize),
            seq: Mutex::new(0),
            ev,
            acct,
        }
    }

    fn mem_full(&self) -> bool {
        self.acct.as_ref().is_some_and(|a| a.mem_full())
    }

    /// Queue one backward DATA cell from `pending` (the caller holds a
    /// stream and a circuit permit). The cell that completes a hundred keeps
    /// [`SENDME_CELL_RANDOM`] bytes free for random padding; what does not
    /// fit stays in `pending`.
    fn send_data(&self, sid: u16, pending: &mut Vec<u8>) -> bool {
        let mut seq = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *seq += 1;
        let acked = (*seq).is_multiple_of(CIRC_INCREMENT as u64);
        let max = if acked {
            DATA_MAX - SENDME_CELL_RANDOM
        } else {
            DATA_MAX
        };
        let n = pending.len().min(max);
        let data: Vec<u8> = pending.drain(..n).collect();
        if let Some(a) = &self.acct {
            a.add(CELL_BYTES);
        }
        self.ev.send(StreamEvent::Data { sid, data, acked }).is_ok()
    }
}

/// A stream's forward queue; what is left in it when the stream ends is
/// taken off the circuit's memory account.
struct CmdRx {
    rx: mpsc::Receiver<StreamCmd>,
    acct: Option<Arc<CircAcct>>,
}

impl Drop for CmdRx {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(StreamCmd::Data(_)) = self.rx.try_recv() {
            if let Some(a) = &self.acct {
                a.sub(CELL_BYTES);
            }
        }
    }
}

async fn acquire2<'a>(
    a: &'a Semaphore,
    b: &'a Semaphore,
) -> Option<(SemaphorePermit<'a>, SemaphorePermit<'a>)> {
    let x = a.acquire().await.ok()?;
    let y = b.acquire().await.ok()?;
    Some((x, y))
}

/// Resolve a hostname at the exit. `localhost` is loopback (RFC 6761).
pub async fn resolve(ctx: &RelayCtx, host: &str) -> Result<Vec<IpAddr>, EndReason> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
    }
    let r = ctx.resolver.as_ref().ok_or(EndReason::RESOLVE_FAILED)?;
    match tokio::time::timeout(RESOLVE_TIMEOUT, r.lookup_ip(host)).await {
        Ok(Ok(l)) => {
            let v: Vec<IpAddr> = l.iter().collect();
            if v.is_empty() {
                Err(EndReason::RESOLVE_FAILED)
            } else {
                Ok(v)
            }
        }
        Ok(Err(_)) => Err(EndReason::RESOLVE_FAILED),
        Err(_) => Err(EndReason::TIMEOUT),
    }
}

fn end_reason(e: &std::io::Error) -> EndReason {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => EndReason::CONNECT_REFUSED,
        TimedOut => EndReason::TIMEOUT,
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => EndReason::NO_ROUTE,
        ConnectionReset => EndReason::CONN_RESET,
        _ => EndReason::MISC,
    }
}

async fn connect(
    ctx: &RelayCtx,
    addr: &TargetAddr,
    port: u16,
) -> Result<(TcpStream, IpAddr), EndReason> {
    let candidates = match addr {
        TargetAddr::Ip(ip) => vec![*ip],
        TargetAddr::Host(h) => resolve(ctx, h).await?,
    };
    let allowed: Vec<IpAddr> = candidates
        .into_iter()
        .filter(|ip| ctx.policy.allows(*ip, port))
        .collect();
    if allowed.is_empty() {
        return Err(EndReason::EXIT_POLICY);
    }
    let mut last = EndReason::MISC;
    for ip in allowed.into_iter().take(3) {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(SocketAddr::new(ip, port)),
        )
        .await
        {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, ip));
            }
            Ok(Err(e)) => last = end_reason(&e),
            Err(_) => last = EndReason::TIMEOUT,
        }
    }
    Err(last)
}

/// One exit stream, from BEGIN to END. `window` is the stream's backward
/// window (permits added by the client's stream SENDMEs).
pub async fn run_stream(
    ctx: Arc<RelayCtx>,
    sid: u16,
    addr: TargetAddr,
    port: u16,
    circ: Arc<CircShared>,
    window: Arc<Semaphore>,
    cmds: mpsc::Receiver<StreamCmd>,
) {
    let mut cmds = CmdRx {
        rx: cmds,
        acct: circ.acct.clone(),
    };
    let (tcp, ip) = match connect(&ctx, &addr, port).await {
        Ok(x) => x,
        Err(reason) => {
            debug!(?reason, "exit connect failed");
            let _ = circ.ev.send(StreamEvent::End(sid, reason));
            return;
        }
    };
    if circ.ev.send(StreamEvent::Connected(sid, ip)).is_err() {
        return;
    }
    let (r, mut w) = tcp.into_split();
    // Big reads from the socket, cell-sized pieces from the buffer.
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut buf = vec![0u8; DATA_MAX];
    let mut pending: Vec<u8> = Vec::with_capacity(DATA_MAX);
    let mut eof = false;
    loop {
        if eof && pending.is_empty() {
            let _ = circ.ev.send(StreamEvent::End(sid, EndReason::DONE));
            return;
        }
        let room = DATA_MAX - pending.len();
        tokio::select! {
            n = r.read(&mut buf[..room]), if !eof && room > 0 => match n {
                Ok(0) => eof = true,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) => {
                    let _ = circ.ev.send(StreamEvent::End(sid, end_reason(&e)));
                    return;
                }
            },
            // While the relay's queues are full, the exit stops reading.
            () = tokio::time::sleep(FULL_RECHECK), if !pending.is_empty() && circ.mem_full() => {}
            p = acquire2(&window, &circ.window), if !pending.is_empty() && !circ.mem_full() => {
                let Some((a, b)) = p else { return };
                a.forget();
                b.forget();
                if !circ.send_data(sid, &mut pending) {
                    return;
                }
            },
            c = cmds.rx.recv() => match c {
                Some(StreamCmd::Data(d)) => {
                    // Write what is queued in one go.
                    out.clear();
                    out.extend_from_slice(&d);
                    let mut cells = 1u32;
                    while out.len() < 60 * 1024 {
                        match cmds.rx.try_recv() {
                            Ok(StreamCmd::Data(d)) => {
                                out.extend_from_slice(&d);
                                cells += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    RelayStats::inc(&ctx.stats.exit_bytes, out.len() as u64);
                    let res = w.write_all(&out).await;
                    if let Some(a) = &circ.acct {
                        a.sub(CELL_BYTES * cells as usize);
                    }
                    if let Err(e) = res {
                        let _ = circ.ev.send(StreamEvent::End(sid, end_reason(&e)));
                        return;
                    }
                    if circ.ev.send(StreamEvent::Consumed(sid, cells)).is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}
