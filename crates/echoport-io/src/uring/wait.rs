//! One loop turn's system call: publish returned buffers, submit what is queued, sleep until
//! completions are ready (or the timeout, or the batched wait's bound), and reap them.
//!
//! The kernel may refuse for a moment (`EAGAIN`/`EBUSY`: no request memory, or the
//! completion queue is full; `EINTR`): those are retried on the next turn, never returned.
//! `EBADR` says completions were dropped (only without `IORING_FEAT_NODROP`): it is counted
//! and logged, and the loop carries on.

use std::io;
use std::time::Duration;

use echoport_core::Completion;
use echoport_core::moderation::Moderator;
use io_uring::types;

use super::Uring;
use super::setup::{ENTER_EXT_ARG, ENTER_GETEVENTS, ENTER_REGISTERED_RING};

/// How long a wait may sleep while entries wait in the backlog for room in the queue.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

/// What one wait asks of the kernel.
struct Plan {
    /// Completions to wait for.
    want: u32,
    /// Longest sleep (`None`: until a completion).
    timeout: Option<Duration>,
    /// The kernel's minimum wait in microseconds (0: none).
    min_wait_us: u32,
}

/// True for the errors a submit or wait may return in normal operation, to be retried.
pub(super) fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ENOMEM)
    )
}

impl Uring {
    /// Submits everything queued, waits up to `timeout`, and appends the completions.
    pub(super) fn wait_and_reap(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        out.append(&mut self.synthetic);
        if !self.tables.extra.is_empty() {
            self.top_up();
        }
        if let Some(r) = self.buf_ring.as_mut() {
            r.publish();
        }
        // The extra rings first: what they have queued goes out, and what they have ready
        // makes this wait a poll.
        self.service_tables(out, false)?;
        self.flush_backlog()?;
        let plan = self.plan(timeout, !out.is_empty());
        match self.enter(&plan) {
            Ok(_) => {}
            Err(e) if transient(&e) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBADR) => {
                tracing::warn!("io_uring dropped completions (no overflow memory); carrying on");
                self.dropped += 1;
            }
            Err(e) => return Err(e),
        }
        self.reap(out);
        // The extra rings whose eventfds fired during the wait.
        self.service_tables(out, true)?;
        Ok(())
    }

    /// Hands backlogged entries to the submission queue as room appears.
    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(e) = self.backlog.front() {
            // SAFETY: as in `enqueue`.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if transient(&e) => return Ok(()),
                    Err(e) => return Err(e),
                }
                // SAFETY: as in `enqueue`.
                if unsafe { self.ring.submission().push(e) }.is_err() {
                    return Ok(());
                }
            }
            self.backlog.pop_front();
        }
        Ok(())
    }

    /// Decides how long to sleep and for how many completions. Adaptive moderation (on
    /// kernels with the minimum wait): while the completion rate says a batch fills within
    /// the bound, sleep until `batch` completions are ready or the bound has passed with at
    /// least one; otherwise a plain wait. Fixed batched waits: with the
    /// kernel's minimum wait, sleep until `batch` completions are ready, or `batch_wait_us`
    /// has passed and at least one is. Without it: under load, ask for as many completions
    /// as the last turn brought (up to `batch`) for at most `batch_wait_us`; at light load a
    /// plain wait.
    fn plan(&mut self, timeout: Option<Duration>, have_some: bool) -> Plan {
        let ready = have_some || !self.ring.completion().is_empty();
        let timeout = if ready {
            Some(Duration::ZERO)
        } else if !self.backlog.is_empty() {
            Some(timeout.map_or(BACKLOG_RETRY, |t| t.min(BACKLOG_RETRY)))
        } else {
            timeout
        };
        let hold = self.moderator.as_ref().map_or(0, Moderator::hold_us);
        match timeout {
            Some(t) if t.is_zero() => Plan {
                want: 1,
                timeout: Some(t),
                min_wait_us: 0,
            },
            t if self.batch_wait_us > 0 && self.min_timeout => Plan {
                want: self.batch,
                timeout: t,
                min_wait_us: self.batch_wait_us,
            },
            t if hold > 0 => Plan {
                want: self.batch,
                timeout: t,
                min_wait_us: hold,
            },
            t if self.batch_wait_us > 0 && self.last_reaped > 1 => {
                let b = Duration::from_micros(self.batch_wait_us as u64);
                Plan {
                    want: self.last_reaped.min(self.batch as usize) as u32,
                    timeout: Some(t.map_or(b, |t| t.min(b))),
                    min_wait_us: 0,
                }
            }
            t => Plan {
                want: 1,
                timeout: t,
                min_wait_us: 0,
            },
        }
    }

    /// Submits and waits as planned, through the registered ring descriptor when there is one.
    fn enter(&mut self, plan: &Plan) -> io::Result<usize> {
        let ts = plan.timeout.map(|t| {
            types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos())
        });
        if let Some(index) = self.ring_index {
            return self.enter_registered(index, plan.want, ts.as_ref(), plan.min_wait_us);
        }
        match &ts {
            None if plan.min_wait_us == 0 => self.ring.submit_and_wait(1),
            None => {
                let args = types::SubmitArgs::new().min_wait_usec(plan.min_wait_us);
                self.ring
                    .submitter()
                    .submit_with_args(plan.want as usize, &args)
            }
            Some(ts) => {
                let args = types::SubmitArgs::new()
                    .timespec(ts)
                    .min_wait_usec(plan.min_wait_us);
                self.ring
                    .submitter()
                    .submit_with_args(plan.want as usize, &args)
            }
        }
    }

    /// Submits what is queued and waits for `want` completions (or the timeout, or the
    /// minimum wait), naming the ring by its registered index.
    fn enter_registered(
        &mut self,
        index: u32,
        want: u32,
        ts: Option<&types::Timespec>,
        min_wait_us: u32,
    ) -> io::Result<usize> {
        let to_submit = self.ring.submission().len() as u32;
        let mut args = types::SubmitArgs::new().min_wait_usec(min_wait_us);
        if let Some(ts) = ts {
            args = args.timespec(ts);
        }
        let flags = ENTER_GETEVENTS | ENTER_EXT_ARG | ENTER_REGISTERED_RING;
        // SAFETY: `index` is this ring's descriptor as registered by this thread (`Uring` is
        // not `Send`; the registration lives as long as the ring). Every queued entry was
        // pushed through the submission queue, whose tail is published when each push's queue
        // handle drops, and every buffer those entries name is the kernel's, or lent and read
        // by a send, until their completions (the pool's record). `args` is an
        // `io_uring_getevents_arg` (`SubmitArgs` is a transparent wrapper of it) whose
        // timespec, if any, outlives this call; its size goes with it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                index as libc::c_long,
                to_submit as libc::c_long,
                want as libc::c_long,
                flags as libc::c_long,
                &args as *const types::SubmitArgs as *const libc::c_void,
                std::mem::size_of::<types::SubmitArgs>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Takes every completion the kernel has posted and turns each into a [`Completion`].
    fn reap(&mut self, out: &mut Vec<Completion>) {
        if self.ring.submission().cq_overflow() {
            self.overflows += 1;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        let cq = self.ring.completion();
        self.dropped = self.dropped.max(cq.overflow() as u64);
        cqes.extend(cq.map(|c| (c.user_data(), c.result(), c.flags())));
        self.last_reaped = cqes.len();
        if let Some(m) = self.moderator.as_mut() {
            m.observe(self.epoch.elapsed().as_nanos() as u64, cqes.len());
        }
        for &(ud, res, flags) in &cqes {
            self.complete(0, ud, res, flags, out);
        }
        cqes.clear();
        self.cqes = cqes;
    }
}

#[cfg(test)]
mod tests {
    use super::transient;
    use std::io;

    #[test]
    fn what_the_kernel_returns_in_normal_operation_is_retried_not_fatal() {
        for code in [
            libc::EAGAIN,
            libc::EBUSY,
            libc::EINTR,
            libc::ETIME,
            libc::ENOMEM,
        ] {
            assert!(
                transient(&io::Error::from_raw_os_error(code)),
                "errno {code}"
            );
        }
        for code in [libc::EINVAL, libc::EBADF, libc::EFAULT, libc::EBADR] {
            assert!(
                !transient(&io::Error::from_raw_os_error(code)),
                "errno {code}"
            );
        }
    }
}
