//! `service_descriptor`: onion service descriptors, as a service directory
//! takes them and a client reads them.
//!
//! Raw bytes (even first byte): a descriptor that parses is canonical; a
//! directory either refuses it or stores it and serves back exactly those
//! bytes; reading it with the fixed service's address never panics. Odd
//! first byte: the rest is encrypted in a descriptor that the fixed
//! service signs properly, so a client's checks after decryption run on
//! fuzzer-chosen bytes: with bit 1 set, as the outer layer's contents (the
//! client entries, read with and without a key); without it, as the inner
//! layer (zero-padded to its size) of a service open to all or, with bit
//! 2, one that lists the key the target tries; contents that are read are
//! their canonical encoding followed by zeros.

use allium_directory::hsdir::ServiceDirectory;
use allium_proto::doc::SignedDocument;
use allium_proto::service::auth::ClientAuthSecret;
use allium_proto::service::descriptor::{
    MAX_LEN, PADDED_LEN, UnverifiedServiceDescriptor, auth_layer, build_raw, subcredential,
};
use allium_proto::service::{ServiceAddress, TimePeriod};
use allium_proto::{Consensus, ConsensusRelay, RelayFlags};
use chacha20::rand_core::SeedableRng;
use ed25519_dalek::SigningKey;

use crate::keys::NOW;

const INTERVAL: u64 = 3600;

fn service() -> (SigningKey, ServiceAddress) {
    let k = SigningKey::from_bytes(&[0x5e; 32]);
    let a = ServiceAddress::from_key(&k.verifying_key().to_bytes()).expect("a valid key");
    (k, a)
}

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (identity, address) = service();
    let period = TimePeriod::at(NOW, INTERVAL);
    if mode & 1 == 1 {
        let key = ClientAuthSecret::from_bytes([mode; 32]);
        let mut inner = rest.to_vec();
        inner.resize(inner.len().max(PADDED_LEN), 0);
        let outer = if mode & 2 == 2 {
            rest.to_vec()
        } else {
            let blinded = address.blinded(period);
            let subcred = subcredential(address.key(), &blinded);
            let mut rng = chacha20::ChaCha20Rng::from_seed([mode; 32]);
            let listed = if mode & 4 == 4 {
                vec![key.public()]
            } else {
                vec![]
            };
            auth_layer(
                &blinded,
                &subcred,
                1,
                &[mode; 16],
                &inner,
                &listed,
                &mut rng,
            )
        };
        let doc = build_raw(&identity, period, 1, &outer, [mode; 16]);
        let v = UnverifiedServiceDescriptor::parse(&doc)
            .expect("a built descriptor parses")
            .verify()
            .expect("and verifies");
        let with_key = v.decrypt(&address, Some(&key));
        let without = v.decrypt(&address, None);
        if mode & 2 == 0 {
            // The listed key, or anyone for an open service, reads what
            // the contents say, and nothing else.
            let read = if mode & 4 == 4 { with_key } else { without };
            if let Ok(info) = read {
                let enc = postcard::to_stdvec(&info).expect("encodes");
                assert!(inner.starts_with(&enc), "contents are canonical");
                assert!(inner[enc.len()..].iter().all(|b| *b == 0), "then zeros");
            }
        }
        return;
    }
    let Ok(u) = UnverifiedServiceDescriptor::parse(rest) else {
        return;
    };
    let outer = SignedDocument::parse("d", rest, MAX_LEN).expect("parsed once");
    assert_eq!(outer.to_bytes(), rest, "a descriptor is canonical");
    let claimed = u.blinded_key();
    if let Ok(v) = u.verify() {
        assert_eq!(v.bytes(), rest);
        let _ = v.decrypt(&address, None);
    }
    // The directory (the only one on its ring, so responsible for every
    // key), under the key the descriptor names.
    let dir = ServiceDirectory::default();
    let path = format!("/service/{}", hex::encode(claimed.0));
    let now = NOW + u64::from(mode >> 1) * INTERVAL;
    let c = consensus(now);
    if dir.post(&path, rest, now, &c, &[1; 32]).is_ok() {
        assert_eq!(dir.get(&path, now).expect("stored"), rest);
    }
}

/// A consensus of one service directory, relay `01^32`, valid at `now`.
fn consensus(now: u64) -> Consensus {
    let va = now - now % INTERVAL;
    Consensus {
        valid_after: va,
        fresh_until: va + INTERVAL,
        valid_until: va + 3 * INTERVAL,
        relays: vec![ConsensusRelay {
            nickname: "dir".into(),
            identity: [1; 32],
            link_key: allium_proto::LinkKey([1; 32]),
            onion_key: allium_proto::OnionKey([1; 32]),
            addr: ([127, 0, 0, 1], 9000).into(),
            flags: RelayFlags(RelayFlags::RUNNING | RelayFlags::VALID | RelayFlags::HSDIR),
            bandwidth: 1000,
            declared_bandwidth: 1000,
            measured_bandwidth: None,
            exit_ports: Default::default(),
            family: None,
            descriptor_digest: [0; 32],
        }],
        weights: Default::default(),
        shared_random: Default::default(),
    }
}
