//! Flow control (`doc/protocol.md` section "Flow control"): SENDME windows
//! at circuit and stream level, with authenticated circuit SENDMEs.
//!
//! Only DATA messages count against windows. A sender starts with a window
//! of [`CIRC_WINDOW`] (circuit) and [`STREAM_WINDOW`] (stream) DATA cells and
//! may not send when it is zero. A receiver acknowledges every
//! [`CIRC_INCREMENT`] / [`STREAM_INCREMENT`] cells once they have left its
//! buffers (delivered to the application or written to the exit's TCP
//! connection), which gives the sender that many cells back.
//!
//! A circuit SENDME carries the 16-byte tag that the end hop's own layer put
//! on (backward) or found on (forward) the DATA cell that completed the
//! acknowledged hundred. The peer that sent the data remembers those tags and
//! rejects a SENDME that does not carry the next one: a client cannot
//! acknowledge cells it never received. An exit randomises the padding of
//! each such cell (and keeps at least [`SENDME_CELL_RANDOM`] bytes of it), so
//! the tag cannot be computed from predictable content either.
//!
//! These types are pure counters; the tasks that own a circuit or a stream
//! hold them.

use std::collections::VecDeque;

use crate::aead::ct_eq;
use crate::{Error, PeerMisbehaved};

/// DATA cells a circuit may have unacknowledged in one direction.
pub const CIRC_WINDOW: u32 = 1000;
/// DATA cells one circuit SENDME acknowledges.
pub const CIRC_INCREMENT: u32 = 100;
/// DATA cells a stream may have unacknowledged in one direction.
pub const STREAM_WINDOW: u32 = 500;
/// DATA cells one stream SENDME acknowledges.
pub const STREAM_INCREMENT: u32 = 50;
/// Random padding bytes an exit keeps on each backward DATA cell whose tag a
/// circuit SENDME will carry.
pub const SENDME_CELL_RANDOM: usize = 16;

/// The sending side of a circuit window: how many DATA cells may still be
/// sent, and the tags the peer's SENDMEs must carry.
#[derive(Debug)]
pub struct CircSendWindow {
    window: u32,
    sent: u64,
    expected: VecDeque<[u8; 16]>,
}

impl Default for CircSendWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl CircSendWindow {
    pub fn new() -> Self {
        CircSendWindow {
            window: CIRC_WINDOW,
            sent: 0,
            expected: VecDeque::with_capacity((CIRC_WINDOW / CIRC_INCREMENT) as usize),
        }
    }

    /// DATA cells that may be sent now.
    pub fn available(&self) -> u32 {
        self.window
    }

    /// True when the next DATA cell sent is one a SENDME will acknowledge by
    /// its tag (so an exit randomises its padding).
    pub fn next_is_acked(&self) -> bool {
        (self.sent + 1).is_multiple_of(CIRC_INCREMENT as u64)
    }

    /// Record a DATA cell sent with end-hop tag `tag`. Fails when the window
    /// is closed: the caller must not have sent it.
    pub fn on_data_sent(&mut self, tag: &[u8; 16]) -> Result<(), Error> {
        if self.window == 0 {
            return Err(Error::FlowControl("DATA sent on a closed circuit window"));
        }
        self.window -= 1;
        self.sent += 1;
        if self.sent.is_multiple_of(CIRC_INCREMENT as u64) {
            self.expected.push_back(*tag);
        }
        Ok(())
    }

    /// Check a circuit SENDME from the peer and reopen the window.
    pub fn on_sendme(&mut self, tag: &[u8; 16]) -> Result<(), Error> {
        let Some(want) = self.expected.front() else {
            return Err(PeerMisbehaved::SendmeUnowed.into());
        };
        if !ct_eq(want, tag) {
            return Err(PeerMisbehaved::SendmeWrongTag.into());
        }
        self.expected.pop_front();
        self.window += CIRC_INCREMENT;
        Ok(())
    }
}

/// The receiving side of a circuit window.
#[derive(Debug)]
pub struct CircRecvWindow {
    /// Cells the peer may still send before our next SENDME.
    window: u32,
    received: u64,
    consumed: u64,
    /// Tags of the cells that complete each hundred, until acknowledged.
    tags: VecDeque<[u8; 16]>,
}

impl Default for CircRecvWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl CircRecvWindow {
    pub fn new() -> Self {
        CircRecvWindow {
            window: CIRC_WINDOW,
            received: 0,
            consumed: 0,
            tags: VecDeque::with_capacity((CIRC_WINDOW / CIRC_INCREMENT) as usize),
        }
    }

    /// Record a DATA cell received with end-hop tag `tag`. A peer that sends
    /// past the window breaks the protocol: the circuit must be closed.
    pub fn on_data_received(&mut self, tag: &[u8; 16]) -> Result<(), Error> {
        if self.window == 0 {
            return Err(PeerMisbehaved::DataPastCircuitWindow.into());
        }
        self.window -= 1;
        self.received += 1;
        if self.received.is_multiple_of(CIRC_INCREMENT as u64) {
            self.tags.push_back(*tag);
        }
        Ok(())
    }

    /// Record `n` received cells as consumed (left our buffers). Returns the
    /// tags of the SENDMEs to send now, oldest first.
    pub fn on_consumed(&mut self, n: u32, out: &mut Vec<[u8; 16]>) {
        let before = self.consumed / CIRC_INCREMENT as u64;
        self.consumed = (self.consumed + n as u64).min(self.received);
        let after = self.consumed / CIRC_INCREMENT as u64;
        for _ in before..after {
            if let Some(t) = self.tags.pop_front() {
                self.window += CIRC_INCREMENT;
                out.push(t);
            }
        }
    }
}

/// One stream's window in one direction (stream SENDMEs carry no tag: the
/// circuit window already bounds what a peer can make us send).
#[derive(Debug)]
pub struct StreamWindow {
    window: u32,
    counted: u32,
}

impl Default for StreamWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamWindow {
    pub fn new() -> Self {
        StreamWindow {
            window: STREAM_WINDOW,
            counted: 0,
        }
    }

    pub fn available(&self) -> u32 {
        self.window
    }

    /// Sending side: a DATA cell went out (the caller checked `available`).
    pub fn take(&mut self) -> Result<(), Error> {
        if self.window == 0 {
            return Err(Error::FlowControl("DATA sent on a closed stream window"));
        }
        self.window -= 1;
        Ok(())
    }

    /// Receiving side: a DATA cell arrived; the peer's fault past the window.
    pub fn receive(&mut self) -> Result<(), Error> {
        if self.window == 0 {
            return Err(PeerMisbehaved::DataPastStreamWindow.into());
        }
        self.window -= 1;
        Ok(())
    }

    /// Sending side: a stream SENDME arrived. Fails if it would open the
    /// window beyond its size (acknowledging cells never sent).
    pub fn on_sendme(&mut self) -> Result<(), Error> {
        if self.window + STREAM_INCREMENT > STREAM_WINDOW {
            return Err(PeerMisbehaved::StreamSendmeUnowed.into());
        }
        self.window += STREAM_INCREMENT;
        Ok(())
    }

    /// Receiving side: one received cell was consumed. Returns true when a
    /// stream SENDME is due (and counts it as sent).
    pub fn consumed(&mut self) -> bool {
        self.counted += 1;
        if self.counted >= STREAM_INCREMENT && self.window + STREAM_INCREMENT <= STREAM_WINDOW {
            self.counted -= STREAM_INCREMENT;
            self.window += STREAM_INCREMENT;
            true
        } else {
            false
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
    fn circuit_window_round_trip() {
        let mut s = CircSendWindow::new();
        let mut r = CircRecvWindow::new();
        let mut acks = Vec::new();
        for i in 1..=CIRC_WINDOW as u64 {
            assert_eq!(s.next_is_acked(), i % 100 == 0);
            s.on_data_sent(&tag(i)).unwrap();
            r.on_data_received(&tag(i)).unwrap();
        }
        assert_eq!(s.available(), 0);
        assert!(s.on_data_sent(&tag(0)).is_err());
        // One more cell from a peer that ignores the window is refused.
        let mut r2 = CircRecvWindow::new();
        for i in 1..=CIRC_WINDOW as u64 {
            r2.on_data_received(&tag(i)).unwrap();
        }
        assert!(matches!(
            r2.on_data_received(&tag(0)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::DataPastCircuitWindow))
        ));

        r.on_consumed(150, &mut acks);
        assert_eq!(acks, vec![tag(100)]);
        r.on_consumed(50, &mut acks);
        assert_eq!(acks, vec![tag(100), tag(200)]);
        s.on_sendme(&acks[0]).unwrap();
        assert!(matches!(
            s.on_sendme(&tag(999)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeWrongTag))
        ));
        s.on_sendme(&acks[1]).unwrap();
        assert_eq!(s.available(), 200);
        // No more SENDMEs are owed until more cells have been acknowledged.
        let mut s2 = CircSendWindow::new();
        assert!(matches!(
            s2.on_sendme(&tag(1)),
            Err(Error::PeerMisbehaved(PeerMisbehaved::SendmeUnowed))
        ));
    }

    #[test]
    fn stream_window() {
        let mut w = StreamWindow::new();
        for _ in 0..STREAM_WINDOW {
            w.receive().unwrap();
        }
        assert!(matches!(
            w.receive(),
            Err(Error::PeerMisbehaved(PeerMisbehaved::DataPastStreamWindow))
        ));
        let mut snd = StreamWindow::new();
        assert!(snd.on_sendme().is_err(), "nothing to acknowledge");
        let mut due = 0;
        for _ in 0..120 {
            if w.consumed() {
                due += 1;
            }
        }
        assert_eq!(due, 2);
        assert_eq!(w.available(), 100);
    }
}
