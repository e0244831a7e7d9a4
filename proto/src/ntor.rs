//! The circuit handshake: one-way authenticated X25519 in the style of Tor's
//! ntor (`doc/protocol.md` section "Circuit handshake").
//!
//! ```text
//! client -> relay:  ID[32] | B[32] | X[32]                  (96 bytes)
//! relay  -> client: Y[32] | AUTH[32]                        (64 bytes)
//! secret_input = X25519(y,X) | X25519(b,X) | ID | B | X | Y | PROTOID
//! PRK  = HKDF-Extract(salt = PROTOID, secret_input)
//! AUTH = HKDF-Expand(PRK, PROTOID | ":auth", 32)
//! KEYS = HKDF-Expand(PRK, PROTOID | ":keys", 64)  -> forward key | backward key
//! ```
//! `ID` is the relay's Ed25519 identity, `B` the onion key the client chose
//! from the consensus. Only the relay holding `b` can compute AUTH; the
//! client stays anonymous.

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
use crate::onion::HopKeys;
use crate::wire::Reader;
use crate::{Error, OnionKey};

pub const PROTOID: &[u8] = b"allium-ntor-x25519-sha256-1";
pub const CLIENT_LEN: usize = 96;
pub const SERVER_LEN: usize = 64;

/// The client's secret state between sending CREATE and reading CREATED.
pub struct ClientState {
    x: StaticSecret,
    xpub: [u8; 32],
    id: [u8; 32],
    b: [u8; 32],
    /// `EXP(B, x)`, once [`ClientState::prepare`] has computed it.
    xb: Option<x25519_dalek::SharedSecret>,
}

/// Start a handshake with relay `id` whose onion key is `b`.
pub fn client_start(
    rng: &mut impl CryptoRng,
    id: &[u8; 32],
    b: &OnionKey,
) -> (ClientState, Vec<u8>) {
    client_start_with_ephemeral(StaticSecret::random_from_rng(rng), id, b)
}

/// [`client_start`] with a given ephemeral key, for test vectors.
pub fn client_start_with_ephemeral(
    x: StaticSecret,
    id: &[u8; 32],
    b: &OnionKey,
) -> (ClientState, Vec<u8>) {
    let xpub = PublicKey::from(&x);
    let mut msg = Vec::with_capacity(CLIENT_LEN);
    msg.extend_from_slice(id);
    msg.extend_from_slice(&b.0);
    msg.extend_from_slice(xpub.as_bytes());
    (
        ClientState {
            xpub: xpub.to_bytes(),
            x,
            id: *id,
            b: b.0,
            xb: None,
        },
        msg,
    )
}

fn derive(
    xy: &[u8; 32],
    xb: &[u8; 32],
    id: &[u8; 32],
    b: &[u8; 32],
    x: &[u8; 32],
    y: &[u8; 32],
) -> ([u8; 32], HopKeys) {
    let mut input = Zeroizing::new(Vec::with_capacity(192 + PROTOID.len()));
    for part in [xy, xb, id, b, x, y] {
        input.extend_from_slice(part);
    }
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

/// Answer a CREATE: returns the CREATED reply and the hop keys.
pub fn server(
    rng: &mut impl CryptoRng,
    keys: &OnionKeys<'_>,
    msg: &[u8],
) -> Result<(Vec<u8>, HopKeys), Error> {
    server_with_ephemeral(StaticSecret::random_from_rng(rng), keys, msg)
}

/// [`server`] with a given ephemeral key, for test vectors.
pub fn server_with_ephemeral(
    y: StaticSecret,
    keys: &OnionKeys<'_>,
    msg: &[u8],
) -> Result<(Vec<u8>, HopKeys), Error> {
    let mut r = Reader::new(msg);
    let id: [u8; 32] = r.take_array()?;
    let b: [u8; 32] = r.take_array()?;
    let x: [u8; 32] = r.take_array()?;
    r.should_be_exhausted()?;
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
    let (auth, hk) = derive(xy.as_bytes(), xb.as_bytes(), &id, &b, &x, ypub.as_bytes());
    let mut reply = Vec::with_capacity(SERVER_LEN);
    reply.extend_from_slice(ypub.as_bytes());
    reply.extend_from_slice(&auth);
    Ok((reply, hk))
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

    /// Check the relay's CREATED reply and derive the hop keys.
    pub fn finish(mut self, reply: &[u8]) -> Result<HopKeys, Error> {
        let mut r = Reader::new(reply);
        let y: [u8; 32] = r.take_array()?;
        let auth: [u8; 32] = r.take_array()?;
        r.should_be_exhausted()?;
        let ypub = PublicKey::from(y);
        let xy = self.x.diffie_hellman(&ypub);
        self.prepare();
        let xb = self.xb.as_ref().expect("prepared above");
        if !xy.was_contributory() || !xb.was_contributory() {
            return Err(Error::Handshake("relay key is a low-order point"));
        }
        let (expect, keys) = derive(
            xy.as_bytes(),
            xb.as_bytes(),
            &self.id,
            &self.b,
            &self.xpub,
            &y,
        );
        if !ct_eq(&expect, &auth) {
            return Err(Error::Handshake("relay's AUTH does not verify"));
        }
        Ok(keys)
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
        for b in [cur.public(), prev.public()] {
            let (st, m) = client_start(&mut rng, &id, &b);
            let (reply, sk) = server(&mut rng, &keys, &m).unwrap();
            let ck = st.finish(&reply).unwrap();
            assert_eq!(ck.forward, sk.forward);
            assert_eq!(ck.backward, sk.backward);
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
        let (_, m) = client_start(&mut rng, &[0; 32], &b);
        assert!(server(&mut rng, &keys, &m).is_err());
        let (_, m) = client_start(&mut rng, &id, &OnionKey([9; 32]));
        assert!(server(&mut rng, &keys, &m).is_err());
        let (st, m) = client_start(&mut rng, &id, &b);
        let (mut reply, _) = server(&mut rng, &keys, &m).unwrap();
        reply[40] ^= 1;
        assert!(st.finish(&reply).is_err());
        let (_, mut m) = client_start(&mut rng, &id, &b);
        m.push(0);
        assert!(server(&mut rng, &keys, &m).is_err());
    }
}
