//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/TARGET/`):
//! the test vectors of `doc/protocol.md`, honest exchanges scripted in
//! each harness's input format, and the documents and configs of a real
//! in-process testnet (its consensus, votes, descriptors and config
//! files, re-signed with the harnesses' fixed keys where a harness needs
//! a valid signature). Run once from `fuzz/`:
//!
//! ```text
//! cargo run --example seeds
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use allium::testnet::{Testnet, TestnetOptions};
use allium_fuzz::input::Script;
use allium_fuzz::keys::{self, NOW};
use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason};
use allium_proto::doc::{CONSENSUS_DOMAIN, DESCRIPTOR_DOMAIN, SignedDocument};
use allium_proto::flow::CircParams;
use allium_proto::onion::forward_capacity;
use allium_proto::relaymsg::{EndReason, Extend, RelayMsg, TargetAddr};
use allium_proto::vote::{Vote, VoteRelay};
use allium_proto::{AuthSigned, LinkKey, RelayFlags, UnverifiedConsensus};
use sha2::{Digest, Sha256};

struct Corpus(PathBuf);

impl Corpus {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        std::fs::write(dir.join(name), bytes).expect("seed written");
    }
}

fn with_mode(mode: u8, b: &[u8]) -> Vec<u8> {
    [&[mode][..], b].concat()
}

fn vectors(c: &Corpus) {
    // Cells and relay messages of the vectors.
    let create = Cell::new(
        CircId(0x8000_0001),
        CellCmd::CREATE,
        &cell::encode_create(cell::HANDSHAKE_NTOR, &[0xaa; 4]),
    )
    .expect("fits");
    c.put("cell", "create", &create.encode());
    let created =
        Cell::new(CircId(1), CellCmd::CREATED, &cell::encode_created(&[7; 66])).expect("fits");
    c.put("cell", "created", &created.encode());
    c.put(
        "cell",
        "destroy",
        &Cell::destroy(CircId(7), DestroyReason::CELL_AUTH).encode(),
    );
    let msgs = [
        (
            "begin_host",
            1u16,
            RelayMsg::Begin {
                addr: TargetAddr::Host("example.com".into()),
                port: 443,
            },
        ),
        (
            "begin_v6",
            3,
            RelayMsg::Begin {
                addr: TargetAddr::Ip("::1".parse().expect("ip")),
                port: 8080,
            },
        ),
        (
            "connected",
            1,
            RelayMsg::Connected(Some("93.184.216.34".parse().expect("ip"))),
        ),
        (
            "data",
            1,
            RelayMsg::Data(b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ),
        ("end", 1, RelayMsg::End(EndReason::CONNECT_REFUSED)),
        ("sendme", 0, RelayMsg::Sendme { tag: [0x11; 16] }),
        ("xoff", 1, RelayMsg::Xoff),
        (
            "extend",
            0,
            RelayMsg::Extend(Extend {
                identity: [1; 32],
                link_key: LinkKey([2; 32]),
                addr: "127.0.0.1:9001".parse().expect("addr"),
                htype: cell::HANDSHAKE_NTOR,
                hdata: vec![3; 4],
            }),
        ),
        ("extended", 0, RelayMsg::Extended(vec![4; 4])),
        ("truncated", 0, RelayMsg::Truncated(6)),
        ("resolve", 5, RelayMsg::Resolve("example.org".into())),
        (
            "resolved",
            5,
            RelayMsg::Resolved(vec![("1.2.3.4".parse().expect("ip"), 60)]),
        ),
        ("echo", 0, RelayMsg::Echo(vec![9; 40])),
    ];
    for (name, sid, m) in msgs {
        let b = m.encode(sid, forward_capacity(2)).expect("fits");
        let len = 5 + u16::from_be_bytes([b[3], b[4]]) as usize;
        c.put("relay_msg", name, &b[..len]);
    }

    // ntor: raw CREATE of the vectors, and an honest exchange.
    let mut s = Script::new();
    s.bytes(&[0x63; 32]).u8(0);
    let (_, cmsg) = allium_proto::ntor::client_start_with_ephemeral(
        x25519_dalek::StaticSecret::from([0x42; 32]),
        &keys::relay_identity(0).verifying_key().to_bytes(),
        &keys::relay_onion(0).public(),
        CircParams::default(),
    );
    c.put("ntor", "create", &s.bytes(&cmsg).finish());
    let mut s = Script::new();
    s.bytes(&[0x63; 32])
        .u8(2)
        .bytes(&[0x42; 32])
        .bytes(&[1, 31])
        .bool(true)
        .u8(0)
        .u8(0);
    c.put("ntor", "exchange", &s.finish());
    let mut s = Script::new();
    s.bytes(&[0x63; 32])
        .u8(2)
        .bytes(&[0x42; 32])
        .bytes(&[0, 0])
        .bool(false)
        .u8(40)
        .u8(1);
    c.put("ntor", "changed_reply", &s.finish());

    // A service descriptor of the fixed service, for this period, as a
    // directory takes it, and its contents.
    {
        use allium_proto::service::TimePeriod;
        use allium_proto::service::auth::ClientAuthSecret;
        use allium_proto::service::descriptor::{IntroPoint, ServiceInfo, build, padded};
        use chacha20::rand_core::SeedableRng;
        let identity = ed25519_dalek::SigningKey::from_bytes(&[0x5e; 32]);
        let info = ServiceInfo {
            intro_points: vec![IntroPoint {
                relay: d_identity(0),
                auth_key: [0xa1; 32],
                enc_key: [0xe1; 32],
            }],
            pow: None,
        };
        let mut rng = chacha20::ChaCha20Rng::from_seed([1; 32]);
        let period = TimePeriod::at(NOW, 3600);
        let doc = build(&identity, period, 1, &info, &[], &mut rng);
        c.put("service_descriptor", "vector", &with_mode(0, &doc));
        // One for the client key the target tries with mode 5 (listed).
        let listed = ClientAuthSecret::from_bytes([5; 32]).public();
        let doc = build(&identity, period, 1, &info, &[listed], &mut rng);
        c.put("service_descriptor", "restricted", &with_mode(0, &doc));
        let contents = padded(&info);
        c.put("service_descriptor", "contents", &with_mode(1, &contents));
    }

    // Documents: descriptor, certificate, consensus, vote of the vectors.
    let desc = keys::descriptor(0);
    let signed = desc.sign(&keys::relay_identity(0));
    c.put("descriptor", "vector", &with_mode(0, &signed.to_bytes()));
    c.put("descriptor", "vector_body", &with_mode(1, &signed.body));
    let mut d1 = keys::descriptor(1);
    d1.family = vec![[9; 32]];
    c.put(
        "descriptor",
        "exit_body",
        &with_mode(
            1,
            &postcard::to_stdvec(&{
                let mut d = d1.clone();
                d.identity = desc.identity;
                d
            })
            .expect("encodes"),
        ),
    );
    let cert = keys::authority_cert(0);
    c.put("authority_cert", "vector", &with_mode(0, &cert));
    let cert_doc = SignedDocument::parse("certificate", &cert, 1024).expect("a certificate");
    c.put(
        "authority_cert",
        "vector_body",
        &with_mode(1, &cert_doc.body),
    );
    let held: Vec<_> = (0..2)
        .map(|i| {
            let d = keys::descriptor(i).sign(&keys::relay_identity(i));
            allium_proto::UnverifiedDescriptor::parse(&d.to_bytes())
                .and_then(|u| u.verify_unclocked())
                .expect("a valid descriptor")
        })
        .collect();
    let vote = Vote {
        authority: keys::authority(0).0.verifying_key().to_bytes(),
        valid_after: NOW,
        interval: 3600,
        valid_intervals: 3,
        relays: (0..2)
            .map(|i| {
                let d = keys::descriptor(i).sign(&keys::relay_identity(i));
                VoteRelay {
                    identity: d_identity(i),
                    digest: Sha256::digest(&d.body).into(),
                    flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::EXIT),
                    bandwidth: 1_000_000,
                    measured: Some(800_000),
                }
            })
            .collect::<Vec<_>>(),
        shared_random: Default::default(),
    };
    let mut vote = vote;
    vote.relays.sort_by_key(|r| r.identity);
    let vbytes = keys::signed_vote(&vote, 0);
    c.put("vote", "vector", &with_mode(0, &vbytes));
    let cons = allium_proto::vote::compute_consensus(std::slice::from_ref(&vote), |d| {
        held.iter().find(|h| h.digest == *d)
    })
    .expect("a consensus");
    assert_eq!(cons.relays.len(), 2);
    let cbytes = keys::signed_consensus(&cons);
    c.put("consensus", "vector", &with_mode(0, &cbytes));
    c.put(
        "consensus",
        "vector_body",
        &with_mode(1, &cons.to_document().body),
    );

    // The directory's upload handlers: a descriptor, the same again, a
    // vote, a signature.
    let mut s = Script::new();
    s.u8(1).var(&signed.body).u8(1).var(&signed.body);
    s.u8(0).var(
        &keys::descriptor(1)
            .sign(&keys::relay_identity(1))
            .to_bytes(),
    );
    s.u8(3).var(&vote.to_document().body).u8(4).var(&[0; 70]);
    c.put("dirauth", "uploads", &s.finish());
    c.put(
        "dirauth",
        "vote_raw",
        &Script::new().u8(2).var(&vbytes).finish(),
    );
}

fn d_identity(i: u8) -> [u8; 32] {
    keys::relay_identity(i).verifying_key().to_bytes()
}

fn protocols(c: &Corpus) {
    // SOCKS as clients send it (curl, Tor Browser, torsocks).
    let mut v5 = vec![5, 1, 0, 5, 1, 0, 3, 11];
    v5.extend(b"example.com");
    v5.extend(443u16.to_be_bytes());
    c.put("socks", "v5_host", &with_mode(0, &v5));
    let userpass = [
        5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 1, 127, 0, 0, 1, 0, 80,
    ];
    c.put("socks", "v5_userpass", &with_mode(3, &userpass));
    let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
    v6.extend([0x20, 1, 0xd, 0xb8].iter().chain(&[0; 11]).chain(&[1]));
    v6.extend(80u16.to_be_bytes());
    c.put("socks", "v5_ipv6", &with_mode(1, &v6));
    let mut resolve = vec![5, 1, 0, 5, 0xf0, 0, 3, 11];
    resolve.extend(b"example.org");
    resolve.extend([0, 0]);
    c.put("socks", "v5_resolve", &with_mode(5, &resolve));
    c.put(
        "socks",
        "v4",
        &with_mode(2, &[4, 1, 0, 80, 127, 0, 0, 1, b'u', 0]),
    );
    let mut v4a = vec![4, 1, 1, 187, 0, 0, 0, 1, 0];
    v4a.extend(b"example.com\0");
    c.put("socks", "v4a", &with_mode(0, &v4a));

    c.put(
        "httpconnect",
        "connect",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic YTpi\r\n\r\nhello",
    );
    c.put(
        "httpconnect",
        "ipv6",
        b"CONNECT [::1]:8080 HTTP/1.0\r\n\r\n",
    );

    // Policies: four probes, then rules.
    let mut probes = Script::new();
    probes.bool(false).bytes(&[93, 184, 216, 34]).u16(443);
    probes.bool(false).bytes(&[127, 0, 0, 1]).u16(25);
    probes
        .bool(true)
        .bytes(&[0x20, 2, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
        .u16(80);
    probes.bool(false).bytes(&[10, 1, 2, 3]).u16(6881);
    let probes = probes.finish();
    let mut rules = allium::testnet::testnet_exit_policy().join("\n");
    rules.push_str("\naccept [::1]/128:*\nreject 0.0.0.0/0:*");
    c.put(
        "policy",
        "testnet",
        &[&probes[..], rules.as_bytes()].concat(),
    );
    let default = allium_proto::policy::ExitPolicy::default_exit()
        .to_strings()
        .join("\n");
    c.put(
        "policy",
        "default_exit",
        &[&probes[..], default.as_bytes()].concat(),
    );
    let bin =
        postcard::to_stdvec(&allium_proto::policy::ExitPolicy::default_exit()).expect("encodes");
    c.put(
        "policy",
        "default_exit_postcard",
        &[&probes[..], &bin[..]].concat(),
    );

    // Flow: a window's worth each way, then the controller alone.
    let mut s = Script::new();
    s.bytes(&[1, 31]).bool(false);
    for _ in 0..4 {
        s.u8(0)
            .u16(200)
            .u8(5)
            .u16(50)
            .u8(1)
            .u16(200)
            .u8(2)
            .u16(200)
            .u8(3)
            .u8(3);
    }
    c.put("flow", "vegas_rounds", &s.finish());
    let mut s = Script::new();
    s.bytes(&[0, 0])
        .bool(false)
        .u8(0)
        .u16(1000)
        .u8(1)
        .u16(1000)
        .u8(2)
        .u16(100)
        .u8(3)
        .u8(4);
    s.bytes(&[0; 16]).u8(6).bytes(&[1; 16]);
    c.put("flow", "fixed", &s.finish());
    let mut s = Script::new();
    s.bytes(&[1, 31]).bool(true).u8(0);
    for i in 0..20u32 {
        s.u32(100_000).u32(50_000 + i * 5_000).bool(i % 3 != 0);
    }
    c.put("flow", "controller", &s.finish());

    // Link handshakes: each side and pattern, honest, with transport
    // messages after; and one with a changed message.
    let cellbytes = Cell::new(CircId(1), CellCmd::RELAY, &[7; 20])
        .expect("fits")
        .encode();
    for mode in [0u8, 1, 2, 3, 12, 13, 14, 15] {
        let mut s = Script::new();
        s.u8(mode).u8(if mode & 1 == 0 { 255 } else { 16 }).u8(mode);
        if mode >= 12 {
            s.var(&[0x55; 100]);
        }
        if mode == 2 {
            s.bool(false);
        }
        s.var(&cellbytes)
            .var(&[&cellbytes[..], &cellbytes[..]].concat())
            .var(&[1; 10]);
        c.put("link_handshake", &format!("mode{mode}"), &s.finish());
    }
    c.put(
        "link_handshake",
        "changed",
        &Script::new().u8(8).u8(255).u8(0).u16(40).u8(1).finish(),
    );

    // Link transport: cells each way, a plaintext, raw bytes, a change.
    let mut s = Script::new();
    s.u8(0)
        .u8(2)
        .u8(2)
        .bytes(&cellbytes)
        .bytes(&cellbytes)
        .bytes(&cellbytes);
    s.u8(0x82).u8(0).bytes(&cellbytes);
    s.u8(1).var(&cellbytes).u8(0x81).var(&[0; 100]);
    c.put("link_transport", "cells", &s.finish());
    let mut s = Script::new();
    s.u8(1)
        .u8(0)
        .var(&[0x02, 0x12, 0, 0, 0])
        .u8(3)
        .bytes(&cellbytes)
        .u16(100)
        .u8(1);
    c.put("link_transport", "raw_and_changed", &s.finish());

    // Circuits, as a browser uses one: a stream opened, data both ways,
    // SENDMEs, consumed, ended; a resolve; an ECHO on one hop.
    let mut s = Script::new();
    s.u8(2).bytes(&[1, 31]).u8(0);
    s.u8(2).u16(1).u16(443).u8(0).bool(false); // BEGIN to the exit
    s.u8(7 | 0x20).u16(0).u8(0).bytes(&[93, 184, 216, 34]); // connected (exit = k 2)
    s.u8(3).u16(0).u16(40).u8(200); // 40 DATA cells to the exit
    s.u8(8 | 0x20).u16(0).u16(20_000); // the exit sends
    s.u8(5 | 0x20).bool(false).u8(5 | 0x20).bool(false); // SENDMEs owed
    s.u8(9 | 0x20).u16(0).u16(40); // consumed
    s.u8(4 | 0x20).u16(0).u8(0).u8(6); // END
    s.u8(2).u16(9).u16(0).u8(0).bool(true); // RESOLVE
    s.u8(7 | 0x20).u16(1).u8(2).u8(3); // resolved
    s.u8(6).u8(1); // TRUNCATE at hop 0
    c.put("circuit_relay", "browse", &s.finish());
    let mut s = Script::new();
    s.u8(0).bytes(&[0, 0]).u8(1);
    s.u8(4).u16(0).u8(4).var(&[1, 2, 3]); // ECHO on a one-hop circuit
    s.u8(0)
        .bool(true)
        .var(&[1, 0, 1, 0, 6, 0, 3, b'a', b'.', b'b', 0, 80]); // BEGIN in RELAY_EARLY
    s.u8(1).bool(false).u8(3).var(&[0xff; 40]); // garbage
    c.put("circuit_relay", "one_hop", &s.finish());

    let mut s = Script::new();
    s.u8(2).bytes(&[1, 31]).u8(0);
    s.u8(5).u8(0).u16(443); // begin
    s.u8(2).u16(0).u8(0).bool(true).bytes(&[93, 184, 216, 34]); // CONNECTED
    s.u8(6).u16(0).u16(30_000); // the client sends
    s.u8(4).bool(false).u8(4).bool(false); // the SENDMEs it is owed
    s.u8(3).u16(0).u16(100).u8(200); // DATA from the exit
    s.u8(7).u16(0).u16(100); // consumed
    s.u8(2).u16(0).u8(3).u8(2).u16(0).u8(4); // XOFF, XON
    s.u8(2).u16(0).u8(1).u8(6); // END
    s.u8(5).u8(2).u8(2).u16(1).u8(2).u8(3); // resolve, RESOLVED
    s.u8(5).u8(3).var(&[5; 30]).u8(2).u16(0).u8(5).var(&[5; 30]); // echo
    s.u8(0x10).var(&[10, 0, 0, 0, 0]); // DROP from hop 1
    c.put("circuit_client", "browse", &s.finish());
}

/// Everything under `dir` named `name`.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            find(&p, name, out);
        } else if p.file_name().is_some_and(|n| n == name) {
            out.push(p);
        }
    }
}

async fn testnet(c: &Corpus) {
    let dir = tempfile::tempdir().expect("a directory");
    let opts = TestnetOptions {
        data_dir: Some(dir.path().to_path_buf()),
        ..TestnetOptions::default()
    };
    let net = Testnet::start(opts).await.expect("the testnet starts");
    net.wait_ready(Duration::from_secs(120))
        .await
        .expect("the testnet is ready");
    // A round later, so every authority has votes and a consensus stored.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut files = Vec::new();
    for n in ["config.toml", "consensus"] {
        find(dir.path(), n, &mut files);
    }
    files.sort();
    // Authority 0's votes, one file each.
    let stored = |d: &str| -> Vec<Vec<u8>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.path().join("auth0/state").join(d))
            .expect("the authority's store")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| std::fs::read(p).expect("readable"))
            .collect()
    };
    let mut n = 0;
    for f in &files {
        let b = std::fs::read(f).expect("readable");
        let name = f.file_name().and_then(|s| s.to_str()).unwrap_or_default();
        let role = f
            .parent()
            .and_then(|p| {
                if name == "config.toml" {
                    Some(p)
                } else {
                    p.parent()
                }
            })
            .and_then(|p| p.file_name())
            .and_then(|s| s.to_str())
            .unwrap_or("x")
            .to_string();
        n += 1;
        match name {
            "config.toml" if role == "auth0" || role == "relay0" || role == "client" => {
                c.put("config", &format!("testnet_{role}"), &b);
            }
            "consensus" if role == "auth0" => {
                c.put("consensus", "testnet", &with_mode(0, &b));
                let u = UnverifiedConsensus::parse(&b).expect("the testnet's consensus");
                c.put("consensus", "testnet_body", &with_mode(1, &u.doc.body));
            }
            _ => n -= 1,
        }
    }
    if let Some(v) = stored("votes.d").first() {
        n += 1;
        c.put("vote", "testnet", &with_mode(0, v));
        // The same vote as the harness's authority 0's.
        let doc = AuthSigned::parse("vote", v, 1 << 26).expect("a vote");
        let mut vote: Vote = postcard::from_bytes(&doc.body).expect("a vote body");
        vote.authority = keys::authority(0).0.verifying_key().to_bytes();
        vote.relays.truncate(3);
        c.put(
            "vote",
            "testnet_resigned",
            &with_mode(0, &keys::signed_vote(&vote, 0)),
        );
    }
    // And its descriptors, from its log (read once the network is down).
    net.shutdown().await;
    let state = dir.path().join("auth0/state");
    let held = allium_directory::descstore::DescriptorStore::new(&state)
        .load()
        .expect("the authority's descriptors");
    for (i, (_, d)) in held.iter().take(2).enumerate() {
        n += 1;
        c.put("descriptor", &format!("testnet{i}"), &with_mode(0, d));
        let doc = SignedDocument::parse("d", d, 4096).expect("a descriptor");
        // Its body, under relay 0's key, for the upload handler.
        let mut body: allium_proto::RelayDescriptor =
            postcard::from_bytes(&doc.body).expect("a body");
        body.identity = d_identity(0);
        let mut again = SignedDocument::new(postcard::to_stdvec(&body).expect("encodes"));
        again.sign(DESCRIPTOR_DOMAIN, &keys::relay_identity(0));
        let script = Script::new().u8(1).var(&again.body).u8(0).var(d).finish();
        c.put("dirauth", &format!("testnet{i}"), &script);
    }
    let _ = CONSENSUS_DOMAIN;
    println!("{n} files of the testnet used");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let c = Corpus(root.join("corpus"));
    vectors(&c);
    protocols(&c);
    for ex in ["relay", "client", "dirauth"] {
        let b = std::fs::read(root.join(format!("../examples/{ex}.toml"))).expect("example config");
        c.put("config", &format!("example_{ex}"), &b);
    }
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(testnet(&c));
    // Every seed runs through its harness as the fuzzer will.
    for (name, run) in allium_fuzz::TARGETS {
        for e in std::fs::read_dir(c.0.join(name)).expect("seeds").flatten() {
            run(&std::fs::read(e.path()).expect("a seed"));
        }
    }
    println!("seeds written to {}", c.0.display());
}
