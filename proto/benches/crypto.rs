//! Per-cell and per-handshake costs of the protocol code.
//!
//! `cargo bench -p allium-proto`. Cell crypto is the relay's hot path:
//! one relay hop costs one `relay_peel_forward` (or `relay_wrap_backward`)
//! per cell, the client one `client_*` per cell for all three layers;
//! `relay_path` is a middle relay's whole frame-in to frame-out work.

#![allow(clippy::unwrap_used)]

use allium_proto::flow::CircParams;
use std::hint::black_box;

use allium_proto::aead::{Key, whole};
use allium_proto::cell::{Cell, CellCmd, CircId, PAYLOAD_LEN};
use allium_proto::doc::CONSENSUS_DOMAIN;
use allium_proto::link::{self, LinkTransport};
use allium_proto::ntor::{self, OnionKeys};
use allium_proto::onion::{BACKWARD_CAPACITY, ClientLayers, HopKeys, RelayLayer, forward_capacity};
use allium_proto::policy::ExitPolicy;
use allium_proto::{
    AuthorityCert, AuthorityKey, AuthoritySig, Consensus, ConsensusRelay, RelayFlags,
    UnverifiedConsensus,
};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use x25519_dalek::{PublicKey, StaticSecret};

fn keys(i: u8) -> HopKeys {
    HopKeys {
        forward: [0x10 + i; 32],
        backward: [0x20 + i; 32],
    }
}

fn client3() -> ClientLayers {
    let mut c = ClientLayers::new();
    for i in 0..3 {
        c.push(&keys(i)).unwrap();
    }
    c
}

fn cells(c: &mut Criterion) {
    let mut g = c.benchmark_group("cell");
    g.throughput(Throughput::Bytes(PAYLOAD_LEN as u64));
    let body = vec![7u8; BACKWARD_CAPACITY];
    g.bench_function("aead_seal_493", |b| {
        let mut buf = [0u8; 493];
        let key = Key::new(&[1u8; 32]);
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            black_box(whole::seal(&key, n, &[], &mut buf));
        })
    });
    // What hop 1 (the middle) receives for hop 2, counters at 0.
    let msg = vec![1u8; forward_capacity(2)];
    let first = client3().encrypt_forward(2, &msg).unwrap();
    let mut at_middle = first.clone();
    RelayLayer::new(&keys(0))
        .peel_forward(&mut at_middle, true)
        .unwrap();
    g.bench_function("relay_peel_forward", |b| {
        b.iter_batched(
            || (RelayLayer::new(&keys(1)), at_middle.clone()),
            // The layer is returned, so that its drop is not timed.
            |(mut l, mut p)| {
                black_box(l.peel_forward(&mut p, true).unwrap());
                (l, p)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("relay_wrap_backward", |b| {
        let mut l = RelayLayer::new(&keys(1));
        let mut p = Box::new([3u8; PAYLOAD_LEN]);
        b.iter(|| l.wrap_backward(&mut p).unwrap())
    });
    g.bench_function("relay_originate_backward", |b| {
        let mut l = RelayLayer::new(&keys(2));
        b.iter(|| black_box(l.originate_backward(&body).unwrap()))
    });
    g.bench_function("client_encrypt_forward_3hop", |b| {
        let mut cl = client3();
        b.iter(|| black_box(cl.encrypt_forward(2, &msg).unwrap()))
    });
    let mut from_exit = RelayLayer::new(&keys(2)).originate_backward(&body).unwrap();
    RelayLayer::new(&keys(1))
        .wrap_backward(&mut from_exit)
        .unwrap();
    RelayLayer::new(&keys(0))
        .wrap_backward(&mut from_exit)
        .unwrap();
    g.bench_function("client_decrypt_backward_3hop", |b| {
        b.iter_batched(
            || (client3(), from_exit.clone()),
            |(mut cl, mut p)| {
                black_box(cl.decrypt_backward(&mut p).unwrap());
                (cl, p)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn handshakes(c: &mut Criterion) {
    let b_sec = StaticSecret::from([0x21; 32]);
    let bpub = PublicKey::from(&b_sec).to_bytes();
    let id = [0x84; 32];
    let b_sec = ntor::OnionSecret::new(b_sec);
    let list = [&b_sec];
    let ok = OnionKeys {
        identity: id,
        keys: &list,
    };
    let mut rng = rand::rng();
    let mut g = c.benchmark_group("ntor");
    g.bench_function("client_start", |b| {
        b.iter(|| {
            black_box(ntor::client_start(
                &mut rng,
                &id,
                &allium_proto::OnionKey(bpub),
                CircParams::default(),
            ))
        })
    });
    let (_, m) = ntor::client_start(
        &mut rng,
        &id,
        &allium_proto::OnionKey(bpub),
        CircParams::default(),
    );
    g.bench_function("server", |b| {
        b.iter(|| black_box(ntor::server(&mut rand::rng(), &ok, &m).unwrap()))
    });
    g.bench_function("client_finish", |b| {
        b.iter_batched(
            || {
                let (st, m) = ntor::client_start(
                    &mut rand::rng(),
                    &id,
                    &allium_proto::OnionKey(bpub),
                    CircParams::default(),
                );
                (st, ntor::server(&mut rand::rng(), &ok, &m).unwrap().0)
            },
            |(st, r)| black_box(st.finish(&r).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn link_pair() -> (LinkTransport, LinkTransport) {
    let mut rng = rand::rng();
    let identity = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    let secret = StaticSecret::from([3u8; 32]);
    let keys = || link::LinkKeys {
        identity: &identity,
        link_secret: &secret,
    };
    let spub = PublicKey::from(&secret).to_bytes();
    let mut i = link::Initiator::nk(&mut rng, &allium_proto::LinkKey(spub)).unwrap();
    let mut r = link::Responder::new(&mut rng, keys());
    let (mut to_i, mut to_r) = (Vec::new(), Vec::new());
    let (mut li, mut lr) = (None, None);
    while li.is_none() || lr.is_none() {
        if li.is_none() {
            match i.step(&mut to_i).unwrap() {
                link::Action::Send(b) => to_r.extend(b),
                link::Action::Recv => {}
                link::Action::Done(l) => li = Some(l),
            }
        }
        if lr.is_none() {
            match r.step(&mut to_r).unwrap() {
                link::Action::Send(b) => to_i.extend(b),
                link::Action::Recv => {}
                link::Action::Done(l) => lr = Some(l.transport),
            }
        }
    }
    let id = allium_proto::RelayId(identity.verifying_key().to_bytes());
    (li.unwrap().verify(&id).unwrap(), lr.unwrap())
}

fn links(c: &mut Criterion) {
    let mut g = c.benchmark_group("link");
    for n in [1usize, 16, link::MAX_CELLS_PER_FRAME] {
        let batch: Vec<Cell> = (0..n)
            .map(|i| Cell::new(CircId(i as u32 + 1), CellCmd::RELAY, &[9; 100]).unwrap())
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("seal_open_{n}_cells"), |b| {
            let (mut a, mut z) = link_pair();
            let mut frame = Vec::new();
            let mut out = Vec::new();
            b.iter(|| {
                frame.clear();
                out.clear();
                a.seal_cells(&batch, &mut frame).unwrap();
                z.open_cells(&mut frame[2..], &mut out).unwrap();
            })
        });
    }
    g.finish();
}

/// One hop's work on a frame: open it, apply `layer` to every cell, seal
/// the cells into the outgoing frame.
fn hop(
    in_link: &mut LinkTransport,
    frame: &mut [u8],
    out_link: &mut LinkTransport,
    cells: &mut Vec<Cell>,
    out: &mut Vec<u8>,
    mut layer: impl FnMut(&mut [u8; PAYLOAD_LEN]) -> Result<(), allium_proto::Error>,
) {
    cells.clear();
    out.clear();
    in_link.open_cells(&mut frame[2..], cells).unwrap();
    for c in cells.iter_mut() {
        layer(&mut c.payload).unwrap();
    }
    out_link.seal_cells(cells, out).unwrap();
}

/// A middle relay's whole cell path for one frame of 127 cells, frame in to
/// frame out: open the incoming frame, take off (forward) or add (backward)
/// this hop's layer on every cell, seal the outgoing frame. No sockets and
/// no task hand-offs: the protocol work of one hop.
fn relay_path(c: &mut Criterion) {
    let n = link::MAX_CELLS_PER_FRAME;
    let mut g = c.benchmark_group("relay_path");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("forward_{n}_cells"), |b| {
        let (mut client_link, mut in_link) = link_pair();
        let (mut out_link, _) = link_pair();
        let mut client = client3();
        // What the middle (hop 1) receives: hop 0 has peeled its layer.
        let mut guard = RelayLayer::new(&keys(0));
        let mut middle = RelayLayer::new(&keys(1));
        let msg = vec![1u8; forward_capacity(2)];
        let mut cells = Vec::with_capacity(n);
        let mut out = Vec::new();
        b.iter_batched(
            || {
                let batch: Vec<Cell> = (0..n)
                    .map(|_| {
                        let mut p = client.encrypt_forward(2, &msg).unwrap();
                        guard.peel_forward(&mut p, true).unwrap();
                        Cell {
                            circ_id: CircId(1),
                            cmd: CellCmd::RELAY,
                            payload: p,
                        }
                    })
                    .collect();
                let mut frame = Vec::new();
                client_link.seal_cells(&batch, &mut frame).unwrap();
                frame
            },
            |mut frame| {
                hop(
                    &mut in_link,
                    &mut frame,
                    &mut out_link,
                    &mut cells,
                    &mut out,
                    |p| middle.peel_forward(p, true).map(drop),
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function(format!("backward_{n}_cells"), |b| {
        let (mut next_link, mut in_link) = link_pair();
        let (mut out_link, _) = link_pair();
        let mut middle = RelayLayer::new(&keys(1));
        let batch: Vec<Cell> = (0..n)
            .map(|i| Cell::new(CircId(1), CellCmd::RELAY, &[i as u8; PAYLOAD_LEN]).unwrap())
            .collect();
        let mut cells = Vec::with_capacity(n);
        let mut out = Vec::new();
        b.iter_batched(
            || {
                let mut frame = Vec::new();
                next_link.seal_cells(&batch, &mut frame).unwrap();
                frame
            },
            |mut frame| {
                hop(
                    &mut in_link,
                    &mut frame,
                    &mut out_link,
                    &mut cells,
                    &mut out,
                    |p| middle.wrap_backward(p),
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn documents(c: &mut Criterion) {
    let relays: Vec<ConsensusRelay> = (0..1000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            ConsensusRelay {
                nickname: format!("relay{i}"),
                identity: id,
                link_key: allium_proto::LinkKey([1; 32]),
                onion_key: allium_proto::OnionKey([2; 32]),
                addr: "127.0.0.1:9001".parse().unwrap(),
                flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID),
                bandwidth: 1000,
                declared_bandwidth: 1000,
                measured_bandwidth: Some(1000),
                exit_ports: ExitPolicy::default_exit().summary(),
                family: None,
                descriptor_digest: [3; 32],
            }
        })
        .collect();
    let cons = Consensus {
        valid_after: 100,
        fresh_until: 200,
        valid_until: 300,
        weights: allium_proto::PositionWeights::compute(&relays),
        relays,
        shared_random: Default::default(),
    };
    // Three authorities: identity keys certify signing keys.
    let ids: Vec<SigningKey> = (1..=3).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
    let pinned: Vec<AuthorityKey> = ids
        .iter()
        .map(|k| AuthorityKey(k.verifying_key().to_bytes()))
        .collect();
    let keys: Vec<(SigningKey, Vec<u8>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let sk = SigningKey::from_bytes(&[10 + i as u8; 32]);
            let cert = AuthorityCert {
                identity: id.verifying_key().to_bytes(),
                signing_key: sk.verifying_key().to_bytes(),
                valid_from: 0,
                valid_until: u64::MAX,
            }
            .sign(id);
            (sk, cert)
        })
        .collect();
    let mut g = c.benchmark_group("consensus_1000_relays");
    g.bench_function("encode_and_sign", |b| {
        b.iter(|| {
            let mut d = cons.to_document();
            d.add(AuthoritySig::make(
                CONSENSUS_DOMAIN,
                &d.body,
                &keys[0].1,
                &keys[0].0,
            ));
            black_box(d.to_bytes())
        })
    });
    let mut d = cons.to_document();
    for (sk, cert) in &keys {
        d.add(AuthoritySig::make(CONSENSUS_DOMAIN, &d.body, cert, sk));
    }
    let bytes = d.to_bytes();
    g.bench_function("parse_and_verify_2_of_3_signatures", |b| {
        b.iter(|| {
            black_box(
                UnverifiedConsensus::parse(&bytes)
                    .unwrap()
                    .verify(&pinned, 150)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

/// The introduction puzzle (doc/protocol.md section 11.5): one attempt,
/// which is also what the service spends to check a solution.
fn puzzle(c: &mut Criterion) {
    use allium_proto::service::pow::Solver;
    let mut s = Solver::new();
    let mut n = 0u128;
    c.bench_function("pow_attempt", |b| {
        b.iter(|| {
            n += 1;
            black_box(s.hash(&[1; 32], &[2; 32], &[3; 32], 100, &n.to_be_bytes()))
        })
    });
}

criterion_group!(
    benches, cells, handshakes, links, relay_path, documents, puzzle
);
criterion_main!(benches);
