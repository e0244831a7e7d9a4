//! Which circuit a channel sends from next.
//!
//! Each circuit's outgoing cells wait in a queue of their own, and the
//! channel takes the next cell from the circuit that has sent the least of
//! late: a moving average of its cells sent that halves every
//! [`HALF_LIFE`] (the circuit priority of Tang and Goldberg, "An Improved
//! Algorithm for Tor Circuit Scheduling", which Tor runs as
//! `CircuitPriorityHalflife`). A circuit fetching a small page is not
//! queued behind circuits carrying bulk downloads through the same link,
//! and bulk circuits sharing a link converge to equal shares.
//!
//! ```
//! # use allium_link::sched::Sched;
//! # use allium_proto::cell::{Cell, CellCmd, CircId};
//! # use std::time::Instant;
//! let now = Instant::now();
//! let mut s: Sched<()> = Sched::new(now);
//! let cell = |c| Cell::new(CircId(c), CellCmd::RELAY, &[]).unwrap();
//! s.push((), (0..100).map(|_| cell(1)).collect());
//! s.pop(now, 10, &mut Vec::new(), |_, _| {}); // circuit 1 has sent 10
//! s.push((), vec![cell(2)]);
//! let mut out = Vec::new();
//! s.pop(now, 1, &mut out, |_, _| {});
//! assert_eq!(out[0].circ_id, CircId(2)); // the quiet circuit goes first
//! ```
//!
//! Pure: the caller passes the time, and `R` is whatever the caller gives
//! back room to when a batch of cells has been taken. Cells keep their
//! order within a circuit.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use allium_proto::cell::{Cell, CircId};

/// The time over which a circuit's count of cells sent halves (Tor's
/// default `CircuitPriorityHalflife`).
pub const HALF_LIFE: Duration = Duration::from_secs(30);
/// Counts are kept relative to a base time that moves forward once the
/// weight of a new cell reaches 2^this.
const RESCALE_AT: f64 = 32.0;

/// A circuit's priority: its decayed count of cells sent, scaled by the
/// base time (lower goes first).
#[derive(Clone, Copy, PartialEq)]
struct Score(f64);
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

struct CircQueue<R> {
    cells: VecDeque<Cell>,
    /// The batches the cells came in, oldest first: how many cells each
    /// had and whom to give its room back to.
    batches: VecDeque<(usize, R)>,
    /// Cells of the oldest batch already taken.
    taken: usize,
    /// Cells sent, decayed, in units of the weight of a cell sent at the
    /// base time.
    score: f64,
    /// In the ready heap (it has cells).
    ready: bool,
}

/// The cells waiting for one channel, by circuit. See the module doc.
pub struct Sched<R> {
    circs: HashMap<CircId, CircQueue<R>>,
    /// Circuits with cells, least sent first. Each is in it once, with the
    /// score it had when it went in, which is still its score: only taking
    /// its cells changes it, and that takes it out first.
    ready: BinaryHeap<Reverse<(Score, CircId)>>,
    base: Instant,
    queued: usize,
}

impl<R> Sched<R> {
    pub fn new(now: Instant) -> Self {
        Sched {
            circs: HashMap::new(),
            ready: BinaryHeap::new(),
            base: now,
            queued: 0,
        }
    }

    /// Cells waiting, over all circuits.
    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Queue a batch of cells of one circuit (that of the first cell);
    /// `room` is handed back with the batch's size once all are taken.
    pub fn push(&mut self, room: R, cells: Vec<Cell>) {
        let Some(first) = cells.first() else { return };
        let id = first.circ_id;
        let n = cells.len();
        let q = self.circs.entry(id).or_insert_with(|| CircQueue {
            cells: VecDeque::new(),
            batches: VecDeque::new(),
            taken: 0,
            score: 0.0,
            ready: false,
        });
        q.cells.extend(cells);
        q.batches.push_back((n, room));
        self.queued += n;
        if !q.ready {
            q.ready = true;
            self.ready.push(Reverse((Score(q.score), id)));
        }
    }

    /// Move up to `max` cells to `out`, each from the circuit that has sent
    /// least; `release(room, n)` is called for each batch wholly taken.
    pub fn pop(
        &mut self,
        now: Instant,
        max: usize,
        out: &mut Vec<Cell>,
        release: impl FnMut(R, usize),
    ) {
        self.pop_quiet(now, max, f64::INFINITY, out, release);
    }

    /// The same, from circuits that have sent fewer than `quiet` cells of
    /// late (decayed as their priority is) only.
    pub fn pop_quiet(
        &mut self,
        now: Instant,
        max: usize,
        quiet: f64,
        out: &mut Vec<Cell>,
        mut release: impl FnMut(R, usize),
    ) {
        let weight = self.weight(now);
        let limit = quiet * weight;
        let mut left = max;
        while left > 0 {
            let Some(&Reverse((s, id))) = self.ready.peek() else {
                break;
            };
            if s.0 >= limit {
                break;
            }
            self.ready.pop();
            // Entries of removed circuits are stale: skip them.
            let Some(q) = self.circs.get_mut(&id) else {
                continue;
            };
            if !q.ready || q.score != s.0 {
                continue;
            }
            // Keep taking from this circuit while it is still the least sent
            // (and under the limit).
            let next = self
                .ready
                .peek()
                .map_or(limit, |Reverse((s, _))| s.0.min(limit));
            while left > 0 {
                let Some(c) = q.cells.pop_front() else { break };
                out.push(c);
                left -= 1;
                self.queued -= 1;
                q.score += weight;
                q.taken += 1;
                if let Some((n, _)) = q.batches.front()
                    && q.taken == *n
                    && let Some((n, room)) = q.batches.pop_front()
                {
                    q.taken = 0;
                    release(room, n);
                }
                if q.score > next {
                    break;
                }
            }
            if q.cells.is_empty() {
                q.ready = false;
            } else {
                self.ready.push(Reverse((Score(q.score), id)));
            }
        }
    }

    /// Whether the circuit that goes next has sent fewer than `quiet` cells
    /// of late.
    pub fn quiet_waiting(&mut self, now: Instant, quiet: f64) -> bool {
        if self.queued == 0 {
            return false;
        }
        let limit = quiet * self.weight(now);
        self.ready.peek().is_some_and(|Reverse((s, _))| s.0 < limit)
    }

    /// Forget a circuit: its waiting cells are dropped. Returns how many,
    /// after `release` has been called for each of its batches.
    pub fn remove(&mut self, id: CircId, mut release: impl FnMut(R, usize)) -> usize {
        let Some(q) = self.circs.remove(&id) else {
            return 0;
        };
        // Its heap entry, if any, is skipped when it comes up.
        let n = q.cells.len();
        self.queued -= n;
        let mut taken = q.taken;
        for (size, room) in q.batches {
            release(room, size - taken);
            taken = 0;
        }
        n
    }

    /// Drop every queue (the channel has ended).
    pub fn clear(&mut self, mut release: impl FnMut(R, usize)) -> usize {
        let ids: Vec<CircId> = self.circs.keys().copied().collect();
        ids.into_iter()
            .map(|id| self.remove(id, &mut release))
            .sum()
    }

    pub fn shrink_to_fit(&mut self) {
        self.circs.shrink_to_fit();
        self.ready.shrink_to_fit();
        for q in self.circs.values_mut() {
            q.cells.shrink_to_fit();
            q.batches.shrink_to_fit();
        }
    }

    /// The weight of a cell sent now, moving the base time forward (and
    /// every count with it) when it has grown large.
    fn weight(&mut self, now: Instant) -> f64 {
        let halvings =
            now.saturating_duration_since(self.base).as_secs_f64() / HALF_LIFE.as_secs_f64();
        if halvings < RESCALE_AT {
            return halvings.exp2();
        }
        let scale = (-halvings).exp2();
        self.base = now;
        self.ready.clear();
        for (id, q) in &mut self.circs {
            q.score *= scale;
            if q.ready {
                self.ready.push(Reverse((Score(q.score), *id)));
            }
        }
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use allium_proto::cell::CellCmd;

    fn cells(id: u32, n: usize) -> Vec<Cell> {
        (0..n)
            .map(|i| {
                let mut c = Cell::new(CircId(id), CellCmd::RELAY, &[]).unwrap();
                c.payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
                c
            })
            .collect()
    }

    fn seq(c: &Cell) -> u64 {
        u64::from_be_bytes(c.payload[..8].try_into().unwrap())
    }

    #[test]
    fn only_quiet_circuits_are_taken_below_a_limit() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        s.push(1, cells(1, 500));
        let mut out = Vec::new();
        s.pop(t, 300, &mut out, |_, _| {});
        assert!(!s.quiet_waiting(t, 256.0), "circuit 1 has sent 300");
        s.pop_quiet(t, 10, 256.0, &mut out, |_, _| {});
        assert_eq!(out.len(), 300, "nothing taken from it");
        // A new circuit is quiet until it has sent as many.
        s.push(2, cells(2, 400));
        assert!(s.quiet_waiting(t, 256.0));
        out.clear();
        s.pop_quiet(t, 1000, 256.0, &mut out, |_, _| {});
        assert!(out.iter().all(|c| c.circ_id == CircId(2)));
        assert!((256..=257).contains(&out.len()), "{}", out.len());
        assert!(!s.quiet_waiting(t, 256.0));
        // Counts halve with time: after one half-life both are quiet again
        // (about 128 and 150 sent), each until it has sent 256 of late.
        let later = t + HALF_LIFE;
        assert!(s.quiet_waiting(later, 256.0));
        out.clear();
        s.pop_quiet(later, 1000, 256.0, &mut out, |_, _| {});
        assert_eq!(out[0].circ_id, CircId(2), "the one that sent less first");
        let n = |id| out.iter().filter(|c| c.circ_id == CircId(id)).count();
        assert!(
            (127..=129).contains(&n(2)) && (105..=107).contains(&n(1)),
            "{} {}",
            n(1),
            n(2)
        );
        assert!(!s.quiet_waiting(later, 256.0));
        // Without a limit every cell comes out.
        out.clear();
        s.pop(later, 1000, &mut out, |_, _| {});
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_quiet_circuit_goes_ahead_of_a_busy_one() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        s.push(1, cells(1, 500));
        let mut out = Vec::new();
        s.pop(t, 100, &mut out, |_, _| {});
        assert!(out.iter().all(|c| c.circ_id == CircId(1)));
        s.push(2, cells(2, 3));
        out.clear();
        s.pop(t, 4, &mut out, |_, _| {});
        let ids: Vec<u32> = out.iter().map(|c| c.circ_id.0).collect();
        assert_eq!(ids, [2, 2, 2, 1]);
        assert_eq!(s.len(), 500 - 101);
    }

    #[test]
    fn busy_circuits_share_equally_and_keep_their_order() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        for id in 1..=4 {
            s.push(id, cells(id, 1000));
        }
        let mut out = Vec::new();
        s.pop(t, 2000, &mut out, |_, _| {});
        let mut per = HashMap::new();
        for c in &out {
            let v = per.entry(c.circ_id.0).or_insert(Vec::new());
            v.push(seq(c));
        }
        for id in 1..=4 {
            let got = &per[&id];
            assert!((499..=501).contains(&got.len()), "{id}: {}", got.len());
            assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "order of {id}");
        }
    }

    #[test]
    fn history_decays_with_the_half_life() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        // Circuit 1 sent 1000 cells long ago, circuit 2 sent 100 just now.
        s.push(1, cells(1, 1000));
        s.pop(t, 1000, &mut Vec::new(), |_, _| {});
        let later = t + HALF_LIFE * 5;
        s.push(2, cells(2, 100));
        s.pop(later, 100, &mut Vec::new(), |_, _| {});
        // 1000 / 32 < 100: circuit 1 now counts as the quieter.
        s.push(1, cells(1, 1));
        s.push(2, cells(2, 1));
        let mut out = Vec::new();
        s.pop(later, 1, &mut out, |_, _| {});
        assert_eq!(out[0].circ_id, CircId(1));
    }

    #[test]
    fn rescaling_keeps_the_order() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        s.push(1, cells(1, 10));
        s.pop(t, 10, &mut Vec::new(), |_, _| {});
        s.push(2, cells(2, 5));
        s.pop(t, 5, &mut Vec::new(), |_, _| {});
        // Far past the rescale point: both counts shrink alike.
        let later = t + HALF_LIFE * 40;
        s.push(1, cells(1, 1));
        s.push(2, cells(2, 1));
        let mut out = Vec::new();
        s.pop(later, 1, &mut out, |_, _| {});
        assert_eq!(out[0].circ_id, CircId(2));
        assert_eq!(s.base, later);
    }

    #[test]
    fn room_comes_back_per_batch_and_on_removal() {
        let t = Instant::now();
        let mut s = Sched::new(t);
        s.push("a", cells(1, 3));
        s.push("b", cells(1, 4));
        let mut back = Vec::new();
        let mut out = Vec::new();
        s.pop(t, 3, &mut out, |r, n| back.push((r, n)));
        assert_eq!(back, [("a", 3)]);
        s.push("c", cells(2, 2));
        s.pop(t, 1, &mut out, |r, n| back.push((r, n)));
        assert_eq!(out.last().unwrap().circ_id, CircId(2));
        assert_eq!(back.len(), 1);
        assert_eq!(s.remove(CircId(1), |r, n| back.push((r, n))), 4);
        assert_eq!(back, [("a", 3), ("b", 4)]);
        assert_eq!(s.len(), 1);
        s.pop(t, 10, &mut out, |r, n| back.push((r, n)));
        assert_eq!(back, [("a", 3), ("b", 4), ("c", 2)]);
        assert!(s.is_empty());
        assert_eq!(s.remove(CircId(9), |_, _| panic!()), 0);
        // A circuit queued again after removal is served once, in order.
        s.push("d", cells(2, 2));
        out.clear();
        s.pop(t, 10, &mut out, |r, n| back.push((r, n)));
        assert_eq!(out.iter().map(seq).collect::<Vec<_>>(), [0, 1]);
    }
}
