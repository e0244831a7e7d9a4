//! A sans-IO HTTP CONNECT proxy request parser (RFC 9110 section 9.3.6),
//! for applications that speak no SOCKS (`doc/protocol.md` section 9).
//!
//! `CONNECT host:port HTTP/1.1`, headers, blank line. The value of a
//! `Proxy-Authorization` header, if any, isolates streams like SOCKS
//! credentials. The target is resolved at the exit like any hostname.

use crate::relaymsg::TargetAddr;
use crate::socks::{ReplyCode, SocksAuth};

/// The longest request head accepted.
pub const MAX_HEAD: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub addr: TargetAddr,
    pub port: u16,
    pub auth: SocksAuth,
}

/// A request refused: the response to send, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub response: Vec<u8>,
    pub why: String,
}

fn refuse(status: &str, why: impl Into<String>) -> Refused {
    Refused {
        response: format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
        why: why.into(),
    }
}

/// The response to a CONNECT, from the outcome in SOCKS terms.
pub fn response(code: ReplyCode) -> Vec<u8> {
    let status = match code {
        ReplyCode::SUCCEEDED => return b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
        ReplyCode::NOT_ALLOWED => "403 Forbidden",
        ReplyCode::TTL_EXPIRED => "504 Gateway Timeout",
        _ => "502 Bad Gateway",
    };
    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").into_bytes()
}

/// Parse a request head from the start of `buf`: `Ok(None)` if it is not
/// complete yet, else the bytes it took and the request.
pub fn parse(buf: &[u8]) -> Result<Option<(usize, ConnectRequest)>, Refused> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(refuse(
                "431 Request Header Fields Too Large",
                "request head too long",
            ));
        }
        return Ok(None);
    };
    if end > MAX_HEAD {
        return Err(refuse(
            "431 Request Header Fields Too Large",
            "request head too long",
        ));
    }
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| refuse("400 Bad Request", "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("400 Bad Request", "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(refuse(
            "505 HTTP Version Not Supported",
            format!("version {version}"),
        ));
    }
    if method != "CONNECT" {
        return Err(refuse(
            "405 Method Not Allowed",
            format!("method {method}: only CONNECT is served"),
        ));
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| refuse("400 Bad Request", "target needs host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| refuse("400 Bad Request", "bad port"))?;
    let addr = TargetAddr::from_host(host).map_err(|e| refuse("400 Bad Request", e.to_string()))?;
    let mut auth = SocksAuth::NoAuth;
    for h in lines {
        if let Some((name, value)) = h.split_once(':')
            && name.trim().eq_ignore_ascii_case("proxy-authorization")
        {
            auth = SocksAuth::UserPass {
                user: value.trim().as_bytes().to_vec(),
                pass: vec![],
            };
        }
    }
    Ok(Some((end + 4, ConnectRequest { addr, port, auth })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_connect() {
        let req = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic YTpi\r\n\r\nXYZ";
        assert_eq!(parse(&req[..20]).unwrap(), None);
        let (n, r) = parse(req).unwrap().unwrap();
        assert_eq!(&req[n..], b"XYZ");
        assert_eq!(
            (r.addr, r.port),
            (TargetAddr::Host("example.com".into()), 443)
        );
        assert_eq!(
            r.auth,
            SocksAuth::UserPass {
                user: b"Basic YTpi".to_vec(),
                pass: vec![]
            }
        );
        let (_, r) = parse(b"CONNECT [::1]:8080 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.addr, TargetAddr::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn refuses_bad_requests() {
        let status = |b: &[u8]| String::from_utf8(parse(b).unwrap_err().response).unwrap();
        assert!(status(b"GET http://x/ HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(status(b"CONNECT x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(status(b"CONNECT x:0 HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(status(b"CONNECT a b:1 HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(status(b"CONNECT x:1 HTTP/2\r\n\r\n").starts_with("HTTP/1.1 505"));
        assert!(status(&vec![b'a'; MAX_HEAD + 1]).starts_with("HTTP/1.1 431"));
        assert!(response(ReplyCode::NOT_ALLOWED).starts_with(b"HTTP/1.1 403"));
        assert!(response(ReplyCode::SUCCEEDED).starts_with(b"HTTP/1.1 200"));
    }
}
