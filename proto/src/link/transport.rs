//! The link transport: Noise transport messages, sealed and opened in place.
//!
//! After the handshake each direction has the key Noise's `Split()` gives
//! it and a 64-bit message counter starting at 0; a message is
//! AES-256-GCM under `(key, 0^4 | counter be)` with empty associated
//! data (see [`crate::aead::whole`]), exactly as Noise's
//! `CipherState` does it (the tests open our
//! messages with snow's own transport). Doing it here rather than in snow
//! lets a frame be decrypted where it was read and sealed where its cells
//! were encoded, with no copy and no buffer kept per link.

use snow::HandshakeState;
use zeroize::Zeroize;

use super::MAX_CELLS_PER_FRAME;
use super::noise::snow_err;
use crate::Error;
use crate::aead::{Key, TAG_LEN, whole};
use crate::cell::{CELL_LEN, Cell};

struct Direction {
    key: Key,
    n: u64,
}

impl Direction {
    /// The nonce of the next message; Noise reserves the last one.
    fn checked_n(&self) -> Result<u64, Error> {
        if self.n == u64::MAX {
            return Err(Error::CounterExhausted);
        }
        Ok(self.n)
    }
}

/// Link transport after the handshake: seals and opens frames of cells.
pub struct LinkTransport {
    send: Direction,
    recv: Direction,
}

impl LinkTransport {
    pub(super) fn from_handshake(hs: &mut HandshakeState, initiator: bool) -> Result<Self, Error> {
        if !hs.is_handshake_finished() {
            return Err(snow_err(snow::Error::State(
                snow::error::StateProblem::HandshakeNotFinished,
            )));
        }
        let (mut i2r, mut r2i) = hs.dangerously_get_raw_split();
        let (send, recv) = if initiator {
            (&i2r, &r2i)
        } else {
            (&r2i, &i2r)
        };
        let t = LinkTransport {
            send: Direction {
                key: Key::new(send),
                n: 0,
            },
            recv: Direction {
                key: Key::new(recv),
                n: 0,
            },
        };
        i2r.zeroize();
        r2i.zeroize();
        Ok(t)
    }

    /// Append one frame (`len | noise message`) carrying `cells` to `out`.
    pub fn seal_cells(&mut self, cells: &[Cell], out: &mut Vec<u8>) -> Result<(), Error> {
        if cells.is_empty() || cells.len() > MAX_CELLS_PER_FRAME {
            return Err(Error::Link(format!("{} cells in one frame", cells.len())));
        }
        let start = out.len();
        out.resize(start + 2 + cells.len() * CELL_LEN, 0);
        for (c, chunk) in cells
            .iter()
            .zip(out[start + 2..].chunks_exact_mut(CELL_LEN))
        {
            c.encode_into(chunk);
        }
        let r = self.seal_frame(out, start);
        if r.is_err() {
            // No plaintext is left behind in the output.
            out.truncate(start);
        }
        r
    }

    /// Seal the frame that starts at `out[start]`: two bytes reserved for
    /// its length, then its plaintext up to the end of `out`. Appends the
    /// tag and writes the length.
    pub fn seal_frame(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), Error> {
        let len = out.len() - start - 2 + TAG_LEN;
        if len > super::MAX_FRAME {
            return Err(Error::Link(format!("frame of {len} bytes")));
        }
        let tag = whole::seal(
            &self.send.key,
            self.send.checked_n()?,
            &[],
            &mut out[start + 2..],
        );
        self.send.n += 1;
        out.extend_from_slice(&tag);
        out[start..start + 2].copy_from_slice(&(len as u16).to_be_bytes());
        Ok(())
    }

    /// Open one transport message (a frame without its length prefix) in
    /// place; returns the plaintext, `msg[..msg.len() - 16]`.
    pub fn open_in_place<'a>(&mut self, msg: &'a mut [u8]) -> Result<&'a mut [u8], Error> {
        let n = msg
            .len()
            .checked_sub(TAG_LEN)
            .ok_or_else(|| Error::Link("frame shorter than its tag".into()))?;
        let (body, tag) = msg.split_at_mut(n);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Error::Truncated)?;
        if !whole::open(&self.recv.key, self.recv.checked_n()?, &[], body, &tag) {
            return Err(Error::Link(
                "frame failed authentication (modified, replayed, reordered or dropped)".into(),
            ));
        }
        self.recv.n += 1;
        Ok(body)
    }

    /// Open one transport message in place and append its cells to `out`.
    pub fn open_cells(&mut self, msg: &mut [u8], out: &mut Vec<Cell>) -> Result<(), Error> {
        let body = self.open_in_place(msg)?;
        if body.is_empty() || body.len() % CELL_LEN != 0 {
            return Err(Error::Link(format!(
                "frame plaintext of {} bytes is not whole cells",
                body.len()
            )));
        }
        for chunk in body.chunks_exact(CELL_LEN) {
            out.push(Cell::decode(chunk)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::noise::handshake;
    use super::super::{NK_PARAMS, XK_PARAMS};
    use super::*;
    use crate::cell::CellCmd;
    use x25519_dalek::{PublicKey, StaticSecret};

    /// Our transport against snow's own, for both patterns: the wire format
    /// is Noise's, byte for byte.
    #[test]
    fn interoperates_with_snow_transport() {
        let mut rng = rand::rng();
        let rs = [3u8; 32];
        let rp = PublicKey::from(&StaticSecret::from(rs)).to_bytes();
        let is = [5u8; 32];
        for params in [NK_PARAMS, XK_PARAMS] {
            let xk = params == XK_PARAMS;
            let mut i = handshake(&mut rng, params, xk.then_some(&is), Some(&rp), true).unwrap();
            let mut r = handshake(&mut rng, params, Some(&rs), None, false).unwrap();
            let mut buf = [0u8; 1024];
            let mut pl = [0u8; 1024];
            let n = i.write_message(&[], &mut buf).unwrap();
            r.read_message(&buf[..n], &mut pl).unwrap();
            let n = r.write_message(&[], &mut buf).unwrap();
            i.read_message(&buf[..n], &mut pl).unwrap();
            if xk {
                let n = i.write_message(&[], &mut buf).unwrap();
                r.read_message(&buf[..n], &mut pl).unwrap();
            }
            let mut ours = LinkTransport::from_handshake(&mut i, true).unwrap();
            let mut snow_r = r.into_transport_mode().unwrap();
            let cells: Vec<Cell> = (0..MAX_CELLS_PER_FRAME as u32)
                .map(|k| Cell::new(crate::cell::CircId(k), CellCmd::RELAY, &[k as u8; 9]).unwrap())
                .collect();
            for round in 0..3 {
                let mut frame = Vec::new();
                ours.seal_cells(&cells[..1 + round * 50], &mut frame)
                    .unwrap();
                assert!(frame.len() <= super::super::MAX_FRAME + 2);
                let mut plain = vec![0u8; frame.len()];
                let n = snow_r.read_message(&frame[2..], &mut plain).unwrap();
                assert_eq!(n, (1 + round * 50) * CELL_LEN);
                assert_eq!(plain[..CELL_LEN], cells[0].encode()[..]);
                // And back: snow seals, we open in place.
                let mut msg = vec![0u8; n + TAG_LEN];
                let m = snow_r.write_message(&plain[..n], &mut msg).unwrap();
                let mut got = Vec::new();
                ours.open_cells(&mut msg[..m], &mut got).unwrap();
                assert_eq!(got.len(), 1 + round * 50);
                assert_eq!(got[round].payload[..9], [round as u8; 9]);
            }
            // A modified, replayed or reordered frame fails.
            let mut f1 = Vec::new();
            let mut f2 = Vec::new();
            let mut snow_sealed = |c: &[Cell], out: &mut Vec<u8>| {
                let pt: Vec<u8> = c.iter().flat_map(|c| c.encode()).collect();
                out.resize(pt.len() + TAG_LEN, 0);
                snow_r.write_message(&pt, out).unwrap();
            };
            snow_sealed(&cells[..2], &mut f1);
            snow_sealed(&cells[..2], &mut f2);
            let mut got = Vec::new();
            let mut bad = f1.clone();
            bad[7] ^= 1;
            assert!(
                ours.open_cells(&mut f2.clone(), &mut got).is_err(),
                "reordered"
            );
            assert!(ours.open_cells(&mut bad, &mut got).is_err(), "modified");
            ours.open_cells(&mut f1.clone(), &mut got).unwrap();
            assert!(
                ours.open_cells(&mut f1.clone(), &mut got).is_err(),
                "replayed"
            );
            ours.open_cells(&mut f2.clone(), &mut got).unwrap();
        }
    }
}
