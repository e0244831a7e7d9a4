//! One relay circuit, driven by one task.
//!
//! The task owns this hop's onion layer, the two channel sides (toward the
//! client, "prev", and toward the next relay, "next") and the exit streams.
//! Any authentication failure destroys the circuit both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason, HANDSHAKE_NTOR};
use allium_proto::circuit::{self as core, Event, Side};
use allium_proto::flow::CircParams;
use allium_proto::ntor::{self, OnionKeys};
use allium_proto::onion::RelayLayer;
use allium_proto::policy::is_private;
use allium_proto::relaymsg::{EndReason, Extend};
use allium_proto::{PeerMisbehaved, RelayId};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info};

use crate::exit::{self, CircShared, StreamCmd, StreamEvent, StreamKey};
use crate::netview::Listing;
use crate::relay::{ChannelManager, RelayCtx};
use crate::rendezvous::{Joined, PIPE_CELLS, PipeRx, PipeTx, Registration, WAIT_MAX};
use crate::{RelayError, RelayStats};
use allium_link::channel::{ChannelHandle, Inbox, NewCircuit};
use allium_link::limits::{CELL_BYTES, CircAcct};
use allium_proto::relaymsg::RelayMsg;

const EXTEND_TIMEOUT: Duration = Duration::from_secs(15);

/// The next hop: a channel to the next relay, or (at a rendezvous point)
/// the other circuit of the join.
enum Next {
    Chan {
        chan: ChannelHandle,
        id: CircId,
        rx: Inbox,
    },
    Joined {
        tx: PipeTx,
        rx: PipeRx,
    },
}

impl Next {
    fn end(self, tell: bool, reason: DestroyReason) {
        if let Next::Chan { chan, id, .. } = self {
            if tell {
                chan.destroy(id, reason);
            } else {
                chan.unregister(id);
            }
        }
    }
}

/// An exit or directory stream as its circuit sees it.
struct ExitStream {
    tx: mpsc::UnboundedSender<StreamCmd>,
    /// Room for chunks at the circuit, shared with the stream task.
    room: Arc<Semaphore>,
    /// Which use of the stream id this is (its epoch).
    epoch: u64,
}

impl Drop for ExitStream {
    fn drop(&mut self) {
        self.room.close();
    }
}

/// How a circuit ends: who still has to be told.
struct Teardown {
    /// Why the circuit ends (what the relay's counters record).
    reason: DestroyReason,
    tell_prev: bool,
    tell_next: bool,
    /// A neighbour's DESTROY ends it: its reason is not ours to pass on,
    /// nor to count as a failure we saw.
    from_neighbour: bool,
}

impl Teardown {
    fn both(reason: DestroyReason) -> Self {
        Teardown {
            reason,
            tell_prev: true,
            tell_next: true,
            from_neighbour: false,
        }
    }

    /// The reason the DESTROY this relay sends carries. A neighbour's own
    /// reason is not passed on (it would be a channel along the circuit):
    /// the other side hears DESTROYED.
    fn onward(&self) -> DestroyReason {
        if self.from_neighbour {
            DestroyReason::DESTROYED
        } else {
            self.reason
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
            RelayError::ResourceLimit(_) => Teardown::both(DestroyReason::RESOURCE_LIMIT),
            _ => Teardown::both(DestroyReason::INTERNAL),
        }
    }
}

/// A relay's circuit task: a driver around the circuit core, owning the
/// two channel sides and the exit stream tasks.
struct Circuit {
    ctx: Arc<RelayCtx>,
    core: core::Circuit,
    prev: ChannelHandle,
    prev_id: CircId,
    prev_rx: Inbox,
    next: Option<Next>,
    streams: HashMap<u16, ExitStream>,
    /// Resolves under way, by stream id, with the use of the id.
    resolving: HashMap<u16, u64>,
    /// The next stream task's epoch.
    next_epoch: u64,
    /// Per stream: chunks given to the core and not yet sealed, and the
    /// memory they are counted as (until [`Event::Sent`]).
    unsealed: HashMap<u16, (usize, usize)>,
    shared: Arc<CircShared>,
    ev_rx: mpsc::UnboundedReceiver<StreamEvent>,
    had_stream: bool,
    /// Cells taken from the two inboxes, being handled.
    cells_in: Vec<Cell>,
    next_in: Vec<Cell>,
    /// Cells for the next hop and for the previous one, sent as one batch
    /// each after every event (in the order the core produced them).
    fwd_out: Vec<Cell>,
    back_out: Vec<Cell>,
    /// Exit bytes since the last flush.
    exit_bytes: u64,
    /// Cells taken from the inboxes and not yet handed on: still counted
    /// against the memory cap, so a circuit whose next channel is slow is
    /// a candidate for the killer like one whose inbox is full.
    held: usize,
    /// This circuit's introduction or rendezvous entry at the relay.
    registration: Option<Registration>,
    /// Introduction circuit: INTRODUCE1s from clients, for the service.
    intro_rx: Option<mpsc::Receiver<allium_proto::relaymsg::Introduce>>,
    /// Waiting rendezvous circuit: the service's circuit, once it comes,
    /// and until when it may come.
    join_rx: Option<tokio::sync::oneshot::Receiver<Joined>>,
    wait_deadline: Option<tokio::time::Instant>,
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
    let (keys, params) = match answer_create(&ctx, &create) {
        Ok((reply, keys, params)) => {
            let created = match Cell::new(circ_id, CellCmd::CREATED, &cell::encode_created(&reply))
            {
                Ok(c) => c,
                Err(_) => return,
            };
            if chan.send(created).await.is_err() {
                return;
            }
            (keys, params)
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
        core: core::Circuit::relay(
            &mut rand::rng(),
            RelayLayer::new(&keys),
            chan.peer().is_none(),
            params,
        ),
        prev: chan,
        prev_id: circ_id,
        prev_rx: inbox,
        next: None,
        streams: HashMap::new(),
        resolving: HashMap::new(),
        next_epoch: 0,
        unsealed: HashMap::new(),
        shared: Arc::new(CircShared {
            ev: ev_tx,
            acct: acct.clone(),
        }),
        ev_rx,
        had_stream: false,
        cells_in: Vec::new(),
        next_in: Vec::new(),
        fwd_out: Vec::new(),
        back_out: Vec::new(),
        exit_bytes: 0,
        held: 0,
        registration: None,
        intro_rx: None,
        join_rx: None,
        wait_deadline: None,
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
) -> Result<(Vec<u8>, allium_proto::onion::HopKeys, CircParams), RelayError> {
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

/// Cells from the next hop; false when it is gone. Cells from a joined
/// circuit are counted against this circuit's memory from here on.
async fn recv_next(next: &mut Option<Next>, out: &mut Vec<Cell>) -> bool {
    match next {
        Some(Next::Chan { rx, .. }) => rx.recv_batch(out).await,
        Some(Next::Joined { rx, .. }) => match rx.chan.recv().await {
            Some((cells, acct)) => {
                if let Some(a) = acct {
                    a.sub(CELL_BYTES * cells.len());
                }
                rx.queued
                    .fetch_sub(cells.len(), std::sync::atomic::Ordering::Relaxed);
                out.extend(cells);
                true
            }
            None => false,
        },
        None => std::future::pending().await,
    }
}

async fn wait_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_join(rx: &mut Option<tokio::sync::oneshot::Receiver<Joined>>) -> Option<Joined> {
    match rx {
        Some(r) => {
            let j = r.await.ok();
            if j.is_none() {
                // (The sender went with the registration: nothing comes.)
                std::future::pending::<()>().await;
            }
            j
        }
        None => std::future::pending().await,
    }
}

impl Circuit {
    async fn drive(&mut self) -> Teardown {
        loop {
            let r = tokio::select! {
                ok = self.prev_rx.recv_batch(&mut self.cells_in) => if ok {
                    self.hold(self.cells_in.len());
                    self.on_cells(Side::Prev)
                } else {
                    return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: false, tell_next: true, from_neighbour: false };
                },
                ok = recv_next(&mut self.next, &mut self.next_in) => if ok {
                    self.hold(self.next_in.len());
                    self.on_cells(Side::Next)
                } else {
                    return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: true, tell_next: false, from_neighbour: false };
                },
                Some(ev) = self.ev_rx.recv() => self.stream_events(ev).map_err(Teardown::from),
                Some(intro) = recv_opt(&mut self.intro_rx) => self
                    .core
                    .send_service(&RelayMsg::Introduce2(intro))
                    .map_err(|e| RelayError::from(e).into()),
                Some(j) = recv_join(&mut self.join_rx) => self.joined(j),
                () = wait_until(self.wait_deadline) => {
                    debug!("no service came to the rendezvous point in time");
                    return Teardown::both(DestroyReason::TIMEOUT);
                }
            };
            if let Err(t) = r {
                return t;
            }
            if let Err(t) = self.drain().await {
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

    fn add_counts(&mut self) {
        let c = self.core.take_counts();
        let stats = &self.ctx.stats;
        for (n, counter) in [
            (c.relayed, &stats.cells_relayed),
            (c.originated, &stats.cells_originated),
            (c.delivered, &stats.cells_delivered),
            (std::mem::take(&mut self.exit_bytes), &stats.exit_bytes),
        ] {
            if n > 0 {
                RelayStats::inc(counter, n);
            }
        }
    }

    async fn send_pending(&mut self) -> Result<(), RelayError> {
        self.add_counts();
        if !self.fwd_out.is_empty() {
            let cells = std::mem::take(&mut self.fwd_out);
            // A next hop truncated meanwhile gets nothing more.
            match &self.next {
                Some(Next::Chan { chan, .. }) => chan.send_batch(cells).await?,
                Some(Next::Joined { tx, .. }) => {
                    // Bounded as an inbox is: the client's cells wait for
                    // the service's link, and a client that ignores the
                    // end-to-end window fills the pipe and loses the
                    // circuit.
                    let n = cells.len();
                    let queued = tx.queued.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
                    if queued > PIPE_CELLS {
                        return Err(RelayError::ResourceLimit(format!(
                            "{queued} cells wait to cross the rendezvous point"
                        )));
                    }
                    // Counted against this circuit until the other takes them.
                    let acct = self.shared.acct.clone();
                    if let Some(a) = &acct {
                        a.add(CELL_BYTES * n);
                    }
                    if tx.chan.send((cells, acct)).is_err() {
                        return Err(allium_link::LinkError::ChannelClosed.into());
                    }
                }
                None => {}
            }
        }
        if !self.back_out.is_empty() {
            self.prev
                .send_batch(std::mem::take(&mut self.back_out))
                .await?;
        }
        Ok(())
    }

    /// Hand the cells taken from one side's inbox to the core, in order.
    fn on_cells(&mut self, side: Side) -> Result<(), Teardown> {
        let now = Instant::now();
        let cells = match side {
            Side::Prev => &mut self.cells_in,
            Side::Next => &mut self.next_in,
        };
        for c in cells.drain(..) {
            // (What the drain leaves is dropped with it.)
            if let Err(e) = self.core.handle_cell(now, side, c) {
                return Err(RelayError::from(e).into());
            }
        }
        Ok(())
    }

    /// Take what the core has to send, then act on what it has to tell
    /// (which may give it more to send).
    async fn drain(&mut self) -> Result<(), Teardown> {
        loop {
            while let Some(t) = self.core.poll_transmit() {
                match t.side {
                    Side::Prev => self.back_out.push(Cell {
                        circ_id: self.prev_id,
                        cmd: CellCmd::RELAY,
                        payload: t.payload,
                    }),
                    Side::Next => match &self.next {
                        Some(Next::Chan { id, .. }) => self.fwd_out.push(Cell {
                            circ_id: *id,
                            cmd: if t.early {
                                CellCmd::RELAY_EARLY
                            } else {
                                CellCmd::RELAY
                            },
                            payload: t.payload,
                        }),
                        // The other circuit takes them as from its next hop.
                        Some(Next::Joined { .. }) => self.fwd_out.push(Cell {
                            circ_id: self.prev_id,
                            cmd: CellCmd::RELAY,
                            payload: t.payload,
                        }),
                        None => {}
                    },
                }
            }
            let Some(ev) = self.core.poll_event() else {
                return Ok(());
            };
            self.on_event(ev).await?;
        }
    }

    /// Take a stream the core opened: its queue and its room at the
    /// circuit, for its task.
    fn open_stream(&mut self, stream: u16) -> exit::StreamTask {
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(exit::SEND_ROOM));
        let key = self.key(stream);
        self.streams.insert(
            stream,
            ExitStream {
                tx,
                room: room.clone(),
                epoch: key.epoch,
            },
        );
        RelayStats::inc(&self.ctx.stats.streams_opened, 1);
        exit::StreamTask::new(self.ctx.clone(), key, self.shared.clone(), room, rx)
    }

    async fn on_event(&mut self, ev: Event) -> Result<(), Teardown> {
        match ev {
            Event::Extend(e) => self.extend(e).await?,
            Event::Truncated => {
                if let Some(n) = self.next.take() {
                    n.end(true, DestroyReason::REQUESTED);
                }
            }
            Event::Service(msg) => self.service(msg)?,
            Event::Begin { stream, addr, port } => {
                if !self.ctx.policy.is_exit() {
                    self.core
                        .end(stream, EndReason::EXIT_POLICY)
                        .map_err(RelayError::from)?;
                    return Ok(());
                }
                if !self.had_stream {
                    self.had_stream = true;
                    RelayStats::inc(&self.ctx.stats.circuits_with_streams, 1);
                }
                let t = self.open_stream(stream);
                tokio::spawn(exit::run_stream(t, addr, port).in_current_span());
            }
            Event::BeginDir { stream } => {
                RelayStats::inc(&self.ctx.stats.dir_streams, 1);
                let t = self.open_stream(stream);
                tokio::spawn(exit::run_dir_stream(t).in_current_span());
            }
            Event::Resolve { stream, host } => {
                if !self.ctx.policy.is_exit() {
                    self.core.resolved(stream, &[]).map_err(RelayError::from)?;
                    return Ok(());
                }
                let ctx = self.ctx.clone();
                let shared = self.shared.clone();
                let key = self.key(stream);
                self.resolving.insert(stream, key.epoch);
                tokio::spawn(
                    async move {
                        let addrs = exit::resolve(&ctx, &host).await.unwrap_or_default();
                        let _ = shared.ev.send(StreamEvent::Resolved(key, addrs));
                    }
                    .in_current_span(),
                );
            }
            Event::Data {
                stream,
                data,
                cells,
            } => {
                if let Some(st) = self.streams.get(&stream) {
                    let bytes = CELL_BYTES * cells as usize;
                    if let Some(a) = &self.shared.acct {
                        a.add(bytes);
                    }
                    // The stream task's queue is bounded by XOFF and the
                    // circuit window, which the core enforces, and counted
                    // against the memory cap.
                    if st.tx.send(StreamCmd::Data(data, cells)).is_err()
                        && let Some(a) = &self.shared.acct
                    {
                        a.sub(bytes);
                    }
                }
            }
            Event::Sent { stream } => self.sealed(stream),
            Event::End { stream, .. } => {
                if self.streams.remove(&stream).is_some() {
                    RelayStats::inc(&self.ctx.stats.streams_closed, 1);
                }
            }
            Event::Destroyed { side, reason } => {
                debug!(?side, ?reason, "circuit destroyed by a neighbour");
                return Err(Teardown {
                    reason,
                    tell_prev: side != Side::Prev,
                    tell_next: side != Side::Next,
                    from_neighbour: true,
                });
            }
            Event::Connected { .. } | Event::Resolved { .. } | Event::Echo(_) => {
                return Err(RelayError::Protocol("a client event at a relay".into()).into());
            }
        }
        Ok(())
    }

    /// What stream `sid` gave the core is all sealed (or gone).
    fn sealed(&mut self, sid: u16) {
        if let Some((chunks, bytes)) = self.unsealed.remove(&sid) {
            if let Some(a) = &self.shared.acct {
                a.sub(bytes);
            }
            if let Some(st) = self.streams.get(&sid) {
                st.room.add_permits(chunks);
            }
        }
    }

    /// Handle a stream event and those queued behind it.
    fn stream_events(&mut self, first: StreamEvent) -> Result<(), RelayError> {
        let now = Instant::now();
        self.stream_event(now, first)?;
        for _ in 1..EVENT_BATCH {
            match self.ev_rx.try_recv() {
                Ok(ev) => self.stream_event(now, ev)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// A new use of stream id `sid`.
    fn key(&mut self, sid: u16) -> StreamKey {
        self.next_epoch += 1;
        StreamKey {
            sid,
            epoch: self.next_epoch,
        }
    }

    /// The event is about the stream that now has its id (not an earlier
    /// one whose task is still ending).
    fn current(&self, ev: &StreamEvent) -> bool {
        match ev {
            StreamEvent::Resolved(k, _) => self.resolving.get(&k.sid) == Some(&k.epoch),
            StreamEvent::Connected(k, _)
            | StreamEvent::Data(k, _)
            | StreamEvent::Consumed(k, _)
            | StreamEvent::End(k, _) => {
                self.streams.get(&k.sid).is_some_and(|s| s.epoch == k.epoch)
            }
        }
    }

    fn stream_event(&mut self, now: Instant, ev: StreamEvent) -> Result<(), RelayError> {
        if !self.current(&ev) {
            if let (StreamEvent::Data(_, data), Some(a)) = (&ev, &self.shared.acct) {
                a.sub(exit::chunk_bytes(data.len()));
            }
            return Ok(());
        }
        match ev {
            StreamEvent::Connected(k, ip) => self.core.connected(k.sid, ip)?,
            StreamEvent::Data(k, data) => {
                let sid = k.sid;
                let bytes = exit::chunk_bytes(data.len());
                self.exit_bytes += data.len() as u64;
                match self.core.send(now, sid, &data) {
                    Ok(false) => {
                        let u = self.unsealed.entry(sid).or_default();
                        u.0 += 1;
                        u.1 += bytes;
                    }
                    // Sealed at once, or the client has ended the stream
                    // meanwhile (then the bytes are dropped).
                    Ok(true) | Err(allium_proto::Error::UnknownStream(_)) => {
                        if let Some(a) = &self.shared.acct {
                            a.sub(bytes);
                        }
                        if let Some(st) = self.streams.get(&sid) {
                            st.room.add_permits(1);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            StreamEvent::Consumed(k, n) => self.core.consumed(k.sid, n)?,
            StreamEvent::End(k, reason) => {
                if self.streams.remove(&k.sid).is_some() {
                    RelayStats::inc(&self.ctx.stats.streams_closed, 1);
                }
                self.core.end(k.sid, reason)?;
            }
            StreamEvent::Resolved(k, addrs) => {
                self.resolving.remove(&k.sid);
                self.core.resolved(k.sid, &addrs)?;
            }
        }
        Ok(())
    }

    fn teardown(&mut self, t: Teardown) {
        self.add_counts();
        self.ctx.stats.destroyed(t.reason.0);
        match if t.from_neighbour {
            DestroyReason::NONE
        } else {
            t.reason
        } {
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
            self.prev.destroy(self.prev_id, t.onward());
        } else {
            self.prev.unregister(self.prev_id);
        }
        if let Some(n) = self.next.take() {
            n.end(t.tell_next, t.onward());
        }
        self.registration = None;
        // What is still counted: cells taken and not handed on, chunks the
        // core holds, and chunks still queued from the stream tasks (which
        // take back what they cannot queue once the queue is closed).
        self.ev_rx.close();
        let mut counted = CELL_BYTES * std::mem::take(&mut self.held);
        counted += self.unsealed.drain().map(|(_, (_, b))| b).sum::<usize>();
        while let Ok(ev) = self.ev_rx.try_recv() {
            if let StreamEvent::Data(_, d) = ev {
                counted += exit::chunk_bytes(d.len());
            }
        }
        if let Some(a) = &self.shared.acct {
            a.sub(counted);
        }
        RelayStats::inc(&self.ctx.stats.streams_closed, self.streams.len() as u64);
        self.streams.clear();
    }

    async fn extend(&mut self, e: Extend) -> Result<(), Teardown> {
        if self.registration.is_some() {
            debug!("EXTEND refused: the circuit ends here (introduction or rendezvous)");
            return Err(Teardown::both(DestroyReason::PROTOCOL));
        }
        if e.identity == self.ctx.identity_pub {
            return Err(peer(PeerMisbehaved::ExtendToSelf));
        }
        if self.prev.peer() == Some(RelayId(e.identity)) {
            return Err(peer(PeerMisbehaved::ExtendBack));
        }
        // Every refusal and failure gets the same answer, so an EXTEND
        // cannot tell a closed port from a filtered one.
        if !self.ctx.allow_private_addresses && is_private(e.addr.ip()) {
            debug!("EXTEND refused: private address");
            return self.extend_failed(DestroyReason::CONNECT_FAILED);
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
                return self.extend_failed(DestroyReason::CONNECT_FAILED);
            }
        }
        let connect =
            ChannelManager::get_or_connect(&self.ctx, RelayId(e.identity), &e.link_key, e.addr);
        let chan = match tokio::time::timeout(EXTEND_TIMEOUT, connect).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(err)) => {
                debug!("extend failed: {err}");
                return self.extend_failed(DestroyReason::CONNECT_FAILED);
            }
            Err(_) => {
                debug!("extend timed out");
                return self.extend_failed(DestroyReason::CONNECT_FAILED);
            }
        };
        let (id, rx) = chan.new_circuit_counted(self.shared.acct.clone()).await?;
        let create = Cell::new(id, CellCmd::CREATE, &cell::encode_create(e.htype, &e.hdata))
            .map_err(RelayError::from)?;
        chan.send(create).await?;
        self.next = Some(Next::Chan { chan, id, rx });
        Ok(())
    }

    /// An onion service message from the client: this circuit becomes an
    /// introduction point, introduces a client, waits at a rendezvous
    /// point, or joins one. Anything else, or a second role, ends it.
    fn service(&mut self, msg: RelayMsg) -> Result<(), Teardown> {
        let points = &self.ctx.points;
        let refuse = |why: &str| -> Teardown {
            debug!("service request refused: {why}");
            Teardown::both(DestroyReason::PROTOCOL)
        };
        let full = |e: crate::rendezvous::Refused| -> Teardown {
            debug!("service request refused: {e}");
            Teardown::both(match e {
                crate::rendezvous::Refused::Full => DestroyReason::RESOURCE_LIMIT,
                crate::rendezvous::Refused::CookieInUse => DestroyReason::PROTOCOL,
            })
        };
        let taken = self.registration.is_some()
            || self.next.is_some()
            || !self.streams.is_empty()
            || !self.resolving.is_empty();
        let reply = match msg {
            RelayMsg::EstablishIntro(e) => {
                if taken {
                    return Err(refuse("the circuit is in use"));
                }
                if !e.verify(&self.core.binding()) {
                    return Err(refuse("ESTABLISH_INTRO signature"));
                }
                let (reg, rx) = points
                    .establish_intro(e.auth_key, e.rate, e.burst)
                    .map_err(full)?;
                self.registration = Some(reg);
                self.intro_rx = Some(rx);
                RelayMsg::IntroEstablished
            }
            RelayMsg::Introduce1(i) => {
                if self.registration.is_some() || self.next.is_some() {
                    return Err(refuse("INTRODUCE1 on a circuit in use"));
                }
                RelayMsg::IntroduceAck(points.introduce(i).0)
            }
            RelayMsg::EstablishRendezvous(cookie) => {
                if taken {
                    return Err(refuse("the circuit is in use"));
                }
                let (reg, rx) = points.establish_rendezvous(cookie).map_err(full)?;
                self.registration = Some(reg);
                self.join_rx = Some(rx);
                self.wait_deadline = Some(tokio::time::Instant::now() + WAIT_MAX);
                RelayMsg::RendezvousEstablished
            }
            RelayMsg::Rendezvous1 { cookie, reply } => {
                if taken {
                    return Err(refuse("the circuit is in use"));
                }
                let (tx, rx) = points
                    .rendezvous(&cookie, reply)
                    .ok_or_else(|| refuse("no circuit waits at that cookie"))?;
                self.core.join().map_err(RelayError::from)?;
                self.next = Some(Next::Joined { tx, rx });
                return Ok(());
            }
            m => return Err(refuse(&format!("{:?} from a client", m.cmd()))),
        };
        self.core
            .send_service(&reply)
            .map_err(|e| RelayError::from(e).into())
    }

    /// The service's circuit came to this waiting rendezvous circuit:
    /// give the client the service's reply, then pass cells both ways.
    fn joined(&mut self, j: Joined) -> Result<(), Teardown> {
        self.join_rx = None;
        self.wait_deadline = None;
        self.registration = None;
        if self.next.is_some() {
            return Err(Teardown::both(DestroyReason::PROTOCOL));
        }
        self.core
            .send_service(&RelayMsg::Rendezvous2(j.reply))
            .map_err(RelayError::from)?;
        self.core.join().map_err(RelayError::from)?;
        self.next = Some(Next::Joined {
            tx: j.to_other,
            rx: j.from_other,
        });
        Ok(())
    }

    fn extend_failed(&mut self, why: DestroyReason) -> Result<(), Teardown> {
        self.core
            .extend_failed(why)
            .map_err(|e| RelayError::from(e).into())
    }
}
