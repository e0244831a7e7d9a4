//! Fixed keys and documents the harnesses share (relay 0 and authority 0
//! are those of the test vectors in `proto/tests/vectors.rs`), so seeds
//! made from them reach past the signature checks.

use allium_proto::doc::{AuthorityCert, AuthoritySig, CONSENSUS_DOMAIN, VOTE_DOMAIN};
use allium_proto::ntor::OnionSecret;
use allium_proto::policy::ExitPolicy;
use allium_proto::vote::Vote;
use allium_proto::{AuthSigned, AuthorityKey, Consensus, LinkKey, RelayDescriptor};
use chacha20::ChaCha20Rng;
use ed25519_dalek::SigningKey;
use rand_core::SeedableRng;
use x25519_dalek::StaticSecret;

/// The time every harness checks documents at (UNIX seconds): when the
/// test vectors' documents were made.
pub const NOW: u64 = 1_800_000_000;
/// How old a descriptor may be.
pub const MAX_AGE: u64 = 48 * 3600;
/// Relays with fixed keys.
pub const RELAYS: u8 = 4;
/// Authorities with fixed keys.
pub const AUTHORITIES: u8 = 3;

/// A deterministic RNG.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// Relay `i`'s identity key.
pub fn relay_identity(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[0x31 + 0x10 * i; 32])
}

/// Relay `i`'s onion key.
pub fn relay_onion(i: u8) -> OnionSecret {
    OnionSecret::new(StaticSecret::from([0x33 + 0x10 * i; 32]))
}

/// Relay `i`'s honest descriptor, published at [`NOW`].
pub fn descriptor(i: u8) -> RelayDescriptor {
    let id = relay_identity(i);
    let onion = relay_onion(i);
    let identity = id.verifying_key().to_bytes();
    RelayDescriptor {
        nickname: if i == 0 {
            "vector".into()
        } else {
            format!("relay{i}")
        },
        identity,
        link_key: LinkKey([0x32 + 0x10 * i; 32]),
        onion_key: onion.public(),
        onion_crosscert: onion.crosscert(&identity),
        addr: format!("127.0.0.{}:9001", i + 1)
            .parse()
            .expect("an address"),
        bandwidth: 1_000_000,
        exit_policy: if i % 2 == 0 {
            ExitPolicy::parse_rules(&["accept *:443", "reject *:*"]).expect("rules")
        } else {
            ExitPolicy::default_exit()
        },
        family: vec![],
        published: NOW,
    }
}

/// Authority `i`'s identity and online signing keys.
pub fn authority(i: u8) -> (SigningKey, SigningKey) {
    (
        SigningKey::from_bytes(&[0x41 + 0x10 * i; 32]),
        SigningKey::from_bytes(&[0x42 + 0x10 * i; 32]),
    )
}

/// Authority `i`'s signing-key certificate.
pub fn authority_cert(i: u8) -> Vec<u8> {
    let (id, sk) = authority(i);
    AuthorityCert {
        identity: id.verifying_key().to_bytes(),
        signing_key: sk.verifying_key().to_bytes(),
        valid_from: 1_700_000_000,
        valid_until: 1_900_000_000,
    }
    .sign(&id)
}

/// The authorities every harness pins.
pub fn pinned() -> Vec<AuthorityKey> {
    (0..AUTHORITIES)
        .map(|i| AuthorityKey(authority(i).0.verifying_key().to_bytes()))
        .collect()
}

/// `body` signed by authority `i` for `domain`.
pub fn auth_sign(doc: &mut AuthSigned, domain: &[u8], i: u8) {
    let sk = authority(i).1;
    let body = doc.body.clone();
    doc.add(AuthoritySig::make(domain, &body, &authority_cert(i), &sk));
}

/// A consensus signed by every authority.
pub fn signed_consensus(c: &Consensus) -> Vec<u8> {
    let mut d = c.to_document();
    for i in 0..AUTHORITIES {
        auth_sign(&mut d, CONSENSUS_DOMAIN, i);
    }
    d.to_bytes()
}

/// Authority `i`'s signed vote.
pub fn signed_vote(v: &Vote, i: u8) -> Vec<u8> {
    let mut d = v.to_document();
    auth_sign(&mut d, VOTE_DOMAIN, i);
    d.to_bytes()
}
