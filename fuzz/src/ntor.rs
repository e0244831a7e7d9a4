//! `ntor`: the circuit handshake and the onion-key cross-certificate.
//!
//! The relay side reads a CREATE body: raw bytes, or a well-formed one
//! naming our identity and onion key with a fuzzer-chosen client key and
//! parameters (so the checks past the framing run). The client side reads
//! a CREATED body: raw, or the relay's honest reply with one byte
//! changed, which must fail. An honest exchange with fuzzer-chosen
//! ephemeral keys agrees on the keys and parameters.

use allium_proto::OnionKey;
use allium_proto::doc::Sig;
use allium_proto::flow::CircParams;
use allium_proto::ntor::{self, OnionCrossCert, OnionKeys};
use x25519_dalek::StaticSecret;

use crate::input::Input;
use crate::keys::{relay_identity, relay_onion};

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let id = relay_identity(0).verifying_key().to_bytes();
    let (cur, prev) = (relay_onion(0), relay_onion(1));
    let list = [&cur, &prev];
    let keys = OnionKeys {
        identity: id,
        keys: &list,
    };
    let y = StaticSecret::from(inp.array::<32>());
    match inp.u8() % 4 {
        0 => {
            let _ = ntor::server_with_ephemeral(y, &keys, inp.rest());
        }
        1 => {
            // A well-formed CREATE body with any client key and parameters.
            let b = if inp.bool() {
                cur.public()
            } else {
                prev.public()
            };
            let mut msg = id.to_vec();
            msg.extend_from_slice(&b.0);
            msg.extend_from_slice(&inp.array::<32>());
            msg.extend_from_slice(&inp.array::<2>());
            let _ = ntor::server_with_ephemeral(y, &keys, &msg);
        }
        2 => {
            let x = StaticSecret::from(inp.array::<32>());
            let params = CircParams::decode(inp.array()).unwrap_or_default();
            let b = if inp.bool() {
                cur.public()
            } else {
                prev.public()
            };
            let (mut st, msg) = ntor::client_start_with_ephemeral(x, &id, &b, params);
            if inp.bool() {
                st.prepare();
            }
            let (mut reply, skeys, sp) = match ntor::server_with_ephemeral(y, &keys, &msg) {
                Ok(r) => r,
                // Only a low-order key on either side fails.
                Err(e) => return assert!(e.to_string().contains("low-order"), "{e}"),
            };
            assert_eq!(sp, params);
            let at = usize::from(inp.u8());
            let flip = inp.u8();
            if at < reply.len() && flip != 0 {
                reply[at] ^= flip;
                assert!(st.finish(&reply).is_err(), "a changed reply at {at}");
            } else {
                let (ckeys, cp) = st.finish(&reply).expect("an honest reply");
                assert_eq!(
                    (ckeys.forward, ckeys.backward),
                    (skeys.forward, skeys.backward)
                );
                assert_eq!(cp, params);
            }
        }
        _ => {
            let x = StaticSecret::from(inp.array::<32>());
            let (st, _) =
                ntor::client_start_with_ephemeral(x, &id, &cur.public(), CircParams::default());
            let _ = st.finish(inp.var());
            // A cross-certificate from the input, for any onion key.
            let cc = OnionCrossCert {
                sign: inp.u8(),
                sig: Sig(inp.array()),
            };
            let onion = OnionKey(inp.array());
            let _ = cc.check(&id, &onion);
            assert!(!cc.check(&id, &cur.public()) || cc == cur.crosscert(&id));
            // And the honest one, for a key from the input.
            let s = ntor::OnionSecret::new(StaticSecret::from(inp.array::<32>()));
            assert!(s.crosscert(&id).check(&id, &s.public()));
        }
    }
}
