//! Who may use the control port: the cookie, SAFECOOKIE and hashed
//! password methods of control-spec section 3.5, and the session that
//! admits a controller only once it has proven itself.
//!
//! A controller reads PROTOCOLINFO to learn the methods and the cookie
//! file, then sends AUTHENTICATE with the cookie's 32 bytes in hex
//! (COOKIE), or first AUTHCHALLENGE with a nonce and then the HMAC that
//! proves it read the cookie without sending it (SAFECOOKIE), or a
//! password whose hash is configured in Tor's `HashedControlPassword`
//! form. Anything else before that, a wrong secret, or a second
//! PROTOCOLINFO closes the connection, as Tor does.

use aws_lc_rs::{digest, hmac};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use super::{Code, Command, RawCommand, Reply, quote};
use crate::aead::ct_eq;

/// The cookie file holds this many random bytes.
pub const COOKIE_LEN: usize = 32;
/// HMAC keys of SAFECOOKIE (control-spec 3.24).
const SERVER_KEY: &[u8] = b"Tor safe cookie authentication server-to-controller hash";
const CLIENT_KEY: &[u8] = b"Tor safe cookie authentication controller-to-server hash";
/// The S2K count indicator `tor --hash-password` uses: 65536 bytes hashed.
const S2K_INDICATOR: u8 = 0x60;

/// The secret of the cookie file (no `Debug`; zeroed on drop).
pub struct Cookie(Zeroizing<[u8; COOKIE_LEN]>);

impl Cookie {
    pub fn random(rng: &mut impl CryptoRng) -> Self {
        let mut c = Zeroizing::new([0u8; COOKIE_LEN]);
        rng.fill_bytes(&mut c[..]);
        Cookie(c)
    }

    pub fn from_bytes(b: [u8; COOKIE_LEN]) -> Self {
        Cookie(Zeroizing::new(b))
    }

    /// What the cookie file holds.
    pub fn as_bytes(&self) -> &[u8; COOKIE_LEN] {
        &self.0
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// SAFECOOKIE's ServerHash: HMAC-SHA256 keyed with the server-to-controller
/// constant over cookie, client nonce and server nonce.
pub fn safecookie_server_hash(
    cookie: &Cookie,
    client_nonce: &[u8],
    server_nonce: &[u8],
) -> [u8; 32] {
    hmac_sha256(SERVER_KEY, &[cookie.as_bytes(), client_nonce, server_nonce])
}

/// SAFECOOKIE's ClientHash: the same with the controller-to-server constant.
pub fn safecookie_client_hash(
    cookie: &Cookie,
    client_nonce: &[u8],
    server_nonce: &[u8],
) -> [u8; 32] {
    hmac_sha256(CLIENT_KEY, &[cookie.as_bytes(), client_nonce, server_nonce])
}

/// A password hash in Tor's `HashedControlPassword` form, as `tor
/// --hash-password` prints it: `16:` then, in hex, an 8-byte salt, a
/// count indicator byte and the 20-byte OpenPGP iterated and salted S2K
/// (RFC 4880 3.7.1.3) SHA-1 of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct HashedPassword {
    salt: [u8; 8],
    indicator: u8,
    hash: [u8; 20],
}

impl std::fmt::Debug for HashedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashedPassword(..)")
    }
}

impl std::fmt::Display for HashedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = self.salt.to_vec();
        b.push(self.indicator);
        b.extend_from_slice(&self.hash);
        write!(f, "16:{}", hex::encode_upper(b))
    }
}

/// The iterated and salted S2K of RFC 4880 with SHA-1, as Tor computes it
/// (`secret_to_key_rfc2440`): salt and secret repeated until the count
/// of bytes, from the indicator, has been hashed.
fn s2k_sha1(salt: &[u8; 8], indicator: u8, secret: &[u8]) -> [u8; 20] {
    let mut count = (16usize + usize::from(indicator & 15)) << ((indicator >> 4) + 6);
    let mut tmp = Zeroizing::new(Vec::with_capacity(8 + secret.len()));
    tmp.extend_from_slice(salt);
    tmp.extend_from_slice(secret);
    let mut d = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    while count > 0 {
        let n = count.min(tmp.len());
        d.update(&tmp[..n]);
        count -= n;
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(d.finish().as_ref());
    out
}

impl HashedPassword {
    /// Parse `16:HEX` (either case).
    pub fn parse(s: &str) -> Result<Self, crate::Error> {
        let bad = |why: &str| crate::Error::malformed("hashed control password", why);
        let h = s
            .trim()
            .strip_prefix("16:")
            .ok_or_else(|| bad("does not start with 16:"))?;
        let b = hex::decode(h).map_err(|_| bad("not hex"))?;
        let b: [u8; 29] = b
            .try_into()
            .map_err(|_| bad("not 29 bytes (salt, indicator, hash)"))?;
        let mut p = HashedPassword {
            salt: [0; 8],
            indicator: b[8],
            hash: [0; 20],
        };
        p.salt.copy_from_slice(&b[..8]);
        p.hash.copy_from_slice(&b[9..]);
        Ok(p)
    }

    /// Hash `password` with a fresh salt, as `tor --hash-password` does.
    pub fn new(rng: &mut impl CryptoRng, password: &[u8]) -> Self {
        let mut salt = [0u8; 8];
        rng.fill_bytes(&mut salt);
        HashedPassword {
            salt,
            indicator: S2K_INDICATOR,
            hash: s2k_sha1(&salt, S2K_INDICATOR, password),
        }
    }

    /// Is this the hash of `password`? (Constant time in the hash.)
    pub fn matches(&self, password: &[u8]) -> bool {
        ct_eq(&s2k_sha1(&self.salt, self.indicator, password), &self.hash)
    }
}

/// What the control port admits controllers with, and what PROTOCOLINFO
/// tells them.
pub struct AuthConfig {
    pub cookie: Cookie,
    /// The cookie file's absolute path.
    pub cookie_file: String,
    pub password: Option<HashedPassword>,
    /// The version PROTOCOLINFO and `GETINFO version` give.
    pub version: String,
}

/// What to do after a command.
#[derive(Debug)]
pub enum Step {
    /// Send this and go on.
    Reply(Reply),
    /// Send this, then close the connection.
    Close(Reply),
    /// An authenticated controller's command for the caller to answer.
    Command(Command),
}

/// One control connection's authentication state.
///
/// Feed every command to [`Session::handle`]: it answers PROTOCOLINFO,
/// AUTHCHALLENGE, AUTHENTICATE, USEFEATURE and QUIT itself, refuses
/// everything else until the controller has authenticated, and then hands
/// the rest to the caller as [`Step::Command`].
#[derive(Default)]
pub struct Session {
    authenticated: bool,
    sent_protocolinfo: bool,
    /// After AUTHCHALLENGE: the ClientHash the next command, which must
    /// be AUTHENTICATE, has to carry.
    challenge: Option<Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("authenticated", &self.authenticated)
            .field("challenged", &self.challenge.is_some())
            .finish()
    }
}

fn auth_required() -> Step {
    Step::Close(Reply::error(
        Code::AUTH_REQUIRED,
        "Authentication required.",
    ))
}

fn auth_failed(why: &str) -> Step {
    Step::Close(Reply::error(
        Code::AUTH_FAILED,
        &format!("Authentication failed: {why}"),
    ))
}

impl Session {
    pub fn new() -> Self {
        Session::default()
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Handle one command. `rng` draws SAFECOOKIE's server nonce.
    pub fn handle(&mut self, cfg: &AuthConfig, rng: &mut impl CryptoRng, raw: &RawCommand) -> Step {
        let name = raw.name();
        if self.challenge.is_some() && name != "AUTHENTICATE" {
            return auth_required();
        }
        if !self.authenticated {
            let allowed = match name.as_str() {
                "PROTOCOLINFO" => !self.sent_protocolinfo,
                "AUTHCHALLENGE" | "AUTHENTICATE" | "QUIT" => true,
                _ => false,
            };
            if !allowed {
                return auth_required();
            }
        }
        let cmd = match Command::parse(raw) {
            Ok(c) => c,
            Err(r) if self.authenticated => return Step::Reply(r.reply()),
            Err(r) => return Step::Close(r.reply()),
        };
        match cmd {
            Command::ProtocolInfo => {
                self.sent_protocolinfo = true;
                Step::Reply(protocolinfo(cfg))
            }
            Command::AuthChallenge(client_nonce) => {
                let mut server_nonce = [0u8; 32];
                rng.fill_bytes(&mut server_nonce);
                let server_hash = safecookie_server_hash(&cfg.cookie, &client_nonce, &server_nonce);
                self.challenge = Some(Zeroizing::new(safecookie_client_hash(
                    &cfg.cookie,
                    &client_nonce,
                    &server_nonce,
                )));
                Step::Reply(Reply::new(Code::OK).line(&format!(
                    "AUTHCHALLENGE SERVERHASH={} SERVERNONCE={}",
                    hex::encode_upper(server_hash),
                    hex::encode_upper(server_nonce)
                )))
            }
            Command::Authenticate(secret) => {
                if let Some(expected) = self.challenge.take() {
                    if !ct_eq(&secret, &expected[..]) {
                        return auth_failed("Safe cookie response did not match expected value.");
                    }
                } else {
                    let cookie = ct_eq(&secret, cfg.cookie.as_bytes());
                    let password = cfg.password.as_ref().is_some_and(|p| p.matches(&secret));
                    if !cookie && !password {
                        return auth_failed(match (&cfg.password, secret.len()) {
                            (Some(_), _) => {
                                "Password did not match HashedControlPassword *or* authentication cookie."
                            }
                            (None, COOKIE_LEN) => {
                                "Authentication cookie did not match expected value."
                            }
                            (None, _) => "Wrong length on authentication cookie.",
                        });
                    }
                }
                self.authenticated = true;
                Step::Reply(Reply::ok())
            }
            Command::UseFeature(names) => {
                // Both features are what this side always does.
                match names.iter().find(|n| {
                    !["EXTENDED_EVENTS", "VERBOSE_NAMES"].contains(&n.to_ascii_uppercase().as_str())
                }) {
                    Some(n) => Step::Reply(Reply::error(
                        Code::UNRECOGNIZED_ENTITY,
                        &format!("Unrecognized feature {}", quote(n)),
                    )),
                    None => Step::Reply(Reply::ok()),
                }
            }
            Command::Quit => Step::Close(Reply::error(Code::OK, "closing connection")),
            other => Step::Command(other),
        }
    }
}

fn protocolinfo(cfg: &AuthConfig) -> Reply {
    let methods = if cfg.password.is_some() {
        "COOKIE,SAFECOOKIE,HASHEDPASSWORD"
    } else {
        "COOKIE,SAFECOOKIE"
    };
    Reply::new(Code::OK)
        .line("PROTOCOLINFO 1")
        .line(&format!(
            "AUTH METHODS={methods} COOKIEFILE={}",
            quote(&cfg.cookie_file)
        ))
        .line(&format!("VERSION Tor={}", quote(&cfg.version)))
        .line("OK")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::take_command;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn cfg(password: Option<&str>) -> AuthConfig {
        AuthConfig {
            cookie: Cookie::from_bytes([7; 32]),
            cookie_file: "/var/lib/allium/client/control_auth_cookie".into(),
            password: password.map(|p| HashedPassword::parse(p).unwrap()),
            version: "0.4.9.0-allium-0.1.0".into(),
        }
    }

    /// `tor --hash-password "correct horse"` (Tor 0.4.9.11).
    const CORRECT_HORSE: &str = "16:14671C693412AC5060F6903599CEC8B5A76FB4334E756CCCEE29607894";

    /// Send `line`; the reply's bytes, and whether the connection closes.
    fn send(s: &mut Session, cfg: &AuthConfig, line: &str) -> (String, bool) {
        let b = format!("{line}\r\n");
        let (_, raw) = take_command(b.as_bytes()).unwrap().unwrap();
        match s.handle(cfg, &mut rand::rng(), &raw) {
            Step::Reply(r) => (String::from_utf8(r.encode()).unwrap(), false),
            Step::Close(r) => (String::from_utf8(r.encode()).unwrap(), true),
            Step::Command(c) => (format!("{c:?}"), false),
        }
    }

    /// A SAFECOOKIE exchange with Tor 0.4.9.11: its cookie file, the
    /// controller's nonce, and Tor's nonce and ServerHash; Tor accepted
    /// the ClientHash.
    #[test]
    fn safecookie_matches_tor() {
        let cookie: [u8; 32] =
            h("be8dcac93250cbb414c593c7854c617c35d00062127e7acb39e29ff284187343")
                .try_into()
                .unwrap();
        let cookie = Cookie::from_bytes(cookie);
        let cn = h("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        let sn = h("293BEA5471497CC0FB57A23CE1E08709C21CD75EEFCC1D08A9DF7EA5CCC00196");
        assert_eq!(
            safecookie_server_hash(&cookie, &cn, &sn).to_vec(),
            h("1BBBA97838C59B769DFE542908958764767B2F844BAEC5302DF43F8223573607")
        );
        assert_eq!(
            safecookie_client_hash(&cookie, &cn, &sn).to_vec(),
            h("32adf9f28e8fd786451b6c3c047c258d8939da6d791ce432f3c0a84212899c93")
        );
    }

    #[test]
    fn hashed_passwords_are_tors() {
        let p = HashedPassword::parse(CORRECT_HORSE).unwrap();
        assert!(p.matches(b"correct horse"));
        assert!(!p.matches(b"correct horse "));
        assert!(!p.matches(b""));
        assert_eq!(p.to_string(), CORRECT_HORSE);
        assert_eq!(
            HashedPassword::parse(&CORRECT_HORSE.to_lowercase()).unwrap(),
            p
        );
        let mine = HashedPassword::new(&mut rand::rng(), b"battery staple");
        assert!(
            HashedPassword::parse(&mine.to_string())
                .unwrap()
                .matches(b"battery staple")
        );
        for bad in [
            "",
            "16:",
            "14671C69",
            "16:zz",
            &CORRECT_HORSE[..20],
            "17:00",
        ] {
            assert!(HashedPassword::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format!("{p:?}"), "HashedPassword(..)");
    }

    #[test]
    fn protocolinfo_names_the_methods_and_the_cookie() {
        let c = cfg(None);
        let mut s = Session::new();
        assert_eq!(
            send(&mut s, &c, "PROTOCOLINFO 1").0,
            "250-PROTOCOLINFO 1\r\n\
             250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE=\"/var/lib/allium/client/control_auth_cookie\"\r\n\
             250-VERSION Tor=\"0.4.9.0-allium-0.1.0\"\r\n\
             250 OK\r\n"
        );
        // Once only before authentication.
        assert_eq!(
            send(&mut s, &c, "PROTOCOLINFO"),
            ("514 Authentication required.\r\n".into(), true)
        );
        let c = cfg(Some(CORRECT_HORSE));
        let (r, _) = send(&mut Session::new(), &c, "PROTOCOLINFO");
        assert!(
            r.contains("METHODS=COOKIE,SAFECOOKIE,HASHEDPASSWORD "),
            "{r}"
        );
    }

    #[test]
    fn the_cookie_admits() {
        let c = cfg(None);
        let mut s = Session::new();
        assert_eq!(
            send(&mut s, &c, "GETINFO version"),
            ("514 Authentication required.\r\n".into(), true)
        );
        let mut s = Session::new();
        send(&mut s, &c, "PROTOCOLINFO 1");
        let line = format!("AUTHENTICATE {}", hex::encode([7u8; 32]));
        assert_eq!(send(&mut s, &c, &line), ("250 OK\r\n".into(), false));
        assert!(s.is_authenticated());
        assert_eq!(
            send(&mut s, &c, "GETINFO version").0,
            "GetInfo([\"version\"])"
        );
        // PROTOCOLINFO again, after authentication, is fine.
        assert!(!send(&mut s, &c, "PROTOCOLINFO").1);
        assert_eq!(
            send(&mut s, &c, "FOO").0,
            "510 Unrecognized command \"FOO\"\r\n"
        );
        assert_eq!(
            send(&mut s, &c, "QUIT"),
            ("250 closing connection\r\n".into(), true)
        );
    }

    #[test]
    fn a_wrong_secret_closes() {
        let c = cfg(None);
        let wrong = format!("AUTHENTICATE {}", hex::encode([8u8; 32]));
        assert_eq!(
            send(&mut Session::new(), &c, &wrong),
            (
                "515 Authentication failed: Authentication cookie did not match expected value.\r\n".into(),
                true
            )
        );
        assert_eq!(
            send(&mut Session::new(), &c, "AUTHENTICATE 0707"),
            (
                "515 Authentication failed: Wrong length on authentication cookie.\r\n".into(),
                true
            )
        );
        assert!(send(&mut Session::new(), &c, "AUTHENTICATE").1);
        assert!(send(&mut Session::new(), &c, "AUTHENTICATE \"correct horse\"").1);
        // A malformed one too, before authentication.
        assert!(send(&mut Session::new(), &c, "AUTHENTICATE xyz").1);
        assert!(send(&mut Session::new(), &c, "AUTHCHALLENGE SAFECOOKIE zz").1);
    }

    #[test]
    fn a_password_admits() {
        let c = cfg(Some(CORRECT_HORSE));
        let mut s = Session::new();
        assert_eq!(
            send(&mut s, &c, "AUTHENTICATE \"correct horse\""),
            ("250 OK\r\n".into(), false)
        );
        let mut s = Session::new();
        let hex_pw = format!("AUTHENTICATE {}", hex::encode("correct horse"));
        assert!(!send(&mut s, &c, &hex_pw).1);
        assert!(s.is_authenticated());
        // The cookie still works alongside.
        let line = format!("AUTHENTICATE {}", hex::encode([7u8; 32]));
        assert!(!send(&mut Session::new(), &c, &line).1);
        assert_eq!(
            send(&mut Session::new(), &c, "AUTHENTICATE \"wrong horse\""),
            (
                "515 Authentication failed: Password did not match HashedControlPassword *or* authentication cookie.\r\n"
                    .into(),
                true
            )
        );
    }

    /// The controller's side of SAFECOOKIE, as stem does it.
    fn safecookie(s: &mut Session, c: &AuthConfig, cookie: &Cookie) -> (String, bool) {
        let cn = [0x42u8; 32];
        let (r, closed) = send(
            s,
            c,
            &format!("AUTHCHALLENGE SAFECOOKIE {}", hex::encode(cn)),
        );
        assert!(!closed);
        let r = r
            .trim_end()
            .strip_prefix("250 AUTHCHALLENGE SERVERHASH=")
            .unwrap();
        let (sh, sn) = r.split_once(" SERVERNONCE=").unwrap();
        let sn = h(sn);
        assert_eq!(h(sh), safecookie_server_hash(&c.cookie, &cn, &sn).to_vec());
        let ch = safecookie_client_hash(cookie, &cn, &sn);
        send(s, c, &format!("AUTHENTICATE {}", hex::encode(ch)))
    }

    #[test]
    fn safecookie_admits_only_the_cookies_holder() {
        let c = cfg(None);
        let mut s = Session::new();
        send(&mut s, &c, "PROTOCOLINFO 1");
        assert_eq!(
            safecookie(&mut s, &c, &c.cookie),
            ("250 OK\r\n".into(), false)
        );
        assert!(s.is_authenticated());
        let mut s = Session::new();
        assert_eq!(
            safecookie(&mut s, &c, &Cookie::from_bytes([8; 32])),
            (
                "515 Authentication failed: Safe cookie response did not match expected value.\r\n"
                    .into(),
                true
            )
        );
        // After a challenge, only the ClientHash: not the cookie itself,
        // and no other command.
        let mut s = Session::new();
        send(&mut s, &c, "AUTHCHALLENGE SAFECOOKIE 00");
        assert!(
            send(
                &mut s,
                &c,
                &format!("AUTHENTICATE {}", hex::encode([7u8; 32]))
            )
            .1
        );
        let mut s = Session::new();
        send(&mut s, &c, "AUTHCHALLENGE SAFECOOKIE 00");
        assert_eq!(
            send(&mut s, &c, "PROTOCOLINFO"),
            ("514 Authentication required.\r\n".into(), true)
        );
    }

    #[test]
    fn features_are_acknowledged() {
        let c = cfg(None);
        let mut s = Session::new();
        assert!(
            send(&mut s, &c, "USEFEATURE VERBOSE_NAMES").1,
            "not before authentication"
        );
        let mut s = Session::new();
        send(
            &mut s,
            &c,
            &format!("AUTHENTICATE {}", hex::encode([7u8; 32])),
        );
        assert_eq!(
            send(&mut s, &c, "USEFEATURE extended_events VERBOSE_NAMES").0,
            "250 OK\r\n"
        );
        assert_eq!(
            send(&mut s, &c, "USEFEATURE FOO").0,
            "552 Unrecognized feature \"FOO\"\r\n"
        );
    }
}
