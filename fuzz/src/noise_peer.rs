//! Snow with Allium's primitives and a seeded RNG: the honest other side
//! of a link handshake, whose messages carry fuzzer-chosen payloads.
//! (The same choice of primitives as `proto/src/link/noise.rs`, which is
//! private to its crate.)

use allium_proto::aead::{Key, TAG_LEN, whole};
use chacha20::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use snow::HandshakeState;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use x25519_dalek::{PublicKey, StaticSecret};

struct Resolver(u64);

struct SeededRandom(ChaCha20Rng);
impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

#[derive(Default)]
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
        Ok(())
    }
    fn pubkey(&self) -> &[u8] {
        &self.pubkey
    }
    fn privkey(&self) -> &[u8] {
        &self.privkey
    }
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let p: [u8; 32] = pubkey[..32].try_into().map_err(|_| snow::Error::Dh)?;
        let s = StaticSecret::from(self.privkey).diffie_hellman(&PublicKey::from(p));
        out[..32].copy_from_slice(s.as_bytes());
        Ok(())
    }
}

#[derive(Default)]
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
        Some(Box::new(SeededRandom(ChaCha20Rng::seed_from_u64(self.0))))
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

/// A handshake state for `params`, as `proto/src/link/noise.rs` makes one.
pub fn handshake(
    seed: u64,
    params: &str,
    local: Option<&[u8; 32]>,
    remote: Option<&[u8; 32]>,
    initiator: bool,
) -> HandshakeState {
    let p = params.parse().expect("valid Noise parameters");
    let mut b = snow::Builder::with_resolver(p, Box::new(Resolver(seed)))
        .prologue(allium_proto::link::PROLOGUE)
        .expect("a prologue");
    if let Some(k) = local {
        b = b.local_private_key(k).expect("a local key");
    }
    if let Some(k) = remote {
        b = b.remote_public_key(k).expect("a remote key");
    }
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .expect("a handshake state")
}
