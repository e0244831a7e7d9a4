//! A client circuit: built hop by hop, then driven by one task that owns
//! the onion layers and the streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use std::sync::Arc;

use allium_link::channel::{ChannelHandle, Inbox};
use allium_proto::cell::{self, Cell, CellCmd, DestroyReason, HANDSHAKE_NTOR, PAYLOAD_LEN};
use allium_proto::flow::{
    CIRC_INCREMENT, CIRC_WINDOW, CircRecvWindow, CircSendWindow, STREAM_INCREMENT, STREAM_WINDOW,
    StreamWindow,
};
use allium_proto::ntor;
use allium_proto::onion::{ClientLayers, forward_capacity};
use allium_proto::relaymsg::{EndReason, Extend, HEADER_LEN, RelayMsg, TargetAddr};
use allium_proto::{ConsensusRelay, short_id};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;
use tracing::debug;

use crate::ClientError;

/// Payload bytes one forward DATA message carries on a 3-hop circuit.
pub const DATA_MAX: usize = forward_capacity(2) - HEADER_LEN;
const CMD_QUEUE: usize = 256;
const TAG_LEN: usize = 16;

/// What a stream receives from the exit.
#[derive(Debug)]
pub enum StreamData {
    Data(Vec<u8>),
    End(EndReason),
}

enum CircCmd {
    Begin {
        addr: TargetAddr,
        port: u16,
        reply: oneshot::Sender<Result<Stream, ClientError>>,
    },
    Resolve {
        host: String,
        reply: oneshot::Sender<Result<Vec<IpAddr>, ClientError>>,
    },
    Data(u16, Vec<u8>),
    /// The application took this many DATA messages of this stream.
    Consumed(u16, u32),
    End(u16),
}

/// An open stream through a circuit.
///
/// Sending waits for room in the stream's and the circuit's windows, so a
/// stalled exit stops the application here. Received data waits in the
/// stream's queue (at most a stream window) until [`Stream::recv`] takes it,
/// and only then is the exit allowed to send more.
pub struct Stream {
    pub id: u16,
    /// What the exit sent, with the DATA cells it took.
    rx: mpsc::UnboundedReceiver<(StreamData, u32)>,
    tx: mpsc::Sender<CircCmd>,
    window: Arc<Semaphore>,
    circ_window: Arc<Semaphore>,
    /// DATA messages taken but not yet reported to the circuit.
    unreported: u32,
}

/// Report consumption to the circuit in batches of this many cells.
const CONSUMED_BATCH: u32 = 10;

impl Stream {
    /// Send bytes toward the exit (split into DATA messages).
    pub async fn send(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(DATA_MAX) {
            let a = self
                .window
                .acquire()
                .await
                .map_err(|_| ClientError::CircuitClosed)?;
            let b = self
                .circ_window
                .acquire()
                .await
                .map_err(|_| ClientError::CircuitClosed)?;
            a.forget();
            b.forget();
            self.tx
                .send(CircCmd::Data(self.id, chunk.to_vec()))
                .await
                .map_err(|_| ClientError::CircuitClosed)?;
        }
        Ok(())
    }

    /// The next data from the exit (what arrived together, in one piece),
    /// or its END; `None` if the circuit died.
    pub async fn recv(&mut self) -> Option<StreamData> {
        let (d, cells) = self.rx.recv().await?;
        self.taken(cells).await;
        Some(d)
    }

    /// Like [`Stream::recv`], without waiting.
    pub async fn try_recv(&mut self) -> Option<StreamData> {
        let (d, cells) = self.rx.try_recv().ok()?;
        self.taken(cells).await;
        Some(d)
    }

    async fn taken(&mut self, cells: u32) {
        if cells > 0 {
            self.unreported += cells;
            // Report in batches, and whenever nothing more is waiting.
            if self.unreported >= CONSUMED_BATCH || self.rx.is_empty() {
                let n = std::mem::take(&mut self.unreported);
                let _ = self.tx.send(CircCmd::Consumed(self.id, n)).await;
            }
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.tx.try_send(CircCmd::End(self.id));
    }
}

static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A handle to a built circuit.
#[derive(Clone)]
pub struct CircuitHandle {
    tx: mpsc::Sender<CircCmd>,
    /// Unique within this process, for logs and tests.
    pub serial: u64,
    /// Guard, middle, exit.
    pub path: Vec<ConsensusRelay>,
}

impl CircuitHandle {
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub async fn begin(&self, addr: TargetAddr, port: u16) -> Result<Stream, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(CircCmd::Begin { addr, port, reply })
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

fn relay_cell(circ_id: u32, payload: Box<[u8; PAYLOAD_LEN]>) -> Cell {
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

/// Build a circuit through `path` over `chan` (a channel to `path[0]`).
pub async fn build(
    chan: ChannelHandle,
    path: Vec<ConsensusRelay>,
    timeout: Duration,
) -> Result<CircuitHandle, ClientError> {
    let (circ_id, mut rx) = chan.new_circuit().await?;
    let work = async {
        let mut layers = ClientLayers::new();
        let first = &path[0];
        let (st, hs) = ntor::client_start(&mut rand::rng(), &first.identity, &first.onion_key);
        chan.send(Cell::new(
            circ_id,
            CellCmd::CREATE,
            &cell::encode_create(HANDSHAKE_NTOR, &hs),
        )?)
        .await?;
        let c = expect_cell(&mut rx).await?;
        if c.cmd != CellCmd::CREATED {
            return Err(ClientError::Build(format!("guard answered {:?}", c.cmd)));
        }
        layers.push(&st.finish(cell::decode_created(&c.payload[..])?)?)?;
        for hop in &path[1..] {
            let (st, hs) = ntor::client_start(&mut rand::rng(), &hop.identity, &hop.onion_key);
            let last = layers.len() - 1;
            let msg = RelayMsg::Extend(Extend {
                identity: hop.identity,
                link_key: hop.link_key,
                addr: hop.addr,
                htype: HANDSHAKE_NTOR,
                hdata: hs,
            })
            .encode(0, forward_capacity(last))?;
            chan.send(relay_cell(circ_id, layers.encrypt_forward(last, &msg)?))
                .await?;
            let mut c = expect_cell(&mut rx).await?;
            if c.cmd != CellCmd::RELAY {
                return Err(ClientError::Build(format!(
                    "extend to {} answered {:?}",
                    hop.nickname, c.cmd
                )));
            }
            let from = layers.decrypt_backward(&mut c.payload)?;
            match RelayMsg::decode(&c.payload[16..])? {
                (0, RelayMsg::Extended(h)) if from == last => layers.push(&st.finish(&h)?)?,
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
        Ok(layers)
    };
    let layers = match tokio::time::timeout(timeout, work).await {
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
    let task = CircTask {
        chan,
        circ_id,
        rx,
        layers,
        cmd_rx,
        cmd_tx: tx.downgrade(),
        streams: HashMap::new(),
        pending: HashMap::new(),
        resolving: HashMap::new(),
        next_stream: 1,
        circ_window: Arc::new(Semaphore::new(CIRC_WINDOW as usize)),
        fc_send: CircSendWindow::new(),
        fc_recv: CircRecvWindow::new(),
        sendme_tags: Vec::new(),
        cells_in: Vec::new(),
        out: Vec::new(),
        held: None,
    };
    tokio::spawn(task.run().in_current_span());
    let serial = NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(CircuitHandle { tx, serial, path })
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
    /// Forward window permits, taken by [`Stream::send`].
    window: Arc<Semaphore>,
    /// Forward window as counted here, to check the exit's SENDMEs.
    sent: StreamWindow,
    /// Backward window: DATA the exit may still send.
    recv: StreamWindow,
}

impl Drop for StreamEntry {
    fn drop(&mut self) {
        self.window.close();
    }
}

struct CircTask {
    chan: ChannelHandle,
    circ_id: u32,
    rx: Inbox,
    layers: ClientLayers,
    cmd_rx: mpsc::Receiver<CircCmd>,
    cmd_tx: mpsc::WeakSender<CircCmd>,
    streams: HashMap<u16, StreamEntry>,
    pending: HashMap<u16, PendingStream>,
    resolving: HashMap<u16, oneshot::Sender<Result<Vec<IpAddr>, ClientError>>>,
    next_stream: u16,
    /// Forward circuit window permits, shared with the streams.
    circ_window: Arc<Semaphore>,
    fc_send: CircSendWindow,
    fc_recv: CircRecvWindow,
    sendme_tags: Vec<[u8; TAG_LEN]>,
    /// Cells taken from the inbox, being handled.
    cells_in: Vec<Cell>,
    /// Cells for the guard, sent as one batch after every event.
    out: Vec<Cell>,
    /// DATA from the exit for one stream, not yet handed to it, with the
    /// number of cells it came in.
    held: Option<(u16, Vec<u8>, u32)>,
}

/// The most DATA held for a stream before it is handed on.
const HELD_MAX: usize = 64 * 1024;

/// Commands handled per wake-up at most (then the batch is sent).
const CMD_BATCH: usize = 128;

impl CircTask {
    fn alloc_stream(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            let id = self.next_stream;
            self.next_stream = self.next_stream.wrapping_add(1).max(1);
            if !self.streams.contains_key(&id) && !self.resolving.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Encrypt a message for the exit; returns the exit's tag.
    fn send_msg(&mut self, sid: u16, msg: RelayMsg) -> Result<[u8; TAG_LEN], ClientError> {
        let last = self.layers.len() - 1;
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        msg.encode_into(sid, &mut payload[TAG_LEN..TAG_LEN + forward_capacity(last)])?;
        let tag = self.layers.encrypt_forward_in_place(last, &mut payload)?;
        self.out.push(relay_cell(self.circ_id, payload));
        Ok(tag)
    }

    /// `n` DATA cells from the exit arrived: send the circuit SENDMEs due.
    fn circ_consumed(&mut self, n: u32) -> Result<(), ClientError> {
        let mut tags = std::mem::take(&mut self.sendme_tags);
        self.fc_recv.on_consumed(n, &mut tags);
        for tag in tags.drain(..) {
            self.send_msg(0, RelayMsg::Sendme { tag })?;
        }
        self.sendme_tags = tags;
        Ok(())
    }

    async fn run(mut self) {
        let reason = loop {
            tokio::select! {
                ok = self.rx.recv_batch(&mut self.cells_in) => {
                    if !ok {
                        break DestroyReason::CHANNEL_CLOSED;
                    }
                    if let Err(r) = self.on_cells() {
                        break r;
                    }
                }
                cmd = self.cmd_rx.recv() => match cmd {
                    None => break DestroyReason::FINISHED,
                    Some(cmd) => if let Err(e) = self.on_cmds(cmd) {
                        debug!("circuit command failed: {e}");
                        break DestroyReason::INTERNAL;
                    },
                },
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
        self.circ_window.close();
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
    }

    fn on_cells(&mut self) -> Result<(), DestroyReason> {
        let mut cells = std::mem::take(&mut self.cells_in);
        let mut r = Ok(());
        for c in cells.drain(..) {
            r = self.on_cell(c);
            if r.is_err() {
                break;
            }
        }
        self.flush_data();
        cells.clear();
        self.cells_in = cells;
        r
    }

    /// Handle a command and those queued behind it.
    fn on_cmds(&mut self, first: CircCmd) -> Result<(), ClientError> {
        self.on_cmd(first)?;
        for _ in 1..CMD_BATCH {
            match self.cmd_rx.try_recv() {
                Ok(cmd) => self.on_cmd(cmd)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn on_cmd(&mut self, cmd: CircCmd) -> Result<(), ClientError> {
        match cmd {
            CircCmd::Begin { addr, port, reply } => {
                let Some(sid) = self.alloc_stream() else {
                    let _ = reply.send(Err(ClientError::Build("no free stream id".into())));
                    return Ok(());
                };
                let (tx, rx) = mpsc::unbounded_channel();
                self.streams.insert(
                    sid,
                    StreamEntry {
                        tx,
                        window: Arc::new(Semaphore::new(STREAM_WINDOW as usize)),
                        sent: StreamWindow::new(),
                        recv: StreamWindow::new(),
                    },
                );
                self.pending.insert(sid, (reply, rx));
                self.send_msg(sid, RelayMsg::Begin { addr, port })?;
                Ok(())
            }
            CircCmd::Resolve { host, reply } => {
                let Some(sid) = self.alloc_stream() else {
                    let _ = reply.send(Err(ClientError::Build("no free stream id".into())));
                    return Ok(());
                };
                self.resolving.insert(sid, reply);
                self.send_msg(sid, RelayMsg::Resolve(host))?;
                Ok(())
            }
            CircCmd::Data(sid, d) => {
                let Some(st) = self.streams.get_mut(&sid) else {
                    // The stream is gone: give back the circuit permit.
                    self.circ_window.add_permits(1);
                    return Ok(());
                };
                st.sent.take()?;
                let tag = self.send_msg(sid, RelayMsg::Data(d))?;
                self.fc_send.on_data_sent(&tag)?;
                Ok(())
            }
            CircCmd::Consumed(sid, n) => {
                for _ in 0..n {
                    if let Some(st) = self.streams.get_mut(&sid)
                        && st.recv.consumed()
                    {
                        self.send_msg(sid, RelayMsg::Sendme { tag: [0; TAG_LEN] })?;
                    }
                }
                Ok(())
            }
            CircCmd::End(sid) => {
                self.pending.remove(&sid);
                if self.streams.remove(&sid).is_some() {
                    self.send_msg(sid, RelayMsg::End(EndReason::DONE))?;
                }
                Ok(())
            }
        }
    }

    /// DATA from the exit: counted in the windows, and held to go to its
    /// stream together with the DATA after it in the same batch.
    fn on_data(&mut self, sid: u16, data: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), DestroyReason> {
        if self.fc_recv.on_data_received(tag).is_err() {
            debug!("the exit sent DATA past the circuit window");
            return Err(DestroyReason::FLOW_CONTROL);
        }
        if let Some(st) = self.streams.get_mut(&sid) {
            if st.recv.receive().is_err() {
                debug!("the exit sent DATA past a stream window");
                return Err(DestroyReason::FLOW_CONTROL);
            }
            match &mut self.held {
                Some((s, v, n)) if *s == sid && v.len() + data.len() <= HELD_MAX => {
                    v.extend_from_slice(data);
                    *n += 1;
                }
                _ => {
                    self.flush_data();
                    self.held = Some((sid, data.to_vec(), 1));
                }
            }
        }
        self.circ_consumed(1).map_err(|_| DestroyReason::INTERNAL)
    }

    /// Hand the held DATA to its stream.
    fn flush_data(&mut self) {
        let Some((sid, v, n)) = self.held.take() else {
            return;
        };
        if let Some(st) = self.streams.get(&sid)
            && st.tx.send((StreamData::Data(v), n)).is_err()
        {
            self.streams.remove(&sid);
        }
    }

    fn on_cell(&mut self, mut c: Cell) -> Result<(), DestroyReason> {
        match c.cmd {
            CellCmd::RELAY => {}
            CellCmd::DESTROY => return Err(DestroyReason::DESTROYED),
            CellCmd::PADDING => return Ok(()),
            _ => return Err(DestroyReason::PROTOCOL),
        }
        let (from, tag) = self
            .layers
            .decrypt_backward_tagged(&mut c.payload)
            .map_err(|_| DestroyReason::CELL_AUTH)?;
        if from == self.layers.len() - 1
            && let Some((sid, data)) =
                RelayMsg::decode_data(&c.payload[16..]).map_err(|_| DestroyReason::PROTOCOL)?
        {
            return self.on_data(sid, data, &tag);
        }
        // Data held for a stream goes ahead of anything else (an END).
        self.flush_data();
        let (sid, msg) = RelayMsg::decode(&c.payload[16..]).map_err(|_| DestroyReason::PROTOCOL)?;
        if from != self.layers.len() - 1 {
            debug!(hop = from, cmd = ?msg.cmd(), "message from an intermediate hop");
            return match msg {
                RelayMsg::Drop => Ok(()),
                _ => Err(DestroyReason::PROTOCOL),
            };
        }
        match msg {
            RelayMsg::Connected(_) => {
                if let Some((reply, rx)) = self.pending.remove(&sid) {
                    let window = match self.streams.get(&sid) {
                        Some(st) => st.window.clone(),
                        None => return Ok(()),
                    };
                    let stream = Stream {
                        id: sid,
                        rx,
                        tx: self.cmd_tx.upgrade().ok_or(DestroyReason::FINISHED)?,
                        window,
                        circ_window: self.circ_window.clone(),
                        unreported: 0,
                    };
                    if let Err(Ok(s)) = reply.send(Ok(stream)) {
                        drop(s);
                    }
                }
            }
            RelayMsg::Sendme { tag } if sid == 0 => {
                if self.fc_send.on_sendme(&tag).is_err() {
                    debug!("the exit sent a SENDME that does not match");
                    return Err(DestroyReason::FLOW_CONTROL);
                }
                self.circ_window.add_permits(CIRC_INCREMENT as usize);
            }
            RelayMsg::Sendme { .. } => {
                if let Some(st) = self.streams.get_mut(&sid) {
                    if st.sent.on_sendme().is_err() {
                        return Err(DestroyReason::FLOW_CONTROL);
                    }
                    st.window.add_permits(STREAM_INCREMENT as usize);
                }
            }
            RelayMsg::End(r) => {
                if let Some((reply, _)) = self.pending.remove(&sid) {
                    let _ = reply.send(Err(ClientError::StreamEnded(r)));
                }
                if let Some(st) = self.streams.remove(&sid) {
                    let _ = st.tx.send((StreamData::End(r), 0));
                }
            }
            RelayMsg::Resolved(addrs) => {
                if let Some(reply) = self.resolving.remove(&sid) {
                    let _ = reply.send(if addrs.is_empty() {
                        Err(ClientError::StreamEnded(EndReason::RESOLVE_FAILED))
                    } else {
                        Ok(addrs.into_iter().map(|(a, _)| a).collect())
                    });
                }
            }
            RelayMsg::Drop => {}
            _ => return Err(DestroyReason::PROTOCOL),
        }
        Ok(())
    }
}
