//! Bandwidth measurement: how fast a relay opens and seals cells for the
//! authority, whatever it declares (`doc/protocol.md` section 7).
//!
//! The authority builds a one-hop circuit to the relay, as a client would
//! (an NK link in which the relay proves its identity, then a CREATE to
//! its onion key), and keeps up to [`WINDOW`] ECHO cells in flight until
//! [`Limits::duration`] has passed or [`Limits::max_bytes`] have been sent;
//! the measurement is the rate at which the echoed bytes come back. Every
//! echo costs the relay a link open, a layer open, a layer seal and a link
//! seal, the work of forwarding a cell; every body is fresh random bytes,
//! checked in order, so the relay cannot answer one without opening it.
//! The whole measurement ends by `duration` plus [`GRACE`]: a relay that
//! holds echoes back only fails its measurement. The bounds keep measuring
//! from becoming a way to flood a relay.
//!
//! What it does not prevent: a relay can tell a measurement from client
//! traffic (an authority's address, a one-hop circuit, ECHO) and serve it
//! first; and the rate is at most `WINDOW` cells per round trip, so over
//! long distances it measures the path, not the relay.

use allium_proto::flow::CircParams;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allium_link::channel::{self, ChannelHandle};
use allium_proto::cell::{self, Cell, CellCmd, CircId, DestroyReason, HANDSHAKE_NTOR};
use allium_proto::circuit::{Circuit, Event, Side};
use allium_proto::onion::ClientLayers;
use allium_proto::{LinkKey, OnionKey, RelayId, ntor};
use rand::RngExt;

use crate::DirError;

/// ECHO cells in flight at most.
pub const WINDOW: usize = 1000;
/// How long after its `duration` a measurement may take to finish, at
/// most (the link and circuit setup included).
pub const GRACE: Duration = Duration::from_secs(5);
/// The longest wait for any answer from the relay.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How much one measurement may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub duration: Duration,
    pub max_bytes: u64,
}

/// Measure the relay with identity `id` at `addr`: echoed bytes per second.
pub async fn measure(
    addr: SocketAddr,
    id: RelayId,
    link_key: &LinkKey,
    onion_key: &OnionKey,
    limits: Limits,
) -> Result<u32, DirError> {
    let fail = |why: String| DirError::Http {
        addr: addr.to_string(),
        why,
    };
    let chan = tokio::time::timeout(STEP_TIMEOUT, channel::connect_nk(addr, &id, link_key))
        .await
        .map_err(|_| fail("link handshake timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let (circ, mut inbox) = chan.new_circuit().await.map_err(|e| fail(e.to_string()))?;
    let work = echo_for(&chan, circ, &mut inbox, &id, onion_key, limits);
    let r = match tokio::time::timeout(limits.duration + GRACE, work).await {
        Ok(r) => r.map_err(fail),
        Err(_) => Err(fail("did not finish in time".into())),
    };
    chan.destroy(circ, DestroyReason::FINISHED);
    chan.close();
    r
}

async fn next_batch(inbox: &mut channel::Inbox, cells: &mut Vec<Cell>) -> Result<(), String> {
    match tokio::time::timeout(STEP_TIMEOUT, inbox.recv_batch(cells)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("the link closed".into()),
        Err(_) => Err("no answer".into()),
    }
}

async fn echo_for(
    chan: &ChannelHandle,
    circ: CircId,
    inbox: &mut channel::Inbox,
    id: &RelayId,
    onion_key: &OnionKey,
    limits: Limits,
) -> Result<u32, String> {
    // ECHO is no DATA: flow control does not apply to the measurement.
    let (mut st, hs) =
        ntor::client_start(&mut rand::rng(), &id.0, onion_key, CircParams::default());
    let create = Cell::new(
        circ,
        CellCmd::CREATE,
        &cell::encode_create(HANDSHAKE_NTOR, &hs),
    )
    .map_err(|e| e.to_string())?;
    chan.send(create).await.map_err(|e| e.to_string())?;
    st.prepare();
    let mut cells = Vec::new();
    next_batch(inbox, &mut cells).await?;
    let created = cells.remove(0);
    if created.cmd != CellCmd::CREATED {
        return Err(format!("CREATE answered {:?}", created.cmd));
    }
    let hdata = cell::decode_created(&created.payload[..]).map_err(|e| e.to_string())?;
    let (keys, params) = st.finish(hdata).map_err(|e| e.to_string())?;
    let mut layers = ClientLayers::new();
    layers.push(&keys).map_err(|e| e.to_string())?;
    let mut core = Circuit::client(&mut rand::rng(), layers, params).map_err(|e| e.to_string())?;
    let size = core.echo_max();
    // What was sent and not yet echoed, oldest first.
    let mut expected: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();

    let start = Instant::now();
    let (mut sent, mut echoed) = (0u64, 0u64);
    loop {
        let sending = start.elapsed() < limits.duration && sent < limits.max_bytes;
        while sending && expected.len() < WINDOW && sent < limits.max_bytes {
            let mut body = vec![0u8; size];
            rand::rng().fill(&mut body[..]);
            core.echo(&body).map_err(|e| e.to_string())?;
            sent += body.len() as u64;
            expected.push_back(body);
        }
        let mut out = Vec::new();
        while let Some(t) = core.poll_transmit() {
            out.push(Cell {
                circ_id: circ,
                cmd: CellCmd::RELAY,
                payload: t.payload,
            });
        }
        chan.send_batch(out).await.map_err(|e| e.to_string())?;
        if expected.is_empty() {
            break;
        }
        next_batch(inbox, &mut cells).await?;
        let now = Instant::now();
        for c in cells.drain(..) {
            core.handle_cell(now, Side::Next, c)
                .map_err(|e| format!("the relay broke the protocol: {e}"))?;
        }
        while let Some(ev) = core.poll_event() {
            match ev {
                Event::Echo(b) if expected.front() == Some(&b) => {
                    expected.pop_front();
                    echoed += b.len() as u64;
                }
                Event::Echo(_) => {
                    return Err("echoed other bytes than it was sent, or out of order".into());
                }
                other => return Err(format!("answered {other:?} to an ECHO")),
            }
        }
    }
    let secs = start.elapsed().as_secs_f64().max(1e-3);
    Ok((echoed as f64 / secs).min(u32::MAX as f64) as u32)
}
