//! A consensus cache: the consensus held, its predecessors, and the diffs
//! from each (`doc/protocol.md` section 8), with the three GET requests
//! that serve them.
//!
//! Authorities serve theirs over HTTP; every relay keeps one of the
//! consensuses it fetched and verified, and serves it to clients over
//! BEGIN_DIR streams ([`serve_stream`]), so that clients fetch from their
//! guards and the authorities serve relays only.
//!
//! A cache holds only what it verified itself, but a fetcher trusts none
//! of it: what it gets is verified against its own pinned keys.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_proto::service::descriptor::MAX_LEN;
use http_body_util::BodyExt;

use allium_link::metrics::{Family, Value};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use tracing::warn;

use crate::auth::lock;
use crate::diff;
use crate::hsdir::DirView;

/// The forms a consensus is served in, as the request counters name them.
pub const FORMS: [&str; 3] = ["full", "zstd", "diff"];

/// How long one BEGIN_DIR stream or fallback connection may take, its
/// request and answer together.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// The request head must have come within this long.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    current: Option<Bytes>,
    /// `current`'s SHA-256, the name fetchers give it as a base.
    digest: [u8; 32],
    /// When `current` expires: from then on nothing is served.
    valid_until: u64,
    /// The consensuses held before `current`, newest last (at most
    /// [`diff::KEEP`]), by digest.
    recent: VecDeque<([u8; 32], Bytes)>,
    /// `current` as a diff from each of `recent` and from itself (by the
    /// base's digest), and compressed alone (`None`), once made.
    diffs: HashMap<Option<[u8; 32]>, Bytes>,
}

/// The consensus held and its diffs, behind a lock of its own (nothing
/// slow is done under it).
///
/// An authority makes the diffs most fetchers want when it publishes
/// ([`ConsensusCache::make_diffs`]); a relay makes each one the first
/// time it is asked for, at a cheaper compression level, so that a
/// network of thousands of relays does not spend its CPU on diffs nobody
/// fetches.
pub struct ConsensusCache {
    state: Mutex<State>,
    /// zstd level of the diffs made here.
    level: i32,
    /// Taken while diffs are made, so that each is made once.
    making: tokio::sync::Mutex<()>,
    /// Answers given, by form (an index of [`FORMS`]).
    served: [std::sync::atomic::AtomicU64; 3],
}

impl Default for ConsensusCache {
    fn default() -> Self {
        Self::new(diff::LEVEL)
    }
}

/// The compression level of a relay's cache.
pub const RELAY_LEVEL: i32 = 9;

impl ConsensusCache {
    /// A cache whose diffs are made at zstd `level`.
    pub fn new(level: i32) -> Self {
        ConsensusCache {
            state: Mutex::default(),
            level,
            making: tokio::sync::Mutex::new(()),
            served: Default::default(),
        }
    }

    /// Hold `bytes` (a consensus the caller verified, valid until
    /// `valid_until`) as the current one; the one it replaces becomes a
    /// base for diffs. The diffs are made by [`ConsensusCache::make_diffs`]
    /// or when first asked for.
    pub fn install(&self, bytes: Bytes, valid_until: u64) {
        let current = crate::verified::digest(&bytes);
        let mut st = lock(&self.state);
        st.valid_until = valid_until;
        let old_digest = std::mem::replace(&mut st.digest, current);
        if let Some(old) = st.current.replace(bytes.clone())
            && old != bytes
        {
            st.recent.push_back((old_digest, old));
            st.recent.retain(|(d, _)| *d != current);
            while st.recent.len() > diff::KEEP {
                st.recent.pop_front();
            }
            st.diffs.clear();
        }
    }

    /// The current consensus' bytes.
    pub fn current(&self) -> Option<Bytes> {
        lock(&self.state).current.clone()
    }

    /// The current consensus as a diff from the one whose digest is
    /// `base`, or compressed alone (`None`), if made.
    pub fn diff(&self, base: Option<[u8; 32]>) -> Option<Bytes> {
        lock(&self.state).diffs.get(&base).cloned()
    }

    /// Answers given in each of [`FORMS`].
    pub fn served(&self) -> [u64; 3] {
        self.served
            .each_ref()
            .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The metric of [`ConsensusCache::served`], by form.
    pub fn served_family(&self) -> Family {
        Family {
            name: "consensus_served",
            help: "Consensuses served, whole (full), compressed (zstd) or as a diff",
            values: FORMS
                .iter()
                .zip(self.served())
                .map(|(form, n)| (Some(("form", *form)), Value::Counter(n)))
                .collect(),
        }
    }

    /// Make what most fetchers ask for as soon as a consensus is current:
    /// the diff from the one before it (which every cache that kept up
    /// holds), then its compressed form. Diffs from older ones are made
    /// when first asked for: made for every base at once, at [`diff::LEVEL`],
    /// they took seconds of CPU each period that few fetchers used.
    /// Each is made off the async threads and outside the lock, and kept
    /// if the consensus is still current when it is done.
    pub async fn make_diffs(&self) {
        let previous = lock(&self.state).recent.back().map(|(d, _)| *d);
        if let Some(d) = previous {
            self.make(Some(d)).await;
        }
        self.make(None).await;
    }

    /// Make the diff from `base` (`None`: the compressed form) if it is
    /// not made yet and `base` is held (or is the current one itself: a
    /// fetcher that already holds it gets a few bytes that say so).
    async fn make(&self, base: Option<[u8; 32]>) {
        let _making = self.making.lock().await;
        let (current, from) = {
            let st = lock(&self.state);
            let Some(c) = st.current.clone() else {
                return;
            };
            if st.diffs.contains_key(&base) {
                return;
            }
            let from = match base {
                None => None,
                Some(d) if d == st.digest => Some(c.clone()),
                Some(d) => match st.recent.iter().find(|(r, _)| *r == d) {
                    Some((_, b)) => Some(b.clone()),
                    None => return,
                },
            };
            (c, from)
        };
        let (c, level) = (current.clone(), self.level);
        let made =
            tokio::task::spawn_blocking(move || diff::encode_at(level, from.as_deref(), &c)).await;
        let Ok(made) = made else { return };
        let mut st = lock(&self.state);
        if st.current.as_ref() != Some(&current) {
            return;
        }
        match made {
            Ok(d) => {
                st.diffs.insert(base, Bytes::from(d));
            }
            Err(e) => warn!("making a consensus diff: {e}"),
        }
    }

    /// A diff from `base` (or the compressed form), made now if it can be.
    async fn diff_made(&self, base: Option<[u8; 32]>) -> Option<Bytes> {
        if let Some(d) = self.diff(base) {
            return Some(d);
        }
        self.make(base).await;
        self.diff(base)
    }

    /// Whether it holds a consensus still valid at `now`.
    pub fn holds_valid(&self, now: u64) -> bool {
        let st = lock(&self.state);
        st.current.is_some() && now <= st.valid_until
    }

    /// The answer to `GET path`: `/consensus`, `/consensus/zstd` or
    /// `/consensus/diff/<hex SHA-256 of the base>`.
    pub async fn answer(&self, path: &str) -> Result<Bytes, (StatusCode, &'static str)> {
        // An expired consensus helps no one (a cache that lost the
        // authorities keeps it only as a base).
        if lock(&self.state).valid_until < crate::unix_now() {
            return Err((StatusCode::NOT_FOUND, "no consensus that is still valid"));
        }
        let (form, found) = match path {
            "/consensus" => (0, self.current().ok_or("no consensus yet")),
            "/consensus/zstd" => (
                1,
                self.diff_made(None)
                    .await
                    .ok_or("no compressed consensus yet"),
            ),
            p => match p.strip_prefix("/consensus/diff/") {
                Some(h) => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h, &mut d)
                        .map_err(|_| (StatusCode::BAD_REQUEST, "base: 64 hex digits"))?;
                    (
                        2,
                        self.diff_made(Some(d))
                            .await
                            .ok_or("no diff from that consensus"),
                    )
                }
                None => return Err((StatusCode::NOT_FOUND, "no such document")),
            },
        };
        let b = found.map_err(|why| (StatusCode::NOT_FOUND, why))?;
        self.served[form].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(b)
    }
}

/// Answer one HTTP/1.1 request on `io` (a BEGIN_DIR stream, or a
/// connection to a fallback directory) within [`STREAM_TIMEOUT`] (its head
/// within [`HEAD_TIMEOUT`]), then close: a GET from `cache`, or, with
/// `services` (the store, the consensus and the relay's identity), a GET or POST
/// of a service descriptor (`/service/...`). Anything else is refused.
pub async fn serve_stream<S>(cache: Arc<ConsensusCache>, services: Option<DirView>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let cache = cache.clone();
        let services = services.clone();
        async move {
            let path = req.uri().path().to_string();
            let r = match (req.method(), &services) {
                (&hyper::Method::GET, Some(v)) if path.starts_with("/service/") => {
                    v.dir.get(&path, crate::unix_now())
                }
                (&hyper::Method::POST, Some(v)) => {
                    let limited = http_body_util::Limited::new(req.into_body(), MAX_LEN);
                    match limited.collect().await {
                        Ok(b) => v
                            .dir
                            .post(&path, &b.to_bytes(), crate::unix_now(), &v.consensus, &v.me)
                            .map(|()| Bytes::from_static(b"stored")),
                        Err(_) => Err((
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "a descriptor is at most 8 KiB",
                        )),
                    }
                }
                (&hyper::Method::GET, _) => cache.answer(&path).await,
                _ => Err((StatusCode::METHOD_NOT_ALLOWED, "GET only")),
            };
            let (status, body) = match r {
                Ok(b) => (StatusCode::OK, b),
                Err((s, why)) => (s, Bytes::from_static(why.as_bytes())),
            };
            let mut resp = Response::new(Full::new(body));
            *resp.status_mut() = status;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(16 * 1024)
        .keep_alive(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    let _ = tokio::time::timeout(STREAM_TIMEOUT, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_whole_compressed_and_diffs_from_what_it_held() {
        let c = ConsensusCache::new(RELAY_LEVEL);
        assert_eq!(
            c.answer("/consensus").await.unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        // Incompressible, as keys and signatures are: only the base can
        // make a diff small.
        let mut x = 1u64;
        let old: Vec<u8> = (0..50_000)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 33) as u8
            })
            .collect();
        let mut new = old.clone();
        new[100] ^= 1;
        let old = Bytes::from(old);
        c.install(old.clone(), u64::MAX);
        c.install(Bytes::from(new.clone()), u64::MAX);
        // Made when first asked for.
        assert_eq!(c.answer("/consensus").await.unwrap(), new);
        let z = c.answer("/consensus/zstd").await.unwrap();
        assert_eq!(diff::decode(None, &z, 1 << 20).unwrap(), new);
        let path = format!("/consensus/diff/{}", hex::encode(diff::digest(&old)));
        let d = c.answer(&path).await.unwrap();
        assert!(d.len() < 100, "{} bytes", d.len());
        assert_eq!(diff::decode(Some(&old), &d, 1 << 20).unwrap(), new);
        assert_eq!(c.served(), [1, 1, 1]);

        let unknown = format!("/consensus/diff/{}", hex::encode([0u8; 32]));
        assert_eq!(
            c.answer(&unknown).await.unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            c.answer("/consensus/diff/zz").await.unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            c.answer("/vote/1").await.unwrap_err().0,
            StatusCode::NOT_FOUND
        );
        // A fetcher holding the current one learns so in a few bytes.
        let same = format!("/consensus/diff/{}", hex::encode(diff::digest(&new)));
        let d = c.answer(&same).await.unwrap();
        assert!(d.len() < 32, "{} bytes", d.len());
        assert_eq!(diff::decode(Some(&new), &d, 1 << 20).unwrap(), new);
        // Nothing is served once it has expired.
        c.install(Bytes::from(new.clone()), 1);
        assert_eq!(c.answer(&path).await.unwrap_err().0, StatusCode::NOT_FOUND);
        // Installing the same bytes again keeps the diffs.
        c.install(Bytes::from(new), u64::MAX);
        assert!(c.answer(&path).await.is_ok());
    }

    /// Made as a consensus is published: the diff from the one before and
    /// the compressed form; from older ones only when asked for.
    #[tokio::test]
    async fn the_diffs_most_fetchers_want_are_made_first() {
        let c = ConsensusCache::new(RELAY_LEVEL);
        let docs: Vec<Bytes> = (0..3u8)
            .map(|i| {
                let mut d = vec![7u8; 5000];
                d[100] = i;
                Bytes::from(d)
            })
            .collect();
        for d in &docs {
            c.install(d.clone(), u64::MAX);
        }
        c.make_diffs().await;
        let from = |i: usize| Some(diff::digest(&docs[i]));
        assert!(c.diff(from(1)).is_some() && c.diff(None).is_some());
        assert!(c.diff(from(0)).is_none() && c.diff(from(2)).is_none());
        let path = format!("/consensus/diff/{}", hex::encode(diff::digest(&docs[0])));
        let d = c.answer(&path).await.unwrap();
        assert_eq!(diff::decode(Some(&docs[0]), &d, 1 << 20).unwrap(), docs[2]);
        assert!(c.diff(from(0)).is_some());
    }
}
