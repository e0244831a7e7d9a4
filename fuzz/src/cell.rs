//! `cell`: link cells and the CREATE/CREATED payloads.
//!
//! A cell is canonical: any 514 bytes decode, and encode back to
//! themselves. CREATE and CREATED bodies re-encode to the bytes they were
//! read from.

use allium_proto::cell::{self, CELL_LEN, Cell, CellCmd, PAYLOAD_LEN};

pub fn run(data: &[u8]) {
    match Cell::decode(data) {
        Ok(c) => {
            assert_eq!(data.len(), CELL_LEN);
            assert_eq!(c.encode()[..], data[..], "a cell re-encodes to its bytes");
            if c.cmd == CellCmd::CREATE || c.cmd == CellCmd::CREATED {
                payloads(&c.payload[..]);
            }
        }
        Err(_) => assert_ne!(data.len(), CELL_LEN, "every 514 bytes are a cell"),
    }
    payloads(data);
    // Any body up to the payload size makes a cell that reads back.
    match Cell::new(
        cell::CircId(7),
        CellCmd(data.first().copied().unwrap_or(0)),
        data,
    ) {
        Ok(c) => {
            let d = Cell::decode(&c.encode()).expect("an encoded cell decodes");
            assert_eq!(&d.payload[..data.len()], data);
            assert!(d.payload[data.len()..].iter().all(|&b| b == 0));
        }
        Err(_) => assert!(data.len() > PAYLOAD_LEN),
    }
}

fn payloads(p: &[u8]) {
    if let Ok((htype, h)) = cell::decode_create(p) {
        let again = cell::encode_create(htype, h);
        assert_eq!(again[..], p[..4 + h.len()]);
    }
    if let Ok(h) = cell::decode_created(p) {
        let again = cell::encode_created(h);
        assert_eq!(again[..], p[..2 + h.len()]);
    }
}
