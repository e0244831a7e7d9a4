//! The directory authority (`allium dirauth`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_proto::doc::{CONSENSUS_DOMAIN, MAX_DESCRIPTOR_LEN, VerifiedDescriptor};
use allium_proto::{Consensus, ConsensusRelay, RelayFlags, UnverifiedDescriptor};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{DirError, store, unix_now};

/// At most this many relays are remembered; more uploads are refused.
pub const MAX_RELAYS: usize = 10_000;

/// `allium dirauth` configuration (TOML). See `examples/dirauth.toml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub nickname: String,
    /// Where the directory HTTP server listens.
    pub listen: SocketAddr,
    /// Keys and state live here.
    pub data_dir: PathBuf,
    /// A new consensus is built every this many seconds.
    pub interval_secs: u64,
    /// A consensus stays valid for this many intervals.
    pub valid_intervals: u64,
    /// Descriptors older than this are dropped.
    pub descriptor_max_age_secs: u64,
    /// Relay identities (hex) the operator refuses to list.
    pub reject: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nickname: "auth".into(),
            listen: "127.0.0.1:7000".parse().expect("valid address"),
            data_dir: PathBuf::from("allium-dirauth"),
            interval_secs: 3600,
            valid_intervals: 3,
            descriptor_max_age_secs: 48 * 3600,
            reject: vec![],
        }
    }
}

struct AuthState {
    descriptors: BTreeMap<[u8; 32], VerifiedDescriptor>,
    consensus: Option<Bytes>,
}

/// A running authority's shared state.
pub struct Authority {
    cfg: AuthConfig,
    key: SigningKey,
    rejected: Vec<[u8; 32]>,
    state: Mutex<AuthState>,
}

fn parse_id(s: &str) -> Result<[u8; 32], DirError> {
    hex::decode(s.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| DirError::Config(format!("{s:?} is not a 64-digit hex relay identity")))
}

impl Authority {
    /// Load (or create) the key and persisted state. No I/O beyond files.
    pub fn new(cfg: AuthConfig) -> Result<Self, DirError> {
        if cfg.interval_secs == 0 || cfg.valid_intervals == 0 {
            return Err(DirError::Config(
                "interval_secs and valid_intervals must be positive".into(),
            ));
        }
        let key = store::load_or_create_identity(&cfg.data_dir.join("keys/authority.key"))?;
        let rejected = cfg
            .reject
            .iter()
            .map(|s| parse_id(s))
            .collect::<Result<_, _>>()?;
        let mut st = AuthState {
            descriptors: BTreeMap::new(),
            consensus: None,
        };
        let now = unix_now();
        if let Ok(b) = std::fs::read(cfg.data_dir.join("state/descriptors")) {
            let list: Vec<Vec<u8>> = postcard::from_bytes(&b).unwrap_or_default();
            for d in list {
                if let Ok(v) = UnverifiedDescriptor::parse(&d)
                    .and_then(|u| u.verify(now, cfg.descriptor_max_age_secs))
                {
                    st.descriptors.insert(v.desc.identity, v);
                }
            }
        }
        if let Ok(b) = std::fs::read(cfg.data_dir.join("state/consensus")) {
            st.consensus = Some(Bytes::from(b));
        }
        info!(descriptors = st.descriptors.len(), "authority state loaded");
        Ok(Authority {
            cfg,
            key,
            rejected,
            state: Mutex::new(st),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist_descriptors(&self, st: &AuthState) -> Result<(), DirError> {
        let list: Vec<&Vec<u8>> = st.descriptors.values().map(|d| &d.bytes).collect();
        let b = postcard::to_stdvec(&list).map_err(|e| DirError::Config(e.to_string()))?;
        store::write_atomic(&self.cfg.data_dir.join("state/descriptors"), &b, 0o600)
    }

    /// Take an uploaded descriptor. `Err` holds the HTTP status and reason.
    pub fn accept_descriptor(
        &self,
        body: &[u8],
        now: u64,
    ) -> Result<&'static str, (StatusCode, String)> {
        let bad =
            |e: allium_proto::Error| (StatusCode::BAD_REQUEST, format!("descriptor rejected: {e}"));
        let v = UnverifiedDescriptor::parse(body)
            .map_err(bad)?
            .verify(now, self.cfg.descriptor_max_age_secs)
            .map_err(bad)?;
        if self.rejected.contains(&v.desc.identity) {
            return Err((
                StatusCode::FORBIDDEN,
                "descriptor rejected: relay identity is rejected by this authority".into(),
            ));
        }
        let mut st = self.lock();
        match st.descriptors.get(&v.desc.identity) {
            Some(old) if old.digest == v.digest => return Ok("already known"),
            Some(old) if old.desc.published >= v.desc.published => {
                return Err((
                    StatusCode::CONFLICT,
                    "descriptor rejected: not newer than the one held (replay?)".into(),
                ));
            }
            None if st.descriptors.len() >= MAX_RELAYS => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "descriptor rejected: relay table full".into(),
                ));
            }
            _ => {}
        }
        info!(relay = %v.desc.nickname, id = %allium_proto::short_id(&v.desc.identity), "descriptor accepted");
        st.descriptors.insert(v.desc.identity, v);
        if let Err(e) = self.persist_descriptors(&st) {
            warn!("persisting descriptors: {e}");
        }
        Ok("accepted")
    }

    /// Build the consensus for `now` from the fresh descriptors.
    pub fn build_consensus(&self, now: u64) -> Consensus {
        let mut st = self.lock();
        let max_age = self.cfg.descriptor_max_age_secs;
        st.descriptors
            .retain(|_, d| d.desc.published + max_age >= now);
        let relays = st
            .descriptors
            .values()
            .map(|v| {
                let d = &v.desc;
                let mut flags =
                    RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::FAST | RelayFlags::STABLE;
                if d.exit_policy.is_exit() {
                    flags |= RelayFlags::EXIT;
                } else {
                    flags |= RelayFlags::GUARD;
                }
                ConsensusRelay {
                    nickname: d.nickname.clone(),
                    identity: d.identity,
                    link_key: d.link_key,
                    onion_key: d.onion_key,
                    addr: d.addr,
                    flags: RelayFlags(flags),
                    bandwidth: d.bandwidth,
                    exit_policy: d.exit_policy.clone(),
                    family: d.family.clone(),
                    descriptor_digest: v.digest,
                }
            })
            .collect();
        let interval = self.cfg.interval_secs;
        Consensus {
            valid_after: now,
            fresh_until: now + interval,
            valid_until: now + interval * self.cfg.valid_intervals,
            relays,
        }
    }

    /// Build, sign, store and persist a new consensus.
    pub fn publish_consensus(&self, now: u64) -> Result<usize, DirError> {
        let c = self.build_consensus(now);
        let n = c.relays.len();
        let mut doc = c.to_document();
        doc.sign(CONSENSUS_DOMAIN, &self.key);
        let bytes = doc.to_bytes();
        store::write_atomic(&self.cfg.data_dir.join("state/consensus"), &bytes, 0o644)?;
        self.lock().consensus = Some(Bytes::from(bytes));
        Ok(n)
    }

    pub fn consensus_bytes(&self) -> Option<Bytes> {
        self.lock().consensus.clone()
    }

    fn descriptors_bytes(&self) -> Vec<u8> {
        let st = self.lock();
        let list: Vec<&Vec<u8>> = st.descriptors.values().map(|d| &d.bytes).collect();
        postcard::to_stdvec(&list).unwrap_or_default()
    }

    /// Serve HTTP and publish consensuses until an error.
    pub async fn run(self: Arc<Self>) -> Result<(), DirError> {
        let listener = tokio::net::TcpListener::bind(self.cfg.listen)
            .await
            .map_err(|e| DirError::Config(format!("cannot listen on {}: {e}", self.cfg.listen)))?;
        self.serve(listener).await
    }

    /// Like [`Authority::run`] on an already bound listener.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), DirError> {
        info!(addr = %self.cfg.listen, key = %hex::encode(self.public_key()), "directory authority listening");
        let app = Router::new()
            .route("/descriptor", post(post_descriptor))
            .route("/consensus", get(get_consensus))
            .route("/descriptors", get(get_descriptors))
            .layer(DefaultBodyLimit::max(MAX_DESCRIPTOR_LEN))
            .with_state(self.clone());
        let sched = self.clone();
        let schedule = async move {
            let mut tick = tokio::time::interval(Duration::from_secs(sched.cfg.interval_secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match sched.publish_consensus(unix_now()) {
                    Ok(n) => info!(relays = n, "consensus published"),
                    Err(e) => warn!("publishing consensus: {e}"),
                }
            }
        };
        tokio::select! {
            r = axum::serve(listener, app) => r.map_err(|e| DirError::Config(format!("HTTP server: {e}"))),
            () = schedule => Ok(()),
        }
    }
}

async fn post_descriptor(State(a): State<Arc<Authority>>, body: Bytes) -> (StatusCode, String) {
    let _span = tracing::info_span!("dirauth", name = %a.cfg.nickname).entered();
    match a.accept_descriptor(&body, unix_now()) {
        Ok(s) => (StatusCode::OK, s.to_string()),
        Err((code, why)) => {
            warn!("{why}");
            (code, why)
        }
    }
}

async fn get_consensus(
    State(a): State<Arc<Authority>>,
) -> Result<Bytes, (StatusCode, &'static str)> {
    a.consensus_bytes()
        .ok_or((StatusCode::NOT_FOUND, "no consensus yet"))
}

async fn get_descriptors(State(a): State<Arc<Authority>>) -> Vec<u8> {
    a.descriptors_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_proto::RelayDescriptor;
    use allium_proto::policy::ExitPolicy;

    fn desc(k: &SigningKey, published: u64) -> Vec<u8> {
        RelayDescriptor {
            nickname: "r1".into(),
            identity: k.verifying_key().to_bytes(),
            link_key: [1; 32],
            onion_key: [2; 32],
            prev_onion_key: None,
            addr: "127.0.0.1:9001".parse().unwrap(),
            bandwidth: 1000,
            exit_policy: ExitPolicy::default_exit(),
            family: vec![],
            published,
        }
        .sign(k)
        .to_bytes()
    }

    #[test]
    fn accepts_rejects_and_survives_restart() {
        let d = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            data_dir: d.path().into(),
            ..Default::default()
        };
        let a = Authority::new(cfg.clone()).unwrap();
        let now = unix_now();
        let k = SigningKey::from_bytes(&[4; 32]);
        assert_eq!(
            a.accept_descriptor(&desc(&k, now), now).unwrap(),
            "accepted"
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now), now).unwrap(),
            "already known"
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now - 10), now).unwrap_err().0,
            StatusCode::CONFLICT
        );
        let mut forged = desc(&k, now + 1);
        let n = forged.len();
        forged[n - 70] ^= 1;
        assert_eq!(
            a.accept_descriptor(&forged, now).unwrap_err().0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            a.accept_descriptor(&desc(&k, now + 7200), now)
                .unwrap_err()
                .0,
            StatusCode::BAD_REQUEST
        );
        a.publish_consensus(now).unwrap();
        let key = a.public_key();
        drop(a);
        let b = Authority::new(cfg).unwrap();
        assert_eq!(b.public_key(), key);
        let c = allium_proto::UnverifiedConsensus::parse(&b.consensus_bytes().unwrap())
            .unwrap()
            .verify(&[allium_proto::AuthorityKey(key)], now)
            .unwrap();
        assert_eq!(c.relays.len(), 1);
        assert!(c.relays[0].flags.has(RelayFlags::EXIT));
        assert_eq!(b.build_consensus(now).relays.len(), 1);
    }
}
