//! Channels: one Noise link to one peer, driven by one owner task.
//!
//! A channel is three tasks: a reader (socket to frames), a writer (frames
//! to socket) and the reactor, which owns the Noise transport state and the
//! map from circuit id to circuit inbox. The reactor never awaits a socket
//! or a full queue: a circuit whose inbox is full makes the reactor stop
//! taking frames from the reader (so TCP pushes back on the peer) while it
//! keeps writing, so two channels can never wait on each other.
//!
//! Circuit ids: the side that opened the link allocates ids with the high
//! bit set, the other side without it; 0 is never used.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use allium_proto::cell::{CELL_LEN, Cell, CellCmd, DestroyReason};
use allium_proto::link::{self, LINK_NK, LINK_XK, LinkTransport, MAX_CELLS_PER_FRAME};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, trace};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::limits::{CircAcct, ConnGuard, QueueMem, TokenBucket};
use crate::{RelayError, RelayStats};

/// Cells queued toward one circuit. Flow control keeps an honest peer far
/// below this (a circuit window of DATA plus a few control cells); a peer
/// that fills it has ignored its window and loses the circuit, so one
/// circuit can never stall its channel.
pub const CIRC_QUEUE: usize = 1536;
/// Cells queued toward one channel.
pub const CHANNEL_QUEUE: usize = 1024;
const FRAME_QUEUE: usize = 8;
/// Circuits one channel may carry; further CREATEs are refused.
pub const MAX_CIRCUITS_PER_CHANNEL: usize = 8192;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A new circuit a peer asked for with CREATE.
pub struct NewCircuit {
    pub circ_id: u32,
    pub create: Cell,
    pub inbox: Inbox,
    pub chan: ChannelHandle,
}

pub type CreateHandler = Arc<dyn Fn(NewCircuit) + Send + Sync>;

/// A circuit's inbound cells, counted against the relay's memory cap.
pub struct Inbox {
    rx: mpsc::Receiver<Cell>,
    acct: Option<Arc<CircAcct>>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<Cell> {
        let c = self.rx.recv().await?;
        if let Some(a) = &self.acct {
            a.sub(CELL_LEN);
        }
        Some(c)
    }
    /// The memory account the cells are counted in (relays only).
    pub fn acct(&self) -> Option<&Arc<CircAcct>> {
        self.acct.as_ref()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(_c) = self.rx.try_recv() {
            if let Some(a) = &self.acct {
                a.sub(CELL_LEN);
            }
        }
    }
}

/// What a relay's channels share: memory accounting, bandwidth limit,
/// counters. Clients use [`ChannelEnv::default`].
#[derive(Clone, Default)]
pub struct ChannelEnv {
    pub mem: Option<Arc<QueueMem>>,
    pub bucket: Option<Arc<TokenBucket>>,
    pub stats: Option<Arc<RelayStats>>,
}

enum Ctrl {
    Register(
        u32,
        mpsc::Sender<Cell>,
        Option<Arc<CircAcct>>,
        oneshot::Sender<bool>,
    ),
    /// Forget a circuit, telling the peer with DESTROY if a reason is given.
    Close(u32, Option<DestroyReason>),
}

struct HandleInner {
    out: mpsc::Sender<Cell>,
    ctrl: mpsc::UnboundedSender<Ctrl>,
    peer: Option<[u8; 32]>,
    next_id: AtomicU32,
    high_bit: u32,
    mem: Option<Arc<QueueMem>>,
}

/// A cheap handle to a channel's reactor.
#[derive(Clone)]
pub struct ChannelHandle {
    inner: Arc<HandleInner>,
}

impl ChannelHandle {
    /// The peer's relay identity, when the peer is a relay.
    pub fn peer(&self) -> Option<[u8; 32]> {
        self.inner.peer
    }

    pub fn is_closed(&self) -> bool {
        self.inner.out.is_closed()
    }

    /// Queue a cell; waits while the channel's queue is full.
    pub async fn send(&self, cell: Cell) -> Result<(), RelayError> {
        if let Some(m) = &self.inner.mem {
            m.add_shared(CELL_LEN);
        }
        let r = self.inner.out.send(cell).await;
        if r.is_err()
            && let Some(m) = &self.inner.mem
        {
            m.sub_shared(CELL_LEN);
        }
        r.map_err(|_| RelayError::ChannelClosed)
    }

    /// Allocate a circuit id and register an inbox for it, counted in `acct`.
    pub async fn new_circuit_counted(
        &self,
        acct: Option<Arc<CircAcct>>,
    ) -> Result<(u32, Inbox), RelayError> {
        for _ in 0..16 {
            let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            let id = n | self.inner.high_bit;
            if id == 0 {
                continue;
            }
            let (tx, rx) = mpsc::channel(CIRC_QUEUE);
            let (ack_tx, ack_rx) = oneshot::channel();
            self.inner
                .ctrl
                .send(Ctrl::Register(id, tx, acct.clone(), ack_tx))
                .map_err(|_| RelayError::ChannelClosed)?;
            if ack_rx.await.map_err(|_| RelayError::ChannelClosed)? {
                return Ok((
                    id,
                    Inbox {
                        rx,
                        acct: acct.clone(),
                    },
                ));
            }
        }
        Err(RelayError::Protocol("no free circuit id".into()))
    }

    /// Allocate a circuit id and register an inbox for it.
    pub async fn new_circuit(&self) -> Result<(u32, Inbox), RelayError> {
        self.new_circuit_counted(None).await
    }

    /// Forget a circuit (its inbox is dropped).
    pub fn unregister(&self, circ_id: u32) {
        let _ = self.inner.ctrl.send(Ctrl::Close(circ_id, None));
    }

    /// Forget a circuit and tell the peer with DESTROY, ahead of queued
    /// cells and without waiting for room in the channel's queue.
    pub fn destroy(&self, circ_id: u32, reason: DestroyReason) {
        let _ = self.inner.ctrl.send(Ctrl::Close(circ_id, Some(reason)));
    }
}

/// The reactor's queues, borrowed by the `select!` arms.
struct ReactorIo {
    frames_in: mpsc::Receiver<Vec<u8>>,
    frames_out: mpsc::Sender<Vec<u8>>,
    cells_out: mpsc::Receiver<Cell>,
    ctrl: mpsc::UnboundedReceiver<Ctrl>,
}

struct CircEntry {
    tx: mpsc::Sender<Cell>,
    acct: Option<Arc<CircAcct>>,
}

struct Reactor {
    transport: LinkTransport,
    circs: HashMap<u32, CircEntry>,
    /// DESTROYs to send ahead of the queue.
    urgent: VecDeque<Cell>,
    on_create: Option<CreateHandler>,
    handle: ChannelHandle,
    /// The high bit the peer's circuit ids carry.
    peer_high_bit: u32,
    env: ChannelEnv,
    /// Set on inbound client links: the per-address circuit rate.
    dos: Option<ConnGuard>,
}

impl Reactor {
    fn count(&self, f: impl Fn(&RelayStats)) {
        if let Some(s) = &self.env.stats {
            f(s);
        }
    }

    fn dispatch(&mut self, cell: Cell) {
        let id = cell.circ_id;
        if let Some(e) = self.circs.get(&id) {
            if let Some(a) = &e.acct {
                a.add(CELL_LEN);
            }
            match e.tx.try_send(cell) {
                Ok(()) => {}
                Err(err) => {
                    if let Some(a) = &e.acct {
                        a.sub(CELL_LEN);
                    }
                    let full = matches!(err, mpsc::error::TrySendError::Full(_));
                    self.circs.remove(&id);
                    self.count(|s| RelayStats::inc(&s.cells_dropped, 1));
                    if full {
                        debug!("circuit queue overflow: the peer ignored flow control");
                        self.count(|s| RelayStats::inc(&s.flow_control_violations, 1));
                        self.urgent
                            .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
                    }
                }
            }
            return;
        }
        match (cell.cmd, &self.on_create) {
            (CellCmd::CREATE, Some(_)) if self.circs.len() >= MAX_CIRCUITS_PER_CHANNEL => {
                debug!("CREATE refused: channel circuit limit");
                self.urgent
                    .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
            }
            (CellCmd::CREATE, Some(_)) if self.dos.as_ref().is_some_and(|d| !d.allow_circuit()) => {
                trace!("CREATE refused: circuit rate of this address");
                self.urgent
                    .push_back(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
            }
            (CellCmd::CREATE, Some(handler))
                if id != 0 && (id & 0x8000_0000) == self.peer_high_bit =>
            {
                let (tx, rx) = mpsc::channel(CIRC_QUEUE);
                let acct = self.env.mem.as_ref().map(|m| m.account());
                self.circs.insert(
                    id,
                    CircEntry {
                        tx,
                        acct: acct.clone(),
                    },
                );
                handler(NewCircuit {
                    circ_id: id,
                    create: cell,
                    inbox: Inbox { rx, acct },
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

    fn take_out(&self, c: Cell, batch: &mut Vec<Cell>) {
        if let Some(m) = &self.env.mem {
            m.sub_shared(CELL_LEN);
        }
        batch.push(c);
    }

    async fn run(
        mut self,
        mut io: ReactorIo,
        mut stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<(), RelayError> {
        let mut batch = Vec::with_capacity(MAX_CELLS_PER_FRAME);
        let mut opened = Vec::new();
        loop {
            let can_write = io.frames_out.capacity() > 0;
            let urgent = can_write && !self.urgent.is_empty();
            tokio::select! {
                _ = async { match stop.as_mut() { Some(s) => { let _ = s.wait_for(|v| *v).await; } None => std::future::pending().await } } => {
                    return Ok(());
                }
                ctl = io.ctrl.recv() => match ctl {
                    Some(Ctrl::Register(id, tx, acct, ack)) => {
                        let free = !self.circs.contains_key(&id);
                        if free { self.circs.insert(id, CircEntry { tx, acct }); }
                        let _ = ack.send(free);
                    }
                    Some(Ctrl::Close(id, reason)) => {
                        self.circs.remove(&id);
                        if let Some(r) = reason {
                            self.urgent.push_back(Cell::destroy(id, r));
                        }
                    }
                    None => return Ok(()),
                },
                () = std::future::ready(()), if urgent => {
                    batch.clear();
                    while batch.len() < MAX_CELLS_PER_FRAME {
                        match self.urgent.pop_front() {
                            Some(c) => batch.push(c),
                            None => break,
                        }
                    }
                    self.write_batch(&batch, &io)?;
                }
                c = io.cells_out.recv(), if can_write => {
                    let Some(c) = c else { return Ok(()) };
                    batch.clear();
                    self.take_out(c, &mut batch);
                    while batch.len() < MAX_CELLS_PER_FRAME {
                        match io.cells_out.try_recv() {
                            Ok(c) => self.take_out(c, &mut batch),
                            Err(_) => break,
                        }
                    }
                    self.write_batch(&batch, &io)?;
                }
                p = io.frames_out.reserve(), if !can_write => {
                    if p.is_err() { return Err(RelayError::ChannelClosed); }
                }
                f = io.frames_in.recv() => {
                    let Some(f) = f else { return Ok(()) };
                    opened.clear();
                    self.transport.open_cells(&f, &mut opened)?;
                    for c in opened.drain(..) {
                        self.dispatch(c);
                    }
                }
            }
        }
    }

    fn write_batch(&mut self, batch: &[Cell], io: &ReactorIo) -> Result<(), RelayError> {
        let mut frame = Vec::with_capacity(batch.len() * CELL_LEN + 18);
        self.transport.seal_cells(batch, &mut frame)?;
        io.frames_out
            .try_send(frame)
            .map_err(|_| RelayError::ChannelClosed)
    }
}

async fn read_frame(r: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Vec<u8>> {
    let len = r.read_u16().await? as usize;
    if len == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "empty frame",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn reader_task(mut r: BufReader<OwnedReadHalf>, tx: mpsc::Sender<Vec<u8>>, env: ChannelEnv) {
    while let Ok(f) = read_frame(&mut r).await {
        if let Some(s) = &env.stats {
            RelayStats::inc(&s.link_bytes_read, f.len() as u64 + 2);
        }
        if let Some(b) = &env.bucket {
            b.take(f.len() + 2).await;
        }
        if tx.send(f).await.is_err() {
            return;
        }
    }
}

async fn writer_task(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>, env: ChannelEnv) {
    let mut buf = Vec::new();
    while let Some(f) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&f);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if let Some(s) = &env.stats {
            RelayStats::inc(&s.link_bytes_written, buf.len() as u64);
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// How a channel starts: who we are to it and what it shares.
struct ChannelSetup {
    peer: Option<[u8; 32]>,
    we_opened: bool,
    on_create: Option<CreateHandler>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    env: ChannelEnv,
    dos: Option<ConnGuard>,
}

/// Start the three tasks of a channel over an established link.
fn spawn_channel(
    stream: TcpStream,
    transport: LinkTransport,
    setup: ChannelSetup,
) -> ChannelHandle {
    let (r, w) = stream.into_split();
    let (fin_tx, fin_rx) = mpsc::channel(FRAME_QUEUE);
    let (fout_tx, fout_rx) = mpsc::channel(FRAME_QUEUE);
    let (out_tx, out_rx) = mpsc::channel(CHANNEL_QUEUE);
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    let high_bit = if setup.we_opened { 0x8000_0000 } else { 0 };
    let handle = ChannelHandle {
        inner: Arc::new(HandleInner {
            out: out_tx,
            ctrl: ctrl_tx,
            peer: setup.peer,
            next_id: AtomicU32::new(1),
            high_bit,
            mem: setup.env.mem.clone(),
        }),
    };
    let io = ReactorIo {
        frames_in: fin_rx,
        frames_out: fout_tx,
        cells_out: out_rx,
        ctrl: ctrl_rx,
    };
    let reactor = Reactor {
        transport,
        circs: HashMap::new(),
        urgent: VecDeque::new(),
        on_create: setup.on_create,
        handle: handle.clone(),
        peer_high_bit: high_bit ^ 0x8000_0000,
        env: setup.env.clone(),
        dos: setup.dos,
    };
    let reader = tokio::spawn(
        reader_task(
            BufReader::with_capacity(128 * 1024, r),
            fin_tx,
            setup.env.clone(),
        )
        .in_current_span(),
    );
    tokio::spawn(writer_task(w, fout_rx, setup.env).in_current_span());
    let stop = setup.stop;
    tokio::spawn(
        async move {
            if let Err(e) = reactor.run(io, stop).await {
                debug!("channel closed: {e}");
            }
            reader.abort();
            trace!("channel reactor ended");
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
}

impl LinkIdentity {
    pub fn link_pub(&self) -> [u8; 32] {
        PublicKey::from(&self.link_secret).to_bytes()
    }
}

async fn read_hs(r: &mut TcpStream) -> Result<Vec<u8>, RelayError> {
    let len = r.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn connect_tcp(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, RelayError> {
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
        .map_err(|_| RelayError::Timeout("TCP connect"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Client side: NK link to a guard whose link key comes from the consensus.
pub async fn connect_nk(
    addr: SocketAddr,
    guard_link_key: &[u8; 32],
) -> Result<ChannelHandle, RelayError> {
    connect_nk_from(addr, guard_link_key, None).await
}

/// [`connect_nk`] from a chosen local address.
pub async fn connect_nk_from(
    addr: SocketAddr,
    guard_link_key: &[u8; 32],
    bind: Option<std::net::IpAddr>,
) -> Result<ChannelHandle, RelayError> {
    let work = async {
        let mut s = connect_tcp(addr, bind).await?;
        let mut hs = link::nk_initiator(&mut rand::rng(), guard_link_key)?;
        let mut m1 = vec![LINK_NK];
        m1.extend(link::handshake_frame(&mut hs, &[])?);
        s.write_all(&m1).await?;
        let m2 = read_hs(&mut s).await?;
        link::read_handshake(&mut hs, &m2)?;
        Ok::<_, RelayError>(spawn_channel(
            s,
            LinkTransport::new(hs)?,
            ChannelSetup {
                peer: None,
                we_opened: true,
                on_create: None,
                stop: None,
                env: ChannelEnv::default(),
                dos: None,
            },
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| RelayError::Timeout("link handshake"))?
}

/// Relay side: XK link to another relay, proving our identity.
pub async fn connect_xk(
    addr: SocketAddr,
    peer_identity: [u8; 32],
    peer_link_key: &[u8; 32],
    me: &LinkIdentity,
    on_create: Option<CreateHandler>,
) -> Result<ChannelHandle, RelayError> {
    let work = async {
        let mut s = connect_tcp(addr, None).await?;
        let mut hs =
            link::xk_initiator(&mut rand::rng(), me.link_secret.as_bytes(), peer_link_key)?;
        let mut m1 = vec![LINK_XK];
        m1.extend(link::handshake_frame(&mut hs, &[])?);
        s.write_all(&m1).await?;
        let m2 = read_hs(&mut s).await?;
        link::read_handshake(&mut hs, &m2)?;
        let auth = link::xk_auth_payload(&hs, &me.identity, &me.link_pub());
        let m3 = link::handshake_frame(&mut hs, &auth)?;
        s.write_all(&m3).await?;
        Ok::<_, RelayError>(spawn_channel(
            s,
            LinkTransport::new(hs)?,
            ChannelSetup {
                peer: Some(peer_identity),
                we_opened: true,
                on_create,
                stop: me.stop.clone(),
                env: me.env.clone(),
                dos: None,
            },
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| RelayError::Timeout("link handshake"))?
}

/// Responder side of either pattern. `conn` is the per-address guard of
/// the peer's address: on a client (NK) link it also limits circuit
/// creation, before any public-key work.
pub async fn accept(
    mut s: TcpStream,
    me: &LinkIdentity,
    on_create: CreateHandler,
    conn: Option<ConnGuard>,
) -> Result<ChannelHandle, RelayError> {
    s.set_nodelay(true)?;
    let work = async {
        let kind = s.read_u8().await?;
        let mut hs = link::responder(&mut rand::rng(), kind, me.link_secret.as_bytes())?;
        let m1 = read_hs(&mut s).await?;
        link::read_handshake(&mut hs, &m1)?;
        let m2 = link::handshake_frame(&mut hs, &[])?;
        s.write_all(&m2).await?;
        let peer = if kind == LINK_XK {
            let m3 = read_hs(&mut s).await?;
            let h = hs.get_handshake_hash().to_vec();
            let payload = link::read_handshake(&mut hs, &m3)?;
            let rs = hs
                .get_remote_static()
                .ok_or_else(|| RelayError::Protocol("no remote static".into()))?;
            Some(link::xk_check_auth(&h, rs, &payload)?)
        } else {
            None
        };
        Ok::<_, RelayError>((hs, peer))
    };
    let (hs, peer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| RelayError::Timeout("link handshake"))??;
    Ok(spawn_channel(
        s,
        LinkTransport::new(hs)?,
        ChannelSetup {
            peer,
            we_opened: false,
            on_create: Some(on_create),
            stop: me.stop.clone(),
            env: me.env.clone(),
            // Relays are authenticated and carry many clients' circuits:
            // only client links get the per-address circuit rate.
            dos: if peer.is_none() { conn } else { None },
        },
    ))
}
