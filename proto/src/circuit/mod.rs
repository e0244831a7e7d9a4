//! The circuit core: one circuit's protocol state, as pure code.
//!
//! A [`Circuit`] owns what one end of a circuit knows: its onion layers
//! (all of them at the client, its own at a relay), the circuit windows
//! with their SENDME tags, the stream map with each stream's windows, and
//! at a relay whether a next hop exists. It reads no socket and no clock
//! and never waits: the client's and the relay's circuit tasks are thin
//! drivers around it, and tests drive two of them in memory
//! ([`tests`](self) has the `CircuitPair` kit).
//!
//! ```text
//!   client driver                                   relay driver
//!   ┌───────────────────┐   RELAY payloads    ┌───────────────────┐
//!   │ Circuit::client   │ ──── poll_transmit ─▶ │ Circuit::relay    │ ─▶ next hop
//!   │  layers, windows, │ ◀─── handle_cell ──── │  layer, windows,  │
//!   │  streams          │                      │  exit streams     │
//!   └───────────────────┘                      └───────────────────┘
//! ```
//!
//! # Calling order
//! 1. Feed each input: a cell that arrived ([`Circuit::handle_cell`], with
//!    the side it came from) or a local decision (`begin`, `send`,
//!    `consumed`, `end`, `connected`, `resolved`, `extend_failed`).
//! 2. Then drain [`Circuit::poll_transmit`] until it returns `None` and send
//!    the payloads in that order (each is a whole RELAY cell payload, for
//!    the side it names), then drain [`Circuit::poll_event`].
//! 3. An `Err` from an input ends the circuit: tear it down both ways. A
//!    [`PeerMisbehaved`](crate::PeerMisbehaved) error names what the peer
//!    did; [`Error::CellAuth`] a cell that failed authentication.
//!
//! Inputs may be batched (all cells of one link frame, then one drain):
//! DATA for one stream that arrives in one batch comes out as one
//! [`Event::Data`].
//!
//! # Flow and congestion control
//! Each window has one source of truth, here. [`Circuit::send`] seals as
//! many DATA cells as the circuit's congestion window allows now and keeps
//! the rest; what it kept goes out as SENDMEs arrive, and [`Event::Sent`]
//! says when the stream's buffer is empty again, so a driver gives its
//! producer room by that event and never counts cells itself.
//!
//! Received DATA counts against the circuit window at once (a cell past it
//! is the peer's fault). Circuit SENDMEs go out as the cells are handed on
//! as events, so one slow stream does not hold up the others, unless the
//! circuit holds more than [`HOLD_MAX`] cells the driver has not yet
//! reported [`Circuit::consumed`]: then they wait for the driver. Each
//! stream says XOFF to its sender when it holds [`XOFF_AT`] cells not yet
//! consumed, and XON once it is down to [`XON_AT`]; a sender stops sealing
//! a stream between XOFF and XON. So what a circuit makes its driver hold
//! is bounded (`HOLD_MAX` plus the circuit window) however many streams
//! it has and whatever the peer does.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::aead::{Key, keystream};

use crate::cell::{self, Cell, CellCmd, DestroyReason, PAYLOAD_LEN};
pub use crate::flow::Rtt;
use crate::flow::{CircParams, CircRecvWindow, CircSendWindow, SENDME_CELL_RANDOM};
use crate::onion::{BACKWARD_CAPACITY, ClientLayers, Peeled, RelayLayer, forward_capacity};
use crate::relaymsg::{EndReason, Extend, HEADER_LEN, RelayMsg, TargetAddr};
use crate::{Error, PeerMisbehaved};

#[cfg(test)]
mod tests;

const TAG_LEN: usize = 16;

/// A RELAY cell's payload.
pub type Payload = Box<[u8; PAYLOAD_LEN]>;

/// Which neighbour a cell came from or goes to: `Prev` is toward the
/// client, `Next` away from it (the client's only neighbour is `Next`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Prev,
    Next,
}

/// A RELAY cell to send, in order, to the neighbour on `side`.
pub struct Transmit {
    pub side: Side,
    pub payload: Payload,
    /// Send it as RELAY_EARLY (it came as one).
    pub early: bool,
}

/// What the circuit tells its driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Client: the exit connected the stream.
    Connected { stream: u16, addr: Option<IpAddr> },
    /// Client: the answer to [`Circuit::resolve`]; empty if the name did
    /// not resolve.
    Resolved {
        stream: u16,
        addrs: Vec<(IpAddr, u32)>,
    },
    /// Relay: the client asks to open a stream. Answer with
    /// [`Circuit::connected`] or [`Circuit::end`].
    Begin {
        stream: u16,
        addr: TargetAddr,
        port: u16,
    },
    /// Relay: the client asks for a stream to this relay's directory cache
    /// (BEGIN_DIR). Answer with [`Circuit::connected`] (no address) or
    /// [`Circuit::end`].
    BeginDir { stream: u16 },
    /// Relay: the client asks to resolve a name. Answer with
    /// [`Circuit::resolved`].
    Resolve { stream: u16, host: String },
    /// Relay: the client asks to extend to another relay. Send it a CREATE
    /// (its CREATED goes to [`Circuit::handle_cell`]) or call
    /// [`Circuit::extend_failed`].
    Extend(Extend),
    /// Relay: the client dropped the next hop; destroy that side.
    Truncated,
    /// Client: an ECHO came back from the last hop (see [`Circuit::echo`]).
    Echo(Vec<u8>),
    /// Stream bytes from the far end, with the DATA cells they came in
    /// (to report to [`Circuit::consumed`] once handed on).
    Data {
        stream: u16,
        data: Vec<u8>,
        cells: u32,
    },
    /// Nothing given to [`Circuit::send`] for this stream is left: all of
    /// it is sealed, or what was not went with the stream when it ended.
    Sent { stream: u16 },
    /// The far end ended the stream (after its last [`Event::Data`]).
    End { stream: u16, reason: EndReason },
    /// The neighbour on `side` destroyed the circuit, for `reason` (as it
    /// said; not to be passed on): tear it down toward the other side only.
    Destroyed { side: Side, reason: DestroyReason },
    /// An onion service message ([`RelayMsg::is_service`]): at a relay,
    /// from the client, on a circuit that ends here; at a client, from the
    /// last hop.
    Service(RelayMsg),
}

/// Counts since the last [`Circuit::take_counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Cells passed on through this hop, either way.
    pub relayed: u64,
    /// Cells this end sealed.
    pub originated: u64,
    /// Cells this end opened.
    pub delivered: u64,
}

/// RELAY_EARLY cells a relay accepts on one circuit: a client sends each
/// EXTEND in one, and each passes every hop before the new one, so no
/// circuit can grow past `MAX_EARLY + 1` (8) hops.
pub const MAX_EARLY: u32 = 7;

/// Streams one circuit may have open at once (resolves included).
pub const MAX_STREAMS: usize = 512;
/// The most DATA one [`Event::Data`] carries.
const DATA_EVENT_MAX: usize = 64 * 1024;
/// Cells a stream's receiver holds, handed on and not yet consumed, when it
/// says XOFF (about 250 KB).
pub const XOFF_AT: u32 = 500;
/// Cells it holds when it says XON again.
pub const XON_AT: u32 = 100;
/// Cells the whole circuit holds unconsumed above which circuit SENDMEs
/// wait for the driver to consume.
pub const HOLD_MAX: u32 = 4 * XOFF_AT;

enum Role {
    Client(ClientLayers),
    Relay {
        layer: Box<RelayLayer>,
        next: NextHop,
        /// The circuit came from a client link (no relay before this one).
        first: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NextHop {
    None,
    /// EXTEND accepted, CREATED not yet back.
    Pending,
    Open,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Client: BEGIN sent. Relay: BEGIN received, not yet connected.
    Opening,
    Open,
    Resolving,
}

struct StreamState {
    kind: Kind,
    /// The far end said XOFF: seal nothing until its XON.
    paused: bool,
    /// Cells handed on as events and not yet consumed.
    held: u32,
    /// This end said XOFF, and how many cells came since.
    xoff_sent: Option<u32>,
    /// Bytes given to `send` and not yet sealed.
    unsent: Vec<u8>,
    /// END to send once `unsent` is empty.
    end_after: Option<EndReason>,
}

impl StreamState {
    fn new(kind: Kind) -> Self {
        StreamState {
            kind,
            paused: false,
            held: 0,
            xoff_sent: None,
            unsent: Vec::new(),
            end_after: None,
        }
    }
}

/// One circuit's protocol state. See the [module docs](self) for the
/// calling order.
pub struct Circuit {
    role: Role,
    fc_send: CircSendWindow,
    fc_recv: CircRecvWindow,
    streams: HashMap<u16, StreamState>,
    /// Streams with unsent bytes, in the order they blocked.
    blocked: VecDeque<u16>,
    next_stream: u16,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    sendme_tags: Vec<[u8; TAG_LEN]>,
    /// Cells handed on as events and not yet consumed, all streams.
    held: u32,
    /// Of those, cells whose circuit SENDME waits for them to be consumed.
    unreleased: u32,
    counts: Counts,
    closed: bool,
    /// RELAY_EARLY cells from the previous hop.
    early_seen: u32,
    /// Key of the keystream that pads acknowledged DATA cells (expanded
    /// when used: once per hundred cells, and it saves the memory).
    pad_key: Zeroizing<[u8; 32]>,
    pad_counter: u64,
    /// Client: the last hop is a joined service, and this end is it: it
    /// takes BEGINs.
    serves: bool,
}

impl Circuit {
    fn new(rng: &mut impl CryptoRng, role: Role, params: CircParams) -> Self {
        let mut pad_key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut pad_key[..]);
        Circuit {
            pad_key,
            pad_counter: 0,
            role,
            fc_send: CircSendWindow::new(params),
            fc_recv: CircRecvWindow::new(params),
            streams: HashMap::new(),
            blocked: VecDeque::new(),
            next_stream: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            sendme_tags: Vec::new(),
            held: 0,
            unreleased: 0,
            counts: Counts::default(),
            closed: false,
            early_seen: 0,
            serves: false,
        }
    }

    /// The client's end of a built circuit; streams go to its last hop,
    /// with the flow control agreed with that hop.
    pub fn client(
        rng: &mut impl CryptoRng,
        layers: ClientLayers,
        params: CircParams,
    ) -> Result<Self, Error> {
        if layers.is_empty() {
            return Err(Error::malformed("circuit", "no hops"));
        }
        Ok(Self::new(rng, Role::Client(layers), params))
    }

    /// A relay's hop of a circuit, right after it answered the CREATE with
    /// `params`; `first` if the CREATE came over a client's link (an ECHO
    /// is only answered on a one-hop circuit from a client).
    pub fn relay(
        rng: &mut impl CryptoRng,
        layer: RelayLayer,
        first: bool,
        params: CircParams,
    ) -> Self {
        Self::new(
            rng,
            Role::Relay {
                layer: Box::new(layer),
                next: NextHop::None,
                first,
            },
            params,
        )
    }

    /// The next payload to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Counts since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// The round trip measured by circuit SENDMEs, once one came back.
    pub fn rtt(&self) -> Option<Rtt> {
        self.fc_send.rtt()
    }

    /// The congestion window: DATA cells this end may have in flight.
    pub fn cwnd(&self) -> u32 {
        self.fc_send.cwnd()
    }

    /// Streams open or opening.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The last hop's [`HopKeys::binding`](crate::onion::HopKeys::binding)
    /// (at a relay, its own hop's).
    pub fn binding(&self) -> [u8; 32] {
        match &self.role {
            Role::Client(l) => *l.binding(l.len() - 1).expect("a client circuit has hops"),
            Role::Relay { layer, .. } => *layer.binding(),
        }
    }

    /// Send an onion service message ([`RelayMsg::is_service`]) to the
    /// other end of this hop: a client's to its last hop, a relay's to the
    /// client.
    pub fn send_service(&mut self, msg: &RelayMsg) -> Result<(), Error> {
        if !msg.is_service() {
            return Err(Error::malformed("service message", "not one"));
        }
        self.originate(0, msg)
    }

    /// Relay: join this circuit to another one at this relay (the
    /// rendezvous point): what the client sends past this hop goes to the
    /// other circuit, and what the other circuit passes on comes to the
    /// client as from a next hop. The driver carries the cells between
    /// them: [`Transmit`]s to [`Side::Next`] to the other circuit's
    /// [`Circuit::handle_cell`] with [`Side::Next`].
    pub fn join(&mut self) -> Result<(), Error> {
        match &mut self.role {
            Role::Relay { next, .. } if *next == NextHop::None => {
                *next = NextHop::Open;
                Ok(())
            }
            _ => Err(Error::malformed("rendezvous", "circuit already extended")),
        }
    }

    /// Client or service: the rendezvous point joined this circuit to the
    /// other end's; `keys` (as this end sees them) and `params` come from
    /// the end-to-end handshake. Streams now go to the other end, and with
    /// `serves` this end takes BEGINs from it.
    pub fn join_end_to_end(
        &mut self,
        keys: &crate::onion::HopKeys,
        params: CircParams,
        serves: bool,
    ) -> Result<(), Error> {
        let Role::Client(layers) = &mut self.role else {
            return Err(Error::malformed(
                "rendezvous",
                "a relay has no end-to-end hop",
            ));
        };
        if !self.streams.is_empty() {
            return Err(Error::malformed("rendezvous", "streams on the circuit"));
        }
        layers.push_joined(keys)?;
        // Six relays lie between the two ends.
        self.fc_send = CircSendWindow::through(params, 6);
        self.fc_recv = CircRecvWindow::new(params);
        self.serves = serves;
        Ok(())
    }

    /// Client: open a stream to `addr:port` at the exit. Its
    /// [`Event::Connected`] or [`Event::End`] follows.
    pub fn begin(&mut self, addr: TargetAddr, port: u16) -> Result<u16, Error> {
        let sid = self.new_stream(Kind::Opening)?;
        self.originate(sid, &RelayMsg::Begin { addr, port })?;
        Ok(sid)
    }

    /// Client: open a stream to the last hop's directory cache
    /// (BEGIN_DIR); its [`Event::Connected`] or [`Event::End`] follows.
    pub fn begin_dir(&mut self) -> Result<u16, Error> {
        let sid = self.new_stream(Kind::Opening)?;
        self.originate(sid, &RelayMsg::BeginDir)?;
        Ok(sid)
    }

    /// Client: ask the last hop to send `body` straight back
    /// ([`Event::Echo`]); at most [`Circuit::echo_max`] bytes.
    pub fn echo(&mut self, body: &[u8]) -> Result<(), Error> {
        if !matches!(self.role, Role::Client(_)) {
            return Err(Error::malformed("ECHO", "only a client asks for one"));
        }
        self.originate(0, &RelayMsg::Echo(body.to_vec()))
    }

    /// The most an ECHO carries on this circuit.
    pub fn echo_max(&self) -> usize {
        self.data_max()
    }

    /// Client: resolve `host` at the exit; [`Event::Resolved`] follows.
    pub fn resolve(&mut self, host: String) -> Result<u16, Error> {
        let sid = self.new_stream(Kind::Resolving)?;
        self.originate(sid, &RelayMsg::Resolve(host))?;
        Ok(sid)
    }

    fn new_stream(&mut self, kind: Kind) -> Result<u16, Error> {
        if !matches!(self.role, Role::Client(_)) || self.serves {
            return Err(Error::malformed("stream", "only a client opens streams"));
        }
        if self.streams.len() >= MAX_STREAMS {
            return Err(Error::TooLarge {
                what: "streams on a circuit",
                len: self.streams.len() + 1,
                max: MAX_STREAMS,
            });
        }
        loop {
            let sid = self.next_stream;
            self.next_stream = self.next_stream.wrapping_add(1).max(1);
            if let std::collections::hash_map::Entry::Vacant(e) = self.streams.entry(sid) {
                e.insert(StreamState::new(kind));
                return Ok(sid);
            }
        }
    }

    /// Relay: the stream asked for by [`Event::Begin`] is connected (to
    /// `addr`; none for [`Event::BeginDir`]).
    pub fn connected(&mut self, sid: u16, addr: Option<IpAddr>) -> Result<(), Error> {
        match self.streams.get_mut(&sid) {
            Some(st) if st.kind == Kind::Opening => {
                st.kind = Kind::Open;
                self.originate(sid, &RelayMsg::Connected(addr))
            }
            _ => Ok(()),
        }
    }

    /// Relay: the answer to [`Event::Resolve`] (at most 16 addresses go out).
    pub fn resolved(&mut self, sid: u16, addrs: &[IpAddr]) -> Result<(), Error> {
        if !self
            .streams
            .get(&sid)
            .is_some_and(|s| s.kind == Kind::Resolving)
        {
            return Ok(());
        }
        self.forget(sid);
        let addrs = addrs.iter().take(16).map(|a| (*a, 60)).collect();
        self.originate(sid, &RelayMsg::Resolved(addrs))
    }

    /// Relay: the extension asked for by [`Event::Extend`] failed.
    /// (Nothing is sent if the client has truncated meanwhile.)
    pub fn extend_failed(&mut self, reason: DestroyReason) -> Result<(), Error> {
        match &mut self.role {
            Role::Relay { next, .. } if *next == NextHop::Pending => {
                *next = NextHop::None;
                self.originate(0, &RelayMsg::Truncated(reason.0))
            }
            _ => Ok(()),
        }
    }

    /// Send `data` on stream `sid`: sealed into DATA cells now as far as the
    /// windows allow, the rest kept until SENDMEs open them. Returns true
    /// when all is sealed; otherwise [`Event::Sent`] follows once it is.
    /// A stream that is gone (or never was) fails with
    /// [`Error::UnknownStream`].
    ///
    /// A client may send on a stream it has begun before the far end
    /// connects it (optimistic data: the request goes with the BEGIN
    /// instead of a round trip later); the far end holds it until it has
    /// connected, and drops it if it cannot.
    pub fn send(&mut self, now: Instant, sid: u16, data: &[u8]) -> Result<bool, Error> {
        // The end that opened the stream (a service's streams are opened
        // by the client behind the rendezvous point).
        let opener = matches!(self.role, Role::Client(_)) && !self.serves;
        let Some(st) = self.streams.get_mut(&sid) else {
            return Err(Error::UnknownStream(sid));
        };
        let open = st.kind == Kind::Open || (opener && st.kind == Kind::Opening);
        if !open || st.end_after.is_some() {
            return Err(Error::UnknownStream(sid));
        }
        let was_blocked = !st.unsent.is_empty();
        st.unsent.extend_from_slice(data);
        if was_blocked {
            return Ok(false);
        }
        let done = self.pump(now, sid)?;
        if !done {
            self.blocked.push_back(sid);
        }
        Ok(done)
    }

    /// The driver handed on `cells` DATA cells of stream `sid` (delivered to
    /// the application, written to the exit's TCP connection): an XON may
    /// follow, and circuit SENDMEs that waited for room.
    pub fn consumed(&mut self, sid: u16, cells: u32) -> Result<(), Error> {
        let Some(st) = self.streams.get_mut(&sid) else {
            return Ok(());
        };
        let n = cells.min(st.held);
        st.held -= n;
        self.held -= n;
        if st.xoff_sent.is_some() && st.held <= XON_AT {
            st.xoff_sent = None;
            self.originate(sid, &RelayMsg::Xon)?;
        }
        self.release_held()
    }

    /// Circuit SENDMEs that waited for the driver, once it holds few enough.
    fn release_held(&mut self) -> Result<(), Error> {
        if self.unreleased > 0 && self.held <= HOLD_MAX {
            let n = std::mem::take(&mut self.unreleased);
            self.release(n)?;
        }
        Ok(())
    }

    /// `n` received cells left the circuit: send the circuit SENDMEs due.
    fn release(&mut self, n: u32) -> Result<(), Error> {
        let mut tags = std::mem::take(&mut self.sendme_tags);
        self.fc_recv.release(n, &mut tags);
        let r = tags
            .drain(..)
            .try_for_each(|tag| self.originate(0, &RelayMsg::Sendme { tag }));
        self.sendme_tags = tags;
        r
    }

    /// Remove stream `sid`; what it held no longer counts.
    fn forget(&mut self, sid: u16) -> Option<StreamState> {
        let st = self.streams.remove(&sid)?;
        self.held -= st.held;
        Some(st)
    }

    /// End stream `sid` from this side: END goes out after what the stream
    /// still has to send. Nothing happens for a stream already gone.
    pub fn end(&mut self, sid: u16, reason: EndReason) -> Result<(), Error> {
        let Some(st) = self.streams.get_mut(&sid) else {
            return Ok(());
        };
        if st.kind == Kind::Resolving {
            self.forget(sid);
            return self.release_held();
        }
        if !st.unsent.is_empty() {
            // END waits for what this end still sends. What it holds of the
            // far end's data no longer counts (what comes now is dropped),
            // and the far end may go on: it must not wait for an XON that
            // nothing here would send once the driver stops reading.
            st.end_after = Some(reason);
            let held = std::mem::take(&mut st.held);
            let xon = st.xoff_sent.take().is_some();
            self.held -= held;
            if xon {
                self.originate(sid, &RelayMsg::Xon)?;
            }
            return self.release_held();
        }
        self.forget(sid);
        self.originate(sid, &RelayMsg::End(reason))?;
        self.release_held()
    }

    /// A cell from the neighbour on `side`.
    pub fn handle_cell(&mut self, now: Instant, side: Side, mut cell: Cell) -> Result<(), Error> {
        if self.closed {
            return Ok(());
        }
        match (cell.cmd, side) {
            (CellCmd::PADDING, _) => Ok(()),
            (CellCmd::DESTROY, _) => {
                self.closed = true;
                let reason = DestroyReason(cell.payload[0]);
                self.events.push_back(Event::Destroyed { side, reason });
                Ok(())
            }
            (CellCmd::RELAY, Side::Next) => match &mut self.role {
                Role::Client(_) => self.client_cell(now, &mut cell.payload),
                Role::Relay { layer, .. } => {
                    layer.wrap_backward(&mut cell.payload)?;
                    self.counts.relayed += 1;
                    self.transmits.push_back(Transmit {
                        side: Side::Prev,
                        payload: cell.payload,
                        early: false,
                    });
                    Ok(())
                }
            },
            (CellCmd::RELAY, Side::Prev) => self.relay_cell(now, cell.payload, false),
            (CellCmd::RELAY_EARLY, Side::Prev) => self.relay_cell(now, cell.payload, true),
            (CellCmd::CREATED, Side::Next) => match &mut self.role {
                Role::Relay { next, .. } if *next == NextHop::Pending => {
                    *next = NextHop::Open;
                    let h = cell::decode_created(&cell.payload[..])?.to_vec();
                    self.originate(0, &RelayMsg::Extended(h))
                }
                _ => Err(unexpected("RELAY cells from the next hop", "a CREATED")),
            },
            (cmd, _) => Err(unexpected(
                "a RELAY, DESTROY or PADDING cell",
                format!("{cmd:?}"),
            )),
        }
    }

    fn client_cell(&mut self, now: Instant, payload: &mut Payload) -> Result<(), Error> {
        let Role::Client(layers) = &mut self.role else {
            unreachable!("checked by the caller")
        };
        let last = layers.len() - 1;
        let (from, tag) = layers.decrypt_backward_tagged(payload)?;
        self.counts.delivered += 1;
        let plain = &payload[TAG_LEN..];
        if from != last {
            return match RelayMsg::decode(plain)? {
                (_, RelayMsg::Drop) => Ok(()),
                (_, m) => Err(unexpected(
                    "only DROP from an intermediate hop",
                    format!("{:?}", m.cmd()),
                )),
            };
        }
        if let Some((sid, data)) = RelayMsg::decode_data(plain)? {
            return self.on_data(sid, data, &tag);
        }
        match RelayMsg::decode(plain)? {
            (sid, RelayMsg::Connected(addr)) if sid != 0 => {
                if let Some(st) = self.streams.get_mut(&sid)
                    && st.kind == Kind::Opening
                {
                    st.kind = Kind::Open;
                    self.events
                        .push_back(Event::Connected { stream: sid, addr });
                }
                Ok(())
            }
            (sid, RelayMsg::Resolved(addrs)) if sid != 0 => {
                if self
                    .streams
                    .get(&sid)
                    .is_some_and(|s| s.kind == Kind::Resolving)
                {
                    self.forget(sid);
                    self.events
                        .push_back(Event::Resolved { stream: sid, addrs });
                }
                Ok(())
            }
            (0, RelayMsg::Sendme { tag }) => self.on_sendme(now, &tag),
            (sid, RelayMsg::Xoff) if sid != 0 => self.on_xoff(sid),
            (sid, RelayMsg::Xon) if sid != 0 => self.on_xon(now, sid),
            (0, RelayMsg::Echo(body)) => {
                self.events.push_back(Event::Echo(body));
                Ok(())
            }
            (sid, RelayMsg::End(reason)) if sid != 0 => self.on_end(sid, reason),
            (_, RelayMsg::Drop) => Ok(()),
            (0, m) if m.is_service() && !layers.is_joined() => {
                self.events.push_back(Event::Service(m));
                Ok(())
            }
            (sid, RelayMsg::Begin { addr, port }) if sid != 0 && self.serves => {
                self.incoming_begin(sid, addr, port)
            }
            (sid, m) => Err(unexpected(
                "CONNECTED, DATA, END, SENDME, XOFF, XON, RESOLVED, ECHO or DROP from the last hop",
                format!("{:?} on stream {sid}", m.cmd()),
            )),
        }
    }

    fn relay_cell(&mut self, now: Instant, mut payload: Payload, early: bool) -> Result<(), Error> {
        if early {
            self.early_seen += 1;
            if self.early_seen > MAX_EARLY {
                return Err(PeerMisbehaved::TooManyHops.into());
            }
        }
        let Role::Relay {
            layer, next, first, ..
        } = &mut self.role
        else {
            return Err(Error::malformed("circuit", "a client has no previous hop"));
        };
        let one_hop = *first && *next == NextHop::None;
        let has_next = *next != NextHop::None;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&payload[..TAG_LEN]);
        if layer.peel_forward(&mut payload, *next == NextHop::Open)? == Peeled::Forward {
            self.counts.relayed += 1;
            self.transmits.push_back(Transmit {
                side: Side::Next,
                payload,
                early,
            });
            return Ok(());
        }
        self.counts.delivered += 1;
        let plain = &payload[TAG_LEN..];
        if let Some((sid, data)) = RelayMsg::decode_data(plain)? {
            return self.on_data(sid, data, &tag);
        }
        let (sid, msg) = RelayMsg::decode(plain)?;
        match msg {
            RelayMsg::Extend(_) if sid == 0 && !early => Err(unexpected(
                "EXTEND in a RELAY_EARLY cell",
                "EXTEND in a RELAY cell",
            )),
            RelayMsg::Extend(e) if sid == 0 => {
                if *next != NextHop::None {
                    return Err(PeerMisbehaved::ExtendTwice.into());
                }
                *next = NextHop::Pending;
                self.events.push_back(Event::Extend(e));
                Ok(())
            }
            RelayMsg::Truncate if sid == 0 => {
                if std::mem::replace(next, NextHop::None) != NextHop::None {
                    self.events.push_back(Event::Truncated);
                }
                self.originate(0, &RelayMsg::Truncated(DestroyReason::REQUESTED.0))
            }
            RelayMsg::Sendme { tag } if sid == 0 => self.on_sendme(now, &tag),
            RelayMsg::Xoff if sid != 0 => self.on_xoff(sid),
            RelayMsg::Xon if sid != 0 => self.on_xon(now, sid),
            // Straight back, on a one-hop circuit only (a measurement): it
            // is no probe of a relay deeper in a circuit.
            RelayMsg::Echo(body) if sid == 0 && one_hop => self.originate(0, &RelayMsg::Echo(body)),
            RelayMsg::Begin { addr, port } if sid != 0 => self.incoming_begin(sid, addr, port),
            RelayMsg::BeginDir if sid != 0 => {
                if self.open_incoming(sid, Kind::Opening)? {
                    self.events.push_back(Event::BeginDir { stream: sid });
                }
                Ok(())
            }
            RelayMsg::Resolve(host) if sid != 0 => {
                if self.open_incoming(sid, Kind::Resolving)? {
                    self.events.push_back(Event::Resolve { stream: sid, host });
                }
                Ok(())
            }
            m if sid == 0 && m.is_service() && !has_next => {
                self.events.push_back(Event::Service(m));
                Ok(())
            }
            RelayMsg::End(reason) if sid != 0 => self.on_end(sid, reason),
            RelayMsg::Drop => Ok(()),
            other => Err(unexpected(
                if sid == 0 {
                    "a circuit message (EXTEND, TRUNCATE, SENDME, ECHO, DROP)"
                } else {
                    "a stream message (BEGIN, BEGIN_DIR, DATA, END, XOFF, XON, RESOLVE)"
                },
                format!("{:?} on stream {sid}", other.cmd()),
            )),
        }
    }

    /// A BEGIN from the far end (at an exit, or at a service): the driver
    /// is asked to connect it.
    fn incoming_begin(&mut self, sid: u16, addr: TargetAddr, port: u16) -> Result<(), Error> {
        if self.open_incoming(sid, Kind::Opening)? {
            self.events.push_back(Event::Begin {
                stream: sid,
                addr,
                port,
            });
        }
        Ok(())
    }

    /// A stream the far end opens (BEGIN, BEGIN_DIR, RESOLVE) on id `sid`:
    /// false if refused for lack of room (the refusal is sent).
    fn open_incoming(&mut self, sid: u16, kind: Kind) -> Result<bool, Error> {
        if self.streams.contains_key(&sid) {
            return Err(unexpected(
                "a new stream id for BEGIN, BEGIN_DIR or RESOLVE",
                format!("stream {sid}, which is open"),
            ));
        }
        if self.streams.len() >= MAX_STREAMS {
            self.originate(
                sid,
                &if kind == Kind::Resolving {
                    RelayMsg::Resolved(vec![])
                } else {
                    RelayMsg::End(EndReason::RESOURCE_LIMIT)
                },
            )?;
            return Ok(false);
        }
        self.streams.insert(sid, StreamState::new(kind));
        Ok(true)
    }

    /// DATA from the far end: counted in the circuit window at once and
    /// handed on as an event (joined to the DATA before it when that is for
    /// the same stream and still waiting). Its circuit SENDME goes out now,
    /// or once the driver has consumed enough ([`HOLD_MAX`]).
    fn on_data(&mut self, sid: u16, data: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), Error> {
        self.fc_recv.on_data_received(tag)?;
        let window = self.fc_recv.window_size();
        let mut handed_on = false;
        let mut xoff = false;
        if let Some(st) = self.streams.get_mut(&sid)
            && st.kind != Kind::Resolving
        {
            if let Some(since) = &mut st.xoff_sent {
                // After XOFF the sender may have a window's worth on the
                // way, no more.
                *since += 1;
                if *since > window {
                    return Err(PeerMisbehaved::DataPastXoff.into());
                }
            }
            // A stream this side has ended only sends what it still holds:
            // what arrives is dropped.
            if st.end_after.is_none() {
                handed_on = true;
                st.held += 1;
                if st.held >= XOFF_AT && st.xoff_sent.is_none() {
                    st.xoff_sent = Some(0);
                    xoff = true;
                }
                match self.events.back_mut() {
                    Some(Event::Data {
                        stream,
                        data: d,
                        cells,
                    }) if *stream == sid && d.len() + data.len() <= DATA_EVENT_MAX => {
                        d.extend_from_slice(data);
                        *cells += 1;
                    }
                    _ => self.events.push_back(Event::Data {
                        stream: sid,
                        data: data.to_vec(),
                        cells: 1,
                    }),
                }
            }
        }
        if xoff {
            self.originate(sid, &RelayMsg::Xoff)?;
        }
        if handed_on {
            self.held += 1;
            if self.held > HOLD_MAX {
                self.unreleased += 1;
                return Ok(());
            }
        }
        self.release(1)
    }

    fn on_sendme(&mut self, now: Instant, tag: &[u8; TAG_LEN]) -> Result<(), Error> {
        self.fc_send.on_sendme(now, tag)?;
        self.flush_blocked(now)
    }

    /// The far end holds too much of stream `sid`: seal no more of it.
    fn on_xoff(&mut self, sid: u16) -> Result<(), Error> {
        if let Some(st) = self.streams.get_mut(&sid) {
            st.paused = true;
        }
        Ok(())
    }

    /// The far end has drained stream `sid`: go on sealing it.
    fn on_xon(&mut self, now: Instant, sid: u16) -> Result<(), Error> {
        match self.streams.get_mut(&sid) {
            Some(st) if st.paused => {
                st.paused = false;
                self.flush_blocked(now)
            }
            _ => Ok(()),
        }
    }

    fn on_end(&mut self, sid: u16, reason: EndReason) -> Result<(), Error> {
        if let Some(st) = self.forget(sid) {
            if !st.unsent.is_empty() {
                self.blocked.retain(|&s| s != sid);
                self.events.push_back(Event::Sent { stream: sid });
            }
            if st.kind == Kind::Resolving {
                // A client learns its name did not resolve; a relay just
                // forgets the request (its answer finds no stream).
                if matches!(self.role, Role::Client(_)) {
                    self.events.push_back(Event::Resolved {
                        stream: sid,
                        addrs: vec![],
                    });
                }
            } else {
                self.events.push_back(Event::End {
                    stream: sid,
                    reason,
                });
            }
        }
        self.release_held()
    }

    /// Bytes the far end may receive in one DATA cell from this end.
    fn data_max(&self) -> usize {
        self.capacity() - HEADER_LEN
    }

    fn capacity(&self) -> usize {
        match &self.role {
            Role::Client(l) => forward_capacity(l.len() - 1),
            Role::Relay { .. } => BACKWARD_CAPACITY,
        }
    }

    /// Seal `payload` (its body holds a message) toward the far end.
    fn seal(&mut self, payload: &mut [u8; PAYLOAD_LEN]) -> Result<([u8; TAG_LEN], Side), Error> {
        self.counts.originated += 1;
        match &mut self.role {
            Role::Client(l) => Ok((
                l.encrypt_forward_in_place(l.len() - 1, payload)?,
                Side::Next,
            )),
            Role::Relay { layer, .. } => {
                Ok((layer.originate_backward_in_place(payload)?, Side::Prev))
            }
        }
    }

    /// Fill `buf` (zeros) with the padding keystream.
    fn pad(&mut self, buf: &mut [u8]) {
        if !buf.is_empty() {
            keystream(&Key::new(&self.pad_key), self.pad_counter, buf);
            self.pad_counter += 1;
        }
    }

    /// A client pads every message with random bytes, so that the hop that
    /// opens it cannot tell from where the zeros end (the filler) how deep
    /// in the circuit it is.
    fn pads_all(&self) -> bool {
        matches!(self.role, Role::Client(_))
    }

    fn originate(&mut self, sid: u16, msg: &RelayMsg) -> Result<(), Error> {
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        let cap = self.capacity();
        let len = msg.encode_into(sid, &mut payload[TAG_LEN..TAG_LEN + cap])?;
        if self.pads_all() {
            self.pad(&mut payload[TAG_LEN + len..TAG_LEN + cap]);
        }
        let (_, side) = self.seal(&mut payload)?;
        self.transmits.push_back(Transmit {
            side,
            payload,
            early: false,
        });
        Ok(())
    }

    /// Seal as much of stream `sid`'s unsent bytes as the windows allow.
    /// Returns true when none are left. (An error ends the circuit, so what
    /// is unsent then does not matter.)
    fn pump(&mut self, now: Instant, sid: u16) -> Result<bool, Error> {
        let (data_max, cap) = (self.data_max(), self.capacity());
        let Some(st) = self.streams.get_mut(&sid) else {
            return Ok(true);
        };
        if st.paused {
            return Ok(st.unsent.is_empty());
        }
        let unsent = std::mem::take(&mut st.unsent);
        let mut off = 0;
        while off < unsent.len() {
            if self.fc_send.available() == 0 {
                self.fc_send.held_back();
                break;
            }
            // The cell a circuit SENDME will acknowledge by its tag keeps
            // random padding, so its tag cannot be computed.
            let acked = self.fc_send.next_is_acked();
            let n = (unsent.len() - off).min(if acked {
                data_max - SENDME_CELL_RANDOM
            } else {
                data_max
            });
            let mut payload = Box::new([0u8; PAYLOAD_LEN]);
            let len = RelayMsg::encode_data_into(
                sid,
                &unsent[off..off + n],
                &mut payload[TAG_LEN..TAG_LEN + cap],
            )?;
            if acked || self.pads_all() {
                self.pad(&mut payload[TAG_LEN + len..TAG_LEN + cap]);
            }
            let (tag, side) = self.seal(&mut payload)?;
            self.fc_send.on_data_sent(now, &tag)?;
            self.transmits.push_back(Transmit {
                side,
                payload,
                early: false,
            });
            off += n;
        }
        let st = self.streams.get_mut(&sid).expect("looked up above");
        st.unsent = unsent;
        st.unsent.drain(..off);
        if !st.unsent.is_empty() {
            return Ok(false);
        }
        if let Some(reason) = st.end_after.take() {
            self.forget(sid);
            self.originate(sid, &RelayMsg::End(reason))?;
            self.release_held()?;
        }
        Ok(true)
    }

    /// Windows opened: send what blocked streams hold, oldest first.
    fn flush_blocked(&mut self, now: Instant) -> Result<(), Error> {
        for _ in 0..self.blocked.len() {
            if self.fc_send.available() == 0 {
                self.fc_send.held_back();
                break;
            }
            let Some(sid) = self.blocked.pop_front() else {
                break;
            };
            if !self.streams.contains_key(&sid) {
                continue;
            }
            if self.pump(now, sid)? {
                self.events.push_back(Event::Sent { stream: sid });
            } else {
                self.blocked.push_back(sid);
            }
        }
        Ok(())
    }
}

fn unexpected(expected: &'static str, got: impl Into<String>) -> Error {
    PeerMisbehaved::Unexpected {
        expected,
        got: got.into(),
    }
    .into()
}
