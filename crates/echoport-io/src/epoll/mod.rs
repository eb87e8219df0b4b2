//! The epoll backend: readiness turned into completions, for where io_uring is refused.
//!
//! The state machine posts the same [`Op`](echoport_core::Op)s as on io_uring; this backend remembers each one
//! and performs it when its socket is ready, then reports the same [`Completion`] io_uring
//! would have. Receives and accepts behave like io_uring's multishot operations: once posted
//! they stay posted and deliver data (or connections) until end of stream, an error or a
//! cancellation ends them.
//!
//! Every socket is registered once, edge-triggered, for input (urgent data included) and
//! output; the backend keeps whether each socket is known to be readable and writable, clears
//! that only when the kernel says `EAGAIN` (or a read comes back short, which on a stream
//! socket means its queue was drained, so the next byte raises a new edge), and sets it again
//! on the next edge. A short read is not taken as drained once the peer's end of stream has
//! been signalled (its edge is spent), nor on a socket that has reported TCP urgent data
//! (`EPOLLPRI`): a read stops short at the urgent mark with bytes still queued behind it, and
//! no further edge would come for them. The urgent byte itself is not delivered (the kernel
//! keeps it out of the stream without `SO_OOBINLINE`); the bytes around it are, in order.
//! No `epoll_ctl` happens after registration, whatever is posted or cancelled.
//!
//! Connections live in a slab of the worker's own, sized by the connections it holds at once
//! (not by descriptor numbers, which are the process's and would make every worker's table
//! as large as the largest descriptor any thread had accepted). A [`Socket`] names a slot and
//! its generation, so a late operation on a closed connection cannot reach the slot's next
//! tenant, and the kernel reports readiness with the same two numbers.
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
//! Each read asks for at most what is left of the receive's allowance ([`Op::Recv`](echoport_core::Op::Recv)'s `max`),
//! and the receive ends (`more == false`) when the allowance is used up: this backend never
//! overshoots it.
//!
//! The files: `ready.rs` (asking the kernel which sockets are ready, and doing what they
//! allow: accept, read, send), `submit.rs` (one function per operation posted),
//! `syscalls.rs` (the hot path's system calls).

mod ready;
mod submit;
mod syscalls;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, Completion, ListenerId, MAX_SEND_PARTS, OpError, SendPart, Socket, Token, Waker,
};

use crate::pool::{Misuse, Pool, PoolConfig};
use crate::sys::EventFd;

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
/// Tag of a connection's data word.
const TAG_CONN: u64 = 0;
/// Tag of a listener's data word.
const TAG_LISTENER: u64 = 1;
/// Tag of the waker's data word.
const TAG_WAKER: u64 = 2;
/// Generations kept in a connection's data word (between the tag and the slot).
const GEN_MASK: u32 = (1 << 30) - 1;

/// The data word a connection is registered (and queued) with: its slot and generation.
fn conn_key(idx: u32, generation: u32) -> u64 {
    (TAG_CONN << TAG_SHIFT) | (((generation & GEN_MASK) as u64) << 32) | idx as u64
}

/// The [`Socket`] the state machine knows a connection by: its slot and generation (not the
/// descriptor, so a late operation on a closed connection cannot reach its slot's next one).
fn sock_name(idx: u32, generation: u32) -> Socket {
    Socket(((generation & GEN_MASK) as u64) << 32 | idx as u64)
}

/// The slot and generation a [`Socket`] names.
fn sock_parts(sock: Socket) -> (u32, u32) {
    (sock.0 as u32, (sock.0 >> 32) as u32)
}

/// The data word listener `i` is registered (and queued) with.
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
    /// A send of `parts` (one, or up to [`MAX_SEND_PARTS`] gathered), in order.
    fn new(token: Token, parts: &[SendPart]) -> PendingSend {
        let n = parts.len().min(MAX_SEND_PARTS);
        let mut all = [SendPart::default(); MAX_SEND_PARTS];
        all[..n].copy_from_slice(&parts[..n]);
        let count = n.max(1);
        PendingSend {
            token,
            parts: all,
            count: count as u8,
        }
    }
}

/// A posted receive: whom it completes for, and how many more bytes it may deliver before
/// it ends (what is left of the connection's allowance, [`Op::Recv`](echoport_core::Op::Recv)'s `max`).
#[derive(Copy, Clone, Debug)]
struct PostedRecv {
    /// The connection.
    token: Token,
    /// Bytes it may still deliver (at least one while posted).
    left: u32,
}

/// What the backend knows about one connected socket: an entry of the worker's slab.
#[derive(Debug)]
struct Slot {
    /// The socket's descriptor (owned by this backend while the slot is open).
    fd: RawFd,
    /// Changes every time the slot is reused, so stale readiness and stale names of an
    /// earlier connection are ignored.
    generation: u32,
    /// The backend owns the descriptor and the state machine may name it.
    open: bool,
    /// A read may find bytes (or end of stream): set by an edge, cleared when a read says
    /// the queue is empty.
    readable: bool,
    /// A send may make progress: set by an edge, cleared on `EAGAIN`.
    writable: bool,
    /// The peer's end of stream (or an error) has been signalled: reads never block again,
    /// and no further edge will come to say so.
    hup: bool,
    /// The peer has sent TCP urgent data (`EPOLLPRI`): a read may stop short at the urgent
    /// mark with bytes still queued behind it, so from now on only `EAGAIN` says the queue
    /// is empty.
    urgent: bool,
    /// In the ready list for the next pass.
    queued: bool,
    /// The posted receive, if any.
    recv: Option<PostedRecv>,
    /// The posted send, if any.
    send: Option<PendingSend>,
}

impl Slot {
    /// A slot no connection holds.
    fn vacant() -> Slot {
        Slot {
            fd: -1,
            generation: 0,
            open: false,
            readable: false,
            writable: false,
            hup: false,
            urgent: false,
            queued: false,
            recv: None,
            send: None,
        }
    }

    /// A posted operation can make progress now.
    fn actionable(&self) -> bool {
        (self.recv.is_some() && self.readable) || (self.send.is_some() && self.writable)
    }
}

/// A listening socket and the state of its accept.
struct ListenerSlot {
    /// The socket; `None` once closed.
    fd: Option<OwnedFd>,
    /// An accept is posted on it.
    armed: bool,
    /// Connections may be waiting: set by an edge, cleared on `EAGAIN`.
    readable: bool,
    /// In the ready list for the next pass.
    queued: bool,
}

/// An epoll set serving one worker thread.
pub struct Epoll {
    /// The epoll set.
    epfd: OwnedFd,
    /// The waker's eventfd, registered in the set.
    waker: Arc<EventFd>,
    /// Connected sockets: a slab indexed by [`Socket`] (slot and generation), sized by the
    /// connections this worker holds at once.
    slots: Vec<Slot>,
    /// Slots no connection holds, for the next one.
    vacant: Vec<u32>,
    /// Listening sockets, by [`ListenerId`].
    listeners: Vec<ListenerSlot>,
    /// Sockets (data words as registered) with work possible now.
    ready: Vec<u64>,
    /// The previous pass's ready list, kept to reuse its allocation.
    ready_spare: Vec<u64>,
    /// Completions produced by posting (cancellations), handed out at the next wait.
    synthetic: Vec<Completion>,
    /// Every buffer, and who holds it.
    pool: Pool,
    /// Where the kernel writes readiness events (its length: most events per wait).
    events: Vec<libc::epoll_event>,
    /// Most connections one listener accepts per loop turn.
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
            vacant: Vec::new(),
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

    /// Adds `fd` to the epoll set for `events`, reported with `data`.
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

    /// Registers a connected, non-blocking socket and opens a slot for it: a vacant one
    /// when there is one, else a new one at the end. The slab grows with the connections
    /// this worker holds at once, whatever their descriptor numbers (which are the process's,
    /// shared by every worker).
    fn register(&mut self, fd: RawFd) -> io::Result<Socket> {
        let idx = match self.vacant.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::vacant());
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots[idx as usize].generation.wrapping_add(1) & GEN_MASK;
        let events =
            (libc::EPOLLIN | libc::EPOLLPRI | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET)
                as u32;
        if let Err(e) = self.ctl_add(fd, events, conn_key(idx, generation)) {
            self.vacant.push(idx);
            return Err(e);
        }
        // Readable only once the kernel says so (registration reports data already queued);
        // a fresh socket has room to send.
        self.slots[idx as usize] = Slot {
            fd,
            generation,
            open: true,
            readable: false,
            writable: true,
            ..Slot::vacant()
        };
        Ok(sock_name(idx, generation))
    }

    /// The open slot `sock` names, if any (a closed or reused slot's old name finds none).
    fn slot(&mut self, sock: Socket) -> Option<&mut Slot> {
        let (idx, generation) = sock_parts(sock);
        self.slots
            .get_mut(idx as usize)
            .filter(|s| s.open && s.generation == generation)
    }

    /// The open slot `sock` names, to read.
    fn slot_ref(&self, sock: Socket) -> Option<&Slot> {
        let (idx, generation) = sock_parts(sock);
        self.slots
            .get(idx as usize)
            .filter(|s| s.open && s.generation == generation)
    }

    /// Slots allocated (open or vacant): what this worker's connection table costs. For
    /// tests: it follows the connections held at once, not the descriptor numbers.
    #[doc(hidden)]
    pub fn slot_capacity(&self) -> usize {
        self.slots.capacity()
    }

    /// Queues a connection for the next pass when a posted operation can make progress.
    fn queue_conn(&mut self, idx: u32) {
        let s = &mut self.slots[idx as usize];
        if s.open && !s.queued && s.actionable() {
            s.queued = true;
            self.ready.push(conn_key(idx, s.generation));
        }
    }

    /// Queues a listener for the next pass when its accept can make progress.
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

    /// Closes a connection's socket (once), forgets what was posted on it and frees its
    /// slot for the next connection.
    fn close_sock(&mut self, sock: Socket) {
        let (idx, _) = sock_parts(sock);
        // Not a socket of ours (never registered, or already closed): leave it alone.
        let Some(s) = self.slot(sock) else { return };
        let fd = s.fd;
        *s = Slot {
            generation: s.generation,
            ..Slot::vacant()
        };
        self.vacant.push(idx);
        // SAFETY: the slot was open, so this backend owns `fd`; marking it vacant first means
        // it is closed exactly once. Closing also removes it from the epoll set.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
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

    crate::pool::pool_backend_methods!();

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        let raw = self.slot_ref(sock)?.fd;
        // SAFETY: the descriptor is one of this backend's open connections (its slot is
        // open); it is closed only by `close_sock`, which needs `&mut self`, so not during
        // the borrow.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
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
        for idx in 0..self.slots.len() {
            let s = &self.slots[idx];
            if s.open {
                self.close_sock(sock_name(idx as u32, s.generation));
            }
        }
    }
}
