//! Snow on this crate's primitives: X25519, AES-256-GCM (our
//! [`crate::aead`]), SHA-256, and a ChaCha20 RNG seeded from the caller's RNG.
//! Nothing outside [`crate::link`] sees snow, except the hidden
//! `link::NoiseResolver` through which a test runs published Noise
//! vectors on these primitives.

use chacha20::ChaCha20Rng;
use rand_core::{CryptoRng, Rng, SeedableRng};
use sha2::{Digest, Sha256};
use snow::HandshakeState;
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Error;
use crate::aead::{Key, TAG_LEN, whole};

use super::PROLOGUE;

pub(super) fn snow_err(e: snow::Error) -> Error {
    Error::Link(e.to_string())
}

/// Hands snow our primitives.
pub struct Resolver {
    seed: [u8; 32],
}

impl Resolver {
    pub fn new(rng: &mut impl CryptoRng) -> Self {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Resolver { seed }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.seed.zeroize();
    }
}

struct SeededRandom(ChaCha20Rng);
impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

#[derive(Default, Zeroize, ZeroizeOnDrop)]
struct X25519 {
    privkey: [u8; 32],
    pubkey: [u8; 32],
}

impl Dh for X25519 {
    fn name(&self) -> &'static str {
        "25519"
    }
    fn pub_len(&self) -> usize {
        32
    }
    fn priv_len(&self) -> usize {
        32
    }
    fn set(&mut self, privkey: &[u8]) {
        self.privkey.copy_from_slice(&privkey[..32]);
        self.pubkey = PublicKey::from(&StaticSecret::from(self.privkey)).to_bytes();
    }
    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut k = [0u8; 32];
        rng.try_fill_bytes(&mut k)?;
        self.set(&k);
        k.zeroize();
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.pubkey
    }
    fn privkey(&self) -> &[u8] {
        &self.privkey
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        // snow passes its fixed-size key buffer: the key is the first 32 bytes.
        let p: [u8; 32] = pubkey
            .get(..32)
            .and_then(|k| k.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let s = StaticSecret::from(self.privkey).diffie_hellman(&PublicKey::from(p));
        if !s.was_contributory() {
            return Err(snow::Error::Dh);
        }
        out[..32].copy_from_slice(s.as_bytes());
        Ok(())
    }
}

#[derive(Default, Zeroize, ZeroizeOnDrop)]
struct AesGcm {
    key: [u8; 32],
}

impl Cipher for AesGcm {
    fn name(&self) -> &'static str {
        "AESGCM"
    }
    fn set(&mut self, key: &[u8; 32]) {
        self.key = *key;
    }
    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let n = plaintext.len();
        out[..n].copy_from_slice(plaintext);
        let tag = whole::seal(&Key::new(&self.key), nonce, authtext, &mut out[..n]);
        out[n..n + TAG_LEN].copy_from_slice(&tag);
        n + TAG_LEN
    }
    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let n = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(snow::Error::Decrypt)?;
        out[..n].copy_from_slice(&ciphertext[..n]);
        let tag: &[u8; TAG_LEN] = ciphertext[n..]
            .try_into()
            .map_err(|_| snow::Error::Decrypt)?;
        if whole::open(&Key::new(&self.key), nonce, authtext, &mut out[..n], tag) {
            Ok(n)
        } else {
            out[..n].zeroize();
            Err(snow::Error::Decrypt)
        }
    }
}

#[derive(Default)]
struct Sha256Hash(Sha256);

impl Hash for Sha256Hash {
    fn name(&self) -> &'static str {
        "SHA256"
    }
    fn block_len(&self) -> usize {
        64
    }
    fn hash_len(&self) -> usize {
        32
    }
    fn reset(&mut self) {
        self.0 = Sha256::new();
    }
    fn input(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    fn result(&mut self, out: &mut [u8]) {
        let h = std::mem::take(&mut self.0).finalize();
        out[..32].copy_from_slice(&h);
    }
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(ChaCha20Rng::from_seed(self.seed))))
    }
    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| Box::new(X25519::default()) as Box<dyn Dh>)
    }
    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        matches!(choice, HashChoice::SHA256)
            .then(|| Box::new(Sha256Hash::default()) as Box<dyn Hash>)
    }
    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        matches!(choice, CipherChoice::AESGCM)
            .then(|| Box::new(AesGcm::default()) as Box<dyn Cipher>)
    }
}

/// A handshake state for `params` (`Noise_NK_...` or `Noise_XK_...`).
pub(super) fn handshake(
    rng: &mut impl CryptoRng,
    params: &str,
    local: Option<&[u8; 32]>,
    remote: Option<&[u8; 32]>,
    initiator: bool,
) -> Result<HandshakeState, Error> {
    let p: NoiseParams = params.parse().map_err(snow_err)?;
    let mut b = snow::Builder::with_resolver(p, Box::new(Resolver::new(rng)))
        .prologue(PROLOGUE)
        .map_err(snow_err)?;
    if let Some(k) = local {
        b = b.local_private_key(k).map_err(snow_err)?;
    }
    if let Some(k) = remote {
        b = b.remote_public_key(k).map_err(snow_err)?;
    }
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .map_err(snow_err)
}
