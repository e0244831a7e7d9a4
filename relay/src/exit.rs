//! Exit streams: resolve at the exit, check the exit policy, connect, and
//! shuttle bytes between the TCP connection and the circuit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use allium_proto::onion::BACKWARD_CAPACITY;
use allium_proto::policy::canonical;
use allium_proto::relaymsg::{EndReason, HEADER_LEN, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug};

use crate::RelayStats;
use crate::relay::RelayCtx;
use allium_link::limits::{CELL_BYTES, CircAcct};

/// How often a stream paused by a full relay looks again.
const FULL_RECHECK: Duration = Duration::from_millis(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to the target may make no progress.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most payload one backward DATA message carries.
pub const DATA_MAX: usize = BACKWARD_CAPACITY - HEADER_LEN;
/// The most a stream reads from its target at once.
const READ_CHUNK: usize = 32 * 1024;
/// Chunks a stream may have given its circuit and not yet seen sealed.
pub const SEND_ROOM: usize = 2;

/// The relay memory a chunk of `len` bytes stands for: the cells it fills.
pub fn chunk_bytes(len: usize) -> usize {
    len.div_ceil(DATA_MAX) * CELL_BYTES
}

/// From the circuit to a stream task: bytes from the client, and the DATA
/// cells they came in (counted against the relay's memory until written).
pub enum StreamCmd {
    Data(Vec<u8>, u32),
}

/// Which stream an event is about: its id, and which use of that id (a
/// client may reuse an id after END while the old task is still ending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub sid: u16,
    pub epoch: u64,
}

/// From a stream task to its circuit.
pub enum StreamEvent {
    /// Connected (to this address; none for a BEGIN_DIR stream).
    Connected(StreamKey, Option<IpAddr>),
    /// Bytes read from the target (counted against the relay's memory as
    /// [`chunk_bytes`] until the circuit has sealed them).
    Data(StreamKey, Vec<u8>),
    /// Forward DATA cells of this stream written to the target.
    Consumed(StreamKey, u32),
    End(StreamKey, EndReason),
    Resolved(StreamKey, Vec<IpAddr>),
}

/// What a circuit's exit streams share with it: its event queue and its
/// memory account.
///
/// The event queue is unbounded by type but not in fact: each stream has
/// at most [`SEND_ROOM`] chunks in it, one connect and one end, and the
/// streams are bounded by the circuit core.
pub struct CircShared {
    pub ev: mpsc::UnboundedSender<StreamEvent>,
    pub acct: Option<Arc<CircAcct>>,
}

impl CircShared {
    fn mem_full(&self) -> bool {
        self.acct.as_ref().is_some_and(|a| a.mem_full())
    }
}

/// A stream's forward queue; what is left in it when the stream ends is
/// taken off the circuit's memory account.
struct CmdRx {
    rx: mpsc::UnboundedReceiver<StreamCmd>,
    acct: Option<Arc<CircAcct>>,
}

impl Drop for CmdRx {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(StreamCmd::Data(_, cells)) = self.rx.try_recv() {
            if let Some(a) = &self.acct {
                a.sub(CELL_BYTES * cells as usize);
            }
        }
    }
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
        // Never the relay itself, whatever the policy says.
        .filter(|ip| {
            let me = canonical(*ip);
            ctx.policy.allows(*ip, port) && !ctx.own_ips.iter().any(|o| canonical(*o) == me)
        })
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
            Ok(Err(e)) => last = EndReason::for_io_error(&e),
            Err(_) => last = EndReason::TIMEOUT,
        }
    }
    Err(last)
}

/// What a stream task holds: its relay, its key, its circuit's shared
/// state, its room at the circuit (a permit for each chunk it may hand the
/// circuit before the circuit has sealed it) and its forward queue.
pub struct StreamTask {
    ctx: Arc<RelayCtx>,
    sid: StreamKey,
    circ: Arc<CircShared>,
    room: Arc<Semaphore>,
    cmds: CmdRx,
}

impl StreamTask {
    pub fn new(
        ctx: Arc<RelayCtx>,
        sid: StreamKey,
        circ: Arc<CircShared>,
        room: Arc<Semaphore>,
        cmds: mpsc::UnboundedReceiver<StreamCmd>,
    ) -> Self {
        let cmds = CmdRx {
            rx: cmds,
            acct: circ.acct.clone(),
        };
        StreamTask {
            ctx,
            sid,
            circ,
            room,
            cmds,
        }
    }
}

/// One exit stream, from BEGIN to END.
pub async fn run_stream(t: StreamTask, addr: TargetAddr, port: u16) {
    let (tcp, ip) = match connect(&t.ctx, &addr, port).await {
        Ok(x) => x,
        Err(reason) => {
            debug!(?reason, "exit connect failed");
            let _ = t.circ.ev.send(StreamEvent::End(t.sid, reason));
            return;
        }
    };
    if t.circ
        .ev
        .send(StreamEvent::Connected(t.sid, Some(ip)))
        .is_err()
    {
        return;
    }
    let (r, w) = tcp.into_split();
    shuttle(t, r, w, true).await;
}

/// A BEGIN_DIR stream: HTTP requests to this relay's consensus cache and
/// service descriptors ([`allium_directory::cache::serve_stream`]),
/// answered over the circuit.
pub async fn run_dir_stream(t: StreamTask) {
    if t.circ.ev.send(StreamEvent::Connected(t.sid, None)).is_err() {
        return;
    }
    let (ours, server) = tokio::io::duplex(READ_CHUNK);
    let cache = t.ctx.net.cache().clone();
    let services = t.ctx.net.services(t.ctx.identity_pub);
    tokio::spawn(allium_directory::cache::serve_stream(cache, services, server).in_current_span());
    let (r, w) = tokio::io::split(ours);
    shuttle(t, r, w, false).await;
}

/// The relay memory that what a stream took from its circuit stands for
/// until it is written to the target: given back then, or as it drops.
struct Unwritten<'a> {
    acct: Option<&'a CircAcct>,
    bytes: usize,
}

impl Unwritten<'_> {
    fn settle(&mut self) {
        if let Some(a) = self.acct {
            a.sub(std::mem::take(&mut self.bytes));
        }
    }
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Carry bytes between a stream's far end (`r`, `w`) and its circuit until
/// either ends; `exit` counts what is written as exit traffic. Each
/// direction moves on its own: a target that answers as it reads (an
/// echo) is read while a write to it waits, or neither would move again.
async fn shuttle<R, W>(t: StreamTask, mut r: R, mut w: W, exit: bool)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let StreamTask {
        ctx,
        sid,
        circ,
        room,
        mut cmds,
    } = t;
    // From the client, written up to `written`: it came in `cells` DATA
    // cells, counted against the relay's memory until written.
    let mut out: Vec<u8> = Vec::new();
    let mut written = 0;
    let mut cells = 0;
    let mut unwritten = Unwritten {
        acct: circ.acct.as_deref(),
        bytes: 0,
    };
    // When a write to the target last made progress.
    let mut wrote_at = tokio::time::Instant::now();
    let mut chunk: Vec<u8> = Vec::new();
    // Holding a permit: room for one more chunk at the circuit.
    let mut permit = false;
    loop {
        let full = circ.mem_full();
        let writing = written < out.len();
        tokio::select! {
            p = room.acquire(), if !permit => match p {
                Ok(p) => {
                    p.forget();
                    permit = true;
                    chunk.reserve_exact(READ_CHUNK);
                }
                Err(_) => return,
            },
            // While the relay's queues are full, the exit stops reading.
            () = tokio::time::sleep(FULL_RECHECK), if permit && full => {}
            n = r.read_buf(&mut chunk), if permit && !full => match n {
                Ok(0) => {
                    // What the client sent still goes (a target may stop
                    // sending before it stops reading).
                    let rest = tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&out[written..]));
                    let reason = match rest.await {
                        Ok(Ok(())) => EndReason::DONE,
                        Ok(Err(e)) => EndReason::for_io_error(&e),
                        Err(_) => EndReason::TIMEOUT,
                    };
                    let _ = circ.ev.send(StreamEvent::End(sid, reason));
                    return;
                }
                Ok(_) => {
                    permit = false;
                    let bytes = chunk_bytes(chunk.len());
                    if let Some(a) = &circ.acct {
                        a.add(bytes);
                    }
                    if circ.ev.send(StreamEvent::Data(sid, std::mem::take(&mut chunk))).is_err() {
                        if let Some(a) = &circ.acct {
                            a.sub(bytes);
                        }
                        return;
                    }
                }
                Err(e) => {
                    let _ = circ.ev.send(StreamEvent::End(sid, EndReason::for_io_error(&e)));
                    return;
                }
            },
            c = cmds.rx.recv(), if !writing => match c {
                Some(StreamCmd::Data(d, n)) => {
                    // Write what is queued in one go.
                    cells = n;
                    out.clear();
                    written = 0;
                    out.extend_from_slice(&d);
                    while out.len() < 60 * 1024 {
                        match cmds.rx.try_recv() {
                            Ok(StreamCmd::Data(d, n)) => {
                                out.extend_from_slice(&d);
                                cells += n;
                            }
                            Err(_) => break,
                        }
                    }
                    if exit {
                        RelayStats::inc(&ctx.stats.exit_bytes, out.len() as u64);
                    }
                    unwritten.bytes = CELL_BYTES * cells as usize;
                    wrote_at = tokio::time::Instant::now();
                }
                None => return,
            },
            n = w.write(&out[written..]), if writing => {
                let reason = match n {
                    Ok(0) => Some(EndReason::for_io_error(&std::io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        written += n;
                        wrote_at = tokio::time::Instant::now();
                        None
                    }
                    Err(e) => Some(EndReason::for_io_error(&e)),
                };
                if let Some(reason) = reason {
                    let _ = circ.ev.send(StreamEvent::End(sid, reason));
                    return;
                }
                if written == out.len() {
                    unwritten.settle();
                    if circ.ev.send(StreamEvent::Consumed(sid, cells)).is_err() {
                        return;
                    }
                }
            }
            // A target that takes nothing for this long is gone.
            () = tokio::time::sleep_until(wrote_at + WRITE_TIMEOUT), if writing => {
                let _ = circ.ev.send(StreamEvent::End(sid, EndReason::TIMEOUT));
                return;
            }
        }
    }
}
