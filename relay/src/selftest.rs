//! The ORPort self-test, as Tor does it: a one-hop circuit to another
//! relay, extended back to this one at its advertised address. EXTENDED
//! with a handshake only this relay's onion key completes proves that the
//! ORPort is reachable from outside, by the address the consensus gives.
//!
//! The extending relay may already hold a link with this one and use it
//! instead of connecting: the test's CREATE proves reachability only if it
//! arrives on a link the other side opened ([`Inbound`]). When it came over
//! a link this relay opened, the test still counts if another relay has
//! opened a link to this ORPort (relays connect to the address the
//! consensus lists) and created a circuit on it since the relay started;
//! otherwise it proves nothing and is tried again. In a busy network the
//! links between relays stay up, so the extending relay nearly always
//! reuses one: the test goes through a relay this one holds no link to
//! that it opened, where there is one.
//!
//! Relays extend circuits only to relays the consensus lists at that
//! address, so the test can run once the consensus lists this relay; until
//! then the authorities' own reachability tests decide whether it is
//! listed Running. When the consensus before did not list this relay
//! there, the other relay may still hold that one, and refuse as it would
//! if it could not connect: such a refusal says "unreachable" only once
//! the others have had time to fetch the new one.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use allium_link::channel::{self, ChannelHandle};
use allium_proto::cell::{self, Cell, CellCmd, DestroyReason};
use allium_proto::flow::CircParams;
use allium_proto::onion::{ClientLayers, forward_capacity};
use allium_proto::relaymsg::{Extend, RelayMsg};
use allium_proto::{ConsensusRelay, LinkKey, OnionKey, RelayDescriptor, RelayId, ntor};

/// Each step (link, CREATE, EXTEND) must be done within this.
const STEP: Duration = Duration::from_secs(20);

/// What a test found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The circuit came back through the ORPort, in this long.
    Reachable(Duration),
    /// It did not: why, for the operator.
    Unreachable(String),
    /// The other relay used a link this relay had opened: nothing learnt.
    Unknown(String),
}

/// What the relay's own listener saw of the test under way: the CREATE it
/// expects, and whether it came on a link the other side opened.
#[derive(Debug, Default)]
pub struct Inbound {
    expect: Mutex<Option<Vec<u8>>>,
    seen: AtomicBool,
    /// A relay (a proven identity) opened a link to this ORPort and
    /// created a circuit on it.
    from_relay: AtomicBool,
}

impl Inbound {
    fn expect(&self, create: Vec<u8>) {
        *self.expect.lock().unwrap_or_else(|p| p.into_inner()) = Some(create);
        self.seen.store(false, Ordering::SeqCst);
    }

    /// A CREATE arrived on a link the peer opened; `relay` if the peer
    /// proved a relay identity in the link handshake.
    pub fn arrived(&self, create: &Cell, relay: bool) {
        if relay {
            self.from_relay.store(true, Ordering::SeqCst);
        }
        let expect = self.expect.lock().unwrap_or_else(|p| p.into_inner());
        if expect
            .as_ref()
            .is_some_and(|e| create.payload.starts_with(e))
        {
            self.seen.store(true, Ordering::SeqCst);
        }
    }
}

/// A relay a circuit can reach: who it is and where.
#[derive(Clone, Debug)]
pub struct Hop {
    pub nickname: String,
    pub identity: [u8; 32],
    pub link_key: LinkKey,
    pub onion_key: OnionKey,
    pub addr: SocketAddr,
}

impl From<&ConsensusRelay> for Hop {
    fn from(r: &ConsensusRelay) -> Self {
        Hop {
            nickname: r.nickname.clone(),
            identity: r.identity,
            link_key: r.link_key,
            onion_key: r.onion_key,
            addr: r.addr,
        }
    }
}

impl From<&RelayDescriptor> for Hop {
    fn from(d: &RelayDescriptor) -> Self {
        Hop {
            nickname: d.nickname.clone(),
            identity: d.identity,
            link_key: d.link_key,
            onion_key: d.onion_key,
            addr: d.addr,
        }
    }
}

/// How long after a consensus takes effect its relays may still hold the
/// one before: the caches' fetch window, and this for the fetch itself.
const FETCH_SLACK_MS: u64 = 10_000;

/// Until when (milliseconds since the UNIX epoch) another relay may still
/// hold the consensus before `c`, which may not list this relay: it then
/// refuses to extend to it, with the same answer it gives when it cannot
/// connect.
pub fn others_may_lag_until(c: &allium_proto::Consensus) -> u64 {
    c.valid_after.saturating_mul(1000) + allium_directory::http::cache_spread_ms(c) + FETCH_SLACK_MS
}

impl Verdict {
    /// "Could not reach" from a relay whose consensus may not list this
    /// relay yet (before `lag_until`, at `now_ms`) proves nothing.
    pub fn unless_lagging(self, lag_until: u64, now_ms: u64) -> Verdict {
        match self {
            Verdict::Unreachable(e) if now_ms < lag_until => {
                Verdict::Unknown(format!("{e}; its consensus may not list this relay yet"))
            }
            v => v,
        }
    }
}

/// Build a circuit through `via` back to `me`, whose listener reports to
/// `inbound`.
pub async fn through(via: &Hop, me: &Hop, inbound: &Inbound) -> Verdict {
    let start = Instant::now();
    let chan = match tokio::time::timeout(
        STEP,
        channel::connect_nk(via.addr, &RelayId(via.identity), &via.link_key),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Verdict::Unknown(format!("no link to {}: {e}", via.nickname)),
        Err(_) => return Verdict::Unknown(format!("no link to {} within {STEP:?}", via.nickname)),
    };
    let r = extend_back(&chan, via, me, inbound).await;
    chan.close();
    match r {
        Ok(()) if inbound.seen.load(Ordering::SeqCst) => Verdict::Reachable(start.elapsed()),
        Ok(()) if inbound.from_relay.load(Ordering::SeqCst) => Verdict::Reachable(start.elapsed()),
        Ok(()) => Verdict::Unknown(format!(
            "{} reached this relay over a link this relay had opened",
            via.nickname
        )),
        Err(e) if e.contains("could not reach") => Verdict::Unreachable(e),
        Err(e) => Verdict::Unknown(e),
    }
}

async fn extend_back(
    chan: &ChannelHandle,
    via: &Hop,
    me: &Hop,
    inbound: &Inbound,
) -> Result<(), String> {
    let lost = |e: &dyn std::fmt::Display| format!("circuit to {}: {e}", via.nickname);
    let (id, mut rx) = chan.new_circuit().await.map_err(|e| lost(&e))?;
    let next = async |rx: &mut channel::Inbox| {
        tokio::time::timeout(STEP, rx.recv())
            .await
            .map_err(|_| format!("{} did not answer within {STEP:?}", via.nickname))?
            .ok_or_else(|| format!("the link to {} closed", via.nickname))
    };
    let (first, hs) = ntor::client_start(
        &mut rand::rng(),
        &via.identity,
        &via.onion_key,
        CircParams::default(),
    );
    let create = Cell::new(
        id,
        CellCmd::CREATE,
        &cell::encode_create(cell::HANDSHAKE_NTOR, &hs),
    )
    .map_err(|e| lost(&e))?;
    chan.send(create).await.map_err(|e| lost(&e))?;
    let c = next(&mut rx).await?;
    if c.cmd != CellCmd::CREATED {
        return Err(lost(&format!("answered {:?}", c.cmd)));
    }
    let keys = cell::decode_created(&c.payload[..])
        .and_then(|r| first.finish(r))
        .map_err(|e| lost(&e))?
        .0;
    let mut layers = ClientLayers::new();
    layers.push(&keys).map_err(|e| lost(&e))?;

    let (back, hs) = ntor::client_start(
        &mut rand::rng(),
        &me.identity,
        &me.onion_key,
        CircParams::default(),
    );
    inbound.expect(cell::encode_create(cell::HANDSHAKE_NTOR, &hs));
    let extend = RelayMsg::Extend(Extend {
        identity: me.identity,
        link_key: me.link_key,
        addr: me.addr,
        htype: cell::HANDSHAKE_NTOR,
        hdata: hs,
    });
    let body = extend
        .encode(0, forward_capacity(0))
        .map_err(|e| lost(&e))?;
    let payload = layers.encrypt_forward(0, &body).map_err(|e| lost(&e))?;
    chan.send(Cell {
        circ_id: id,
        cmd: CellCmd::RELAY_EARLY,
        payload,
    })
    .await
    .map_err(|e| lost(&e))?;
    let mut c = next(&mut rx).await?;
    let done = |r: Result<(), String>| {
        chan.destroy(id, DestroyReason::REQUESTED);
        r
    };
    if c.cmd == CellCmd::DESTROY {
        return done(Err(format!(
            "{} destroyed the circuit (reason {})",
            via.nickname,
            c.payload.first().copied().unwrap_or(0)
        )));
    }
    layers
        .decrypt_backward_tagged(&mut c.payload)
        .map_err(|e| lost(&e))?;
    let reply = RelayMsg::decode(&c.payload[16..]).map_err(|e| lost(&e))?;
    done(match reply {
        (0, RelayMsg::Extended(r)) => back
            .finish(&r)
            .map(|_| ())
            .map_err(|e| format!("the relay at {} is not this one: {e}", me.addr)),
        (0, RelayMsg::Truncated(r)) => Err(format!(
            "{} could not reach {} (reason {r})",
            via.nickname, me.addr
        )),
        (_, m) => Err(lost(&format!("answered {:?}", m.cmd()))),
    })
}

#[cfg(test)]
mod tests {
    use super::Verdict;

    #[test]
    fn a_refusal_while_others_may_lag_proves_nothing() {
        let refused = || Verdict::Unreachable("relay1 could not reach 127.0.0.1:1".into());
        assert!(matches!(
            refused().unless_lagging(1000, 999),
            Verdict::Unknown(e) if e.contains("may not list this relay yet")
        ));
        assert!(matches!(
            refused().unless_lagging(1000, 1000),
            Verdict::Unreachable(_)
        ));
        let took = std::time::Duration::from_millis(3);
        assert_eq!(
            Verdict::Reachable(took).unless_lagging(1000, 0),
            Verdict::Reachable(took)
        );
    }
}
