//! Authority keys: an offline identity key that certifies an online
//! signing key.
//!
//! Files: the identity key wherever the operator keeps it (made by
//! `keygen`, needed only by `certify`); on the server
//! `data_dir/keys/signing.key` (0600) and `data_dir/keys/signing.cert`.

use std::path::{Path, PathBuf};

use allium_proto::AuthorityCert;
use ed25519_dalek::SigningKey;

use crate::DirError;
use crate::store::{self, KeyKind, ReadKey};

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
        let k = store::decode_key(&kp, &k, KeyKind::AuthoritySigning)?;
        let cert = std::fs::read(&cp).map_err(|e| missing(&cp, e))?;
        let parsed = AuthorityCert::parse(&cert)?;
        let key = SigningKey::from_bytes(match &k {
            ReadKey::Typed(k) | ReadKey::Untyped(k) => k,
        });
        if parsed.signing_key != key.verifying_key().to_bytes() {
            return Err(DirError::Config(
                "signing.cert does not certify signing.key".into(),
            ));
        }
        if matches!(k, ReadKey::Untyped(_)) {
            // Its certificate says what it is.
            store::write_key(&kp, KeyKind::AuthoritySigning, &key.to_bytes())?;
        }
        Ok(Signer { key, cert, parsed })
    }
}

/// Read the identity key at `path`. A key file from before key files had a
/// header says nothing about what it holds: it is taken only if it is the
/// identity `certified` (that of the data directory's certificate), and is
/// then given its header.
fn load_identity(path: &Path, certified: Option<[u8; 32]>) -> Result<SigningKey, DirError> {
    match store::read_key(path, KeyKind::AuthorityIdentity)? {
        ReadKey::Typed(k) => Ok(SigningKey::from_bytes(&k)),
        ReadKey::Untyped(k) => {
            let key = SigningKey::from_bytes(&k);
            if certified != Some(key.verifying_key().to_bytes()) {
                return Err(DirError::Config(format!(
                    "{}: no key type header, and not the identity this authority's certificate names: \
                     an identity key file starts with `== allium authority identity key (Ed25519) v1 ==`",
                    path.display()
                )));
            }
            store::write_key(path, KeyKind::AuthorityIdentity, &k)?;
            tracing::info!(path = %path.display(), "identity key file given its type header");
            Ok(key)
        }
    }
}

/// The identity the certificate in `data_dir` names, if there is one.
fn certified_identity(data_dir: &Path) -> Option<[u8; 32]> {
    let cert = std::fs::read(cert_path(data_dir)).ok()?;
    Some(AuthorityCert::parse(&cert).ok()?.identity)
}

/// Make a new signing key for `data_dir`, certified by the identity key at
/// `identity` from `now` for `months`.
pub fn certify(
    identity: &Path,
    data_dir: &Path,
    months: u64,
    now: u64,
) -> Result<AuthorityCert, DirError> {
    if !CERT_MONTHS.contains(&months) {
        return Err(DirError::Config(format!(
            "a signing key is certified for 1 to 24 months, not {months}"
        )));
    }
    certify_for(identity, data_dir, now, now + months * MONTH_SECS)
}

/// [`certify`] with an explicit validity window.
pub fn certify_for(
    identity: &Path,
    data_dir: &Path,
    from: u64,
    until: u64,
) -> Result<AuthorityCert, DirError> {
    let id = load_identity(identity, certified_identity(data_dir))?;
    let sk = SigningKey::generate(&mut rand::rng());
    let cert = AuthorityCert {
        identity: id.verifying_key().to_bytes(),
        signing_key: sk.verifying_key().to_bytes(),
        valid_from: from.saturating_sub(3600),
        valid_until: until,
    };
    store::write_key(
        &signing_key_path(data_dir),
        KeyKind::AuthoritySigning,
        &sk.to_bytes(),
    )?;
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
    store::write_key(identity, KeyKind::AuthorityIdentity, &id.to_bytes())?;
    certify(identity, data_dir, months, now)?;
    Ok(id.verifying_key().to_bytes())
}

/// The identity public key of an identity key file (one from before key
/// files had a header is refused: it could be any key).
pub fn fingerprint(identity: &Path) -> Result<[u8; 32], DirError> {
    Ok(load_identity(identity, None)?.verifying_key().to_bytes())
}

/// The months a certificate may be made for.
pub const CERT_MONTHS: std::ops::RangeInclusive<u64> = 1..=24;

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
        // The signing key where the identity key belongs: refused.
        let e = fingerprint(&signing_key_path(&d.path().join("srv")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("where an authority identity key"), "{e}");
        assert!(
            certify(
                &signing_key_path(&d.path().join("srv")),
                &d.path().join("srv"),
                1,
                3000
            )
            .is_err()
        );

        // Key files from before headers: the signing key is converted by its
        // certificate; the identity only if the certificate names it.
        let raw = |p: &Path| {
            let k = match store::read_key(p, KeyKind::AuthorityIdentity)
                .or_else(|_| store::read_key(p, KeyKind::AuthoritySigning))
                .unwrap()
            {
                ReadKey::Typed(k) | ReadKey::Untyped(k) => k,
            };
            std::fs::write(p, k).unwrap();
        };
        let srv = d.path().join("srv");
        raw(&signing_key_path(&srv));
        raw(&idp);
        assert!(
            fingerprint(&idp).is_err(),
            "an untyped file could be any key"
        );
        Signer::load(&srv).unwrap();
        assert!(matches!(
            store::read_key(&signing_key_path(&srv), KeyKind::AuthoritySigning).unwrap(),
            ReadKey::Typed(_)
        ));
        raw(&signing_key_path(&srv));
        assert!(
            certify(&signing_key_path(&srv), &srv, 1, 3000).is_err(),
            "an untyped signing key is not the certified identity"
        );
        certify(&idp, &srv, 1, 3000).unwrap();
        assert_eq!(fingerprint(&idp).unwrap(), id);
    }
}
