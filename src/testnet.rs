//! `allium testnet`: a whole network on loopback in one process.
//!
//! Layout: one directory authority, N relays (the first `exits` of them
//! exits that may reach loopback), and a client with a SOCKS5 port. Each
//! role has its own data directory and `config.toml`, so `--init-only`
//! writes a network that can also be run one process per role.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allium_client::{Client, ClientConfig};
use allium_directory::{AuthConfig, Authority, AuthorityEntry};
use allium_proto::policy::DEFAULT_REJECTED_PORTS;
use allium_relay::{Relay, RelayConfig, RelayStats};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum TestnetError {
    #[error(transparent)]
    Dir(#[from] allium_directory::DirError),
    #[error(transparent)]
    Relay(#[from] allium_relay::RelayError),
    #[error(transparent)]
    Client(#[from] allium_client::ClientError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// Options of `allium testnet`.
#[derive(Clone, Debug)]
pub struct TestnetOptions {
    pub relays: usize,
    pub exits: usize,
    /// SOCKS listener (default: a free loopback port).
    pub socks: Option<SocketAddr>,
    /// Keep everything here (default: a temporary directory, removed at the end).
    pub data_dir: Option<PathBuf>,
    /// First of the consecutive loopback ports to use (default: find a free block).
    pub base_port: Option<u16>,
    /// Consensus interval of the authority, seconds.
    pub interval_secs: u64,
}

impl Default for TestnetOptions {
    fn default() -> Self {
        TestnetOptions {
            relays: 6,
            exits: 2,
            socks: None,
            data_dir: None,
            base_port: None,
            interval_secs: 2,
        }
    }
}

/// The configs of every role.
pub struct Plan {
    pub dir: PathBuf,
    pub auth: AuthConfig,
    pub relays: Vec<RelayConfig>,
    pub client: ClientConfig,
}

/// Exit policy of testnet exits: the default rejected ports, then loopback,
/// then no other private address, then everything else.
pub fn testnet_exit_policy() -> Vec<String> {
    let mut v: Vec<String> = DEFAULT_REJECTED_PORTS
        .iter()
        .map(|&(a, b)| {
            if a == b {
                format!("reject *:{a}")
            } else {
                format!("reject *:{a}-{b}")
            }
        })
        .collect();
    v.push("accept 127.0.0.0/8:*".into());
    v.push("accept [::1]/128:*".into());
    v.push("reject private:*".into());
    v.push("accept *:*".into());
    v
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Make the configs (no files, no keys).
pub fn plan(
    opts: &TestnetOptions,
    dir: &Path,
    base: u16,
    auth_key: &str,
) -> Result<Plan, TestnetError> {
    if opts.relays < 3 || opts.exits < 1 || opts.exits >= opts.relays {
        return Err(TestnetError::Other(
            "need at least 3 relays, at least 1 exit and at least 2 non-exits".into(),
        ));
    }
    let auth = AuthConfig {
        nickname: "auth0".into(),
        listen: loopback(base),
        data_dir: dir.join("auth0"),
        interval_secs: opts.interval_secs,
        valid_intervals: 30,
        descriptor_max_age_secs: 600,
        reject: vec![],
    };
    let authorities = vec![AuthorityEntry {
        name: "auth0".into(),
        addr: auth.listen,
        key: auth_key.to_string(),
    }];
    let relays = (0..opts.relays)
        .map(|i| {
            let exit = i < opts.exits;
            RelayConfig {
                nickname: format!("relay{i}"),
                listen: loopback(base + 1 + i as u16),
                data_dir: dir.join(format!("relay{i}")),
                authorities: authorities.clone(),
                bandwidth: 50_000_000,
                exit_policy: if exit { testnet_exit_policy() } else { vec![] },
                publish_interval_secs: 60,
                ..RelayConfig::default()
            }
        })
        .collect();
    let client = ClientConfig {
        data_dir: dir.join("client"),
        authorities,
        socks_listen: vec![
            opts.socks
                .unwrap_or_else(|| loopback(base + 1 + opts.relays as u16)),
        ],
        ..ClientConfig::default()
    };
    Ok(Plan {
        dir: dir.to_path_buf(),
        auth,
        relays,
        client,
    })
}

/// A block of `n` free consecutive loopback ports, held open.
async fn free_block(n: usize, start: Option<u16>) -> Result<(u16, Vec<TcpListener>), TestnetError> {
    let candidates: Vec<u16> = match start {
        Some(p) => vec![p],
        None => (0..200).map(|i| 17100 + i * 100).collect(),
    };
    'outer: for base in candidates {
        let mut held = Vec::new();
        for i in 0..n {
            let Some(port) = base.checked_add(i as u16) else {
                continue 'outer;
            };
            match TcpListener::bind(loopback(port)).await {
                Ok(l) => held.push(l),
                Err(_) => continue 'outer,
            }
        }
        return Ok((base, held));
    }
    Err(TestnetError::Other(
        "no free block of loopback ports".into(),
    ))
}

fn write_toml<T: Serialize>(path: &Path, header: &str, cfg: &T) -> Result<(), TestnetError> {
    let body = toml::to_string(cfg).map_err(|e| TestnetError::Other(e.to_string()))?;
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(path, format!("# {header}\n{body}"))?;
    Ok(())
}

/// Authority key: load or create it, return its hex.
fn authority_key(dir: &Path) -> Result<String, TestnetError> {
    let cfg = AuthConfig {
        data_dir: dir.join("auth0"),
        ..AuthConfig::default()
    };
    Ok(hex::encode(Authority::new(cfg)?.public_key()))
}

/// Write every role's config and a README of the commands (`--init-only`).
pub fn init(opts: &TestnetOptions, dir: &Path) -> Result<Plan, TestnetError> {
    std::fs::create_dir_all(dir)?;
    // Absolute paths in the configs, so each role runs from any directory.
    let dir = &std::fs::canonicalize(dir)?;
    let key = authority_key(dir)?;
    let p = plan(opts, dir, opts.base_port.unwrap_or(17000), &key)?;
    write_toml(
        &dir.join("auth0/config.toml"),
        "allium dirauth --config auth0/config.toml",
        &p.auth,
    )?;
    for r in &p.relays {
        Relay::new(r.clone())?; // create its keys now
        write_toml(
            &r.data_dir.join("config.toml"),
            &format!("allium relay --config {}/config.toml", r.nickname),
            r,
        )?;
    }
    write_toml(
        &dir.join("client/config.toml"),
        "allium client --config client/config.toml",
        &p.client,
    )?;
    let mut readme = format!(
        "# Allium test network\n\nOne authority, {} relays ({} exits) and a client on 127.0.0.1.\nRun each role in its own terminal, from this directory:\n\n    allium dirauth --config auth0/config.toml\n",
        p.relays.len(),
        opts.exits
    );
    for r in &p.relays {
        readme.push_str(&format!(
            "    allium relay --config {}/config.toml\n",
            r.nickname
        ));
    }
    readme.push_str(&format!(
        "    allium client --config client/config.toml\n\nThen: curl --socks5-hostname {} http://127.0.0.1:PORT/\n",
        p.client.socks_listen[0]
    ));
    std::fs::write(dir.join("README.md"), readme)?;
    Ok(p)
}

/// A relay of a running testnet, for inspection.
pub struct RelayInfo {
    pub nickname: String,
    pub identity: [u8; 32],
    pub addr: SocketAddr,
    pub stats: Arc<RelayStats>,
}

/// A running in-process testnet.
pub struct Testnet {
    pub authority: Arc<Authority>,
    pub auth_addr: SocketAddr,
    pub relays: Vec<RelayInfo>,
    pub client: Client,
    pub socks_addr: SocketAddr,
    tasks: JoinSet<(String, Result<(), String>)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Testnet {
    /// Start every role and return once they are listening (not yet ready).
    pub async fn start(opts: TestnetOptions) -> Result<Testnet, TestnetError> {
        let tmp = match &opts.data_dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("allium-testnet-")
                    .tempdir()?,
            ),
        };
        let dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| tmp.as_ref().expect("temp dir").path().to_path_buf());
        std::fs::create_dir_all(&dir)?;
        let n_ports = opts.relays + 2;
        let (base, mut held) = free_block(n_ports, opts.base_port).await?;
        let key = authority_key(&dir)?;
        let p = plan(&opts, &dir, base, &key)?;
        let socks_listener = match opts.socks {
            Some(a) => TcpListener::bind(a).await?,
            None => held
                .pop()
                .ok_or_else(|| TestnetError::Other("port block".into()))?,
        };
        let mut held = held.into_iter();
        let mut tasks = JoinSet::new();

        let authority = Arc::new(Authority::new(p.auth.clone())?);
        let auth_l = held
            .next()
            .ok_or_else(|| TestnetError::Other("port block".into()))?;
        let a = authority.clone();
        tasks.spawn(
            async move {
                (
                    "auth0".to_string(),
                    a.serve(auth_l).await.map_err(|e| e.to_string()),
                )
            }
            .instrument(tracing::info_span!("auth0")),
        );
        let mut relays = Vec::new();
        for rc in p.relays.iter() {
            let l = held
                .next()
                .ok_or_else(|| TestnetError::Other("port block".into()))?;
            let relay = Relay::new(rc.clone())?;
            relays.push(RelayInfo {
                nickname: rc.nickname.clone(),
                identity: relay.identity(),
                addr: rc.listen,
                stats: relay.stats(),
            });
            let name = rc.nickname.clone();
            let span = tracing::info_span!("relay", name = %name);
            tasks.spawn(
                async move { (name, relay.serve(l).await.map_err(|e| e.to_string())) }
                    .instrument(span),
            );
        }
        let client = Client::new(p.client.clone())?;
        let socks_addr = socks_listener.local_addr()?;
        let c = client.clone();
        tasks.spawn(
            async move {
                (
                    "client".to_string(),
                    c.serve(vec![socks_listener])
                        .await
                        .map_err(|e| e.to_string()),
                )
            }
            .instrument(tracing::info_span!("client")),
        );
        Ok(Testnet {
            authority,
            auth_addr: p.auth.listen,
            relays,
            client,
            socks_addr,
            tasks,
            _tmp: tmp,
        })
    }

    /// Wait until the client has a verified consensus listing every relay
    /// and has built a circuit.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), TestnetError> {
        let start = std::time::Instant::now();
        loop {
            if let Some(c) = self.client.consensus()
                && c.relays.len() >= self.relays.len()
            {
                break;
            }
            if start.elapsed() > timeout {
                return Err(TestnetError::Other(
                    "the consensus did not list every relay in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let left = timeout.saturating_sub(start.elapsed());
        tokio::time::timeout(left, self.client.wait_bootstrapped())
            .await
            .map_err(|_| TestnetError::Other("the client built no circuit in time".into()))
    }

    /// Wait until a role's task ends (which is an error) and report it.
    pub async fn wait_failure(&mut self) -> String {
        match self.tasks.join_next().await {
            Some(Ok((name, Ok(())))) => format!("{name} stopped"),
            Some(Ok((name, Err(e)))) => format!("{name} failed: {e}"),
            Some(Err(e)) => format!("a task panicked: {e}"),
            None => "no tasks".into(),
        }
    }

    /// Stop everything; the temporary directory goes with `self`.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}
