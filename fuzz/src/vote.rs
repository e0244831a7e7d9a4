//! `vote`: votes as an authority takes them, and the consensus computed
//! from them.
//!
//! Raw bytes (even first byte): a vote that verifies is canonical, and
//! the consensus of it alone is sound. Otherwise the rest is read as
//! `arbitrary` votes by the pinned authorities, listing fixed relays whose
//! descriptors (signed by the relays) have fuzzer-chosen contents and
//! policies; those that verify are held, as an authority holds them.
//! Every such vote verifies, and the consensus computed from them is one
//! that clients accept: sorted, within its limits, with valid exit
//! summaries and families, and it verifies once signed.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use allium_proto::doc::VerifiedDescriptor;
use allium_proto::doc::{MAX_SIGNATURES, MAX_VOTE_LEN};
use allium_proto::policy::{Action, AddrPattern, ExitPolicy, Rule};
use allium_proto::vote::shared_random::{self, Round, SrEntry, SrVote};
use allium_proto::vote::{Vote, VoteRelay, compute_consensus};
use allium_proto::{AuthSigned, Consensus, RelayFlags, UnverifiedConsensus, UnverifiedDescriptor};
use arbitrary::{Arbitrary, Unstructured};
use sha2::{Digest, Sha256};

use crate::keys::{
    AUTHORITIES, NOW, RELAYS, authority, descriptor, pinned, relay_identity, signed_consensus,
    signed_vote,
};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pinned = pinned();
    if mode & 1 == 0 {
        let Ok(v) = Vote::verify(rest, &pinned, NOW) else {
            return;
        };
        let doc = AuthSigned::parse("vote", rest, MAX_VOTE_LEN).expect("parsed once");
        assert_eq!(doc.to_bytes(), rest, "a vote is canonical");
        assert_eq!(postcard::to_stdvec(&v).expect("encodes"), doc.body);
        return sound(&[v], &HashMap::new());
    }
    let mut u = Unstructured::new(rest);
    let Ok(votes) = Vec::<ArbVote>::arbitrary(&mut u) else {
        return;
    };
    let mut by_authority = BTreeMap::new();
    let mut held = HashMap::new();
    for v in votes.into_iter().take(usize::from(AUTHORITIES)) {
        let i = v.authority % AUTHORITIES;
        let vote = v.build(i, &mut held);
        let bytes = signed_vote(&vote, i);
        let got = Vote::verify(&bytes, &pinned, NOW).expect("a pinned authority's vote");
        assert_eq!(got, vote);
        by_authority.insert(i, vote);
    }
    let votes: Vec<Vote> = by_authority.into_values().collect();
    if !votes.is_empty() {
        sound(&votes, &held);
    }
}

/// The consensus of `votes`, with the descriptors `held`, is one clients
/// take, and lists only relays whose descriptor is held.
fn sound(votes: &[Vote], held: &HashMap<[u8; 32], VerifiedDescriptor>) {
    let c = compute_consensus(votes, |d| held.get(d)).expect("votes for one period");
    assert!(c.relays.iter().all(|r| {
        held.get(&r.descriptor_digest)
            .is_some_and(|d| d.desc.identity == r.identity)
    }));
    check_consensus(&c);
    let bytes = signed_consensus(&c);
    let u = UnverifiedConsensus::parse(&bytes).expect("a computed consensus parses");
    // When the authorities' certificates are valid.
    let now = c.valid_after.max(NOW).min(c.valid_until);
    if (1_700_000_000..=1_900_000_000).contains(&now) {
        let got = u
            .verify(&pinned(), now)
            .expect("a computed consensus verifies");
        assert_eq!(got, c);
    }
}

fn check_consensus(c: &Consensus) {
    assert!(c.relays.windows(2).all(|w| w[0].identity < w[1].identity));
    assert!(c.valid_after <= c.fresh_until && c.fresh_until <= c.valid_until);
    for (i, r) in c.relays.iter().enumerate() {
        r.exit_ports
            .check()
            .unwrap_or_else(|e| panic!("relay {i}'s exit summary {:?}: {e}", r.exit_ports));
        assert!(r.family.is_none_or(|f| f as usize <= i));
        assert!(r.bandwidth <= r.declared_bandwidth);
    }
    // Shared random entries: sorted, bounded, and every reveal matches its
    // author's agreed commitment.
    let sr = &c.shared_random;
    for list in [&sr.commits, &sr.reveals] {
        assert!(list.len() <= MAX_SIGNATURES);
        assert!(list.windows(2).all(|w| w[0].authority < w[1].authority));
    }
    let run = Round::of(c.valid_after, c.interval()).run;
    for e in &sr.reveals {
        let want = shared_random::commitment(run, &e.authority, &e.value);
        assert!(
            sr.commits
                .iter()
                .any(|x| x.authority == e.authority && x.value == want),
            "a reveal without its commitment"
        );
    }
}

#[derive(Arbitrary, Debug)]
struct ArbVote {
    authority: u8,
    interval: u64,
    valid_intervals: u64,
    relays: Vec<ArbEntry>,
    sr: ArbSr,
}

/// A vote's shared random part. Commitments are made from secrets the
/// input chooses, so that reveals can match them.
#[derive(Arbitrary, Debug)]
struct ArbSr {
    secret: Option<[u8; 32]>,
    reveal: bool,
    /// Authority (index) and the secret it committed to.
    commits: Vec<(u8, [u8; 32])>,
    /// Authority (index) and the secret it revealed.
    reveals: Vec<(u8, [u8; 32])>,
    current: Option<[u8; 32]>,
    previous: Option<[u8; 32]>,
}

impl ArbSr {
    fn build(self, run: u64, me: [u8; 32]) -> SrVote {
        let id = |i: u8| {
            authority(i % (AUTHORITIES + 1))
                .0
                .verifying_key()
                .to_bytes()
        };
        let entries = |list: Vec<(u8, [u8; 32])>, commit: bool| -> Vec<SrEntry> {
            let m: BTreeMap<[u8; 32], [u8; 32]> = list
                .into_iter()
                .map(|(i, s)| {
                    let a = id(i);
                    let v = if commit {
                        shared_random::commitment(run, &a, &s)
                    } else {
                        s
                    };
                    (a, v)
                })
                .collect();
            m.into_iter()
                .take(MAX_SIGNATURES)
                .map(|(authority, value)| SrEntry { authority, value })
                .collect()
        };
        SrVote {
            commit: self.secret.map(|s| shared_random::commitment(run, &me, &s)),
            reveal: self.secret.filter(|_| self.reveal),
            commits: entries(self.commits, true),
            reveals: entries(self.reveals, false),
            current: self.current,
            previous: self.previous,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct ArbEntry {
    relay: u8,
    desc: ArbDesc,
    flags: u16,
    bandwidth: u32,
    measured: Option<u32>,
    wrong_digest: bool,
}

#[derive(Arbitrary, Debug)]
struct ArbDesc {
    /// A body of the input's own, instead of the fields below.
    raw: Option<Vec<u8>>,
    nickname: Option<String>,
    bandwidth: u32,
    rules: Option<Vec<ArbRule>>,
    family: Vec<u8>,
    addr: Option<(IpAddr, u16)>,
    published: u64,
}

#[derive(Arbitrary, Debug)]
struct ArbRule {
    accept: bool,
    addr: ArbPattern,
    port_lo: u16,
    port_hi: u16,
}

#[derive(Arbitrary, Debug)]
enum ArbPattern {
    Any,
    Private,
    V4([u8; 4], u8),
    V6([u8; 16], u8),
}

impl ArbVote {
    /// The vote of authority `i`; the descriptors it names that verify
    /// go into `held`.
    fn build(self, i: u8, held: &mut HashMap<[u8; 32], VerifiedDescriptor>) -> Vote {
        let mut relays: BTreeMap<[u8; 32], VoteRelay> = BTreeMap::new();
        for e in self.relays {
            let r = e.relay % RELAYS;
            let key = relay_identity(r);
            let body = match e.desc.raw {
                Some(b) => b,
                None => postcard::to_stdvec(&e.desc.build(r)).expect("encodes"),
            };
            let mut doc = allium_proto::SignedDocument::new(body);
            doc.sign(allium_proto::doc::DESCRIPTOR_DOMAIN, &key);
            let mut digest: [u8; 32] = Sha256::digest(&doc.body).into();
            if let Ok(v) =
                UnverifiedDescriptor::parse(&doc.to_bytes()).and_then(|u| u.verify_unclocked())
            {
                assert_eq!(v.digest, digest);
                held.insert(digest, v);
            }
            if e.wrong_digest {
                digest[0] ^= 1;
            }
            let identity = key.verifying_key().to_bytes();
            relays.insert(
                identity,
                VoteRelay {
                    identity,
                    digest,
                    flags: RelayFlags(e.flags),
                    bandwidth: e.bandwidth,
                    measured: e.measured,
                },
            );
        }
        let me = authority(i).0.verifying_key().to_bytes();
        let interval = self.interval.max(1);
        Vote {
            authority: me,
            valid_after: NOW,
            interval,
            valid_intervals: self.valid_intervals.max(1),
            relays: relays.into_values().collect(),
            shared_random: self.sr.build(Round::of(NOW, interval).run, me),
        }
    }
}

impl ArbDesc {
    fn build(self, r: u8) -> allium_proto::RelayDescriptor {
        let mut d = descriptor(r);
        if let Some(n) = self.nickname {
            d.nickname = n;
        }
        d.bandwidth = self.bandwidth;
        if let Some(rules) = self.rules {
            d.exit_policy = ExitPolicy {
                rules: rules
                    .into_iter()
                    .map(|r| Rule {
                        action: if r.accept {
                            Action::Accept
                        } else {
                            Action::Reject
                        },
                        addr: match r.addr {
                            ArbPattern::Any => AddrPattern::Any,
                            ArbPattern::Private => AddrPattern::Private,
                            ArbPattern::V4(a, b) => AddrPattern::V4(a.into(), b),
                            ArbPattern::V6(a, b) => AddrPattern::V6(a.into(), b),
                        },
                        port_lo: r.port_lo,
                        port_hi: r.port_hi,
                    })
                    .collect(),
            };
        }
        d.family = self
            .family
            .iter()
            .map(|&f| relay_identity(f % RELAYS).verifying_key().to_bytes())
            .collect();
        if let Some((ip, port)) = self.addr {
            d.addr = SocketAddr::new(ip, port);
        }
        d.published = self.published;
        d
    }
}
