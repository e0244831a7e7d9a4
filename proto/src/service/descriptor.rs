//! Service descriptors (doc/protocol.md section 11.3).
//!
//! What a service files on its directories each period: signed by its
//! blinded key, so a directory can check who may replace it, and
//! encrypted to those who know the address, so a directory learns neither
//! the service nor its introduction points.
//!
//! ```text
//! SignedDocument { body: postcard(ServiceDescriptor), signatures: [ by the blinded key ] }
//!   domain "allium service descriptor v1\0"
//! credential    = SHA-256("allium service credential" | A)
//! subcredential = SHA-256("allium service subcredential" | credential | A')
//! key           = HKDF-SHA256(salt, A' | subcredential | u64(revision), "allium service descriptor key")[0..32]
//! encrypted     = AES-256-GCM(key, nonce 0, ad = A', postcard(AuthLayer)) | tag
//! AuthLayer     = { ephemeral, clients: [16·k entries], inner: the inner layer }
//! inner key     = HKDF-SHA256(salt, A' | subcredential | u64(revision) | cookie, "allium service descriptor inner key")
//! inner         = AES-256-GCM(inner key, nonce 0, ad = A', postcard(ServiceInfo) zero-padded to 1024) | tag
//! ```
//!
//! `cookie` is zero for a service open to anyone who knows its address;
//! a service that authorizes clients picks a random one and gives it to
//! each client in an entry only that client's key opens ([`super::auth`]).
//!
//! ```
//! use allium_proto::service::descriptor::{IntroPoint, ServiceInfo, UnverifiedServiceDescriptor, build};
//! use allium_proto::service::{ServiceAddress, TimePeriod};
//! use ed25519_dalek::SigningKey;
//! let identity = SigningKey::from_bytes(&[7; 32]);
//! let address = ServiceAddress::from_key(&identity.verifying_key().to_bytes()).unwrap();
//! let period = TimePeriod::at(1_800_000_000, 3600);
//! let info = ServiceInfo {
//!     intro_points: vec![IntroPoint { relay: [1; 32], auth_key: [2; 32], enc_key: [3; 32] }],
//!     pow: None,
//! };
//! let doc = build(&identity, period, 1, &info, &[], &mut rand::rng());
//! // A directory checks the signature; only a client with the address reads it.
//! let d = UnverifiedServiceDescriptor::parse(&doc).unwrap().verify().unwrap();
//! assert_eq!(d.blinded_key(), address.blinded(period));
//! assert_eq!(d.decrypt(&address, None).unwrap(), info);
//! ```

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use x25519_dalek::{PublicKey, StaticSecret};

use super::auth::{ClientAuthKey, ClientAuthSecret};
use super::{BlindedKey, BlindedSigningKey, ServiceAddress, TimePeriod};
use crate::Error;
use crate::aead;
use crate::doc::{DocSignature, Sig, SignedDocument, decode_exact};

pub const DOMAIN: &[u8] = b"allium service descriptor v1\0";
/// The largest signed descriptor a directory stores.
pub const MAX_LEN: usize = 8 * 1024;
/// Introduction points a descriptor lists, at most.
pub const MAX_INTRO_POINTS: usize = 10;
/// Contents are zero-padded to this many bytes (the largest, 10
/// introduction points, take 961).
pub const PADDED_LEN: usize = 1024;
const CREDENTIAL_DOMAIN: &[u8] = b"allium service credential";
const SUBCREDENTIAL_DOMAIN: &[u8] = b"allium service subcredential";
const KEY_INFO: &[u8] = b"allium service descriptor key";
const INNER_KEY_INFO: &[u8] = b"allium service descriptor inner key";
const ENTRY_INFO: &[u8] = b"allium service client entry";
/// Client entries come in blocks of this many (made up to it with random
/// ones), so a descriptor tells the number of authorized clients only to
/// the nearest 16, and an open service's looks like one with up to 16.
pub const AUTH_BLOCK: usize = 16;
/// Clients a service can authorize, at most (the largest descriptor then
/// fits in [`MAX_LEN`]).
pub const MAX_AUTH_CLIENTS: usize = 160;

/// The signed, readable part: what every directory sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDescriptor {
    pub blinded_key: BlindedKey,
    /// The period it is for: its number and length.
    pub period: u64,
    pub period_length: u64,
    /// Higher replaces lower at a directory.
    pub revision: u64,
    pub salt: [u8; 16],
    /// [`ServiceInfo`], encrypted, with its tag.
    pub encrypted: Vec<u8>,
}

/// The outer layer's contents: the inner layer, and the entries that give
/// authorized clients its cookie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthLayer {
    /// A fresh X25519 key for this descriptor's entries.
    pub ephemeral: [u8; 32],
    /// 16·k entries, sorted by `id`.
    pub clients: Vec<AuthEntry>,
    /// The padded [`ServiceInfo`], encrypted under the cookie, with its tag.
    pub inner: Vec<u8>,
}

/// The cookie, for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthEntry {
    pub id: [u8; 8],
    /// The cookie XOR a pad only this client can compute.
    pub cookie: [u8; 32],
}

/// Why a client cannot read a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Invalid(#[from] Error),
    #[error("the service admits only clients it authorized, and this client has no key for it")]
    AuthMissing,
    #[error("the service admits only clients it authorized, and does not list this client's key")]
    AuthWrong,
}

/// What the service tells its clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub intro_points: Vec<IntroPoint>,
    /// The service's puzzle for introductions (section 11.5), if it has
    /// one.
    pub pow: Option<super::pow::PowParams>,
}

/// One introduction point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntroPoint {
    /// The relay's identity (it must be in the client's consensus).
    pub relay: [u8; 32],
    /// The key the service's introduction circuit is known by there: not
    /// the service's identity, so the relay cannot tell whose it is.
    pub auth_key: [u8; 32],
    /// The service's X25519 key for clients' handshakes through this point.
    pub enc_key: [u8; 32],
}

/// The subcredential of a service for a period: only those who know the
/// address can compute it.
pub fn subcredential(identity: &[u8; 32], blinded: &BlindedKey) -> [u8; 32] {
    let credential = Sha256::new()
        .chain_update(CREDENTIAL_DOMAIN)
        .chain_update(identity)
        .finalize();
    Sha256::new()
        .chain_update(SUBCREDENTIAL_DOMAIN)
        .chain_update(credential)
        .chain_update(blinded.0)
        .finalize()
        .into()
}

/// The key of the outer layer (no cookie) or of the inner one.
fn key(
    blinded: &BlindedKey,
    subcred: &[u8; 32],
    revision: u64,
    salt: &[u8; 16],
    cookie: Option<&[u8; 32]>,
) -> aead::Key {
    let mut ikm = [&blinded.0[..], subcred, &revision.to_be_bytes()].concat();
    ikm.extend_from_slice(cookie.map_or(&[][..], |c| &c[..]));
    let info = if cookie.is_some() {
        INNER_KEY_INFO
    } else {
        KEY_INFO
    };
    let mut k = [0u8; aead::KEY_LEN];
    Hkdf::<Sha256>::new(Some(salt), &ikm)
        .expand(info, &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    aead::Key::new(&k)
}

/// A client's entry id and pad, from the secret it shares with the
/// descriptor's ephemeral key.
fn entry_keys(
    subcred: &[u8; 32],
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    client: &ClientAuthKey,
) -> ([u8; 8], [u8; 32]) {
    let ikm = [&subcred[..], shared, ephemeral, client.as_bytes()].concat();
    let mut out = [0u8; 40];
    Hkdf::<Sha256>::new(None, &ikm)
        .expand(ENTRY_INFO, &mut out)
        .expect("40 bytes is a valid HKDF-SHA256 length");
    let mut id = [0u8; 8];
    let mut pad = [0u8; 32];
    id.copy_from_slice(&out[..8]);
    pad.copy_from_slice(&out[8..]);
    (id, pad)
}

fn xor32(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The signed descriptor of the service `identity` for `period`, revision
/// `revision` (the seconds since the period before it began, so that
/// revisions rise from the first filing, halfway through that period, and
/// say nothing across periods), listing `info`, for
/// anyone who knows the address if `authorized` is empty, else only for
/// the clients whose keys it lists (at most [`MAX_AUTH_CLIENTS`]; any
/// more are left out).
///
/// The randomness is drawn in this order: the salt (16 bytes), the
/// ephemeral secret (32), the cookie (32, if `authorized` is not empty),
/// then 40 for each made-up entry.
pub fn build(
    identity: &ed25519_dalek::SigningKey,
    period: TimePeriod,
    revision: u64,
    info: &ServiceInfo,
    authorized: &[ClientAuthKey],
    rng: &mut impl rand_core::CryptoRng,
) -> Vec<u8> {
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    let blinded = BlindedSigningKey::derive(identity, period).public();
    let subcred = subcredential(&identity.verifying_key().to_bytes(), &blinded);
    let layer = auth_layer(
        &blinded,
        &subcred,
        revision,
        &salt,
        &padded(info),
        authorized,
        rng,
    );
    build_raw(identity, period, revision, &layer, salt)
}

/// The outer layer's contents around `inner` (padded contents, as
/// [`padded`] makes them, or any bytes for tests), for the clients
/// `authorized` (anyone who knows the address if empty).
pub fn auth_layer(
    blinded: &BlindedKey,
    subcred: &[u8; 32],
    revision: u64,
    salt: &[u8; 16],
    inner: &[u8],
    authorized: &[ClientAuthKey],
    rng: &mut impl rand_core::CryptoRng,
) -> Vec<u8> {
    let authorized = &authorized[..authorized.len().min(MAX_AUTH_CLIENTS)];
    let mut secret = zeroize::Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut secret[..]);
    let secret = StaticSecret::from(*secret);
    let ephemeral = PublicKey::from(&secret).to_bytes();
    let mut cookie = zeroize::Zeroizing::new([0u8; 32]);
    if !authorized.is_empty() {
        rng.fill_bytes(&mut cookie[..]);
    }
    // (A key of small order would share the zero secret with anyone:
    // parsing refuses one, and none gets an entry here either.)
    let mut clients: Vec<AuthEntry> = authorized
        .iter()
        .filter_map(|k| {
            let shared = secret.diffie_hellman(&PublicKey::from(*k.as_bytes()));
            shared.was_contributory().then(|| {
                let (id, pad) = entry_keys(subcred, shared.as_bytes(), &ephemeral, k);
                AuthEntry {
                    id,
                    cookie: xor32(&cookie, &pad),
                }
            })
        })
        .collect();
    let n = authorized.len().max(1).div_ceil(AUTH_BLOCK) * AUTH_BLOCK;
    while clients.len() < n {
        let mut e = AuthEntry {
            id: [0; 8],
            cookie: [0; 32],
        };
        rng.fill_bytes(&mut e.id);
        rng.fill_bytes(&mut e.cookie);
        clients.push(e);
    }
    clients.sort_by_key(|e| e.id);
    let mut sealed = inner.to_vec();
    let k = key(blinded, subcred, revision, salt, Some(&cookie));
    let tag = aead::whole::seal(&k, 0, &blinded.0, &mut sealed);
    sealed.extend_from_slice(&tag);
    postcard::to_stdvec(&AuthLayer {
        ephemeral,
        clients,
        inner: sealed,
    })
    .expect("encoding to a Vec cannot fail")
}

/// Open `sealed` (ciphertext then tag) under `k` with `ad`.
fn open(k: &aead::Key, ad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let n = sealed.len().checked_sub(aead::TAG_LEN)?;
    let mut buf = sealed[..n].to_vec();
    let mut tag = [0u8; aead::TAG_LEN];
    tag.copy_from_slice(&sealed[n..]);
    aead::whole::open(k, 0, ad, &mut buf, &tag).then_some(buf)
}

/// The contents of `info`: its encoding, zero-padded to [`PADDED_LEN`] so
/// that the size does not tell how many introduction points it lists.
pub fn padded(info: &ServiceInfo) -> Vec<u8> {
    let mut v = postcard::to_stdvec(info).expect("encoding to a Vec cannot fail");
    if v.len() < PADDED_LEN {
        v.resize(PADDED_LEN, 0);
    }
    v
}

/// [`build`] with the outer layer's contents given as bytes (made by
/// [`auth_layer`], or any bytes for tests of what a client does with
/// them) and the salt given: it must be fresh for each descriptor, or the
/// encryption's nonce repeats.
pub fn build_raw(
    identity: &ed25519_dalek::SigningKey,
    period: TimePeriod,
    revision: u64,
    contents: &[u8],
    salt: [u8; 16],
) -> Vec<u8> {
    let signer = BlindedSigningKey::derive(identity, period);
    let blinded = signer.public();
    let subcred = subcredential(&identity.verifying_key().to_bytes(), &blinded);
    let mut buf = contents.to_vec();
    let k = key(&blinded, &subcred, revision, &salt, None);
    let tag = aead::whole::seal(&k, 0, &blinded.0, &mut buf);
    buf.extend_from_slice(&tag);
    let d = ServiceDescriptor {
        blinded_key: blinded,
        period: period.number,
        period_length: period.length,
        revision,
        salt,
        encrypted: buf,
    };
    let mut doc =
        SignedDocument::new(postcard::to_stdvec(&d).expect("encoding to a Vec cannot fail"));
    let sig = signer.sign(&[DOMAIN, &doc.body].concat());
    doc.signatures.push(DocSignature {
        key: blinded.0,
        sig: Sig(sig.to_bytes()),
    });
    doc.to_bytes()
}

/// A descriptor as received: parsed, not yet checked.
pub struct UnverifiedServiceDescriptor {
    doc: SignedDocument,
    desc: ServiceDescriptor,
}

/// A descriptor whose blinded key signed it.
#[derive(Clone, Debug)]
pub struct VerifiedServiceDescriptor {
    desc: ServiceDescriptor,
    bytes: Vec<u8>,
}

impl UnverifiedServiceDescriptor {
    pub fn parse(b: &[u8]) -> Result<Self, Error> {
        let doc = SignedDocument::parse("service descriptor", b, MAX_LEN)?;
        let desc: ServiceDescriptor = decode_exact("service descriptor body", &doc.body)?;
        Ok(UnverifiedServiceDescriptor { doc, desc })
    }

    /// The blinded key it claims to be filed under (not yet checked).
    pub fn blinded_key(&self) -> BlindedKey {
        self.desc.blinded_key
    }

    /// Check that the descriptor carries exactly one signature, by the
    /// blinded key it is filed under.
    pub fn verify(self) -> Result<VerifiedServiceDescriptor, Error> {
        match self.doc.signatures.as_slice() {
            [s] if s.key == self.desc.blinded_key.0 && self.doc.check(DOMAIN, s) => {
                Ok(VerifiedServiceDescriptor {
                    bytes: self.doc.to_bytes(),
                    desc: self.desc,
                })
            }
            _ => Err(Error::BadSignature(
                "service descriptor (not signed by the blinded key it is filed under)",
            )),
        }
    }
}

impl VerifiedServiceDescriptor {
    pub fn blinded_key(&self) -> BlindedKey {
        self.desc.blinded_key
    }

    pub fn period(&self) -> TimePeriod {
        TimePeriod {
            number: self.desc.period,
            length: self.desc.period_length,
        }
    }

    pub fn revision(&self) -> u64 {
        self.desc.revision
    }

    /// The signed bytes, as received.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Read the descriptor of the service at `address`: it must be filed
    /// under that service's blinded key for its period, and decrypt, with
    /// `auth` if the service admits only the clients it authorized.
    pub fn decrypt(
        &self,
        address: &ServiceAddress,
        auth: Option<&ClientAuthSecret>,
    ) -> Result<ServiceInfo, ReadError> {
        let blinded = address.blinded(self.period());
        if blinded != self.desc.blinded_key {
            return Err(Error::BadSignature(
                "service descriptor (filed under another service's key)",
            )
            .into());
        }
        let subcred = subcredential(address.key(), &blinded);
        let d = &self.desc;
        let outer = open(
            &key(&blinded, &subcred, d.revision, &d.salt, None),
            &blinded.0,
            &d.encrypted,
        )
        .ok_or(Error::BadSignature(
            "service descriptor (its contents do not decrypt)",
        ))?;
        let layer: AuthLayer = decode_exact("service descriptor contents", &outer)?;
        let n = layer.clients.len();
        if n == 0 || !n.is_multiple_of(AUTH_BLOCK) || n > MAX_AUTH_CLIENTS {
            return Err(Error::malformed(
                "service descriptor",
                format!("{n} client entries (16, 32, ... {MAX_AUTH_CLIENTS})"),
            )
            .into());
        }
        if layer.inner.len() != PADDED_LEN + aead::TAG_LEN {
            return Err(Error::malformed(
                "service descriptor",
                format!(
                    "an inner layer of {} bytes, not {}",
                    layer.inner.len(),
                    PADDED_LEN + aead::TAG_LEN
                ),
            )
            .into());
        }
        let inner = |cookie: &[u8; 32]| {
            let k = key(&blinded, &subcred, d.revision, &d.salt, Some(cookie));
            open(&k, &blinded.0, &layer.inner)
        };
        // This client's entry, if the service lists it.
        if let Some(secret) = auth {
            let shared = secret
                .secret()
                .diffie_hellman(&PublicKey::from(layer.ephemeral));
            if shared.was_contributory() {
                let (id, pad) = entry_keys(
                    &subcred,
                    shared.as_bytes(),
                    &layer.ephemeral,
                    &secret.public(),
                );
                if let Some(e) = layer.clients.iter().find(|e| e.id == id) {
                    let cookie = zeroize::Zeroizing::new(xor32(&e.cookie, &pad));
                    return match inner(&cookie) {
                        Some(buf) => Ok(read_info(&buf)?),
                        None => Err(ReadError::AuthWrong),
                    };
                }
            }
        }
        match inner(&[0; 32]) {
            Some(buf) => Ok(read_info(&buf)?),
            None if auth.is_some() => Err(ReadError::AuthWrong),
            None => Err(ReadError::AuthMissing),
        }
    }
}

/// The introduction points in the inner layer's plaintext.
fn read_info(buf: &[u8]) -> Result<ServiceInfo, Error> {
    let (info, padding): (ServiceInfo, &[u8]) = postcard::take_from_bytes(buf)
        .map_err(|e| Error::malformed("service descriptor contents", e.to_string()))?;
    if padding.iter().any(|b| *b != 0)
        || postcard::to_stdvec(&info).ok().as_deref() != Some(&buf[..buf.len() - padding.len()])
    {
        return Err(Error::malformed(
            "service descriptor contents",
            "not in canonical encoding followed by zero padding",
        ));
    }
    if info.intro_points.is_empty() || info.intro_points.len() > MAX_INTRO_POINTS {
        return Err(Error::malformed(
            "service descriptor",
            format!(
                "{} introduction points (1 to {MAX_INTRO_POINTS})",
                info.intro_points.len()
            ),
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use std::collections::HashSet;

    fn identity(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    fn address(i: u8) -> ServiceAddress {
        ServiceAddress::from_key(&identity(i).verifying_key().to_bytes()).unwrap()
    }

    fn info(n: usize) -> ServiceInfo {
        ServiceInfo {
            intro_points: (0..n)
                .map(|i| IntroPoint {
                    relay: [i as u8; 32],
                    auth_key: [0xa0 + i as u8; 32],
                    enc_key: [0xe0 + i as u8; 32],
                })
                .collect(),
            // The largest puzzle parameters, for the sizes.
            pow: Some(super::super::pow::PowParams {
                seed: [0x5e; 32],
                effort: u32::MAX,
            }),
        }
    }

    fn period() -> TimePeriod {
        TimePeriod::at(1_800_000_000, 3600)
    }

    /// A descriptor of service 7, open to all, whose inner layer's
    /// plaintext is `inner` (padded to its size).
    fn with_inner(inner: &[u8]) -> Vec<u8> {
        let mut inner = inner.to_vec();
        inner.resize(inner.len().max(PADDED_LEN), 0);
        let blinded = address(7).blinded(period());
        let subcred = subcredential(address(7).key(), &blinded);
        let layer = auth_layer(
            &blinded,
            &subcred,
            5,
            &[1; 16],
            &inner,
            &[],
            &mut rand::rng(),
        );
        build_raw(&identity(7), period(), 5, &layer, [1; 16])
    }

    fn read(
        doc: &[u8],
        a: &ServiceAddress,
        auth: Option<&ClientAuthSecret>,
    ) -> Result<ServiceInfo, ReadError> {
        UnverifiedServiceDescriptor::parse(doc)
            .unwrap()
            .verify()
            .unwrap()
            .decrypt(a, auth)
    }

    #[test]
    fn only_authorized_clients_read_a_restricted_descriptor() {
        let clients: Vec<ClientAuthSecret> = (0..3)
            .map(|i| ClientAuthSecret::from_bytes([0x30 + i; 32]))
            .collect();
        let keys: Vec<ClientAuthKey> = clients.iter().map(|c| c.public()).collect();
        let doc = build(&identity(7), period(), 5, &info(3), &keys, &mut rand::rng());
        for c in &clients {
            assert_eq!(read(&doc, &address(7), Some(c)).unwrap(), info(3));
        }
        assert!(matches!(
            read(&doc, &address(7), None),
            Err(ReadError::AuthMissing)
        ));
        let stranger = ClientAuthSecret::from_bytes([0x99; 32]);
        assert!(matches!(
            read(&doc, &address(7), Some(&stranger)),
            Err(ReadError::AuthWrong)
        ));
        // A key does no harm with an open service.
        let open = build(&identity(7), period(), 5, &info(3), &[], &mut rand::rng());
        assert_eq!(read(&open, &address(7), Some(&stranger)).unwrap(), info(3));
        // Up to 16 clients, a restricted descriptor is the size of an open
        // one; then it grows by blocks of 16 entries, up to the limit.
        assert_eq!(doc.len(), open.len());
        let many: Vec<ClientAuthKey> = (0..MAX_AUTH_CLIENTS + 5)
            .map(|i| ClientAuthSecret::from_bytes([i as u8 ^ 0x40; 32]).public())
            .collect();
        let sizes: Vec<usize> = [16, 17, 32, MAX_AUTH_CLIENTS, MAX_AUTH_CLIENTS + 5]
            .iter()
            .map(|&n| {
                build(
                    &identity(7),
                    period(),
                    5,
                    &info(MAX_INTRO_POINTS),
                    &many[..n],
                    &mut rand::rng(),
                )
                .len()
            })
            .collect();
        assert_eq!(sizes[0], open.len());
        assert_eq!(sizes[1], sizes[0] + 16 * 40);
        assert_eq!(sizes[1], sizes[2]);
        assert_eq!(sizes[3], sizes[4], "past the limit, keys are left out");
        assert!(sizes[3] <= MAX_LEN, "{}", sizes[3]);
        let big = build(
            &identity(7),
            period(),
            5,
            &info(1),
            &many[..MAX_AUTH_CLIENTS],
            &mut rand::rng(),
        );
        let last = ClientAuthSecret::from_bytes([(MAX_AUTH_CLIENTS - 1) as u8 ^ 0x40; 32]);
        assert_eq!(read(&big, &address(7), Some(&last)).unwrap(), info(1));
        // Even to a reader with the address, the entries show neither the
        // clients' keys nor the cookie.
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        let blinded = address(7).blinded(period());
        let subcred = subcredential(address(7).key(), &blinded);
        let outer = super::open(
            &key(&blinded, &subcred, 5, &v.desc.salt, None),
            &blinded.0,
            &v.desc.encrypted,
        )
        .unwrap();
        let hay = |needle: &[u8]| outer.windows(needle.len()).any(|w| w == needle);
        assert!(keys.iter().all(|k| !hay(k.as_bytes())));
        let layer: AuthLayer = postcard::from_bytes(&outer).unwrap();
        let cookies: HashSet<[u8; 32]> = layer.clients.iter().map(|e| e.cookie).collect();
        assert_eq!(
            cookies.len(),
            AUTH_BLOCK,
            "each entry wraps the cookie its own way"
        );
        // An entry that is found but whose cookie does not open the inner
        // layer: the wrong key, not an open service.
        let mut bad = layer.clone();
        for e in &mut bad.clients {
            e.cookie[0] ^= 1;
        }
        let tampered = build_raw(
            &identity(7),
            period(),
            5,
            &postcard::to_stdvec(&bad).unwrap(),
            v.desc.salt,
        );
        assert!(matches!(
            read(&tampered, &address(7), Some(&clients[0])),
            Err(ReadError::AuthWrong)
        ));
    }

    #[test]
    fn the_entry_list_must_come_in_blocks_of_sixteen() {
        let blinded = address(7).blinded(period());
        let subcred = subcredential(address(7).key(), &blinded);
        let layer = auth_layer(
            &blinded,
            &subcred,
            5,
            &[1; 16],
            &padded(&info(1)),
            &[],
            &mut rand::rng(),
        );
        let mut l: AuthLayer = postcard::from_bytes(&layer).unwrap();
        assert_eq!(l.clients.len(), AUTH_BLOCK);
        assert!(l.clients.windows(2).all(|w| w[0].id <= w[1].id));
        for n in [0, 15, 17] {
            l.clients.resize(
                n,
                l.clients.first().copied().unwrap_or(AuthEntry {
                    id: [0; 8],
                    cookie: [0; 32],
                }),
            );
            let doc = build_raw(
                &identity(7),
                period(),
                5,
                &postcard::to_stdvec(&l).unwrap(),
                [1; 16],
            );
            assert!(
                matches!(read(&doc, &address(7), None), Err(ReadError::Invalid(_))),
                "{n}"
            );
        }
        // Nor can the inner layer be shorter or longer than its padding.
        let mut l: AuthLayer = postcard::from_bytes(&layer).unwrap();
        l.inner.push(0);
        let doc = build_raw(
            &identity(7),
            period(),
            5,
            &postcard::to_stdvec(&l).unwrap(),
            [1; 16],
        );
        assert!(matches!(
            read(&doc, &address(7), None),
            Err(ReadError::Invalid(_))
        ));
    }

    #[test]
    fn a_client_with_the_address_reads_what_the_service_wrote() {
        let doc = build(&identity(7), period(), 5, &info(3), &[], &mut rand::rng());
        assert!(doc.len() <= MAX_LEN);
        let d = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(d.bytes(), doc);
        assert_eq!(d.revision(), 5);
        assert_eq!(d.period(), period());
        assert_eq!(d.decrypt(&address(7), None).unwrap(), info(3));
        // The largest descriptor fits, and is no larger than the smallest:
        // the size does not tell how many introduction points there are.
        let big = build(
            &identity(7),
            period(),
            5,
            &info(MAX_INTRO_POINTS),
            &[],
            &mut rand::rng(),
        );
        assert!(big.len() <= MAX_LEN, "{}", big.len());
        let small = build(&identity(7), period(), 5, &info(1), &[], &mut rand::rng());
        assert_eq!(big.len(), small.len());
        // Each descriptor gets its own salt.
        assert_ne!(
            doc,
            build(&identity(7), period(), 5, &info(3), &[], &mut rand::rng())
        );
    }

    #[test]
    fn padding_must_be_zeros() {
        let mut contents = padded(&info(2));
        let last = contents.len() - 1;
        contents[last] = 1;
        let doc = with_inner(&contents);
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert!(v.decrypt(&address(7), None).is_err());
        contents[last] = 0;
        let doc = with_inner(&contents);
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(v.decrypt(&address(7), None).unwrap(), info(2));
    }

    #[test]
    fn the_directory_sees_neither_the_address_nor_the_contents() {
        let doc = build(&identity(7), period(), 5, &info(3), &[], &mut rand::rng());
        let a = address(7);
        let hay = |needle: &[u8]| doc.windows(needle.len()).any(|w| w == needle);
        assert!(!hay(a.key()));
        assert!(!hay(a.to_string().as_bytes()));
        assert!(!hay(&[0xa0; 32]) && !hay(&[0xe0; 32]) && !hay(&[0; 32]));
    }

    #[test]
    fn forged_or_misfiled_descriptors_are_refused() {
        let doc = build(&identity(7), period(), 5, &info(3), &[], &mut rand::rng());
        // Any flipped byte: refused by the parser or the signature.
        for i in 0..doc.len() {
            let mut t = doc.clone();
            t[i] ^= 0x20;
            let ok = UnverifiedServiceDescriptor::parse(&t).and_then(|u| u.verify());
            assert!(ok.is_err(), "byte {i}");
        }
        // Signed by the identity key instead of the blinded one.
        let mut d = SignedDocument::parse("d", &doc, MAX_LEN).unwrap();
        d.signatures.clear();
        d.sign(DOMAIN, &identity(7));
        assert!(
            UnverifiedServiceDescriptor::parse(&d.to_bytes())
                .unwrap()
                .verify()
                .is_err()
        );
        // Another service's address cannot read it, even for the same period.
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert!(v.decrypt(&address(8), None).is_err());
        // Nor can a trailing byte ride along.
        let mut t = doc.clone();
        t.push(0);
        assert!(UnverifiedServiceDescriptor::parse(&t).is_err());
    }

    #[test]
    fn a_service_lists_one_to_ten_introduction_points() {
        for n in [0, MAX_INTRO_POINTS + 1] {
            let doc = with_inner(&postcard::to_stdvec(&info(n)).unwrap());
            let v = UnverifiedServiceDescriptor::parse(&doc)
                .unwrap()
                .verify()
                .unwrap();
            assert!(v.decrypt(&address(7), None).is_err(), "{n}");
        }
    }
}
