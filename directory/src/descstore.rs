//! The authority's descriptors on disk, one file per relay
//! (`state/descriptors.d/<identity in hex>`, the exact signed bytes, 0600):
//! an upload writes one file, an eviction removes one, so the bytes written
//! per hour grow with the uploads, not with uploads times the table.
//!
//! An older authority kept them all in one file (`state/descriptors`, a
//! postcard list), rewritten whole on each upload: it is read once and
//! replaced by the directory.
//!
//! Votes are kept the same way, one file per vote
//! (`state/votes.d/<period start>-<authority in hex>`): taking a vote
//! writes that vote alone, never the others held.

use std::path::{Path, PathBuf};

use allium_proto::doc::{MAX_DESCRIPTOR_LEN, MAX_VOTE_LEN};

use crate::DirError;
use crate::store::{private_dir, replace_unsynced, write_atomic};

/// A stored descriptor: the relay its file is named for, and its bytes.
pub type Stored = ([u8; 32], Vec<u8>);

pub struct DescriptorStore {
    dir: PathBuf,
    legacy: PathBuf,
}

impl DescriptorStore {
    /// The store under `state` (the authority's `data_dir/state`).
    pub fn new(state: &Path) -> Self {
        DescriptorStore {
            dir: state.join("descriptors.d"),
            legacy: state.join("descriptors"),
        }
    }

    fn path(&self, id: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(id))
    }

    /// Write relay `id`'s descriptor, replacing the one held, without
    /// waiting for the disk: one sync per upload held every upload behind
    /// the disk (at 15,000 uploads in a few seconds, most of the time), and
    /// a descriptor lost to a power failure is uploaded again by its relay
    /// (a file left empty is dropped as the store loads).
    pub fn put(&self, id: &[u8; 32], bytes: &[u8]) -> Result<(), DirError> {
        replace_unsynced(&self.path(id), bytes, 0o600)
    }

    /// Forget relay `id`'s descriptor.
    pub fn remove(&self, id: &[u8; 32]) -> Result<(), DirError> {
        let p = self.path(id);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DirError::io(&p, e)),
            _ => Ok(()),
        }
    }

    /// Every descriptor held, as stored (not yet verified), with the name
    /// of its file; a legacy single file is moved into the directory first.
    /// Leftover temporary files are removed; files of other names, or
    /// larger than a descriptor can be, are skipped.
    pub fn load(&self) -> Result<Vec<Stored>, DirError> {
        private_dir(&self.dir)?;
        if let Ok(b) = std::fs::read(&self.legacy) {
            let list: Vec<Vec<u8>> = postcard::from_bytes(&b).unwrap_or_default();
            for d in &list {
                if let Ok(u) = allium_proto::UnverifiedDescriptor::parse(d) {
                    self.put(&u.descriptor().identity, d)?;
                }
            }
            std::fs::remove_file(&self.legacy).map_err(|e| DirError::io(&self.legacy, e))?;
        }
        let mut out = Vec::new();
        for (name, len, path) in files(&self.dir)? {
            let mut id = [0u8; 32];
            if hex::decode_to_slice(&name, &mut id).is_ok()
                && len <= MAX_DESCRIPTOR_LEN as u64
                && let Ok(b) = std::fs::read(path)
            {
                out.push((id, b));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The files in `dir` (created if missing, 0700): name, length and path
/// of each. Leftover temporary files of [`write_atomic`] are removed.
fn files(dir: &Path) -> Result<Vec<(String, u64, PathBuf)>, DirError> {
    private_dir(dir)?;
    let entries = std::fs::read_dir(dir).map_err(|e| DirError::io(dir, e))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        } else if let Ok(m) = e.metadata()
            && m.is_file()
        {
            out.push((name, m.len(), e.path()));
        }
    }
    Ok(out)
}

/// The votes held on disk: see the module's documentation.
pub struct VoteStore {
    dir: PathBuf,
    /// Where an older authority kept them all, in one file rewritten on
    /// each vote: removed unread (votes of other periods are of no use).
    legacy: PathBuf,
}

impl VoteStore {
    /// The store under `state` (the authority's `data_dir/state`).
    pub fn new(state: &Path) -> Self {
        VoteStore {
            dir: state.join("votes.d"),
            legacy: state.join("votes"),
        }
    }

    fn path(&self, valid_after: u64, authority: &[u8; 32]) -> PathBuf {
        self.dir
            .join(format!("{valid_after}-{}", hex::encode(authority)))
    }

    /// Write `authority`'s vote for the period starting at `valid_after`.
    pub fn put(
        &self,
        valid_after: u64,
        authority: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(), DirError> {
        write_atomic(&self.path(valid_after, authority), bytes, 0o600)
    }

    /// Remove the votes of the periods that start before `keep_from`.
    pub fn prune(&self, keep_from: u64) -> Result<(), DirError> {
        for (va, _, path) in self.files()? {
            if va < keep_from {
                std::fs::remove_file(&path).map_err(|e| DirError::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// The votes held, as stored (not yet verified). Leftover temporary
    /// files are removed; files of other names, or larger than a vote can
    /// be, are skipped.
    pub fn load(&self) -> Result<Vec<Vec<u8>>, DirError> {
        if self.legacy.exists() {
            std::fs::remove_file(&self.legacy).map_err(|e| DirError::io(&self.legacy, e))?;
        }
        let mut out = Vec::new();
        for (_, len, path) in self.files()? {
            if len <= MAX_VOTE_LEN as u64
                && let Ok(b) = std::fs::read(&path)
            {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// The vote files: period start, length and path of each.
    fn files(&self) -> Result<Vec<(u64, u64, PathBuf)>, DirError> {
        let mut out: Vec<_> = files(&self.dir)?
            .into_iter()
            .filter_map(|(name, len, path)| {
                let (va, auth) = name.split_once('-')?;
                let mut id = [0u8; 32];
                hex::decode_to_slice(auth, &mut id).ok()?;
                Some((va.parse::<u64>().ok()?, len, path))
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_vote_written_alone_and_pruned_by_period() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("votes"), b"all the votes, old style").unwrap();
        let s = VoteStore::new(d.path());
        assert!(s.load().unwrap().is_empty());
        assert!(!d.path().join("votes").exists(), "the old file is gone");
        s.put(600, &[1; 32], b"a at 600").unwrap();
        s.put(600, &[2; 32], b"b at 600").unwrap();
        let ino = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(s.path(600, &[2; 32])).unwrap().ino()
        };
        let b = ino();
        s.put(1200, &[1; 32], b"a at 1200").unwrap();
        assert_eq!(ino(), b, "another vote's file is not rewritten");
        std::fs::write(d.path().join("votes.d/.x.0.tmp"), b"partial").unwrap();
        std::fs::write(d.path().join("votes.d/notes"), b"?").unwrap();
        std::fs::write(d.path().join("votes.d/5-ab"), b"?").unwrap();
        std::fs::write(s.path(1800, &[3; 32]), vec![0u8; MAX_VOTE_LEN + 1]).unwrap();
        assert_eq!(
            s.load().unwrap(),
            [&b"a at 600"[..], b"b at 600", b"a at 1200"]
        );
        assert!(!d.path().join("votes.d/.x.0.tmp").exists());
        s.prune(1200).unwrap();
        assert_eq!(s.load().unwrap(), [&b"a at 1200"[..]]);
        assert!(d.path().join("votes.d/notes").exists(), "not a vote: left");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path(1200, &[1; 32]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn one_file_per_relay_replaced_and_removed_alone() {
        let d = tempfile::tempdir().unwrap();
        let s = DescriptorStore::new(d.path());
        assert!(s.load().unwrap().is_empty());
        s.put(&[1; 32], b"one").unwrap();
        s.put(&[2; 32], b"two").unwrap();
        let ino = |id: &[u8; 32]| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(s.path(id)).unwrap().ino()
        };
        let two = ino(&[2; 32]);
        s.put(&[1; 32], b"one again").unwrap();
        assert_eq!(ino(&[2; 32]), two, "another relay's file is not rewritten");
        std::fs::write(d.path().join("descriptors.d/.x.0.tmp"), b"partial").unwrap();
        std::fs::write(d.path().join("descriptors.d/notes"), b"?").unwrap();
        std::fs::write(s.path(&[3; 32]), vec![0u8; MAX_DESCRIPTOR_LEN + 1]).unwrap();
        assert_eq!(
            s.load().unwrap(),
            vec![([1; 32], b"one again".to_vec()), ([2; 32], b"two".to_vec())]
        );
        assert!(!d.path().join("descriptors.d/.x.0.tmp").exists());
        s.remove(&[1; 32]).unwrap();
        s.remove(&[1; 32]).unwrap();
        assert_eq!(s.load().unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path(&[2; 32]))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
