//! Dropping a ring: cancel whatever is still posted and wait, bounded, for the kernel to let
//! go of it. Memory the kernel might still write (the buffer region, the eventfd read's
//! word, gathered sends' headers, the buffer ring) is freed only when nothing is in flight;
//! otherwise it is leaked on purpose, never freed under the kernel.

use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, types};

use super::{Uring, setup};

/// How long a drop waits for cancelled operations to finish.
const DRAIN: Duration = Duration::from_secs(1);

/// Waits, until `deadline`, for the last completion of each of `inflight` operations on
/// `ring`, counting them off as they come (what is left is still the kernel's).
pub(super) fn wait_out(ring: &mut IoUring, inflight: &mut u64, deadline: Instant) {
    while *inflight > 0 && Instant::now() < deadline {
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        let done = ring
            .completion()
            .filter(|c| !cqueue::more(c.flags()))
            .count() as u64;
        *inflight = inflight.saturating_sub(done);
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN;
        // Entries still in the backlog never reached the kernel.
        self.inflight = self.inflight.saturating_sub(self.backlog.len() as u64);
        self.backlog.clear();
        if self.inflight > 0 {
            self.cancel_everything();
        }
        wait_out(&mut self.ring, &mut self.inflight, deadline);
        let mut tables_left = 0;
        for t in &mut self.tables.extra {
            if !t.drain(deadline) {
                tables_left += t.inflight;
            }
        }
        if self.inflight > 0 || tables_left > 0 {
            for t in &mut self.tables.extra {
                t.release_buf_ring(false);
            }
            // The reads of the extra rings' eventfds may still land in their words.
            for t in std::mem::take(&mut self.tables.extra) {
                std::mem::forget(t);
            }
            tracing::warn!(
                tables_left,
                left = self.inflight,
                "io_uring operations did not finish; leaking their memory"
            );
            self.pool.leak();
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
            std::mem::forget(std::mem::take(&mut self.send_msgs));
            // The buffer ring's entries stay allocated: `BufRing` has no destructor.
            self.buf_ring = None;
        } else {
            if let Some(r) = self.buf_ring.take() {
                r.free(&self.ring);
            }
            for t in &mut self.tables.extra {
                t.release_buf_ring(true);
            }
        }
        if let Some(index) = self.ring_index.take() {
            setup::unregister_ring_fd(&self.ring, index);
        }
    }
}

impl Uring {
    /// Queues one cancel-any request (which the kernel treats as cancel-all), making room in
    /// the submission queue first if it is full; counted as in flight until it completes.
    fn cancel_everything(&mut self) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(0);
        for _ in 0..2 {
            // SAFETY: a cancel entry references no memory.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.inflight += 1;
                return;
            }
            let _ = self.ring.submit();
        }
        tracing::warn!("could not queue the cancellation of io_uring operations");
    }
}
