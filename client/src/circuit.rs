//! A client circuit: built hop by hop, then driven by one task that owns
//! the onion layers and the streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use allium_link::channel::{ChannelHandle, Inbox};
use allium_proto::Error as ProtoError;
use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason, HANDSHAKE_NTOR, PAYLOAD_LEN};
use allium_proto::circuit::{Circuit, Event, Side};
use allium_proto::flow::CircParams;
use allium_proto::ntor;
use allium_proto::onion::{ClientLayers, HopKeys, forward_capacity};
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg, TargetAddr};
use allium_proto::{ConsensusRelay, short_id};
use rand::RngExt;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;
use tracing::debug;

use crate::ClientError;
use crate::events::{CircWatch, StreamWatch, WriteCount};

const CMD_QUEUE: usize = 256;
const TAG_LEN: usize = 16;
/// Chunks a stream may have given its circuit and not yet seen sealed.
const SEND_ROOM: usize = 2;

/// What a stream receives from the exit.
#[derive(Debug)]
pub enum StreamData {
    Data(Vec<u8>),
    End(EndReason),
}

pub(crate) enum CircCmd {
    /// A stream to `addr:port` at the exit, or (`None`) to the last hop's
    /// directory cache.
    /// `early` goes right behind the BEGIN (optimistic data).
    Begin {
        to: Option<(TargetAddr, u16)>,
        early: Vec<u8>,
        reply: oneshot::Sender<Result<Stream, ClientError>>,
    },
    Resolve {
        host: String,
        reply: oneshot::Sender<Result<Vec<IpAddr>, ClientError>>,
    },
    Data(u16, Vec<u8>),
    /// The application took this many DATA messages of this stream.
    Consumed(u16, u32),
    /// This end closes the stream, for this reason (DONE: it sent all).
    End(u16, EndReason),
    /// A service accepts stream `u16` (CONNECTED), or refuses it.
    Accept(u16),
    Refuse(u16, EndReason),
    /// An onion service message for the last hop.
    Service(RelayMsg),
    /// The rendezvous point joined this circuit to the other end's.
    Join {
        /// Sent to the last hop just before joining (the service's
        /// RENDEZVOUS1).
        announce: Option<RelayMsg>,
        keys: HopKeys,
        params: CircParams,
        incoming: Option<mpsc::Sender<Incoming>>,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
}

/// A stream a client opened to this service: [`Incoming::accept`] it
/// (CONNECTED goes back) or drop it (END).
pub struct Incoming {
    pub stream: Stream,
    /// The port the client asked for.
    pub port: u16,
}

impl Incoming {
    /// Tell the client the stream is open, and take it.
    pub async fn accept(self) -> Result<Stream, ClientError> {
        self.stream
            .out
            .tx
            .send(CircCmd::Accept(self.stream.id))
            .await
            .map_err(|_| ClientError::CircuitClosed)?;
        Ok(self.stream)
    }

    /// Refuse the stream, saying why.
    pub async fn refuse(self, reason: EndReason) {
        let _ = self
            .stream
            .out
            .tx
            .send(CircCmd::Refuse(self.stream.id, reason))
            .await;
    }
}

/// An open stream through a circuit.
///
/// Sending hands the bytes to the circuit, which seals them as its
/// windows allow; a stream has at most [`SEND_ROOM`] chunks there not yet
/// sealed, so a stalled exit stops the application here. Received data
/// waits in the stream's queue (at most a stream window) until
/// [`Stream::recv`] takes it, and only then is the exit allowed to send more.
pub struct Stream {
    pub id: u16,
    /// What the exit sent, with the DATA cells it took.
    rx: mpsc::UnboundedReceiver<(StreamData, u32)>,
    /// Its sending half; its queue to the circuit carries the stream's
    /// other commands too.
    out: StreamSender,
    /// DATA messages taken but not yet reported to the circuit.
    unreported: u32,
    /// What its controllers see; CLOSED when the stream drops.
    watch: Option<StreamWatch>,
    /// The END it sends as it drops.
    end: EndReason,
}

/// Report consumption to the circuit in batches of this many cells.
const CONSUMED_BATCH: u32 = 10;

/// The sending half of a [`Stream`] ([`Stream::sender`]), to send while
/// the stream receives: an application that reads only after its writes
/// have gone (an echo, a protocol that answers as it reads) must get its
/// answer while a send waits for room, or neither end moves again. What
/// it sends once its stream has dropped goes nowhere.
#[derive(Clone)]
pub struct StreamSender {
    id: u16,
    tx: mpsc::Sender<CircCmd>,
    room: Arc<Semaphore>,
    count: Option<WriteCount>,
}

impl StreamSender {
    /// Send bytes toward the exit. Cancel safe: dropped before it
    /// returns, it has sent nothing.
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        let Ok(room) = self.room.acquire().await else {
            return Err(ClientError::CircuitClosed);
        };
        let Ok(slot) = self.tx.reserve().await else {
            return Err(ClientError::CircuitClosed);
        };
        room.forget();
        if let Some(c) = &self.count {
            c.wrote(data.len());
        }
        slot.send(CircCmd::Data(self.id, data.to_vec()));
        Ok(())
    }
}

impl Stream {
    /// Report this stream's traffic and end to its controllers.
    pub(crate) fn watch(&mut self, w: StreamWatch) {
        self.out.count = Some(w.write_count());
        self.watch = Some(w);
    }

    /// A stream of the circuit that `tx` commands, with `room` for its
    /// chunks there.
    fn new(
        id: u16,
        rx: mpsc::UnboundedReceiver<(StreamData, u32)>,
        tx: mpsc::Sender<CircCmd>,
        room: Arc<Semaphore>,
    ) -> Self {
        Stream {
            id,
            rx,
            out: StreamSender {
                id,
                tx,
                room,
                count: None,
            },
            unreported: 0,
            watch: None,
            end: EndReason::DONE,
        }
    }

    /// Send bytes toward the exit (cancel safe, as [`StreamSender::send`]).
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientError> {
        self.out.send(data).await
    }

    /// Its sending half, to send while receiving.
    pub fn sender(&self) -> StreamSender {
        self.out.clone()
    }

    /// The next data from the exit (what arrived together, in one piece),
    /// or its END; `None` if the circuit died. Cancel safe (as in a
    /// `select!` beside a read from the application): dropped before it
    /// returns, it has taken nothing.
    pub async fn recv(&mut self) -> Option<StreamData> {
        self.report().await;
        let (d, cells) = self.rx.recv().await?;
        self.taken(&d, cells);
        Some(d)
    }

    /// Like [`Stream::recv`], without waiting for data.
    pub async fn try_recv(&mut self) -> Option<StreamData> {
        self.report().await;
        let (d, cells) = self.rx.try_recv().ok()?;
        self.taken(&d, cells);
        Some(d)
    }

    fn taken(&mut self, d: &StreamData, cells: u32) {
        if let Some(w) = &mut self.watch {
            match d {
                StreamData::Data(d) => w.read(d.len()),
                StreamData::End(r) => w.ended_by_exit(*r),
            }
        }
        self.unreported += cells;
    }

    /// Tell the circuit what was handed on since the last report: in
    /// batches, and whenever nothing more is waiting. What was taken is
    /// counted as reported only once the report is sent, and the report
    /// is made before the next data is taken, never after (a wait for
    /// room in the circuit's queue there would hold data that a cancelled
    /// [`Stream::recv`] loses).
    async fn report(&mut self) {
        let n = self.unreported;
        if n > 0
            && (n >= CONSUMED_BATCH || self.rx.is_empty())
            && self
                .out
                .tx
                .send(CircCmd::Consumed(self.id, n))
                .await
                .is_ok()
        {
            self.unreported = 0;
        }
    }

    /// A stream on no circuit, for tests: what arrives is sent on the
    /// first channel, what it asks of its circuit arrives on the second.
    #[cfg(test)]
    pub(crate) fn detached(
        id: u16,
    ) -> (
        Self,
        mpsc::UnboundedSender<(StreamData, u32)>,
        mpsc::Receiver<CircCmd>,
    ) {
        let (data_tx, rx) = mpsc::unbounded_channel();
        let (tx, cmd_rx) = mpsc::channel(64);
        let room = Arc::new(Semaphore::new(SEND_ROOM));
        (Stream::new(id, rx, tx, room), data_tx, cmd_rx)
    }

    /// Its room for chunks at the circuit, for tests (which seal nothing).
    #[cfg(test)]
    pub(crate) fn room(&self) -> Arc<Semaphore> {
        self.out.room.clone()
    }

    /// End the stream with `reason` rather than DONE: this end could not
    /// send all (its application's connection failed), and the far end
    /// must not take what it got for the whole.
    pub fn end_with(mut self, reason: EndReason) {
        self.end = reason;
    }
}

impl Drop for Stream {
    /// END goes out after what the stream sent: behind its commands in the
    /// circuit's queue, waiting for room there if the queue is full (a
    /// dropped END would leave the exit's connection open for good).
    fn drop(&mut self) {
        use mpsc::error::TrySendError;
        let end = CircCmd::End(self.id, self.end);
        if let Err(TrySendError::Full(end)) = self.out.tx.try_send(end)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let tx = self.out.tx.clone();
            rt.spawn(async move {
                let _ = tx.send(end).await;
            });
        }
    }
}

/// A handle to a built circuit.
#[derive(Clone)]
pub struct CircuitHandle {
    tx: mpsc::Sender<CircCmd>,
    /// The circuit's id: unique within its client, and the id its
    /// controllers know it by.
    pub serial: u64,
    /// Guard, middle, exit.
    pub path: Vec<ConsensusRelay>,
    /// Has a stream or resolve on it been judged for path bias?
    used: Arc<AtomicBool>,
    /// The circuit's congestion window, as its task last saw it.
    cwnd: Arc<AtomicU32>,
    /// The last hop's [`HopKeys::binding`].
    pub binding: [u8; 32],
    /// Onion service messages from the last hop, for whoever takes them.
    service_rx: Arc<std::sync::Mutex<Option<mpsc::Receiver<RelayMsg>>>>,
}

impl CircuitHandle {
    /// DATA cells this client may have in flight toward the last hop (its
    /// congestion window; it grows only with what the client sends).
    pub fn cwnd(&self) -> u32 {
        self.cwnd.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// True the first time only, over every clone: the caller judges the
    /// circuit's first use for path bias.
    pub fn first_use(&self) -> bool {
        !self.used.swap(true, Ordering::Relaxed)
    }

    /// A stream to `addr:port` at the exit.
    ///
    /// `early` is sent right behind the BEGIN, before the exit has
    /// connected (optimistic data: an application's request costs no
    /// round trip of its own); the exit drops it if it cannot connect.
    pub async fn begin(
        &self,
        addr: TargetAddr,
        port: u16,
        early: Vec<u8>,
    ) -> Result<Stream, ClientError> {
        self.open(Some((addr, port)), early).await
    }

    /// Run `talk` (an HTTP exchange) on a byte stream to the last hop's
    /// directory cache. What it writes before the stream is open, its
    /// request, goes right behind the BEGIN_DIR (optimistic data): the
    /// answer comes a round trip sooner than after CONNECTED. `Err` if
    /// the BEGIN_DIR failed, whatever `talk` made of the stream closing.
    pub async fn dir_talk<T, F, Fut>(&self, talk: F) -> Result<T, ClientError>
    where
        F: FnOnce(tokio::io::DuplexStream) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        use tokio::io::AsyncReadExt;
        let (app, mut net) = tokio::io::duplex(64 * 1024);
        let (failed, mut why) = oneshot::channel();
        let circ = self.clone();
        tokio::spawn(
            async move {
                let mut early = vec![0u8; crate::socks::MAX_EARLY];
                let mut n = net.read(&mut early).await.unwrap_or(0);
                // And what followed at once (a body written apart).
                while n < early.len() {
                    match tokio::time::timeout(Duration::ZERO, net.read(&mut early[n..])).await {
                        Ok(Ok(k)) if k > 0 => n += k,
                        _ => break,
                    }
                }
                early.truncate(n);
                match circ.open(None, early).await {
                    Ok(stream) => {
                        let _ = crate::socks::relay_bytes(net, stream).await;
                    }
                    // Sent before `net` drops, so `talk` ends after it.
                    Err(e) => {
                        let _ = failed.send(e);
                    }
                }
            }
            .in_current_span(),
        );
        let r = talk(app).await;
        match why.try_recv() {
            Ok(e) => Err(e),
            Err(_) => Ok(r),
        }
    }

    async fn open(
        &self,
        to: Option<(TargetAddr, u16)>,
        early: Vec<u8>,
    ) -> Result<Stream, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CircCmd::Begin { to, early, reply })
            .await
            .map_err(|_| ClientError::CircuitClosed)?;
        rx.await.map_err(|_| ClientError::CircuitClosed)?
    }

    /// Send an onion service message to the last hop.
    pub async fn send_service(&self, msg: RelayMsg) -> Result<(), ClientError> {
        self.tx
            .send(CircCmd::Service(msg))
            .await
            .map_err(|_| ClientError::CircuitClosed)
    }

    /// The onion service messages the last hop sends (once: the first
    /// caller takes them).
    pub fn service_messages(&self) -> Option<mpsc::Receiver<RelayMsg>> {
        self.service_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The rendezvous point joined this circuit to the other end's, and
    /// the end-to-end handshake gave `keys` (as this end sees them) and
    /// `params`: streams now go to the other end. A service passes
    /// `incoming`, where the streams clients open arrive.
    pub async fn join(
        &self,
        keys: HopKeys,
        params: CircParams,
        incoming: Option<mpsc::Sender<Incoming>>,
    ) -> Result<(), ClientError> {
        self.join_inner(None, keys, params, incoming).await
    }

    /// Send `announce` to the last hop and join at once (a service's
    /// RENDEZVOUS1: the client's first stream may follow its RENDEZVOUS2
    /// at any time).
    pub async fn join_after(
        &self,
        announce: RelayMsg,
        keys: HopKeys,
        params: CircParams,
        incoming: Option<mpsc::Sender<Incoming>>,
    ) -> Result<(), ClientError> {
        self.join_inner(Some(announce), keys, params, incoming)
            .await
    }

    async fn join_inner(
        &self,
        announce: Option<RelayMsg>,
        keys: HopKeys,
        params: CircParams,
        incoming: Option<mpsc::Sender<Incoming>>,
    ) -> Result<(), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CircCmd::Join {
                announce,
                keys,
                params,
                incoming,
                reply,
            })
            .await
            .map_err(|_| ClientError::CircuitClosed)?;
        rx.await.map_err(|_| ClientError::CircuitClosed)?
    }

    pub async fn resolve(&self, host: String) -> Result<Vec<IpAddr>, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CircCmd::Resolve { host, reply })
            .await
            .map_err(|_| ClientError::CircuitClosed)?;
        rx.await.map_err(|_| ClientError::CircuitClosed)?
    }
}

fn relay_cell(circ_id: CircId, payload: Box<[u8; PAYLOAD_LEN]>) -> Cell {
    Cell {
        circ_id,
        cmd: CellCmd::RELAY,
        payload,
    }
}

async fn expect_cell(rx: &mut Inbox) -> Result<Cell, ClientError> {
    rx.recv()
        .await
        .ok_or_else(|| ClientError::Build("channel closed".into()))
}

/// A message for hop `hop`, padded with random bytes up to that hop's
/// capacity (so the hop cannot tell its depth from where zeros end), and
/// sealed with the circuit's layers.
fn seal_padded(
    layers: &mut ClientLayers,
    hop: usize,
    sid: u16,
    msg: &RelayMsg,
) -> Result<Box<[u8; PAYLOAD_LEN]>, ClientError> {
    let cap = forward_capacity(hop);
    let mut payload = Box::new([0u8; PAYLOAD_LEN]);
    let len = msg.encode_into(sid, &mut payload[TAG_LEN..TAG_LEN + cap])?;
    rand::rng().fill(&mut payload[TAG_LEN + len..TAG_LEN + cap]);
    layers.encrypt_forward_in_place(hop, &mut payload)?;
    Ok(payload)
}

/// A circuit build that failed, and how far it got.
#[derive(Debug)]
pub struct BuildFailure {
    /// Hops built before the failure: 0 if the guard never answered the
    /// CREATE. Everything past the first hop reached the client through
    /// the guard, so whichever hop it names, the guard may have caused it.
    pub hops: usize,
    pub error: ClientError,
}

/// Build a circuit through `path` over `chan` (a channel to `path[0]`).
/// `watch` (the circuit's id, launched) is told when the built circuit
/// closes; a failed build is the caller's to report.
pub(crate) async fn build(
    chan: ChannelHandle,
    path: Vec<ConsensusRelay>,
    timeout: Duration,
    params: CircParams,
    watch: CircWatch,
) -> Result<CircuitHandle, BuildFailure> {
    let mut hops = 0;
    build_counting(chan, path, timeout, params, watch, &mut hops)
        .await
        .map_err(|error| BuildFailure { hops, error })
}

async fn build_counting(
    chan: ChannelHandle,
    path: Vec<ConsensusRelay>,
    timeout: Duration,
    params: CircParams,
    watch: CircWatch,
    hops: &mut usize,
) -> Result<CircuitHandle, ClientError> {
    let (circ_id, mut rx) = chan.new_circuit().await?;
    let work = async {
        let mut layers = ClientLayers::new();
        let first = &path[0];
        let (mut st, hs) =
            ntor::client_start(&mut rand::rng(), &first.identity, &first.onion_key, params);
        chan.send(Cell::new(
            circ_id,
            CellCmd::CREATE,
            &cell::encode_create(HANDSHAKE_NTOR, &hs),
        )?)
        .await?;
        // Half of the key agreement, while the CREATE travels.
        st.prepare();
        let c = expect_cell(&mut rx).await?;
        if c.cmd != CellCmd::CREATED {
            return Err(ClientError::Build(format!("guard answered {:?}", c.cmd)));
        }
        let (keys, mut agreed) = st.finish(cell::decode_created(&c.payload[..])?)?;
        layers.push(&keys)?;
        *hops = 1;
        for hop in &path[1..] {
            let (mut st, hs) =
                ntor::client_start(&mut rand::rng(), &hop.identity, &hop.onion_key, params);
            let last = layers.len() - 1;
            let msg = RelayMsg::Extend(Extend {
                identity: hop.identity,
                link_key: hop.link_key,
                addr: hop.addr,
                htype: HANDSHAKE_NTOR,
                hdata: hs,
            });
            // EXTEND goes in RELAY_EARLY, which every relay counts.
            let payload = seal_padded(&mut layers, last, 0, &msg)?;
            chan.send(Cell {
                circ_id,
                cmd: CellCmd::RELAY_EARLY,
                payload,
            })
            .await?;
            st.prepare();
            let mut c = expect_cell(&mut rx).await?;
            if c.cmd != CellCmd::RELAY {
                return Err(ClientError::Build(format!(
                    "extend to {} answered {:?}",
                    hop.nickname, c.cmd
                )));
            }
            let from = layers.decrypt_backward(&mut c.payload)?;
            match RelayMsg::decode(&c.payload[16..])? {
                (0, RelayMsg::Extended(h)) if from == last => {
                    let keys;
                    (keys, agreed) = st.finish(&h)?;
                    layers.push(&keys)?;
                    *hops = layers.len();
                }
                (_, RelayMsg::Truncated(r)) => {
                    return Err(ClientError::ExtendFailed {
                        relay: hop.identity,
                        why: format!("extend to {} failed: {:?}", hop.nickname, DestroyReason(r)),
                    });
                }
                (_, m) => {
                    return Err(ClientError::Build(format!(
                        "unexpected {:?} while extending",
                        m.cmd()
                    )));
                }
            }
        }
        // Streams go to the last hop: what it agreed governs their DATA.
        Ok((layers, agreed))
    };
    let (layers, params) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            let _ = chan
                .send(Cell::destroy(circ_id, DestroyReason::FINISHED))
                .await;
            chan.unregister(circ_id);
            return Err(e);
        }
        Err(_) => {
            let _ = chan
                .send(Cell::destroy(circ_id, DestroyReason::TIMEOUT))
                .await;
            chan.unregister(circ_id);
            return Err(ClientError::Timeout("circuit build"));
        }
    };
    debug!(path = %path.iter().map(|r| short_id(&r.identity)).collect::<Vec<_>>().join(","), "circuit built");
    let (tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
    let core = Circuit::client(&mut rand::rng(), layers, params)?;
    let binding = core.binding();
    let (service_tx, service_rx) = mpsc::channel(SERVICE_QUEUE);
    let cwnd = Arc::new(AtomicU32::new(core.cwnd()));
    watch.built(&path);
    let serial = watch.id();
    let task = CircTask {
        watch,
        remote_reason: None,
        core,
        cwnd: cwnd.clone(),
        chan,
        circ_id,
        rx,
        cmd_rx,
        cmd_tx: tx.downgrade(),
        streams: HashMap::new(),
        pending: HashMap::new(),
        resolving: HashMap::new(),
        cells_in: Vec::new(),
        out: Vec::new(),
        service_tx,
        incoming: None,
    };
    tokio::spawn(task.run().in_current_span());
    Ok(CircuitHandle {
        tx,
        serial,
        path,
        used: Arc::default(),
        cwnd,
        binding,
        service_rx: Arc::new(std::sync::Mutex::new(Some(service_rx))),
    })
}

/// A BEGIN awaiting CONNECTED: who to tell, and the stream's inbox.
type PendingStream = (
    oneshot::Sender<Result<Stream, ClientError>>,
    mpsc::UnboundedReceiver<(StreamData, u32)>,
);

/// A stream as its circuit task sees it.
struct StreamEntry {
    /// Unbounded by type; bounded by the stream window, which the exit
    /// may not exceed (a cell past it closes the circuit).
    tx: mpsc::UnboundedSender<(StreamData, u32)>,
    /// Room for chunks at the circuit, shared with [`Stream::send`].
    room: Arc<Semaphore>,
    /// Chunks given to the core and not yet sealed.
    unsealed: usize,
}

impl Drop for StreamEntry {
    fn drop(&mut self) {
        self.room.close();
    }
}

/// The client's circuit task: a driver around the circuit core.
struct CircTask {
    /// Told when the circuit closes.
    watch: CircWatch,
    /// What the relay that destroyed the circuit said.
    remote_reason: Option<DestroyReason>,
    core: Circuit,
    cwnd: Arc<AtomicU32>,
    chan: ChannelHandle,
    circ_id: CircId,
    rx: Inbox,
    cmd_rx: mpsc::Receiver<CircCmd>,
    cmd_tx: mpsc::WeakSender<CircCmd>,
    streams: HashMap<u16, StreamEntry>,
    pending: HashMap<u16, PendingStream>,
    resolving: HashMap<u16, oneshot::Sender<Result<Vec<IpAddr>, ClientError>>>,
    /// Cells taken from the inbox, being handled.
    cells_in: Vec<Cell>,
    /// Cells for the guard, sent as one batch after every event.
    out: Vec<Cell>,
    /// Onion service messages from the last hop (dropped when full).
    service_tx: mpsc::Sender<RelayMsg>,
    /// A service's circuit: where clients' streams go.
    incoming: Option<mpsc::Sender<Incoming>>,
}

/// Onion service messages queued for their taker at most.
const SERVICE_QUEUE: usize = 64;

/// Commands handled per wake-up at most (then the batch is sent).
const CMD_BATCH: usize = 128;

/// The DESTROY reason for a circuit that failed with `e`.
fn destroy_reason(e: &ProtoError) -> DestroyReason {
    match e {
        ProtoError::CellAuth => DestroyReason::CELL_AUTH,
        ProtoError::PeerMisbehaved(p) => p.destroy_reason(),
        _ => DestroyReason::PROTOCOL,
    }
}

impl CircTask {
    async fn run(mut self) {
        let reason = loop {
            let r = tokio::select! {
                ok = self.rx.recv_batch(&mut self.cells_in) => {
                    if !ok {
                        break DestroyReason::CHANNEL_CLOSED;
                    }
                    self.on_cells()
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => break DestroyReason::FINISHED,
                    Some(cmd) => self.on_cmds(cmd),
                },
            };
            // What authenticated before an error still reaches its stream.
            let drained = self.drain();
            let r = r.and(drained);
            self.cwnd.store(self.core.cwnd(), Ordering::Relaxed);
            if let Err(reason) = r {
                break reason;
            }
            if !self.out.is_empty()
                && self
                    .chan
                    .send_batch(std::mem::take(&mut self.out))
                    .await
                    .is_err()
            {
                break DestroyReason::CHANNEL_CLOSED;
            }
        };
        debug!(?reason, "circuit closed");
        // Mark the circuit closed before telling its streams, so that no
        // new stream picks it meanwhile.
        self.cmd_rx.close();
        if reason != DestroyReason::CHANNEL_CLOSED && reason != DestroyReason::DESTROYED {
            self.chan.destroy(self.circ_id, reason);
        } else {
            self.chan.unregister(self.circ_id);
        }
        for (_, (reply, _)) in self.pending.drain() {
            let _ = reply.send(Err(ClientError::CircuitClosed));
        }
        for (_, st) in self.streams.drain() {
            let _ = st.tx.send((StreamData::End(EndReason::DESTROY), 0));
        }
        self.watch.closed(reason, self.remote_reason);
    }

    fn on_cells(&mut self) -> Result<(), DestroyReason> {
        let now = Instant::now();
        let mut r = Ok(());
        for c in self.cells_in.drain(..) {
            if let Err(e) = self.core.handle_cell(now, Side::Next, c) {
                debug!("circuit failed: {e}");
                r = Err(destroy_reason(&e));
                break;
            }
        }
        self.cells_in.clear();
        r
    }

    /// Handle a command and those queued behind it, [`CMD_BATCH`] in all
    /// at most: each taken from the queue is handled in the same turn.
    fn on_cmds(&mut self, first: CircCmd) -> Result<(), DestroyReason> {
        let now = Instant::now();
        let mut first = Some(first);
        for _ in 0..CMD_BATCH {
            let Some(cmd) = first.take().or_else(|| self.cmd_rx.try_recv().ok()) else {
                break;
            };
            if let Err(e) = self.on_cmd(now, cmd) {
                debug!("circuit command failed: {e}");
                return Err(DestroyReason::INTERNAL);
            }
        }
        Ok(())
    }

    fn on_cmd(&mut self, now: Instant, cmd: CircCmd) -> Result<(), ProtoError> {
        match cmd {
            CircCmd::Begin { to, early, reply } => {
                let opened = match to {
                    Some((addr, port)) => self.core.begin(addr, port),
                    None => self.core.begin_dir(),
                };
                let sid = match opened {
                    Ok(sid) => sid,
                    Err(e @ ProtoError::TooLarge { .. }) => {
                        let _ = reply.send(Err(ClientError::Build(e.to_string())));
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let entry = StreamEntry {
                    tx,
                    room: Arc::new(Semaphore::new(SEND_ROOM)),
                    unsealed: 0,
                };
                self.streams.insert(sid, entry);
                self.pending.insert(sid, (reply, rx));
                // Bounded by the caller; it took no room permit, so none
                // comes back when it is sealed.
                if !early.is_empty() {
                    self.core.send(now, sid, &early)?;
                }
            }
            CircCmd::Resolve { host, reply } => match self.core.resolve(host) {
                Ok(sid) => {
                    self.resolving.insert(sid, reply);
                }
                Err(e @ ProtoError::TooLarge { .. }) => {
                    let _ = reply.send(Err(ClientError::Build(e.to_string())));
                }
                Err(e) => return Err(e),
            },
            CircCmd::Data(sid, d) => {
                let Some(st) = self.streams.get_mut(&sid) else {
                    return Ok(());
                };
                match self.core.send(now, sid, &d) {
                    Ok(true) => st.room.add_permits(1),
                    Ok(false) => st.unsealed += 1,
                    // The exit ended the stream meanwhile.
                    Err(ProtoError::UnknownStream(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            CircCmd::Consumed(sid, n) => self.core.consumed(sid, n)?,
            CircCmd::Accept(sid) => self.core.connected(sid, None)?,
            CircCmd::Refuse(sid, reason) => {
                self.streams.remove(&sid);
                self.core.end(sid, reason)?;
            }
            CircCmd::Service(msg) => self.core.send_service(&msg)?,
            CircCmd::Join {
                announce,
                keys,
                params,
                incoming,
                reply,
            } => {
                if let Some(m) = announce {
                    self.core.send_service(&m)?;
                }
                let r = self.core.join_end_to_end(&keys, params, incoming.is_some());
                if r.is_ok() {
                    self.incoming = incoming;
                }
                let _ = reply.send(r.map_err(ClientError::from));
            }
            CircCmd::End(sid, reason) => {
                self.pending.remove(&sid);
                self.streams.remove(&sid);
                self.resolving.remove(&sid);
                self.core.end(sid, reason)?;
            }
        }
        Ok(())
    }

    /// Take what the core has to send and to tell.
    fn drain(&mut self) -> Result<(), DestroyReason> {
        while let Some(t) = self.core.poll_transmit() {
            self.out.push(relay_cell(self.circ_id, t.payload));
        }
        while let Some(ev) = self.core.poll_event() {
            self.on_event(ev)?;
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event) -> Result<(), DestroyReason> {
        match ev {
            Event::Connected { stream: sid, .. } => {
                let (Some((reply, rx)), Some(st)) =
                    (self.pending.remove(&sid), self.streams.get(&sid))
                else {
                    return Ok(());
                };
                let tx = self.cmd_tx.upgrade().ok_or(DestroyReason::FINISHED)?;
                let stream = Stream::new(sid, rx, tx, st.room.clone());
                if let Err(Ok(s)) = reply.send(Ok(stream)) {
                    drop(s);
                }
            }
            Event::Resolved { stream, addrs } => {
                if let Some(reply) = self.resolving.remove(&stream) {
                    let _ = reply.send(if addrs.is_empty() {
                        Err(ClientError::StreamEnded(EndReason::RESOLVE_FAILED))
                    } else {
                        Ok(addrs.into_iter().map(|(a, _)| a).collect())
                    });
                }
            }
            Event::Data {
                stream,
                data,
                cells,
            } => {
                if let Some(st) = self.streams.get(&stream) {
                    let _ = st.tx.send((StreamData::Data(data), cells));
                }
            }
            Event::Sent { stream } => {
                if let Some(st) = self.streams.get_mut(&stream) {
                    st.room.add_permits(std::mem::take(&mut st.unsealed));
                }
            }
            Event::End { stream, reason } => {
                if let Some((reply, _)) = self.pending.remove(&stream) {
                    let _ = reply.send(Err(ClientError::StreamEnded(reason)));
                }
                if let Some(st) = self.streams.remove(&stream) {
                    let _ = st.tx.send((StreamData::End(reason), 0));
                }
            }
            Event::Destroyed { reason, .. } => {
                self.remote_reason = Some(reason);
                return Err(DestroyReason::DESTROYED);
            }
            // Not asked for by this client: dropped.
            Event::Echo(_) => {}
            Event::Service(msg) => {
                let _ = self.service_tx.try_send(msg);
            }
            // A client opens a stream to this service.
            Event::Begin { stream, port, .. } if self.incoming.is_some() => {
                let (tx, rx) = mpsc::unbounded_channel();
                let room = Arc::new(Semaphore::new(SEND_ROOM));
                self.streams.insert(
                    stream,
                    StreamEntry {
                        tx,
                        room: room.clone(),
                        unsealed: 0,
                    },
                );
                let tx = self.cmd_tx.upgrade().ok_or(DestroyReason::FINISHED)?;
                let s = Stream::new(stream, rx, tx, room);
                let incoming = self.incoming.as_ref().expect("checked by the guard");
                // A service that takes no more streams: the stream ends
                // as it drops.
                let _ = incoming.try_send(Incoming { stream: s, port });
            }
            // Only a relay's core asks these.
            Event::Begin { .. }
            | Event::BeginDir { .. }
            | Event::Resolve { .. }
            | Event::Extend(_)
            | Event::Truncated => {
                return Err(DestroyReason::INTERNAL);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_proto::onion::{HopKeys, Peeled, RelayLayer};

    /// A `recv` dropped while it waits to report what was taken (the
    /// circuit's queue full), as a `select!` beside a read from the
    /// application drops it, takes nothing with it: the data that was
    /// waiting comes with the next `recv`.
    #[tokio::test]
    async fn a_cancelled_recv_loses_no_data() {
        let (mut s, data, mut cmds) = Stream::detached(1);
        let got = |d: Option<StreamData>| match d {
            Some(StreamData::Data(d)) => d,
            _ => panic!("no data"),
        };
        data.send((StreamData::Data(b"a".to_vec()), CONSUMED_BATCH))
            .unwrap();
        assert_eq!(got(s.recv().await), b"a");
        // The circuit's queue is full; more data arrives.
        while s.out.tx.try_send(CircCmd::Consumed(1, 0)).is_ok() {}
        data.send((StreamData::Data(b"c".to_vec()), 1)).unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(50), s.recv()).await;
        assert!(wait.is_err(), "the report waits for room");
        // Room again: the report goes, then the data that waited.
        while cmds.try_recv().is_ok() {}
        let next = tokio::time::timeout(Duration::from_secs(5), s.recv()).await;
        assert_eq!(got(next.expect("the data that waited")), b"c");
        let reported = cmds.try_recv().expect("a report");
        assert!(matches!(reported, CircCmd::Consumed(1, n) if n == CONSUMED_BATCH));
    }

    #[test]
    fn an_extend_is_padded_with_random_bytes() {
        let keys: Vec<HopKeys> = (1..=2u8).map(|i| HopKeys::from_bytes(&[i; 64])).collect();
        let mut layers = ClientLayers::new();
        let mut relays: Vec<RelayLayer> = keys.iter().map(RelayLayer::new).collect();
        for k in &keys {
            layers.push(k).unwrap();
        }
        let msg = RelayMsg::Extend(Extend {
            identity: [1; 32],
            link_key: allium_proto::LinkKey([2; 32]),
            addr: "127.0.0.1:9".parse().unwrap(),
            htype: HANDSHAKE_NTOR,
            hdata: vec![3; 84],
        });
        let mut p = seal_padded(&mut layers, 1, 0, &msg).unwrap();
        assert_eq!(
            relays[0].peel_forward(&mut p, true).unwrap(),
            Peeled::Forward
        );
        assert_eq!(
            relays[1].peel_forward(&mut p, false).unwrap(),
            Peeled::Deliver
        );
        let (_, got) = RelayMsg::decode(&p[TAG_LEN..]).unwrap();
        assert_eq!(got, msg);
        let len = msg.encode_into(0, &mut [0u8; PAYLOAD_LEN]).unwrap();
        let tail = &p[TAG_LEN + len..];
        let zeros = tail.iter().filter(|&&b| b == 0).count();
        assert!(
            zeros < 16,
            "{zeros} zero bytes in {} of padding",
            tail.len()
        );
    }
}
