//! Exit streams: resolve at the exit, check the exit policy, connect, and
//! shuttle bytes between the TCP connection and the circuit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use allium_proto::onion::BACKWARD_CAPACITY;
use allium_proto::relaymsg::{EndReason, HEADER_LEN, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::debug;

use crate::RelayStats;
use crate::relay::RelayCtx;

pub const STREAM_QUEUE: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most payload one backward DATA message carries.
pub const DATA_MAX: usize = BACKWARD_CAPACITY - HEADER_LEN;

/// From the circuit to a stream task.
pub enum StreamCmd {
    Data(Vec<u8>),
}

/// From a stream task to its circuit.
pub enum StreamEvent {
    Connected(u16, IpAddr),
    Data(u16, Vec<u8>),
    End(u16, EndReason),
    Resolved(u16, Vec<IpAddr>),
}

/// Resolve a hostname at the exit. `localhost` is loopback (RFC 6761).
pub async fn resolve(ctx: &RelayCtx, host: &str) -> Result<Vec<IpAddr>, EndReason> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]);
    }
    let r = ctx.resolver.as_ref().ok_or(EndReason::RESOLVE_FAILED)?;
    match tokio::time::timeout(RESOLVE_TIMEOUT, r.lookup_ip(host)).await {
        Ok(Ok(l)) => {
            let v: Vec<IpAddr> = l.iter().collect();
            if v.is_empty() {
                Err(EndReason::RESOLVE_FAILED)
            } else {
                Ok(v)
            }
        }
        Ok(Err(_)) => Err(EndReason::RESOLVE_FAILED),
        Err(_) => Err(EndReason::TIMEOUT),
    }
}

fn end_reason(e: &std::io::Error) -> EndReason {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => EndReason::CONNECT_REFUSED,
        TimedOut => EndReason::TIMEOUT,
        HostUnreachable | NetworkUnreachable | AddrNotAvailable => EndReason::NO_ROUTE,
        ConnectionReset => EndReason::CONN_RESET,
        _ => EndReason::MISC,
    }
}

async fn connect(
    ctx: &RelayCtx,
    addr: &TargetAddr,
    port: u16,
) -> Result<(TcpStream, IpAddr), EndReason> {
    let candidates = match addr {
        TargetAddr::Ip(ip) => vec![*ip],
        TargetAddr::Host(h) => resolve(ctx, h).await?,
    };
    let allowed: Vec<IpAddr> = candidates
        .into_iter()
        .filter(|ip| ctx.policy.allows(*ip, port))
        .collect();
    if allowed.is_empty() {
        return Err(EndReason::EXIT_POLICY);
    }
    let mut last = EndReason::MISC;
    for ip in allowed.into_iter().take(3) {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(SocketAddr::new(ip, port)),
        )
        .await
        {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, ip));
            }
            Ok(Err(e)) => last = end_reason(&e),
            Err(_) => last = EndReason::TIMEOUT,
        }
    }
    Err(last)
}

/// One exit stream, from BEGIN to END.
pub async fn run_stream(
    ctx: Arc<RelayCtx>,
    sid: u16,
    addr: TargetAddr,
    port: u16,
    ev: mpsc::Sender<StreamEvent>,
    mut cmds: mpsc::Receiver<StreamCmd>,
) {
    let (tcp, ip) = match connect(&ctx, &addr, port).await {
        Ok(x) => x,
        Err(reason) => {
            debug!(?reason, "exit connect failed");
            let _ = ev.send(StreamEvent::End(sid, reason)).await;
            return;
        }
    };
    if ev.send(StreamEvent::Connected(sid, ip)).await.is_err() {
        return;
    }
    let (mut r, mut w) = tcp.into_split();
    let mut buf = vec![0u8; DATA_MAX];
    loop {
        tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) => {
                    let _ = ev.send(StreamEvent::End(sid, EndReason::DONE)).await;
                    return;
                }
                Ok(n) => {
                    if ev.send(StreamEvent::Data(sid, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = ev.send(StreamEvent::End(sid, end_reason(&e))).await;
                    return;
                }
            },
            c = cmds.recv() => match c {
                Some(StreamCmd::Data(d)) => {
                    RelayStats::inc(&ctx.stats.exit_bytes, d.len() as u64);
                    if let Err(e) = w.write_all(&d).await {
                        let _ = ev.send(StreamEvent::End(sid, end_reason(&e))).await;
                        return;
                    }
                }
                None => return,
            },
        }
    }
}
