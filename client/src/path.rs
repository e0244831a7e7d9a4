//! Path selection: pure, with the RNG passed in.
//!
//! Guard, middle and exit are drawn by consensus bandwidth among relays with
//! the right flags; an exit must allow the target by its policy (for a
//! hostname: allow the port somewhere). A relay never appears twice.

use allium_proto::relaymsg::TargetAddr;
use allium_proto::{Consensus, ConsensusRelay, RelayFlags};
use rand::{Rng, RngExt};

use crate::ClientError;

/// What the exit must reach, if anything.
#[derive(Clone, Debug)]
pub enum ExitTarget<'a> {
    Any,
    Addr(&'a TargetAddr, u16),
}

pub fn exit_allows(r: &ConsensusRelay, t: &ExitTarget<'_>) -> bool {
    match t {
        ExitTarget::Any => r.exit_policy.is_exit(),
        ExitTarget::Addr(TargetAddr::Ip(ip), port) => r.exit_policy.allows(*ip, *port),
        ExitTarget::Addr(TargetAddr::Host(_), port) => r.exit_policy.may_allow_port(*port),
    }
}

fn usable(r: &ConsensusRelay) -> bool {
    r.flags.has(RelayFlags::RUNNING | RelayFlags::VALID)
}

/// Pick one of `cands` with probability proportional to bandwidth.
pub fn weighted<'a, R: Rng + ?Sized>(
    rng: &mut R,
    cands: &[&'a ConsensusRelay],
) -> Option<&'a ConsensusRelay> {
    let total: u64 = cands.iter().map(|r| r.bandwidth.max(1) as u64).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    for r in cands {
        let w = r.bandwidth.max(1) as u64;
        if x < w {
            return Some(r);
        }
        x -= w;
    }
    None
}

/// Choose guard, middle and exit.
pub fn choose_path<R: Rng + ?Sized>(
    rng: &mut R,
    c: &Consensus,
    target: &ExitTarget<'_>,
) -> Result<[ConsensusRelay; 3], ClientError> {
    let exits: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| {
            usable(r)
                && r.flags.has(RelayFlags::EXIT)
                && !r.flags.has(RelayFlags::BAD_EXIT)
                && exit_allows(r, target)
        })
        .collect();
    let exit = weighted(rng, &exits).ok_or_else(|| {
        ClientError::NoExit(match target {
            ExitTarget::Any => "any target".into(),
            ExitTarget::Addr(a, p) => format!("{a}:{p}"),
        })
    })?;
    let guards: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| usable(r) && r.flags.has(RelayFlags::GUARD) && r.identity != exit.identity)
        .collect();
    let guard =
        weighted(rng, &guards).ok_or_else(|| ClientError::NoPath("no guard available".into()))?;
    let middles: Vec<&ConsensusRelay> = c
        .relays
        .iter()
        .filter(|r| usable(r) && r.identity != exit.identity && r.identity != guard.identity)
        .collect();
    let middle =
        weighted(rng, &middles).ok_or_else(|| ClientError::NoPath("no middle available".into()))?;
    Ok([guard.clone(), middle.clone(), exit.clone()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_proto::policy::ExitPolicy;
    use rand::SeedableRng;

    fn relay(i: u8, bw: u32, flags: u16, exit: bool) -> ConsensusRelay {
        ConsensusRelay {
            nickname: format!("r{i}"),
            identity: [i; 32],
            link_key: [0; 32],
            onion_key: [0; 32],
            addr: format!("127.0.0.1:{}", 9000 + i as u16).parse().unwrap(),
            flags: RelayFlags(flags | RelayFlags::RUNNING | RelayFlags::VALID),
            bandwidth: bw,
            exit_policy: if exit {
                ExitPolicy::parse_rules(&["reject *:25", "accept *:*"]).unwrap()
            } else {
                ExitPolicy::reject_all()
            },
            family: vec![],
            descriptor_digest: [0; 32],
        }
    }

    #[test]
    fn distinct_weighted_and_policy_respecting() {
        let c = Consensus {
            valid_after: 0,
            fresh_until: 0,
            valid_until: 0,
            relays: vec![
                relay(1, 1000, RelayFlags::GUARD, false),
                relay(2, 3000, RelayFlags::GUARD, false),
                relay(3, 1000, 0, false),
                relay(4, 1000, RelayFlags::EXIT, true),
                relay(5, 3000, RelayFlags::EXIT, true),
            ],
        };
        let seed = 7u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let target = TargetAddr::Host("example.com".into());
        let mut exit5 = 0;
        let n = 10_000;
        for _ in 0..n {
            let p = choose_path(&mut rng, &c, &ExitTarget::Addr(&target, 443)).unwrap();
            assert!(p[0].flags.has(RelayFlags::GUARD), "seed {seed}");
            assert!(p[2].flags.has(RelayFlags::EXIT));
            assert!(
                p[0].identity != p[1].identity
                    && p[1].identity != p[2].identity
                    && p[0].identity != p[2].identity
            );
            if p[2].identity == [5; 32] {
                exit5 += 1;
            }
        }
        // Exit 5 has 3/4 of the exit bandwidth.
        let share = exit5 as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "share {share}, seed {seed}");
        assert!(matches!(
            choose_path(&mut rng, &c, &ExitTarget::Addr(&target, 25)),
            Err(ClientError::NoExit(_))
        ));
    }
}
