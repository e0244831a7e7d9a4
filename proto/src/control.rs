//! The control protocol: the part of Tor's control-spec (its protocol
//! version 1) that the client's control port speaks, so that Tor's
//! controllers (stem, nyx) can watch and steer an Allium client.
//! `doc/control.md` lists every command and event and where Allium differs
//! from Tor.
//!
//! A controller sends lines; the server answers each command with one
//! reply of numbered lines, and sends the events the controller asked for
//! as `650` lines in between:
//!
//! ```text
//! C: PROTOCOLINFO 1
//! S: 250-PROTOCOLINFO 1
//! S: 250-AUTH METHODS=COOKIE,SAFECOOKIE COOKIEFILE="/var/lib/allium/client/control_auth_cookie"
//! S: 250-VERSION Tor="0.4.9.0-allium-0.1.0"
//! S: 250 OK
//! C: AUTHENTICATE 5f3c...(the cookie file's 32 bytes in hex)
//! S: 250 OK
//! C: GETINFO traffic/read
//! S: 250-traffic/read=1234
//! S: 250 OK
//! ```
//!
//! This module is pure: [`take_command`] splits received bytes into
//! commands, [`Command::parse`] gives them types, [`Session`] runs the
//! authentication exchange (`auth.rs`), [`Reply`] and [`event`] format
//! what goes back, and `events.rs` formats circuit and stream status
//! lines. It does **not** know the client: the commands that need it
//! (GETINFO, SETEVENTS, SIGNAL, GETCONF, SETCONF, RESETCONF) are answered
//! by the client's `control` module, which owns the socket.

mod auth;
mod events;

pub use auth::{
    AuthConfig, COOKIE_LEN, Cookie, HashedPassword, Session, Step, safecookie_client_hash,
    safecookie_server_hash,
};
pub use events::{
    CircLine, CircStatus, Hop, StreamLine, StreamStatus, bootstrap_status, circ_reason, iso_time,
    stream_reason,
};

/// The longest command accepted, its data lines included (16 KiB): a
/// longer one closes the connection.
pub const MAX_COMMAND: usize = 16 * 1024;

crate::open_enum! {
    /// A reply's status code (control-spec section 4).
    Code(u16) {
        OK = 250,
        /// A syntax error in the command line as a whole.
        SYNTAX = 500,
        UNRECOGNIZED_COMMAND = 510,
        BAD_ARGUMENTS = 512,
        UNRECOGNIZED_ARGUMENT = 513,
        AUTH_REQUIRED = 514,
        AUTH_FAILED = 515,
        /// Something this side could not do.
        INTERNAL = 551,
        /// A key, event, signal or feature this side does not know.
        UNRECOGNIZED_ENTITY = 552,
        /// A configuration value that cannot be set (now).
        INVALID_CONFIG = 553,
        EVENT = 650,
    }
}

/// A command as it arrived: its keyword, the rest of its line, and the
/// data lines of a multi-line (`+KEYWORD`) command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawCommand {
    /// As sent (`+` kept for a multi-line command): keywords are
    /// case-insensitive.
    pub keyword: String,
    pub args: String,
    pub data: Option<Vec<u8>>,
}

impl RawCommand {
    /// The keyword in capitals, without the `+` of a multi-line command.
    pub fn name(&self) -> String {
        self.keyword.to_ascii_uppercase()
    }
}

/// The received bytes hold a command longer than [`MAX_COMMAND`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("control command longer than {MAX_COMMAND} bytes")]
pub struct TooLong;

/// The first whole command in `buf`: how many bytes it took, and the
/// command. `Ok(None)` until all of it is there. Lines end with LF (CRLF
/// as the spec says, or a bare LF as Tor also accepts); a line starting
/// with `+` opens a multi-line command whose data runs to a line holding
/// a single `.` (a data line starting with `..` loses one dot).
pub fn take_command(buf: &[u8]) -> Result<Option<(usize, RawCommand)>, TooLong> {
    let mut lines = Lines { buf, pos: 0 };
    let Some(first) = lines.next_line()? else {
        return Ok(None);
    };
    let first = String::from_utf8_lossy(first);
    let (keyword, args) = first.split_once(' ').unwrap_or((&first, ""));
    let mut cmd = RawCommand {
        keyword: keyword.to_string(),
        args: args.to_string(),
        data: None,
    };
    if keyword.starts_with('+') {
        let mut data = Vec::new();
        loop {
            let Some(line) = lines.next_line()? else {
                return Ok(None);
            };
            if line == b"." {
                break;
            }
            data.extend_from_slice(
                line.strip_prefix(b".")
                    .filter(|l| l.starts_with(b"."))
                    .unwrap_or(line),
            );
            data.push(b'\n');
        }
        cmd.data = Some(data);
    }
    Ok(Some((lines.pos, cmd)))
}

struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    /// The next line without its CRLF or LF; `None` if it is not all
    /// there yet.
    fn next_line(&mut self) -> Result<Option<&'a [u8]>, TooLong> {
        let rest = &self.buf[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return if self.buf.len() > MAX_COMMAND {
                Err(TooLong)
            } else {
                Ok(None)
            };
        };
        if self.pos + n + 1 > MAX_COMMAND {
            return Err(TooLong);
        }
        self.pos += n + 1;
        let line = &rest[..n];
        Ok(Some(line.strip_suffix(b"\r").unwrap_or(line)))
    }
}

/// Why a command was refused: the reply that says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub text: String,
}

impl Refusal {
    pub fn new(code: Code, text: impl Into<String>) -> Self {
        Refusal {
            code,
            text: text.into(),
        }
    }

    pub fn reply(&self) -> Reply {
        Reply::error(self.code, &self.text)
    }
}

/// A `KEY` or `KEY=VALUE` argument of SETCONF and RESETCONF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub value: Option<String>,
}

/// A command, parsed.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// `PROTOCOLINFO [versions]`.
    ProtocolInfo,
    /// `AUTHCHALLENGE SAFECOOKIE nonce`: the controller's nonce.
    AuthChallenge(Vec<u8>),
    /// `AUTHENTICATE [hex | "password"]`: what the controller proves
    /// itself with (cookie, SAFECOOKIE hash or password; empty for none).
    Authenticate(zeroize::Zeroizing<Vec<u8>>),
    GetInfo(Vec<String>),
    /// `SETEVENTS [EXTENDED] names`: the event names in capitals
    /// (EXTENDED is accepted and ignored, as Tor does).
    SetEvents(Vec<String>),
    /// A signal's name in capitals.
    Signal(String),
    GetConf(Vec<String>),
    SetConf(Vec<Setting>),
    ResetConf(Vec<Setting>),
    UseFeature(Vec<String>),
    Quit,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Authenticate(_) => f.write_str("Authenticate(..)"),
            Command::ProtocolInfo => f.write_str("ProtocolInfo"),
            Command::AuthChallenge(n) => write!(f, "AuthChallenge({})", hex::encode(n)),
            Command::GetInfo(k) => write!(f, "GetInfo({k:?})"),
            Command::SetEvents(e) => write!(f, "SetEvents({e:?})"),
            Command::Signal(s) => write!(f, "Signal({s})"),
            Command::GetConf(k) => write!(f, "GetConf({k:?})"),
            Command::SetConf(s) => write!(f, "SetConf({s:?})"),
            Command::ResetConf(s) => write!(f, "ResetConf({s:?})"),
            Command::UseFeature(n) => write!(f, "UseFeature({n:?})"),
            Command::Quit => f.write_str("Quit"),
        }
    }
}

fn bad_args(cmd: &str, why: &str) -> Refusal {
    Refusal::new(
        Code::BAD_ARGUMENTS,
        format!("Bad arguments to {cmd}: {why}"),
    )
}

impl Command {
    /// Parse a command; the refusal is Tor's reply to the same mistake.
    pub fn parse(raw: &RawCommand) -> Result<Command, Refusal> {
        let mut a = Args::new(&raw.args);
        let cmd = match raw.name().as_str() {
            "PROTOCOLINFO" => {
                while let Some(v) = a.word()? {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(Refusal::new(
                            Code::UNRECOGNIZED_ARGUMENT,
                            format!("No such version {}", quote(v)),
                        ));
                    }
                }
                Command::ProtocolInfo
            }
            "AUTHCHALLENGE" => {
                let (Some(method), Some(nonce), None) = (a.word()?, a.arg()?, a.arg()?) else {
                    return Err(Refusal::new(
                        Code::BAD_ARGUMENTS,
                        "Wrong number of arguments for AUTHCHALLENGE",
                    ));
                };
                if !method.eq_ignore_ascii_case("SAFECOOKIE") {
                    return Err(Refusal::new(
                        Code::UNRECOGNIZED_ARGUMENT,
                        "AUTHCHALLENGE only supports SAFECOOKIE authentication",
                    ));
                }
                let nonce = match nonce {
                    Arg::Quoted(b) => b,
                    Arg::Word(w) => hex::decode(w).map_err(|_| {
                        Refusal::new(Code::UNRECOGNIZED_ARGUMENT, "Invalid base16 client nonce")
                    })?,
                };
                Command::AuthChallenge(nonce)
            }
            "AUTHENTICATE" => {
                let secret = match a.arg()? {
                    None => Vec::new(),
                    Some(Arg::Quoted(b)) => b,
                    Some(Arg::Word(w)) => hex::decode(w).map_err(|_| {
                        Refusal::new(
                            Code::INTERNAL,
                            "Invalid hexadecimal encoding.  Maybe you tried a plain text \
                             password?  If so, the standard requires that you put it in \
                             double quotes.",
                        )
                    })?,
                };
                Command::Authenticate(zeroize::Zeroizing::new(secret))
            }
            "GETINFO" => Command::GetInfo(a.words()?),
            "SETEVENTS" => {
                let mut names = a.words()?;
                names.retain(|n| !n.eq_ignore_ascii_case("EXTENDED"));
                Command::SetEvents(names.iter().map(|n| n.to_ascii_uppercase()).collect())
            }
            "SIGNAL" => match a.words()?.as_slice() {
                [] => return Err(bad_args("SIGNAL", "Need at least 1 argument(s)")),
                [s] => Command::Signal(s.to_ascii_uppercase()),
                _ => return Err(bad_args("SIGNAL", "Cannot accept more than 1 argument(s)")),
            },
            "GETCONF" => Command::GetConf(a.words()?),
            "SETCONF" => Command::SetConf(a.settings()?),
            "RESETCONF" => Command::ResetConf(a.settings()?),
            "USEFEATURE" => Command::UseFeature(a.words()?),
            "QUIT" => Command::Quit,
            _ => {
                return Err(Refusal::new(
                    Code::UNRECOGNIZED_COMMAND,
                    format!("Unrecognized command {}", quote(&raw.keyword)),
                ));
            }
        };
        Ok(cmd)
    }
}

/// One argument: a bare word or a quoted string (unescaped, as bytes).
#[derive(Debug, PartialEq, Eq)]
enum Arg<'a> {
    Word(&'a str),
    Quoted(Vec<u8>),
}

/// A cursor over a command's arguments, separated by spaces.
struct Args<'a> {
    rest: &'a str,
}

impl<'a> Args<'a> {
    fn new(s: &'a str) -> Self {
        Args { rest: s }
    }

    fn skip_spaces(&mut self) {
        self.rest = self.rest.trim_start_matches([' ', '\t']);
    }

    /// The next word up to a space.
    fn word(&mut self) -> Result<Option<&'a str>, Refusal> {
        self.skip_spaces();
        if self.rest.is_empty() {
            return Ok(None);
        }
        let end = self.rest.find([' ', '\t']).unwrap_or(self.rest.len());
        let (w, rest) = self.rest.split_at(end);
        self.rest = rest;
        Ok(Some(w))
    }

    /// Every remaining word.
    fn words(&mut self) -> Result<Vec<String>, Refusal> {
        let mut v = Vec::new();
        while let Some(w) = self.word()? {
            v.push(w.to_string());
        }
        Ok(v)
    }

    /// The next word or quoted string.
    fn arg(&mut self) -> Result<Option<Arg<'a>>, Refusal> {
        self.skip_spaces();
        if self.rest.starts_with('"') {
            let (b, rest) = unquote(self.rest)?;
            self.rest = rest;
            return Ok(Some(Arg::Quoted(b)));
        }
        Ok(self.word()?.map(Arg::Word))
    }

    /// `KEY` or `KEY=VALUE` (the value a word or a quoted string), each.
    fn settings(&mut self) -> Result<Vec<Setting>, Refusal> {
        let mut v = Vec::new();
        loop {
            self.skip_spaces();
            if self.rest.is_empty() {
                return Ok(v);
            }
            let end = self.rest.find([' ', '\t', '=']).unwrap_or(self.rest.len());
            let (key, rest) = self.rest.split_at(end);
            self.rest = rest;
            let value = match self.rest.strip_prefix('=') {
                None => None,
                Some(r) if r.starts_with('"') => {
                    let (b, rest) = unquote(r)?;
                    self.rest = rest;
                    Some(String::from_utf8_lossy(&b).into_owned())
                }
                Some(r) => {
                    let end = r.find([' ', '\t']).unwrap_or(r.len());
                    self.rest = &r[end..];
                    Some(r[..end].to_string())
                }
            };
            v.push(Setting {
                key: key.to_string(),
                value,
            });
        }
    }
}

/// The quoted string at the start of `s` (control-spec 2.1.1: `\\`,
/// `\"`, `\'`, `\n`, `\r`, `\t`, `\xHH` and octal `\NNN` escapes), and
/// what follows it.
fn unquote(s: &str) -> Result<(Vec<u8>, &str), Refusal> {
    let unterminated = || Refusal::new(Code::BAD_ARGUMENTS, "Unterminated quoted string");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 1;
    loop {
        match b.get(i).copied().ok_or_else(unterminated)? {
            b'"' => return Ok((out, &s[i + 1..])),
            b'\\' => {
                let c = b.get(i + 1).copied().ok_or_else(unterminated)?;
                i += 2;
                match c {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'x' => {
                        let h = b.get(i..i + 2).and_then(|h| {
                            u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
                        });
                        let h = h.ok_or_else(|| {
                            Refusal::new(Code::BAD_ARGUMENTS, "Bad \\x escape in quoted string")
                        })?;
                        out.push(h);
                        i += 2;
                    }
                    b'0'..=b'7' => {
                        let mut v = u32::from(c - b'0');
                        for _ in 0..2 {
                            match b.get(i) {
                                Some(&d @ b'0'..=b'7') => {
                                    v = v * 8 + u32::from(d - b'0');
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(u8::try_from(v).map_err(|_| {
                            Refusal::new(Code::BAD_ARGUMENTS, "Bad octal escape in quoted string")
                        })?);
                    }
                    other => out.push(other),
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
}

/// `s` as a quoted string: backslashes and quotes escaped, control
/// characters as `\n`, `\r`, `\t` or `\xHH`.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c) & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` with nothing that could end its line: CR, LF and other control
/// characters become `?`.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    /// A `+` line and its data (lines separated by LF).
    Data(String, String),
}

/// A reply: lines with one status code, the last of them ending it
/// (`250-a`, `250+b` with data, `250 OK`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: Code,
    lines: Vec<Line>,
}

impl Reply {
    /// A reply with `code` and no lines yet.
    pub fn new(code: Code) -> Self {
        Reply {
            code,
            lines: Vec::new(),
        }
    }

    /// `250 OK`.
    pub fn ok() -> Self {
        Reply::new(Code::OK).line("OK")
    }

    /// A one-line reply.
    pub fn error(code: Code, text: &str) -> Self {
        Reply::new(code).line(text)
    }

    pub fn code(&self) -> Code {
        self.code
    }

    /// Add a line (control characters in it become `?`).
    pub fn line(mut self, text: &str) -> Self {
        self.lines.push(Line::Text(one_line(text)));
        self
    }

    /// Add `key=value`: on one line, or as a data block if `value` has
    /// several lines (as Tor answers GETINFO).
    pub fn key_value(mut self, key: &str, value: &str) -> Self {
        let key = one_line(key);
        if value.contains(['\n', '\r']) {
            self.lines
                .push(Line::Data(format!("{key}="), value.to_string()));
        } else {
            self.lines
                .push(Line::Text(format!("{key}={}", one_line(value))));
        }
        self
    }

    /// The reply's bytes. The last line ends it; a reply whose last line
    /// is a data block (or that has none) ends with `OK`.
    pub fn encode(&self) -> Vec<u8> {
        let mut lines = self.lines.clone();
        if !matches!(lines.last(), Some(Line::Text(_))) {
            lines.push(Line::Text("OK".into()));
        }
        let code = self.code.0;
        let mut out = String::new();
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            match l {
                Line::Text(t) if i == last => out.push_str(&format!("{code} {t}\r\n")),
                Line::Text(t) => out.push_str(&format!("{code}-{t}\r\n")),
                Line::Data(head, body) => {
                    out.push_str(&format!("{code}+{head}\r\n"));
                    for l in body.lines() {
                        let l = one_line(l);
                        if l.starts_with('.') {
                            out.push('.');
                        }
                        out.push_str(&l);
                        out.push_str("\r\n");
                    }
                    out.push_str(".\r\n");
                }
            }
        }
        out.into_bytes()
    }
}

/// An asynchronous event line, `650 text` (control characters in `text`
/// become `?`).
pub fn event(text: &str) -> Vec<u8> {
    format!("{} {}\r\n", Code::EVENT.0, one_line(text)).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(line: &str) -> RawCommand {
        let mut b = line.as_bytes().to_vec();
        b.extend_from_slice(b"\r\n");
        take_command(&b).unwrap().unwrap().1
    }

    fn parse(line: &str) -> Result<Command, Refusal> {
        Command::parse(&raw(line))
    }

    #[test]
    fn commands_are_framed_by_lines() {
        assert_eq!(take_command(b"GETINFO vers").unwrap(), None);
        let (n, c) = take_command(b"GETINFO version\r\nQUIT\n").unwrap().unwrap();
        assert_eq!(n, 17);
        assert_eq!(c.keyword, "GETINFO");
        assert_eq!(c.args, "version");
        let (n, c) = take_command(b"quit\nrest").unwrap().unwrap();
        assert_eq!((n, c.name().as_str(), c.args.as_str()), (5, "QUIT", ""));
        // A multi-line command runs to its lone dot, one dot of `..` lost.
        let m = b"+LOADCONF\r\nSocksPort 1\r\n..hidden\r\n.\r\nQUIT\r\n";
        assert_eq!(take_command(&m[..30]).unwrap(), None);
        let (n, c) = take_command(m).unwrap().unwrap();
        assert_eq!(n, m.len() - 6);
        assert_eq!(c.keyword, "+LOADCONF");
        assert_eq!(c.data.as_deref(), Some(&b"SocksPort 1\n.hidden\n"[..]));
    }

    #[test]
    fn a_command_is_bounded() {
        let long = vec![b'A'; MAX_COMMAND + 1];
        assert_eq!(take_command(&long), Err(TooLong));
        let mut line = vec![b'A'; MAX_COMMAND];
        line.push(b'\n');
        assert_eq!(take_command(&line), Err(TooLong));
        line.truncate(MAX_COMMAND - 1);
        line.push(b'\n');
        assert!(take_command(&line).unwrap().is_some());
        // Data lines count too.
        let mut m = b"+POSTDESCRIPTOR\r\n".to_vec();
        while m.len() <= MAX_COMMAND {
            m.extend_from_slice(b"data line\r\n");
        }
        assert_eq!(take_command(&m), Err(TooLong));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(
            parse("getinfo version"),
            Ok(Command::GetInfo(vec!["version".into()]))
        );
        assert_eq!(parse("Signal newnym"), Ok(Command::Signal("NEWNYM".into())));
        assert_eq!(
            parse("setevents extended circ Stream"),
            Ok(Command::SetEvents(vec!["CIRC".into(), "STREAM".into()]))
        );
        assert_eq!(parse("SETEVENTS"), Ok(Command::SetEvents(vec![])));
        assert_eq!(parse("QUIT"), Ok(Command::Quit));
        assert_eq!(parse("PROTOCOLINFO 1"), Ok(Command::ProtocolInfo));
        assert_eq!(parse("PROTOCOLINFO"), Ok(Command::ProtocolInfo));
    }

    #[test]
    fn mistakes_get_tors_replies() {
        let refused = |l: &str| parse(l).unwrap_err().reply().encode();
        assert_eq!(refused("FOO bar"), b"510 Unrecognized command \"FOO\"\r\n");
        let (_, multi) = take_command(b"+FOO\r\ndata\r\n.\r\n").unwrap().unwrap();
        assert_eq!(
            Command::parse(&multi).unwrap_err().reply().encode(),
            b"510 Unrecognized command \"+FOO\"\r\n"
        );
        assert_eq!(refused("PROTOCOLINFO x"), b"513 No such version \"x\"\r\n");
        assert_eq!(
            refused("SIGNAL"),
            b"512 Bad arguments to SIGNAL: Need at least 1 argument(s)\r\n"
        );
        assert_eq!(
            refused("SIGNAL NEWNYM X"),
            b"512 Bad arguments to SIGNAL: Cannot accept more than 1 argument(s)\r\n"
        );
        assert_eq!(
            refused("AUTHCHALLENGE SAFECOOKIE"),
            b"512 Wrong number of arguments for AUTHCHALLENGE\r\n"
        );
        assert_eq!(
            refused("AUTHCHALLENGE FOO 00"),
            b"513 AUTHCHALLENGE only supports SAFECOOKIE authentication\r\n"
        );
        assert_eq!(
            refused("AUTHCHALLENGE SAFECOOKIE zz"),
            b"513 Invalid base16 client nonce\r\n"
        );
        assert!(refused("AUTHENTICATE password").starts_with(b"551 Invalid hexadecimal"));
        assert_eq!(
            refused("AUTHENTICATE \"open"),
            b"512 Unterminated quoted string\r\n"
        );
    }

    #[test]
    fn credentials_are_hex_or_quoted() {
        let secret = |l: &str| match parse(l).unwrap() {
            Command::Authenticate(s) => s.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(secret("AUTHENTICATE"), b"");
        assert_eq!(secret("AUTHENTICATE 00ff"), [0, 255]);
        assert_eq!(secret("AUTHENTICATE \"pass word\""), b"pass word");
        assert_eq!(
            secret(r#"AUTHENTICATE "a\"b\\c\n\x41\101\7""#),
            b"a\"b\\c\nAA\x07"
        );
        assert_eq!(
            parse("AUTHCHALLENGE safecookie \"ab\""),
            Ok(Command::AuthChallenge(b"ab".to_vec()))
        );
        assert_eq!(
            parse("AUTHCHALLENGE SAFECOOKIE 0011"),
            Ok(Command::AuthChallenge(vec![0, 0x11]))
        );
        // The secret never shows in logs.
        assert_eq!(
            format!("{:?}", parse("AUTHENTICATE \"pw\"").unwrap()),
            "Authenticate(..)"
        );
    }

    #[test]
    fn settings_take_words_or_quoted_values() {
        let s = |k: &str, v: Option<&str>| Setting {
            key: k.into(),
            value: v.map(Into::into),
        };
        assert_eq!(
            parse(r#"SETCONF MaxCircuitDirtiness=30 A="10 minutes" B C="""#),
            Ok(Command::SetConf(vec![
                s("MaxCircuitDirtiness", Some("30")),
                s("A", Some("10 minutes")),
                s("B", None),
                s("C", Some("")),
            ]))
        );
        assert_eq!(
            parse("RESETCONF MaxCircuitDirtiness"),
            Ok(Command::ResetConf(vec![s("MaxCircuitDirtiness", None)]))
        );
        assert_eq!(parse("GETCONF"), Ok(Command::GetConf(vec![])));
    }

    #[test]
    fn replies_end_with_their_last_line() {
        assert_eq!(Reply::ok().encode(), b"250 OK\r\n");
        let r = Reply::new(Code::OK)
            .key_value("version", "0.4.9.0-allium-0.1.0")
            .key_value("circuit-status", "")
            .line("OK");
        assert_eq!(
            r.encode(),
            b"250-version=0.4.9.0-allium-0.1.0\r\n250-circuit-status=\r\n250 OK\r\n"
        );
        // GETCONF ends on its last value; an empty reply is OK.
        let r = Reply::new(Code::OK)
            .line("SocksPort=127.0.0.1:9150")
            .line("MaxCircuitDirtiness=600");
        assert_eq!(
            r.encode(),
            b"250-SocksPort=127.0.0.1:9150\r\n250 MaxCircuitDirtiness=600\r\n"
        );
        assert_eq!(Reply::new(Code::OK).encode(), b"250 OK\r\n");
    }

    #[test]
    fn data_blocks_are_dot_escaped() {
        let r = Reply::new(Code::OK).key_value("circuit-status", "1 BUILT\n.2 BUILT\n");
        assert_eq!(
            r.encode(),
            b"250+circuit-status=\r\n1 BUILT\r\n..2 BUILT\r\n.\r\n250 OK\r\n"
        );
    }

    #[test]
    fn nothing_escapes_its_line() {
        let r = Reply::error(Code::UNRECOGNIZED_ENTITY, "x\r\n650 CIRC 1 BUILT");
        assert_eq!(r.encode(), b"552 x??650 CIRC 1 BUILT\r\n");
        assert_eq!(
            Reply::new(Code::OK).key_value("a\nb", "c\rd").encode(),
            b"250+a?b=\r\nc?d\r\n.\r\n250 OK\r\n"
        );
        assert_eq!(event("BW 1 2\n250 OK"), b"650 BW 1 2?250 OK\r\n");
        assert_eq!(quote("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\x01""#);
    }
}
