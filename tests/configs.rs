//! The example configs parse, and `allium testnet --init-only` writes a
//! network whose configs parse and point at each other.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use allium::testnet::{TestnetOptions, init};
use allium_client::ClientConfig;
use allium_directory::AuthConfig;
use allium_relay::RelayConfig;

fn load<T: serde::de::DeserializeOwned>(p: &Path) -> T {
    toml::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn example_configs_parse() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let a: AuthConfig = load(&ex.join("dirauth.toml"));
    assert_eq!(a.interval_secs, AuthConfig::default().interval_secs);
    assert_eq!(a.valid_intervals, AuthConfig::default().valid_intervals);
    assert_eq!(
        a.guard_min_uptime_secs,
        AuthConfig::default().guard_min_uptime_secs
    );
    assert_eq!(
        a.stable_min_uptime_secs,
        AuthConfig::default().stable_min_uptime_secs
    );
    assert_eq!(
        a.hsdir_min_uptime_secs,
        AuthConfig::default().hsdir_min_uptime_secs
    );
    assert_eq!(a.request_burst, AuthConfig::default().request_burst);
    assert_eq!(a.metrics_listen, None);
    assert_eq!(
        allium_directory::authority_keys(&a.authorities)
            .unwrap()
            .len(),
        3
    );
    let r: RelayConfig = load(&ex.join("relay.toml"));
    r.check().unwrap();
    assert_eq!(
        r.onion_key_lifetime_secs,
        RelayConfig::default().onion_key_lifetime_secs
    );
    assert!(!r.policy().unwrap().is_exit());
    assert_eq!(r.max_queued_bytes, RelayConfig::default().max_queued_bytes);
    assert_eq!(
        r.dos_circuit_burst,
        RelayConfig::default().dos_circuit_burst
    );
    assert_eq!(
        r.dos_max_connections_per_addr,
        RelayConfig::default().dos_max_connections_per_addr
    );
    assert_eq!(r.metrics_listen, None);
    let s: ClientConfig = load(&ex.join("service.toml"));
    s.check().unwrap();
    assert_eq!(s.services.len(), 1);
    let d = allium_client::service::ServiceConfig::default();
    assert_eq!(
        (
            s.services[0].intro_points,
            s.services[0].intro_rate,
            s.services[0].intro_burst
        ),
        (d.intro_points, d.intro_rate, d.intro_burst)
    );
    assert!(s.socks_listen.is_empty());
    let c: ClientConfig = load(&ex.join("client.toml"));
    c.check().unwrap();
    assert!(c.services.is_empty());
    assert_eq!(
        c.max_circuit_dirtiness_secs,
        ClientConfig::default().max_circuit_dirtiness_secs
    );
    assert_eq!(
        c.guard_lifetime_secs,
        ClientConfig::default().guard_lifetime_secs
    );
    assert_eq!(c.guard_retry_secs, ClientConfig::default().guard_retry_secs);
    assert_eq!(
        c.preemptive_circuits,
        ClientConfig::default().preemptive_circuits
    );
    assert_eq!(
        c.circuit_build_timeout_min_ms,
        ClientConfig::default().circuit_build_timeout_min_ms
    );
    // Unknown keys are errors, not silently ignored.
    assert!(toml::from_str::<ClientConfig>("socks_listen = []\nsocks_port = 9050\n").is_err());
}

#[test]
fn client_auth_writes_a_key_pair_the_service_and_the_client_read() {
    use allium_proto::service::ServiceAddress;
    use allium_proto::service::auth::{ClientAuthKey, ClientAuthSecret};
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let address = ServiceAddress::from_key(&key.verifying_key().to_bytes()).unwrap();
    let exe = env!("CARGO_BIN_EXE_allium");
    let run = |addr: &str, name: &str| {
        std::process::Command::new(exe)
            .args(["client-auth", "--address", addr, "--name", name, "--out"])
            .arg(d.path())
            .output()
            .unwrap()
    };
    let out = run(&address.to_string(), "alice");
    assert!(out.status.success(), "{out:?}");
    let private = d.path().join("alice.auth_private");
    let secret = std::fs::read_to_string(&private).unwrap();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (for_address, secret) = ClientAuthSecret::parse_line(&secret).unwrap();
    assert_eq!(for_address, address);
    let public = std::fs::read_to_string(d.path().join("alice.auth")).unwrap();
    assert_eq!(ClientAuthKey::parse(&public).unwrap(), secret.public());
    // A mistyped address or a name that is a path: refused, nothing written.
    let typo = format!("a{}", &address.to_string()[1..]);
    let typo = if typo == address.to_string() {
        format!("b{}", &typo[1..])
    } else {
        typo
    };
    assert!(!run(&typo, "bob").status.success());
    assert!(!run(&address.to_string(), "../bob").status.success());
    assert!(!d.path().join("bob.auth").exists());
    assert!(!d.path().parent().unwrap().join("bob.auth").exists());
}

#[test]
fn init_only_writes_a_runnable_network() {
    let d = tempfile::tempdir().unwrap();
    let opts = TestnetOptions {
        base_port: Some(17000),
        ..Default::default()
    };
    init(&opts, d.path()).unwrap();
    let a: AuthConfig = load(&d.path().join("auth0/config.toml"));
    let key = hex::encode(
        allium_directory::Authority::new(a.clone())
            .unwrap()
            .identity(),
    );
    assert_eq!(a.authorities.len(), 3);
    assert!(d.path().join("auth0/offline/identity.key").exists());
    for i in 0..3 {
        let ai: AuthConfig = load(&d.path().join(format!("auth{i}/config.toml")));
        assert_eq!(ai.authorities, a.authorities);
    }
    for i in 0..6 {
        let r: RelayConfig = load(&d.path().join(format!("relay{i}/config.toml")));
        r.check().unwrap();
        assert_eq!(r.authorities, a.authorities);
        assert_eq!(r.authorities[0].key, key);
        assert_eq!(r.authorities[0].addr, a.listen);
        assert_eq!(r.policy().unwrap().is_exit(), i < 2);
        assert!(
            d.path()
                .join(format!("relay{i}/keys/identity.key"))
                .exists()
        );
    }
    let c: ClientConfig = load(&d.path().join("client/config.toml"));
    c.check().unwrap();
    assert_eq!(c.authorities[0].key, key);
    let readme = std::fs::read_to_string(d.path().join("README.md")).unwrap();
    assert!(readme.contains("allium relay --config relay5/config.toml"));

    // The operator's commands on these keys: the identity's fingerprint is
    // the key clients pin; the signing key where the identity belongs, or
    // a certificate for 30 months, is refused with exit code 1 or 2.
    let exe = env!("CARGO_BIN_EXE_allium");
    let dirauth = |args: &[&str]| {
        std::process::Command::new(exe)
            .arg("dirauth")
            .args(args)
            .current_dir(d.path())
            .output()
            .unwrap()
    };
    let out = dirauth(&["fingerprint", "--identity", "auth0/offline/identity.key"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), key);
    let out = dirauth(&["fingerprint", "--identity", "auth0/keys/signing.key"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds an authority signing key"), "{err}");
    let out = dirauth(&[
        "--config",
        "auth0/config.toml",
        "certify",
        "--identity",
        "auth0/offline/identity.key",
        "--months",
        "30",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1..=24"));

    // `allium check` passes every role's config as written, and fails a
    // relay whose identity key others can read.
    let check = |cfg: &str| {
        std::process::Command::new(exe)
            .args(["check", "--config", cfg])
            .current_dir(d.path())
            .output()
            .unwrap()
    };
    for cfg in ["auth0", "relay0", "client"] {
        let out = check(&format!("{cfg}/config.toml"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.ends_with("OK\n"),
            "{cfg}: {text}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let key = d.path().join("relay0/keys/identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check("relay0/config.toml");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("chmod 600"));
}

/// Kills the processes it holds, by pid, when dropped.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The configs of a network of three relays (one exit) written to a fresh
/// directory, on the first block of free loopback ports from `from`
/// (authority, relays, SOCKS); the directory and the block's first port.
fn small_network(from: u16) -> (tempfile::TempDir, u16) {
    let base = common::free_block(from, 10);
    let d = tempfile::tempdir().unwrap();
    let opts = TestnetOptions {
        relays: 3,
        exits: 1,
        base_port: Some(base),
        ..Default::default()
    };
    init(&opts, d.path()).unwrap();
    (d, base)
}

/// `--init-only`, then every role as its own process, then a fetch through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_run_the_network() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (d, base) = small_network(27000);
    // Metrics on an authority, a relay and the client.
    for (cfg, port) in [
        ("auth0/config.toml", 7),
        ("relay0/config.toml", 8),
        ("client/config.toml", 9),
    ] {
        let p = d.path().join(cfg);
        let mut t: toml::Table = std::fs::read_to_string(&p).unwrap().parse().unwrap();
        t.insert(
            "metrics_listen".into(),
            format!("127.0.0.1:{}", base + port).into(),
        );
        std::fs::write(&p, t.to_string()).unwrap();
    }

    // Something to fetch.
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_port = web.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = web.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });

    let exe = env!("CARGO_BIN_EXE_allium");
    // Each process logs to a file, shown if the network never answers.
    let logs = d.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let spawn = |role: &str, cfg: &str| {
        let log = std::fs::File::create(logs.join(cfg.replace('/', "-"))).unwrap();
        Command::new(exe)
            .args([role, "--config", &d.path().join(cfg).to_string_lossy()])
            // With the self-test's inconclusive tries, which say why.
            .env("RUST_LOG", "info,allium_relay::status=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let mut procs = Procs(
        (0..3)
            .map(|i| spawn("dirauth", &format!("auth{i}/config.toml")))
            .collect(),
    );
    for i in 0..3 {
        procs
            .0
            .push(spawn("relay", &format!("relay{i}/config.toml")));
    }
    procs.0.push(spawn("client", "client/config.toml"));
    let socks = format!("127.0.0.1:{}", base + 6);

    // Ask until the client is bootstrapped (bounded).
    let start = Instant::now();
    let body = loop {
        if start.elapsed() > Duration::from_secs(60) {
            for e in std::fs::read_dir(&logs).unwrap().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- {:?}", e.file_name());
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
            panic!("no answer through the network");
        }
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "5", "--socks5-hostname", &socks])
            .arg(format!("http://localhost:{web_port}/"))
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => break o.stdout,
            Ok(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(_) => return, // no curl on this machine: nothing more to check
        }
    };
    assert_eq!(body, b"hello");

    // The relay says where it stands, and beats on SIGUSR1.
    let relay0 = procs.0[3].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-USR1", &relay0])
            .status()
            .unwrap()
            .success()
    );
    let log = logs.join("relay0-config.toml");
    let mut text = String::new();
    // Up to two minutes: a self-test that learnt nothing (the relay it went
    // through reused a link this one opened) is tried again after 10, 20
    // and 40 s.
    for _ in 0..600 {
        text = std::fs::read_to_string(&log).unwrap();
        if text.contains("heartbeat: up")
            && text.contains("listed in the consensus: flags")
            && text.contains("ORPort reachable")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for said in [
        "descriptor accepted by 3 of 3 authorities",
        "listed in the consensus: flags Running, Valid, Exit",
        "heartbeat: up",
        "ORPort reachable from outside: a circuit through another relay came back",
    ] {
        assert!(text.contains(said), "{said:?} not in {text}");
    }

    // Every role's metrics: OpenMetrics when asked for, else Prometheus'
    // text format, which `promtool check metrics` accepts where installed.
    for port in [7, 8, 9] {
        let at = format!("http://127.0.0.1:{}/metrics", base + port);
        let open = Command::new("curl")
            .args(["-s", "-H", "Accept: application/openmetrics-text", &at])
            .output()
            .unwrap();
        assert!(open.stdout.ends_with(b"# EOF\n"), "{at}");
        let text = Command::new("curl").args(["-s", &at]).output().unwrap();
        let text = String::from_utf8(text.stdout).unwrap();
        assert!(text.contains("# TYPE allium_"), "{at}: {text}");
        let promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        assert!(
            promtool.is_ok() || std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
            "promtool is not installed"
        );
        if let Ok(mut p) = promtool {
            use std::io::Write;
            p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{at}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if port == 7 {
            let value = |name: &str| -> u64 {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{name} in {text}"))
            };
            let accepted = "allium_dirauth_descriptors_received_total{outcome=\"accepted\"}";
            assert!(value(accepted) >= 3, "{text}");
            assert!(value("allium_dirauth_consensuses_published_total ") >= 1);
            assert_eq!(value("allium_dirauth_consensus_signatures "), 3);
        }
    }

    // `consensus show` against the client's pinned keys, at a name: valid,
    // each signer named as the config names it.
    let c: ClientConfig = load(&d.path().join("client/config.toml"));
    let at = format!("http://localhost:{}/", c.authorities[0].addr.port());
    let show = |cfg: &Path| {
        Command::new(exe)
            .args(["consensus", "show", "--authority", &at, "--config"])
            .arg(cfg)
            .output()
            .unwrap()
    };
    let out = show(&d.path().join("client/config.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "valid");
    let signers: Vec<&str> = v["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["authority"].as_str())
        .collect();
    assert!(
        signers.contains(&c.authorities[0].name.as_str()),
        "{signers:?}"
    );
    // Pinned keys that are not these authorities' (the relays'): the
    // verdict is "not valid" and the exit code says so.
    let wrong: String = v["relays"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "[[authorities]]\nname = \"not{i}\"\naddr = \"127.0.0.1:1\"\nkey = {}\n",
                r["identity"]
            )
        })
        .collect();
    let wrong_cfg = d.path().join("wrong-keys.toml");
    std::fs::write(&wrong_cfg, wrong).unwrap();
    let out = show(&wrong_cfg);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["verdict"].as_str().unwrap().starts_with("not valid"));
}

/// A relay's log lines name the role, carry no colour codes when stderr is
/// not a terminal, and a closed stderr does not stop it.
#[test]
fn daemons_log_plainly_and_survive_a_closed_stderr() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let (d, _) = small_network(29000);
    let exe = env!("CARGO_BIN_EXE_allium");
    let cfg = d.path().join("relay2/config.toml");
    let relay = || {
        Command::new(exe)
            .args(["relay", "--log-level", "debug", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // With no authority up, the relay keeps logging its upload retries.
    let mut first = Procs(vec![relay()]);
    std::thread::sleep(Duration::from_secs(2));
    let mut err = first.0[0].stderr.take().unwrap();
    let _ = first.0[0].kill();
    let mut text = String::new();
    err.read_to_string(&mut text).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    // Root is told it needs no privileges.
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert_eq!(
        text.contains("WARN") && text.contains("running as root"),
        root,
        "{text}"
    );
    for line in text.lines() {
        assert!(line.starts_with("relay: "), "{line:?}");
        assert!(!line.contains('\u{1b}'), "colour codes in {line:?}");
    }
    // The same with its stderr closed at once: it keeps running.
    let mut second = Procs(vec![relay()]);
    drop(second.0[0].stderr.take());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        second.0[0].try_wait().unwrap().is_none(),
        "the relay died when its stderr closed"
    );
}

/// The hardened systemd units in `contrib/` are valid units
/// (`systemd-analyze verify`, where systemd is installed) for the binary
/// this build makes, and keep their hardening.
#[test]
fn systemd_units_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let exe = env!("CARGO_BIN_EXE_allium");
    let have = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        have || std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
        "systemd-analyze is not installed"
    );
    let tmp = tempfile::tempdir().unwrap();
    for role in ["dirauth", "relay", "client"] {
        let name = format!("allium-{role}.service");
        let unit = std::fs::read_to_string(dir.join(&name)).unwrap();
        for must in [
            "User=allium",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "CapabilityBoundingSet=\n",
            &format!("StateDirectory=allium/{role}"),
            &format!("ExecStart=/usr/local/bin/allium {role} --config"),
        ] {
            assert!(unit.contains(must), "{name} lacks {must:?}");
        }
        if !have {
            continue;
        }
        let here = tmp.path().join(&name);
        std::fs::write(&here, unit.replace("/usr/local/bin/allium", exe)).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&here)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "{name}: {err}"
        );
    }
}
