//! Accepting connections from peers that may be hostile.
//!
//! Every listener of a process (ORPort, SOCKS, HTTP CONNECT, directory
//! HTTP, metrics) takes its connections through [`accept`] and one shared
//! [`Gate`]:
//! - the gate admits at most [`Gate::max`] inbound connections at once,
//!   the process' file-descriptor limit less a reserve kept for the
//!   connections the process opens itself (links to relays, exit streams,
//!   directory fetches), so a flood of inbound connections cannot stop it
//!   from working;
//! - a connection is *idle* until its owner says it is [`Slot::busy`] (a
//!   finished handshake or request head); when the gate is full, or the
//!   process is out of descriptors, the oldest idle connection is shed to
//!   make room, so connections left half-open (slowloris) cannot keep new
//!   ones out; with none idle, the new connection is closed at once;
//! - an accept error backs off (10 ms, doubling to half a second) instead
//!   of spinning: out of descriptors, `accept` fails at once every time.
//!
//! It does **not** time connections out: each protocol states its own
//! handshake timeout, which closes idle connections in any case.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Descriptors kept back from inbound connections: at least this many, and
/// at least a quarter of the limit.
pub const RESERVE_MIN: usize = 64;

/// Admission of inbound connections, shared by the listeners of a process.
#[derive(Debug)]
pub struct Gate {
    max: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    next: u64,
    /// Admitted connections, idle or busy.
    open: usize,
    /// The idle ones, oldest first, each with what sheds it.
    idle: BTreeMap<u64, Arc<Notify>>,
}

fn lock(m: &Mutex<GateState>) -> std::sync::MutexGuard<'_, GateState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gate {
    /// A gate for at most `max` connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Gate {
            max: max.max(1),
            state: Mutex::new(GateState::default()),
        })
    }

    /// The process' gate, sized from its descriptor limit.
    pub fn process() -> Arc<Self> {
        static GATE: OnceLock<Arc<Gate>> = OnceLock::new();
        GATE.get_or_init(|| Gate::new(inbound_budget(fd_limit())))
            .clone()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections admitted and not yet closed.
    pub fn open(&self) -> usize {
        lock(&self.state).open
    }

    /// Admit one more connection, shedding the oldest idle one when full;
    /// `None` when full of busy connections.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut s = lock(&self.state);
        if s.open >= self.max && !shed_oldest(&mut s) {
            return None;
        }
        s.open += 1;
        s.next += 1;
        let id = s.next;
        let shed = Arc::new(Notify::new());
        s.idle.insert(id, shed.clone());
        Some(Slot {
            gate: self.clone(),
            id,
            shed,
        })
    }

    /// Shed the oldest idle connection; false if there is none.
    pub fn shed_oldest(&self) -> bool {
        shed_oldest(&mut lock(&self.state))
    }
}

fn shed_oldest(s: &mut GateState) -> bool {
    match s.idle.pop_first() {
        Some((_, n)) => {
            // Its place is freed when its owner drops the slot, promptly.
            n.notify_one();
            true
        }
        None => false,
    }
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    id: u64,
    shed: Arc<Notify>,
}

impl Slot {
    /// The connection does real work now: it is never shed.
    pub fn busy(&self) {
        lock(&self.gate.state).idle.remove(&self.id);
    }

    /// Resolves when the gate sheds this connection (never once busy).
    pub async fn shed(&self) {
        self.shed.notified().await
    }

    /// Run `f` until it ends or the connection is shed (`None`).
    pub async fn unless_shed<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            r = f => Some(r),
            () = self.shed() => None,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = lock(&self.gate.state);
        s.idle.remove(&self.id);
        s.open -= 1;
    }
}

/// Connections a listener of [`bind`] queues before they are accepted
/// (the kernel caps it at its `somaxconn`, 4,096 by default).
pub const BACKLOG: u32 = 4096;

/// Bind a listener at `addr` with a queue of [`BACKLOG`]. Tokio's default
/// of 1,024 overflowed when thousands of relays uploaded to an authority
/// at once, and a connection dropped from a full queue waits for the
/// kernel's retries (1, 3, 7 s on).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

/// The next admitted connection on `l`, with its place in `gate`.
pub async fn accept(l: &TcpListener, gate: &Arc<Gate>) -> (TcpStream, SocketAddr, Slot) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match l.accept().await {
            Ok((s, peer)) => {
                backoff = Duration::from_millis(10);
                match gate.admit() {
                    Some(slot) => return (s, peer, slot),
                    None => debug!("connection closed: {} busy connections", gate.max()),
                }
            }
            Err(e) => {
                if out_of_descriptors(&e) {
                    // Make room; the backoff lets the shed one close.
                    let shed = gate.shed_oldest();
                    warn!(shed, "accept: out of file descriptors");
                } else {
                    debug!("accept: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// This process (or the system) has no file descriptor left.
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE on Linux and the BSDs.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// A connection could not be made for want of something of this host's
/// own (descriptors, local ports, memory), not for anything the far end
/// did.
pub fn out_of_local_resources(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{AddrNotAvailable, OutOfMemory};
    out_of_descriptors(e) || matches!(e.kind(), AddrNotAvailable | OutOfMemory)
}

/// Inbound connections allowed under a descriptor limit of `limit`.
pub fn inbound_budget(limit: usize) -> usize {
    let reserve = RESERVE_MIN.max(limit / 4);
    limit.saturating_sub(reserve).max(16)
}

/// The soft limit on open files, from `/proc/self/limits` (Linux); 1024
/// where it cannot be read.
pub fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// How long an HTTP connection may take over each part of its request.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// From accepting the connection to the end of the request head.
    pub header: Duration,
    /// The whole connection, sending the answer included.
    pub lifetime: Duration,
}

/// Answer one HTTP/1.1 request on `sock` with `app`, then close: the head
/// must arrive within `limits.header` and the whole exchange end within
/// `limits.lifetime`. The connection may be shed until its head is in.
pub async fn serve_http(sock: TcpStream, slot: Slot, app: axum::Router, limits: HttpLimits) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slot = Arc::new(slot);
    let mark = slot.clone();
    // The head is in once the router sees the request.
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            mark.busy();
            next.run(req)
        },
    ));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .keep_alive(false)
        .serve_connection(TokioIo::new(sock), TowerToHyperService::new(app));
    match slot
        .unless_shed(tokio::time::timeout(limits.lifetime, conn))
        .await
    {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => debug!("HTTP connection: {e}"),
        Some(Err(_)) => debug!("HTTP connection closed: lifetime over"),
        None => debug!("HTTP connection shed to make room"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_keeps_a_reserve() {
        assert_eq!(inbound_budget(1024), 768);
        assert_eq!(inbound_budget(200), 136);
        assert_eq!(inbound_budget(10), 16);
        assert!(fd_limit() >= 16);
    }

    #[tokio::test]
    async fn a_full_gate_sheds_the_oldest_idle_connection() {
        let g = Gate::new(3);
        let a = g.admit().unwrap();
        let b = g.admit().unwrap();
        b.busy();
        let c = g.admit().unwrap();
        assert_eq!(g.open(), 3);
        // Full: the oldest idle (a, not the busy b) is told to go.
        let d = g.admit().unwrap();
        assert!(a.unless_shed(std::future::pending::<()>()).await.is_none());
        drop(a);
        assert_eq!(g.open(), 3);
        // Then c; with only busy ones left, a newcomer is refused.
        let e = g.admit().unwrap();
        drop(c);
        d.busy();
        e.busy();
        assert!(g.admit().is_none());
        drop(b);
        assert!(g.admit().is_some());
    }
}
