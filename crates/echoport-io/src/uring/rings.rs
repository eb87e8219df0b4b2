//! More rings than threads: the capacity of one worker beyond one direct-descriptor table.
//!
//! A ring's direct-descriptor table holds at most `RLIMIT_NOFILE` entries (the kernel refuses
//! a bigger one), so a worker that holds more connections than that owns several rings. Ring
//! 0 is the worker's own (the one it sleeps on, with the waker and the listeners); rings
//! 1.. ("table rings", [`TableRing`]) are added as tables fill, up to [`Config::max_rings`].
//! Each has its own table, its own provided-buffer ring and an eventfd registered with it;
//! ring 0 keeps a read posted on every such eventfd, so a completion on any ring wakes the
//! one wait. A connection's [`Socket`] names its ring and its slot in that ring's table, and
//! every operation on it is posted there.
//!
//! Accepts (`accept.rs`) go to the ring whose table has room, a new one when none has.
//!
//! Buffers: all rings lend from the worker's one pool (`pool.rs`); only which buffer ring a
//! buffer the kernel holds sits in differs. A buffer in a ring's buffer ring cannot be taken
//! back (the kernel picks it when data comes), so each ring holds at most an equal share
//! ([`Tables::share`]) and the rest of the pool stays free. A released buffer goes to a ring
//! that ran dry or holds less than half its share, in turn ([`Tables::needy_ring`]), else
//! back to the ring it came from while that ring is below its share, else to the pool; and
//! every loop turn tops up the rings that run short. So an idle ring never holds the
//! buffers a busy one needs for long, and a ring added while the older ones still hold their
//! earlier, larger shares is filled by the next releases.
//!
//! [`Config::max_rings`]: super::Config::max_rings
//! [`Socket`]: echoport_core::Socket

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use echoport_core::{Completion, OpKind, Token};

use super::buf_ring::BufRing;
use super::{Config, TaskRun, Uring, setup};
use crate::sys::EventFd;

/// Submission queue entries of a table ring (a backlog takes the rest of a burst).
const TABLE_SQ: u32 = 1024;
/// Completion queue entries of a table ring (the kernel keeps any overflow: `NODROP`).
const TABLE_CQ: u32 = 8192;
/// Fewest buffers an extra ring's buffer ring is topped up to.
const MIN_SHARE: u32 = 8;

/// Connections `rings` rings with tables of `table` slots hold (every slot: accepts are
/// posted only for free slots, `accept.rs`).
pub fn capacity(table: u32, rings: u32) -> usize {
    rings.max(1) as usize * table as usize
}

/// Rings one worker needs to hold `conns` connections with tables of `table` slots.
pub fn rings_for(conns: usize, table: u32) -> u32 {
    conns
        .div_ceil(table.max(4) as usize)
        .clamp(1, u16::MAX as usize) as u32
}

/// One extra ring: its own table of direct descriptors and its own buffer ring.
pub(super) struct TableRing {
    pub(super) ring: IoUring,
    pub(super) buf_ring: Option<BufRing>,
    /// Registered with the ring: signalled when it has completion work.
    evfd: EventFd,
    /// Where ring 0's read of `evfd` lands; the kernel holds it while that read is posted.
    pub(super) evfd_buf: Box<u64>,
    /// Entries that did not fit in the submission queue, in order.
    backlog: VecDeque<squeue::Entry>,
    /// Operations posted on this ring and not yet finished.
    pub(super) inflight: u64,
    /// Its eventfd fired: enter it for completions this turn.
    pub(super) flagged: bool,
}

impl TableRing {
    fn new(cfg: &Config, table: u32, buffers: u32) -> io::Result<TableRing> {
        let small = Config {
            sq_entries: TABLE_SQ,
            cq_entries: TABLE_CQ.min(cfg.cq_entries.max(TABLE_SQ)),
            taskrun: if cfg.taskrun == TaskRun::Interrupt {
                TaskRun::Interrupt
            } else {
                TaskRun::Defer
            },
            ..cfg.clone()
        };
        let (ring, _) = setup::build_ring(&small)?;
        ring.submitter().register_files_sparse(table)?;
        let evfd = EventFd::new()?;
        ring.submitter().register_eventfd(evfd.as_raw_fd())?;
        let buf_ring = BufRing::register(&ring, buffers)?;
        Ok(TableRing {
            ring,
            buf_ring: Some(buf_ring),
            evfd,
            evfd_buf: Box::new(0),
            backlog: VecDeque::new(),
            inflight: 0,
            flagged: false,
        })
    }

    /// Cancels everything posted on this ring and waits until `deadline` for the kernel to
    /// finish; true when nothing is left in flight.
    pub(super) fn drain(&mut self, deadline: std::time::Instant) -> bool {
        self.backlog.clear();
        if self.inflight == 0 {
            return true;
        }
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(0);
        // SAFETY: a cancel entry references no memory.
        if unsafe { self.ring.submission().push(&e) }.is_ok() {
            self.inflight += 1;
        }
        super::drop::wait_out(&mut self.ring, &mut self.inflight, deadline);
        self.inflight == 0
    }

    /// Frees the buffer ring (only when drained) or leaks it.
    pub(super) fn release_buf_ring(&mut self, drained: bool) {
        match self.buf_ring.take() {
            Some(r) if drained => r.free(&self.ring),
            _ => {}
        }
    }

    /// The read ring 0 keeps posted on this ring's eventfd.
    pub(super) fn wake_read(&mut self, user_data: u64) -> squeue::Entry {
        let ptr = &mut *self.evfd_buf as *mut u64 as *mut u8;
        opcode::Read::new(types::Fd(self.evfd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(user_data)
    }

    /// Queues an entry on this ring (handed to the kernel at the next turn).
    pub(super) fn push(&mut self, e: squeue::Entry) {
        self.inflight += 1;
        if self.backlog.is_empty() {
            // SAFETY: as in `Uring::enqueue`: every entry points only at memory that outlives
            // its completion (the pool's region, whose buffers the kernel or a send holds
            // until then, a gathered send's boxed header, or nothing).
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(e);
    }

    /// True when this ring has something to submit or completions to collect.
    pub(super) fn busy(&mut self) -> bool {
        self.flagged || !self.backlog.is_empty() || !self.ring.submission().is_empty()
    }

    /// Submits what is queued and runs the ring's completion work without sleeping, then
    /// takes its completions as `(user_data, result, flags)`.
    pub(super) fn turn(&mut self, cqes: &mut Vec<(u64, i32, u32)>) -> io::Result<()> {
        self.flagged = false;
        if let Some(r) = self.buf_ring.as_mut() {
            r.publish();
        }
        // A backlog longer than the queue takes a few rounds; each round's submit makes room.
        for _ in 0..8 {
            while let Some(e) = self.backlog.front() {
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission().push(e) }.is_err() {
                    break;
                }
                self.backlog.pop_front();
            }
            let to_submit = self.ring.submission().len() as u32;
            // SAFETY: no argument is passed; every queued entry is valid as `push` says.
            let r = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    0,
                    setup::ENTER_GETEVENTS,
                    None,
                )
            };
            match r {
                Ok(_) => {}
                Err(e) if super::wait::transient(&e) => {}
                Err(e) => return Err(e),
            }
            for c in self.ring.completion() {
                if !cqueue::more(c.flags()) {
                    self.inflight = self.inflight.saturating_sub(1);
                }
                cqes.push((c.user_data(), c.result(), c.flags()));
            }
            if self.backlog.is_empty() {
                break;
            }
        }
        Ok(())
    }
}

/// Every ring of a worker beyond ring 0, and what each holds.
pub(super) struct Tables {
    /// Ring `i + 1`.
    pub(super) extra: Vec<TableRing>,
    /// Direct descriptors in use, by ring (0: the worker's own).
    pub(super) used: Vec<u32>,
    /// Accepts posted on each ring and not yet completed (each may take a slot).
    pub(super) pending: Vec<u32>,
    /// Buffers in each ring's buffer ring.
    pub(super) bufs: Vec<u32>,
    /// A receive found the ring's buffer ring empty since it was last given one.
    pub(super) starved: Vec<bool>,
    /// The ring each receive buffer last came from (where it goes back).
    home: Vec<u16>,
    /// Adopted streams (`adopt.rs`): each ring's slots never handed out start here...
    next_slot: Vec<u32>,
    /// ...and those handed out and freed again wait here.
    freed: Vec<Vec<u32>>,
    /// Slots per table.
    pub(super) size: u32,
    /// Most rings (ring 0 included).
    pub(super) max_rings: u32,
    /// The ring the accepts are posted on.
    pub(super) accepting: u16,
    /// Receive buffers in the pool.
    buffers: u32,
    /// The one "tables full" message was logged.
    full_logged: bool,
    /// The ring a released buffer was sent to last instead of its own ([`Tables::needy_ring`]).
    fed: usize,
}

impl Tables {
    /// The bookkeeping for a worker whose ring 0 has a table of `size` and whose pool has
    /// `buffers` receive buffers.
    pub(super) fn new(size: u32, max_rings: u32, buffers: u32) -> Tables {
        let max_rings = max_rings.clamp(1, u16::MAX as u32);
        Tables {
            extra: Vec::new(),
            used: vec![0],
            pending: vec![0],
            bufs: vec![0],
            starved: vec![false],
            home: vec![0; buffers as usize],
            next_slot: vec![0],
            freed: vec![Vec::new()],
            size,
            max_rings,
            accepting: 0,
            buffers,
            full_logged: false,
            fed: 0,
        }
    }

    /// Buffers each ring's buffer ring holds at most (its share); the rest of the pool waits free, so
    /// that every ring, a new one too, can be given buffers from it ([`Uring::top_up`]). A
    /// lone ring holds them all; a worker that may add rings keeps a quarter free and the
    /// rings in use share the rest equally (a ring above its share once another is added
    /// gives buffers back to the pool as receives return them, `home`). Ring 0's connections
    /// are no busier than any other ring's, so it gets no more.
    pub(super) fn share(&self) -> u32 {
        if self.max_rings == 1 {
            return self.buffers;
        }
        (self.buffers / 4 * 3 / self.rings() as u32).max(MIN_SHARE)
    }

    /// Ring `r` ran dry or holds less than half its share ([`Uring::top_up`] gives it more).
    pub(super) fn short(&self, r: usize) -> bool {
        self.starved[r] || self.bufs[r] < self.share() / 2
    }

    /// The ring receive buffer `buf` last came from.
    pub(super) fn home(&self, buf: u32) -> usize {
        self.home.get(buf as usize).copied().unwrap_or(0) as usize
    }

    /// Connections the rings hold for sure ([`capacity`]).
    pub(super) fn capacity(&self) -> usize {
        capacity(self.size, self.max_rings)
    }

    /// Rings in use, ring 0 included.
    pub(super) fn rings(&self) -> usize {
        self.extra.len() + 1
    }

    /// Records that `buf` now sits in ring `r`'s buffer ring.
    pub(super) fn placed(&mut self, r: usize, buf: u32) {
        self.bufs[r] += 1;
        self.starved[r] = false;
        if let Some(h) = self.home.get_mut(buf as usize) {
            *h = r as u16;
        }
    }

    /// Records that ring `r`'s kernel took a buffer out of its buffer ring.
    pub(super) fn taken(&mut self, r: usize) {
        self.bufs[r] = self.bufs[r].saturating_sub(1);
    }

    /// The ring a released buffer should go to rather than its own: one whose receives found
    /// its buffer ring empty since it was last given one, else one below half its share
    /// (only beside other rings: a lone ring's buffers all come back to it anyway). Taken in turn
    /// when several are: the ring fed last is looked at last, so none is fed forever while
    /// its refilled receives keep emptying it and the others wait.
    pub(super) fn needy_ring(&mut self) -> Option<usize> {
        let n = self.starved.len();
        if self.extra.is_empty() {
            return None;
        }
        // A dry ring first; else one below half its share (a ring added while the older
        // ones still hold their earlier, larger shares starts empty).
        let from =
            |pick: &dyn Fn(usize) -> bool| (1..=n).map(|k| (self.fed + k) % n).find(|&r| pick(r));
        // (Every release of a worker with several rings comes here: one division, not one
        // per ring.)
        let half = self.share() / 2;
        let r = from(&|r| self.starved[r]).or_else(|| from(&|r| self.bufs[r] < half))?;
        self.fed = r;
        Some(r)
    }

    /// Slots of ring `r` neither in use nor promised to a posted accept.
    pub(super) fn free_slots(&self, r: usize) -> u32 {
        self.size.saturating_sub(self.used[r] + self.pending[r])
    }

    /// A slot of ring `r` for an adopted stream (the caller checked [`Tables::free_slots`]).
    pub(super) fn take_slot(&mut self, r: usize) -> u32 {
        self.freed[r].pop().unwrap_or_else(|| {
            let s = self.next_slot[r];
            self.next_slot[r] += 1;
            s
        })
    }

    /// Ring `r`'s slot `slot`, cleared, may be handed out again.
    pub(super) fn give_slot(&mut self, r: usize, slot: u32) {
        self.freed[r].push(slot);
    }

    /// The ring with the most free slots, if any has one.
    pub(super) fn roomiest(&self) -> Option<usize> {
        (0..self.rings())
            .filter(|&r| self.free_slots(r) > 0)
            .max_by_key(|&r| self.free_slots(r))
    }

    /// Adds a ring with `share` buffers' room taken from the pool's reserve by the caller;
    /// `None` when the limit is reached or the kernel refuses (said once in the log).
    pub(super) fn add_ring(&mut self, cfg: &Config, buffers: u32) -> Option<usize> {
        if self.rings() >= self.max_rings as usize {
            return None;
        }
        match TableRing::new(cfg, self.size, buffers) {
            Ok(t) => {
                self.extra.push(t);
                self.used.push(0);
                self.pending.push(0);
                self.bufs.push(0);
                self.starved.push(false);
                self.next_slot.push(0);
                self.freed.push(Vec::new());
                tracing::debug!(rings = self.rings(), "added an io_uring ring");
                Some(self.rings() - 1)
            }
            Err(e) => {
                self.log_full(Some(e));
                None
            }
        }
    }

    /// The once-only message that this worker's rings cannot take more connections (`None`:
    /// every table is full; else why the kernel refused another ring).
    pub(super) fn log_full(&mut self, why: Option<io::Error>) {
        if std::mem::replace(&mut self.full_logged, true) {
            return;
        }
        let held = self.used.iter().map(|&u| u as u64).sum::<u64>();
        match why {
            None => tracing::warn!(
                rings = self.rings(),
                table = self.size,
                held,
                "connection limit reached: every io_uring direct-descriptor table of this \
                 worker is full; new connections wait in the listen queue or are refused \
                 (raise --max-connections, --threads, or fs.file-max, which size the rings)"
            ),
            Some(e) => tracing::warn!(
                rings = self.rings(),
                table = self.size,
                held,
                error = %e,
                "connection limit reached: the kernel refused another io_uring ring; new \
                 connections wait in the listen queue or are refused (check memory and \
                 RLIMIT_NOFILE)"
            ),
        }
    }
}

impl Uring {
    /// Puts a receive buffer the pool has just made the kernel's in ring `r`'s buffer ring.
    pub(super) fn publish_to(&mut self, r: usize, buf: u32) {
        let (addr, size) = (self.pool.addr(buf, 0), self.pool.buf_size());
        let ring = match r {
            0 => self.buf_ring.as_mut(),
            _ => self
                .tables
                .extra
                .get_mut(r - 1)
                .and_then(|t| t.buf_ring.as_mut()),
        };
        if let Some(ring) = ring {
            ring.add(buf as u16, addr, size);
            self.tables.placed(r, buf);
        }
    }

    /// Adds a ring, gives it its share of the reserve, and posts the read of its eventfd.
    pub(super) fn new_ring(&mut self) -> Option<usize> {
        let r = self.tables.add_ring(&self.cfg, self.pool.recv_count())?;
        self.top_up_ring(r);
        self.arm_table_wake(r);
        Some(r)
    }

    /// Gives every ring that is short of buffers ([`Tables::short`]) free ones up to its
    /// share; once per loop turn, only when there are rings beside ring 0.
    pub(super) fn top_up(&mut self) {
        for r in 0..self.tables.rings() {
            if self.tables.short(r) {
                self.top_up_ring(r);
            }
        }
    }

    fn top_up_ring(&mut self, r: usize) {
        while self.tables.bufs[r] < self.tables.share() {
            let Some(b) = self.pool.take_recv() else {
                return;
            };
            self.publish_to(r, b);
        }
    }

    /// Posts ring 0's read of ring `r`'s eventfd (its id in the token, kind `Wake`).
    pub(super) fn arm_table_wake(&mut self, r: usize) {
        let ud = Token::new(r as u32, 0).pack(OpKind::Wake);
        if let Some(t) = self.tables.extra.get_mut(r - 1) {
            let e = t.wake_read(ud);
            self.enqueue(e);
        }
    }

    /// Submits what every extra ring has queued and collects the completions of those that
    /// have any (`only_flagged`: only those whose eventfd fired).
    pub(super) fn service_tables(
        &mut self,
        out: &mut Vec<Completion>,
        only_flagged: bool,
    ) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.table_cqes);
        for i in 0..self.tables.extra.len() {
            let t = &mut self.tables.extra[i];
            if !only_flagged && let Some(r) = t.buf_ring.as_mut() {
                r.publish();
            }
            if !(t.flagged || (!only_flagged && t.busy())) {
                continue;
            }
            t.turn(&mut cqes)?;
            for &(ud, res, flags) in &cqes {
                self.complete(i + 1, ud, res, flags, out);
            }
            cqes.clear();
        }
        self.table_cqes = cqes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_are_planned_for_every_slot_of_every_table() {
        assert_eq!(rings_for(0, 20_000), 1);
        assert_eq!(rings_for(20_000, 20_000), 1);
        assert_eq!(rings_for(20_001, 20_000), 2);
        assert_eq!(rings_for(500_000, 20_000), 25);
        assert_eq!(capacity(20_000, 25), 500_000);
        assert!(
            rings_for(usize::MAX, 4) <= u16::MAX as u32,
            "ring ids fit in 16 bits"
        );
    }

    #[test]
    fn a_lone_ring_holds_every_buffer_and_several_share_them() {
        let one = Tables::new(20_000, 1, 2048);
        assert_eq!(one.share(), 2048);
        let many = Tables::new(20_000, 26, 2048);
        assert_eq!(
            many.share(),
            1536,
            "ring 0 alone, of a worker that may add more: a quarter stays free"
        );
    }

    #[test]
    fn the_rings_added_so_far_share_three_quarters_of_the_pool() {
        let cfg = super::super::Config::default();
        let mut t = Tables::new(64, 26, 2048);
        for added in 1..=8u32 {
            if t.add_ring(&cfg, 2048).is_none() {
                panic!("adding ring {added} failed (io_uring is required here)");
            }
            let share = (1536 / (added + 1)).max(MIN_SHARE);
            assert_eq!(t.share(), share, "{} rings", added + 1);
            assert!(
                (added + 1) * share <= 1536,
                "caps leave a quarter free to top up"
            );
        }
    }
}
