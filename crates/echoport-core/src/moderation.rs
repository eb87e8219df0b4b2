//! Adaptive completion moderation: when a wait may hold for more completions.
//!
//! A network card's adaptive interrupt moderation delays an interrupt only when the packet
//! rate says more packets will come soon; at a low rate every packet interrupts at once.
//! [`Moderator`] makes the same decision for a completion loop. It watches how many
//! completions each loop turn reaps and how long the turn took, keeps a smoothed estimate of
//! the gap between completions, and tells the next wait how long it may hold once a
//! completion is ready ([`Moderator::hold_us`]): the bound when at least
//! [`EXPECTED_WITHIN_BOUND`] more completions are expected within it, otherwise 0, so a
//! quiet loop wakes at its first completion. The backend passes the hold to the kernel's
//! minimum wait (`IORING_FEAT_MIN_TIMEOUT`), which also ends a wait that found nothing by
//! then at its first completion: a mistaken hold adds at most the bound, never more.
//!
//! No clock is read here: the loop passes `now` in nanoseconds, so the policy is tested
//! without sleeping.

/// A hold is granted only when at least this many completions are expected within the bound
/// (one alone is no batch: holding for it would add latency and save nothing).
pub const EXPECTED_WITHIN_BOUND: u64 = 2;

/// Weight of a new sample in the smoothed gap, as a right shift (1/8).
const SMOOTHING_SHIFT: u32 = 3;

/// Decides, turn by turn, how long a wait may hold for more completions.
#[derive(Clone, Debug)]
pub struct Moderator {
    /// The largest hold in nanoseconds: the latency the user accepts to add (0: never hold).
    bound_ns: u64,
    /// Smoothed time between completions in nanoseconds (`u64::MAX` until measured).
    gap_ns: u64,
    /// When the previous turn ended.
    last_ns: Option<u64>,
}

impl Moderator {
    /// A moderator that never holds longer than `bound_us` microseconds (0: off).
    pub fn new(bound_us: u32) -> Moderator {
        Moderator {
            bound_ns: bound_us as u64 * 1_000,
            gap_ns: u64::MAX,
            last_ns: None,
        }
    }

    /// Records a loop turn that ended at `now_ns` having reaped `reaped` completions.
    pub fn observe(&mut self, now_ns: u64, reaped: usize) {
        let Some(last) = self.last_ns.replace(now_ns) else {
            return;
        };
        let elapsed = now_ns.saturating_sub(last);
        // A turn without completions says the gap is at least that long.
        let sample = elapsed / (reaped.max(1) as u64);
        self.gap_ns = if self.gap_ns == u64::MAX {
            sample
        } else {
            self.gap_ns - (self.gap_ns >> SMOOTHING_SHIFT) + (sample >> SMOOTHING_SHIFT)
        };
    }

    /// How long the next wait may hold for more completions once one is ready, in
    /// microseconds: the bound at a rate that fills a batch within it, else 0.
    pub fn hold_us(&self) -> u32 {
        if self.bound_ns == 0 || self.gap_ns == u64::MAX {
            return 0;
        }
        if self.gap_ns.saturating_mul(EXPECTED_WITHIN_BOUND) <= self.bound_ns {
            (self.bound_ns / 1_000) as u32
        } else {
            0
        }
    }

    /// The smoothed gap between completions in nanoseconds (`None` until measured).
    pub fn gap_ns(&self) -> Option<u64> {
        (self.gap_ns != u64::MAX).then_some(self.gap_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `turns` turns of `reaped` completions each, `turn_ns` apart.
    fn run(m: &mut Moderator, start: u64, turns: u64, turn_ns: u64, reaped: usize) -> u64 {
        let mut now = start;
        for _ in 0..turns {
            now += turn_ns;
            m.observe(now, reaped);
        }
        now
    }

    #[test]
    fn a_quiet_loop_never_holds() {
        let mut m = Moderator::new(50);
        // One completion every millisecond: far slower than two per 50 µs.
        run(&mut m, 0, 100, 1_000_000, 1);
        assert_eq!(m.hold_us(), 0);
    }

    #[test]
    fn a_busy_loop_holds_for_the_bound() {
        let mut m = Moderator::new(50);
        // 150k completions/s: one every ~6.7 µs, so seven within 50 µs.
        run(&mut m, 0, 100, 6_700, 1);
        assert_eq!(m.hold_us(), 50);
        let gap = m.gap_ns().unwrap();
        assert!((6_000..7_500).contains(&gap), "gap {gap}");
    }

    #[test]
    fn batches_count_as_many_arrivals() {
        let mut m = Moderator::new(20);
        // Turns of 40 µs that bring 8 completions each: a 5 µs gap.
        run(&mut m, 0, 100, 40_000, 8);
        assert_eq!(m.gap_ns(), Some(5_000));
        assert_eq!(m.hold_us(), 20);
    }

    #[test]
    fn the_hold_stops_soon_after_the_load_does() {
        let mut m = Moderator::new(50);
        let now = run(&mut m, 0, 200, 5_000, 1);
        assert_eq!(m.hold_us(), 50);
        // The load falls to one completion every 10 ms: within a few turns no more holding.
        run(&mut m, now, 5, 10_000_000, 1);
        assert_eq!(m.hold_us(), 0);
    }

    #[test]
    fn empty_turns_say_the_rate_fell() {
        let mut m = Moderator::new(50);
        let now = run(&mut m, 0, 200, 5_000, 1);
        // Timed-out waits (nothing reaped) of a second each.
        run(&mut m, now, 3, 1_000_000_000, 0);
        assert_eq!(m.hold_us(), 0);
    }

    #[test]
    fn off_means_off() {
        let mut m = Moderator::new(0);
        run(&mut m, 0, 100, 1_000, 10);
        assert_eq!(m.hold_us(), 0);
    }

    #[test]
    fn just_at_the_threshold() {
        // Exactly two expected within the bound holds; a little slower does not.
        let mut m = Moderator::new(20);
        run(&mut m, 0, 50, 10_000, 1);
        assert_eq!(m.hold_us(), 20);
        let mut m = Moderator::new(20);
        run(&mut m, 0, 50, 10_100, 1);
        assert_eq!(m.hold_us(), 0);
    }
}
