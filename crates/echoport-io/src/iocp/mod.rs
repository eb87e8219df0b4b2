//! The IOCP backend: Windows I/O completion ports, the original example's own model.
//!
//! An [`Op`] becomes one overlapped call (`AcceptEx`, `WSARecv`, `WSASend`) whose `OVERLAPPED`
//! is the first field of a *slot* owned by this backend; the slot records the operation's
//! [`Token`] packed with its [`OpKind`] (the per-operation key), so a completion reaped by
//! `GetQueuedCompletionStatusEx` leads back to its connection and incarnation. The port's
//! per-handle completion key only says what kind of slot the `OVERLAPPED` is (or that the
//! packet is a wake-up or a connection dealt by another thread).
//!
//! - **Accepts**: `AcceptEx`, obtained through `WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER)`,
//!   with [`Config::accepts_ahead`] accepts posted ahead on each listener, each into a socket
//!   created beforehand; a completed one gets `SO_UPDATE_ACCEPT_CONTEXT` and `TCP_NODELAY`, and
//!   its slot is posted again at once. The state machine's `Accept` is therefore multishot
//!   (`more: true`) for as long as the listener is open and accepting works.
//! - **Receives** are one-shot (`more: false` on every completion; the state machine posts the
//!   next), each asking for at most the connection's allowance and one buffer. While buffers
//!   are plentiful a receive is posted with a buffer; when fewer than
//!   [`Config::zero_byte_below`] are free it is posted as a *zero-byte* receive, which holds
//!   no buffer while the connection is idle, and its completion posts the real receive.
//! - **Sends** go out from the very buffer the bytes were received into.
//! - **Cancellation** is `CancelIoEx` on the slot's `OVERLAPPED`; shutdown and close are
//!   synchronous (`shutdown(SD_SEND)`, `closesocket`) and report nothing.
//!
//! # Threads
//! One completion port per worker thread, each thread running its own [`Iocp`] (no state is
//! shared between loops). Windows has no `SO_REUSEPORT`, and a socket can be tied to only one
//! port, so the threads serving one address form a *group* (`group.rs`): the first [`Iocp`]
//! to register a listening socket for that address posts the accepts, and deals the accepted
//! sockets round-robin to the group's members, tying each to its member's port and handing it
//! over with `PostQueuedCompletionStatus`. Other members register a clone of the listener
//! (`TcpListener::try_clone`), which only says which group they join.
//!
//! # Slot and buffer ownership
//! Every slot is a separate heap allocation that never moves. A slot whose call returned
//! success or `WSA_IO_PENDING` belongs to the kernel until its completion is reaped, whatever
//! happens to the connection meanwhile (a cancel, a reset): it goes back to the free list only
//! in [`Iocp::wait`], when its packet arrives. The state machine never closes a socket while
//! an operation on it is pending, and listening sockets are closed before their accept slots'
//! (cancelled) completions are awaited, so an `OVERLAPPED` is never freed while the kernel may
//! write it. Buffers are the pool's (`pool.rs`): a posted `WSARecv` holds its buffer as the
//! kernel's (`take_recv`); a completion with data lends it to the state machine, one
//! without data returns it (`unpost`); a zero-byte receive holds none. A send reads a lent
//! buffer, checked before it is posted. If dropping the backend cannot drain every pending
//! operation, the slots and the pool's region are leaked, never freed.
//!
//! # Socket ownership
//! A connection socket given to the state machine (accepted here, handed in by the group's
//! acceptor, adopted) is recorded until `Op::Close` closes it; only such sockets are shut
//! down, closed or asked for their peer, so no call can land on a reused handle. Dropping the
//! backend closes those still open (the worker gave up on them), and every socket handed over
//! and still queued on the port, however many.
//!
//! The files: `port.rs` (the port, its keys, the waker), `group.rs` (accept groups),
//! `slots.rs` (operation slots and the tables that find them), `accept.rs` (`AcceptEx` and
//! its completions), `recv_send.rs` (`WSARecv`/`WSASend` and theirs), `drop.rs` (cancel,
//! drain, close).

mod accept;
mod drop;
mod group;
mod port;
mod recv_send;
mod slots;

use std::collections::HashSet;
use std::io;
use std::os::windows::io::{BorrowedSocket, IntoRawSocket, RawSocket};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use echoport_core::{
    Backend, BufId, Completion, ListenerId, Op, OpKind, Post, SendPart, Socket, Submit, Token,
    Waker,
};
use windows_sys::Win32::Networking::WinSock::SOCKET;
use windows_sys::Win32::System::IO::OVERLAPPED_ENTRY;
use windows_sys::Win32::System::Threading::INFINITE;

use crate::pool::{Misuse, Pool, PoolConfig};
use accept::ListenerSlot;
use port::{KEY_HANDOFF, KEY_LISTENER, KEY_SOCKET, KEY_WAKE, Port, PortWaker};
use slots::OpSlot;

/// Settings of one completion port.
#[derive(Clone, Debug)]
pub struct Config {
    /// The buffer pool.
    pub pool: PoolConfig,
    /// `AcceptEx` calls kept posted on each listener.
    pub accepts_ahead: u32,
    /// Completions reaped by one `GetQueuedCompletionStatusEx` call.
    pub batch: u32,
    /// Post zero-byte receives (which hold no buffer while they wait) when fewer receive
    /// buffers than this are free. `None`: a quarter of the pool's receive buffers.
    pub zero_byte_below: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pool: PoolConfig::default(),
            accepts_ahead: 16,
            batch: 256,
            zero_byte_below: None,
        }
    }
}

/// Counters of the IOCP backend, for tests and logs.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct IocpStats {
    /// Accepted sockets handed to another thread's port.
    pub handed_over: u64,
    /// Accepted sockets received from another thread.
    pub handed_in: u64,
    /// Zero-byte receives posted (no buffer was spared for an idle connection).
    pub zero_byte_recvs: u64,
    /// Accepts that failed for a reason of the peer's (reset before accept) and were re-posted.
    pub accept_retries: u64,
}

/// An I/O completion port serving one worker thread.
pub struct Iocp {
    /// This backend's name in its accept groups.
    id: u64,
    /// The port (shared with the wakers and the groups this backend is a member of).
    port: Arc<Port>,
    /// Posts wake-ups to the port.
    waker: Arc<PortWaker>,
    /// The settings, with `accepts_ahead` and `batch` at least 1.
    cfg: Config,
    /// Receives are posted zero-byte while at most this many receive buffers are free.
    zero_below: u32,
    /// Every buffer, and who holds it.
    pool: Pool,
    /// Every operation slot ever made, by index; each lives until `Drop`.
    ops: Vec<NonNull<OpSlot>>,
    /// Indices of the slots no call is pending on.
    free_ops: Vec<u32>,
    /// The slot of each connection's pending receive, by connection id (`slots::NONE`: none).
    recv_op: Vec<u32>,
    /// The slot of each connection's pending send, by connection id.
    send_op: Vec<u32>,
    /// Registered listeners, by [`ListenerId`].
    listeners: Vec<ListenerSlot>,
    /// Connection sockets given to the state machine (accepted, handed in, adopted) and not
    /// yet closed: open and ours. `Op::Close` and `Op::Shutdown` act only on these (a socket
    /// not here may be a reused handle), `peer_ip` asks only these, and drop closes those
    /// still here.
    conns: HashSet<SOCKET>,
    /// Completions made at post time (a call that failed at once), handed out at the next
    /// wait.
    synthetic: Vec<Completion>,
    /// Packets of one dequeue (kept to reuse the allocation), `Config::batch` of them.
    entries: Vec<OVERLAPPED_ENTRY>,
    /// Overlapped calls pending (their packet not yet reaped).
    inflight: usize,
    /// Counters so far.
    stats: IocpStats,
}

impl Iocp {
    /// Creates a completion port and its buffers.
    pub fn new(cfg: &Config) -> io::Result<Iocp> {
        port::winsock_init()?;
        let port = Arc::new(Port::new()?);
        let pool = Pool::new(&cfg.pool)?;
        let batch = cfg.batch.max(1);
        Ok(Iocp {
            id: group::next_backend_id(),
            waker: Arc::new(PortWaker::new(port.clone())),
            port,
            zero_below: cfg.zero_byte_below.unwrap_or(pool.recv_count() / 4),
            cfg: Config {
                accepts_ahead: cfg.accepts_ahead.max(1),
                batch,
                ..cfg.clone()
            },
            pool,
            ops: Vec::new(),
            free_ops: Vec::new(),
            recv_op: Vec::new(),
            send_op: Vec::new(),
            listeners: Vec::new(),
            conns: HashSet::new(),
            synthetic: Vec::new(),
            entries: vec![OVERLAPPED_ENTRY::default(); batch as usize],
            inflight: 0,
            stats: IocpStats::default(),
        })
    }

    /// Counters so far.
    pub fn iocp_stats(&self) -> IocpStats {
        self.stats
    }

    /// Operations posted and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Reports a refused buffer hand-over: a bug in the caller, asserted in debug builds,
    /// logged (the first few) and counted in release builds.
    fn misuse(&self, m: Misuse) {
        crate::pool::report(&m, self.pool.misuses());
    }

    /// Reaps up to one batch of packets, waiting at most `ms` milliseconds; returns how many.
    fn reap(&mut self, ms: u32, out: &mut Vec<Completion>) -> io::Result<usize> {
        let mut entries = std::mem::take(&mut self.entries);
        let n = self.port.dequeue(&mut entries, ms);
        if let Ok(n) = n {
            for e in &entries[..n] {
                self.complete(e, out);
            }
        }
        self.entries = entries;
        n
    }

    /// One packet, by what its key says it is.
    fn complete(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        match e.lpCompletionKey {
            KEY_WAKE => {
                self.waker.reaped();
                out.push(Completion::Wake);
            }
            KEY_HANDOFF => self.handed_in(e, out),
            KEY_LISTENER => self.complete_accept(e, out),
            KEY_SOCKET => self.complete_op(e, out),
            other => tracing::warn!(key = other, "completion with an unknown key"),
        }
    }
}

/// Milliseconds for a wait, rounded up (a 0.5 ms timeout must not become a busy poll), and
/// short of `INFINITE`.
fn ms_ceil(d: Duration) -> u32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    ms.min(INFINITE as u128 - 1) as u32
}

impl Post for Iocp {
    fn post_accept(&mut self, listener: ListenerId) {
        self.push_accept(listener.0 as usize);
    }

    fn post_close_listener(&mut self, listener: ListenerId) {
        if (listener.0 as usize) < self.listeners.len() {
            self.close_listener(listener.0 as usize);
        }
    }

    fn post_recv(&mut self, token: Token, sock: Socket, max: u32) {
        self.begin_recv(token, sock, max);
    }

    /// This backend answers max_send_parts() = 1, so the state machine never gathers;
    /// another caller's gathered send goes out as its first part, which the sender sees as
    /// a short send and continues from.
    fn post_send(&mut self, token: Token, sock: Socket, parts: &[SendPart]) {
        let p = parts[0];
        self.begin_send(token, sock, p.buf, p.off, p.len);
    }

    fn post_cancel(&mut self, token: Token, _sock: Socket, kind: OpKind) {
        self.cancel(token, kind);
    }

    fn post_shutdown(&mut self, _token: Token, sock: Socket) {
        self.shutdown(sock);
    }

    fn post_close(&mut self, _token: Token, sock: Socket) {
        self.close(sock);
    }
}

impl Submit for Iocp {
    fn push(&mut self, op: Op) {
        op.post_to(self);
    }

    fn release(&mut self, buf: BufId) {
        // Receives here are posted one at a time, each with a buffer taken when posted: a
        // released buffer goes back to the free list, never straight to the kernel.
        self.pool.release_reported(buf.0, false);
    }

    crate::pool::pool_submit_methods!();
}

impl Backend for Iocp {
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<ListenerId> {
        self.register_listener(listener)
    }

    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket> {
        stream.set_nonblocking(false)?;
        let s = stream.into_raw_socket() as SOCKET;
        if let Err(e) = self.port.associate(s, KEY_SOCKET) {
            port::close_socket(s);
            return Err(e);
        }
        self.conns.insert(s);
        Ok(Socket(s as u64))
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.waker.clone()
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        out.append(&mut self.synthetic);
        let ms = if !out.is_empty() {
            0
        } else {
            timeout.map_or(INFINITE, ms_ceil)
        };
        self.reap(ms, out)?;
        // Completions found while reaping can post operations that fail at once.
        out.append(&mut self.synthetic);
        Ok(())
    }

    crate::pool::pool_backend_methods!();

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        let s = sock.0 as SOCKET;
        if !self.conns.contains(&s) {
            return None;
        }
        // SAFETY: `s` is in `conns`, so it is an open socket this backend owns; only
        // `Op::Close` (through `&mut self`) or the drop closes it, so it stays open while
        // `&self`, and with it the borrow, lives.
        let b = unsafe { BorrowedSocket::borrow_raw(s as RawSocket) };
        let addr = socket2::SockRef::from(&b).peer_addr().ok()?;
        addr.as_socket().map(|a| a.ip())
    }

    fn buffer_misuses(&self) -> u64 {
        self.pool.misuses()
    }

    fn describe(&self) -> String {
        format!(
            "iocp (AcceptEx x{} ahead, overlapped WSARecv/WSASend, GetQueuedCompletionStatusEx x{}, zero-byte receives below {} free buffers)",
            self.cfg.accepts_ahead, self.cfg.batch, self.zero_below
        )
    }
}
