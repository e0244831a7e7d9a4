//! `allium`: run a directory authority, a relay, a client, or a whole
//! network on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use allium::show;
use allium::testnet::{self, Testnet, TestnetOptions};
use allium_client::path::ExitTarget;
use allium_client::{Client, ClientConfig};
use allium_directory::{AuthConfig, Authority, AuthorityEntry, keys};
use allium_link::shaping::Shaping;
use allium_relay::{Relay, RelayConfig};
use clap::{Parser, Subcommand};
use serde::de::DeserializeOwned;

#[derive(Parser)]
#[command(
    name = "allium",
    version,
    about = "Allium: an onion-routed anonymity network"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// What to log: a level (error, warn, info, debug, trace) or
    /// `RUST_LOG`-style directives; default `RUST_LOG`, else info.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
}

impl Cmd {
    /// The role named on every log line.
    fn role(&self) -> &'static str {
        match self {
            Cmd::Dirauth { .. } => "dirauth",
            Cmd::Consensus { .. } => "consensus",
            Cmd::Relay { .. } => "relay",
            Cmd::Client { .. } => "client",
            Cmd::Service { .. } => "service",
            Cmd::Bench { .. } => "bench",
            Cmd::Testnet { .. } => "testnet",
            Cmd::Check { .. } => "check",
            Cmd::ClientAuth { .. } => "client-auth",
        }
    }
}

/// Log lines go to stderr, each prefixed with the role that wrote it. A
/// closed or broken stderr loses the lines, never the process.
struct LogLine(&'static str);

impl std::io::Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(self.0.as_bytes()).and_then(|()| e.write_all(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// `println!` for a long-running command: a closed stdout is not worth
/// dying of.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a directory authority, or manage its keys.
    Dirauth {
        /// The authority's config (needed to run; gives the data dir for key commands).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<DirauthAction>,
    },
    /// Inspect the consensus.
    Consensus {
        #[command(subcommand)]
        action: ConsensusAction,
    },
    /// Run a relay.
    Relay {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a client with a SOCKS5 port.
    Client {
        #[arg(long)]
        config: PathBuf,
    },
    /// Host onion services: a client config with `[[services]]`
    /// (see examples/service.toml).
    Service {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a key for one client of a service that admits only the
    /// clients it lists: writes NAME.auth_private (the client's secret,
    /// for its service_auth_dir) and NAME.auth (for the service's
    /// authorized_clients/ directory).
    ClientAuth {
        /// The service's address.
        #[arg(long)]
        address: String,
        /// The client's name, for the two file names.
        #[arg(long)]
        name: String,
        /// Where to write the two files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Check a config as the daemon would read it, without starting it:
    /// every value, the addresses it listens on, its data directory and
    /// key files; print what it would do. Exit status 0 if fine, 1 if not.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// The role the config is for (default: the one it parses as).
        #[arg(long, value_enum)]
        role: Option<allium::check::Role>,
    },
    /// Measure a whole network on loopback, each authority, relay and the
    /// client in its own process (see doc/performance.md).
    Bench {
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Smaller transfers, for a quick look (20 MiB single stream, 2000 idle circuits).
        #[arg(long)]
        quick: bool,
        /// Keep each process's log here (NAME.log; RUST_LOG sets the level
        /// for all of them).
        #[arg(long)]
        logs: Option<PathBuf>,
        #[command(flatten)]
        links: LinkShapingArgs,
    },
    /// Run a whole network on loopback: an authority, relays and a client.
    Testnet {
        /// Number of directory authorities.
        #[arg(long, default_value_t = 3)]
        authorities: usize,
        /// Number of relays (the first two are exits).
        #[arg(long, default_value_t = 6)]
        relays: usize,
        /// SOCKS5 listen address (default: a free loopback port).
        #[arg(long)]
        socks: Option<SocketAddr>,
        /// Also serve an HTTP CONNECT proxy here (e.g. 127.0.0.1:8118).
        #[arg(long)]
        http_connect: Option<SocketAddr>,
        /// Keep keys and configs here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only write the network's configs and keys to --data-dir.
        #[arg(long, requires = "data_dir")]
        init_only: bool,
        /// First port of the block of loopback ports to use.
        #[arg(long)]
        base_port: Option<u16>,
        /// The authorities' voting period in seconds (default: 3, and one
        /// more per 500 relays past 1,000: every relay fetches every
        /// consensus, so the work of a period grows as the square of the
        /// relays)
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(2..=3600))]
        interval: Option<u64>,
        #[command(flatten)]
        links: LinkShapingArgs,
    },
}

/// Distance and bottlenecks emulated on one machine (test networks only).
#[derive(clap::Args)]
struct LinkShapingArgs {
    /// Delay every byte each link sends by this many milliseconds (one
    /// way, each direction; 0 runs the emulation with no delay, to measure
    /// its own cost).
    #[arg(long, value_name = "MS")]
    link_delay: Option<u64>,
    /// Also pace each link at this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC", requires = "link_delay")]
    link_rate: Option<u64>,
    /// Limit every relay to this many bytes per second (its
    /// `bandwidth_rate`): queues then form at the relays, as on a real
    /// network, not at the machine's CPU.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    relay_rate: Option<u64>,
}

impl LinkShapingArgs {
    fn shaping(&self) -> Option<Shaping> {
        self.link_delay.map(|ms| Shaping {
            delay: Duration::from_millis(ms).min(Duration::from_secs(10)),
            rate: self.link_rate.filter(|&r| r > 0),
        })
    }
}

#[derive(Subcommand)]
enum DirauthAction {
    /// Create an identity key (keep it offline) and a first signing key.
    Keygen {
        /// Where to write the new identity key.
        #[arg(long, default_value = "identity.key")]
        identity: PathBuf,
        /// The server's data directory (default: from --config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How long the signing key's certificate is valid: 1 to 24 months.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=24))]
        months: u64,
    },
    /// Certify a new signing key with the identity key.
    Certify {
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How long the signing key's certificate is valid: 1 to 24 months.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=24))]
        months: u64,
    },
    /// Print the identity key that clients and relays pin.
    Fingerprint {
        /// An identity key file (default: read the certificate in the data dir).
        #[arg(long)]
        identity: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConsensusAction {
    /// Fetch the current consensus from one authority and print it as JSON.
    Show {
        /// e.g. http://127.0.0.1:7000
        #[arg(long)]
        authority: String,
        /// A client or relay config whose authority keys to check against.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Any config with an `authorities` list (client or relay).
#[derive(serde::Deserialize)]
struct PinnedOnly {
    authorities: Vec<AuthorityEntry>,
}

fn load<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))
}

/// `allium client-auth`: a fresh key pair for one client of `address`.
fn client_auth(address: &str, name: &str, out: &Path) -> Result<(), String> {
    use allium_proto::service::{ServiceAddress, auth::ClientAuthSecret};
    let address = ServiceAddress::parse(address).map_err(|e| format!("{address}: {e}"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
    {
        return Err(format!("--name {name:?}: letters, digits, - and _ only"));
    }
    let secret = ClientAuthSecret::generate(&mut rand::rng());
    let private = out.join(format!("{name}.auth_private"));
    let public = out.join(format!("{name}.auth"));
    let write = |path: &Path, text: &str, mode| {
        allium_directory::store::write_atomic(path, text.as_bytes(), mode)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    write(&private, &secret.to_line(&address), 0o600)?;
    write(&public, &format!("{}\n", secret.public()), 0o644)?;
    say!(
        "{}: the client's secret key; move it into the service_auth_dir of the client's config",
        private.display()
    );
    say!(
        "{}: move it into the authorized_clients/ directory in the service's directory, then restart the service",
        public.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let service = matches!(cli.cmd, Cmd::Service { .. });
    match cli.cmd {
        Cmd::Check { config, role } => {
            let r = allium::check::check(&config, role);
            say!("{r}");
            if r.ok() {
                Ok(())
            } else {
                Err(format!("{} is not usable as it is", config.display()))
            }
        }
        Cmd::Dirauth { config, action } => {
            let cfg: Option<AuthConfig> = config.as_deref().map(load).transpose()?;
            let data_dir = |d: Option<PathBuf>| {
                d.or_else(|| cfg.as_ref().map(|c| c.data_dir.clone()))
                    .ok_or_else(|| "give --data-dir or --config".to_string())
            };
            let now = allium_directory::unix_now();
            match action {
                Some(DirauthAction::Keygen {
                    identity,
                    data_dir: d,
                    months,
                }) => {
                    let id = keys::keygen(&identity, &data_dir(d)?, months, now)
                        .map_err(|e| e.to_string())?;
                    println!("{}", hex::encode(id));
                    eprintln!(
                        "Identity key written to {}: keep it offline.",
                        identity.display()
                    );
                    Ok(())
                }
                Some(DirauthAction::Certify {
                    identity,
                    data_dir: d,
                    months,
                }) => {
                    let c = keys::certify(&identity, &data_dir(d)?, months, now)
                        .map_err(|e| e.to_string())?;
                    println!(
                        "new signing key {} valid until {}",
                        hex::encode(c.signing_key),
                        c.valid_until
                    );
                    Ok(())
                }
                Some(DirauthAction::Fingerprint {
                    identity: Some(p), ..
                }) => {
                    println!(
                        "{}",
                        hex::encode(keys::fingerprint(&p).map_err(|e| e.to_string())?)
                    );
                    Ok(())
                }
                Some(DirauthAction::Fingerprint {
                    identity: None,
                    data_dir: d,
                }) => {
                    let s = keys::Signer::load(&data_dir(d)?).map_err(|e| e.to_string())?;
                    println!("{}", hex::encode(s.parsed.identity));
                    Ok(())
                }
                None => {
                    let cfg = cfg.ok_or("give --config")?;
                    let a = Authority::new(cfg).map_err(|e| e.to_string())?;
                    tokio::select! {
                        r = Arc::new(a).run() => r.map_err(|e| e.to_string()),
                        () = shutdown_signal() => Ok(()),
                    }
                }
            }
        }
        Cmd::Consensus {
            action: ConsensusAction::Show { authority, config },
        } => {
            let pinned = match config {
                Some(p) => {
                    let c: PinnedOnly = load(&p)?;
                    let keys = allium_directory::authority_keys(&c.authorities)
                        .map_err(|e| e.to_string())?;
                    c.authorities
                        .into_iter()
                        .map(|a| a.name)
                        .zip(keys)
                        .collect()
                }
                None => vec![],
            };
            let hostport = authority
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let addr: SocketAddr = match hostport.parse() {
                Ok(a) => a,
                // A name (`localhost:7000`): its first address.
                Err(_) => tokio::net::lookup_host(hostport)
                    .await
                    .map_err(|e| format!("--authority {authority}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("--authority {authority}: no address"))?,
            };
            let bytes = allium_directory::http::fetch_consensus(addr)
                .await
                .map_err(|e| e.to_string())?;
            let shown = show::consensus_json(&bytes, &pinned, allium_directory::unix_now())
                .map_err(|e| e.to_string())?;
            println!("{}", shown.json);
            match shown.valid {
                Some(false) => Err("the consensus is not valid for the pinned authorities".into()),
                _ => Ok(()),
            }
        }
        Cmd::Relay { config } => {
            shaping_from_env()?;
            let cfg: RelayConfig = load(&config)?;
            let r = Relay::new(cfg).map_err(|e| e.to_string())?;
            tokio::select! {
                r = r.run() => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
        Cmd::ClientAuth { address, name, out } => client_auth(&address, &name, &out),
        Cmd::Client { config } | Cmd::Service { config } => {
            shaping_from_env()?;
            let cfg: ClientConfig = load(&config)?;
            if service && cfg.services.is_empty() {
                return Err(format!(
                    "{}: no [[services]] to host (see examples/service.toml)",
                    config.display()
                ));
            }
            let c = Client::new(cfg).map_err(|e| e.to_string())?;
            tokio::select! {
                r = c.run() => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
        Cmd::Bench {
            json,
            quick,
            logs,
            links,
        } => {
            let work = allium::bench::run(
                json.as_deref(),
                logs.as_deref(),
                quick,
                links.shaping(),
                links.relay_rate,
            );
            tokio::select! {
                r = work => r.map(|_| ()),
                () = shutdown_signal() => Err("interrupted".into()),
            }
        }
        Cmd::Testnet {
            authorities,
            relays,
            socks,
            http_connect,
            data_dir,
            init_only,
            base_port,
            interval,
            links,
        } => {
            let opts = TestnetOptions {
                authorities,
                relays,
                interval_secs: interval.unwrap_or_else(|| testnet::interval_for(relays)),
                socks,
                http_connect,
                data_dir: data_dir.clone(),
                base_port,
                shaping: links.shaping(),
                relay_rate: links.relay_rate,
                ..Default::default()
            };
            if init_only {
                let dir = data_dir.ok_or("--init-only needs --data-dir")?;
                testnet::init(&opts, &dir).map_err(|e| e.to_string())?;
                say!(
                    "Wrote a test network to {}; see {}/README.md",
                    dir.display(),
                    dir.display()
                );
                return Ok(());
            }
            let shaping = opts.shaping;
            let mut net = Testnet::start(opts).await.map_err(|e| e.to_string())?;
            for a in &net.authorities {
                say!(
                    "Directory authority {} on http://{} (identity {})",
                    a.name,
                    a.addr,
                    hex::encode(a.identity)
                );
            }
            let ready = tokio::select! {
                r = net.wait_ready(Duration::from_secs(120)) => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Err("interrupted".into()),
            };
            if let Err(e) = ready {
                net.shutdown().await;
                return Err(e);
            }
            if let Some(s) = shaping {
                // Hop k of a circuit build takes k link round trips: 6 in
                // all. The first builds also set up links: not counted.
                let mut builds = Vec::new();
                for i in 0..8 {
                    let t = std::time::Instant::now();
                    if net.client.build_circuit(&ExitTarget::Any).await.is_ok() && i >= 3 {
                        builds.push(t.elapsed());
                    }
                }
                if let Some(m) = builds.iter().min() {
                    say!(
                        "Links delay what they send by {} ms: per-link round trip measured {:.1} ms (fastest circuit build / 6; expected {} ms)",
                        s.delay.as_millis(),
                        m.as_secs_f64() * 1000.0 / 6.0,
                        2 * s.delay.as_millis()
                    );
                }
            }
            say!("SOCKS5 proxy ready on socks5h://{}", net.socks_addr);
            if let Some(h) = net.http_addr {
                say!("HTTP CONNECT proxy ready on http://{h}");
            }
            match net.host_demo_service().await {
                Ok(a) => say!(
                    "Demo onion service at http://{a}/ (reachable once its log says so; try: curl --socks5-hostname {} http://{a}/)",
                    net.socks_addr
                ),
                Err(e) => say!("No demo onion service: {e}"),
            }
            let r = tokio::select! {
                why = net.wait_failure() => Err(why),
                () = shutdown_signal() => Ok(()),
            };
            net.shutdown().await;
            r
        }
    }
}

/// Link shaping from the environment, as a test network passes it to the
/// processes it starts; said loudly, since it slows every link.
fn shaping_from_env() -> Result<(), String> {
    let s = allium_link::shaping::from_env()?;
    if let Some(s) = s {
        tracing::warn!(
            delay_ms = s.delay.as_millis() as u64,
            rate = s.rate,
            "every link is delayed ({} is set): for test networks only",
            allium_link::shaping::ENV
        );
    }
    allium_link::shaping::set(s);
    Ok(())
}

/// Whether the effective user is root (from `/proc/self/status`, Linux).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            uids.split_whitespace().nth(2).map(|e| e == "0")
        })
        .unwrap_or(false)
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    let spec = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok());
    let prefix: &'static str = Box::leak(format!("{}: ", cli.cmd.role()).into_boxed_str());
    tracing_subscriber::fmt()
        .with_env_filter(allium::log_filter(spec.as_deref()))
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .with_writer(move || LogLine(prefix))
        .init();
    let daemon = matches!(
        cli.cmd,
        Cmd::Relay { .. }
            | Cmd::Client { .. }
            | Cmd::Service { .. }
            | Cmd::Dirauth { action: None, .. }
    );
    if daemon && running_as_root() {
        tracing::warn!(
            "running as root: Allium needs no privileges (a port below 1024 needs only \
             CAP_NET_BIND_SERVICE); run it as its own user, as contrib/systemd/ does"
        );
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("allium: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("allium: {e}");
            ExitCode::FAILURE
        }
    }
}
