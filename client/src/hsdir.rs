//! Service descriptors on the ring (doc/protocol.md sections 11.2 and
//! 11.3), from a client's side: a service files its descriptor on the
//! directories responsible for it, and a client that knows the address
//! fetches and decrypts it. Every request goes over a three-hop circuit
//! whose last hop is the directory, on a BEGIN_DIR stream: a directory
//! never learns who files or asks.

use std::sync::Arc;
use std::time::Duration;

use allium_directory::http;

use allium_proto::service::auth::ClientAuthSecret;
use allium_proto::service::descriptor::{
    MAX_LEN, ReadError, ServiceInfo, UnverifiedServiceDescriptor,
};
use allium_proto::service::ring::{SPREAD_FETCH, SPREAD_STORE};
use allium_proto::service::{BlindedKey, ServiceAddress, TimePeriod};
use allium_proto::{Consensus, ConsensusRelay};
use tracing::{debug, warn};

use crate::ClientError;
use crate::client::Client;
use crate::path::ExitTarget;

/// How long one request to one directory may take, circuit included.
pub const DIR_TIMEOUT: Duration = Duration::from_secs(30);

/// Directories asked at once.
const PARALLEL: usize = 4;

/// Where a descriptor was filed.
#[derive(Debug)]
pub struct Published {
    /// Directories that stored it.
    pub stored: usize,
    /// Directories responsible for it.
    pub responsible: usize,
    /// Why each of the others did not (by directory nickname).
    pub failures: Vec<(String, String)>,
}

/// One HTTP request over a BEGIN_DIR stream on a fresh circuit ending at
/// `dir`.
async fn request(
    client: &Client,
    dir: &ConsensusRelay,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, ClientError> {
    let work = async {
        // The circuit closes when the handle and the stream are gone. A
        // fetch can ask another directory; an upload is to this one.
        let circ = if method == "GET" {
            client.build_circuit_or_move_on(&dir.identity).await?
        } else {
            client
                .build_circuit(&ExitTarget::Relay(&dir.identity))
                .await?
        };
        circ.dir_talk(|io| http::exchange(io, &dir.nickname, method, path, body, MAX_LEN))
            .await?
            .map_err(ClientError::from)
    };
    tokio::time::timeout(DIR_TIMEOUT, work)
        .await
        .map_err(|_| ClientError::Timeout("service directory"))?
}

fn path_of(key: &BlindedKey) -> String {
    format!("/service/{}", hex::encode(key.0))
}

/// The client's consensus.
fn consensus(client: &Client) -> Result<Arc<Consensus>, ClientError> {
    client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))
}

/// The directories of the ring of `period` responsible for `key`, `spread`
/// per replica, in consensus `c`.
fn responsible(
    c: &Consensus,
    key: &BlindedKey,
    period: TimePeriod,
    spread: usize,
) -> Result<Vec<ConsensusRelay>, ClientError> {
    let ring = c.hsdir_ring(period).ok_or_else(|| {
        ClientError::NoConsensus(format!(
            "the consensus has no shared random value for period {}",
            period.number
        ))
    })?;
    Ok(ring.responsible(key, spread).into_iter().cloned().collect())
}

/// File the signed descriptor `doc` (for `period`, under `key`) on every
/// directory responsible for it, a few at a time.
pub async fn publish(
    client: &Client,
    key: &BlindedKey,
    period: TimePeriod,
    doc: &[u8],
) -> Result<Published, ClientError> {
    let c = consensus(client)?;
    let dirs = responsible(&c, key, period, SPREAD_STORE)?;
    if dirs.is_empty() {
        return Err(ClientError::NoPath(
            "no service directories in the consensus".into(),
        ));
    }
    let path = path_of(key);
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let mut tasks = tokio::task::JoinSet::new();
    for d in &dirs {
        let (client, d, path, doc, gate) = (
            client.clone(),
            d.clone(),
            path.clone(),
            doc.to_vec(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let _turn = gate.acquire_owned().await;
            let r = request(&client, &d, "POST", &path, doc).await;
            (d.nickname, r)
        });
    }
    let mut out = Published {
        stored: 0,
        responsible: dirs.len(),
        failures: Vec::new(),
    };
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((_, Ok(_))) => out.stored += 1,
            Ok((name, Err(e))) => out.failures.push((name, e.to_string())),
            Err(e) => out.failures.push(("?".into(), e.to_string())),
        }
    }
    Ok(out)
}

/// The descriptor of the service at `address` for the period of `now`,
/// from the first responsible directory that has one that verifies and
/// decrypts; the directories are asked in random order.
pub async fn fetch(
    client: &Client,
    address: &ServiceAddress,
    now: u64,
) -> Result<ServiceInfo, ClientError> {
    use rand::seq::SliceRandom;
    let c = consensus(client)?;
    let period = c.period_at(now);
    let key = address.blinded(period);
    let mut dirs = responsible(&c, &key, period, SPREAD_FETCH)?;
    dirs.shuffle(&mut rand::rng());
    let path = path_of(&key);
    let auth = match &client.config().service_auth_dir {
        Some(d) => auth_key(&client.config().data_dir.join(d), address),
        None => None,
    };
    let mut why = Vec::new();
    let mut invalid = None;
    let mut auth_refused = None;
    for d in &dirs {
        let r = request(client, d, "GET", &path, Vec::new())
            .await
            .and_then(|b| {
                // What the directory gave is judged here; failures before
                // it (a circuit, the stream) only mean "not found there".
                let bad = |e: allium_proto::Error| ClientError::BadDescriptor(e.to_string());
                let v = UnverifiedServiceDescriptor::parse(&b)
                    .and_then(|u| u.verify())
                    .map_err(bad)?;
                if v.period() != period {
                    return Err(ClientError::BadDescriptor(format!(
                        "for period {}, not {}",
                        v.period().number,
                        period.number
                    )));
                }
                v.decrypt(address, auth.as_ref()).map_err(|e| match e {
                    ReadError::Invalid(e) => bad(e),
                    ReadError::AuthMissing => ClientError::ClientAuthMissing(format!(
                        "{e} (a key goes in a .auth_private file in service_auth_dir)"
                    )),
                    ReadError::AuthWrong => ClientError::ClientAuthWrong(e.to_string()),
                })
            });
        match r {
            Ok(info) => return Ok(info),
            // The service's own descriptor says so; but a directory may
            // hold an older one (or replay it), so ask the others too.
            Err(e @ (ClientError::ClientAuthMissing(_) | ClientError::ClientAuthWrong(_))) => {
                debug!(directory = %d.nickname, "service descriptor: {e}");
                auth_refused = Some(e);
            }
            Err(e) => {
                debug!(directory = %d.nickname, "no service descriptor: {e}");
                why.push(format!("{}: {e}", d.nickname));
                if let ClientError::BadDescriptor(e) = e {
                    invalid = Some(e);
                }
            }
        }
    }
    if let Some(e) = auth_refused {
        return Err(e);
    }
    match invalid {
        Some(e) => Err(ClientError::BadDescriptor(e)),
        None => Err(ClientError::DescriptorNotFound(format!(
            "asked {} of the service's directories: {}",
            dirs.len(),
            why.join("; ")
        ))),
    }
}

/// Files read from a `service_auth_dir`, at most.
const MAX_AUTH_FILES: usize = 4096;
/// Bytes read from one `.auth_private` file, at most.
const MAX_AUTH_FILE_LEN: u64 = 4096;

/// This client's key for the service at `address`, from the
/// `NAME.auth_private` files in `dir` (read at each fetch, so a key added
/// there counts at once). Files that cannot be read or do not hold a key
/// are skipped with a warning.
pub fn auth_key(dir: &std::path::Path, address: &ServiceAddress) -> Option<ClientAuthSecret> {
    use std::io::Read;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warn!("service_auth_dir {}: {e}", dir.display());
            return None;
        }
    };
    for entry in entries.take(MAX_AUTH_FILES).flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("auth_private") {
            continue;
        }
        #[cfg(unix)]
        if let Ok(m) = std::fs::metadata(&path) {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o077 != 0 {
                warn!(
                    "{}: others can read this secret key (chmod 600 it)",
                    path.display()
                );
            }
        }
        // Room for the whole file at once, so no copy of the key is left
        // behind by a reallocation.
        let mut text =
            zeroize::Zeroizing::new(String::with_capacity(MAX_AUTH_FILE_LEN as usize + 1));
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_AUTH_FILE_LEN).read_to_string(&mut text));
        if let Err(e) = read {
            warn!("{}: {e}", path.display());
            continue;
        }
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("");
        match ClientAuthSecret::parse_line(line) {
            Ok((a, key)) if a == *address => return Some(key),
            Ok(_) => {}
            Err(e) => warn!("{}: {e}", path.display()),
        }
    }
    None
}
