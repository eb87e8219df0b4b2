//! Accepting: `AcceptEx` posted ahead on each listener, each into a socket created
//! beforehand; a completed one is set up (`SO_UPDATE_ACCEPT_CONTEXT`, `TCP_NODELAY`) and dealt
//! to this thread or another member of the listener's group, and its slot is posted again.

use std::io;
use std::mem::size_of;
use std::os::windows::io::IntoRawSocket;
use std::ptr::{self, NonNull, addr_of, addr_of_mut};
use std::sync::Arc;

use echoport_core::{Completion, ListenerId, Socket};
use windows_sys::Win32::Foundation::{
    ERROR_CONNECTION_ABORTED, ERROR_NETNAME_DELETED, ERROR_OPERATION_ABORTED,
};
use windows_sys::Win32::Networking::WinSock::{
    AF_INET, AF_INET6, INVALID_SOCKET, IPPROTO_TCP, LPFN_ACCEPTEX,
    SIO_GET_EXTENSION_FUNCTION_POINTER, SO_UPDATE_ACCEPT_CONTEXT, SOCK_STREAM, SOCKET,
    SOCKET_ERROR, SOL_SOCKET, TCP_NODELAY, WSA_FLAG_NO_HANDLE_INHERIT, WSA_FLAG_OVERLAPPED,
    WSA_IO_PENDING, WSAECONNABORTED, WSAECONNRESET, WSAETIMEDOUT, WSAID_ACCEPTEX, WSAIoctl,
    WSASocketW, setsockopt,
};
use windows_sys::Win32::System::IO::{OVERLAPPED, OVERLAPPED_ENTRY};

use super::Iocp;
use super::group::{Dealt, Group, Member};
use super::port::{KEY_LISTENER, KEY_SOCKET, close_socket, last_wsa_error};
use super::slots::{ACCEPT_ADDR_LEN, AcceptSlot};
use crate::sys::op_error;

/// `AcceptEx`, as `WSAIoctl` hands it out.
pub(super) type AcceptEx = unsafe extern "system" fn(
    SOCKET,
    SOCKET,
    *mut core::ffi::c_void,
    u32,
    u32,
    u32,
    *mut u32,
    *mut OVERLAPPED,
) -> windows_sys::core::BOOL;

/// A listener registered with this backend.
pub(super) struct ListenerSlot {
    /// The listening socket (acceptor only; `INVALID_SOCKET` once closed or for members).
    pub(super) sock: SOCKET,
    /// `AF_INET` or `AF_INET6`: the family of the sockets accepted into.
    family: i32,
    /// `AcceptEx` for this socket (acceptor only).
    accept_ex: Option<AcceptEx>,
    /// The accept slots posted ahead (acceptor only), each its own allocation.
    pub(super) slots: Vec<NonNull<AcceptSlot>>,
    /// The group serving the listener's address.
    group: Arc<Group>,
    /// This backend posts the group's accepts.
    acceptor: bool,
    /// The state machine wants connections (`Op::Accept` posted, not ended by an error).
    armed: bool,
    /// Not closed yet (`Op::CloseListener`, or the backend's drop).
    pub(super) open: bool,
}

/// Errors of an accept that mean the peer went away before it was accepted: try again.
fn is_peer_gone(code: i32) -> bool {
    code == WSAECONNRESET
        || code == WSAECONNABORTED
        || code == WSAETIMEDOUT
        || code == ERROR_NETNAME_DELETED as i32
        || code == ERROR_CONNECTION_ABORTED as i32
        || code == ERROR_OPERATION_ABORTED as i32
}

/// Looks up `AcceptEx` for a listening socket (a Winsock extension, not exported by name).
fn accept_ex_of(s: SOCKET) -> io::Result<AcceptEx> {
    let guid = WSAID_ACCEPTEX;
    let mut f: LPFN_ACCEPTEX = None;
    let mut bytes = 0u32;
    // SAFETY: in and out buffers are live locals of exactly the sizes passed; synchronous
    // call (no OVERLAPPED).
    let rc = unsafe {
        WSAIoctl(
            s,
            SIO_GET_EXTENSION_FUNCTION_POINTER,
            addr_of!(guid) as *const core::ffi::c_void,
            size_of::<windows_sys::core::GUID>() as u32,
            addr_of_mut!(f) as *mut core::ffi::c_void,
            size_of::<LPFN_ACCEPTEX>() as u32,
            &mut bytes,
            ptr::null_mut(),
            None,
        )
    };
    if rc == SOCKET_ERROR {
        return Err(io::Error::from_raw_os_error(last_wsa_error()));
    }
    f.ok_or_else(|| io::Error::other("WSAIoctl returned no AcceptEx"))
}

impl Iocp {
    /// Registers a listener: joins (or founds) its address's group; the acceptor ties the
    /// socket to its port and makes its accept slots.
    pub(super) fn register_listener(
        &mut self,
        listener: std::net::TcpListener,
    ) -> io::Result<ListenerId> {
        let addr = listener.local_addr()?;
        let l = self.listeners.len() as u32;
        let me = Member {
            backend: self.id,
            port: self.port.clone(),
            listener: l,
        };
        let (group, acceptor) = Group::join(addr, me);
        let mut slot = ListenerSlot {
            sock: INVALID_SOCKET,
            family: if addr.is_ipv6() { AF_INET6 } else { AF_INET } as i32,
            accept_ex: None,
            slots: Vec::new(),
            group,
            acceptor,
            armed: false,
            open: true,
        };
        if acceptor {
            self.make_acceptor(&mut slot, listener, l)?;
        }
        // A member's clone only named the group: another thread accepts for this address
        // and deals us our share (dropping the clone closes it).
        self.listeners.push(slot);
        Ok(ListenerId(l))
    }

    /// Takes over the listening socket of the group's acceptor: `AcceptEx`, the port, and
    /// `accepts_ahead` idle accept slots.
    fn make_acceptor(
        &mut self,
        slot: &mut ListenerSlot,
        listener: std::net::TcpListener,
        l: u32,
    ) -> io::Result<()> {
        // Overlapped operations do not depend on it, but keep the listener in blocking mode
        // so that no emulation layer turns a pending AcceptEx into WSAEWOULDBLOCK.
        let setup = listener.set_nonblocking(false).and_then(|()| {
            let s = listener.into_raw_socket() as SOCKET;
            slot.sock = s;
            slot.accept_ex = Some(accept_ex_of(s)?);
            self.port.associate(s, KEY_LISTENER)
        });
        if let Err(e) = setup {
            slot.group.leave(self.id, true);
            if slot.sock != INVALID_SOCKET {
                close_socket(slot.sock);
            }
            return Err(e);
        }
        slot.slots = (0..self.cfg.accepts_ahead)
            .map(|_| AcceptSlot::boxed(l))
            .collect();
        Ok(())
    }

    /// `Op::Accept`: the state machine wants connections from listener `l`.
    pub(super) fn push_accept(&mut self, l: usize) {
        let Some(lst) = self.listeners.get_mut(l).filter(|x| x.open) else {
            return;
        };
        lst.armed = true;
        if lst.acceptor {
            self.arm(l);
        }
    }

    /// Keeps `accepts_ahead` accepts posted on listener `l`; reports a failure to the loop.
    fn arm(&mut self, l: usize) {
        for k in 0..self.listeners[l].slots.len() {
            let p = self.listeners[l].slots[k].as_ptr();
            // SAFETY: `posted` is written only by this thread, never by the kernel.
            if unsafe { (*p).posted } {
                continue;
            }
            if let Err(e) = self.post_accept(l, k) {
                let c = self.accept_failed(l, e);
                self.synthetic.push(c);
                return;
            }
        }
    }

    /// Posts `AcceptEx` on accept slot `k` of listener `l`.
    fn post_accept(&mut self, l: usize, k: usize) -> Result<(), i32> {
        let lst = &self.listeners[l];
        let accept_ex = lst.accept_ex.expect("acceptors have AcceptEx");
        // SAFETY: WSASocketW takes no pointers here (no protocol info); an invalid result is
        // checked below.
        let s = unsafe {
            WSASocketW(
                lst.family,
                SOCK_STREAM,
                IPPROTO_TCP,
                ptr::null(),
                0,
                WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT,
            )
        };
        if s == INVALID_SOCKET {
            return Err(last_wsa_error());
        }
        let p = lst.slots[k].as_ptr();
        let mut bytes = 0u32;
        // SAFETY: accept slot `k` is not posted (callers check `posted`), so the kernel holds
        // no reference to it; from here it belongs to the kernel until the completion is
        // reaped in `wait` (or drained in `Drop`): the slot is a separate allocation that is
        // neither moved nor freed before then. The address buffer lives inside the slot.
        let ok = unsafe {
            ptr::write(addr_of_mut!((*p).ov), std::mem::zeroed());
            (*p).sock = s;
            (*p).posted = true;
            accept_ex(
                lst.sock,
                s,
                addr_of_mut!((*p).addrs) as *mut core::ffi::c_void,
                0,
                ACCEPT_ADDR_LEN as u32,
                ACCEPT_ADDR_LEN as u32,
                &mut bytes,
                addr_of_mut!((*p).ov),
            )
        };
        if ok == 0 {
            let e = last_wsa_error();
            if e != WSA_IO_PENDING {
                // SAFETY: the call failed, so the kernel does not hold the slot.
                unsafe {
                    (*p).posted = false;
                    (*p).sock = INVALID_SOCKET;
                }
                close_socket(s);
                return Err(e);
            }
        }
        self.inflight += 1;
        Ok(())
    }

    /// Accepting on listener `l` failed for a reason of ours: the accept ends (`more:
    /// false`), and the worker's back-off decides when to post it again.
    fn accept_failed(&mut self, l: usize, code: i32) -> Completion {
        self.listeners[l].armed = false;
        Completion::Accept {
            listener: ListenerId(l as u32),
            result: Err(op_error(code)),
            more: false,
        }
    }

    /// Stops accepting on listener `l` and leaves its group; the acceptor closes the socket.
    pub(super) fn close_listener(&mut self, l: usize) {
        let lst = &mut self.listeners[l];
        if !lst.open {
            return;
        }
        lst.open = false;
        lst.armed = false;
        lst.group.leave(self.id, lst.acceptor);
        if lst.sock != INVALID_SOCKET {
            // Pending AcceptEx calls complete (aborted) after this; their slots stay allocated
            // until then, and their sockets are closed when the completions are reaped.
            close_socket(lst.sock);
            lst.sock = INVALID_SOCKET;
        }
    }

    /// An `AcceptEx` completed: set the socket up and deal it, or retry, or report the
    /// failure; then post the slot again.
    pub(super) fn complete_accept(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        self.inflight -= 1;
        let p = e.lpOverlapped as *mut AcceptSlot;
        // SAFETY: packets under KEY_LISTENER carry the OVERLAPPED of one of our accept slots,
        // which stay allocated until drained; its operation has completed, so the kernel no
        // longer writes it.
        let (l, s) = unsafe {
            (*p).posted = false;
            let s = std::mem::replace(&mut (*p).sock, INVALID_SOCKET);
            ((*p).listener as usize, s)
        };
        let Some(lst) = self.listeners.get(l).filter(|x| x.open) else {
            close_socket(s);
            return;
        };
        let status = if e.Internal == 0 {
            Ok(0)
        } else {
            Self::overlapped_result(lst.sock, p as *const OVERLAPPED)
        };
        match status {
            Ok(_) => self.accepted(l, s, out),
            Err(code) if is_peer_gone(code) => {
                close_socket(s);
                self.stats.accept_retries += 1;
                tracing::debug!(code, "accept failed (peer gone); posting it again");
            }
            Err(code) => {
                close_socket(s);
                out.push(self.accept_failed(l, code));
            }
        }
        if self.listeners[l].armed {
            self.repost_accept(l, p, out);
        }
    }

    /// Posts accept slot `p` of listener `l` again.
    fn repost_accept(&mut self, l: usize, p: *mut AcceptSlot, out: &mut Vec<Completion>) {
        let k = self.listeners[l]
            .slots
            .iter()
            .position(|x| x.as_ptr() == p)
            .expect("accept slot belongs to its listener");
        if let Err(code) = self.post_accept(l, k) {
            out.push(self.accept_failed(l, code));
        }
    }

    /// Finishes an accepted socket's set-up and gives it to this loop or another member.
    fn accepted(&mut self, l: usize, s: SOCKET, out: &mut Vec<Completion>) {
        let lst = &self.listeners[l];
        let one: u32 = 1;
        // SAFETY: both option values are live locals of the size passed; `s` is the socket
        // AcceptEx just completed into, `lst.sock` the open listener.
        let rc = unsafe {
            let rc = setsockopt(
                s,
                SOL_SOCKET,
                SO_UPDATE_ACCEPT_CONTEXT,
                addr_of!(lst.sock) as *const u8,
                size_of::<SOCKET>() as i32,
            );
            // An echo sent in two pieces must not wait for the client's delayed ACK.
            setsockopt(
                s,
                IPPROTO_TCP,
                TCP_NODELAY,
                addr_of!(one) as *const u8,
                size_of::<u32>() as i32,
            );
            rc
        };
        if rc != 0 {
            tracing::debug!(code = last_wsa_error(), "SO_UPDATE_ACCEPT_CONTEXT failed");
            close_socket(s);
            return;
        }
        match lst.group.deal(self.id, s) {
            Ok(Dealt::Here) => match self.port.associate(s, KEY_SOCKET) {
                Ok(()) => self.deliver(l, s, out),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tie an accepted socket to the port");
                    close_socket(s);
                }
            },
            Ok(Dealt::There) => self.stats.handed_over += 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand an accepted socket to another thread");
                close_socket(s);
            }
        }
    }

    /// A socket the group's acceptor dealt to this port (`KEY_HANDOFF`).
    pub(super) fn handed_in(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        let s = e.lpOverlapped as usize as SOCKET;
        let l = e.dwNumberOfBytesTransferred as usize;
        self.stats.handed_in += 1;
        if self.listeners.get(l).is_some_and(|x| x.open) {
            self.deliver(l, s, out);
        } else {
            close_socket(s);
        }
    }

    /// Gives an accepted socket, tied to this port, to the state machine.
    fn deliver(&mut self, l: usize, s: SOCKET, out: &mut Vec<Completion>) {
        self.conns.insert(s);
        out.push(Completion::Accept {
            listener: ListenerId(l as u32),
            result: Ok(Socket(s as u64)),
            more: true,
        });
    }
}
