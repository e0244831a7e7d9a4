//! `link_handshake`: the link handshake step machines (NK and XK), each
//! side driven by the other side's messages as the input makes them.
//!
//! The other side is snow with our primitives (`noise_peer`), so the
//! input can choose the payloads inside well-encrypted messages (the
//! identity proofs) as well as send raw bytes or change one byte of an
//! honest message; bytes arrive in chunks of the input's choosing. An
//! honest exchange finishes with the identities proven both ways and a
//! working transport; a changed message, a wrong proof or garbage is
//! refused, never taken.

use allium_proto::cell::{CELL_LEN, Cell};
use allium_proto::link::{
    AUTH_LEN, Action, Initiator, LINK_NK, LINK_XK, LinkKeys, LinkTransport, NK_PARAMS,
    RESPONDER_AUTH_DOMAIN, Responder, XK_AUTH_DOMAIN, XK_PARAMS,
};
use allium_proto::{Error, LinkKey, RelayId};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use snow::HandshakeState;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::input::Input;
use crate::keys::{relay_identity, rng};
use crate::noise_peer;

/// A relay's link keys.
struct Keys {
    identity: SigningKey,
    link: StaticSecret,
}

impl Keys {
    fn new(i: u8) -> Self {
        Keys {
            identity: relay_identity(i),
            link: StaticSecret::from([0x32 + 0x10 * i; 32]),
        }
    }
    fn link_pub(&self) -> [u8; 32] {
        PublicKey::from(&self.link).to_bytes()
    }
    fn id(&self) -> RelayId {
        RelayId(self.identity.verifying_key().to_bytes())
    }
    fn link_keys(&self) -> LinkKeys<'_> {
        LinkKeys {
            identity: &self.identity,
            link_secret: &self.link,
        }
    }
    /// `identity | sig(domain | h | link key)`.
    fn proof(&self, domain: &[u8], h: &[u8]) -> Vec<u8> {
        let sig = self.identity.sign(&[domain, h, &self.link_pub()].concat());
        [
            &self.identity.verifying_key().to_bytes()[..],
            &sig.to_bytes(),
        ]
        .concat()
    }
    fn check_proof(&self, domain: &[u8], h: &[u8], p: &[u8]) {
        assert_eq!(p.len(), AUTH_LEN);
        assert_eq!(p[..32], self.identity.verifying_key().to_bytes());
        let sig = Signature::from_bytes(p[32..].try_into().expect("64 bytes"));
        self.identity
            .verifying_key()
            .verify(&[domain, h, &self.link_pub()].concat(), &sig)
            .expect("an honest proof verifies");
    }
}

/// The longest payload of messages 1 and 2 within the handshake's
/// message limit (`MAX_HANDSHAKE_MSG`, less a key and a tag).
const MAX_PAYLOAD: usize = allium_proto::link::MAX_HANDSHAKE_MSG - 48;

/// What the input makes of one message of the harness.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Honest,
    Raw,
    Changed,
    Payload,
}

/// Write a handshake frame carrying `payload`.
fn frame(hs: &mut HandshakeState, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 2 + 65535];
    let n = hs.write_message(payload, &mut out[2..]).expect("a message");
    out[..2].copy_from_slice(&(n as u16).to_be_bytes());
    out.truncate(2 + n);
    out
}

/// Read a frame from the front of `b`: its payload, once opened.
fn read_frame(hs: &mut HandshakeState, b: &[u8]) -> Vec<u8> {
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    assert_eq!(b.len(), 2 + n, "one frame");
    let mut out = vec![0u8; n];
    let m = hs
        .read_message(&b[2..], &mut out)
        .expect("an honest message opens");
    out.truncate(m);
    out
}

/// Feed `bytes` in chunks of `chunk` and step after each: what the
/// machine sent, and its result once done.
fn feed<T>(
    mut step: impl FnMut(&mut Vec<u8>) -> Result<Action<T>, Error>,
    buf: &mut Vec<u8>,
    bytes: &[u8],
    chunk: usize,
) -> Result<(Vec<u8>, Option<T>), Error> {
    let mut sent = Vec::new();
    let mut chunks = bytes.chunks(chunk);
    loop {
        match step(buf)? {
            Action::Send(b) => sent.extend(b),
            Action::Done(t) => return Ok((sent, Some(t))),
            Action::Recv => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => return Ok((sent, None)),
            },
        }
    }
}

/// Make the input's version of an honest message.
fn shape(v: Variant, honest: Vec<u8>, inp: &mut Input<'_>) -> Vec<u8> {
    match v {
        Variant::Raw => inp.var().to_vec(),
        Variant::Changed => {
            let mut m = honest;
            let at = usize::from(inp.u16()) % m.len();
            m[at] ^= inp.u8().max(1);
            m
        }
        Variant::Honest | Variant::Payload => honest,
    }
}

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let xk = mode & 2 != 0;
    let v = match (mode >> 2) % 4 {
        0 => Variant::Honest,
        1 => Variant::Raw,
        2 => Variant::Changed,
        _ => Variant::Payload,
    };
    let chunk = usize::from(inp.u8()) + 1;
    let seed = u64::from(inp.u8());
    if mode & 1 == 0 {
        responder(&mut inp, xk, v, chunk, seed);
    } else {
        initiator(&mut inp, xk, v, chunk, seed);
    }
}

/// Our responder; the input's initiator.
fn responder(inp: &mut Input<'_>, xk: bool, v: Variant, chunk: usize, seed: u64) {
    let (me, peer) = (Keys::new(0), Keys::new(1));
    let mut r = Responder::new(&mut rng(seed), me.link_keys());
    let params = if xk { XK_PARAMS } else { NK_PARAMS };
    let s = peer.link.to_bytes();
    let mut hs = noise_peer::handshake(seed, params, xk.then_some(&s), Some(&me.link_pub()), true);
    // Message 1: the pattern byte and the first Noise message.
    let payload = if v == Variant::Payload {
        let p = inp.var();
        &p[..p.len().min(MAX_PAYLOAD)]
    } else {
        &[]
    };
    let mut m1 = vec![if xk { LINK_XK } else { LINK_NK }];
    m1.extend(frame(&mut hs, payload));
    let m1 = shape(v, m1, inp);
    let mut buf = Vec::new();
    let res = feed(|b| r.step(b), &mut buf, &m1, chunk);
    let Ok((m2, done)) = res else {
        return assert!(v != Variant::Honest && v != Variant::Payload, "refused");
    };
    if v == Variant::Raw || v == Variant::Changed {
        // The responder answered changed bytes: only a change it cannot
        // see (the ignored payload of message 1 cannot be changed unseen).
        assert!(
            m2.is_empty() || v == Variant::Raw,
            "answered a changed message 1"
        );
        return;
    }
    // Message 2 proves the responder's identity over the hash before it.
    let h2 = hs.get_handshake_hash().to_vec();
    let proof = read_frame(&mut hs, &m2);
    me.check_proof(RESPONDER_AUTH_DOMAIN, &h2, &proof);
    let link = if xk {
        assert!(done.is_none());
        // Message 3: our proof, or the input's payload.
        let h3 = hs.get_handshake_hash().to_vec();
        let honest = !inp.bool();
        let p = if honest {
            peer.proof(XK_AUTH_DOMAIN, &h3)
        } else {
            inp.var().to_vec()
        };
        let m3 = frame(&mut hs, &p);
        let res = feed(|b| r.step(b), &mut buf, &m3, chunk);
        if honest || p == peer.proof(XK_AUTH_DOMAIN, &h3) {
            let (_, l) = res.expect("an honest message 3");
            let l = l.expect("done");
            assert_eq!(l.peer, Some(peer.id()));
            l.transport
        } else {
            assert!(res.is_err(), "took a proof of {} bytes", p.len());
            return;
        }
    } else {
        let l = done.expect("NK is done after message 2");
        assert_eq!(l.peer, None);
        l.transport
    };
    transport(inp, hs, link, buf);
}

/// Our initiator; the input's responder.
fn initiator(inp: &mut Input<'_>, xk: bool, v: Variant, chunk: usize, seed: u64) {
    let (me, peer) = (Keys::new(1), Keys::new(0));
    let mut rng = rng(seed);
    let peer_link = LinkKey(peer.link_pub());
    let mut i = if xk {
        Initiator::xk(&mut rng, me.link_keys(), &peer_link)
    } else {
        Initiator::nk(&mut rng, &peer_link)
    }
    .expect("an initiator");
    let params = if xk { XK_PARAMS } else { NK_PARAMS };
    let mut hs = noise_peer::handshake(seed, params, Some(&peer.link.to_bytes()), None, false);
    let mut buf = Vec::new();
    let (m1, _) = feed(|b| i.step(b), &mut buf, &[], chunk).expect("message 1");
    assert_eq!(m1[0], if xk { LINK_XK } else { LINK_NK });
    read_frame(&mut hs, &m1[1..]);
    // Message 2: the responder's proof, or the input's payload.
    let h2 = hs.get_handshake_hash().to_vec();
    let honest_proof = peer.proof(RESPONDER_AUTH_DOMAIN, &h2);
    let p = if v == Variant::Payload {
        let p = inp.var();
        p[..p.len().min(MAX_PAYLOAD)].to_vec()
    } else {
        honest_proof.clone()
    };
    let m2 = shape(v, frame(&mut hs, &p), inp);
    let res = feed(|b| i.step(b), &mut buf, &m2, chunk);
    let opened = v == Variant::Honest || v == Variant::Payload;
    let (m3, done) = match res {
        Ok(x) => x,
        Err(e) => return assert!(!opened, "{e}"),
    };
    let Some(unverified) = done else {
        // Not all of message 2 (raw bytes may announce a longer frame).
        return assert!(!opened);
    };
    assert!(opened, "took a changed message 2");
    if xk {
        let h3 = hs.get_handshake_hash().to_vec();
        let proof = read_frame(&mut hs, &m3);
        me.check_proof(XK_AUTH_DOMAIN, &h3, &proof);
    } else {
        assert!(m3.is_empty());
    }
    match unverified.verify(&peer.id()) {
        Ok(t) => {
            assert_eq!(p, honest_proof, "took another proof");
            transport(inp, hs, t, buf);
        }
        Err(_) => assert_ne!(p, honest_proof, "refused the honest proof"),
    }
}

/// After the handshake: the input's transport messages from snow's side,
/// sealed around its plaintexts, opened by ours; then ours to snow's.
fn transport(inp: &mut Input<'_>, hs: HandshakeState, mut ours: LinkTransport, left: Vec<u8>) {
    assert!(left.is_empty(), "no transport bytes were sent yet");
    let mut theirs = hs.into_transport_mode().expect("finished");
    let mut msg = vec![0u8; 65535];
    for _ in 0..4 {
        if inp.is_empty() {
            break;
        }
        let plain = inp.var();
        let Ok(n) = theirs.write_message(plain, &mut msg) else {
            break;
        };
        let mut cells = Vec::new();
        let whole = !plain.is_empty() && plain.len() % CELL_LEN == 0;
        match ours.open_cells(&mut msg[..n], &mut cells) {
            Ok(()) => assert!(whole && cells.len() * CELL_LEN == plain.len()),
            Err(_) => return assert!(!whole),
        }
        let mut frame = Vec::new();
        let c = Cell::decode(&plain[..CELL_LEN]).expect("a cell");
        ours.seal_cells(&[c], &mut frame).expect("seals");
        let mut out = vec![0u8; frame.len()];
        let m = theirs
            .read_message(&frame[2..], &mut out)
            .expect("snow opens ours");
        assert_eq!(out[..m], plain[..CELL_LEN]);
    }
}
