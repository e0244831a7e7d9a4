//! The circuit handshake: one-way authenticated X25519 in the style of Tor's
//! ntor (`doc/protocol.md` section "Circuit handshake").
//!
//! ```text
//! client -> relay:  ID[32] | B[32] | X[32] | PC[2]          (98 bytes)
//! relay  -> client: Y[32] | AUTH[32] | PS[2]                (66 bytes)
//! secret_input = X25519(y,X) | X25519(b,X) | ID | B | X | Y | PC | PS | PROTOID
//! PRK  = HKDF-Extract(salt = PROTOID, secret_input)
//! AUTH = HKDF-Expand(PRK, PROTOID | ":auth", 32)
//! KEYS = HKDF-Expand(PRK, PROTOID | ":keys", 64)  -> forward key | backward key
//! ```
//! `ID` is the relay's Ed25519 identity, `B` the onion key the client chose
//! from the consensus. Only the relay holding `b` can compute AUTH; the
//! client stays anonymous. `PC` is the flow control the client asks for and
//! `PS` what the relay agrees to ([`CircParams`]: the same, or fixed
//! windows); both are in the transcript, so a hop that carries the CREATE
//! on cannot change them.

use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::aead::ct_eq;
use crate::doc::Sig;
use crate::flow::CircParams;
use crate::onion::HopKeys;
use crate::wire::Reader;
use crate::{Error, OnionKey};

pub const PROTOID: &[u8] = b"allium-ntor-x25519-sha256-2";
pub const CLIENT_LEN: usize = 96 + CircParams::LEN;
pub const SERVER_LEN: usize = 64 + CircParams::LEN;

/// The client's secret state between sending CREATE and reading CREATED.
pub struct ClientState {
    x: StaticSecret,
    xpub: [u8; 32],
    id: [u8; 32],
    b: [u8; 32],
    params: CircParams,
    /// `EXP(B, x)`, once [`ClientState::prepare`] has computed it.
    xb: Option<x25519_dalek::SharedSecret>,
}

/// Start a handshake with relay `id` whose onion key is `b`, asking for
/// flow control `params`.
pub fn client_start(
    rng: &mut impl CryptoRng,
    id: &[u8; 32],
    b: &OnionKey,
    params: CircParams,
) -> (ClientState, Vec<u8>) {
    client_start_with_ephemeral(StaticSecret::random_from_rng(rng), id, b, params)
}

/// [`client_start`] with a given ephemeral key, for test vectors.
pub fn client_start_with_ephemeral(
    x: StaticSecret,
    id: &[u8; 32],
    b: &OnionKey,
    params: CircParams,
) -> (ClientState, Vec<u8>) {
    let xpub = PublicKey::from(&x);
    let mut msg = Vec::with_capacity(CLIENT_LEN);
    msg.extend_from_slice(id);
    msg.extend_from_slice(&b.0);
    msg.extend_from_slice(xpub.as_bytes());
    msg.extend_from_slice(&params.encode());
    (
        ClientState {
            xpub: xpub.to_bytes(),
            x,
            id: *id,
            b: b.0,
            params,
            xb: None,
        },
        msg,
    )
}

/// The public half of the transcript: `ID | B | X | Y | PC | PS`.
struct Transcript<'a> {
    id: &'a [u8; 32],
    b: &'a [u8; 32],
    x: &'a [u8; 32],
    y: &'a [u8; 32],
    pc: [u8; 2],
    ps: [u8; 2],
}

fn derive(xy: &[u8; 32], xb: &[u8; 32], t: &Transcript<'_>) -> ([u8; 32], HopKeys) {
    let mut input = Zeroizing::new(Vec::with_capacity(196 + PROTOID.len()));
    for part in [xy, xb, t.id, t.b, t.x, t.y] {
        input.extend_from_slice(part);
    }
    input.extend_from_slice(&t.pc);
    input.extend_from_slice(&t.ps);
    input.extend_from_slice(PROTOID);
    let hk = Hkdf::<Sha256>::new(Some(PROTOID), &input);
    let mut auth = [0u8; 32];
    let mut keys = Zeroizing::new([0u8; 64]);
    let label = |s: &str| [PROTOID, s.as_bytes()].concat();
    hk.expand(&label(":auth"), &mut auth)
        .expect("32 bytes is a valid HKDF length");
    hk.expand(&label(":keys"), &mut keys[..])
        .expect("64 bytes is a valid HKDF length");
    (auth, HopKeys::from_bytes(&keys))
}

/// A relay's onion key pair, its public half computed once.
pub struct OnionSecret {
    secret: StaticSecret,
    public: OnionKey,
}

impl OnionSecret {
    pub fn new(secret: StaticSecret) -> Self {
        OnionSecret {
            public: OnionKey(PublicKey::from(&secret).to_bytes()),
            secret,
        }
    }
    pub fn public(&self) -> OnionKey {
        self.public
    }
    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }

    /// Prove that the holder of this onion key also holds `identity`'s
    /// descriptor: sign [`OnionCrossCert::message`] with the Ed25519 key
    /// that has the onion key's own secret scalar (as Tor's
    /// ntor-onion-key-crosscert).
    pub fn crosscert(&self, identity: &[u8; 32]) -> OnionCrossCert {
        let x = Zeroizing::new(self.secret.to_bytes());
        let mut h = Sha512::new();
        h.update(CROSSCERT_NONCE_DOMAIN);
        h.update(x.as_slice());
        let wide = Zeroizing::new(<[u8; 64]>::from(h.finalize()));
        let mut hash_prefix = Zeroizing::new([0u8; 32]);
        hash_prefix.copy_from_slice(&wide[32..]);
        let clamped = Zeroizing::new(clamp_integer(*x));
        let esk = ExpandedSecretKey {
            scalar: Scalar::from_bytes_mod_order(*clamped),
            hash_prefix: *hash_prefix,
        };
        let vk = VerifyingKey::from(&esk);
        let sig = raw_sign::<Sha512>(&esk, &OnionCrossCert::message(identity, &self.public), &vk);
        OnionCrossCert {
            sign: vk.as_bytes()[31] >> 7,
            sig: Sig(sig.to_bytes()),
        }
    }
}

/// Domain of the message an onion key's cross-certificate signs.
pub const CROSSCERT_DOMAIN: &[u8] = b"allium onion key crosscert v1\0";
/// Domain of the hash that gives the cross-certificate's nonce prefix.
const CROSSCERT_NONCE_DOMAIN: &[u8] = b"allium onion key crosscert nonce v1\0";

/// A descriptor's proof that the relay holds its onion key's secret
/// (doc/protocol.md section 6): an Ed25519 signature by the point whose
/// Montgomery form is the onion key, `sign` giving the sign of its `x`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnionCrossCert {
    pub sign: u8,
    pub sig: Sig,
}

impl OnionCrossCert {
    /// `CROSSCERT_DOMAIN | identity | onion_key`.
    pub fn message(identity: &[u8; 32], onion_key: &OnionKey) -> Vec<u8> {
        [CROSSCERT_DOMAIN, identity, &onion_key.0].concat()
    }

    /// Does it prove `onion_key` belongs with `identity`?
    pub fn check(&self, identity: &[u8; 32], onion_key: &OnionKey) -> bool {
        if self.sign > 1 {
            return false;
        }
        let Some(point) = MontgomeryPoint(onion_key.0).to_edwards(self.sign) else {
            return false;
        };
        VerifyingKey::from(point)
            .verify_strict(
                &Self::message(identity, onion_key),
                &Signature::from_bytes(&self.sig.0),
            )
            .is_ok()
    }
}

/// The relay's onion keys it will answer for: current and previous.
pub struct OnionKeys<'a> {
    pub identity: [u8; 32],
    pub keys: &'a [&'a OnionSecret],
}

/// Answer a CREATE: returns the CREATED reply, the hop keys and the flow
/// control agreed (what the client asked for).
pub fn server(
    rng: &mut impl CryptoRng,
    keys: &OnionKeys<'_>,
    msg: &[u8],
) -> Result<(Vec<u8>, HopKeys, CircParams), Error> {
    server_with_ephemeral(StaticSecret::random_from_rng(rng), keys, msg)
}

/// [`server`] with a given ephemeral key, for test vectors.
pub fn server_with_ephemeral(
    y: StaticSecret,
    keys: &OnionKeys<'_>,
    msg: &[u8],
) -> Result<(Vec<u8>, HopKeys, CircParams), Error> {
    let mut r = Reader::new(msg);
    let id: [u8; 32] = r.take_array()?;
    let b: [u8; 32] = r.take_array()?;
    let x: [u8; 32] = r.take_array()?;
    let pc: [u8; 2] = r.take_array()?;
    r.should_be_exhausted()?;
    let params = CircParams::decode(pc)?;
    if id != keys.identity {
        return Err(Error::Handshake("CREATE names another relay's identity"));
    }
    let secret = &keys
        .keys
        .iter()
        .find(|k| k.public.0 == b)
        .ok_or(Error::Handshake(
            "CREATE names an unknown or expired onion key",
        ))?
        .secret;
    let xpub = PublicKey::from(x);
    let xy = y.diffie_hellman(&xpub);
    let xb = secret.diffie_hellman(&xpub);
    if !xy.was_contributory() || !xb.was_contributory() {
        return Err(Error::Handshake("client key is a low-order point"));
    }
    let ypub = PublicKey::from(&y);
    let t = Transcript {
        id: &id,
        b: &b,
        x: &x,
        y: ypub.as_bytes(),
        pc,
        ps: pc,
    };
    let (auth, hk) = derive(xy.as_bytes(), xb.as_bytes(), &t);
    let mut reply = Vec::with_capacity(SERVER_LEN);
    reply.extend_from_slice(ypub.as_bytes());
    reply.extend_from_slice(&auth);
    reply.extend_from_slice(&pc);
    Ok((reply, hk, params))
}

impl ClientState {
    /// Compute the half of the shared secret that does not need the reply
    /// (`EXP(B, x)`), so that a caller can do it while the reply is on its
    /// way. [`ClientState::finish`] does it otherwise.
    pub fn prepare(&mut self) {
        if self.xb.is_none() {
            self.xb = Some(self.x.diffie_hellman(&PublicKey::from(self.b)));
        }
    }

    /// Check the relay's CREATED reply; the hop keys and the flow control
    /// agreed (what was asked for, or fixed windows if the relay said so).
    pub fn finish(mut self, reply: &[u8]) -> Result<(HopKeys, CircParams), Error> {
        self.check(reply)
    }

    /// [`ClientState::finish`] without giving up the state: a client that
    /// started several handshakes (one per introduction it sent) tries a
    /// reply against each.
    pub fn check(&mut self, reply: &[u8]) -> Result<(HopKeys, CircParams), Error> {
        let mut r = Reader::new(reply);
        let y: [u8; 32] = r.take_array()?;
        let auth: [u8; 32] = r.take_array()?;
        let ps: [u8; 2] = r.take_array()?;
        r.should_be_exhausted()?;
        let agreed = CircParams::decode(ps)?;
        if agreed != self.params && agreed != CircParams::Fixed {
            return Err(Error::Handshake(
                "relay agreed to flow control other than asked",
            ));
        }
        let ypub = PublicKey::from(y);
        let xy = self.x.diffie_hellman(&ypub);
        self.prepare();
        let xb = self.xb.as_ref().expect("prepared above");
        if !xy.was_contributory() || !xb.was_contributory() {
            return Err(Error::Handshake("relay key is a low-order point"));
        }
        let t = Transcript {
            id: &self.id,
            b: &self.b,
            x: &self.xpub,
            y: &y,
            pc: self.params.encode(),
            ps,
        };
        let (expect, keys) = derive(xy.as_bytes(), xb.as_bytes(), &t);
        if !ct_eq(&expect, &auth) {
            return Err(Error::Handshake("relay's AUTH does not verify"));
        }
        Ok((keys, agreed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay_keys() -> (OnionSecret, OnionSecret, [u8; 32]) {
        (
            OnionSecret::new(StaticSecret::from([0x11; 32])),
            OnionSecret::new(StaticSecret::from([0x22; 32])),
            [0x33; 32],
        )
    }

    #[test]
    fn handshake_agrees_with_current_and_previous_key() {
        let (cur, prev, id) = relay_keys();
        let ks = [&cur, &prev];
        let keys = OnionKeys {
            identity: id,
            keys: &ks,
        };
        let mut rng = rand::rng();
        for (b, p) in [
            (cur.public(), CircParams::default()),
            (prev.public(), CircParams::Fixed),
        ] {
            let (st, m) = client_start(&mut rng, &id, &b, p);
            let (reply, sk, sp) = server(&mut rng, &keys, &m).unwrap();
            let (ck, cp) = st.finish(&reply).unwrap();
            assert_eq!(ck.forward, sk.forward);
            assert_eq!(ck.backward, sk.backward);
            assert_eq!((sp, cp), (p, p));
        }
    }

    #[test]
    fn rejects_wrong_identity_unknown_key_and_bad_auth() {
        let (cur, _prev, id) = relay_keys();
        let ks = [&cur];
        let keys = OnionKeys {
            identity: id,
            keys: &ks,
        };
        let mut rng = rand::rng();
        let b = cur.public();
        let p = CircParams::default();
        let (_, m) = client_start(&mut rng, &[0; 32], &b, p);
        assert!(server(&mut rng, &keys, &m).is_err());
        let (_, m) = client_start(&mut rng, &id, &OnionKey([9; 32]), p);
        assert!(server(&mut rng, &keys, &m).is_err());
        let (st, m) = client_start(&mut rng, &id, &b, p);
        let (mut reply, _, _) = server(&mut rng, &keys, &m).unwrap();
        reply[40] ^= 1;
        assert!(st.finish(&reply).is_err());
        let (_, mut m) = client_start(&mut rng, &id, &b, p);
        m.push(0);
        assert!(server(&mut rng, &keys, &m).is_err());
    }

    /// The flow control asked for is bound into the keys: a hop that
    /// carries the CREATE on and changes it, or the relay's answer, makes
    /// the handshake fail.
    #[test]
    fn flow_control_cannot_be_changed_on_the_way() {
        let (cur, _prev, id) = relay_keys();
        let ks = [&cur];
        let keys = OnionKeys {
            identity: id,
            keys: &ks,
        };
        let mut rng = rand::rng();
        let b = cur.public();
        // Asked for Vegas; a hop on the way turns it into fixed windows.
        let (st, mut m) = client_start(&mut rng, &id, &b, CircParams::default());
        m[96..].copy_from_slice(&CircParams::Fixed.encode());
        let (reply, _, sp) = server(&mut rng, &keys, &m).unwrap();
        assert_eq!(sp, CircParams::Fixed);
        assert!(matches!(st.finish(&reply), Err(Error::Handshake(_))));
        // The answer changed on the way back: to fixed, or to another
        // increment.
        for ps in [CircParams::Fixed, CircParams::Vegas { inc: 200 }] {
            let (st, m) = client_start(&mut rng, &id, &b, CircParams::default());
            let (mut reply, _, _) = server(&mut rng, &keys, &m).unwrap();
            reply[64..].copy_from_slice(&ps.encode());
            assert!(matches!(st.finish(&reply), Err(Error::Handshake(_))));
        }
        // Parameters no relay may agree to are refused before any work.
        let (_, mut m) = client_start(&mut rng, &id, &b, CircParams::default());
        m[97] = 1;
        assert!(matches!(
            server(&mut rng, &keys, &m),
            Err(Error::Malformed { .. })
        ));
    }
}
