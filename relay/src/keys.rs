//! A relay's keys on disk: identity (Ed25519), link (X25519 static for
//! Noise), and the current and previous onion keys (X25519).

use std::path::{Path, PathBuf};

use allium_directory::store::{self, KeyKind, ReadKey};
use allium_proto::ntor::OnionSecret;
use ed25519_dalek::SigningKey;
use x25519_dalek::StaticSecret;

use crate::RelayError;

/// The onion keys a relay answers CREATE for.
pub struct OnionKeySet {
    pub current: OnionSecret,
    pub previous: Option<OnionSecret>,
    /// When `current` was made (UNIX seconds).
    pub created: u64,
}

pub struct KeyStore {
    dir: PathBuf,
}

fn fresh() -> [u8; 32] {
    StaticSecret::random_from_rng(&mut rand::rng()).to_bytes()
}

impl KeyStore {
    pub fn new(data_dir: &Path) -> Self {
        KeyStore {
            dir: data_dir.join("keys"),
        }
    }

    pub fn identity(&self) -> Result<SigningKey, RelayError> {
        Ok(store::load_or_create_identity(
            &self.dir.join("identity.key"),
        )?)
    }

    pub fn link(&self) -> Result<StaticSecret, RelayError> {
        Ok(StaticSecret::from(store::load_or_create_key(
            &self.dir.join("link.key"),
            KeyKind::RelayLink,
            fresh,
        )?))
    }

    pub fn onion(&self, now: u64) -> Result<OnionKeySet, RelayError> {
        let cur = self.dir.join("onion.key");
        let existed = cur.exists();
        let current = OnionSecret::new(StaticSecret::from(store::load_or_create_key(
            &cur,
            KeyKind::RelayOnion,
            fresh,
        )?));
        let created_path = self.dir.join("onion.created");
        let created = if existed {
            std::fs::read_to_string(&created_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(now)
        } else {
            store::write_atomic(&created_path, now.to_string().as_bytes(), 0o600)?;
            now
        };
        let previous = store::read_key(&self.dir.join("onion.prev.key"), KeyKind::RelayOnion)
            .ok()
            .map(|k| match k {
                ReadKey::Typed(b) | ReadKey::Untyped(b) => OnionSecret::new(StaticSecret::from(b)),
            });
        Ok(OnionKeySet {
            current,
            previous,
            created,
        })
    }

    /// Make a new current onion key; the old one becomes the previous.
    pub fn rotate_onion(&self, set: &mut OnionKeySet, now: u64) -> Result<(), RelayError> {
        let new = OnionSecret::new(StaticSecret::from(fresh()));
        store::write_key(
            &self.dir.join("onion.prev.key"),
            KeyKind::RelayOnion,
            set.current.secret().as_bytes(),
        )?;
        store::write_key(
            &self.dir.join("onion.key"),
            KeyKind::RelayOnion,
            new.secret().as_bytes(),
        )?;
        store::write_atomic(
            &self.dir.join("onion.created"),
            now.to_string().as_bytes(),
            0o600,
        )?;
        set.previous = Some(std::mem::replace(&mut set.current, new));
        set.created = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onion_keys_persist_and_rotate() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::new(d.path());
        let mut a = ks.onion(100).unwrap();
        let b = ks.onion(200).unwrap();
        assert_eq!(a.current.secret().to_bytes(), b.current.secret().to_bytes());
        assert_eq!(b.created, 100);
        let old = a.current.public();
        ks.rotate_onion(&mut a, 300).unwrap();
        let c = ks.onion(400).unwrap();
        assert_eq!(c.previous.as_ref().unwrap().public(), old);
        assert_ne!(c.current.public(), old);
        assert_eq!(c.created, 300);
        assert_eq!(
            ks.identity().unwrap().to_bytes(),
            ks.identity().unwrap().to_bytes()
        );
    }
}
