//! The relay data plane under pressure: flow control, backpressure to the
//! edge, the queued-cell memory cap, per-address DoS limits and metrics.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

mod common;

use allium::testnet::{Testnet, TestnetOptions};
use allium_link::channel;
use allium_link::limits::QUIET_DEBT;
use allium_link::shaping::LinkSocket;
use allium_proto::cell::{self, CELL_LEN, Cell, CellCmd, CircId, DestroyReason};
use allium_proto::flow::{CircParams, FIXED_INCREMENT, FIXED_WINDOW};
use allium_proto::link::{LinkTransport, MAX_CELLS_PER_FRAME};
use allium_proto::onion::{ClientLayers, forward_capacity};
use allium_proto::relaymsg::{EndReason, RelayMsg, TargetAddr};
use allium_proto::{RelayDescriptor, RelayId, ntor};
use allium_relay::RelayStats;
use common::{ExtendTo, RawCirc, impostor, link_to, lone_relay};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A TCP server that writes to every connection as fast as it can, and
/// counts what it wrote.
async fn firehose() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let w = w.clone();
            tokio::spawn(async move {
                let chunk = vec![0x42u8; 16 * 1024];
                while s.write_all(&chunk).await.is_ok() {
                    w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, written)
}

/// A TCP server that accepts and never reads (small receive buffer).
async fn sink() -> SocketAddr {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(64).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// The reader of a SOCKS stream stops: the exit stops reading from the
/// target, no relay holds more than a window of cells meanwhile, and the
/// stream resumes intact when the reader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_socks_reader_stops_the_exit() {
    let net = Testnet::start(TestnetOptions {
        relays: 3,
        exits: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    let (target, written) = firehose().await;

    let mut s = TcpStream::connect(net.socks_addr).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let SocketAddr::V4(t) = target else { panic!() };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[1], 0);
    // Read a little, then stop reading.
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < 200_000 {
        got += s.read(&mut buf).await.unwrap();
    }
    // Let the stall settle: socket buffers fill, then the windows close.
    let mut last = 0;
    let mut stable = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let w = written.load(Ordering::Relaxed);
        stable = if w == last { stable + 1 } else { 0 };
        last = w;
        if stable >= 8 {
            break;
        }
    }
    assert!(stable >= 8, "the target kept being read: {last} bytes");
    // What was in flight when the client said XOFF went on to the client:
    // the relays hold next to nothing.
    let window_bytes = FIXED_WINDOW as usize * CELL_LEN;
    for _ in 0..8 {
        for r in &net.relays {
            let q = r.mem.total();
            assert!(
                q <= window_bytes,
                "{} holds {q} bytes of cells during the stall",
                r.nickname
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        written.load(Ordering::Relaxed),
        last,
        "exit read during the stall"
    );
    // The reader comes back: data flows again.
    // (Socket buffers on the way hold megabytes: read until the target is
    // being read again.)
    let mut more = 0;
    while written.load(Ordering::Relaxed) <= last + 1_000_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        assert!(buf[..n].iter().all(|&b| b == 0x42));
        more += n;
        assert!(more < 200_000_000, "the stream did not resume");
    }
    // The client's metrics count the stream, and name no address.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &net.client.metrics_registry()).unwrap();
    assert!(
        text.contains("allium_client_streams_opened_total 1"),
        "{text}"
    );
    assert!(
        text.contains("allium_client_bootstrap_percent 100"),
        "{text}"
    );
    assert!(!text.contains("127.0.0"));
    net.shutdown().await;
}

/// An exit never connects to its own address, though its policy allows
/// loopback; other loopback addresses it reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_never_reaches_its_own_address() {
    let relay = lone_relay(|_| {}).await;
    let chan = link_to(&relay.desc).await;
    let mut c = RawCirc::open(chan, &relay.desc.identity, &relay.desc.onion_key)
        .await
        .unwrap();
    let own = relay.desc.addr;
    c.send(
        1,
        RelayMsg::Begin {
            addr: TargetAddr::Ip(own.ip()),
            port: own.port(),
        },
    )
    .await;
    match c.recv().await {
        Ok((1, RelayMsg::End(r), _)) => assert_eq!(r, EndReason::EXIT_POLICY),
        other => panic!(
            "BEGIN to the exit itself answered {:?}",
            other.map(|m| m.1.cmd())
        ),
    }
    c.begin(2, sink().await).await;
}

/// DATA past the window after an XOFF costs the client its circuit: the
/// target does not read, the exit says XOFF, the client goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_past_the_window_loses_the_circuit() {
    let relay = lone_relay(|_| {}).await;
    let target = sink().await;
    let chan = link_to(&relay.desc).await;
    // Fixed windows: a window after the XOFF is 1000 cells.
    let mut c = RawCirc::open_with(
        chan,
        &relay.desc.identity,
        &relay.desc.onion_key,
        CircParams::Fixed,
    )
    .await
    .unwrap();
    c.begin(1, target).await;
    let data = vec![7u8; forward_capacity(0) - 5];
    let mut destroyed = None;
    // Ignore every SENDME and XOFF and keep sending until the exit gives up.
    for i in 0..20_000 {
        c.send(1, RelayMsg::Data(data.clone())).await;
        if i % 64 == 0 {
            while let Ok(Some(cell)) =
                tokio::time::timeout(Duration::from_millis(1), c.rx.recv()).await
            {
                if cell.cmd == CellCmd::DESTROY {
                    destroyed = Some(DestroyReason(cell.payload[0]));
                }
            }
            if destroyed.is_some() {
                break;
            }
        }
    }
    while destroyed.is_none() {
        if let Err(r) = c.recv().await {
            destroyed = Some(r);
        }
    }
    assert_eq!(destroyed, Some(DestroyReason::FLOW_CONTROL));
    assert!(RelayStats::get(&relay.stats.flow_control_violations) >= 1);
}

/// A circuit SENDME must carry the tag of the cell it acknowledges: the
/// right one opens the window, a forged one closes the circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_sendme_is_rejected() {
    let relay = lone_relay(|_| {}).await;
    let (target, _) = firehose().await;
    let chan = link_to(&relay.desc).await;
    // Fixed windows: the numbers are exact.
    let mut c = RawCirc::open_with(
        chan,
        &relay.desc.identity,
        &relay.desc.onion_key,
        CircParams::Fixed,
    )
    .await
    .unwrap();
    c.begin(1, target).await;
    let mut data_cells = 0u32;
    let mut tag100 = None;
    loop {
        let (_, msg, tag) = c.recv().await.unwrap();
        if let RelayMsg::Data(_) = msg {
            data_cells += 1;
            if data_cells == FIXED_INCREMENT {
                tag100 = Some(tag);
            }
            if data_cells == FIXED_WINDOW {
                break;
            }
        }
    }
    // The window is closed: nothing more comes until a SENDME.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.rx.recv())
            .await
            .is_err(),
        "the exit sent past its circuit window"
    );
    // The genuine SENDME for the first hundred: 100 more cells come.
    c.send(
        0,
        RelayMsg::Sendme {
            tag: tag100.unwrap(),
        },
    )
    .await;
    let mut more = 0;
    while more < 100 {
        if let (_, RelayMsg::Data(_), _) = c.recv().await.unwrap() {
            more += 1;
        }
    }
    // A forged one (the next hundred's tag is not all 0x11).
    c.send(0, RelayMsg::Sendme { tag: [0x11; 16] }).await;
    let reason = loop {
        if let Err(r) = c.recv().await {
            break r;
        }
    };
    assert_eq!(reason, DestroyReason::FLOW_CONTROL);
    assert!(RelayStats::get(&relay.stats.flow_control_violations) >= 1);
}

/// Open a client link by hand that never reads: what the relay sends it
/// piles up in the relay.
async fn stalled_link(d: &RelayDescriptor) -> (LinkSocket, LinkTransport) {
    let (s, t, rest) = channel::handshake_nk(d.addr, None, &RelayId(d.identity), &d.link_key)
        .await
        .unwrap();
    assert!(rest.is_empty());
    (s, t)
}

/// Open `n` circuits on a hand-made link and BEGIN a stream to `target` on
/// each (all in one frame).
async fn begin_many(
    s: &mut LinkSocket,
    t: &mut LinkTransport,
    d: &RelayDescriptor,
    target: SocketAddr,
    n: u32,
) {
    let mut layers = Vec::new();
    let mut frame = Vec::new();
    let mut states = Vec::new();
    let mut cells = Vec::new();
    for i in 0..n {
        let (st, hs) = ntor::client_start(
            &mut rand::rng(),
            &d.identity,
            &d.onion_key,
            allium_proto::flow::CircParams::default(),
        );
        states.push(st);
        cells.push(
            Cell::new(
                CircId(0x8000_0000 | (i + 1)),
                CellCmd::CREATE,
                &cell::encode_create(cell::HANDSHAKE_NTOR, &hs),
            )
            .unwrap(),
        );
    }
    for chunk in cells.chunks(64) {
        frame.clear();
        t.seal_cells(chunk, &mut frame).unwrap();
        s.write_all(&frame).await.unwrap();
    }
    let mut created = Vec::new();
    while created.len() < n as usize {
        let len = s.read_u16().await.unwrap() as usize;
        let mut f = vec![0u8; len];
        s.read_exact(&mut f).await.unwrap();
        t.open_cells(&mut f, &mut created).unwrap();
    }
    created.sort_by_key(|c| c.circ_id);
    for (st, c) in states.into_iter().zip(&created) {
        assert_eq!(c.cmd, CellCmd::CREATED);
        let mut l = ClientLayers::new();
        l.push(
            &st.finish(cell::decode_created(&c.payload[..]).unwrap())
                .unwrap()
                .0,
        )
        .unwrap();
        layers.push(l);
    }
    let begin = RelayMsg::Begin {
        addr: TargetAddr::Ip(target.ip()),
        port: target.port(),
    }
    .encode(1, forward_capacity(0))
    .unwrap();
    let cells: Vec<Cell> = layers
        .iter_mut()
        .enumerate()
        .map(|(i, l)| Cell {
            circ_id: CircId(0x8000_0000 | (i as u32 + 1)),
            cmd: CellCmd::RELAY,
            payload: l.encrypt_forward(0, &begin).unwrap(),
        })
        .collect();
    frame.clear();
    t.seal_cells(&cells, &mut frame).unwrap();
    s.write_all(&frame).await.unwrap();
}

/// Many circuits whose client stopped reading fill the relay's queues: it
/// stays under its memory cap by killing circuits and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_cap_kills_stalled_circuits() {
    let cap: usize = 3 << 20;
    let relay = lone_relay(|c| c.max_queued_bytes = cap as u64).await;
    let (target, _) = firehose().await;
    let d = &relay.desc;
    let (mut s, mut t) = stalled_link(d).await;
    // CREATE every circuit, then read the CREATEDs (the link is still read
    // here), then BEGIN on each and never read again.
    begin_many(&mut s, &mut t, d, target, 64).await;
    // Now the link is not read: wait for the relay to kill.
    let mut killed = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        killed = RelayStats::get(&relay.stats.oom_kills);
        assert!(
            relay.mem.total() <= cap + cap / 4,
            "{} queued",
            relay.mem.total()
        );
        // Settled: what is left fits well under the cap, so a fresh
        // circuit is not among the next victims.
        if killed > 0 && relay.mem.total() <= cap / 2 {
            break;
        }
    }
    assert!(
        killed > 0,
        "no circuit was killed; {} bytes queued",
        relay.mem.total()
    );
    assert!(relay.mem.total() <= cap);
    // Killing is decided as the data comes in: the peak overshoots the cap
    // by at most what arrives while the victims wind down.
    assert!(
        relay.mem.peak() <= cap + cap / 4,
        "peak {}",
        relay.mem.peak()
    );
    // A fresh circuit through the same relay works.
    let chan = link_to(d).await;
    let mut c = RawCirc::open(chan, &d.identity, &d.onion_key)
        .await
        .unwrap();
    c.begin(1, target).await;
    match c.recv().await {
        Ok((1, RelayMsg::Data(v), _)) => assert!(!v.is_empty()),
        other => panic!("expected data, got {:?}", other.map(|m| m.1.cmd())),
    }
    drop(s);
}

/// Floods of connections and CREATEs from one address are refused before
/// any public-key work, while another address is served. The counters show
/// on the metrics endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_from_one_address_are_refused() {
    let ml = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = ml.local_addr().unwrap();
    drop(ml);
    let relay = lone_relay(|c| {
        c.dos_max_connections_per_addr = 4;
        c.dos_circuit_rate = 0.5;
        c.dos_circuit_burst = 5;
        c.metrics_listen = Some(metrics);
    })
    .await;
    let d = &relay.desc;
    let flooder: IpAddr = "127.0.0.2".parse().unwrap();
    let other: IpAddr = "127.0.0.3".parse().unwrap();

    // Connection flood: the first four are held, the rest closed at once.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(flooder, 0)).unwrap();
        let mut s = sock.connect(d.addr).await.unwrap();
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => refused += 1,
            _ => held.push(s),
        }
    }
    assert_eq!(held.len(), 4);
    assert_eq!(refused, 8);
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Circuit flood on one link: the burst is served, the rest refused.
    let chan = channel::connect_nk_from(d.addr, &RelayId(d.identity), &d.link_key, Some(flooder))
        .await
        .unwrap();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..12 {
        match RawCirc::open(chan.clone(), &d.identity, &d.onion_key).await {
            Ok(_) => ok += 1,
            Err(DestroyReason::RESOURCE_LIMIT) => limited += 1,
            Err(r) => panic!("unexpected {r:?}"),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(limited, 7);
    // Another address still gets circuits.
    let chan2 = channel::connect_nk_from(d.addr, &RelayId(d.identity), &d.link_key, Some(other))
        .await
        .unwrap();
    RawCirc::open(chan2, &d.identity, &d.onion_key)
        .await
        .unwrap();
    assert_eq!(RelayStats::get(&relay.stats.dos_refused_connections), 8);
    assert_eq!(RelayStats::get(&relay.stats.dos_refused_circuits), 7);

    // The metrics endpoint, on loopback, reports them and nothing per user.
    let mut s = TcpStream::connect(metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(
        body.contains("allium_relay_dos_refused_circuits_total 7"),
        "{body}"
    );
    assert!(body.contains("allium_relay_dos_refused_connections_total 8"));
    assert!(body.contains("allium_relay_circuits_created_total 6"));
    assert!(body.contains("allium_relay_queued_bytes_limit"));
    assert!(!body.contains("127.0.0"), "addresses in metrics");
}

/// An EXTEND that names relay H but gives another host's address and link
/// key does not reach that host as H: the host cannot prove H's identity,
/// the extend fails, and a real extend to H still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_reaches_only_the_relay_it_names() {
    let v = lone_relay(|_| {}).await;
    let h = lone_relay(|_| {}).await;
    let (fake_addr, fake_key, linked) = impostor().await;
    let d = &v.desc;
    let chan = link_to(d).await;
    let mut to = ExtendTo {
        identity: h.desc.identity,
        onion_key: h.desc.onion_key,
        link_key: fake_key,
        addr: fake_addr,
    };
    let mut c = RawCirc::open(chan.clone(), &d.identity, &d.onion_key)
        .await
        .unwrap();
    assert_eq!(c.extend(&to).await, Err(DestroyReason::CONNECT_FAILED));
    // It failed on the identity proof: the impostor did complete a link.
    for _ in 0..50 {
        if linked.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        linked.load(Ordering::Relaxed),
        1,
        "the impostor was reached"
    );

    // The real H, on a fresh circuit through the same relay.
    (to.link_key, to.addr) = (h.desc.link_key, h.desc.addr);
    let mut c = RawCirc::open(chan, &d.identity, &d.onion_key)
        .await
        .unwrap();
    assert_eq!(c.extend(&to).await, Ok(()));
    assert_eq!(RelayStats::get(&h.stats.circuits_created), 1);
}

/// Unless its operator allows private addresses (a test network), a relay
/// extends to no private address: it does not even try to connect, and
/// answers as it answers any failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_never_reaches_a_private_address_unless_allowed() {
    let v = lone_relay(|c| c.allow_private_addresses = false).await;
    let h = lone_relay(|_| {}).await;
    let (_, _, linked) = impostor().await;
    let d = &v.desc;
    let chan = link_to(d).await;
    let to = ExtendTo {
        identity: h.desc.identity,
        onion_key: h.desc.onion_key,
        link_key: h.desc.link_key,
        addr: h.desc.addr,
    };
    let mut c = RawCirc::open(chan, &d.identity, &d.onion_key)
        .await
        .unwrap();
    assert_eq!(c.extend(&to).await, Err(DestroyReason::CONNECT_FAILED));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(RelayStats::get(&h.stats.circuits_created), 0);
    assert_eq!(
        RelayStats::get(&h.stats.link_bytes_read),
        0,
        "H was contacted"
    );
    assert_eq!(linked.load(Ordering::Relaxed), 0);
}

/// A peer that sends and never reads: the relay answers every refused
/// CREATE with a DESTROY, but once the peer stops taking them the relay
/// stops reading it (the peer's writes block) and, after the write timeout,
/// closes the link; other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_not_read_and_loses_its_link() {
    let relay = lone_relay(|_| {}).await;
    let d = &relay.desc;
    let (mut s, mut t) = stalled_link(d).await;
    // Frames of CREATEs beyond the address's circuit burst: each is refused
    // with a DESTROY queued for the peer.
    let creates: Vec<Cell> = (0..MAX_CELLS_PER_FRAME as u32)
        .map(|i| {
            Cell::new(
                CircId(0x8000_0000 | (i + 1)),
                CellCmd::CREATE,
                &cell::encode_create(cell::HANDSHAKE_NTOR, &[7; 84]),
            )
            .unwrap()
        })
        .collect();
    let mut frame = Vec::new();
    let mut written = 0usize;
    let limit = 256 << 20;
    while written < limit {
        frame.clear();
        t.seal_cells(&creates, &mut frame).unwrap();
        match tokio::time::timeout(Duration::from_secs(3), s.write_all(&frame)).await {
            Ok(r) => r.unwrap(),
            Err(_) => break,
        }
        written += frame.len();
    }
    assert!(
        written < limit,
        "the relay kept reading a peer that does not read ({written} bytes)"
    );
    let read = RelayStats::get(&relay.stats.link_bytes_read);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(RelayStats::get(&relay.stats.link_bytes_read), read);
    assert!(RelayStats::get(&relay.stats.dos_refused_circuits) > 1000);

    // Another client is served meanwhile.
    let chan = channel::connect_nk_from(
        d.addr,
        &RelayId(d.identity),
        &d.link_key,
        Some("127.0.0.4".parse().unwrap()),
    )
    .await
    .unwrap();
    RawCirc::open(chan, &d.identity, &d.onion_key)
        .await
        .unwrap();

    // Past the write timeout the link is gone.
    let mut closed = false;
    for _ in 0..(channel::WRITE_TIMEOUT.as_secs() + 10) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if RelayStats::get(&relay.stats.links_stalled) == 1 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the link of a peer that never reads stayed open");
    let mut sink = vec![0u8; 1 << 20];
    let drained = async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), drained)
        .await
        .expect("the relay closed the socket");
}

/// Relay links pay the per-address limits too unless the consensus lists
/// the relay at that address: fresh identities from one address get no
/// more links and no more circuits than a client there would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_links_from_unlisted_identities_obey_the_address_limits() {
    let relay = lone_relay(|c| {
        c.dos_max_connections_per_addr = 4;
        c.dos_circuit_rate = 0.0;
        c.dos_circuit_burst = 5;
    })
    .await;
    let d = &relay.desc;
    let from: IpAddr = "127.0.0.5".parse().unwrap();
    let mut chans = Vec::new();
    let mut refused = 0;
    for i in 0..6u8 {
        let me = channel::LinkIdentity {
            identity: ed25519_dalek::SigningKey::from_bytes(&[0x80 + i; 32]),
            link_secret: x25519_dalek::StaticSecret::from([0x90 + i; 32]),
            stop: None,
            env: Default::default(),
            bind: Some(from),
            known_relay: None,
        };
        match channel::connect_xk(d.addr, RelayId(d.identity), &d.link_key, &me, None).await {
            Ok(c) => chans.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((chans.len(), refused), (4, 2), "links from one address");
    let mut created = 0;
    let mut destroyed = 0;
    for i in 0..10 {
        match RawCirc::open(chans[i % chans.len()].clone(), &d.identity, &d.onion_key).await {
            Ok(_) => created += 1,
            Err(r) => {
                assert_eq!(r, DestroyReason::RESOURCE_LIMIT);
                destroyed += 1;
            }
        }
    }
    assert_eq!((created, destroyed), (5, 5), "circuits from one address");
    assert_eq!(RelayStats::get(&relay.stats.dos_refused_connections), 2);
}

/// A relay's bandwidth rate bounds what it reads from its links, however
/// fast a peer writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_rate_bounds_link_reads() {
    let rate = 1_000_000u64;
    let relay = lone_relay(|c| {
        c.bandwidth_rate = rate;
        c.bandwidth_burst = rate;
    })
    .await;
    let (mut s, mut t) = stalled_link(&relay.desc).await;
    let padding: Vec<Cell> = (0..MAX_CELLS_PER_FRAME)
        .map(|_| Cell::new(CircId(0), CellCmd::PADDING, &[]).unwrap())
        .collect();
    let start = std::time::Instant::now();
    let pump = async {
        let mut frame = Vec::new();
        while start.elapsed() < Duration::from_secs(2) {
            frame.clear();
            t.seal_cells(&padding, &mut frame).unwrap();
            s.write_all(&frame).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(10), pump)
        .await
        .expect("the relay kept reading at its rate");
    let secs = start.elapsed().as_secs_f64();
    let read = RelayStats::get(&relay.stats.link_bytes_read) as f64;
    // Reads may run a quarter over the rate: the burst, the rate over the
    // time, what quiet links may overdraw, one read of slack.
    let most = rate as f64 * 1.25 * (1.0 + secs) + (QUIET_DEBT + 256 * 1024) as f64;
    assert!(read <= most, "read {read} bytes in {secs:.1} s");
    assert!(read >= rate as f64 / 2.0, "read only {read} bytes");
}

/// A relay's bandwidth rate bounds what it writes to its links, however
/// much its circuits have to send and however fast the peer reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_rate_bounds_link_writes() {
    let rate = 500_000u64;
    let relay = lone_relay(|c| {
        c.bandwidth_rate = rate;
        c.bandwidth_burst = rate;
    })
    .await;
    let (target, _) = firehose().await;
    let (mut s, mut t) = stalled_link(&relay.desc).await;
    // 64 streams may each send a window's worth at once (about 4 MB in all).
    begin_many(&mut s, &mut t, &relay.desc, target, 64).await;
    let start = std::time::Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while start.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the relay closed the link"),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {}
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let written = RelayStats::get(&relay.stats.link_bytes_written) as f64;
    // The burst, the rate over the time, what quiet links may overdraw,
    // one frame of slack.
    let most = rate as f64 * (1.0 + secs) + (QUIET_DEBT + 64 * 1024) as f64;
    assert!(written <= most, "wrote {written} bytes in {secs:.1} s");
    assert!(got as f64 >= rate as f64, "received only {got} bytes");
}

/// An authority's measurement of a relay: echoed bytes per second over a
/// one-hop circuit, whatever the relay declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_is_measured_by_what_it_echoes() {
    let relay = lone_relay(|c| c.bandwidth = 1000).await;
    let d = &relay.desc;
    assert!(d.bandwidth <= 1000);
    let limits = allium_directory::measure::Limits {
        duration: Duration::from_millis(300),
        max_bytes: 64 << 20,
    };
    let rate = allium_directory::measure::measure(
        d.addr,
        allium_proto::RelayId(d.identity),
        &d.link_key,
        &d.onion_key,
        limits,
    )
    .await
    .unwrap();
    // Far more than the 1000 bytes/s it declares: the measurement is the
    // relay's work, not its word.
    assert!(rate > 1_000_000, "measured {rate} bytes/s");
    assert!(RelayStats::get(&relay.stats.cells_originated) > 100);
    // The byte budget ends a measurement early.
    let small = allium_directory::measure::Limits {
        duration: Duration::from_secs(10),
        max_bytes: 100_000,
    };
    let t = std::time::Instant::now();
    allium_directory::measure::measure(
        d.addr,
        allium_proto::RelayId(d.identity),
        &d.link_key,
        &d.onion_key,
        small,
    )
    .await
    .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A measurement closes its link when it is done (a relay allowing two
/// links per address is measured five times in a row), and one that the
/// relay never answers ends by its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurements_close_their_links_and_end_in_time() {
    use allium_directory::measure::{GRACE, Limits, measure};
    let relay = lone_relay(|c| c.dos_max_connections_per_addr = 2).await;
    let d = &relay.desc;
    let limits = Limits {
        duration: Duration::from_millis(50),
        max_bytes: 1 << 20,
    };
    let id = allium_proto::RelayId(d.identity);
    for i in 0..5 {
        let r = measure(d.addr, id, &d.link_key, &d.onion_key, limits).await;
        assert!(r.is_ok(), "measurement {i}: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A responder that proves its identity and then never answers.
    let (addr, link_key, linked) = common::impostor().await;
    let silent = ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]);
    let silent = allium_proto::RelayId(silent.verifying_key().to_bytes());
    let t = std::time::Instant::now();
    let r = measure(addr, silent, &link_key, &d.onion_key, limits).await;
    assert_eq!(linked.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(r.is_err());
    assert!(t.elapsed() <= limits.duration + GRACE + Duration::from_secs(1));
}

/// The ORPort self-test: a circuit through another relay comes back to a
/// reachable relay; an ORPort where nothing listens is reported as such.
/// (A lone relay's listener reports to no [`Inbound`], so a circuit that
/// comes back counts as inconclusive here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_tells_a_reachable_orport_from_a_closed_one() {
    use allium_relay::selftest::{Hop, Inbound, Verdict, through};
    let via = lone_relay(|_| {}).await;
    let me = lone_relay(|_| {}).await;
    let nobody = Inbound::default();
    let v = through(&Hop::from(&via.desc), &Hop::from(&me.desc), &nobody).await;
    assert!(
        matches!(v, Verdict::Unknown(ref e) if e.contains("over a link")),
        "{v:?}"
    );
    let closed = TcpListener::bind("127.0.0.2:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut wrong = Hop::from(&me.desc);
    wrong.addr = closed;
    // Through a relay with no link to it yet.
    let fresh = lone_relay(|_| {}).await;
    let v = through(&Hop::from(&fresh.desc), &wrong, &nobody).await;
    assert!(
        matches!(v, Verdict::Unreachable(ref e) if e.contains("could not reach")),
        "{v:?}"
    );
}

/// A link that carries no circuit is closed by the side that opened it
/// once its idle time has passed (measured from its last circuit), and
/// only then; a link opened without an idle time stays, until asked to
/// close if idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_without_circuits_close_after_their_idle_time() {
    let relay = lone_relay(|_| {}).await;
    let d = &relay.desc;
    let me = |b: u8, idle_close| channel::LinkIdentity {
        identity: ed25519_dalek::SigningKey::from_bytes(&[b; 32]),
        link_secret: x25519_dalek::StaticSecret::from([b + 1; 32]),
        stop: None,
        env: channel::ChannelEnv {
            idle_close,
            ..Default::default()
        },
        bind: None,
        known_relay: None,
    };
    let idle = Duration::from_secs(1);
    let link = |m| async move {
        channel::connect_xk(d.addr, RelayId(d.identity), &d.link_key, &m, None)
            .await
            .unwrap()
    };
    let closing = link(me(0xa0, Some(idle))).await;
    let staying = link(me(0xb0, None)).await;
    let (id, _inbox) = closing.new_circuit().await.unwrap();
    // Twice the longest idle time (1.5 s) with a circuit: still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!closing.is_closed(), "closed while it carried a circuit");
    closing.destroy(id, DestroyReason::FINISHED);
    let gone = std::time::Instant::now();
    assert!(
        closing.closed_within(Duration::from_secs(10)).await,
        "still open 10 s after its last circuit"
    );
    assert!(gone.elapsed() >= idle, "closed before its idle time");
    assert!(!staying.is_closed(), "a link without an idle time closed");

    // Closed on request only if it carries no circuit (as a relay's
    // self-test closes its link to the relay it goes through).
    let (id, _inbox) = staying.new_circuit().await.unwrap();
    staying.close_if_idle();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!staying.is_closed(), "closed while it carried a circuit");
    staying.destroy(id, DestroyReason::FINISHED);
    staying.close_if_idle();
    assert!(
        staying.closed_within(Duration::from_secs(5)).await,
        "an idle link stayed open when asked to close"
    );
}
