//! Congestion control for the sending side of a circuit: TCP Vegas on the
//! SENDME clock, in the spirit of Tor's proposal 324.
//!
//! A fixed window caps a circuit at `window / RTT`: 1000 cells per round
//! trip is 2.6 MB/s at 200 ms, whatever the path could carry. Vegas sizes
//! the window from the path instead. Each circuit SENDME (one per
//! [`Params::inc`] cells) gives a round-trip sample; the lowest sample seen
//! is the path's own delay, and the difference between the window and
//! what the path holds at that delay is the queue the circuit keeps at
//! its bottleneck:
//!
//! ```text
//! bdp   = delivered / elapsed * min_rtt    cells the path holds
//! queue = cwnd - bdp                       cells waiting in queues
//! ```
//!
//! `delivered / elapsed` is the rate at which SENDMEs acknowledged cells
//! over the last round (a window's worth of SENDMEs): while the window is
//! below what the path holds it is `cwnd / rtt`, which makes this Vegas'
//! own `cwnd * min_rtt / rtt`; past it, it is the bottleneck's rate, which
//! the round trip alone tells only late (the samples of a round were sent
//! with the window of the round before).
//!
//! The window starts at 1000 cells. In slow start it grows by `2 * inc`
//! per SENDME (tripling each round trip: a 300 ms path that holds 30,000
//! cells is full in four round trips rather than five, and slow start ends
//! on the queue it sees, not on a guess) until the queue, judged at each
//! SENDME from an average of the last round trips (`cwnd - cwnd * min_rtt
//! / avg_rtt`), passes `gamma` or a quarter of the window, whichever is
//! more (then the window is set to `bdp + gamma`, `bdp` being no less than
//! `cwnd * min_rtt / avg_rtt`), or the window reaches `ss_cwnd_max`.
//! (Sending two cells for each one acknowledged, slow start queues the
//! tail of each burst at the bottleneck even while the window is below
//! what the path holds, and that estimate grows with the square of the
//! window: with `gamma` alone it would end slow start at `sqrt(2 * gamma *
//! bdp)`, a tenth of a 30,000-cell path.) It only grows while the circuit
//! fills it: a window the sender does not use says nothing about the path.
//! After that, once per round (a window of acknowledged cells), with the
//! thresholds `alpha`, `beta` and `delta` raised to a 16th, an 8th and a
//! quarter of the window when that is more: it grows by a step of at most
//! 256 cells (a quarter of a small window, `inc` at least) while the queue
//! is under `alpha`, shrinks by `inc` or a 64th of the window over `beta`,
//! and drops to `bdp + alpha` less that over `delta`. Steps up of the same
//! number of cells for every circuit are what makes circuits that share a
//! bottleneck converge to equal windows (as in AIMD) while they grow and
//! shrink; while the queue stays between `alpha` and `beta` nothing moves,
//! and circuits can rest there at unequal shares (doc/performance.md). A
//! circuit so keeps a few SENDMEs' worth of cells queued, or a few percent
//! of its round trip for a large window: enough to fill the path, not
//! enough to delay other circuits much. (Thresholds of a fixed number of
//! cells, as Tor's, read a millisecond of jitter in a 100 ms round trip as
//! hundreds of queued cells once the window holds tens of thousands, and
//! steps of `inc` take minutes to move such a window.) The window stays
//! within `[cwnd_min, cwnd_max]`; `cwnd_max` is what a relay's memory cap
//! allows one circuit.
//!
//! `min_rtt` is never forgotten here: a path whose own delay grows would
//! read as a queue and keep a smaller window (Tor's proposal 324 has the
//! same limit and resets on idle); the circuit that drives this will have
//! to decide when a sample is too old.
//!
//! Pure: the caller measures each round trip (from sending the cell a
//! SENDME acknowledges to receiving that SENDME) and passes it in.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use allium_proto::congestion::{Params, Vegas};
//!
//! let mut cc = Vegas::new(Params::default());
//! let start = cc.cwnd();
//! // Round trips at the path's own delay, the window full: it grows.
//! let now = std::time::Instant::now();
//! for i in 0..8 {
//!     cc.on_sendme(now + Duration::from_millis(i), Duration::from_millis(100), true);
//! }
//! assert!(cc.cwnd() > start);
//! ```

use std::time::{Duration, Instant};

/// The controller's parameters, in cells. The defaults follow Tor's
/// proposal 324 for exits (SENDME every 31 cells, thresholds of 6, 8, 6 and
/// 10 SENDMEs' worth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Cells each SENDME acknowledges.
    pub inc: u32,
    /// The window a circuit starts with.
    pub cwnd_init: u32,
    /// The smallest window.
    pub cwnd_min: u32,
    /// The largest window: what one circuit may have in flight.
    pub cwnd_max: u32,
    /// Slow start ends here at the latest.
    pub ss_cwnd_max: u32,
    /// Queue thresholds (cells): grow under `alpha`, shrink over `beta`,
    /// leave slow start over `gamma`, cut back over `delta`.
    pub alpha: u32,
    pub beta: u32,
    pub gamma: u32,
    pub delta: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self::with_inc(u32::from(crate::flow::DEFAULT_INCREMENT))
    }
}

impl Params {
    /// The defaults for a SENDME every `inc` cells: the thresholds are
    /// counted in SENDMEs' worth of cells, and the window may reach
    /// [`crate::flow::CWND_MAX`]; slow start ends on a queue, or at the
    /// latest there. The window starts at the
    /// [`crate::flow::FIXED_WINDOW`] every circuit had without congestion
    /// control (Tor's start at `4 * inc` costs a path of 300 ms two more
    /// round trips of slow start to carry 20 MiB), and never goes below
    /// `4 * inc`.
    pub fn with_inc(inc: u32) -> Self {
        Params {
            inc,
            cwnd_init: crate::flow::FIXED_WINDOW.max(4 * inc),
            cwnd_min: 4 * inc,
            cwnd_max: crate::flow::CWND_MAX,
            ss_cwnd_max: crate::flow::CWND_MAX,
            alpha: 6 * inc,
            beta: 8 * inc,
            gamma: 6 * inc,
            delta: 10 * inc,
        }
    }

    /// The same for a path through `relays` relays: the queue thresholds
    /// are for the three of a circuit to an exit, and each relay on a
    /// longer path keeps its own queue, so they grow in proportion (as
    /// Tor's are higher for onion services' six). The window's bounds do
    /// not change.
    pub fn for_relays(self, relays: u32) -> Self {
        let scale = |v: u32| v.saturating_mul(relays.max(3)) / 3;
        Params {
            alpha: scale(self.alpha),
            beta: scale(self.beta),
            gamma: scale(self.gamma),
            delta: scale(self.delta),
            ..self
        }
    }
}

/// One circuit's congestion window.
#[derive(Clone, Debug)]
pub struct Vegas {
    p: Params,
    cwnd: u32,
    slow_start: bool,
    min_rtt: Option<Duration>,
    ewma_rtt: Option<Duration>,
    /// The round under way (a window's worth of SENDMEs): when it began,
    /// the cells acknowledged in it, how many end it, and whether the
    /// window held the sender back in it.
    round_start: Option<Instant>,
    acked: u32,
    round_len: u32,
    round_full: bool,
    /// What the path held by the last round of slow start.
    last_bdp: Option<u64>,
}

/// After slow start, cells a round adds to a window with room to grow.
const GROWTH_STEP: u32 = 256;

/// In slow start, cells added to the window per cell acknowledged.
const SLOW_START_GAIN: u32 = 2;

/// Round trips longer than this are taken for a stalled clock, not the
/// path, and ignored.
const MAX_RTT: Duration = Duration::from_secs(60);

impl Params {
    /// The same, made consistent: `inc` at least 1, `cwnd_min <= cwnd_max`.
    fn sane(mut self) -> Self {
        self.inc = self.inc.max(1);
        self.cwnd_max = self.cwnd_max.max(1);
        self.cwnd_min = self.cwnd_min.clamp(1, self.cwnd_max);
        self
    }
}

impl Vegas {
    pub fn new(p: Params) -> Self {
        let p = p.sane();
        Vegas {
            cwnd: p.cwnd_init.clamp(p.cwnd_min, p.cwnd_max),
            p,
            slow_start: true,
            min_rtt: None,
            ewma_rtt: None,
            round_start: None,
            acked: 0,
            round_len: p.cwnd_init.clamp(p.cwnd_min, p.cwnd_max),
            round_full: false,
            last_bdp: None,
        }
    }

    /// Cells that may be in flight (sent, not yet acknowledged).
    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }

    pub fn in_slow_start(&self) -> bool {
        self.slow_start
    }

    /// The lowest round trip seen: the path's delay without queues.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// A SENDME arrived at `now`, `rtt` after the cell it acknowledges was
    /// sent; `cwnd_full` tells whether the window held the sender back
    /// since the last one (only then may it grow). A zero round trip, or
    /// one over a minute, is a clock's doing and is ignored.
    pub fn on_sendme(&mut self, now: Instant, rtt: Duration, cwnd_full: bool) {
        if rtt.is_zero() || rtt > MAX_RTT {
            return;
        }
        let p = self.p;
        let min = self.min_rtt.map_or(rtt, |m| m.min(rtt));
        self.min_rtt = Some(min);
        // In slow start, an average over two SENDMEs (the window changes
        // fast).
        let ewma = match self.ewma_rtt {
            None => rtt,
            Some(e) => Duration::from_secs_f64((2.0 * rtt.as_secs_f64() + e.as_secs_f64()) / 3.0),
        };
        self.ewma_rtt = Some(ewma);
        self.round_full |= cwnd_full;
        // The first SENDME starts the clock of the first round.
        let Some(start) = self.round_start else {
            self.round_start = Some(now);
            return;
        };
        self.acked = self.acked.saturating_add(p.inc);
        let cwnd = u64::from(self.cwnd);
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        // What the path holds by the round trips: the window at its own
        // delay over the average.
        let by_rtt = (cwnd as f64 * min.as_secs_f64() / ewma.as_secs_f64().max(1e-9)) as u64;
        // And by the rate at which SENDMEs acknowledged cells this round, at
        // its own delay: the bottleneck's rate, as the cells of a burst
        // leave it back to back. (SENDMEs that come bunched, as a hop that
        // holds them back and lets them go at once would send them, read
        // as a fast path: the window then grows by a step a round at most,
        // as on a fast path, and never past itself when slow start ends.)
        let bdp_now = if elapsed > 0.0 {
            (f64::from(self.acked) / elapsed * min.as_secs_f64()).round() as u64
        } else {
            by_rtt
        };
        let next = if self.slow_start {
            let queue = cwnd.saturating_sub(by_rtt);
            // The bursts of slow start (two cells out for each one
            // acknowledged) queue their own tails at the bottleneck: up to
            // a quarter of the window is read as theirs, not the path's.
            if queue > u64::from(p.gamma).max(cwnd / 4) {
                self.slow_start = false;
                // Past the path: what it delivered is its capacity, and
                // no less than the last round delivered (that round did not
                // fill it; a round only begun, with the gaps between the
                // bursts of slow start in it, reads low). At most twice the
                // window slow start reached: one more round of it, however
                // fast SENDMEs that came bunched make the path look.
                // And no less than the window holds at the round trip now:
                // circuits that fill a bottleneck together see the queue at
                // once, and the last to start would leave slow start with a
                // window cut to the share it had then, a small fraction of
                // what it will have, which steps up take long to regain.
                let bdp = bdp_now.max(self.last_bdp.unwrap_or(0)).max(by_rtt);
                self.end_round(now);
                (bdp + u64::from(p.gamma)).min(2 * cwnd)
            } else {
                let next = if cwnd_full {
                    cwnd + u64::from(SLOW_START_GAIN * p.inc)
                } else {
                    cwnd
                };
                if next >= u64::from(p.ss_cwnd_max) {
                    self.slow_start = false;
                    self.end_round(now);
                } else if self.acked >= self.round_len {
                    self.last_bdp = Some(bdp_now);
                    self.end_round(now);
                    self.round_len = next as u32;
                }
                next
            }
        } else if self.acked >= self.round_len {
            let full = self.round_full;
            let bdp = bdp_now;
            self.end_round(now);
            let queue = cwnd.saturating_sub(bdp);
            // Thresholds and steps grow with the window: a large window
            // reads a millisecond of jitter as hundreds of queued cells,
            // and moves by `inc` a round too slowly to follow its path.
            let (alpha, beta, delta) = (
                u64::from(p.alpha).max(cwnd / 16),
                u64::from(p.beta).max(cwnd / 8),
                u64::from(p.delta).max(cwnd / 4),
            );
            // Down by a share of the window, up by the same number of
            // cells for every circuit: circuits that share a bottleneck see
            // the same queue (as a share of their windows) and so move
            // together, and only steps of the same size up bring their
            // windows together (steps in proportion would keep whatever
            // ratio they started with).
            let down = u64::from(p.inc).max(cwnd / 64);
            // (On a small window, at most a quarter of it: a step is a
            // queue, and a circuit whose window is small beside the others'
            // must still catch up with them in a few rounds.)
            let up = u64::from(p.inc).max((cwnd / 4).min(u64::from(GROWTH_STEP)));
            if queue > delta {
                (bdp + alpha).saturating_sub(down)
            } else if queue > beta {
                cwnd.saturating_sub(down)
            } else if queue < alpha && full {
                cwnd + up
            } else {
                cwnd
            }
        } else {
            cwnd
        };
        self.cwnd = next.clamp(u64::from(p.cwnd_min), u64::from(p.cwnd_max)) as u32;
        if !self.slow_start && self.acked == 0 {
            self.round_len = self.cwnd;
        }
    }

    /// A new round begins at `now`.
    fn end_round(&mut self, now: Instant) {
        self.acked = 0;
        self.round_start = Some(now);
        self.round_full = false;
    }
}

#[cfg(test)]
mod thresholds {
    use super::Params;

    #[test]
    fn a_longer_path_keeps_proportionally_more_in_queues() {
        let p = Params::with_inc(31);
        assert_eq!(p.for_relays(3), p);
        assert_eq!(p.for_relays(0), p, "never below a circuit to an exit");
        let six = p.for_relays(6);
        assert_eq!(
            (six.alpha, six.beta, six.gamma, six.delta),
            (372, 496, 372, 620)
        );
        assert_eq!((six.cwnd_min, six.cwnd_max), (p.cwnd_min, p.cwnd_max));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A path with a bottleneck: cells leave the sender at once, wait in a
    /// FIFO served at `rate` cells per second, and every `inc`-th cell's
    /// SENDME reaches the sender `base` after it left the bottleneck (the
    /// path's delay without queues). The sender has cells to send without
    /// end, or at `app` cells per second. Simulated time, in seconds.
    struct Path {
        base: f64,
        rate: f64,
        app: Option<f64>,
        /// When the bottleneck is next free.
        free: f64,
        /// SENDMEs on their way: (arrival, sending time of the cell).
        acks: VecDeque<(f64, f64)>,
        sent: u64,
        inflight: u64,
        epoch: Instant,
    }

    /// What one run saw per round trip of the path's own delay.
    #[derive(Default)]
    struct Round {
        delivered: u64,
        max_queue_delay: f64,
        max_cwnd: u32,
    }

    impl Path {
        fn new(base: f64, rate: f64) -> Self {
            Path {
                base,
                rate,
                app: None,
                free: 0.0,
                acks: VecDeque::new(),
                sent: 0,
                inflight: 0,
                epoch: Instant::now(),
            }
        }

        /// Run `cc` on this path from `now` until `until` (seconds); what
        /// was seen in each round of `base`.
        fn run(&mut self, cc: &mut Vegas, now: &mut f64, until: f64) -> Vec<Round> {
            let inc = u64::from(cc.p.inc);
            let mut rounds: Vec<Round> = Vec::new();
            let start = *now;
            // Cells the application has handed over and not yet sent.
            let (mut ready, mut last) = (0.0f64, *now);
            let mut full = false;
            // Every loop advances the clock: bounded by time.
            while *now < until {
                if let Some(a) = self.app {
                    ready = (ready + a * (*now - last)).min(1e9);
                }
                last = *now;
                while self.inflight < u64::from(cc.cwnd()) && (self.app.is_none() || ready >= 1.0) {
                    let out = self.free.max(*now) + 1.0 / self.rate;
                    self.free = out;
                    self.sent += 1;
                    self.inflight += 1;
                    ready -= 1.0;
                    if self.sent.is_multiple_of(inc) {
                        self.acks.push_back((out + self.base, *now));
                    }
                }
                full |= self.inflight >= u64::from(cc.cwnd());
                let Some(&(at, sent_at)) = self.acks.front() else {
                    // Nothing in flight: wait for the application.
                    *now += self.app.map_or(self.base, |a| 1.0 / a);
                    continue;
                };
                if let Some(a) = self.app
                    && !full
                    && *now + 1.0 / a < at
                {
                    // More cells from the application before the SENDME.
                    *now += 1.0 / a;
                    continue;
                }
                self.acks.pop_front();
                *now = at;
                self.inflight -= inc;
                let rtt = at - sent_at;
                cc.on_sendme(
                    self.epoch + Duration::from_secs_f64(at),
                    Duration::from_secs_f64(rtt),
                    full,
                );
                full = false;
                let i = ((at - start) / self.base) as usize;
                if rounds.len() <= i {
                    rounds.resize_with(i + 1, Round::default);
                }
                let r = &mut rounds[i];
                r.delivered += inc;
                r.max_queue_delay = r.max_queue_delay.max(rtt - self.base);
                r.max_cwnd = r.max_cwnd.max(cc.cwnd());
            }
            rounds
        }
    }

    /// Delivered cells per second over `rounds`, as a share of `rate`.
    fn share(rounds: &[Round], base: f64, rate: f64) -> f64 {
        let cells: u64 = rounds.iter().map(|r| r.delivered).sum();
        cells as f64 / (rounds.len() as f64 * base) / rate
    }

    #[test]
    fn fills_the_path_within_25_round_trips_with_a_short_queue() {
        // 100 ms, 20,000 cells/s (10 MB/s): the path holds 2,000 cells,
        // twice the first window. Slow start ends short of it (the
        // burst it sends builds a queue), then the window grows by `inc`
        // a round trip.
        let (base, rate) = (0.1, 20_000.0);
        let mut cc = Vegas::new(Params::default());
        let mut path = Path::new(base, rate);
        let mut now = 0.0;
        let rounds = path.run(&mut cc, &mut now, 40.0 * base);
        assert!(!cc.in_slow_start());
        // The last round is cut short by the end of the run.
        let late = &rounds[25..rounds.len() - 1];
        let got = share(late, base, rate);
        assert!(got > 0.97, "{got:.2} of the path used after 25 round trips");
        // The queue it keeps: at most `delta` cells, 15.5 ms at this rate.
        let worst = late.iter().map(|r| r.max_queue_delay).fold(0.0, f64::max);
        assert!(worst < 0.016, "queueing delay {worst:.4} s");
        // Far past what a fixed 1000-cell window carries here (1000 cells
        // per 100 ms is half of the path).
        assert!(cc.cwnd() > 2_000, "cwnd {}", cc.cwnd());
    }

    #[test]
    fn backs_off_when_the_bottleneck_slows() {
        let (base, rate) = (0.05, 20_000.0);
        let mut cc = Vegas::new(Params::default());
        let mut path = Path::new(base, rate);
        let mut now = 0.0;
        path.run(&mut cc, &mut now, 30.0 * base);
        let before = cc.cwnd();
        // The bottleneck drops to a quarter: the queue grows, the window
        // follows it down, and the queue drains again.
        path.rate = rate / 4.0;
        let until = now + 60.0 * base;
        let rounds = path.run(&mut cc, &mut now, until);
        assert!(cc.cwnd() < before / 2, "cwnd {before} -> {}", cc.cwnd());
        let late = &rounds[30..rounds.len() - 1];
        let worst = late.iter().map(|r| r.max_queue_delay).fold(0.0, f64::max);
        // At most `delta` cells at the new rate: 62 ms.
        assert!(worst < 0.063, "queueing delay {worst:.4} s after the drop");
        assert!(share(late, base, rate / 4.0) > 0.95);
    }

    #[test]
    fn a_huge_path_ends_slow_start_and_stays_within_the_bound() {
        // 500 ms at 1,000,000 cells/s: far more than the window may hold.
        let p = Params::default();
        let mut cc = Vegas::new(p);
        let mut path = Path::new(0.5, 1_000_000.0);
        let mut now = 0.0;
        let rounds = path.run(&mut cc, &mut now, 100.0);
        assert!(!cc.in_slow_start(), "slow start ends");
        assert!(rounds.iter().all(|r| r.max_cwnd <= p.cwnd_max));
        // Each burst slow start sends queues its own tail at the
        // bottleneck, which ends slow start short of the path: a few
        // thousand cells a round trip are left for the slow growth after.
        assert!(cc.cwnd() > p.cwnd_max / 3, "cwnd {}", cc.cwnd());
        // A path that holds less than the bound: the whole of it.
        let mut cc = Vegas::new(p);
        let mut path = Path::new(0.3, 100_000.0);
        let mut now = 0.0;
        let rounds = path.run(&mut cc, &mut now, 60.0 * 0.3);
        let late = &rounds[40..rounds.len() - 1];
        let got = share(late, 0.3, 100_000.0);
        assert!(got > 0.9, "{got:.2} of a 30,000-cell path");
    }

    #[test]
    fn a_window_the_sender_does_not_fill_does_not_grow() {
        // The path holds 2,000 cells per round trip; the application sends
        // 3,000 cells a second (300 per round trip).
        let mut cc = Vegas::new(Params::default());
        let mut path = Path::new(0.1, 20_000.0);
        path.app = Some(3_000.0);
        let mut now = 0.0;
        let rounds = path.run(&mut cc, &mut now, 10.0);
        let most = rounds.iter().map(|r| r.max_cwnd).max().unwrap();
        assert!(most <= cc.p.cwnd_init, "the window grew to {most} unused");
        // And it carries what the application sends.
        let late = &rounds[50..rounds.len() - 1];
        assert!(share(late, 0.1, 3_000.0) > 0.9);
    }

    #[test]
    fn bunched_sendmes_cannot_blow_up_the_window() {
        // Slow start on an 80 ms path, then SENDMEs 30 microseconds apart
        // whose round trips show a queue (a hop that held them back and let
        // them go at once): slow start ends, at no more than twice the
        // window it reached, however fast the path then looks.
        let mut cc = Vegas::new(Params::default());
        let mut t = Instant::now();
        for _ in 0..12 {
            t += Duration::from_millis(5);
            cc.on_sendme(t, Duration::from_millis(80), true);
        }
        assert!(cc.in_slow_start());
        let before = cc.cwnd();
        for _ in 0..8 {
            t += Duration::from_micros(30);
            cc.on_sendme(t, Duration::from_millis(200), true);
        }
        assert!(!cc.in_slow_start());
        assert!(
            cc.cwnd() <= 2 * (before + 16 * 31),
            "{} from {before}",
            cc.cwnd()
        );
    }

    #[test]
    fn clock_stalls_are_ignored() {
        let mut cc = Vegas::new(Params::default());
        let now = Instant::now();
        cc.on_sendme(now, Duration::from_millis(100), true);
        cc.on_sendme(now, Duration::ZERO, true);
        cc.on_sendme(now, Duration::from_secs(3600), true);
        assert_eq!(cc.min_rtt(), Some(Duration::from_millis(100)));
        // Nonsense parameters are made consistent, not a panic.
        let odd = Params {
            inc: 0,
            cwnd_min: 500,
            cwnd_max: 100,
            ..Params::default()
        };
        let mut cc = Vegas::new(odd);
        cc.on_sendme(now, Duration::from_millis(10), true);
        assert!(cc.cwnd() <= 100);
    }

    #[test]
    fn a_short_path_stays_small() {
        // 1 ms and 2,000 cells/s: the path holds 2 cells, so the window
        // stays within `gamma` of its floor (the queue it keeps is counted
        // in cells, as in Tor's).
        let p = Params::default();
        let mut cc = Vegas::new(p);
        let mut path = Path::new(0.001, 2_000.0);
        let mut now = 0.0;
        path.run(&mut cc, &mut now, 5.0);
        assert!(cc.cwnd() <= p.cwnd_min + p.gamma, "cwnd {}", cc.cwnd());
    }

    /// `starts.len()` circuits through one bottleneck (a FIFO served at
    /// `rate` cells per second; each SENDME arrives `base` after its cell
    /// left it), each sending `cells` from its start time: when each
    /// finished (its last SENDME), in seconds.
    fn finish_together(base: f64, rate: f64, starts: &[f64], cells: u64) -> Vec<f64> {
        struct Flow {
            cc: Vegas,
            inflight: u64,
            sent: u64,
            acks: VecDeque<(f64, f64)>,
        }
        let epoch = Instant::now();
        let p = Params::default();
        let inc = u64::from(p.inc);
        let cells = cells.div_ceil(inc) * inc;
        let mut flows: Vec<Flow> = (starts.iter())
            .map(|_| Flow {
                cc: Vegas::new(p),
                inflight: 0,
                sent: 0,
                acks: VecDeque::new(),
            })
            .collect();
        let mut done = vec![f64::INFINITY; starts.len()];
        let mut started = vec![false; starts.len()];
        let mut free = 0.0f64;
        // Each step is one start or one SENDME: bounded by their number.
        for _ in 0..(starts.len() as u64 * (cells / inc + 1)) {
            let ack =
                (0..flows.len()).filter_map(|i| flows[i].acks.front().map(|a| (a.0, i, false)));
            let start = (0..flows.len())
                .filter(|&i| !started[i])
                .map(|i| (starts[i], i, true));
            let Some((now, i, is_start)) = ack.chain(start).min_by(|a, b| a.0.total_cmp(&b.0))
            else {
                break;
            };
            let f = &mut flows[i];
            if is_start {
                started[i] = true;
            } else {
                let (at, sent_at) = f.acks.pop_front().unwrap();
                f.inflight -= inc;
                let rtt = Duration::from_secs_f64(at - sent_at);
                f.cc.on_sendme(epoch + Duration::from_secs_f64(at), rtt, true);
                if f.sent == cells && f.inflight == 0 {
                    done[i] = at;
                }
            }
            while f.inflight < u64::from(f.cc.cwnd()) && f.sent < cells {
                free = free.max(now) + 1.0 / rate;
                f.sent += 1;
                f.inflight += 1;
                if f.sent.is_multiple_of(inc) {
                    f.acks.push_back((free + base, now));
                }
            }
        }
        done
    }

    #[test]
    fn circuits_that_start_together_share_the_path_from_the_start() {
        // 32 and 8 downloads of 5 MiB (10,509 cells) over 310 ms, started
        // 2 ms apart, through 100 MB/s and 50 MB/s. All of it could pass in
        // 1.7 s and 0.8 s plus slow start. The last circuits to start used
        // to leave slow start with windows cut to their share of the
        // moment (a few hundred cells), which they took seconds to grow:
        // the last download ended after 4.58 and 4.12 s (3.23 and 2.60 s
        // with the window starting at 124 cells, 2.86 and 1.46 s at 1000).
        for (n, rate, within) in [(32, 200_000.0, 3.5), (8, 100_000.0, 2.0)] {
            let starts: Vec<f64> = (0..n).map(|i| 0.002 * f64::from(i)).collect();
            let done = finish_together(0.31, rate, &starts, 10_509);
            let last = done.iter().copied().fold(0.0, f64::max);
            assert!(
                last < within,
                "{n} circuits: the last ended after {last:.2} s"
            );
        }
    }

    #[test]
    fn a_download_starts_with_the_window_circuits_had_without_congestion_control() {
        // 20 MiB (41,200 cells) over 310 ms through 100 MB/s: a window that
        // starts at 124 cells needs six round trips of slow start to carry
        // it (2.19 s); one that starts at the 1000 cells circuits had
        // before congestion control, no more than a relay already had to
        // take at once from every circuit, needs four (1.56 s).
        let done = finish_together(0.31, 200_000.0, &[0.0], 41_200)[0];
        assert!(done < 1.8, "ended after {done:.2} s");
    }
}
