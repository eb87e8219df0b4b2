//! The completion port itself: the handle shared by a backend and its wakers, the keys its
//! packets arrive under, the waker, and Winsock's start-up.

use std::io;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use echoport_core::Waker;
use windows_sys::Win32::Foundation::{
    CloseHandle, GetLastError, HANDLE, INVALID_HANDLE_VALUE, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    SOCKET, WSADATA, WSAGetLastError, WSAStartup, closesocket,
};
use windows_sys::Win32::System::IO::{
    CreateIoCompletionPort, GetQueuedCompletionStatusEx, OVERLAPPED, OVERLAPPED_ENTRY,
    PostQueuedCompletionStatus,
};

/// Completion key of connection sockets: the `OVERLAPPED` is the head of an `OpSlot`.
pub(super) const KEY_SOCKET: usize = 1;
/// Completion key of listening sockets: the `OVERLAPPED` is the head of an `AcceptSlot`.
pub(super) const KEY_LISTENER: usize = 2;
/// A wake-up posted by [`PortWaker`]; carries nothing.
pub(super) const KEY_WAKE: usize = 3;
/// An accepted socket dealt to this port by the group's acceptor: `lpOverlapped` carries the
/// `SOCKET` value (it is not a pointer), the byte count the listener index in this backend.
pub(super) const KEY_HANDOFF: usize = 4;

/// Makes sure Winsock is initialised (idempotent; counted by Winsock, never cleaned up).
pub(super) fn winsock_init() -> io::Result<()> {
    static DONE: OnceLock<i32> = OnceLock::new();
    let rc = *DONE.get_or_init(|| {
        let mut data = MaybeUninit::<WSADATA>::uninit();
        // SAFETY: WSAStartup writes a WSADATA into the buffer we pass; we never read it.
        unsafe { WSAStartup(0x0202, data.as_mut_ptr()) }
    });
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The calling thread's last Winsock error.
pub(super) fn last_wsa_error() -> i32 {
    // SAFETY: reads the calling thread's last Winsock error; no arguments.
    unsafe { WSAGetLastError() }
}

/// Closes a socket this backend owns, once: a listener it registered, the socket an accept
/// slot was posted with, an accepted socket nobody took, or a connection the state machine
/// closes. Module-private: every caller owns `s` and never names it again (a second close
/// could hit a reused handle). Pending operations on it complete as aborted; their slots
/// outlive those completions.
pub(super) fn close_socket(s: SOCKET) {
    // SAFETY: `s` is a socket this backend owns and stops using here (see above); closing it
    // touches no memory of ours.
    unsafe { closesocket(s) };
}

/// A completion port handle, closed when the last owner (backend, wakers, group) lets go.
pub(super) struct Port(HANDLE);

// SAFETY: a completion port handle may be used from any thread; the kernel serialises every
// operation on it. The handle is closed only in `Drop`, when no other owner remains.
unsafe impl Send for Port {}
// SAFETY: as above; `&Port` only allows posting packets, associating handles and dequeuing.
unsafe impl Sync for Port {}

impl Port {
    /// A new port, for one concurrent thread.
    pub(super) fn new() -> io::Result<Port> {
        // SAFETY: creating a new port: no existing handles are passed; one concurrent thread.
        let h = unsafe { CreateIoCompletionPort(INVALID_HANDLE_VALUE, ptr::null_mut(), 0, 1) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Port(h))
    }

    /// Ties a socket to this port: its overlapped completions will arrive here under `key`.
    pub(super) fn associate(&self, s: SOCKET, key: usize) -> io::Result<()> {
        // SAFETY: `s` is a live socket owned by the caller and `self.0` a live port.
        let h = unsafe { CreateIoCompletionPort(s as HANDLE, self.0, key, 0) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Queues a packet of our own (a wake-up, a handed-over socket).
    pub(super) fn post(&self, bytes: u32, key: usize, ov: usize) -> io::Result<()> {
        // SAFETY: the port is live; `ov` is passed through untouched by the kernel (it is
        // never a pointer for our posted keys, see KEY_WAKE and KEY_HANDOFF).
        if unsafe { PostQueuedCompletionStatus(self.0, bytes, key, ov as *const OVERLAPPED) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Dequeues up to `entries.len()` packets, waiting at most `ms` milliseconds; returns how
    /// many were filled in (0 when the wait timed out).
    pub(super) fn dequeue(&self, entries: &mut [OVERLAPPED_ENTRY], ms: u32) -> io::Result<usize> {
        let mut n = 0u32;
        // SAFETY: `entries` is a live slice of initialised elements of the length passed, for
        // the kernel to overwrite; the port is live.
        let ok = unsafe {
            GetQueuedCompletionStatusEx(
                self.0,
                entries.as_mut_ptr(),
                entries.len() as u32,
                &mut n,
                ms,
                0,
            )
        };
        if ok == 0 {
            // SAFETY: reads the calling thread's last error; no arguments.
            let e = unsafe { GetLastError() };
            if e == WAIT_TIMEOUT {
                return Ok(0);
            }
            return Err(io::Error::from_raw_os_error(e as i32));
        }
        Ok(n as usize)
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the last owner closes the handle it created, once.
        unsafe { CloseHandle(self.0) };
    }
}

/// Wakes the loop by posting a packet to its port (at most one outstanding at a time).
pub(super) struct PortWaker {
    /// The port to post to (shared: a late wake-up never posts to a closed, reused handle).
    port: Arc<Port>,
    /// A wake-up packet is queued and not yet reaped.
    posted: AtomicBool,
}

impl PortWaker {
    /// A waker for `port`.
    pub(super) fn new(port: Arc<Port>) -> PortWaker {
        PortWaker {
            port,
            posted: AtomicBool::new(false),
        }
    }

    /// The wake-up packet was reaped: the next `wake` posts another.
    pub(super) fn reaped(&self) {
        self.posted.store(false, Ordering::Release);
    }
}

impl Waker for PortWaker {
    fn wake(&self) {
        if !self.posted.swap(true, Ordering::AcqRel) && self.port.post(0, KEY_WAKE, 0).is_err() {
            self.posted.store(false, Ordering::Release);
        }
    }
}
