//! `relay_msg`: relay messages, the plaintext inside the onion layers.
//!
//! Bytes that decode re-encode to a message that decodes to the same
//! thing (padding is ignored and hostnames are lowercased, so the bytes
//! themselves may differ); `decode_data` agrees with `decode`. Then the
//! same input read as an `arbitrary` message: whatever encodes in a
//! cell's capacity decodes back to itself.

use std::net::{IpAddr, SocketAddr};

use allium_proto::LinkKey;
use allium_proto::onion::{BACKWARD_CAPACITY, BODY_LEN, forward_capacity};
use allium_proto::relaymsg::{
    COOKIE_LEN, EndReason, EstablishIntro, Extend, HEADER_LEN, Introduce, RelayMsg, TargetAddr,
};
use arbitrary::{Arbitrary, Unstructured};

pub fn run(data: &[u8]) {
    // A relay message is at most a cell body.
    let plain = &data[..data.len().min(BODY_LEN)];
    decoded(plain);
    let mut u = Unstructured::new(data);
    if let Ok(m) = ArbMsg::arbitrary(&mut u)
        && let Some((sid, m)) = m.into_msg()
    {
        let depth = usize::from(u.arbitrary::<u8>().unwrap_or(0) % 9);
        let cap = if depth == 8 {
            BACKWARD_CAPACITY
        } else {
            forward_capacity(depth)
        };
        if let Ok(b) = m.encode(sid, cap) {
            assert_eq!(b.len(), cap);
            assert_eq!(
                RelayMsg::decode(&b).expect("what we encode decodes"),
                (sid, m)
            );
        }
    }
}

fn decoded(plain: &[u8]) {
    let msg = RelayMsg::decode(plain);
    let data = RelayMsg::decode_data(plain);
    match (&msg, &data) {
        (Ok((sid, RelayMsg::Data(d))), Ok(Some((s, b)))) => assert_eq!((sid, &d[..]), (s, *b)),
        (Ok((_, RelayMsg::Data(_))), _) => panic!("decode_data missed a DATA message"),
        (Ok(_), Ok(None)) | (Err(_), Err(_)) => {}
        (Err(_), Ok(None)) => {}
        _ => panic!("decode and decode_data disagree"),
    }
    let Ok((sid, m)) = msg else { return };
    // Room for a hostname that is an address literal, re-encoded as an
    // IPv6 address.
    let cap = BODY_LEN + 32;
    let b = m.encode(sid, cap).expect("a decoded message encodes");
    assert_eq!(
        RelayMsg::decode(&b).expect("it decodes again"),
        (sid, m.clone())
    );
    let mut into = vec![0xa5; cap];
    let len = m
        .encode_into(sid, &mut into)
        .expect("encode_into as encode");
    assert_eq!(into, b);
    assert!(len >= HEADER_LEN);
}

#[derive(Arbitrary, Debug)]
enum ArbAddr {
    Host(String),
    Ip(IpAddr),
}

#[derive(Arbitrary, Debug)]
enum ArbMsg {
    Begin(u16, ArbAddr, u16),
    Data(u16, Vec<u8>),
    End(u16, u8),
    Connected(u16, Option<IpAddr>),
    Sendme([u8; 16]),
    Extend {
        identity: [u8; 32],
        link_key: [u8; 32],
        ip: IpAddr,
        port: u16,
        htype: u16,
        hdata: Vec<u8>,
    },
    Extended(Vec<u8>),
    Truncate,
    Truncated(u8),
    Drop(u16),
    Resolve(u16, String),
    Resolved(u16, Vec<(IpAddr, u32)>),
    Echo(Vec<u8>),
    Xoff(u16),
    Xon(u16),
    EstablishIntro([u8; 32], u32, u32, [u8; 64]),
    Introduce(bool, [u8; 32], Vec<u8>),
    IntroduceAck(u8),
    EstablishRendezvous([u8; COOKIE_LEN]),
    Rendezvous1([u8; COOKIE_LEN], Vec<u8>),
    Rendezvous2(Vec<u8>),
    Established(bool),
}

/// A hostname as a parser gives it: valid, lowercase, no address literal.
fn host(h: String) -> Option<String> {
    match TargetAddr::from_host(&h) {
        Ok(TargetAddr::Host(c)) if c == h => Some(h),
        _ => None,
    }
}

impl ArbMsg {
    fn into_msg(self) -> Option<(u16, RelayMsg)> {
        Some(match self {
            ArbMsg::Begin(sid, addr, port) => {
                let addr = match addr {
                    ArbAddr::Host(h) => TargetAddr::Host(host(h)?),
                    ArbAddr::Ip(ip) => TargetAddr::Ip(ip),
                };
                (sid, RelayMsg::Begin { addr, port })
            }
            ArbMsg::Data(sid, d) => (sid, RelayMsg::Data(d)),
            ArbMsg::End(sid, r) => (sid, RelayMsg::End(EndReason(r))),
            ArbMsg::Connected(sid, a) => (sid, RelayMsg::Connected(a)),
            ArbMsg::Sendme(tag) => (0, RelayMsg::Sendme { tag }),
            ArbMsg::Extend {
                identity,
                link_key,
                ip,
                port,
                htype,
                hdata,
            } => (
                0,
                RelayMsg::Extend(Extend {
                    identity,
                    link_key: LinkKey(link_key),
                    addr: SocketAddr::new(ip, port),
                    htype,
                    hdata,
                }),
            ),
            ArbMsg::Extended(h) => (0, RelayMsg::Extended(h)),
            ArbMsg::EstablishIntro(auth_key, rate, burst, sig) => (
                0,
                RelayMsg::EstablishIntro(EstablishIntro {
                    auth_key,
                    rate,
                    burst,
                    sig,
                }),
            ),
            ArbMsg::Introduce(first, auth_key, encrypted) => {
                let i = Introduce {
                    auth_key,
                    encrypted,
                };
                (
                    0,
                    if first {
                        RelayMsg::Introduce1(i)
                    } else {
                        RelayMsg::Introduce2(i)
                    },
                )
            }
            ArbMsg::IntroduceAck(s) => (0, RelayMsg::IntroduceAck(s)),
            ArbMsg::EstablishRendezvous(c) => (0, RelayMsg::EstablishRendezvous(c)),
            ArbMsg::Rendezvous1(cookie, reply) => (0, RelayMsg::Rendezvous1 { cookie, reply }),
            ArbMsg::Rendezvous2(r) => (0, RelayMsg::Rendezvous2(r)),
            ArbMsg::Established(intro) => (
                0,
                if intro {
                    RelayMsg::IntroEstablished
                } else {
                    RelayMsg::RendezvousEstablished
                },
            ),
            ArbMsg::Truncate => (0, RelayMsg::Truncate),
            ArbMsg::Truncated(r) => (0, RelayMsg::Truncated(r)),
            ArbMsg::Drop(sid) => (sid, RelayMsg::Drop),
            ArbMsg::Resolve(sid, h) => (sid, RelayMsg::Resolve(host(h)?)),
            ArbMsg::Resolved(sid, a) => (sid, RelayMsg::Resolved(a)),
            ArbMsg::Echo(b) => (0, RelayMsg::Echo(b)),
            ArbMsg::Xoff(sid) => (sid, RelayMsg::Xoff),
            ArbMsg::Xon(sid) => (sid, RelayMsg::Xon),
        })
    }
}
