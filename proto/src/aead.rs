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
use subtle::ConstantTimeEq;

pub const KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key, expanded once (the key schedule and the GHASH
/// tables cost about as much as sealing a cell); the 32 key bytes are not
/// kept.
pub struct Key(LessSafeKey);

impl Key {
    pub fn new(k: &[u8; KEY_LEN]) -> Self {
        Key(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, k).expect("a 32-byte AES-256 key"),
        ))
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn seal_raw(k: &Key, nonce: [u8; 12], ad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
    let tag =
        k.0.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(ad), buf)
            .expect("messages far below GCM's limit");
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag.as_ref());
    t
}

fn open_raw(k: &Key, nonce: [u8; 12], ad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> bool {
    let ok = k
        .0
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
    whole::seal(key, counter, &[], buf);
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
        for len in [0usize, 1, 15, 16, 17, 493, 509, 65519] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut a = pt.clone();
            keystream(&key, 7, &mut a);
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
}
