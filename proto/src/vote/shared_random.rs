//! The shared random value (doc/protocol.md section 8.1).
//!
//! Services' directories are placed on a ring by a value nobody could
//! choose or know early ([`crate::service::ring`]). The authorities make
//! one per run of [`INTERVALS_PER_PERIOD`] voting intervals by commit and
//! reveal, inside their votes:
//!
//! * in the first half of a run, each authority votes a commitment, a hash
//!   of a secret 32 bytes; the consensus lists each voter's commitment, and
//!   later votes repeat the list of the latest consensus they hold: a
//!   commitment once agreed by a majority cannot change;
//! * in the second half no new commitment is taken; each authority votes
//!   its secret, which counts only if it matches its agreed commitment;
//! * at the start of the next run each authority computes the value from
//!   the reveals in the latest consensus it holds and votes it; the
//!   consensus takes the value a majority voted.
//!
//! An authority that sees the others' reveals can only choose between its
//! own reveal and none (as with Tor's protocol); no authority can choose
//! the value. With no reveals at all (a network just started, or one that
//! did not vote for half a run) the value is a hash of the run number and
//! the previous value: known in advance, but still agreed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::doc::MAX_SIGNATURES;
use crate::service::{INTERVALS_PER_PERIOD, TimePeriod};

const COMMIT_DOMAIN: &[u8] = b"allium shared random commit";
const VALUE_DOMAIN: &[u8] = b"allium shared random";
const NO_REVEAL_DOMAIN: &[u8] = b"allium shared random without reveals";

/// One authority's commitment or reveal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SrEntry {
    pub authority: [u8; 32],
    pub value: [u8; 32],
}

/// What a consensus says of the shared random protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRandom {
    /// The value of the run the consensus is in.
    pub current: [u8; 32],
    /// The value of the run before.
    pub previous: [u8; 32],
    /// This run's agreed commitments, by authority.
    pub commits: Vec<SrEntry>,
    /// This run's reveals that match them, by authority.
    pub reveals: Vec<SrEntry>,
}

/// An authority's part in the protocol, in its vote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrVote {
    /// Its own commitment for this run.
    pub commit: Option<[u8; 32]>,
    /// Its own secret, in the second half of the run.
    pub reveal: Option<[u8; 32]>,
    /// The commitments and reveals of the latest consensus of this run it
    /// holds.
    pub commits: Vec<SrEntry>,
    pub reveals: Vec<SrEntry>,
    /// The values it holds for this run and the one before.
    pub current: Option<[u8; 32]>,
    pub previous: Option<[u8; 32]>,
}

/// Where a voting period stands in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Round {
    /// Runs are numbered from the epoch; run `k` starts at `k * L` (L as a
    /// [`TimePeriod`]'s length) and gives the value time period `k` uses.
    pub run: u64,
    /// The period's place in its run, 0 to [`INTERVALS_PER_PERIOD`] - 1.
    pub index: u64,
}

impl Round {
    pub fn of(valid_after: u64, interval: u64) -> Self {
        let length = TimePeriod::length_for(interval);
        Round {
            run: valid_after / length,
            index: (valid_after % length) / interval.max(1),
        }
    }

    /// In the second half of its run, when secrets are revealed.
    pub fn reveals(&self) -> bool {
        self.index >= INTERVALS_PER_PERIOD / 2
    }
}

/// The commitment to `secret` by `authority` for run `run`.
pub fn commitment(run: u64, authority: &[u8; 32], secret: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(COMMIT_DOMAIN)
        .chain_update(run.to_be_bytes())
        .chain_update(authority)
        .chain_update(secret)
        .finalize()
        .into()
}

/// The value of run `run`, from the reveals of the run before (sorted by
/// authority) and that run's value.
pub fn value(run: u64, reveals: &[SrEntry], previous: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    if reveals.is_empty() {
        h.update(NO_REVEAL_DOMAIN);
        h.update(run.to_be_bytes());
        h.update(previous);
    } else {
        h.update(VALUE_DOMAIN);
        h.update(run.to_be_bytes());
        h.update([reveals.len() as u8]);
        for e in reveals {
            h.update(e.authority);
            h.update(e.value);
        }
    }
    h.finalize().into()
}

/// What `authority`, holding `secret` for this run and, as its latest
/// consensus, `held` (its valid-after and what it says), votes for
/// `round`.
pub fn vote(
    round: Round,
    interval: u64,
    authority: &[u8; 32],
    secret: &[u8; 32],
    held: Option<(u64, &SharedRandom)>,
) -> SrVote {
    let own = SrVote {
        commit: Some(commitment(round.run, authority, secret)),
        reveal: round.reveals().then_some(*secret),
        ..SrVote::default()
    };
    let Some((valid_after, sr)) = held else {
        return own;
    };
    let held_run = Round::of(valid_after, interval).run;
    if held_run == round.run {
        SrVote {
            commits: sr.commits.clone(),
            reveals: sr.reveals.clone(),
            current: Some(sr.current),
            previous: Some(sr.previous),
            ..own
        }
    } else if held_run + 1 == round.run {
        SrVote {
            current: Some(value(round.run, &sr.reveals, &sr.current)),
            previous: Some(sr.current),
            ..own
        }
    } else {
        own
    }
}

/// The consensus's part, from the votes of `round` (each with its
/// author). A pure function of the votes, as the rest of the consensus.
pub fn combine(round: Round, votes: &[(&[u8; 32], &SrVote)]) -> SharedRandom {
    let n = votes.len();
    let mut listed: BTreeMap<SrEntry, usize> = BTreeMap::new();
    for (_, v) in votes {
        for e in &v.commits {
            *listed.entry(*e).or_default() += 1;
        }
    }
    // Each vote lists an authority once, so at most one value per
    // authority has a majority.
    let mut commits: BTreeMap<[u8; 32], [u8; 32]> = listed
        .into_iter()
        .filter(|(_, c)| 2 * c > n)
        .map(|(e, _)| (e.authority, e.value))
        .collect();
    let mut reveals: BTreeMap<[u8; 32], [u8; 32]> = BTreeMap::new();
    if round.reveals() {
        let offered = votes.iter().flat_map(|(a, v)| {
            let own = v.reveal.map(|r| SrEntry {
                authority: **a,
                value: r,
            });
            own.into_iter().chain(v.reveals.iter().copied())
        });
        for e in offered {
            if commits.get(&e.authority) == Some(&commitment(round.run, &e.authority, &e.value)) {
                reveals.insert(e.authority, e.value);
            }
        }
    } else {
        for (a, v) in votes {
            if let Some(c) = v.commit {
                commits.entry(**a).or_insert(c);
            }
        }
    }
    let previous = majority(votes.iter().filter_map(|(_, v)| v.previous)).unwrap_or_default();
    let current = majority(votes.iter().filter_map(|(_, v)| v.current))
        .unwrap_or_else(|| value(round.run, &[], &previous));
    let entries = |m: BTreeMap<[u8; 32], [u8; 32]>| {
        m.into_iter()
            .map(|(authority, value)| SrEntry { authority, value })
            .collect()
    };
    SharedRandom {
        current,
        previous,
        commits: entries(commits),
        reveals: entries(reveals),
    }
}

/// The value more than half of the votes that give one agree on, if any:
/// an authority that holds no value (back from an outage longer than a
/// run, or new) abstains, and cannot reset the value in mid-run.
fn majority(values: impl Iterator<Item = [u8; 32]>) -> Option<[u8; 32]> {
    let mut counts: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    let mut given = 0;
    for v in values {
        *counts.entry(v).or_default() += 1;
        given += 1;
    }
    counts
        .into_iter()
        .find(|(_, c)| 2 * c > given)
        .map(|(v, _)| v)
}

/// Lists of entries in documents: sorted by authority, one entry each, at
/// most one per possible authority.
pub(crate) fn check_entries(what: &'static str, list: &[SrEntry]) -> Result<(), Error> {
    if list.len() > MAX_SIGNATURES {
        return Err(Error::TooLarge {
            what,
            len: list.len(),
            max: MAX_SIGNATURES,
        });
    }
    if !list.windows(2).all(|w| w[0].authority < w[1].authority) {
        return Err(Error::malformed(
            what,
            "shared random entries not sorted by authority or repeated",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: u64 = 3;
    const L: u64 = INTERVALS_PER_PERIOD * INTERVAL;

    /// Three authorities run the protocol over whole runs, each holding
    /// every consensus; returns the consensus of every round.
    fn run_network(
        rounds: std::ops::Range<u64>,
        secret: impl Fn(usize, u64) -> [u8; 32],
        skip: impl Fn(usize, Round) -> bool,
    ) -> Vec<(u64, SharedRandom)> {
        let ids = [[1u8; 32], [2; 32], [3; 32]];
        let mut held: Option<(u64, SharedRandom)> = None;
        let mut out = Vec::new();
        for r in rounds {
            let va = r * INTERVAL;
            let round = Round::of(va, INTERVAL);
            let votes: Vec<(usize, SrVote)> = (0..3)
                .filter(|&i| !skip(i, round))
                .map(|i| {
                    let h = held.as_ref().map(|(v, s)| (*v, s));
                    (i, vote(round, INTERVAL, &ids[i], &secret(i, round.run), h))
                })
                .collect();
            let refs: Vec<_> = votes.iter().map(|(i, v)| (&ids[*i], v)).collect();
            let sr = combine(round, &refs);
            held = Some((va, sr.clone()));
            out.push((va, sr));
        }
        out
    }

    /// The three authorities' votes for `round` of run 1 (secrets as
    /// `run_network` gives them there), each holding `held` of `va`.
    fn votes_of_run_1(
        round: Round,
        va: u64,
        held: &SharedRandom,
        ids: &[[u8; 32]; 3],
    ) -> Vec<SrVote> {
        (0..3)
            .map(|i| {
                vote(
                    round,
                    INTERVAL,
                    &ids[i],
                    &[i as u8 + 10; 32],
                    Some((va, held)),
                )
            })
            .collect()
    }

    #[test]
    fn rounds_split_runs_in_halves() {
        assert_eq!(Round::of(0, 3), Round { run: 0, index: 0 });
        assert_eq!(Round::of(L - 3, 3), Round { run: 0, index: 23 });
        assert_eq!(Round::of(L, 3), Round { run: 1, index: 0 });
        assert!(!Round::of(11 * 3, 3).reveals());
        assert!(Round::of(12 * 3, 3).reveals());
    }

    #[test]
    fn three_authorities_agree_on_a_value_from_all_reveals() {
        let secret = |i: usize, run: u64| [i as u8 * 16 + run as u8; 32];
        let out = run_network(0..3 * 24, secret, |_, _| false);
        // In run 1 every commitment was agreed and every secret revealed.
        let (_, last_of_run_1) = &out[2 * 24 - 1];
        assert_eq!(last_of_run_1.commits.len(), 3);
        assert_eq!(last_of_run_1.reveals.len(), 3);
        for e in &last_of_run_1.reveals {
            assert_eq!(e.value, secret(e.authority[0] as usize - 1, 1));
        }
        // Run 2's value is made of them, and held through the run.
        let want = value(2, &last_of_run_1.reveals, &last_of_run_1.current);
        for (va, sr) in &out[2 * 24..] {
            assert_eq!(sr.current, want, "at {va}");
            assert_eq!(sr.previous, last_of_run_1.current);
        }
        // Reveals never appear in the first half of a run.
        for (va, sr) in &out {
            if !Round::of(*va, INTERVAL).reveals() {
                assert!(sr.reveals.is_empty(), "at {va}");
            }
        }
        // Different secrets, different value.
        let other = run_network(0..3 * 24, |i, run| [i as u8 + run as u8; 32], |_, _| false);
        assert_ne!(other[2 * 24].1.current, want);
    }

    /// An authority that tries to commit again in the second half, after
    /// seeing the others' reveals, is not counted: its agreed commitment
    /// stays, and its new secret does not match it.
    #[test]
    fn a_commitment_cannot_change_after_reveals_begin() {
        let ids = [[1u8; 32], [2; 32], [3; 32]];
        let out = run_network(
            0..24 + 12,
            |i, run| [i as u8 + 10 * run as u8; 32],
            |_, _| false,
        );
        let (va, held) = &out[24 + 11];
        let round = Round::of(va + INTERVAL, INTERVAL);
        assert!(round.reveals());
        let mut votes = votes_of_run_1(round, *va, held, &ids);
        let cheat = [99; 32];
        votes[2].commit = Some(commitment(round.run, &ids[2], &cheat));
        votes[2].reveal = Some(cheat);
        votes[2].commits.retain(|e| e.authority != ids[2]);
        let refs: Vec<_> = votes.iter().zip(&ids).map(|(v, a)| (a, v)).collect();
        let sr = combine(round, &refs);
        assert_eq!(sr.commits, held.commits);
        let revealed: Vec<u8> = sr.reveals.iter().map(|e| e.authority[0]).collect();
        assert_eq!(revealed, [1, 2]);
    }

    /// An authority that was away for the whole first half cannot commit
    /// late: in the second half only agreed commitments count, so its
    /// reveal is ignored, even offered by every vote.
    #[test]
    fn no_commitment_is_taken_once_reveals_begin() {
        let ids = [[1u8; 32], [2; 32], [3; 32]];
        let out = run_network(
            0..24 + 13,
            |i, run| [i as u8 + 10 * run as u8; 32],
            |i, r| i == 2 && r.run == 1 && !r.reveals(),
        );
        let (va, held) = &out[24 + 12];
        assert_eq!(held.commits.len(), 2);
        let round = Round::of(va + INTERVAL, INTERVAL);
        let mut votes = votes_of_run_1(round, *va, held, &ids);
        let late = SrEntry {
            authority: ids[2],
            value: [12; 32],
        };
        for v in &mut votes {
            v.reveals.push(late);
        }
        let refs: Vec<_> = votes.iter().zip(&ids).map(|(v, a)| (a, v)).collect();
        let sr = combine(round, &refs);
        assert_eq!(sr.commits.len(), 2);
        let revealed: Vec<u8> = sr.reveals.iter().map(|e| e.authority[0]).collect();
        assert_eq!(revealed, [1, 2]);
    }

    /// An authority back without any state abstains: the run's value and
    /// commitments stay what the others hold.
    #[test]
    fn an_authority_without_state_abstains() {
        let ids = [[1u8; 32], [2; 32], [3; 32]];
        let out = run_network(0..24 + 5, |i, run| [i as u8 + run as u8; 32], |_, _| false);
        let (va, held) = &out[24 + 4];
        let round = Round::of(va + INTERVAL, INTERVAL);
        let votes = [
            vote(round, INTERVAL, &ids[0], &[1; 32], Some((*va, held))),
            vote(round, INTERVAL, &ids[1], &[2; 32], None),
        ];
        let refs = [(&ids[0], &votes[0]), (&ids[1], &votes[1])];
        let sr = combine(round, &refs);
        assert_eq!(sr.current, held.current);
        assert_eq!(sr.previous, held.previous);
        // Its commitment joins (first half); the held ones stay only if a
        // majority lists them, which one of two does not: they come back
        // when the third authority does.
        assert!(sr.commits.iter().any(|e| e.authority == ids[1]));
    }

    #[test]
    fn a_missed_reveal_or_a_fresh_network_still_gives_one_value() {
        // Authority 3 is down for the whole second half of run 1.
        let out = run_network(
            0..3 * 24,
            |i, run| [i as u8 + run as u8; 32],
            |i, r| i == 2 && r.run == 1 && r.reveals(),
        );
        let last = &out[2 * 24 - 1].1;
        assert_eq!(last.reveals.len(), 2);
        assert_eq!(
            out[2 * 24].1.current,
            value(2, &last.reveals, &last.current)
        );
        // Run 0 began with no consensus held: the value without reveals.
        assert_eq!(out[0].1.current, value(0, &[], &[0; 32]));
    }

    /// A minority of votes cannot put a commitment or a value into the
    /// consensus.
    #[test]
    fn one_authority_cannot_choose_for_the_others() {
        let ids = [[1u8; 32], [2; 32], [3; 32]];
        let round = Round::of(L + 12 * INTERVAL, INTERVAL);
        let honest = SrVote {
            commits: vec![SrEntry {
                authority: ids[0],
                value: commitment(1, &ids[0], &[5; 32]),
            }],
            reveals: vec![SrEntry {
                authority: ids[0],
                value: [5; 32],
            }],
            current: Some([7; 32]),
            previous: Some([6; 32]),
            ..SrVote::default()
        };
        let liar = SrVote {
            commits: vec![SrEntry {
                authority: ids[1],
                value: [0xee; 32],
            }],
            reveals: vec![SrEntry {
                authority: ids[0],
                value: [4; 32],
            }],
            current: Some([0xee; 32]),
            ..honest.clone()
        };
        let refs = [(&ids[0], &honest), (&ids[1], &liar), (&ids[2], &honest)];
        let sr = combine(round, &refs);
        assert_eq!(sr.current, [7; 32]);
        assert_eq!(sr.commits, honest.commits);
        // A reveal that does not match the agreed commitment is dropped,
        // whoever offers it; the one that does is kept.
        assert_eq!(sr.reveals, honest.reveals);
    }
}
