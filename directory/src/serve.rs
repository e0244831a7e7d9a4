//! The authority's HTTP front (doc/protocol.md section 8): who may
//! connect, for how long, how much each request may send, and the request
//! handlers.
//!
//! Every connection carries one request and is closed after the answer
//! (no keep-alive), so each limit applies to one request:
//! - at most [`AuthConfig::max_connections`] open connections, and
//!   [`AuthConfig::max_connections_per_addr`] from one host (an IPv6 /64
//!   counts as one host); more are closed at once;
//!   (the configured authorities' own addresses are exempt, so filling
//!   the slots cannot keep the authorities from pushing votes);
//! - a token bucket per host (`requests_per_sec`, `request_burst`): a
//!   connection over it is answered 429 and closed;
//! - the request head must arrive within [`HttpLimits::header`], the
//!   body be read and the handler answer within [`HttpLimits::request`]
//!   (408 otherwise), and the connection ends after
//!   [`HttpLimits::lifetime`] whatever it does (sending the answer
//!   included);
//! - each route has its own body limit, checked against `Content-Length`
//!   before any byte of the body is read; pushed votes (up to 48 MiB) are
//!   read at most one per authority at a time (503 beyond: authorities
//!   also fetch each other's votes).
//!
//! Documents are served from bytes prepared once (the consensus when it is
//! published, votes and signatures when made), never rebuilt per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_proto::doc::{MAX_DESCRIPTOR_LEN, MAX_VOTE_LEN};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info};

use crate::auth::{AuthConfig, Authority};
use crate::metrics::AuthStats;
use crate::{DirError, http, unix_now};

/// Largest detached consensus signature accepted.
pub const MAX_SIGNATURE_LEN: usize = 4096;
/// Hosts the rate limiter tracks one by one; beyond, new hosts share one
/// bucket until tracked hosts have refilled and are forgotten.
const MAX_TRACKED_HOSTS: usize = 10_000;

/// How long a connection may take over each part of its request.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// From accepting the connection to the end of the request head.
    pub header: Duration,
    /// From the end of the head to the end of the body and the answer.
    pub request: Duration,
    /// The whole connection, sending the answer included.
    pub lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header: Duration::from_secs(10),
            request: Duration::from_secs(30),
            // A 6 MiB consensus to a reader at 53 KB/s.
            lifetime: Duration::from_secs(120),
        }
    }
}

/// What counts as one host for the per-address limits: an IPv4 address in
/// any of its IPv6 forms counts as itself, an IPv6 /64 as one host.
pub(crate) fn host_key(ip: IpAddr) -> IpAddr {
    match allium_proto::policy::canonical(ip) {
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
        v4 => v4,
    }
}

/// Token buckets per host. A host whose bucket is full again is
/// forgotten (a new bucket would be the same), so filling the table with
/// addresses makes no abuser's bucket start afresh.
pub(crate) struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    /// Shared by every host not tracked while the table is full.
    overflow: (f64, Instant),
    last_sweep: Option<Instant>,
}

impl RateLimiter {
    pub(crate) fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst,
            buckets: HashMap::new(),
            overflow: (burst, now),
            last_sweep: None,
        }
    }

    fn refill(per_sec: f64, burst: f64, b: &mut (f64, Instant), now: Instant) {
        b.0 = (b.0 + now.saturating_duration_since(b.1).as_secs_f64() * per_sec).min(burst);
        b.1 = now;
    }

    /// Take one token for a request from `ip`.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = host_key(ip);
        let (per_sec, burst) = (self.per_sec, self.burst);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_TRACKED_HOSTS {
            // Forget hosts that have refilled; at most once a second, so a
            // full table costs one sweep per second, not one per request.
            if self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
            {
                self.last_sweep = Some(now);
                self.buckets.retain(|_, b| {
                    Self::refill(per_sec, burst, b, now);
                    b.0 < burst
                });
            }
        }
        let b = if self.buckets.contains_key(&key) || self.buckets.len() < MAX_TRACKED_HOSTS {
            self.buckets.entry(key).or_insert((burst, now))
        } else {
            &mut self.overflow
        };
        Self::refill(per_sec, burst, b, now);
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Open connections, in all and per host.
#[derive(Default)]
pub(crate) struct Connections {
    total: usize,
    per_host: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    conns: Arc<Mutex<Connections>>,
    host: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = crate::auth::lock(&self.conns);
        c.total -= 1;
        if let Some(n) = c.per_host.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                c.per_host.remove(&self.host);
            }
        }
    }
}

fn admit(
    conns: &Arc<Mutex<Connections>>,
    cfg: &AuthConfig,
    exempt: &[IpAddr],
    ip: IpAddr,
) -> Option<Admitted> {
    let host = host_key(ip);
    let mut c = crate::auth::lock(conns);
    let here = c.per_host.get(&host).copied().unwrap_or(0);
    let full = c.total >= cfg.max_connections.max(1) || here >= cfg.max_connections_per_addr.max(1);
    if full && !exempt.contains(&host) {
        return None;
    }
    c.total += 1;
    *c.per_host.entry(host).or_default() += 1;
    Some(Admitted {
        conns: conns.clone(),
        host,
    })
}

fn router(a: Arc<Authority>, limits: HttpLimits) -> Router {
    let votes_in = Arc::new(Semaphore::new(a.config().authorities.len().max(1)));
    let vote_route = limited(&a, 1, post(post_vote), MAX_VOTE_LEN).layer(
        axum::middleware::from_fn_with_state(votes_in, one_at_a_time),
    );
    Router::new()
        .route(
            "/descriptor",
            limited(&a, 0, post(post_descriptor), MAX_DESCRIPTOR_LEN),
        )
        .route("/vote", vote_route)
        .route("/vote/{va}", get(get_vote))
        .route("/descriptors/{digests}", get(get_descriptors))
        .route(
            "/signature",
            limited(&a, 2, post(post_signature), MAX_SIGNATURE_LEN),
        )
        .route("/signature/{va}", get(get_signature))
        .route("/consensus", get(get_consensus))
        .route("/consensus/zstd", get(get_consensus))
        .route("/consensus/diff/{base}", get(get_consensus))
        .layer(DefaultBodyLimit::max(0))
        .layer(axum::middleware::from_fn_with_state(
            limits.request,
            request_timeout,
        ))
        .with_state(a)
}

/// A route whose request bodies may be at most `max` bytes. The announced
/// length is checked first, so a body over the limit is refused before it
/// is read; a chunked body is cut at the limit.
fn limited(
    a: &Arc<Authority>,
    kind: usize,
    m: MethodRouter<Arc<Authority>>,
    max: usize,
) -> MethodRouter<Arc<Authority>> {
    m.layer(DefaultBodyLimit::max(max))
        .layer(axum::middleware::from_fn_with_state(
            (max, kind, a.clone()),
            length_limit,
        ))
}

/// Take a place from `slots` for the whole request, or answer 503.
async fn one_at_a_time(State(slots): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    let Ok(_place) = slots.try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy: try again later").into_response();
    };
    next.run(req).await
}

async fn length_limit(
    State((max, kind, a)): State<(usize, usize, Arc<Authority>)>,
    req: Request,
    next: Next,
) -> Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max as u64) {
        a.stats().received(kind, StatusCode::PAYLOAD_TOO_LARGE, "");
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large").into_response();
    }
    next.run(req).await
}

async fn request_timeout(State(t): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(t, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long").into_response(),
    }
}

const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 17\r\nconnection: close\r\n\r\ntoo many requests";

/// Accept connections on `listener` and answer them, forever.
pub async fn http(
    a: Arc<Authority>,
    listener: tokio::net::TcpListener,
    limits: HttpLimits,
) -> Result<(), DirError> {
    let app = router(a.clone(), limits);
    let conns = Arc::new(Mutex::new(Connections::default()));
    let exempt: Vec<IpAddr> = a
        .config()
        .authorities
        .iter()
        .map(|e| host_key(e.addr.ip()))
        .collect();
    let gate = allium_link::listen::Gate::process();
    loop {
        let (mut sock, peer, slot) = allium_link::listen::accept(&listener, &gate).await;
        let Some(admitted) = admit(&conns, a.config(), &exempt, peer.ip()) else {
            debug!("connection refused: too many open");
            continue;
        };
        if !a.allow(peer.ip()) {
            AuthStats::inc(&a.stats().rate_limited);
            tokio::spawn(async move {
                let _admitted = admitted;
                let _slot = slot;
                // Answer, then read what the peer sent before closing, so
                // that unread bytes do not turn the close into a reset that
                // loses the answer.
                let answer = async {
                    sock.write_all(TOO_MANY).await?;
                    sock.shutdown().await?;
                    let mut sink = [0u8; 4096];
                    while sock.read(&mut sink).await? > 0 {}
                    Ok::<_, std::io::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
            });
            continue;
        }
        let app = app.clone();
        let limits = allium_link::listen::HttpLimits {
            header: limits.header,
            lifetime: limits.lifetime,
        };
        tokio::spawn(async move {
            let _admitted = admitted;
            allium_link::listen::serve_http(sock, slot, app, limits).await;
        });
    }
}

fn answer(
    a: &Authority,
    what: &str,
    r: Result<&'static str, (StatusCode, String)>,
) -> (StatusCode, String) {
    if let Some(kind) = crate::metrics::KINDS.iter().position(|k| *k == what) {
        match &r {
            Ok(s) => a.stats().received(kind, StatusCode::OK, s),
            Err((code, _)) => a.stats().received(kind, *code, ""),
        }
    }
    match r {
        Ok(s) => (StatusCode::OK, s.to_string()),
        // Someone else's document refused: theirs to fix, not the
        // operator's (a signature on another consensus is routine when
        // the authorities saw different relays).
        Err((code, why)) => {
            info!(authority = %a.config().nickname, "{what}: {why}");
            (code, why)
        }
    }
}

/// What taking an upload gives: what became of it, or the HTTP status
/// and reason of a refusal.
type Taken = Result<&'static str, (StatusCode, String)>;

/// Take an upload with `take` on a thread that may block: taking one
/// writes it to disk and waits for the disk, one file at a time, and a
/// burst of uploads must not hold the threads that answer requests.
async fn take_upload(
    a: Arc<Authority>,
    what: &str,
    body: Bytes,
    take: fn(&Authority, &[u8], u64) -> Taken,
) -> (StatusCode, String) {
    let a2 = a.clone();
    let r = tokio::task::spawn_blocking(move || take(&a2, &body, unix_now()))
        .await
        .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())));
    answer(&a, what, r)
}

async fn post_descriptor(State(a): State<Arc<Authority>>, body: Bytes) -> (StatusCode, String) {
    take_upload(a, "descriptor", body, Authority::accept_descriptor).await
}

async fn post_vote(State(a): State<Arc<Authority>>, body: Bytes) -> (StatusCode, String) {
    take_upload(a, "vote", body, Authority::accept_vote).await
}

async fn post_signature(State(a): State<Arc<Authority>>, body: Bytes) -> (StatusCode, String) {
    take_upload(a, "signature", body, Authority::accept_signature).await
}

async fn get_vote(
    State(a): State<Arc<Authority>>,
    Path(va): Path<u64>,
) -> Result<Bytes, (StatusCode, &'static str)> {
    a.own_vote(va)
        .ok_or((StatusCode::NOT_FOUND, "no vote for that period"))
}

/// The descriptors named by `digests` (hex, joined by `+`, at most
/// [`http::DESCRIPTORS_PER_FETCH`]) that this authority's votes hold.
async fn get_descriptors(
    State(a): State<Arc<Authority>>,
    Path(digests): Path<String>,
) -> Result<Vec<u8>, (StatusCode, &'static str)> {
    let bad = (
        StatusCode::BAD_REQUEST,
        "expected at most 64 descriptor digests in hex, joined by +",
    );
    let list: Vec<[u8; 32]> = digests
        .split('+')
        .map(|h| hex::decode(h).ok()?.try_into().ok())
        .collect::<Option<_>>()
        .ok_or(bad)?;
    if list.len() > http::DESCRIPTORS_PER_FETCH {
        return Err(bad);
    }
    postcard::to_stdvec(&a.named_descriptors(&list))
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "encoding"))
}

async fn get_signature(
    State(a): State<Arc<Authority>>,
    Path(va): Path<u64>,
) -> Result<Bytes, (StatusCode, &'static str)> {
    a.own_signature(va)
        .ok_or((StatusCode::NOT_FOUND, "no signature for that period"))
}

/// The consensus, whole, compressed or as a diff (doc/protocol.md,
/// "Consensus diffs"), as [`crate::cache::ConsensusCache::answer`] says.
/// Holding none that is valid, the 404 says in `Retry-After` when the next
/// is due, so that fetchers at bootstrap ask then, not every second.
async fn get_consensus(State(a): State<Arc<Authority>>, uri: axum::http::Uri) -> Response {
    match a.cache().answer(uri.path()).await {
        Ok(b) => b.into_response(),
        Err(e) if e.0 == StatusCode::NOT_FOUND && !a.cache().holds_valid(unix_now()) => {
            let after = a.next_consensus_in(unix_now()).to_string();
            (e.0, [(axum::http::header::RETRY_AFTER, after)], e.1).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::net::{TcpSocket, TcpStream};

    #[test]
    fn rate_limit_per_host_survives_a_full_table() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(1, 3, t0);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!((0..3).all(|_| r.allow(ip, t0)));
        assert!(!r.allow(ip, t0));
        // One host of an IPv6 /64 is the whole /64.
        let v6 = |i: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, i, i, i, i));
        assert!((0..3).all(|i| r.allow(v6(i), t0)));
        assert!(!r.allow(v6(99), t0));
        // Fill the table with other hosts: the abuser is not forgotten.
        for i in 0..MAX_TRACKED_HOSTS as u32 + 100 {
            r.allow(IpAddr::V4((0x0a00_0000 + i).into()), t0);
        }
        assert!(!r.allow(ip, t0), "a full table forgot the abuser");
        // Hosts that refilled are forgotten, and new hosts tracked again.
        let later = t0 + Duration::from_secs(10);
        assert!(r.allow("192.0.2.1".parse().unwrap(), later));
        assert!(r.buckets.len() < 10, "refilled hosts were swept");
        assert!(r.allow(ip, later), "the abuser's bucket refilled in time");
    }

    async fn start(cfg: AuthConfig, limits: HttpLimits) -> SocketAddr {
        let a = Arc::new(Authority::new(cfg).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(http(a, l, limits));
        addr
    }

    /// Read until the peer closes (or `within` passes): what it sent.
    async fn read_to_close(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        tokio::time::timeout(within, s.read_to_end(&mut out))
            .await
            .ok()
            .map(|_| out)
    }

    async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{src}:0").parse().unwrap()).unwrap();
        s.connect(to).await.unwrap()
    }

    #[tokio::test]
    async fn unfinished_requests_are_closed_and_others_still_served() {
        let d = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            max_connections_per_addr: 16,
            ..crate::auth::tests::authority(d.path())
        };
        let limits = HttpLimits {
            header: Duration::from_millis(600),
            request: Duration::from_millis(600),
            lifetime: Duration::from_secs(5),
        };
        let addr = start(cfg, limits).await;
        // 40 unfinished request heads from one host.
        let mut idle = Vec::new();
        for _ in 0..40 {
            let mut s = connect_from("127.0.0.1", addr).await;
            s.write_all(b"GET /consensus HTTP/1.1\r\nHo").await.unwrap();
            idle.push(s);
        }
        // Meanwhile another host is served.
        let mut s = connect_from("127.0.0.2", addr).await;
        s.write_all(b"GET /consensus HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s, Duration::from_secs(2)).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 404"), "{got:?}");
        // Places beyond 16 were refused at once; the rest are closed
        // when the head timeout passes.
        let started = Instant::now();
        for s in &mut idle {
            read_to_close(s, Duration::from_secs(3))
                .await
                .expect("an unfinished request was left open");
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        // A body that never comes: 408 within the request limit.
        let mut s = connect_from("127.0.0.3", addr).await;
        s.write_all(b"POST /vote HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\n0123")
            .await
            .unwrap();
        let got = read_to_close(&mut s, Duration::from_secs(3)).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 408"), "{got:?}");
    }

    #[tokio::test]
    async fn each_route_limits_its_body_before_reading_it() {
        let d = tempfile::tempdir().unwrap();
        let addr = start(
            crate::auth::tests::authority(d.path()),
            HttpLimits::default(),
        )
        .await;
        for (path, len) in [
            ("/descriptor", MAX_DESCRIPTOR_LEN + 1),
            ("/signature", MAX_SIGNATURE_LEN + 1),
            ("/vote", MAX_VOTE_LEN + 1),
        ] {
            let mut s = connect_from("127.0.0.1", addr).await;
            // The head announces the body; none of it is sent.
            let head = format!("POST {path} HTTP/1.1\r\nhost: a\r\ncontent-length: {len}\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            let got = read_to_close(&mut s, Duration::from_secs(2))
                .await
                .expect("answered without waiting for the body");
            assert!(got.starts_with(b"HTTP/1.1 413"), "{path}: {got:?}");
        }
    }

    #[tokio::test]
    async fn pushed_votes_are_read_one_per_authority_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let limits = HttpLimits {
            request: Duration::from_secs(2),
            ..HttpLimits::default()
        };
        let addr = start(crate::auth::tests::authority(d.path()), limits).await;
        // One authority configured: a second vote arriving while one is
        // being read is turned away at once.
        let head = b"POST /vote HTTP/1.1\r\nhost: a\r\ncontent-length: 1000\r\n\r\n";
        let mut slow = connect_from("127.0.0.1", addr).await;
        slow.write_all(head).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = connect_from("127.0.0.2", addr).await;
        next.write_all(head).await.unwrap();
        let got = read_to_close(&mut next, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(got.starts_with(b"HTTP/1.1 503"), "{got:?}");
        // The first one times out and frees its place.
        let got = read_to_close(&mut slow, Duration::from_secs(3))
            .await
            .unwrap();
        assert!(got.starts_with(b"HTTP/1.1 408"), "{got:?}");
        let mut after = connect_from("127.0.0.2", addr).await;
        after
            .write_all(b"POST /vote HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
            .await
            .unwrap();
        let got = read_to_close(&mut after, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(got.starts_with(b"HTTP/1.1 400"), "{got:?}");
    }

    #[tokio::test]
    async fn a_host_over_its_rate_is_told_so() {
        let d = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            requests_per_sec: 1,
            request_burst: 2,
            ..crate::auth::tests::authority(d.path())
        };
        let addr = start(cfg, HttpLimits::default()).await;
        let mut codes = Vec::new();
        for _ in 0..3 {
            let mut s = connect_from("127.0.0.1", addr).await;
            s.write_all(b"GET /consensus HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .unwrap();
            let got = read_to_close(&mut s, Duration::from_secs(2)).await.unwrap();
            codes.push(String::from_utf8_lossy(&got[..12]).into_owned());
        }
        assert_eq!(codes, ["HTTP/1.1 404", "HTTP/1.1 404", "HTTP/1.1 429"]);
    }
}
