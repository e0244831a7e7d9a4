//! Flow and congestion control (`doc/protocol.md` section "Flow and
//! congestion control"): the circuit window with authenticated SENDMEs,
//! sized by a congestion controller or fixed, as the circuit handshake
//! agreed ([`CircParams`]).
//!
//! Only DATA messages count against the circuit window. A sender may have
//! `cwnd` DATA cells in flight (sent, not yet acknowledged): with
//! [`CircParams::Vegas`] the window follows the path ([`crate::congestion`]);
//! with [`CircParams::Fixed`] it is [`FIXED_WINDOW`]. The receiver
//! acknowledges every `inc` cells with a circuit SENDME once they have left
//! the circuit (see [`crate::circuit`]), which takes them out of flight.
//!
//! A circuit SENDME carries the 16-byte tag that the end hop's own layer put
//! on (backward) or found on (forward) the DATA cell that completed the
//! acknowledged `inc` cells. The peer that sent the data remembers those
//! tags and rejects a SENDME that does not carry the next one: a client
//! cannot acknowledge cells it never received, nor speed up a sender by
//! acknowledging early. The sender randomises the padding of each such cell
//! (and keeps at least [`SENDME_CELL_RANDOM`] bytes of it), so the tag
//! cannot be computed from predictable content either. The time from
//! sending that cell to the SENDME is the round trip the controller uses.
//!
//! The receiver allows the peer [`CircParams::recv_window`] cells beyond
//! what it has acknowledged: the most the sender's window may reach. A
//! peer that sends more has ignored its window and loses the circuit.
//!
//! Streams have no window: a stream's receiver says XOFF when it holds too
//! much the application has not taken, and XON when it has drained (the
//! circuit core does this).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::aead::ct_eq;
use crate::congestion::{Params, Vegas};
use crate::{Error, PeerMisbehaved};

/// The window of a circuit without congestion control.
pub const FIXED_WINDOW: u32 = 1000;
/// Cells one circuit SENDME acknowledges without congestion control.
pub const FIXED_INCREMENT: u32 = 100;
/// The fewest cells a circuit SENDME may acknowledge with congestion
/// control (more SENDMEs would only cost cells).
pub const MIN_INCREMENT: u8 = 16;
/// Cells one circuit SENDME acknowledges by default (as Tor's `cc_sendme_inc`).
pub const DEFAULT_INCREMENT: u8 = 31;
/// The largest congestion window: cells one circuit may have in flight
/// each way (32 MiB of cells). A relay's memory cap
/// (`max_queued_bytes`) bounds what many circuits together may queue.
pub const CWND_MAX: u32 = 65_536;
/// A window with no more than this many SENDMEs' worth of room left when a
/// SENDME arrives counts as full (or a quarter of the window, if less).
const FULL_GAP: u32 = 4;
/// Random padding bytes a sender keeps on each DATA cell whose tag a
/// circuit SENDME will carry.
pub const SENDME_CELL_RANDOM: usize = 16;

/// How a circuit hop's flow is controlled, as agreed in the circuit
/// handshake: `algorithm u8 | inc u8` on the wire (0 and 0 for
/// [`CircParams::Fixed`], 1 and `inc` for [`CircParams::Vegas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircParams {
    /// A window of [`FIXED_WINDOW`] cells, SENDME every [`FIXED_INCREMENT`].
    Fixed,
    /// Vegas congestion control, SENDME every `inc` cells.
    Vegas { inc: u8 },
}

impl Default for CircParams {
    fn default() -> Self {
        CircParams::Vegas {
            inc: DEFAULT_INCREMENT,
        }
    }
}

impl CircParams {
    pub const LEN: usize = 2;

    pub fn encode(self) -> [u8; 2] {
        match self {
            CircParams::Fixed => [0, 0],
            CircParams::Vegas { inc } => [1, inc],
        }
    }

    pub fn decode(b: [u8; 2]) -> Result<Self, Error> {
        match b {
            [0, 0] => Ok(CircParams::Fixed),
            [1, inc] if inc >= MIN_INCREMENT => Ok(CircParams::Vegas { inc }),
            [a, i] => Err(Error::malformed(
                "circuit parameters",
                format!("algorithm {a} with SENDME increment {i}"),
            )),
        }
    }

    /// Cells each circuit SENDME acknowledges.
    pub fn inc(self) -> u32 {
        match self {
            CircParams::Fixed => FIXED_INCREMENT,
            CircParams::Vegas { inc } => u32::from(inc),
        }
    }

    /// Cells a receiver allows beyond what it has acknowledged.
    pub fn recv_window(self) -> u32 {
        match self {
            CircParams::Fixed => FIXED_WINDOW,
            CircParams::Vegas { .. } => CWND_MAX,
        }
    }

    fn controller(self, relays: u32) -> Option<Vegas> {
        match self {
            CircParams::Fixed => None,
            CircParams::Vegas { inc } => Some(Vegas::new(
                Params::with_inc(u32::from(inc)).for_relays(relays),
            )),
        }
    }
}

/// Round-trip estimate from circuit SENDMEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rtt {
    pub min: Duration,
    pub latest: Duration,
}

/// The sending side of a circuit: the window, the tags the peer's SENDMEs
/// must carry and when their cells went out.
#[derive(Debug)]
pub struct CircSendWindow {
    inc: u32,
    cc: Option<Vegas>,
    inflight: u32,
    sent: u64,
    expected: VecDeque<([u8; 16], Instant)>,
    /// The window held data back since the last SENDME.
    held_back: bool,
    /// When the last SENDME came, and whether the window was full then.
    last_sendme_at: Option<Instant>,
    batch_full: bool,
    rtt: Option<Rtt>,
}

impl CircSendWindow {
    pub fn new(params: CircParams) -> Self {
        Self::through(params, 3)
    }

    /// The window of a path through `relays` relays (six between the two
    /// ends of a joined circuit): its queue thresholds grow with it.
    pub fn through(params: CircParams, relays: u32) -> Self {
        CircSendWindow {
            inc: params.inc(),
            cc: params.controller(relays),
            inflight: 0,
            sent: 0,
            expected: VecDeque::new(),
            held_back: false,
            last_sendme_at: None,
            batch_full: false,
            rtt: None,
        }
    }

    /// Cells that may be in flight now.
    pub fn cwnd(&self) -> u32 {
        self.cc.as_ref().map_or(FIXED_WINDOW, Vegas::cwnd)
    }

    /// DATA cells that may be sent now.
    pub fn available(&self) -> u32 {
        self.cwnd().saturating_sub(self.inflight)
    }

    /// The round trip measured by SENDMEs, once one came back.
    pub fn rtt(&self) -> Option<Rtt> {
        self.rtt
    }

    /// The sender had more to send than the window allowed (the window may
    /// grow only when it is what limits the sender).
    pub fn held_back(&mut self) {
        self.held_back = true;
    }

    /// True when the next DATA cell sent is one a SENDME will acknowledge by
    /// its tag (so its padding is randomised).
    pub fn next_is_acked(&self) -> bool {
        (self.sent + 1).is_multiple_of(u64::from(self.inc))
    }

    /// Record a DATA cell sent at `now` with end-hop tag `tag`. Fails when
    /// the window is closed: the caller must not have sent it.
    pub fn on_data_sent(&mut self, now: Instant, tag: &[u8; 16]) -> Result<(), Error> {
        if self.available() == 0 {
            return Err(Error::FlowControl("DATA sent on a closed circuit window"));
        }
        self.inflight += 1;
        self.sent += 1;
        if self.sent.is_multiple_of(u64::from(self.inc)) {
            self.expected.push_back((*tag, now));
        }
        Ok(())
    }

    /// Check a circuit SENDME that arrived at `now`, take what it
    /// acknowledges out of flight and let the controller see the round trip.
    pub fn on_sendme(&mut self, now: Instant, tag: &[u8; 16]) -> Result<(), Error> {
        let Some((want, sent_at)) = self.expected.front() else {
            return Err(PeerMisbehaved::SendmeUnowed.into());
        };
        if !ct_eq(want, tag) {
            return Err(PeerMisbehaved::SendmeWrongTag.into());
        }
        let latest = now.saturating_duration_since(*sent_at);
        self.expected.pop_front();
        // The window was what limited the sender if it held data back, or
        // if it was all but full when the acknowledgement came (a sender
        // refilling it from its source does not always have data waiting
        // at the very moment a SENDME opens it). SENDMEs that arrive
        // together (a window sent in one burst comes back in one) are
        // judged together, by the first: the sender had no chance to
        // refill between them.
        let full = if self.last_sendme_at == Some(now) {
            self.batch_full
        } else {
            std::mem::take(&mut self.held_back)
                || self.inflight + (FULL_GAP * self.inc).min(self.cwnd() / 4) >= self.cwnd()
        };
        self.last_sendme_at = Some(now);
        self.batch_full = full;
        self.inflight -= self.inc;
        let min = self.rtt.map_or(latest, |r| r.min.min(latest));
        self.rtt = Some(Rtt { min, latest });
        if let Some(cc) = &mut self.cc {
            cc.on_sendme(now, latest, full);
        }
        Ok(())
    }
}

/// The receiving side of a circuit.
#[derive(Debug)]
pub struct CircRecvWindow {
    inc: u32,
    /// Cells the peer may still send before our next SENDME.
    window: u32,
    max: u32,
    received: u64,
    released: u64,
    /// Tags of the cells that complete each `inc`, until acknowledged.
    tags: VecDeque<[u8; 16]>,
}

impl CircRecvWindow {
    pub fn new(params: CircParams) -> Self {
        CircRecvWindow {
            inc: params.inc(),
            window: params.recv_window(),
            max: params.recv_window(),
            received: 0,
            released: 0,
            tags: VecDeque::new(),
        }
    }

    /// Cells the peer may have in flight beyond what was acknowledged.
    pub fn window_size(&self) -> u32 {
        self.max
    }

    /// Record a DATA cell received with end-hop tag `tag`. A peer that sends
    /// past the window breaks the protocol: the circuit must be closed.
    pub fn on_data_received(&mut self, tag: &[u8; 16]) -> Result<(), Error> {
        if self.window == 0 {
            return Err(PeerMisbehaved::DataPastCircuitWindow.into());
        }
        self.window -= 1;
        self.received += 1;
        if self.received.is_multiple_of(u64::from(self.inc)) {
            self.tags.push_back(*tag);
        }
        Ok(())
    }

    /// Record `n` received cells as released (they left the circuit).
    /// Pushes the tags of the SENDMEs to send now, oldest first.
    pub fn release(&mut self, n: u32, out: &mut Vec<[u8; 16]>) {
        let inc = u64::from(self.inc);
        let before = self.released / inc;
        self.released = (self.released + u64::from(n)).min(self.received);
        for _ in before..self.released / inc {
            if let Some(t) = self.tags.pop_front() {
                self.window += self.inc;
                out.push(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(i: u64) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&i.to_be_bytes());
        t
    }

    #[test]
    fn fixed_window_round_trip() {
        let now = Instant::now();
        let mut s = CircSendWindow::new(CircParams::Fixed);
        let mut r = CircRecvWindow::new(CircParams::Fixed);
        let mut acks = Vec::new();
        for i in 1..=u64::from(FIXED_WINDOW) {
            assert_eq!(s.next_is_acked(), i % 100 == 0);
            s.on_data_sent(now, &tag(i)).unwrap();
            r.on_data_received(&tag(i)).unwrap();
        }
        assert_eq!(s.available(), 0);
        assert!(s.on_data_sent(now, &tag(0)).is_err());
        // One more cell from a peer that ignores the window is refused.
        assert!(matches!(
            r.on_data_received(&tag(0)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::DataPastCircuitWindow))
        ));

        r.release(150, &mut acks);
        assert_eq!(acks, vec![tag(100)]);
        r.release(50, &mut acks);
        assert_eq!(acks, vec![tag(100), tag(200)]);
        s.on_sendme(now, &acks[0]).unwrap();
        assert!(matches!(
            s.on_sendme(now, &tag(999)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeWrongTag))
        ));
        s.on_sendme(now, &acks[1]).unwrap();
        assert_eq!(s.available(), 200);
        // No more SENDMEs are owed until more cells have been acknowledged.
        let mut s2 = CircSendWindow::new(CircParams::Fixed);
        assert!(matches!(
            s2.on_sendme(now, &tag(1)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeUnowed))
        ));
    }

    #[test]
    fn the_window_grows_with_round_trips_of_a_full_window() {
        let params = CircParams::default();
        let inc = u64::from(params.inc());
        // A path of 100 ms that holds all the window sends: each SENDME
        // comes back 100 ms after its cell. Slow start doubles the window
        // each round, whether the sender fills the window again after each
        // SENDME (the ack clock) or only after all those that came together
        // (a window sent in one burst comes back in one batch, which the
        // sender handles before it refills).
        let rtt = Duration::from_millis(100);
        for refill_each in [true, false] {
            let start = Instant::now();
            let mut s = CircSendWindow::new(params);
            let first = s.cwnd();
            let mut sent = 0;
            let mut acks = VecDeque::new();
            let mut fill = |s: &mut CircSendWindow, now: Instant, acks: &mut VecDeque<_>| {
                while s.available() > 0 {
                    sent += 1;
                    s.on_data_sent(now, &tag(sent)).unwrap();
                    if sent % inc == 0 {
                        acks.push_back((now + rtt, sent));
                    }
                }
                s.held_back();
            };
            fill(&mut s, start, &mut acks);
            while let Some((at, k)) = acks.pop_front() {
                if at > start + rtt * 4 {
                    break;
                }
                s.on_sendme(at, &tag(k)).unwrap();
                if refill_each || acks.front().is_none_or(|a| a.0 != at) {
                    fill(&mut s, at, &mut acks);
                }
            }
            assert!(
                s.cwnd() >= 8 * first,
                "{} after 4 rounds from {first} (refill each: {refill_each})",
                s.cwnd()
            );
            assert_eq!(
                s.rtt(),
                Some(Rtt {
                    min: Duration::from_millis(100),
                    latest: Duration::from_millis(100)
                })
            );
        }
        // A receiver allows the most any window may reach, and no more.
        let mut r = CircRecvWindow::new(params);
        for k in 1..=u64::from(CWND_MAX) {
            r.on_data_received(&tag(k)).unwrap();
        }
        assert!(r.on_data_received(&tag(0)).is_err());
    }

    #[test]
    fn params_on_the_wire() {
        for p in [
            CircParams::Fixed,
            CircParams::default(),
            CircParams::Vegas { inc: 255 },
        ] {
            assert_eq!(CircParams::decode(p.encode()).unwrap(), p);
        }
        assert_eq!(CircParams::default().encode(), [1, 31]);
        for bad in [[0, 1], [1, 15], [1, 0], [2, 31]] {
            assert!(CircParams::decode(bad).is_err(), "{bad:?}");
        }
    }
}
