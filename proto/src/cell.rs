//! Fixed-size link cells (`doc/protocol.md` section "Cells").
//!
//! Every cell on every link is [`CELL_LEN`] bytes: a 4-byte circuit id, a
//! 1-byte command and a [`PAYLOAD_LEN`]-byte payload.

use crate::Error;
use crate::wire::{Reader, Writer};

pub const CELL_LEN: usize = 514;
pub const PAYLOAD_LEN: usize = CELL_LEN - 5;

crate::open_enum! {
    /// A cell command (`doc/protocol.md` section 2).
    CellCmd(u8) { PADDING = 0, CREATE = 1, CREATED = 2, RELAY = 3, DESTROY = 4, RELAY_EARLY = 5 }
}

/// A circuit's id on one link: chosen by the side that sent the CREATE
/// (with the top bit that side owns, `doc/protocol.md` section 2), meaningless on any other
/// link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircId(pub u32);

impl std::fmt::Display for CircId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// One link cell.
#[derive(Clone)]
pub struct Cell {
    pub circ_id: CircId,
    pub cmd: CellCmd,
    pub payload: Box<[u8; PAYLOAD_LEN]>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell")
            .field("circ_id", &self.circ_id)
            .field("cmd", &self.cmd)
            .finish()
    }
}

impl Cell {
    /// A cell whose payload is `body` followed by zero bytes.
    pub fn new(circ_id: CircId, cmd: CellCmd, body: &[u8]) -> Result<Self, Error> {
        if body.len() > PAYLOAD_LEN {
            return Err(Error::TooLarge {
                what: "cell body",
                len: body.len(),
                max: PAYLOAD_LEN,
            });
        }
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        payload[..body.len()].copy_from_slice(body);
        Ok(Cell {
            circ_id,
            cmd,
            payload,
        })
    }

    pub fn destroy(circ_id: CircId, reason: DestroyReason) -> Self {
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        payload[0] = reason.0;
        Cell {
            circ_id,
            cmd: CellCmd::DESTROY,
            payload,
        }
    }

    pub fn encode_into(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.circ_id.0.to_be_bytes());
        out[4] = self.cmd.0;
        out[5..CELL_LEN].copy_from_slice(&self.payload[..]);
    }

    pub fn encode(&self) -> [u8; CELL_LEN] {
        let mut out = [0u8; CELL_LEN];
        self.encode_into(&mut out);
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() != CELL_LEN {
            return Err(Error::malformed(
                "cell",
                format!("length {} != {CELL_LEN}", b.len()),
            ));
        }
        let mut r = Reader::new(b);
        let circ_id = CircId(r.take_u32()?);
        let cmd = CellCmd(r.take_u8()?);
        let payload = Box::new(r.take_array::<PAYLOAD_LEN>()?);
        Ok(Cell {
            circ_id,
            cmd,
            payload,
        })
    }
}

crate::open_enum! {
    /// Why a circuit was destroyed (the first payload byte of DESTROY).
    DestroyReason(u8) {
        NONE = 0,
        PROTOCOL = 1,
        INTERNAL = 2,
        REQUESTED = 3,
        CONNECT_FAILED = 6,
        CHANNEL_CLOSED = 8,
        FINISHED = 9,
        TIMEOUT = 10,
        DESTROYED = 11,
        NO_SUCH_SERVICE = 12,
        /// The onion-layer authentication failed: modified, replayed, reordered or dropped cell.
        CELL_AUTH = 13,
        /// A limit of the relay was reached (circuits per channel, memory).
        RESOURCE_LIMIT = 14,
        /// The peer sent DATA past its window or a SENDME that acknowledges
        /// cells it never received.
        FLOW_CONTROL = 15,
    }
}

/// CREATE payload: handshake type, length, handshake bytes.
pub const HANDSHAKE_NTOR: u16 = 2;

pub fn encode_create(htype: u16, hdata: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.put_u16(htype).put_u16(hdata.len() as u16).put(hdata);
    w.finish()
}

pub fn decode_create(payload: &[u8]) -> Result<(u16, &[u8]), Error> {
    let mut r = Reader::new(payload);
    let htype = r.take_u16()?;
    let len = r.take_u16()? as usize;
    Ok((htype, r.take(len)?))
}

/// CREATED payload: length, handshake bytes.
pub fn encode_created(hdata: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.put_u16(hdata.len() as u16).put(hdata);
    w.finish()
}

pub fn decode_created(payload: &[u8]) -> Result<&[u8], Error> {
    let mut r = Reader::new(payload);
    let len = r.take_u16()? as usize;
    r.take(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_roundtrip_and_length() {
        let c = Cell::new(
            CircId(0x8000_0001),
            CellCmd::CREATE,
            &encode_create(2, &[9; 96]),
        )
        .unwrap();
        let b = c.encode();
        assert_eq!(&b[..6], &[0x80, 0, 0, 1, 1, 0]);
        let d = Cell::decode(&b).unwrap();
        assert_eq!(d.circ_id, c.circ_id);
        assert_eq!(d.cmd, CellCmd::CREATE);
        let (t, h) = decode_create(&d.payload[..]).unwrap();
        assert_eq!((t, h), (2, &[9u8; 96][..]));
        assert!(Cell::decode(&b[..513]).is_err());
        assert!(Cell::new(CircId(1), CellCmd::RELAY, &[0; PAYLOAD_LEN + 1]).is_err());
    }
}
