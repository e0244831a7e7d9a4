//! Authority keys: an offline identity key that certifies an online
//! signing key.
//!
//! Files: the identity key wherever the operator keeps it (made by
//! `keygen`, needed only by `certify`); on the server
//! `data_dir/keys/signing.key` (0600) and `data_dir/keys/signing.cert`.

use std::path::{Path, PathBuf};

use allium_proto::AuthorityCert;
use ed25519_dalek::SigningKey;

use crate::{DirError, store};

/// Seconds in a "month" for `--months`.
pub const MONTH_SECS: u64 = 30 * 24 * 3600;

pub fn signing_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys/signing.key")
}

pub fn cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join("keys/signing.cert")
}

/// The online half: signing key and its certificate.
pub struct Signer {
    pub key: SigningKey,
    pub cert: Vec<u8>,
    pub parsed: AuthorityCert,
}

impl Signer {
    pub fn load(data_dir: &Path) -> Result<Self, DirError> {
        let kp = signing_key_path(data_dir);
        let cp = cert_path(data_dir);
        let missing = |p: &Path, e: std::io::Error| {
            DirError::Config(format!(
                "{}: {e} (run `allium dirauth keygen` or `certify`)",
                p.display()
            ))
        };
        let k = std::fs::read(&kp).map_err(|e| missing(&kp, e))?;
        let k: [u8; 32] = k
            .try_into()
            .map_err(|_| DirError::Config(format!("{}: not 32 bytes", kp.display())))?;
        let cert = std::fs::read(&cp).map_err(|e| missing(&cp, e))?;
        let parsed = AuthorityCert::parse(&cert)?;
        let key = SigningKey::from_bytes(&k);
        if parsed.signing_key != key.verifying_key().to_bytes() {
            return Err(DirError::Config(
                "signing.cert does not certify signing.key".into(),
            ));
        }
        Ok(Signer { key, cert, parsed })
    }
}

fn load_identity(path: &Path) -> Result<SigningKey, DirError> {
    let b = std::fs::read(path).map_err(|e| DirError::io(path, e))?;
    let b: [u8; 32] = b
        .try_into()
        .map_err(|_| DirError::Config(format!("{}: not 32 bytes", path.display())))?;
    Ok(SigningKey::from_bytes(&b))
}

/// Make a new signing key for `data_dir`, certified by the identity key at
/// `identity` from `now` for `months`.
pub fn certify(
    identity: &Path,
    data_dir: &Path,
    months: u64,
    now: u64,
) -> Result<AuthorityCert, DirError> {
    certify_for(identity, data_dir, now, now + months.max(1) * MONTH_SECS)
}

/// [`certify`] with an explicit validity window.
pub fn certify_for(
    identity: &Path,
    data_dir: &Path,
    from: u64,
    until: u64,
) -> Result<AuthorityCert, DirError> {
    let id = load_identity(identity)?;
    let sk = SigningKey::generate(&mut rand::rng());
    let cert = AuthorityCert {
        identity: id.verifying_key().to_bytes(),
        signing_key: sk.verifying_key().to_bytes(),
        valid_from: from.saturating_sub(3600),
        valid_until: until,
    };
    store::write_secret(&signing_key_path(data_dir), &sk.to_bytes())?;
    store::write_atomic(&cert_path(data_dir), &cert.sign(&id), 0o644)?;
    Ok(cert)
}

/// Create an identity key at `identity` (which must not exist) and a first
/// signing key for `data_dir`. Returns the identity's public key.
pub fn keygen(
    identity: &Path,
    data_dir: &Path,
    months: u64,
    now: u64,
) -> Result<[u8; 32], DirError> {
    if identity.exists() {
        return Err(DirError::Config(format!(
            "{} exists: refusing to overwrite an identity key",
            identity.display()
        )));
    }
    let id = SigningKey::generate(&mut rand::rng());
    store::write_secret(identity, &id.to_bytes())?;
    certify(identity, data_dir, months, now)?;
    Ok(id.verifying_key().to_bytes())
}

/// The identity public key of an identity key file.
pub fn fingerprint(identity: &Path) -> Result<[u8; 32], DirError> {
    Ok(load_identity(identity)?.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_certify_and_load() {
        let d = tempfile::tempdir().unwrap();
        let idp = d.path().join("offline/identity.key");
        let id = keygen(&idp, &d.path().join("srv"), 3, 1000).unwrap();
        assert!(
            keygen(&idp, &d.path().join("srv"), 3, 1000).is_err(),
            "never overwrite an identity"
        );
        let s1 = Signer::load(&d.path().join("srv")).unwrap();
        assert_eq!(s1.parsed.identity, id);
        assert_eq!(s1.parsed.valid_until, 1000 + 3 * MONTH_SECS);
        certify(&idp, &d.path().join("srv"), 1, 2000).unwrap();
        let s2 = Signer::load(&d.path().join("srv")).unwrap();
        assert_eq!(s2.parsed.identity, id);
        assert_ne!(s1.parsed.signing_key, s2.parsed.signing_key);
        assert_eq!(fingerprint(&idp).unwrap(), id);
    }
}
