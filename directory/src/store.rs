//! Files: atomic writes, 0600 secret keys.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::DirError;

/// Create `dir` and its missing parents for the owner alone (0700), as
/// data directories should be; an existing directory is left as it is.
pub fn private_dir(dir: &Path) -> Result<(), DirError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| DirError::io(dir, e))
}

/// Whether [`write_atomic`] waits for the disk (see [`set_durable`]).
static DURABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Stop waiting for the disk in this process, for a test network in a
/// temporary directory that goes when it stops: its files are still
/// replaced atomically, with their modes, but a large one's thousands of
/// key files took seconds of syncs at each start.
pub fn set_durable(durable: bool) {
    DURABLE.store(durable, std::sync::atomic::Ordering::Relaxed);
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename) with
/// `mode`, creating its directory (0700) if need be.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DirError> {
    let sync = DURABLE.load(std::sync::atomic::Ordering::Relaxed);
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
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
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if sync && let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| DirError::io(path, e))
}

/// Write a secret file: 0600, atomic.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), DirError> {
    write_atomic(path, bytes, 0o600)
}

/// What a key file holds. Its first line names it, so that one key is
/// never taken for another (an authority's signing key given where its
/// identity key belongs, a relay's link key copied over its identity):
///
/// ```text
/// == allium authority identity key (Ed25519) v1 ==
/// <the 32-byte secret in hex>
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    AuthorityIdentity,
    AuthoritySigning,
    RelayIdentity,
    RelayLink,
    RelayOnion,
    ServiceIdentity,
}

impl KeyKind {
    const ALL: [KeyKind; 6] = [
        KeyKind::ServiceIdentity,
        KeyKind::AuthorityIdentity,
        KeyKind::AuthoritySigning,
        KeyKind::RelayIdentity,
        KeyKind::RelayLink,
        KeyKind::RelayOnion,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KeyKind::AuthorityIdentity => "authority identity key (Ed25519)",
            KeyKind::AuthoritySigning => "authority signing key (Ed25519)",
            KeyKind::RelayIdentity => "relay identity key (Ed25519)",
            KeyKind::RelayLink => "relay link key (X25519)",
            KeyKind::RelayOnion => "relay onion key (X25519)",
            KeyKind::ServiceIdentity => "service identity key (Ed25519)",
        }
    }

    /// "an authority ...", "a relay ...".
    fn with_article(self) -> String {
        let article = match self {
            KeyKind::AuthorityIdentity | KeyKind::AuthoritySigning => "an",
            _ => "a",
        };
        format!("{article} {}", self.name())
    }

    fn header(self) -> String {
        format!("== allium {} v1 ==", self.name())
    }
}

/// A key file's text.
pub fn encode_key(kind: KeyKind, key: &[u8; 32]) -> String {
    format!("{}\n{}\n", kind.header(), hex::encode(key))
}

/// A key read from a file: typed, or from before key files had a header
/// (32 bytes alone, which could be any kind).
#[derive(Debug, PartialEq, Eq)]
pub enum ReadKey {
    Typed([u8; 32]),
    Untyped([u8; 32]),
}

/// Read a key of `kind` from `bytes` (the contents of `path`).
pub fn decode_key(path: &Path, bytes: &[u8], kind: KeyKind) -> Result<ReadKey, DirError> {
    let bad = |why: String| DirError::Config(format!("{}: {why}", path.display()));
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Ok(ReadKey::Untyped(raw));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not a key file".into()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().trim();
    if header != kind.header() {
        return Err(bad(
            match KeyKind::ALL.iter().find(|k| k.header() == header) {
                Some(other) => format!(
                    "holds {} where {} belongs",
                    other.with_article(),
                    kind.with_article()
                ),
                None => format!("not a key file (no `{}` line)", kind.header()),
            },
        ));
    }
    let body = lines.next().unwrap_or_default().trim();
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(bad("more than one key".into()));
    }
    let key = hex::decode(body)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| bad("the key is not 64 hex digits".into()))?;
    Ok(ReadKey::Typed(key))
}

/// Read a key file of `kind`.
pub fn read_key(path: &Path, kind: KeyKind) -> Result<ReadKey, DirError> {
    let b = std::fs::read(path).map_err(|e| DirError::io(path, e))?;
    decode_key(path, &b, kind)
}

/// Write a key file of `kind`: 0600, atomic.
pub fn write_key(path: &Path, kind: KeyKind, key: &[u8; 32]) -> Result<(), DirError> {
    write_secret(path, encode_key(kind, key).as_bytes())
}

/// Read a key file of `kind` that belongs where it is (a daemon's own
/// data directory), or create it from `fresh` if absent. One from before
/// key files had a header is taken for what its place says, and rewritten
/// with one.
pub fn load_or_create_key(
    path: &Path,
    kind: KeyKind,
    fresh: impl FnOnce() -> [u8; 32],
) -> Result<[u8; 32], DirError> {
    match read_key(path, kind) {
        Ok(ReadKey::Typed(k)) => Ok(k),
        Ok(ReadKey::Untyped(k)) => {
            write_key(path, kind, &k)?;
            tracing::info!(path = %path.display(), "key file given its type header");
            Ok(k)
        }
        Err(DirError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let k = fresh();
            write_key(path, kind, &k)?;
            Ok(k)
        }
        Err(e) => Err(e),
    }
}

/// Load or create a relay's Ed25519 identity key.
pub fn load_or_create_identity(path: &Path) -> Result<SigningKey, DirError> {
    let b = load_or_create_key(path, KeyKind::RelayIdentity, || {
        SigningKey::generate(&mut rand::rng()).to_bytes()
    })?;
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

    #[test]
    fn key_files_say_what_they_hold() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_key(&p, KeyKind::AuthoritySigning, &[7; 32]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("== allium authority signing key (Ed25519) v1 ==\n"));
        assert_eq!(
            read_key(&p, KeyKind::AuthoritySigning).unwrap(),
            ReadKey::Typed([7; 32])
        );
        let e = read_key(&p, KeyKind::AuthorityIdentity)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds an authority signing key (Ed25519) where an authority identity key (Ed25519) belongs"),
            "{e}"
        );
        // A key file from before headers is read as untyped; in its own
        // place it is rewritten with its header.
        std::fs::write(&p, [9u8; 32]).unwrap();
        assert_eq!(
            read_key(&p, KeyKind::RelayLink).unwrap(),
            ReadKey::Untyped([9; 32])
        );
        assert_eq!(
            load_or_create_key(&p, KeyKind::RelayLink, || [0; 32]).unwrap(),
            [9; 32]
        );
        assert_eq!(
            read_key(&p, KeyKind::RelayLink).unwrap(),
            ReadKey::Typed([9; 32])
        );
        for junk in [
            "",
            "== allium relay link key (X25519) v1 ==\nzz\n",
            "hello\n",
        ] {
            std::fs::write(&p, junk).unwrap();
            assert!(read_key(&p, KeyKind::RelayLink).is_err(), "{junk:?}");
        }
    }
}
