//! Posting: one function per [`Op`]. Nothing reaches the kernel here: an operation is
//! recorded on its socket's slot and performed when the socket is ready (`ready.rs`);
//! cancellations end their operation at once (no read or send is ever in progress between
//! loop turns).

use echoport_core::{
    BufId, Completion, ListenerId, MAX_SEND_PARTS, Op, OpError, OpKind, Post, SendPart, Socket,
    Submit, Token,
};

use super::{Epoll, PendingSend, PostedRecv, send_refused, sock_parts};

impl Submit for Epoll {
    fn push(&mut self, op: Op) {
        op.post_to(self);
    }

    fn release(&mut self, buf: BufId) {
        // A receive buffer goes back to the free list: a read takes it at readiness.
        self.pool.release_reported(buf.0, false);
    }

    fn max_send_parts(&self) -> usize {
        MAX_SEND_PARTS
    }

    crate::pool::pool_submit_methods!();
}

impl Post for Epoll {
    /// Accept on a listener: it stays posted (as a multishot accept) until an error.
    fn post_accept(&mut self, listener: ListenerId) {
        let i = listener.0;
        if let Some(l) = self.listeners.get_mut(i as usize) {
            if l.fd.is_some() {
                l.armed = true;
                self.queue_listener(i);
            }
        }
    }

    /// Stop accepting and close the listener. The posted accept ends with it; like
    /// io_uring's cancelled accept on a closing listener, it reports nothing.
    fn post_close_listener(&mut self, listener: ListenerId) {
        if let Some(l) = self.listeners.get_mut(listener.0 as usize) {
            l.armed = false;
            l.fd = None;
        }
    }

    /// Receive on a connection until `max` bytes have been delivered (or end of stream, an
    /// error, a cancellation).
    fn post_recv(&mut self, token: Token, sock: Socket, max: u32) {
        let Some(s) = self.slot(sock) else {
            return self.synthetic.push(Completion::Recv {
                token,
                result: Err(OpError::Os(libc::EBADF)),
                more: false,
            });
        };
        s.recv = Some(PostedRecv {
            token,
            left: max.max(1),
        });
        self.queue_conn(sock_parts(sock).0);
    }

    /// Send the bytes of lent buffers when the socket is writable; a part naming a buffer
    /// the caller does not hold refuses the whole send (`EFAULT`).
    fn post_send(&mut self, token: Token, sock: Socket, parts: &[SendPart]) {
        let p = PendingSend::new(token, parts);
        if let Err(m) = self.check_send(&p) {
            self.misuse(m);
            return self.synthetic.push(send_refused(p.token));
        }
        let Some(s) = self.slot(sock) else {
            return self.synthetic.push(Completion::Send {
                token: p.token,
                result: Err(OpError::Os(libc::EBADF)),
            });
        };
        debug_assert!(s.send.is_none(), "two sends in flight on {sock:?}");
        s.send = Some(p);
        self.queue_conn(sock_parts(sock).0);
    }

    /// Cancel the posted receive or send: it ends at once, as cancelled.
    fn post_cancel(&mut self, token: Token, sock: Socket, kind: OpKind) {
        match kind {
            OpKind::Send => self.cancel_send(token, sock),
            _ => self.cancel_recv(token, sock),
        }
    }

    /// Shut down the sending side at once (it reports nothing).
    fn post_shutdown(&mut self, _token: Token, sock: Socket) {
        if let Some(s) = self.slot(sock) {
            // SAFETY: the slot is open, so its descriptor is one this backend owns. Failure
            // (the peer already reset) changes nothing for the state machine.
            unsafe { libc::shutdown(s.fd, libc::SHUT_WR) };
        }
    }

    /// Close the socket (deregistering it) at once.
    fn post_close(&mut self, _token: Token, sock: Socket) {
        self.close_sock(sock);
    }
}

impl Epoll {
    /// Cancel the posted receive: it ends at once, as cancelled (no read is in progress
    /// between loop turns, so there is nothing to wait for).
    fn cancel_recv(&mut self, token: Token, sock: Socket) {
        let Some(s) = self.slot(sock) else { return };
        if s.recv.is_some_and(|r| r.token == token) {
            s.recv = None;
            self.synthetic.push(Completion::Recv {
                token,
                result: Err(OpError::Canceled),
                more: false,
            });
        }
    }

    /// Cancel the posted send: it ends at once, as cancelled, having sent nothing.
    fn cancel_send(&mut self, token: Token, sock: Socket) {
        let Some(s) = self.slot(sock) else { return };
        if s.send.is_some_and(|p| p.token == token) {
            s.send = None;
            self.synthetic.push(Completion::Send {
                token,
                result: Err(OpError::Canceled),
            });
        }
    }
}
