//! The harnesses of Allium's fuzz targets, one module per target.
//!
//! Each `fuzz_targets/NAME.rs` is one line that calls `NAME::run` here, so
//! the seed generator (`examples/seeds.rs`), which runs every seed through
//! its harness, drives exactly what the fuzzer drives. Every harness
//! is deterministic: keys are fixed, randomness comes from a ChaCha20 RNG
//! seeded from the input, and time is a fixed point moved by the input.
//!
//! The stateful targets read their input as a script of operations
//! ([`input::Input`]); [`input::Script`] writes such scripts for seeds.

pub mod input;
pub mod keys;
pub mod noise_peer;

pub mod authority_cert;
pub mod cell;
pub mod circuit_client;
pub mod circuit_relay;
pub mod config;
pub mod consensus;
pub mod descriptor;
pub mod dirauth;
pub mod flow;
pub mod httpconnect;
pub mod link_handshake;
pub mod link_transport;
pub mod ntor;
pub mod policy;
pub mod relay_msg;
pub mod service_descriptor;
pub mod socks;
pub mod vote;

/// Every target, by name, with its `run` function.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("authority_cert", authority_cert::run),
    ("cell", cell::run),
    ("circuit_client", circuit_client::run),
    ("circuit_relay", circuit_relay::run),
    ("config", config::run),
    ("consensus", consensus::run),
    ("descriptor", descriptor::run),
    ("dirauth", dirauth::run),
    ("flow", flow::run),
    ("httpconnect", httpconnect::run),
    ("link_handshake", link_handshake::run),
    ("link_transport", link_transport::run),
    ("ntor", ntor::run),
    ("policy", policy::run),
    ("relay_msg", relay_msg::run),
    ("service_descriptor", service_descriptor::run),
    ("socks", socks::run),
    ("vote", vote::run),
];
