//! `config`: the TOML configs of the relay, the client and the directory
//! authority, with their checks.
//!
//! A config that parses passes or fails its check without panicking
//! (exit policy, family, authority keys, listeners included), and prints
//! as TOML that parses back to the same config.

use allium_client::ClientConfig;
use allium_directory::AuthConfig;
use allium_relay::RelayConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(c) = roundtrip::<RelayConfig>(text) {
        if c.check().is_ok() {
            c.policy().expect("checked");
            c.family_ids().expect("checked");
            assert!(c.declared_bandwidth() <= c.bandwidth);
        }
        let _ = c.advertised();
    }
    if let Some(c) = roundtrip::<ClientConfig>(text) {
        let _ = (c.check(), c.circ_params());
    }
    if let Some(c) = roundtrip::<AuthConfig>(text) {
        let _ = allium_directory::authority_keys(&c.authorities);
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(text: &str) -> Option<T> {
    let c: T = toml::from_str(text).ok()?;
    // What it prints parses to a config that prints the same (compared as
    // text: a NaN rate is not equal to itself).
    if let Ok(printed) = toml::to_string(&c) {
        let again: T = toml::from_str(&printed)
            .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
        assert_eq!(toml::to_string(&again).ok().as_deref(), Some(&printed[..]));
    }
    Some(c)
}
