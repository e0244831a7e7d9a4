//! Introduction and rendezvous (doc/protocol.md section 11.4): what a
//! service signs to hold an introduction point, and what a client sends
//! the service through one.
//!
//! ```text
//! ESTABLISH_INTRO sig = Ed25519(auth_key, "allium establish intro v1\0" | binding | auth_key | u32 rate | u32 burst)
//!   binding = SHA-256("allium circuit binding v1\0" | forward key | backward key) of the hop
//!
//! INTRODUCE1.encrypted = E[32] | tag[16] | AES-256-GCM(key, nonce 0, ad = auth_key, request)
//!   key     = HKDF-SHA256(salt "allium introduce v1", X25519(e, B) | E | B | auth_key | subcredential, "key")
//!   request = cookie[20] | rp identity[32] | rp link key[32] | rp address | u16 port
//!             | u16 len | ntor onionskin | u32 pow effort | pow seed head[4] | pow nonce[16]
//!             | zeros to 256 bytes
//! ```
//! `B` is the service's X25519 key for this introduction point (from the
//! descriptor). The subcredential makes the request useless to anyone who
//! does not know the address; the onionskin is the client's half of an
//! ntor handshake with `ID = auth_key`, `B`, whose reply reaches the
//! client in RENDEZVOUS2 and gives the end-to-end hop's keys.

use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::pow::Pow;
use crate::aead::{self, TAG_LEN};
use crate::relaymsg::{COOKIE_LEN, EstablishIntro, TargetAddr};
use crate::wire::{Reader, Writer};
use crate::{Error, LinkKey};

const ESTABLISH_DOMAIN: &[u8] = b"allium establish intro v1\0";
const INTRODUCE_SALT: &[u8] = b"allium introduce v1";
/// Bytes of an INTRODUCE request, padded (so its size says nothing).
pub const REQUEST_LEN: usize = 256;
/// Bounds on the rate (INTRODUCE1s a second) and burst a service may ask
/// of its introduction point.
pub const MAX_RATE: u32 = 1_000;
pub const MAX_BURST: u32 = 10_000;
/// Bytes of INTRODUCE1's encrypted part.
pub const ENCRYPTED_LEN: usize = 32 + TAG_LEN + REQUEST_LEN;

fn establish_message(binding: &[u8; 32], auth_key: &[u8; 32], rate: u32, burst: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.put(ESTABLISH_DOMAIN)
        .put(binding)
        .put(auth_key)
        .put_u32(rate)
        .put_u32(burst);
    w.finish()
}

/// The ESTABLISH_INTRO a service sends on the circuit whose last hop has
/// `binding`, asking it to pass on `rate` introductions a second (bursts
/// of `burst`).
pub fn establish_intro(
    auth: &SigningKey,
    binding: &[u8; 32],
    rate: u32,
    burst: u32,
) -> EstablishIntro {
    let auth_key = auth.verifying_key().to_bytes();
    let sig = auth.sign(&establish_message(binding, &auth_key, rate, burst));
    EstablishIntro {
        auth_key,
        rate,
        burst,
        sig: sig.to_bytes(),
    }
}

impl EstablishIntro {
    /// Was this signed by its `auth_key` for the circuit with `binding`?
    pub fn verify(&self, binding: &[u8; 32]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.auth_key) else {
            return false;
        };
        key.verify_strict(
            &establish_message(binding, &self.auth_key, self.rate, self.burst),
            &Signature::from_bytes(&self.sig),
        )
        .is_ok()
    }
}

/// Where the client waits, and its half of the end-to-end handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntroduceRequest {
    pub cookie: [u8; COOKIE_LEN],
    pub rp_identity: [u8; 32],
    pub rp_link_key: LinkKey,
    pub rp_addr: SocketAddr,
    pub onionskin: Vec<u8>,
    /// A solution of the service's puzzle (section 11.5), bound to the
    /// introduction's ephemeral key.
    pub pow: Option<Pow>,
}

impl IntroduceRequest {
    fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut w = Writer::new();
        w.put(&self.cookie)
            .put(&self.rp_identity)
            .put(&self.rp_link_key.0);
        TargetAddr::Ip(self.rp_addr.ip()).write(&mut w);
        w.put_u16(self.rp_addr.port())
            .put_u16(self.onionskin.len() as u16)
            .put(&self.onionskin);
        match &self.pow {
            Some(p) => w.put_u32(p.effort).put(&p.seed_head).put(&p.nonce),
            None => w.put(&[0; 24]),
        };
        let mut v = w.finish();
        if v.len() > REQUEST_LEN {
            return Err(Error::TooLarge {
                what: "introduce request",
                len: v.len(),
                max: REQUEST_LEN,
            });
        }
        v.resize(REQUEST_LEN, 0);
        Ok(v)
    }

    fn decode(b: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(b);
        let cookie = r.take_array()?;
        let rp_identity = r.take_array()?;
        let rp_link_key = LinkKey(r.take_array()?);
        let ip = match TargetAddr::read(&mut r)? {
            TargetAddr::Ip(ip) => ip,
            TargetAddr::Host(_) => return Err(Error::malformed("introduce", "hostname")),
        };
        let port = r.take_u16()?;
        let len = r.take_u16()? as usize;
        let onionskin = r.take(len)?.to_vec();
        let effort = r.take_u32()?;
        let seed_head = r.take_array()?;
        let nonce = r.take_array()?;
        let pow = (effort > 0).then_some(Pow {
            effort,
            seed_head,
            nonce,
        });
        if pow.is_none() && (seed_head != [0; 4] || nonce != [0; 16]) {
            return Err(Error::malformed(
                "introduce",
                "a puzzle solution of no effort",
            ));
        }
        if r.take_rest().iter().any(|&b| b != 0) {
            return Err(Error::malformed("introduce", "padding is not zeros"));
        }
        Ok(IntroduceRequest {
            cookie,
            rp_identity,
            rp_link_key,
            rp_addr: SocketAddr::new(ip, port),
            onionskin,
            pow,
        })
    }
}

fn key(
    shared: &[u8; 32],
    e: &[u8; 32],
    b: &[u8; 32],
    auth_key: &[u8; 32],
    subcred: &[u8; 32],
) -> aead::Key {
    let ikm = [&shared[..], e, b, auth_key, subcred].concat();
    let mut k = [0u8; aead::KEY_LEN];
    Hkdf::<Sha256>::new(Some(INTRODUCE_SALT), &ikm)
        .expand(b"key", &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    aead::Key::new(&k)
}

/// Encrypt `req` for the service behind introduction `auth_key`, whose
/// key there is `enc_key`.
pub fn seal(
    rng: &mut impl CryptoRng,
    req: &IntroduceRequest,
    auth_key: &[u8; 32],
    enc_key: &[u8; 32],
    subcredential: &[u8; 32],
) -> Result<Vec<u8>, Error> {
    seal_with_ephemeral(
        StaticSecret::random_from_rng(rng),
        req,
        auth_key,
        enc_key,
        subcredential,
    )
}

/// [`seal`] with a given ephemeral key, for test vectors.
pub fn seal_with_ephemeral(
    e: StaticSecret,
    req: &IntroduceRequest,
    auth_key: &[u8; 32],
    enc_key: &[u8; 32],
    subcredential: &[u8; 32],
) -> Result<Vec<u8>, Error> {
    let epub = PublicKey::from(&e).to_bytes();
    let shared = e.diffie_hellman(&PublicKey::from(*enc_key));
    if !shared.was_contributory() {
        return Err(Error::Handshake("service key is a low-order point"));
    }
    let k = key(shared.as_bytes(), &epub, enc_key, auth_key, subcredential);
    let mut body = req.encode()?;
    let tag = aead::whole::seal(&k, 0, auth_key, &mut body);
    Ok([&epub[..], &tag, &body].concat())
}

/// The service's side of [`seal`]: the request, and the client's
/// ephemeral key (for the service's replay check).
pub fn open(
    enc: &StaticSecret,
    auth_key: &[u8; 32],
    subcredential: &[u8; 32],
    encrypted: &[u8],
) -> Result<(IntroduceRequest, [u8; 32]), Error> {
    if encrypted.len() != ENCRYPTED_LEN {
        return Err(Error::malformed("introduce", "wrong length"));
    }
    let (epub, rest) = encrypted.split_at(32);
    let (tag, body) = rest.split_at(TAG_LEN);
    let epub: [u8; 32] = epub.try_into().expect("split at 32");
    let tag: [u8; TAG_LEN] = tag.try_into().expect("split at 16");
    let shared = enc.diffie_hellman(&PublicKey::from(epub));
    if !shared.was_contributory() {
        return Err(Error::Handshake("client key is a low-order point"));
    }
    let b = PublicKey::from(enc).to_bytes();
    let k = key(shared.as_bytes(), &epub, &b, auth_key, subcredential);
    let mut body = body.to_vec();
    if !aead::whole::open(&k, 0, auth_key, &mut body, &tag) {
        return Err(Error::Handshake("introduction does not decrypt"));
    }
    Ok((IntroduceRequest::decode(&body)?, epub))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn establish_intro_is_bound_to_its_circuit() {
        let auth = SigningKey::from_bytes(&[1; 32]);
        let e = establish_intro(&auth, &[2; 32], 25, 200);
        assert!(e.verify(&[2; 32]));
        assert!(!e.verify(&[3; 32]), "replayed on another circuit");
        let mut raised = e.clone();
        raised.rate = 26;
        assert!(!raised.verify(&[2; 32]));
    }

    #[test]
    fn only_the_service_with_the_subcredential_opens_an_introduction() {
        let mut rng = StdRng::seed_from_u64(5);
        let enc = StaticSecret::random_from_rng(&mut rng);
        let enc_pub = PublicKey::from(&enc).to_bytes();
        let req = IntroduceRequest {
            cookie: [4; COOKIE_LEN],
            rp_identity: [5; 32],
            rp_link_key: LinkKey([6; 32]),
            rp_addr: "[::1]:9001".parse().unwrap(),
            onionskin: vec![7; crate::ntor::CLIENT_LEN],
            pow: Some(Pow {
                effort: 3,
                seed_head: [1, 2, 3, 4],
                nonce: [5; 16],
            }),
        };
        let sealed = seal(&mut rng, &req, &[8; 32], &enc_pub, &[9; 32]).unwrap();
        assert_eq!(sealed.len(), ENCRYPTED_LEN);
        let (got, e) = open(&enc, &[8; 32], &[9; 32], &sealed).unwrap();
        assert_eq!(got, req);
        assert_eq!(e[..], sealed[..32]);
        assert!(
            open(&enc, &[8; 32], &[10; 32], &sealed).is_err(),
            "wrong subcredential"
        );
        assert!(
            open(&enc, &[11; 32], &[9; 32], &sealed).is_err(),
            "another introduction"
        );
        for i in [0, 40, ENCRYPTED_LEN - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(open(&enc, &[8; 32], &[9; 32], &bad).is_err());
        }
        assert!(open(&enc, &[8; 32], &[9; 32], &sealed[1..]).is_err());
    }
}
