//! The control port against real controllers: raw connections that break
//! the rules, and stem (Tor's Python controller library) watching and
//! steering a client of a test network (`tests/control_stem.py`).
//!
//! The stem test needs `python3` with stem (`pip install stem`); without it
//! the test is skipped, unless `ALLIUM_CI_TOOLS` is set (as `.ci/run` does),
//! when it fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use allium_client::control::{ControlPort, MAX_CONTROLLERS};
use allium_client::{Client, ClientConfig};
use allium_directory::AuthorityEntry;
use allium_proto::control::HashedPassword;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// A controller speaking the protocol by hand.
struct Raw {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(a: SocketAddr) -> Raw {
        let (r, w) = tokio::net::TcpStream::connect(a)
            .await
            .unwrap()
            .into_split();
        Raw {
            r: BufReader::new(r),
            w,
        }
    }

    async fn send(&mut self, line: &str) {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    /// The next line without its CRLF; `None` once the server closed.
    async fn line(&mut self, within: Duration) -> Option<String> {
        let mut l = String::new();
        let n = tokio::time::timeout(within, self.r.read_line(&mut l))
            .await
            .expect("a line in time")
            .unwrap_or(0);
        (n > 0).then(|| l.trim_end_matches(['\r', '\n']).to_string())
    }

    /// The lines of the next reply (events skipped).
    async fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self
                .line(Duration::from_secs(10))
                .await
                .expect("a reply, not a close");
            if l.starts_with("650 ") {
                continue;
            }
            let end = l.as_bytes().get(3) == Some(&b' ');
            lines.push(l);
            if end {
                return lines;
            }
        }
    }

    /// Does the server close the connection within `within`?
    async fn closed(&mut self, within: Duration) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(within, self.r.read_to_end(&mut rest)).await,
            Ok(Ok(_))
        ) && rest.is_empty()
    }

    /// The next event line containing `what`.
    async fn event(&mut self, what: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let l = self.line(left).await.expect("an event, not a close");
            if l.starts_with("650 ") && l.contains(what) {
                return l;
            }
        }
    }
}

fn cookie_hex(path: &str) -> String {
    hex::encode(std::fs::read(path).unwrap())
}

/// A client whose authority is nowhere: enough to serve a control port.
fn lone_client(dir: &Path) -> Client {
    Client::new(ClientConfig {
        data_dir: dir.join("client"),
        authorities: vec![AuthorityEntry {
            name: "auth0".into(),
            addr: "127.0.0.1:9".parse().unwrap(),
            key: "00".repeat(32),
        }],
        socks_listen: vec![],
        ..ClientConfig::default()
    })
    .unwrap()
}

/// Serve `client`'s control port on a free loopback port: its address and
/// the cookie file.
async fn serve_control(client: &Client) -> (SocketAddr, String) {
    let port = ControlPort::new(client).unwrap();
    let cookie = port.cookie_file().to_string();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(port.serve(l));
    (addr, cookie)
}

#[tokio::test]
async fn the_control_port_admits_only_the_cookies_holder() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let client = lone_client(dir.path());
    let (ctl, cookie) = serve_control(&client).await;
    let meta = std::fs::metadata(&cookie).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        Path::new(&cookie),
        std::fs::canonicalize(dir.path().join("client/control_auth_cookie")).unwrap()
    );
    let secs = Duration::from_secs;

    // Anything but the authentication commands first: refused, closed.
    let mut c = Raw::connect(ctl).await;
    c.send("GETINFO version").await;
    assert_eq!(
        c.line(secs(5)).await.as_deref(),
        Some("514 Authentication required.")
    );
    assert!(c.closed(secs(5)).await);

    // A wrong cookie: refused, closed.
    let mut c = Raw::connect(ctl).await;
    c.send("PROTOCOLINFO 1").await;
    let r = c.reply().await;
    assert_eq!(
        r[1],
        format!("250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE=\"{cookie}\"")
    );
    c.send(&format!("AUTHENTICATE {}", hex::encode([0u8; 32])))
        .await;
    assert_eq!(
        c.line(secs(5)).await.as_deref(),
        Some("515 Authentication failed: Authentication cookie did not match expected value.")
    );
    assert!(c.closed(secs(5)).await);

    // The cookie admits.
    let mut c = Raw::connect(ctl).await;
    c.send(&format!("AUTHENTICATE {}", cookie_hex(&cookie)))
        .await;
    assert_eq!(c.reply().await, ["250 OK"]);
    c.send("GETINFO version circuit-status").await;
    assert_eq!(
        c.reply().await,
        [
            "250-version=0.4.9.0-allium-0.1.0",
            "250-circuit-status=",
            "250 OK"
        ]
    );
    c.send("GETINFO version nope").await;
    assert_eq!(c.reply().await, ["552 Unrecognized key \"nope\""]);
    c.send("SETEVENTS CIRC NOPE").await;
    assert_eq!(c.reply().await, ["552 Unrecognized event \"NOPE\""]);
    c.send("SIGNAL NEWNYM").await;
    assert_eq!(c.reply().await, ["250 OK"]);
    c.send("QUIT").await;
    assert_eq!(c.reply().await, ["250 closing connection"]);
    assert!(c.closed(secs(5)).await);

    // A controller that never authenticates is closed after 10 s...
    let mut c = Raw::connect(ctl).await;
    let t = Instant::now();
    assert!(c.closed(secs(20)).await);
    let waited = t.elapsed();
    assert!(waited >= secs(9) && waited < secs(15), "{waited:?}");

    // ... one with an endless line at once ...
    let mut c = Raw::connect(ctl).await;
    c.w.write_all(&[b'A'; 20 << 10]).await.unwrap();
    assert_eq!(
        c.line(secs(5)).await.as_deref(),
        Some("500 Command too long")
    );
    assert!(c.closed(secs(5)).await);

    // ... and the oldest of those not yet authenticated makes room for a
    // newcomer when the port is full; authenticated ones stay.
    let mut admitted = Raw::connect(ctl).await;
    admitted
        .send(&format!("AUTHENTICATE {}", cookie_hex(&cookie)))
        .await;
    assert_eq!(admitted.reply().await, ["250 OK"]);
    let mut idle = Vec::new();
    for _ in 1..MAX_CONTROLLERS {
        idle.push(Raw::connect(ctl).await);
        // Admitted in order.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut newcomer = Raw::connect(ctl).await;
    assert!(
        idle[0].closed(secs(5)).await,
        "the oldest idle one was kept"
    );
    newcomer.send("PROTOCOLINFO").await;
    assert_eq!(newcomer.reply().await.last().unwrap(), "250 OK");
    admitted.send("GETINFO traffic/read").await;
    assert_eq!(admitted.reply().await, ["250-traffic/read=0", "250 OK"]);
}

/// An HTTP server that answers "ok".
async fn web() -> SocketAddr {
    common::serve_bytes(b"ok".to_vec()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stem_watches_and_steers_a_client() {
    let stem = std::process::Command::new("python3")
        .args(["-c", "import stem"])
        .output();
    if !stem.as_ref().is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("ALLIUM_CI_TOOLS").is_none(),
            "stem is missing: `python3 -c 'import stem'` failed (pip install stem): {stem:?}"
        );
        eprintln!("stem is not installed (pip install stem): skipped");
        return;
    }
    let web = web().await;
    let net = common::small_net(4).await;

    // A client of our own on the network, with a control port, no spare
    // circuits (so that NEWNYM makes the next stream build one) and a
    // password as well as the cookie.
    let dir = tempfile::tempdir().unwrap();
    let socks = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socks_addr = socks.local_addr().unwrap();
    let password = "correct horse";
    let client = Client::new(ClientConfig {
        data_dir: dir.path().join("client"),
        socks_listen: vec![socks_addr],
        http_connect_listen: vec![],
        preemptive_circuits: 0,
        control_password_hash: Some(
            HashedPassword::new(&mut rand::rng(), password.as_bytes()).to_string(),
        ),
        ..net.client_config.clone()
    })
    .unwrap();
    let (ctl, cookie) = serve_control(&client).await;

    // Watch the bootstrap from its start.
    let mut raw = Raw::connect(ctl).await;
    raw.send(&format!("AUTHENTICATE {}", cookie_hex(&cookie)))
        .await;
    assert_eq!(raw.reply().await, ["250 OK"]);
    raw.send("SETEVENTS STATUS_CLIENT").await;
    assert_eq!(raw.reply().await, ["250 OK"]);
    tokio::spawn(client.clone().serve(vec![socks], vec![]));
    let minute = Duration::from_secs(60);
    assert_eq!(
        raw.event("PROGRESS=100", minute).await,
        "650 STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY=\"Done\""
    );
    assert_eq!(
        raw.event("STATUS_CLIENT", minute).await,
        "650 STATUS_CLIENT NOTICE CIRCUIT_ESTABLISHED"
    );
    tokio::time::timeout(minute, client.wait_bootstrapped())
        .await
        .unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/control_stem.py");
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            ctl.port().to_string(),
            socks_addr.port().to_string(),
            web.port().to_string(),
            password.to_string(),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the stem script finished in time")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("stem: all checks passed"),
        "the stem script failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("{stdout}");
    net.shutdown().await;
}
