//! One relay circuit, driven by one task.
//!
//! The task owns this hop's onion layer, the two channel sides (toward the
//! client, "prev", and toward the next relay, "next") and the exit streams.
//! Any authentication failure destroys the circuit both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use allium_proto::cell::{self, Cell, CellCmd, DestroyReason, HANDSHAKE_NTOR};
use allium_proto::ntor::{self, OnionKeys};
use allium_proto::onion::{BACKWARD_CAPACITY, Peeled, RelayLayer};
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info};

use crate::channel::{ChannelHandle, NewCircuit};
use crate::exit::{self, StreamCmd, StreamEvent};
use crate::relay::{ChannelManager, RelayCtx};
use crate::{RelayError, RelayStats};

const EXTEND_TIMEOUT: Duration = Duration::from_secs(15);
/// Stream events (exit data toward the client) queued per circuit.
const EVENT_QUEUE: usize = 64;
/// Streams one circuit may have open at once.
const MAX_STREAMS: usize = 512;

struct Next {
    chan: ChannelHandle,
    id: u32,
    rx: mpsc::Receiver<Cell>,
    /// CREATED has come back.
    open: bool,
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

impl From<RelayError> for Teardown {
    fn from(e: RelayError) -> Self {
        debug!("circuit error: {e}");
        match e {
            RelayError::Proto(allium_proto::Error::CellAuth) => {
                Teardown::both(DestroyReason::CELL_AUTH)
            }
            RelayError::ChannelClosed => Teardown::both(DestroyReason::CHANNEL_CLOSED),
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
    prev_rx: mpsc::Receiver<Cell>,
    next: Option<Next>,
    layer: RelayLayer,
    streams: HashMap<u16, mpsc::Sender<StreamCmd>>,
    ev_tx: mpsc::Sender<StreamEvent>,
    ev_rx: mpsc::Receiver<StreamEvent>,
    had_stream: bool,
}

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
            let _ = chan
                .send(Cell::destroy(circ_id, DestroyReason::PROTOCOL))
                .await;
            chan.unregister(circ_id);
            return;
        }
    };
    RelayStats::inc(&ctx.stats.circuits_created, 1);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    let mut c = Circuit {
        ctx,
        prev: chan,
        prev_id: circ_id,
        prev_rx: inbox,
        next: None,
        layer: RelayLayer::new(&keys),
        streams: HashMap::new(),
        ev_tx,
        ev_rx,
        had_stream: false,
    };
    let t = c.drive().await;
    c.teardown(t).await;
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

async fn recv_next(next: &mut Option<Next>) -> Option<Cell> {
    match next {
        Some(n) => n.rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Circuit {
    async fn drive(&mut self) -> Teardown {
        loop {
            let r = tokio::select! {
                c = self.prev_rx.recv() => match c {
                    Some(c) => self.on_prev_cell(c).await,
                    None => return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: false, tell_next: true },
                },
                c = recv_next(&mut self.next) => match c {
                    Some(c) => self.on_next_cell(c).await,
                    None => return Teardown { reason: DestroyReason::CHANNEL_CLOSED, tell_prev: true, tell_next: false },
                },
                Some(ev) = self.ev_rx.recv() => self.stream_event(ev).await.map_err(Teardown::from),
            };
            if let Err(t) = r {
                return t;
            }
        }
    }

    async fn teardown(&mut self, t: Teardown) {
        RelayStats::inc(&self.ctx.stats.circuits_destroyed, 1);
        if t.reason == DestroyReason::CELL_AUTH {
            RelayStats::inc(&self.ctx.stats.cell_auth_failures, 1);
            info!("circuit destroyed: a cell failed authentication");
        }
        if t.tell_prev {
            let _ = self.prev.send(Cell::destroy(self.prev_id, t.reason)).await;
        }
        self.prev.unregister(self.prev_id);
        if let Some(n) = self.next.take() {
            if t.tell_next {
                let _ = n.chan.send(Cell::destroy(n.id, t.reason)).await;
            }
            n.chan.unregister(n.id);
        }
        self.streams.clear();
    }

    async fn originate(&mut self, stream_id: u16, msg: RelayMsg) -> Result<(), RelayError> {
        let body = msg.encode(stream_id, BACKWARD_CAPACITY)?;
        let payload = self.layer.originate_backward(&body)?;
        RelayStats::inc(&self.ctx.stats.cells_originated, 1);
        self.prev
            .send(Cell {
                circ_id: self.prev_id,
                cmd: CellCmd::RELAY,
                payload,
            })
            .await
    }

    async fn on_prev_cell(&mut self, mut c: Cell) -> Result<(), Teardown> {
        match c.cmd {
            CellCmd::RELAY => {
                let has_next = self.next.as_ref().is_some_and(|n| n.open);
                match self
                    .layer
                    .peel_forward(&mut c.payload, has_next)
                    .map_err(RelayError::from)?
                {
                    Peeled::Forward => {
                        let n = self.next.as_ref().expect("has_next checked");
                        RelayStats::inc(&self.ctx.stats.cells_relayed, 1);
                        n.chan
                            .send(Cell {
                                circ_id: n.id,
                                cmd: CellCmd::RELAY,
                                payload: c.payload,
                            })
                            .await?;
                    }
                    Peeled::Deliver => {
                        RelayStats::inc(&self.ctx.stats.cells_delivered, 1);
                        let (sid, msg) =
                            RelayMsg::decode(&c.payload[16..]).map_err(RelayError::from)?;
                        self.handle_msg(sid, msg).await?;
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
            cmd => Err(RelayError::Protocol(format!("{cmd:?} on an open circuit")).into()),
        }
    }

    async fn on_next_cell(&mut self, mut c: Cell) -> Result<(), Teardown> {
        match c.cmd {
            CellCmd::CREATED => {
                let n = self.next.as_mut().expect("next exists");
                if n.open {
                    return Err(RelayError::Protocol("second CREATED".into()).into());
                }
                n.open = true;
                let h = cell::decode_created(&c.payload[..])
                    .map_err(RelayError::from)?
                    .to_vec();
                self.originate(0, RelayMsg::Extended(h)).await?;
                Ok(())
            }
            CellCmd::RELAY => {
                self.layer
                    .wrap_backward(&mut c.payload)
                    .map_err(RelayError::from)?;
                RelayStats::inc(&self.ctx.stats.cells_relayed, 1);
                self.prev
                    .send(Cell {
                        circ_id: self.prev_id,
                        cmd: CellCmd::RELAY,
                        payload: c.payload,
                    })
                    .await?;
                Ok(())
            }
            CellCmd::DESTROY => Err(Teardown {
                reason: DestroyReason::DESTROYED,
                tell_prev: true,
                tell_next: false,
            }),
            CellCmd::PADDING => Ok(()),
            cmd => Err(RelayError::Protocol(format!("{cmd:?} from the next hop")).into()),
        }
    }

    async fn extend(&mut self, e: Extend) -> Result<(), Teardown> {
        if self.next.is_some() {
            return Err(RelayError::Protocol(
                "EXTEND on a circuit that already has a next hop".into(),
            )
            .into());
        }
        if e.identity == self.ctx.identity_pub {
            return Err(RelayError::Protocol("EXTEND to ourselves".into()).into());
        }
        let connect = ChannelManager::get_or_connect(&self.ctx, e.identity, &e.link_key, e.addr);
        let chan = match tokio::time::timeout(EXTEND_TIMEOUT, connect).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(err)) => {
                debug!("extend failed: {err}");
                self.originate(0, RelayMsg::Truncated(DestroyReason::CONNECT_FAILED.0))
                    .await?;
                return Ok(());
            }
            Err(_) => {
                self.originate(0, RelayMsg::Truncated(DestroyReason::TIMEOUT.0))
                    .await?;
                return Ok(());
            }
        };
        let (id, rx) = chan.new_circuit().await?;
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
                    let _ = n
                        .chan
                        .send(Cell::destroy(n.id, DestroyReason::REQUESTED))
                        .await;
                    n.chan.unregister(n.id);
                }
                self.originate(0, RelayMsg::Truncated(DestroyReason::REQUESTED.0))
                    .await?;
                Ok(())
            }
            RelayMsg::Begin { addr, port } if sid != 0 => {
                if self.streams.contains_key(&sid) || self.streams.len() >= MAX_STREAMS {
                    self.originate(sid, RelayMsg::End(EndReason::RESOURCE_LIMIT))
                        .await?;
                    return Ok(());
                }
                if !self.ctx.policy.is_exit() {
                    self.originate(sid, RelayMsg::End(EndReason::EXIT_POLICY))
                        .await?;
                    return Ok(());
                }
                let (tx, rx) = mpsc::channel(exit::STREAM_QUEUE);
                self.streams.insert(sid, tx);
                RelayStats::inc(&self.ctx.stats.streams_opened, 1);
                if !self.had_stream {
                    self.had_stream = true;
                    RelayStats::inc(&self.ctx.stats.circuits_with_streams, 1);
                }
                tokio::spawn(
                    exit::run_stream(self.ctx.clone(), sid, addr, port, self.ev_tx.clone(), rx)
                        .in_current_span(),
                );
                Ok(())
            }
            RelayMsg::Data(d) if sid != 0 => {
                if let Some(tx) = self.streams.get(&sid)
                    && tx.send(StreamCmd::Data(d)).await.is_err()
                {
                    self.streams.remove(&sid);
                }
                Ok(())
            }
            RelayMsg::End(_) if sid != 0 => {
                self.streams.remove(&sid);
                Ok(())
            }
            RelayMsg::Resolve(host) if sid != 0 => {
                if !self.ctx.policy.is_exit() {
                    self.originate(sid, RelayMsg::Resolved(vec![])).await?;
                    return Ok(());
                }
                let ctx = self.ctx.clone();
                let ev = self.ev_tx.clone();
                tokio::spawn(
                    async move {
                        let addrs = exit::resolve(&ctx, &host).await.unwrap_or_default();
                        let _ = ev.send(StreamEvent::Resolved(sid, addrs)).await;
                    }
                    .in_current_span(),
                );
                Ok(())
            }
            RelayMsg::Drop | RelayMsg::Sendme { .. } => Ok(()),
            other => Err(RelayError::Protocol(format!(
                "unexpected {:?} on stream {sid}",
                other.cmd()
            ))
            .into()),
        }
    }

    async fn stream_event(&mut self, ev: StreamEvent) -> Result<(), RelayError> {
        match ev {
            StreamEvent::Connected(sid, ip) => {
                if self.streams.contains_key(&sid) {
                    self.originate(sid, RelayMsg::Connected(Some(ip))).await?;
                }
            }
            StreamEvent::Data(sid, d) => {
                if self.streams.contains_key(&sid) {
                    RelayStats::inc(&self.ctx.stats.exit_bytes, d.len() as u64);
                    self.originate(sid, RelayMsg::Data(d)).await?;
                }
            }
            StreamEvent::End(sid, reason) => {
                if self.streams.remove(&sid).is_some() {
                    self.originate(sid, RelayMsg::End(reason)).await?;
                }
            }
            StreamEvent::Resolved(sid, addrs) => {
                let addrs: Vec<_> = addrs.into_iter().take(16).map(|a| (a, 60)).collect();
                self.originate(sid, RelayMsg::Resolved(addrs)).await?;
            }
        }
        Ok(())
    }
}
