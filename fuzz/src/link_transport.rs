//! `link_transport`: framing and the Noise transport of an established
//! link, as a channel reads it (`link/src/channel.rs`: frame lengths,
//! then whole frames opened in place into cells).
//!
//! The two ends come from a real NK handshake with fixed keys. The input
//! is a script of what arrives at one end: raw bytes; a frame the other
//! end sealed around a fuzzer-chosen plaintext (so the checks after the
//! AEAD run); cells sealed and opened again; or a sealed frame with a byte
//! changed. What is sealed is opened to the same cells; a plaintext of
//! anything but whole cells, a frame too short or too long, or a changed
//! byte is refused. An end that refused something is closed.

use allium_proto::cell::{CELL_LEN, Cell};
use allium_proto::link::{
    Action, Initiator, LinkKeys, LinkTransport, MAX_CELLS_PER_FRAME, MAX_FRAME, MIN_TRANSPORT_MSG,
    Responder, frame_len,
};
use allium_proto::{Error, LinkKey};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::input::Input;
use crate::keys::{relay_identity, rng};

/// A client's and a guard's ends of one link.
pub fn pair(seed: u64) -> (LinkTransport, LinkTransport) {
    let mut rng = rng(seed);
    let identity = relay_identity(0);
    let link = StaticSecret::from([0x32; 32]);
    let link_pub = LinkKey(PublicKey::from(&link).to_bytes());
    let mut i = Initiator::nk(&mut rng, &link_pub).expect("an initiator");
    let mut r = Responder::new(
        &mut rng,
        LinkKeys {
            identity: &identity,
            link_secret: &link,
        },
    );
    let (mut to_r, mut to_i) = (Vec::new(), Vec::new());
    let (mut ti, mut tr) = (None, None);
    for _ in 0..4 {
        if ti.is_none() {
            match i.step(&mut to_i).expect("honest handshake") {
                Action::Send(b) => to_r.extend(b),
                Action::Recv => {}
                Action::Done(u) => ti = Some(u),
            }
        }
        if tr.is_none() {
            match r.step(&mut to_r).expect("honest handshake") {
                Action::Send(b) => to_i.extend(b),
                Action::Recv => {}
                Action::Done(l) => tr = Some(l.transport),
            }
        }
    }
    let id = allium_proto::RelayId(identity.verifying_key().to_bytes());
    let ti = ti.expect("done").verify(&id).expect("the guard's identity");
    (ti, tr.expect("done"))
}

/// One end's receiving side: its buffer of bytes read and not yet opened.
struct End {
    t: LinkTransport,
    inbuf: Vec<u8>,
}

impl End {
    /// Open every whole frame buffered, as the channel does.
    fn open_frames(&mut self, out: &mut Vec<Cell>) -> Result<(), Error> {
        let mut pos = 0;
        let r = loop {
            let len = match frame_len(&self.inbuf[pos..], MIN_TRANSPORT_MSG, MAX_FRAME) {
                Ok(Some(len)) => len,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let end = pos + 2 + len;
            if self.inbuf.len() < end {
                break Ok(());
            }
            if let Err(e) = self.t.open_cells(&mut self.inbuf[pos + 2..end], out) {
                break Err(e);
            }
            pos = end;
        };
        self.inbuf.drain(..pos);
        r
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let (a, b) = pair(u64::from(inp.u8()));
    let mut ends = [
        End {
            t: a,
            inbuf: Vec::new(),
        },
        End {
            t: b,
            inbuf: Vec::new(),
        },
    ];
    while !inp.is_empty() {
        let op = inp.u8();
        // Which end receives.
        let to = usize::from(op >> 7);
        let [x, y] = &mut ends;
        let (sender, receiver) = if to == 0 { (y, x) } else { (x, y) };
        let clean = receiver.inbuf.is_empty();
        let mut got = Vec::new();
        let ok = match op % 4 {
            0 => {
                receiver.inbuf.extend_from_slice(inp.var());
                receiver.open_frames(&mut got).is_ok()
            }
            1 => {
                let plain = inp.var();
                let mut frame = vec![0, 0];
                frame.extend_from_slice(plain);
                if sender.t.seal_frame(&mut frame, 0).is_err() {
                    continue;
                }
                receiver.inbuf.extend_from_slice(&frame);
                let ok = receiver.open_frames(&mut got).is_ok();
                if clean {
                    let whole = !plain.is_empty() && plain.len() % CELL_LEN == 0;
                    assert_eq!(ok, whole, "a plaintext of {} bytes", plain.len());
                    if ok {
                        let again: Vec<u8> = got.iter().flat_map(|c| c.encode()).collect();
                        assert_eq!(again, plain);
                    }
                }
                ok
            }
            2 => {
                let n = usize::from(inp.u8()) % MAX_CELLS_PER_FRAME + 1;
                let cells: Vec<Cell> = (0..n).map(|_| cell(&mut inp)).collect();
                let mut frame = Vec::new();
                sender.t.seal_cells(&cells, &mut frame).expect("cells seal");
                receiver.inbuf.extend_from_slice(&frame);
                let ok = receiver.open_frames(&mut got).is_ok();
                if clean {
                    assert!(ok);
                    assert!(receiver.inbuf.is_empty());
                    assert_eq!(got.len(), n);
                    for (g, c) in got.iter().zip(&cells) {
                        assert_eq!(g.encode(), c.encode());
                    }
                }
                ok
            }
            _ => {
                let c = cell(&mut inp);
                let mut frame = Vec::new();
                sender.t.seal_cells(&[c], &mut frame).expect("a cell seals");
                let at = usize::from(inp.u16()) % frame.len();
                let flip = inp.u8().max(1);
                frame[at] ^= flip;
                receiver.inbuf.extend_from_slice(&frame);
                let ok = receiver.open_frames(&mut got).is_ok();
                // A changed length may leave the frame incomplete; any other
                // change is refused.
                if clean && at >= 2 {
                    assert!(!ok, "a frame changed at {at}");
                }
                ok
            }
        };
        if !ok {
            return;
        }
    }
}

fn cell(inp: &mut Input<'_>) -> Cell {
    let mut b = [0u8; CELL_LEN];
    let src = inp.bytes(CELL_LEN);
    b[..src.len()].copy_from_slice(src);
    Cell::decode(&b).expect("514 bytes are a cell")
}
