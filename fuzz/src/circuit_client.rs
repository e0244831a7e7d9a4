//! `circuit_client`: the circuit core at the client, fed arbitrary
//! sequences of cells from its relays.
//!
//! A client circuit (`Circuit::client`) of one to three hops with known
//! keys; the harness plays the relays with the same keys (`RelayLayer`),
//! so the cells it sends carry fuzzer-chosen plaintexts correctly
//! encrypted by any hop and get past the cell authentication. It also
//! sends raw garbage cells, answers the client's streams (CONNECTED, DATA,
//! END, RESOLVED, XOFF, XON, ECHO), sends SENDMEs right or wrong, and
//! makes the client's driver open streams, send, consume and end them.
//!
//! Checked: no panic; every cell the client sends authenticates at the
//! hop it is for and decodes; an error names what the peer did and ends
//! the run; the data the client hands on and its driver has not consumed
//! stays within `HOLD_MAX` plus the circuit window; at most `MAX_STREAMS`
//! streams; one input makes a bounded number of cells.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use allium_proto::cell::{CellCmd, CircId, DestroyReason, PAYLOAD_LEN};
use allium_proto::circuit::{Circuit, Event, HOLD_MAX, MAX_STREAMS, Side};
use allium_proto::flow::CircParams;
use allium_proto::onion::{BACKWARD_CAPACITY, ClientLayers, Peeled, RelayLayer};
use allium_proto::relaymsg::{EndReason, RelayMsg, TargetAddr};
use allium_proto::{Error, cell::Cell};

use crate::circuit_relay::{cell_of, hop_keys, peer_fault};
use crate::input::Input;
use crate::keys::rng;

/// The most cells one settling of the circuit may move.
/// The most DATA cells one operation sends (past `HOLD_MAX` and a fixed
/// window, short of the largest window).
const MAX_DATA_RUN: u16 = 4096;

const MAX_CELLS_PER_OP: usize = 20_000;

struct Net {
    now: Instant,
    params: CircParams,
    client: Circuit,
    hops: Vec<RelayLayer>,
    /// Streams the client opened, as the exit saw them.
    begun: Vec<u16>,
    /// The tags of the client's DATA cells the exit owes SENDMEs for.
    acks: VecDeque<[u8; 16]>,
    data_at_exit: u64,
    /// Per stream: cells handed on, not yet consumed.
    held: BTreeMap<u16, u32>,
    moved: usize,
}

impl Net {
    fn exit(&self) -> usize {
        self.hops.len() - 1
    }

    /// A message from hop `j`, through the hops before it, to the client.
    fn from_hop(&mut self, j: usize, plain: &[u8]) -> Result<(), Error> {
        let j = j.min(self.exit());
        let body = &plain[..plain.len().min(BACKWARD_CAPACITY)];
        let mut p = self.hops[j].originate_backward(body).expect("fits");
        for h in self.hops[..j].iter_mut().rev() {
            h.wrap_backward(&mut p).expect("a counter left");
        }
        self.client
            .handle_cell(self.now, Side::Next, cell_of(CellCmd::RELAY, p))?;
        self.settle()
    }

    fn msg_from_hop(&mut self, j: usize, sid: u16, m: &RelayMsg) -> Result<(), Error> {
        match m.encode(sid, BACKWARD_CAPACITY) {
            Ok(b) => self.from_hop(j, &b),
            Err(_) => Ok(()),
        }
    }

    /// Take what the client sends; check it at the hops; collect events.
    fn settle(&mut self) -> Result<(), Error> {
        self.moved = 0;
        while let Some(t) = self.client.poll_transmit() {
            self.moved += 1;
            assert!(self.moved <= MAX_CELLS_PER_OP, "the client does not settle");
            assert_eq!(t.side, Side::Next);
            let mut p = t.payload;
            let n = self.hops.len();
            let mut at = None;
            for (k, h) in self.hops.iter_mut().enumerate() {
                let tag: [u8; 16] = p[..16].try_into().expect("16 bytes");
                match h.peel_forward(&mut p, k + 1 < n) {
                    Ok(Peeled::Forward) => {}
                    Ok(Peeled::Deliver) => {
                        at = Some((k, tag));
                        break;
                    }
                    Err(e) => panic!("the client's cell fails at hop {k}: {e}"),
                }
            }
            let (k, tag) = at.expect("delivered at some hop");
            let (sid, m) = RelayMsg::decode(&p[16..]).expect("the client's message decodes");
            if k == self.exit() {
                match m {
                    RelayMsg::Begin { .. } | RelayMsg::Resolve(_) => self.begun.push(sid),
                    RelayMsg::Data(_) => {
                        self.data_at_exit += 1;
                        if self
                            .data_at_exit
                            .is_multiple_of(u64::from(self.params.inc()))
                        {
                            self.acks.push_back(tag);
                        }
                    }
                    _ => {}
                }
            }
        }
        while let Some(e) = self.client.poll_event() {
            match e {
                Event::Data { stream, cells, .. } => *self.held.entry(stream).or_default() += cells,
                Event::End { stream, .. } | Event::Resolved { stream, .. } => {
                    self.held.remove(&stream);
                }
                _ => {}
            }
        }
        let held: u32 = self.held.values().sum();
        let bound = HOLD_MAX + self.params.recv_window();
        assert!(held <= bound, "the client holds {held} cells");
        assert!(self.client.stream_count() <= MAX_STREAMS);
        Ok(())
    }

    fn sid(&self, inp: &mut Input<'_>) -> u16 {
        crate::input::stream_id(inp, &self.begun)
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let n = usize::from(inp.u8() % 3) + 1;
    let params = CircParams::decode(inp.array()).unwrap_or_default();
    let mut layers = ClientLayers::new();
    let mut hops = Vec::new();
    for i in 0..n {
        let k = hop_keys(i as u8);
        layers.push(&k).expect("at most eight hops");
        hops.push(RelayLayer::new(&k));
    }
    let client = Circuit::client(&mut rng(u64::from(inp.u8())), layers, params).expect("hops");
    let mut net = Net {
        now: Instant::now(),
        params,
        client,
        hops,
        begun: Vec::new(),
        acks: VecDeque::new(),
        data_at_exit: 0,
        held: BTreeMap::new(),
        moved: 0,
    };
    if let Err(e) = drive(&mut net, &mut inp) {
        peer_fault(&e);
    }
}

fn drive(net: &mut Net, inp: &mut Input<'_>) -> Result<(), Error> {
    while !inp.is_empty() {
        let op = inp.u8();
        let j = usize::from(op >> 4);
        let exit = net.exit();
        match op % 12 {
            0 => {
                let plain = inp.var();
                net.from_hop(j, plain)?;
            }
            1 => {
                let side = if inp.bool() { Side::Next } else { Side::Prev };
                let cmd = CellCmd(inp.u8() % 8);
                let mut p = Box::new([0u8; PAYLOAD_LEN]);
                let src = inp.var();
                let n = src.len().min(PAYLOAD_LEN);
                p[..n].copy_from_slice(&src[..n]);
                net.client.handle_cell(net.now, side, cell_of(cmd, p))?;
            }
            2 => {
                let sid = net.sid(inp);
                let m = match inp.u8() % 8 {
                    0 => RelayMsg::Connected(inp.bool().then(|| IpAddr::from(inp.array::<4>()))),
                    1 => RelayMsg::End(EndReason(inp.u8())),
                    2 => RelayMsg::Resolved(
                        (0..inp.u8() % 40)
                            .map(|i| (IpAddr::from([i, 1, 2, 3]), u32::from(i)))
                            .collect(),
                    ),
                    3 => RelayMsg::Xoff,
                    4 => RelayMsg::Xon,
                    5 => RelayMsg::Echo(inp.var().to_vec()),
                    6 => RelayMsg::Drop,
                    _ => RelayMsg::Truncated(inp.u8()),
                };
                let sid = if matches!(m, RelayMsg::Echo(_) | RelayMsg::Truncated(_)) {
                    0
                } else {
                    sid
                };
                net.msg_from_hop(exit, sid, &m)?;
            }
            3 => {
                let sid = net.sid(inp);
                let count = inp.u16() % MAX_DATA_RUN;
                let len = usize::from(inp.u8()) * 2;
                for i in 0..count {
                    net.msg_from_hop(exit, sid, &RelayMsg::Data(vec![i as u8; len]))?;
                }
            }
            4 => {
                let tag = match net.acks.pop_front() {
                    Some(t) if !inp.bool() => t,
                    _ => inp.array(),
                };
                net.msg_from_hop(j, 0, &RelayMsg::Sendme { tag })?;
            }
            5 => {
                let r = match inp.u8() % 5 {
                    0 => net
                        .client
                        .begin(TargetAddr::Host("example.org".into()), inp.u16()),
                    1 => net
                        .client
                        .begin(TargetAddr::Ip(IpAddr::from(inp.array::<16>())), 443),
                    2 => net.client.resolve("example.org".into()),
                    3 => net.client.begin_dir(),
                    _ => {
                        let body = inp.var();
                        let body = &body[..body.len().min(net.client.echo_max())];
                        net.client.echo(body).map(|()| 0)
                    }
                };
                match r {
                    Ok(_) => {}
                    Err(Error::TooLarge { .. }) => {
                        assert_eq!(net.client.stream_count(), MAX_STREAMS)
                    }
                    Err(e) => panic!("a local request failed: {e}"),
                }
            }
            6 => {
                let sid = net.sid(inp);
                let bytes = vec![0xa5; usize::from(inp.u16())];
                let now = net.now;
                match net.client.send(now, sid, &bytes) {
                    Ok(_) | Err(Error::UnknownStream(_)) => {}
                    Err(e) => panic!("a local send failed: {e}"),
                }
            }
            7 => {
                let sid = net.sid(inp);
                let n = u32::from(inp.u16());
                if let Some(h) = net.held.get_mut(&sid) {
                    *h -= n.min(*h);
                }
                net.client.consumed(sid, n)?;
            }
            8 => {
                let sid = net.sid(inp);
                net.held.remove(&sid);
                net.client.end(sid, EndReason(inp.u8()))?;
            }
            9 => net.now += Duration::from_millis(u64::from(inp.u16())),
            10 => {
                let c = Cell::destroy(CircId(1), DestroyReason(inp.u8()));
                net.client.handle_cell(net.now, Side::Next, c)?;
            }
            _ => {
                let _ = (
                    net.client.take_counts(),
                    net.client.rtt(),
                    net.client.cwnd(),
                );
            }
        }
        net.settle()?;
    }
    Ok(())
}
