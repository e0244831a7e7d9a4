//! `policy`: exit policy rules as configured (text) and as carried in
//! descriptors (postcard).
//!
//! Text rules that parse print as text that parses to the same rule. A
//! policy that passes `check` (whatever its source) answers `allows` and
//! `may_allow_port` without panicking, its consensus summary passes the
//! consensus's own check, and a port the summary lists is one the policy
//! may allow.

use std::net::IpAddr;

use allium_proto::policy::{ExitPolicy, Rule};

use crate::input::Input;

pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let probes: Vec<(IpAddr, u16)> = (0..4)
        .map(|_| {
            let ip = if inp.bool() {
                IpAddr::from(inp.array::<16>())
            } else {
                IpAddr::from(inp.array::<4>())
            };
            (ip, inp.u16())
        })
        .collect();
    let rest = inp.rest();
    if let Ok(text) = std::str::from_utf8(rest) {
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines {
            if let Ok(r) = Rule::parse(l) {
                let again = Rule::parse(&r.to_string()).expect("a printed rule parses");
                assert_eq!(again, r);
            }
        }
        if let Ok(p) = ExitPolicy::parse_rules(&lines) {
            checked(&p, &probes);
        }
    }
    if let Ok(p) = postcard::from_bytes::<ExitPolicy>(rest) {
        let _ = p.summary();
        if p.check().is_ok() {
            checked(&p, &probes);
        }
    }
}

fn checked(p: &ExitPolicy, probes: &[(IpAddr, u16)]) {
    let s = p.summary();
    s.check()
        .expect("a checked policy's summary passes the consensus check");
    for &(ip, port) in probes {
        let allowed = p.allows(ip, port);
        if allowed {
            assert!(
                p.may_allow_port(port),
                "allows {ip}:{port} but not the port"
            );
        }
        if s.allows(port) {
            assert!(p.may_allow_port(port), "summary lists {port}");
        }
    }
    let printed = p.to_strings();
    let again = ExitPolicy::parse_rules(&printed).expect("printed rules parse");
    assert_eq!(&again, p);
}
