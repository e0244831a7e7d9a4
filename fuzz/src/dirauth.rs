//! `dirauth`: what the directory authority's HTTP handlers do with an
//! uploaded body (`POST /descriptor`, `/vote`, `/signature`), without
//! sockets: `Authority::accept_descriptor`, `accept_vote` and
//! `accept_signature`, which the handlers in `directory/src/serve.rs`
//! call with the body and the time.
//!
//! The input is a script of uploads: raw bodies, or descriptor and vote
//! bodies of the input's own signed by a fixed relay or a pinned
//! authority. An upload taken is one the document's own checks take; the
//! same upload again is "already known"; every refusal is a 4xx or a 503.

use std::path::PathBuf;
use std::sync::OnceLock;

use allium_directory::store::{self, KeyKind};
use allium_directory::{AuthConfig, Authority, AuthorityEntry, keys};
use allium_proto::doc::{DESCRIPTOR_DOMAIN, VOTE_DOMAIN};
use allium_proto::vote::Vote;
use allium_proto::{AuthSigned, SignedDocument, UnverifiedDescriptor};

use crate::input::Input;
use crate::keys::{AUTHORITIES, MAX_AGE, NOW, RELAYS, auth_sign, authority, authority_cert};
use crate::keys::{pinned, relay_identity};

/// The time of every upload: a minute before [`NOW`], so the votes taken
/// are those for the period that starts at [`NOW`] or, from an authority
/// whose clock runs ahead, the one after it.
pub const UPLOAD_AT: u64 = NOW - 60;
/// The authorities' interval.
pub const INTERVAL: u64 = 3600;

/// A data directory with authority 0's signing key and certificate,
/// made once per process.
fn config() -> &'static AuthConfig {
    static CFG: OnceLock<(tempfile::TempDir, AuthConfig)> = OnceLock::new();
    &CFG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data_dir: PathBuf = dir.path().join("auth");
        std::fs::create_dir_all(data_dir.join("keys")).expect("a key directory");
        let sk = authority(0).1.to_bytes();
        store::write_key(
            &keys::signing_key_path(&data_dir),
            KeyKind::AuthoritySigning,
            &sk,
        )
        .expect("a signing key");
        std::fs::write(keys::cert_path(&data_dir), authority_cert(0)).expect("a certificate");
        let cfg = AuthConfig {
            nickname: "fuzz".into(),
            data_dir,
            authorities: (0..AUTHORITIES)
                .map(|i| AuthorityEntry {
                    name: format!("a{i}"),
                    addr: format!("127.0.0.{}:7000", i + 1)
                        .parse()
                        .expect("an address"),
                    key: hex::encode(authority(i).0.verifying_key().to_bytes()),
                })
                .collect(),
            interval_secs: INTERVAL,
            descriptor_max_age_secs: MAX_AGE,
            allow_private_addresses: true,
            max_relays: 3,
            ..AuthConfig::default()
        };
        (dir, cfg)
    })
    .1
}

pub fn run(data: &[u8]) {
    let cfg = config();
    // What an earlier input left persisted must not change this one.
    let _ = std::fs::remove_dir_all(cfg.data_dir.join("state"));
    let a = Authority::new(cfg.clone()).expect("the authority starts");
    let pinned = pinned();
    let mut inp = Input::new(data);
    while !inp.is_empty() {
        let op = inp.u8();
        let body = inp.var();
        let r = match op % 5 {
            0 | 1 => {
                let b = if op % 5 == 1 {
                    let mut d = SignedDocument::new(body.to_vec());
                    d.sign(DESCRIPTOR_DOMAIN, &relay_identity((op / 5) % RELAYS));
                    d.to_bytes()
                } else {
                    body.to_vec()
                };
                let r = a.accept_descriptor(&b, UPLOAD_AT);
                if r.is_ok() {
                    UnverifiedDescriptor::parse(&b)
                        .and_then(|u| u.verify(UPLOAD_AT, MAX_AGE))
                        .expect("a descriptor taken verifies");
                    assert_eq!(a.accept_descriptor(&b, UPLOAD_AT), Ok("already known"));
                }
                r
            }
            2 | 3 => {
                let b = if op % 5 == 3 {
                    let mut d = AuthSigned::new(body.to_vec());
                    auth_sign(&mut d, VOTE_DOMAIN, (op / 5) % AUTHORITIES);
                    d.to_bytes()
                } else {
                    body.to_vec()
                };
                let r = a.accept_vote(&b, UPLOAD_AT);
                if r.is_ok() {
                    let v = Vote::verify(&b, &pinned, UPLOAD_AT).expect("a vote taken verifies");
                    assert!(
                        v.valid_after == NOW || v.valid_after == NOW + INTERVAL,
                        "a vote for period {} taken",
                        v.valid_after
                    );
                    assert_eq!(a.accept_vote(&b, UPLOAD_AT), Ok("already known"));
                }
                r
            }
            _ => a.accept_signature(body, UPLOAD_AT),
        };
        if let Err((code, why)) = r {
            assert!(
                code.is_client_error() || code.as_u16() == 503,
                "{code}: {why}"
            );
        }
    }
}
