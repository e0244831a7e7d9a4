//! The control port: Tor's control protocol (the subset in
//! `doc/control.md`) over TCP on loopback, so that stem, nyx and other
//! Tor controllers can watch the client's circuits, streams and traffic,
//! ask for new circuits (SIGNAL NEWNYM) and change the circuit dirtiness.
//!
//! The protocol itself (framing, parsing, authentication, formatting) is
//! the sans-IO code in [`allium_proto::control`]; this module owns the
//! socket: one task per controller that reads commands, answers those
//! that need the client, and writes the events it subscribed to.
//!
//! Admission: [`ControlPort::new`] writes a fresh 32-byte cookie to
//! `data_dir/control_auth_cookie` (mode 0600, atomically); a controller
//! must prove it can read that file (COOKIE or SAFECOOKIE) or know the
//! configured password before anything but PROTOCOLINFO, AUTHCHALLENGE,
//! AUTHENTICATE and QUIT. Connections are admitted through the process'
//! [`Gate`] like every listener's, and at most [`MAX_CONTROLLERS`] at
//! once: when full, the oldest not yet authenticated is shed for a
//! newcomer (with all authenticated, the newcomer is closed). Before
//! authenticating, a connection is closed if a command takes longer than
//! [`AUTH_LINE_TIMEOUT`] to arrive. A command is at most
//! [`allium_proto::control::MAX_COMMAND`] bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allium_link::listen::{Gate, Slot};
use allium_proto::control::{
    AuthConfig, Code, Command, Cookie, Reply, Session, Setting, Step, TooLong, bootstrap_status,
    event, quote, take_command,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::time::{Instant, Interval};
use tracing::{Instrument, debug, info};

use crate::events::ClientEvent;
use crate::{Client, ClientError, Phase};

/// The cookie file's name in the data directory (Tor's).
pub const COOKIE_FILE: &str = "control_auth_cookie";
/// Control connections open at once, authenticated or not.
pub const MAX_CONTROLLERS: usize = 16;
/// Before authentication, each command (the first included) must arrive
/// within this long.
pub const AUTH_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// A controller that does not read its replies and events for this long
/// is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest MaxCircuitDirtiness (Tor's bound: 30 days).
const MAX_DIRTINESS_SECS: u64 = 30 * 24 * 3600;

/// The version the control port reports: stem and nyx parse it as a Tor
/// version and turn features on by it, so it claims the Tor release whose
/// control protocol this subset follows, and names Allium and its version
/// in the status part (`0.4.9.0-allium-0.1.0`).
pub fn version() -> String {
    format!("0.4.9.0-allium-{}", env!("CARGO_PKG_VERSION"))
}

/// Events a controller may ask for. stem asks for SIGNAL, CONF_CHANGED
/// and STATUS_SERVER on connecting (to keep its caches right); a client
/// has no STATUS_SERVER events to send, as Tor's clients have none.
const EVENTS: [&str; 7] = [
    "CIRC",
    "STREAM",
    "BW",
    "STATUS_CLIENT",
    "SIGNAL",
    "CONF_CHANGED",
    "STATUS_SERVER",
];

/// GETINFO keys, with what they give (`GETINFO info/names`).
const INFO_KEYS: [(&str, &str); 15] = [
    ("version", "The version, as a Tor version."),
    ("status/bootstrap-phase", "The most recent bootstrap phase."),
    (
        "status/circuit-established",
        "Whether a circuit has been built.",
    ),
    (
        "status/enough-dir-info",
        "Whether a usable consensus is held.",
    ),
    ("circuit-status", "The circuits being built or open."),
    ("stream-status", "The streams not yet closed."),
    ("traffic/read", "Application bytes read from the network."),
    (
        "traffic/written",
        "Application bytes written to the network.",
    ),
    ("uptime", "Seconds since the client started."),
    ("process/pid", "The process id."),
    ("net/listeners/socks", "The SOCKS listeners."),
    ("net/listeners/httptunnel", "The HTTP CONNECT listeners."),
    ("net/listeners/control", "The control listener."),
    ("events/names", "The events SETEVENTS accepts."),
    ("features/names", "The features USEFEATURE accepts."),
];

/// Configuration keys GETCONF knows; only MaxCircuitDirtiness can be set.
const CONF_KEYS: [&str; 7] = [
    "SocksPort",
    "HTTPTunnelPort",
    "ControlPort",
    "DataDirectory",
    "MaxCircuitDirtiness",
    "CookieAuthentication",
    "__OwningControllerProcess",
];

/// A client's control port, ready to serve.
pub struct ControlPort {
    client: Client,
    auth: Arc<AuthConfig>,
}

impl ControlPort {
    /// Write a fresh cookie file for `client` and prepare to admit
    /// controllers with it (and with the configured password, if any).
    pub fn new(client: &Client) -> Result<Self, ClientError> {
        let cfg = client.config();
        let password = cfg.control_password()?;
        let cookie = Cookie::random(&mut rand::rng());
        let path = cfg.data_dir.join(COOKIE_FILE);
        allium_directory::store::write_atomic(&path, cookie.as_bytes(), 0o600)?;
        let path = std::fs::canonicalize(&path)?;
        Ok(ControlPort {
            client: client.clone(),
            auth: Arc::new(AuthConfig {
                cookie,
                cookie_file: path.to_string_lossy().into_owned(),
                password,
                version: version(),
            }),
        })
    }

    /// The cookie file's absolute path.
    pub fn cookie_file(&self) -> &str {
        &self.auth.cookie_file
    }

    /// Serve controllers on `listener` for ever.
    pub async fn serve(self, listener: TcpListener) {
        // A place among the process' inbound connections, as on every
        // listener, and one among the controllers.
        let gate = Gate::process();
        let controllers = Gate::new(MAX_CONTROLLERS);
        let local = listener.local_addr().ok();
        loop {
            let (sock, _, slot) = allium_link::listen::accept(&listener, &gate).await;
            let Some(own) = controllers.admit() else {
                debug!("control connection closed: {MAX_CONTROLLERS} controllers authenticated");
                continue;
            };
            let slots = [slot, own];
            let conn = Conn {
                client: self.client.clone(),
                auth: self.auth.clone(),
                local,
                session: Session::new(),
                subs: Subscriptions::default(),
                rx: None,
                bw: None,
            };
            tokio::spawn(
                async move {
                    if let Err(e) = conn.run(sock, slots).await {
                        debug!("control connection: {e}");
                    }
                }
                .in_current_span(),
            );
        }
    }
}

#[derive(Default)]
struct Subscriptions {
    circ: bool,
    stream: bool,
    bw: bool,
    status: bool,
    signal: bool,
    conf: bool,
}

impl Subscriptions {
    /// Any of the events that come from the client's hub.
    fn hub(&self) -> bool {
        self.circ || self.stream || self.status || self.signal || self.conf
    }
}

/// One controller's connection.
struct Conn {
    client: Client,
    auth: Arc<AuthConfig>,
    /// The control listener's address.
    local: Option<SocketAddr>,
    session: Session,
    subs: Subscriptions,
    /// The client's events, while any but BW is asked for.
    rx: Option<broadcast::Receiver<ClientEvent>>,
    /// While BW is asked for: the one-second ticks and the totals at the
    /// last one.
    bw: Option<(Interval, (u64, u64))>,
}

async fn write(w: &mut OwnedWriteHalf, bytes: &[u8]) -> Result<(), ClientError> {
    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(bytes))
        .await
        .map_err(|_| ClientError::Timeout("control write"))??;
    Ok(())
}

/// Resolves when either gate sheds the connection.
async fn shed(slots: &[Slot; 2]) {
    tokio::select! {
        () = slots[0].shed() => {}
        () = slots[1].shed() => {}
    }
}

async fn next_event(
    rx: &mut Option<broadcast::Receiver<ClientEvent>>,
) -> Result<ClientEvent, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_tick(bw: &mut Option<(Interval, (u64, u64))>) {
    match bw {
        Some((i, _)) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl Conn {
    async fn run(mut self, sock: TcpStream, slots: [Slot; 2]) -> Result<(), ClientError> {
        sock.set_nodelay(true)?;
        let (mut rd, mut wr) = sock.into_split();
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 4096];
        let mut deadline = Instant::now() + AUTH_LINE_TIMEOUT;
        loop {
            // Answer every whole command received, in order.
            loop {
                let (n, raw) = match take_command(&buf) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(TooLong) => {
                        let r = Reply::error(Code::SYNTAX, "Command too long");
                        return write(&mut wr, &r.encode()).await;
                    }
                };
                buf.drain(..n);
                deadline = Instant::now() + AUTH_LINE_TIMEOUT;
                let was_authenticated = self.session.is_authenticated();
                let step = self.session.handle(&self.auth, &mut rand::rng(), &raw);
                let (reply, close) = match step {
                    Step::Reply(r) => (r, false),
                    Step::Close(r) => (r, true),
                    Step::Command(c) => (self.answer(c), false),
                };
                write(&mut wr, &reply.encode()).await?;
                if close {
                    return Ok(());
                }
                if !was_authenticated && self.session.is_authenticated() {
                    // A controller now: never shed to make room.
                    slots.iter().for_each(Slot::busy);
                }
            }
            let authenticated = self.session.is_authenticated();
            tokio::select! {
                n = rd.read(&mut tmp) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                () = tokio::time::sleep_until(deadline), if !authenticated => {
                    return Err(ClientError::Timeout("control authentication"));
                }
                () = shed(&slots), if !authenticated => {
                    return Err(ClientError::Timeout("control authentication (shed to make room)"));
                }
                ev = next_event(&mut self.rx) => match ev {
                    Ok(ev) => {
                        if let Some(line) = self.event_line(ev) {
                            write(&mut wr, &line).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        debug!(lost = n, "a controller fell behind: events lost");
                    }
                    Err(broadcast::error::RecvError::Closed) => self.rx = None,
                },
                () = next_tick(&mut self.bw) => {
                    let line = self.bw_line();
                    write(&mut wr, &line).await?;
                }
            }
        }
    }

    /// The event line for `ev`, if the controller asked for its kind.
    fn event_line(&self, ev: ClientEvent) -> Option<Vec<u8>> {
        match ev {
            ClientEvent::Circ(l) if self.subs.circ => Some(event(&format!("CIRC {l}"))),
            ClientEvent::Stream(l) if self.subs.stream => Some(event(&format!("STREAM {l}"))),
            ClientEvent::Status(s) if self.subs.status => {
                Some(event(&format!("STATUS_CLIENT {s}")))
            }
            ClientEvent::Signal(s) if self.subs.signal => Some(event(&format!("SIGNAL {s}"))),
            ClientEvent::ConfChanged(values) if self.subs.conf => {
                let mut r = Reply::new(Code::EVENT).line("CONF_CHANGED");
                for v in &values {
                    r = r.line(v);
                }
                Some(r.line("OK").encode())
            }
            _ => None,
        }
    }

    /// `650 BW read written`: bytes since the last tick.
    fn bw_line(&mut self) -> Vec<u8> {
        let now = self.client.events().traffic();
        let Some((_, last)) = &mut self.bw else {
            return Vec::new();
        };
        let (r, w) = (now.0 - last.0, now.1 - last.1);
        *last = now;
        event(&format!("BW {r} {w}"))
    }

    /// The reply to an authenticated controller's command.
    fn answer(&mut self, cmd: Command) -> Reply {
        match cmd {
            Command::GetInfo(keys) => self.getinfo(&keys),
            Command::SetEvents(names) => self.setevents(&names),
            Command::Signal(s) => self.signal(&s),
            Command::GetConf(keys) => self.getconf(&keys),
            // Without a value, both reset to the configured value.
            Command::SetConf(s) | Command::ResetConf(s) => self.setconf(&s),
            // The session answers the others itself.
            other => Reply::error(Code::INTERNAL, &format!("Unexpected {other:?}")),
        }
    }

    fn getinfo(&self, keys: &[String]) -> Reply {
        let mut r = Reply::new(Code::OK);
        for k in keys {
            match self.info(&k.to_ascii_lowercase()) {
                Some(v) => r = r.key_value(k, &v),
                None => {
                    return Reply::error(
                        Code::UNRECOGNIZED_ENTITY,
                        &format!("Unrecognized key {}", quote(k)),
                    );
                }
            }
        }
        r.line("OK")
    }

    fn info(&self, key: &str) -> Option<String> {
        let c = &self.client;
        let cfg = c.config();
        let phase = c.bootstrap_phase();
        let listeners = |a: &[SocketAddr]| {
            a.iter()
                .map(|a| quote(&a.to_string()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let lines = |l: Vec<String>| l.join("\n");
        Some(match key {
            "version" => self.auth.version.clone(),
            "status/bootstrap-phase" => bootstrap_status(phase as u8, phase.tag(), phase.summary()),
            "status/circuit-established" => flag(phase == Phase::Done),
            "status/enough-dir-info" => flag(phase as u8 >= Phase::EnoughDirinfo as u8),
            "circuit-status" => lines(
                c.events()
                    .circuit_status()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            "stream-status" => lines(
                c.events()
                    .stream_status()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
            "traffic/read" => c.events().traffic().0.to_string(),
            "traffic/written" => c.events().traffic().1.to_string(),
            "uptime" => c.uptime().as_secs().to_string(),
            "process/pid" => std::process::id().to_string(),
            "net/listeners/socks" => listeners(&cfg.socks_listen),
            "net/listeners/httptunnel" => listeners(&cfg.http_connect_listen),
            "net/listeners/control" => listeners(self.local.as_slice()),
            "events/names" => EVENTS.join(" "),
            "features/names" => "VERBOSE_NAMES EXTENDED_EVENTS".into(),
            "info/names" => lines(
                INFO_KEYS
                    .iter()
                    .chain(&[("info/names", "The GETINFO keys.")])
                    .map(|(k, d)| format!("{k} -- {d}"))
                    .collect(),
            ),
            _ => return None,
        })
    }

    fn setevents(&mut self, names: &[String]) -> Reply {
        if let Some(n) = names.iter().find(|n| !EVENTS.contains(&n.as_str())) {
            return Reply::error(
                Code::UNRECOGNIZED_ENTITY,
                &format!("Unrecognized event {}", quote(n)),
            );
        }
        let has = |e: &str| names.iter().any(|n| n == e);
        self.subs = Subscriptions {
            circ: has("CIRC"),
            stream: has("STREAM"),
            bw: has("BW"),
            status: has("STATUS_CLIENT"),
            signal: has("SIGNAL"),
            conf: has("CONF_CHANGED"),
        };
        if self.subs.hub() {
            if self.rx.is_none() {
                self.rx = Some(self.client.events().subscribe());
            }
        } else {
            self.rx = None;
        }
        if !self.subs.bw {
            self.bw = None;
        } else if self.bw.is_none() {
            let period = Duration::from_secs(1);
            let mut i = tokio::time::interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            self.bw = Some((i, self.client.events().traffic()));
        }
        Reply::ok()
    }

    fn signal(&self, name: &str) -> Reply {
        match name {
            "NEWNYM" => {
                self.client.new_identity();
                self.client.events().signal("NEWNYM");
            }
            // Names are resolved at the exit: the client caches none.
            "CLEARDNSCACHE" => self.client.events().signal("CLEARDNSCACHE"),
            "HEARTBEAT" => {
                let (read, written) = self.client.events().traffic();
                info!(
                    circuits = self.client.events().circuit_status().len(),
                    streams = self.client.events().stream_status().len(),
                    read,
                    written,
                    uptime_secs = self.client.uptime().as_secs(),
                    "heartbeat"
                );
            }
            // The client is never dormant.
            "ACTIVE" => {}
            _ => {
                return Reply::error(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!("Unrecognized signal code {}", quote(name)),
                );
            }
        }
        Reply::ok()
    }

    /// The values of configuration key `key` (canonical name); `None`
    /// for an unset value.
    fn conf(&self, key: &str) -> Vec<Option<String>> {
        let cfg = self.client.config();
        let ports = |a: &[SocketAddr]| {
            if a.is_empty() {
                vec![Some("0".to_string())]
            } else {
                a.iter().map(|a| Some(a.to_string())).collect()
            }
        };
        match key {
            "SocksPort" => ports(&cfg.socks_listen),
            "HTTPTunnelPort" => ports(&cfg.http_connect_listen),
            "ControlPort" => ports(self.local.as_slice()),
            "DataDirectory" => vec![Some(cfg.data_dir.to_string_lossy().into_owned())],
            "MaxCircuitDirtiness" => vec![Some(
                self.client.max_circuit_dirtiness().as_secs().to_string(),
            )],
            "CookieAuthentication" => vec![Some("1".into())],
            _ => vec![None],
        }
    }

    fn getconf(&self, keys: &[String]) -> Reply {
        let mut r = Reply::new(Code::OK);
        for k in keys {
            let Some(key) = canonical_key(k) else {
                return Reply::error(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!("Unrecognized configuration key {}", quote(k)),
                );
            };
            for v in self.conf(key) {
                r = match v {
                    Some(v) => r.line(&format!("{key}={v}")),
                    None => r.line(key),
                };
            }
        }
        r
    }

    /// SETCONF and RESETCONF: all or nothing.
    fn setconf(&self, settings: &[Setting]) -> Reply {
        let mut dirtiness = None;
        for s in settings {
            let Some(key) = canonical_key(&s.key) else {
                return Reply::error(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!("Unrecognized option: Unknown option '{}'.  Failing.", s.key),
                );
            };
            if key != "MaxCircuitDirtiness" {
                return Reply::error(
                    Code::INVALID_CONFIG,
                    &format!("Transition not allowed: changing {key} is not allowed while running"),
                );
            }
            let secs = match &s.value {
                None => self.client.config().max_circuit_dirtiness_secs,
                Some(v) => match parse_interval(v) {
                    Ok(secs) => secs,
                    Err(why) => {
                        return Reply::error(
                            Code::UNRECOGNIZED_ARGUMENT,
                            &format!("Unacceptable option value: Could not parse {key}: {why}"),
                        );
                    }
                },
            };
            dirtiness = Some(secs);
        }
        if let Some(secs) = dirtiness {
            self.client
                .set_max_circuit_dirtiness(Duration::from_secs(secs));
            self.client
                .events()
                .conf_changed(vec![format!("MaxCircuitDirtiness={secs}")]);
        }
        Reply::ok()
    }
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.into()
}

fn canonical_key(k: &str) -> Option<&'static str> {
    CONF_KEYS
        .iter()
        .copied()
        .find(|c| c.eq_ignore_ascii_case(k))
}

/// A time interval as Tor's configuration writes it: a number of seconds,
/// or a number and a unit (`30`, `30 seconds`, `10 minutes`, `2 hours`,
/// `1 day`, `1 week`); 1 s to 30 days.
fn parse_interval(v: &str) -> Result<u64, String> {
    let mut words = v.split_whitespace();
    let (Some(n), unit, None) = (words.next(), words.next(), words.next()) else {
        return Err(format!("Unable to parse {} as an interval", quote(v)));
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("Unable to parse {n} as a number"))?;
    let per = match unit.map(str::to_ascii_lowercase).as_deref() {
        None | Some("s" | "sec" | "secs" | "second" | "seconds") => 1,
        Some("min" | "mins" | "minute" | "minutes") => 60,
        Some("hour" | "hours") => 3600,
        Some("day" | "days") => 86_400,
        Some("week" | "weeks") => 7 * 86_400,
        Some(u) => return Err(format!("Unknown unit {}", quote(u))),
    };
    match n.checked_mul(per) {
        Some(s) if (1..=MAX_DIRTINESS_SECS).contains(&s) => Ok(s),
        _ => Err(format!(
            "Provided value is out of bounds (1 second to {} days)",
            MAX_DIRTINESS_SECS / 86_400
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_tors() {
        assert_eq!(parse_interval("30"), Ok(30));
        assert_eq!(parse_interval("30 seconds"), Ok(30));
        assert_eq!(parse_interval("10 Minutes"), Ok(600));
        assert_eq!(parse_interval("2 hours"), Ok(7200));
        assert_eq!(parse_interval("1 day"), Ok(86_400));
        assert_eq!(parse_interval("4 weeks"), Ok(28 * 86_400));
        for bad in ["", "0", "abc", "5 fortnights", "31 days", "1 2 3", "-1"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_version_parses_as_tors() {
        // stem's VERSION_PATTERN: major.minor.micro[.patch][-status].
        let v = version();
        let (nums, status) = v.split_once('-').unwrap();
        assert_eq!(nums, "0.4.9.0");
        assert!(status.starts_with("allium-") && !status.contains(' '));
    }

    #[test]
    fn keys_are_case_insensitive() {
        assert_eq!(
            canonical_key("maxcircuitdirtiness"),
            Some("MaxCircuitDirtiness")
        );
        assert_eq!(canonical_key("SOCKSPORT"), Some("SocksPort"));
        assert_eq!(canonical_key("Nope"), None);
    }
}
