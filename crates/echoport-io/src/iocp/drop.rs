//! Dropping a port: close the listeners, cancel whatever is still posted and wait, bounded,
//! for the kernel to let go of it. Slots and buffers the kernel might still write are freed
//! only when nothing is in flight; otherwise they are leaked on purpose, never freed under
//! the kernel.

use std::ptr::addr_of;
use std::time::{Duration, Instant};

use echoport_core::Completion;
use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::Networking::WinSock::SOCKET;
use windows_sys::Win32::System::IO::CancelIoEx;

use super::port::close_socket;
use super::Iocp;

/// How long a drop waits for cancelled operations to finish.
const DRAIN: Duration = Duration::from_secs(2);

impl Drop for Iocp {
    fn drop(&mut self) {
        for l in 0..self.listeners.len() {
            self.close_listener(l);
        }
        self.cancel_all();
        // Wait (bounded) for the kernel to let go of every slot and buffer.
        let deadline = Instant::now() + DRAIN;
        let mut sink = Vec::new();
        while self.inflight > 0 && Instant::now() < deadline {
            if self.reap(10, &mut sink).is_err() {
                break;
            }
            close_accepted(&mut sink);
        }
        // Accepted sockets dealt to us before we left the group, still queued.
        let _ = self.reap(0, &mut sink);
        close_accepted(&mut sink);
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

/// Closes the sockets of accepts reaped while draining (nobody will take them).
fn close_accepted(sink: &mut Vec<Completion>) {
    for c in sink.drain(..) {
        if let Completion::Accept {
            result: Ok(sock), ..
        } = c
        {
            close_socket(sock.0 as SOCKET);
        }
    }
}

impl Iocp {
    /// Requests cancellation of every pending receive and send.
    fn cancel_all(&mut self) {
        for p in &self.ops {
            let p = p.as_ptr();
            // SAFETY: reads fields the kernel never writes; a busy slot's socket is still
            // open (the state machine closes only after completions), and CancelIoEx only
            // looks the OVERLAPPED up by address.
            unsafe {
                if (*p).busy {
                    CancelIoEx((*p).sock as HANDLE, addr_of!((*p).ov));
                }
            }
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
