//! Dropping a port: stop accepting, cancel whatever is still posted, close every connection
//! socket still open (the state machine that owned them is gone), and reap, bounded in time,
//! until nothing is left: every pending call's packet, and every socket the group's acceptor
//! handed over before this backend left the group, however many are queued.
//!
//! Nothing is posted while draining, and packets are only accounted for, never handed on.
//! Slots and buffers the kernel might still write are freed only when nothing is in flight;
//! otherwise they are leaked on purpose, never freed under the kernel.

use std::ptr::addr_of;
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::Networking::WinSock::{INVALID_SOCKET, SOCKET};
use windows_sys::Win32::System::IO::{CancelIoEx, OVERLAPPED_ENTRY};

use super::Iocp;
use super::port::{KEY_HANDOFF, KEY_LISTENER, KEY_SOCKET, KEY_WAKE, close_socket};
use super::slots::{AcceptSlot, NONE, OpSlot};

/// How long a drop waits for cancelled operations to finish.
const DRAIN: Duration = Duration::from_secs(2);

impl Drop for Iocp {
    fn drop(&mut self) {
        for l in 0..self.listeners.len() {
            // Leaves the groups: from here no socket is handed to this port any more.
            self.close_listener(l);
        }
        self.cancel_all();
        for s in std::mem::take(&mut self.conns) {
            // Aborts whatever is still pending on it; the slots outlive those completions.
            close_socket(s);
        }
        self.drain(Instant::now() + DRAIN);
        if self.inflight > 0 {
            tracing::warn!(
                inflight = self.inflight,
                receive_buffers = self.pool.in_kernel(),
                "IOCP operations did not finish; leaking their memory"
            );
            self.pool.leak();
            return;
        }
        self.free_slots();
    }
}

impl Iocp {
    /// Requests cancellation of every pending receive and send, marking each cancelled (a
    /// zero-byte receive that completes anyway then posts nothing).
    fn cancel_all(&mut self) {
        for p in &self.ops {
            let p = p.as_ptr();
            // SAFETY: touches fields the kernel never writes; a busy slot's socket is still
            // open (the state machine closes only after completions, and the drop closes
            // connections only after this), and CancelIoEx only looks the OVERLAPPED up by
            // address.
            unsafe {
                if (*p).busy {
                    (*p).cancel = true;
                    CancelIoEx((*p).sock as HANDLE, addr_of!((*p).ov));
                }
            }
        }
    }

    /// Reaps until nothing is in flight and nothing is queued, or until `deadline`.
    fn drain(&mut self, deadline: Instant) {
        let mut entries = std::mem::take(&mut self.entries);
        loop {
            let ms = if self.inflight > 0 { 10 } else { 0 };
            let n = match self.port.dequeue(&mut entries, ms) {
                Ok(0) if self.inflight == 0 => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reap the port being dropped");
                    break;
                }
            };
            for e in &entries[..n] {
                self.drain_packet(e);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    inflight = self.inflight,
                    "gave up draining a dropped completion port"
                );
                break;
            }
        }
        self.entries = entries;
    }

    /// Accounts for one packet reaped while dropping: its slot is the backend's again, its
    /// buffer the pool's, an accepted or handed-over socket is closed.
    fn drain_packet(&mut self, e: &OVERLAPPED_ENTRY) {
        match e.lpCompletionKey {
            KEY_SOCKET => {
                self.inflight -= 1;
                let p = e.lpOverlapped as *mut OpSlot;
                // SAFETY: a KEY_SOCKET packet carries the OVERLAPPED of one of our operation
                // slots, allocated until the drop ends; its call has completed, so the kernel
                // no longer writes it.
                let (buf, i) = unsafe { ((*p).buf, (*p).index) };
                if buf != NONE {
                    // Received into or not, nobody will take it.
                    self.unpost(buf);
                }
                self.free_op(i);
            }
            KEY_LISTENER => {
                self.inflight -= 1;
                let p = e.lpOverlapped as *mut AcceptSlot;
                // SAFETY: as above, for one of our accept slots.
                let s = unsafe {
                    (*p).posted = false;
                    std::mem::replace(&mut (*p).sock, INVALID_SOCKET)
                };
                close_socket(s);
            }
            KEY_HANDOFF => close_socket(e.lpOverlapped as usize as SOCKET),
            KEY_WAKE => {}
            other => tracing::warn!(key = other, "completion with an unknown key"),
        }
    }

    /// Frees every slot; only when nothing is in flight.
    fn free_slots(&mut self) {
        debug_assert_eq!(self.inflight, 0);
        for p in self.ops.drain(..) {
            // SAFETY: nothing is in flight, so the kernel holds no slot; each was made by
            // Box::into_raw in `new_op` and is freed once.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
        for l in &mut self.listeners {
            for p in l.slots.drain(..) {
                // SAFETY: as above, for the boxes made by `AcceptSlot::boxed`.
                drop(unsafe { Box::from_raw(p.as_ptr()) });
            }
        }
    }
}
