//! Getting a consensus the client can trust.

use std::sync::Arc;

use allium_directory::{AuthorityEntry, http, unix_now};
use allium_proto::{AuthorityKey, Consensus, UnverifiedConsensus};
use tracing::debug;

use crate::ClientError;

/// Fetch a consensus that verifies against `keys` (see
/// [`http::fetch_verified_consensus`]); the error says what each authority
/// answered, and the caller decides how loudly to log it.
pub async fn fetch_consensus(
    auths: &[AuthorityEntry],
    keys: &[AuthorityKey],
    base: Option<&[u8]>,
) -> Result<(Arc<Consensus>, Vec<u8>), ClientError> {
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
