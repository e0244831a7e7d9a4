//! Onion-layer cell crypto (`doc/protocol.md` section "Cell crypto").
//!
//! Each hop shares two 32-byte keys with the client, one per direction, and
//! keeps a 64-bit counter per direction. Every layer is AES-256-GCM
//! ([`crate::aead`]) under `(key, counter)`; the counter advances once per cell the
//! hop processes in that direction, so a modified, replayed, reordered or
//! dropped cell fails authentication and the circuit is torn down.
//!
//! The RELAY cell payload is `tag[16] | body[493]` at every hop:
//!
//! * **Forward** (client to relays): the cell carries the tag of the hop that
//!   receives it. That hop checks it, decrypts the body, and forwards
//!   `body[0..493] | 0^16`: the first 16 plaintext bytes are the next hop's
//!   tag. The client precomputes the "filler" that those appended zero blocks
//!   become, so each hop's tag covers exactly the bytes that hop sees. A hop
//!   tells "for me" from "pass on" by the associated data of the tag
//!   (`0x00` = pass on, `0x01` = deliver). A message for the hop at depth `d`
//!   (0-based) has room for `493 - 16*d` plaintext bytes.
//! * **Backward** (relays to client): the originating hop encrypts the body
//!   and writes its tag; every hop on the way XORs its keystream over the
//!   whole payload, tag field included, so no byte is the same at two hops.
//!   The client removes the layers of the hops before the last and opens
//!   the last hop's message (the usual case) in one pass; failing that it
//!   tries each hop in turn. Nothing can be changed, injected, dropped or
//!   reordered without the keys of the hop whose message it is.

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Error;
use crate::aead::{Key, TAG_LEN, keystream, keystream_at, whole};
use crate::cell::PAYLOAD_LEN;

/// Bytes of the body that every layer encrypts.
pub const BODY_LEN: usize = PAYLOAD_LEN - TAG_LEN;
/// The longest circuit the client-side filler supports.
pub const MAX_HOPS: usize = 8;

const AD_FORWARD: &[u8] = &[0];
const AD_DELIVER: &[u8] = &[1];

/// Plaintext bytes available in a forward message for hop `depth` (0-based).
pub const fn forward_capacity(depth: usize) -> usize {
    BODY_LEN - TAG_LEN * depth
}
/// Plaintext bytes available in a backward message.
pub const BACKWARD_CAPACITY: usize = BODY_LEN;

/// One direction of one hop: a key and the counter of the next cell.
struct Direction {
    key: Key,
    counter: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        Direction {
            key: Key::new(key),
            counter: 0,
        }
    }
    /// A direction whose keystream's tails are taken alone: the client's
    /// forward layers (the filler).
    fn with_keystream(key: &[u8; 32]) -> Self {
        Direction {
            key: Key::with_keystream(key),
            counter: 0,
        }
    }
    /// The key and the counter of the next cell.
    fn current(&self) -> Result<(&Key, u64), Error> {
        if self.counter == u64::MAX {
            return Err(Error::CounterExhausted);
        }
        Ok((&self.key, self.counter))
    }
    fn advance(&mut self) {
        self.counter += 1;
    }
}

/// The 64 bytes of key material a circuit handshake yields for one hop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct HopKeys {
    pub forward: [u8; 32],
    pub backward: [u8; 32],
}

/// Domain of [`HopKeys::binding`].
const BINDING_DOMAIN: &[u8] = b"allium circuit binding v1\0";

impl HopKeys {
    /// A value only the two ends of this hop know: signing it binds a
    /// request to the circuit (an ESTABLISH_INTRO cannot be replayed on
    /// another circuit).
    pub fn binding(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::new()
            .chain_update(BINDING_DOMAIN)
            .chain_update(self.forward)
            .chain_update(self.backward)
            .finalize()
            .into()
    }

    /// The same keys seen from the other end (the service's end of an
    /// end-to-end hop sends with the client's backward key).
    pub fn reversed(&self) -> Self {
        HopKeys {
            forward: self.backward,
            backward: self.forward,
        }
    }

    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut forward = [0; 32];
        let mut backward = [0; 32];
        forward.copy_from_slice(&b[..32]);
        backward.copy_from_slice(&b[32..]);
        HopKeys { forward, backward }
    }
}

/// What a relay does with a forward cell after removing its layer.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeled {
    /// Pass the rewritten payload to the next hop.
    Forward,
    /// The cell is for this hop: the body plaintext is `payload[16..]`.
    Deliver,
}

/// A relay's layer of one circuit.
pub struct RelayLayer {
    fwd: Direction,
    back: Direction,
    binding: [u8; 32],
}

impl RelayLayer {
    pub fn new(keys: &HopKeys) -> Self {
        RelayLayer {
            fwd: Direction::new(&keys.forward),
            back: Direction::new(&keys.backward),
            binding: keys.binding(),
        }
    }

    /// This hop's [`HopKeys::binding`].
    pub fn binding(&self) -> &[u8; 32] {
        &self.binding
    }

    /// Remove this hop's layer from a forward cell, in place.
    ///
    /// With `has_next`, a cell that authenticates as "pass on" is rewritten
    /// for the next hop; otherwise only "deliver" is accepted.
    pub fn peel_forward(
        &mut self,
        payload: &mut [u8; PAYLOAD_LEN],
        has_next: bool,
    ) -> Result<Peeled, Error> {
        let (key, n) = self.fwd.current()?;
        let (tag, body) = payload.split_at_mut(TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Error::Truncated)?;
        // "Pass on" is the common case; a failed open zeroes the body, so
        // "deliver" is tried on a copy.
        let mut copy = [0u8; BODY_LEN];
        if has_next {
            copy.copy_from_slice(body);
        }
        let verdict = if has_next && whole::open(key, n, AD_FORWARD, body, &tag) {
            Peeled::Forward
        } else {
            if has_next {
                body.copy_from_slice(&copy);
            }
            if !whole::open(key, n, AD_DELIVER, body, &tag) {
                return Err(Error::CellAuth);
            }
            Peeled::Deliver
        };
        self.fwd.advance();
        if verdict == Peeled::Forward {
            payload.copy_within(TAG_LEN.., 0);
            payload[BODY_LEN..].fill(0);
        }
        Ok(verdict)
    }

    /// Originate a backward cell: `body` is a relay message plaintext of at
    /// most [`BACKWARD_CAPACITY`] bytes (zero padded).
    pub fn originate_backward(&mut self, body: &[u8]) -> Result<Box<[u8; PAYLOAD_LEN]>, Error> {
        if body.len() > BODY_LEN {
            return Err(Error::TooLarge {
                what: "backward body",
                len: body.len(),
                max: BODY_LEN,
            });
        }
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        payload[TAG_LEN..TAG_LEN + body.len()].copy_from_slice(body);
        self.originate_backward_in_place(&mut payload)?;
        Ok(payload)
    }

    /// Originate a backward cell in place: `payload[16..]` holds the
    /// plaintext body. Returns this hop's tag (also written to `payload[..16]`).
    pub fn originate_backward_in_place(
        &mut self,
        payload: &mut [u8; PAYLOAD_LEN],
    ) -> Result<[u8; TAG_LEN], Error> {
        let (key, n) = self.back.current()?;
        let tag = whole::seal(key, n, &[], &mut payload[TAG_LEN..]);
        payload[..TAG_LEN].copy_from_slice(&tag);
        self.back.advance();
        Ok(tag)
    }

    /// Add this hop's layer to a backward cell from the next hop, in place:
    /// its keystream over the whole payload, tag field included.
    pub fn wrap_backward(&mut self, payload: &mut [u8; PAYLOAD_LEN]) -> Result<(), Error> {
        let (key, n) = self.back.current()?;
        keystream(key, n, &mut payload[..]);
        self.back.advance();
        Ok(())
    }
}

/// The client's layers of one circuit, hop 0 (the guard) first.
///
/// The last hop may be *joined*: an end-to-end hop with a service (or,
/// at the service, with the client) behind a rendezvous point. Cells to it
/// are sealed like cells to any hop; cells from it come the same way (the
/// other end sealed them for delivery through its own hops, and the
/// rendezvous point passed them on), so its layer opens with the
/// "deliver" associated data, not as a backward cell.
#[derive(Default)]
pub struct ClientLayers {
    hops: Vec<(Direction, Direction)>,
    bindings: Vec<[u8; 32]>,
    joined: bool,
}

impl ClientLayers {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.hops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.hops.is_empty()
    }
    /// Add the end-to-end hop behind a rendezvous point (see the type's
    /// docs); `keys.forward` is what this end seals with.
    pub fn push_joined(&mut self, keys: &HopKeys) -> Result<(), Error> {
        if self.joined {
            return Err(Error::malformed("circuit", "already joined"));
        }
        self.push(keys)?;
        self.joined = true;
        Ok(())
    }

    /// Is the last hop the end-to-end hop of a joined circuit?
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Hop `hop`'s [`HopKeys::binding`].
    pub fn binding(&self, hop: usize) -> Option<&[u8; 32]> {
        self.bindings.get(hop)
    }

    pub fn push(&mut self, keys: &HopKeys) -> Result<(), Error> {
        if self.joined {
            return Err(Error::malformed("circuit", "no hop after a joined one"));
        }
        if self.hops.len() >= MAX_HOPS {
            return Err(Error::TooLarge {
                what: "circuit",
                len: self.hops.len() + 1,
                max: MAX_HOPS,
            });
        }
        self.hops.push((
            Direction::with_keystream(&keys.forward),
            Direction::new(&keys.backward),
        ));
        self.bindings.push(keys.binding());
        Ok(())
    }
    /// Build the payload of a forward cell for hop `target` (0-based).
    /// `msg` is at most [`forward_capacity`]`(target)` bytes; it is zero padded.
    pub fn encrypt_forward(
        &mut self,
        target: usize,
        msg: &[u8],
    ) -> Result<Box<[u8; PAYLOAD_LEN]>, Error> {
        let cap = forward_capacity(target.min(MAX_HOPS));
        if msg.len() > cap {
            return Err(Error::TooLarge {
                what: "forward message",
                len: msg.len(),
                max: cap,
            });
        }
        let mut payload = Box::new([0u8; PAYLOAD_LEN]);
        payload[TAG_LEN..TAG_LEN + msg.len()].copy_from_slice(msg);
        self.encrypt_forward_in_place(target, &mut payload)?;
        Ok(payload)
    }

    /// Like [`ClientLayers::encrypt_forward`], in place: `payload[16..]`
    /// holds the message for hop `target`, zero padded to
    /// [`forward_capacity`]`(target)` bytes (what follows is overwritten).
    /// Returns the tag that hop `target` finds on the cell (the tag a circuit
    /// SENDME from that hop carries).
    pub fn encrypt_forward_in_place(
        &mut self,
        target: usize,
        payload: &mut [u8; PAYLOAD_LEN],
    ) -> Result<[u8; TAG_LEN], Error> {
        if target >= self.hops.len() {
            return Err(Error::malformed(
                "forward cell",
                "target beyond the circuit",
            ));
        }
        // The filler: what the zero blocks appended by hops 0..target look like
        // in the body hop `target` receives (its last 16*target bytes). Hop
        // `j` decrypts the 16*j filler bytes it receives with its keystream's
        // last 16*j bytes, then appends a zero block.
        let mut filler = [0u8; TAG_LEN * MAX_HOPS];
        let mut flen = 0;
        for (fwd, _) in &self.hops[..target] {
            let (key, n) = fwd.current()?;
            keystream_at(key, n, BODY_LEN - flen, &mut filler[..flen]);
            flen += TAG_LEN;
        }
        // Innermost layer: the message, then the bytes that encrypt to the
        // filler; sealed for delivery at `target`.
        let split = BODY_LEN - flen;
        let (key, n) = self.hops[target].0.current()?;
        let (tag_field, body) = payload.split_at_mut(TAG_LEN);
        body[split..].copy_from_slice(&filler[..flen]);
        filler.zeroize();
        keystream_at(key, n, split, &mut body[split..]);
        let inner = whole::seal(key, n, AD_DELIVER, body);
        // Each hop before it: its tag and the body minus the tail the hop
        // appends again, sealed for passing on.
        let mut tag = inner;
        for j in (0..target).rev() {
            body.copy_within(..BODY_LEN - TAG_LEN, TAG_LEN);
            body[..TAG_LEN].copy_from_slice(&tag);
            let (key, n) = self.hops[j].0.current()?;
            tag = whole::seal(key, n, AD_FORWARD, body);
        }
        for (fwd, _) in &mut self.hops[..=target] {
            fwd.advance();
        }
        tag_field.copy_from_slice(&tag);
        Ok(inner)
    }

    /// Remove the layers of a backward cell in place. Returns the hop that
    /// sent it; its plaintext is then `payload[16..]`.
    pub fn decrypt_backward(&mut self, payload: &mut [u8; PAYLOAD_LEN]) -> Result<usize, Error> {
        self.decrypt_backward_tagged(payload).map(|(j, _)| j)
    }

    /// Like [`ClientLayers::decrypt_backward`]; also returns the tag the
    /// sending hop's own layer put on the cell (the tag a circuit SENDME for
    /// this cell carries).
    pub fn decrypt_backward_tagged(
        &mut self,
        payload: &mut [u8; PAYLOAD_LEN],
    ) -> Result<(usize, [u8; TAG_LEN]), Error> {
        let Some(last) = self.hops.len().checked_sub(1) else {
            return Err(Error::CellAuth);
        };
        let orig = *payload;
        // Most cells come from the last hop: remove the layers of the hops
        // before it, then open its message in one pass.
        for (_, back) in &self.hops[..last] {
            let (key, n) = back.current()?;
            keystream(key, n, &mut payload[..]);
        }
        let (key, n) = self.hops[last].1.current()?;
        let (tag, body) = payload.split_at_mut(TAG_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| Error::Truncated)?;
        let ad = if self.joined { AD_DELIVER } else { &[] };
        if whole::open(key, n, ad, body, &tag) {
            for (_, back) in &mut self.hops {
                back.advance();
            }
            return Ok((last, tag));
        }
        // Otherwise: hop by hop, is it the message of hop `j`?
        *payload = orig;
        for j in 0..last {
            let (key, n) = self.hops[j].1.current()?;
            let mut body = [0u8; BODY_LEN];
            body.copy_from_slice(&payload[TAG_LEN..]);
            let mut tag = [0u8; TAG_LEN];
            tag.copy_from_slice(&payload[..TAG_LEN]);
            if whole::open(key, n, &[], &mut body, &tag) {
                payload[TAG_LEN..].copy_from_slice(&body);
                for (_, back) in &mut self.hops[..=j] {
                    back.advance();
                }
                return Ok((j, tag));
            }
            keystream(key, n, &mut payload[..]);
        }
        Err(Error::CellAuth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(i: u8) -> HopKeys {
        HopKeys {
            forward: [i; 32],
            backward: [i ^ 0x80; 32],
        }
    }

    fn circuit(n: u8) -> (ClientLayers, Vec<RelayLayer>) {
        let mut c = ClientLayers::new();
        let mut relays = vec![];
        for i in 0..n {
            c.push(&keys(i + 1)).unwrap();
            relays.push(RelayLayer::new(&keys(i + 1)));
        }
        (c, relays)
    }

    /// Carry a forward payload through the relays; returns the delivering hop.
    fn carry_forward(relays: &mut [RelayLayer], p: &mut [u8; PAYLOAD_LEN]) -> Result<usize, Error> {
        let n = relays.len();
        for (i, r) in relays.iter_mut().enumerate() {
            if r.peel_forward(p, i + 1 < n)? == Peeled::Deliver {
                return Ok(i);
            }
        }
        Err(Error::CellAuth)
    }

    #[test]
    fn three_hop_roundtrip_every_target() {
        let (mut c, mut relays) = circuit(3);
        for round in 0..5u8 {
            for target in 0..3 {
                let msg: Vec<u8> = (0..forward_capacity(target))
                    .map(|i| i as u8 ^ round)
                    .collect();
                let mut p = c.encrypt_forward(target, &msg).unwrap();
                assert_eq!(
                    carry_forward(&mut relays[..=target], &mut p).unwrap(),
                    target
                );
                assert_eq!(&p[TAG_LEN..TAG_LEN + msg.len()], &msg[..]);
                // and back from that hop
                let back: Vec<u8> = (0..BACKWARD_CAPACITY)
                    .map(|i| (i as u8).wrapping_mul(3) ^ round)
                    .collect();
                let mut p = relays[target].originate_backward(&back).unwrap();
                for r in relays[..target].iter_mut().rev() {
                    r.wrap_backward(&mut p).unwrap();
                }
                assert_eq!(c.decrypt_backward(&mut p).unwrap(), target);
                assert_eq!(&p[TAG_LEN..], &back[..]);
            }
        }
    }

    /// Carry a cell sealed for the far end of a joined circuit: through
    /// the sender's relays (the last is the rendezvous point, which passes
    /// it on), then back down the receiver's relays.
    fn across_join(
        from: &mut [RelayLayer],
        to: &mut [RelayLayer],
        p: &mut [u8; PAYLOAD_LEN],
    ) -> Result<(), Error> {
        for r in from.iter_mut() {
            assert_eq!(r.peel_forward(p, true)?, Peeled::Forward);
        }
        for r in to.iter_mut().rev() {
            r.wrap_backward(p)?;
        }
        Ok(())
    }

    #[test]
    fn a_joined_hop_reaches_the_far_end_both_ways() {
        let (mut client, mut client_relays) = circuit(3);
        let mut service = ClientLayers::new();
        let mut service_relays = vec![];
        for i in 10..13 {
            service.push(&keys(i)).unwrap();
            service_relays.push(RelayLayer::new(&keys(i)));
        }
        let e2e = keys(42);
        client.push_joined(&e2e).unwrap();
        service.push_joined(&e2e.reversed()).unwrap();
        assert!(client.push(&keys(1)).is_err());
        assert_eq!(client.binding(3), Some(&e2e.binding()));
        for round in 0..4u8 {
            let msg: Vec<u8> = (0..forward_capacity(3)).map(|i| i as u8 ^ round).collect();
            let mut p = client.encrypt_forward(3, &msg).unwrap();
            across_join(&mut client_relays, &mut service_relays, &mut p).unwrap();
            assert_eq!(service.decrypt_backward(&mut p).unwrap(), 3);
            assert_eq!(&p[TAG_LEN..TAG_LEN + msg.len()], &msg[..]);

            let mut p = service.encrypt_forward(3, &msg[1..]).unwrap();
            across_join(&mut service_relays, &mut client_relays, &mut p).unwrap();
            assert_eq!(client.decrypt_backward(&mut p).unwrap(), 3);
            assert_eq!(&p[TAG_LEN..TAG_LEN + msg.len() - 1], &msg[1..]);
        }
        // The rendezvous point can still speak to the client (as a hop in
        // the middle of its circuit).
        let mut p = client_relays[2].originate_backward(b"drop").unwrap();
        client_relays[1].wrap_backward(&mut p).unwrap();
        client_relays[0].wrap_backward(&mut p).unwrap();
        assert_eq!(client.decrypt_backward(&mut p).unwrap(), 2);
        // A byte changed anywhere on the way is caught at the far end.
        for at in [0, 17, PAYLOAD_LEN - 1] {
            let mut p = client.encrypt_forward(3, b"x").unwrap();
            for r in client_relays.iter_mut() {
                r.peel_forward(&mut p, true).unwrap();
            }
            p[at] ^= 1;
            for r in service_relays.iter_mut().rev() {
                r.wrap_backward(&mut p).unwrap();
            }
            assert!(service.decrypt_backward(&mut p).is_err());
            // (Counters now differ: start a fresh pair for the next byte.)
            let (c, cr) = circuit(3);
            (client, client_relays) = (c, cr);
            client.push_joined(&e2e).unwrap();
            service = ClientLayers::new();
            service_relays.clear();
            for i in 10..13 {
                service.push(&keys(i)).unwrap();
                service_relays.push(RelayLayer::new(&keys(i)));
            }
            service.push_joined(&e2e.reversed()).unwrap();
        }
    }

    #[test]
    fn eight_hops() {
        let (mut c, mut relays) = circuit(8);
        let msg = vec![0x5a; forward_capacity(7)];
        let mut p = c.encrypt_forward(7, &msg).unwrap();
        assert_eq!(carry_forward(&mut relays, &mut p).unwrap(), 7);
        assert_eq!(&p[TAG_LEN..TAG_LEN + msg.len()], &msg[..]);
    }

    #[test]
    fn every_bit_flip_is_caught_at_the_next_hop() {
        for bit in 0..PAYLOAD_LEN * 8 {
            let (mut c, mut relays) = circuit(3);
            let mut p = c.encrypt_forward(2, b"hello").unwrap();
            p[bit / 8] ^= 1 << (bit % 8);
            assert!(
                matches!(relays[0].peel_forward(&mut p, true), Err(Error::CellAuth)),
                "bit {bit}"
            );
        }
        // A flip between hop 1 and hop 2 is caught by hop 2.
        let (mut c, mut relays) = circuit(3);
        let mut p = c.encrypt_forward(2, b"hello").unwrap();
        relays[0].peel_forward(&mut p, true).unwrap();
        p[300] ^= 4;
        assert!(relays[1].peel_forward(&mut p, true).is_err());
    }

    #[test]
    fn backward_bit_flips_are_caught_by_the_client() {
        for bit in (0..PAYLOAD_LEN * 8).step_by(7) {
            let (mut c, mut relays) = circuit(3);
            let mut p = relays[2].originate_backward(b"data").unwrap();
            relays[1].wrap_backward(&mut p).unwrap();
            p[bit / 8] ^= 1 << (bit % 8);
            relays[0].wrap_backward(&mut p).unwrap();
            assert!(c.decrypt_backward(&mut p).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn backward_cells_share_no_bytes_across_hops() {
        // Colluding relays cannot match a cell by a field that stays the same.
        let (_, mut relays) = circuit(3);
        let at_middle = relays[2].originate_backward(b"data").unwrap();
        let mut at_guard = at_middle.clone();
        relays[1].wrap_backward(&mut at_guard).unwrap();
        let same = at_middle
            .iter()
            .zip(at_guard.iter())
            .filter(|(a, b)| a == b)
            .count();
        assert!(same < 16, "{same} bytes unchanged");
        assert_ne!(at_middle[..TAG_LEN], at_guard[..TAG_LEN]);
    }

    #[test]
    fn replay_reorder_and_drop_are_caught() {
        // Replay.
        let (mut c, mut relays) = circuit(3);
        let p1 = c.encrypt_forward(2, b"one").unwrap();
        let mut a = p1.clone();
        carry_forward(&mut relays, &mut a).unwrap();
        let mut again = p1.clone();
        assert!(relays[0].peel_forward(&mut again, true).is_err());
        // Reorder.
        let (mut c, mut relays) = circuit(3);
        let p1 = c.encrypt_forward(2, b"one").unwrap();
        let mut p2 = c.encrypt_forward(2, b"two").unwrap();
        assert!(relays[0].peel_forward(&mut p2, true).is_err());
        let _ = p1;
        // Drop between the middle and the exit: the next cell fails at the exit.
        let (mut c, mut relays) = circuit(3);
        let mut p1 = c.encrypt_forward(2, b"one").unwrap();
        relays[0].peel_forward(&mut p1, true).unwrap();
        relays[1].peel_forward(&mut p1, true).unwrap(); // dropped before hop 2
        let mut p2 = c.encrypt_forward(2, b"two").unwrap();
        relays[0].peel_forward(&mut p2, true).unwrap();
        relays[1].peel_forward(&mut p2, true).unwrap();
        assert!(relays[2].peel_forward(&mut p2, false).is_err());
        // Backward drop: the client rejects the following cell.
        let (mut c, mut relays) = circuit(2);
        let _dropped = relays[1].originate_backward(b"x").unwrap();
        let mut p = relays[1].originate_backward(b"y").unwrap();
        relays[0].wrap_backward(&mut p).unwrap();
        assert!(c.decrypt_backward(&mut p).is_err());
    }

    #[test]
    fn middle_cannot_fake_a_cell_from_the_exit() {
        let (mut c, mut relays) = circuit(3);
        // The middle originates a cell as itself: accepted as hop 1, not hop 2.
        let mut p = relays[1].originate_backward(b"me").unwrap();
        relays[0].wrap_backward(&mut p).unwrap();
        assert_eq!(c.decrypt_backward(&mut p).unwrap(), 1);
    }
}
