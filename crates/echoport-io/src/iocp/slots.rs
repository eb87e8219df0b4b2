//! The slots overlapped calls run in: each a separate heap allocation, never moved, whose
//! first field is the call's `OVERLAPPED` (the kernel hands back its address), and the
//! per-connection tables that find a connection's pending receive and send.
//!
//! A slot whose call returned success or `WSA_IO_PENDING` belongs to the kernel until its
//! completion is reaped; only then does it go back to the free list (`free_op`).

use std::mem::size_of;
use std::ptr::NonNull;

use windows_sys::Win32::Networking::WinSock::{INVALID_SOCKET, SOCKADDR_STORAGE, SOCKET};
use windows_sys::Win32::System::IO::OVERLAPPED;

use super::Iocp;

/// No slot, no buffer.
pub(super) const NONE: u32 = u32::MAX;
/// Bytes `AcceptEx` needs for each of the local and remote address.
pub(super) const ACCEPT_ADDR_LEN: usize = size_of::<SOCKADDR_STORAGE>() + 16;

/// A receive or send in flight. `ov` must stay first: the kernel hands back its address.
#[repr(C)]
pub(super) struct OpSlot {
    /// The call's `OVERLAPPED`, written by the kernel while the call is pending.
    pub(super) ov: OVERLAPPED,
    /// `Token::pack(kind)` of the operation.
    pub(super) user: u64,
    /// The connection's socket.
    pub(super) sock: SOCKET,
    /// The receive buffer (the pool's `Owner::Kernel` while the receive is posted), or
    /// `NONE` for a zero-byte receive and for sends.
    pub(super) buf: u32,
    /// Bytes a receive with a buffer asks for: the connection's allowance, at most a buffer.
    pub(super) want: u32,
    /// `WSARecv` flags (in and out).
    pub(super) flags: u32,
    /// This slot's index in `Iocp::ops`.
    pub(super) index: u32,
    /// A call is pending on the slot (the kernel holds it).
    pub(super) busy: bool,
    /// Cancellation was requested: a zero-byte receive that completes anyway must not post
    /// the real receive (which nobody would cancel).
    pub(super) cancel: bool,
}

/// An `AcceptEx` in flight. `ov` must stay first.
#[repr(C)]
pub(super) struct AcceptSlot {
    /// The call's `OVERLAPPED`, written by the kernel while the call is pending.
    pub(super) ov: OVERLAPPED,
    /// The listener's index in `Iocp::listeners`.
    pub(super) listener: u32,
    /// The socket the connection will be accepted into, or `INVALID_SOCKET`.
    pub(super) sock: SOCKET,
    /// An `AcceptEx` is pending on the slot (the kernel holds it).
    pub(super) posted: bool,
    /// Where `AcceptEx` writes the local and remote addresses.
    pub(super) addrs: [u8; 2 * ACCEPT_ADDR_LEN],
}

// The kernel hands back the OVERLAPPED's address; both slot kinds start with it.
const _: () = assert!(std::mem::offset_of!(OpSlot, ov) == 0);
const _: () = assert!(std::mem::offset_of!(AcceptSlot, ov) == 0);

impl AcceptSlot {
    /// A new idle accept slot of listener `l`, on the heap for good (freed in `Drop`).
    pub(super) fn boxed(l: u32) -> NonNull<AcceptSlot> {
        let a = Box::new(AcceptSlot {
            // SAFETY: all-zero is the valid initial state of an OVERLAPPED.
            ov: unsafe { std::mem::zeroed() },
            listener: l,
            sock: INVALID_SOCKET,
            posted: false,
            addrs: [0; 2 * ACCEPT_ADDR_LEN],
        });
        NonNull::new(Box::into_raw(a)).expect("Box is non-null")
    }
}

impl Iocp {
    /// The address of operation slot `i`.
    pub(super) fn op(&self, i: u32) -> *mut OpSlot {
        self.ops[i as usize].as_ptr()
    }

    /// A free operation slot, tagged for `user` on socket `s`.
    pub(super) fn take_op(&mut self, user: u64, s: SOCKET) -> u32 {
        let i = match self.free_ops.pop() {
            Some(i) => i,
            None => self.new_op(),
        };
        let p = self.op(i);
        // SAFETY: slot `i` came from the free list (or was just made), so no operation is
        // pending on it and the kernel holds no reference to it.
        unsafe {
            (*p).user = user;
            (*p).sock = s;
            (*p).buf = NONE;
            (*p).want = 0;
            (*p).cancel = false;
        }
        i
    }

    /// Allocates one more operation slot; it lives until `Drop`.
    fn new_op(&mut self) -> u32 {
        let i = self.ops.len() as u32;
        let slot = Box::new(OpSlot {
            // SAFETY: OVERLAPPED is plain data for which all-zero is the valid initial state.
            ov: unsafe { std::mem::zeroed() },
            user: 0,
            sock: INVALID_SOCKET,
            buf: NONE,
            want: 0,
            flags: 0,
            index: i,
            busy: false,
            cancel: false,
        });
        self.ops
            .push(NonNull::new(Box::into_raw(slot)).expect("Box is non-null"));
        i
    }

    /// Puts slot `i` back on the free list.
    pub(super) fn free_op(&mut self, i: u32) {
        let p = self.op(i);
        // SAFETY: called only when the slot's operation completed or was never started, so
        // the kernel no longer references it.
        unsafe { (*p).busy = false };
        self.free_ops.push(i);
    }
}

/// Records slot `i` as connection `id`'s pending operation in `table`.
pub(super) fn set_slot(table: &mut Vec<u32>, id: u32, i: u32) {
    let id = id as usize;
    if table.len() <= id {
        table.resize(id + 1, NONE);
    }
    table[id] = i;
}

/// Forgets slot `i` as connection `id`'s pending operation (if it still is).
pub(super) fn clear_slot(table: &mut [u32], id: u32, i: u32) {
    if let Some(x) = table.get_mut(id as usize).filter(|x| **x == i) {
        *x = NONE;
    }
}
