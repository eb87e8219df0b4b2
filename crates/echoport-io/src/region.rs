//! The buffer region the completion backends (io_uring, IOCP) lend from: equally sized
//! buffers in one allocation made at start, never moved, and freed only when no operation of
//! the kernel's can still touch it (a backend that cannot be sure leaks it instead).
//!
//! Who owns a buffer at any moment (the kernel, the state machine, or a posted send) is each
//! backend's rule; this type only hands out addresses and, to a caller that vouches for that
//! rule, slices.

use std::alloc::Layout;
use std::io;
use std::ptr::NonNull;

/// One allocation of `count` buffers of `size` bytes each.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Bytes per buffer.
    pub(crate) size: u32,
    /// Number of buffers.
    pub(crate) count: u32,
}

impl Region {
    /// Allocates the region, zeroed, and touches every page now: the pool's memory is paid
    /// for up front and stays flat, instead of growing as the kernel cycles through the
    /// buffers. On Linux a region of 2 MiB or more is aligned and advised for transparent
    /// huge pages, so the kernel's copies into receive buffers, which cycle through the whole
    /// pool, miss the TLB on a handful of pages rather than thousands.
    pub(crate) fn new(size: u32, count: u32) -> io::Result<Region> {
        let bytes = size as usize * count as usize;
        const HUGE: usize = 2 << 20;
        let huge = cfg!(target_os = "linux") && bytes >= HUGE;
        let layout = Layout::from_size_align(bytes.max(1), if huge { HUGE } else { 4096 })
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer region too large"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate buffers"))?;
        #[cfg(target_os = "linux")]
        if huge {
            // SAFETY: advice only, on memory this allocation owns; failure (THP off) is
            // harmless and ignored.
            unsafe { libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE) };
        }
        for page in (0..layout.size()).step_by(4096) {
            // SAFETY: `page` < `layout.size()`, inside the fresh allocation. Volatile, so the
            // write (of the zero already there) is not optimised away and the page becomes
            // resident now.
            unsafe { std::ptr::write_volatile(ptr.as_ptr().add(page), 0) };
        }
        Ok(Region {
            ptr,
            layout,
            size,
            count,
        })
    }

    /// The address of byte `off` of buffer `buf` (`off` may be one past the end).
    pub(crate) fn addr(&self, buf: u32, off: u32) -> *mut u8 {
        assert!(
            buf < self.count && off <= self.size,
            "buffer {buf} offset {off} out of range"
        );
        // SAFETY: buf < count and off <= size keep the pointer inside (or one past) the region.
        unsafe {
            self.ptr
                .as_ptr()
                .add(buf as usize * self.size as usize + off as usize)
        }
    }

    /// All of buffer `buf`.
    ///
    /// # Safety
    /// Nothing (the kernel included) may write the buffer while the slice lives: the caller
    /// holds it lent (received, not yet released) or allocated, under its backend's rule.
    pub(crate) unsafe fn bytes(&self, buf: u32) -> &[u8] {
        // SAFETY: in bounds (checked by `addr`), initialised (zeroed at allocation), and not
        // written meanwhile (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.addr(buf, 0), self.size as usize) }
    }

    /// All of buffer `buf`, to write.
    ///
    /// # Safety
    /// Nothing else (the kernel included) may read or write the buffer while the slice lives:
    /// it is allocated to the caller and in no posted operation.
    pub(crate) unsafe fn bytes_mut(&mut self, buf: u32) -> &mut [u8] {
        // SAFETY: in bounds, initialised, and exclusively the caller's (its promise; `&mut
        // self` rules out another slice made through this region meanwhile).
        unsafe { std::slice::from_raw_parts_mut(self.addr(buf, 0), self.size as usize) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; a backend that might still have the
        // kernel write into the region leaks it (`mem::forget`) instead of dropping it.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
