//! Published test vectors that this project did not compute, for every
//! primitive Allium uses and for its two Noise patterns.
//!
//! `tests/vectors.rs` pins the bytes of `doc/protocol.md` to the code, but
//! those vectors come from this implementation. The ones here come from the
//! standards and from an independent Noise implementation, and each runs
//! through the code path the project uses: its own wrappers where they are
//! public (`aead::whole`, `SignedDocument::{sign, check, digest}`,
//! `OnionSecret`), otherwise the library calls exactly as the project makes
//! them (`verify_strict`, `Hkdf::<Sha256>::new(Some(salt), ikm)`,
//! `ChaCha20Rng::from_seed`, `LessSafeKey::seal_in_place_separate_tag`).
//! The Noise vectors run snow on the link's own primitives
//! (`link::NoiseResolver`, the resolver of `src/link/noise.rs`).
//!
//! | primitive | vectors | source |
//! | --- | --- | --- |
//! | AES-256-GCM | test cases 13 to 16 | McGrew and Viega, "The Galois/Counter Mode of Operation (GCM)", revised 2005, appendix B |
//! | ChaCha20 (the RNG) | block function, encryption, two keystream blocks | RFC 8439 sections 2.3.2, 2.4.2, appendix A.1 test vectors 1 and 2 |
//! | X25519 | two scalar multiplications, the iterated ladder (1 and 1000), Alice and Bob | RFC 7748 sections 5.2 and 6.1 |
//! | HKDF-SHA256 | test cases 1 to 3 | RFC 5869 appendix A.1 to A.3 |
//! | Ed25519 | TEST 1, 2, 3, 1024 | RFC 8032 section 7.1 |
//! | SHA-256 | "abc", the 448-bit message, a million "a" | FIPS 180-2 appendix B |
//! | SHA-512 | "abc", the 896-bit message | FIPS 180-2 appendix C |
//! | Noise | `Noise_NK_25519_AESGCM_SHA256`, `Noise_XK_25519_AESGCM_SHA256` | Cacophony's vectors, `tests/data/noise-cacophony.json` |
//!
//! Left out: GCM test cases 17 and 18 use a 64-bit and a 480-bit IV; GCM
//! then derives its first counter block with GHASH, a path that neither
//! `aws-lc-rs`'s AEAD API (96-bit nonces only) nor the project (always
//! `0^4 | counter`) ever takes. The millionth iteration of RFC 7748's ladder
//! is left out for time.

#![allow(clippy::unwrap_used)]

use allium_proto::AuthSigned;
use allium_proto::aead::{self, Key, TAG_LEN, whole};
use allium_proto::doc::{DocSignature, Sig, SignedDocument};
use allium_proto::link::{NK_PARAMS, NoiseResolver, XK_PARAMS};
use allium_proto::ntor::OnionSecret;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use chacha20::ChaCha20Rng;
use ed25519_dalek::hazmat::{ExpandedSecretKey, raw_sign};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand_core::{Rng, SeedableRng};
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha512};
use snow::params::NoiseParams;
use snow::{Builder, HandshakeState};
use x25519_dalek::{PublicKey, StaticSecret};

/// Hex to bytes; whitespace is ignored so that long values can be wrapped
/// as the documents print them.
fn h(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    hex::decode(s).unwrap()
}

fn h32(s: &str) -> [u8; 32] {
    h(s).try_into().unwrap()
}

fn h64(s: &str) -> [u8; 64] {
    h(s).try_into().unwrap()
}

// ---------------------------------------------------------------------------
// AES-256-GCM

struct Gcm {
    name: &'static str,
    key: &'static str,
    iv: &'static str,
    ad: &'static str,
    pt: &'static str,
    ct: &'static str,
    tag: &'static str,
}

/// McGrew and Viega, "The Galois/Counter Mode of Operation (GCM)", revised
/// 2005, appendix B: the AES-256 test cases with a 96-bit IV.
const GCM: [Gcm; 4] = [
    Gcm {
        name: "GCM test case 13",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        ad: "",
        pt: "",
        ct: "",
        tag: "530f8afbc74536b9a963b4f1c4cb738b",
    },
    Gcm {
        name: "GCM test case 14",
        key: "0000000000000000000000000000000000000000000000000000000000000000",
        iv: "000000000000000000000000",
        ad: "",
        pt: "00000000000000000000000000000000",
        ct: "cea7403d4d606b6e074ec5d3baf39d18",
        tag: "d0d1c8a799996bf0265b98b5d48ab919",
    },
    Gcm {
        name: "GCM test case 15",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        ad: "",
        pt: "d9313225f88406e5a55909c5aff5269a 86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525 b16aedf5aa0de657ba637b391aafd255",
        ct: "522dc1f099567d07f47f37a32a84427d 643a8cdcbfe5c0c97598a2bd2555d1aa
             8cb08e48590dbb3da7b08b1056828838 c5f61e6393ba7a0abcc9f662898015ad",
        tag: "b094dac5d93471bdec1a502270e3cc6c",
    },
    Gcm {
        name: "GCM test case 16",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv: "cafebabefacedbaddecaf888",
        ad: "feedfacedeadbeeffeedfacedeadbeefabaddad2",
        pt: "d9313225f88406e5a55909c5aff5269a 86a7a9531534f7da2e4c303d8a318a72
             1c3c0c95956809532fcf0e2449a6b525 b16aedf5aa0de657ba637b39",
        ct: "522dc1f099567d07f47f37a32a84427d 643a8cdcbfe5c0c97598a2bd2555d1aa
             8cb08e48590dbb3da7b08b1056828838 c5f61e6393ba7a0abcc9f662",
        tag: "76fc6ece0f4e1768cddf8853bb2d551b",
    },
];

/// Every case through `aws-lc-rs` called as `src/aead.rs` calls it: a
/// `LessSafeKey` on `AES_256_GCM`, sealed and opened in place with a
/// separate tag.
#[test]
fn aes_256_gcm_through_aws_lc_rs_as_the_aead_module_calls_it() {
    for v in &GCM {
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &h(v.key)).unwrap());
        let iv: [u8; 12] = h(v.iv).try_into().unwrap();
        let (ad, pt, ct, tag) = (h(v.ad), h(v.pt), h(v.ct), h(v.tag));
        let mut buf = pt.clone();
        let t = k
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(iv), Aad::from(&ad), &mut buf)
            .unwrap();
        assert_eq!(buf, ct, "{}: ciphertext", v.name);
        assert_eq!(t.as_ref(), &tag[..], "{}: tag", v.name);
        let out = k
            .open_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(&ad),
                &tag,
                &mut buf,
            )
            .unwrap();
        assert_eq!(out, &pt[..], "{}: opened", v.name);
        let mut bad = tag.clone();
        bad[15] ^= 0x80;
        let mut buf = ct.clone();
        assert!(
            k.open_in_place_separate_tag(
                Nonce::assume_unique_for_key(iv),
                Aad::from(&ad),
                &bad,
                &mut buf
            )
            .is_err(),
            "{}: a flipped tag bit must fail",
            v.name
        );
    }
}

/// Cases 13 and 14 have the all-zero IV, which is the project's nonce
/// layout `0^4 | counter` with counter 0: they run through the project's
/// own `aead::whole::{seal, open}` and `aead::keystream`. Cases 15 and 16
/// (IV `cafebabe...`) have no counter the layout can express.
#[test]
fn aes_256_gcm_through_the_projects_seal_and_open_where_the_nonce_fits() {
    for v in &GCM[..2] {
        assert_eq!(h(v.iv), [0u8; 12], "{}: nonce is 0^4 | 0", v.name);
        let k = Key::new(&h32(v.key));
        let (ad, pt, ct, tag) = (h(v.ad), h(v.pt), h(v.ct), h(v.tag));
        let mut buf = pt.clone();
        let t = whole::seal(&k, 0, &ad, &mut buf);
        assert_eq!(buf, ct, "{}: ciphertext", v.name);
        assert_eq!(&t[..], &tag[..], "{}: tag", v.name);
        let mut ks = pt.clone();
        aead::keystream(&k, 0, &mut ks);
        assert_eq!(ks, ct, "{}: keystream", v.name);
        let t: [u8; TAG_LEN] = tag.clone().try_into().unwrap();
        assert!(whole::open(&k, 0, &ad, &mut buf, &t), "{}: open", v.name);
        assert_eq!(buf, pt, "{}: opened", v.name);
        let mut bad = t;
        bad[0] ^= 1;
        let mut buf = ct.clone();
        assert!(!whole::open(&k, 0, &ad, &mut buf, &bad), "{}", v.name);
        assert!(!whole::open(&k, 1, &ad, &mut ct.clone(), &t), "{}", v.name);
    }
}

/// Why cases 17 and 18 are not run: their IVs (8 and 60 bytes) cannot even
/// be expressed as a nonce of the AEAD API the project uses.
#[test]
fn gcm_cases_17_and_18_have_ivs_the_api_does_not_take() {
    let iv17 = h("cafebabefacedbad");
    let iv18 = h(
        "9313225df88406e555909c5aff5269aa 6a7a9538534f7da1e4c303d2a318a728
         c3c0c95156809539fcf0e2429a6b5254 16aedbf5a0de6a57a637b39b",
    );
    assert_eq!((iv17.len(), iv18.len()), (8, 60));
    assert!(Nonce::try_assume_unique_for_key(&iv17).is_err());
    assert!(Nonce::try_assume_unique_for_key(&iv18).is_err());
}

// ---------------------------------------------------------------------------
// ChaCha20: the project uses it only as `ChaCha20Rng` (the seeded RNG of
// the link handshakes), so the keystream vectors run on that type. Its
// state is the RFC's with words 12-13 a 64-bit block counter and words
// 14-15 the stream: an RFC 8439 nonce `n0 | n1 | n2` (three little-endian
// words) with block counter `c` is `set_stream(n1 | n2 << 32)` then
// `set_word_pos(16 * (c | n0 << 32))`.

fn chacha_rng(key: [u8; 32], nonce: [u8; 12], counter: u32) -> ChaCha20Rng {
    let word = |i: usize| {
        u64::from(u32::from_le_bytes(
            nonce[4 * i..4 * i + 4].try_into().unwrap(),
        ))
    };
    let mut rng = ChaCha20Rng::from_seed(key);
    rng.set_stream(word(1) | word(2) << 32);
    rng.set_word_pos(16 * u128::from(u64::from(counter) | word(0) << 32));
    rng
}

fn key_0_to_31() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

/// RFC 8439 section 2.3.2: the block function's serialized output.
#[test]
fn chacha20_block_function_rfc8439_2_3_2() {
    let mut rng = chacha_rng(
        key_0_to_31(),
        h("000000090000004a00000000").try_into().unwrap(),
        1,
    );
    let mut out = [0u8; 64];
    rng.fill_bytes(&mut out);
    assert_eq!(
        out,
        h64(
            "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e
             d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
        )
    );
}

/// RFC 8439 section 2.4.2: the 114-byte "sunscreen" plaintext encrypted
/// from block counter 1 (the keystream crosses into block 2).
#[test]
fn chacha20_encryption_rfc8439_2_4_2() {
    let mut rng = chacha_rng(
        key_0_to_31(),
        h("000000000000004a00000000").try_into().unwrap(),
        1,
    );
    let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let mut ks = vec![0u8; pt.len()];
    rng.fill_bytes(&mut ks);
    let ct: Vec<u8> = pt.iter().zip(&ks).map(|(p, k)| p ^ k).collect();
    assert_eq!(
        ct,
        h(
            "6e2e359a2568f98041ba0728dd0d6981 e97e7aec1d4360c20a27afccfd9fae0b
             f91b65c5524733ab8f593dabcd62b357 1639d624e65152ab8f530c359f0861d8
             07ca0dbf500d6a6156a38e088a22b65e 52bc514d16ccf806818ce91ab7793736
             5af90bbf74a35be6b40b8eedf2785e42 874d"
        )
    );
}

/// RFC 8439 appendix A.1, test vectors 1 and 2: the all-zero key and nonce
/// at block counters 0 and 1, which is exactly what `from_seed` then
/// `fill_bytes` gives (the project's own use, with its own seed).
#[test]
fn chacha20_rng_from_seed_is_the_rfc8439_keystream() {
    let mut rng = ChaCha20Rng::from_seed([0; 32]);
    let mut out = [0u8; 128];
    rng.fill_bytes(&mut out);
    assert_eq!(
        out[..64],
        h64(
            "76b8e0ada0f13d90405d6ae55386bd28 bdd219b8a08ded1aa836efcc8b770dc7
             da41597c5157488d7724e03fb8d84a37 6a43b8f41518a11cc387b669b2ee6586"
        )
    );
    assert_eq!(
        out[64..],
        h64(
            "9f07e7be5551387a98ba977c732d080d cb0f29a048e3656912c6533e32ee7aed
             29b721769ce64e43d57133b074d839d5 31ed1f28510afb45ace10a1f4b794d6f"
        )
    );
}

// ---------------------------------------------------------------------------
// X25519, through the x25519-dalek types the project uses (`StaticSecret`,
// `PublicKey`, `diffie_hellman`, as `ntor.rs` and `link/noise.rs` do) and
// its own `OnionSecret` for the public key.

fn x25519(k: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    StaticSecret::from(k)
        .diffie_hellman(&PublicKey::from(u))
        .to_bytes()
}

/// RFC 7748 section 5.2: the two scalar multiplications (the second input
/// has its top bit set, which X25519 must ignore).
#[test]
fn x25519_scalar_multiplication_rfc7748_5_2() {
    assert_eq!(
        x25519(
            h32("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
            h32("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"),
        ),
        h32("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    );
    assert_eq!(
        x25519(
            h32("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d"),
            h32("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493"),
        ),
        h32("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957")
    );
}

/// RFC 7748 section 5.2, the iterated ladder from `k = u = 9`: after 1 and
/// after 1000 iterations.
#[test]
fn x25519_iterated_rfc7748_5_2() {
    let mut k = [0u8; 32];
    k[0] = 9;
    let mut u = k;
    for i in 1..=1000 {
        let r = x25519(k, u);
        u = k;
        k = r;
        if i == 1 {
            assert_eq!(
                k,
                h32("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
            );
        }
    }
    assert_eq!(
        k,
        h32("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")
    );
}

/// RFC 7748 section 6.1: Alice's and Bob's public keys (through the
/// project's `OnionSecret`) and their shared secret, both ways.
#[test]
fn x25519_diffie_hellman_rfc7748_6_1() {
    let alice = h32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
    let alice_pub = h32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    let bob = h32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
    let bob_pub = h32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
    let shared = h32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(
        OnionSecret::new(StaticSecret::from(alice)).public().0,
        alice_pub
    );
    assert_eq!(
        OnionSecret::new(StaticSecret::from(bob)).public().0,
        bob_pub
    );
    let a = StaticSecret::from(alice).diffie_hellman(&PublicKey::from(bob_pub));
    let b = StaticSecret::from(bob).diffie_hellman(&PublicKey::from(alice_pub));
    assert!(a.was_contributory() && b.was_contributory());
    assert_eq!(a.to_bytes(), shared);
    assert_eq!(b.to_bytes(), shared);
}

// ---------------------------------------------------------------------------
// HKDF-SHA256, called as `ntor.rs` calls it: `Hkdf::<Sha256>::new(Some(salt),
// ikm)` then `expand`.

struct HkdfCase {
    name: &'static str,
    ikm: Vec<u8>,
    salt: Vec<u8>,
    info: Vec<u8>,
    prk: &'static str,
    okm: &'static str,
}

fn hkdf_cases() -> [HkdfCase; 3] {
    let range = |a: u8, b: u8| (a..=b).collect::<Vec<u8>>();
    [
        // RFC 5869 appendix A.1, test case 1.
        HkdfCase {
            name: "RFC 5869 A.1",
            ikm: vec![0x0b; 22],
            salt: range(0x00, 0x0c),
            info: range(0xf0, 0xf9),
            prk: "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
            okm: "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf
                  34007208d5b887185865",
        },
        // RFC 5869 appendix A.2, test case 2 (longer inputs and output).
        HkdfCase {
            name: "RFC 5869 A.2",
            ikm: range(0x00, 0x4f),
            salt: range(0x60, 0xaf),
            info: range(0xb0, 0xff),
            prk: "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
            okm: "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c
                  59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71
                  cc30c58179ec3e87c14c01d5c1f3434f1d87",
        },
        // RFC 5869 appendix A.3, test case 3 (zero-length salt and info).
        HkdfCase {
            name: "RFC 5869 A.3",
            ikm: vec![0x0b; 22],
            salt: vec![],
            info: vec![],
            prk: "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
            okm: "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d
                  9d201395faa4b61a96c8",
        },
    ]
}

#[test]
fn hkdf_sha256_rfc5869_test_cases_1_to_3() {
    for c in hkdf_cases() {
        let expected = h(c.okm);
        let mut okm = vec![0u8; expected.len()];
        Hkdf::<Sha256>::new(Some(&c.salt), &c.ikm)
            .expand(&c.info, &mut okm)
            .unwrap();
        assert_eq!(okm, expected, "{}: OKM", c.name);
        let (prk, _) = Hkdf::<Sha256>::extract(Some(&c.salt), &c.ikm);
        assert_eq!(prk[..], h(c.prk)[..], "{}: PRK", c.name);
        if c.salt.is_empty() {
            // "Not provided" and zero-length are the same salt.
            let mut okm = vec![0u8; expected.len()];
            Hkdf::<Sha256>::new(None, &c.ikm)
                .expand(&c.info, &mut okm)
                .unwrap();
            assert_eq!(okm, expected, "{}: OKM without salt", c.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Ed25519: the project signs with `SigningKey::sign` (documents, link
// proofs) and `hazmat::raw_sign::<Sha512>` (the onion key's
// cross-certificate) and verifies everything with `verify_strict`.
// `SignedDocument::sign` and `check` sign and verify `domain | body`: with
// an empty domain that is Ed25519 on the body itself, so the RFC's
// messages go through the project's own helpers.

struct Ed25519Case {
    name: &'static str,
    secret: &'static str,
    public: &'static str,
    msg: Vec<u8>,
    sig: &'static str,
}

fn test_1024_message() -> Vec<u8> {
    let text = include_str!("data/rfc8032-test1024-message.hex");
    let hex: String = text.lines().filter(|l| !l.starts_with('#')).collect();
    hex::decode(hex.trim()).unwrap()
}

/// RFC 8032 section 7.1.
fn ed25519_cases() -> [Ed25519Case; 4] {
    [
        Ed25519Case {
            name: "RFC 8032 7.1 TEST 1",
            secret: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            public: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            msg: vec![],
            sig: "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155
                  5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        },
        Ed25519Case {
            name: "RFC 8032 7.1 TEST 2",
            secret: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            public: "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            msg: h("72"),
            sig: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da
                  085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        },
        Ed25519Case {
            name: "RFC 8032 7.1 TEST 3",
            secret: "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            public: "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            msg: h("af82"),
            sig: "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac
                  18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        },
        Ed25519Case {
            name: "RFC 8032 7.1 TEST 1024",
            secret: "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
            public: "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
            msg: test_1024_message(),
            sig: "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350
                  aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
        },
    ]
}

#[test]
fn ed25519_rfc8032_7_1_sign_and_verify_through_signed_document() {
    for c in ed25519_cases() {
        let key = SigningKey::from_bytes(&h32(c.secret));
        let public = h32(c.public);
        let sig = h64(c.sig);
        assert_eq!(
            key.verifying_key().to_bytes(),
            public,
            "{}: public key",
            c.name
        );

        let mut doc = SignedDocument::new(c.msg.clone());
        doc.sign(b"", &key);
        let [s] = doc.signatures.as_slice() else {
            panic!("{}: one signature", c.name);
        };
        assert_eq!(s.key, public, "{}: signer", c.name);
        assert_eq!(
            hex::encode(s.sig.0),
            hex::encode(sig),
            "{}: signature",
            c.name
        );

        let published = DocSignature {
            key: public,
            sig: Sig(sig),
        };
        assert!(doc.check(b"", &published), "{}: verifies", c.name);
        // A flipped bit anywhere in R or S, in the key or in the message
        // is refused.
        for bit in [0, 255, 256, 511] {
            let mut bad = sig;
            bad[bit / 8] ^= 1 << (bit % 8);
            let s = DocSignature {
                key: public,
                sig: Sig(bad),
            };
            assert!(!doc.check(b"", &s), "{}: signature bit {bit}", c.name);
        }
        let mut other_key = public;
        other_key[0] ^= 1;
        let s = DocSignature {
            key: other_key,
            sig: Sig(sig),
        };
        assert!(!doc.check(b"", &s), "{}: key bit", c.name);
        if !c.msg.is_empty() {
            let mut m = c.msg.clone();
            let last = m.len() - 1;
            m[last] ^= 0x80;
            assert!(
                !SignedDocument::new(m).check(b"", &published),
                "{}: message bit",
                c.name
            );
        }
    }
}

/// The same vectors through the ed25519-dalek calls the project makes
/// directly: `Signer::sign` and `verify_strict` (link proofs), and
/// `raw_sign::<Sha512>` on an `ExpandedSecretKey` (the cross-certificate;
/// with the RFC's expansion of the secret it must give the RFC's
/// signature).
#[test]
fn ed25519_rfc8032_7_1_through_dalek_as_the_project_calls_it() {
    for c in ed25519_cases() {
        let secret = h32(c.secret);
        let sig = h64(c.sig);
        let key = SigningKey::from_bytes(&secret);
        let signed = key.sign(&c.msg).to_bytes();
        assert_eq!(hex::encode(signed), hex::encode(sig), "{}: sign", c.name);

        let esk = ExpandedSecretKey::from(&secret);
        let vk = VerifyingKey::from(&esk);
        assert_eq!(vk.to_bytes(), h32(c.public), "{}: expanded key", c.name);
        let raw = raw_sign::<Sha512>(&esk, &c.msg, &vk);
        assert_eq!(raw.to_bytes(), signed, "{}: raw_sign", c.name);

        let vk = VerifyingKey::from_bytes(&h32(c.public)).unwrap();
        assert!(
            vk.verify_strict(&c.msg, &Signature::from_bytes(&sig))
                .is_ok()
        );
        let mut bad = sig;
        bad[40] ^= 0x10;
        assert!(
            vk.verify_strict(&c.msg, &Signature::from_bytes(&bad))
                .is_err()
        );
    }
}

// ---------------------------------------------------------------------------
// SHA-256 (document digests, the Noise hash, HKDF) and SHA-512 (the
// cross-certificate), FIPS 180-2 appendices B and C.

const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const SHA256_448: &str = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
const MSG_448: &[u8] = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";

/// Through the project's digests of a signed document's body.
#[test]
fn sha256_fips_180_2_through_document_digests() {
    for (msg, digest) in [(&b"abc"[..], SHA256_ABC), (MSG_448, SHA256_448)] {
        assert_eq!(SignedDocument::new(msg.to_vec()).digest(), h32(digest));
        assert_eq!(AuthSigned::new(msg.to_vec()).digest(), h32(digest));
    }
    // FIPS 180-2 B.3: one million "a".
    assert_eq!(
        SignedDocument::new(vec![b'a'; 1_000_000]).digest(),
        h32("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    );
}

#[test]
fn sha512_fips_180_2() {
    assert_eq!(
        Sha512::digest(b"abc")[..],
        h64(
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        )[..]
    );
    assert_eq!(
        Sha512::digest(
            b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"
        )[..],
        h64("8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018
             501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")[..]
    );
}

// ---------------------------------------------------------------------------
// Noise: Cacophony's vectors for the two patterns the link uses, run on
// snow with the link's own resolver (X25519, AES-256-GCM through
// `aead::whole`, SHA-256), then the transport messages both through snow
// and through `aead::whole` with the keys of `Split()`, which is how
// `LinkTransport` seals and opens frames.

#[derive(Deserialize)]
struct NoiseFile {
    source: String,
    vectors: Vec<NoiseVector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseVector {
    protocol_name: String,
    init_prologue: String,
    init_static: Option<String>,
    init_ephemeral: String,
    init_remote_static: Option<String>,
    resp_prologue: String,
    resp_static: Option<String>,
    resp_ephemeral: String,
    resp_remote_static: Option<String>,
    handshake_hash: String,
    messages: Vec<NoiseMessage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoiseMessage {
    payload: String,
    ciphertext: String,
}

fn noise_vectors() -> Vec<NoiseVector> {
    let f: NoiseFile = serde_json::from_str(include_str!("data/noise-cacophony.json")).unwrap();
    assert!(f.source.contains("cacophony"));
    f.vectors
}

fn noise_side(
    params: &NoiseParams,
    prologue: &str,
    local: Option<&str>,
    ephemeral: &str,
    remote: Option<&str>,
    initiator: bool,
) -> HandshakeState {
    let (prologue, ephemeral) = (h(prologue), h(ephemeral));
    let (local, remote) = (local.map(h), remote.map(h));
    let resolver = NoiseResolver::new(&mut rand::rng());
    let mut b = Builder::with_resolver(params.clone(), Box::new(resolver))
        .prologue(&prologue)
        .unwrap()
        .fixed_ephemeral_key_for_testing_only(&ephemeral);
    if let Some(k) = &local {
        b = b.local_private_key(k).unwrap();
    }
    if let Some(k) = &remote {
        b = b.remote_public_key(k).unwrap();
    }
    if initiator {
        b.build_initiator().unwrap()
    } else {
        b.build_responder().unwrap()
    }
}

fn noise_pair(v: &NoiseVector) -> (HandshakeState, HandshakeState) {
    let params: NoiseParams = v.protocol_name.parse().unwrap();
    let i = noise_side(
        &params,
        &v.init_prologue,
        v.init_static.as_deref(),
        &v.init_ephemeral,
        v.init_remote_static.as_deref(),
        true,
    );
    let r = noise_side(
        &params,
        &v.resp_prologue,
        v.resp_static.as_deref(),
        &v.resp_ephemeral,
        v.resp_remote_static.as_deref(),
        false,
    );
    (i, r)
}

/// One direction of the transport as `LinkTransport` runs it: the key from
/// `Split()` and a counter from 0.
struct Direction {
    key: Key,
    n: u64,
}

#[test]
fn noise_nk_and_xk_match_cacophony() {
    let vectors = noise_vectors();
    let names: Vec<&str> = vectors.iter().map(|v| v.protocol_name.as_str()).collect();
    assert_eq!(names, [NK_PARAMS, XK_PARAMS], "the link's two patterns");

    for v in &vectors {
        let name = &v.protocol_name;
        let handshake_len = if name == NK_PARAMS { 2 } else { 3 };
        let (mut init, mut resp) = noise_pair(v);
        let mut buf = vec![0u8; 65535];
        let mut out = vec![0u8; 65535];

        // The handshake: every message byte for byte, and its payload back.
        let mut messages = v.messages.iter().enumerate();
        for (i, m) in messages.by_ref().take(handshake_len) {
            let (send, recv) = if i % 2 == 0 {
                (&mut init, &mut resp)
            } else {
                (&mut resp, &mut init)
            };
            let n = send.write_message(&h(&m.payload), &mut buf).unwrap();
            assert_eq!(
                hex::encode(&buf[..n]),
                m.ciphertext,
                "{name}: handshake message {i}"
            );
            let p = recv.read_message(&buf[..n], &mut out).unwrap();
            assert_eq!(out[..p], h(&m.payload)[..], "{name}: payload {i}");
        }
        assert!(init.is_handshake_finished() && resp.is_handshake_finished());
        assert_eq!(hex::encode(init.get_handshake_hash()), v.handshake_hash);
        assert_eq!(hex::encode(resp.get_handshake_hash()), v.handshake_hash);
        if let Some(s) = &v.init_static {
            let expected = PublicKey::from(&StaticSecret::from(h32(s))).to_bytes();
            assert_eq!(resp.get_remote_static(), Some(&expected[..]), "{name}");
        }

        // The keys of Split(), as LinkTransport takes them.
        let (i2r, r2i) = init.dangerously_get_raw_split();
        assert_eq!(resp.dangerously_get_raw_split(), (i2r, r2i), "{name}");
        let mut link = [
            Direction {
                key: Key::new(&i2r),
                n: 0,
            },
            Direction {
                key: Key::new(&r2i),
                n: 0,
            },
        ];
        let mut init = init.into_transport_mode().unwrap();
        let mut resp = resp.into_transport_mode().unwrap();

        // Transport messages: they go on alternating, so the first one
        // after a two-message handshake is the initiator's.
        let mut transport = 0;
        for (i, m) in messages {
            let from_initiator = i % 2 == 0;
            let (send, recv) = if from_initiator {
                (&mut init, &mut resp)
            } else {
                (&mut resp, &mut init)
            };
            let payload = h(&m.payload);
            let n = send.write_message(&payload, &mut buf).unwrap();
            assert_eq!(hex::encode(&buf[..n]), m.ciphertext, "{name}: message {i}");
            let p = recv.read_message(&buf[..n], &mut out).unwrap();
            assert_eq!(out[..p], payload[..], "{name}: payload {i}");

            let d = &mut link[usize::from(!from_initiator)];
            let mut sealed = payload.clone();
            let tag = whole::seal(&d.key, d.n, &[], &mut sealed);
            sealed.extend_from_slice(&tag);
            assert_eq!(
                hex::encode(&sealed),
                m.ciphertext,
                "{name}: aead::whole {i}"
            );
            let ct = h(&m.ciphertext);
            let (body, tag) = ct.split_at(ct.len() - TAG_LEN);
            let mut body = body.to_vec();
            assert!(whole::open(
                &d.key,
                d.n,
                &[],
                &mut body,
                tag.try_into().unwrap()
            ));
            assert_eq!(body, payload, "{name}: aead::whole opens {i}");
            d.n += 1;
            transport += 1;
        }
        assert_eq!(transport, v.messages.len() - handshake_len);
        assert!(transport >= 3, "{name}: both directions carry messages");
    }
}

/// The comparison has teeth: the first handshake message with any one bit
/// flipped is refused by a responder built from the same vector.
#[test]
fn noise_vectors_refuse_a_flipped_bit() {
    for v in &noise_vectors() {
        let first = h(&v.messages[0].ciphertext);
        for bit in [0, 8 * 32, 8 * first.len() - 1] {
            let (_, mut resp) = noise_pair(v);
            let mut m = first.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            let mut out = vec![0u8; 65535];
            assert!(
                resp.read_message(&m, &mut out).is_err(),
                "{}: bit {bit}",
                v.protocol_name
            );
        }
    }
}
