//! `authority_cert`: signing-key certificates.
//!
//! Raw bytes, or (odd first byte) a fuzzer-chosen body that authority 0's
//! identity key signs: such a certificate is taken exactly when its body
//! is a canonical certificate naming that identity.

use allium_proto::AuthorityCert;
use allium_proto::doc::{CERT_DOMAIN, MAX_CERT_LEN, SignedDocument};

use crate::keys::authority;

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if AuthorityCert::parse(rest).is_ok() {
            let again = SignedDocument::parse("certificate", rest, MAX_CERT_LEN)
                .expect("a certificate is a document");
            assert_eq!(again.to_bytes(), rest, "a certificate is canonical");
        }
        return;
    }
    let id = authority(0).0;
    let mut d = SignedDocument::new(rest.to_vec());
    d.sign(CERT_DOMAIN, &id);
    let bytes = d.to_bytes();
    let parsed = AuthorityCert::parse(&bytes);
    let body = postcard::from_bytes::<AuthorityCert>(rest)
        .ok()
        .filter(|c| postcard::to_stdvec(c).ok().as_deref() == Some(rest));
    let expected = bytes.len() <= MAX_CERT_LEN
        && body.is_some_and(|c| c.identity == id.verifying_key().to_bytes());
    assert_eq!(parsed.is_ok(), expected, "{parsed:?}");
}
