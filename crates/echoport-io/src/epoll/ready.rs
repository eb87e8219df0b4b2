//! Readiness: ask the kernel which sockets became ready, then do what each allows, one step
//! per socket per loop turn: accept on a listener, send a posted send, read for a posted
//! receive. Each step reports the completion io_uring would have.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use echoport_core::{BufId, Completion, ListenerId, MAX_SEND_PARTS, OpError, Received, Token};

use super::syscalls::{errno, sys_epoll_wait, sys_recv, sys_send, sys_sendmsg};
use super::{
    Epoll, GEN_MASK, PendingSend, PostedRecv, TAG_LISTENER, TAG_SHIFT, TAG_WAKER, send_refused,
};
use crate::sys::op_error;

impl Epoll {
    /// Asks the kernel which sockets became ready, waiting up to `timeout`.
    pub(super) fn poll(
        &mut self,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let ms = match timeout {
            None => -1,
            // Round up: a wait of 300 µs must not turn into a busy loop of zero waits.
            Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32,
        };
        let n = sys_epoll_wait(self.epfd.as_raw_fd(), &mut self.events, ms);
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        for k in 0..n as usize {
            let ev = self.events[k];
            let (flags, data) = (ev.events, ev.u64);
            match data >> TAG_SHIFT {
                TAG_WAKER => {
                    self.waker.drain();
                    out.push(Completion::Wake);
                }
                TAG_LISTENER => self.listener_ready(data as u32),
                _ => self.conn_ready(data, flags),
            }
        }
        Ok(())
    }

    /// An edge on listener `i`: connections may be waiting.
    fn listener_ready(&mut self, i: u32) {
        if let Some(l) = self.listeners.get_mut(i as usize) {
            l.readable = true;
            self.queue_listener(i);
        }
    }

    /// An edge on a connection (its data word `data`): note what it allows now. Readiness of
    /// a slot since closed, or reused, is ignored.
    fn conn_ready(&mut self, data: u64, flags: u32) {
        let idx = data as u32;
        let generation = ((data >> 32) as u32) & GEN_MASK;
        let Some(s) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if !s.open || s.generation != generation {
            return;
        }
        let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        if flags & ((libc::EPOLLRDHUP as u32) | err) != 0 {
            s.hup = true;
        }
        if flags & libc::EPOLLPRI as u32 != 0 {
            s.urgent = true;
        }
        if flags & ((libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLRDHUP) as u32 | err) != 0 {
            s.readable = true;
        }
        if flags & (libc::EPOLLOUT as u32 | err) != 0 {
            s.writable = true;
        }
        self.queue_conn(idx);
    }

    /// Performs what the ready sockets allow, one step each, and queues again those that can
    /// do more.
    pub(super) fn run_ready(&mut self, out: &mut Vec<Completion>) {
        let mut batch = std::mem::replace(&mut self.ready, std::mem::take(&mut self.ready_spare));
        for &key in &batch {
            match key >> TAG_SHIFT {
                TAG_LISTENER => self.run_listener(key as u32, out),
                _ => {
                    let idx = key as u32;
                    let generation = ((key >> 32) as u32) & GEN_MASK;
                    match self.slots.get_mut(idx as usize) {
                        Some(s) if s.open && s.generation == generation => {
                            s.queued = false;
                            self.run_conn(idx, out);
                        }
                        _ => {}
                    }
                }
            }
        }
        batch.clear();
        self.ready_spare = batch;
    }

    /// One step for a ready connection: its posted send, then its posted receive.
    fn run_conn(&mut self, idx: u32, out: &mut Vec<Completion>) {
        let i = idx as usize;
        if let (Some(p), true) = (self.slots[i].send, self.slots[i].writable) {
            self.send_once(idx, p, out);
        }
        if let (Some(r), true) = (self.slots[i].recv, self.slots[i].readable) {
            self.recv_once(idx, r, out);
        }
        self.queue_conn(idx);
    }

    /// One attempt at a posted send: it completes with what the kernel took, or stays
    /// posted until the socket is writable again.
    fn send_once(&mut self, idx: u32, p: PendingSend, out: &mut Vec<Completion>) {
        let raw = self.slots[idx as usize].fd;
        if let Err(m) = self.check_send(&p) {
            // Released while its send was posted: a bug in the caller; nothing is sent.
            self.slots[idx as usize].send = None;
            self.misuse(m);
            out.push(send_refused(p.token));
            return;
        }
        let n = if p.count == 1 {
            sys_send(raw, self.part_bytes(&p.parts[0]))
        } else {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_SEND_PARTS];
            for (v, part) in iov.iter_mut().zip(&p.parts[..p.count as usize]) {
                let bytes = self.part_bytes(part);
                *v = libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
            }
            // SAFETY: every iovec was made from a slice of a lent buffer (checked above) in
            // the pool's region, which lives across the call and which nothing writes during
            // it (only this thread touches the pool, and it is in this call).
            unsafe { sys_sendmsg(raw, &iov[..p.count as usize]) }
        };
        let s = &mut self.slots[idx as usize];
        let result = if n >= 0 {
            Ok(n as u32)
        } else {
            match errno() {
                libc::EAGAIN => {
                    s.writable = false;
                    return;
                }
                libc::EINTR => return,
                e => Err(op_error(e)),
            }
        };
        s.send = None;
        out.push(Completion::Send {
            token: p.token,
            result,
        });
    }

    /// One read for a posted receive: at most one buffer per connection per loop turn, and
    /// never more than what is left of the receive's allowance.
    fn recv_once(&mut self, idx: u32, r: PostedRecv, out: &mut Vec<Completion>) {
        let Some(buf) = self.pool.take_recv() else {
            self.slots[idx as usize].recv = None;
            out.push(Completion::Recv {
                token: r.token,
                result: Err(OpError::NoBuffers),
                more: false,
            });
            return;
        };
        let want = r.left.clamp(1, self.pool.buf_size());
        let dst = self.pool.recv_ptr(buf);
        // SAFETY: `buf` was just handed to the kernel for this read, so the pool makes no
        // slice of it (it does so only for lent buffers); `dst..dst + want` lies inside it
        // (`want` is at most the buffer size), and the region outlives the call.
        let n = unsafe { sys_recv(self.slots[idx as usize].fd, dst, want as usize) };
        if n > 0 {
            self.received(idx, r, buf, n as u32, want, out);
        } else {
            let err = (n < 0).then(errno);
            self.recv_ended(idx, r.token, buf, err, out);
        }
    }

    /// A read brought `n` bytes into `buf`: lend it, and end the receive at its allowance.
    fn received(
        &mut self,
        idx: u32,
        r: PostedRecv,
        buf: u32,
        n: u32,
        want: u32,
        out: &mut Vec<Completion>,
    ) {
        let lent = self.pool.lend(buf);
        let s = &mut self.slots[idx as usize];
        // A short read drained the socket: the next byte raises a new edge. Not so after the
        // peer's end of stream was signalled (its edge has been spent, and the next read
        // must find the end of stream), nor once urgent data came (the read may have stopped
        // at the urgent mark, bytes queued behind it).
        if n < want && !s.hup && !s.urgent {
            s.readable = false;
        }
        let left = r.left.saturating_sub(n);
        s.recv = (left > 0).then_some(PostedRecv { left, ..r });
        let (result, more) = match lent {
            Ok(()) => (
                Ok(Received::Data {
                    buf: BufId(buf),
                    len: n,
                }),
                left > 0,
            ),
            Err(m) => {
                // Cannot happen (the buffer was taken for this read): never hand it on.
                self.slots[idx as usize].recv = None;
                self.misuse(m);
                (Err(OpError::Os(libc::EFAULT)), false)
            }
        };
        out.push(Completion::Recv {
            token: r.token,
            result,
            more,
        });
    }

    /// A read brought no bytes: the buffer goes back, and end of stream or an error ends the
    /// receive (`EAGAIN`: it waits for the next edge).
    fn recv_ended(
        &mut self,
        idx: u32,
        token: Token,
        buf: u32,
        err: Option<i32>,
        out: &mut Vec<Completion>,
    ) {
        if let Err(m) = self.pool.unpost(buf) {
            self.misuse(m);
        }
        let s = &mut self.slots[idx as usize];
        let result = match err {
            None => Ok(Received::Eof),
            Some(libc::EAGAIN) => {
                s.readable = false;
                return;
            }
            Some(libc::EINTR) => return,
            Some(e) => Err(op_error(e)),
        };
        s.recv = None;
        out.push(Completion::Recv {
            token,
            result,
            more: false,
        });
    }

    /// Accepts up to a batch of connections on a ready listener; each is registered and
    /// reported as the accept's completion.
    fn run_listener(&mut self, i: u32, out: &mut Vec<Completion>) {
        let l = &mut self.listeners[i as usize];
        l.queued = false;
        let Some(lfd) = l.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return;
        };
        let listener = ListenerId(i);
        for _ in 0..self.accept_batch {
            if !(self.listeners[i as usize].armed && self.listeners[i as usize].readable) {
                return;
            }
            // SAFETY: null address pointers are allowed (we do not want the peer address);
            // a non-negative result is a new descriptor that we own.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                match errno() {
                    libc::EAGAIN => {
                        self.listeners[i as usize].readable = false;
                        return;
                    }
                    // The peer gave up while queued, or a signal: the next one may be fine.
                    libc::EINTR | libc::ECONNABORTED => continue,
                    e => {
                        // Like a multishot accept, an error ends the operation; the worker
                        // decides when to post it again (back-off on EMFILE/ENFILE).
                        self.listeners[i as usize].armed = false;
                        out.push(Completion::Accept {
                            listener,
                            result: Err(op_error(e)),
                            more: false,
                        });
                        return;
                    }
                }
            }
            match self.register(fd) {
                Ok(sock) => out.push(Completion::Accept {
                    listener,
                    result: Ok(sock),
                    more: true,
                }),
                Err(e) => {
                    // SAFETY: `fd` came from accept4 above and was never handed out.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    self.listeners[i as usize].armed = false;
                    out.push(Completion::Accept {
                        listener,
                        result: Err(op_error(e.raw_os_error().unwrap_or(libc::EIO))),
                        more: false,
                    });
                    return;
                }
            }
        }
        // The batch ran out with connections possibly still queued: go on next turn.
        self.queue_listener(i);
    }
}
