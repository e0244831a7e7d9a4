//! Path-bias accounting: per guard, how many circuits that reached it were
//! built to the end, and how many of the circuits used got an answer from
//! the exit.
//!
//! A guard sees the next hop of every circuit it carries. A guard that
//! fails every circuit whose middle is not one of its friends (or, told by
//! a friendly middle, whose exit is not) steers its clients to relays that
//! can link their traffic; and if the client held those failures against
//! the middles and exits, the guard would steer it even harder. The price
//! of the attack is a build rate far below every honest guard's, so the
//! client counts per guard (as Tor does, path-spec section 7) and holds
//! failures against the guard alone:
//!
//! * an **attempt** is a circuit whose first hop was built (the guard
//!   answered the CREATE); whether the guard could be reached at all is the
//!   guard backoff's business (`guards.rs`), since a guard that does not
//!   answer the CREATE has not yet seen a middle;
//! * a **success** is an attempt built to its last hop; a later hop that
//!   fails, is refused, times out or loses the link counts as a failure;
//! * a **use** is a built circuit's first stream or resolve, **answered**
//!   if the exit answered it (CONNECTED, RESOLVED or END: only the last hop
//!   can send those, under its own layer), not if it timed out or the
//!   circuit closed under it. This catches a guard that lets circuits be
//!   built and kills the ones it does not like once they carry traffic.
//!
//! Counts are halved when they reach [`SCALE_AT`] (or [`USE_SCALE_AT`]), so
//! old history fades. Below [`MIN_ATTEMPTS`] (or [`MIN_USES`]) nothing is
//! judged. A guard whose rate falls below the extreme threshold is
//! disabled for good: it stays in the sample so it is not drawn again, and
//! the next guard is used.
//!
//! ```
//! use allium_client::pathbias::{PathBias, Verdict};
//!
//! let mut b = PathBias::default();
//! for i in 0..100 {
//!     b.record_build(i % 4 != 0); // one circuit in four fails
//! }
//! assert_eq!(b.verdict(), Verdict::Fine);
//! for _ in 0..60 {
//!     b.record_build(false); // then it fails them all
//! }
//! assert_eq!(b.verdict(), Verdict::Warn); // 75 of 160 built
//! for _ in 0..100 {
//!     b.record_build(false);
//! }
//! assert_eq!(b.verdict(), Verdict::Extreme);
//! assert!(b.disabled);
//! ```
//!
//! Pure: no clock, no I/O; `guards.rs` keeps one per guard and persists it.

use serde::{Deserialize, Serialize};

/// Attempts through a guard before its build rate is judged. Tor waits for
/// 150 (`pb_mincircs`); our clients build fewer circuits, and at 50 an
/// honest guard failing even a quarter of its circuits stays above
/// [`EXTREME_PCT`] by more than six standard deviations.
pub const MIN_ATTEMPTS: u32 = 50;
/// Attempts and successes are halved when attempts reach this (Tor's
/// `pb_scalecircs`).
pub const SCALE_AT: u32 = 300;
/// A build rate below this percentage is logged at INFO (Tor's
/// `pb_noticepct`).
pub const NOTICE_PCT: u32 = 70;
/// A build rate below this percentage is logged at WARN (Tor's
/// `pb_warnpct`).
pub const WARN_PCT: u32 = 50;
/// A build rate below this percentage disables the guard (Tor's
/// `pb_extremepct`; Tor only disables with `pb_dropguards`).
pub const EXTREME_PCT: u32 = 30;

/// Uses through a guard before its use rate is judged (Tor's `pb_minuse`).
pub const MIN_USES: u32 = 20;
/// Uses and answered uses are halved when uses reach this (Tor's
/// `pb_scaleuse`).
pub const USE_SCALE_AT: u32 = 100;
/// A use rate below this percentage is logged at INFO (Tor's
/// `pb_noticeusepct`).
pub const USE_NOTICE_PCT: u32 = 80;
/// A use rate below this percentage disables the guard (Tor's
/// `pb_extremeusepct`).
pub const USE_EXTREME_PCT: u32 = 60;

/// What a guard's counts say, from best to worst.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// Too few circuits to judge, or rates at or above the notice level.
    #[default]
    Fine,
    /// Below [`NOTICE_PCT`] or [`USE_NOTICE_PCT`]: worth an INFO line.
    Notice,
    /// Below [`WARN_PCT`]: the guard may be attacking, or the network
    /// beyond it is failing.
    Warn,
    /// Below [`EXTREME_PCT`] or [`USE_EXTREME_PCT`], or disabled before:
    /// the guard is not used any more.
    Extreme,
}

/// One guard's path-bias counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathBias {
    /// Circuits whose first hop was built.
    pub attempts: u32,
    /// Of those, circuits built to the last hop.
    pub successes: u32,
    /// Built circuits that carried a first stream or resolve.
    pub uses: u32,
    /// Of those, circuits whose exit answered it.
    pub answered: u32,
    /// The guard fell below an extreme threshold; it stays disabled.
    pub disabled: bool,
}

/// Is `part` of `whole` below `pct` percent?
fn below(part: u32, whole: u32, pct: u32) -> bool {
    u64::from(part) * 100 < u64::from(whole) * u64::from(pct)
}

impl PathBias {
    /// A circuit's first hop was built; `built` if it reached its last.
    pub fn record_build(&mut self, built: bool) {
        if self.attempts >= SCALE_AT {
            self.attempts /= 2;
            self.successes /= 2;
        }
        self.attempts += 1;
        self.successes += u32::from(built);
        self.judge();
    }

    /// A built circuit's first stream or resolve was `answered` by the
    /// exit, or not.
    pub fn record_use(&mut self, answered: bool) {
        if self.uses >= USE_SCALE_AT {
            self.uses /= 2;
            self.answered /= 2;
        }
        self.uses += 1;
        self.answered += u32::from(answered);
        self.judge();
    }

    fn judge(&mut self) {
        if self.verdict() == Verdict::Extreme {
            self.disabled = true;
        }
    }

    /// The worse of the build and use verdicts (Extreme once disabled).
    pub fn verdict(&self) -> Verdict {
        if self.disabled {
            return Verdict::Extreme;
        }
        let (s, a) = (self.successes, self.attempts);
        let build = if a < MIN_ATTEMPTS {
            Verdict::Fine
        } else if below(s, a, EXTREME_PCT) {
            Verdict::Extreme
        } else if below(s, a, WARN_PCT) {
            Verdict::Warn
        } else if below(s, a, NOTICE_PCT) {
            Verdict::Notice
        } else {
            Verdict::Fine
        };
        let (s, a) = (self.answered, self.uses);
        let used = if a < MIN_USES {
            Verdict::Fine
        } else if below(s, a, USE_EXTREME_PCT) {
            Verdict::Extreme
        } else if below(s, a, USE_NOTICE_PCT) {
            Verdict::Notice
        } else {
            Verdict::Fine
        };
        build.max(used)
    }

    /// Successes per attempt and answers per use, in percent, for logs.
    pub fn rates(&self) -> (u32, u32) {
        let pct = |s: u32, a: u32| (u64::from(s) * 100 / u64::from(a.max(1))) as u32;
        (
            pct(self.successes, self.attempts),
            pct(self.answered, self.uses),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` builds, the ones where `fail(i)` holds failing.
    fn builds(b: &mut PathBias, n: u32, fail: impl Fn(u32) -> bool) {
        for i in 0..n {
            b.record_build(!fail(i));
        }
    }

    #[test]
    fn thresholds_wait_for_enough_attempts() {
        let mut b = PathBias::default();
        builds(&mut b, MIN_ATTEMPTS - 1, |_| true);
        assert_eq!(
            b.verdict(),
            Verdict::Fine,
            "nothing judged before the minimum"
        );
        assert!(!b.disabled);
        b.record_build(false);
        assert_eq!(b.verdict(), Verdict::Extreme);
        assert!(b.disabled);
        // Disabled for good, whatever comes after.
        builds(&mut b, 1000, |_| false);
        assert_eq!(b.verdict(), Verdict::Extreme);
    }

    #[test]
    fn each_level_at_its_rate() {
        // Failing 1, 4, 6 and 8 circuits in 10: 90, 60, 40 and 20% built.
        for (fails, want) in [
            (1, Verdict::Fine),
            (4, Verdict::Notice),
            (6, Verdict::Warn),
            (8, Verdict::Extreme),
        ] {
            let mut b = PathBias::default();
            builds(&mut b, 200, |i| i % 10 < fails);
            assert_eq!(b.verdict(), want, "{fails} failures in 10");
            assert_eq!(b.rates().0, 100 - fails * 10);
        }
        // Exactly at a threshold is not below it.
        let mut b = PathBias::default();
        builds(&mut b, 100, |i| i % 10 < 3);
        assert_eq!(b.rates().0, NOTICE_PCT);
        assert_eq!(b.verdict(), Verdict::Fine);
    }

    #[test]
    fn old_history_fades() {
        let mut b = PathBias::default();
        builds(&mut b, SCALE_AT, |_| false);
        assert_eq!((b.attempts, b.successes), (SCALE_AT, SCALE_AT));
        b.record_build(false);
        assert_eq!((b.attempts, b.successes), (SCALE_AT / 2 + 1, SCALE_AT / 2));
        // Counts stay bounded, and a guard that turns bad is judged on
        // what it does now rather than on a long good past.
        builds(&mut b, 100_000, |_| false);
        assert!(b.attempts <= SCALE_AT);
        let mut fails = 0;
        while b.verdict() != Verdict::Extreme {
            b.record_build(false);
            fails += 1;
        }
        assert!(
            fails < SCALE_AT,
            "{fails} failures before the guard was disabled"
        );
    }

    #[test]
    fn circuits_killed_in_use_count_too() {
        let mut b = PathBias::default();
        builds(&mut b, 200, |_| false);
        for i in 0..MIN_USES {
            b.record_use(i % 10 < 7);
        }
        assert_eq!(b.verdict(), Verdict::Notice, "70% answered");
        let mut b = PathBias::default();
        for i in 0..MIN_USES {
            b.record_use(i % 2 == 0);
        }
        assert_eq!(b.verdict(), Verdict::Extreme, "half answered");
        assert!(b.disabled);
        let mut b = PathBias::default();
        for i in 0..1000 {
            b.record_use(i % 10 != 0);
        }
        assert!(b.uses <= USE_SCALE_AT);
        assert_eq!(b.verdict(), Verdict::Fine);
    }
}
