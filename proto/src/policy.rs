//! Exit policies (`doc/protocol.md` section "Exit policy").
//!
//! A policy is an ordered list of rules; the first rule matching the
//! address and port decides, and an address no rule matches is rejected.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    Accept,
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrPattern {
    /// Every address.
    Any,
    /// Loopback, RFC 1918, link-local, CGNAT, unique-local, unspecified and
    /// multicast addresses: what an exit must not reach by default.
    Private,
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub addr: AddrPattern,
    pub port_lo: u16,
    pub port_hi: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPolicy {
    pub rules: Vec<Rule>,
}

/// Ports Tor's default exit policy rejects (SMTP, NNTP, NetBIOS, SMB, P2P).
pub const DEFAULT_REJECTED_PORTS: &[(u16, u16)] = &[
    (25, 25),
    (119, 119),
    (135, 139),
    (445, 445),
    (563, 563),
    (1214, 1214),
    (4661, 4666),
    (6346, 6429),
    (6699, 6699),
    (6881, 6999),
];

pub const MAX_RULES: usize = 256;

/// Port ranges an [`ExitPorts`] summary holds at most (section 7).
pub const MAX_PORT_RANGES: usize = 64;

/// What the consensus says of an exit policy (as Tor's microdescriptor `p`
/// line): the ports on which the exit accepts connections to public
/// addresses in general, as sorted, disjoint, non-adjacent ranges. Rules
/// for particular addresses or for private addresses do not count, so a
/// port listed here is one a client may ask for by hostname; the exit
/// still applies its full policy (from its descriptor) to each stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPorts(pub Vec<(u16, u16)>);

impl ExitPorts {
    /// Does the summary accept `port`?
    pub fn allows(&self, port: u16) -> bool {
        let i = self.0.partition_point(|&(_, hi)| hi < port);
        self.0.get(i).is_some_and(|&(lo, _)| lo <= port)
    }

    /// Does it accept any port at all?
    pub fn is_exit(&self) -> bool {
        !self.0.is_empty()
    }

    /// Check what a consensus carries: at most [`MAX_PORT_RANGES`] ranges,
    /// each non-empty, from port 1, sorted, apart.
    pub fn check(&self) -> Result<(), Error> {
        if self.0.len() > MAX_PORT_RANGES {
            return Err(Error::TooLarge {
                what: "exit port summary",
                len: self.0.len(),
                max: MAX_PORT_RANGES,
            });
        }
        let ordered = self.0.iter().all(|&(lo, hi)| 1 <= lo && lo <= hi)
            && self.0.windows(2).all(|w| w[0].1 < w[1].0.saturating_sub(1));
        if !ordered {
            return Err(Error::malformed(
                "exit port summary",
                "ranges must be sorted, apart and within 1-65535",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for ExitPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Addresses an exit must not reach by default: loopback, RFC 1918,
/// link-local, CGNAT, unspecified, broadcast and multicast; for IPv6 also
/// unique-local, site-local (`fec0::/10`), the local-use NAT64 prefix
/// `64:ff9b:1::/48` and Teredo `2001::/32` whole, and every IPv6 form that
/// carries an IPv4 address (mapped, compatible, SIIT-translated, NAT64
/// `64:ff9b::/96`, 6to4 `2002::/16`) when that IPv4 address is one of
/// these: a NAT64 or 6to4 gateway near the exit would otherwise reach its
/// private network.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = embedded_v4(&a) {
                return is_private(IpAddr::V4(v4));
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                // The local-use NAT64 prefix (RFC 8215), whatever layout
                // its operator gave it, and Teredo.
                || (s[0], s[1], s[2]) == (0x64, 0xff9b, 1)
                || (s[0], s[1]) == (0x2001, 0)
        }
    }
}

/// One address in one form: an IPv6 address that carries an IPv4 one is
/// that IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => embedded_v4(&a).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address an IPv6 address carries, in the forms a host or a
/// nearby gateway may translate.
pub fn embedded_v4(a: &Ipv6Addr) -> Option<Ipv4Addr> {
    let o = a.octets();
    let s = a.segments();
    let v4 = |i: usize| Some(Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]));
    if let Some(m) = a.to_ipv4_mapped() {
        return Some(m);
    }
    match s {
        // IPv4-compatible (deprecated), but not :: or ::1.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => v4(12),
        // IPv4-translated (SIIT).
        [0, 0, 0, 0, 0xffff, 0, _, _] => v4(12),
        // NAT64, the well-known prefix.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => v4(12),
        // 6to4.
        [0x2002, ..] => v4(2),
        _ => None,
    }
}

fn prefix_match(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = (bits / 8) as usize;
    let rem = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rem == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rem);
    (a[full] & mask) == (b[full] & mask)
}

impl AddrPattern {
    pub fn matches(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (AddrPattern::Any, _) => true,
            (AddrPattern::Private, ip) => is_private(ip),
            (AddrPattern::V4(net, bits), IpAddr::V4(a)) => {
                prefix_match(&net.octets(), &a.octets(), bits)
            }
            (AddrPattern::V6(net, bits), IpAddr::V6(a)) => {
                prefix_match(&net.octets(), &a.octets(), bits)
            }
            _ => false,
        }
    }
}

impl Rule {
    fn port_matches(&self, port: u16) -> bool {
        self.port_lo <= port && port <= self.port_hi
    }
}

impl ExitPolicy {
    /// Rejects everything: a relay that is not an exit.
    pub fn reject_all() -> Self {
        ExitPolicy { rules: vec![] }
    }

    /// Tor-like default for an exit: reject private addresses and the
    /// abuse-prone ports, accept the rest.
    pub fn default_exit() -> Self {
        let mut rules = vec![Rule {
            action: Action::Reject,
            addr: AddrPattern::Private,
            port_lo: 1,
            port_hi: 65535,
        }];
        for &(lo, hi) in DEFAULT_REJECTED_PORTS {
            rules.push(Rule {
                action: Action::Reject,
                addr: AddrPattern::Any,
                port_lo: lo,
                port_hi: hi,
            });
        }
        rules.push(Rule {
            action: Action::Accept,
            addr: AddrPattern::Any,
            port_lo: 1,
            port_hi: 65535,
        });
        ExitPolicy { rules }
    }

    /// Parse rules like `accept 127.0.0.0/8:*`, `reject private:*`,
    /// `reject *:25`, `accept *:80-443`, `accept [::1]/128:*`.
    pub fn parse_rules<S: AsRef<str>>(lines: &[S]) -> Result<Self, Error> {
        let mut rules = Vec::new();
        for line in lines {
            rules.push(Rule::parse(line.as_ref())?);
        }
        let p = ExitPolicy { rules };
        p.check()?;
        Ok(p)
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.rules.len() > MAX_RULES {
            return Err(Error::TooLarge {
                what: "exit policy",
                len: self.rules.len(),
                max: MAX_RULES,
            });
        }
        for r in &self.rules {
            let bad_prefix = match r.addr {
                AddrPattern::V4(_, b) => b > 32,
                AddrPattern::V6(_, b) => b > 128,
                _ => false,
            };
            if bad_prefix || r.port_lo == 0 || r.port_lo > r.port_hi {
                return Err(Error::malformed("exit policy", format!("bad rule {r:?}")));
            }
        }
        Ok(())
    }

    /// Would this exit connect to `ip:port`?
    pub fn allows(&self, ip: IpAddr, port: u16) -> bool {
        self.rules
            .iter()
            .find(|r| r.port_matches(port) && r.addr.matches(ip))
            .is_some_and(|r| r.action == Action::Accept)
    }

    /// Might this exit connect to some address on `port`? Used for
    /// hostnames, which only the exit resolves.
    pub fn may_allow_port(&self, port: u16) -> bool {
        for r in self.rules.iter().filter(|r| r.port_matches(port)) {
            match (r.action, r.addr) {
                (Action::Accept, _) => return true,
                (Action::Reject, AddrPattern::Any) => return false,
                (Action::Reject, _) => continue,
            }
        }
        false
    }

    /// The summary the consensus carries: the ports where the first rule
    /// that concerns every address (`*`) accepts. A reject of a network
    /// wider than an IPv4 /8 or an IPv6 /16 closes its ports too (a policy
    /// rejecting `0.0.0.0/0` then accepting `*` exits almost nowhere);
    /// narrower rules and accepts of some networks do not count. With more than
    /// [`MAX_PORT_RANGES`] ranges, ranges are left out (never added): the
    /// narrowest first, ranges holding a port below 1024 last.
    pub fn summary(&self) -> ExitPorts {
        // Rule boundaries split 1..=65535 into spans that every rule
        // treats alike.
        let general = |r: &Rule| match (r.action, r.addr) {
            (_, AddrPattern::Any) => true,
            (Action::Reject, AddrPattern::V4(_, bits)) => bits < 8,
            (Action::Reject, AddrPattern::V6(_, bits)) => bits < 16,
            _ => false,
        };
        let mut cuts: Vec<u32> = vec![1, 65536];
        // Port 0 is no port: a rule from port 0 (in a policy not checked,
        // as a vote may carry) starts at 1 here, or the summary would hold
        // a range the consensus check refuses.
        for r in self.rules.iter().filter(|r| general(r)) {
            cuts.push(u32::from(r.port_lo.max(1)));
            cuts.push(u32::from(r.port_hi) + 1);
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0] as u16, (w[1] - 1) as u16);
            let accepted = self
                .rules
                .iter()
                .find(|r| general(r) && r.port_matches(lo))
                .is_some_and(|r| r.action == Action::Accept);
            match ranges.last_mut() {
                Some(last) if accepted && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
                _ if accepted => ranges.push((lo, hi)),
                _ => {}
            }
        }
        if ranges.len() > MAX_PORT_RANGES {
            let mut keep: Vec<(u16, u16)> = ranges.clone();
            keep.sort_by_key(|&(lo, hi)| std::cmp::Reverse((lo < 1024, hi - lo)));
            keep.truncate(MAX_PORT_RANGES);
            ranges.retain(|r| keep.contains(r));
        }
        ExitPorts(ranges)
    }

    /// Does it allow anything at all?
    pub fn is_exit(&self) -> bool {
        self.rules.iter().any(|r| r.action == Action::Accept)
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.to_string()).collect()
    }
}

impl Rule {
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::malformed("exit policy rule", format!("{s:?}: {why}"));
        let (act, rest) = s
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("no action"))?;
        let action = match act {
            "accept" => Action::Accept,
            "reject" => Action::Reject,
            _ => return Err(bad("action must be accept or reject")),
        };
        let rest = rest.trim();
        let (addr, ports) = rest.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
        let addr = match addr {
            "*" => AddrPattern::Any,
            "private" => AddrPattern::Private,
            a => {
                let (ip, bits) = match a.split_once('/') {
                    Some((ip, b)) => (
                        ip,
                        Some(b.parse::<u8>().map_err(|_| bad("bad prefix length"))?),
                    ),
                    None => (a, None),
                };
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                match ip.parse::<IpAddr>().map_err(|_| bad("bad address"))? {
                    IpAddr::V4(v) => AddrPattern::V4(v, bits.unwrap_or(32)),
                    IpAddr::V6(v) => AddrPattern::V6(v, bits.unwrap_or(128)),
                }
            }
        };
        let (port_lo, port_hi) = match ports {
            "*" => (1, 65535),
            p => match p.split_once('-') {
                Some((a, b)) => (
                    a.parse().map_err(|_| bad("bad port"))?,
                    b.parse().map_err(|_| bad("bad port"))?,
                ),
                None => {
                    let v = p.parse().map_err(|_| bad("bad port"))?;
                    (v, v)
                }
            },
        };
        let r = Rule {
            action,
            addr,
            port_lo,
            port_hi,
        };
        ExitPolicy { rules: vec![r] }.check()?;
        Ok(r)
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let act = match self.action {
            Action::Accept => "accept",
            Action::Reject => "reject",
        };
        let addr = match self.addr {
            AddrPattern::Any => "*".to_string(),
            AddrPattern::Private => "private".to_string(),
            AddrPattern::V4(a, b) => format!("{a}/{b}"),
            AddrPattern::V6(a, b) => format!("[{a}]/{b}"),
        };
        let ports = match (self.port_lo, self.port_hi) {
            (1, 65535) => "*".to_string(),
            (a, b) if a == b => a.to_string(),
            (a, b) => format!("{a}-{b}"),
        };
        write!(f, "{act} {addr}:{ports}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_includes_ipv4_carried_in_ipv6() {
        for a in [
            "fec0::1",
            "::ffff:10.0.0.1",
            "::192.168.1.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.1.2.3",
            "64:ff9b:1::a00:1",
            "2002:c0a8:0101::1",
            "2002:7f00:0001::",
            "64:ff9b:1:ffff::1",
            "2001:0:4136:e378::1",
            "::ffff:0:10.0.0.1",
            "::0.0.1.2",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in [
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
            "2001:db8::1",
            "::ffff:1.1.1.1",
        ] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
        assert!(is_private("::1".parse().unwrap()));
        assert!(is_private("::".parse().unwrap()));
    }

    #[test]
    fn default_exit_rejects_private_and_smtp() {
        let p = ExitPolicy::default_exit();
        assert!(!p.allows("127.0.0.1".parse().unwrap(), 80));
        assert!(!p.allows("10.1.1.1".parse().unwrap(), 80));
        assert!(!p.allows("::1".parse().unwrap(), 80));
        assert!(!p.allows("192.168.0.1".parse().unwrap(), 443));
        assert!(!p.allows("8.8.8.8".parse().unwrap(), 25));
        assert!(p.allows("8.8.8.8".parse().unwrap(), 443));
        assert!(p.may_allow_port(443));
        assert!(!p.may_allow_port(25));
        assert!(!ExitPolicy::reject_all().is_exit());
    }

    #[test]
    fn summaries_list_ports_open_to_any_address() {
        let s = ExitPolicy::default_exit().summary();
        assert_eq!(
            s.to_string(),
            "1-24,26-118,120-134,140-444,446-562,564-1213,1215-4660,4667-6345,6430-6698,6700-6880,7000-65535"
        );
        assert!(s.allows(443) && s.allows(1) && s.allows(65535));
        assert!(!s.allows(25) && !s.allows(6881) && !s.allows(0));
        s.check().unwrap();
        // Rules for some addresses do not open (or close) a port.
        let p = ExitPolicy::parse_rules(&[
            "accept 192.0.2.1:*",
            "reject 10.0.0.0/8:443",
            "accept *:443",
            "accept *:80",
            "accept *:81",
            "reject *:*",
        ])
        .unwrap();
        assert_eq!(p.summary(), ExitPorts(vec![(80, 81), (443, 443)]));
        // A reject of a very wide network closes its ports.
        let wide = ExitPolicy::parse_rules(&[
            "reject 0.0.0.0/0:1-1000",
            "reject [::]/8:*",
            "reject 10.0.0.0/9:2000",
            "accept *:*",
        ])
        .unwrap();
        assert_eq!(wide.summary(), ExitPorts(vec![]));
        let v4 = ExitPolicy::parse_rules(&[
            "reject 0.0.0.0/0:1-1000",
            "reject 10.0.0.0/9:2000",
            "accept *:*",
        ])
        .unwrap();
        assert_eq!(v4.summary(), ExitPorts(vec![(1001, 65535)]));
        assert!(!ExitPolicy::reject_all().summary().is_exit());
        // The testnet's exits accept loopback before rejecting private
        // addresses: every port but the rejected ones is open.
        let t = ExitPolicy::parse_rules(&[
            "reject *:25",
            "accept 127.0.0.0/8:*",
            "reject private:*",
            "accept *:*",
        ])
        .unwrap();
        assert_eq!(t.summary(), ExitPorts(vec![(1, 24), (26, 65535)]));
    }

    #[test]
    fn long_summaries_drop_narrow_high_ranges_first() {
        // 40 single ports below 1024, 100 above, and one wide range.
        let lines: Vec<String> = (0..40u16)
            .map(|i| format!("accept *:{}", 2 + 2 * i))
            .chain((0..100u16).map(|i| format!("accept *:{}", 2000 + 2 * i)))
            .chain(["accept *:30000-40000".to_string(), "reject *:*".to_string()])
            .collect();
        let s = ExitPolicy::parse_rules(&lines).unwrap().summary();
        assert_eq!(s.0.len(), MAX_PORT_RANGES);
        s.check().unwrap();
        assert!(s.allows(2) && s.allows(80) && s.allows(30000));
        let high = (2000..2200).filter(|&p| s.allows(p)).count();
        assert_eq!(
            high,
            MAX_PORT_RANGES - 41,
            "narrow high ranges are dropped first"
        );
        // Never more than the policy accepts.
        assert!(!s.allows(3));
        let bad = ExitPorts(vec![(80, 90), (85, 100)]);
        assert!(bad.check().is_err());
        assert!(
            ExitPorts(vec![(1, 5), (6, 9)]).check().is_err(),
            "adjacent ranges are one"
        );
    }

    #[test]
    fn parse_and_display_roundtrip() {
        let lines = [
            "reject *:25",
            "accept 127.0.0.0/8:*",
            "accept [::1]/128:80-443",
            "reject private:*",
            "accept *:*",
        ];
        let p = ExitPolicy::parse_rules(&lines).unwrap();
        assert_eq!(p.to_strings(), lines);
        assert!(p.allows("127.0.0.1".parse().unwrap(), 8080));
        assert!(!p.allows("127.0.0.1".parse().unwrap(), 25));
        assert!(!p.allows("10.0.0.1".parse().unwrap(), 80));
        assert!(p.allows("::1".parse().unwrap(), 443));
        assert!(!p.may_allow_port(25));
        for bad in [
            "allow *:*",
            "accept *",
            "accept 1.2.3.4/40:*",
            "accept *:0",
            "accept *:9-3",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }

    /// A policy that was never checked (a descriptor in a vote has only its
    /// signature checked) with an accept from port 0: its summary starts at
    /// port 1, as the consensus check requires. Found by the `vote` fuzz
    /// target, whose consensus had the summary `0-0` that clients refuse.
    #[test]
    fn summaries_of_unchecked_policies_from_port_zero_start_at_one() {
        let rule = |lo, hi| Rule {
            action: Action::Accept,
            addr: AddrPattern::Any,
            port_lo: lo,
            port_hi: hi,
        };
        for (rules, want) in [
            (vec![rule(0, 0)], vec![]),
            (vec![rule(0, 80)], vec![(1, 80)]),
            (vec![rule(0, 65535)], vec![(1, 65535)]),
        ] {
            let p = ExitPolicy { rules };
            assert!(p.check().is_err());
            let s = p.summary();
            assert_eq!(s, ExitPorts(want));
            s.check().unwrap();
        }
    }
}
