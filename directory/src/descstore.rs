//! The authority's descriptors on disk, in one log
//! (`state/descriptors.log`, 0600) that an upload appends one record to,
//! and an eviction a shorter one: no file is created or rewritten per
//! upload (at 15,000 uploads in a few seconds, creating a file each took
//! most of the authorities' time), and the bytes written grow with the
//! uploads, not with uploads times the table. Records:
//!
//! ```text
//! 'P' identity[32] len:u32 (big-endian) descriptor[len]   the relay's descriptor, replacing any before
//! 'R' identity[32]                                        the relay's descriptor is dropped
//! ```
//!
//! The last record of each relay counts. Once the log holds more than
//! twice the bytes of the descriptors it keeps (and at least
//! [`COMPACT_SLACK`] more), it is rewritten with those alone, atomically:
//! at most one such rewrite per table's worth of uploads. Records are
//! appended without waiting for the disk: a power failure may lose the
//! last uploads, which their relays make again, or tear the last record,
//! which the next start cuts off (as it does one torn by a failed write:
//! nothing is appended after such a write until the log is read again).
//!
//! Older authorities kept one file per relay (`state/descriptors.d/`),
//! and before that one postcard list (`state/descriptors`): either is read
//! into the log once and removed.
//!
//! Votes are kept one file per vote
//! (`state/votes.d/<period start>-<authority in hex>`): taking a vote
//! writes that vote alone, never the others held.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use allium_proto::doc::{MAX_DESCRIPTOR_LEN, MAX_VOTE_LEN};

use crate::DirError;
use crate::store::{private_dir, write_atomic};

/// A stored descriptor: the relay its record is for, and its bytes.
pub type Stored = ([u8; 32], Vec<u8>);

/// The log is rewritten once it exceeds twice its live records by this
/// much: a small table is not rewritten every few uploads.
pub const COMPACT_SLACK: u64 = 1 << 20;

const PUT: u8 = b'P';
const REMOVE: u8 = b'R';

pub struct DescriptorStore {
    state: PathBuf,
    path: PathBuf,
    /// Open for appending once [`DescriptorStore::load`] has run.
    file: Option<std::fs::File>,
    /// Bytes in the log.
    len: u64,
    /// The length of each held relay's record.
    live: HashMap<[u8; 32], u64>,
    /// Their sum.
    live_len: u64,
}

/// The descriptors `log` holds (the last record of each relay), and the
/// length of the part that parses (a torn last record does not).
fn records(log: &[u8]) -> (BTreeMap<[u8; 32], Vec<u8>>, usize) {
    let mut out = BTreeMap::new();
    let mut at = 0;
    loop {
        let rest = &log[at..];
        let Some((&tag, rest)) = rest.split_first() else {
            break;
        };
        let Some((id, rest)) = rest.split_first_chunk::<32>() else {
            break;
        };
        match tag {
            REMOVE => {
                out.remove(id);
                at += 33;
            }
            PUT => {
                let Some((n, rest)) = rest.split_first_chunk::<4>() else {
                    break;
                };
                let n = u32::from_be_bytes(*n) as usize;
                if n > MAX_DESCRIPTOR_LEN || rest.len() < n {
                    break;
                }
                match n {
                    0 => out.remove(id),
                    _ => out.insert(*id, rest[..n].to_vec()),
                };
                at += 37 + n;
            }
            _ => break,
        }
    }
    (out, at)
}

fn put_record(id: &[u8; 32], bytes: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(37 + bytes.len());
    r.push(PUT);
    r.extend_from_slice(id);
    r.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    r.extend_from_slice(bytes);
    r
}

impl DescriptorStore {
    /// The store under `state` (the authority's `data_dir/state`); nothing
    /// is read until [`DescriptorStore::load`].
    pub fn new(state: &Path) -> Self {
        DescriptorStore {
            state: state.to_path_buf(),
            path: state.join("descriptors.log"),
            file: None,
            len: 0,
            live: HashMap::new(),
            live_len: 0,
        }
    }

    /// Every descriptor held, as stored (not yet verified), by relay.
    /// Descriptors an older authority stored are taken into the log
    /// first; a torn last record is cut off, and a log of more than its
    /// live records rewritten with those alone.
    pub fn load(&mut self) -> Result<Vec<Stored>, DirError> {
        private_dir(&self.state)?;
        let mut held = self.read_log()?;
        let mut taken = false;
        let legacy = self.state.join("descriptors");
        if let Ok(b) = std::fs::read(&legacy) {
            let list: Vec<Vec<u8>> = postcard::from_bytes(&b).unwrap_or_default();
            for d in list {
                if let Ok(u) = allium_proto::UnverifiedDescriptor::parse(&d) {
                    held.insert(u.descriptor().identity, d);
                }
            }
            taken = true;
        }
        let dir = self.state.join("descriptors.d");
        if dir.is_dir() {
            for (name, len, path) in files(&dir)? {
                let mut id = [0u8; 32];
                if hex::decode_to_slice(&name, &mut id).is_ok()
                    && (1..=MAX_DESCRIPTOR_LEN as u64).contains(&len)
                    && let Ok(b) = std::fs::read(path)
                {
                    held.insert(id, b);
                }
            }
            taken = true;
        }
        self.live = held
            .iter()
            .map(|(id, b)| (*id, 37 + b.len() as u64))
            .collect();
        self.live_len = self.live.values().sum();
        if taken || self.len > self.live_len {
            self.rewrite(&held)?;
        }
        if taken {
            let _ = std::fs::remove_file(&legacy);
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir).map_err(|e| DirError::io(&dir, e))?;
            }
        }
        Ok(held.into_iter().collect())
    }

    /// The log's records, the last of each relay (an empty log if there
    /// is none), with a torn end cut off; opens it for appending.
    fn read_log(&mut self) -> Result<BTreeMap<[u8; 32], Vec<u8>>, DirError> {
        let file = self.open_append()?;
        let io = |e| DirError::io(&self.path, e);
        let log = std::fs::read(&self.path).map_err(io)?;
        let (held, good) = records(&log);
        if good < log.len() {
            file.set_len(good as u64).map_err(io)?;
        }
        self.file = Some(file);
        self.len = good as u64;
        Ok(held)
    }

    fn open_append(&self) -> Result<std::fs::File, DirError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| DirError::io(&self.path, e))
    }

    /// Replace the log with `held` alone.
    fn rewrite(&mut self, held: &BTreeMap<[u8; 32], Vec<u8>>) -> Result<(), DirError> {
        let mut log = Vec::with_capacity(self.live_len as usize);
        for (id, b) in held {
            log.extend_from_slice(&put_record(id, b));
        }
        self.file = None;
        write_atomic(&self.path, &log, 0o600)?;
        self.file = Some(self.open_append()?);
        self.len = log.len() as u64;
        Ok(())
    }

    /// Read the log unless that is done (or a write failed since).
    fn ready(&mut self) -> Result<(), DirError> {
        if self.file.is_none() {
            self.load()?;
        }
        Ok(())
    }

    /// Append `record`, the held lengths already counting it.
    fn append(&mut self, record: &[u8]) -> Result<(), DirError> {
        let Some(file) = self.file.as_mut() else {
            return Err(DirError::io(
                &self.path,
                std::io::Error::other("the log is not open"),
            ));
        };
        if let Err(e) = file.write_all(record) {
            // What part of the record got written is cut off on the next
            // load; nothing is appended after it before then.
            self.file = None;
            return Err(DirError::io(&self.path, e));
        }
        self.len += record.len() as u64;
        if self.len > 2 * self.live_len + COMPACT_SLACK {
            let held = self.read_log()?;
            self.rewrite(&held)?;
        }
        Ok(())
    }

    /// Write relay `id`'s descriptor, replacing the one held, without
    /// waiting for the disk (see the module's documentation).
    pub fn put(&mut self, id: &[u8; 32], bytes: &[u8]) -> Result<(), DirError> {
        self.ready()?;
        let r = put_record(id, bytes);
        let n = r.len() as u64;
        self.live_len += n;
        self.live_len -= self.live.insert(*id, n).unwrap_or(0);
        self.append(&r)
    }

    /// Forget relay `id`'s descriptor.
    pub fn remove(&mut self, id: &[u8; 32]) -> Result<(), DirError> {
        self.ready()?;
        if !self.live.contains_key(id) {
            return Ok(());
        }
        self.live_len -= self.live.remove(id).unwrap_or(0);
        let mut r = vec![REMOVE];
        r.extend_from_slice(id);
        self.append(&r)
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
    fn one_log_appended_cut_where_torn_and_rewritten_when_mostly_old() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("descriptors.log");
        let size = || std::fs::metadata(&log).unwrap().len();
        // An older authority's files, one per relay: taken in, then gone.
        let old = d.path().join("descriptors.d");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join(hex::encode([3; 32])), b"three").unwrap();
        std::fs::write(old.join(hex::encode([4; 32])), b"").unwrap();
        std::fs::write(old.join(".x.0.tmp"), b"partial").unwrap();
        let mut s = DescriptorStore::new(d.path());
        assert_eq!(s.load().unwrap(), vec![([3; 32], b"three".to_vec())]);
        assert!(!old.exists());
        s.put(&[1; 32], b"one").unwrap();
        s.put(&[2; 32], b"two").unwrap();
        s.put(&[1; 32], b"one again").unwrap();
        s.remove(&[3; 32]).unwrap();
        s.remove(&[3; 32]).unwrap();
        assert_eq!(size(), 37 + 5 + 3 * 37 + 3 + 3 + 9 + 33, "appended only");
        // A write torn by a power failure: cut off.
        let mut torn = put_record(&[5; 32], b"five");
        torn.truncate(40);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        let mut s = DescriptorStore::new(d.path());
        let want = vec![([1; 32], b"one again".to_vec()), ([2; 32], b"two".to_vec())];
        assert_eq!(s.load().unwrap(), want);
        assert_eq!(size(), 2 * 37 + 9 + 3, "rewritten with the records held");
        // Uploads again and again: rewritten once the old records are
        // more than the held ones and the slack.
        let big = vec![7u8; MAX_DESCRIPTOR_LEN];
        let rec = 37 + MAX_DESCRIPTOR_LEN as u64;
        let mut largest = 0;
        for _ in 0..2 * COMPACT_SLACK / rec {
            s.put(&[7; 32], &big).unwrap();
            largest = largest.max(size());
        }
        assert!(largest <= 2 * (rec + 49) + COMPACT_SLACK + rec);
        assert!(size() < COMPACT_SLACK, "rewritten at least once");
        let mut want = want;
        want.push(([7; 32], big));
        assert_eq!(DescriptorStore::new(d.path()).load().unwrap(), want);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
