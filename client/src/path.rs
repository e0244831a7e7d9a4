//! Path selection: pure, with the RNG passed in.
//!
//! Guard, middle and exit are drawn by consensus bandwidth among relays with
//! the right flags; an exit must allow the target by its policy (for a
//! hostname: allow the port somewhere). A relay never appears twice, and
//! no two relays of a path share an IPv4 /16, an IPv6 /32, or a family
//! (both relays list each other).

use allium_link::safelog::Sensitive;
use allium_proto::relaymsg::TargetAddr;
use allium_proto::{Consensus, ConsensusRelay, RelayFlags};
use rand::seq::IndexedRandom;
use rand::{Rng, RngExt};

use crate::ClientError;

/// What the exit must reach, if anything; or which relay must be the last
/// hop (a service directory, an introduction or rendezvous point), which
/// needs no Exit flag.
#[derive(Clone, Debug)]
pub enum ExitTarget<'a> {
    Any,
    Addr(&'a TargetAddr, u16),
    Relay(&'a [u8; 32]),
}

/// Does the consensus' summary of `r`'s exit policy accept the target's
/// port? The exit applies its full policy (and refuses private addresses
/// unless told otherwise) when the stream opens.
pub fn exit_allows(r: &ConsensusRelay, t: &ExitTarget<'_>) -> bool {
    match t {
        ExitTarget::Any => r.exit_ports.is_exit(),
        ExitTarget::Addr(_, port) => r.exit_ports.allows(*port),
        ExitTarget::Relay(id) => r.identity == **id,
    }
}

/// The network a relay's address belongs to for path diversity.
fn subnet(r: &ConsensusRelay) -> (u8, [u8; 4]) {
    match r.addr.ip() {
        std::net::IpAddr::V4(a) => {
            let o = a.octets();
            (4, [o[0], o[1], 0, 0])
        }
        std::net::IpAddr::V6(a) => {
            let o = a.octets();
            (6, [o[0], o[1], o[2], o[3]])
        }
    }
}

/// May `a` and `b` be in the same circuit?
pub fn compatible(a: &ConsensusRelay, b: &ConsensusRelay) -> bool {
    let family = a.family.is_some() && a.family == b.family;
    a.identity != b.identity && subnet(a) != subnet(b) && !family
}

/// Listed Running and Valid: fit for a circuit.
pub fn usable(r: &ConsensusRelay) -> bool {
    r.flags.has(RelayFlags::RUNNING | RelayFlags::VALID)
}

/// A path position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    Guard,
    Middle,
    Exit,
}

/// Position weights, as the consensus publishes them (computed by the
/// authorities, `allium_proto::PositionWeights`): scarce Guard and Exit
/// capacity is kept for its own position.
#[derive(Clone, Copy, Debug)]
pub struct Weights {
    exit_elsewhere: f64,
    guard_as_middle: f64,
}

impl Weights {
    pub fn new(c: &Consensus) -> Self {
        let scale = f64::from(allium_proto::PositionWeights::SCALE);
        Weights {
            exit_elsewhere: f64::from(c.weights.exit_elsewhere.min(10_000)) / scale,
            guard_as_middle: f64::from(c.weights.guard_as_middle.min(10_000)) / scale,
        }
    }

    /// The weight of relay `r` in position `p`.
    pub fn weight(&self, r: &ConsensusRelay, p: Position) -> u64 {
        let bw = r.bandwidth.max(1) as f64;
        let exit = r.flags.has(RelayFlags::EXIT);
        let guard = r.flags.has(RelayFlags::GUARD);
        let f = match p {
            Position::Exit => 1.0,
            Position::Guard | Position::Middle if exit => self.exit_elsewhere,
            Position::Guard => 1.0,
            Position::Middle if guard => self.guard_as_middle,
            Position::Middle => 1.0,
        };
        (bw * f) as u64
    }
}

/// Pick one of `cands` with probability proportional to its weight in `p`;
/// uniformly if they all weigh 0 there (in a network so small that only
/// scarce guards or exits are left for the position).
pub fn weighted<'a, R: Rng + ?Sized>(
    rng: &mut R,
    w: &Weights,
    p: Position,
    cands: &[&'a ConsensusRelay],
) -> Option<&'a ConsensusRelay> {
    let total: u64 = cands.iter().map(|r| w.weight(r, p)).sum();
    if total == 0 {
        return cands.choose(rng).copied();
    }
    let mut x = rng.random_range(0..total);
    for r in cands {
        let wr = w.weight(r, p);
        if x < wr {
            return Some(r);
        }
        x -= wr;
    }
    None
}

/// Choose guard, middle and exit. With `guard` given (from the guard
/// sample) only middle and exit are chosen, compatible with it. A circuit
/// to a chosen relay takes its middle from `layer2` (the restricted
/// middles, `vanguards.rs`) when one of them fits the path; with none that
/// does (each is the target, or shares its or the guard's family or /16),
/// from all relays. Middle and exit are none of `avoid` (relays that failed
/// this build, exits a stream gave up on) while another fits.
pub fn choose_path<R: Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    target: &ExitTarget<'_>,
    guard: Option<&ConsensusRelay>,
    layer2: &[[u8; 32]],
    avoid: &[[u8; 32]],
) -> Result<[ConsensusRelay; 3], ClientError> {
    let w = Weights::new(c);
    let mut exits: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| {
            let exit = r.flags.has(RelayFlags::EXIT) && !r.flags.has(RelayFlags::BAD_EXIT);
            usable(r)
                && (exit || matches!(target, ExitTarget::Relay(_)))
                && exit_allows(r, target)
                && guard.is_none_or(|g| compatible(g, r))
        })
        .collect();
    prefer_not(&mut exits, avoid);
    let exit = weighted(rng, &w, Position::Exit, &exits).ok_or_else(|| match target {
        ExitTarget::Any => ClientError::NoExit(Sensitive("any target".into())),
        ExitTarget::Addr(a, p) => ClientError::NoExit(Sensitive(format!("{a}:{p}"))),
        ExitTarget::Relay(id) => ClientError::CannotEndAt {
            relay: **id,
            why: "it is not Running, or it is the guard (or shares the guard's family or /16)"
                .into(),
        },
    })?;
    let guard = match guard {
        Some(g) => g,
        None => {
            let guards: Vec<&ConsensusRelay> = c
                .relays
                .iter()
                .filter(|r| usable(r) && r.flags.has(RelayFlags::GUARD) && compatible(r, exit))
                .collect();
            weighted(rng, &w, Position::Guard, &guards)
                .ok_or_else(|| ClientError::NoPath("no guard available".into()))?
        }
    };
    let mut middles: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| usable(r) && compatible(r, exit) && compatible(r, guard))
        .collect();
    if matches!(target, ExitTarget::Relay(_))
        && middles.iter().any(|r| layer2.contains(&r.identity))
    {
        middles.retain(|r| layer2.contains(&r.identity));
    }
    prefer_not(&mut middles, avoid);
    let middle = weighted(rng, &w, Position::Middle, &middles)
        .ok_or_else(|| ClientError::NoPath("no middle available".into()))?;
    Ok([guard.clone(), middle.clone(), exit.clone()])
}

/// Drop the candidates in `avoid`, unless that would leave none.
pub(crate) fn prefer_not(candidates: &mut Vec<&ConsensusRelay>, avoid: &[[u8; 32]]) {
    if candidates.iter().any(|r| !avoid.contains(&r.identity)) {
        candidates.retain(|r| !avoid.contains(&r.identity));
    }
}

/// Guard candidates for a new guard sample, best first (weighted random
/// order, without repeats).
pub fn sample_guards<R: Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    n: usize,
    exclude: &[[u8; 32]],
) -> Vec<ConsensusRelay> {
    sample(rng, c, n, exclude, Position::Guard)
}

/// `n` new restricted middles (`vanguards.rs`): usable relays drawn by
/// middle-position weight, without repeats, none of `exclude`.
pub fn sample_middles<R: Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    n: usize,
    exclude: &[[u8; 32]],
) -> Vec<ConsensusRelay> {
    sample(rng, c, n, exclude, Position::Middle)
}

/// Up to `n` relays fit for position `p` (Guard-flagged ones for a guard),
/// drawn by their weight there, without repeats, none of `exclude`.
fn sample<R: Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    n: usize,
    exclude: &[[u8; 32]],
    p: Position,
) -> Vec<ConsensusRelay> {
    let w = Weights::new(c);
    let mut cands: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| {
            usable(r)
                && (p != Position::Guard || r.flags.has(RelayFlags::GUARD))
                && !exclude.contains(&r.identity)
        })
        .collect();
    let mut out = Vec::new();
    while out.len() < n {
        let Some(g) = weighted(rng, &w, p, &cands) else {
            break;
        };
        cands.retain(|r| r.identity != g.identity);
        out.push(g.clone());
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use allium_proto::policy::ExitPolicy;
    use rand::SeedableRng;

    /// Relay `i` at 127.i.0.1 (so each in its own /16), Running and Valid
    /// with `flags`, weighing `bw`; an Exit takes every port but 25.
    pub(crate) fn relay(i: u8, bw: u32, flags: u16) -> ConsensusRelay {
        ConsensusRelay {
            nickname: format!("r{i}"),
            identity: [i; 32],
            link_key: allium_proto::LinkKey([0; 32]),
            onion_key: allium_proto::OnionKey([0; 32]),
            addr: format!("127.{i}.0.1:9000").parse().unwrap(),
            flags: RelayFlags(flags | RelayFlags::RUNNING | RelayFlags::VALID),
            bandwidth: bw,
            declared_bandwidth: bw,
            measured_bandwidth: Some(bw),
            exit_ports: if flags & RelayFlags::EXIT != 0 {
                ExitPolicy::parse_rules(&["reject *:25", "accept *:*"])
                    .unwrap()
                    .summary()
            } else {
                Default::default()
            },
            family: None,
            descriptor_digest: [0; 32],
        }
    }

    fn net() -> Consensus {
        let mut relays = vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 3000, RelayFlags::GUARD),
            relay(3, 1000, 0),
            relay(4, 1000, RelayFlags::EXIT),
            relay(5, 3000, RelayFlags::EXIT),
            relay(6, 2000, 0),
            relay(7, 2000, RelayFlags::GUARD),
        ];
        // 6 and 7 share a /16 with 3 and 1; 2 and 5 are one family.
        relays[5].addr = "127.3.9.9:9000".parse().unwrap();
        relays[6].addr = "127.1.9.9:9000".parse().unwrap();
        relays.sort_by_key(|r| r.identity);
        relays[1].family = Some(1);
        relays[4].family = Some(1);
        consensus_of(relays)
    }

    /// A consensus of `relays` (sorted by identity), with its position
    /// weights.
    pub(crate) fn consensus_of(relays: Vec<ConsensusRelay>) -> Consensus {
        Consensus {
            valid_after: 0,
            fresh_until: 0,
            valid_until: 0,
            weights: allium_proto::PositionWeights::compute(&relays),
            relays,
            shared_random: Default::default(),
        }
    }

    /// Four relays, all Guards but the target: guard capacity is so scarce
    /// that a Guard weighs 0 as middle, and the middle is still chosen
    /// (uniformly) rather than no circuit built.
    #[test]
    fn a_middle_is_chosen_when_every_candidate_weighs_nothing() {
        let mut c = consensus_of(vec![
            relay(1, 1000, RelayFlags::GUARD),
            relay(2, 1000, RelayFlags::GUARD),
            relay(3, 1000, RelayFlags::GUARD),
            relay(4, 1000, 0),
        ]);
        c.weights.guard_as_middle = 0;
        let mut rng = rand::rng();
        let target = [4u8; 32];
        let guard = c.relays[0].clone();
        let mut middles: Vec<u8> = (0..100)
            .map(|_| {
                let to = ExitTarget::Relay(&target);
                choose_path(&mut rng, &c, &to, Some(&guard), &[], &[]).unwrap()[1].identity[0]
            })
            .collect();
        middles.sort();
        middles.dedup();
        assert_eq!(middles, [2, 3]);
    }

    /// A circuit to a given relay (a service directory, say) ends there,
    /// Exit or not, and its other hops still keep the rules.
    #[test]
    fn a_circuit_to_a_relay_ends_at_that_relay() {
        let c = net();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for id in [[3u8; 32], [4; 32], [7; 32]] {
            for _ in 0..200 {
                let p = choose_path(&mut rng, &c, &ExitTarget::Relay(&id), None, &[], &[]).unwrap();
                assert_eq!(p[2].identity, id);
                for (i, j) in [(0, 1), (1, 2), (0, 2)] {
                    assert!(compatible(&p[i], &p[j]));
                }
            }
        }
        // Not in the consensus, or not Running: no path.
        assert!(choose_path(&mut rng, &c, &ExitTarget::Relay(&[99; 32]), None, &[], &[]).is_err());
        let mut down = net();
        down.relays[2].flags = RelayFlags(RelayFlags::VALID);
        let id = down.relays[2].identity;
        assert!(choose_path(&mut rng, &down, &ExitTarget::Relay(&id), None, &[], &[]).is_err());
    }

    /// A circuit to a chosen relay takes its middle from the restricted
    /// middles that fit; an exit circuit ignores them; with none that fits,
    /// any middle will do.
    #[test]
    fn circuits_to_a_chosen_relay_use_the_restricted_middles() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let c = net();
        let (r3, r4, r6) = ([3; 32], [4; 32], [6; 32]);
        let middles = |target: &ExitTarget<'_>, layer2: &[[u8; 32]], rng: &mut _| {
            let mut seen: Vec<[u8; 32]> = (0..200)
                .map(|_| choose_path(rng, &c, target, None, layer2, &[]).unwrap()[1].identity)
                .collect();
            seen.sort();
            seen.dedup();
            seen
        };
        let to4 = ExitTarget::Relay(&r4);
        assert_eq!(middles(&to4, &[r3, r4], &mut rng), [r3], "r4 is the target");
        assert_eq!(middles(&to4, &[r3, r6], &mut rng), [r3, r6]);
        assert!(middles(&to4, &[], &mut rng).len() > 2);
        assert!(middles(&to4, &[r4], &mut rng).len() > 2, "none fits: any");
        assert!(middles(&ExitTarget::Any, &[r3], &mut rng).len() > 1);
    }

    #[test]
    fn seeded_draws_follow_bandwidth_and_never_break_the_rules() {
        let c = net();
        let seed = 7u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let target = TargetAddr::Host("example.com".into());
        let n = 10_000;
        let mut exit5 = 0;
        for _ in 0..n {
            let p = choose_path(
                &mut rng,
                &c,
                &ExitTarget::Addr(&target, 443),
                None,
                &[],
                &[],
            )
            .unwrap();
            assert!(p[0].flags.has(RelayFlags::GUARD), "seed {seed}");
            assert!(p[2].flags.has(RelayFlags::EXIT) && p[2].exit_ports.allows(443));
            for (i, j) in [(0, 1), (1, 2), (0, 2)] {
                assert!(
                    compatible(&p[i], &p[j]),
                    "seed {seed}: {} and {} together",
                    p[i].nickname,
                    p[j].nickname
                );
            }
            if p[2].identity == [5; 32] {
                exit5 += 1;
            }
        }
        // Relay 5 has 3/4 of the exit bandwidth; its family partner 2 is
        // never its guard, which the guard choice does not change.
        let share = exit5 as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "share {share}, seed {seed}");
        assert!(matches!(
            choose_path(&mut rng, &c, &ExitTarget::Addr(&target, 25), None, &[], &[]),
            Err(ClientError::NoExit(_))
        ));
        let ip = TargetAddr::Ip("10.0.0.1".parse().unwrap());
        assert!(
            choose_path(&mut rng, &c, &ExitTarget::Addr(&ip, 80), None, &[], &[]).is_ok(),
            "this policy allows private"
        );
    }

    #[test]
    fn scarce_exits_are_not_middles() {
        // Exits: 4000 of 13000, just under T/3: exits only as exits.
        let c = net();
        let w = Weights::new(&c);
        let r5 = c.relay(&[5; 32]).unwrap();
        assert_eq!(w.weight(r5, Position::Middle), 0);
        assert_eq!(w.weight(r5, Position::Exit), 3000);
        // Guards: 6000 of 13000, above T/3: guards give their surplus to middles.
        let r2 = c.relay(&[2; 32]).unwrap();
        let expect = (3000.0 * (6000.0 - 13000.0 / 3.0) / 6000.0) as u64;
        assert_eq!(w.weight(r2, Position::Middle), expect);
        assert_eq!(w.weight(c.relay(&[3; 32]).unwrap(), Position::Middle), 1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            let p = choose_path(&mut rng, &c, &ExitTarget::Any, None, &[], &[]).unwrap();
            assert!(!p[1].flags.has(RelayFlags::EXIT), "an exit in the middle");
        }
    }

    #[test]
    fn fixed_guard_and_sample() {
        let c = net();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let g = c.relay(&[2; 32]).unwrap().clone();
        for _ in 0..500 {
            let p = choose_path(&mut rng, &c, &ExitTarget::Any, Some(&g), &[], &[]).unwrap();
            assert_eq!(p[0].identity, g.identity);
            assert_ne!(p[2].identity, [5; 32], "relay 5 is relay 2's family");
        }
        let s = sample_guards(&mut rng, &c, 2, &[[2; 32]]);
        assert_eq!(s.len(), 2);
        assert!(
            s.iter()
                .all(|r| r.identity != [2; 32] && r.flags.has(RelayFlags::GUARD))
        );
        assert_ne!(s[0].identity, s[1].identity);
    }
}
