//! `circuit_relay`: the circuit core at relays, fed arbitrary sequences of
//! cells.
//!
//! One to three relays (`Circuit::relay`) with known hop keys are
//! extended into a circuit by the real EXTEND exchange. The harness is the
//! client: it holds the same keys (`ClientLayers`), so the cells it sends
//! carry fuzzer-chosen plaintexts correctly encrypted for any hop and get
//! past the cell authentication; it also sends raw garbage cells to any
//! relay from either side, answers or refuses what the relays ask for
//! (streams, resolves, extensions), sends and consumes stream data and
//! acknowledges the exit's DATA with the right SENDMEs.
//!
//! Checked: no panic; every cell the relays send back to the client
//! authenticates and decodes; an error names what the peer did and ends
//! the run (the driver tears the circuit down); the data a relay hands on
//! and the driver has not consumed stays within `HOLD_MAX` plus the
//! circuit window; a relay has at most `MAX_STREAMS` streams; one input
//! makes a bounded number of cells.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason, PAYLOAD_LEN};
use allium_proto::circuit::{Circuit, Event, HOLD_MAX, MAX_STREAMS, Payload, Side};
use allium_proto::flow::CircParams;
use allium_proto::onion::{ClientLayers, HopKeys, RelayLayer, forward_capacity};
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg, TargetAddr};
use allium_proto::{Error, LinkKey};

use crate::input::Input;
use crate::keys::rng;

/// The most cells one settling of the circuit may move (a cell in makes
/// a bounded number of cells out).
/// The most DATA cells one operation sends (past `HOLD_MAX` and a fixed
/// window, short of the largest window).
const MAX_DATA_RUN: u16 = 4096;

const MAX_CELLS_PER_OP: usize = 20_000;

pub fn hop_keys(i: u8) -> HopKeys {
    let mut k = [0u8; 64];
    for (j, b) in k.iter_mut().enumerate() {
        *b = i.wrapping_mul(31).wrapping_add(j as u8);
    }
    HopKeys::from_bytes(&k)
}

pub fn cell_of(cmd: CellCmd, payload: Payload) -> Cell {
    Cell {
        circ_id: CircId(1),
        cmd,
        payload,
    }
}

/// The relays and the harness's client end.
struct Net {
    now: Instant,
    params: CircParams,
    layers: ClientLayers,
    relays: Vec<Circuit>,
    /// Cells on their way: to relay `usize`, from `Side`.
    wire: VecDeque<(usize, Side, Cell)>,
    /// Streams each relay asked about (BEGIN, RESOLVE) and extensions.
    begun: Vec<u16>,
    extending: Option<usize>,
    /// Per relay and stream: cells handed on, not yet consumed.
    held: Vec<BTreeMap<u16, u32>>,
    /// Tags the client owes SENDMEs for, oldest first.
    acks: VecDeque<[u8; 16]>,
    data_from_exit: u64,
    /// The input sent a cell from a next hop.
    garbage_back: bool,
    moved: usize,
}

impl Net {
    fn exit(&self) -> usize {
        self.relays.len() - 1
    }

    /// Send a message from the client to hop `target`.
    fn to_hop(&mut self, target: usize, plain: &[u8], early: bool) {
        let target = target.min(self.layers.len() - 1);
        let cap = forward_capacity(target);
        let mut msg = plain[..plain.len().min(cap)].to_vec();
        msg.resize(cap, 0);
        let p = self
            .layers
            .encrypt_forward(target, &msg)
            .expect("within capacity");
        let cmd = if early {
            CellCmd::RELAY_EARLY
        } else {
            CellCmd::RELAY
        };
        self.wire.push_back((0, Side::Prev, cell_of(cmd, p)));
    }

    fn msg_to_hop(&mut self, target: usize, sid: u16, m: &RelayMsg, early: bool) {
        let target = target.min(self.layers.len() - 1);
        if let Ok(b) = m.encode(sid, forward_capacity(target)) {
            self.to_hop(target, &b, early);
        }
    }

    /// Move every cell until none is left; an error ends the run.
    fn settle(&mut self) -> Result<(), Error> {
        self.moved = 0;
        loop {
            for k in 0..self.relays.len() {
                while let Some(t) = self.relays[k].poll_transmit() {
                    self.moved += 1;
                    assert!(
                        self.moved <= MAX_CELLS_PER_OP,
                        "the circuit does not settle"
                    );
                    let cmd = if t.early {
                        CellCmd::RELAY_EARLY
                    } else {
                        CellCmd::RELAY
                    };
                    match t.side {
                        Side::Next if k + 1 < self.relays.len() => {
                            self.wire
                                .push_back((k + 1, Side::Prev, cell_of(cmd, t.payload)))
                        }
                        // Beyond the last relay: a next hop it extended to.
                        Side::Next => {}
                        Side::Prev if k > 0 => {
                            self.wire
                                .push_back((k - 1, Side::Next, cell_of(cmd, t.payload)))
                        }
                        Side::Prev => self.at_client(t.payload)?,
                    }
                }
                while let Some(e) = self.relays[k].poll_event() {
                    self.event(k, e);
                }
                let streams = self.relays[k].stream_count();
                assert!(streams <= MAX_STREAMS, "{streams} streams");
                let held: u32 = self.held[k].values().sum();
                let bound = HOLD_MAX + self.params.recv_window();
                assert!(held <= bound, "relay {k} holds {held} cells");
            }
            let Some((to, side, c)) = self.wire.pop_front() else {
                return Ok(());
            };
            self.relays[to].handle_cell(self.now, side, c)?;
        }
    }

    /// A cell that reached the client: it authenticates and decodes,
    /// unless the input sent garbage toward the client (which the relays
    /// pass on: only the client can tell), which ends the circuit.
    fn at_client(&mut self, mut p: Payload) -> Result<(), Error> {
        let (from, tag) = match self.layers.decrypt_backward_tagged(&mut p) {
            Ok(x) => x,
            Err(e) => {
                assert!(self.garbage_back, "a relay's cell fails at the client");
                return Err(e);
            }
        };
        let (_, m) = RelayMsg::decode(&p[16..]).expect("a relay's message decodes");
        if from == self.exit() && matches!(m, RelayMsg::Data(_)) {
            self.data_from_exit += 1;
            if self
                .data_from_exit
                .is_multiple_of(u64::from(self.params.inc()))
            {
                self.acks.push_back(tag);
            }
        }
        Ok(())
    }

    fn event(&mut self, k: usize, e: Event) {
        match e {
            Event::Begin { stream, .. }
            | Event::BeginDir { stream }
            | Event::Resolve { stream, .. } => self.begun.push(stream),
            Event::Extend(_) => self.extending = Some(k),
            Event::Data { stream, cells, .. } => *self.held[k].entry(stream).or_default() += cells,
            Event::End { stream, .. } => {
                self.held[k].remove(&stream);
            }
            _ => {}
        }
    }

    /// A stream id: one the relays saw, or the input's own.
    fn sid(&self, inp: &mut Input<'_>) -> u16 {
        crate::input::stream_id(inp, &self.begun)
    }
}

fn extend_msg() -> RelayMsg {
    RelayMsg::Extend(Extend {
        identity: [7; 32],
        link_key: LinkKey([8; 32]),
        addr: "192.0.2.1:9001".parse().expect("an address"),
        htype: cell::HANDSHAKE_NTOR,
        hdata: vec![9; 10],
    })
}

fn created() -> Cell {
    Cell::new(CircId(1), CellCmd::CREATED, &cell::encode_created(&[5; 64])).expect("fits")
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let hops = usize::from(inp.u8() % 3) + 1;
    let params = CircParams::decode(inp.array()).unwrap_or_default();
    let mut r = rng(u64::from(inp.u8()));
    let mut net = Net {
        now: Instant::now(),
        params,
        layers: ClientLayers::new(),
        relays: Vec::new(),
        wire: VecDeque::new(),
        begun: Vec::new(),
        extending: None,
        held: Vec::new(),
        acks: VecDeque::new(),
        data_from_exit: 0,
        garbage_back: false,
        moved: 0,
    };
    // Build the circuit hop by hop with EXTEND, CREATED and EXTENDED.
    for i in 0..hops {
        let keys = hop_keys(i as u8);
        if i > 0 {
            net.msg_to_hop(i - 1, 0, &extend_msg(), true);
            net.settle().expect("an honest extension");
            assert_eq!(net.extending.take(), Some(i - 1));
            net.relays[i - 1]
                .handle_cell(net.now, Side::Next, created())
                .expect("CREATED after EXTEND");
            net.settle().expect("EXTENDED");
        }
        net.layers.push(&keys).expect("at most eight hops");
        net.relays.push(Circuit::relay(
            &mut r,
            RelayLayer::new(&keys),
            i == 0,
            params,
        ));
        net.held.push(BTreeMap::new());
    }
    if let Err(e) = drive(&mut net, &mut inp, hops) {
        peer_fault(&e);
    }
}

/// An error from a relay is the peer's fault or a cell that failed
/// authentication, never a local one.
pub fn peer_fault(e: &Error) {
    assert!(
        !matches!(
            e,
            Error::FlowControl(_) | Error::UnknownStream(_) | Error::CounterExhausted
        ),
        "{e}"
    );
}

fn drive(net: &mut Net, inp: &mut Input<'_>, hops: usize) -> Result<(), Error> {
    while !inp.is_empty() {
        let op = inp.u8();
        let k = usize::from(op >> 4) % hops;
        match op % 12 {
            // A fuzzer-chosen plaintext for hop `k`, as RELAY or RELAY_EARLY.
            0 => {
                let early = inp.bool();
                let plain = inp.var();
                net.to_hop(k, plain, early);
            }
            // A garbage cell at relay `k`, from either side.
            1 => {
                let side = if inp.bool() { Side::Next } else { Side::Prev };
                net.garbage_back |= side == Side::Next;
                let cmd = CellCmd(inp.u8() % 8);
                let mut p = Box::new([0u8; PAYLOAD_LEN]);
                let src = inp.var();
                let n = src.len().min(PAYLOAD_LEN);
                p[..n].copy_from_slice(&src[..n]);
                net.wire.push_back((k, side, cell_of(cmd, p)));
            }
            // Stream requests and data to the exit.
            2 => {
                let sid = inp.u16();
                let port = inp.u16();
                let addr = match inp.u8() % 3 {
                    0 => TargetAddr::Host("example.org".into()),
                    1 => TargetAddr::Ip(IpAddr::from(inp.array::<4>())),
                    _ => TargetAddr::Ip(IpAddr::from(inp.array::<16>())),
                };
                let m = if inp.bool() {
                    RelayMsg::Resolve("example.org".into())
                } else {
                    RelayMsg::Begin { addr, port }
                };
                let exit = net.exit();
                net.msg_to_hop(exit, sid, &m, false);
            }
            3 => {
                let sid = net.sid(inp);
                let n = inp.u16() % MAX_DATA_RUN;
                let len = usize::from(inp.u8()) * 2;
                let exit = net.exit();
                for i in 0..n {
                    net.msg_to_hop(exit, sid, &RelayMsg::Data(vec![i as u8; len]), false);
                    if i % 64 == 63 {
                        net.settle()?;
                    }
                }
            }
            4 => {
                let sid = net.sid(inp);
                let m = match inp.u8() % 5 {
                    0 => RelayMsg::End(EndReason(inp.u8())),
                    1 => RelayMsg::Xoff,
                    2 => RelayMsg::Xon,
                    3 => RelayMsg::Drop,
                    _ => RelayMsg::Echo(inp.var().to_vec()),
                };
                let sid = if matches!(m, RelayMsg::Echo(_)) {
                    0
                } else {
                    sid
                };
                net.msg_to_hop(k, sid, &m, false);
            }
            // The SENDME the exit is owed, or a made-up one.
            5 => {
                let tag = match net.acks.pop_front() {
                    Some(t) if !inp.bool() => t,
                    _ => inp.array(),
                };
                net.msg_to_hop(k, 0, &RelayMsg::Sendme { tag }, false);
            }
            // Circuit management: EXTEND, TRUNCATE, CREATED, DESTROY.
            6 => match inp.u8() % 4 {
                0 => net.msg_to_hop(k, 0, &extend_msg(), inp.bool()),
                1 => net.msg_to_hop(k, 0, &RelayMsg::Truncate, false),
                2 => net.wire.push_back((k, Side::Next, created())),
                _ => {
                    let side = if inp.bool() { Side::Next } else { Side::Prev };
                    let c = Cell::destroy(CircId(1), DestroyReason(inp.u8()));
                    net.wire.push_back((k, side, c));
                }
            },
            // What the relay's driver decides.
            7 => {
                let sid = net.sid(inp);
                let r = match inp.u8() % 4 {
                    0 => net.relays[k].connected(sid, Some(IpAddr::from(inp.array::<4>()))),
                    1 => {
                        net.held[k].remove(&sid);
                        net.relays[k].end(sid, EndReason(inp.u8()))
                    }
                    2 => {
                        let addrs: Vec<IpAddr> = (0..inp.u8() % 20)
                            .map(|i| IpAddr::from([i, 0, 0, 1]))
                            .collect();
                        net.relays[k].resolved(sid, &addrs)
                    }
                    _ => net.relays[k].extend_failed(DestroyReason(inp.u8())),
                };
                r?;
            }
            8 => {
                let sid = net.sid(inp);
                let len = usize::from(inp.u16());
                let bytes = vec![0x5a; len];
                let now = net.now;
                match net.relays[k].send(now, sid, &bytes) {
                    Ok(_) | Err(Error::UnknownStream(_)) => {}
                    Err(e) => panic!("a local send failed: {e}"),
                }
            }
            9 => {
                let sid = net.sid(inp);
                let n = u32::from(inp.u16());
                if let Some(h) = net.held[k].get_mut(&sid) {
                    *h -= n.min(*h);
                }
                net.relays[k].consumed(sid, n)?;
            }
            10 => net.now += Duration::from_millis(u64::from(inp.u16())),
            _ => {
                let _ = (
                    net.relays[k].take_counts(),
                    net.relays[k].rtt(),
                    net.relays[k].cwnd(),
                );
            }
        }
        net.settle()?;
    }
    Ok(())
}
