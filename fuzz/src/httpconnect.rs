//! `httpconnect`: the HTTP CONNECT request parser.
//!
//! A request parsed from a buffer is parsed the same from exactly the
//! bytes it took, and the bytes before its end are an incomplete request.

use allium_proto::httpconnect::{MAX_HEAD, parse};

pub fn run(data: &[u8]) {
    match parse(data) {
        Ok(Some((n, req))) => {
            assert!(n <= data.len() && data[..n].ends_with(b"\r\n\r\n"));
            assert_eq!(parse(&data[..n]), Ok(Some((n, req.clone()))));
            let short = parse(&data[..n - 1]);
            assert!(matches!(short, Ok(None)) || n - 1 > MAX_HEAD, "{short:?}");
            assert!(req.port != 0);
        }
        Ok(None) => assert!(data.len() <= MAX_HEAD),
        Err(refused) => {
            assert!(refused.response.starts_with(b"HTTP/1.1 "));
            assert!(refused.response.ends_with(b"\r\n\r\n"));
        }
    }
}
