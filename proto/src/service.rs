//! Onion service names (doc/protocol.md section 11).
//!
//! A service is named by its Ed25519 identity key, with a checksum and a
//! version, in base32, under the top-level name `.allium.alt`:
//!
//! ```text
//! address  = base32(key | checksum | version) ".allium.alt"   56 characters before the suffix
//! checksum = SHA-256("allium service address" | key | version)[..2]
//! version  = 1
//! ```
//!
//! `.alt` is reserved for names outside the DNS (RFC 9476), so a resolver
//! that follows the RFC never asks the DNS for one, and the name cannot be
//! taken for Tor's `.onion`: a Tor client never gets one, an Allium client
//! never gets a Tor address, and a Tor key given our suffix fails our
//! checksum (another domain string). A mistyped address fails the checksum
//! (or the base32, or the length) before any network work.
//!
//! ```
//! use allium_proto::service::ServiceAddress;
//! use ed25519_dalek::SigningKey;
//! let key = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
//! let a = ServiceAddress::from_key(&key).unwrap();
//! let text = a.to_string();
//! assert_eq!(ServiceAddress::parse(&text).unwrap(), a);
//! // One character mistyped: refused before anything is looked up.
//! let typo = format!("{}{}", if text.starts_with('a') { "b" } else { "a" }, &text[1..]);
//! assert!(ServiceAddress::parse(&typo).is_err());
//! ```

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

pub mod auth;
mod blind;
pub mod descriptor;
pub mod intro;
pub mod pow;
pub mod ring;

pub use blind::{BlindedKey, BlindedSigningKey, INTERVALS_PER_PERIOD, TimePeriod};

/// The top-level name of every service address (with its dot).
pub const SUFFIX: &str = ".allium.alt";
/// The address format this code writes and reads.
pub const VERSION: u8 = 1;
/// Base32 characters of an address, before [`SUFFIX`].
pub const ENCODED_LEN: usize = 56;
const CHECKSUM_DOMAIN: &[u8] = b"allium service address";
const RAW_LEN: usize = 35;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Why a name is not a service address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("not a service name (it does not end in {SUFFIX})")]
    NotAService,
    #[error("a service address has {ENCODED_LEN} characters before {SUFFIX}, this one {0}")]
    Length(usize),
    #[error("a service address is base32 (a-z, 2-7): {0:?} is not")]
    Character(char),
    #[error("the address's checksum does not match: it was mistyped")]
    Checksum,
    #[error("service address version {0} is not known (this client reads version {VERSION})")]
    Version(u8),
    #[error("the address names no usable key")]
    Key,
}

/// A service's address: its identity key, checked.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAddress {
    key: [u8; 32],
}

impl ServiceAddress {
    /// The address of the service with identity key `key`. Fails for bytes
    /// that are not a point of the curve, or a point of small order (no
    /// signature could be checked against it).
    pub fn from_key(key: &[u8; 32]) -> Result<Self, AddressError> {
        let vk = VerifyingKey::from_bytes(key).map_err(|_| AddressError::Key)?;
        if vk.is_weak() {
            return Err(AddressError::Key);
        }
        Ok(ServiceAddress { key: *key })
    }

    /// The service's identity key.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// Is `host` meant as a service name (even a broken one)? Such a name
    /// must never go to an exit: it is answered here, or refused.
    pub fn claims(host: &str) -> bool {
        let h = host.trim_end_matches('.');
        h.len() >= SUFFIX.len()
            && h.is_char_boundary(h.len() - SUFFIX.len())
            && h[h.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX)
    }

    /// Read a host name: the address may follow other labels
    /// (`www.ADDRESS.allium.alt`), in any case, with a final dot.
    pub fn parse(host: &str) -> Result<Self, AddressError> {
        if !Self::claims(host) {
            return Err(AddressError::NotAService);
        }
        let h = host.trim_end_matches('.');
        let name = &h[..h.len() - SUFFIX.len()];
        let label = name.rsplit('.').next().unwrap_or(name);
        let n = label.chars().count();
        if n != ENCODED_LEN {
            return Err(AddressError::Length(n));
        }
        let raw: [u8; RAW_LEN] = base32_decode(label)?;
        let (key, rest) = raw.split_at(32);
        let version = rest[2];
        if version != VERSION {
            return Err(AddressError::Version(version));
        }
        let key: [u8; 32] = key.try_into().map_err(|_| AddressError::Key)?;
        if rest[..2] != checksum(&key, version) {
            return Err(AddressError::Checksum);
        }
        Self::from_key(&key)
    }

    /// The 35 bytes the address encodes: key, checksum, version.
    pub fn to_bytes(&self) -> [u8; RAW_LEN] {
        let mut raw = [0u8; RAW_LEN];
        raw[..32].copy_from_slice(&self.key);
        raw[32..34].copy_from_slice(&checksum(&self.key, VERSION));
        raw[34] = VERSION;
        raw
    }
}

impl std::fmt::Display for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&base32_encode(&self.to_bytes()))?;
        f.write_str(SUFFIX)
    }
}

impl std::fmt::Debug for ServiceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceAddress({self})")
    }
}

fn checksum(key: &[u8; 32], version: u8) -> [u8; 2] {
    let d = Sha256::new()
        .chain_update(CHECKSUM_DOMAIN)
        .chain_update(key)
        .chain_update([version])
        .finalize();
    [d[0], d[1]]
}

/// RFC 4648 base32, lowercase, without padding.
pub(crate) fn base32_encode(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len().div_ceil(5) * 8);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in raw {
        acc = (acc << 8 | u32::from(b)) & 0xfff;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[(acc >> bits & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[(acc << (5 - bits) & 31) as usize]));
    }
    out
}

/// The inverse of [`base32_encode`], any case, for exactly `N` bytes: the
/// length must be the one `N` bytes encode to and the unused low bits of
/// the last character zero, so each value has one spelling.
pub(crate) fn base32_decode<const N: usize>(s: &str) -> Result<[u8; N], AddressError> {
    let mut raw = [0u8; N];
    let n = s.chars().count();
    if n != (N * 8).div_ceil(5) {
        return Err(AddressError::Length(n));
    }
    let (mut acc, mut bits, mut i) = (0u32, 0u32, 0);
    for c in s.chars() {
        let v = match c.to_ascii_lowercase() {
            c @ 'a'..='z' => c as u32 - 'a' as u32,
            c @ '2'..='7' => c as u32 - '2' as u32 + 26,
            _ => return Err(AddressError::Character(c)),
        };
        acc = (acc << 5 | v) & 0xfff;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            raw[i] = (acc >> bits) as u8;
            i += 1;
        }
    }
    if acc & ((1 << bits) - 1) != 0 {
        return Err(AddressError::Character(s.chars().last().unwrap_or('?')));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn addr() -> ServiceAddress {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes();
        ServiceAddress::from_key(&key).unwrap()
    }

    #[test]
    fn round_trips_in_any_case_with_subdomains() {
        let a = addr();
        let s = a.to_string();
        // doc/protocol.md section 11 (base32 by Python's base64.b32encode).
        assert_eq!(
            s,
            "5jfgyy7ctrjavpxvkb5rglwf7gkuo5vox27hxescd3vgsfcg2iwdiuab.allium.alt"
        );
        assert!(s.ends_with(".allium.alt"));
        for form in [
            s.clone(),
            s.to_uppercase(),
            format!("www.{s}"),
            format!("a.b.{s}."),
        ] {
            assert_eq!(ServiceAddress::parse(&form), Ok(a), "{form}");
        }
    }

    /// Each one-character typo of an address passes the checksum with
    /// probability 2^-16 (and must then still be a usable key): for this
    /// address, none does.
    #[test]
    fn every_one_character_typo_is_caught() {
        let s = addr().to_string();
        let label = &s[..ENCODED_LEN];
        let mut caught = 0;
        for i in 0..ENCODED_LEN {
            for &c in ALPHABET {
                let c = char::from(c);
                if label.as_bytes()[i] == c as u8 {
                    continue;
                }
                let mut t = label.to_string();
                t.replace_range(i..=i, &c.to_string());
                let r = ServiceAddress::parse(&format!("{t}{SUFFIX}"));
                assert!(r.is_err(), "{t} accepted");
                caught += 1;
            }
        }
        assert_eq!(caught, ENCODED_LEN * 31);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let s = addr().to_string();
        let label = &s[..ENCODED_LEN];
        assert_eq!(
            ServiceAddress::parse("example.com"),
            Err(AddressError::NotAService)
        );
        assert_eq!(
            ServiceAddress::parse(&format!("{}{SUFFIX}", &label[1..])),
            Err(AddressError::Length(55))
        );
        assert_eq!(
            ServiceAddress::parse(&format!("{}1{SUFFIX}", &label[1..])),
            Err(AddressError::Character('1'))
        );
        assert_eq!(
            ServiceAddress::parse(&format!("{}é{SUFFIX}", &label[1..])),
            Err(AddressError::Character('é'))
        );
        // The last character carries the version's low bits.
        let mut raw = addr().to_bytes();
        raw[34] = 2;
        let v2 = base32_encode(&raw);
        assert_eq!(
            ServiceAddress::parse(&format!("{v2}{SUFFIX}")),
            Err(AddressError::Version(2))
        );
        // A small-order point with a valid checksum: no usable key.
        let mut raw = [0u8; RAW_LEN];
        raw[0] = 1; // the identity point
        let key: [u8; 32] = raw[..32].try_into().unwrap();
        raw[32..34].copy_from_slice(&checksum(&key, 1));
        raw[34] = 1;
        assert_eq!(
            ServiceAddress::parse(&format!("{}{SUFFIX}", base32_encode(&raw))),
            Err(AddressError::Key)
        );
        assert!(ServiceAddress::claims("x.ALLIUM.ALT."));
        assert!(!ServiceAddress::claims("allium.alt"));
        assert!(!ServiceAddress::claims("x.onion"));
        assert!(!ServiceAddress::claims("é"));
    }

    #[test]
    fn base32_matches_rfc_4648() {
        // RFC 4648 section 10: "foobar" is MZXW6YTBOI (with padding);
        // 35 bytes of it, zero-filled, start the same way.
        let mut raw = [0u8; RAW_LEN];
        raw[..5].copy_from_slice(b"fooba");
        let e = base32_encode(&raw);
        assert!(e.starts_with("mzxw6ytb"), "{e}");
        assert_eq!(base32_decode::<RAW_LEN>(&e).unwrap(), raw);
        // Lengths that are not a multiple of 5 bytes, as in RFC 4648.
        for (raw, text) in [
            (&b"f"[..], "my"),
            (b"fo", "mzxq"),
            (b"foo", "mzxw6"),
            (b"foob", "mzxw6yq"),
        ] {
            assert_eq!(base32_encode(raw), text);
        }
        assert_eq!(base32_decode::<2>("mzxq").unwrap(), *b"fo");
        // Only one spelling: unused low bits must be zero.
        assert!(base32_decode::<2>("mzxr").is_err());
        assert!(base32_decode::<2>("mzx").is_err());
        let k = [0xa5; 32];
        assert_eq!(base32_decode::<32>(&base32_encode(&k)).unwrap(), k);
        assert_eq!(base32_encode(&k).len(), 52);
    }
}
