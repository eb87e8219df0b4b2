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
//!   next). While buffers are plentiful a receive is posted with a buffer; when fewer than
//!   [`Config::zero_byte_below`] are free it is posted as a *zero-byte* receive, which holds
//!   no buffer while the connection is idle, and its completion posts the real receive.
//! - **Sends** go out from the very buffer the bytes were received into.
//! - **Cancellation** is `CancelIoEx` on the slot's `OVERLAPPED`; shutdown and close are
//!   synchronous (`shutdown(SD_SEND)`, `closesocket`) and report nothing.
//!
//! # Threads
//! One completion port per worker thread, each thread running its own [`Iocp`] (no state is
//! shared between loops). Windows has no `SO_REUSEPORT`, and a socket can be tied to only one
//! port, so the threads serving one address form a *group*: the first [`Iocp`] to register a
//! listening socket for that address posts the accepts, and deals the accepted sockets
//! round-robin to the group's members, tying each to its member's port and handing it over
//! with `PostQueuedCompletionStatus`. Other members register a clone of the listener
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

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::windows::io::{BorrowedSocket, IntoRawSocket, RawSocket};
use std::ptr::{self, addr_of, addr_of_mut, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, BufId, Completion, ListenerId, Op, OpError, OpKind, Received, Socket, Submit, Token,
    Waker,
};
use windows_sys::Win32::Foundation::{
    CloseHandle, GetLastError, ERROR_CONNECTION_ABORTED, ERROR_NETNAME_DELETED,
    ERROR_OPERATION_ABORTED, HANDLE, INVALID_HANDLE_VALUE, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    closesocket, setsockopt, shutdown, WSAGetLastError, WSAGetOverlappedResult, WSAIoctl, WSARecv,
    WSASend, WSASocketW, WSAStartup, AF_INET, AF_INET6, INVALID_SOCKET, IPPROTO_TCP, LPFN_ACCEPTEX,
    SD_SEND, SIO_GET_EXTENSION_FUNCTION_POINTER, SOCKADDR_STORAGE, SOCKET, SOCKET_ERROR,
    SOCK_STREAM, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT, TCP_NODELAY, WSABUF, WSADATA,
    WSAECONNABORTED, WSAECONNRESET, WSAEFAULT, WSAETIMEDOUT, WSAID_ACCEPTEX,
    WSA_FLAG_NO_HANDLE_INHERIT, WSA_FLAG_OVERLAPPED, WSA_IO_PENDING,
};
use windows_sys::Win32::System::Threading::INFINITE;
use windows_sys::Win32::System::IO::{
    CancelIoEx, CreateIoCompletionPort, GetQueuedCompletionStatusEx, PostQueuedCompletionStatus,
    OVERLAPPED, OVERLAPPED_ENTRY,
};

use crate::pool::{Misuse, Pool, PoolConfig};
use crate::sys::op_error;

/// Completion key of connection sockets: the `OVERLAPPED` is the head of an [`OpSlot`].
const KEY_SOCKET: usize = 1;
/// Completion key of listening sockets: the `OVERLAPPED` is the head of an [`AcceptSlot`].
const KEY_LISTENER: usize = 2;
/// A wake-up posted by [`PortWaker`]; carries nothing.
const KEY_WAKE: usize = 3;
/// An accepted socket dealt to this port by the group's acceptor: `lpOverlapped` carries the
/// `SOCKET` value (it is not a pointer), the byte count the listener index in this backend.
const KEY_HANDOFF: usize = 4;

const NONE: u32 = u32::MAX;
/// Bytes `AcceptEx` needs for each of the local and remote address.
const ACCEPT_ADDR_LEN: usize = size_of::<SOCKADDR_STORAGE>() + 16;

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

/// Makes sure Winsock is initialised (idempotent; counted by Winsock, never cleaned up).
fn winsock_init() -> io::Result<()> {
    static DONE: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    let rc = *DONE.get_or_init(|| {
        let mut data = MaybeUninit::<WSADATA>::uninit();
        // SAFETY: WSAStartup writes a WSADATA into the buffer we pass; we never read it.
        unsafe { WSAStartup(0x0202, data.as_mut_ptr()) }
    });
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn last_wsa_error() -> i32 {
    // SAFETY: reads the calling thread's last Winsock error; no arguments.
    unsafe { WSAGetLastError() }
}

fn close_socket(s: SOCKET) {
    // SAFETY: closes a socket this backend owns (no operation of ours is pending on it, or
    // the pending ones only touch slots that outlive their completions).
    unsafe { closesocket(s) };
}

/// A completion port handle, closed when the last owner (backend, wakers, group) lets go.
struct Port(HANDLE);

// SAFETY: a completion port handle may be used from any thread; the kernel serialises every
// operation on it. The handle is closed only in `Drop`, when no other owner remains.
unsafe impl Send for Port {}
// SAFETY: as above; `&Port` only allows posting packets and associating handles.
unsafe impl Sync for Port {}

impl Port {
    fn new() -> io::Result<Port> {
        // SAFETY: creating a new port: no existing handles are passed; one concurrent thread.
        let h = unsafe { CreateIoCompletionPort(INVALID_HANDLE_VALUE, ptr::null_mut(), 0, 1) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Port(h))
    }

    /// Ties a socket to this port: its overlapped completions will arrive here under `key`.
    fn associate(&self, s: SOCKET, key: usize) -> io::Result<()> {
        // SAFETY: `s` is a live socket owned by the caller and `self.0` a live port.
        let h = unsafe { CreateIoCompletionPort(s as HANDLE, self.0, key, 0) };
        if h.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn post(&self, bytes: u32, key: usize, ov: usize) -> io::Result<()> {
        // SAFETY: the port is live; `ov` is passed through untouched by the kernel (it is
        // never a pointer for our posted keys, see KEY_WAKE and KEY_HANDOFF).
        if unsafe { PostQueuedCompletionStatus(self.0, bytes, key, ov as *const OVERLAPPED) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the last owner closes the handle it created, once.
        unsafe { CloseHandle(self.0) };
    }
}

/// Wakes the loop by posting a packet to its port (at most one outstanding at a time).
struct PortWaker {
    port: Arc<Port>,
    posted: AtomicBool,
}

impl Waker for PortWaker {
    fn wake(&self) {
        if !self.posted.swap(true, Ordering::AcqRel) && self.port.post(0, KEY_WAKE, 0).is_err() {
            self.posted.store(false, Ordering::Release);
        }
    }
}

/// One backend's membership of an accept group.
struct Member {
    backend: u64,
    port: Arc<Port>,
    listener: u32,
}

struct GroupState {
    members: Vec<Member>,
    next: usize,
    open: bool,
}

/// The threads that serve one listening address (see the module documentation).
struct Group {
    addr: SocketAddr,
    state: Mutex<GroupState>,
}

/// Groups whose acceptor is still accepting, found by address.
static GROUPS: Mutex<Vec<Weak<Group>>> = Mutex::new(Vec::new());
static NEXT_BACKEND: AtomicU64 = AtomicU64::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where an accepted socket went.
enum Dealt {
    /// To the acceptor itself.
    Here,
    /// Handed to another member's port.
    There,
}

impl Group {
    /// Joins the open group for `addr`, or founds it. Returns the group and whether the
    /// caller is its acceptor.
    fn join(addr: SocketAddr, member: Member) -> (Arc<Group>, bool) {
        let mut groups = lock(&GROUPS);
        groups.retain(|g| g.strong_count() > 0);
        for g in groups.iter().filter_map(Weak::upgrade) {
            if g.addr == addr {
                let mut st = lock(&g.state);
                if st.open {
                    st.members.push(member);
                    drop(st);
                    return (g, false);
                }
            }
        }
        let g = Arc::new(Group {
            addr,
            state: Mutex::new(GroupState {
                members: vec![member],
                next: 0,
                open: true,
            }),
        });
        groups.push(Arc::downgrade(&g));
        (g, true)
    }

    /// Stops handing sockets to `backend` (after this returns, no more packets are posted to
    /// its port); the acceptor also closes the group to newcomers.
    fn leave(&self, backend: u64, acceptor: bool) {
        let mut st = lock(&self.state);
        st.members.retain(|m| m.backend != backend);
        if acceptor {
            st.open = false;
        }
    }

    /// Picks the next member round-robin for an accepted socket; hands it over when that is
    /// not `me`.
    fn deal(&self, me: u64, s: SOCKET) -> io::Result<Dealt> {
        let mut st = lock(&self.state);
        let n = st.members.len();
        if n <= 1 {
            return Ok(Dealt::Here);
        }
        let i = st.next % n;
        st.next = st.next.wrapping_add(1);
        let m = &st.members[i];
        if m.backend == me {
            return Ok(Dealt::Here);
        }
        // Posted under the lock: a member that leaves cannot miss a packet it must clean up.
        m.port.associate(s, KEY_SOCKET)?;
        m.port.post(m.listener, KEY_HANDOFF, s)?;
        Ok(Dealt::There)
    }
}

/// A receive or send in flight. `ov` must stay first: the kernel hands back its address.
#[repr(C)]
struct OpSlot {
    ov: OVERLAPPED,
    /// `Token::pack(kind)` of the operation.
    user: u64,
    sock: SOCKET,
    /// The receive buffer (the pool's `Owner::Kernel` while the receive is posted), or
    /// `NONE` for a zero-byte receive and for sends.
    buf: u32,
    /// Bytes a receive with a buffer asks for: the connection's allowance, at most a buffer.
    want: u32,
    /// `WSARecv` flags (in and out).
    flags: u32,
    index: u32,
    busy: bool,
    /// Cancellation was requested: a zero-byte receive that completes anyway must not post
    /// the real receive (which nobody would cancel).
    cancel: bool,
}

/// An `AcceptEx` in flight. `ov` must stay first.
#[repr(C)]
struct AcceptSlot {
    ov: OVERLAPPED,
    listener: u32,
    /// The socket the connection will be accepted into, or `INVALID_SOCKET`.
    sock: SOCKET,
    posted: bool,
    addrs: [u8; 2 * ACCEPT_ADDR_LEN],
}

type AcceptEx = unsafe extern "system" fn(
    SOCKET,
    SOCKET,
    *mut core::ffi::c_void,
    u32,
    u32,
    u32,
    *mut u32,
    *mut OVERLAPPED,
) -> windows_sys::core::BOOL;

struct ListenerSlot {
    /// The listening socket (acceptor only; `INVALID_SOCKET` once closed or for members).
    sock: SOCKET,
    family: i32,
    accept_ex: Option<AcceptEx>,
    slots: Vec<NonNull<AcceptSlot>>,
    group: Arc<Group>,
    acceptor: bool,
    armed: bool,
    open: bool,
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
    id: u64,
    port: Arc<Port>,
    waker: Arc<PortWaker>,
    cfg: Config,
    zero_below: u32,
    /// Every buffer, and who holds it.
    pool: Pool,
    ops: Vec<NonNull<OpSlot>>,
    free_ops: Vec<u32>,
    /// The slot of each connection's pending receive and send, by connection id.
    recv_op: Vec<u32>,
    send_op: Vec<u32>,
    listeners: Vec<ListenerSlot>,
    synthetic: Vec<Completion>,
    entries: Vec<OVERLAPPED_ENTRY>,
    inflight: usize,
    stats: IocpStats,
}

impl Iocp {
    /// Creates a completion port and its buffers.
    pub fn new(cfg: &Config) -> io::Result<Iocp> {
        winsock_init()?;
        let port = Arc::new(Port::new()?);
        let pool = Pool::new(&cfg.pool)?;
        Ok(Iocp {
            id: NEXT_BACKEND.fetch_add(1, Ordering::Relaxed),
            waker: Arc::new(PortWaker {
                port: port.clone(),
                posted: AtomicBool::new(false),
            }),
            port,
            zero_below: cfg.zero_byte_below.unwrap_or(pool.recv_count() / 4),
            cfg: Config {
                accepts_ahead: cfg.accepts_ahead.max(1),
                batch: cfg.batch.max(1),
                ..cfg.clone()
            },
            pool,
            ops: Vec::new(),
            free_ops: Vec::new(),
            recv_op: Vec::new(),
            send_op: Vec::new(),
            listeners: Vec::new(),
            synthetic: Vec::new(),
            entries: vec![OVERLAPPED_ENTRY::default(); cfg.batch.max(1) as usize],
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

    /// A free operation slot, tagged for `user` on socket `s`.
    fn take_op(&mut self, user: u64, s: SOCKET) -> u32 {
        let i = match self.free_ops.pop() {
            Some(i) => i,
            None => {
                let i = self.ops.len() as u32;
                let slot = Box::new(OpSlot {
                    // SAFETY: OVERLAPPED is plain data for which all-zero is the valid
                    // initial state.
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
        };
        let p = self.ops[i as usize].as_ptr();
        // SAFETY: slot `i` came from the free list (or was just made), so no operation is
        // pending on it and the kernel holds no reference to it.
        unsafe {
            (*p).user = user;
            (*p).sock = s;
            (*p).buf = NONE;
            (*p).cancel = false;
        }
        i
    }

    fn free_op(&mut self, i: u32) {
        let p = self.ops[i as usize].as_ptr();
        // SAFETY: called only when the slot's operation completed or was never started, so
        // the kernel no longer references it.
        unsafe { (*p).busy = false };
        self.free_ops.push(i);
    }

    /// Issues `WSARecv` on slot `i`: into buffer `buf` (which the pool has just handed to the
    /// kernel), or a zero-byte receive.
    fn start_recv(&mut self, i: u32, buf: Option<u32>) -> Result<(), i32> {
        let p = self.ops[i as usize].as_ptr();
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

    /// Receives at most `max` bytes (one buffer) on a connection: into a buffer while
    /// buffers are plentiful, else a zero-byte receive that holds none while it waits.
    fn post_recv(&mut self, token: Token, sock: Socket, max: u32) {
        let zero = self.pool.free_recv() as u32 <= self.zero_below;
        let buf = if zero { None } else { self.pool.take_recv() };
        let i = self.take_op(token.pack(OpKind::Recv), sock.0 as SOCKET);
        let p = self.ops[i as usize].as_ptr();
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

    /// Sends `len` bytes of a lent buffer; a buffer not lent is refused (the send fails).
    fn post_send(&mut self, token: Token, sock: Socket, buf: BufId, off: u32, len: u32) {
        let ptr = match self.pool.send_ptr(buf.0, off, len) {
            Ok(p) => p as *mut u8,
            Err(m) => return self.refuse_send(token, m),
        };
        let i = self.take_op(token.pack(OpKind::Send), sock.0 as SOCKET);
        let p = self.ops[i as usize].as_ptr();
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
    fn unpost(&mut self, buf: u32) {
        if let Err(m) = self.pool.unpost(buf) {
            self.misuse(m);
        }
    }

    /// Requests cancellation of the connection's pending operation of `kind`, if any.
    fn cancel(&mut self, token: Token, kind: OpKind) {
        let table = if kind == OpKind::Recv {
            &self.recv_op
        } else {
            &self.send_op
        };
        let Some(&i) = table.get(token.id as usize).filter(|&&i| i != NONE) else {
            return;
        };
        let p = self.ops[i as usize].as_ptr();
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

    /// Keeps `accepts_ahead` accepts posted on listener `l`; reports a failure to the loop.
    fn arm(&mut self, l: usize) {
        for k in 0..self.listeners[l].slots.len() {
            let p = self.listeners[l].slots[k].as_ptr();
            // SAFETY: `posted` is written only by this thread, never by the kernel.
            if unsafe { (*p).posted } {
                continue;
            }
            if let Err(e) = self.post_accept(l, k) {
                self.listeners[l].armed = false;
                self.synthetic.push(Completion::Accept {
                    listener: ListenerId(l as u32),
                    result: Err(op_error(e)),
                    more: false,
                });
                return;
            }
        }
    }

    fn close_listener(&mut self, l: usize) {
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

    /// The error of a failed overlapped operation on `s`, as a Winsock/Win32 code.
    fn overlapped_result(s: SOCKET, ov: *const OVERLAPPED) -> Result<u32, i32> {
        let (mut bytes, mut flags) = (0u32, 0u32);
        // SAFETY: the operation has completed (its packet was reaped), so reading its
        // OVERLAPPED does not race the kernel; `s` is the socket it ran on.
        if unsafe { WSAGetOverlappedResult(s, ov, &mut bytes, 0, &mut flags) } != 0 {
            Ok(bytes)
        } else {
            Err(last_wsa_error())
        }
    }

    fn complete(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        match e.lpCompletionKey {
            KEY_WAKE => {
                self.waker.posted.store(false, Ordering::Release);
                out.push(Completion::Wake);
            }
            KEY_HANDOFF => {
                let s = e.lpOverlapped as usize as SOCKET;
                let l = e.dwNumberOfBytesTransferred as usize;
                self.stats.handed_in += 1;
                if self.listeners.get(l).is_some_and(|x| x.open) {
                    out.push(Completion::Accept {
                        listener: ListenerId(l as u32),
                        result: Ok(Socket(s as u64)),
                        more: true,
                    });
                } else {
                    close_socket(s);
                }
            }
            KEY_LISTENER => self.complete_accept(e, out),
            KEY_SOCKET => self.complete_op(e, out),
            other => tracing::warn!(key = other, "completion with an unknown key"),
        }
    }

    fn complete_accept(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
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
        let Some(lst) = self.listeners.get(l) else {
            close_socket(s);
            return;
        };
        if !lst.open {
            close_socket(s);
            return;
        }
        let status = if e.Internal == 0 {
            Ok(())
        } else {
            Self::overlapped_result(lst.sock, p as *const OVERLAPPED).map(|_| ())
        };
        match status {
            Ok(()) => self.accepted(l, s, out),
            Err(code) if is_peer_gone(code) => {
                close_socket(s);
                self.stats.accept_retries += 1;
                tracing::debug!(code, "accept failed (peer gone); posting it again");
            }
            Err(code) => {
                close_socket(s);
                self.listeners[l].armed = false;
                out.push(Completion::Accept {
                    listener: ListenerId(l as u32),
                    result: Err(op_error(code)),
                    more: false,
                });
            }
        }
        if self.listeners[l].armed {
            let k = self.listeners[l]
                .slots
                .iter()
                .position(|x| x.as_ptr() == p)
                .expect("accept slot belongs to its listener");
            if let Err(code) = self.post_accept(l, k) {
                self.listeners[l].armed = false;
                out.push(Completion::Accept {
                    listener: ListenerId(l as u32),
                    result: Err(op_error(code)),
                    more: false,
                });
            }
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
                Ok(()) => out.push(Completion::Accept {
                    listener: ListenerId(l as u32),
                    result: Ok(Socket(s as u64)),
                    more: true,
                }),
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

    fn complete_op(&mut self, e: &OVERLAPPED_ENTRY, out: &mut Vec<Completion>) {
        self.inflight -= 1;
        let p = e.lpOverlapped as *mut OpSlot;
        // SAFETY: packets under KEY_SOCKET carry the OVERLAPPED of one of our operation slots
        // (connection sockets are tied to the port with that key only by this module), which
        // stay allocated until drained; the operation has completed, so the kernel no longer
        // writes the slot.
        let (user, s, buf, i, cancel) =
            unsafe { ((*p).user, (*p).sock, (*p).buf, (*p).index, (*p).cancel) };
        let status = if e.Internal == 0 {
            Ok(e.dwNumberOfBytesTransferred)
        } else {
            Self::overlapped_result(s, p as *const OVERLAPPED)
        };
        let Some((kind, token)) = Token::unpack(user) else {
            self.free_op(i);
            return;
        };
        match kind {
            OpKind::Recv if buf == NONE => {
                // A zero-byte receive: data (or the end of the stream) is waiting.
                let result = match status {
                    Ok(_) if cancel => Err(OpError::Canceled),
                    Ok(_) => match self.pool.take_recv() {
                        Some(b) => match self.start_recv(i, Some(b)) {
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
                self.finish_recv(token, i, result, out);
            }
            OpKind::Recv => {
                let result = match status {
                    Ok(n) if n > 0 => match self.pool.lend(buf) {
                        Ok(()) => Ok(Received::Data {
                            buf: BufId(buf),
                            len: n,
                        }),
                        Err(m) => {
                            self.misuse(m);
                            Err(OpError::Os(WSAEFAULT))
                        }
                    },
                    Ok(_) => {
                        self.unpost(buf);
                        Ok(Received::Eof)
                    }
                    Err(code) => {
                        self.unpost(buf);
                        Err(op_error(code))
                    }
                };
                self.finish_recv(token, i, result, out);
            }
            OpKind::Send => {
                clear_slot(&mut self.send_op, token.id, i);
                self.free_op(i);
                out.push(Completion::Send {
                    token,
                    result: status.map_err(op_error),
                });
            }
            _ => self.free_op(i),
        }
    }

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

    /// Reaps up to one batch of packets, waiting at most `ms` milliseconds.
    fn reap(&mut self, ms: u32, out: &mut Vec<Completion>) -> io::Result<()> {
        let mut n = 0u32;
        // SAFETY: `entries` has `len` initialised elements for the kernel to overwrite; the
        // port is live.
        let ok = unsafe {
            GetQueuedCompletionStatusEx(
                self.port.0,
                self.entries.as_mut_ptr(),
                self.entries.len() as u32,
                &mut n,
                ms,
                0,
            )
        };
        if ok == 0 {
            // SAFETY: reads the calling thread's last error; no arguments.
            let e = unsafe { GetLastError() };
            if e == WAIT_TIMEOUT {
                return Ok(());
            }
            return Err(io::Error::from_raw_os_error(e as i32));
        }
        let entries = std::mem::take(&mut self.entries);
        for e in &entries[..n as usize] {
            self.complete(e, out);
        }
        self.entries = entries;
        Ok(())
    }
}

fn set_slot(table: &mut Vec<u32>, id: u32, i: u32) {
    let id = id as usize;
    if table.len() <= id {
        table.resize(id + 1, NONE);
    }
    table[id] = i;
}

fn clear_slot(table: &mut [u32], id: u32, i: u32) {
    if let Some(x) = table.get_mut(id as usize).filter(|x| **x == i) {
        *x = NONE;
    }
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

fn ms_ceil(d: Duration) -> u32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    ms.min(INFINITE as u128 - 1) as u32
}

impl Submit for Iocp {
    fn push(&mut self, op: Op) {
        match op {
            Op::Accept { listener } => {
                let l = listener.0 as usize;
                let Some(lst) = self.listeners.get_mut(l).filter(|x| x.open) else {
                    return;
                };
                lst.armed = true;
                if lst.acceptor {
                    self.arm(l);
                }
            }
            Op::CloseListener { listener } => {
                if (listener.0 as usize) < self.listeners.len() {
                    self.close_listener(listener.0 as usize);
                }
            }
            Op::Recv { token, sock, max } => self.post_recv(token, sock, max),
            Op::Send {
                token,
                sock,
                buf,
                off,
                len,
            } => self.post_send(token, sock, buf, off, len),
            // This backend answers max_send_parts() = 1, so the state machine never gathers;
            // another caller's gathered send goes out as its first part, which the sender
            // sees as a short send and continues from.
            Op::SendParts {
                token, sock, parts, ..
            } => {
                let p = parts[0];
                self.post_send(token, sock, p.buf, p.off, p.len)
            }
            Op::CancelRecv { token, .. } => self.cancel(token, OpKind::Recv),
            Op::CancelSend { token, .. } => self.cancel(token, OpKind::Send),
            Op::Shutdown { sock, .. } => {
                // SAFETY: shuts down the write side of a socket the state machine holds open.
                if unsafe { shutdown(sock.0 as SOCKET, SD_SEND) } != 0 {
                    tracing::debug!(code = last_wsa_error(), "shutdown failed");
                }
            }
            Op::Close { sock, .. } => close_socket(sock.0 as SOCKET),
        }
    }

    fn release(&mut self, buf: BufId) {
        // Receives here are posted one at a time, each with a buffer taken when posted: a
        // released buffer goes back to the free list, never straight to the kernel.
        if let Err(m) = self.pool.release(buf.0, false) {
            self.misuse(m);
        }
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

impl Backend for Iocp {
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<ListenerId> {
        let addr = listener.local_addr()?;
        let l = self.listeners.len() as u32;
        let (group, acceptor) = Group::join(
            addr,
            Member {
                backend: self.id,
                port: self.port.clone(),
                listener: l,
            },
        );
        let family = if addr.is_ipv6() { AF_INET6 } else { AF_INET } as i32;
        let mut slot = ListenerSlot {
            sock: INVALID_SOCKET,
            family,
            accept_ex: None,
            slots: Vec::new(),
            group,
            acceptor,
            armed: false,
            open: true,
        };
        if !acceptor {
            // Another thread accepts for this address and deals us our share; the clone only
            // named the group.
            drop(listener);
            self.listeners.push(slot);
            return Ok(ListenerId(l));
        }
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
        for _ in 0..self.cfg.accepts_ahead {
            let a = Box::new(AcceptSlot {
                // SAFETY: all-zero is the valid initial state of an OVERLAPPED.
                ov: unsafe { std::mem::zeroed() },
                listener: l,
                sock: INVALID_SOCKET,
                posted: false,
                addrs: [0; 2 * ACCEPT_ADDR_LEN],
            });
            slot.slots
                .push(NonNull::new(Box::into_raw(a)).expect("Box is non-null"));
        }
        self.listeners.push(slot);
        Ok(ListenerId(l))
    }

    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket> {
        stream.set_nonblocking(false)?;
        let s = stream.into_raw_socket() as SOCKET;
        if let Err(e) = self.port.associate(s, KEY_SOCKET) {
            close_socket(s);
            return Err(e);
        }
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
        // SAFETY: the socket is open for the duration of the borrow: the worker asks about a
        // socket it has just been handed and has not closed.
        let b = unsafe { BorrowedSocket::borrow_raw(sock.0 as RawSocket) };
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

impl Drop for Iocp {
    fn drop(&mut self) {
        for l in 0..self.listeners.len() {
            self.close_listener(l);
        }
        for p in &self.ops {
            let p = p.as_ptr();
            // SAFETY: reads fields the kernel never writes; a busy slot's socket is still
            // open (the state machine closes only after completions), and CancelIoEx only
            // looks the OVERLAPPED up by address.
            unsafe {
                if (*p).busy {
                    CancelIoEx((*p).sock as HANDLE, addr_of!((*p).ov));
                }
            }
        }
        // Wait (bounded) for the kernel to let go of every slot and buffer.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut sink = Vec::new();
        while self.inflight > 0 && Instant::now() < deadline {
            if self.reap(10, &mut sink).is_err() {
                break;
            }
            for c in sink.drain(..) {
                if let Completion::Accept {
                    result: Ok(sock), ..
                } = c
                {
                    close_socket(sock.0 as SOCKET);
                }
            }
        }
        // Accepted sockets dealt to us before we left the group, still queued.
        let _ = self.reap(0, &mut sink);
        for c in sink.drain(..) {
            if let Completion::Accept {
                result: Ok(sock), ..
            } = c
            {
                close_socket(sock.0 as SOCKET);
            }
        }
        if self.inflight > 0 {
            tracing::warn!(
                inflight = self.inflight,
                receive_buffers = self.pool.in_kernel(),
                "IOCP operations did not finish; leaking their memory"
            );
            self.pool.leak();
            return;
        }
        for p in self.ops.drain(..) {
            // SAFETY: nothing is in flight, so the kernel holds no slot; each was made by
            // Box::into_raw in `take_op` and is freed once.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
        for l in &mut self.listeners {
            for p in l.slots.drain(..) {
                // SAFETY: as above, for the boxes made in `add_listener`.
                drop(unsafe { Box::from_raw(p.as_ptr()) });
            }
        }
    }
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

// The kernel hands back the OVERLAPPED's address; both slot kinds start with it.
const _: () = assert!(std::mem::offset_of!(OpSlot, ov) == 0);
const _: () = assert!(std::mem::offset_of!(AcceptSlot, ov) == 0);
