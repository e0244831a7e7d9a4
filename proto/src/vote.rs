//! Votes and the consensus computation (`doc/protocol.md` section 8).
//!
//! Each authority signs a [`Vote`] listing the relays it knows (by the
//! digest of their descriptors), the flags it assigns and the bandwidth it
//! sees. [`compute_consensus`] turns a set of votes for one period, and
//! the descriptors they name ([`listed`]: an authority fetches those it
//! lacks from the others), into the consensus; it is a pure function of
//! them, so every authority that holds the same votes produces the same
//! bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::doc::PositionWeights;
use crate::doc::VerifiedDescriptor;
use crate::doc::{AuthSigned, AuthorityKey, MAX_CONSENSUS_RELAYS, MAX_VOTE_LEN, VOTE_DOMAIN};
use crate::{Consensus, ConsensusRelay, Error, RelayFlags};

pub mod shared_random;

use shared_random::{Round, SrVote, check_entries};

/// One relay as one authority sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VoteRelay {
    pub identity: [u8; 32],
    /// SHA-256 of the descriptor's body.
    pub digest: [u8; 32],
    pub flags: RelayFlags,
    /// The bandwidth the descriptor declares.
    pub bandwidth: u32,
    /// What this authority measured (bytes per second), if it has.
    pub measured: Option<u32>,
}

/// An authority's vote for the consensus that becomes valid at `valid_after`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vote {
    pub authority: [u8; 32],
    pub valid_after: u64,
    pub interval: u64,
    pub valid_intervals: u64,
    /// Sorted by identity, no repeats.
    pub relays: Vec<VoteRelay>,
    /// Its part in making the shared random value.
    pub shared_random: SrVote,
}

impl Vote {
    pub fn to_document(&self) -> AuthSigned {
        AuthSigned::new(postcard::to_stdvec(self).expect("encoding to a Vec cannot fail"))
    }

    /// Parse a signed vote and check that a pinned authority signed it,
    /// through a certificate valid at `now`, and that it is that
    /// authority's own vote.
    pub fn verify(b: &[u8], pinned: &[AuthorityKey], now: u64) -> Result<Vote, Error> {
        let doc = AuthSigned::parse("vote", b, MAX_VOTE_LEN)?;
        // The signature first: a body no authority signed is never decoded.
        let [s] = doc.signatures.as_slice() else {
            return Err(Error::malformed("vote", "must carry exactly one signature"));
        };
        let c = s
            .check(VOTE_DOMAIN, &doc.body, pinned, now)
            .map_err(|_| Error::BadSignature("vote"))?;
        let v: Vote = crate::doc::decode_exact("vote", &doc.body)?;
        if c.identity != v.authority {
            return Err(Error::BadSignature(
                "vote (signed by another authority than its author)",
            ));
        }
        if !v.relays.windows(2).all(|w| w[0].identity < w[1].identity) {
            return Err(Error::malformed(
                "vote",
                "relays not sorted by identity or repeated",
            ));
        }
        if v.relays.len() > MAX_CONSENSUS_RELAYS {
            return Err(Error::TooLarge {
                what: "vote relays",
                len: v.relays.len(),
                max: MAX_CONSENSUS_RELAYS,
            });
        }
        if v.interval == 0 || v.valid_intervals == 0 {
            return Err(Error::malformed("vote", "zero interval"));
        }
        check_entries("vote commitments", &v.shared_random.commits)?;
        check_entries("vote reveals", &v.shared_random.reveals)?;
        Ok(v)
    }
}

const FLAGS: [u16; 8] = [
    RelayFlags::RUNNING,
    RelayFlags::VALID,
    RelayFlags::EXIT,
    RelayFlags::GUARD,
    RelayFlags::STABLE,
    RelayFlags::FAST,
    RelayFlags::BAD_EXIT,
    RelayFlags::HSDIR,
];

/// The weight of a relay no majority of authorities has measured (bytes
/// per second), as Tor's 20 KB/s.
pub const UNMEASURED_WEIGHT: u32 = 20_000;

fn low_median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// Number each family: two listed relays that each declare the other are
/// in one family, and so is anything joined through a chain of such
/// pairs. A family is named by the index of its first member; a relay
/// in no pair has none.
fn assign_families(relays: &mut [ConsensusRelay], declared: &BTreeMap<[u8; 32], Vec<[u8; 32]>>) {
    let index: BTreeMap<[u8; 32], usize> = relays
        .iter()
        .enumerate()
        .map(|(i, r)| (r.identity, i))
        .collect();
    // Union-find over the indices, the root always the smallest.
    let mut parent: Vec<usize> = (0..relays.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for (i, r) in relays.iter().enumerate() {
        for other in declared.get(&r.identity).into_iter().flatten() {
            let Some(&j) = index.get(other) else { continue };
            let mutual = declared.get(other).is_some_and(|l| l.contains(&r.identity));
            if mutual && i != j {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    let roots: Vec<usize> = (0..relays.len()).map(|i| root(&mut parent, i)).collect();
    let mut size = vec![0usize; relays.len()];
    roots.iter().for_each(|&r| size[r] += 1);
    for (i, r) in relays.iter_mut().enumerate() {
        r.family = (size[roots[i]] > 1).then_some(roots[i] as u32);
    }
}

/// Each relay that more than half of `votes` list with the same
/// descriptor digest, with the entries that list it so, in identity order.
fn majorities(votes: &[Vote]) -> Vec<([u8; 32], [u8; 32], Vec<&VoteRelay>)> {
    let mut by_relay: BTreeMap<[u8; 32], Vec<&VoteRelay>> = BTreeMap::new();
    for v in votes {
        for r in &v.relays {
            by_relay.entry(r.identity).or_default().push(r);
        }
    }
    let n = votes.len();
    by_relay
        .into_iter()
        .filter_map(|(id, entries)| {
            let mut counts: BTreeMap<[u8; 32], usize> = BTreeMap::new();
            for e in &entries {
                *counts.entry(e.digest).or_default() += 1;
            }
            let (digest, _) = counts.into_iter().find(|(_, c)| 2 * c > n)?;
            let listing = entries.into_iter().filter(|e| e.digest == digest).collect();
            Some((id, digest, listing))
        })
        .collect()
}

/// The descriptors a consensus of `votes` needs: (identity, digest) of
/// each relay more than half of them list with the same digest.
pub fn listed(votes: &[Vote]) -> Vec<([u8; 32], [u8; 32])> {
    majorities(votes)
        .into_iter()
        .map(|(id, digest, _)| (id, digest))
        .collect()
}

/// The consensus of `votes`, which must all be for the same `valid_after`
/// and come from distinct authorities; `descriptor` gives the verified
/// descriptor of a digest, if the caller holds it. Rules:
///
/// * a relay is listed only if more than half of the votes list it with
///   the same descriptor digest, and that descriptor is held (verified,
///   with that digest and identity);
/// * each flag is set if more than half of those listing votes set it;
/// * its weight is the low median of the measurements of the listing
///   votes that have one, at most the declared bandwidth, if more than half
///   of all votes have one; otherwise it is [`UNMEASURED_WEIGHT`] and the
///   relay is neither Guard nor Fast;
/// * its exit policy is summarized ([`crate::policy::ExitPolicy::summary`])
///   and its family numbered ([`assign_families`]);
/// * with more than [`MAX_CONSENSUS_RELAYS`], the Running ones are kept
///   first, then the heaviest, then the lowest identities;
/// * `interval` and `valid_intervals` are the low medians over all votes;
///   `fresh_until = valid_after + interval`,
///   `valid_until = valid_after + interval * valid_intervals`;
/// * the shared random part is [`shared_random::combine`] of the votes'.
pub fn compute_consensus<'a>(
    votes: &[Vote],
    descriptor: impl Fn(&[u8; 32]) -> Option<&'a VerifiedDescriptor>,
) -> Result<Consensus, Error> {
    let first = votes
        .first()
        .ok_or_else(|| Error::malformed("votes", "none"))?;
    if votes.iter().any(|v| v.valid_after != first.valid_after) {
        return Err(Error::malformed("votes", "for different periods"));
    }
    let mut sorted: Vec<&Vote> = votes.iter().collect();
    sorted.sort_by_key(|v| v.authority);
    let n = votes.len();
    let mut relays = Vec::new();
    let mut declared_family: BTreeMap<[u8; 32], Vec<[u8; 32]>> = BTreeMap::new();
    for (id, digest, listing) in majorities(votes) {
        let Some(desc) = descriptor(&digest)
            .filter(|d| d.digest == digest && d.desc.identity == id)
            .map(|d| d.desc.clone())
        else {
            continue;
        };
        let mut flags = 0u16;
        for f in FLAGS {
            if 2 * listing.iter().filter(|e| e.flags.has(f)).count() > listing.len() {
                flags |= f;
            }
        }
        let declared = desc.bandwidth;
        let measured: Vec<u64> = listing
            .iter()
            .filter_map(|e| e.measured.map(u64::from))
            .collect();
        let (bandwidth, measured) = if 2 * measured.len() > n {
            let m = low_median(measured) as u32;
            (m.min(declared), Some(m))
        } else {
            flags &= !(RelayFlags::GUARD | RelayFlags::FAST);
            (UNMEASURED_WEIGHT.min(declared), None)
        };
        declared_family.insert(id, desc.family);
        relays.push(ConsensusRelay {
            nickname: desc.nickname,
            identity: id,
            link_key: desc.link_key,
            onion_key: desc.onion_key,
            addr: desc.addr,
            flags: RelayFlags(flags),
            bandwidth,
            declared_bandwidth: declared,
            measured_bandwidth: measured,
            exit_ports: desc.exit_policy.summary(),
            family: None,
            descriptor_digest: digest,
        });
    }
    if relays.len() > MAX_CONSENSUS_RELAYS {
        // Keep the Running relays first, then the heaviest.
        relays.sort_by_key(|r| {
            (
                !r.flags.has(RelayFlags::RUNNING),
                std::cmp::Reverse(r.bandwidth),
                r.identity,
            )
        });
        relays.truncate(MAX_CONSENSUS_RELAYS);
        relays.sort_by_key(|r| r.identity);
    }
    assign_families(&mut relays, &declared_family);
    let interval = low_median(votes.iter().map(|v| v.interval).collect());
    let valid_intervals = low_median(votes.iter().map(|v| v.valid_intervals).collect());
    let va = first.valid_after;
    let sr: Vec<_> = sorted
        .iter()
        .map(|v| (&v.authority, &v.shared_random))
        .collect();
    Ok(Consensus {
        valid_after: va,
        fresh_until: va.saturating_add(interval),
        valid_until: va.saturating_add(interval.saturating_mul(valid_intervals)),
        weights: PositionWeights::compute(&relays),
        relays,
        shared_random: shared_random::combine(Round::of(va, interval), &sr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{AuthorityCert, AuthoritySig};
    use crate::ntor::OnionSecret;
    use crate::policy::ExitPolicy;
    use crate::{LinkKey, RelayDescriptor};
    use ed25519_dalek::SigningKey;
    use sha2::{Digest, Sha256};

    /// Relay `i`'s descriptor (declaring 1000 bytes/s unless `declared`),
    /// as a vote lists it with measurement `bw`.
    fn relay(i: u8, published: u64, flags: u16, bw: u32) -> VoteRelay {
        relay_declaring(i, published, flags, Some(bw), 1000)
    }

    fn relay_declaring(
        i: u8,
        published: u64,
        flags: u16,
        measured: Option<u32>,
        declared: u32,
    ) -> VoteRelay {
        relay_with_family(i, published, flags, measured, declared, &[])
    }

    fn id(i: u8) -> [u8; 32] {
        SigningKey::from_bytes(&[i; 32]).verifying_key().to_bytes()
    }

    fn relay_with_family(
        i: u8,
        published: u64,
        flags: u16,
        measured: Option<u32>,
        declared: u32,
        family: &[u8],
    ) -> VoteRelay {
        let k = SigningKey::from_bytes(&[i; 32]);
        let onion = OnionSecret::new(x25519_dalek::StaticSecret::from([i; 32]));
        let d = RelayDescriptor {
            nickname: format!("r{i}"),
            identity: k.verifying_key().to_bytes(),
            link_key: LinkKey([1; 32]),
            onion_key: onion.public(),
            onion_crosscert: onion.crosscert(&k.verifying_key().to_bytes()),
            addr: "127.0.0.1:9001".parse().unwrap(),
            bandwidth: declared,
            exit_policy: ExitPolicy::reject_all(),
            family: family.iter().map(|&f| id(f)).collect(),
            published,
        }
        .sign(&k);
        let v = crate::UnverifiedDescriptor::parse(&d.to_bytes())
            .unwrap()
            .verify_unclocked()
            .unwrap();
        assert_eq!(v.digest, <[u8; 32]>::from(Sha256::digest(&d.body)));
        let digest = v.digest;
        HELD.with_borrow_mut(|h| h.insert(digest, Box::leak(Box::new(v))));
        VoteRelay {
            identity: k.verifying_key().to_bytes(),
            digest,
            flags: RelayFlags(flags),
            bandwidth: declared,
            measured,
        }
    }

    thread_local! {
        /// The descriptors the test relays were built with, by digest.
        static HELD: std::cell::RefCell<std::collections::HashMap<[u8; 32], &'static VerifiedDescriptor>> =
            Default::default();
    }

    /// The consensus of `votes`, with every descriptor they name held.
    fn compute(votes: &[Vote]) -> Result<Consensus, Error> {
        compute_consensus(votes, |d| HELD.with_borrow(|h| h.get(d).copied()))
    }

    fn vote(a: u8, relays: Vec<VoteRelay>) -> Vote {
        let mut relays = relays;
        relays.sort_by_key(|r| r.identity);
        Vote {
            authority: [a; 32],
            valid_after: 1000,
            interval: 60,
            valid_intervals: 3,
            relays,
            shared_random: SrVote::default(),
        }
    }

    const RV: u16 = RelayFlags::RUNNING | RelayFlags::VALID;

    #[test]
    fn majority_lists_flags_and_median() {
        let votes = vec![
            vote(
                1,
                vec![
                    relay(10, 5, RV, 100),
                    relay(11, 5, RV | RelayFlags::GUARD, 10),
                ],
            ),
            vote(
                2,
                vec![
                    relay(10, 5, RV | RelayFlags::GUARD, 300),
                    relay(11, 5, RV, 20),
                ],
            ),
            // Authority 3 alone knows relay 12, and does not list relay 11.
            vote(
                3,
                vec![relay(10, 5, RelayFlags::VALID, 200), relay(12, 5, RV, 1)],
            ),
        ];
        let c = compute(&votes).unwrap();
        let ids: Vec<[u8; 32]> = c.relays.iter().map(|r| r.identity).collect();
        assert!(ids.contains(&relay(10, 5, 0, 0).identity));
        // One authority cannot remove a relay the other two list...
        assert!(ids.contains(&relay(11, 5, 0, 0).identity));
        // ...nor add one the others do not know.
        assert!(!ids.contains(&relay(12, 5, 0, 0).identity));
        let r10 = c.relay(&relay(10, 5, 0, 0).identity).unwrap();
        assert_eq!(r10.flags.0, RV, "Running 2/3, Valid 3/3, Guard 1/3");
        assert_eq!(r10.bandwidth, 200);
        let r11 = c.relay(&relay(11, 5, 0, 0).identity).unwrap();
        assert_eq!(r11.flags.0, RV, "Guard 1/2 is not a majority");
        assert_eq!(
            (c.valid_after, c.fresh_until, c.valid_until),
            (1000, 1060, 1180)
        );
        // Deterministic: vote order does not matter.
        let mut rev = votes.clone();
        rev.reverse();
        assert_eq!(compute(&rev).unwrap(), c);
    }

    #[test]
    fn weights_are_measured_capped_by_the_declared_rate() {
        const RVG: u16 = RV | RelayFlags::GUARD | RelayFlags::FAST;
        let liar = |a: u32| relay_declaring(20, 5, RVG, Some(a), u32::MAX);
        let modest = |a: u32| relay_declaring(21, 5, RVG, Some(a), 500);
        let unmeasured = |m: Option<u32>| relay_declaring(22, 5, RVG, m, 10_000_000);
        let votes = vec![
            vote(
                1,
                vec![liar(9_000_000), modest(1000), unmeasured(Some(5_000_000))],
            ),
            vote(2, vec![liar(10_000_000), modest(2000), unmeasured(None)]),
            vote(3, vec![liar(11_000_000), modest(3000), unmeasured(None)]),
        ];
        let c = compute(&votes).unwrap();
        let get = |i: u8| c.relay(&relay(i, 5, 0, 0).identity).unwrap().clone();
        // What it declares does not matter: the authorities' median does.
        let l = get(20);
        assert_eq!(
            (l.bandwidth, l.measured_bandwidth),
            (10_000_000, Some(10_000_000))
        );
        assert_eq!(l.declared_bandwidth, u32::MAX);
        // An operator can lower its weight below what it measures.
        assert_eq!(get(21).bandwidth, 500);
        // Measured by one authority of three: the small fixed weight, no Guard.
        let u = get(22);
        assert_eq!(
            (u.bandwidth, u.measured_bandwidth),
            (UNMEASURED_WEIGHT, None)
        );
        assert!(!u.flags.has(RelayFlags::GUARD));
        assert!(!u.flags.has(RelayFlags::FAST));
        assert!(l.flags.has(RelayFlags::GUARD));
    }

    #[test]
    fn families_need_both_sides_and_are_named_by_their_first_member() {
        // 30 and 31 declare each other, 31 and 32 too (so 30-32 are one
        // family); 33 claims 30, which does not answer; 34 declares
        // itself only.
        let fam = |i: u8, f: &[u8]| relay_with_family(i, 5, RV, Some(10), 10, f);
        let relays = || {
            vec![
                fam(30, &[31]),
                fam(31, &[30, 32]),
                fam(32, &[31]),
                fam(33, &[30]),
                fam(34, &[34]),
            ]
        };
        let votes: Vec<Vote> = (1..=3).map(|a| vote(a, relays())).collect();
        let c = compute(&votes).unwrap();
        let f = |i: u8| c.relay(&id(i)).unwrap().family;
        let first = (30..=32)
            .map(|i| c.relays.iter().position(|r| r.identity == id(i)).unwrap())
            .min()
            .unwrap() as u32;
        assert_eq!([f(30), f(31), f(32)], [Some(first); 3]);
        assert_eq!((f(33), f(34)), (None, None));
        // What a client parses back holds.
        let doc = c.to_document().to_bytes();
        assert_eq!(*crate::UnverifiedConsensus::parse(&doc).unwrap().peek(), c);
    }

    #[test]
    fn different_descriptors_split_the_vote() {
        let votes = vec![
            vote(1, vec![relay(10, 5, RV, 100)]),
            vote(2, vec![relay(10, 6, RV, 100)]),
            vote(3, vec![relay(10, 7, RV, 100)]),
        ];
        assert!(compute(&votes).unwrap().relays.is_empty());
    }

    #[test]
    fn a_relay_is_listed_only_with_the_descriptor_its_digest_names() {
        let r = relay(10, 5, RV, 100);
        let votes = vec![vote(1, vec![r.clone()]), vote(2, vec![r.clone()])];
        assert_eq!(listed(&votes), [(r.identity, r.digest)]);
        assert_eq!(compute(&votes).unwrap().relays.len(), 1);
        // Not held: not listed.
        assert!(
            compute_consensus(&votes, |_| None)
                .unwrap()
                .relays
                .is_empty()
        );
        // What is handed back for the digest must be that descriptor, of
        // that relay.
        let other = relay(11, 5, RV, 100);
        let held = HELD.with_borrow(|h| h[&other.digest]);
        assert!(
            compute_consensus(&votes, |_| Some(held))
                .unwrap()
                .relays
                .is_empty()
        );
        let mut renamed = held.clone();
        renamed.digest = r.digest;
        assert!(
            compute_consensus(&votes, |_| Some(&renamed))
                .unwrap()
                .relays
                .is_empty()
        );
        // One vote of three is no majority: nothing to fetch.
        let lone = vec![vote(1, vec![r]), vote(2, vec![]), vote(3, vec![])];
        assert!(listed(&lone).is_empty());
    }

    #[test]
    fn vote_signatures() {
        let id = SigningKey::from_bytes(&[1; 32]);
        let sk = SigningKey::from_bytes(&[2; 32]);
        let ident = id.verifying_key().to_bytes();
        let cert = AuthorityCert {
            identity: ident,
            signing_key: sk.verifying_key().to_bytes(),
            valid_from: 0,
            valid_until: 5000,
        }
        .sign(&id);
        let mut v = vote(0, vec![relay(10, 5, RV, 1)]);
        v.authority = ident;
        let mut d = v.to_document();
        d.add(AuthoritySig::make(VOTE_DOMAIN, &d.body, &cert, &sk));
        let pinned = [AuthorityKey(ident)];
        assert_eq!(Vote::verify(&d.to_bytes(), &pinned, 1000).unwrap(), v);
        assert!(
            Vote::verify(&d.to_bytes(), &pinned, 6000).is_err(),
            "expired certificate"
        );
        assert!(
            Vote::verify(&d.to_bytes(), &[AuthorityKey([9; 32])], 1000).is_err(),
            "not pinned"
        );
        let mut other = v.clone();
        other.authority = [7; 32];
        let mut d2 = other.to_document();
        d2.add(AuthoritySig::make(VOTE_DOMAIN, &d2.body, &cert, &sk));
        assert!(
            Vote::verify(&d2.to_bytes(), &pinned, 1000).is_err(),
            "vote claiming another author"
        );
    }
}
