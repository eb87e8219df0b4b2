//! Sleeping on a plain timer, precisely: what the load generator's ticked open loop waits on.
//!
//! A loop that sleeps here is not woken by completions (with io_uring's deferred task running
//! they wait in the ring until the next `io_uring_enter`; epoll readiness waits in the epoll
//! set), so a whole tick's echoes are reaped in one call. The thread's timer slack is set to
//! 1 ns first: Linux lets a normal thread's sleep overrun by 50 µs by default, longer than a
//! tick.

use std::io;
use std::time::Duration;

/// Sets the calling thread's timer slack (how far the kernel may delay its timers to group
/// them) to `ns` nanoseconds (at least 1: 0 would mean "the default").
pub fn set_timer_slack(ns: u64) -> io::Result<()> {
    let ns = ns.max(1) as libc::c_ulong;
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument by value and touches no memory
    // of ours; the unused arguments are zero as the man page asks.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sleeps for `d` on `CLOCK_MONOTONIC` (the clock of [`std::time::Instant`]), resuming after
/// a signal until the whole time has passed.
pub fn sleep(d: Duration) {
    if d.is_zero() {
        return;
    }
    let mut req = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    loop {
        let mut rem = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: both pointers name live, initialised timespecs on this stack frame for
        // the length of the call; the kernel writes only `rem`.
        let r = unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &req, &mut rem) };
        if r != libc::EINTR {
            return;
        }
        req = rem;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn sleeps_at_least_the_time_asked() {
        set_timer_slack(1).expect("prctl(PR_SET_TIMERSLACK)");
        let t = Instant::now();
        sleep(Duration::from_micros(300));
        let took = t.elapsed();
        assert!(took >= Duration::from_micros(300), "slept {took:?}");
        assert!(took < Duration::from_secs(1), "slept {took:?}");
    }

    #[test]
    fn zero_does_not_sleep() {
        let t = Instant::now();
        sleep(Duration::ZERO);
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
