//! Hosting an onion service (doc/protocol.md section 11.4): keep circuits
//! to a few introduction points, file a descriptor listing them on the
//! ring for this period and the next, and for each client's introduction
//! build a circuit to its rendezvous point and serve its streams from the
//! local addresses the configuration maps.
//!
//! A service runs inside a client ([`Client::run`] starts the
//! `[[services]]` of its configuration). Its identity key lives in its
//! directory (`dir/identity.key`, 0600, written atomically) with its
//! address beside it (`dir/hostname`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allium_directory::store::{self, KeyKind};
use allium_directory::unix_now;
use allium_proto::ntor::{self, OnionKeys, OnionSecret};
use allium_proto::relaymsg::{EndReason, Introduce, RelayMsg};
use allium_proto::service::auth::ClientAuthKey;
use allium_proto::service::descriptor::{
    self, IntroPoint, MAX_INTRO_POINTS, ServiceInfo, subcredential,
};
use allium_proto::service::intro;
use allium_proto::service::{ServiceAddress, TimePeriod};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, warn};
use x25519_dalek::StaticSecret;

use crate::ClientError;
use crate::circuit::{CircuitHandle, Incoming};
use crate::client::Client;
use crate::hsdir;
use crate::path::ExitTarget;

/// One service in a client's configuration (`[[services]]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The service's directory (under `data_dir` if relative): its
    /// identity key and `hostname`.
    pub dir: PathBuf,
    /// What a client's stream to each port reaches.
    pub ports: Vec<PortMap>,
    /// Introduction points kept.
    pub intro_points: usize,
    /// INTRODUCE1s per second each introduction point passes on, and the
    /// burst it allows.
    pub intro_rate: u32,
    pub intro_burst: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            dir: PathBuf::from("service"),
            ports: vec![],
            intro_points: 3,
            intro_rate: 25,
            intro_burst: 200,
        }
    }
}

/// A virtual port and the local address behind it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortMap {
    pub virtual_port: u16,
    pub target: SocketAddr,
}

impl ServiceConfig {
    pub fn check(&self) -> Result<(), ClientError> {
        let bad =
            |why: String| ClientError::Config(format!("service {}: {why}", self.dir.display()));
        if self.ports.is_empty() {
            return Err(bad("no ports".into()));
        }
        if !(1..=MAX_INTRO_POINTS).contains(&self.intro_points) {
            return Err(bad(format!("intro_points must be 1 to {MAX_INTRO_POINTS}")));
        }
        if !(1..=intro::MAX_RATE).contains(&self.intro_rate)
            || !(1..=intro::MAX_BURST).contains(&self.intro_burst)
        {
            return Err(bad(format!(
                "intro_rate must be 1 to {}, intro_burst 1 to {}",
                intro::MAX_RATE,
                intro::MAX_BURST
            )));
        }
        Ok(())
    }

    fn dir_in(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.dir)
    }
}

/// The service's identity (created on first use) and its address, which
/// is written to `dir/hostname`.
pub fn load_identity(
    data_dir: &Path,
    cfg: &ServiceConfig,
) -> Result<(SigningKey, ServiceAddress), ClientError> {
    let dir = cfg.dir_in(data_dir);
    let key =
        store::load_or_create_key(&dir.join("identity.key"), KeyKind::ServiceIdentity, || {
            SigningKey::generate(&mut rand::rng()).to_bytes()
        })?;
    let identity = SigningKey::from_bytes(&key);
    let address = ServiceAddress::from_key(&identity.verifying_key().to_bytes())?;
    store::write_atomic(
        &dir.join("hostname"),
        format!("{address}\n").as_bytes(),
        0o644,
    )?;
    Ok((identity, address))
}

/// Clients listed in `authorized_clients/`, at most.
const MAX_AUTH_FILES: usize = 4096;

/// The clients the service admits, from the `NAME.auth` files in
/// `dir/authorized_clients/` (each `descriptor:x25519:<base32 key>`, as
/// Tor writes them); none, or no such directory: anyone who knows the
/// address. A file that does not hold a key is an error, so that a typo
/// never opens a service meant to be restricted.
pub fn load_authorized(
    data_dir: &Path,
    cfg: &ServiceConfig,
) -> Result<Vec<ClientAuthKey>, ClientError> {
    let dir = cfg.dir_in(data_dir).join("authorized_clients");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(ClientError::Config(format!("{}: {e}", dir.display()))),
    };
    let mut keys = Vec::new();
    for entry in entries.take(MAX_AUTH_FILES) {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("auth") {
            continue;
        }
        let bad = |why: String| ClientError::Config(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("");
        let key = ClientAuthKey::parse(line).map_err(|e| bad(e.to_string()))?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    if keys.len() > descriptor::MAX_AUTH_CLIENTS {
        return Err(ClientError::Config(format!(
            "{}: {} clients, at most {} can be authorized",
            dir.display(),
            keys.len(),
            descriptor::MAX_AUTH_CLIENTS
        )));
    }
    Ok(keys)
}

/// Introductions one introduction point takes before the service replaces
/// it (so its replay cache stays bounded).
const MAX_INTRODUCTIONS: usize = 16_384;
/// Rendezvous circuits being built at once (more introductions wait).
const RENDEZVOUS_PARALLEL: usize = 16;
/// Streams queued for the service on one rendezvous circuit.
const INCOMING_QUEUE: usize = 64;
/// How long the service waits for a local server to accept.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Rendezvous circuits a service keeps at once (more introductions are
/// dropped).
const MAX_RENDEZVOUS_CIRCUITS: usize = 512;
/// A rendezvous circuit with no stream for this long is closed (longer
/// than a client keeps using one, `max_circuit_dirtiness_secs`).
const IDLE_CLOSE: Duration = Duration::from_secs(15 * 60);
/// Descriptors are filed again this often even when nothing changed.
const REPUBLISH: Duration = Duration::from_secs(600);

/// What an introduction point's circuit needs to answer introductions.
struct IntroKeys {
    auth_key: [u8; 32],
    enc: OnionSecret,
    /// Clients' ephemeral keys seen: an introduction is taken once.
    seen: Mutex<HashSet<[u8; 32]>>,
    /// The point took its share of introductions: replace it.
    retired: AtomicBool,
}

struct IntroState {
    relay: [u8; 32],
    nickname: String,
    keys: Arc<IntroKeys>,
    circ: CircuitHandle,
}

/// The service as its tasks share it.
struct Shared {
    client: Client,
    address: ServiceAddress,
    ports: Vec<PortMap>,
    rendezvous: Semaphore,
    /// Rendezvous circuits open now.
    live: std::sync::atomic::AtomicUsize,
}

/// Run the service `cfg` inside `client` until the client stops.
pub async fn run(client: Client, cfg: ServiceConfig) -> Result<(), ClientError> {
    cfg.check()?;
    let (identity, address) = load_identity(&client.config().data_dir, &cfg)?;
    let authorized = load_authorized(&client.config().data_dir, &cfg)?;
    if authorized.is_empty() {
        info!(%address, "onion service starting");
    } else {
        info!(
            %address,
            "onion service starting, for {} authorized clients only",
            authorized.len()
        );
    }
    client.wait_bootstrapped().await;
    let shared = Arc::new(Shared {
        client: client.clone(),
        address,
        ports: cfg.ports.clone(),
        rendezvous: Semaphore::new(RENDEZVOUS_PARALLEL),
        live: Default::default(),
    });
    let mut intros: Vec<IntroState> = Vec::new();
    let mut published: Option<(Vec<[u8; 32]>, TimePeriod, Instant)> = None;
    let mut reachable = false;
    loop {
        let before = intros.len();
        // (A retired point's circuit closes as its state drops.)
        intros.retain(|i| !i.circ.is_closed() && !i.keys.retired.load(Ordering::Relaxed));
        if intros.len() < before {
            info!(%address, lost = before - intros.len(), "introduction point lost; replacing it");
        }
        let mut failures = 0;
        while intros.len() < cfg.intro_points && failures < 3 {
            match establish(&shared, &cfg, &intros).await {
                Ok(i) => {
                    debug!(intro = %i.nickname, "introduction point established");
                    intros.push(i);
                }
                Err(e) => {
                    failures += 1;
                    warn!(%address, "introduction point: {e}");
                }
            }
        }
        if intros.len() != before || published.is_none() {
            info!(
                %address,
                "introduction points established: {} of {}",
                intros.len(),
                cfg.intro_points
            );
        }
        let keys: Vec<[u8; 32]> = intros.iter().map(|i| i.keys.auth_key).collect();
        let c_now = client.consensus();
        let period = c_now.as_ref().map(|c| c.period_at(unix_now()));
        let due = match (&published, period) {
            (_, None) => false,
            (None, Some(_)) => !keys.is_empty(),
            (Some((k, p, at)), Some(period)) => {
                (*k != keys || *p != period || at.elapsed() >= REPUBLISH) && !keys.is_empty()
            }
        };
        if let (true, Some(period)) = (due, period) {
            let info = ServiceInfo {
                intro_points: intros
                    .iter()
                    .map(|i| IntroPoint {
                        relay: i.relay,
                        auth_key: i.keys.auth_key,
                        enc_key: i.keys.enc.public().0,
                    })
                    .collect(),
            };
            let mut stored_now = 0;
            // The next period's descriptor once the consensus has its
            // shared random value (from halfway through this one).
            let next = c_now
                .as_ref()
                .is_some_and(|c| c.shared_random_for(period.next()).is_some());
            let periods = if next {
                vec![period, period.next()]
            } else {
                vec![period]
            };
            for p in periods {
                let revision = unix_now().saturating_sub(p.start());
                let doc =
                    descriptor::build(&identity, p, revision, &info, &authorized, &mut rand::rng());
                match hsdir::publish(&client, &address.blinded(p), p, &doc).await {
                    Ok(r) => {
                        info!(
                            %address,
                            period = p.number,
                            "descriptor uploaded to {} of {} service directories",
                            r.stored,
                            r.responsible
                        );
                        for (dir, why) in &r.failures {
                            debug!(directory = %dir, "descriptor not stored: {why}");
                        }
                        if p == period {
                            stored_now = r.stored;
                        }
                    }
                    Err(e) => warn!(%address, period = p.number, "descriptor not uploaded: {e}"),
                }
            }
            if stored_now > 0 {
                published = Some((keys, period, Instant::now()));
                if !reachable {
                    reachable = true;
                    info!(%address, "service reachable");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A new introduction point, on a relay none of `have` uses.
async fn establish(
    shared: &Arc<Shared>,
    cfg: &ServiceConfig,
    have: &[IntroState],
) -> Result<IntroState, ClientError> {
    let client = &shared.client;
    let c = client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
    // Not a relay already used, nor one of the service's guards (when
    // another will do).
    let mut avoid: Vec<[u8; 32]> = have.iter().map(|i| i.relay).collect();
    avoid.extend(client.guards());
    let relay = crate::rendezvous::pick_relay(&c, &avoid)
        .filter(|r| !have.iter().any(|i| i.relay == r.identity))
        .ok_or_else(|| ClientError::NoPath("no relay left for an introduction point".into()))?;
    let circ = client
        .build_circuit(&ExitTarget::Relay(&relay.identity))
        .await?;
    let mut msgs = circ.service_messages().ok_or(ClientError::CircuitClosed)?;
    let auth = SigningKey::generate(&mut rand::rng());
    let keys = Arc::new(IntroKeys {
        auth_key: auth.verifying_key().to_bytes(),
        enc: OnionSecret::new(StaticSecret::random_from_rng(&mut rand::rng())),
        seen: Mutex::default(),
        retired: AtomicBool::new(false),
    });
    circ.send_service(RelayMsg::EstablishIntro(intro::establish_intro(
        &auth,
        &circ.binding,
        cfg.intro_rate,
        cfg.intro_burst,
    )))
    .await?;
    match tokio::time::timeout(crate::rendezvous::INTRO_TIMEOUT, msgs.recv()).await {
        Ok(Some(RelayMsg::IntroEstablished)) => {}
        Ok(Some(m)) => {
            return Err(ClientError::Build(format!(
                "{} answered ESTABLISH_INTRO with {:?}",
                relay.nickname,
                m.cmd()
            )));
        }
        Ok(None) => return Err(ClientError::CircuitClosed),
        Err(_) => return Err(ClientError::Timeout("ESTABLISH_INTRO")),
    }
    // Introductions, as they come: the task ends with the circuit (or
    // retires it after MAX_INTRODUCTIONS).
    let (sh, k, c2) = (shared.clone(), keys.clone(), circ.clone());
    tokio::spawn(
        async move {
            let mut taken = 0;
            while let Some(m) = msgs.recv().await {
                if let RelayMsg::Introduce2(i) = m {
                    taken += 1;
                    if taken > MAX_INTRODUCTIONS {
                        k.retired.store(true, Ordering::Relaxed);
                        break;
                    }
                    let (sh, k) = (sh.clone(), k.clone());
                    tokio::spawn(
                        async move {
                            if let Err(e) = introduced(&sh, &k, i).await {
                                debug!("introduction not answered: {e}");
                            }
                        }
                        .in_current_span(),
                    );
                }
            }
            // Dropping the last handle closes the circuit; the service's
            // loop sees it closed and replaces it.
            drop(c2);
        }
        .in_current_span(),
    );
    Ok(IntroState {
        relay: relay.identity,
        nickname: relay.nickname,
        keys,
        circ,
    })
}

/// A client's introduction: check it, then meet the client at its
/// rendezvous point and serve the streams it opens.
async fn introduced(
    shared: &Arc<Shared>,
    keys: &IntroKeys,
    i: Introduce,
) -> Result<(), ClientError> {
    let client = &shared.client;
    let c = client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
    // The client's clock may put it in the period before or after ours.
    let now = c.period_at(unix_now());
    let around = [
        now,
        now.next(),
        TimePeriod {
            number: now.number.saturating_sub(1),
            length: now.length,
        },
    ];
    let opened = around.iter().find_map(|p| {
        let sub = subcredential(shared.address.key(), &shared.address.blinded(*p));
        intro::open(keys.enc.secret(), &keys.auth_key, &sub, &i.encrypted).ok()
    });
    let (req, ephemeral) = opened.ok_or_else(|| {
        ClientError::IntroductionFailed("an introduction that does not decrypt".into())
    })?;
    if !keys
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(ephemeral)
    {
        return Err(ClientError::IntroductionFailed(
            "a replayed introduction".into(),
        ));
    }
    let rp = c
        .relay(&req.rp_identity)
        .filter(|r| r.link_key == req.rp_link_key && r.addr == req.rp_addr)
        .ok_or_else(|| {
            ClientError::RendezvousFailed("a rendezvous point not in the consensus as named".into())
        })?
        .clone();
    let secrets = [&keys.enc];
    let (reply, hop_keys, params) = ntor::server(
        &mut rand::rng(),
        &OnionKeys {
            identity: keys.auth_key,
            keys: &secrets,
        },
        &req.onionskin,
    )?;
    if shared.live.load(Ordering::Relaxed) >= MAX_RENDEZVOUS_CIRCUITS {
        return Err(ClientError::RendezvousFailed(
            "as many rendezvous circuits as the service keeps".into(),
        ));
    }
    // A client waits for the service for so long only.
    let _turn = tokio::time::timeout(
        crate::rendezvous::RENDEZVOUS_TIMEOUT,
        shared.rendezvous.acquire(),
    )
    .await
    .map_err(|_| ClientError::Timeout("a turn to build a rendezvous circuit"))?
    .map_err(|_| ClientError::CircuitClosed)?;
    let circ = client
        .build_circuit(&ExitTarget::Relay(&rp.identity))
        .await?;
    let (tx, mut rx) = mpsc::channel(INCOMING_QUEUE);
    circ.join_after(
        RelayMsg::Rendezvous1 {
            cookie: req.cookie,
            reply,
        },
        hop_keys.reversed(),
        params,
        Some(tx),
    )
    .await?;
    drop(_turn);
    debug!(rp = %rp.nickname, "joined a client at its rendezvous point");
    let sh = shared.clone();
    sh.live.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(
        async move {
            // Streams being served; the circuit closes once it has had
            // none for IDLE_CLOSE (or when the client closes it).
            let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut idle_since = Instant::now();
            loop {
                tokio::select! {
                    inc = rx.recv() => match inc {
                        Some(inc) => {
                            idle_since = Instant::now();
                            let (sh, active) = (sh.clone(), active.clone());
                            active.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(
                                async move {
                                    serve_stream(sh, inc).await;
                                    active.fetch_sub(1, Ordering::Relaxed);
                                }
                                .in_current_span(),
                            );
                        }
                        None => break,
                    },
                    () = tokio::time::sleep(Duration::from_secs(30)) => {
                        if active.load(Ordering::Relaxed) > 0 {
                            idle_since = Instant::now();
                        } else if idle_since.elapsed() >= IDLE_CLOSE {
                            debug!("closing an idle rendezvous circuit");
                            break;
                        }
                    }
                }
            }
            sh.live.fetch_sub(1, Ordering::Relaxed);
            drop(circ);
        }
        .in_current_span(),
    );
    Ok(())
}

/// Connect a client's stream to the local address its port maps to.
async fn serve_stream(shared: Arc<Shared>, inc: Incoming) {
    let Some(target) = shared
        .ports
        .iter()
        .find(|p| p.virtual_port == inc.port)
        .map(|p| p.target)
    else {
        debug!(
            port = inc.port,
            "a stream to a port the service does not map"
        );
        inc.refuse(EndReason::CONNECT_REFUSED).await;
        return;
    };
    let tcp = match tokio::time::timeout(
        LOCAL_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            warn!(port = inc.port, "local server refused: {e}");
            inc.refuse(EndReason::CONNECT_REFUSED).await;
            return;
        }
        Err(_) => {
            warn!(port = inc.port, "local server timed out");
            inc.refuse(EndReason::TIMEOUT).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    debug!(port = inc.port, "service stream connected");
    match inc.accept().await {
        Ok(stream) => {
            if let Err(e) = crate::socks::serve_bytes(tcp, stream).await {
                debug!("service stream: {e}");
            }
        }
        Err(e) => debug!("service stream: {e}"),
    }
}
