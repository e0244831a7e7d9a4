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

use allium_proto::cell::{Cell, CellCmd, DestroyReason};
use allium_proto::link::{self, LINK_NK, LINK_XK, LinkTransport, MAX_CELLS_PER_FRAME};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, trace};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::RelayError;

/// Cells queued toward one circuit before the channel stops reading.
pub const CIRC_QUEUE: usize = 256;
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
    pub inbox: mpsc::Receiver<Cell>,
    pub chan: ChannelHandle,
}

pub type CreateHandler = Arc<dyn Fn(NewCircuit) + Send + Sync>;

enum Ctrl {
    Register(u32, mpsc::Sender<Cell>, oneshot::Sender<bool>),
    Unregister(u32),
}

struct HandleInner {
    out: mpsc::Sender<Cell>,
    ctrl: mpsc::Sender<Ctrl>,
    peer: Option<[u8; 32]>,
    next_id: AtomicU32,
    high_bit: u32,
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
        self.inner
            .out
            .send(cell)
            .await
            .map_err(|_| RelayError::ChannelClosed)
    }

    /// Allocate a circuit id and register an inbox for it.
    pub async fn new_circuit(&self) -> Result<(u32, mpsc::Receiver<Cell>), RelayError> {
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
                .send(Ctrl::Register(id, tx, ack_tx))
                .await
                .map_err(|_| RelayError::ChannelClosed)?;
            if ack_rx.await.map_err(|_| RelayError::ChannelClosed)? {
                return Ok((id, rx));
            }
        }
        Err(RelayError::Protocol("no free circuit id".into()))
    }

    /// Forget a circuit (its inbox is dropped).
    pub fn unregister(&self, circ_id: u32) {
        let _ = self.inner.ctrl.try_send(Ctrl::Unregister(circ_id));
    }
}

/// The reactor's queues, borrowed by the `select!` arms.
struct ReactorIo {
    frames_in: mpsc::Receiver<Vec<u8>>,
    frames_out: mpsc::Sender<Vec<u8>>,
    cells_out: mpsc::Receiver<Cell>,
    ctrl: mpsc::Receiver<Ctrl>,
}

struct Reactor {
    transport: LinkTransport,
    circs: HashMap<u32, mpsc::Sender<Cell>>,
    pending: VecDeque<(u32, Cell)>,
    on_create: Option<CreateHandler>,
    handle: ChannelHandle,
    /// The high bit the peer's circuit ids carry.
    peer_high_bit: u32,
}

impl Reactor {
    fn dispatch(&mut self, cell: Cell) {
        let id = cell.circ_id;
        if let Some(tx) = self.circs.get(&id) {
            if !self.pending.is_empty() {
                self.pending.push_back((id, cell));
                return;
            }
            match tx.try_send(cell) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cell)) => self.pending.push_back((id, cell)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.circs.remove(&id);
                }
            }
            return;
        }
        match (cell.cmd, &self.on_create) {
            (CellCmd::CREATE, Some(_)) if self.circs.len() >= MAX_CIRCUITS_PER_CHANNEL => {
                debug!("CREATE refused: channel circuit limit");
                self.refuse(id);
            }
            (CellCmd::CREATE, Some(handler))
                if id != 0 && (id & 0x8000_0000) == self.peer_high_bit =>
            {
                let (tx, rx) = mpsc::channel(CIRC_QUEUE);
                self.circs.insert(id, tx);
                handler(NewCircuit {
                    circ_id: id,
                    create: cell,
                    inbox: rx,
                    chan: self.handle.clone(),
                });
            }
            (CellCmd::DESTROY | CellCmd::PADDING, _) => {}
            (cmd, _) => {
                debug!(?cmd, "cell for unknown circuit dropped");
            }
        }
    }

    /// Answer a refused CREATE with DESTROY, through the channel's own queue.
    fn refuse(&self, id: u32) {
        let _ = self
            .handle
            .inner
            .out
            .try_send(Cell::destroy(id, DestroyReason::RESOURCE_LIMIT));
    }

    fn flush_pending(&mut self) {
        while let Some((id, cell)) = self.pending.pop_front() {
            let Some(tx) = self.circs.get(&id) else {
                continue;
            };
            match tx.try_send(cell) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cell)) => {
                    self.pending.push_front((id, cell));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.circs.remove(&id);
                }
            }
        }
    }

    async fn run(
        mut self,
        mut io: ReactorIo,
        mut stop: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<(), RelayError> {
        let mut batch = Vec::with_capacity(MAX_CELLS_PER_FRAME);
        let mut opened = Vec::new();
        loop {
            self.flush_pending();
            let front = self
                .pending
                .front()
                .and_then(|(id, _)| self.circs.get(id).cloned());
            let blocked = front.is_some();
            let can_write = io.frames_out.capacity() > 0;
            tokio::select! {
                f = io.frames_in.recv(), if !blocked => {
                    let Some(f) = f else { return Ok(()) };
                    opened.clear();
                    self.transport.open_cells(&f, &mut opened)?;
                    for c in opened.drain(..) {
                        self.dispatch(c);
                    }
                }
                permit = async { front.expect("guarded").reserve_owned().await }, if blocked => {
                    if let Some((id, cell)) = self.pending.pop_front() {
                        match permit {
                            Ok(p) => { p.send(cell); }
                            Err(_) => { self.circs.remove(&id); }
                        }
                    }
                }
                c = io.cells_out.recv(), if can_write => {
                    let Some(c) = c else { return Ok(()) };
                    batch.clear();
                    batch.push(c);
                    while batch.len() < MAX_CELLS_PER_FRAME {
                        match io.cells_out.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    let mut frame = Vec::with_capacity(batch.len() * 514 + 18);
                    self.transport.seal_cells(&batch, &mut frame)?;
                    if io.frames_out.try_send(frame).is_err() {
                        return Err(RelayError::ChannelClosed);
                    }
                }
                p = io.frames_out.reserve(), if !can_write => {
                    if p.is_err() { return Err(RelayError::ChannelClosed); }
                }
                _ = async { match stop.as_mut() { Some(s) => { let _ = s.wait_for(|v| *v).await; } None => std::future::pending().await } } => {
                    return Ok(());
                }
                ctl = io.ctrl.recv() => match ctl {
                    Some(Ctrl::Register(id, tx, ack)) => {
                        let free = !self.circs.contains_key(&id);
                        if free { self.circs.insert(id, tx); }
                        let _ = ack.send(free);
                    }
                    Some(Ctrl::Unregister(id)) => { self.circs.remove(&id); }
                    None => return Ok(()),
                },
            }
        }
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

async fn reader_task(mut r: BufReader<OwnedReadHalf>, tx: mpsc::Sender<Vec<u8>>) {
    while let Ok(f) = read_frame(&mut r).await {
        if tx.send(f).await.is_err() {
            return;
        }
    }
}

async fn writer_task(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
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
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Start the three tasks of a channel over an established link.
fn spawn_channel(
    stream: TcpStream,
    transport: LinkTransport,
    peer: Option<[u8; 32]>,
    we_opened: bool,
    on_create: Option<CreateHandler>,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> ChannelHandle {
    let (r, w) = stream.into_split();
    let (fin_tx, fin_rx) = mpsc::channel(FRAME_QUEUE);
    let (fout_tx, fout_rx) = mpsc::channel(FRAME_QUEUE);
    let (out_tx, out_rx) = mpsc::channel(CHANNEL_QUEUE);
    let (ctrl_tx, ctrl_rx) = mpsc::channel(64);
    let high_bit = if we_opened { 0x8000_0000 } else { 0 };
    let handle = ChannelHandle {
        inner: Arc::new(HandleInner {
            out: out_tx,
            ctrl: ctrl_tx,
            peer,
            next_id: AtomicU32::new(1),
            high_bit,
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
        pending: VecDeque::new(),
        on_create,
        handle: handle.clone(),
        peer_high_bit: high_bit ^ 0x8000_0000,
    };
    let reader = tokio::spawn(
        reader_task(BufReader::with_capacity(128 * 1024, r), fin_tx).in_current_span(),
    );
    tokio::spawn(writer_task(w, fout_rx).in_current_span());
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

async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, RelayError> {
    let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
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
    let work = async {
        let mut s = connect_tcp(addr).await?;
        let mut hs = link::nk_initiator(&mut rand::rng(), guard_link_key)?;
        let mut m1 = vec![LINK_NK];
        m1.extend(link::handshake_frame(&mut hs, &[])?);
        s.write_all(&m1).await?;
        let m2 = read_hs(&mut s).await?;
        link::read_handshake(&mut hs, &m2)?;
        Ok::<_, RelayError>(spawn_channel(
            s,
            LinkTransport::new(hs)?,
            None,
            true,
            None,
            None,
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
        let mut s = connect_tcp(addr).await?;
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
            Some(peer_identity),
            true,
            on_create,
            me.stop.clone(),
        ))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| RelayError::Timeout("link handshake"))?
}

/// Responder side of either pattern.
pub async fn accept(
    mut s: TcpStream,
    me: &LinkIdentity,
    on_create: CreateHandler,
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
        peer,
        false,
        Some(on_create),
        me.stop.clone(),
    ))
}
