//! Files: atomic writes, 0600 secret keys.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::DirError;

/// Write `bytes` to `path` atomically (temp file, fsync, rename) with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| DirError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| DirError::io(path, e))
}

/// Write a secret key file: 0600, atomic.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DirError> {
    write_atomic(path, bytes, 0o600)
}

/// Read a 32-byte secret key file, or create it from `fresh` if absent.
pub fn load_or_create_secret(
    path: &Path,
    fresh: impl FnOnce() -> [u8; 32],
) -> Result<[u8; 32], DirError> {
    match std::fs::read(path) {
        Ok(b) => b.as_slice().try_into().map_err(|_| {
            DirError::Config(format!(
                "{}: key file must hold exactly 32 bytes, has {}",
                path.display(),
                b.len()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = fresh();
            write_secret(path, &k)?;
            Ok(k)
        }
        Err(e) => Err(DirError::io(path, e)),
    }
}

/// Load or create an Ed25519 identity key.
pub fn load_or_create_identity(path: &Path) -> Result<SigningKey, DirError> {
    let b = load_or_create_secret(path, || SigningKey::generate(&mut rand::rng()).to_bytes())?;
    Ok(SigningKey::from_bytes(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_files_are_0600_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys/identity.key");
        let k1 = load_or_create_identity(&p).unwrap();
        let k2 = load_or_create_identity(&p).unwrap();
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, b"short").unwrap();
        assert!(load_or_create_identity(&p).is_err());
    }
}
