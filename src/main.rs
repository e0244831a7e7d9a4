//! `allium`: run a directory authority, a relay, a client, or a whole
//! network on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use allium::testnet::{self, Testnet, TestnetOptions};
use allium_client::{Client, ClientConfig};
use allium_directory::{AuthConfig, Authority};
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a directory authority.
    Dirauth {
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        action: Option<DirauthAction>,
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
    /// Run a whole network on loopback: an authority, relays and a client.
    Testnet {
        /// Number of relays (the first two are exits).
        #[arg(long, default_value_t = 6)]
        relays: usize,
        /// SOCKS5 listen address (default: a free loopback port).
        #[arg(long)]
        socks: Option<SocketAddr>,
        /// Keep keys and configs here instead of a temporary directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only write the network's configs and keys to --data-dir.
        #[arg(long, requires = "data_dir")]
        init_only: bool,
        /// First port of the block of loopback ports to use.
        #[arg(long)]
        base_port: Option<u16>,
    },
}

#[derive(Subcommand)]
enum DirauthAction {
    /// Print the authority's public key (creating it if needed).
    Fingerprint,
}

fn load<T: DeserializeOwned>(path: &Path) -> Result<T, String> {
    let s = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))
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
    match cli.cmd {
        Cmd::Dirauth { config, action } => {
            let cfg: AuthConfig = load(&config)?;
            let a = Authority::new(cfg).map_err(|e| e.to_string())?;
            if let Some(DirauthAction::Fingerprint) = action {
                println!("{}", hex::encode(a.public_key()));
                return Ok(());
            }
            tokio::select! {
                r = Arc::new(a).run() => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
        Cmd::Relay { config } => {
            let cfg: RelayConfig = load(&config)?;
            let r = Relay::new(cfg).map_err(|e| e.to_string())?;
            tokio::select! {
                r = r.run() => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
        Cmd::Client { config } => {
            let cfg: ClientConfig = load(&config)?;
            let c = Client::new(cfg).map_err(|e| e.to_string())?;
            tokio::select! {
                r = c.run() => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Ok(()),
            }
        }
        Cmd::Testnet {
            relays,
            socks,
            data_dir,
            init_only,
            base_port,
        } => {
            let opts = TestnetOptions {
                relays,
                socks,
                data_dir: data_dir.clone(),
                base_port,
                ..Default::default()
            };
            if init_only {
                let dir = data_dir.ok_or("--init-only needs --data-dir")?;
                testnet::init(&opts, &dir).map_err(|e| e.to_string())?;
                println!(
                    "Wrote a test network to {}; see {}/README.md",
                    dir.display(),
                    dir.display()
                );
                return Ok(());
            }
            let mut net = Testnet::start(opts).await.map_err(|e| e.to_string())?;
            println!("Directory authority on http://{}", net.auth_addr);
            let ready = tokio::select! {
                r = net.wait_ready(Duration::from_secs(120)) => r.map_err(|e| e.to_string()),
                () = shutdown_signal() => Err("interrupted".into()),
            };
            if let Err(e) = ready {
                net.shutdown().await;
                return Err(e);
            }
            println!("SOCKS5 proxy ready on socks5h://{}", net.socks_addr);
            let r = tokio::select! {
                why = net.wait_failure() => Err(why),
                () = shutdown_signal() => Ok(()),
            };
            net.shutdown().await;
            r
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
