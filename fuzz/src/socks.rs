//! `socks`: the SOCKS4/4a/5 server state machine.
//!
//! The input (after one byte choosing a chunk size) is what a client
//! sends. It is fed twice: a chunk at a time, and whole. Both must end
//! the same way (the same replies, the same request or refusal), and no
//! step may claim more bytes than it was given.

use allium_proto::socks::{ReplyCode, SocksServer, Step};

pub fn run(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 16) + 1;
    let a = drive(stream, chunk);
    let b = drive(stream, stream.len().max(1));
    assert_eq!(a, b, "fed in chunks of {chunk} and whole");
}

/// The replies, and how it ended.
fn drive(stream: &[u8], chunk: usize) -> (Vec<u8>, String) {
    let mut s = SocksServer::new();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    loop {
        match s.step(&buf) {
            Step::NeedMore => {
                if fed == stream.len() {
                    return (out, "need more".into());
                }
                let n = chunk.min(stream.len() - fed);
                buf.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Step::Reply { consumed, reply } => {
                assert!(consumed <= buf.len() && consumed > 0);
                buf.drain(..consumed);
                out.extend(reply);
            }
            Step::Done { consumed, request } => {
                assert!(consumed <= buf.len());
                for code in [ReplyCode::SUCCEEDED, ReplyCode::GENERAL_FAILURE] {
                    let r = request.reply(code, None);
                    assert!(r.len() == 8 || r.len() == 10);
                }
                // The bytes after the request belong to the stream.
                let after = buf.len() - consumed + (stream.len() - fed);
                return (out, format!("{request:?} then {after} bytes"));
            }
            Step::Fail { reply, .. } => {
                out.extend(reply.unwrap_or_default());
                return (out, "failed".into());
            }
        }
    }
}
