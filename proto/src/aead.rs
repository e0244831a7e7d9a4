//! AES-256-GCM (NIST SP 800-38D) on `aws-lc-rs`: the one AEAD of the link
//! and the onion layers.
//!
//! Everything is a whole-message seal or open: a relay's layer opens or
//! seals one cell, the link seals or opens one frame. The onion layers also
//! need the bare keystream (a relay's backward layer on a cell it passes
//! on, and the client's filler): [`keystream`] is the encryption half of a
//! seal, whose tag is dropped.
//!
//! Why AES-GCM, and why this library (`doc/performance.md` has the
//! figures): on processors with AES instructions (x86-64 since 2010, ARMv8
//! with its crypto extension) AES-256-GCM seals a 509-byte cell in well
//! under half the time of ChaCha20-Poly1305, and `aws-lc-rs` (AWS-LC's
//! assembly, with a VAES/AVX-512 path) is the fastest of the libraries
//! measured; without AES instructions it uses constant-time code, slower
//! but safe. Its expanded keys live in memory AWS-LC wipes when it frees
//! them.
//!
//! Nonce layout, shared with Noise's `AESGCM`: 4 zero bytes followed by a
//! 64-bit big-endian counter. A key is only ever used with counters that
//! its owner increments, so a (key, nonce) pair never repeats.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

pub const KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key, expanded once (the key schedule and the GHASH
/// tables cost about as much as sealing a cell); the 32 key bytes are not
/// kept. A key made [`Key::with_keystream`] also holds the bare AES-256
/// counter mode of the same key, for [`keystream_at`]: the tail of a
/// keystream without the blocks before it (about 500 bytes more, so only
/// the keys that need it have it).
pub struct Key {
    gcm: LessSafeKey,
    ctr: Option<Box<EncryptingKey>>,
}

impl Key {
    pub fn new(k: &[u8; KEY_LEN]) -> Self {
        Key {
            gcm: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("a 32-byte AES-256 key")),
            ctr: None,
        }
    }

    /// A key that also makes any part of its keystreams on its own.
    pub fn with_keystream(k: &[u8; KEY_LEN]) -> Self {
        let ctr = UnboundCipherKey::new(&AES_256, k)
            .and_then(EncryptingKey::ctr)
            .expect("a 32-byte AES-256 key");
        Key {
            ctr: Some(Box::new(ctr)),
            ..Key::new(k)
        }
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn seal_raw(k: &Key, nonce: [u8; 12], ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let tag = k
        .gcm
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), buf)
        .expect("messages far below GCM's limit");
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag.as_ref());
    t
}

fn open_raw(k: &Key, nonce: [u8; 12], ad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
    let ok = k
        .gcm
        .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), tag, buf)
        .is_ok();
    if !ok {
        // Nothing unauthenticated is left behind.
        buf.fill(0);
    }
    ok
}

/// Whole-message seal and open under `(key, 0^4 | counter be)`.
pub mod whole {
    use super::{Key, TAG_LEN, nonce, open_raw, seal_raw};

    /// Encrypt `buf` in place; returns the tag.
    pub fn seal(k: &Key, counter: u64, ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        seal_raw(k, nonce(counter), ad, buf)
    }

    /// Check `tag` and decrypt `buf` in place; on failure `buf` is zeroed.
    pub fn open(k: &Key, counter: u64, ad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
        open_raw(k, nonce(counter), ad, buf, tag)
    }
}

/// XOR the keystream of `(key, counter)` into `buf`: exactly what a seal
/// under that pair does to its message (GCM's counter mode from block 2
/// on), without the tag.
pub fn keystream(key: &Key, counter: u64, buf: &mut [u8]) {
    // As fast as counter mode alone for a cell (the stitched GHASH costs
    // next to nothing), and every key has it.
    whole::seal(key, counter, &[], buf);
}

/// XOR bytes `offset..offset + buf.len()` of the keystream of
/// `(key, counter)` into `buf`. GCM encrypts block `i` of a message under
/// the counter block `nonce | 2 + i` (32-bit big-endian), so that is
/// AES-256 in counter mode from block `2 + offset / 16`, less the first
/// `offset % 16` bytes. A key without [`Key::with_keystream`] computes it
/// as a seal of the bytes up to `offset + buf.len()`.
pub fn keystream_at(key: &Key, counter: u64, offset: usize, buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    let Some(ctr) = &key.ctr else {
        let mut whole = zeroize::Zeroizing::new(vec![0u8; offset + buf.len()]);
        whole::seal(key, counter, &[], &mut whole);
        for (b, k) in buf.iter_mut().zip(&whole[offset..]) {
            *b ^= k;
        }
        return;
    };
    let block = u32::try_from(offset / 16 + 2).expect("offsets far below GCM's limit");
    let mut iv = [0u8; 16];
    iv[..12].copy_from_slice(&nonce(counter));
    iv[12..].copy_from_slice(&block.to_be_bytes());
    let skip = offset % 16;
    let crypt = |data: &mut [u8], iv: [u8; 16]| {
        ctr.less_safe_encrypt(data, EncryptionContext::Iv128(iv.into()))
            .expect("counter mode takes any length");
    };
    if skip == 0 {
        crypt(buf, iv);
        return;
    }
    // Start at the block boundary: the bytes before `offset` are scratch.
    let mut head = [0u8; 16];
    let first = buf.len().min(16 - skip);
    head[skip..skip + first].copy_from_slice(&buf[..first]);
    crypt(&mut head, iv);
    buf[..first].copy_from_slice(&head[skip..skip + first]);
    head.zeroize();
    if buf.len() > first {
        iv[12..].copy_from_slice(&(block + 1).to_be_bytes());
        crypt(&mut buf[first..], iv);
    }
}

pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// The AES-256 cases of "The Galois/Counter Mode of Operation (GCM)",
    /// McGrew and Viega (revised spec, the vectors NIST SP 800-38D
    /// adopted): test cases 13, 14 and 16.
    #[test]
    fn matches_the_gcm_specification_vectors() {
        let cases = [
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                "000000000000000000000000",
                "",
                "",
                "",
                "530f8afbc74536b9a963b4f1c4cb738b",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                "000000000000000000000000",
                "",
                "00000000000000000000000000000000",
                "cea7403d4d606b6e074ec5d3baf39d18",
                "d0d1c8a799996bf0265b98b5d48ab919",
            ),
            (
                "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
                "cafebabefacedbaddecaf888",
                "feedfacedeadbeeffeedfacedeadbeefabaddad2",
                "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
                 1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
                "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
                 8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
                "76fc6ece0f4e1768cddf8853bb2d551b",
            ),
        ];
        for (k, iv, ad, pt, ct, tag) in cases {
            let k = Key::new(&h(k).try_into().unwrap());
            let iv: [u8; 12] = h(iv).try_into().unwrap();
            let strip = |s: &str| s.split_whitespace().collect::<String>();
            let (pt, ct) = (h(&strip(pt)), h(&strip(ct)));
            let mut buf = pt.clone();
            let t = seal_raw(&k, iv, &h(ad), &mut buf);
            assert_eq!(buf, ct);
            assert_eq!(hex::encode(t), tag);
            assert!(open_raw(&k, iv, &h(ad), &mut buf, &t));
            assert_eq!(buf, pt);
        }
    }

    #[test]
    fn counters_are_big_endian_after_four_zero_bytes() {
        let k = Key::new(&[9u8; 32]);
        let mut a = vec![1u8; 100];
        let mut b = a.clone();
        let ta = whole::seal(&k, 0x0102030405060708, b"ad", &mut a);
        let tb = seal_raw(&k, [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], b"ad", &mut b);
        assert_eq!((a, ta), (b, tb));
    }

    #[test]
    fn keystream_is_the_encryption_half_and_open_checks_everything() {
        let key = Key::new(&[5u8; 32]);
        let fast = Key::with_keystream(&[5u8; 32]);
        for len in [0usize, 1, 15, 16, 17, 493, 509, 65519] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut a = pt.clone();
            keystream(&key, 7, &mut a);
            let mut a2 = pt.clone();
            keystream_at(&fast, 7, 0, &mut a2);
            assert_eq!(a, a2, "counter mode is GCM's keystream, length {len}");
            let mut b = pt.clone();
            let t = whole::seal(&key, 7, &[1], &mut b);
            assert_eq!(a, b);
            assert!(!whole::open(&key, 7, &[0], &mut b.clone(), &t), "other ad");
            assert!(
                !whole::open(&key, 8, &[1], &mut b.clone(), &t),
                "other counter"
            );
            if len > 0 {
                let mut bad = b.clone();
                bad[len - 1] ^= 1;
                assert!(!whole::open(&key, 7, &[1], &mut bad, &t));
            }
            assert!(whole::open(&key, 7, &[1], &mut b, &t));
            assert_eq!(b, pt);
        }
    }

    /// Any part of the keystream, alone, is that part of the whole one,
    /// for offsets on and off the 16-byte blocks and parts that end in,
    /// at or past the first block.
    #[test]
    fn a_part_of_the_keystream_is_that_part_of_the_whole() {
        for key in [Key::new(&[3u8; 32]), Key::with_keystream(&[3u8; 32])] {
            let mut whole = vec![0u8; 509];
            keystream(&key, 1 << 40, &mut whole);
            for offset in [0usize, 1, 15, 16, 17, 33, 445, 461, 477, 493, 508] {
                for len in [0usize, 1, 14, 15, 16, 17, 31, 48, 509 - offset] {
                    let len = len.min(509 - offset);
                    let mut part: Vec<u8> = (0..len).map(|i| i as u8).collect();
                    keystream_at(&key, 1 << 40, offset, &mut part);
                    let want: Vec<u8> = (0..len).map(|i| i as u8 ^ whole[offset + i]).collect();
                    assert_eq!(part, want, "offset {offset}, length {len}");
                }
            }
        }
    }
}
