//! Client authorization, or restricted discovery (doc/protocol.md section
//! 11.3): a service can list X25519 keys of the clients it serves, and
//! then only those clients can read its descriptor, so only they learn
//! its introduction points.
//!
//! Keys are written as Tor writes them, so the same tooling makes them:
//!
//! ```text
//! the service, one file per client in dir/authorized_clients/NAME.auth:
//!     descriptor:x25519:<base32 of the client's public key>
//! the client, one file per service in service_auth_dir/NAME.auth_private:
//!     <service address>:descriptor:x25519:<base32 of the client's secret key>
//! ```
//!
//! ```
//! use allium_proto::service::auth::{ClientAuthKey, ClientAuthSecret};
//! let secret = ClientAuthSecret::generate(&mut rand::rng());
//! let public = secret.public();
//! assert_eq!(ClientAuthKey::parse(&public.to_string()).unwrap(), public);
//! ```

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{ServiceAddress, base32_decode, base32_encode};

const PREFIX: &str = "descriptor:x25519:";

/// Why a line is not a client authorization key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthKeyError {
    #[error("a client authorization key is written descriptor:x25519:<52 base32 characters>")]
    Format,
    #[error("the key is a point of small order: it would authorize anyone")]
    Weak,
    #[error("the key is not in canonical form (its top bit is set, or it is not below 2^255 - 19)")]
    NotCanonical,
    #[error("{0}")]
    Address(#[from] super::AddressError),
}

/// A client's X25519 public key, as a service lists it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAuthKey([u8; 32]);

impl ClientAuthKey {
    /// The key's 32 bytes (canonical: below 2^255 - 19).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Read `descriptor:x25519:<base32>` (surrounding space ignored).
    /// Refuses points of small order: every secret shares the same (zero)
    /// secret with them, so such an entry would open to anyone. Refuses
    /// non-canonical encodings (the top bit set, or 2^255 - 19 and above):
    /// the client derives its entry from its canonical key, so the entry
    /// for another spelling would never be its own.
    pub fn parse(line: &str) -> Result<Self, AuthKeyError> {
        let b32 = line
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(AuthKeyError::Format)?;
        let key: [u8; 32] = base32_decode(b32).map_err(|_| AuthKeyError::Format)?;
        let at_least_p = key[31] == 0x7f && key[1..31].iter().all(|&b| b == 0xff) && key[0] >= 0xed;
        if key[31] & 0x80 != 0 || at_least_p {
            return Err(AuthKeyError::NotCanonical);
        }
        // A clamped scalar is a multiple of 8, so any secret gives the
        // zero point with a point of small order.
        let probe = StaticSecret::from([1; 32]);
        if !probe
            .diffie_hellman(&PublicKey::from(key))
            .was_contributory()
        {
            return Err(AuthKeyError::Weak);
        }
        Ok(ClientAuthKey(key))
    }
}

impl std::fmt::Display for ClientAuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}", base32_encode(&self.0))
    }
}

impl std::fmt::Debug for ClientAuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientAuthKey({self})")
    }
}

/// A client's X25519 secret key for one service.
#[derive(Clone)]
pub struct ClientAuthSecret(StaticSecret);

impl ClientAuthSecret {
    pub fn generate(rng: &mut impl rand_core::CryptoRng) -> Self {
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut b[..]);
        ClientAuthSecret(StaticSecret::from(*b))
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        ClientAuthSecret(StaticSecret::from(b))
    }

    pub fn public(&self) -> ClientAuthKey {
        ClientAuthKey(PublicKey::from(&self.0).to_bytes())
    }

    pub(crate) fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// Read `<address>:descriptor:x25519:<base32>`, the line of a client's
    /// `.auth_private` file: the service it is for, and the key. The
    /// address may be written with or without `.allium.alt`.
    pub fn parse_line(line: &str) -> Result<(ServiceAddress, Self), AuthKeyError> {
        let line = line.trim();
        let (addr, b32) = line.split_once(':').ok_or(AuthKeyError::Format)?;
        let b32 = b32.strip_prefix(PREFIX).ok_or(AuthKeyError::Format)?;
        let address = if ServiceAddress::claims(addr) {
            ServiceAddress::parse(addr)?
        } else {
            ServiceAddress::parse(&format!("{addr}{}", super::SUFFIX))?
        };
        let key = Zeroizing::new(base32_decode::<32>(b32).map_err(|_| AuthKeyError::Format)?);
        Ok((address, ClientAuthSecret::from_bytes(*key)))
    }

    /// The line of a client's `.auth_private` file for `address`, with its
    /// newline.
    pub fn to_line(&self, address: &ServiceAddress) -> Zeroizing<String> {
        let label = address.to_string();
        let label = label.trim_end_matches(super::SUFFIX);
        let key = Zeroizing::new(base32_encode(self.0.as_bytes()));
        let mut line = Zeroizing::new(String::with_capacity(label.len() + PREFIX.len() + 54));
        line.push_str(label);
        line.push(':');
        line.push_str(PREFIX);
        line.push_str(&key);
        line.push('\n');
        line
    }
}

impl std::fmt::Debug for ClientAuthSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientAuthSecret(public {})", self.public())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn keys_read_back_as_written_and_weak_ones_are_refused() {
        let s = ClientAuthSecret::from_bytes([0x3c; 32]);
        let p = s.public();
        let text = p.to_string();
        assert!(text.starts_with("descriptor:x25519:") && text.len() == 18 + 52);
        assert_eq!(ClientAuthKey::parse(&format!(" {text}\n")).unwrap(), p);
        assert_eq!(
            ClientAuthKey::parse(&text.to_uppercase().replace("DESCRIPTOR:X25519:", PREFIX))
                .unwrap(),
            p
        );
        let address =
            ServiceAddress::from_key(&SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes())
                .unwrap();
        let line = s.to_line(&address);
        assert!(!line.contains(".allium.alt"));
        let (a, s2) = ClientAuthSecret::parse_line(&line).unwrap();
        assert_eq!((a, s2.public()), (address, p));
        let full = format!("{address}:{PREFIX}{}", base32_encode(&[0x3c; 32]));
        assert_eq!(ClientAuthSecret::parse_line(&full).unwrap().1.public(), p);
        // Not canonical: the top bit, or p = 2^255 - 19 itself.
        let mut top = *p.as_bytes();
        top[31] |= 0x80;
        let top = format!("{PREFIX}{}", base32_encode(&top));
        assert_eq!(ClientAuthKey::parse(&top), Err(AuthKeyError::NotCanonical));
        let mut prime = [0xff; 32];
        prime[0] = 0xed;
        prime[31] = 0x7f;
        let prime = format!("{PREFIX}{}", base32_encode(&prime));
        assert_eq!(
            ClientAuthKey::parse(&prime),
            Err(AuthKeyError::NotCanonical)
        );
        // Small-order points: zero, and the point of order 8 Tor's tests use.
        let zero = format!("{PREFIX}{}", base32_encode(&[0; 32]));
        assert_eq!(ClientAuthKey::parse(&zero), Err(AuthKeyError::Weak));
        let mut low = [0u8; 32];
        low[0] = 1;
        let one = format!("{PREFIX}{}", base32_encode(&low));
        assert_eq!(ClientAuthKey::parse(&one), Err(AuthKeyError::Weak));
        for bad in [
            "x25519:aaaa",
            "descriptor:x25519:",
            &text[..text.len() - 1],
            &format!("{text}a"),
            "descriptor:x25519:1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert_eq!(
                ClientAuthKey::parse(bad),
                Err(AuthKeyError::Format),
                "{bad}"
            );
        }
        // A mistyped service address is caught by its checksum.
        let typo = format!("b{}", &line[1..]);
        let typo = if typo == *line {
            format!("c{}", &line[1..])
        } else {
            typo
        };
        assert!(matches!(
            ClientAuthSecret::parse_line(&typo),
            Err(AuthKeyError::Address(_))
        ));
    }
}
