//! Getting a consensus the client can trust.

use std::sync::Arc;

use allium_directory::{AuthorityEntry, http, unix_now};
use allium_proto::{AuthorityKey, Consensus, UnverifiedConsensus};
use rand::seq::SliceRandom;
use tracing::warn;

use crate::ClientError;

/// Fetch from the authorities (in random order) until one serves a
/// consensus that verifies against `keys`; the error says what went wrong
/// with each.
pub async fn fetch_consensus(
    auths: &[AuthorityEntry],
    keys: &[AuthorityKey],
) -> Result<(Arc<Consensus>, Vec<u8>), ClientError> {
    let mut order: Vec<&AuthorityEntry> = auths.iter().collect();
    order.shuffle(&mut rand::rng());
    let mut why = Vec::new();
    for a in order {
        let r = async {
            let bytes = http::fetch_consensus(a.addr).await?;
            let c = UnverifiedConsensus::parse(&bytes)?.verify(keys, unix_now())?;
            Ok::<_, ClientError>((c, bytes))
        }
        .await;
        match r {
            Ok((c, b)) => return Ok((Arc::new(c), b)),
            Err(e) => {
                warn!(authority = %a.name, "consensus refused: {e}");
                why.push(format!("{}: {e}", a.name));
            }
        }
    }
    Err(ClientError::NoConsensus(why.join("; ")))
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
