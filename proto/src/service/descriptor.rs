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
//! encrypted     = AES-256-GCM(key, nonce 0, ad = A', postcard(ServiceInfo) zero-padded to 1024) | tag
//! ```
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
//! };
//! let doc = build(&identity, period, 1, &info, &mut rand::rng());
//! // A directory checks the signature; only a client with the address reads it.
//! let d = UnverifiedServiceDescriptor::parse(&doc).unwrap().verify().unwrap();
//! assert_eq!(d.blinded_key(), address.blinded(period));
//! assert_eq!(d.decrypt(&address).unwrap(), info);
//! ```

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// What the service tells its clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub intro_points: Vec<IntroPoint>,
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

fn key(blinded: &BlindedKey, subcred: &[u8; 32], revision: u64, salt: &[u8; 16]) -> aead::Key {
    let ikm = [&blinded.0[..], subcred, &revision.to_be_bytes()].concat();
    let mut k = [0u8; aead::KEY_LEN];
    Hkdf::<Sha256>::new(Some(salt), &ikm)
        .expand(KEY_INFO, &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    aead::Key::new(&k)
}

/// The signed descriptor of the service `identity` for `period`, revision
/// `revision` (the seconds since the period began, so that revisions rise
/// within a period and say nothing across periods), listing `info`.
pub fn build(
    identity: &ed25519_dalek::SigningKey,
    period: TimePeriod,
    revision: u64,
    info: &ServiceInfo,
    rng: &mut impl rand_core::CryptoRng,
) -> Vec<u8> {
    let mut salt = [0u8; 16];
    rng.fill_bytes(&mut salt);
    build_raw(identity, period, revision, &padded(info), salt)
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

/// [`build`] with contents given as bytes (which need not encode a
/// [`ServiceInfo`]: for tests of what a client does with them) and the
/// salt given: it must be fresh for each descriptor, or the encryption's
/// nonce repeats.
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
    let k = key(&blinded, &subcred, revision, &salt);
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
    /// under that service's blinded key for its period, and decrypt.
    pub fn decrypt(&self, address: &ServiceAddress) -> Result<ServiceInfo, Error> {
        let blinded = address.blinded(self.period());
        if blinded != self.desc.blinded_key {
            return Err(Error::BadSignature(
                "service descriptor (filed under another service's key)",
            ));
        }
        let subcred = subcredential(address.key(), &blinded);
        let k = key(&blinded, &subcred, self.desc.revision, &self.desc.salt);
        let n = self
            .desc
            .encrypted
            .len()
            .checked_sub(aead::TAG_LEN)
            .ok_or_else(|| Error::malformed("service descriptor", "shorter than its tag"))?;
        let mut buf = self.desc.encrypted[..n].to_vec();
        let mut tag = [0u8; aead::TAG_LEN];
        tag.copy_from_slice(&self.desc.encrypted[n..]);
        if !aead::whole::open(&k, 0, &blinded.0, &mut buf, &tag) {
            return Err(Error::BadSignature(
                "service descriptor (its contents do not decrypt)",
            ));
        }
        let (info, padding): (ServiceInfo, &[u8]) = postcard::take_from_bytes(&buf)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

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
        }
    }

    fn period() -> TimePeriod {
        TimePeriod::at(1_800_000_000, 3600)
    }

    #[test]
    fn a_client_with_the_address_reads_what_the_service_wrote() {
        let doc = build(&identity(7), period(), 5, &info(3), &mut rand::rng());
        assert!(doc.len() <= MAX_LEN);
        let d = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(d.bytes(), doc);
        assert_eq!(d.revision(), 5);
        assert_eq!(d.period(), period());
        assert_eq!(d.decrypt(&address(7)).unwrap(), info(3));
        // The largest descriptor fits, and is no larger than the smallest:
        // the size does not tell how many introduction points there are.
        let big = build(
            &identity(7),
            period(),
            5,
            &info(MAX_INTRO_POINTS),
            &mut rand::rng(),
        );
        assert!(big.len() <= MAX_LEN, "{}", big.len());
        let small = build(&identity(7), period(), 5, &info(1), &mut rand::rng());
        assert_eq!(big.len(), small.len());
        // Each descriptor gets its own salt.
        assert_ne!(
            doc,
            build(&identity(7), period(), 5, &info(3), &mut rand::rng())
        );
    }

    #[test]
    fn padding_must_be_zeros() {
        let mut contents = padded(&info(2));
        let last = contents.len() - 1;
        contents[last] = 1;
        let doc = build_raw(&identity(7), period(), 5, &contents, [1; 16]);
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert!(v.decrypt(&address(7)).is_err());
        contents[last] = 0;
        let doc = build_raw(&identity(7), period(), 5, &contents, [1; 16]);
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(v.decrypt(&address(7)).unwrap(), info(2));
    }

    #[test]
    fn the_directory_sees_neither_the_address_nor_the_contents() {
        let doc = build(&identity(7), period(), 5, &info(3), &mut rand::rng());
        let a = address(7);
        let hay = |needle: &[u8]| doc.windows(needle.len()).any(|w| w == needle);
        assert!(!hay(a.key()));
        assert!(!hay(a.to_string().as_bytes()));
        assert!(!hay(&[0xa0; 32]) && !hay(&[0xe0; 32]) && !hay(&[0; 32]));
    }

    #[test]
    fn forged_or_misfiled_descriptors_are_refused() {
        let doc = build(&identity(7), period(), 5, &info(3), &mut rand::rng());
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
        assert!(v.decrypt(&address(8)).is_err());
        // Nor can a trailing byte ride along.
        let mut t = doc.clone();
        t.push(0);
        assert!(UnverifiedServiceDescriptor::parse(&t).is_err());
    }

    #[test]
    fn a_service_lists_one_to_ten_introduction_points() {
        for n in [0, MAX_INTRO_POINTS + 1] {
            let doc = build_raw(
                &identity(7),
                period(),
                5,
                &postcard::to_stdvec(&info(n)).unwrap(),
                [1; 16],
            );
            let v = UnverifiedServiceDescriptor::parse(&doc)
                .unwrap()
                .verify()
                .unwrap();
            assert!(v.decrypt(&address(7)).is_err(), "{n}");
        }
    }
}
