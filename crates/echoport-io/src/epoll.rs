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
//! The one pool of every backend (`pool.rs`): receive buffers, lent to the state machine from
//! a receive completion until released, and buffers for callers that send their own bytes
//! ([`Backend::alloc_buf`]). The kernel touches a buffer only during a `recv` or `send` call,
//! never in the background: a read takes a free receive buffer (the pool records it as the
//! kernel's for the call), then lends it on data or puts it back on `EAGAIN`, end of stream
//! or an error. A release the pool refuses (twice, or a buffer never lent) is reported and
//! changes nothing; a send naming a buffer not lent fails with `EFAULT`. When no receive
//! buffer is free, a readable connection's receive completes with [`OpError::NoBuffers`] and
//! the worker parks it, exactly as with io_uring's empty buffer ring.
//!
//! Each read asks for at most what is left of the receive's allowance ([`Op::Recv`]'s `max`),
//! and the receive ends (`more == false`) when the allowance is used up: this backend never
//! overshoots it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, BufId, Completion, ListenerId, Op, OpError, Received, SendPart, Socket, Submit, Token,
    Waker, MAX_SEND_PARTS,
};

use crate::pool::{Misuse, Pool, PoolConfig};
use crate::sys::{op_error, EventFd};

/// Settings of one epoll loop.
#[derive(Clone, Debug)]
pub struct Config {
    /// The buffer pool.
    pub pool: PoolConfig,
    /// Most readiness events taken from the kernel per wait.
    pub events: u32,
    /// Most connections one listener accepts per loop turn.
    pub accept_batch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pool: PoolConfig::default(),
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
    /// The connection.
    token: Token,
    /// The pieces, in the order their bytes go out; only the first `count` count.
    parts: [SendPart; MAX_SEND_PARTS],
    /// How many of `parts` to send (1 to [`MAX_SEND_PARTS`]).
    count: u8,
}

impl PendingSend {
    /// A plain send of one buffer's bytes ([`Op::Send`]).
    fn one(token: Token, part: SendPart) -> PendingSend {
        let mut parts = [SendPart::default(); MAX_SEND_PARTS];
        parts[0] = part;
        PendingSend {
            token,
            parts,
            count: 1,
        }
    }

    /// A gathered send ([`Op::SendParts`]) of the first `count` parts.
    fn gathered(token: Token, parts: [SendPart; MAX_SEND_PARTS], count: u8) -> PendingSend {
        PendingSend {
            token,
            parts,
            count: count.clamp(1, MAX_SEND_PARTS as u8),
        }
    }
}

/// A posted receive: whom it completes for, and how many more bytes it may deliver before
/// it ends (what is left of the connection's allowance, [`Op::Recv`]'s `max`).
#[derive(Copy, Clone, Debug)]
struct PostedRecv {
    /// The connection.
    token: Token,
    /// Bytes it may still deliver (at least one while posted).
    left: u32,
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
    recv: Option<PostedRecv>,
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
    /// Every buffer, and who holds it.
    pool: Pool,
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
        let ep = Epoll {
            epfd,
            waker: Arc::new(EventFd::new()?),
            slots: Vec::new(),
            listeners: Vec::new(),
            ready: Vec::with_capacity(1024),
            ready_spare: Vec::with_capacity(1024),
            synthetic: Vec::new(),
            pool: Pool::new(&cfg.pool)?,
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

    /// Reports a refused buffer hand-over: a bug in the caller, asserted in debug builds,
    /// logged (the first few) and counted in release builds.
    fn misuse(&self, m: Misuse) {
        crate::pool::report(&m, self.pool.misuses());
    }

    /// Checks that every part of a send names bytes of a lent buffer.
    fn check_send(&mut self, p: &PendingSend) -> Result<(), Misuse> {
        for part in &p.parts[..p.count as usize] {
            self.pool
                .check_lent(part.buf.0, part.off, part.len, "sent while not lent")?;
        }
        Ok(())
    }

    /// The bytes a send part names; the part was checked with [`Epoll::check_send`].
    fn part_bytes(&self, part: &SendPart) -> &[u8] {
        &self.pool.bytes(part.buf.0)[part.off as usize..(part.off + part.len) as usize]
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
        let i = fd as usize;
        if let (Some(p), true) = (self.slots[i].send, self.slots[i].writable) {
            self.send_once(fd, p, out);
        }
        if let (Some(r), true) = (self.slots[i].recv, self.slots[i].readable) {
            self.recv_once(fd, r, out);
        }
        self.queue_conn(fd);
    }

    /// One attempt at a posted send: it completes with what the kernel took, or stays
    /// posted until the socket is writable again.
    fn send_once(&mut self, fd: u32, p: PendingSend, out: &mut Vec<Completion>) {
        let raw = fd as RawFd;
        if let Err(m) = self.check_send(&p) {
            // Released while its send was posted: a bug in the caller; nothing is sent.
            self.slots[fd as usize].send = None;
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
        let s = &mut self.slots[fd as usize];
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
    fn recv_once(&mut self, fd: u32, r: PostedRecv, out: &mut Vec<Completion>) {
        let Some(buf) = self.pool.take_recv() else {
            self.slots[fd as usize].recv = None;
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
        let n = unsafe { sys_recv(fd as RawFd, dst, want as usize) };
        if n > 0 {
            self.received(fd, r, buf, n as u32, want, out);
        } else {
            let err = (n < 0).then(errno);
            self.recv_ended(fd, r.token, buf, err, out);
        }
    }

    /// A read brought `n` bytes into `buf`: lend it, and end the receive at its allowance.
    fn received(
        &mut self,
        fd: u32,
        r: PostedRecv,
        buf: u32,
        n: u32,
        want: u32,
        out: &mut Vec<Completion>,
    ) {
        let lent = self.pool.lend(buf);
        let s = &mut self.slots[fd as usize];
        // A short read drained the socket: the next byte raises a new edge. Not so after the
        // peer's end of stream was signalled: its edge has been spent, and the next read
        // must find the end of stream.
        if n < want && !s.hup {
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
                self.slots[fd as usize].recv = None;
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
        fd: u32,
        token: Token,
        buf: u32,
        err: Option<i32>,
        out: &mut Vec<Completion>,
    ) {
        if let Err(m) = self.pool.unpost(buf) {
            self.misuse(m);
        }
        let s = &mut self.slots[fd as usize];
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
///
/// # Safety
/// Every iovec must describe memory readable for its length for the whole call.
unsafe fn sys_sendmsg(fd: RawFd, iov: &[libc::iovec]) -> isize {
    // SAFETY: the iovecs describe readable memory (the caller's promise) and `iov` lives for
    // the whole synchronous call; the kernel only reads the header, the vector and the
    // bytes. A zeroed msghdr is valid (no address, no control data).
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

/// `recv(fd, dst, len, 0)`.
///
/// # Safety
/// `dst..dst + len` must be writable, and neither read nor written by anything else, for the
/// whole call.
unsafe fn sys_recv(fd: RawFd, dst: *mut u8, len: usize) -> isize {
    // SAFETY: the caller's promise; the kernel writes at most `len` bytes there. Null address
    // arguments are allowed for recvfrom.
    unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd,
            dst,
            len,
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

/// The completion of a send that named a buffer the caller does not hold: it fails with
/// `EFAULT`, so its connection closes, and nothing reaches the kernel.
fn send_refused(token: Token) -> Completion {
    Completion::Send {
        token,
        result: Err(OpError::Os(libc::EFAULT)),
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
            Op::Accept { listener } => self.post_accept(listener),
            Op::CloseListener { listener } => self.post_close_listener(listener),
            Op::Recv { token, sock, max } => self.post_recv(token, sock, max),
            Op::Send {
                token,
                sock,
                buf,
                off,
                len,
            } => self.post_send(sock, PendingSend::one(token, SendPart { buf, off, len })),
            Op::SendParts {
                token,
                sock,
                parts,
                count,
            } => self.post_send(sock, PendingSend::gathered(token, parts, count)),
            Op::CancelRecv { token, sock } => self.post_cancel_recv(token, sock),
            Op::CancelSend { token, sock } => self.post_cancel_send(token, sock),
            Op::Shutdown { sock, .. } => self.post_shutdown(sock),
            Op::Close { sock, .. } => self.close_sock(sock),
        }
    }

    fn release(&mut self, buf: BufId) {
        // A receive buffer goes back to the free list: a read takes it at readiness.
        if let Err(m) = self.pool.release(buf.0, false) {
            self.misuse(m);
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
        self.pool.free_recv()
    }

    fn total_buffers(&self) -> usize {
        self.pool.recv_count() as usize
    }
}

impl Epoll {
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
        self.queue_conn(sock.0 as u32);
    }

    /// Send the bytes of lent buffers when the socket is writable; a part naming a buffer
    /// the caller does not hold refuses the whole send (`EFAULT`).
    fn post_send(&mut self, sock: Socket, p: PendingSend) {
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
        self.queue_conn(sock.0 as u32);
    }

    /// Cancel the posted receive: it ends at once, as cancelled (no read is in progress
    /// between loop turns, so there is nothing to wait for).
    fn post_cancel_recv(&mut self, token: Token, sock: Socket) {
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
    fn post_cancel_send(&mut self, token: Token, sock: Socket) {
        let Some(s) = self.slot(sock) else { return };
        if s.send.is_some_and(|p| p.token == token) {
            s.send = None;
            self.synthetic.push(Completion::Send {
                token,
                result: Err(OpError::Canceled),
            });
        }
    }

    /// Shut down the sending side at once (it reports nothing).
    fn post_shutdown(&mut self, sock: Socket) {
        if self.slot(sock).is_some() {
            // SAFETY: the slot is open, so `sock` is a descriptor this backend owns.
            // Failure (the peer already reset) changes nothing for the state machine.
            unsafe { libc::shutdown(sock.0 as RawFd, libc::SHUT_WR) };
        }
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
        self.pool.bytes(buf.0)
    }

    fn alloc_buf(&mut self) -> Option<BufId> {
        self.pool.alloc().map(BufId)
    }

    fn buf_mut(&mut self, buf: BufId) -> &mut [u8] {
        self.pool.bytes_mut(buf.0)
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
        self.pool.misuses()
    }

    fn describe(&self) -> String {
        format!(
            "epoll (edge-triggered, {} buffers of {} B)",
            self.pool.recv_count(),
            self.pool.buf_size()
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
