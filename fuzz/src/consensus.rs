//! `consensus`: the consensus as a client or relay takes it, and what a
//! client does with a verified one (look relays up, choose paths).
//!
//! Raw bytes (first byte 0 mod 4): a consensus that parses is canonical,
//! and its signature report, signers and verdict come without panics.
//! First byte 2 mod 4: the rest is a consensus diff (zstd), decoded against
//! a fixed base and alone, within a limit, and what it gives is checked
//! as raw bytes. Odd first byte: the rest is a body every pinned authority
//! signs, so the checks after the signatures, and path selection, run on
//! fuzzer-chosen contents.

use allium_client::path::{ExitTarget, choose_path, sample_guards, sample_middles};
use allium_proto::doc::CONSENSUS_DOMAIN;
use allium_proto::relaymsg::TargetAddr;
use allium_proto::{AuthSigned, Consensus, UnverifiedConsensus};

use crate::keys::{AUTHORITIES, NOW, auth_sign, pinned, rng};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 3 == 2 {
        const LIMIT: usize = 1 << 16;
        let base = [b"allium consensus diff base ".as_slice(); 64].concat();
        for b in [Some(base.as_slice()), None] {
            if let Ok(out) = allium_directory::diff::decode(b, rest, LIMIT) {
                assert!(out.len() <= LIMIT);
                check(&out, mode);
            }
        }
        return;
    }
    if mode & 1 == 0 {
        return check(rest, mode);
    }
    let mut d = AuthSigned::new(rest.to_vec());
    for i in 0..AUTHORITIES {
        auth_sign(&mut d, CONSENSUS_DOMAIN, i);
    }
    check(&d.to_bytes(), mode);
}

fn check(b: &[u8], mode: u8) {
    let Ok(u) = UnverifiedConsensus::parse(b) else {
        return;
    };
    assert_eq!(u.doc.to_bytes(), b, "a consensus is canonical");
    let body = postcard::to_stdvec(u.peek()).expect("encodes");
    assert_eq!(body, u.doc.body, "a consensus body is canonical");
    let pinned = pinned();
    let now = NOW + u64::from(mode >> 1) * 60;
    let report = u.report(&pinned, now);
    assert_eq!(report.len(), u.doc.signatures.len());
    let signers = u.valid_signers(&pinned, now);
    assert!(signers.len() <= pinned.len());
    if let Ok(c) = u.verify(&pinned, now) {
        use_it(&c, mode);
    }
}

fn use_it(c: &Consensus, mode: u8) {
    for r in &c.relays {
        assert_eq!(c.relay(&r.identity), Some(r));
        assert!(r.family.is_none_or(|f| (f as usize) < c.relays.len()));
        let _ = (
            r.exit_ports.allows(443),
            r.exit_ports.is_exit(),
            r.flags.names(),
        );
    }
    let mut rng = rng(u64::from(mode));
    let guards = sample_guards(&mut rng, c, 3, &[]);
    let layer2: Vec<[u8; 32]> = sample_middles(&mut rng, c, 4, &[])
        .iter()
        .map(|r| r.identity)
        .collect();
    let addr = TargetAddr::Ip("198.51.100.7".parse().expect("an address"));
    let to = c.relays.first().map(|r| r.identity).unwrap_or_default();
    for t in [
        ExitTarget::Any,
        ExitTarget::Addr(&addr, 443),
        ExitTarget::Relay(&to),
    ] {
        if let Ok(path) = choose_path(&mut rng, c, &t, guards.first(), &layer2, &[]) {
            assert!(path.iter().all(|r| c.relay(&r.identity).is_some()));
        }
    }
}
