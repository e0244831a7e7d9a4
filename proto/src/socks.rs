//! A sans-IO SOCKS5 server (RFC 1928, RFC 1929), as Tor's SocksPort speaks
//! it (`doc/protocol.md` section "SOCKS").
//!
//! Feed received bytes to [`SocksServer::step`]; it says how many it
//! consumed, what to send back, and finally the request. No-auth and
//! username/password are offered on the same port; the credentials are
//! returned with the request so the caller can isolate streams by them.
//! Malformed requests get their RFC 1928 reply code before the close.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Error;
use crate::relaymsg::TargetAddr;
use crate::wire::Reader;

#[derive(Clone, PartialEq, Eq, Hash)]
pub enum SocksAuth {
    NoAuth,
    UserPass { user: Vec<u8>, pass: Vec<u8> },
}

impl std::fmt::Debug for SocksAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocksAuth::NoAuth => f.write_str("NoAuth"),
            SocksAuth::UserPass { .. } => f.write_str("UserPass(..)"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocksCmd {
    Connect,
    /// Tor's extension 0xF0: resolve a name through the exit.
    Resolve,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocksRequest {
    /// 4 (SOCKS4 and 4a) or 5: the version the reply must use.
    pub version: u8,
    pub auth: SocksAuth,
    pub cmd: SocksCmd,
    pub addr: TargetAddr,
    pub port: u16,
}

impl SocksRequest {
    /// The reply to this request, in its SOCKS version.
    pub fn reply(&self, code: ReplyCode, bound: Option<SocketAddr>) -> Vec<u8> {
        if self.version == 4 {
            socks4_reply(code == ReplyCode::SUCCEEDED)
        } else {
            reply(code, bound)
        }
    }
}

/// A SOCKS4 reply: granted (90) or rejected (91).
pub fn socks4_reply(ok: bool) -> Vec<u8> {
    vec![0, if ok { 90 } else { 91 }, 0, 0, 0, 0, 0, 0]
}

/// Longest SOCKS4 user id or 4a hostname accepted.
const MAX_SOCKS4_FIELD: usize = 255;

/// Take a NUL-terminated field of at most [`MAX_SOCKS4_FIELD`] bytes.
fn take_cstr<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Error> {
    let rest = r.take_rest();
    match rest.iter().position(|&b| b == 0) {
        Some(n) if n <= MAX_SOCKS4_FIELD => {
            let mut again = Reader::new(rest);
            let out = again.take(n)?;
            Ok(out)
        }
        Some(_) => Err(Error::malformed("SOCKS4 request", "field too long")),
        None if rest.len() > MAX_SOCKS4_FIELD => {
            Err(Error::malformed("SOCKS4 request", "field too long"))
        }
        None => Err(Error::Truncated),
    }
}

crate::open_enum! {
    /// RFC 1928 reply codes.
    ReplyCode(u8) {
        SUCCEEDED = 0,
        GENERAL_FAILURE = 1,
        NOT_ALLOWED = 2,
        NETWORK_UNREACHABLE = 3,
        HOST_UNREACHABLE = 4,
        CONNECTION_REFUSED = 5,
        TTL_EXPIRED = 6,
        COMMAND_NOT_SUPPORTED = 7,
        ADDRTYPE_NOT_SUPPORTED = 8,
        // Tor's onion service replies (its socks-extensions.txt), which
        // applications already explain to their users.
        ONION_DESCRIPTOR_NOT_FOUND = 0xf0,
        ONION_DESCRIPTOR_INVALID = 0xf1,
        ONION_INTRODUCTION_FAILED = 0xf2,
        ONION_RENDEZVOUS_FAILED = 0xf3,
        ONION_MISSING_CLIENT_AUTH = 0xf4,
        ONION_WRONG_CLIENT_AUTH = 0xf5,
        ONION_ADDRESS_INVALID = 0xf6,
        ONION_INTRODUCTION_TIMED_OUT = 0xf7,
    }
}

/// What to do after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Not enough bytes yet; nothing consumed.
    NeedMore,
    /// Send `reply` and keep going; `consumed` bytes were used.
    Reply { consumed: usize, reply: Vec<u8> },
    /// The request is complete; the caller answers it with [`reply`].
    Done {
        consumed: usize,
        request: SocksRequest,
    },
    /// Send `reply` (if any), then close.
    Fail { reply: Option<Vec<u8>>, why: String },
}

#[derive(Debug)]
enum State {
    Greeting,
    UserPass,
    Request(SocksAuth),
    Finished,
}

#[derive(Debug)]
pub struct SocksServer {
    state: State,
}

impl Default for SocksServer {
    fn default() -> Self {
        SocksServer {
            state: State::Greeting,
        }
    }
}

const METHOD_NONE: u8 = 0;
const METHOD_USERPASS: u8 = 2;
const NO_ACCEPTABLE: u8 = 0xff;

fn fail(code: ReplyCode, why: impl Into<String>) -> Step {
    Step::Fail {
        reply: Some(reply(code, None)),
        why: why.into(),
    }
}

/// A SOCKS5 reply with `code` and the bound address (0.0.0.0:0 if none).
pub fn reply(code: ReplyCode, bound: Option<SocketAddr>) -> Vec<u8> {
    let mut out = vec![5, code.0, 0];
    match bound.unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)) {
        SocketAddr::V4(a) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    out
}

impl SocksServer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn step(&mut self, input: &[u8]) -> Step {
        match self.try_step(input) {
            Ok(s) => s,
            Err(Error::Truncated) => Step::NeedMore,
            Err(e) => {
                // Refused in the version the client speaks.
                let socks4 = matches!(self.state, State::Greeting) && input.first() == Some(&4);
                self.state = State::Finished;
                Step::Fail {
                    reply: Some(if socks4 {
                        socks4_reply(false)
                    } else {
                        reply(ReplyCode::GENERAL_FAILURE, None)
                    }),
                    why: e.to_string(),
                }
            }
        }
    }

    fn try_step(&mut self, input: &[u8]) -> Result<Step, Error> {
        let mut r = Reader::new(input);
        match &self.state {
            State::Greeting if input.first() == Some(&4) => {
                // SOCKS4: VN CD DSTPORT[2] DSTIP[4] USERID NUL [HOST NUL for 4a].
                r.take_u8()?;
                let cd = r.take_u8()?;
                let port = r.take_u16()?;
                let ip = Ipv4Addr::from(r.take_array::<4>()?);
                let user = take_cstr(&mut r)?.to_vec();
                let mut consumed = 8 + user.len() + 1;
                let o = ip.octets();
                let addr = if o[0] == 0 && o[1] == 0 && o[2] == 0 && o[3] != 0 {
                    let mut r2 = Reader::new(&input[consumed..]);
                    let host = take_cstr(&mut r2)?;
                    consumed += host.len() + 1;
                    let h = std::str::from_utf8(host)
                        .map_err(|_| Error::malformed("hostname", "not UTF-8"))?;
                    TargetAddr::from_host(h)?
                } else {
                    TargetAddr::Ip(IpAddr::V4(ip))
                };
                self.state = State::Finished;
                if cd != 1 || port == 0 {
                    return Ok(Step::Fail {
                        reply: Some(socks4_reply(false)),
                        why: format!("SOCKS4 command {cd} or port 0"),
                    });
                }
                let auth = if user.is_empty() {
                    SocksAuth::NoAuth
                } else {
                    SocksAuth::UserPass { user, pass: vec![] }
                };
                Ok(Step::Done {
                    consumed,
                    request: SocksRequest {
                        version: 4,
                        auth,
                        cmd: SocksCmd::Connect,
                        addr,
                        port,
                    },
                })
            }
            State::Greeting => {
                let ver = r.take_u8()?;
                if ver != 5 {
                    self.state = State::Finished;
                    return Ok(Step::Fail {
                        reply: None,
                        why: format!("SOCKS version {ver} is not supported"),
                    });
                }
                let n = r.take_u8()? as usize;
                let methods = r.take(n)?;
                let (method, next) = if methods.contains(&METHOD_USERPASS) {
                    (METHOD_USERPASS, State::UserPass)
                } else if methods.contains(&METHOD_NONE) {
                    (METHOD_NONE, State::Request(SocksAuth::NoAuth))
                } else {
                    self.state = State::Finished;
                    return Ok(Step::Fail {
                        reply: Some(vec![5, NO_ACCEPTABLE]),
                        why: "no acceptable authentication method offered".into(),
                    });
                };
                self.state = next;
                Ok(Step::Reply {
                    consumed: r.consumed(),
                    reply: vec![5, method],
                })
            }
            State::UserPass => {
                let ver = r.take_u8()?;
                let ulen = r.take_u8()? as usize;
                let user = r.take(ulen)?.to_vec();
                let plen = r.take_u8()? as usize;
                let pass = r.take(plen)?.to_vec();
                if ver != 1 {
                    self.state = State::Finished;
                    return Ok(Step::Fail {
                        reply: Some(vec![1, 1]),
                        why: format!("auth version {ver}"),
                    });
                }
                self.state = State::Request(SocksAuth::UserPass { user, pass });
                Ok(Step::Reply {
                    consumed: r.consumed(),
                    reply: vec![1, 0],
                })
            }
            State::Request(auth) => {
                let auth = auth.clone();
                let ver = r.take_u8()?;
                let cmd = r.take_u8()?;
                let _rsv = r.take_u8()?;
                let atyp = r.take_u8()?;
                if ver != 5 {
                    self.state = State::Finished;
                    return Ok(fail(
                        ReplyCode::GENERAL_FAILURE,
                        format!("request version {ver}"),
                    ));
                }
                let cmd = match cmd {
                    1 => SocksCmd::Connect,
                    0xf0 => SocksCmd::Resolve,
                    c => {
                        self.state = State::Finished;
                        return Ok(fail(
                            ReplyCode::COMMAND_NOT_SUPPORTED,
                            format!("command {c} not supported"),
                        ));
                    }
                };
                let addr = match atyp {
                    1 => TargetAddr::Ip(IpAddr::V4(Ipv4Addr::from(r.take_array::<4>()?))),
                    4 => TargetAddr::Ip(IpAddr::V6(Ipv6Addr::from(r.take_array::<16>()?))),
                    3 => {
                        let n = r.take_u8()? as usize;
                        let h = r.take(n)?;
                        let h = std::str::from_utf8(h)
                            .map_err(|_| Error::malformed("hostname", "not UTF-8"))?;
                        TargetAddr::from_host(h)?
                    }
                    t => {
                        self.state = State::Finished;
                        return Ok(fail(
                            ReplyCode::ADDRTYPE_NOT_SUPPORTED,
                            format!("address type {t}"),
                        ));
                    }
                };
                let port = r.take_u16()?;
                if port == 0 && cmd == SocksCmd::Connect {
                    self.state = State::Finished;
                    return Ok(fail(ReplyCode::GENERAL_FAILURE, "port 0"));
                }
                self.state = State::Finished;
                Ok(Step::Done {
                    consumed: r.consumed(),
                    request: SocksRequest {
                        version: 5,
                        auth,
                        cmd,
                        addr,
                        port,
                    },
                })
            }
            State::Finished => Ok(Step::Fail {
                reply: None,
                why: "handshake already finished".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive the server over `input`, fed one byte at a time; collect replies.
    fn drive(input: &[u8]) -> (Vec<u8>, Step) {
        let mut s = SocksServer::new();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for &b in input {
            buf.push(b);
            match s.step(&buf) {
                Step::NeedMore => {}
                Step::Reply { consumed, reply } => {
                    buf.drain(..consumed);
                    out.extend(reply);
                }
                done => return (out, done),
            }
        }
        (out, Step::NeedMore)
    }

    #[test]
    fn no_auth_hostname_connect() {
        let mut req = vec![5, 1, 0, 5, 1, 0, 3, 11];
        req.extend(b"example.com");
        req.extend(443u16.to_be_bytes());
        let (out, step) = drive(&req);
        assert_eq!(out, vec![5, 0]);
        let Step::Done { request, .. } = step else {
            panic!("{step:?}")
        };
        assert_eq!(request.addr, TargetAddr::Host("example.com".into()));
        assert_eq!(
            (request.port, request.cmd, request.auth),
            (443, SocksCmd::Connect, SocksAuth::NoAuth)
        );
    }

    #[test]
    fn user_pass_preferred_and_returned() {
        let mut req = vec![
            5, 2, 0, 2, 1, 1, b'u', 2, b'p', b'w', 5, 1, 0, 1, 127, 0, 0, 1, 0, 80,
        ];
        let (out, step) = drive(&req);
        assert_eq!(out, vec![5, 2, 1, 0]);
        let Step::Done { request, .. } = step else {
            panic!()
        };
        assert_eq!(
            request.auth,
            SocksAuth::UserPass {
                user: b"u".to_vec(),
                pass: b"pw".to_vec()
            }
        );
        assert_eq!(request.addr, TargetAddr::Ip("127.0.0.1".parse().unwrap()));
        req.clear();
    }

    #[test]
    fn malformed_requests_get_rfc_codes() {
        let (_, s) = drive(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]);
        assert_eq!(
            s,
            fail(ReplyCode::COMMAND_NOT_SUPPORTED, "command 2 not supported")
        );
        let (_, s) = drive(&[5, 1, 0, 5, 1, 0, 9]);
        assert!(matches!(s, Step::Fail { reply: Some(r), .. } if r[1] == 8));
        let (_, s) = drive(&[5, 1, 0, 5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]);
        assert!(matches!(s, Step::Fail { reply: Some(r), .. } if r[1] == 1));
        let (_, s) = drive(&[5, 1, 0, 4, 1, 0, 1]);
        assert!(matches!(s, Step::Fail { reply: Some(r), .. } if r[1] == 1));
        let (out, s) = drive(&[5, 1, 9]);
        assert!(out.is_empty());
        assert_eq!(
            s,
            Step::Fail {
                reply: Some(vec![5, 0xff]),
                why: "no acceptable authentication method offered".into()
            }
        );
        let (_, s) = drive(&[6, 1]);
        assert!(matches!(s, Step::Fail { reply: None, .. }));
    }

    #[test]
    fn socks4_and_4a() {
        let (out, s) = drive(&[4, 1, 0, 80, 127, 0, 0, 1, b'u', 0]);
        assert!(out.is_empty());
        let Step::Done { request, consumed } = s else {
            panic!("{s:?}")
        };
        assert_eq!(consumed, 10);
        assert_eq!((request.version, request.port), (4, 80));
        assert_eq!(request.addr, TargetAddr::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(
            request.auth,
            SocksAuth::UserPass {
                user: b"u".to_vec(),
                pass: vec![]
            }
        );
        assert_eq!(
            request.reply(ReplyCode::SUCCEEDED, None),
            vec![0, 90, 0, 0, 0, 0, 0, 0]
        );
        let mut a = vec![4, 1, 1, 187, 0, 0, 0, 1, 0];
        a.extend(b"example.com\0");
        let (_, s) = drive(&a);
        let Step::Done { request, .. } = s else {
            panic!()
        };
        assert_eq!(request.addr, TargetAddr::Host("example.com".into()));
        assert_eq!(request.auth, SocksAuth::NoAuth);
        let (_, s) = drive(&[4, 2, 0, 80, 1, 2, 3, 4, 0]);
        assert_eq!(
            s,
            Step::Fail {
                reply: Some(socks4_reply(false)),
                why: "SOCKS4 command 2 or port 0".into()
            }
        );
        let mut long = vec![4, 1, 0, 80, 1, 2, 3, 4];
        long.extend(vec![b'x'; 300]);
        // Refused in SOCKS4, which is what the client reads.
        let four = Some(socks4_reply(false));
        assert!(matches!(drive(&long).1, Step::Fail { reply, .. } if reply == four));
        // SOCKS4a whose hostname never ends.
        let mut long = vec![4, 1, 0, 80, 0, 0, 0, 1, b'u', 0];
        long.extend(vec![b'h'; 4000]);
        assert!(matches!(drive(&long).1, Step::Fail { reply, .. } if reply == four));
    }

    #[test]
    fn reply_encoding() {
        assert_eq!(
            reply(ReplyCode::CONNECTION_REFUSED, None),
            vec![5, 5, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            reply(ReplyCode::SUCCEEDED, Some("[::1]:80".parse().unwrap())).len(),
            22
        );
    }
}
