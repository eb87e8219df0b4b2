//! The provided-buffer ring shared with the kernel (`IORING_REGISTER_PBUF_RING`): where
//! multishot receives pick their buffers. It holds addresses only; which buffer is where is
//! the pool's record (`pool.rs`), and a buffer enters this ring only when the pool has just
//! made it the kernel's.

use std::alloc::Layout;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{IoUring, types};

/// Buffer group id of the provided buffer ring.
pub(super) const BGID: u16 = 0;

/// The ring of buffer addresses the kernel takes receive buffers from.
pub(super) struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: Layout,
    mask: u16,
    tail: u16,
    dirty: bool,
}

impl BufRing {
    /// Allocates a ring of `count` entries (a power of two) and registers it with `ring`.
    pub(super) fn register(ring: &IoUring, count: u32) -> io::Result<BufRing> {
        let layout = Layout::from_size_align(
            count as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer ring too large"))?;
        // SAFETY: non-zero size; zeroed memory is a valid empty ring (tail 0).
        let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        if entries.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate buffer ring",
            ));
        }
        // SAFETY: `entries` points at `count` zeroed, page-aligned entries that stay allocated
        // until `free` after unregistering (or forever, when the ring cannot be drained),
        // which is longer than the registration lives.
        let reg = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count as u16, BGID, 0)
        };
        if let Err(e) = reg {
            // SAFETY: allocated just above with this layout and never registered.
            unsafe { std::alloc::dealloc(entries as *mut u8, layout) };
            return Err(e);
        }
        Ok(BufRing {
            entries,
            layout,
            mask: (count - 1) as u16,
            tail: 0,
            dirty: false,
        })
    }

    /// Puts buffer `bid` (at `addr`, `len` bytes) in the ring; visible after `publish`.
    /// The caller has just made the buffer the kernel's in the pool, which holds at most
    /// `mask + 1` receive buffers: so at most that many entries are ever outstanding, and
    /// the slot written here is one the kernel has finished with.
    pub(super) fn add(&mut self, bid: u16, addr: *mut u8, len: u32) {
        // SAFETY: the index is masked into the ring's `mask + 1` entries, allocated in
        // `register`; the kernel reads only entries between its head and our published tail,
        // and this one is past the published tail until `publish` (the pool hands each
        // buffer to the kernel once, so the tail never laps the kernel's head).
        let e = unsafe { &mut *self.entries.add((self.tail & self.mask) as usize) };
        e.set_addr(addr as u64);
        e.set_len(len);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
    }

    /// Makes every added buffer visible to the kernel (one release store per loop turn).
    pub(super) fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        // SAFETY: the tail field lives in the first entry of the live ring allocation and is
        // u16-aligned; the kernel only reads it, and the release store orders the entry writes
        // before it, as the buffer-ring protocol requires.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Unregisters the ring and frees its entries; only when no receive can pick from it.
    pub(super) fn free(self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(BGID);
        // SAFETY: unregistered (or the ring is idle and about to close, nothing in flight);
        // allocated with this layout in `register`.
        unsafe { std::alloc::dealloc(self.entries as *mut u8, self.layout) };
    }
}
