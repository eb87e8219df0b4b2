//! The ticked open loop's turn and its sleep: hand a tick's sends to the kernel and reap in
//! one call, read the echoes with their arrival stamps ([`super::stamped`]), then sleep to
//! the next tick on a plain timer that echoes do not interrupt.

use std::io;
use std::time::Duration;

use echoport_core::Backend;

use super::{Worker, stamped};

/// A ticked loop's sleeps must end on time: without this, Linux may let them overrun by the
/// default timer slack of 50 µs.
pub(super) fn timer_slack() {
    #[cfg(target_os = "linux")]
    if let Err(e) = echoport_io::clock::set_timer_slack(1) {
        tracing::warn!(error = %e, "cannot set the timer slack; ticks may end up to 50 us late");
    }
}

/// The ticked loop's receive path, or None (with a warning: the loop then wakes per echo).
pub(super) fn open_stamped() -> Option<stamped::Stamped> {
    if !cfg!(target_os = "linux") {
        tracing::warn!("--tick needs Linux (kernel receive stamps); waking for each message");
        return None;
    }
    stamped::Stamped::new()
        .map_err(|e| tracing::warn!(error = %e, "--tick: no receive set; waking for each message"))
        .ok()
}

/// Sleeps on a plain timer (echoes arriving meanwhile do not wake the thread).
fn sleep(d: Duration) {
    #[cfg(target_os = "linux")]
    echoport_io::clock::sleep(d);
    #[cfg(not(target_os = "linux"))]
    std::thread::sleep(d);
}

impl<B: Backend> Worker<B> {
    /// The ticked loop's turn: hand this tick's sends to the kernel and reap what completed
    /// in one call, read the echoes that arrived (kernel-stamped), then sleep to the next
    /// tick on the timer alone (echoes arriving meanwhile do not wake the thread).
    pub(super) fn tick(&mut self, before: u64) -> io::Result<()> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.io.wait(&mut events, Some(Duration::ZERO))?;
        let now = self.now();
        for c in events.drain(..) {
            self.dispatch(c, now);
        }
        self.events = events;
        self.reap_stamped(now);
        let wait = self.next_wakeup(now);
        sleep(wait);
        let late = self.now().saturating_sub(now + wait.as_nanos() as u64);
        self.note_late(now, late);
        if late > 50_000_000 {
            tracing::debug!(
                late_ms = late / 1_000_000,
                since = before,
                "tick ended late"
            );
        }
        Ok(())
    }
}
