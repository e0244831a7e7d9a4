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
    // A fresh random name, created exclusively: nothing already there (a
    // planted symlink, another writer's file) is ever written through.
    let open_tmp = || -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
        for _ in 0..8 {
            let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free temporary name"))
    };
    let (tmp, mut f) = open_tmp().map_err(|e| DirError::io(dir, e))?;
    let res = (|| {
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
    fn writes_go_through_fresh_exclusive_temporary_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state");
        // Writers in one process at once each get their own temporary file.
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let path = &path;
                s.spawn(move || write_atomic(path, &[i; 4096], 0o644).unwrap());
            }
        });
        let got = std::fs::read(&path).unwrap();
        assert!(got.len() == 4096 && got.iter().all(|&b| b == got[0]));
        // Nothing is left behind.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

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
