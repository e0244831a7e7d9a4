//! Channels: one Noise link to one peer, driven by one owner task.
//!
//! The task owns the socket, the link transport and the map from circuit
//! id to circuit inbox. Frames are opened where they were read and sealed
//! where their cells were encoded (`LinkTransport` works in place); cells go
//! to circuits with `try_send`, so the task never waits on a circuit: a
//! circuit whose inbox is full has ignored flow control and is destroyed.
//!
//! What keeps a channel bounded whatever the peer does:
//! * every queue has a size: circuit inboxes ([`CIRC_QUEUE`]), each
//!   circuit's cells waiting to be written ([`CIRC_OUT_QUEUE`]), the
//!   DESTROYs answered to the peer ([`URGENT_MAX`]), the sealed bytes not
//!   yet written ([`OUT_HIGH`]);
//! * a peer that makes us queue DESTROYs faster than it reads them is not
//!   read from until it takes them, and one that has not read for
//!   [`WRITE_TIMEOUT`] while we had bytes for it loses its link (reading is
//!   not paused for a slow reader otherwise: two relays that each waited
//!   for the other to read could stall a busy link both ways);
//! * the buffers of a channel that has been idle for [`IDLE_SHRINK`] are
//!   given back, so an idle channel costs a few kilobytes.
//!
//! Cells waiting to be written wait per circuit, and each frame is filled
//! from the circuits that have sent least of late ([`crate::sched`]): a
//! small fetch is not queued behind bulk downloads on the same link. On a
//! relay with a write rate, cells are sealed only once the rate grants
//! them (sealed cells leave in order), and the cells of circuits that
//! have sent little of late do not wait for the next grant.
//!
//! Circuit ids: the side that opened the link allocates ids with the high
//! bit set, the other side without it; 0 is never used.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use allium_proto::cell::{CELL_LEN, Cell, CellCmd, CircId, DestroyReason};
use allium_proto::link::{
    self, Action, Initiator, LinkKeys, LinkTransport, MAX_CELLS_PER_FRAME, MAX_FRAME,
    MIN_TRANSPORT_MSG, Responder,
};
use allium_proto::{LinkKey, RelayId};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, trace};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::limits::{CircAcct, ConnGuard, QUIET_MAX, QueueMem, TokenBucket};
use crate::sched::Sched;
use crate::shaping::LinkSocket;
use crate::{LinkError, RelayStats};

/// Cells queued toward one circuit. Flow control keeps an honest peer
/// below this (the largest circuit window of DATA plus control cells); a
/// peer that fills it has ignored its window and loses the circuit, so one
/// circuit can never stall its channel. (Congestion control keeps what an
/// honest circuit queues at one relay to a few hundred cells; the memory
/// cap bounds all circuits together.)
pub const CIRC_QUEUE: usize = allium_proto::flow::CWND_MAX as usize + 1536;
/// The most cells one hand-off to a channel carries.
pub const BATCH_MAX: usize = MAX_CELLS_PER_FRAME;
/// Cells one circuit may have waiting to be written to one channel; its
/// sender waits while they are this many. (Four frames: enough to keep a
/// link busy, few enough that a circuit feels its next hop's pace.)
pub const CIRC_OUT_QUEUE: usize = 4 * BATCH_MAX;
/// DESTROYs queued in answer to the peer; at this many the peer is not
/// read from until it takes them.
pub const URGENT_MAX: usize = 1024;
/// Sealed bytes a channel holds for writing before it stops sealing more.
pub const OUT_HIGH: usize = 128 * 1024;
/// The most a channel on a relay with a write rate seals at once: a
/// millisecond of the rate, at least this.
pub const OUT_HIGH_LIMITED: usize = 16 * 1024;
/// Under a write rate, cells of a circuit that has sent fewer than this many
/// of late (decayed as its priority is, [`crate::sched`]) are not held
/// back for the next grant: a page fetch or a request goes ahead of the
/// bulk downloads on the same link.
pub const QUIET_CELLS: f64 = 1024.0;
/// Bytes a frame adds to its cells: its length and its tag.
const FRAME_OVERHEAD: usize = 2 + allium_proto::aead::TAG_LEN;
/// A peer that has not read anything for this long loses its link.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle channel gives back its buffers after this long.
pub const IDLE_SHRINK: Duration = Duration::from_secs(1);
/// How often a channel looks at its write timeout and idleness.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// A relay's links without circuits close after this (and up to half as
/// long again; [`ChannelEnv::idle_close`]), as Tor closes its channels
/// that carry no circuits after a few minutes.
pub const IDLE_CLOSE: Duration = Duration::from_secs(180);
/// Circuits one channel may carry; further CREATEs are refused.
pub const MAX_CIRCUITS_PER_CHANNEL: usize = 8192;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Output buffer capacity an idle channel keeps (its input buffer keeps
/// [`READ_SMALL`] for the next read).
const IDLE_BUF: usize = 2 * 1024;
/// Room made for a read: small on a quiet link, large on a busy one (whose
/// last read filled the room it had).
const READ_SMALL: usize = 16 * 1024;
const READ_BIG: usize = 128 * 1024;

/// A new circuit a peer asked for with CREATE.
pub struct NewCircuit {
    pub circ_id: CircId,
    pub create: Cell,
    pub inbox: Inbox,
    pub chan: ChannelHandle,
}

pub type CreateHandler = Arc<dyn Fn(NewCircuit) + Send + Sync>;

/// A circuit's inbound cells, counted against the relay's memory cap. They
/// arrive in batches: the cells of one frame for one circuit.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Vec<Cell>>,
    /// Cells in `rx`; the channel refuses to queue past [`CIRC_QUEUE`].
    queued: Arc<AtomicUsize>,
    acct: Option<Arc<CircAcct>>,
    /// Taken from `rx`, not yet returned by [`Inbox::recv`].
    taken: VecDeque<Cell>,
}

impl Inbox {
    fn new(acct: Option<Arc<CircAcct>>) -> (Self, CircEntry) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let entry = CircEntry {
            tx,
            queued: queued.clone(),
            acct: acct.clone(),
        };
        let inbox = Inbox {
            rx,
            queued,
            acct,
            taken: VecDeque::new(),
        };
        (inbox, entry)
    }

    async fn next_batch(&mut self) -> Option<Vec<Cell>> {
        let b = self.rx.recv().await?;
        self.queued.fetch_sub(b.len(), Ordering::Relaxed);
        if let Some(a) = &self.acct {
            a.sub(CELL_LEN * b.len());
        }
        Some(b)
    }

    /// The next cell; `None` once the channel has dropped the circuit.
    pub async fn recv(&mut self) -> Option<Cell> {
        if self.taken.is_empty() {
            let b = self.next_batch().await?;
            self.taken.extend(b);
        }
        self.taken.pop_front()
    }

    /// Append the next batch of cells to `out`; false once the channel has
    /// dropped the circuit. Cancel-safe.
    pub async fn recv_batch(&mut self, out: &mut Vec<Cell>) -> bool {
        if !self.taken.is_empty() {
            out.extend(self.taken.drain(..));
            return true;
        }
        match self.next_batch().await {
            Some(b) => {
                out.extend(b);
                true
            }
            None => false,
        }
    }

    /// The memory account the cells are counted in (relays only).
    pub fn acct(&self) -> Option<&Arc<CircAcct>> {
        self.acct.as_ref()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(b) = self.rx.try_recv() {
            if let Some(a) = &self.acct {
                a.sub(CELL_LEN * b.len());
            }
        }
    }
}

/// What a relay's channels share: memory accounting, bandwidth limit,
/// counters. Clients use [`ChannelEnv::default`].
#[derive(Clone, Default)]
pub struct ChannelEnv {
    pub mem: Option<Arc<QueueMem>>,
    /// Bytes read from links, and bytes written to them: a relay's rate,
    /// each way (written bytes are held back in the circuits' queues,
    /// where their priority still applies, not in the kernel's).
    pub bucket: Option<Arc<TokenBucket>>,
    pub write_bucket: Option<Arc<TokenBucket>>,
    pub stats: Option<Arc<RelayStats>>,
    /// A link this side opened is closed once it has carried no circuit
    /// for this long, and up to half as long again (drawn for each link,
    /// so that links opened together do not close together): a relay
    /// keeps links to the relays it works with, not to every relay it
    /// ever extended a circuit to. The side that opened it closes it, so
    /// that its own next circuit never races the close.
    pub idle_close: Option<Duration>,
}

enum Ctrl {
    Register(CircId, CircEntry, oneshot::Sender<bool>),
    /// Forget a circuit, telling the peer with DESTROY if a reason is given.
    Close(CircId, Option<DestroyReason>),
    /// Close the link once what is queued has been written.
    Shutdown,
    /// The same, if the link carries no circuit.
    ShutdownIfIdle,
}

/// Cells of one circuit on their way to the channel's task, with the room
/// they took in that circuit's queue.
struct Batch {
    room: Arc<Semaphore>,
    cells: Vec<Cell>,
}

/// What a batch gives back once written or dropped: room to its
/// circuit's sender and bytes to the memory account it was counted in.
struct Taken {
    room: Arc<Semaphore>,
    mem: Counted,
}

/// Where a waiting batch's bytes are counted.
enum Counted {
    /// Not at all (clients).
    Nowhere,
    /// In its circuit's account, so that the memory cap can find it.
    Circuit(Arc<CircAcct>),
    /// As the channel's (a circuit without an account of its own).
    Shared(Arc<QueueMem>),
}

struct HandleInner {
    /// Batches of cells to send, each of one circuit; each circuit's room
    /// bounds its cells.
    out: mpsc::UnboundedSender<Batch>,
    /// Per circuit: the cells it may still queue ([`CIRC_OUT_QUEUE`] at
    /// most). Entries go when the channel's task forgets the circuit.
    rooms: std::sync::Mutex<HashMap<CircId, Arc<Semaphore>>>,
    /// Unbounded by type; each message stands for a circuit of this side
    /// (one to register it, one to close it).
    ctrl: mpsc::UnboundedSender<Ctrl>,
    peer: Option<RelayId>,
    next_id: AtomicU32,
    high_bit: u32,
    mem: Option<Arc<QueueMem>>,
}

/// A cheap handle to a channel's task.
#[derive(Clone)]
pub struct ChannelHandle {
    inner: Arc<HandleInner>,
}

impl ChannelHandle {
    /// The peer's relay identity, as proven in the link handshake.
    pub fn peer(&self) -> Option<RelayId> {
        self.inner.peer
    }

    pub fn is_closed(&self) -> bool {
        self.inner.out.is_closed()
    }

    /// Whether the link is closed within `d` (waiting at most that long).
    pub async fn closed_within(&self, d: Duration) -> bool {
        tokio::time::timeout(d, self.inner.out.closed())
            .await
            .is_ok()
    }

    /// Whether circuits have cells queued or sent on this link that the
    /// link has not forgotten (a circuit the peer created counts once it
    /// is answered).
    pub fn carries_circuits(&self) -> bool {
        !(self.inner.rooms.lock())
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// This side opened the link (it was the handshake's initiator).
    pub fn we_opened(&self) -> bool {
        self.inner.high_bit != 0
    }

    /// Queue a cell; waits while its circuit's queue is full.
    pub async fn send(&self, cell: Cell) -> Result<(), LinkError> {
        self.send_batch(vec![cell]).await
    }

    /// Queue cells, in order, in hand-offs of at most [`BATCH_MAX`] cells
    /// of one circuit; waits while a circuit's queue is full. Cells of a
    /// circuit this channel does not carry (any more) are dropped.
    pub async fn send_batch(&self, mut cells: Vec<Cell>) -> Result<(), LinkError> {
        while !cells.is_empty() {
            let id = cells[0].circ_id;
            let n = cells
                .iter()
                .take(BATCH_MAX)
                .take_while(|c| c.circ_id == id)
                .count();
            let rest = cells.split_off(n);
            self.send_one_batch(cells).await?;
            cells = rest;
        }
        Ok(())
    }

    /// The room of circuit `id`'s queue.
    fn room(&self, id: CircId) -> Arc<Semaphore> {
        let mut rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms
            .entry(id)
            .or_insert_with(|| Arc::new(Semaphore::new(CIRC_OUT_QUEUE)))
            .clone()
    }

    async fn send_one_batch(&self, cells: Vec<Cell>) -> Result<(), LinkError> {
        let n = cells.len();
        let room = self.room(cells[0].circ_id);
        room.acquire_many(n.min(CIRC_OUT_QUEUE) as u32)
            .await
            .map_err(|_| LinkError::ChannelClosed)?
            .forget();
        if let Some(m) = &self.inner.mem {
            m.add_shared(CELL_LEN * n);
        }
        self.inner.out.send(Batch { room, cells }).map_err(|_| {
            if let Some(m) = &self.inner.mem {
                m.sub_shared(CELL_LEN * n);
            }
            LinkError::ChannelClosed
        })
    }

    /// Allocate a circuit id and register an inbox for it, counted in `acct`.
    pub async fn new_circuit_counted(
        &self,
        acct: Option<Arc<CircAcct>>,
    ) -> Result<(CircId, Inbox), LinkError> {
        for _ in 0..16 {
            let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            let id = CircId(n | self.inner.high_bit);
            if id.0 == 0 {
                continue;
            }
            let (inbox, entry) = Inbox::new(acct.clone());
            let (ack_tx, ack_rx) = oneshot::channel();
            self.inner
                .ctrl
                .send(Ctrl::Register(id, entry, ack_tx))
                .map_err(|_| LinkError::ChannelClosed)?;
            if ack_rx.await.map_err(|_| LinkError::ChannelClosed)? {
                return Ok((id, inbox));
            }
        }
        Err(LinkError::NoCircuitId)
    }

    /// Allocate a circuit id and register an inbox for it.
    pub async fn new_circuit(&self) -> Result<(CircId, Inbox), LinkError> {
        self.new_circuit_counted(None).await
    }

    /// Forget a circuit (its inbox is dropped).
    pub fn unregister(&self, circ_id: CircId) {
        let _ = self.inner.ctrl.send(Ctrl::Close(circ_id, None));
    }

    /// Close the link, as [`ChannelHandle::close`] does, if it carries no
    /// circuit when its task gets this (a circuit registered after that
    /// fails as on a lost link).
    pub fn close_if_idle(&self) {
        let _ = self.inner.ctrl.send(Ctrl::ShutdownIfIdle);
    }

    /// Close the link once what is queued for it has been written (a link
    /// that was opened for one job, not to be kept).
    pub fn close(&self) {
        let _ = self.inner.ctrl.send(Ctrl::Shutdown);
    }

    /// Forget a circuit and tell the peer with DESTROY, ahead of queued
    /// cells and without waiting for room in the channel's queue.
    pub fn destroy(&self, circ_id: CircId, reason: DestroyReason) {
        let _ = self.inner.ctrl.send(Ctrl::Close(circ_id, Some(reason)));
    }
}

struct CircEntry {
    tx: mpsc::UnboundedSender<Vec<Cell>>,
    queued: Arc<AtomicUsize>,
    acct: Option<Arc<CircAcct>>,
}

/// Gives back what `n` written or dropped cells of one batch took.
fn release(t: Taken, n: usize) {
    t.room.add_permits(n);
    match t.mem {
        Counted::Nowhere => {}
        Counted::Circuit(a) => a.sub(CELL_LEN * n),
        Counted::Shared(m) => m.sub_shared(CELL_LEN * n),
    }
}

/// The channel's owner task.
struct Reactor {
    transport: LinkTransport,
    circs: HashMap<CircId, CircEntry>,
    /// DESTROYs to send ahead of the queue.
    urgent: VecDeque<Cell>,
    on_create: Option<CreateHandler>,
    handle: ChannelHandle,
    /// The high bit the peer's circuit ids carry.
    peer_high_bit: u32,
    env: ChannelEnv,
    /// Set on inbound links: the per-address connection count and
    /// circuit rate.
    dos: Option<ConnGuard>,
    /// The peer's proven relay identity (inbound XK links).
    peer: Option<RelayId>,
    /// Tells whether a relay identity is listed at an address: such a peer
    /// is exempt from the circuit rate.
    known_relay: Option<RelayCheck>,
    /// Bytes read and not yet opened (at most one partial frame after a
    /// round of opening).
    inbuf: Vec<u8>,
    /// Sealed frames; `out[written..]` is still to be written.
    out: Vec<u8>,
    written: usize,
    /// Cells to seal into the next frame.
    batch: Vec<Cell>,
    /// Cells taken from the queue, not yet sealed, by circuit.
    sched: Sched<Taken>,
    opened: Vec<Cell>,
    /// The cells of the frame being opened, by circuit.
    staged: Vec<(CircId, Vec<Cell>)>,
    /// The last read filled all the room it had.
    busy: bool,
    /// Asked to close: the link ends once nothing is left to write.
    closing: bool,
    /// Close after carrying no circuit for this long ([`ChannelEnv::idle_close`]).
    idle_close: Option<Duration>,
    /// When the link last carried a circuit.
    used: Instant,
}

impl Reactor {
    fn count(&self, f: impl Fn(&RelayStats)) {
        if let Some(s) = &self.env.stats {
            f(s);
        }
    }

    /// Hand each circuit its staged cells, one batch per circuit.
    fn deliver_staged(&mut self) {
        for (id, cells) in std::mem::take(&mut self.staged) {
            let n = cells.len();
            let Some(e) = self.circs.get(&id) else {
                self.count(|s| RelayStats::inc(&s.cells_dropped, n as u64));
                continue;
            };
            let overflow = e.queued.load(Ordering::Relaxed) + n > CIRC_QUEUE;
            if !overflow {
                e.queued.fetch_add(n, Ordering::Relaxed);
                if let Some(a) = &e.acct {
                    a.add(CELL_LEN * n);
                }
                match e.tx.send(cells) {
                    Ok(()) => continue,
                    Err(_) => {
                        if let Some(a) = &e.acct {
                            a.sub(CELL_LEN * n);
                        }
                    }
                }
            }
            self.forget(id);
            self.count(|s| RelayStats::inc(&s.cells_dropped, n as u64));
            if overflow {
                debug!("circuit queue overflow: the peer ignored flow control");
                self.count(|s| RelayStats::inc(&s.flow_control_violations, 1));
                self.urgent
                    .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
            }
        }
    }

    /// Route a cell: to its circuit's batch, or (a new or unknown circuit)
    /// at once, after the batches staged so far.
    fn dispatch(&mut self, cell: Cell) {
        let id = cell.circ_id;
        if self.circs.contains_key(&id) {
            match self.staged.iter_mut().find(|(i, _)| *i == id) {
                Some((_, v)) => v.push(cell),
                None => self.staged.push((id, vec![cell])),
            }
            return;
        }
        self.deliver_staged();
        match (cell.cmd, &self.on_create) {
            (CellCmd::CREATE, Some(_)) if self.circs.len() >= MAX_CIRCUITS_PER_CHANNEL => {
                debug!("CREATE refused: channel circuit limit");
                self.urgent
                    .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
            }
            (CellCmd::CREATE, Some(_)) if !self.may_create() => {
                trace!("CREATE refused: circuit rate of this address");
                self.urgent
                    .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
            }
            (CellCmd::CREATE, Some(handler))
                if id.0 != 0 && (id.0 & 0x8000_0000) == self.peer_high_bit =>
            {
                let (inbox, entry) = Inbox::new(self.env.mem.as_ref().map(|m| m.account()));
                self.circs.insert(id, entry);
                handler(NewCircuit {
                    circ_id: id,
                    create: cell,
                    inbox,
                    chan: self.handle.clone(),
                });
            }
            (CellCmd::DESTROY | CellCmd::PADDING, _) => {}
            (cmd, _) => {
                self.count(|s| RelayStats::inc(&s.cells_dropped, 1));
                debug!(?cmd, "cell for unknown circuit dropped");
            }
        }
    }

    /// The per-address circuit rate, which listed relays at their listed
    /// address do not pay (checked per CREATE: a relay may be listed after
    /// its link was opened).
    fn may_create(&self) -> bool {
        let Some(d) = &self.dos else { return true };
        let listed = match (&self.peer, &self.known_relay) {
            (Some(id), Some(known)) => known(id, d.ip()),
            _ => false,
        };
        listed || d.allow_circuit()
    }

    fn on_ctrl(&mut self, c: Ctrl) {
        match c {
            Ctrl::Register(id, entry, ack) => {
                let free = !self.circs.contains_key(&id);
                if free {
                    self.circs.insert(id, entry);
                }
                let _ = ack.send(free);
            }
            Ctrl::Close(id, reason) => {
                self.forget(id);
                if let Some(r) = reason {
                    self.urgent.push_back(Cell::destroy(id, r));
                }
            }
            Ctrl::Shutdown => self.closing = true,
            Ctrl::ShutdownIfIdle => self.closing |= self.circs.is_empty(),
        }
    }

    /// Forget a circuit: its inbox, its waiting cells and its room (a
    /// sender still waiting for room learns that the circuit is gone).
    fn forget(&mut self, id: CircId) {
        if self.circs.remove(&id).is_some() {
            self.used = Instant::now();
        }
        self.sched.remove(id, release);
        let mut rooms = (self.handle.inner.rooms.lock()).unwrap_or_else(|p| p.into_inner());
        if let Some(r) = rooms.remove(&id) {
            r.close();
        }
    }

    /// A batch from the channel's queue: waiting, under its circuit's
    /// memory account, to be sealed; dropped if the circuit is gone.
    fn take_out(&mut self, b: Batch) {
        let n = b.cells.len();
        let Some(id) = b.cells.first().map(|c| c.circ_id) else {
            return;
        };
        let acct = self.circs.get(&id).map(|e| e.acct.clone());
        let mem = match (&self.env.mem, &acct) {
            (None, _) => Counted::Nowhere,
            (Some(m), Some(Some(a))) => {
                m.sub_shared(CELL_LEN * n);
                a.add(CELL_LEN * n);
                Counted::Circuit(a.clone())
            }
            (Some(m), _) => Counted::Shared(m.clone()),
        };
        let taken = Taken { room: b.room, mem };
        if acct.is_none() {
            self.count(|s| RelayStats::inc(&s.cells_dropped, n as u64));
            release(taken, n);
            self.forget(id);
            return;
        }
        self.sched.push(taken, b.cells);
    }

    /// Seal what is waiting (DESTROYs first, then by circuit priority) into
    /// frames while there is room in the output buffer. Under a write rate
    /// it seals only what the bucket grants, when what it sealed before is
    /// written: sealed cells go out in order, whatever their circuit, so a
    /// cell sealed ahead of its grant would hold back a quiet circuit's
    /// cell that comes after it. DESTROYs and cells of circuits that have
    /// sent little of late ([`QUIET_CELLS`]) go out at once, on the
    /// bucket's allowance for quiet links. Returns whether cells wait for
    /// the bucket.
    fn fill(
        &mut self,
        queue: &mut mpsc::UnboundedReceiver<Batch>,
        wbucket: Option<&TokenBucket>,
    ) -> Result<bool, LinkError> {
        if self.written > 0 && self.written * 2 >= self.out.len() {
            self.out.drain(..self.written);
            self.written = 0;
        }
        while let Ok(b) = queue.try_recv() {
            self.take_out(b);
        }
        let now = Instant::now().into_std();
        let Some(b) = wbucket else {
            while self.out.len() - self.written < OUT_HIGH {
                if self.seal_next(now, MAX_CELLS_PER_FRAME, f64::INFINITY)? == 0 {
                    break;
                }
            }
            return Ok(false);
        };
        let frame = |cells: usize| FRAME_OVERHEAD + cells * CELL_LEN;
        while self.out.len() - self.written < OUT_HIGH
            && (!self.urgent.is_empty() || self.sched.quiet_waiting(now, QUIET_CELLS))
        {
            let g = b.take_quiet(QUIET_MAX);
            let cells = (g.saturating_sub(FRAME_OVERHEAD) / CELL_LEN).min(MAX_CELLS_PER_FRAME);
            let used = self.seal_next(now, cells, QUIET_CELLS)?;
            b.refund(g - used);
            if used == 0 {
                break;
            }
        }
        let waiting = self.urgent.len() + self.sched.len();
        if self.written < self.out.len() || waiting == 0 {
            return Ok(false);
        }
        let high = (b.rate() as usize / 1000).clamp(OUT_HIGH_LIMITED, OUT_HIGH);
        let want = (frame(waiting) + waiting / MAX_CELLS_PER_FRAME * FRAME_OVERHEAD).min(high);
        let granted = if want <= QUIET_MAX {
            b.take_quiet(want)
        } else {
            b.take_up_to(want)
        };
        let mut left = granted;
        loop {
            let cells = (left.saturating_sub(FRAME_OVERHEAD) / CELL_LEN).min(MAX_CELLS_PER_FRAME);
            let used = self.seal_next(now, cells, f64::INFINITY)?;
            if used == 0 {
                break;
            }
            left -= used;
        }
        b.refund(left);
        Ok(granted == 0)
    }

    /// Seal up to `cells` waiting cells into one frame: DESTROYs first, then
    /// by circuit priority, from circuits under `quiet` cells of late
    /// (`f64::INFINITY`: from any). The frame's bytes; 0 if there were none.
    fn seal_next(
        &mut self,
        now: std::time::Instant,
        cells: usize,
        quiet: f64,
    ) -> Result<usize, LinkError> {
        let mut batch = std::mem::take(&mut self.batch);
        let urgent = self.urgent.len().min(cells);
        batch.extend(self.urgent.drain(..urgent));
        self.sched
            .pop_quiet(now, cells - batch.len(), quiet, &mut batch, release);
        if batch.is_empty() {
            self.batch = batch;
            return Ok(0);
        }
        let before = self.out.len();
        let r = self.transport.seal_cells(&batch, &mut self.out);
        batch.clear();
        self.batch = batch;
        r?;
        Ok(self.out.len() - before)
    }

    /// Open and dispatch every whole frame in the input buffer.
    fn open_frames(&mut self) -> Result<(), LinkError> {
        let mut pos = 0;
        let mut opened = std::mem::take(&mut self.opened);
        while let Some(len) = link::frame_len(&self.inbuf[pos..], MIN_TRANSPORT_MSG, MAX_FRAME)
            .map_err(|e| LinkError::PeerMisbehaved(e.to_string()))?
        {
            let end = pos + 2 + len;
            if self.inbuf.len() < end {
                break;
            }
            self.transport
                .open_cells(&mut self.inbuf[pos + 2..end], &mut opened)
                .map_err(|e| LinkError::PeerMisbehaved(e.to_string()))?;
            pos = end;
            for c in opened.drain(..) {
                self.dispatch(c);
            }
        }
        // One hand-off per circuit for all the frames of this read.
        self.deliver_staged();
        self.opened = opened;
        self.inbuf.drain(..pos);
        Ok(())
    }

    async fn run(
        &mut self,
        mut stream: LinkSocket,
        cells: &mut mpsc::UnboundedReceiver<Batch>,
        mut ctrl: mpsc::UnboundedReceiver<Ctrl>,
        mut stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<(), LinkError> {
        let (mut rd, wr) = stream.split();
        let bucket = self.env.bucket.clone();
        let wbucket = self.env.write_bucket.clone();
        // Bandwidth granted by the read bucket for the next read.
        let mut grant = 0usize;
        // Last time the peer took bytes, or we had none for it.
        let mut progress = Instant::now();
        let mut active = Instant::now();
        // Futures that live across iterations, so that the loop does not
        // register with the relay's stop signal or the timer wheel each time:
        // the timer checks the write timeout and idleness once a second
        // while either could apply.
        let stopped = async {
            match stop.as_mut() {
                Some(s) => {
                    let _ = s.wait_for(|v| *v).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopped);
        let timer = tokio::time::sleep(CHECK_EVERY);
        tokio::pin!(timer);
        self.open_frames()?;
        loop {
            // Held back by our own rate: not the peer's doing.
            let write_debt = self.fill(cells, wbucket.as_deref())?;
            let pending = self.written < self.out.len();
            if self.closing && !pending && self.urgent.is_empty() && self.sched.is_empty() {
                return Ok(());
            }
            // What is sealed has its grant.
            let wlen = self.out.len() - self.written;
            if !pending || write_debt {
                progress = Instant::now();
            }
            let mut limit = u64::MAX;
            if let Some(b) = &bucket {
                b.refund(std::mem::take(&mut grant));
                // A link whose last read took less than it could is quiet.
                grant = if self.busy {
                    b.take_up_to(READ_BIG)
                } else {
                    b.take_quiet(READ_SMALL)
                };
                limit = grant as u64;
            }
            let in_debt = limit == 0;
            let can_read = self.urgent.len() < URGENT_MAX && !in_debt;
            let big = self.inbuf.capacity() > READ_SMALL || self.out.capacity() > IDLE_BUF;
            if can_read {
                self.inbuf
                    .reserve(if self.busy { READ_BIG } else { READ_SMALL });
            }
            let room_in = self.inbuf.capacity() - self.inbuf.len();
            let mut src = (&mut rd).take(limit);
            tokio::select! {
                () = &mut stopped => return Ok(()),
                c = ctrl.recv() => match c {
                    Some(c) => self.on_ctrl(c),
                    None => return Ok(()),
                },
                c = cells.recv() => match c {
                    Some(c) => self.take_out(c),
                    None => return Ok(()),
                },
                n = wr.write(&self.out[self.written..self.written + wlen]), if pending => {
                    let n = n?;
                    self.count(|s| RelayStats::inc(&s.link_bytes_written, n as u64));
                    self.written += n;
                    if self.written == self.out.len() {
                        self.out.clear();
                        self.written = 0;
                    }
                    progress = Instant::now();
                    active = progress;
                }
                n = src.read_buf(&mut self.inbuf), if can_read => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.count(|s| RelayStats::inc(&s.link_bytes_read, n as u64));
                    self.busy = n == room_in || n as u64 == limit;
                    grant = grant.saturating_sub(n);
                    self.open_frames()?;
                    active = Instant::now();
                }
                () = async { if let Some(b) = &bucket { b.refilled().await } }, if in_debt => {}
                () = async { if let Some(b) = &wbucket { b.refilled().await } }, if write_debt => {}
                () = &mut timer, if pending || big || self.idle_close.is_some() => {
                    let now = Instant::now();
                    if let Some(after) = self.idle_close {
                        let quiet = !pending && self.urgent.is_empty() && self.sched.is_empty();
                        if !self.circs.is_empty() {
                            self.used = now;
                        } else if quiet && now >= self.used + after {
                            debug!(peer = ?self.handle.peer(), "link closed: no circuit for {} s", after.as_secs());
                            return Ok(());
                        }
                    }
                    if pending && now >= progress + WRITE_TIMEOUT {
                        self.count(|s| RelayStats::inc(&s.links_stalled, 1));
                        return Err(LinkError::PeerMisbehaved(format!(
                            "read nothing for {} s", WRITE_TIMEOUT.as_secs()
                        )));
                    }
                    if big && now >= active + IDLE_SHRINK {
                        // A partial frame keeps its bytes, not the room around them.
                        self.inbuf.shrink_to(self.inbuf.len().max(IDLE_BUF));
                        self.out.shrink_to(self.out.len().max(IDLE_BUF));
                        self.batch.shrink_to_fit();
                        self.sched.shrink_to_fit();
                        self.opened.shrink_to_fit();
                        self.staged.shrink_to_fit();
                        self.circs.shrink_to_fit();
                        self.busy = false;
                    }
                    timer.as_mut().reset(now + CHECK_EVERY);
                }
            }
        }
    }
}

/// How a channel starts: who we are to it and what it shares.
struct ChannelSetup {
    peer: Option<RelayId>,
    we_opened: bool,
    on_create: Option<CreateHandler>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    env: ChannelEnv,
    dos: Option<ConnGuard>,
    known_relay: Option<RelayCheck>,
}

/// Is this relay identity listed in the consensus at this address?
pub type RelayCheck = Arc<dyn Fn(&RelayId, std::net::IpAddr) -> bool + Send + Sync>;

/// Start a channel's task over an established link; `inbuf` holds bytes
/// that arrived after the handshake.
fn spawn_channel(
    stream: LinkSocket,
    transport: LinkTransport,
    inbuf: Vec<u8>,
    setup: ChannelSetup,
) -> ChannelHandle {
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    let high_bit = if setup.we_opened { 0x8000_0000 } else { 0 };
    let handle = ChannelHandle {
        inner: Arc::new(HandleInner {
            out: out_tx,
            rooms: Default::default(),
            ctrl: ctrl_tx,
            peer: setup.peer,
            next_id: AtomicU32::new(1),
            high_bit,
            mem: setup.env.mem.clone(),
        }),
    };
    let idle_close = setup
        .env
        .idle_close
        .filter(|_| setup.we_opened)
        .map(|d| d + d.mul_f64(rand::random::<f64>() / 2.0));
    let mut reactor = Reactor {
        transport,
        circs: HashMap::new(),
        urgent: VecDeque::new(),
        on_create: setup.on_create,
        handle: handle.clone(),
        peer_high_bit: high_bit ^ 0x8000_0000,
        env: setup.env,
        dos: setup.dos,
        peer: setup.peer,
        known_relay: setup.known_relay,
        inbuf,
        out: Vec::new(),
        written: 0,
        batch: Vec::new(),
        sched: Sched::new(Instant::now().into_std()),
        opened: Vec::new(),
        staged: Vec::new(),
        busy: false,
        closing: false,
        idle_close,
        used: Instant::now(),
    };
    let stop = setup.stop;
    let h = handle.clone();
    tokio::spawn(
        async move {
            let mut out_rx = out_rx;
            if let Err(e) = reactor.run(stream, &mut out_rx, ctrl_rx, stop).await {
                debug!("channel closed: {e}");
            }
            // Wake whoever waits for room, and uncount what was never sent.
            out_rx.close();
            let rooms =
                std::mem::take(&mut *h.inner.rooms.lock().unwrap_or_else(|p| p.into_inner()));
            for r in rooms.into_values() {
                r.close();
            }
            while let Ok(b) = out_rx.try_recv() {
                if let Some(m) = &h.inner.mem {
                    m.sub_shared(CELL_LEN * b.cells.len());
                }
            }
            reactor.sched.clear(release);
            trace!("channel task ended");
        }
        .in_current_span(),
    );
    handle
}

/// What a relay needs to run links.
pub struct LinkIdentity {
    pub identity: SigningKey,
    pub link_secret: StaticSecret,
    /// Becomes true when the relay stops: its channels close.
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    pub env: ChannelEnv,
    /// The local address of links we open (a relay's own address, so that
    /// its peers see it come from where the consensus lists it).
    pub bind: Option<std::net::IpAddr>,
    /// Which inbound relay links are exempt from the circuit rate.
    pub known_relay: Option<RelayCheck>,
}

impl LinkIdentity {
    pub fn link_pub(&self) -> LinkKey {
        LinkKey(PublicKey::from(&self.link_secret).to_bytes())
    }
    pub fn id(&self) -> RelayId {
        RelayId(self.identity.verifying_key().to_bytes())
    }
    fn keys(&self) -> LinkKeys<'_> {
        LinkKeys {
            identity: &self.identity,
            link_secret: &self.link_secret,
        }
    }
}

/// Run a handshake step machine over `s`. Returns its result and the bytes
/// that arrived after the handshake.
async fn drive<T>(
    s: &mut LinkSocket,
    mut step: impl FnMut(&mut Vec<u8>) -> Result<Action<T>, allium_proto::Error>,
) -> Result<(T, Vec<u8>), LinkError> {
    let mut buf = Vec::new();
    // Every handshake is a few messages; a peer cannot keep it going.
    for _ in 0..16 {
        match step(&mut buf)? {
            Action::Send(b) => s.write_all(&b).await?,
            Action::Recv => {
                buf.reserve(512);
                if s.read_buf(&mut buf).await? == 0 {
                    return Err(LinkError::PeerMisbehaved(
                        "closed the link during the handshake".into(),
                    ));
                }
            }
            Action::Done(t) => return Ok((t, buf)),
        }
    }
    Err(LinkError::PeerMisbehaved(
        "the handshake did not finish".into(),
    ))
}

async fn connect_tcp(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<LinkSocket, LinkError> {
    let connect = async {
        match bind {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.bind(SocketAddr::new(ip, 0))?;
                sock.connect(addr).await
            }
        }
    };
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| LinkError::Timeout("TCP connect"))??;
    s.set_nodelay(true)?;
    Ok(LinkSocket::new(s))
}

/// An NK link to relay `id` (its link key from the consensus or its
/// descriptor), checked to be that relay. Returns the socket, the transport
/// and any bytes that followed the handshake. Used by clients, and by
/// authorities to test that a relay is reachable.
pub async fn handshake_nk(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
    id: &RelayId,
    link_key: &LinkKey,
) -> Result<(LinkSocket, LinkTransport, Vec<u8>), LinkError> {
    let work = async {
        let mut s = connect_tcp(addr, bind).await?;
        let mut hs = Initiator::nk(&mut rand::rng(), link_key)?;
        let (unverified, rest) = drive(&mut s, |b| hs.step(b)).await?;
        Ok::<_, LinkError>((s, unverified.verify(id)?, rest))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::Timeout("link handshake"))?
}

/// Client side: NK link to guard `id`.
pub async fn connect_nk(
    addr: SocketAddr,
    id: &RelayId,
    link_key: &LinkKey,
) -> Result<ChannelHandle, LinkError> {
    connect_nk_from(addr, id, link_key, None).await
}

/// [`connect_nk`] from a chosen local address.
pub async fn connect_nk_from(
    addr: SocketAddr,
    id: &RelayId,
    link_key: &LinkKey,
    bind: Option<std::net::IpAddr>,
) -> Result<ChannelHandle, LinkError> {
    let (s, transport, rest) = handshake_nk(addr, bind, id, link_key).await?;
    Ok(spawn_channel(
        s,
        transport,
        rest,
        ChannelSetup {
            peer: Some(*id),
            we_opened: true,
            on_create: None,
            stop: None,
            env: ChannelEnv::default(),
            dos: None,
            known_relay: None,
        },
    ))
}

/// Relay side: XK link to relay `peer`, which must prove that identity;
/// ours is proven to it.
pub async fn connect_xk(
    addr: SocketAddr,
    peer: RelayId,
    peer_link_key: &LinkKey,
    me: &LinkIdentity,
    on_create: Option<CreateHandler>,
) -> Result<ChannelHandle, LinkError> {
    let work = async {
        let mut s = connect_tcp(addr, me.bind).await?;
        let mut hs = Initiator::xk(&mut rand::rng(), me.keys(), peer_link_key)?;
        let (unverified, rest) = drive(&mut s, |b| hs.step(b)).await?;
        let transport = unverified.verify(&peer)?;
        Ok::<_, LinkError>(spawn_channel(
            s,
            transport,
            rest,
            ChannelSetup {
                peer: Some(peer),
                we_opened: true,
                on_create,
                stop: me.stop.clone(),
                env: me.env.clone(),
                dos: None,
                known_relay: None,
            },
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| LinkError::Timeout("link handshake"))?
}

/// Responder side of either pattern. `conn` is the per-address guard of
/// the peer's address: it counts the link for as long as it lives, and
/// limits circuit creation before any public-key work, except for relays
/// [`LinkIdentity::known_relay`] lists at that address. A relay identity
/// proven in the handshake is no exemption by itself: anyone can make one.
pub async fn accept(
    s: TcpStream,
    me: &LinkIdentity,
    on_create: CreateHandler,
    conn: Option<ConnGuard>,
) -> Result<ChannelHandle, LinkError> {
    s.set_nodelay(true)?;
    let mut s = LinkSocket::new(s);
    let mut hs = Responder::new(&mut rand::rng(), me.keys());
    let (l, rest) = tokio::time::timeout(HANDSHAKE_TIMEOUT, drive(&mut s, |b| hs.step(b)))
        .await
        .map_err(|_| LinkError::Timeout("link handshake"))??;
    Ok(spawn_channel(
        s,
        l.transport,
        rest,
        ChannelSetup {
            peer: l.peer,
            we_opened: false,
            on_create: Some(on_create),
            stop: me.stop.clone(),
            env: me.env.clone(),
            dos: conn,
            known_relay: me.known_relay.clone(),
        },
    ))
}
