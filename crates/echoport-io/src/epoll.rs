//! The epoll backend: readiness turned into completions, for where io_uring is refused.
//!
//! The state machine posts the same [`Op`]s as on io_uring; this backend remembers each one
//! and performs it when its socket is ready, then reports the same [`Completion`] io_uring
//! would have. Receives and accepts behave like io_uring's multishot operations: once posted
//! they stay posted and deliver data (or connections) until end of stream, an error or a
//! cancellation ends them.
//!
//! Every socket is registered once, edge-triggered, for input and output; the backend keeps
//! whether each socket is known to be readable and writable, clears that only when the kernel
//! says `EAGAIN` (or a read comes back short, which on a stream socket means its queue was
//! drained, so the next byte raises a new edge; but never once the peer's end of stream has
//! been signalled, whose edge is spent), and sets it again on the next edge. No `epoll_ctl`
//! happens after registration, whatever is posted or cancelled.
//!
//! Per echo this costs what a hand-written epoll loop costs: one `epoll_wait`, one `recv`,
//! one `send`. A wait that has work at hand (a send just posted) does it without asking the
//! kernel for readiness first, at most every other time, so no socket waits more than a turn.
//!
//! Fairness and backpressure: a connection reads at most one buffer per loop turn, so the
//! state machine sees each buffer before the next is read and can stop receiving at its
//! limit; a listener accepts at most [`Config::accept_batch`] connections per turn.
//!
//! # Buffers
//! One pool of equally sized buffers, as on io_uring: receive buffers, lent to the state
//! machine from a receive completion until released, and buffers for callers that send their
//! own bytes ([`Backend::alloc_buf`]). The kernel touches a buffer only during a `recv` or
//! `send` call, never in the background, so the pool is ordinary memory. When no receive
//! buffer is free, a readable connection's receive completes with [`OpError::NoBuffers`] and
//! the worker parks it, exactly as with io_uring's empty buffer ring.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, BufId, Completion, ListenerId, Op, OpError, Received, SendPart, Socket, Submit, Token,
    Waker, MAX_SEND_PARTS,
};

use crate::sys::{op_error, EventFd};

/// Settings of one epoll loop.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Receive buffers.
    pub buffers: u32,
    /// Buffers kept for callers that send their own bytes ([`Backend::alloc_buf`]).
    pub send_buffers: u32,
    /// Most readiness events taken from the kernel per wait.
    pub events: u32,
    /// Most connections one listener accepts per loop turn.
    pub accept_batch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            buf_size: 8192,
            buffers: 2048,
            send_buffers: 256,
            events: 1024,
            accept_batch: 64,
        }
    }
}

/// Tag of the `epoll_event` data word (top two bits).
const TAG_SHIFT: u32 = 62;
const TAG_CONN: u64 = 0;
const TAG_LISTENER: u64 = 1;
const TAG_WAKER: u64 = 2;
/// Generations kept in a connection's data word (between the tag and the descriptor).
const GEN_MASK: u32 = (1 << 30) - 1;

fn conn_key(fd: u32, gen: u32) -> u64 {
    (TAG_CONN << TAG_SHIFT) | (((gen & GEN_MASK) as u64) << 32) | fd as u64
}

fn listener_key(i: u32) -> u64 {
    (TAG_LISTENER << TAG_SHIFT) | i as u64
}

/// A send posted and not yet performed: one buffer, or several gathered.
#[derive(Copy, Clone, Debug)]
struct PendingSend {
    token: Token,
    parts: [SendPart; MAX_SEND_PARTS],
    count: u8,
}

/// What the backend knows about one connected socket, indexed by its descriptor.
#[derive(Debug, Default)]
struct Slot {
    /// Changes every time the descriptor number is reused, so stale readiness is ignored.
    gen: u32,
    open: bool,
    readable: bool,
    writable: bool,
    /// The peer's end of stream (or an error) has been signalled: reads never block again,
    /// and no further edge will come to say so.
    hup: bool,
    /// In the ready list for the next pass.
    queued: bool,
    /// The posted receive, if any.
    recv: Option<Token>,
    /// The posted send, if any.
    send: Option<PendingSend>,
}

impl Slot {
    fn actionable(&self) -> bool {
        (self.recv.is_some() && self.readable) || (self.send.is_some() && self.writable)
    }
}

struct ListenerSlot {
    fd: Option<OwnedFd>,
    armed: bool,
    readable: bool,
    queued: bool,
}

/// An epoll set serving one worker thread.
pub struct Epoll {
    epfd: OwnedFd,
    waker: Arc<EventFd>,
    slots: Vec<Slot>,
    listeners: Vec<ListenerSlot>,
    /// Sockets (data words as registered) with work possible now.
    ready: Vec<u64>,
    ready_spare: Vec<u64>,
    /// Completions produced by posting (cancellations), handed out at the next wait.
    synthetic: Vec<Completion>,
    pool: Vec<u8>,
    buf_size: u32,
    /// Receive buffers are `0..recv_count`, buffers for callers `recv_count..total`.
    recv_count: u32,
    total: u32,
    recv_free: Vec<u32>,
    send_free: Vec<u32>,
    events: Vec<libc::epoll_event>,
    accept_batch: u32,
    /// The previous wait did its work without asking the kernel for readiness.
    skipped_poll: bool,
}

impl Epoll {
    /// Creates the epoll set, its waker and the buffer pool.
    pub fn new(cfg: &Config) -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a fresh descriptor
        // that we own exclusively from here on.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `epfd` was just created and nothing else owns it.
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        let buf_size = cfg.buf_size.max(64);
        let buffers = cfg.buffers.clamp(1, 1 << 20);
        let total = buffers as usize + cfg.send_buffers.min(1 << 20) as usize;
        let bytes = total
            .checked_mul(buf_size as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "buffer pool too large"))?;
        let ep = Epoll {
            epfd,
            waker: Arc::new(EventFd::new()?),
            slots: Vec::new(),
            listeners: Vec::new(),
            ready: Vec::with_capacity(1024),
            ready_spare: Vec::with_capacity(1024),
            synthetic: Vec::new(),
            pool: vec![0; bytes],
            buf_size,
            recv_count: buffers,
            total: total as u32,
            recv_free: (0..buffers).rev().collect(),
            send_free: (buffers..total as u32).rev().collect(),
            events: vec![
                libc::epoll_event { events: 0, u64: 0 };
                cfg.events.clamp(16, 65536) as usize
            ],
            accept_batch: cfg.accept_batch.max(1),
            skipped_poll: false,
        };
        ep.ctl_add(
            ep.waker.as_raw_fd(),
            libc::EPOLLIN as u32,
            TAG_WAKER << TAG_SHIFT,
        )?;
        Ok(ep)
    }

    fn ctl_add(&self, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: `ev` is a live local the kernel only reads during the call; both descriptors
        // are open (the caller owns `fd`, `self` owns the epoll set).
        let rc =
            unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers a connected, non-blocking socket and opens its slot.
    fn register(&mut self, fd: RawFd) -> io::Result<Socket> {
        let i = fd as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, Slot::default);
        }
        let gen = self.slots[i].gen.wrapping_add(1) & GEN_MASK;
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        self.ctl_add(fd, events, conn_key(fd as u32, gen))?;
        // Readable only once the kernel says so (registration reports data already queued);
        // a fresh socket has room to send.
        self.slots[i] = Slot {
            gen,
            open: true,
            readable: false,
            writable: true,
            hup: false,
            queued: false,
            recv: None,
            send: None,
        };
        Ok(Socket(fd as u64))
    }

    fn slot(&mut self, sock: Socket) -> Option<&mut Slot> {
        self.slots.get_mut(sock.0 as usize).filter(|s| s.open)
    }

    fn queue_conn(&mut self, fd: u32) {
        let s = &mut self.slots[fd as usize];
        if s.open && !s.queued && s.actionable() {
            s.queued = true;
            self.ready.push(conn_key(fd, s.gen));
        }
    }

    fn queue_listener(&mut self, i: u32) {
        let l = &mut self.listeners[i as usize];
        if l.armed && l.readable && !l.queued && l.fd.is_some() {
            l.queued = true;
            self.ready.push(listener_key(i));
        }
    }

    /// The bytes `off..off + len` of buffer `buf` in the pool; panics when out of range (a
    /// bug in the caller, never a network event).
    fn buf_range(&self, buf: u32, off: u32, len: u32) -> std::ops::Range<usize> {
        assert!(
            buf < self.total && off as u64 + len as u64 <= self.buf_size as u64,
            "buffer {buf} offset {off} length {len} out of range"
        );
        let start = buf as usize * self.buf_size as usize + off as usize;
        start..start + len as usize
    }

    fn return_buf(&mut self, buf: u32) {
        if buf < self.recv_count {
            self.recv_free.push(buf);
        } else {
            self.send_free.push(buf);
        }
    }

    /// Asks the kernel which sockets became ready, waiting up to `timeout`.
    fn poll(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
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
                TAG_LISTENER => {
                    let i = data as u32;
                    if let Some(l) = self.listeners.get_mut(i as usize) {
                        l.readable = true;
                        self.queue_listener(i);
                    }
                }
                _ => {
                    let fd = data as u32;
                    let gen = ((data >> 32) as u32) & GEN_MASK;
                    let Some(s) = self.slots.get_mut(fd as usize) else {
                        continue;
                    };
                    if !s.open || s.gen != gen {
                        continue;
                    }
                    let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
                    if flags & ((libc::EPOLLRDHUP as u32) | err) != 0 {
                        s.hup = true;
                    }
                    if flags & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | err) != 0 {
                        s.readable = true;
                    }
                    if flags & (libc::EPOLLOUT as u32 | err) != 0 {
                        s.writable = true;
                    }
                    self.queue_conn(fd);
                }
            }
        }
        Ok(())
    }

    /// Performs what the ready sockets allow, one step each, and queues again those that can
    /// do more.
    fn run_ready(&mut self, out: &mut Vec<Completion>) {
        let mut batch = std::mem::replace(&mut self.ready, std::mem::take(&mut self.ready_spare));
        for &key in &batch {
            match key >> TAG_SHIFT {
                TAG_LISTENER => self.run_listener(key as u32, out),
                _ => {
                    let fd = key as u32;
                    let gen = ((key >> 32) as u32) & GEN_MASK;
                    match self.slots.get_mut(fd as usize) {
                        Some(s) if s.open && s.gen == gen => {
                            s.queued = false;
                            self.run_conn(fd, out);
                        }
                        _ => {}
                    }
                }
            }
        }
        batch.clear();
        self.ready_spare = batch;
    }

    fn run_conn(&mut self, fd: u32, out: &mut Vec<Completion>) {
        let raw = fd as RawFd;
        let i = fd as usize;
        if let (Some(p), true) = (self.slots[i].send, self.slots[i].writable) {
            let n = if p.count == 1 {
                let SendPart { buf, off, len } = p.parts[0];
                let range = self.buf_range(buf.0, off, len);
                sys_send(raw, &self.pool[range])
            } else {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEND_PARTS];
                for (v, part) in iov.iter_mut().zip(&p.parts[..p.count as usize]) {
                    let range = self.buf_range(part.buf.0, part.off, part.len);
                    let bytes = &self.pool[range];
                    *v = libc::iovec {
                        iov_base: bytes.as_ptr() as *mut libc::c_void,
                        iov_len: bytes.len(),
                    };
                }
                sys_sendmsg(raw, &iov[..p.count as usize])
            };
            let s = &mut self.slots[i];
            if n >= 0 {
                s.send = None;
                out.push(Completion::Send {
                    token: p.token,
                    result: Ok(n as u32),
                });
            } else {
                match errno() {
                    libc::EAGAIN => s.writable = false,
                    libc::EINTR => {}
                    e => {
                        s.send = None;
                        out.push(Completion::Send {
                            token: p.token,
                            result: Err(op_error(e)),
                        });
                    }
                }
            }
        }
        if let (Some(token), true) = (self.slots[i].recv, self.slots[i].readable) {
            self.recv_once(fd, token, out);
        }
        self.queue_conn(fd);
    }

    /// One read for a posted receive: at most one buffer per connection per loop turn.
    fn recv_once(&mut self, fd: u32, token: Token, out: &mut Vec<Completion>) {
        let i = fd as usize;
        let Some(buf) = self.recv_free.pop() else {
            self.slots[i].recv = None;
            out.push(Completion::Recv {
                token,
                result: Err(OpError::NoBuffers),
                more: false,
            });
            return;
        };
        let range = self.buf_range(buf, 0, self.buf_size);
        // The buffer is free (just popped from the free list): nothing else reads it meanwhile.
        let n = sys_recv(fd as RawFd, &mut self.pool[range]);
        let err = (n < 0).then(errno);
        let s = &mut self.slots[i];
        match (n, err) {
            (n, _) if n > 0 => {
                // A short read drained the socket: the next byte raises a new edge. Not so
                // after the peer's end of stream was signalled: its edge has been spent, and
                // the next read must find the end of stream.
                if (n as u32) < self.buf_size && !s.hup {
                    s.readable = false;
                }
                out.push(Completion::Recv {
                    token,
                    result: Ok(Received::Data {
                        buf: BufId(buf),
                        len: n as u32,
                    }),
                    more: true,
                });
                return;
            }
            (0, _) => {
                s.recv = None;
                out.push(Completion::Recv {
                    token,
                    result: Ok(Received::Eof),
                    more: false,
                });
            }
            (_, Some(libc::EAGAIN)) => s.readable = false,
            (_, Some(libc::EINTR)) => {}
            (_, e) => {
                s.recv = None;
                out.push(Completion::Recv {
                    token,
                    result: Err(op_error(e.unwrap_or(libc::EIO))),
                    more: false,
                });
            }
        }
        self.return_buf(buf);
    }

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

    fn close_sock(&mut self, sock: Socket) {
        let fd = sock.0 as RawFd;
        match self.slots.get_mut(fd as usize) {
            Some(s) if s.open => {
                s.open = false;
                s.queued = false;
                s.recv = None;
                s.send = None;
            }
            // Not a socket of ours (never registered, or already closed): leave it alone.
            _ => return,
        }
        // SAFETY: the slot was open, so this backend owns `fd`; marking it closed first means
        // it is closed exactly once. Closing also removes it from the epoll set.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

// The three calls of the hot path go to the kernel through `syscall(2)` rather than glibc's
// wrappers. Those wrappers are thread-cancellation points: in a multi-threaded process (the
// server has a signal thread) each call switches asynchronous cancellation on and off around
// the system call, two atomic updates that measured as a third of this backend's user time
// per echo. echoport never cancels a thread, so it has no use for them. Errors come back as
// -1 with errno set, as from the wrappers.

/// `send(fd, bytes, MSG_NOSIGNAL)`.
fn sys_send(fd: RawFd, bytes: &[u8]) -> isize {
    // SAFETY: `bytes` is a live slice valid for `bytes.len()` bytes for the whole synchronous
    // call; the kernel only copies out of it. Null address arguments are allowed for sendto.
    unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd,
            bytes.as_ptr(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        ) as isize
    }
}

/// `sendmsg(fd, {iov}, MSG_NOSIGNAL)`: the gathered send.
fn sys_sendmsg(fd: RawFd, iov: &[libc::iovec]) -> isize {
    // SAFETY: every iovec points into the pool (checked by `buf_range`) and `iov` with them
    // lives for the whole synchronous call; the kernel only reads the header, the vector and
    // the bytes. A zeroed msghdr is valid (no address, no control data).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        libc::syscall(
            libc::SYS_sendmsg,
            fd,
            &msg as *const libc::msghdr,
            libc::MSG_NOSIGNAL,
        ) as isize
    }
}

/// `recv(fd, dst, 0)`.
fn sys_recv(fd: RawFd, dst: &mut [u8]) -> isize {
    // SAFETY: `dst` is a live, exclusively borrowed slice valid for `dst.len()` bytes for the
    // whole synchronous call; the kernel writes at most that many. Null address arguments are
    // allowed for recvfrom.
    unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            dst.as_mut_ptr(),
            dst.len(),
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        ) as isize
    }
}

/// `epoll_wait(epfd, events, timeout_ms)` (as `epoll_pwait` with no signal mask, which every
/// architecture has).
fn sys_epoll_wait(epfd: RawFd, events: &mut [libc::epoll_event], ms: i32) -> i32 {
    // SAFETY: the kernel writes at most `events.len()` entries into the slice, which lives
    // across the call; a null signal mask means "leave the mask alone".
    unsafe {
        libc::syscall(
            libc::SYS_epoll_pwait,
            epfd,
            events.as_mut_ptr(),
            events.len() as libc::c_int,
            ms,
            std::ptr::null::<libc::sigset_t>(),
            0 as libc::size_t,
        ) as i32
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Submit for Epoll {
    fn push(&mut self, op: Op) {
        match op {
            Op::Accept { listener } => {
                let i = listener.0;
                if let Some(l) = self.listeners.get_mut(i as usize) {
                    if l.fd.is_some() {
                        l.armed = true;
                        self.queue_listener(i);
                    }
                }
            }
            Op::CloseListener { listener } => {
                if let Some(l) = self.listeners.get_mut(listener.0 as usize) {
                    // The posted accept ends with the listener; like io_uring's cancelled
                    // accept on a closing listener, it reports nothing.
                    l.armed = false;
                    l.fd = None;
                }
            }
            Op::Recv { token, sock, .. } => match self.slot(sock) {
                Some(s) => {
                    s.recv = Some(token);
                    self.queue_conn(sock.0 as u32);
                }
                None => self.synthetic.push(Completion::Recv {
                    token,
                    result: Err(OpError::Os(libc::EBADF)),
                    more: false,
                }),
            },
            Op::Send { .. } | Op::SendParts { .. } => {
                let (token, sock, parts, count) = match op {
                    Op::Send {
                        token,
                        sock,
                        buf,
                        off,
                        len,
                    } => {
                        let mut parts = [SendPart::default(); MAX_SEND_PARTS];
                        parts[0] = SendPart { buf, off, len };
                        (token, sock, parts, 1)
                    }
                    Op::SendParts {
                        token,
                        sock,
                        parts,
                        count,
                    } => (token, sock, parts, count.clamp(1, MAX_SEND_PARTS as u8)),
                    _ => unreachable!(),
                };
                for p in &parts[..count as usize] {
                    let _ = self.buf_range(p.buf.0, p.off, p.len);
                }
                match self.slot(sock) {
                    Some(s) => {
                        debug_assert!(s.send.is_none(), "two sends in flight on {sock:?}");
                        s.send = Some(PendingSend {
                            token,
                            parts,
                            count,
                        });
                        self.queue_conn(sock.0 as u32);
                    }
                    None => self.synthetic.push(Completion::Send {
                        token,
                        result: Err(OpError::Os(libc::EBADF)),
                    }),
                }
            }
            Op::CancelRecv { token, sock } => {
                if let Some(s) = self.slot(sock) {
                    if s.recv == Some(token) {
                        s.recv = None;
                        self.synthetic.push(Completion::Recv {
                            token,
                            result: Err(OpError::Canceled),
                            more: false,
                        });
                    }
                }
            }
            Op::CancelSend { token, sock } => {
                if let Some(s) = self.slot(sock) {
                    if s.send.is_some_and(|p| p.token == token) {
                        s.send = None;
                        self.synthetic.push(Completion::Send {
                            token,
                            result: Err(OpError::Canceled),
                        });
                    }
                }
            }
            Op::Shutdown { sock, .. } => {
                if self.slot(sock).is_some() {
                    // SAFETY: the slot is open, so `sock` is a descriptor this backend owns.
                    // Failure (the peer already reset) changes nothing for the state machine.
                    unsafe { libc::shutdown(sock.0 as RawFd, libc::SHUT_WR) };
                }
            }
            Op::Close { sock, .. } => self.close_sock(sock),
        }
    }

    fn release(&mut self, buf: BufId) {
        self.return_buf(buf.0);
    }

    fn max_send_parts(&self) -> usize {
        MAX_SEND_PARTS
    }

    fn buf_size(&self) -> u32 {
        self.buf_size
    }

    fn copy(&mut self, dst: BufId, at: u32, src: BufId, len: u32) {
        let from = self.buf_range(src.0, 0, len);
        let to = self.buf_range(dst.0, at, len);
        self.pool.copy_within(from, to.start);
    }

    fn free_buffers(&self) -> usize {
        self.recv_free.len()
    }

    fn total_buffers(&self) -> usize {
        self.recv_count as usize
    }
}

impl Backend for Epoll {
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<ListenerId> {
        listener.set_nonblocking(true)?;
        let i = self.listeners.len() as u32;
        let fd: OwnedFd = listener.into();
        // EPOLLEXCLUSIVE: when several threads' epoll sets watch one shared listening
        // socket (`--listener shared`), a new connection wakes one of them, not all.
        self.ctl_add(
            fd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32,
            listener_key(i),
        )?;
        self.listeners.push(ListenerSlot {
            fd: Some(fd),
            armed: false,
            readable: false,
            queued: false,
        });
        Ok(ListenerId(i))
    }

    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket> {
        stream.set_nonblocking(true)?;
        let fd: OwnedFd = stream.into();
        let raw = fd.as_raw_fd();
        let sock = self.register(raw)?;
        // The slot owns the descriptor now; it is closed by `Op::Close` or on drop.
        std::mem::forget(fd);
        Ok(sock)
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.waker.clone()
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        out.append(&mut self.synthetic);
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let busy = !out.is_empty() || !self.ready.is_empty();
            let mut blocked = false;
            if busy && !self.skipped_poll {
                // Work is at hand and the last wait asked the kernel: do the work now and ask
                // next time. This saves one epoll_wait per echo (the send that follows a
                // receive needs no fresh readiness) while no socket waits more than a turn.
                self.skipped_poll = true;
            } else {
                self.skipped_poll = false;
                let t = if busy {
                    Some(Duration::ZERO)
                } else {
                    blocked = true;
                    deadline.map(|d| d.saturating_duration_since(Instant::now()))
                };
                self.poll(t, out)?;
            }
            self.run_ready(out);
            if !out.is_empty() || blocked {
                return Ok(());
            }
        }
    }

    fn buf(&self, buf: BufId) -> &[u8] {
        &self.pool[self.buf_range(buf.0, 0, self.buf_size)]
    }

    fn alloc_buf(&mut self) -> Option<BufId> {
        self.send_free.pop().map(BufId)
    }

    fn buf_mut(&mut self, buf: BufId) -> &mut [u8] {
        assert!(
            buf.0 >= self.recv_count,
            "only allocated buffers may be written"
        );
        let range = self.buf_range(buf.0, 0, self.buf_size);
        &mut self.pool[range]
    }

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        if !self.slots.get(sock.0 as usize).is_some_and(|s| s.open) {
            return None;
        }
        // SAFETY: the descriptor is one of this backend's open connections (checked above);
        // it is closed only by `close_sock`, which needs `&mut self`, so not during the borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.0 as RawFd) };
        crate::sys::peer_ip(fd)
    }

    fn buffer_misuses(&self) -> u64 {
        0
    }

    fn describe(&self) -> String {
        format!(
            "epoll (edge-triggered, {} buffers of {} B)",
            self.recv_count, self.buf_size
        )
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        for fd in 0..self.slots.len() {
            self.close_sock(Socket(fd as u64));
        }
    }
}
