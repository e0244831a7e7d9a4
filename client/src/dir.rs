//! Getting a consensus the client can trust: from a fallback directory or
//! an authority at bootstrap, and afterwards from the directory caches of
//! its guards, over BEGIN_DIR streams on one-hop circuits (`doc/protocol.md`
//! section 8), so that no observer of the network sees the client talk to
//! a directory and the authorities serve relays only. Whatever a cache or
//! fallback serves is verified against the pinned authority keys like a
//! consensus from an authority.

use std::sync::Arc;
use std::time::Duration;

use allium_directory::{AuthorityEntry, http, unix_now, verified};
use allium_proto::{AuthorityKey, Consensus, UnverifiedConsensus};
use bytes::Bytes;
use tracing::debug;

use crate::ClientError;
use crate::circuit::CircuitHandle;

/// How long a fetch from one cache may take, all its requests together.
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(30);
/// Guards asked, in order, before the client turns to the authorities.
pub const CACHES_TRIED: usize = 3;
/// A cache that served something that does not verify is not asked again
/// for this long.
pub const BAD_CACHE_SECS: u64 = 3600;

/// Why a cache gave no consensus.
#[derive(Debug)]
pub enum CacheFailure {
    /// It could not be reached, had nothing to give, or only a consensus
    /// that is expired or older than the client's.
    Unavailable(ClientError),
    /// It served something that is no valid consensus: avoid it.
    Misbehaved(String),
}

/// The consensus from the directory cache at the end of `circ` (a one-hop
/// circuit to the guard `source`), as a diff from `base` if it can, verified
/// against `keys` and no older than `held`.
pub async fn fetch_from_cache(
    circ: &CircuitHandle,
    source: &str,
    keys: &[AuthorityKey],
    held: &Consensus,
    base: Option<&[u8]>,
) -> Result<(Arc<Consensus>, Bytes), CacheFailure> {
    let max = allium_proto::doc::MAX_CONSENSUS_LEN;
    let get = |path: String| async move {
        circ.dir_talk(|io| http::exchange(io, source, "GET", &path, Vec::new(), max))
            .await
            .map_err(|e| allium_directory::DirError::Http {
                addr: source.to_string(),
                why: format!("BEGIN_DIR: {e}"),
            })?
    };
    let bytes = tokio::time::timeout(CACHE_TIMEOUT, http::fetch_consensus_with(source, get, base))
        .await
        .map_err(|_| CacheFailure::Unavailable(ClientError::Timeout("directory cache")))?
        .map_err(|e| CacheFailure::Unavailable(e.into()))?;
    let now = unix_now();
    let (c, bytes) = verified::consensus(bytes, keys, now, |b| {
        UnverifiedConsensus::parse(b).and_then(|u| u.verify_window(keys, now))
    })
    .map_err(|e| match e {
        // Signed as it should be, but out of date: a cache that has
        // lost the authorities, not one that forges.
        allium_proto::Error::Expired(_) => CacheFailure::Unavailable(e.into()),
        e => CacheFailure::Misbehaved(e.to_string()),
    })?;
    // Valid but behind (a cache that has not fetched the latest yet):
    // not held against it, but the next cache is asked.
    if c.valid_after < held.valid_after {
        return Err(CacheFailure::Unavailable(ClientError::NoConsensus(
            format!(
                "the cache is behind (valid-after {} < {})",
                c.valid_after, held.valid_after
            ),
        )));
    }
    Ok((c, bytes))
}

/// Fetch a consensus that verifies against `keys` (see
/// [`http::fetch_verified_consensus`]); the error says what each authority
/// answered, and the caller decides how loudly to log it.
pub async fn fetch_consensus(
    auths: &[AuthorityEntry],
    keys: &[AuthorityKey],
    base: Option<&[u8]>,
) -> Result<(Arc<Consensus>, Bytes), ClientError> {
    http::fetch_verified_consensus(auths, keys, base)
        .await
        .map_err(|e| match e {
            allium_directory::DirError::NoConsensus(why) => {
                debug!("consensus refused: {why}");
                ClientError::NoConsensus(why)
            }
            e @ allium_directory::DirError::UnpinnedSigners { .. } => {
                http::warn_if_wrong_keys(&e);
                ClientError::NoConsensus(e.to_string())
            }
            e => e.into(),
        })
}

/// A consensus from the fallback directories (in random order), if one of
/// them serves one that verifies; why not is logged at DEBUG.
pub async fn fetch_from_fallbacks(
    fallbacks: &[std::net::SocketAddr],
    keys: &[AuthorityKey],
    base: Option<&[u8]>,
) -> Option<(Arc<Consensus>, Bytes)> {
    if fallbacks.is_empty() {
        return None;
    }
    let sources: Vec<(String, std::net::SocketAddr)> = fallbacks
        .iter()
        .map(|a| (format!("fallback {a}"), *a))
        .collect();
    http::fetch_verified_from(&sources, keys, base)
        .await
        .inspect_err(|e| debug!("no consensus from a fallback directory: {e}"))
        .ok()
}

/// Where the last verified consensus is kept.
pub fn cache_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("cached-consensus")
}

/// A cached consensus that still verifies now, if there is one.
pub fn load_cached(data_dir: &std::path::Path, keys: &[AuthorityKey]) -> Option<Arc<Consensus>> {
    let b = std::fs::read(cache_path(data_dir)).ok()?;
    UnverifiedConsensus::parse(&b)
        .and_then(|u| u.verify(keys, unix_now()))
        .ok()
        .map(Arc::new)
}
