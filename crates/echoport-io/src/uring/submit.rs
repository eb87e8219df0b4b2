//! Posting: one function per [`Op`], each building the one submission entry it maps to. The
//! flow of the original reads here as it does in the state machine: post an accept, post a
//! receive, post a send of exactly the bytes received.

use echoport_core::{
    BufId, Completion, ListenerId, MAX_SEND_PARTS, Op, OpError, OpKind, Post, SendPart, Socket,
    Submit, Token,
};
use io_uring::{opcode, squeue, types};

use super::buf_ring::BGID;
use super::{FIXED, MsgSlot, NONE, RecvMode, Uring, with_fd};
use crate::pool::Returned;

/// Offset of `optlen` in a submission queue entry (`struct io_uring_sqe`): for a multishot
/// receive, the total bytes after which the kernel ends it (6.17+).
const SQE_OPTLEN: usize = 44;

impl Submit for Uring {
    fn push(&mut self, op: Op) {
        op.post_to(self);
    }

    fn release(&mut self, buf: BufId) {
        // To a ring that ran dry or holds less than half its share, else back to the one it
        // came from while that ring is below its share (`rings.rs`).
        let home = self.tables.needy_ring().unwrap_or(self.tables.home(buf.0));
        let to_kernel = self.buf_ring.is_some() && self.tables.bufs[home] < self.tables.share();
        match self.pool.release(buf.0, to_kernel) {
            Ok(Returned::Kernel) => self.publish_to(home, buf.0),
            Ok(Returned::Free) => {}
            Err(m) => self.misuse(m),
        }
    }

    fn max_send_parts(&self) -> usize {
        MAX_SEND_PARTS
    }

    fn buf_size(&self) -> u32 {
        self.pool.buf_size()
    }

    fn copy(&mut self, dst: BufId, at: u32, src: BufId, len: u32) {
        if let Err(m) = self.pool.copy(dst.0, at, src.0, len) {
            self.misuse(m);
        }
    }

    fn free_buffers(&self) -> usize {
        // (A ring that ran dry is refilled first, by the next releases and top-ups: the
        // other rings' connections do not wait for it.)
        if self.buf_ring.is_some() {
            self.pool.in_kernel()
        } else {
            self.pool.free_recv()
        }
    }

    fn total_buffers(&self) -> usize {
        self.pool.recv_count() as usize
    }
}

impl Post for Uring {
    /// Accept on a listener: multishot into direct descriptors on the fast path, on the
    /// ring whose table has room (`rings.rs`).
    fn post_accept(&mut self, listener: ListenerId) {
        let i = listener.0 as usize;
        let Some(fd) = self
            .listeners
            .get(i)
            .and_then(|l| l.fd.as_ref())
            .map(std::os::fd::AsRawFd::as_raw_fd)
        else {
            return;
        };
        self.listeners[i].armed = true;
        if self.table_mode() {
            return self.fill_accepts(i);
        }
        let e = if self.fast {
            opcode::AcceptMulti::new(types::Fd(fd))
                .allocate_file_index(self.direct_accept)
                .build()
        } else {
            opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(libc::SOCK_CLOEXEC)
                .build()
        };
        self.enqueue(e.user_data(Token::new(listener.0, 0).pack(OpKind::Accept)));
    }

    /// Close a socket (a direct descriptor's slot counts as free once the close completes).
    fn post_close(&mut self, token: Token, sock: Socket) {
        if self.direct_adopt && sock.0 & FIXED != 0 {
            self.close_adopted(sock);
            return;
        }
        let ring = Self::ring_of(sock);
        let e = with_fd!(sock, |fd| opcode::Close::new(fd).build());
        self.enqueue_on(ring, e.user_data(token.pack(OpKind::Close)));
    }

    /// Stop accepting: cancel the posted accept (the listener closes when it ends), or close
    /// at once when none is posted.
    fn post_close_listener(&mut self, listener: ListenerId) {
        let Some(l) = self.listeners.get_mut(listener.0 as usize) else {
            return;
        };
        l.closing = true;
        if l.posted > 0 {
            self.cancel_table_accepts(listener.0 as usize);
        } else if l.armed {
            let ud = Token::new(listener.0, 0).pack(OpKind::Accept);
            let e = opcode::AsyncCancel::new(ud).build();
            self.enqueue(e.user_data(Token::NONE.pack(OpKind::Cancel)));
        } else {
            l.fd = None;
        }
    }

    /// Receive on a connection, at most `max` bytes before the operation ends.
    fn post_recv(&mut self, token: Token, sock: Socket, max: u32) {
        let ud = token.pack(OpKind::Recv);
        let e = match self.recv_mode {
            RecvMode::MultishotLimited => {
                let e = with_fd!(sock, |fd| opcode::RecvMulti::new(fd, BGID).build());
                // The kernel subtracts each receive from the limit as a signed int, so a
                // limit above i32::MAX ends the receive at its first completion: that is no
                // limit at all (0).
                let limit = if max > i32::MAX as u32 { 0 } else { max.max(1) };
                with_optlen(e, limit)
            }
            RecvMode::OneshotRing => with_fd!(sock, |fd| opcode::Recv::new(
                fd,
                std::ptr::null_mut(),
                max.clamp(1, self.pool.buf_size())
            )
            .buf_group(BGID)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)),
            RecvMode::OneshotOwn => {
                let Some(buf) = self.pool.take_recv() else {
                    self.synthetic.push(Completion::Recv {
                        token,
                        result: Err(OpError::NoBuffers),
                        more: false,
                    });
                    return;
                };
                let id = token.id as usize;
                if self.recv_buf.len() <= id {
                    self.recv_buf.resize(id + 1, NONE);
                }
                self.recv_buf[id] = buf;
                let (ptr, len) = (self.pool.recv_ptr(buf), max.clamp(1, self.pool.buf_size()));
                with_fd!(sock, |fd| opcode::Recv::new(fd, ptr, len).build())
            }
        };
        self.enqueue_on(Self::ring_of(sock), e.user_data(ud));
    }

    /// Send lent buffers' bytes: one part as a plain send, several gathered.
    fn post_send(&mut self, token: Token, sock: Socket, parts: &[SendPart]) {
        match parts {
            [p] => self.send_one(token, sock, p.buf, p.off, p.len),
            _ => self.send_gathered(token, sock, parts),
        }
    }

    /// Shut down the write side. A direct descriptor goes through the ring (its slot cannot
    /// be reused before the close that follows). A plain descriptor is shut down at once,
    /// with `shutdown(2)`: on kernels 6.1-6.3 `IORING_OP_SHUTDOWN` is always punted to a
    /// worker thread that looks the descriptor up late, after the close posted behind it may
    /// have freed the number for another connection.
    fn post_shutdown(&mut self, token: Token, sock: Socket) {
        if sock.0 & FIXED != 0 {
            let e = with_fd!(sock, |fd| opcode::Shutdown::new(fd, libc::SHUT_WR).build());
            self.enqueue_on(
                Self::ring_of(sock),
                e.user_data(token.pack(OpKind::Shutdown)),
            );
            return;
        }
        // SAFETY: a plain descriptor handed out by this backend's accept (or adopted) stays
        // open until the state machine posts its close, which comes after this shutdown.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.0 as std::os::fd::RawFd) };
        if let Err(e) = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write) {
            tracing::debug!(error = %e, "shutdown failed");
        }
    }

    /// Cancel the connection's posted receive or send (by its user data, never by
    /// descriptor), on the ring the socket belongs to.
    fn post_cancel(&mut self, token: Token, sock: Socket, target: OpKind) {
        let e = opcode::AsyncCancel::new(token.pack(target)).build();
        self.enqueue_on(Self::ring_of(sock), e.user_data(token.pack(OpKind::Cancel)));
    }
}

impl Uring {
    /// Send `len` bytes of a lent buffer; a buffer not lent is refused (the send fails).
    fn send_one(&mut self, token: Token, sock: Socket, buf: BufId, off: u32, len: u32) {
        let ptr = match self.pool.send_ptr(buf.0, off, len) {
            Ok(p) => p,
            Err(m) => return self.refuse_send(token, m),
        };
        let e = with_fd!(sock, |fd| opcode::Send::new(fd, ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build());
        self.enqueue_on(Self::ring_of(sock), e.user_data(token.pack(OpKind::Send)));
    }

    /// A gathered send (`SENDMSG`) of several lent buffers, its header boxed until completion.
    fn send_gathered(&mut self, token: Token, sock: Socket, parts: &[SendPart]) {
        let mut m = self.msg_free.pop().unwrap_or_else(|| {
            Box::new(MsgSlot {
                // SAFETY: all-zero is a valid msghdr (no name, no control data).
                hdr: unsafe { std::mem::zeroed() },
                iov: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEND_PARTS],
            })
        });
        for (v, p) in m.iov.iter_mut().zip(parts) {
            let ptr = match self.pool.send_ptr(p.buf.0, p.off, p.len) {
                Ok(ptr) => ptr,
                Err(e) => {
                    self.msg_free.push(m);
                    return self.refuse_send(token, e);
                }
            };
            *v = libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: p.len as usize,
            };
        }
        m.hdr.msg_iov = m.iov.as_mut_ptr();
        m.hdr.msg_iovlen = parts.len();
        let hdr = &m.hdr as *const libc::msghdr;
        let e = with_fd!(sock, |fd| opcode::SendMsg::new(fd, hdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build());
        // The box moves into the map, its contents do not: `hdr` stays valid until the
        // send's completion takes it out again.
        if let Some(old) = self.send_msgs.insert(token.id, m) {
            debug_assert!(false, "two sends in flight on connection {}", token.id);
            std::mem::forget(old); // the kernel may still read it
        }
        self.enqueue_on(Self::ring_of(sock), e.user_data(token.pack(OpKind::Send)));
    }

    /// A send naming a buffer the caller does not hold: nothing reaches the kernel, and the
    /// send completes with `EFAULT` so its connection closes.
    fn refuse_send(&mut self, token: Token, m: crate::pool::Misuse) {
        self.misuse(m);
        self.synthetic.push(Completion::Send {
            token,
            result: Err(OpError::Os(libc::EFAULT)),
        });
    }
}

/// Sets a multishot receive's total length limit (`sqe->optlen`), which the io-uring crate's
/// builder does not expose.
fn with_optlen(e: squeue::Entry, limit: u32) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` (size
    // checked above), a plain-data struct every bit pattern of which is valid; `optlen` is
    // the 32-bit field at byte 44 (`include/uapi/linux/io_uring.h`).
    let mut raw = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(e) };
    raw[SQE_OPTLEN..SQE_OPTLEN + 4].copy_from_slice(&limit.to_ne_bytes());
    // SAFETY: as above, the bytes of a valid entry with one plain field changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multishot_limit_lands_in_optlen_and_nothing_else_changes() {
        let plain = opcode::RecvMulti::new(types::Fd(3), BGID)
            .build()
            .user_data(9);
        let limited = with_optlen(plain.clone(), 65536);
        // SAFETY: as in `with_optlen`.
        let (a, b): ([u8; 64], [u8; 64]) = unsafe {
            (
                std::mem::transmute::<squeue::Entry, [u8; 64]>(plain),
                std::mem::transmute::<squeue::Entry, [u8; 64]>(limited),
            )
        };
        for i in 0..64 {
            if (SQE_OPTLEN..SQE_OPTLEN + 4).contains(&i) {
                continue;
            }
            assert_eq!(a[i], b[i], "byte {i} changed");
        }
        assert_eq!(u32::from_ne_bytes(b[44..48].try_into().unwrap()), 65536);
    }
}
