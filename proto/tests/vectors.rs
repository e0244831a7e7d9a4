//! Test vectors of `doc/protocol.md`.
//!
//! The spec's ```vectors blocks hold `name: hex` lines; this test computes
//! every vector from fixed inputs and requires the spec to list exactly the
//! same bytes. Source: computed by this implementation from the fixed
//! inputs below; the AEAD underneath is checked against the GCM
//! specification's AES-256 vectors in `src/aead.rs`. Decoding is checked too:
//! each encoded vector decodes and re-encodes to the same bytes.
//! `ALLIUM_PRINT_VECTORS=1 cargo test -p allium-proto --test vectors -- --nocapture`
//! prints them.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason};
use allium_proto::doc::{CONSENSUS_DOMAIN, SignedDocument, VOTE_DOMAIN};
use allium_proto::ntor::{self, OnionKeys, OnionSecret};
use allium_proto::onion::{BACKWARD_CAPACITY, ClientLayers, HopKeys, RelayLayer, forward_capacity};
use allium_proto::policy::ExitPolicy;
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg, TargetAddr};
use allium_proto::service::auth::ClientAuthSecret;
use allium_proto::service::descriptor::{self, IntroPoint, ServiceInfo};
use allium_proto::service::intro;
use allium_proto::service::pow::{Pow, Solver};
use allium_proto::service::{BlindedSigningKey, TimePeriod, ring};
use allium_proto::vote::shared_random::{self, Round, SharedRandom, SrEntry};
use allium_proto::vote::{Vote, VoteRelay, compute_consensus};
use allium_proto::{AuthorityCert, AuthoritySig, LinkKey};
use allium_proto::{
    Consensus, ConsensusRelay, RelayDescriptor, RelayFlags, UnverifiedConsensus,
    UnverifiedDescriptor,
};
use chacha20::rand_core::SeedableRng;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

fn compute() -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut put = |k: &str, b: &[u8]| {
        v.insert(k.to_string(), h(b));
    };

    // Cells.
    let c = Cell::new(
        CircId(0x8000_0001),
        CellCmd::CREATE,
        &cell::encode_create(cell::HANDSHAKE_NTOR, &[0xaa; 4]),
    )
    .unwrap();
    put("cell.create.head", &c.encode()[..13]);
    put(
        "cell.destroy.head",
        &Cell::destroy(CircId(7), DestroyReason::CELL_AUTH).encode()[..6],
    );

    // Relay messages (header and body; the rest is zero padding).
    let msgs = [
        (
            "relay.begin.host",
            1u16,
            RelayMsg::Begin {
                addr: TargetAddr::Host("example.com".into()),
                port: 443,
            },
        ),
        (
            "relay.begin.ipv4",
            2,
            RelayMsg::Begin {
                addr: TargetAddr::Ip("127.0.0.1".parse().unwrap()),
                port: 80,
            },
        ),
        (
            "relay.begin.ipv6",
            3,
            RelayMsg::Begin {
                addr: TargetAddr::Ip("::1".parse().unwrap()),
                port: 8080,
            },
        ),
        (
            "relay.connected",
            1,
            RelayMsg::Connected(Some("93.184.216.34".parse().unwrap())),
        ),
        (
            "relay.data",
            1,
            RelayMsg::Data(b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ),
        ("relay.end", 1, RelayMsg::End(EndReason::CONNECT_REFUSED)),
        ("relay.sendme", 0, RelayMsg::Sendme { tag: [0x11; 16] }),
        ("relay.xoff", 1, RelayMsg::Xoff),
        ("relay.xon", 1, RelayMsg::Xon),
        ("relay.begin_dir", 7, RelayMsg::BeginDir),
        (
            "relay.extend",
            0,
            RelayMsg::Extend(Extend {
                identity: [0x01; 32],
                link_key: LinkKey([0x02; 32]),
                addr: "127.0.0.1:9001".parse().unwrap(),
                htype: cell::HANDSHAKE_NTOR,
                hdata: vec![0x03; 4],
            }),
        ),
        ("relay.extended", 0, RelayMsg::Extended(vec![0x04; 4])),
        ("relay.truncate", 0, RelayMsg::Truncate),
        ("relay.truncated", 0, RelayMsg::Truncated(6)),
        ("relay.drop", 0, RelayMsg::Drop),
        ("relay.resolve", 5, RelayMsg::Resolve("example.org".into())),
        (
            "relay.resolved",
            5,
            RelayMsg::Resolved(vec![("1.2.3.4".parse().unwrap(), 60)]),
        ),
    ];
    for (name, sid, m) in msgs {
        let full = m.encode(sid, forward_capacity(2)).unwrap();
        let len = 5 + u16::from_be_bytes([full[3], full[4]]) as usize;
        assert!(full[len..].iter().all(|&b| b == 0));
        assert_eq!(RelayMsg::decode(&full).unwrap(), (sid, m));
        put(name, &full[..len]);
    }

    // ntor with fixed keys.
    let b = StaticSecret::from([0x21; 32]);
    let x = StaticSecret::from([0x42; 32]);
    let y = StaticSecret::from([0x63; 32]);
    let id = [0x84u8; 32];
    let bpub = PublicKey::from(&b).to_bytes();
    put("ntor.onion_key_B", &bpub);
    let (st, cmsg) = ntor::client_start_with_ephemeral(
        x,
        &id,
        &allium_proto::OnionKey(bpub),
        allium_proto::flow::CircParams::default(),
    );
    put("ntor.client_msg", &cmsg);
    let b = ntor::OnionSecret::new(b);
    let list = [&b];
    let (reply, skeys, _) = ntor::server_with_ephemeral(
        y,
        &OnionKeys {
            identity: id,
            keys: &list,
        },
        &cmsg,
    )
    .unwrap();
    put("ntor.server_msg", &reply);
    let (ckeys, _) = st.finish(&reply).unwrap();
    assert_eq!(ckeys.forward, skeys.forward);
    put("ntor.key_forward", &ckeys.forward);
    put("ntor.key_backward", &ckeys.backward);

    // Onion layers: three hops with fixed keys; the first cell each way.
    let keys = |i: u8| HopKeys {
        forward: [0x10 + i; 32],
        backward: [0x20 + i; 32],
    };
    let mut client = ClientLayers::new();
    let mut relays: Vec<RelayLayer> = (0..3).map(|i| RelayLayer::new(&keys(i))).collect();
    for i in 0..3 {
        client.push(&keys(i)).unwrap();
    }
    let msg = RelayMsg::Data(b"hello".to_vec())
        .encode(1, forward_capacity(2))
        .unwrap();
    let mut p = client.encrypt_forward(2, &msg).unwrap();
    put("onion.forward.hop0_in.sha256", &Sha256::digest(&p[..]));
    put("onion.forward.hop0_in.head", &p[..32]);
    relays[0].peel_forward(&mut p, true).unwrap();
    put("onion.forward.hop1_in.sha256", &Sha256::digest(&p[..]));
    relays[1].peel_forward(&mut p, true).unwrap();
    put("onion.forward.hop2_in.sha256", &Sha256::digest(&p[..]));
    relays[2].peel_forward(&mut p, false).unwrap();
    assert_eq!(&p[16..16 + msg.len()], &msg[..]);
    let back = RelayMsg::Data(b"world".to_vec())
        .encode(1, BACKWARD_CAPACITY)
        .unwrap();
    let mut p = relays[2].originate_backward(&back).unwrap();
    relays[1].wrap_backward(&mut p).unwrap();
    relays[0].wrap_backward(&mut p).unwrap();
    put("onion.backward.client_in.sha256", &Sha256::digest(&p[..]));
    put("onion.backward.client_in.head", &p[..32]);
    assert_eq!(client.decrypt_backward(&mut p).unwrap(), 2);

    // Documents.
    let relay_key = SigningKey::from_bytes(&[0x31; 32]);
    // The onion key (secret 0x33...) and its cross-certificate.
    let onion = OnionSecret::new(StaticSecret::from([0x33; 32]));
    let crosscert = onion.crosscert(&relay_key.verifying_key().to_bytes());
    put("doc.onion_key", &onion.public().0);
    put(
        "doc.onion_crosscert",
        &[&[crosscert.sign][..], &crosscert.sig.0].concat(),
    );
    let desc = RelayDescriptor {
        nickname: "vector".into(),
        identity: relay_key.verifying_key().to_bytes(),
        link_key: LinkKey([0x32; 32]),
        onion_key: onion.public(),
        onion_crosscert: crosscert,
        addr: "127.0.0.1:9001".parse().unwrap(),
        bandwidth: 1_000_000,
        exit_policy: ExitPolicy::parse_rules(&["accept *:443", "reject *:*"]).unwrap(),
        family: vec![],
        published: 1_800_000_000,
    };
    let doc = desc.sign(&relay_key).to_bytes();
    UnverifiedDescriptor::parse(&doc)
        .unwrap()
        .verify(1_800_000_000, 3600)
        .unwrap();
    assert_eq!(
        SignedDocument::parse("d", &doc, 1 << 20)
            .unwrap()
            .to_bytes(),
        doc
    );
    put("doc.descriptor", &doc);
    let auth_key = SigningKey::from_bytes(&[0x41; 32]);
    put("doc.authority_key", &auth_key.verifying_key().to_bytes());
    let cons = Consensus {
        valid_after: 1_800_000_000,
        fresh_until: 1_800_003_600,
        valid_until: 1_800_010_800,
        relays: vec![ConsensusRelay {
            nickname: "vector".into(),
            identity: desc.identity,
            link_key: desc.link_key,
            onion_key: desc.onion_key,
            addr: desc.addr,
            flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::EXIT),
            bandwidth: 800_000,
            declared_bandwidth: 1_000_000,
            measured_bandwidth: Some(800_000),
            exit_ports: desc.exit_policy.summary(),
            family: None,
            descriptor_digest: Sha256::digest(&desc.sign(&relay_key).body).into(),
        }],
        // One Running exit, all the weight: (3E - T) / 3E = 2/3.
        weights: allium_proto::PositionWeights {
            exit_elsewhere: 6666,
            guard_as_middle: 0,
        },
        // The first half of run 20833 (section 8.1): this authority's
        // commitment; no value held yet, so the value without reveals.
        shared_random: SharedRandom {
            current: shared_random::value(20833, &[], &[0; 32]),
            previous: [0; 32],
            commits: vec![SrEntry {
                authority: auth_key.verifying_key().to_bytes(),
                value: shared_random::commitment(
                    20833,
                    &auth_key.verifying_key().to_bytes(),
                    &[0x43; 32],
                ),
            }],
            reveals: vec![],
        },
    };
    // The authority's identity certifies an online signing key.
    let signing = SigningKey::from_bytes(&[0x42; 32]);
    let cert = AuthorityCert {
        identity: auth_key.verifying_key().to_bytes(),
        signing_key: signing.verifying_key().to_bytes(),
        valid_from: 1_700_000_000,
        valid_until: 1_900_000_000,
    }
    .sign(&auth_key);
    put("doc.cert", &cert);
    let mut cd = cons.to_document();
    cd.add(AuthoritySig::make(
        CONSENSUS_DOMAIN,
        &cd.body,
        &cert,
        &signing,
    ));
    let cbytes = cd.to_bytes();
    UnverifiedConsensus::parse(&cbytes)
        .unwrap()
        .verify(
            &[allium_proto::AuthorityKey(
                auth_key.verifying_key().to_bytes(),
            )],
            1_800_000_001,
        )
        .unwrap();
    put("doc.consensus", &cbytes);

    // A vote listing the same relay.
    let round = Round::of(1_800_000_000, 3600);
    assert_eq!(
        round,
        Round {
            run: 20833,
            index: 8
        }
    );
    let vote = Vote {
        authority: auth_key.verifying_key().to_bytes(),
        valid_after: 1_800_000_000,
        interval: 3600,
        valid_intervals: 3,
        shared_random: shared_random::vote(
            round,
            3600,
            &auth_key.verifying_key().to_bytes(),
            &[0x43; 32],
            None,
        ),
        relays: vec![VoteRelay {
            identity: desc.identity,
            digest: Sha256::digest(&desc.sign(&relay_key).body).into(),
            flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::EXIT),
            bandwidth: 1_000_000,
            measured: Some(800_000),
        }],
    };
    let mut vd = vote.to_document();
    vd.add(AuthoritySig::make(VOTE_DOMAIN, &vd.body, &cert, &signing));
    let vbytes = vd.to_bytes();
    let pinned = [allium_proto::AuthorityKey(
        auth_key.verifying_key().to_bytes(),
    )];
    assert_eq!(Vote::verify(&vbytes, &pinned, 1_800_000_000).unwrap(), vote);
    let held = allium_proto::UnverifiedDescriptor::parse(&doc)
        .unwrap()
        .verify_unclocked()
        .unwrap();
    assert_eq!(
        compute_consensus(&[vote], |d| (*d == held.digest).then_some(&held)).unwrap(),
        cons
    );
    put("doc.vote", &vbytes);

    // Service names (section 11).
    let key = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
    let a = allium_proto::service::ServiceAddress::from_key(&key).unwrap();
    assert_eq!(
        allium_proto::service::ServiceAddress::parse(&a.to_string()).unwrap(),
        a
    );
    put("service.address", &a.to_bytes());

    // Shared random values (section 8.1): a commitment, and the value of
    // run 20834 from two reveals of run 20833.
    let (x, y) = ([0x41; 32], [0x51; 32]);
    put(
        "sr.commit",
        &shared_random::commitment(20833, &x, &[0x43; 32]),
    );
    let reveals = [
        SrEntry {
            authority: x,
            value: [0x43; 32],
        },
        SrEntry {
            authority: y,
            value: [0x53; 32],
        },
    ];
    let srv = shared_random::value(20834, &reveals, &[0x60; 32]);
    put("sr.value", &srv);
    put(
        "sr.value.none",
        &shared_random::value(20834, &[], &[0x60; 32]),
    );

    // Blinded keys and the ring (sections 11.1 and 11.2), for the period
    // holding 1_800_000_000 with hour-long intervals.
    let period = TimePeriod::at(1_800_000_000, 3600);
    assert_eq!((period.number, period.length), (20832, 86_400));
    let blinded = a.blinded(period);
    let signer = BlindedSigningKey::derive(&SigningKey::from_bytes(&[7; 32]), period);
    assert_eq!(signer.public(), blinded);
    put("service.blinded", &blinded.0);
    let sig = signer.sign(b"allium");
    assert!(blinded.verify(b"allium", &sig));
    put("service.blinded.signature", &sig.to_bytes());
    put(
        "hsdir.relay",
        &ring::relay_position(&desc.identity, &srv, period),
    );
    put("hsdir.store.1", &ring::store_point(&blinded, 1, period));

    // A service descriptor (section 11.3).
    let info = ServiceInfo {
        intro_points: vec![IntroPoint {
            relay: [0x01; 32],
            auth_key: [0xa1; 32],
            enc_key: [0xe1; 32],
        }],
        pow: None,
    };
    // The randomness: ChaCha20's keystream under the key 5a^32 (nonce 0).
    let mut rng = chacha20::ChaCha20Rng::from_seed([0x5a; 32]);
    let sd = descriptor::build(
        &SigningKey::from_bytes(&[7; 32]),
        period,
        1,
        &info,
        &[],
        &mut rng,
    );
    let read = descriptor::UnverifiedServiceDescriptor::parse(&sd)
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(read.decrypt(&a, None).unwrap(), info);
    // The same, for one authorized client whose secret is 3c^32.
    let client = ClientAuthSecret::from_bytes([0x3c; 32]);
    let mut rng = chacha20::ChaCha20Rng::from_seed([0x5a; 32]);
    let restricted = descriptor::build(
        &SigningKey::from_bytes(&[7; 32]),
        period,
        1,
        &info,
        &[client.public()],
        &mut rng,
    );
    let read = descriptor::UnverifiedServiceDescriptor::parse(&restricted)
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(read.decrypt(&a, Some(&client)).unwrap(), info);
    assert!(read.decrypt(&a, None).is_err());
    put("service.client_auth.key", client.public().as_bytes());
    put(
        "service.descriptor.restricted.sha256",
        &Sha256::digest(&restricted),
    );
    put("service.descriptor", &sd);

    // Introduction (section 11.4): the circuit binding of the hop whose
    // keys are 42^64, the ESTABLISH_INTRO a service signs for it with the
    // auth key of seed 1a^32, and an INTRODUCE1's encrypted part for the
    // enc key of secret 3c^32, ephemeral secret 2b^32, under the
    // subcredential of section 11's service in the period above.
    let hop = HopKeys::from_bytes(&[0x42; 64]);
    let binding = hop.binding();
    put("circuit.binding", &binding);
    let auth = SigningKey::from_bytes(&[0x1a; 32]);
    let est = intro::establish_intro(&auth, &binding, 25, 200);
    assert!(est.verify(&binding));
    let est_msg = RelayMsg::EstablishIntro(est);
    let b = est_msg.encode(0, 5 + 104).unwrap();
    assert_eq!(RelayMsg::decode(&b).unwrap(), (0, est_msg));
    put("intro.establish_intro", &b);
    let enc = StaticSecret::from([0x3c; 32]);
    let enc_key = PublicKey::from(&enc).to_bytes();
    let subcred = descriptor::subcredential(a.key(), &blinded);
    let req = intro::IntroduceRequest {
        cookie: [0x0c; 20],
        rp_identity: [0x01; 32],
        rp_link_key: LinkKey([0x02; 32]),
        rp_addr: "127.0.0.1:9001".parse().unwrap(),
        onionskin: vec![0x5a; ntor::CLIENT_LEN],
        pow: Some(Pow {
            effort: 3,
            seed_head: [0x5e; 4],
            nonce: [0x0d; 16],
        }),
    };
    let auth_key = auth.verifying_key().to_bytes();
    let sealed = intro::seal_with_ephemeral(
        StaticSecret::from([0x2b; 32]),
        &req,
        &auth_key,
        &enc_key,
        &subcred,
    )
    .unwrap();
    assert_eq!(
        intro::open(&enc, &auth_key, &subcred, &sealed).unwrap().0,
        req
    );
    put("intro.introduce.encrypted", &sealed);

    // The puzzle (section 11.5): one attempt, seed 5e^32, at the
    // introduction point of the auth key above, for the ephemeral key of
    // secret 2b^32, effort 3, nonce 0d^16.
    let e = PublicKey::from(&StaticSecret::from([0x2b; 32])).to_bytes();
    let mut solver = Solver::new();
    put(
        "pow.hash",
        &solver.hash(&[0x5e; 32], &auth_key, &e, 3, &[0x0d; 16]),
    );
    v
}

fn spec_vectors() -> BTreeMap<String, String> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../doc/protocol.md"))
        .unwrap();
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in spec.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            inside = t == "```vectors";
            continue;
        }
        if inside && let Some((k, v)) = t.split_once(": ") {
            // Long values may continue on following lines ending in '\'.
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

#[test]
fn spec_vectors_match_the_code() {
    let got = compute();
    if std::env::var_os("ALLIUM_PRINT_VECTORS").is_some() {
        for (k, v) in &got {
            println!("{k}: {v}");
        }
    }
    let spec = spec_vectors();
    for (k, v) in &got {
        assert_eq!(spec.get(k), Some(v), "vector {k} in doc/protocol.md");
    }
    for k in spec.keys() {
        assert!(
            got.contains_key(k),
            "doc/protocol.md lists a vector {k} that no test computes"
        );
    }
}

/// Section 11.1's blinded key and signature, computed again from the
/// specification's words by `doc/vectors/blinding.py`: plain Ed25519
/// arithmetic in Python, sharing no code with the Rust side.
#[test]
fn blinding_agrees_with_an_independent_implementation() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../doc/vectors/blinding.py");
    let out = match std::process::Command::new("python3").arg(script).output() {
        Ok(o) => o,
        Err(e) => {
            assert!(
                std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
                "python3 is needed: {e}"
            );
            eprintln!("skipped: no python3 ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("(agrees)").count(), 2, "{text}");
}
