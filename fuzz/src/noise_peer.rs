//! Snow with Allium's own primitives (`allium_proto::link::NoiseResolver`)
//! and a seeded RNG: the honest other side of a link handshake, whose
//! messages carry fuzzer-chosen payloads.

use allium_proto::link::NoiseResolver;
use chacha20::ChaCha20Rng;
use rand_core::SeedableRng;
use snow::HandshakeState;

/// A handshake state for `params`, as `proto/src/link/noise.rs` makes one.
pub fn handshake(
    seed: u64,
    params: &str,
    local: Option<&[u8; 32]>,
    remote: Option<&[u8; 32]>,
    initiator: bool,
) -> HandshakeState {
    let p = params.parse().expect("valid Noise parameters");
    let mut b = snow::Builder::with_resolver(
        p,
        Box::new(NoiseResolver::new(&mut ChaCha20Rng::seed_from_u64(seed))),
    )
    .prologue(allium_proto::link::PROLOGUE)
    .expect("a prologue");
    if let Some(k) = local {
        b = b.local_private_key(k).expect("a local key");
    }
    if let Some(k) = remote {
        b = b.remote_public_key(k).expect("a remote key");
    }
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
    .expect("a handshake state")
}
