//! `CircuitPair`: a client and its relays as circuit cores in memory, joined
//! by a simulated wire with a per-link delay and a tamper hook.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::LinkKey;
use crate::cell::CircId;
use crate::flow::{CWND_MAX, CircParams, FIXED_WINDOW};
use crate::onion::HopKeys;

type Tamper = Box<dyn FnMut(usize, &mut Cell)>;

/// Node 0 is the client, node `k` its `k`-th relay; the last is the exit.
struct CircuitPair {
    now: Instant,
    delay: Duration,
    nodes: Vec<Circuit>,
    /// Cells in flight: when they arrive, at which node, from which side.
    wire: VecDeque<(Instant, usize, Side, Cell)>,
    events: Vec<Vec<Event>>,
    errors: Vec<Option<Error>>,
    /// Called on each cell as it leaves node `usize`.
    tamper: Option<Tamper>,
    rng: StdRng,
    /// Where a cell that leaves node `usize` toward `Side` arrives, and
    /// from which side (a straight line unless two circuits are joined).
    route: fn(usize, Side) -> (usize, Side),
}

fn straight(i: usize, side: Side) -> (usize, Side) {
    match side {
        Side::Next => (i + 1, Side::Prev),
        Side::Prev => (i - 1, Side::Next),
    }
}

/// Two three-hop circuits joined at the rendezvous point: nodes are the
/// client, its guard, middle and rendezvous hop (3), the service's
/// rendezvous hop (4), middle, guard, and the service (7).
fn joined(i: usize, side: Side) -> (usize, Side) {
    match (i, side) {
        (3, Side::Next) => (4, Side::Next),
        (4, Side::Next) => (3, Side::Next),
        (0..=3, _) => straight(i, side),
        (_, Side::Next) => (i - 1, Side::Prev),
        (_, Side::Prev) => (i + 1, Side::Next),
    }
}

impl CircuitPair {
    /// A circuit through `hops` relays, built by the real EXTEND exchange,
    /// with congestion control.
    fn new(hops: usize, delay: Duration) -> Self {
        Self::with_params(hops, delay, CircParams::default())
    }

    fn with_params(hops: usize, delay: Duration, params: CircParams) -> Self {
        let seed = rand::random::<u64>();
        println!("CircuitPair seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = ClientLayers::new();
        let mut relays = Vec::new();
        for i in 0..hops {
            let mut k = [0u8; 64];
            rng.fill_bytes(&mut k);
            let keys = HopKeys::from_bytes(&k);
            let relay = Circuit::relay(&mut rng, RelayLayer::new(&keys), i == 0, params);
            if i > 0 {
                // The previous hop is asked to extend, and gets CREATED.
                let last = layers.len() - 1;
                let ext = RelayMsg::Extend(Extend {
                    identity: [7; 32],
                    link_key: LinkKey([8; 32]),
                    addr: "127.0.0.1:1".parse().unwrap(),
                    htype: 2,
                    hdata: vec![9; 10],
                })
                .encode(0, forward_capacity(last))
                .unwrap();
                let p = layers.encrypt_forward(last, &ext).unwrap();
                let mut fwd = vec![p];
                for r in relays.iter_mut().take(i - 1) {
                    let c: &mut Circuit = r;
                    c.handle_cell(Instant::now(), Side::Prev, early_cell(fwd.pop().unwrap()))
                        .unwrap();
                    let t = c.poll_transmit().unwrap();
                    assert!(t.early, "RELAY_EARLY passes on as RELAY_EARLY");
                    fwd.push(t.payload);
                }
                let prev: &mut Circuit = relays.last_mut().unwrap();
                prev.handle_cell(Instant::now(), Side::Prev, early_cell(fwd.pop().unwrap()))
                    .unwrap();
                assert!(matches!(prev.poll_event(), Some(Event::Extend(e)) if e.hdata == [9; 10]));
                let created =
                    Cell::new(CircId(0), CellCmd::CREATED, &cell::encode_created(&[5; 8])).unwrap();
                prev.handle_cell(Instant::now(), Side::Next, created)
                    .unwrap();
                let mut back = prev.poll_transmit().unwrap().payload;
                for r in relays.iter_mut().rev().skip(1) {
                    let c: &mut Circuit = r;
                    c.handle_cell(Instant::now(), Side::Next, relay_cell(back))
                        .unwrap();
                    back = c.poll_transmit().unwrap().payload;
                }
                assert_eq!(layers.decrypt_backward(&mut back).unwrap(), last);
                let (_, m) = RelayMsg::decode(&back[16..]).unwrap();
                assert_eq!(m, RelayMsg::Extended(vec![5; 8]));
            }
            layers.push(&keys).unwrap();
            relays.push(relay);
        }
        let mut nodes = vec![Circuit::client(&mut rng, layers, params).unwrap()];
        for mut r in relays {
            r.take_counts();
            nodes.push(r);
        }
        let n = nodes.len();
        CircuitPair {
            now: Instant::now(),
            delay,
            nodes,
            wire: VecDeque::new(),
            events: (0..n).map(|_| Vec::new()).collect(),
            errors: (0..n).map(|_| None).collect(),
            tamper: None,
            rng,
            route: straight,
        }
    }

    /// A client's circuit and a service's, each built by the real EXTEND
    /// exchange to one rendezvous relay, joined there by the rendezvous
    /// messages, with end-to-end keys between the two ends (see
    /// [`joined`] for the node numbers).
    fn joined(delay: Duration) -> Self {
        let mut client = Self::new(3, delay);
        let mut service = Self::new(3, delay);
        let cookie = [3; crate::relaymsg::COOKIE_LEN];
        client.nodes[0]
            .send_service(&RelayMsg::EstablishRendezvous(cookie))
            .unwrap();
        client.drive();
        assert_eq!(
            client.take_events(3),
            vec![Event::Service(RelayMsg::EstablishRendezvous(cookie))]
        );
        let reply = vec![4; 66];
        service.nodes[0]
            .send_service(&RelayMsg::Rendezvous1 {
                cookie,
                reply: reply.clone(),
            })
            .unwrap();
        service.drive();
        assert!(matches!(
            &service.take_events(3)[..],
            [Event::Service(RelayMsg::Rendezvous1 { .. })]
        ));
        for rp in [&mut client.nodes[3], &mut service.nodes[3]] {
            rp.join().unwrap();
            assert!(rp.join().is_err(), "joined once only");
        }
        client.nodes[3]
            .send_service(&RelayMsg::Rendezvous2(reply.clone()))
            .unwrap();
        client.drive();
        assert_eq!(
            client.take_events(0),
            vec![Event::Service(RelayMsg::Rendezvous2(reply))]
        );
        let mut k = [0u8; 64];
        client.rng.fill_bytes(&mut k);
        let keys = HopKeys::from_bytes(&k);
        let params = CircParams::default();
        client.nodes[0]
            .join_end_to_end(&keys, params, false)
            .unwrap();
        service.nodes[0]
            .join_end_to_end(&keys.reversed(), params, true)
            .unwrap();
        assert_eq!(client.nodes[0].binding(), keys.binding());
        let mut nodes = std::mem::take(&mut client.nodes);
        nodes.extend(std::mem::take(&mut service.nodes).into_iter().rev());
        for n in &mut nodes {
            n.take_counts();
        }
        client.events = (0..nodes.len()).map(|_| Vec::new()).collect();
        client.errors = (0..nodes.len()).map(|_| None).collect();
        client.nodes = nodes;
        client.route = joined;
        client
    }

    fn exit(&self) -> usize {
        self.nodes.len() - 1
    }

    /// Move what every node has to send onto the wire, and collect events.
    fn collect(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(t) = self.nodes[i].poll_transmit() {
                let (to, from) = (self.route)(i, t.side);
                let mut c = if t.early {
                    early_cell(t.payload)
                } else {
                    relay_cell(t.payload)
                };
                if let Some(f) = &mut self.tamper {
                    f(i, &mut c);
                }
                self.wire.push_back((self.now + self.delay, to, from, c));
            }
            while let Some(e) = self.nodes[i].poll_event() {
                self.events[i].push(e);
            }
        }
    }

    /// Deliver the cells due now (or, if none is, advance the clock to the
    /// first one). False when nothing is left in flight.
    fn step(&mut self) -> bool {
        self.collect();
        let Some(first) = self.wire.iter().map(|w| w.0).min() else {
            return false;
        };
        self.now = self.now.max(first);
        let (due, later): (VecDeque<_>, VecDeque<_>) =
            self.wire.drain(..).partition(|w| w.0 <= self.now);
        self.wire = later;
        for (_, to, from, c) in due {
            if to >= self.nodes.len() || self.errors[to].is_some() {
                continue;
            }
            if let Err(e) = self.nodes[to].handle_cell(self.now, from, c) {
                self.errors[to] = Some(e);
            }
        }
        self.collect();
        true
    }

    /// Run until nothing is in flight.
    fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the circuit did not settle");
    }

    /// Run until nothing is in flight, each of `readers` handing on at once
    /// what it receives on stream `sid`; returns what each got.
    fn drive_reading(&mut self, readers: &[usize], sid: u16) -> Vec<Vec<u8>> {
        let mut got = vec![Vec::new(); readers.len()];
        for _ in 0..100_000 {
            let more = self.step();
            for (g, &node) in got.iter_mut().zip(readers) {
                let (d, cells) = self.received(node, sid);
                g.extend_from_slice(&d);
                self.nodes[node].consumed(sid, cells).unwrap();
            }
            if !more {
                return got;
            }
        }
        panic!("the circuit did not settle");
    }

    fn take_events(&mut self, node: usize) -> Vec<Event> {
        std::mem::take(&mut self.events[node])
    }

    /// Open a stream from the client to the exit.
    fn open_stream(&mut self) -> u16 {
        let sid = self.nodes[0]
            .begin(TargetAddr::Host("example.org".into()), 80)
            .unwrap();
        self.drive();
        let exit = self.exit();
        let at = self.events[exit]
            .iter()
            .position(|e| matches!(e, Event::Begin { stream, port: 80, .. } if *stream == sid));
        assert!(at.is_some(), "no BEGIN for stream {sid}");
        self.events[exit].remove(at.unwrap_or_default());
        self.nodes[exit]
            .connected(sid, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .unwrap();
        self.drive();
        let connected = Event::Connected {
            stream: sid,
            addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let at = self.events[0].iter().position(|e| *e == connected);
        assert!(at.is_some(), "no CONNECTED for stream {sid}");
        self.events[0].remove(at.unwrap_or_default());
        sid
    }

    /// What `node` received on stream `sid`, and the cells it came in.
    fn received(&mut self, node: usize, sid: u16) -> (Vec<u8>, u32) {
        let mut out = (Vec::new(), 0);
        self.events[node].retain(|e| match e {
            Event::Data {
                stream,
                data,
                cells,
            } if *stream == sid => {
                out.0.extend_from_slice(data);
                out.1 += cells;
                false
            }
            _ => true,
        });
        out
    }

    /// Cells in flight toward `node`.
    fn in_flight_to(&self, node: usize) -> usize {
        self.wire.iter().filter(|w| w.1 == node).count()
    }
}

fn early_cell(payload: Payload) -> Cell {
    Cell {
        circ_id: CircId(1),
        cmd: CellCmd::RELAY_EARLY,
        payload,
    }
}

fn relay_cell(payload: Payload) -> Cell {
    Cell {
        circ_id: CircId(1),
        cmd: CellCmd::RELAY,
        payload,
    }
}

fn bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

#[test]
fn bytes_cross_three_hops_both_ways_in_order() {
    let mut p = CircuitPair::new(3, Duration::from_millis(5));
    let sid = p.open_stream();
    let exit = p.exit();
    let up = bytes(&mut p.rng, 50_000);
    let down = bytes(&mut p.rng, 600_000);
    let now = p.now;
    // The client's bytes fit its windows: sealed at once. The exit's do
    // not: it is told when the last of them is sealed.
    assert!(p.nodes[0].send(now, sid, &up).unwrap());
    assert!(!p.nodes[exit].send(now, sid, &down).unwrap());
    // Both ends hand on what arrives at once.
    let got = p.drive_reading(&[exit, 0], sid);
    assert_eq!(got[0], up);
    assert_eq!(got[1], down);
    assert!(p.errors.iter().all(Option::is_none));
    assert_eq!(p.take_events(0), vec![]);
    assert_eq!(p.take_events(exit), vec![Event::Sent { stream: sid }]);
    let c = p.nodes[1].take_counts();
    assert!(c.relayed > 600 && c.originated == 0, "{c:?}");
}

#[test]
fn data_sent_with_a_begin_reaches_the_exit_before_it_connects() {
    let mut p = CircuitPair::new(3, Duration::from_millis(5));
    let exit = p.exit();
    let sid = p.nodes[0]
        .begin(TargetAddr::Host("example.org".into()), 80)
        .unwrap();
    let request = bytes(&mut p.rng, 2_000);
    let now = p.now;
    // Optimistic data: sealed right behind the BEGIN, one trip for both.
    assert!(p.nodes[0].send(now, sid, &request).unwrap());
    p.drive();
    let ev = p.take_events(exit);
    assert!(
        matches!(ev.first(), Some(Event::Begin { stream, port: 80, .. }) if *stream == sid),
        "{ev:?}"
    );
    let got: Vec<u8> = ev[1..]
        .iter()
        .flat_map(|e| match e {
            Event::Data { stream, data, .. } if *stream == sid => data.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, request);
    // Only the end that opened the stream sends before CONNECTED.
    let now = p.now;
    assert!(matches!(
        p.nodes[exit].send(now, sid, b"reply"),
        Err(Error::UnknownStream(_))
    ));
    p.nodes[exit].connected(sid, None).unwrap();
    assert!(p.nodes[exit].send(now, sid, b"reply").unwrap());
    p.drive();
    assert_eq!(p.received(0, sid).0, b"reply");
    // An exit that cannot connect ends the stream; what came early is
    // dropped with it, and nothing is left waiting at the client.
    let sid = p.nodes[0]
        .begin(TargetAddr::Host("example.org".into()), 81)
        .unwrap();
    let now = p.now;
    assert!(p.nodes[0].send(now, sid, &request).unwrap());
    p.drive();
    p.nodes[exit].end(sid, EndReason::CONNECT_REFUSED).unwrap();
    p.drive();
    assert!(p.take_events(0).contains(&Event::End {
        stream: sid,
        reason: EndReason::CONNECT_REFUSED
    }));
    assert!(matches!(
        p.nodes[0].send(now, sid, b"more"),
        Err(Error::UnknownStream(_))
    ));
    assert!(p.errors.iter().all(Option::is_none));
}

#[test]
fn a_joined_circuit_carries_streams_between_client_and_service() {
    let mut p = CircuitPair::joined(Duration::from_millis(5));
    let service = p.exit();
    assert_eq!(service, 7);
    // Streams go to the service, which answers BEGIN as an exit does.
    let sid = p.open_stream();
    let up = bytes(&mut p.rng, 100_000);
    let down = bytes(&mut p.rng, 2_000_000);
    let now = p.now;
    p.nodes[0].send(now, sid, &up).unwrap();
    p.nodes[service].send(now, sid, &down).unwrap();
    let got = p.drive_reading(&[service, 0], sid);
    assert_eq!(got[0], up);
    assert_eq!(got[1], down);
    assert!(p.errors.iter().all(Option::is_none), "{:?}", p.errors);
    // Every relay on the way only passed cells on; the two ends opened
    // and sealed them all (the windows and SENDMEs are end to end).
    for relay in 1..service {
        let c = p.nodes[relay].take_counts();
        assert!(
            c.relayed > 4000 && c.originated == 0 && c.delivered == 0,
            "node {relay}: {c:?}"
        );
    }
    assert!(p.nodes[0].rtt().is_some() && p.nodes[service].rtt().is_some());
    // The client takes no BEGIN; the service opens no stream itself.
    assert!(
        p.nodes[service]
            .begin(TargetAddr::Host("x".into()), 1)
            .is_err()
    );
    p.nodes[service]
        .send_service(&RelayMsg::Begin {
            addr: TargetAddr::Host("x".into()),
            port: 1,
        })
        .unwrap_err();
}

#[test]
fn a_stream_that_is_not_read_says_xoff_and_its_sender_stops() {
    let mut p = CircuitPair::new(3, Duration::from_millis(1));
    let sid = p.open_stream();
    let exit = p.exit();
    let data = bytes(&mut p.rng, 20_000 * 488);
    let now = p.now;
    assert!(!p.nodes[exit].send(now, sid, &data).unwrap());
    p.drive();
    // Nothing consumed: XOFF went out at XOFF_AT cells, and the exit
    // stopped with what was on the way then. Its bytes wait, unsent.
    let (mut got, cells) = p.received(0, sid);
    let cwnd = p.nodes[exit].cwnd();
    assert!(
        (XOFF_AT..XOFF_AT + cwnd).contains(&cells),
        "{cells} cells after XOFF at {XOFF_AT}, window {cwnd}"
    );
    assert!(!p.take_events(exit).contains(&Event::Sent { stream: sid }));
    assert_eq!(p.in_flight_to(0), 0, "the flow stopped");
    // The circuit moved on meanwhile: another stream is not held up.
    let other = p.open_stream();
    p.nodes[exit].send(now, other, b"other").unwrap();
    assert_eq!(p.drive_reading(&[0], other)[0], b"other");
    // Consumed: XON, and the rest comes.
    p.nodes[0].consumed(sid, cells).unwrap();
    got.extend_from_slice(&p.drive_reading(&[0], sid)[0]);
    assert_eq!(got, data);
    assert!(p.take_events(exit).contains(&Event::Sent { stream: sid }));
    assert!(p.errors.iter().all(Option::is_none));
}

/// A stream ended by an end that still has bytes to send, while it holds
/// the far end's data unread under XOFF: what it holds stops counting, the
/// far end hears XON, and the END goes out once the bytes have.
#[test]
fn ending_a_stream_under_xoff_releases_what_it_held() {
    let mut p = CircuitPair::new(1, Duration::from_millis(1));
    let sid = p.open_stream();
    let exit = p.exit();
    let now = p.now;
    // The exit sends; the client does not read: XOFF.
    assert!(
        !p.nodes[exit]
            .send(now, sid, &vec![5u8; 5000 * 488])
            .unwrap()
    );
    p.drive();
    assert!(p.nodes[0].held >= XOFF_AT);
    assert!(p.nodes[0].streams[&sid].xoff_sent.is_some());
    // The client has more to send than its window takes, and ends.
    let up = bytes(&mut p.rng, 3000 * 498);
    assert!(!p.nodes[0].send(now, sid, &up).unwrap());
    p.nodes[0].end(sid, EndReason::DONE).unwrap();
    assert_eq!(p.nodes[0].held, 0);
    assert_eq!(p.nodes[0].unreleased, 0);
    // The exit reads what comes; the client's bytes, then its END, arrive.
    let got = p.drive_reading(&[exit], sid);
    assert_eq!(got[0], up);
    assert!(p.take_events(exit).contains(&Event::End {
        stream: sid,
        reason: EndReason::DONE
    }));
    assert_eq!(p.nodes[0].stream_count(), 0);
    assert!(p.errors.iter().all(Option::is_none));
}

#[test]
fn the_circuit_window_caps_all_streams_together() {
    for (params, window) in [
        (CircParams::Fixed, FIXED_WINDOW),
        (
            CircParams::default(),
            crate::congestion::Params::default().cwnd_init,
        ),
    ] {
        let mut p = CircuitPair::with_params(2, Duration::from_millis(1), params);
        let exit = p.exit();
        let sids: Vec<u16> = (0..3).map(|_| p.open_stream()).collect();
        // Cut the way back: no SENDME reaches the exit.
        p.tamper = Some(Box::new(|from, c| {
            if from == 0 {
                c.cmd = CellCmd::PADDING;
            }
        }));
        let now = p.now;
        for &s in &sids {
            p.nodes[exit].send(now, s, &vec![2u8; 200_000]).unwrap();
        }
        p.drive();
        let cells: u32 = sids.iter().map(|&s| p.received(0, s).1).sum();
        assert_eq!(cells, window, "{params:?}");
        assert_eq!(p.nodes[exit].cwnd(), window);
        assert_eq!(p.in_flight_to(0), 0);
    }
}

#[test]
fn ending_a_stream_sends_its_unsent_bytes_first() {
    let mut p = CircuitPair::new(1, Duration::from_millis(2));
    let sid = p.open_stream();
    let exit = p.exit();
    let data = bytes(&mut p.rng, 1500 * 498);
    let now = p.now;
    assert!(!p.nodes[0].send(now, sid, &data).unwrap());
    p.nodes[0].end(sid, EndReason::DONE).unwrap();
    let got = p.drive_reading(&[exit], sid);
    assert_eq!(got[0], data);
    assert_eq!(
        p.take_events(exit),
        vec![Event::End {
            stream: sid,
            reason: EndReason::DONE
        }]
    );
    assert_eq!(p.nodes[exit].stream_count(), 0);
    assert!(matches!(
        p.nodes[0].send(now, sid, b"late"),
        Err(Error::UnknownStream(_))
    ));
}

/// A client that ignores the rules, speaking through raw layers to a
/// one-hop circuit.
struct RawClient {
    layers: ClientLayers,
    exit: Circuit,
    now: Instant,
}

impl RawClient {
    fn new() -> Self {
        Self::with_params(CircParams::default())
    }

    fn with_params(params: CircParams) -> Self {
        let mut rng = StdRng::seed_from_u64(1);
        let keys = HopKeys::from_bytes(&[3; 64]);
        let mut layers = ClientLayers::new();
        layers.push(&keys).unwrap();
        RawClient {
            layers,
            exit: Circuit::relay(&mut rng, RelayLayer::new(&keys), true, params),
            now: Instant::now(),
        }
    }

    /// Send `msg` as a client would: EXTEND in RELAY_EARLY, the rest in
    /// RELAY.
    fn send(&mut self, sid: u16, msg: RelayMsg) -> Result<(), Error> {
        let early = matches!(msg, RelayMsg::Extend(_));
        self.send_as(sid, msg, early)
    }

    fn send_as(&mut self, sid: u16, msg: RelayMsg, early: bool) -> Result<(), Error> {
        let body = msg.encode(sid, forward_capacity(0)).unwrap();
        let p = self.layers.encrypt_forward(0, &body).unwrap();
        let cell = if early { early_cell(p) } else { relay_cell(p) };
        self.exit.handle_cell(self.now, Side::Prev, cell)
    }

    /// Open stream `sid` at the exit (nothing answers it unless the test
    /// calls `connected`).
    fn begin(&mut self, sid: u16) {
        let addr = TargetAddr::Host("a.b".into());
        self.send(sid, RelayMsg::Begin { addr, port: 1 }).unwrap();
    }

    /// Backward cells from the exit, opened.
    fn recv(&mut self) -> Vec<(u16, RelayMsg, [u8; 16])> {
        let mut out = Vec::new();
        while let Some(mut t) = self.exit.poll_transmit() {
            let (_, tag) = self.layers.decrypt_backward_tagged(&mut t.payload).unwrap();
            let (sid, m) = RelayMsg::decode(&t.payload[16..]).unwrap();
            out.push((sid, m, tag));
        }
        out
    }
}

#[test]
fn data_past_a_window_costs_the_peer_the_circuit() {
    // A stream that said XOFF takes a window's worth more, no more.
    let mut c = RawClient::with_params(CircParams::Fixed);
    c.begin(5);
    let mut sent = 0;
    let err = loop {
        sent += 1;
        match c.send(5, RelayMsg::Data(vec![0; 10])) {
            Ok(()) => assert!(sent <= XOFF_AT + FIXED_WINDOW),
            Err(e) => break e,
        }
    };
    assert_eq!(sent, XOFF_AT + FIXED_WINDOW + 1);
    assert!(matches!(
        err,
        Error::PeerMisbehaved(PeerMisbehaved::DataPastXoff)
    ));
    assert!(
        c.recv()
            .iter()
            .any(|(s, m, _)| *s == 5 && *m == RelayMsg::Xoff),
        "XOFF was said"
    );

    // The circuit window moves on as cells are handed on: the exit owes a
    // SENDME for every `inc` cells, each carrying the tag of the cell that
    // completed it, until the driver holds HOLD_MAX cells unconsumed.
    // Then a peer that goes on has a window's worth, no more.
    for (params, window) in [
        (CircParams::Fixed, FIXED_WINDOW),
        (CircParams::default(), CWND_MAX),
    ] {
        let mut c = RawClient::with_params(params);
        let streams = 2 * HOLD_MAX / XOFF_AT;
        for s in 1..=streams {
            c.begin(s as u16);
        }
        let mut sent = 0u32;
        let err = loop {
            sent += 1;
            // Round robin, each stream below its XOFF point.
            let sid = 1 + (sent % streams) as u16;
            match c.send(sid, RelayMsg::Data(vec![0; 10])) {
                Ok(()) if sent == HOLD_MAX => {
                    let sendmes = c
                        .recv()
                        .into_iter()
                        .filter(|(s, m, _)| *s == 0 && matches!(m, RelayMsg::Sendme { .. }))
                        .count();
                    assert_eq!(sendmes as u32, HOLD_MAX / params.inc());
                }
                Ok(()) => assert!(sent <= HOLD_MAX + window),
                Err(e) => break e,
            }
        };
        let released = HOLD_MAX / params.inc() * params.inc();
        assert_eq!(sent, released + window + 1, "{params:?}");
        assert!(matches!(
            err,
            Error::PeerMisbehaved(PeerMisbehaved::DataPastCircuitWindow)
        ));
    }
}

#[test]
fn a_sendme_must_carry_the_tag_of_the_cell_it_acknowledges() {
    let mut c = RawClient::new();
    c.begin(5);
    c.exit
        .connected(5, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .unwrap();
    let now = c.now;
    c.exit.send(now, 5, &vec![0u8; 150 * 500]).unwrap();
    let cells = c.recv();
    let acked = &cells[31]; // after CONNECTED: DATA cell 31
    assert!(
        matches!(acked.1, RelayMsg::Data(ref d) if d.len() == BACKWARD_CAPACITY - HEADER_LEN - SENDME_CELL_RANDOM)
    );
    // Its padding is random: the tag cannot be computed from the data.
    let mut wrong = acked.2;
    wrong[0] ^= 1;
    assert!(matches!(
        c.send(0, RelayMsg::Sendme { tag: wrong }),
        Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeWrongTag))
    ));
    let mut c2 = RawClient::new();
    assert!(matches!(
        c2.send(0, RelayMsg::Sendme { tag: [0; 16] }),
        Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeUnowed))
    ));
}

#[test]
fn a_tampered_cell_is_caught_at_the_next_hop() {
    let mut p = CircuitPair::new(3, Duration::from_millis(1));
    let sid = p.open_stream();
    p.tamper = Some(Box::new(|from, c| {
        if from == 1 {
            c.payload[100] ^= 0x80;
        }
    }));
    let now = p.now;
    p.nodes[0].send(now, sid, b"hello").unwrap();
    p.drive();
    assert!(matches!(p.errors[2], Some(Error::CellAuth)));
    assert!(p.errors[3].is_none());
}

#[test]
fn rtt_comes_from_circuit_sendmes_in_simulated_time() {
    let delay = Duration::from_millis(20);
    let mut p = CircuitPair::new(3, delay);
    let sid = p.open_stream();
    let exit = p.exit();
    let now = p.now;
    p.nodes[exit].send(now, sid, &vec![0u8; 200 * 498]).unwrap();
    p.drive_reading(&[0], sid);
    // Three links each way, 20 ms each.
    let rtt = p.nodes[exit].rtt().expect("a SENDME came back");
    assert_eq!(rtt.min, delay * 6);
    assert!(
        p.nodes[0].rtt().is_none(),
        "the client sent no acknowledged cell"
    );
}

#[test]
fn destroy_extend_and_truncate() {
    let mut p = CircuitPair::new(2, Duration::from_millis(1));
    // A second EXTEND on a hop that has a next hop is the client's fault.
    let mut c = RawClient::new();
    let ext = RelayMsg::Extend(Extend {
        identity: [1; 32],
        link_key: LinkKey([2; 32]),
        addr: "127.0.0.1:2".parse().unwrap(),
        htype: 2,
        hdata: vec![],
    });
    c.send(0, ext.clone()).unwrap();
    assert!(matches!(c.exit.poll_event(), Some(Event::Extend(_))));
    assert!(matches!(
        c.send(0, ext.clone()),
        Err(Error::PeerMisbehaved(PeerMisbehaved::ExtendTwice))
    ));
    // A failed extension is reported back, and may be tried again.
    let mut c = RawClient::new();
    c.send(0, ext.clone()).unwrap();
    assert!(matches!(c.exit.poll_event(), Some(Event::Extend(_))));
    c.exit.extend_failed(DestroyReason::CONNECT_FAILED).unwrap();
    assert!(matches!(
        &c.recv()[..],
        [(0, RelayMsg::Truncated(r), _)] if *r == DestroyReason::CONNECT_FAILED.0
    ));
    c.send(0, ext).unwrap();
    c.send(0, RelayMsg::Truncate).unwrap();
    assert!(matches!(c.exit.poll_event(), Some(Event::Extend(_))));
    assert_eq!(c.exit.poll_event(), Some(Event::Truncated));

    // DESTROY from the client side names its reason; nothing counts after.
    let d = Cell::destroy(CircId(1), DestroyReason::FINISHED);
    let now = p.now;
    p.nodes[1].handle_cell(now, Side::Prev, d).unwrap();
    assert_eq!(
        p.nodes[1].poll_event(),
        Some(Event::Destroyed {
            side: Side::Prev,
            reason: DestroyReason::FINISHED
        })
    );
    // A CREATE mid-circuit is not a thing a neighbour may send.
    let create = Cell::new(CircId(1), CellCmd::CREATE, &[0; 10]).unwrap();
    assert!(matches!(
        p.nodes[2].handle_cell(now, Side::Prev, create),
        Err(Error::PeerMisbehaved(PeerMisbehaved::Unexpected { .. }))
    ));
}

#[test]
fn a_stream_ended_here_still_acknowledges_what_arrives() {
    // The client ends a stream while it still has bytes to send (its
    // window is closed); the exit keeps sending meanwhile, far past one
    // window and the XOFF point. Nothing stalls: the exit's bytes are
    // dropped but acknowledged, and the client's END goes out after its
    // own bytes.
    let mut p = CircuitPair::with_params(1, Duration::from_millis(1), CircParams::Fixed);
    let sid = p.open_stream();
    let exit = p.exit();
    let now = p.now;
    let up = vec![3u8; 1500 * 500];
    assert!(!p.nodes[0].send(now, sid, &up).unwrap());
    p.nodes[0].end(sid, EndReason::DONE).unwrap();
    assert!(
        !p.nodes[exit]
            .send(now, sid, &vec![4u8; 1600 * 488])
            .unwrap()
    );
    let got = p.drive_reading(&[exit], sid);
    assert_eq!(got[0], up);
    assert_eq!(p.received(0, sid).1, 0, "dropped, not handed on");
    let ev = p.take_events(exit);
    assert!(ev.contains(&Event::Sent { stream: sid }), "{ev:?}");
    assert!(ev.contains(&Event::End {
        stream: sid,
        reason: EndReason::DONE
    }));
    assert!(p.errors.iter().all(Option::is_none));
}

#[test]
fn streams_ended_while_blocked_leave_nothing_behind() {
    // Fixed windows, so that a window's worth is less than what is sent.
    let mut p = CircuitPair::with_params(1, Duration::from_millis(1), CircParams::Fixed);
    let exit = p.exit();
    let now = p.now;
    // Streams the client does not read say XOFF with bytes still unsent
    // at the exit; the client then ends each but one.
    let first = p.open_stream();
    let bulk = vec![1u8; 3000 * 488];
    assert!(!p.nodes[exit].send(now, first, &bulk).unwrap());
    for _ in 0..50 {
        let sid = p.open_stream();
        assert!(!p.nodes[exit].send(now, sid, &bulk).unwrap());
        p.drive();
        p.nodes[0].end(sid, EndReason::DONE).unwrap();
        p.drive();
    }
    // Each ended stream said once that its bytes are gone, and the queue of
    // blocked streams holds only the live one.
    let sent = p
        .take_events(exit)
        .into_iter()
        .filter(|e| matches!(e, Event::Sent { .. }))
        .count();
    assert_eq!(sent, 50);
    assert_eq!(p.nodes[exit].blocked.len(), 1);
}

#[test]
fn stream_ids_and_resolves_at_a_relay() {
    let mut c = RawClient::new();
    let begin = RelayMsg::Begin {
        addr: TargetAddr::Host("a.b".into()),
        port: 1,
    };
    c.send(5, begin.clone()).unwrap();
    // A second BEGIN on an open stream id is the client's fault.
    assert!(matches!(
        c.send(5, begin),
        Err(Error::PeerMisbehaved(PeerMisbehaved::Unexpected { .. }))
    ));
    // END on a pending RESOLVE: the relay forgets it, and its late answer
    // goes nowhere.
    let mut c = RawClient::new();
    c.send(6, RelayMsg::Resolve("a.b".into())).unwrap();
    assert!(matches!(
        c.exit.poll_event(),
        Some(Event::Resolve { stream: 6, .. })
    ));
    c.send(6, RelayMsg::End(EndReason::DONE)).unwrap();
    assert_eq!(c.exit.poll_event(), None);
    c.exit
        .resolved(6, &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
        .unwrap();
    assert!(c.recv().is_empty());
    assert_eq!(c.exit.stream_count(), 0);
}

#[test]
fn the_exit_cannot_tell_its_depth_from_the_padding() {
    let mut rng = StdRng::seed_from_u64(3);
    let keys: Vec<HopKeys> = (1..=3u8).map(|i| HopKeys::from_bytes(&[i; 64])).collect();
    let mut layers = ClientLayers::new();
    for k in &keys {
        layers.push(k).unwrap();
    }
    let mut client = Circuit::client(&mut rng, layers, CircParams::default()).unwrap();
    let mut relays: Vec<RelayLayer> = keys.iter().map(RelayLayer::new).collect();
    client.begin(TargetAddr::Host("a.b".into()), 80).unwrap();
    let mut p = client.poll_transmit().unwrap().payload;
    for r in &mut relays[..2] {
        assert_eq!(r.peel_forward(&mut p, true).unwrap(), Peeled::Forward);
    }
    assert_eq!(
        relays[2].peel_forward(&mut p, false).unwrap(),
        Peeled::Deliver
    );
    let (sid, msg) = RelayMsg::decode(&p[TAG_LEN..]).unwrap();
    let len = msg.encode_into(sid, &mut [0u8; PAYLOAD_LEN]).unwrap();
    // After the message: random bytes up to the end, with no run of zeros
    // that would end where the filler of a 3-hop circuit starts.
    let tail = &p[TAG_LEN + len..];
    let zeros = tail.iter().filter(|&&b| b == 0).count();
    assert!(
        zeros < 16,
        "{zeros} zero bytes in {} of padding",
        tail.len()
    );
}

#[test]
fn only_a_one_hop_circuit_echoes() {
    let mut p = CircuitPair::new(1, Duration::from_millis(1));
    let max = p.nodes[0].echo_max();
    p.nodes[0].echo(&vec![7u8; max]).unwrap();
    p.nodes[0].echo(b"ping").unwrap();
    assert!(p.nodes[0].echo(&vec![7u8; max + 1]).is_err());
    p.drive();
    assert_eq!(
        p.take_events(0),
        vec![Event::Echo(vec![7u8; max]), Event::Echo(b"ping".to_vec())]
    );
    assert!(p.errors.iter().all(Option::is_none));
    // Only a client asks.
    assert!(p.nodes[1].echo(b"x").is_err());
    // Deeper in a circuit it is no probe: the hop refuses it.
    let mut p = CircuitPair::new(3, Duration::from_millis(1));
    p.nodes[0].echo(b"ping").unwrap();
    p.drive();
    assert!(matches!(
        p.errors[3],
        Some(Error::PeerMisbehaved(PeerMisbehaved::Unexpected { .. }))
    ));
}

#[test]
fn extends_come_in_relay_early_and_no_more_than_a_long_circuit_needs() {
    let ext = RelayMsg::Extend(Extend {
        identity: [1; 32],
        link_key: LinkKey([2; 32]),
        addr: "127.0.0.1:2".parse().unwrap(),
        htype: 2,
        hdata: vec![],
    });
    let mut c = RawClient::new();
    assert!(matches!(
        c.send_as(0, ext, false),
        Err(Error::PeerMisbehaved(PeerMisbehaved::Unexpected { .. }))
    ));
    // Seven RELAY_EARLY cells pass (a circuit of eight hops); the eighth is
    // one too many.
    let mut c = RawClient::new();
    for _ in 0..MAX_EARLY {
        c.send_as(0, RelayMsg::Drop, true).unwrap();
    }
    assert!(matches!(
        c.send_as(0, RelayMsg::Drop, true),
        Err(Error::PeerMisbehaved(PeerMisbehaved::TooManyHops))
    ));
    // And a relay passes RELAY_EARLY on as RELAY_EARLY (the kit checks it
    // while it builds a circuit of four hops).
    let p = CircuitPair::new(4, Duration::from_millis(1));
    assert!(p.errors.iter().all(Option::is_none));
}
