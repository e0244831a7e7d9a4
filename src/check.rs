//! `allium check --config FILE`: read a config as the daemon would, check
//! every value without starting anything, and say what the daemon would
//! do (like `tor --verify-config`).
//!
//! Errors are what would stop the daemon or leave it broken (a value out of
//! range, an address that cannot be bound, a key file others can read);
//! warnings are what it would survive (a port already in use, perhaps by
//! the daemon itself; a data directory others can read).

use std::net::SocketAddr;
use std::path::Path;

use allium_client::ClientConfig;
use allium_directory::AuthConfig;
use allium_relay::RelayConfig;
use serde::de::DeserializeOwned;

/// Which daemon a config is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Dirauth,
    Relay,
    Client,
}

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub role: Option<Role>,
    /// What the daemon would do, one line each.
    pub plan: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.role.is_some()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(r) = self.role {
            writeln!(f, "{r:?} config:")?;
        }
        for l in &self.plan {
            writeln!(f, "  {l}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        write!(f, "{}", if self.ok() { "OK" } else { "NOT OK" })
    }
}

fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// Check the config at `path`, for `role` or the one role it parses as.
pub fn check(path: &Path, role: Option<Role>) -> Report {
    let mut r = Report::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            r.errors.push(format!("{}: {e}", path.display()));
            return r;
        }
    };
    let tried = [
        (Role::Dirauth, parse::<AuthConfig>(&text).err()),
        (Role::Relay, parse::<RelayConfig>(&text).err()),
        (Role::Client, parse::<ClientConfig>(&text).err()),
    ];
    let role = match role {
        Some(x) => x,
        None => {
            let fits: Vec<Role> = tried
                .iter()
                .filter(|(_, e)| e.is_none())
                .map(|(x, _)| *x)
                .collect();
            match fits.as_slice() {
                [one] => *one,
                [] => {
                    for (x, e) in &tried {
                        r.errors.push(format!(
                            "not a {x:?} config: {}",
                            e.as_deref().unwrap_or("")
                        ));
                    }
                    return r;
                }
                many => {
                    r.errors.push(format!(
                        "this config could be for any of {many:?}: say which with --role"
                    ));
                    return r;
                }
            }
        }
    };
    if let Some((_, Some(e))) = tried.iter().find(|(x, _)| *x == role) {
        r.errors.push(format!("not a {role:?} config: {e}"));
        return r;
    }
    r.role = Some(role);
    match role {
        Role::Dirauth => dirauth(&mut r, parse(&text).unwrap_or_default()),
        Role::Relay => relay(&mut r, parse(&text).unwrap_or_default()),
        Role::Client => client(&mut r, parse(&text).unwrap_or_default()),
    }
    r
}

fn duration(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 && s >= 86400 => format!("{} days", s / 86400),
        s if s % 3600 == 0 && s >= 3600 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

use allium_relay::status::bytes;

/// Can `addr` be listened on now?
fn listen(r: &mut Report, what: &str, addr: SocketAddr) {
    r.plan.push(format!("{what} on {addr}"));
    match std::net::TcpListener::bind(addr) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.warnings.push(format!(
            "{what} {addr} is in use now (by this daemon already running?)"
        )),
        Err(e) => r
            .errors
            .push(format!("{what} {addr} cannot be listened on: {e}")),
    }
}

/// The data directory: usable, and its key files for the owner alone.
fn data_dir(r: &mut Report, dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if parent.is_dir() {
            r.plan.push(format!(
                "data directory {} (will be created)",
                dir.display()
            ));
        } else {
            r.errors.push(format!(
                "data directory {}: neither it nor {} exists",
                dir.display(),
                parent.display()
            ));
        }
        return;
    };
    r.plan.push(format!("data directory {}", dir.display()));
    if !meta.is_dir() {
        r.errors.push(format!(
            "data directory {} is not a directory",
            dir.display()
        ));
        return;
    }
    if meta.permissions().readonly() {
        r.errors
            .push(format!("data directory {} is read-only", dir.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        r.errors.push(format!(
            "data directory {} is writable by others (mode {mode:o}): chmod 700 it",
            dir.display()
        ));
    } else if mode & 0o077 != 0 {
        r.warnings.push(format!(
            "data directory {} is readable by others (mode {mode:o}): chmod 700 it",
            dir.display()
        ));
    }
    // Key files, up to two levels down (`keys/`, `offline/`).
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() && depth < 2 {
                stack.push((p, depth + 1));
            } else if m.is_file() && is_secret(&p) && m.permissions().mode() & 0o077 != 0 {
                r.errors.push(format!(
                    "key file {} can be read by others (mode {:o}): chmod 600 it",
                    p.display(),
                    m.permissions().mode() & 0o777
                ));
            }
        }
    }
}

fn is_secret(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.ends_with(".key") || name.contains("secret") || name == "control_auth_cookie"
}

fn pinned(r: &mut Report, a: &[allium_directory::AuthorityEntry]) {
    match allium_directory::authority_keys(a) {
        Ok(k) if k.is_empty() => r.warnings.push(
            "no directory authorities: nothing is published or fetched, no consensus is known"
                .into(),
        ),
        Ok(k) => r.plan.push(format!(
            "pins {} directory authorities ({}); a consensus needs {} of their signatures",
            k.len(),
            a.iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            k.len() / 2 + 1
        )),
        Err(e) => r.errors.push(e.to_string()),
    }
}

fn metrics(r: &mut Report, at: Option<SocketAddr>) {
    if let Some(a) = at {
        listen(r, "metrics", a);
    }
}

fn dirauth(r: &mut Report, c: AuthConfig) {
    r.plan.push(format!("directory authority {:?}", c.nickname));
    listen(r, "directory HTTP", c.listen);
    metrics(r, c.metrics_listen);
    data_dir(r, &c.data_dir);
    pinned(r, &c.authorities);
    if !c.authorities.iter().any(|a| a.addr == c.listen) {
        r.warnings.push(format!(
            "{} is not among the addresses of `authorities`: list this authority too",
            c.listen
        ));
    }
    if let Err(e) = c.check() {
        r.errors.push(e.to_string());
    }
    r.plan.push(format!(
        "a consensus every {}, valid for {}; descriptors kept {}",
        duration(c.interval_secs),
        duration(c.interval_secs * c.valid_intervals),
        duration(c.descriptor_max_age_secs)
    ));
    match allium_directory::keys::Signer::load(&c.data_dir) {
        Ok(s) => {
            let now = allium_directory::unix_now();
            let left = s.parsed.valid_until.saturating_sub(now);
            r.plan.push(format!(
                "identity {}, signing key certified for {} more",
                hex::encode(s.parsed.identity),
                duration(left / 86400 * 86400)
            ));
            if left == 0 {
                r.errors.push(
                    "the signing-key certificate has expired: run `allium dirauth certify`".into(),
                );
            } else if left < 7 * 86400 {
                r.warnings.push(
                    "the signing-key certificate expires within a week: run `allium dirauth certify`"
                        .into(),
                );
            }
        }
        Err(e) => r.errors.push(format!("signing key: {e}")),
    }
}

fn relay(r: &mut Report, c: RelayConfig) {
    r.plan.push(format!("relay {:?}", c.nickname));
    listen(r, "ORPort", c.listen);
    metrics(r, c.metrics_listen);
    data_dir(r, &c.data_dir);
    pinned(r, &c.authorities);
    if let Err(e) = c.check() {
        r.errors.push(e.to_string());
        return;
    }
    if let Ok(a) = c.advertised() {
        r.plan.push(format!("advertises {a}"));
    }
    match c.policy() {
        Ok(p) if p.is_exit() => r
            .plan
            .push("exit: opens streams its exit policy allows".into()),
        Ok(_) => r.plan.push("not an exit".into()),
        Err(e) => r.errors.push(e.to_string()),
    }
    r.plan.push(format!(
        "declares {}/s; relays {}; queues at most {} of cells",
        bytes(c.declared_bandwidth() as u64),
        if c.bandwidth_rate > 0 {
            format!("at most {}/s", bytes(c.bandwidth_rate))
        } else {
            "without a rate limit".into()
        },
        bytes(c.max_queued_bytes)
    ));
    r.plan.push(format!(
        "republishes its descriptor every {}, new onion key every {}",
        duration(c.publish_interval_secs),
        duration(c.onion_key_lifetime_secs)
    ));
}

fn client(r: &mut Report, c: ClientConfig) {
    r.plan.push("client".into());
    for a in &c.socks_listen {
        listen(r, "SOCKS", *a);
    }
    for a in &c.http_connect_listen {
        listen(r, "HTTP CONNECT", *a);
    }
    if let Some(a) = c.control_listen {
        listen(r, "control port", a);
    }
    metrics(r, c.metrics_listen);
    data_dir(r, &c.data_dir);
    if let Err(e) = c.check() {
        r.errors.push(e.to_string());
        return;
    }
    pinned(r, &c.authorities);
    r.plan.push(format!(
        "circuits take new streams for {}; streams give up after {}",
        duration(c.max_circuit_dirtiness_secs),
        duration(c.stream_timeout_secs)
    ));
    for s in &c.services {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|p| format!("{} -> {}", p.virtual_port, p.target))
            .collect();
        let who = match allium_client::service::load_authorized(&c.data_dir, s) {
            Ok(k) if k.is_empty() => "anyone who knows its address".to_string(),
            Ok(k) if k.len() == 1 => "its one authorized client only".to_string(),
            Ok(k) => format!("its {} authorized clients only", k.len()),
            Err(e) => {
                r.errors.push(e.to_string());
                continue;
            }
        };
        r.plan.push(format!(
            "hosts an onion service from {} (its key and hostname there): ports {}; {} introduction points; for {who}; {}",
            c.data_dir.join(&s.dir).display(),
            ports.join(", "),
            s.intro_points,
            match (s.pow_defense, s.pow_min_effort) {
                (false, _) => "no puzzle under load".to_string(),
                (true, 0) => "a puzzle under load".to_string(),
                (true, n) => format!("a puzzle of effort {n} at least"),
            }
        ));
    }
    if let Some(d) = &c.service_auth_dir {
        r.plan.push(format!(
            "reads keys for services that authorize clients from {}",
            c.data_dir.join(d).display()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(duration(3600), "1 h");
        assert_eq!(duration(90), "90 s");
        assert_eq!(duration(2 * 86400), "2 days");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
    }

    #[test]
    fn a_config_is_checked_for_its_role() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        let data = d.path().join("data");
        let write = |s: &str| std::fs::write(&p, s).unwrap();
        // A client with a SOCKS port on another host: refused.
        write(&format!(
            "data_dir = {data:?}\nsocks_listen = [\"0.0.0.0:9150\"]\n\
             [[authorities]]\nname = \"a\"\naddr = \"127.0.0.1:7000\"\nkey = \"{}\"\n",
            "11".repeat(32)
        ));
        let r = check(&p, None);
        assert_eq!(r.role, Some(Role::Client));
        assert!(!r.ok());
        assert!(r.errors[0].contains("not on loopback"), "{r}");
        // A client hosting a service: the plan says where and what.
        write(&format!(
            "data_dir = {data:?}\nsocks_listen = []\n\
             [[authorities]]\nname = \"a\"\naddr = \"127.0.0.1:7000\"\nkey = \"{}\"\n\
             [[services]]\ndir = \"web\"\nports = [{{ virtual_port = 80, target = \"127.0.0.1:8080\" }}]\n",
            "11".repeat(32)
        ));
        let r = check(&p, None);
        assert!(
            r.plan
                .iter()
                .any(|l| l.contains("onion service") && l.contains("80 -> 127.0.0.1:8080")),
            "{r}"
        );
        // One that authorizes clients: a key file that is not a key is an
        // error, never an open service.
        let auth = data.join("web/authorized_clients");
        std::fs::create_dir_all(&auth).unwrap();
        let key = allium_proto::service::auth::ClientAuthSecret::from_bytes([9; 32]).public();
        std::fs::write(auth.join("alice.auth"), format!("{key}\n")).unwrap();
        let r = check(&p, None);
        assert!(
            r.plan
                .iter()
                .any(|l| l.contains("one authorized client only")),
            "{r}"
        );
        std::fs::write(auth.join("bob.auth"), "descriptor:x25519:oops\n").unwrap();
        let r = check(&p, None);
        assert!(
            !r.ok() && r.errors.iter().any(|e| e.contains("bob.auth")),
            "{r}"
        );
        // A relay whose key file others can read.
        write(&format!(
            "nickname = \"r1\"\nlisten = \"127.0.0.1:0\"\ndata_dir = {data:?}\nexit = true\n"
        ));
        std::fs::create_dir_all(data.join("keys")).unwrap();
        let key = data.join("keys/identity.key");
        std::fs::write(&key, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let r = check(&p, None);
        assert_eq!(r.role, Some(Role::Relay), "{r}");
        assert!(r.errors.iter().any(|e| e.contains("chmod 600")), "{r}");
        assert!(r.plan.iter().any(|l| l.contains("exit")), "{r}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = check(&p, None);
        assert!(r.ok(), "{r}");
        // A relay's nickname out of range, and an unknown key.
        write("nickname = \"no spaces please\"\n");
        assert!(!check(&p, Some(Role::Relay)).ok());
        write("nickname = \"r1\"\nbogus = 1\n");
        let r = check(&p, None);
        assert!(r.role.is_none() && r.errors.len() == 3, "{r}");
    }
}
