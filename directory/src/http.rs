//! A minimal HTTP/1.1 client for directory requests, with timeouts and
//! response size limits.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;

use std::sync::Arc;

use allium_proto::{AuthorityKey, Consensus, UnverifiedConsensus};
use rand::seq::SliceRandom;
use tracing::debug;

use crate::{AuthorityEntry, DirError, diff, unix_now, verified};

/// A small request and its answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A consensus (up to 6 MiB) or a vote (up to 48 MiB), either way.
const LARGE_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, DirError> {
    let timeout = if body.len() > 64 * 1024 || limit > 64 * 1024 {
        LARGE_TIMEOUT
    } else {
        TIMEOUT
    };
    let fail = |why: String| DirError::Http {
        addr: addr.to_string(),
        why,
    };
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        exchange(stream, &addr.to_string(), method, path, body, limit).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// One HTTP/1.1 request on `io` (a TCP connection or a BEGIN_DIR stream)
/// to `host`, and the body of its answer if that is 200 and at most
/// `limit` bytes. The caller bounds the time.
pub async fn exchange<S>(
    io: S,
    host: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
    limit: usize,
) -> Result<Vec<u8>, DirError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let fail = |why: String| DirError::Http {
        addr: host.to_string(),
        why,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let conn = tokio::spawn(conn);
    // The same bytes from every client and relay: nothing in a
    // request tells one fetcher from another.
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if !body.is_empty() {
        req = req.header("content-type", "application/octet-stream");
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| fail(format!("reading body: {e}")))?
        .to_bytes()
        .to_vec();
    conn.abort();
    if status != 200 {
        let body = String::from_utf8_lossy(&body[..body.len().min(512)]).into();
        return Err(match retry {
            Some(secs) if status == 404 => DirError::NotYet {
                why: format!("{host}: {body}"),
                secs,
            },
            _ => DirError::Status { status, body },
        });
    }
    Ok(body)
}

/// Fetch the raw consensus document from an authority.
pub async fn fetch_consensus(addr: SocketAddr) -> Result<Vec<u8>, DirError> {
    request(
        addr,
        "GET",
        "/consensus",
        vec![],
        allium_proto::doc::MAX_CONSENSUS_LEN,
    )
    .await
}

/// The current consensus of one directory (an authority or a cache),
/// whose answer to a GET of a path `get` gives: as a diff from `base` (the
/// bytes of one the fetcher holds) if there is one, else compressed, and
/// whole if that fails. Not yet verified.
pub async fn fetch_consensus_with<F, Fut>(
    source: &str,
    mut get: F,
    base: Option<&[u8]>,
) -> Result<Vec<u8>, DirError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, DirError>>,
{
    let max = allium_proto::doc::MAX_CONSENSUS_LEN;
    let path = match base {
        Some(b) => format!(
            "/consensus/diff/{}",
            hex::encode(crate::verified::digest(b))
        ),
        None => "/consensus/zstd".into(),
    };
    let full = get(path).await.and_then(|d| {
        let full = diff::decode(base, &d, max).map_err(|why| DirError::Http {
            addr: source.to_string(),
            why,
        })?;
        debug!(
            source,
            diff = d.len(),
            consensus = full.len(),
            "consensus fetched {}",
            if base.is_some() {
                "as a diff"
            } else {
                "compressed"
            }
        );
        Ok(full)
    });
    match full {
        Ok(full) => return Ok(full),
        // It has none at all: no need to ask for the whole.
        Err(e @ DirError::NotYet { .. }) => return Err(e),
        Err(e) => debug!(source, "no consensus diff or compressed consensus: {e}"),
    }
    get("/consensus".into()).await
}

/// Fetch from the authorities (in random order) until one serves a
/// consensus that verifies against `keys`; returns it with its bytes. With
/// `base` (the bytes of a consensus held), each is asked for a diff from it
/// first, and for the whole consensus if it has none. The error says what
/// went wrong with each.
pub async fn fetch_verified_consensus(
    auths: &[AuthorityEntry],
    keys: &[AuthorityKey],
    base: Option<&[u8]>,
) -> Result<(Arc<Consensus>, Bytes), DirError> {
    let sources: Vec<(String, SocketAddr)> =
        auths.iter().map(|a| (a.name.clone(), a.addr)).collect();
    fetch_verified_from(&sources, keys, base).await
}

/// [`fetch_verified_consensus`] from any HTTP directories (authorities or
/// fallback directories), by name and address.
pub async fn fetch_verified_from(
    sources: &[(String, SocketAddr)],
    keys: &[AuthorityKey],
    base: Option<&[u8]>,
) -> Result<(Arc<Consensus>, Bytes), DirError> {
    let mut order: Vec<&(String, SocketAddr)> = sources.iter().collect();
    order.shuffle(&mut rand::rng());
    let mut why = Vec::new();
    // Signers of what was served when none of them is pinned, and how
    // many authorities answered at all and how many served such.
    let mut unpinned: Vec<String> = Vec::new();
    let (mut answered, mut by_unpinned) = (0, 0);
    // The soonest time a directory without a consensus said to come back.
    let mut soonest: Option<u64> = None;
    for (name, addr) in order {
        let r = async {
            let max = allium_proto::doc::MAX_CONSENSUS_LEN;
            let get = |path: String| async move { request(*addr, "GET", &path, vec![], max).await };
            let bytes = fetch_consensus_with(name, get, base).await?;
            let now = unix_now();
            verified::consensus(bytes, keys, now, |bytes| {
                let u = UnverifiedConsensus::parse(bytes)?;
                answered += 1;
                // Who claims to have signed (their certificates'
                // identities, no signature checked: `verify` checks what
                // counts).
                let signers: Vec<[u8; 32]> = u
                    .doc
                    .signatures
                    .iter()
                    .filter_map(|s| s.identity())
                    .collect();
                if !signers.is_empty() && signers.iter().all(|id| !keys.iter().any(|k| k.0 == *id))
                {
                    by_unpinned += 1;
                    for id in &signers {
                        let id = allium_proto::short_id(id);
                        if !unpinned.contains(&id) {
                            unpinned.push(id);
                        }
                    }
                }
                Ok::<_, DirError>(u.verify_window(keys, now)?)
            })
        }
        .await;
        match r {
            Ok(got) => return Ok(got),
            Err(e) => {
                debug!(directory = %name, "consensus refused: {e}");
                if let DirError::NotYet { secs, .. } = e {
                    soonest = Some(soonest.map_or(secs, |s| s.min(secs)));
                }
                why.push(format!("{name}: {e}"));
            }
        }
    }
    // Every authority that answered served one signed only by others.
    if answered > 0 && by_unpinned == answered {
        return Err(DirError::UnpinnedSigners {
            signers: unpinned.join(", "),
        });
    }
    let why = why.join("; ");
    Err(match soonest {
        Some(secs) => DirError::NotYet { why, secs },
        None => DirError::NoConsensus(why),
    })
}

/// The longest a directory's `Retry-After` may hold a fetcher off.
pub const NOT_YET_MAX: u64 = 120;

/// How long until a fetcher asks for the consensus again after fetch error
/// `e` (the `failures`-th in a row), `have` telling whether it holds a
/// valid one; `r` is a random number. Holding none, when the directories
/// said when their next consensus is due ([`DirError::NotYet`], the
/// soonest of them, at most [`NOT_YET_MAX`]), it asks then, at a random
/// moment in the following 1 s plus a tenth of the wait (so that a
/// network's fetchers do not all come in the same millisecond); otherwise
/// as [`retry_after`] says.
pub fn retry_wait(e: &DirError, failures: u32, have: bool, r: u64) -> Duration {
    match e {
        DirError::NotYet { secs, .. } if !have => {
            let ms = secs.min(&NOT_YET_MAX) * 1000;
            Duration::from_millis(ms + 100 + r % (900 + ms / 10))
        }
        _ => Duration::from_secs(retry_after(failures, have, r)),
    }
}

/// Seconds until the consensus is asked for again after `failures` failed
/// fetches in a row (from every authority), `have` telling whether a valid
/// one is held; `r` is a random number. Without one a fetcher asks every
/// second for a minute (the authorities may be about to publish their
/// first); after that, or while it holds one, it backs off from 5 s,
/// doubling up to 5 minutes, each wait drawn from its upper half, so that
/// an outage of the directory never has a network's fetchers asking in
/// step or in a tight loop.
pub fn retry_after(failures: u32, have: bool, r: u64) -> u64 {
    const BOOTSTRAP: u32 = 60;
    if !have && failures <= BOOTSTRAP {
        return 1;
    }
    let n = if have { failures } else { failures - BOOTSTRAP };
    let cap = (5u64 << n.saturating_sub(1).min(6)).min(300);
    cap - r % (cap / 2 + 1)
}

/// Relays, the clients' caches, fetch the next consensus within the first
/// 1/`CACHE_SPREAD` of the period after theirs stops being fresh (clients,
/// who fetch from them, later).
pub const CACHE_SPREAD: u64 = 8;

/// The milliseconds after consensus `c` stops being fresh within which
/// the caches fetch the next: the first 1/[`CACHE_SPREAD`] of the period,
/// at most 450 s.
pub fn cache_spread_ms(c: &allium_proto::Consensus) -> u64 {
    (c.interval().saturating_mul(1000) / CACHE_SPREAD).min(450_000)
}

/// How long from `now_ms` (milliseconds since the UNIX epoch) until a
/// moment `r` picks in the `spread_ms` after consensus `c` stops being
/// fresh, at most an hour and `spread_ms` away: fetchers that hold the same
/// consensus ask for the next one spread to the millisecond, not in the
/// same second, even when a period lasts only seconds.
pub fn after_fresh(c: &allium_proto::Consensus, now_ms: u64, spread_ms: u64, r: u64) -> Duration {
    let until = c.fresh_until.saturating_mul(1000).saturating_sub(now_ms);
    Duration::from_millis(until.min(3_600_000) + r % spread_ms.max(1))
}

/// Say loudly (at most every ten minutes per process) that the configured
/// authority keys are wrong, when `e` says so; true if it does.
pub fn warn_if_wrong_keys(e: &DirError) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    if !matches!(e, DirError::UnpinnedSigners { .. }) {
        return false;
    }
    let now = unix_now();
    let last = LAST.load(Ordering::Relaxed);
    if last == 0 || now >= last + 600 {
        LAST.store(now.max(1), Ordering::Relaxed);
        tracing::warn!("{e}");
    }
    true
}

/// Upload a signed descriptor.
pub async fn post_descriptor(addr: SocketAddr, desc: Vec<u8>) -> Result<(), DirError> {
    request(addr, "POST", "/descriptor", desc, 4096)
        .await
        .map(|_| ())
}

/// Fetch an authority's vote for the period starting at `valid_after`.
pub async fn fetch_vote(addr: SocketAddr, valid_after: u64) -> Result<Vec<u8>, DirError> {
    request(
        addr,
        "GET",
        &format!("/vote/{valid_after}"),
        vec![],
        allium_proto::doc::MAX_VOTE_LEN,
    )
    .await
}

/// Descriptors asked of an authority in one request, at most.
pub const DESCRIPTORS_PER_FETCH: usize = 64;

/// Fetch from an authority the descriptors its votes named by these
/// digests (at most [`DESCRIPTORS_PER_FETCH`]): those it holds, as
/// received, unchecked.
pub async fn fetch_descriptors(
    addr: SocketAddr,
    digests: &[[u8; 32]],
) -> Result<Vec<Vec<u8>>, DirError> {
    let path: Vec<String> = digests.iter().map(hex::encode).collect();
    let max = DESCRIPTORS_PER_FETCH * (allium_proto::doc::MAX_DESCRIPTOR_LEN + 2) + 2;
    let b = request(
        addr,
        "GET",
        &format!("/descriptors/{}", path.join("+")),
        vec![],
        max,
    )
    .await?;
    allium_proto::doc::decode_exact::<Vec<Vec<u8>>>("descriptor list", &b)
        .ok()
        .filter(|l| l.len() <= digests.len())
        .ok_or_else(|| DirError::Http {
            addr: addr.to_string(),
            why: "malformed descriptor list".into(),
        })
}

/// Push our vote to another authority.
pub async fn post_vote(addr: SocketAddr, vote: Vec<u8>) -> Result<(), DirError> {
    request(addr, "POST", "/vote", vote, 4096).await.map(|_| ())
}

/// Fetch an authority's detached consensus signature for a period.
pub async fn fetch_signature(addr: SocketAddr, valid_after: u64) -> Result<Vec<u8>, DirError> {
    request(
        addr,
        "GET",
        &format!("/signature/{valid_after}"),
        vec![],
        4096,
    )
    .await
}

/// Push our detached consensus signature to another authority.
pub async fn post_signature(addr: SocketAddr, sig: Vec<u8>) -> Result<(), DirError> {
    request(addr, "POST", "/signature", sig, 4096)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What one consensus fetch sends, byte for byte.
    async fn request_bytes() -> Vec<u8> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            (addr, got)
        });
        let _ = fetch_consensus(addr).await;
        let (addr, got) = server.await.unwrap();
        // Only the authority's own address varies, and it is the same for
        // every fetcher.
        String::from_utf8(got)
            .unwrap()
            .replace(&addr.to_string(), "AUTHORITY")
            .into_bytes()
    }

    #[tokio::test]
    async fn a_consensus_fetch_carries_nothing_of_its_fetcher() {
        let a = request_bytes().await;
        assert_eq!(
            String::from_utf8_lossy(&a),
            "GET /consensus HTTP/1.1\r\nhost: AUTHORITY\r\n\r\n"
        );
        assert_eq!(request_bytes().await, a);
    }

    #[test]
    fn failed_fetches_back_off() {
        let waits = |have: bool, from: u32, r: u64| -> Vec<u64> {
            (from..from + 9).map(|f| retry_after(f, have, r)).collect()
        };
        assert_eq!(waits(false, 1, 0)[..], [1; 9]);
        assert_eq!(waits(false, 61, 0), [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(waits(true, 1, 0), [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        // Each wait is drawn from the upper half of its cap.
        for r in 0..1000 {
            let w = retry_after(7, true, r);
            assert!((150..=300).contains(&w), "{w}");
            assert!((3..=5).contains(&retry_after(1, true, r)));
        }
    }

    /// At bootstrap a fetcher comes back when the directories said the
    /// consensus is due, spread over a second and a tenth of the wait, and
    /// no directory holds it off longer than NOT_YET_MAX.
    #[test]
    fn fetchers_without_a_consensus_come_back_when_it_is_due() {
        let not_yet = |secs| DirError::NotYet {
            why: "a: no consensus yet".into(),
            secs,
        };
        let ms = |w: Duration| u64::try_from(w.as_millis()).unwrap();
        let waits: Vec<u64> = (0..2000)
            .map(|r| ms(retry_wait(&not_yet(10), 5, false, r * 7)))
            .collect();
        assert!(
            waits.iter().all(|w| (10_100..12_000).contains(w)),
            "{waits:?}"
        );
        assert!(waits.iter().any(|w| *w < 10_300) && waits.iter().any(|w| *w > 11_700));
        let longest = ms(retry_wait(&not_yet(u64::MAX), 5, false, u64::MAX));
        assert!(longest < (NOT_YET_MAX + 14) * 1000, "{longest}");
        // Holding a consensus, or with no time given: the usual back-off.
        let usual = Duration::from_secs(retry_after(5, true, 3));
        assert_eq!(retry_wait(&not_yet(10), 5, true, 3), usual);
        let refused = DirError::NoConsensus("a: refused".into());
        assert_eq!(retry_wait(&refused, 5, false, 3), Duration::from_secs(1));
    }
}
