//! The example configs parse, and `allium testnet --init-only` writes a
//! network whose configs parse and point at each other.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use allium::testnet::{TestnetOptions, init};
use allium_client::ClientConfig;
use allium_directory::AuthConfig;
use allium_relay::RelayConfig;

fn load<T: serde::de::DeserializeOwned>(p: &Path) -> T {
    toml::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn example_configs_parse() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let a: AuthConfig = load(&ex.join("dirauth.toml"));
    assert_eq!(a.interval_secs, AuthConfig::default().interval_secs);
    assert_eq!(a.valid_intervals, AuthConfig::default().valid_intervals);
    let r: RelayConfig = load(&ex.join("relay.toml"));
    r.check().unwrap();
    assert_eq!(
        r.onion_key_lifetime_secs,
        RelayConfig::default().onion_key_lifetime_secs
    );
    assert!(!r.policy().unwrap().is_exit());
    let c: ClientConfig = load(&ex.join("client.toml"));
    c.check().unwrap();
    assert_eq!(
        c.max_circuit_dirtiness_secs,
        ClientConfig::default().max_circuit_dirtiness_secs
    );
    // Unknown keys are errors, not silently ignored.
    assert!(toml::from_str::<ClientConfig>("socks_listen = []\nsocks_port = 9050\n").is_err());
}

#[test]
fn init_only_writes_a_runnable_network() {
    let d = tempfile::tempdir().unwrap();
    let opts = TestnetOptions {
        base_port: Some(17000),
        ..Default::default()
    };
    init(&opts, d.path()).unwrap();
    let a: AuthConfig = load(&d.path().join("auth0/config.toml"));
    let key = hex::encode(
        allium_directory::Authority::new(a.clone())
            .unwrap()
            .public_key(),
    );
    for i in 0..6 {
        let r: RelayConfig = load(&d.path().join(format!("relay{i}/config.toml")));
        r.check().unwrap();
        assert_eq!(r.authorities[0].key, key);
        assert_eq!(r.authorities[0].addr, a.listen);
        assert_eq!(r.policy().unwrap().is_exit(), i < 2);
        assert!(
            d.path()
                .join(format!("relay{i}/keys/identity.key"))
                .exists()
        );
    }
    let c: ClientConfig = load(&d.path().join("client/config.toml"));
    c.check().unwrap();
    assert_eq!(c.authorities[0].key, key);
    let readme = std::fs::read_to_string(d.path().join("README.md")).unwrap();
    assert!(readme.contains("allium relay --config relay5/config.toml"));
}
