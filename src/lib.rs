//! The `allium` command: directory authority, relay, client, and the
//! one-command local network (`allium testnet`), which also serves the
//! whole-system tests.

pub mod bench;
pub mod show;
pub mod testnet;
