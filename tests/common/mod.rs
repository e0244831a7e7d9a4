//! Helpers shared by the whole-system tests: a relay outside any network,
//! a one-hop circuit spoken by hand, a link responder posing as a relay.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use allium::testnet::testnet_exit_policy;
use allium_link::channel::{self, ChannelHandle, Inbox};
use allium_link::limits::QueueMem;
use allium_proto::cell::{self, Cell, CellCmd, DestroyReason};
use allium_proto::ntor;
use allium_proto::onion::{ClientLayers, forward_capacity};
use allium_proto::relaymsg::{Extend, RelayMsg, TargetAddr};
use allium_proto::{LinkKey, OnionKey, RelayDescriptor, UnverifiedDescriptor};
use allium_relay::{Relay, RelayConfig, RelayStats};
use tokio::net::TcpListener;

/// One relay (an exit for loopback), outside any network.
pub struct Lone {
    pub desc: RelayDescriptor,
    pub stats: Arc<RelayStats>,
    pub mem: Arc<QueueMem>,
    _dir: tempfile::TempDir,
}

pub async fn lone_relay(tweak: impl FnOnce(&mut RelayConfig)) -> Lone {
    let dir = tempfile::tempdir().unwrap();
    // Not 127.0.0.1, where the tests' targets listen: an exit never reaches
    // its own address.
    let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let mut cfg = RelayConfig {
        nickname: "lone".into(),
        listen: l.local_addr().unwrap(),
        data_dir: dir.path().join("relay"),
        exit_policy: testnet_exit_policy(),
        allow_private_addresses: true,
        ..RelayConfig::default()
    };
    tweak(&mut cfg);
    let relay = Relay::new(cfg).unwrap();
    let doc = relay.descriptor(allium_directory::unix_now()).unwrap();
    let desc = UnverifiedDescriptor::parse(&doc.to_bytes())
        .unwrap()
        .descriptor()
        .clone();
    let (stats, mem) = (relay.stats(), relay.queue_mem());
    tokio::spawn(async move { relay.serve(l).await });
    Lone {
        desc,
        stats,
        mem,
        _dir: dir,
    }
}

/// A client link to a relay, by its descriptor.
pub async fn link_to(d: &RelayDescriptor) -> ChannelHandle {
    channel::connect_nk(d.addr, &allium_proto::RelayId(d.identity), &d.link_key)
        .await
        .unwrap()
}

/// A one-hop circuit spoken by hand.
pub struct RawCirc {
    pub chan: ChannelHandle,
    pub id: allium_proto::cell::CircId,
    pub rx: Inbox,
    pub layers: ClientLayers,
}

impl RawCirc {
    /// CREATE to the relay with `identity` and `onion_key` over `chan`.
    pub async fn open(
        chan: ChannelHandle,
        identity: &[u8; 32],
        onion_key: &OnionKey,
    ) -> Result<RawCirc, DestroyReason> {
        Self::open_with(chan, identity, onion_key, Default::default()).await
    }

    /// [`RawCirc::open`] asking for flow control `params`.
    pub async fn open_with(
        chan: ChannelHandle,
        identity: &[u8; 32],
        onion_key: &OnionKey,
        params: allium_proto::flow::CircParams,
    ) -> Result<RawCirc, DestroyReason> {
        let (id, mut rx) = chan.new_circuit().await.unwrap();
        let (st, hs) = ntor::client_start(&mut rand::rng(), identity, onion_key, params);
        chan.send(
            Cell::new(
                id,
                CellCmd::CREATE,
                &cell::encode_create(cell::HANDSHAKE_NTOR, &hs),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        let c = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if c.cmd == CellCmd::DESTROY {
            return Err(DestroyReason(c.payload[0]));
        }
        assert_eq!(c.cmd, CellCmd::CREATED);
        let mut layers = ClientLayers::new();
        layers
            .push(
                &st.finish(cell::decode_created(&c.payload[..]).unwrap())
                    .unwrap()
                    .0,
            )
            .unwrap();
        Ok(RawCirc {
            chan,
            id,
            rx,
            layers,
        })
    }

    /// Send a message to the circuit's last hop (EXTEND in RELAY_EARLY).
    pub async fn send(&mut self, sid: u16, msg: RelayMsg) {
        let last = self.layers.len() - 1;
        let cmd = if matches!(msg, RelayMsg::Extend(_)) {
            CellCmd::RELAY_EARLY
        } else {
            CellCmd::RELAY
        };
        let body = msg.encode(sid, forward_capacity(last)).unwrap();
        let payload = self.layers.encrypt_forward(last, &body).unwrap();
        let _ = self
            .chan
            .send(Cell {
                circ_id: self.id,
                cmd,
                payload,
            })
            .await;
    }

    /// The next message, with the exit's tag; `Err` with the DESTROY reason.
    pub async fn recv(&mut self) -> Result<(u16, RelayMsg, [u8; 16]), DestroyReason> {
        let mut c = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a cell within 10 s")
            .ok_or(DestroyReason::CHANNEL_CLOSED)?;
        if c.cmd == CellCmd::DESTROY {
            return Err(DestroyReason(c.payload[0]));
        }
        let (_, tag) = self.layers.decrypt_backward_tagged(&mut c.payload).unwrap();
        let (sid, msg) = RelayMsg::decode(&c.payload[16..]).unwrap();
        Ok((sid, msg, tag))
    }

    pub async fn begin(&mut self, sid: u16, target: SocketAddr) {
        self.send(
            sid,
            RelayMsg::Begin {
                addr: TargetAddr::Ip(target.ip()),
                port: target.port(),
            },
        )
        .await;
        match self.recv().await {
            Ok((s, RelayMsg::Connected(_), _)) => assert_eq!(s, sid),
            other => panic!("BEGIN answered {:?}", other.map(|m| m.1.cmd())),
        }
    }
}

/// Where an EXTEND should lead: the named relay's keys and the address to
/// reach it at.
pub struct ExtendTo {
    pub identity: [u8; 32],
    pub onion_key: OnionKey,
    pub link_key: LinkKey,
    pub addr: SocketAddr,
}

impl RawCirc {
    /// EXTEND the circuit by a hop; `Ok` once EXTENDED completes the
    /// handshake (the new hop is then the last), `Err` with the TRUNCATED
    /// (or DESTROY) reason.
    pub async fn extend(&mut self, to: &ExtendTo) -> Result<(), DestroyReason> {
        let (st, hs) = ntor::client_start(
            &mut rand::rng(),
            &to.identity,
            &to.onion_key,
            allium_proto::flow::CircParams::default(),
        );
        self.send(
            0,
            RelayMsg::Extend(Extend {
                identity: to.identity,
                link_key: to.link_key,
                addr: to.addr,
                htype: cell::HANDSHAKE_NTOR,
                hdata: hs,
            }),
        )
        .await;
        match self.recv().await? {
            (0, RelayMsg::Extended(reply), _) => {
                self.layers.push(&st.finish(&reply).unwrap().0).unwrap();
                Ok(())
            }
            (0, RelayMsg::Truncated(r), _) => Err(DestroyReason(r)),
            (_, m, _) => panic!("EXTEND answered {:?}", m.cmd()),
        }
    }
}

/// A link responder with keys of its own, posing as whatever an EXTEND
/// names; counts the links it completes.
pub async fn impostor() -> (SocketAddr, LinkKey, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let me = Arc::new(channel::LinkIdentity {
        identity: ed25519_dalek::SigningKey::from_bytes(&[0x66; 32]),
        link_secret: x25519_dalek::StaticSecret::from([0x77; 32]),
        stop: None,
        env: Default::default(),
        bind: None,
        known_relay: None,
    });
    let link_key = me.link_pub();
    let linked = Arc::new(AtomicU64::new(0));
    let n = linked.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (me, n) = (me.clone(), n.clone());
            tokio::spawn(async move {
                if let Ok(h) = channel::accept(s, &me, Arc::new(|_| {}), None).await {
                    n.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(h);
                }
            });
        }
    });
    (addr, link_key, linked)
}

/// Open a SOCKS5 connection to `host:port`: the reply code and the
/// stream (a reply within a minute).
pub async fn socks5(proxy: SocketAddr, host: &str, port: u16) -> (u8, tokio::net::TcpStream) {
    socks5_auth(proxy, host, port, None).await
}

/// A running network of one authority and `relays` relays (the first two
/// exits), ready for streams.
pub async fn small_net(relays: usize) -> allium::testnet::Testnet {
    use allium::testnet::{Testnet, TestnetOptions};
    let net = Testnet::start(TestnetOptions {
        authorities: 1,
        relays,
        ..Default::default()
    })
    .await
    .unwrap();
    net.wait_ready(Duration::from_secs(60)).await.unwrap();
    net
}

/// An HTTP server on loopback that answers every request with 200 and
/// `body`.
pub async fn serve_bytes(body: Vec<u8>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    addr
}

/// A library client of `net` keeping its state in `dir`, bootstrapped.
pub async fn library_client(
    net: &allium::testnet::Testnet,
    dir: &std::path::Path,
) -> allium_client::Client {
    let cfg = allium_client::ClientConfig {
        data_dir: dir.into(),
        socks_listen: vec![],
        ..net.client_config.clone()
    };
    let c = allium_client::Client::new(cfg).unwrap();
    tokio::spawn(c.clone().consensus_loop());
    c.bootstrap(Duration::from_secs(30)).await.unwrap();
    c
}

/// Open a SOCKS5 connection to `host:port`, with username/password if
/// given: the reply code and the stream (a reply within a minute).
pub async fn socks5_auth(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> (u8, tokio::net::TcpStream) {
    socks5_early(proxy, host, port, auth, &[]).await
}

/// [`socks5_auth`], writing `early` in the same write as the request, as
/// a browser that sends optimistic data does.
pub async fn socks5_early(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
    early: &[u8],
) -> (u8, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    match auth {
        None => {
            s.write_all(&[5, 1, 0]).await.unwrap();
            let mut m = [0u8; 2];
            s.read_exact(&mut m).await.unwrap();
            assert_eq!(m, [5, 0]);
        }
        Some((u, p)) => {
            s.write_all(&[5, 2, 0, 2]).await.unwrap();
            let mut m = [0u8; 2];
            s.read_exact(&mut m).await.unwrap();
            assert_eq!(m, [5, 2]);
            let mut a = vec![1, u.len() as u8];
            a.extend_from_slice(u.as_bytes());
            a.push(p.len() as u8);
            a.extend_from_slice(p.as_bytes());
            s.write_all(&a).await.unwrap();
            s.read_exact(&mut m).await.unwrap();
            assert_eq!(m, [1, 0]);
        }
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    req.extend_from_slice(early);
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut r))
        .await
        .expect("a SOCKS reply within a minute")
        .unwrap();
    (r[1], s)
}

/// [`socks5_auth`], which must succeed: the stream.
pub async fn socks_open(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    auth: Option<(&str, &str)>,
) -> tokio::net::TcpStream {
    let (code, s) = socks5_auth(proxy, host, port, auth).await;
    assert_eq!(code, 0, "SOCKS reply for {host}:{port}");
    s
}

/// HTTP/1.1 GET with hyper's client over a SOCKS5 stream; the hostname is
/// resolved at the exit.
pub async fn hyper_get(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    path: &str,
    auth: Option<(&str, &str)>,
) -> Vec<u8> {
    use http_body_util::BodyExt;
    let s = socks_open(proxy, host, port, auth).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

/// The first port of a block of `len` free loopback ports at `from`,
/// `from + 100`, ... (20 tries), all below 32768, where Linux's ephemeral
/// ports begin: an outgoing connection never takes a port of the block
/// between this check and the bind of the process that listens there.
pub fn free_block(from: u16, len: u16) -> u16 {
    (0..20u16)
        .map(|i| from + i * 100)
        .inspect(|b| assert!(u32::from(*b) + u32::from(len) <= 32768, "{b}+{len}"))
        .find(|b| (0..len).all(|i| std::net::TcpListener::bind(("127.0.0.1", b + i)).is_ok()))
        .expect("free ports")
}
