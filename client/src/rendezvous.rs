//! Reaching an onion service (doc/protocol.md section 11.4): fetch its
//! descriptor, wait at a rendezvous point, introduce through one of its
//! introduction points, and finish the end-to-end handshake when the
//! service comes to the rendezvous point. The circuit that results ends at
//! the service; streams on it work like exit streams.
//!
//! Each failure says which step failed, as Tor's extended SOCKS replies
//! do: no descriptor (F0), a bad one (F1), no introduction point passed
//! the request on (F2), the service never came to the rendezvous point
//! (F3), every introduction point timed out (F7).

use std::time::Duration;

use allium_directory::unix_now;
use allium_proto::OnionKey;
use allium_proto::doc::RelayFlags;
use allium_proto::ntor;
use allium_proto::relaymsg::{COOKIE_LEN, Introduce, IntroduceStatus, RelayMsg};
use allium_proto::service::ServiceAddress;
use allium_proto::service::descriptor::subcredential;
use allium_proto::service::intro::{self, IntroduceRequest};
use allium_proto::service::pow::{self, Pow, Solver};
use rand::RngExt;
use rand::seq::SliceRandom;
use tokio::sync::mpsc;
use tracing::debug;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ClientError;
use crate::circuit::CircuitHandle;
use crate::client::Client;
use crate::hsdir;

/// How long an introduction point may take to answer INTRODUCE1, circuit
/// included.
pub const INTRO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the service may take to come to the rendezvous point after an
/// introduction point passed the request on.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(15);

/// The next message from the last hop, within `t`.
async fn next_msg(
    rx: &mut mpsc::Receiver<RelayMsg>,
    t: Duration,
) -> Result<RelayMsg, Option<ClientError>> {
    match tokio::time::timeout(t, rx.recv()).await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(Some(ClientError::CircuitClosed)),
        Err(_) => Err(None),
    }
}

/// A solution of `effort` to the service's puzzle under `seed`, for the
/// introduction through `point` whose ephemeral key is `key` (on a
/// blocking thread: it takes about `effort` times 0.4 ms).
async fn solve(
    seed: [u8; 32],
    point: [u8; 32],
    key: [u8; 32],
    effort: u32,
) -> Result<Pow, ClientError> {
    let started = std::time::Instant::now();
    let pow = tokio::task::spawn_blocking(move || {
        // 64 times the mean: a miss is as likely as e^-64.
        Solver::new().solve(
            &seed,
            &point,
            &key,
            effort,
            &mut rand::rng(),
            u64::from(effort) * 64,
        )
    })
    .await
    .map_err(|e| ClientError::IntroductionFailed(format!("puzzle: {e}")))?
    .ok_or_else(|| ClientError::IntroductionFailed("no puzzle solution found".into()))?;
    debug!(effort, elapsed = ?started.elapsed(), "solved the service's puzzle");
    Ok(pow)
}

/// Rendezvous points tried before giving up.
const RP_ATTEMPTS: usize = 3;

/// A circuit to `rp` waiting there at a fresh cookie: the circuit, its
/// service messages and the cookie.
async fn establish_rendezvous(
    client: &Client,
    rp: &allium_proto::ConsensusRelay,
) -> Result<(CircuitHandle, mpsc::Receiver<RelayMsg>, [u8; COOKIE_LEN]), ClientError> {
    let circ = client.build_circuit_or_move_on(&rp.identity).await?;
    let mut msgs = circ.service_messages().ok_or(ClientError::CircuitClosed)?;
    let mut cookie = [0u8; COOKIE_LEN];
    rand::rng().fill(&mut cookie[..]);
    circ.send_service(RelayMsg::EstablishRendezvous(cookie))
        .await?;
    match next_msg(&mut msgs, INTRO_TIMEOUT).await {
        Ok(RelayMsg::RendezvousEstablished) => Ok((circ, msgs, cookie)),
        Ok(m) => Err(ClientError::Build(format!("answered {:?}", m.cmd()))),
        Err(e) => Err(e.unwrap_or(ClientError::Timeout("ESTABLISH_RENDEZVOUS"))),
    }
}

/// A running, valid relay at random, none of `never`; of the others, none
/// of each list in `avoid` (the first the most to be avoided) while one
/// that is not is left.
pub(crate) fn pick_relay(
    c: &allium_proto::Consensus,
    never: &[[u8; 32]],
    avoid: &[&[[u8; 32]]],
) -> Option<allium_proto::ConsensusRelay> {
    use rand::seq::IndexedRandom;
    let mut from: Vec<_> = c
        .relays
        .iter()
        .filter(|r| r.flags.has(RelayFlags::RUNNING | RelayFlags::VALID))
        .filter(|r| !never.contains(&r.identity))
        .collect();
    for list in avoid {
        crate::path::prefer_not(&mut from, list);
    }
    from.choose(&mut rand::rng()).map(|r| (*r).clone())
}

/// A circuit whose last hop is the service at `address`.
pub async fn connect(
    client: &Client,
    address: &ServiceAddress,
) -> Result<CircuitHandle, ClientError> {
    let now = unix_now();
    let info = hsdir::fetch(client, address, now).await?;
    let c = client
        .consensus()
        .ok_or_else(|| ClientError::NoConsensus("not bootstrapped yet".into()))?;
    let period = c.period_at(now);
    let subcred = subcredential(address.key(), &address.blinded(period));

    // The rendezvous point: a running relay, not one of the introduction
    // points nor one of this client's guards if another will do (a
    // circuit cannot end at the guard it goes through).
    let rend_failed = |why: String| ClientError::RendezvousFailed(why);
    let mut avoid: Vec<[u8; 32]> = info.intro_points.iter().map(|i| i.relay).collect();
    avoid.extend(client.guards());
    let mut points = info.intro_points.clone();
    points.shuffle(&mut rand::rng());
    let rp_setup = async {
        // A relay that fails (it may have died since the consensus) is
        // avoided in the next of a few tries, before all others: in a small
        // network the introduction points and guards may be every relay
        // but the one that failed.
        let (mut why_rp, mut failed) = (Vec::new(), Vec::new());
        for _ in 0..RP_ATTEMPTS {
            let rp = pick_relay(&c, &[], &[&failed, &avoid])
                .ok_or_else(|| rend_failed("no relay can be the rendezvous point".into()))?;
            failed.push(rp.identity);
            match establish_rendezvous(client, &rp).await {
                Ok((circ, msgs, cookie)) => return Ok((rp, circ, msgs, cookie)),
                Err(e) => {
                    // A relay on the way that failed is not the next
                    // rendezvous point either, while another will do.
                    if let ClientError::ExtendFailed { relay, .. } = &e {
                        failed.push(*relay);
                    }
                    why_rp.push(format!("{}: {e}", rp.nickname));
                }
            }
        }
        Err(rend_failed(format!(
            "no rendezvous point took the cookie: {}",
            why_rp.join("; ")
        )))
    };
    // The circuit to the first introduction point is built meanwhile (the
    // INTRODUCE1 waits for RENDEZVOUS_ESTABLISHED: the service must not
    // reach the rendezvous point before the cookie does).
    let first_intro = async {
        let relay = c.relay(&points.first()?.relay)?;
        Some(client.build_circuit_or_move_on(&relay.identity).await)
    };
    let (waiting, mut prebuilt) = tokio::join!(rp_setup, first_intro);
    let (rp, rp_circ, mut rp_msgs, cookie) = waiting?;

    // Handshakes of the introductions sent: the service may answer an
    // earlier one after the client moved on to the next point.
    let mut started: Vec<ntor::ClientState> = Vec::new();
    let mut why = Vec::new();
    let (mut timed_out, mut sent) = (0, 0);
    let mut tries = 0u32;
    for ip in &points {
        // Built for the first point only.
        let circ = prebuilt.take();
        let Some(relay) = c.relay(&ip.relay) else {
            why.push("an introduction point not in the consensus".to_string());
            continue;
        };
        let (st, onionskin) = ntor::client_start(
            &mut rand::rng(),
            &ip.auth_key,
            &OnionKey(ip.enc_key),
            client.config().circ_params(),
        );
        let ephemeral = StaticSecret::random_from_rng(&mut rand::rng());
        // The service's puzzle, if it asks for effort: more at each point
        // tried (the last may have been lost for want of effort).
        let pow = match info.pow {
            Some(p) if p.effort > 0 => {
                let effort = p
                    .effort
                    .saturating_mul(1 << tries.min(8))
                    .min(pow::MAX_EFFORT);
                tries += 1;
                let key = PublicKey::from(&ephemeral).to_bytes();
                match solve(p.seed, ip.auth_key, key, effort).await {
                    Ok(pow) => Some(pow),
                    Err(e) => {
                        why.push(format!("{}: {e}", relay.nickname));
                        continue;
                    }
                }
            }
            _ => None,
        };
        let req = IntroduceRequest {
            cookie,
            rp_identity: rp.identity,
            rp_link_key: rp.link_key,
            rp_addr: rp.addr,
            onionskin,
            pow,
        };
        let encrypted =
            intro::seal_with_ephemeral(ephemeral, &req, &ip.auth_key, &ip.enc_key, &subcred)?;
        let ask = async {
            let circ = match circ {
                Some(built) => built?,
                None => client.build_circuit_or_move_on(&relay.identity).await?,
            };
            let mut msgs = circ.service_messages().ok_or(ClientError::CircuitClosed)?;
            circ.send_service(RelayMsg::Introduce1(Introduce {
                auth_key: ip.auth_key,
                encrypted,
            }))
            .await?;
            // The circuit closes as its handle drops.
            loop {
                match msgs.recv().await {
                    Some(RelayMsg::IntroduceAck(s)) => return Ok(IntroduceStatus(s)),
                    Some(_) => continue,
                    None => return Err(ClientError::CircuitClosed),
                }
            }
        };
        let status = match tokio::time::timeout(INTRO_TIMEOUT, ask).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                why.push(format!("{}: {e}", relay.nickname));
                continue;
            }
            Err(_) => {
                timed_out += 1;
                why.push(format!("{}: timed out", relay.nickname));
                continue;
            }
        };
        if status != IntroduceStatus::SENT {
            why.push(format!("{}: {status:?}", relay.nickname));
            continue;
        }
        sent += 1;
        started.push(st);
        debug!(intro = %relay.nickname, rp = %rp.nickname, "introduced; waiting at the rendezvous point");
        // One deadline for the service to come, whatever else arrives.
        let deadline = tokio::time::Instant::now() + RENDEZVOUS_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match next_msg(&mut rp_msgs, left).await {
                Ok(RelayMsg::Rendezvous2(reply)) => {
                    let (keys, params) = started
                        .iter_mut()
                        .rev()
                        .find_map(|st| st.check(&reply).ok())
                        .ok_or_else(|| {
                            rend_failed("the service's handshake does not verify".into())
                        })?;
                    rp_circ.join(keys, params, None).await?;
                    return Ok(rp_circ);
                }
                Ok(_) => continue,
                Err(Some(e)) => return Err(rend_failed(format!("rendezvous circuit: {e}"))),
                // Not there in time: the service may have lost this
                // introduction circuit; try another.
                Err(None) => {
                    why.push(format!("{}: the service did not come", relay.nickname));
                    break;
                }
            }
        }
    }
    Err(if sent > 0 {
        rend_failed(format!(
            "the service did not come to the rendezvous point: {}",
            why.join("; ")
        ))
    } else if timed_out > 0 && timed_out == points.len() {
        ClientError::IntroductionTimedOut
    } else {
        ClientError::IntroductionFailed(why.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::pick_relay;
    use crate::path::tests::{consensus_of, relay};

    /// A relay of `never` is never picked; each list to avoid is avoided
    /// while a relay not on it is left, the first before the second: an
    /// introduction point that just failed is less fit than a guard.
    #[test]
    fn picks_avoid_the_worst_first() {
        let c = consensus_of((1..=6).map(|i| relay(i, 1000, 0)).collect());
        let picks = |never: &[[u8; 32]], avoid: &[&[[u8; 32]]]| {
            let mut got: Vec<u8> = (0..200)
                .map(|_| pick_relay(&c, never, avoid).unwrap().identity[0])
                .collect();
            got.sort();
            got.dedup();
            got
        };
        let ids = |v: &[u8]| v.iter().map(|&i| [i; 32]).collect::<Vec<_>>();
        let (used, failed, guards) = (ids(&[1, 2, 3]), ids(&[4]), ids(&[5, 6]));
        assert_eq!(picks(&used, &[&failed, &guards]), [5, 6]);
        assert_eq!(picks(&used, &[&ids(&[4, 5]), &guards]), [6]);
        assert_eq!(picks(&used, &[&ids(&[4, 5, 6]), &guards]), [4]);
        assert_eq!(picks(&ids(&[1, 2, 3, 5, 6]), &[&failed, &guards]), [4]);
        assert!(pick_relay(&c, &ids(&[1, 2, 3, 4, 5, 6]), &[]).is_none());
        assert_eq!(picks(&[], &[]), [1, 2, 3, 4, 5, 6]);
    }
}
