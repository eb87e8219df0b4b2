//! Receiving and sending: one overlapped `WSARecv` or `WSASend` per operation, each in an
//! operation slot, and the completions that end them.
//!
//! Receives are one-shot (`more: false` on every completion). While buffers are plentiful a
//! receive is posted into a buffer the pool hands to the kernel; when few are free it is
//! posted with zero length, holding no buffer while the connection is idle, and its
//! completion posts the real receive. Sends go out from the very buffer the bytes were
//! received into, checked as lent by the pool before they are posted.

use std::ptr::{self, addr_of, addr_of_mut};

use echoport_core::{BufId, Completion, OpError, OpKind, Received, Socket, Token};
use windows_sys::Win32::Foundation::HANDLE;
use windows_sys::Win32::Networking::WinSock::{
    SD_SEND, SOCKET, SOCKET_ERROR, WSA_IO_PENDING, WSABUF, WSAEFAULT, WSAGetOverlappedResult,
    WSARecv, WSASend, shutdown,
};
use windows_sys::Win32::System::IO::{CancelIoEx, OVERLAPPED, OVERLAPPED_ENTRY};

use super::Iocp;
use super::port::{close_socket, last_wsa_error};
use super::slots::{NONE, clear_slot, set_slot};
use crate::pool::Misuse;
use crate::sys::op_error;

/// What a reaped operation slot held, read once its call has completed.
struct Done {
    /// `Token::pack(kind)` of the operation.
    user: u64,
    /// Its receive buffer, or `NONE`.
    buf: u32,
    /// The slot's index.
    index: u32,
    /// Cancellation was requested.
    cancel: bool,
    /// Bytes transferred, or the Winsock/Win32 error.
    status: Result<u32, i32>,
}

impl Iocp {
    /// Receives at most `max` bytes (one buffer) on a connection: into a buffer while
    /// buffers are plentiful, else a zero-byte receive that holds none while it waits.
    pub(super) fn begin_recv(&mut self, token: Token, sock: Socket, max: u32) {
        let zero = self.pool.free_recv() as u32 <= self.zero_below;
        let buf = if zero { None } else { self.pool.take_recv() };
        let i = self.take_op(token.pack(OpKind::Recv), sock.0 as SOCKET);
        let p = self.op(i);
        // SAFETY: slot `i` was just taken from the free list: the kernel holds no reference.
        unsafe { (*p).want = max.clamp(1, self.pool.buf_size()) };
        match self.start_recv(i, buf) {
            Ok(()) => set_slot(&mut self.recv_op, token.id, i),
            Err(e) => {
                self.free_op(i);
                if let Some(b) = buf {
                    self.unpost(b);
                }
                self.synthetic.push(Completion::Recv {
                    token,
                    result: Err(op_error(e)),
                    more: false,
                });
            }
        }
    }

    /// Issues `WSARecv` on slot `i`: into buffer `buf` (which the pool has just handed to the
    /// kernel), or a zero-byte receive.
    fn start_recv(&mut self, i: u32, buf: Option<u32>) -> Result<(), i32> {
        let p = self.op(i);
        let (ptr, len) = match buf {
            // SAFETY: reads a field the kernel never writes.
            Some(b) => (self.pool.recv_ptr(b), unsafe { (*p).want }),
            // A zero-length buffer still needs a valid address; nothing is written to it.
            None => (self.pool.addr(0, 0), 0),
        };
        let wsabuf = WSABUF { len, buf: ptr };
        // SAFETY: slot `i` is not pending (taken from the free list, or its previous operation
        // just completed), and from here it belongs to the kernel until its completion is
        // reaped in `wait`: the slot is a separate allocation that is neither moved nor freed
        // before then (see `Drop`). The buffer is the kernel's in the pool (`recv_ptr`
        // checked it), taken for this receive alone until the same completion, and `len` is
        // at most a buffer. The WSABUF array is captured by Winsock during the call.
        let rc = unsafe {
            ptr::write(addr_of_mut!((*p).ov), std::mem::zeroed());
            (*p).buf = buf.unwrap_or(NONE);
            (*p).flags = 0;
            (*p).busy = true;
            WSARecv(
                (*p).sock,
                &wsabuf,
                1,
                ptr::null_mut(),
                addr_of_mut!((*p).flags),
                addr_of_mut!((*p).ov),
                None,
            )
        };
        if rc == SOCKET_ERROR {
            let e = last_wsa_error();
            if e != WSA_IO_PENDING {
                // Failed at once: no completion packet will come.
                // SAFETY: the call failed, so the kernel does not hold the slot.
                unsafe { (*p).busy = false };
                return Err(e);
            }
        }
        if buf.is_none() {
            self.stats.zero_byte_recvs += 1;
        }
        self.inflight += 1;
        Ok(())
    }

    /// Sends `len` bytes of a lent buffer; a buffer not lent is refused (the send fails).
    pub(super) fn begin_send(
        &mut self,
        token: Token,
        sock: Socket,
        buf: BufId,
        off: u32,
        len: u32,
    ) {
        let ptr = match self.pool.send_ptr(buf.0, off, len) {
            Ok(p) => p as *mut u8,
            Err(m) => return self.refuse_send(token, m),
        };
        let i = self.take_op(token.pack(OpKind::Send), sock.0 as SOCKET);
        let p = self.op(i);
        let wsabuf = WSABUF { len, buf: ptr };
        // SAFETY: as in `start_recv`: the slot belongs to the kernel until its completion is
        // reaped. The bytes lie in a buffer the pool has lent (checked by `send_ptr`, with the
        // range inside it), which the state machine releases only after the send's
        // completion (the backend contract); WSASend only reads them.
        let rc = unsafe {
            ptr::write(addr_of_mut!((*p).ov), std::mem::zeroed());
            (*p).busy = true;
            WSASend(
                (*p).sock,
                &wsabuf,
                1,
                ptr::null_mut(),
                0,
                addr_of_mut!((*p).ov),
                None,
            )
        };
        if rc == SOCKET_ERROR {
            let e = last_wsa_error();
            if e != WSA_IO_PENDING {
                self.free_op(i);
                self.synthetic.push(Completion::Send {
                    token,
                    result: Err(op_error(e)),
                });
                return;
            }
        }
        self.inflight += 1;
        set_slot(&mut self.send_op, token.id, i);
    }

    /// A send naming a buffer the caller does not hold: nothing reaches the kernel, and the
    /// send completes with `WSAEFAULT` so its connection closes.
    fn refuse_send(&mut self, token: Token, m: Misuse) {
        self.misuse(m);
        self.synthetic.push(Completion::Send {
            token,
            result: Err(OpError::Os(WSAEFAULT)),
        });
    }

    /// A receive that named `buf` ended without data: the buffer is free again.
    pub(super) fn unpost(&mut self, buf: u32) {
        if let Err(m) = self.pool.unpost(buf) {
            self.misuse(m);
        }
    }

    /// Requests cancellation of the connection's pending operation of `kind`, if any.
    pub(super) fn cancel(&mut self, token: Token, kind: OpKind) {
        let table = if kind == OpKind::Recv {
            &self.recv_op
        } else {
            &self.send_op
        };
        let Some(&i) = table.get(token.id as usize).filter(|&&i| i != NONE) else {
            return;
        };
        let p = self.op(i);
        // SAFETY: touches fields the kernel never writes; when the slot is pending its socket
        // is open (the state machine closes only after every completion), and CancelIoEx only
        // looks the OVERLAPPED up by address. If it completed meanwhile, CancelIoEx fails with
        // ERROR_NOT_FOUND and the completion is already queued.
        unsafe {
            if (*p).busy && (*p).user == token.pack(kind) {
                (*p).cancel = true;
                CancelIoEx((*p).sock as HANDLE, addr_of!((*p).ov));
            }
        }
    }

    /// `Op::Shutdown`: the write side, synchronously (reports nothing).
    pub(super) fn shutdown(&mut self, sock: Socket) {
        let s = sock.0 as SOCKET;
        if !self.conns.contains(&s) {
            tracing::warn!(
                sock = s,
                "shutdown of a socket that is not an open connection"
            );
            return;
        }
        // SAFETY: `s` is an open connection socket of ours (in `conns`); no memory is passed.
        if unsafe { shutdown(s, SD_SEND) } != 0 {
            tracing::debug!(code = last_wsa_error(), "shutdown failed");
        }
    }

    /// `Op::Close`: synchronously (reports nothing); nothing of the connection is pending.
    /// Only an open connection socket is closed, once: closing any other handle could close
    /// a socket someone else has been given since.
    pub(super) fn close(&mut self, sock: Socket) {
        let s = sock.0 as SOCKET;
        if self.conns.remove(&s) {
            close_socket(s);
        } else {
            tracing::warn!(sock = s, "close of a socket that is not an open connection");
        }
    }

    /// The error of a failed overlapped operation on `s`, as a Winsock/Win32 code.
    pub(super) fn overlapped_result(s: SOCKET, ov: *const OVERLAPPED) -> Result<u32, i32> {
        let (mut bytes, mut flags) = (0u32, 0u32);
        // SAFETY: the operation has completed (its packet was reaped), so reading its
        // OVERLAPPED does not race the kernel; `s` is the socket it ran on.
        if unsafe { WSAGetOverlappedResult(s, ov, &mut bytes, 0, &mut flags) } != 0 {
            Ok(bytes)
        } else {
            Err(last_wsa_error())
        }
    }

    /// A receive or send completed (`KEY_SOCKET`): one handler per kind.
    pub(super) fn complete_op(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        self.inflight -= 1;
        let d = Self::done(e);
        let Some((kind, token)) = Token::unpack(d.user) else {
            self.free_op(d.index);
            return;
        };
        match kind {
            OpKind::Recv if d.buf == NONE => self.complete_zero_byte(token, &d, out),
            OpKind::Recv => self.complete_recv(token, &d, out),
            OpKind::Send => {
                clear_slot(&mut self.send_op, token.id, d.index);
                self.free_op(d.index);
                out.push(Completion::Send {
                    token,
                    result: d.status.map_err(op_error),
                });
            }
            _ => self.free_op(d.index),
        }
    }

    /// Reads a completed operation slot.
    fn done(e: &OVERLAPPED_ENTRY) -> Done {
        let p = e.lpOverlapped as *mut super::slots::OpSlot;
        // SAFETY: packets under KEY_SOCKET carry the OVERLAPPED of one of our operation slots
        // (connection sockets are tied to the port with that key only by this module), which
        // stay allocated until drained; the operation has completed, so the kernel no longer
        // writes the slot.
        let (user, s, buf, index, cancel) =
            unsafe { ((*p).user, (*p).sock, (*p).buf, (*p).index, (*p).cancel) };
        let status = if e.Internal == 0 {
            Ok(e.dwNumberOfBytesTransferred)
        } else {
            Self::overlapped_result(s, p as *const OVERLAPPED)
        };
        Done {
            user,
            buf,
            index,
            cancel,
            status,
        }
    }

    /// A zero-byte receive completed: data (or the end of the stream) is waiting, so the
    /// real receive is posted in the same slot, unless it was cancelled or no buffer is free.
    fn complete_zero_byte(&mut self, token: Token, d: &Done, out: &mut Vec<Completion>) {
        let result = match d.status {
            Ok(_) if d.cancel => Err(OpError::Canceled),
            Ok(_) => match self.pool.take_recv() {
                Some(b) => match self.start_recv(d.index, Some(b)) {
                    Ok(()) => return, // the real receive is now pending
                    Err(code) => {
                        self.unpost(b);
                        Err(op_error(code))
                    }
                },
                None => Err(OpError::NoBuffers),
            },
            Err(code) => Err(op_error(code)),
        };
        self.finish_recv(token, d.index, result, out);
    }

    /// A receive into a buffer completed: with data the buffer is lent to the state
    /// machine; without (end of stream, an error) it goes back to the pool.
    fn complete_recv(&mut self, token: Token, d: &Done, out: &mut Vec<Completion>) {
        let result = match d.status {
            Ok(n) if n > 0 => match self.pool.lend(d.buf) {
                Ok(()) => Ok(Received::Data {
                    buf: BufId(d.buf),
                    len: n,
                }),
                Err(m) => {
                    self.misuse(m);
                    Err(OpError::Os(WSAEFAULT))
                }
            },
            Ok(_) => {
                self.unpost(d.buf);
                Ok(Received::Eof)
            }
            Err(code) => {
                self.unpost(d.buf);
                Err(op_error(code))
            }
        };
        self.finish_recv(token, d.index, result, out);
    }

    /// Ends a receive: its slot is free, its completion goes to the state machine.
    fn finish_recv(
        &mut self,
        token: Token,
        i: u32,
        result: Result<Received, OpError>,
        out: &mut Vec<Completion>,
    ) {
        clear_slot(&mut self.recv_op, token.id, i);
        self.free_op(i);
        out.push(Completion::Recv {
            token,
            result,
            more: false,
        });
    }
}
