//! Circuit, stream and bootstrap status lines, as the CIRC, STREAM and
//! STATUS_CLIENT events and `GETINFO circuit-status`, `stream-status` and
//! `status/bootstrap-phase` give them (control-spec 4.1.1, 4.1.2, 4.1.10).
//!
//! ```text
//! 650 CIRC 7 BUILT $3A7F...~relay1,$09BC...~relay4,$E2D1...~exit0 PURPOSE=GENERAL TIME_CREATED=2025-06-01T12:00:00.250000
//! 650 STREAM 12 SUCCEEDED 7 example.com:443
//! 650 STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"
//! ```
//!
//! Tor names a relay by the 20-byte SHA-1 fingerprint of its RSA key, and
//! controllers insist on 40 hex digits; an Allium relay's identity is a
//! 32-byte Ed25519 key, so its first 20 bytes stand for it ([`Hop`]).

use std::fmt;

use super::quote;
use crate::cell::DestroyReason;
use crate::relaymsg::EndReason;

/// A relay in a circuit's path: `$FINGERPRINT~nickname`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The first 20 bytes of the relay's Ed25519 identity.
    pub fingerprint: [u8; 20],
    pub nickname: String,
}

impl Hop {
    pub fn new(identity: &[u8; 32], nickname: &str) -> Self {
        let mut fingerprint = [0u8; 20];
        fingerprint.copy_from_slice(&identity[..20]);
        Hop {
            fingerprint,
            nickname: nickname.to_string(),
        }
    }
}

impl fmt::Display for Hop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", hex::encode_upper(self.fingerprint))?;
        // A nickname is 1 to 19 letters and digits; anything else is left out.
        let nick: String = self
            .nickname
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(19)
            .collect();
        if !nick.is_empty() {
            write!(f, "~{nick}")?;
        }
        Ok(())
    }
}

/// Where a circuit is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircStatus {
    Launched,
    Built,
    Extended,
    Failed,
    Closed,
}

impl CircStatus {
    pub fn name(self) -> &'static str {
        match self {
            CircStatus::Launched => "LAUNCHED",
            CircStatus::Built => "BUILT",
            CircStatus::Extended => "EXTENDED",
            CircStatus::Failed => "FAILED",
            CircStatus::Closed => "CLOSED",
        }
    }
}

/// A circuit's status line: a CIRC event without its `CIRC`, or a line of
/// `GETINFO circuit-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircLine {
    pub id: u64,
    pub status: CircStatus,
    /// The hops built so far.
    pub path: Vec<Hop>,
    /// When the circuit was launched, in microseconds since the UNIX epoch.
    pub created_us: u64,
    /// Why it failed or closed (a name from [`circ_reason`]).
    pub reason: Option<&'static str>,
    /// What the relay that destroyed it said.
    pub remote_reason: Option<&'static str>,
}

impl fmt::Display for CircLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.id, self.status.name())?;
        for (i, h) in self.path.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { "," })?;
            write!(f, "{h}")?;
        }
        write!(
            f,
            " PURPOSE=GENERAL TIME_CREATED={}",
            iso_time(self.created_us)
        )?;
        reasons(f, self.reason, self.remote_reason)
    }
}

/// Where a stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStatus {
    New,
    NewResolve,
    SentConnect,
    SentResolve,
    Succeeded,
    Failed,
    Closed,
    /// Taken off its circuit, to be tried on another.
    Detached,
}

impl StreamStatus {
    pub fn name(self) -> &'static str {
        match self {
            StreamStatus::New => "NEW",
            StreamStatus::NewResolve => "NEWRESOLVE",
            StreamStatus::SentConnect => "SENTCONNECT",
            StreamStatus::SentResolve => "SENTRESOLVE",
            StreamStatus::Succeeded => "SUCCEEDED",
            StreamStatus::Failed => "FAILED",
            StreamStatus::Closed => "CLOSED",
            StreamStatus::Detached => "DETACHED",
        }
    }
}

/// A stream's status line: a STREAM event without its `STREAM`, or a line
/// of `GETINFO stream-status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamLine {
    pub id: u64,
    pub status: StreamStatus,
    /// The circuit it is attached to; 0 for none yet.
    pub circ: u64,
    /// `host:port` (port 0 for a resolve).
    pub target: String,
    /// Why it failed, was detached or closed (a name from [`stream_reason`],
    /// or `END` when the exit ended it).
    pub reason: Option<&'static str>,
    /// The exit's END reason, with `reason` `END`.
    pub remote_reason: Option<&'static str>,
}

impl fmt::Display for StreamLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A target is one token: a hostname or address never holds a
        // space, and none is let through here.
        let target: String = self
            .target
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        write!(
            f,
            "{} {} {} {target}",
            self.id,
            self.status.name(),
            self.circ
        )?;
        reasons(f, self.reason, self.remote_reason)
    }
}

/// ` REASON=r REMOTE_REASON=r`, each if given (CIRC and STREAM events).
fn reasons(
    f: &mut std::fmt::Formatter<'_>,
    reason: Option<&str>,
    remote: Option<&str>,
) -> std::fmt::Result {
    if let Some(r) = reason {
        write!(f, " REASON={r}")?;
    }
    if let Some(r) = remote {
        write!(f, " REMOTE_REASON={r}")?;
    }
    Ok(())
}

/// `NOTICE BOOTSTRAP PROGRESS=N TAG=tag SUMMARY="..."`: `GETINFO
/// status/bootstrap-phase`, and a STATUS_CLIENT event after `STATUS_CLIENT `.
pub fn bootstrap_status(progress: u8, tag: &str, summary: &str) -> String {
    format!(
        "NOTICE BOOTSTRAP PROGRESS={progress} TAG={tag} SUMMARY={}",
        quote(summary)
    )
}

/// Tor's name (control-spec 4.1.1) for why a circuit closed.
pub fn circ_reason(r: DestroyReason) -> &'static str {
    match r {
        DestroyReason::NONE => "NONE",
        DestroyReason::INTERNAL => "INTERNAL",
        DestroyReason::REQUESTED => "REQUESTED",
        DestroyReason::CONNECT_FAILED => "CONNECTFAILED",
        DestroyReason::CHANNEL_CLOSED => "CHANNEL_CLOSED",
        DestroyReason::FINISHED => "FINISHED",
        DestroyReason::TIMEOUT => "TIMEOUT",
        DestroyReason::DESTROYED => "DESTROYED",
        DestroyReason::NO_SUCH_SERVICE => "NOSUCHSERVICE",
        DestroyReason::RESOURCE_LIMIT => "RESOURCELIMIT",
        // PROTOCOL, CELL_AUTH, FLOW_CONTROL and unknown values: a peer
        // broke the protocol.
        _ => "TORPROTOCOL",
    }
}

/// Tor's name (control-spec 4.1.2) for why a stream ended.
pub fn stream_reason(r: EndReason) -> &'static str {
    match r {
        EndReason::RESOLVE_FAILED => "RESOLVEFAILED",
        EndReason::CONNECT_REFUSED => "CONNECTREFUSED",
        EndReason::EXIT_POLICY => "EXITPOLICY",
        EndReason::DESTROY => "DESTROY",
        EndReason::DONE => "DONE",
        EndReason::TIMEOUT => "TIMEOUT",
        EndReason::NO_ROUTE => "NOROUTE",
        EndReason::INTERNAL => "INTERNAL",
        EndReason::RESOURCE_LIMIT => "RESOURCELIMIT",
        EndReason::CONN_RESET => "CONNRESET",
        EndReason::PROTOCOL => "TORPROTOCOL",
        _ => "MISC",
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` in UTC, from microseconds since the UNIX
/// epoch (control-spec's ISOTime2Frac).
pub fn iso_time(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Days to a civil date (H. Hinnant's algorithm), from 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_us % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000000");
        // 2012-11-08T16:48:41.420251, the example of stem's parser.
        assert_eq!(
            iso_time(1_352_393_321_420_251),
            "2012-11-08T16:48:41.420251"
        );
        assert_eq!(iso_time(951_782_400_000_001), "2000-02-29T00:00:00.000001");
        assert_eq!(
            iso_time(4_107_542_399_999_999),
            "2100-02-28T23:59:59.999999"
        );
    }

    fn hops() -> Vec<Hop> {
        vec![
            Hop::new(&[0xab; 32], "guard"),
            Hop::new(&[0x01; 32], "mid dle"),
            Hop::new(&[0xff; 32], ""),
        ]
    }

    #[test]
    fn circuit_lines_are_tors() {
        let mut l = CircLine {
            id: 3,
            status: CircStatus::Launched,
            path: vec![],
            created_us: 1_352_393_321_420_251,
            reason: None,
            remote_reason: None,
        };
        assert_eq!(
            l.to_string(),
            "3 LAUNCHED PURPOSE=GENERAL TIME_CREATED=2012-11-08T16:48:41.420251"
        );
        l.status = CircStatus::Built;
        l.path = hops();
        let ab = "AB".repeat(20);
        let one = "01".repeat(20);
        let ff = "FF".repeat(20);
        assert_eq!(
            l.to_string(),
            format!(
                "3 BUILT ${ab}~guard,${one}~middle,${ff} PURPOSE=GENERAL TIME_CREATED=2012-11-08T16:48:41.420251"
            )
        );
        l.status = CircStatus::Closed;
        l.path.truncate(1);
        l.reason = Some(circ_reason(DestroyReason::DESTROYED));
        l.remote_reason = Some(circ_reason(DestroyReason::CELL_AUTH));
        assert_eq!(
            l.to_string(),
            format!(
                "3 CLOSED ${ab}~guard PURPOSE=GENERAL TIME_CREATED=2012-11-08T16:48:41.420251 REASON=DESTROYED REMOTE_REASON=TORPROTOCOL"
            )
        );
    }

    #[test]
    fn stream_lines_are_tors() {
        let mut l = StreamLine {
            id: 12,
            status: StreamStatus::New,
            circ: 0,
            target: "example.com:443".into(),
            reason: None,
            remote_reason: None,
        };
        assert_eq!(l.to_string(), "12 NEW 0 example.com:443");
        l.status = StreamStatus::Closed;
        l.circ = 7;
        l.reason = Some("END");
        l.remote_reason = Some(stream_reason(EndReason::DONE));
        assert_eq!(
            l.to_string(),
            "12 CLOSED 7 example.com:443 REASON=END REMOTE_REASON=DONE"
        );
        l.target = "a b\r\n650 x:1".into();
        l.reason = None;
        l.remote_reason = None;
        assert_eq!(l.to_string(), "12 CLOSED 7 a?b??650?x:1");
        assert_eq!(stream_reason(EndReason(200)), "MISC");
    }

    #[test]
    fn bootstrap_status_is_tors() {
        assert_eq!(
            bootstrap_status(100, "done", "Done"),
            "NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY=\"Done\""
        );
    }
}
