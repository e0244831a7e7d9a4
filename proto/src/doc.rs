//! Signed directory documents (`doc/protocol.md` section "Documents").
//!
//! A document on the wire is the postcard encoding of
//! [`SignedDocument`] `{ body, signatures }`. Each signature is Ed25519 over
//! `domain | body`, where `body` is exactly the bytes received: documents are
//! never re-encoded to be verified. Parsing gives an `Unverified*` value;
//! only `verify` yields the trusted one.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ntor::OnionCrossCert;
use crate::policy::{ExitPolicy, ExitPorts};
use crate::service::TimePeriod;
use crate::service::ring::Ring;
use crate::vote::shared_random::{Round, SharedRandom, check_entries};
use crate::{Error, LinkKey, OnionKey};

pub const DESCRIPTOR_DOMAIN: &[u8] = b"allium descriptor v1\0";
pub const CONSENSUS_DOMAIN: &[u8] = b"allium consensus v2\0";
pub const CERT_DOMAIN: &[u8] = b"allium authority cert v1\0";
pub const VOTE_DOMAIN: &[u8] = b"allium vote v2\0";
pub const MAX_CERT_LEN: usize = 1024;
/// Relays a consensus lists at most (and a vote, and an authority's
/// table by default).
pub const MAX_CONSENSUS_RELAYS: usize = 50_000;
/// Sizes chosen so that a vote or a consensus of [`MAX_CONSENSUS_RELAYS`]
/// relays of the largest kind always fits (section 7; checked by a test):
/// a descriptor's size is bounded as a whole, and the consensus carries
/// fixed-size summaries of policies and families, not the lists.
pub const MAX_DESCRIPTOR_LEN: usize = 4 * 1024;
pub const MAX_VOTE_LEN: usize = 4 * 1024 * 1024;
pub const MAX_CONSENSUS_LEN: usize = 28 * 1024 * 1024;
pub const MAX_SIGNATURES: usize = 16;
pub const MAX_FAMILY: usize = 64;
pub const MAX_NICKNAME_LEN: usize = 19;
/// How far in the future a document's time may be (clock skew).
pub const MAX_CLOCK_SKEW: u64 = 3600;

/// An Ed25519 signature (64 bytes) with a compact serde form.
#[derive(Clone, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl std::fmt::Debug for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sig({})", hex::encode(self.0))
    }
}

impl Serialize for Sig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Sig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sig, E> {
                let a: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Sig(a))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DocSignature {
    /// The Ed25519 public key that made the signature.
    pub key: [u8; 32],
    pub sig: Sig,
}

/// What travels on the wire.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignedDocument {
    pub body: Vec<u8>,
    pub signatures: Vec<DocSignature>,
}

/// Decode all of `b`, which must be the value's canonical encoding (what
/// encoding it gives back): postcard also reads a number written in more
/// bytes than it needs, which would give one document several encodings
/// and several digests.
pub fn decode_exact<'a, T: Deserialize<'a> + Serialize>(
    what: &'static str,
    b: &'a [u8],
) -> Result<T, Error> {
    let (v, rest) =
        postcard::take_from_bytes(b).map_err(|e| Error::malformed(what, e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes(rest.len()));
    }
    if encode(&v) != b {
        return Err(Error::malformed(
            what,
            "not in canonical encoding (a number written in more bytes than it needs)",
        ));
    }
    Ok(v)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("encoding to a Vec cannot fail")
}

/// Decode a signed document of at most `max` bytes and at most
/// [`MAX_SIGNATURES`] signatures.
fn parse_bounded<'a, T: Deserialize<'a> + Serialize>(
    what: &'static str,
    b: &'a [u8],
    max: usize,
    signatures: impl Fn(&T) -> usize,
) -> Result<T, Error> {
    if b.len() > max {
        return Err(Error::TooLarge {
            what,
            len: b.len(),
            max,
        });
    }
    let d: T = decode_exact(what, b)?;
    let n = signatures(&d);
    if n > MAX_SIGNATURES {
        return Err(Error::TooLarge {
            what: "signature list",
            len: n,
            max: MAX_SIGNATURES,
        });
    }
    Ok(d)
}

impl SignedDocument {
    pub fn parse(what: &'static str, b: &[u8], max: usize) -> Result<Self, Error> {
        parse_bounded(what, b, max, |d: &Self| d.signatures.len())
    }
    pub fn new(body: Vec<u8>) -> Self {
        SignedDocument {
            body,
            signatures: vec![],
        }
    }
    pub fn sign(&mut self, domain: &[u8], key: &SigningKey) {
        let msg = [domain, &self.body].concat();
        let sig = key.sign(&msg).to_bytes();
        let pk = key.verifying_key().to_bytes();
        self.signatures.retain(|s| s.key != pk);
        self.signatures.push(DocSignature {
            key: pk,
            sig: Sig(sig),
        });
    }
    /// Does `s` verify over this body?
    pub fn check(&self, domain: &[u8], s: &DocSignature) -> bool {
        let Ok(vk) = VerifyingKey::from_bytes(&s.key) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&s.sig.0);
        let msg = [domain, &self.body].concat();
        vk.verify_strict(&msg, &sig).is_ok()
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(&self.body).into()
    }
}

/// What a relay publishes about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayDescriptor {
    pub nickname: String,
    /// Ed25519 identity: signs this descriptor and the link handshake.
    pub identity: [u8; 32],
    /// X25519 static key of the Noise link.
    pub link_key: LinkKey,
    /// Current X25519 onion key for the circuit handshake.
    pub onion_key: OnionKey,
    /// Proof that the relay holds `onion_key`'s secret.
    pub onion_crosscert: OnionCrossCert,
    pub addr: SocketAddr,
    /// Declared bandwidth, bytes per second.
    pub bandwidth: u32,
    pub exit_policy: ExitPolicy,
    /// Identities of relays run by the same operator.
    pub family: Vec<[u8; 32]>,
    /// UNIX seconds.
    pub published: u64,
}

pub fn valid_nickname(n: &str) -> bool {
    !n.is_empty() && n.len() <= MAX_NICKNAME_LEN && n.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl RelayDescriptor {
    pub fn sign(&self, key: &SigningKey) -> SignedDocument {
        let mut d = SignedDocument::new(encode(self));
        d.sign(DESCRIPTOR_DOMAIN, key);
        d
    }
}

/// A descriptor as received: parsed, not yet trusted.
pub struct UnverifiedDescriptor {
    doc: SignedDocument,
    desc: RelayDescriptor,
}

/// A descriptor whose signature, binding and freshness have been checked.
#[derive(Clone)]
pub struct VerifiedDescriptor {
    pub desc: RelayDescriptor,
    pub digest: [u8; 32],
    /// The exact bytes received, to serve again.
    pub bytes: Vec<u8>,
}

impl UnverifiedDescriptor {
    pub fn parse(b: &[u8]) -> Result<Self, Error> {
        let doc = SignedDocument::parse("descriptor", b, MAX_DESCRIPTOR_LEN)?;
        let desc: RelayDescriptor = decode_exact("descriptor body", &doc.body)?;
        Ok(UnverifiedDescriptor { doc, desc })
    }

    /// Check only the identity signature and key binding (no clock): what
    /// the consensus computation needs to trust a descriptor in a vote.
    pub fn verify_signature(&self) -> Result<[u8; 32], Error> {
        match self.doc.signatures.as_slice() {
            [s] if s.key == self.desc.identity && self.doc.check(DESCRIPTOR_DOMAIN, s) => {
                Ok(self.doc.digest())
            }
            _ => Err(Error::BadSignature("descriptor")),
        }
    }

    pub fn descriptor(&self) -> &RelayDescriptor {
        &self.desc
    }

    /// Check the identity signature, key binding and that `published` lies
    /// within `[now - max_age, now + MAX_CLOCK_SKEW]`.
    pub fn verify(self, now: u64, max_age: u64) -> Result<VerifiedDescriptor, Error> {
        let d = &self.desc;
        if d.published > now.saturating_add(MAX_CLOCK_SKEW) {
            return Err(Error::Expired(format!(
                "published {}s in the future",
                d.published - now
            )));
        }
        // A maximum age as large as a config may give never overflows.
        if d.published.saturating_add(max_age) < now {
            return Err(Error::Expired(format!(
                "published {}s ago, limit {max_age}s",
                now - d.published
            )));
        }
        self.verify_unclocked()
    }

    /// Everything [`UnverifiedDescriptor::verify`] checks but the clock:
    /// for a descriptor that a vote names, which an authority fetches from
    /// another after the relay uploaded it there.
    pub fn verify_unclocked(self) -> Result<VerifiedDescriptor, Error> {
        let d = &self.desc;
        match self.doc.signatures.as_slice() {
            [s] if s.key == d.identity => {
                if !self.doc.check(DESCRIPTOR_DOMAIN, s) {
                    return Err(Error::BadSignature("descriptor"));
                }
            }
            [_] => {
                return Err(Error::BadSignature(
                    "descriptor (signed by a key other than its identity)",
                ));
            }
            _ => {
                return Err(Error::malformed(
                    "descriptor",
                    "must carry exactly one signature",
                ));
            }
        }
        if !valid_nickname(&d.nickname) {
            return Err(Error::malformed(
                "descriptor",
                "nickname must be 1-19 ASCII letters or digits",
            ));
        }
        if d.family.len() > MAX_FAMILY {
            return Err(Error::TooLarge {
                what: "family",
                len: d.family.len(),
                max: MAX_FAMILY,
            });
        }
        if d.addr.port() == 0 {
            return Err(Error::malformed("descriptor", "port 0"));
        }
        if !d.onion_crosscert.check(&d.identity, &d.onion_key) {
            return Err(Error::BadSignature(
                "descriptor (onion-key cross-certificate: the relay does not prove it holds its onion key)",
            ));
        }
        d.exit_policy.check()?;
        let digest = self.doc.digest();
        let bytes = self.doc.to_bytes();
        Ok(VerifiedDescriptor {
            desc: self.desc,
            digest,
            bytes,
        })
    }
}

/// Relay flags in the consensus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayFlags(pub u16);

impl RelayFlags {
    pub const RUNNING: u16 = 1;
    pub const VALID: u16 = 2;
    pub const EXIT: u16 = 4;
    pub const GUARD: u16 = 8;
    pub const STABLE: u16 = 16;
    pub const FAST: u16 = 32;
    pub const BAD_EXIT: u16 = 64;
    /// Stores onion service descriptors (doc/protocol.md section 11.2).
    pub const HSDIR: u16 = 128;
    pub fn has(self, f: u16) -> bool {
        self.0 & f == f
    }
    pub fn names(self) -> Vec<&'static str> {
        let all = [
            (Self::RUNNING, "Running"),
            (Self::VALID, "Valid"),
            (Self::EXIT, "Exit"),
            (Self::GUARD, "Guard"),
            (Self::STABLE, "Stable"),
            (Self::FAST, "Fast"),
            (Self::BAD_EXIT, "BadExit"),
            (Self::HSDIR, "HSDir"),
        ];
        all.iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// One relay as the consensus lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConsensusRelay {
    pub nickname: String,
    pub identity: [u8; 32],
    pub link_key: LinkKey,
    pub onion_key: OnionKey,
    pub addr: SocketAddr,
    pub flags: RelayFlags,
    /// Weight for path selection (bytes per second): the median of the
    /// authorities' measurements, at most the declared figure; a small fixed
    /// weight while no majority has measured the relay (section 7).
    pub bandwidth: u32,
    /// What the relay's descriptor declares.
    pub declared_bandwidth: u32,
    /// The median of the authorities' measurements, once a majority has one.
    pub measured_bandwidth: Option<u32>,
    /// The ports its exit policy accepts for any public address.
    pub exit_ports: ExitPorts,
    /// Relays with the same number are one family (they declared each
    /// other, directly or through other members): the index in
    /// [`Consensus::relays`] of the family's first member.
    pub family: Option<u32>,
    pub descriptor_digest: [u8; 32],
}

/// The network's agreed view, valid for a window of time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Consensus {
    pub valid_after: u64,
    pub fresh_until: u64,
    pub valid_until: u64,
    /// Sorted by identity.
    pub relays: Vec<ConsensusRelay>,
    /// How clients weight relays by position, computed by the authorities.
    pub weights: PositionWeights,
    /// Where services' directories sit on the ring (section 8.1).
    pub shared_random: SharedRandom,
}

/// Position weights, in parts of [`PositionWeights::SCALE`] (as Tor's
/// `bandwidth-weights`): scarce Guard and Exit capacity is kept for its own
/// position. With `T` the total weight of Running, Valid relays, `E` that
/// of the Exits and `G` that of the Guards that are not Exits, an Exit
/// counts with its full weight as exit and with `exit_elsewhere` of it as
/// guard or middle; a Guard counts fully as guard and with
/// `guard_as_middle` as middle; any other relay fully as middle.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PositionWeights {
    /// `(E - T/3) / E`, or 0 if `E <= T/3`.
    pub exit_elsewhere: u32,
    /// `(G - T/3) / G`, or 0 if `G <= T/3`.
    pub guard_as_middle: u32,
}

impl PositionWeights {
    pub const SCALE: u32 = 10_000;

    /// The weights for these relays (section 7).
    pub fn compute(relays: &[ConsensusRelay]) -> Self {
        let live = relays
            .iter()
            .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::VALID));
        let (mut t, mut e, mut g) = (0u64, 0u64, 0u64);
        for r in live {
            let bw = u64::from(r.bandwidth.max(1));
            t += bw;
            if r.flags.has(RelayFlags::EXIT) {
                e += bw;
            } else if r.flags.has(RelayFlags::GUARD) {
                g += bw;
            }
        }
        // (x - t/3) / x = (3x - t) / 3x, in parts of SCALE.
        let surplus = |x: u64| {
            if 3 * x > t {
                ((3 * x - t) * u64::from(Self::SCALE) / (3 * x)) as u32
            } else {
                0
            }
        };
        PositionWeights {
            exit_elsewhere: surplus(e),
            guard_as_middle: surplus(g),
        }
    }
}

/// An authority's long-term identity key, as clients and relays pin it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthorityKey(pub [u8; 32]);

/// A signing-key certificate: the authority's offline identity key vouches
/// for an online signing key for a window of time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthorityCert {
    pub identity: [u8; 32],
    pub signing_key: [u8; 32],
    pub valid_from: u64,
    pub valid_until: u64,
}

impl AuthorityCert {
    /// Sign with the identity key (which must be `self.identity`).
    pub fn sign(&self, identity: &SigningKey) -> Vec<u8> {
        let mut d = SignedDocument::new(encode(self));
        d.sign(CERT_DOMAIN, identity);
        d.to_bytes()
    }

    /// Parse and check the identity's signature (not the validity window).
    pub fn parse(b: &[u8]) -> Result<Self, Error> {
        let d = SignedDocument::parse("certificate", b, MAX_CERT_LEN)?;
        let c: AuthorityCert = decode_exact("certificate body", &d.body)?;
        match d.signatures.as_slice() {
            [s] if s.key == c.identity && d.check(CERT_DOMAIN, s) => Ok(c),
            _ => Err(Error::BadSignature("signing-key certificate")),
        }
    }
}

/// One authority's signature on a consensus or vote, with its certificate.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthoritySig {
    pub cert: Vec<u8>,
    pub sig: Sig,
}

/// What an authority signs for `body`: the domain and the body's SHA-256,
/// so that checking each of a consensus' signatures costs 32 bytes of
/// hashing rather than another pass over megabytes.
fn authority_message(domain: &[u8], digest: &[u8; 32]) -> Vec<u8> {
    [domain, digest].concat()
}

impl AuthoritySig {
    pub fn make(domain: &[u8], body: &[u8], cert: &[u8], signing_key: &SigningKey) -> Self {
        let digest = Sha256::digest(body).into();
        let sig = signing_key
            .sign(&authority_message(domain, &digest))
            .to_bytes();
        AuthoritySig {
            cert: cert.to_vec(),
            sig: Sig(sig),
        }
    }

    /// Which pinned authority made this signature over `body`, if it is
    /// valid at `now`; otherwise why not.
    pub fn check(
        &self,
        domain: &[u8],
        body: &[u8],
        pinned: &[AuthorityKey],
        now: u64,
    ) -> Result<AuthorityCert, String> {
        self.check_digest(domain, &Sha256::digest(body).into(), pinned, now)
    }

    /// [`Self::check`] for a body whose SHA-256 is `digest`.
    pub fn check_digest(
        &self,
        domain: &[u8],
        digest: &[u8; 32],
        pinned: &[AuthorityKey],
        now: u64,
    ) -> Result<AuthorityCert, String> {
        let c = AuthorityCert::parse(&self.cert).map_err(|e| e.to_string())?;
        if !pinned.contains(&AuthorityKey(c.identity)) {
            return Err("certificate of an authority that is not pinned".into());
        }
        if now < c.valid_from || now > c.valid_until {
            return Err(format!(
                "signing-key certificate valid only {}..{}",
                c.valid_from, c.valid_until
            ));
        }
        let vk =
            VerifyingKey::from_bytes(&c.signing_key).map_err(|_| "bad signing key".to_string())?;
        vk.verify_strict(
            &authority_message(domain, digest),
            &ed25519_dalek::Signature::from_bytes(&self.sig.0),
        )
        .map_err(|_| "signature does not verify".to_string())?;
        Ok(c)
    }

    pub fn identity(&self) -> Option<[u8; 32]> {
        AuthorityCert::parse(&self.cert).ok().map(|c| c.identity)
    }
}

/// A document signed by authorities (consensus, vote) as it travels.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuthSigned {
    pub body: Vec<u8>,
    pub signatures: Vec<AuthoritySig>,
}

impl AuthSigned {
    pub fn new(body: Vec<u8>) -> Self {
        AuthSigned {
            body,
            signatures: vec![],
        }
    }

    pub fn parse(what: &'static str, b: &[u8], max: usize) -> Result<Self, Error> {
        parse_bounded(what, b, max, |d: &Self| d.signatures.len())
    }

    /// Add a signature, replacing any by the same authority, keeping the
    /// list sorted by authority identity (so all copies are byte-identical).
    pub fn add(&mut self, s: AuthoritySig) {
        let id = s.identity();
        self.signatures.retain(|x| x.identity() != id);
        self.signatures.push(s);
        self.signatures.sort_by_key(|x| x.identity());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(&self.body).into()
    }
}

impl Consensus {
    pub fn to_document(&self) -> AuthSigned {
        AuthSigned::new(encode(self))
    }
    /// The voting interval (seconds).
    pub fn interval(&self) -> u64 {
        self.fresh_until.saturating_sub(self.valid_after)
    }

    /// The time period of this consensus's network at time `t`.
    pub fn period_at(&self, t: u64) -> TimePeriod {
        TimePeriod::at(t, self.interval())
    }

    /// The shared random value services' directories are placed by in
    /// `period`: the value of run `period.number`, which this consensus
    /// holds while it is in that run or the next (section 11.2).
    pub fn shared_random_for(&self, period: TimePeriod) -> Option<[u8; 32]> {
        if period.length != TimePeriod::length_for(self.interval()) {
            return None;
        }
        let run = Round::of(self.valid_after, self.interval()).run;
        if run == period.number {
            Some(self.shared_random.current)
        } else if run == period.number.saturating_add(1) {
            Some(self.shared_random.previous)
        } else {
            None
        }
    }

    /// The ring of services' directories for `period`, if this consensus
    /// knows its shared random value.
    pub fn hsdir_ring(&self, period: TimePeriod) -> Option<Ring<'_>> {
        let srv = self.shared_random_for(period)?;
        Some(Ring::new(&self.relays, &srv, period))
    }

    pub fn relay(&self, id: &[u8; 32]) -> Option<&ConsensusRelay> {
        self.relays
            .binary_search_by(|r| r.identity.cmp(id))
            .ok()
            .map(|i| &self.relays[i])
    }
}

/// What `verify` found about one signature, for display.
#[derive(Clone, Debug)]
pub struct SignatureReport {
    pub identity: Option<[u8; 32]>,
    pub signing_key: Option<[u8; 32]>,
    pub cert_valid_until: Option<u64>,
    pub verdict: Result<(), String>,
}

/// A consensus as received: parsed, not yet trusted.
pub struct UnverifiedConsensus {
    pub doc: AuthSigned,
    consensus: Consensus,
}

impl UnverifiedConsensus {
    pub fn parse(b: &[u8]) -> Result<Self, Error> {
        let doc = AuthSigned::parse("consensus", b, MAX_CONSENSUS_LEN)?;
        let consensus: Consensus = decode_exact("consensus body", &doc.body)?;
        let relays = &consensus.relays;
        if relays.len() > MAX_CONSENSUS_RELAYS {
            return Err(Error::TooLarge {
                what: "consensus relays",
                len: relays.len(),
                max: MAX_CONSENSUS_RELAYS,
            });
        }
        if !relays.windows(2).all(|w| w[0].identity < w[1].identity) {
            return Err(Error::malformed(
                "consensus",
                "relays not sorted by identity or repeated",
            ));
        }
        check_entries("consensus commitments", &consensus.shared_random.commits)?;
        check_entries("consensus reveals", &consensus.shared_random.reveals)?;
        for (i, r) in relays.iter().enumerate() {
            r.exit_ports.check()?;
            if r.family.is_some_and(|f| f as usize > i) {
                return Err(Error::malformed(
                    "consensus",
                    "a family must be named by its first member",
                ));
            }
        }
        Ok(UnverifiedConsensus { doc, consensus })
    }

    /// For display before trust: the claimed contents.
    pub fn peek(&self) -> &Consensus {
        &self.consensus
    }

    /// Each signature, and whether it counts for `pinned` at `now`.
    pub fn report(&self, pinned: &[AuthorityKey], now: u64) -> Vec<SignatureReport> {
        let digest = self.doc.digest();
        self.doc
            .signatures
            .iter()
            .map(|s| {
                let cert = AuthorityCert::parse(&s.cert).ok();
                SignatureReport {
                    identity: cert.as_ref().map(|c| c.identity),
                    signing_key: cert.as_ref().map(|c| c.signing_key),
                    cert_valid_until: cert.as_ref().map(|c| c.valid_until),
                    verdict: s
                        .check_digest(CONSENSUS_DOMAIN, &digest, pinned, now)
                        .map(|_| ()),
                }
            })
            .collect()
    }

    /// The distinct pinned authorities whose signatures are valid at `now`.
    pub fn valid_signers(&self, pinned: &[AuthorityKey], now: u64) -> Vec<AuthorityKey> {
        self.signers_up_to(pinned, now, usize::MAX)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// [`Self::valid_signers`], stopping once `enough` are found, each with
    /// its certificate's validity.
    fn signers_up_to(
        &self,
        pinned: &[AuthorityKey],
        now: u64,
        enough: usize,
    ) -> Vec<(AuthorityKey, RangeInclusive<u64>)> {
        let digest = self.doc.digest();
        let mut out: Vec<(AuthorityKey, RangeInclusive<u64>)> = Vec::new();
        for s in &self.doc.signatures {
            if out.len() >= enough {
                break;
            }
            if let Ok(c) = s.check_digest(CONSENSUS_DOMAIN, &digest, pinned, now) {
                let k = AuthorityKey(c.identity);
                if !out.iter().any(|(o, _)| *o == k) {
                    out.push((k, c.valid_from..=c.valid_until));
                }
            }
        }
        out
    }

    /// Trust it only if more than half of `pinned` signed it (through
    /// certificates valid at `now`) and `now` lies within its validity
    /// (with [`MAX_CLOCK_SKEW`] of tolerance before `valid_after`).
    pub fn verify(self, pinned: &[AuthorityKey], now: u64) -> Result<Consensus, Error> {
        self.verify_window(pinned, now).map(|(c, _)| c)
    }

    /// [`Self::verify`], with the times at which the same verdict holds:
    /// the consensus' own validity within that of the certificates that
    /// counted. The same bytes checked against the same keys at another
    /// time in it are trusted without checking them again.
    pub fn verify_window(
        self,
        pinned: &[AuthorityKey],
        now: u64,
    ) -> Result<(Consensus, RangeInclusive<u64>), Error> {
        let needed = pinned.len() / 2 + 1;
        // Enough signatures are enough: the others are not checked.
        let signers = self.signers_up_to(pinned, now, needed);
        let valid = signers.len();
        if pinned.is_empty() || valid < needed {
            return Err(Error::NotEnoughSignatures { valid, needed });
        }
        let c = &self.consensus;
        if now + MAX_CLOCK_SKEW < c.valid_after {
            return Err(Error::Expired(format!(
                "consensus valid only from {}",
                c.valid_after
            )));
        }
        if now > c.valid_until {
            return Err(Error::Expired(format!(
                "consensus expired at {}",
                c.valid_until
            )));
        }
        if !(c.valid_after <= c.fresh_until && c.fresh_until <= c.valid_until) {
            return Err(Error::malformed("consensus", "validity times out of order"));
        }
        let from = signers
            .iter()
            .map(|(_, w)| *w.start())
            .fold(c.valid_after.saturating_sub(MAX_CLOCK_SKEW), u64::max);
        let until = signers
            .iter()
            .map(|(_, w)| *w.end())
            .fold(c.valid_until, u64::min);
        Ok((self.consensus, from..=until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntor::OnionSecret;
    use crate::policy::{ExitPolicy, MAX_PORT_RANGES};
    use crate::vote::shared_random::{SrEntry, SrVote};
    use crate::vote::{Vote, VoteRelay};

    pub(crate) fn key(b: u8) -> SigningKey {
        SigningKey::from_bytes(&[b; 32])
    }

    pub(crate) fn desc(id: &SigningKey, published: u64) -> RelayDescriptor {
        let onion = OnionSecret::new(x25519_dalek::StaticSecret::from([2; 32]));
        RelayDescriptor {
            nickname: "relay1".into(),
            identity: id.verifying_key().to_bytes(),
            link_key: LinkKey([1; 32]),
            onion_key: onion.public(),
            onion_crosscert: onion.crosscert(&id.verifying_key().to_bytes()),
            addr: "127.0.0.1:9001".parse().unwrap(),
            bandwidth: 1_000_000,
            exit_policy: ExitPolicy::default_exit(),
            family: vec![],
            published,
        }
    }

    #[test]
    fn descriptor_verifies_and_rejects() {
        let k = key(1);
        let now = 1_800_000_000;
        let bytes = desc(&k, now).sign(&k).to_bytes();
        let v = UnverifiedDescriptor::parse(&bytes)
            .unwrap()
            .verify(now, 3600)
            .unwrap();
        assert_eq!(v.bytes, bytes);
        // Signed by another key than its identity.
        let bad = desc(&k, now).sign(&key(2)).to_bytes();
        assert!(
            UnverifiedDescriptor::parse(&bad)
                .unwrap()
                .verify(now, 3600)
                .is_err()
        );
        // Body tampered after signing.
        let mut doc = desc(&k, now).sign(&k);
        let n = doc.body.len();
        doc.body[n - 1] ^= 1;
        assert!(
            UnverifiedDescriptor::parse(&doc.to_bytes())
                .and_then(|d| d.verify(now, 3600))
                .is_err()
        );
        // Expired and future-dated.
        assert!(
            UnverifiedDescriptor::parse(&bytes)
                .unwrap()
                .verify(now + 7200, 3600)
                .is_err()
        );
        assert!(
            UnverifiedDescriptor::parse(&bytes)
                .unwrap()
                .verify(now - 7200, 3600)
                .is_err()
        );
        // Trailing bytes.
        let mut t = bytes.clone();
        t.push(0);
        assert!(matches!(
            UnverifiedDescriptor::parse(&t),
            Err(Error::TrailingBytes(1))
        ));
        // Oversize.
        let mut big = desc(&k, now);
        big.nickname = "x".repeat(MAX_DESCRIPTOR_LEN);
        assert!(matches!(
            UnverifiedDescriptor::parse(&big.sign(&k).to_bytes()),
            Err(Error::TooLarge { .. })
        ));
    }

    /// A number written in more bytes than it needs (postcard reads
    /// `ff 00` as 127) would give a document a second encoding and a second
    /// digest: refused, in a signed body and in the envelope. Found by the
    /// `consensus` and `descriptor` fuzz targets.
    #[test]
    fn documents_are_read_only_in_their_canonical_encoding() {
        // A consensus body with `fresh_until` = 127 in two bytes, signed.
        let (_, sk, cert) = authority(1, 0, u64::MAX);
        let signed = |body: Vec<u8>| {
            let mut doc = AuthSigned::new(body);
            let s = AuthoritySig::make(CONSENSUS_DOMAIN, &doc.body, &cert, &sk);
            doc.add(s);
            doc.to_bytes()
        };
        // After the weights: two zero shared random values, no entries.
        let body = |head: &[u8]| [head, &[0; 66]].concat();
        let overlong = signed(body(&[0x00, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00]));
        let err = UnverifiedConsensus::parse(&overlong).err().unwrap();
        assert!(err.to_string().contains("canonical"), "{err}");
        let short = signed(body(&[0x00, 0x7f, 0x00, 0x00, 0x00, 0x00]));
        assert_eq!(
            UnverifiedConsensus::parse(&short)
                .unwrap()
                .peek()
                .fresh_until,
            127
        );
        // A descriptor whose body length is written in three bytes, not two.
        let k = key(1);
        let now = 1_800_000_000;
        let doc = desc(&k, now).sign(&k);
        let n = doc.body.len();
        assert!((128..1 << 14).contains(&n));
        let bytes = doc.to_bytes();
        let mut long = vec![(n & 0x7f) as u8 | 0x80, (n >> 7) as u8 | 0x80, 0];
        long.extend_from_slice(&bytes[2..]);
        assert_eq!(long.len(), bytes.len() + 1);
        let err = UnverifiedDescriptor::parse(&long).err().unwrap();
        assert!(err.to_string().contains("canonical"), "{err}");
        UnverifiedDescriptor::parse(&bytes).unwrap();
    }

    /// An authority configured to keep descriptors for as long as a u64
    /// allows takes a fresh descriptor (the age check overflowed). Found
    /// by the `descriptor` fuzz target.
    #[test]
    fn the_largest_maximum_age_does_not_overflow() {
        let k = key(1);
        let now = 1_800_000_000;
        let bytes = desc(&k, now).sign(&k).to_bytes();
        for max_age in [u64::MAX, u64::MAX - now + 1] {
            UnverifiedDescriptor::parse(&bytes)
                .unwrap()
                .verify(now, max_age)
                .unwrap();
        }
    }

    #[test]
    fn onion_keys_are_cross_certified() {
        let k = key(1);
        let now = 1_800_000_000;
        let ok = |d: &RelayDescriptor| {
            UnverifiedDescriptor::parse(&d.sign(&k).to_bytes())
                .and_then(|u| u.verify(now, 3600))
                .is_ok()
        };
        assert!(ok(&desc(&k, now)));
        // Another relay's onion key, with that relay's proof.
        let other = OnionSecret::new(x25519_dalek::StaticSecret::from([7; 32]));
        let mut stolen = desc(&k, now);
        stolen.onion_key = other.public();
        stolen.onion_crosscert = other.crosscert(&key(2).verifying_key().to_bytes());
        assert!(!ok(&stolen), "a proof made for another identity");
        // A key whose secret is unknown, with our own key's proof.
        let mut claimed = desc(&k, now);
        claimed.onion_key = other.public();
        assert!(!ok(&claimed), "the proof of a different onion key");
        let mut flipped = desc(&k, now);
        flipped.onion_crosscert.sign ^= 1;
        assert!(
            !ok(&flipped),
            "the other point with the same Montgomery form"
        );
    }

    #[test]
    fn the_largest_vote_and_consensus_fit_their_limits() {
        // The largest entry: longest nickname, an IPv6 address, the largest
        // numbers, a full port summary and a family.
        let worst = ConsensusRelay {
            nickname: "x".repeat(MAX_NICKNAME_LEN),
            identity: [0xff; 32],
            link_key: LinkKey([0xff; 32]),
            onion_key: OnionKey([0xff; 32]),
            addr: "[ffff::ffff]:65535".parse().unwrap(),
            flags: RelayFlags(u16::MAX),
            bandwidth: u32::MAX,
            declared_bandwidth: u32::MAX,
            measured_bandwidth: Some(u32::MAX),
            exit_ports: ExitPorts(
                (0..MAX_PORT_RANGES as u16)
                    .map(|i| (40_000 + 3 * i, 40_001 + 3 * i))
                    .collect(),
            ),
            family: Some(u32::MAX),
            descriptor_digest: [0xff; 32],
        };
        assert_eq!(
            encode(&worst).len(),
            578,
            "as doc/protocol.md section 7 says"
        );
        let sig = AuthoritySig {
            cert: vec![0xff; MAX_CERT_LEN],
            sig: Sig([0xff; 64]),
        };
        let entry = SrEntry {
            authority: [0xff; 32],
            value: [0xff; 32],
        };
        let c = Consensus {
            valid_after: u64::MAX,
            fresh_until: u64::MAX,
            valid_until: u64::MAX,
            relays: vec![worst; MAX_CONSENSUS_RELAYS],
            weights: PositionWeights {
                exit_elsewhere: u32::MAX,
                guard_as_middle: u32::MAX,
            },
            shared_random: SharedRandom {
                current: [0xff; 32],
                previous: [0xff; 32],
                commits: vec![entry; MAX_SIGNATURES],
                reveals: vec![entry; MAX_SIGNATURES],
            },
        };
        let mut doc = c.to_document();
        doc.signatures = vec![sig.clone(); MAX_SIGNATURES];
        let len = doc.to_bytes().len();
        assert!(len <= MAX_CONSENSUS_LEN, "consensus {len} bytes");
        // A vote names each descriptor by its digest.
        let v = Vote {
            authority: [0xff; 32],
            valid_after: u64::MAX,
            interval: u64::MAX,
            valid_intervals: u64::MAX,
            relays: vec![
                VoteRelay {
                    identity: [0xff; 32],
                    digest: [0xff; 32],
                    flags: RelayFlags(u16::MAX),
                    bandwidth: u32::MAX,
                    measured: Some(u32::MAX),
                };
                MAX_CONSENSUS_RELAYS
            ],
            shared_random: SrVote {
                commit: Some([0xff; 32]),
                reveal: Some([0xff; 32]),
                commits: vec![entry; MAX_SIGNATURES],
                reveals: vec![entry; MAX_SIGNATURES],
                current: Some([0xff; 32]),
                previous: Some([0xff; 32]),
            },
        };
        let mut doc = v.to_document();
        doc.signatures = vec![sig];
        let len = doc.to_bytes().len();
        assert!(len <= MAX_VOTE_LEN, "vote {len} bytes");
    }

    fn consensus(now: u64) -> Consensus {
        Consensus {
            valid_after: now,
            fresh_until: now + 60,
            valid_until: now + 180,
            relays: vec![],
            weights: PositionWeights::default(),
            shared_random: SharedRandom::default(),
        }
    }

    /// An authority: identity key, signing key, certificate.
    pub(crate) fn authority(i: u8, from: u64, until: u64) -> (SigningKey, SigningKey, Vec<u8>) {
        let id = key(i);
        let sk = key(i + 100);
        let cert = AuthorityCert {
            identity: id.verifying_key().to_bytes(),
            signing_key: sk.verifying_key().to_bytes(),
            valid_from: from,
            valid_until: until,
        }
        .sign(&id);
        (id, sk, cert)
    }

    #[test]
    fn consensus_needs_a_majority_through_valid_certificates() {
        let now = 1_800_000_000;
        let auths: Vec<_> = (1..=3)
            .map(|i| authority(i, now - 10, now + 1000))
            .collect();
        let pinned: Vec<AuthorityKey> = auths
            .iter()
            .map(|a| AuthorityKey(a.0.verifying_key().to_bytes()))
            .collect();
        let body_doc = consensus(now).to_document();
        let sign = |d: &mut AuthSigned, a: &(SigningKey, SigningKey, Vec<u8>)| {
            let s = AuthoritySig::make(CONSENSUS_DOMAIN, &d.body, &a.2, &a.1);
            d.add(s);
        };
        // One valid authority plus one unknown key is refused.
        let mut doc = body_doc.clone();
        sign(&mut doc, &auths[0]);
        sign(&mut doc, &authority(9, now - 10, now + 1000));
        assert!(matches!(
            UnverifiedConsensus::parse(&doc.to_bytes())
                .unwrap()
                .verify(&pinned, now),
            Err(Error::NotEnoughSignatures {
                valid: 1,
                needed: 2
            })
        ));
        sign(&mut doc, &auths[1]);
        let b = doc.to_bytes();
        UnverifiedConsensus::parse(&b)
            .unwrap()
            .verify(&pinned, now)
            .unwrap();
        assert!(
            UnverifiedConsensus::parse(&b)
                .unwrap()
                .verify(&pinned, now + 181)
                .is_err()
        );
        // The same signature added twice counts once; order does not matter.
        let mut again = body_doc.clone();
        sign(&mut again, &auths[1]);
        sign(&mut again, &auths[0]);
        sign(&mut again, &auths[0]);
        assert_eq!(again.signatures.len(), 2);
        let mut ordered = body_doc.clone();
        sign(&mut ordered, &auths[0]);
        sign(&mut ordered, &auths[1]);
        assert_eq!(again.to_bytes(), ordered.to_bytes());
        // An expired signing-key certificate does not count.
        let expired = authority(2, now - 100, now - 1);
        let mut d3 = body_doc.clone();
        sign(&mut d3, &auths[0]);
        sign(&mut d3, &expired);
        let r = UnverifiedConsensus::parse(&d3.to_bytes()).unwrap();
        let rep = r.report(&pinned, now);
        assert!(rep.iter().any(|x| {
            x.verdict
                .as_ref()
                .is_err_and(|e| e.contains("certificate valid only"))
        }));
        assert!(r.verify(&pinned, now).is_err());
        // A certificate signed by someone other than its identity is rejected.
        let (id, sk, _) = authority(3, now, now + 10);
        let forged = AuthorityCert {
            identity: id.verifying_key().to_bytes(),
            signing_key: sk.verifying_key().to_bytes(),
            valid_from: 0,
            valid_until: u64::MAX,
        }
        .sign(&key(50));
        assert!(AuthorityCert::parse(&forged).is_err());
        // Trailing bytes.
        let mut t = b.clone();
        t.push(1);
        assert!(UnverifiedConsensus::parse(&t).is_err());
    }
}
