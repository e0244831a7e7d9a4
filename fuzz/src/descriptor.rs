//! `descriptor`: relay descriptors, as an authority takes them.
//!
//! Raw bytes (even first byte): a descriptor that parses is canonical
//! (re-encoding gives the bytes received), and `verify` either refuses it
//! or gives the bytes and digest it was parsed from. Odd first byte: the
//! rest is a body that relay 0's identity key signs, so the checks after
//! the signature run on fuzzer-chosen contents; a descriptor that
//! verifies has a policy whose answers do not panic.

use std::net::IpAddr;

use allium_proto::doc::{DESCRIPTOR_DOMAIN, MAX_DESCRIPTOR_LEN, SignedDocument};
use allium_proto::{RelayDescriptor, UnverifiedDescriptor};
use sha2::{Digest, Sha256};

use crate::keys::{MAX_AGE, NOW, relay_identity};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        return check(rest, mode);
    }
    let mut d = SignedDocument::new(rest.to_vec());
    d.sign(DESCRIPTOR_DOMAIN, &relay_identity(0));
    check(&d.to_bytes(), mode);
}

fn check(b: &[u8], mode: u8) {
    let Ok(u) = UnverifiedDescriptor::parse(b) else {
        return;
    };
    let outer = SignedDocument::parse("descriptor", b, MAX_DESCRIPTOR_LEN).expect("parsed once");
    assert_eq!(outer.to_bytes(), b, "a descriptor is canonical");
    let body = postcard::to_stdvec(u.descriptor()).expect("encodes");
    assert_eq!(body, outer.body, "a descriptor body is canonical");
    // Any maximum age an authority may be configured with.
    let any_age = u64::MAX >> (mode % 64);
    let _ = UnverifiedDescriptor::parse(b).map(|u| u.verify(NOW, any_age));
    let desc: RelayDescriptor = u.descriptor().clone();
    let sig = u.verify_signature();
    // The time it is checked at: now, or up to a day either way.
    let now = NOW + u64::from(mode >> 1) * 3600 - 64 * 3600;
    match u.verify(now, MAX_AGE) {
        Ok(v) => {
            assert_eq!(v.bytes, b);
            assert_eq!(v.digest, <[u8; 32]>::from(Sha256::digest(&outer.body)));
            assert_eq!(sig.expect("verified"), v.digest);
            assert_eq!(v.desc, desc);
            let p = &v.desc.exit_policy;
            for port in [1, 25, 80, 443, 65535] {
                let _ = p.allows(IpAddr::from([1, 2, 3, 4]), port);
                let _ = p.allows(v.desc.addr.ip(), port);
                let _ = p.may_allow_port(port);
            }
            p.summary()
                .check()
                .expect("a verified policy's summary is valid");
        }
        Err(_) => {}
    }
}
