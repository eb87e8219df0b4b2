//! The one buffer pool every backend lends from, and the record of who holds each buffer.
//!
//! All buffers of a backend are one [`Region`]: `recv` receive buffers (`0..recv`), then the
//! buffers callers fill themselves (`recv..total`, [`echoport_core::Backend::alloc_buf`]).
//! Every buffer has exactly one [`Owner`] at any moment, and the pool checks each hand-over
//! against it:
//!
//! ```text
//!            take_recv / to_kernel               lend (a receive completed with data)
//!   Free ────────────────────────────▶ Kernel ─────────────────────────────────────▶ Lent
//!    ▲  ◀──── unpost (no data came) ─────┘                                            │
//!    └──────────────────────────────── release ◀──────────────────────────────────────┘
//!                       (alloc takes a send buffer straight from Free to Lent)
//! ```
//!
//! A hand-over from the wrong owner (a double release, a release of a buffer the kernel
//! holds, a read of a free buffer) is a [`Misuse`]: it changes nothing, is counted, and is
//! returned to the backend, which turns it into a debug assertion and an error log. Silent
//! reuse, where two connections would share one buffer, cannot happen.
//!
//! What the backends keep for themselves is only how buffers reach the kernel: io_uring's
//! provided-buffer ring (`uring/buf_ring.rs`), the one-shot receive a buffer is posted with,
//! IOCP's posted `WSARecv`, epoll's `recv(2)` at readiness.

use std::fmt;
use std::io;

use crate::region::Region;

/// How big a pool is; one definition of the defaults for every backend and the CLI.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes per buffer (at least [`PoolConfig::MIN_BUF_SIZE`]).
    pub buf_size: u32,
    /// Receive buffers (rounded up to a power of two, at most [`PoolConfig::MAX_BUFFERS`]).
    pub buffers: u32,
    /// Buffers kept for callers that send their own bytes ([`echoport_core::Backend::alloc_buf`]).
    pub send_buffers: u32,
}

impl PoolConfig {
    /// Default bytes per buffer.
    pub const DEFAULT_BUF_SIZE: u32 = 8192;
    /// Default receive buffers per backend (per worker thread).
    pub const DEFAULT_BUFFERS: u32 = 2048;
    /// Default buffers for callers' own sends.
    pub const DEFAULT_SEND_BUFFERS: u32 = 256;
    /// Smallest buffer: smaller ones make every message a handful of receives.
    pub const MIN_BUF_SIZE: u32 = 64;
    /// Largest buffer (16 MiB).
    pub const MAX_BUF_SIZE: u32 = 1 << 24;
    /// Most receive buffers (io_uring's provided-buffer ring holds at most 32,768).
    pub const MAX_BUFFERS: u32 = 32768;

    /// The configuration a backend actually uses: receive buffers rounded up to a power of
    /// two within `1..=MAX_BUFFERS`, the buffer size clamped into its range. The CLI refuses
    /// values outside the ranges before they get here; this keeps a library caller safe.
    pub fn effective(&self) -> PoolConfig {
        PoolConfig {
            buf_size: self.buf_size.clamp(Self::MIN_BUF_SIZE, Self::MAX_BUF_SIZE),
            buffers: self.buffers.clamp(1, Self::MAX_BUFFERS).next_power_of_two(),
            send_buffers: self.send_buffers,
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            buf_size: Self::DEFAULT_BUF_SIZE,
            buffers: Self::DEFAULT_BUFFERS,
            send_buffers: Self::DEFAULT_SEND_BUFFERS,
        }
    }
}

/// Who holds a buffer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Owner {
    /// On the pool's free list.
    Free,
    /// Handed to the kernel: in the provided-buffer ring, or named by a posted receive.
    Kernel,
    /// Lent to the state machine (received data, or allocated for a caller's own bytes);
    /// a send it posts may name it until that send completes.
    Lent,
}

/// A hand-over refused because the buffer was not where the caller said.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Misuse {
    /// The buffer.
    pub buf: u32,
    /// What was attempted.
    pub action: &'static str,
    /// Who held it (`None`: no such buffer).
    pub held_by: Option<Owner>,
}

impl fmt::Display for Misuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.held_by {
            Some(o) => write!(f, "buffer {} {}: held by {:?}", self.buf, self.action, o),
            None => write!(f, "buffer {} {}: no such buffer", self.buf, self.action),
        }
    }
}

/// Where a released buffer went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Returned {
    /// A receive buffer, now the kernel's again: the backend must publish it (its ring).
    Kernel,
    /// Back on a free list.
    Free,
}

/// The buffers of one backend and who holds each.
pub(crate) struct Pool {
    /// The memory of every buffer, one `size`-byte slot each (`None` once leaked).
    region: Option<Region>,
    /// Bytes per buffer.
    size: u32,
    /// Buffers `0..recv` are the receive partition; `recv..` the send partition.
    recv: u32,
    /// Who holds each buffer, by id: checked on every hand-over.
    owner: Vec<Owner>,
    /// Receive buffers free in user space (not in the kernel, not lent).
    recv_free: Vec<u32>,
    /// Send buffers free for `alloc`.
    send_free: Vec<u32>,
    /// Receive buffers the kernel holds (ring or posted receive).
    in_kernel: u32,
    /// Hand-overs refused so far.
    misuses: u64,
}

impl Pool {
    /// Allocates the region for `cfg` (taken as [`PoolConfig::effective`]); every buffer starts
    /// free.
    pub(crate) fn new(cfg: &PoolConfig) -> io::Result<Pool> {
        let cfg = cfg.effective();
        let total = cfg
            .buffers
            .checked_add(cfg.send_buffers)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "too many buffers"))?;
        let region = Region::new(cfg.buf_size, total)?;
        Ok(Pool {
            region: Some(region),
            size: cfg.buf_size,
            recv: cfg.buffers,
            owner: vec![Owner::Free; total as usize],
            recv_free: (0..cfg.buffers).rev().collect(),
            send_free: (cfg.buffers..total).rev().collect(),
            in_kernel: 0,
            misuses: 0,
        })
    }

    /// Bytes per buffer.
    pub(crate) fn buf_size(&self) -> u32 {
        self.size
    }

    /// Number of receive buffers.
    pub(crate) fn recv_count(&self) -> u32 {
        self.recv
    }

    /// Receive buffers on the free list (not the kernel's, not lent).
    pub(crate) fn free_recv(&self) -> usize {
        self.recv_free.len()
    }

    /// Receive buffers the kernel holds.
    pub(crate) fn in_kernel(&self) -> usize {
        self.in_kernel as usize
    }

    /// Hand-overs refused so far.
    pub(crate) fn misuses(&self) -> u64 {
        self.misuses
    }

    /// Who holds `buf` (`None`: no such buffer).
    pub(crate) fn owner(&self, buf: u32) -> Option<Owner> {
        self.owner.get(buf as usize).copied()
    }

    fn refuse(&mut self, buf: u32, action: &'static str) -> Misuse {
        self.misuses += 1;
        Misuse {
            buf,
            action,
            held_by: self.owner(buf),
        }
    }

    fn set(
        &mut self,
        buf: u32,
        from: Owner,
        to: Owner,
        action: &'static str,
    ) -> Result<(), Misuse> {
        match self.owner.get_mut(buf as usize) {
            Some(o) if *o == from => {
                *o = to;
                Ok(())
            }
            _ => Err(self.refuse(buf, action)),
        }
    }

    /// Takes a free receive buffer and hands it to the kernel (a posted receive, a read).
    pub(crate) fn take_recv(&mut self) -> Option<u32> {
        let buf = self.recv_free.pop()?;
        self.owner[buf as usize] = Owner::Kernel;
        self.in_kernel += 1;
        Some(buf)
    }

    /// A receive completed into `buf` with data: the kernel lends it to the state machine.
    pub(crate) fn lend(&mut self, buf: u32) -> Result<(), Misuse> {
        if buf >= self.recv {
            return Err(self.refuse(buf, "lent by a receive"));
        }
        self.set(buf, Owner::Kernel, Owner::Lent, "lent by a receive")?;
        self.in_kernel -= 1;
        Ok(())
    }

    /// A receive that named `buf` ended without data: the buffer is free again.
    pub(crate) fn unpost(&mut self, buf: u32) -> Result<(), Misuse> {
        if buf >= self.recv {
            return Err(self.refuse(buf, "returned by a receive"));
        }
        self.set(buf, Owner::Kernel, Owner::Free, "returned by a receive")?;
        self.in_kernel -= 1;
        self.recv_free.push(buf);
        Ok(())
    }

    /// The state machine gives `buf` back. A receive buffer goes to the kernel when
    /// `recv_to_kernel` (io_uring's ring: the caller publishes it), else to the free list;
    /// an allocated buffer goes to its free list.
    pub(crate) fn release(&mut self, buf: u32, recv_to_kernel: bool) -> Result<Returned, Misuse> {
        let is_recv = buf < self.recv;
        let to = if is_recv && recv_to_kernel {
            Owner::Kernel
        } else {
            Owner::Free
        };
        self.set(buf, Owner::Lent, to, "released")?;
        match (is_recv, to) {
            (true, Owner::Kernel) => {
                self.in_kernel += 1;
                return Ok(Returned::Kernel);
            }
            (true, _) => self.recv_free.push(buf),
            (false, _) => self.send_free.push(buf),
        }
        Ok(Returned::Free)
    }

    /// Lends a buffer for the caller's own bytes.
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let buf = self.send_free.pop()?;
        self.owner[buf as usize] = Owner::Lent;
        Some(buf)
    }

    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("the region lives until the pool is dropped")
    }

    /// Checks that `buf` is lent and `off..off + len` lies inside it.
    pub(crate) fn check_lent(
        &mut self,
        buf: u32,
        off: u32,
        len: u32,
        action: &'static str,
    ) -> Result<(), Misuse> {
        if self.owner(buf) != Some(Owner::Lent) {
            return Err(self.refuse(buf, action));
        }
        if off as u64 + len as u64 > self.size as u64 {
            return Err(self.refuse(buf, "addressed past its end"));
        }
        Ok(())
    }

    /// The address of byte `off` of a lent buffer, for a send; `None` (counted) when the
    /// buffer is not lent or the range does not fit.
    pub(crate) fn send_ptr(&mut self, buf: u32, off: u32, len: u32) -> Result<*const u8, Misuse> {
        self.check_lent(buf, off, len, "sent while not lent")?;
        Ok(self.region().addr(buf, off) as *const u8)
    }

    /// The address of a buffer the kernel holds, for a receive into it.
    pub(crate) fn recv_ptr(&self, buf: u32) -> *mut u8 {
        assert_eq!(
            self.owner(buf),
            Some(Owner::Kernel),
            "buffer {buf} posted to a receive while not the kernel's"
        );
        self.region().addr(buf, 0)
    }

    /// The bytes of a lent buffer. Panics on any other owner: a slice of a buffer the kernel
    /// may write would be unsound.
    pub(crate) fn bytes(&self, buf: u32) -> &[u8] {
        assert_eq!(
            self.owner(buf),
            Some(Owner::Lent),
            "buffer {buf} read while not lent"
        );
        // SAFETY: the buffer is lent: no receive names it and it is in no provided ring, so
        // the kernel does not write it while the slice lives (a posted send only reads it).
        unsafe { self.region().bytes(buf) }
    }

    /// The bytes of a lent buffer, to write. Panics on any other owner. The caller must not
    /// rewrite bytes a posted send still names (the state machine never does: it only writes
    /// past the bytes queued, or into buffers no send names).
    pub(crate) fn bytes_mut(&mut self, buf: u32) -> &mut [u8] {
        assert_eq!(
            self.owner(buf),
            Some(Owner::Lent),
            "buffer {buf} written while not lent"
        );
        let r = self
            .region
            .as_mut()
            .expect("the region lives until the pool is dropped");
        // SAFETY: lent, so the kernel neither writes it nor hands it to a receive; `&mut self`
        // makes this the only slice of it made through the pool.
        unsafe { r.bytes_mut(buf) }
    }

    /// Copies `len` bytes from the start of lent buffer `src` to offset `at` of lent buffer
    /// `dst` (a small receive appended to the connection's last queued buffer).
    pub(crate) fn copy(&mut self, dst: u32, at: u32, src: u32, len: u32) -> Result<(), Misuse> {
        if dst == src {
            return Err(self.refuse(dst, "copied onto itself"));
        }
        self.check_lent(src, 0, len, "copied from while not lent")?;
        self.check_lent(dst, at, len, "copied into while not lent")?;
        let r = self.region();
        let (from, to) = (r.addr(src, 0), r.addr(dst, at));
        // SAFETY: both buffers are lent (checked), distinct, and the ranges lie inside them
        // (checked), so the ranges do not overlap; the kernel writes neither (lent buffers
        // are in no receive), and the state machine promises that no posted send names the
        // bytes `at..at + len` of `dst` (they lie past every byte it has queued).
        unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to, len as usize) };
        Ok(())
    }

    /// [`Pool::copy`], with a refusal reported (see [`report`]) rather than returned: what a
    /// backend's `Submit::copy` does.
    pub(crate) fn copy_reported(&mut self, dst: u32, at: u32, src: u32, len: u32) {
        if let Err(m) = self.copy(dst, at, src, len) {
            report(&m, self.misuses);
        }
    }

    /// [`Pool::release`], with a refusal reported (see [`report`]) rather than returned: what
    /// a backend's `Submit::release` does. `None` when refused.
    pub(crate) fn release_reported(&mut self, buf: u32, recv_to_kernel: bool) -> Option<Returned> {
        self.release(buf, recv_to_kernel)
            .map_err(|m| report(&m, self.misuses))
            .ok()
    }

    /// Gives up the region without freeing it: the kernel may still write into it.
    pub(crate) fn leak(&mut self) {
        std::mem::forget(self.region.take());
    }

    /// The raw address of byte `off` of `buf`, whoever holds it (for handing buffers to the
    /// kernel's ring, which the caller has just made the kernel's).
    pub(crate) fn addr(&self, buf: u32, off: u32) -> *mut u8 {
        self.region().addr(buf, off)
    }
}

/// The `Submit` methods a backend answers from its `pool` field alone, written once: the
/// buffer size, the checked copy, and the free and total receive buffers for a backend that
/// takes a receive buffer when it reads (epoll, IOCP; io_uring counts its ring instead).
/// Used inside `impl Submit`: `crate::pool::pool_submit_methods!();`.
macro_rules! pool_submit_methods {
    () => {
        fn buf_size(&self) -> u32 {
            self.pool.buf_size()
        }

        fn copy(
            &mut self,
            dst: echoport_core::BufId,
            at: u32,
            src: echoport_core::BufId,
            len: u32,
        ) {
            self.pool.copy_reported(dst.0, at, src.0, len);
        }

        fn free_buffers(&self) -> usize {
            self.pool.free_recv()
        }

        fn total_buffers(&self) -> usize {
            self.pool.recv_count() as usize
        }
    };
}

/// The `Backend` methods that lend buffers, answered from the `pool` field (its ownership
/// checks included), written once. Used inside `impl Backend`:
/// `crate::pool::pool_backend_methods!();`.
macro_rules! pool_backend_methods {
    () => {
        fn buf(&self, buf: echoport_core::BufId) -> &[u8] {
            self.pool.bytes(buf.0)
        }

        fn alloc_buf(&mut self) -> Option<echoport_core::BufId> {
            self.pool.alloc().map(echoport_core::BufId)
        }

        fn buf_mut(&mut self, buf: echoport_core::BufId) -> &mut [u8] {
            self.pool.bytes_mut(buf.0)
        }
    };
}

pub(crate) use {pool_backend_methods, pool_submit_methods};

/// Reports a refused hand-over (`count` refused so far): a bug in the caller, so a debug
/// build stops on it; a release build logs the first few and goes on (the hand-over changed
/// nothing, and the counter shows in the stopped line).
pub(crate) fn report(m: &Misuse, count: u64) {
    debug_assert!(false, "buffer pool: {m}");
    if count <= 8 {
        tracing::error!(%m, "buffer pool refused a hand-over (a bug; the buffer was not reused)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Pool {
        Pool::new(&PoolConfig {
            buf_size: 64,
            buffers: 4,
            send_buffers: 2,
        })
        .unwrap()
    }

    #[test]
    fn a_buffer_walks_free_kernel_lent_free() {
        let mut p = small();
        let b = p.take_recv().unwrap();
        assert_eq!(p.owner(b), Some(Owner::Kernel));
        assert_eq!(p.in_kernel(), 1);
        p.lend(b).unwrap();
        assert_eq!(p.owner(b), Some(Owner::Lent));
        assert_eq!(p.release(b, false), Ok(Returned::Free));
        assert_eq!(p.owner(b), Some(Owner::Free));
        assert_eq!(p.free_recv(), 4);
        assert_eq!(p.misuses(), 0);
    }

    #[test]
    fn a_double_release_is_refused_and_counted() {
        let mut p = small();
        let b = p.take_recv().unwrap();
        p.lend(b).unwrap();
        p.release(b, true).unwrap();
        let err = p.release(b, true).unwrap_err();
        assert_eq!(err.held_by, Some(Owner::Kernel));
        assert_eq!(p.misuses(), 1);
        // Nothing changed: the buffer is the kernel's once, not twice.
        assert_eq!(p.in_kernel(), 1);
        assert!(err.to_string().contains("released"), "{err}");
    }

    #[test]
    fn releasing_a_buffer_the_caller_never_held_is_refused() {
        let mut p = small();
        // Free, never lent.
        assert_eq!(p.release(0, false).unwrap_err().held_by, Some(Owner::Free));
        // In the kernel's hands.
        let b = p.take_recv().unwrap();
        assert_eq!(
            p.release(b, false).unwrap_err().held_by,
            Some(Owner::Kernel)
        );
        // No such buffer.
        assert_eq!(p.release(99, false).unwrap_err().held_by, None);
        assert_eq!(p.misuses(), 3);
        assert_eq!(p.free_recv(), 3, "nothing was put on the free list");
    }

    #[test]
    fn lending_twice_or_lending_a_send_buffer_is_refused() {
        let mut p = small();
        let b = p.take_recv().unwrap();
        p.lend(b).unwrap();
        assert!(p.lend(b).is_err());
        let s = p.alloc().unwrap();
        assert!(s >= 4);
        assert!(p.lend(s).is_err());
        assert_eq!(p.misuses(), 2);
    }

    #[test]
    fn sends_and_copies_need_lent_buffers_and_ranges_inside() {
        let mut p = small();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        p.bytes_mut(a)[..3].copy_from_slice(b"abc");
        p.copy(b, 10, a, 3).unwrap();
        assert_eq!(&p.bytes(b)[10..13], b"abc");
        assert!(p.copy(b, 62, a, 3).is_err(), "past the end");
        assert!(p.copy(a, 0, a, 3).is_err(), "onto itself");
        assert!(p.send_ptr(a, 0, 64).is_ok());
        assert!(p.send_ptr(a, 1, 64).is_err());
        assert!(p.send_ptr(0, 0, 1).is_err(), "a free buffer");
        assert_eq!(p.misuses(), 4);
    }

    #[test]
    #[should_panic(expected = "read while not lent")]
    fn reading_a_buffer_the_kernel_holds_panics() {
        let mut p = small();
        let b = p.take_recv().unwrap();
        let _ = p.bytes(b);
    }

    #[test]
    fn the_effective_config_rounds_and_clamps() {
        let c = PoolConfig {
            buf_size: 1,
            buffers: 3,
            send_buffers: 0,
        }
        .effective();
        assert_eq!((c.buf_size, c.buffers), (64, 4));
        let c = PoolConfig {
            buf_size: u32::MAX,
            buffers: 0,
            send_buffers: 0,
        }
        .effective();
        assert_eq!((c.buf_size, c.buffers), (1 << 24, 1));
        assert_eq!(PoolConfig::default().effective(), PoolConfig::default());
    }

    #[test]
    fn alloc_runs_out_and_comes_back() {
        let mut p = small();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        assert!(p.alloc().is_none());
        p.release(a, true).unwrap();
        assert_eq!(
            p.owner(a),
            Some(Owner::Free),
            "send buffers never go to the kernel"
        );
        assert_eq!(p.alloc(), Some(a));
        p.release(b, false).unwrap();
    }
}
