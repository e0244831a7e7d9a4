//! One relay circuit, driven by one task.
//!
//! The task owns this hop's onion layer, the two channel sides (toward the
//! client, "prev", and toward the next relay, "next") and the exit streams.
//! Any authentication failure destroys the circuit both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use allium_proto::cell::{self, Cell, CellCmd, DestroyReason, HANDSHAKE_NTOR, PAYLOAD_LEN};
use allium_proto::flow::{
    CIRC_WINDOW, CircRecvWindow, CircSendWindow, STREAM_WINDOW, StreamWindow,
};
use allium_proto::ntor::{self, OnionKeys};
use allium_proto::onion::{Peeled, RelayLayer};
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg};
use allium_proto::{PeerMisbehaved, RelayId};
use rand::RngExt;
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info};

use crate::exit::{self, CircShared, StreamCmd, StreamEvent};
use crate::netview::Listing;
use crate::relay::{ChannelManager, RelayCtx};
use crate::{RelayError, RelayStats};
use allium_link::channel::{ChannelHandle, Inbox, NewCircuit};
use allium_link::limits::{CELL_BYTES, CircAcct};

const EXTEND_TIMEOUT: Duration = Duration::from_secs(15);
/// Streams one circuit may have open at once.
const MAX_STREAMS: usize = 512;
const TAG_LEN: usize = 16;

struct Next {
    chan: ChannelHandle,
    id: u32,
    rx: Inbox,
    /// CREATED has come back.
    open: bool,
}

/// An exit stream as its circuit sees it.
struct ExitStream {
    tx: mpsc::Sender<StreamCmd>,
    /// Backward window: permits the stream task takes per DATA cell.
    window: Arc<Semaphore>,
    /// Backward window as counted here, to check the client's SENDMEs.
    sent: StreamWindow,
    /// Forward window: DATA cells the client may still send.
    recv: StreamWindow,
}

impl Drop for ExitStream {
    fn drop(&mut self) {
        self.window.close();
    }
}

/// How a circuit ends: who still has to be told.
struct Teardown {
    reason: DestroyReason,
    tell_prev: bool,
    tell_next: bool,
}

impl Teardown {
    fn both(reason: DestroyReason) -> Self {
        Teardown {
            reason,
            tell_prev: true,
            tell_next: true,
        }
    }
}

/// A teardown for what the peer did.
fn peer(p: PeerMisbehaved) -> Teardown {
    RelayError::Proto(p.into()).into()
}

impl From<allium_link::LinkError> for Teardown {
    fn from(e: allium_link::LinkError) -> Self {
        RelayError::from(e).into()
    }
}

impl From<RelayError> for Teardown {
    fn from(e: RelayError) -> Self {
        debug!("circuit error: {e}");
        match e {
            RelayError::Proto(allium_proto::Error::CellAuth) => {
                Teardown::both(DestroyReason::CELL_AUTH)
            }
            RelayError::Proto(allium_proto::Error::PeerMisbehaved(p)) => {
                Teardown::both(p.destroy_reason())
            }
            RelayError::Link(allium_link::LinkError::ChannelClosed) => {
                Teardown::both(DestroyReason::CHANNEL_CLOSED)
            }
            RelayError::Protocol(_) | RelayError::Proto(_) => {
                Teardown::both(DestroyReason::PROTOCOL)
            }
            _ => Teardown::both(DestroyReason::INTERNAL),
        }
    }
}

struct Circuit {
    ctx: Arc<RelayCtx>,
    prev: ChannelHandle,
    prev_id: u32,
    prev_rx: Inbox,
    next: Option<Next>,
    layer: RelayLayer,
    streams: HashMap<u16, ExitStream>,
    shared: Arc<CircShared>,
    ev_rx: mpsc::UnboundedReceiver<StreamEvent>,
    had_stream: bool,
    /// Backward DATA this hop originated, against the client's SENDMEs.
    fc_send: CircSendWindow,
    /// Forward DATA delivered to this hop.
    fc_recv: CircRecvWindow,
    sendme_tags: Vec<[u8; TAG_LEN]>,
    /// Cells taken from the two inboxes, being handled.
    cells_in: Vec<Cell>,
    next_in: Vec<Cell>,
    /// Cells for the next hop and for the previous one, sent as one batch
    /// each after every event (in the order the layer processed them).
    fwd_out: Vec<Cell>,
    back_out: Vec<Cell>,
    /// Counts since the last flush, added to the relay's shared counters
    /// once per flush rather than once per cell.
    counts: Counts,
    /// Cells taken from the inboxes and not yet handed on: still counted
    /// against the memory cap, so a circuit whose next channel is slow is
    /// a candidate for the killer like one whose inbox is full.
    held: usize,
}

#[derive(Default)]
struct Counts {
    relayed: u64,
    originated: u64,
    delivered: u64,
    exit_bytes: u64,
}

impl Counts {
    fn add_to(&mut self, stats: &RelayStats) {
        let c = std::mem::take(self);
        for (n, counter) in [
            (c.relayed, &stats.cells_relayed),
            (c.originated, &stats.cells_originated),
            (c.delivered, &stats.cells_delivered),
            (c.exit_bytes, &stats.exit_bytes),
        ] {
            if n > 0 {
                RelayStats::inc(counter, n);
            }
        }
    }
}

/// Stream events handled per wake-up at most (then the batch is flushed).
const EVENT_BATCH: usize = 128;

/// Answer a CREATE and run the circuit until it ends.
pub async fn run(ctx: Arc<RelayCtx>, nc: NewCircuit) {
    let NewCircuit {
        circ_id,
        create,
        inbox,
        chan,
    } = nc;
    let keys = match answer_create(&ctx, &create) {
        Ok((reply, keys)) => {
            let created = match Cell::new(circ_id, CellCmd::CREATED, &cell::encode_created(&reply))
            {
                Ok(c) => c,
                Err(_) => return,
            };
            if chan.send(created).await.is_err() {
                return;
            }
            keys
        }
        Err(e) => {
            debug!("CREATE refused: {e}");
            RelayStats::inc(&ctx.stats.circuit_handshake_failures, 1);
            chan.destroy(circ_id, DestroyReason::PROTOCOL);
            return;
        }
    };
    RelayStats::inc(&ctx.stats.circuits_created, 1);
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let acct: Option<Arc<CircAcct>> = inbox.acct().cloned();
    let mut c = Circuit {
        ctx,
        prev: chan,
        prev_id: circ_id,
        prev_rx: inbox,
        next: None,
        layer: RelayLayer::new(&keys),
        streams: HashMap::new(),
        shared: Arc::new(CircShared::new(CIRC_WINDOW, ev_tx, acct.clone())),
        ev_rx,
        had_stream: false,
        fc_send: CircSendWindow::new(),
        fc_recv: CircRecvWindow::new(),
        sendme_tags: Vec::new(),
        cells_in: Vec::new(),
        next_in: Vec::new(),
        fwd_out: Vec::new(),
        back_out: Vec::new(),
        counts: Counts::default(),
        held: 0,
    };
    let killed = async {
        match &acct {
            Some(a) => a.killed().await,
            None => std::future::pending().await,
        }
    };
    let t = tokio::select! {
        t = c.drive() => t,
        () = killed => Teardown::both(DestroyReason::RESOURCE_LIMIT),
    };
    c.teardown(t);
}

fn answer_create(
    ctx: &RelayCtx,
    create: &Cell,
) -> Result<(Vec<u8>, allium_proto::onion::HopKeys), RelayError> {
    let (htype, hdata) = cell::decode_create(&create.payload[..])?;
    if htype != HANDSHAKE_NTOR {
        return Err(RelayError::Protocol(format!(
            "unknown handshake type {htype}"
        )));
    }
    let set = ctx.onion.read().unwrap_or_else(|p| p.into_inner());
    let mut list = vec![&set.current];
    if let Some(p) = &set.previous {
        list.push(p);
    }
    let keys = OnionKeys {
        identity: ctx.identity_pub,
        keys: &list,
    };
    Ok(ntor::server(&mut rand::rng(), &keys, hdata)?)
}

async fn recv_next(next: &mut Option<Next>, out: &mut Vec<Cell>) -> bool {
    match next {
        Some(n) => n.rx.recv_batch(out).await,
        None => std::future::pending().await,
    }
}

impl Circuit {
    async fn drive(&mut self) -> Teardown {
        loop {
            let r = tokio::select! {
                ok = self.prev_rx.recv_batch(&mut self.cells_in) => if ok {
                    self.hold(self.cells_in.len());
                    self.on_cells(false).await
                } else {
                    return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: false, tell_next: true };
                },
                ok = recv_next(&mut self.next, &mut self.next_in) => if ok {
                    self.hold(self.next_in.len());
                    self.on_cells(true).await
                } else {
                    return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: true, tell_next: false };
                },
                Some(ev) = self.ev_rx.recv() => self.stream_events(ev).map_err(Teardown::from),
            };
            if let Err(t) = r {
                return t;
            }
            if let Err(e) = self.flush().await {
                return e.into();
            }
        }
    }

    fn hold(&mut self, n: usize) {
        if let Some(a) = &self.shared.acct {
            a.add(CELL_BYTES * n);
        }
        self.held += n;
    }

    /// Send what the last event produced: one batch per direction.
    async fn flush(&mut self) -> Result<(), RelayError> {
        let r = self.send_pending().await;
        if let Some(a) = &self.shared.acct {
            a.sub(CELL_BYTES * self.held);
        }
        self.held = 0;
        r
    }

    async fn send_pending(&mut self) -> Result<(), RelayError> {
        self.counts.add_to(&self.ctx.stats);
        if !self.fwd_out.is_empty() {
            let cells = std::mem::take(&mut self.fwd_out);
            // A next hop truncated meanwhile gets nothing more.
            if let Some(n) = &self.next {
                n.chan.send_batch(cells).await?;
            }
        }
        if !self.back_out.is_empty() {
            self.prev
                .send_batch(std::mem::take(&mut self.back_out))
                .await?;
        }
        Ok(())
    }

    /// Handle the cells taken from one side's inbox, in order.
    async fn on_cells(&mut self, from_next: bool) -> Result<(), Teardown> {
        let mut cells = std::mem::take(self.inbuf(from_next));
        let mut r = Ok(());
        for c in cells.drain(..) {
            r = if from_next {
                self.on_next_cell(c)
            } else {
                self.on_prev_cell(c).await
            };
            if r.is_err() {
                break;
            }
        }
        cells.clear();
        *self.inbuf(from_next) = cells;
        r
    }

    fn inbuf(&mut self, from_next: bool) -> &mut Vec<Cell> {
        if from_next {
            &mut self.next_in
        } else {
            &mut self.cells_in
        }
    }

    /// Handle a stream event and those queued behind it.
    fn stream_events(&mut self, first: StreamEvent) -> Result<(), RelayError> {
        self.stream_event(first)?;
        for _ in 1..EVENT_BATCH {
            match self.ev_rx.try_recv() {
                Ok(ev) => self.stream_event(ev)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn teardown(&mut self, t: Teardown) {
        self.counts.add_to(&self.ctx.stats);
        self.ctx.stats.destroyed(t.reason.0);
        match t.reason {
            DestroyReason::CELL_AUTH => {
                RelayStats::inc(&self.ctx.stats.cell_auth_failures, 1);
                info!("circuit destroyed: a cell failed authentication");
            }
            DestroyReason::FLOW_CONTROL => {
                RelayStats::inc(&self.ctx.stats.flow_control_violations, 1);
                info!("circuit destroyed: the client broke flow control");
            }
            _ => {}
        }
        if t.tell_prev {
            self.prev.destroy(self.prev_id, t.reason);
        } else {
            self.prev.unregister(self.prev_id);
        }
        if let Some(n) = self.next.take() {
            if t.tell_next {
                n.chan.destroy(n.id, t.reason);
            } else {
                n.chan.unregister(n.id);
            }
        }
        self.shared.window.close();
        RelayStats::inc(&self.ctx.stats.streams_closed, self.streams.len() as u64);
        self.streams.clear();
    }

    fn originate(&mut self, stream_id: u16, msg: RelayMsg) -> Result<(), RelayError> {
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        msg.encode_into(stream_id, &mut payload[TAG_LEN..])?;
        self.layer.originate_backward_in_place(&mut payload)?;
        self.send_back(payload);
        Ok(())
    }

    /// Queue a cell this hop originated toward the client.
    fn send_back(&mut self, payload: Box<[u8; PAYLOAD_LEN]>) {
        self.counts.originated += 1;
        self.back_out.push(Cell {
            circ_id: self.prev_id,
            cmd: CellCmd::RELAY,
            payload,
        });
    }

    /// Originate a backward DATA cell; `acked` cells get random padding
    /// (their tag is what the client's circuit SENDME must carry).
    fn originate_data(&mut self, sid: u16, data: &[u8], acked: bool) -> Result<(), RelayError> {
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        let len = RelayMsg::encode_data_into(sid, data, &mut payload[TAG_LEN..])?;
        if acked {
            rand::rng().fill(&mut payload[TAG_LEN + len..]);
        }
        let tag = self.layer.originate_backward_in_place(&mut payload)?;
        self.fc_send.on_data_sent(&tag)?;
        if let Some(st) = self.streams.get_mut(&sid) {
            st.sent.take()?;
        }
        self.send_back(payload);
        Ok(())
    }

    /// `n` forward DATA cells left this hop: send the circuit SENDMEs due.
    fn consumed(&mut self, n: u32) -> Result<(), RelayError> {
        let mut tags = std::mem::take(&mut self.sendme_tags);
        self.fc_recv.on_consumed(n, &mut tags);
        for tag in tags.drain(..) {
            self.originate(0, RelayMsg::Sendme { tag })?;
        }
        self.sendme_tags = tags;
        Ok(())
    }

    async fn on_prev_cell(&mut self, mut c: Cell) -> Result<(), Teardown> {
        match c.cmd {
            CellCmd::RELAY => {
                let has_next = self.next.as_ref().is_some_and(|n| n.open);
                let mut tag = [0u8; TAG_LEN];
                tag.copy_from_slice(&c.payload[..TAG_LEN]);
                match self
                    .layer
                    .peel_forward(&mut c.payload, has_next)
                    .map_err(RelayError::from)?
                {
                    Peeled::Forward => {
                        let n = self.next.as_ref().expect("has_next checked");
                        self.counts.relayed += 1;
                        self.fwd_out.push(Cell {
                            circ_id: n.id,
                            cmd: CellCmd::RELAY,
                            payload: c.payload,
                        });
                    }
                    Peeled::Deliver => {
                        self.counts.delivered += 1;
                        let (sid, msg) =
                            RelayMsg::decode(&c.payload[16..]).map_err(RelayError::from)?;
                        if let RelayMsg::Data(d) = msg {
                            self.fc_recv
                                .on_data_received(&tag)
                                .map_err(RelayError::from)?;
                            self.deliver_data(sid, d)?;
                        } else {
                            self.handle_msg(sid, msg).await?;
                        }
                    }
                }
                Ok(())
            }
            CellCmd::DESTROY => Err(Teardown {
                reason: DestroyReason(c.payload[0]),
                tell_prev: false,
                tell_next: true,
            }),
            CellCmd::PADDING => Ok(()),
            cmd => Err(peer(PeerMisbehaved::Unexpected {
                expected: "a RELAY, DESTROY or PADDING cell from the client side",
                got: format!("{cmd:?}"),
            })),
        }
    }

    /// A forward DATA cell for stream `sid` (already counted in the circuit
    /// window).
    fn deliver_data(&mut self, sid: u16, d: Vec<u8>) -> Result<(), Teardown> {
        let Some(st) = self.streams.get_mut(&sid) else {
            // A stream that is gone: the cell leaves at once.
            self.consumed(1)?;
            return Ok(());
        };
        st.recv.receive().map_err(RelayError::from)?;
        if let Some(a) = &self.shared.acct {
            a.add(CELL_BYTES);
        }
        match st.tx.try_send(StreamCmd::Data(d)) {
            // Delivered to the stream's queue: the circuit window moves on
            // (the stream window holds back a stalled target).
            Ok(()) => {
                self.consumed(1)?;
                Ok(())
            }
            Err(e) => {
                if let Some(a) = &self.shared.acct {
                    a.sub(CELL_BYTES);
                }
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    return Err(peer(PeerMisbehaved::DataPastStreamWindow));
                }
                self.streams.remove(&sid);
                self.consumed(1)?;
                Ok(())
            }
        }
    }

    fn on_next_cell(&mut self, mut c: Cell) -> Result<(), Teardown> {
        match c.cmd {
            CellCmd::CREATED => {
                let n = self.next.as_mut().expect("next exists");
                if n.open {
                    return Err(peer(PeerMisbehaved::Unexpected {
                        expected: "RELAY cells after CREATED",
                        got: "a second CREATED".into(),
                    }));
                }
                n.open = true;
                let h = cell::decode_created(&c.payload[..])
                    .map_err(RelayError::from)?
                    .to_vec();
                self.originate(0, RelayMsg::Extended(h))?;
                Ok(())
            }
            CellCmd::RELAY => {
                self.layer
                    .wrap_backward(&mut c.payload)
                    .map_err(RelayError::from)?;
                self.counts.relayed += 1;
                self.back_out.push(Cell {
                    circ_id: self.prev_id,
                    cmd: CellCmd::RELAY,
                    payload: c.payload,
                });
                Ok(())
            }
            CellCmd::DESTROY => Err(Teardown {
                reason: DestroyReason::DESTROYED,
                tell_prev: true,
                tell_next: false,
            }),
            CellCmd::PADDING => Ok(()),
            cmd => Err(peer(PeerMisbehaved::Unexpected {
                expected: "a CREATED, RELAY, DESTROY or PADDING cell from the next hop",
                got: format!("{cmd:?}"),
            })),
        }
    }

    async fn extend(&mut self, e: Extend) -> Result<(), Teardown> {
        if self.next.is_some() {
            return Err(peer(PeerMisbehaved::ExtendTwice));
        }
        if e.identity == self.ctx.identity_pub {
            return Err(peer(PeerMisbehaved::ExtendToSelf));
        }
        // Extending takes a while: what is pending goes out first.
        self.flush().await?;
        // Only to a relay the consensus lists, where it lists it: a relay is
        // no way to reach arbitrary hosts.
        match self.ctx.net.lookup(&RelayId(e.identity)).await {
            Listing::Listed(r) if r.link_key == e.link_key && r.addr == e.addr => {}
            Listing::NoDirectory => {}
            listing => {
                debug!(
                    listed = matches!(listing, Listing::Listed(_)),
                    "EXTEND refused: the target is not in the consensus as named"
                );
                self.originate(0, RelayMsg::Truncated(DestroyReason::CONNECT_FAILED.0))?;
                return Ok(());
            }
        }
        let connect =
            ChannelManager::get_or_connect(&self.ctx, RelayId(e.identity), &e.link_key, e.addr);
        let chan = match tokio::time::timeout(EXTEND_TIMEOUT, connect).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(err)) => {
                debug!("extend failed: {err}");
                self.originate(0, RelayMsg::Truncated(DestroyReason::CONNECT_FAILED.0))?;
                return Ok(());
            }
            Err(_) => {
                self.originate(0, RelayMsg::Truncated(DestroyReason::TIMEOUT.0))?;
                return Ok(());
            }
        };
        let (id, rx) = chan.new_circuit_counted(self.shared.acct.clone()).await?;
        let create = Cell::new(id, CellCmd::CREATE, &cell::encode_create(e.htype, &e.hdata))
            .map_err(RelayError::from)?;
        chan.send(create).await?;
        self.next = Some(Next {
            chan,
            id,
            rx,
            open: false,
        });
        Ok(())
    }

    async fn handle_msg(&mut self, sid: u16, msg: RelayMsg) -> Result<(), Teardown> {
        match msg {
            RelayMsg::Extend(e) if sid == 0 => self.extend(e).await,
            RelayMsg::Truncate if sid == 0 => {
                if let Some(n) = self.next.take() {
                    n.chan.destroy(n.id, DestroyReason::REQUESTED);
                }
                self.originate(0, RelayMsg::Truncated(DestroyReason::REQUESTED.0))?;
                Ok(())
            }
            RelayMsg::Begin { addr, port } if sid != 0 => {
                if self.streams.contains_key(&sid) || self.streams.len() >= MAX_STREAMS {
                    self.originate(sid, RelayMsg::End(EndReason::RESOURCE_LIMIT))?;
                    return Ok(());
                }
                if !self.ctx.policy.is_exit() {
                    self.originate(sid, RelayMsg::End(EndReason::EXIT_POLICY))?;
                    return Ok(());
                }
                let (tx, rx) = mpsc::channel(exit::STREAM_QUEUE);
                let window = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
                self.streams.insert(
                    sid,
                    ExitStream {
                        tx,
                        window: window.clone(),
                        sent: StreamWindow::new(),
                        recv: StreamWindow::new(),
                    },
                );
                RelayStats::inc(&self.ctx.stats.streams_opened, 1);
                if !self.had_stream {
                    self.had_stream = true;
                    RelayStats::inc(&self.ctx.stats.circuits_with_streams, 1);
                }
                tokio::spawn(
                    exit::run_stream(
                        self.ctx.clone(),
                        sid,
                        addr,
                        port,
                        self.shared.clone(),
                        window,
                        rx,
                    )
                    .in_current_span(),
                );
                Ok(())
            }
            RelayMsg::End(_) if sid != 0 => {
                if self.streams.remove(&sid).is_some() {
                    RelayStats::inc(&self.ctx.stats.streams_closed, 1);
                }
                Ok(())
            }
            RelayMsg::Sendme { tag } if sid == 0 => {
                self.fc_send.on_sendme(&tag).map_err(RelayError::from)?;
                self.shared
                    .window
                    .add_permits(allium_proto::flow::CIRC_INCREMENT as usize);
                Ok(())
            }
            RelayMsg::Sendme { .. } => {
                if let Some(st) = self.streams.get_mut(&sid) {
                    st.sent.on_sendme().map_err(RelayError::from)?;
                    st.window
                        .add_permits(allium_proto::flow::STREAM_INCREMENT as usize);
                }
                Ok(())
            }
            RelayMsg::Resolve(host) if sid != 0 => {
                if !self.ctx.policy.is_exit() {
                    self.originate(sid, RelayMsg::Resolved(vec![]))?;
                    return Ok(());
                }
                let ctx = self.ctx.clone();
                let shared = self.shared.clone();
                tokio::spawn(
                    async move {
                        let addrs = exit::resolve(&ctx, &host).await.unwrap_or_default();
                        let _ = shared.ev.send(StreamEvent::Resolved(sid, addrs));
                    }
                    .in_current_span(),
                );
                Ok(())
            }
            RelayMsg::Drop => Ok(()),
            other => Err(peer(PeerMisbehaved::Unexpected {
                expected: if sid == 0 {
                    "a circuit message (EXTEND, TRUNCATE, SENDME, DROP)"
                } else {
                    "a stream message (BEGIN, DATA, END, SENDME, RESOLVE)"
                },
                got: format!("{:?} on stream {sid}", other.cmd()),
            })),
        }
    }

    fn stream_event(&mut self, ev: StreamEvent) -> Result<(), RelayError> {
        match ev {
            StreamEvent::Connected(sid, ip) => {
                if self.streams.contains_key(&sid) {
                    self.originate(sid, RelayMsg::Connected(Some(ip)))?;
                }
            }
            StreamEvent::Data { sid, data, acked } => {
                if let Some(a) = &self.shared.acct {
                    a.sub(CELL_BYTES);
                }
                // Sent even if the client has ended the stream meanwhile:
                // the window already counts it.
                self.counts.exit_bytes += data.len() as u64;
                self.originate_data(sid, &data, acked)?;
            }
            StreamEvent::Consumed(sid, n) => {
                for _ in 0..n {
                    if let Some(st) = self.streams.get_mut(&sid)
                        && st.recv.consumed()
                    {
                        self.originate(sid, RelayMsg::Sendme { tag: [0; TAG_LEN] })?;
                    }
                }
            }
            StreamEvent::End(sid, reason) => {
                if self.streams.remove(&sid).is_some() {
                    RelayStats::inc(&self.ctx.stats.streams_closed, 1);
                    self.originate(sid, RelayMsg::End(reason))?;
                }
            }
            StreamEvent::Resolved(sid, addrs) => {
                let addrs: Vec<_> = addrs.into_iter().take(16).map(|a| (a, 60)).collect();
                self.originate(sid, RelayMsg::Resolved(addrs))?;
            }
        }
        Ok(())
    }
}
