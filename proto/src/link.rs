//! The link layer: Noise over TCP (`doc/protocol.md` section "Links").
//!
//! The initiator first sends one byte naming the pattern: [`LINK_NK`] (a
//! client to its guard: the client stays anonymous) or [`LINK_XK`] (relay to
//! relay). Every message after that, handshake and transport, is a frame:
//! `len u16 (big endian) | noise message[len]`. A transport message's
//! plaintext is 1 to [`MAX_CELLS_PER_FRAME`] whole cells, so the link's
//! AEAD is paid once per batch.
//!
//! In XK the initiator's third handshake message carries
//! `identity[32] | sig[64]`, an Ed25519 signature by its relay identity over
//! `"allium link xk v1\0" | h | s`, where `h` is the Noise handshake hash
//! before that message and `s` the initiator's static key: this binds the
//! link key to the identity (the same pair the relay's signed descriptor
//! publishes) and to this session.
//!
//! Snow runs with `default-features = false` on the primitives of this crate
//! through [`Resolver`], seeded from the caller's RNG.

use chacha20::ChaCha20Rng;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::{CryptoRng, Rng, SeedableRng};
use sha2::{Digest, Sha256};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::CryptoResolver;
use snow::types::{Cipher, Dh, Hash, Random};
use snow::{HandshakeState, TransportState};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Error;
use crate::aead::{Aead, TAG_LEN};
use crate::cell::{CELL_LEN, Cell};

pub const LINK_NK: u8 = 1;
pub const LINK_XK: u8 = 2;
pub const NK_PARAMS: &str = "Noise_NK_25519_ChaChaPoly_SHA256";
pub const XK_PARAMS: &str = "Noise_XK_25519_ChaChaPoly_SHA256";
pub const PROLOGUE: &[u8] = b"allium link v1";
pub const XK_AUTH_DOMAIN: &[u8] = b"allium link xk v1\0";
pub const XK_AUTH_LEN: usize = 96;
pub const MAX_FRAME: usize = 65535;
pub const MAX_CELLS_PER_FRAME: usize = (MAX_FRAME - TAG_LEN) / CELL_LEN;

fn snow_err(e: snow::Error) -> Error {
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
struct ChaChaPoly {
    key: [u8; 32],
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }
    fn set(&mut self, key: &[u8; 32]) {
        self.key = *key;
    }
    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let n = plaintext.len();
        out[..n].copy_from_slice(plaintext);
        let tag = Aead::new(&self.key, nonce).seal(authtext, &mut out[..n]);
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
        if Aead::new(&self.key, nonce).open(authtext, &mut out[..n], &ciphertext[n..]) {
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
        matches!(choice, CipherChoice::ChaChaPoly)
            .then(|| Box::new(ChaChaPoly::default()) as Box<dyn Cipher>)
    }
}

fn builder(rng: &mut impl CryptoRng, params: &str) -> Result<snow::Builder<'static>, Error> {
    let p: NoiseParams = params.parse().map_err(snow_err)?;
    Ok(snow::Builder::with_resolver(
        p,
        Box::new(Resolver::new(rng)),
    ))
}

/// Client side of NK: `guard_link_key` comes from the consensus.
pub fn nk_initiator(
    rng: &mut impl CryptoRng,
    guard_link_key: &[u8; 32],
) -> Result<HandshakeState, Error> {
    builder(rng, NK_PARAMS)?
        .prologue(PROLOGUE)
        .and_then(|b| b.remote_public_key(guard_link_key))
        .and_then(|b| b.build_initiator())
        .map_err(snow_err)
}

/// Relay side of either pattern.
pub fn responder(
    rng: &mut impl CryptoRng,
    kind: u8,
    link_secret: &[u8; 32],
) -> Result<HandshakeState, Error> {
    let params = match kind {
        LINK_NK => NK_PARAMS,
        LINK_XK => XK_PARAMS,
        k => return Err(Error::Link(format!("unknown link kind {k}"))),
    };
    builder(rng, params)?
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(link_secret))
        .and_then(|b| b.build_responder())
        .map_err(snow_err)
}

/// Relay-to-relay initiator.
pub fn xk_initiator(
    rng: &mut impl CryptoRng,
    link_secret: &[u8; 32],
    peer_link_key: &[u8; 32],
) -> Result<HandshakeState, Error> {
    builder(rng, XK_PARAMS)?
        .prologue(PROLOGUE)
        .and_then(|b| b.local_private_key(link_secret))
        .and_then(|b| b.remote_public_key(peer_link_key))
        .and_then(|b| b.build_initiator())
        .map_err(snow_err)
}

fn xk_auth_msg(h: &[u8], s: &[u8; 32]) -> Vec<u8> {
    [XK_AUTH_DOMAIN, h, s].concat()
}

/// The payload of XK message 3, computed just before writing it.
pub fn xk_auth_payload(hs: &HandshakeState, identity: &SigningKey, link_pub: &[u8; 32]) -> Vec<u8> {
    let sig = identity.sign(&xk_auth_msg(hs.get_handshake_hash(), link_pub));
    [
        &identity.verifying_key().to_bytes()[..],
        &sig.to_bytes()[..],
    ]
    .concat()
}

/// Check XK message 3's payload. `h` is the responder's handshake hash
/// before reading message 3. Returns the initiator's identity.
pub fn xk_check_auth(h: &[u8], remote_static: &[u8], payload: &[u8]) -> Result<[u8; 32], Error> {
    if payload.len() != XK_AUTH_LEN {
        return Err(Error::Link("XK auth payload has the wrong length".into()));
    }
    let s: [u8; 32] = remote_static
        .try_into()
        .map_err(|_| Error::Link("no remote static".into()))?;
    let id: [u8; 32] = payload[..32].try_into().expect("checked length");
    let sig: [u8; 64] = payload[32..].try_into().expect("checked length");
    let vk = VerifyingKey::from_bytes(&id).map_err(|_| Error::Link("bad identity key".into()))?;
    vk.verify_strict(
        &xk_auth_msg(h, &s),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| Error::Link("identity signature over the link key does not verify".into()))?;
    Ok(id)
}

/// Link transport after the handshake: seals and opens batches of cells.
pub struct LinkTransport {
    ts: TransportState,
    scratch: Vec<u8>,
}

impl LinkTransport {
    pub fn new(hs: HandshakeState) -> Result<Self, Error> {
        Ok(LinkTransport {
            ts: hs.into_transport_mode().map_err(snow_err)?,
            scratch: Vec::new(),
        })
    }

    /// Append one frame (`len | noise message`) carrying `cells` to `out`.
    pub fn seal_cells(&mut self, cells: &[Cell], out: &mut Vec<u8>) -> Result<(), Error> {
        if cells.is_empty() || cells.len() > MAX_CELLS_PER_FRAME {
            return Err(Error::Link(format!("{} cells in one frame", cells.len())));
        }
        self.scratch.resize(cells.len() * CELL_LEN, 0);
        for (c, chunk) in cells.iter().zip(self.scratch.chunks_exact_mut(CELL_LEN)) {
            c.encode_into(chunk);
        }
        let start = out.len();
        out.resize(start + 2 + self.scratch.len() + TAG_LEN, 0);
        let n = self
            .ts
            .write_message(&self.scratch, &mut out[start + 2..])
            .map_err(snow_err)?;
        out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
        out.truncate(start + 2 + n);
        Ok(())
    }

    /// Open one frame's noise message and append its cells to `out`.
    pub fn open_cells(&mut self, msg: &[u8], out: &mut Vec<Cell>) -> Result<(), Error> {
        self.scratch.resize(msg.len(), 0);
        let n = self
            .ts
            .read_message(msg, &mut self.scratch)
            .map_err(snow_err)?;
        if n == 0 || n % CELL_LEN != 0 {
            return Err(Error::Link(format!(
                "frame plaintext of {n} bytes is not whole cells"
            )));
        }
        for chunk in self.scratch[..n].chunks_exact(CELL_LEN) {
            out.push(Cell::decode(chunk)?);
        }
        Ok(())
    }
}

/// Write a handshake message as a frame.
pub fn handshake_frame(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; 2 + 1024];
    let n = hs.write_message(payload, &mut buf[2..]).map_err(snow_err)?;
    buf[..2].copy_from_slice(&(n as u16).to_be_bytes());
    buf.truncate(2 + n);
    Ok(buf)
}

/// Read a handshake message (without its length prefix); returns the payload.
pub fn read_handshake(hs: &mut HandshakeState, msg: &[u8]) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; msg.len()];
    let n = hs.read_message(msg, &mut buf).map_err(snow_err)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::CellCmd;

    fn run(
        mut i: HandshakeState,
        mut r: HandshakeState,
        id: Option<(&SigningKey, [u8; 32])>,
    ) -> Result<(LinkTransport, LinkTransport, Option<[u8; 32]>), Error> {
        let mut seen = None;
        let m1 = handshake_frame(&mut i, &[])?;
        read_handshake(&mut r, &m1[2..])?;
        let m2 = handshake_frame(&mut r, &[])?;
        read_handshake(&mut i, &m2[2..])?;
        if let Some((k, s)) = id {
            let p = xk_auth_payload(&i, k, &s);
            let m3 = handshake_frame(&mut i, &p)?;
            let h = r.get_handshake_hash().to_vec();
            let got = read_handshake(&mut r, &m3[2..])?;
            seen = Some(xk_check_auth(&h, r.get_remote_static().unwrap(), &got)?);
        }
        Ok((LinkTransport::new(i)?, LinkTransport::new(r)?, seen))
    }

    #[test]
    fn nk_and_xk_carry_batches() {
        let mut rng = rand::rng();
        let resp_secret = [3u8; 32];
        let resp_pub = PublicKey::from(&StaticSecret::from(resp_secret)).to_bytes();
        let (mut a, mut b, _) = run(
            nk_initiator(&mut rng, &resp_pub).unwrap(),
            responder(&mut rng, LINK_NK, &resp_secret).unwrap(),
            None,
        )
        .unwrap();
        let cells: Vec<Cell> = (0..MAX_CELLS_PER_FRAME as u32)
            .map(|i| Cell::new(i, CellCmd::RELAY, &[i as u8; 9]).unwrap())
            .collect();
        let mut frame = vec![];
        a.seal_cells(&cells, &mut frame).unwrap();
        assert!(frame.len() <= MAX_FRAME + 2);
        let mut got = vec![];
        b.open_cells(&frame[2..], &mut got).unwrap();
        assert_eq!(got.len(), cells.len());
        assert_eq!(got[5].payload[..], cells[5].payload[..]);
        // A tampered frame fails.
        frame.clear();
        b.seal_cells(&cells[..2], &mut frame).unwrap();
        frame[10] ^= 1;
        assert!(a.open_cells(&frame[2..], &mut got).is_err());

        let init_secret = [5u8; 32];
        let init_pub = PublicKey::from(&StaticSecret::from(init_secret)).to_bytes();
        let ident = SigningKey::from_bytes(&[6; 32]);
        let (_, _, seen) = run(
            xk_initiator(&mut rng, &init_secret, &resp_pub).unwrap(),
            responder(&mut rng, LINK_XK, &resp_secret).unwrap(),
            Some((&ident, init_pub)),
        )
        .unwrap();
        assert_eq!(seen, Some(ident.verifying_key().to_bytes()));
        // Claiming a link key that is not ours fails the binding.
        assert!(
            run(
                xk_initiator(&mut rng, &init_secret, &resp_pub).unwrap(),
                responder(&mut rng, LINK_XK, &resp_secret).unwrap(),
                Some((&ident, [9; 32])),
            )
            .is_err()
        );
        // NK to the wrong static key fails.
        assert!(
            run(
                nk_initiator(&mut rng, &init_pub).unwrap(),
                responder(&mut rng, LINK_NK, &resp_secret).unwrap(),
                None,
            )
            .is_err()
        );
    }
}
