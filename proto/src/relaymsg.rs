//! Relay messages: what travels inside the onion layers of a RELAY cell
//! (`doc/protocol.md` section "Relay messages").
//!
//! Plaintext layout: `cmd u8 | stream_id u16 | len u16 | body[len] | padding`.
//! The padding up to the layer's capacity is ignored on receipt (on forward
//! cells it holds the filler described in [`crate::onion`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::wire::{Reader, Writer};
use crate::{Error, LinkKey};

pub const HEADER_LEN: usize = 5;
/// The longest hostname accepted in BEGIN and RESOLVE.
pub const MAX_HOSTNAME_LEN: usize = 255;

crate::open_enum! {
    /// A relay message command (`doc/protocol.md` section 5).
    RelayCmd(u8) {
        BEGIN = 1,
        DATA = 2,
        END = 3,
        CONNECTED = 4,
        SENDME = 5,
        EXTEND = 6,
        EXTENDED = 7,
        TRUNCATE = 8,
        TRUNCATED = 9,
        DROP = 10,
        RESOLVE = 11,
        RESOLVED = 12,
        ECHO = 13,
        XOFF = 14,
        XON = 15,
        BEGIN_DIR = 16,
        ESTABLISH_INTRO = 32,
        ESTABLISH_RENDEZVOUS = 33,
        INTRODUCE1 = 34,
        INTRODUCE2 = 35,
        RENDEZVOUS1 = 36,
        RENDEZVOUS2 = 37,
        INTRO_ESTABLISHED = 38,
        RENDEZVOUS_ESTABLISHED = 39,
        INTRODUCE_ACK = 40,
    }
}

crate::open_enum! {
    /// Why a stream ended (END body); numbered as in Tor's tor-spec.
    EndReason(u8) {
        MISC = 1,
        RESOLVE_FAILED = 2,
        CONNECT_REFUSED = 3,
        EXIT_POLICY = 4,
        DESTROY = 5,
        DONE = 6,
        TIMEOUT = 7,
        NO_ROUTE = 8,
        INTERNAL = 10,
        RESOURCE_LIMIT = 11,
        CONN_RESET = 12,
        PROTOCOL = 13,
    }
}

impl EndReason {
    /// Why a stream ends when a connection of its end failed with `e`.
    pub fn for_io_error(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => EndReason::CONNECT_REFUSED,
            TimedOut => EndReason::TIMEOUT,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable => EndReason::NO_ROUTE,
            ConnectionReset => EndReason::CONN_RESET,
            _ => EndReason::MISC,
        }
    }
}

/// A stream target: a hostname (resolved at the exit) or an address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    Host(String),
    Ip(IpAddr),
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetAddr::Host(h) => f.write_str(h),
            TargetAddr::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            TargetAddr::Ip(a) => write!(f, "{a}"),
        }
    }
}

const ATYP_HOST: u8 = 0;
const ATYP_V4: u8 = 4;
const ATYP_V6: u8 = 6;

/// Is `h` a hostname we are willing to carry (LDH labels, dots, underscores)?
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HOSTNAME_LEN
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl TargetAddr {
    /// Parse a SOCKS/BEGIN host: address literals become [`TargetAddr::Ip`].
    pub fn from_host(h: &str) -> Result<Self, Error> {
        if let Ok(ip) = h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(TargetAddr::Ip(ip));
        }
        if !valid_hostname(h) {
            return Err(Error::malformed("hostname", "not a valid hostname"));
        }
        Ok(TargetAddr::Host(h.to_ascii_lowercase()))
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        match self {
            TargetAddr::Host(h) => {
                w.put_u8(ATYP_HOST).put_u8(h.len() as u8).put(h.as_bytes());
            }
            TargetAddr::Ip(IpAddr::V4(a)) => {
                w.put_u8(ATYP_V4).put(&a.octets());
            }
            TargetAddr::Ip(IpAddr::V6(a)) => {
                w.put_u8(ATYP_V6).put(&a.octets());
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, Error> {
        match r.take_u8()? {
            ATYP_HOST => {
                let len = r.take_u8()? as usize;
                let h = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| Error::malformed("hostname", "not UTF-8"))?;
                TargetAddr::from_host(h)
            }
            ATYP_V4 => Ok(TargetAddr::Ip(IpAddr::V4(Ipv4Addr::from(
                r.take_array::<4>()?,
            )))),
            ATYP_V6 => Ok(TargetAddr::Ip(IpAddr::V6(Ipv6Addr::from(
                r.take_array::<16>()?,
            )))),
            t => Err(Error::malformed(
                "address",
                format!("unknown address type {t}"),
            )),
        }
    }
}

/// A parsed relay message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayMsg {
    Begin {
        addr: TargetAddr,
        port: u16,
    },
    Data(Vec<u8>),
    End(EndReason),
    /// The exit connected; carries the address it connected to, if it says.
    Connected(Option<IpAddr>),
    /// Acknowledges a window of cells; `tag` is the authentication tag of the
    /// cell that triggered it (Tor prop 289's authenticated SENDME).
    Sendme {
        tag: [u8; 16],
    },
    Extend(Extend),
    Extended(Vec<u8>),
    Truncate,
    Truncated(u8),
    Drop,
    Resolve(String),
    /// Addresses with TTL seconds; empty means the name did not resolve.
    Resolved(Vec<(IpAddr, u32)>),
    /// Bytes the hop that receives them sends straight back (a capacity
    /// measurement: the hop must open and seal every cell).
    Echo(Vec<u8>),
    /// The stream's receiver holds too much: stop sending on it.
    Xoff,
    /// The stream's receiver has drained: go on.
    Xon,
    /// Open a stream to the hop's own directory cache (an HTTP/1.1
    /// exchange, `doc/protocol.md` section 8); empty body.
    BeginDir,
    /// Service to a relay: be an introduction point for `auth_key`.
    EstablishIntro(EstablishIntro),
    /// The relay took the ESTABLISH_INTRO.
    IntroEstablished,
    /// Client to an introduction point: pass this on to the service.
    Introduce1(Introduce),
    /// Introduction point to the service: a client's INTRODUCE1.
    Introduce2(Introduce),
    /// Introduction point to the client: what became of its INTRODUCE1
    /// ([`IntroduceStatus`]).
    IntroduceAck(u8),
    /// Client to a relay: be the rendezvous point for `cookie`.
    EstablishRendezvous([u8; COOKIE_LEN]),
    /// The relay took the ESTABLISH_RENDEZVOUS.
    RendezvousEstablished,
    /// Service to the rendezvous point: join my circuit to the one that
    /// established `cookie`, and give the client `reply`.
    Rendezvous1 {
        cookie: [u8; COOKIE_LEN],
        reply: Vec<u8>,
    },
    /// Rendezvous point to the client: the service's handshake reply.
    Rendezvous2(Vec<u8>),
}

/// Bytes of a rendezvous cookie.
pub const COOKIE_LEN: usize = 20;

/// Ask a relay to be an introduction point (`doc/protocol.md` section 11.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstablishIntro {
    /// The key this introduction is known by (not the service's identity).
    pub auth_key: [u8; 32],
    /// INTRODUCE1 cells per second the point passes on, and the burst.
    pub rate: u32,
    pub burst: u32,
    /// `auth_key`'s signature, binding the request to this circuit.
    pub sig: [u8; 64],
}

/// An INTRODUCE1 or INTRODUCE2 body: the introduction's key, then what
/// only the service can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Introduce {
    pub auth_key: [u8; 32],
    pub encrypted: Vec<u8>,
}

crate::open_enum! {
    /// What an introduction point did with an INTRODUCE1.
    IntroduceStatus(u8) {
        SENT = 0,
        UNKNOWN_SERVICE = 1,
        RATE_LIMITED = 2,
    }
}

/// Ask the last hop to extend the circuit to another relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extend {
    pub identity: [u8; 32],
    pub link_key: LinkKey,
    pub addr: SocketAddr,
    pub htype: u16,
    pub hdata: Vec<u8>,
}

impl RelayMsg {
    pub fn cmd(&self) -> RelayCmd {
        match self {
            RelayMsg::Begin { .. } => RelayCmd::BEGIN,
            RelayMsg::Data(_) => RelayCmd::DATA,
            RelayMsg::End(_) => RelayCmd::END,
            RelayMsg::Connected(_) => RelayCmd::CONNECTED,
            RelayMsg::Sendme { .. } => RelayCmd::SENDME,
            RelayMsg::Extend(_) => RelayCmd::EXTEND,
            RelayMsg::Extended(_) => RelayCmd::EXTENDED,
            RelayMsg::Truncate => RelayCmd::TRUNCATE,
            RelayMsg::Truncated(_) => RelayCmd::TRUNCATED,
            RelayMsg::Drop => RelayCmd::DROP,
            RelayMsg::Resolve(_) => RelayCmd::RESOLVE,
            RelayMsg::Resolved(_) => RelayCmd::RESOLVED,
            RelayMsg::Echo(_) => RelayCmd::ECHO,
            RelayMsg::Xoff => RelayCmd::XOFF,
            RelayMsg::Xon => RelayCmd::XON,
            RelayMsg::BeginDir => RelayCmd::BEGIN_DIR,
            RelayMsg::EstablishIntro(_) => RelayCmd::ESTABLISH_INTRO,
            RelayMsg::IntroEstablished => RelayCmd::INTRO_ESTABLISHED,
            RelayMsg::Introduce1(_) => RelayCmd::INTRODUCE1,
            RelayMsg::Introduce2(_) => RelayCmd::INTRODUCE2,
            RelayMsg::IntroduceAck(_) => RelayCmd::INTRODUCE_ACK,
            RelayMsg::EstablishRendezvous(_) => RelayCmd::ESTABLISH_RENDEZVOUS,
            RelayMsg::RendezvousEstablished => RelayCmd::RENDEZVOUS_ESTABLISHED,
            RelayMsg::Rendezvous1 { .. } => RelayCmd::RENDEZVOUS1,
            RelayMsg::Rendezvous2(_) => RelayCmd::RENDEZVOUS2,
        }
    }

    /// Is this one of the onion service messages (introduction and
    /// rendezvous, `doc/protocol.md` section 11.4)?
    pub fn is_service(&self) -> bool {
        (RelayCmd::ESTABLISH_INTRO.0..=RelayCmd::INTRODUCE_ACK.0).contains(&self.cmd().0)
    }

    fn body(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            RelayMsg::Begin { addr, port } => {
                addr.write(&mut w);
                w.put_u16(*port);
            }
            RelayMsg::Data(d) | RelayMsg::Echo(d) => {
                w.put(d);
            }
            RelayMsg::End(r) => {
                w.put_u8(r.0);
            }
            RelayMsg::Connected(a) => {
                if let Some(a) = a {
                    TargetAddr::Ip(*a).write(&mut w);
                }
            }
            RelayMsg::Sendme { tag } => {
                w.put_u8(1).put(tag);
            }
            RelayMsg::Extend(e) => {
                w.put(&e.identity).put(&e.link_key.0);
                TargetAddr::Ip(e.addr.ip()).write(&mut w);
                w.put_u16(e.addr.port())
                    .put_u16(e.htype)
                    .put_u16(e.hdata.len() as u16)
                    .put(&e.hdata);
            }
            RelayMsg::Extended(h) => {
                w.put_u16(h.len() as u16).put(h);
            }
            RelayMsg::Truncate
            | RelayMsg::Drop
            | RelayMsg::Xoff
            | RelayMsg::Xon
            | RelayMsg::BeginDir
            | RelayMsg::IntroEstablished
            | RelayMsg::RendezvousEstablished => {}
            RelayMsg::EstablishIntro(e) => {
                w.put(&e.auth_key)
                    .put_u32(e.rate)
                    .put_u32(e.burst)
                    .put(&e.sig);
            }
            RelayMsg::Introduce1(i) | RelayMsg::Introduce2(i) => {
                w.put(&i.auth_key)
                    .put_u16(i.encrypted.len() as u16)
                    .put(&i.encrypted);
            }
            RelayMsg::IntroduceAck(s) => {
                w.put_u8(*s);
            }
            RelayMsg::EstablishRendezvous(c) => {
                w.put(c);
            }
            RelayMsg::Rendezvous1 { cookie, reply } => {
                w.put(cookie).put_u16(reply.len() as u16).put(reply);
            }
            RelayMsg::Rendezvous2(reply) => {
                w.put_u16(reply.len() as u16).put(reply);
            }
            RelayMsg::Truncated(r) => {
                w.put_u8(*r);
            }
            RelayMsg::Resolve(h) => {
                TargetAddr::Host(h.clone()).write(&mut w);
            }
            RelayMsg::Resolved(addrs) => {
                w.put_u8(addrs.len() as u8);
                for (a, ttl) in addrs {
                    TargetAddr::Ip(*a).write(&mut w);
                    w.put_u32(*ttl);
                }
            }
        }
        w.finish()
    }

    /// Encode into a plaintext of exactly `capacity` bytes (zero padded).
    pub fn encode(&self, stream_id: u16, capacity: usize) -> Result<Vec<u8>, Error> {
        let body = self.body();
        if HEADER_LEN + body.len() > capacity {
            return Err(Error::TooLarge {
                what: "relay message",
                len: HEADER_LEN + body.len(),
                max: capacity,
            });
        }
        let mut w = Writer::new();
        w.put_u8(self.cmd().0)
            .put_u16(stream_id)
            .put_u16(body.len() as u16)
            .put(&body);
        let mut out = w.finish();
        out.resize(capacity, 0);
        Ok(out)
    }

    /// Encode into `out` (the plaintext area of a cell, `capacity` bytes):
    /// header and body, then zeros. DATA is written without allocating.
    pub fn encode_into(&self, stream_id: u16, out: &mut [u8]) -> Result<usize, Error> {
        let owned;
        let body: &[u8] = match self {
            RelayMsg::Data(d) | RelayMsg::Echo(d) => d,
            other => {
                owned = other.body();
                &owned
            }
        };
        let len = HEADER_LEN + body.len();
        if len > out.len() {
            return Err(Error::TooLarge {
                what: "relay message",
                len,
                max: out.len(),
            });
        }
        out[0] = self.cmd().0;
        out[1..3].copy_from_slice(&stream_id.to_be_bytes());
        out[3..5].copy_from_slice(&(body.len() as u16).to_be_bytes());
        out[HEADER_LEN..len].copy_from_slice(body);
        out[len..].fill(0);
        Ok(len)
    }

    /// Encode a DATA message from a borrowed slice (see [`RelayMsg::encode_into`]).
    pub fn encode_data_into(stream_id: u16, data: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        let len = HEADER_LEN + data.len();
        if len > out.len() {
            return Err(Error::TooLarge {
                what: "relay message",
                len,
                max: out.len(),
            });
        }
        out[0] = RelayCmd::DATA.0;
        out[1..3].copy_from_slice(&stream_id.to_be_bytes());
        out[3..5].copy_from_slice(&(data.len() as u16).to_be_bytes());
        out[HEADER_LEN..len].copy_from_slice(data);
        out[len..].fill(0);
        Ok(len)
    }

    /// A DATA message's stream id and bytes, borrowed from the plaintext,
    /// without decoding anything else; `None` for any other command.
    pub fn decode_data(plain: &[u8]) -> Result<Option<(u16, &[u8])>, Error> {
        let mut r = Reader::new(plain);
        if RelayCmd(r.take_u8()?) != RelayCmd::DATA {
            return Ok(None);
        }
        let stream_id = r.take_u16()?;
        let len = r.take_u16()? as usize;
        let body = r
            .take(len)
            .map_err(|_| Error::malformed("relay message", "length beyond cell"))?;
        Ok(Some((stream_id, body)))
    }

    /// Decode from a layer's plaintext; returns (stream id, message).
    pub fn decode(plain: &[u8]) -> Result<(u16, RelayMsg), Error> {
        let mut r = Reader::new(plain);
        let cmd = RelayCmd(r.take_u8()?);
        let stream_id = r.take_u16()?;
        let len = r.take_u16()? as usize;
        let body = r
            .take(len)
            .map_err(|_| Error::malformed("relay message", "length beyond cell"))?;
        let mut r = Reader::new(body);
        let msg = match cmd {
            RelayCmd::BEGIN => {
                let addr = TargetAddr::read(&mut r)?;
                RelayMsg::Begin {
                    addr,
                    port: r.take_u16()?,
                }
            }
            RelayCmd::DATA => RelayMsg::Data(r.take_rest().to_vec()),
            RelayCmd::ECHO => RelayMsg::Echo(r.take_rest().to_vec()),
            RelayCmd::END => RelayMsg::End(EndReason(r.take_u8()?)),
            RelayCmd::CONNECTED => {
                if r.remaining() == 0 {
                    RelayMsg::Connected(None)
                } else {
                    match TargetAddr::read(&mut r)? {
                        TargetAddr::Ip(a) => RelayMsg::Connected(Some(a)),
                        TargetAddr::Host(_) => {
                            return Err(Error::malformed("CONNECTED", "hostname address"));
                        }
                    }
                }
            }
            RelayCmd::SENDME => {
                let v = r.take_u8()?;
                if v != 1 {
                    return Err(Error::malformed("SENDME", format!("version {v}")));
                }
                RelayMsg::Sendme {
                    tag: r.take_array()?,
                }
            }
            RelayCmd::EXTEND => {
                let identity = r.take_array()?;
                let link_key = LinkKey(r.take_array()?);
                let ip = match TargetAddr::read(&mut r)? {
                    TargetAddr::Ip(ip) => ip,
                    TargetAddr::Host(_) => {
                        return Err(Error::malformed("EXTEND", "hostname address"));
                    }
                };
                let port = r.take_u16()?;
                let htype = r.take_u16()?;
                let hlen = r.take_u16()? as usize;
                let hdata = r.take(hlen)?.to_vec();
                RelayMsg::Extend(Extend {
                    identity,
                    link_key,
                    addr: SocketAddr::new(ip, port),
                    htype,
                    hdata,
                })
            }
            RelayCmd::EXTENDED => {
                let hlen = r.take_u16()? as usize;
                RelayMsg::Extended(r.take(hlen)?.to_vec())
            }
            RelayCmd::TRUNCATE => RelayMsg::Truncate,
            RelayCmd::XOFF => RelayMsg::Xoff,
            RelayCmd::XON => RelayMsg::Xon,
            RelayCmd::BEGIN_DIR => RelayMsg::BeginDir,
            RelayCmd::ESTABLISH_INTRO => RelayMsg::EstablishIntro(EstablishIntro {
                auth_key: r.take_array()?,
                rate: r.take_u32()?,
                burst: r.take_u32()?,
                sig: r.take_array()?,
            }),
            RelayCmd::INTRO_ESTABLISHED => RelayMsg::IntroEstablished,
            RelayCmd::INTRODUCE1 | RelayCmd::INTRODUCE2 => {
                let auth_key = r.take_array()?;
                let len = r.take_u16()? as usize;
                let i = Introduce {
                    auth_key,
                    encrypted: r.take(len)?.to_vec(),
                };
                if cmd == RelayCmd::INTRODUCE1 {
                    RelayMsg::Introduce1(i)
                } else {
                    RelayMsg::Introduce2(i)
                }
            }
            RelayCmd::INTRODUCE_ACK => RelayMsg::IntroduceAck(r.take_u8()?),
            RelayCmd::ESTABLISH_RENDEZVOUS => RelayMsg::EstablishRendezvous(r.take_array()?),
            RelayCmd::RENDEZVOUS_ESTABLISHED => RelayMsg::RendezvousEstablished,
            RelayCmd::RENDEZVOUS1 => {
                let cookie = r.take_array()?;
                let len = r.take_u16()? as usize;
                RelayMsg::Rendezvous1 {
                    cookie,
                    reply: r.take(len)?.to_vec(),
                }
            }
            RelayCmd::RENDEZVOUS2 => {
                let len = r.take_u16()? as usize;
                RelayMsg::Rendezvous2(r.take(len)?.to_vec())
            }
            RelayCmd::TRUNCATED => RelayMsg::Truncated(r.take_u8()?),
            RelayCmd::DROP => {
                r.take_rest();
                RelayMsg::Drop
            }
            RelayCmd::RESOLVE => match TargetAddr::read(&mut r)? {
                TargetAddr::Host(h) => RelayMsg::Resolve(h),
                TargetAddr::Ip(_) => {
                    return Err(Error::malformed("RESOLVE", "address, not a name"));
                }
            },
            RelayCmd::RESOLVED => {
                let n = r.take_u8()? as usize;
                let mut addrs = Vec::with_capacity(n.min(16));
                for _ in 0..n {
                    let a = match TargetAddr::read(&mut r)? {
                        TargetAddr::Ip(a) => a,
                        TargetAddr::Host(_) => {
                            return Err(Error::malformed("RESOLVED", "hostname"));
                        }
                    };
                    addrs.push((a, r.take_u32()?));
                }
                RelayMsg::Resolved(addrs)
            }
            c => {
                return Err(Error::malformed(
                    "relay message",
                    format!("unknown command {c:?}"),
                ));
            }
        };
        r.should_be_exhausted()?;
        Ok((stream_id, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_msgs() -> Vec<RelayMsg> {
        vec![
            RelayMsg::Xoff,
            RelayMsg::Xon,
            RelayMsg::BeginDir,
            RelayMsg::Begin {
                addr: TargetAddr::Host("example.com".into()),
                port: 443,
            },
            RelayMsg::Begin {
                addr: TargetAddr::Ip("127.0.0.1".parse().unwrap()),
                port: 80,
            },
            RelayMsg::Begin {
                addr: TargetAddr::Ip("::1".parse().unwrap()),
                port: 8080,
            },
            RelayMsg::Data(b"hello".to_vec()),
            RelayMsg::End(EndReason::CONNECT_REFUSED),
            RelayMsg::Connected(Some("10.1.2.3".parse().unwrap())),
            RelayMsg::Connected(None),
            RelayMsg::Sendme { tag: [5; 16] },
            RelayMsg::Extend(Extend {
                identity: [1; 32],
                link_key: LinkKey([2; 32]),
                addr: "127.0.0.1:9001".parse().unwrap(),
                htype: 2,
                hdata: vec![3; 96],
            }),
            RelayMsg::Extended(vec![4; 64]),
            RelayMsg::Truncate,
            RelayMsg::Truncated(3),
            RelayMsg::Drop,
            RelayMsg::Resolve("example.org".into()),
            RelayMsg::Resolved(vec![("1.2.3.4".parse().unwrap(), 60)]),
            RelayMsg::Echo(vec![9; 40]),
            RelayMsg::EstablishIntro(EstablishIntro {
                auth_key: [6; 32],
                rate: 25,
                burst: 200,
                sig: [7; 64],
            }),
            RelayMsg::IntroEstablished,
            RelayMsg::Introduce1(Introduce {
                auth_key: [8; 32],
                encrypted: vec![9; 300],
            }),
            RelayMsg::Introduce2(Introduce {
                auth_key: [8; 32],
                encrypted: vec![],
            }),
            RelayMsg::IntroduceAck(IntroduceStatus::RATE_LIMITED.0),
            RelayMsg::EstablishRendezvous([10; COOKIE_LEN]),
            RelayMsg::RendezvousEstablished,
            RelayMsg::Rendezvous1 {
                cookie: [11; COOKIE_LEN],
                reply: vec![12; 66],
            },
            RelayMsg::Rendezvous2(vec![13; 66]),
        ]
    }

    #[test]
    fn roundtrip_all() {
        for m in all_msgs() {
            let b = m.encode(7, 456).unwrap();
            assert_eq!(b.len(), 456);
            let (sid, d) = RelayMsg::decode(&b).unwrap();
            assert_eq!(sid, 7);
            let data = RelayMsg::decode_data(&b).unwrap();
            match &m {
                RelayMsg::Data(v) => assert_eq!(data, Some((7, &v[..]))),
                _ => assert_eq!(data, None),
            }
            assert_eq!(d, m);
        }
        assert!(RelayMsg::decode_data(&[2, 0, 1, 0xff, 0xff, 0]).is_err());
    }

    #[test]
    fn rejects_bad() {
        // Length field beyond the plaintext.
        assert!(RelayMsg::decode(&[2, 0, 1, 0xff, 0xff, 0]).is_err());
        // Trailing bytes inside the declared body.
        assert!(RelayMsg::decode(&[3, 0, 1, 0, 2, 1, 9]).is_err());
        // Unknown command.
        assert!(RelayMsg::decode(&[99, 0, 1, 0, 0]).is_err());
        // Bad hostname.
        assert!(RelayMsg::decode(&[1, 0, 1, 0, 6, 0, 3, b'a', b' ', b'b', 0]).is_err());
        assert!(RelayMsg::Data(vec![0; 500]).encode(1, 456).is_err());
    }
}
