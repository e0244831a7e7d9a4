//! The link handshakes as step machines (`doc/protocol.md` section 1).
//!
//! NK (client to guard):  `-> kind, e, es` / `<- e, ee, proof(responder)`
//! XK (relay to relay):   `-> kind, e, es` / `<- e, ee, proof(responder)` /
//! `-> s, se, proof(initiator)`
//!
//! A proof is `identity[32] | sig[64]`, the Ed25519 signature by the
//! prover's relay identity over `domain | h | s`: `h` is the Noise handshake
//! hash just before the message that carries it and `s` the prover's static
//! (link) key. It binds the link key to the identity and to this session.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, SeedableRng};
use snow::HandshakeState;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use super::noise::{handshake, snow_err};
use super::{
    AUTH_LEN, LINK_NK, LINK_XK, LinkTransport, MAX_HANDSHAKE_MSG, NK_PARAMS, RESPONDER_AUTH_DOMAIN,
    XK_AUTH_DOMAIN, XK_PARAMS, frame_len,
};
use crate::{Error, LinkKey, RelayId};

/// What a handshake step asks of its driver.
#[derive(Debug)]
pub enum Action<T> {
    /// Write these bytes to the peer, then step again.
    Send(Vec<u8>),
    /// Append more bytes from the peer to the buffer, then step again.
    Recv,
    /// The handshake is over.
    Done(T),
}

/// Take one handshake frame off the front of `buf`, or `None` if it has
/// not all arrived.
fn take_frame(buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, Error> {
    let Some(len) = frame_len(buf, 1, MAX_HANDSHAKE_MSG)? else {
        return Ok(None);
    };
    if buf.len() < 2 + len {
        return Ok(None);
    }
    let msg = buf[2..2 + len].to_vec();
    buf.drain(..2 + len);
    Ok(Some(msg))
}

/// Write a handshake message with `payload` as a frame.
fn write_frame(hs: &mut HandshakeState, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    let start = out.len();
    out.resize(start + 2 + MAX_HANDSHAKE_MSG, 0);
    let n = hs
        .write_message(payload, &mut out[start + 2..])
        .map_err(snow_err)?;
    out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
    out.truncate(start + 2 + n);
    Ok(())
}

/// Read a handshake message; returns its payload.
fn read_msg(hs: &mut HandshakeState, msg: &[u8]) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; msg.len()];
    let n = hs.read_message(msg, &mut buf).map_err(snow_err)?;
    buf.truncate(n);
    Ok(buf)
}

fn proof_msg(domain: &[u8], h: &[u8], s: &[u8; 32]) -> Vec<u8> {
    [domain, h, s].concat()
}

fn prove(domain: &[u8], h: &[u8], s: &[u8; 32], identity: &SigningKey) -> [u8; AUTH_LEN] {
    let sig = identity.sign(&proof_msg(domain, h, s));
    let mut out = [0u8; AUTH_LEN];
    out[..32].copy_from_slice(identity.verifying_key().as_bytes());
    out[32..].copy_from_slice(&sig.to_bytes());
    out
}

/// Check a proof; returns the identity it proves.
fn check(domain: &[u8], h: &[u8], s: &[u8; 32], payload: &[u8]) -> Result<RelayId, Error> {
    let p: &[u8; AUTH_LEN] = payload
        .try_into()
        .map_err(|_| Error::Link(format!("identity proof of {} bytes", payload.len())))?;
    let (id, sig) = p.split_at(32);
    let id: [u8; 32] = id.try_into().map_err(|_| Error::Truncated)?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| Error::Truncated)?;
    let vk = VerifyingKey::from_bytes(&id)
        .map_err(|_| Error::Link("identity proof: not an Ed25519 key".into()))?;
    vk.verify_strict(&proof_msg(domain, h, s), &Signature::from_bytes(&sig))
        .map_err(|_| {
            Error::Link("identity proof: the signature over the link key does not verify".into())
        })?;
    Ok(RelayId(id))
}

/// A relay's keys as the link needs them.
pub struct LinkKeys<'a> {
    pub identity: &'a SigningKey,
    pub link_secret: &'a StaticSecret,
}

impl LinkKeys<'_> {
    fn link_pub(&self) -> [u8; 32] {
        PublicKey::from(self.link_secret).to_bytes()
    }
}

enum IState {
    Start,
    AwaitReply,
    Finished,
}

/// The initiating side: a client to its guard (NK) or a relay to another
/// relay (XK). Its result says which identity the responder proved; the
/// caller checks it with [`UnverifiedLink::verify`].
pub struct Initiator {
    hs: Option<HandshakeState>,
    kind: u8,
    /// XK: our identity and our link public key, to prove in message 3.
    me: Option<(SigningKey, [u8; 32])>,
    peer_link_key: LinkKey,
    state: IState,
    proof: Option<(Vec<u8>, Vec<u8>)>,
}

impl Initiator {
    /// A client's link to a guard whose link key comes from the consensus.
    pub fn nk(rng: &mut impl CryptoRng, guard_link_key: &LinkKey) -> Result<Self, Error> {
        Ok(Initiator {
            hs: Some(handshake(
                rng,
                NK_PARAMS,
                None,
                Some(&guard_link_key.0),
                true,
            )?),
            kind: LINK_NK,
            me: None,
            peer_link_key: *guard_link_key,
            state: IState::Start,
            proof: None,
        })
    }

    /// A relay's link to another relay.
    pub fn xk(
        rng: &mut impl CryptoRng,
        me: LinkKeys<'_>,
        peer_link_key: &LinkKey,
    ) -> Result<Self, Error> {
        let mut secret = me.link_secret.to_bytes();
        let hs = handshake(rng, XK_PARAMS, Some(&secret), Some(&peer_link_key.0), true);
        secret.zeroize();
        Ok(Initiator {
            hs: Some(hs?),
            kind: LINK_XK,
            me: Some((me.identity.clone(), me.link_pub())),
            peer_link_key: *peer_link_key,
            state: IState::Start,
            proof: None,
        })
    }

    fn hs(&mut self) -> Result<&mut HandshakeState, Error> {
        self.hs
            .as_mut()
            .ok_or_else(|| Error::Link("handshake already finished".into()))
    }

    /// Advance the handshake with the bytes in `input` (consumed as used).
    pub fn step(&mut self, input: &mut Vec<u8>) -> Result<Action<UnverifiedLink>, Error> {
        match self.state {
            IState::Start => {
                let mut out = vec![self.kind];
                write_frame(self.hs()?, &[], &mut out)?;
                self.state = IState::AwaitReply;
                Ok(Action::Send(out))
            }
            IState::AwaitReply => {
                let Some(msg) = take_frame(input)? else {
                    return Ok(Action::Recv);
                };
                let hs = self.hs()?;
                let h = hs.get_handshake_hash().to_vec();
                let payload = read_msg(hs, &msg)?;
                self.proof = Some((h, payload));
                self.state = IState::Finished;
                match self.me.take() {
                    None => self.step(input),
                    Some((identity, link_pub)) => {
                        let hs = self.hs()?;
                        let p = prove(
                            XK_AUTH_DOMAIN,
                            hs.get_handshake_hash(),
                            &link_pub,
                            &identity,
                        );
                        let mut out = Vec::new();
                        write_frame(hs, &p, &mut out)?;
                        Ok(Action::Send(out))
                    }
                }
            }
            IState::Finished => {
                let mut hs = self
                    .hs
                    .take()
                    .ok_or_else(|| Error::Link("handshake already finished".into()))?;
                let (h, payload) = self
                    .proof
                    .take()
                    .ok_or_else(|| Error::Link("no responder proof".into()))?;
                Ok(Action::Done(UnverifiedLink {
                    transport: LinkTransport::from_handshake(&mut hs, true)?,
                    h,
                    payload,
                    peer_link_key: self.peer_link_key,
                }))
            }
        }
    }
}

/// An initiator's link whose responder has not yet been checked against
/// the identity the caller wanted to reach.
pub struct UnverifiedLink {
    transport: LinkTransport,
    h: Vec<u8>,
    payload: Vec<u8>,
    peer_link_key: LinkKey,
}

impl UnverifiedLink {
    /// The link, if the responder proved the identity `expected`.
    pub fn verify(self, expected: &RelayId) -> Result<LinkTransport, Error> {
        let got = check(
            RESPONDER_AUTH_DOMAIN,
            &self.h,
            &self.peer_link_key.0,
            &self.payload,
        )?;
        if &got != expected {
            return Err(Error::Link(format!(
                "the responder proved identity {got}, not {expected}"
            )));
        }
        Ok(self.transport)
    }
}

enum RState {
    AwaitHello,
    Proved,
    AwaitProof,
    Finished(Option<RelayId>),
}

/// The responding side (a relay), for either pattern.
pub struct Responder {
    identity: SigningKey,
    link_secret: [u8; 32],
    link_pub: [u8; 32],
    seed: [u8; 32],
    hs: Option<HandshakeState>,
    state: RState,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.link_secret.zeroize();
        self.seed.zeroize();
    }
}

/// A responder's finished link.
pub struct Link {
    pub transport: LinkTransport,
    /// The initiator's relay identity (XK), proven in the handshake; `None`
    /// for a client (NK).
    pub peer: Option<RelayId>,
}

impl Responder {
    pub fn new(rng: &mut impl CryptoRng, me: LinkKeys<'_>) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Responder {
            identity: me.identity.clone(),
            link_secret: me.link_secret.to_bytes(),
            link_pub: me.link_pub(),
            seed,
            hs: None,
            state: RState::AwaitHello,
        }
    }

    fn hs(&mut self) -> Result<&mut HandshakeState, Error> {
        self.hs
            .as_mut()
            .ok_or_else(|| Error::Link("handshake not started".into()))
    }

    /// Advance the handshake with the bytes in `input` (consumed as used).
    pub fn step(&mut self, input: &mut Vec<u8>) -> Result<Action<Link>, Error> {
        match self.state {
            RState::AwaitHello => {
                let Some(&kind) = input.first() else {
                    return Ok(Action::Recv);
                };
                let params = match kind {
                    LINK_NK => NK_PARAMS,
                    LINK_XK => XK_PARAMS,
                    k => return Err(Error::Link(format!("unknown link kind {k}"))),
                };
                let mut rest = input[1..].to_vec();
                let Some(msg) = take_frame(&mut rest)? else {
                    return Ok(Action::Recv);
                };
                *input = rest;
                let mut rng = chacha20::ChaCha20Rng::from_seed(self.seed);
                self.hs = Some(handshake(
                    &mut rng,
                    params,
                    Some(&self.link_secret),
                    None,
                    false,
                )?);
                let hs = self
                    .hs
                    .as_mut()
                    .ok_or_else(|| Error::Link("handshake not started".into()))?;
                read_msg(hs, &msg)?;
                let p = prove(
                    RESPONDER_AUTH_DOMAIN,
                    hs.get_handshake_hash(),
                    &self.link_pub,
                    &self.identity,
                );
                let mut out = Vec::new();
                write_frame(hs, &p, &mut out)?;
                self.state = if kind == LINK_XK {
                    RState::AwaitProof
                } else {
                    RState::Finished(None)
                };
                Ok(Action::Send(out))
            }
            RState::AwaitProof => {
                let Some(msg) = take_frame(input)? else {
                    return Ok(Action::Recv);
                };
                let hs = self.hs()?;
                let h = hs.get_handshake_hash().to_vec();
                let payload = read_msg(hs, &msg)?;
                let s: [u8; 32] = hs
                    .get_remote_static()
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::Link("XK initiator sent no static key".into()))?;
                self.state = RState::Finished(Some(check(XK_AUTH_DOMAIN, &h, &s, &payload)?));
                self.step(input)
            }
            RState::Finished(peer) => {
                self.state = RState::Proved;
                let mut hs = self
                    .hs
                    .take()
                    .ok_or_else(|| Error::Link("handshake not started".into()))?;
                Ok(Action::Done(Link {
                    transport: LinkTransport::from_handshake(&mut hs, false)?,
                    peer,
                }))
            }
            RState::Proved => Err(Error::Link("handshake already finished".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::{Cell, CellCmd};

    struct Relay {
        identity: SigningKey,
        link: StaticSecret,
    }

    impl Relay {
        fn new(i: u8) -> Self {
            Relay {
                identity: SigningKey::from_bytes(&[i; 32]),
                link: StaticSecret::from([i.wrapping_add(100); 32]),
            }
        }
        fn keys(&self) -> LinkKeys<'_> {
            LinkKeys {
                identity: &self.identity,
                link_secret: &self.link,
            }
        }
        fn id(&self) -> RelayId {
            RelayId(self.identity.verifying_key().to_bytes())
        }
        fn link_pub(&self) -> LinkKey {
            LinkKey(PublicKey::from(&self.link).to_bytes())
        }
    }

    /// Shuttle bytes between the two machines, letting `tamper` change what
    /// the initiator sends; returns both results and what the responder
    /// had left over.
    fn run(
        mut i: Initiator,
        mut r: Responder,
        tamper: impl Fn(usize, &mut Vec<u8>),
    ) -> (Result<UnverifiedLink, Error>, Result<Link, Error>) {
        let (mut to_r, mut to_i) = (Vec::new(), Vec::new());
        let (mut done_i, mut done_r) = (None, None);
        let mut sent = 0;
        for _ in 0..10 {
            if done_i.is_none() {
                match i.step(&mut to_i) {
                    Ok(Action::Send(mut b)) => {
                        tamper(sent, &mut b);
                        sent += 1;
                        to_r.extend(b);
                    }
                    Ok(Action::Recv) => {}
                    Ok(Action::Done(l)) => done_i = Some(Ok(l)),
                    Err(e) => done_i = Some(Err(e)),
                }
            }
            if done_r.is_none() {
                match r.step(&mut to_r) {
                    Ok(Action::Send(b)) => to_i.extend(b),
                    Ok(Action::Recv) => {}
                    Ok(Action::Done(l)) => done_r = Some(Ok(l)),
                    Err(e) => done_r = Some(Err(e)),
                }
            }
        }
        (
            done_i.unwrap_or(Err(Error::Truncated)),
            done_r.unwrap_or(Err(Error::Truncated)),
        )
    }

    fn cells(n: u32) -> Vec<Cell> {
        (0..n)
            .map(|i| Cell::new(crate::cell::CircId(i + 1), CellCmd::RELAY, &[i as u8; 9]).unwrap())
            .collect()
    }

    fn exchange(a: &mut LinkTransport, b: &mut LinkTransport) {
        let sent = cells(3);
        let mut frame = Vec::new();
        a.seal_cells(&sent, &mut frame).unwrap();
        let mut got = Vec::new();
        b.open_cells(&mut frame[2..], &mut got).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].payload[..9], [2u8; 9]);
    }

    #[test]
    fn nk_proves_the_guard_identity() {
        let mut rng = rand::rng();
        let guard = Relay::new(1);
        let (i, r) = run(
            Initiator::nk(&mut rng, &guard.link_pub()).unwrap(),
            Responder::new(&mut rng, guard.keys()),
            |_, _| {},
        );
        let r = r.unwrap();
        assert!(r.peer.is_none(), "a client stays anonymous");
        let mut ti = i.unwrap().verify(&guard.id()).unwrap();
        let mut tr = r.transport;
        exchange(&mut ti, &mut tr);
        exchange(&mut tr, &mut ti);
    }

    #[test]
    fn a_responder_with_the_link_key_but_another_identity_is_refused() {
        // The responder holds the link key the client named, but proves a
        // different identity: `verify` against the named one fails.
        let mut rng = rand::rng();
        let honest = Relay::new(1);
        let impostor = Relay {
            identity: SigningKey::from_bytes(&[9; 32]),
            link: honest.link.clone(),
        };
        let (i, r) = run(
            Initiator::nk(&mut rng, &honest.link_pub()).unwrap(),
            Responder::new(&mut rng, impostor.keys()),
            |_, _| {},
        );
        assert!(r.is_ok());
        let err = i.unwrap().verify(&honest.id()).err().unwrap();
        assert!(err.to_string().contains("not"), "{err}");
    }

    #[test]
    fn xk_proves_both_identities() {
        let mut rng = rand::rng();
        let (a, b) = (Relay::new(1), Relay::new(2));
        let (i, r) = run(
            Initiator::xk(&mut rng, a.keys(), &b.link_pub()).unwrap(),
            Responder::new(&mut rng, b.keys()),
            |_, _| {},
        );
        let r = r.unwrap();
        assert_eq!(r.peer, Some(a.id()));
        let mut ti = i.unwrap().verify(&b.id()).unwrap();
        let mut tr = r.transport;
        exchange(&mut ti, &mut tr);
        exchange(&mut tr, &mut ti);
    }

    #[test]
    fn xk_to_the_wrong_link_key_fails() {
        let mut rng = rand::rng();
        let (a, b, c) = (Relay::new(1), Relay::new(2), Relay::new(3));
        let (i, r) = run(
            Initiator::xk(&mut rng, a.keys(), &c.link_pub()).unwrap(),
            Responder::new(&mut rng, b.keys()),
            |_, _| {},
        );
        assert!(r.is_err() && i.is_err());
    }

    #[test]
    fn tampered_or_oversized_messages_fail() {
        let mut rng = rand::rng();
        let (a, b) = (Relay::new(1), Relay::new(2));
        for victim in 0..2 {
            let (_, r) = run(
                Initiator::xk(&mut rng, a.keys(), &b.link_pub()).unwrap(),
                Responder::new(&mut rng, b.keys()),
                |n, m| {
                    if n == victim {
                        let last = m.len() - 1;
                        m[last] ^= 1;
                    }
                },
            );
            assert!(r.is_err(), "message {victim} tampered");
        }
        let mut r = Responder::new(&mut rng, b.keys());
        let mut big = vec![LINK_XK, 0xff, 0xff];
        assert!(r.step(&mut big).is_err());
        let mut unknown = vec![7, 0, 1, 0];
        assert!(
            Responder::new(&mut rng, b.keys())
                .step(&mut unknown)
                .is_err()
        );
    }

    #[test]
    fn bytes_after_the_handshake_stay_in_the_buffer() {
        let mut rng = rand::rng();
        let guard = Relay::new(1);
        let mut i = Initiator::nk(&mut rng, &guard.link_pub()).unwrap();
        let mut r = Responder::new(&mut rng, guard.keys());
        let mut to_r = Vec::new();
        let Action::Send(m1) = i.step(&mut Vec::new()).unwrap() else {
            panic!()
        };
        to_r.extend(&m1[..3]);
        assert!(matches!(r.step(&mut to_r).unwrap(), Action::Recv));
        to_r.extend(&m1[3..]);
        to_r.extend(b"early");
        let Action::Send(mut m2) = r.step(&mut to_r).unwrap() else {
            panic!()
        };
        let Action::Done(_) = r.step(&mut to_r).unwrap() else {
            panic!()
        };
        assert_eq!(to_r, b"early");
        assert!(matches!(i.step(&mut m2).unwrap(), Action::Done(_)));
        assert!(m2.is_empty());
    }
}
