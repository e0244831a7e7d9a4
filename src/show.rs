//! `allium consensus show`: a consensus as JSON, with what each signature
//! is worth against pinned authority keys.

use allium_proto::{AuthorityKey, UnverifiedConsensus};
use serde_json::json;

/// What `allium consensus show` found.
pub struct Shown {
    pub json: String,
    /// Valid for the pinned authorities; `None` with none pinned.
    pub valid: Option<bool>,
}

/// Render a consensus document; signatures are checked against `pinned`
/// (authority names and keys, as a config lists them; an empty list marks
/// every signature as not pinned), and each signer is named as its config
/// names it.
pub fn consensus_json(
    bytes: &[u8],
    named: &[(String, AuthorityKey)],
    now: u64,
) -> Result<Shown, allium_proto::Error> {
    let pinned: Vec<AuthorityKey> = named.iter().map(|(_, k)| *k).collect();
    let pinned = &pinned[..];
    let name_of = |id: &[u8; 32]| {
        named
            .iter()
            .find(|(_, k)| k.0 == *id)
            .map(|(n, _)| n.clone())
    };
    let u = UnverifiedConsensus::parse(bytes)?;
    let c = u.peek();
    let times = (c.valid_after, c.fresh_until, c.valid_until);
    let weights = c.weights;
    let relays: Vec<_> = c
        .relays
        .iter()
        .map(|r| {
            json!({
                "nickname": r.nickname,
                "identity": hex::encode(r.identity),
                "address": r.addr.to_string(),
                "flags": r.flags.names(),
                "weight": r.bandwidth,
                "declared_bandwidth": r.declared_bandwidth,
                "measured_bandwidth": r.measured_bandwidth,
                "exit_ports": r.exit_ports.to_string(),
                "family": r.family.map(|f| hex::encode(c.relays[f as usize].identity)),
            })
        })
        .collect();
    let sigs: Vec<_> = u
        .report(pinned, now)
        .into_iter()
        .map(|s| {
            json!({
                "authority": s.identity.as_ref().and_then(name_of),
                "authority_identity": s.identity.map(hex::encode),
                "signing_key": s.signing_key.map(hex::encode),
                "certificate_valid_until": s.cert_valid_until,
                "verifies": s.verdict.is_ok(),
                "problem": s.verdict.err(),
            })
        })
        .collect();
    let checked = u.verify(pinned, now);
    let valid = (!pinned.is_empty()).then_some(checked.is_ok());
    let verdict = match checked {
        _ if pinned.is_empty() => {
            "unchecked: give --config to check against pinned authority keys".to_string()
        }
        Ok(_) => "valid".to_string(),
        Err(e) => format!("not valid for the pinned authorities: {e}"),
    };
    let json = serde_json::to_string_pretty(&json!({
        "valid_after": times.0,
        "fresh_until": times.1,
        "valid_until": times.2,
        "relays": relays,
        "position_weights": {
            "exit_elsewhere": weights.exit_elsewhere,
            "guard_as_middle": weights.guard_as_middle,
            "scale": allium_proto::PositionWeights::SCALE,
        },
        "signatures": sigs,
        "verdict": verdict,
    }))
    .unwrap_or_default();
    Ok(Shown { json, valid })
}
