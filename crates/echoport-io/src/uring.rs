//! The io_uring backend: Linux's completion port.
//!
//! An [`Op`] becomes one submission queue entry whose `user_data` is the connection's
//! [`Token`] packed with the [`OpKind`]; a completion queue entry becomes a [`Completion`].
//! Submissions are batched: entries queue up while completions are handled and are handed to
//! the kernel together with the next wait (`io_uring_enter` once per loop turn).
//!
//! On the fast path (kernel 6.1 or later):
//! - one **multishot accept** per listener, into **direct descriptors** (the ring's registered
//!   file table), so connections use no slot of the process's file-descriptor table;
//! - one **multishot receive** per connection, picking buffers from a **provided buffer ring**;
//!   the echo is sent straight from the buffer it was received into, and the buffer returns to
//!   the ring when the send completes, so an idle connection holds no buffer;
//! - `SINGLE_ISSUER | DEFER_TASKRUN`: completions are processed only when the loop asks for
//!   them, with no inter-processor interrupt per completion.
//!
//! Without it (`fast_path: false`, or an older kernel), every accept and receive is a
//! one-shot operation on a plain descriptor, receiving into a buffer chosen when it is posted.
//!
//! # Buffer ownership
//! All buffer memory is one region allocated at start and never moved or freed while the
//! kernel may touch it. A buffer is owned by exactly one of: the kernel's buffer ring (or a
//! posted one-shot receive), the state machine (between a receive completion and
//! [`Submit::release`]), or a posted send (until its completion). If the ring is dropped with
//! operations still in flight that could not be drained, the region is leaked, never freed.

use std::alloc::Layout;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use echoport_core::{
    Backend, BufId, Completion, ListenerId, Op, OpError, OpKind, Received, Socket, Submit, Token,
    Waker, MAX_SEND_PARTS,
};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::region::Region;
use crate::sys::{op_error, EventFd};

/// Tags a [`Socket`] that is a direct descriptor (an index into the ring's file table).
const FIXED: u64 = 1 << 63;
/// Buffer group id of the provided buffer ring.
const BGID: u16 = 0;
const NONE: u32 = u32::MAX;

/// Settings of one ring.
#[derive(Clone, Debug)]
pub struct Config {
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries: enough for every connection's posted operations at once.
    pub cq_entries: u32,
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Receive buffers (rounded up to a power of two, at most 32768).
    pub buffers: u32,
    /// Buffers kept for callers that send their own bytes ([`Backend::alloc_buf`]).
    pub send_buffers: u32,
    /// Use the fast path when the kernel has it.
    pub fast_path: bool,
    /// Size of the direct descriptor table (0: the process's descriptor limit).
    pub direct_files: u32,
    /// Accept into direct descriptors on the fast path. Off when the caller needs to know
    /// peers' addresses (a direct descriptor cannot be asked).
    pub direct_accept: bool,
    /// When non-zero, a wait lets completions gather for up to this many microseconds
    /// before the loop wakes: fewer wake-ups under load, at most this much added latency.
    /// On kernels with `IORING_FEAT_MIN_TIMEOUT` (6.12) the kernel does it: the loop sleeps
    /// until [`Config::batch`] completions are ready or this long has passed with at least
    /// one, and a wait that found nothing in that time ends at the first completion, so an
    /// idle loop costs nothing and a lone message after a quiet spell is not delayed. On
    /// older kernels the loop asks for as many completions as its last turn brought (a
    /// busy loop only), with this as the timeout.
    pub batch_wait_us: u32,
    /// Completions a batched wait aims for.
    pub batch: u32,
    /// How the kernel runs completion work for this ring.
    pub taskrun: TaskRun,
}

/// How the kernel runs the work that completes operations (`task_work`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TaskRun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN`: only when the loop waits for completions (6.1+).
    Defer,
    /// `COOP_TASKRUN`: at the next system call, without an interrupt (5.19+).
    Coop,
    /// The default of old kernels: interrupt the loop for each batch (for comparison only).
    Interrupt,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sq_entries: 4096,
            cq_entries: 65536,
            buf_size: 8192,
            buffers: 2048,
            send_buffers: 256,
            fast_path: true,
            direct_files: 0,
            direct_accept: true,
            batch_wait_us: 0,
            batch: 32,
            taskrun: TaskRun::Defer,
        }
    }
}

/// Checks that io_uring works here with what this backend needs: a ring can be set up, every
/// opcode it uses is supported, and one no-op makes the round trip.
pub fn probe() -> Result<(), String> {
    let mut ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("opcode probe failed: {e}"))?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::AsyncCancel::CODE, "async-cancel"),
        (opcode::Close::CODE, "close"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Read::CODE, "read"),
    ];
    for (code, name) in needed {
        if !p.is_supported(code) {
            return Err(format!("the kernel lacks the io_uring {name} operation"));
        }
    }
    // SAFETY: a NOP references no memory.
    unsafe {
        ring.submission()
            .push(&opcode::Nop::new().build().user_data(1))
            .map_err(|_| "submission queue full".to_string())?;
    }
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {e}"))?;
    let first = ring
        .completion()
        .next()
        .map(|c| (c.user_data(), c.result()));
    match first {
        Some((1, res)) if res >= 0 => Ok(()),
        Some((_, res)) => Err(format!(
            "no-op failed: {}",
            io::Error::from_raw_os_error(-res)
        )),
        None => Err("no-op did not complete".into()),
    }
}

/// The provided buffer ring shared with the kernel.
struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: Layout,
    mask: u16,
    tail: u16,
    dirty: bool,
}

impl BufRing {
    /// Puts buffer `bid` (at `addr`, `len` bytes) back in the ring; visible after `publish`.
    fn add(&mut self, bid: u16, addr: *mut u8, len: u32) {
        // SAFETY: the index is masked into the ring's `mask + 1` entries, allocated in
        // `Uring::new`; the kernel reads only entries between its head and our published
        // tail, and this one is past the published tail until `publish`.
        let e = unsafe { &mut *self.entries.add((self.tail & self.mask) as usize) };
        e.set_addr(addr as u64);
        e.set_len(len);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.dirty = true;
    }

    /// Makes every added buffer visible to the kernel (one release store per loop turn).
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        // SAFETY: the tail field lives in the first entry of the live ring allocation and is
        // u16-aligned; the kernel only reads it, and the release store orders the entry writes
        // before it, as the buffer-ring protocol requires.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

/// The message header and vector of a gathered send (`IORING_OP_SENDMSG`), boxed so their
/// addresses stay put from submission to completion.
struct MsgSlot {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_SEND_PARTS],
}

struct ListenerSlot {
    fd: Option<OwnedFd>,
    armed: bool,
    closing: bool,
}

/// An io_uring ring serving one worker thread.
pub struct Uring {
    ring: IoUring,
    fast: bool,
    features: Vec<&'static str>,
    region: Option<Region>,
    recv_count: u32,
    buf_ring: Option<BufRing>,
    recv_free: Vec<u32>,
    send_free: Vec<u32>,
    /// One-shot receives: the buffer posted with each connection's receive, by connection id.
    recv_buf: Vec<u32>,
    listeners: Vec<ListenerSlot>,
    backlog: VecDeque<squeue::Entry>,
    synthetic: Vec<Completion>,
    cqes: Vec<(u64, i32, u32)>,
    waker: Arc<EventFd>,
    wake_buf: Box<u64>,
    inflight: u64,
    batch_wait_us: u32,
    batch: u32,
    /// Completions the last wait brought: how many the next batched wait asks for (on
    /// kernels without the minimum wait).
    last_reaped: usize,
    /// The kernel has `IORING_FEAT_MIN_TIMEOUT`: batched waits use its minimum wait.
    min_timeout: bool,
    /// The ring's own descriptor registered with it (`IORING_REGISTER_RING_FDS`, 5.18): the
    /// loop's waits name the ring by this index, sparing the kernel a descriptor lookup.
    /// The registration belongs to the thread that made it, so it is used only there.
    ring_index: Option<(u32, std::thread::ThreadId)>,
    /// Size of the direct descriptor table (fast path only).
    direct_files: Option<u32>,
    /// Accepted connections get direct descriptors.
    direct_accept: bool,
    /// Loop turns that found the kernel holding completions back (CQ overflow).
    overflows: u64,
    /// Completions the kernel dropped outright (only without `IORING_FEAT_NODROP`).
    dropped: u64,
    /// Gathered sends in flight, by connection id (at most one send per connection).
    send_msgs: std::collections::HashMap<u32, Box<MsgSlot>>,
    /// Headers of finished gathered sends, for reuse. Boxed on purpose: a slot moves between
    /// this list and `send_msgs`, and the kernel holds the address of its contents.
    #[allow(clippy::vec_box)]
    msg_free: Vec<Box<MsgSlot>>,
}

macro_rules! with_fd {
    ($sock:expr, |$fd:ident| $body:expr) => {{
        let s: Socket = $sock;
        if s.0 & FIXED != 0 {
            let $fd = types::Fixed((s.0 & !FIXED) as u32);
            $body
        } else {
            let $fd = types::Fd(s.0 as RawFd);
            $body
        }
    }};
}

impl Uring {
    /// Sets up a ring with the fast path when asked for and available.
    pub fn new(cfg: &Config) -> io::Result<Uring> {
        let (ring, mut features) = build_ring(cfg)?;
        // Multishot receive with a buffer ring needs kernel 6.0; DEFER_TASKRUN (6.1) implies it.
        let fast = cfg.fast_path && (features.contains(&"defer-taskrun") || kernel_at_least(6, 0));
        let buffers = cfg.buffers.clamp(1, 32768).next_power_of_two();
        let region = Region::new(cfg.buf_size.max(64), buffers + cfg.send_buffers)?;
        let mut uring = Uring {
            ring,
            fast,
            features: Vec::new(),
            recv_count: buffers,
            buf_ring: None,
            recv_free: Vec::new(),
            send_free: (buffers..buffers + cfg.send_buffers).rev().collect(),
            recv_buf: Vec::new(),
            listeners: Vec::new(),
            backlog: VecDeque::new(),
            synthetic: Vec::new(),
            cqes: Vec::with_capacity(1024),
            waker: Arc::new(EventFd::new()?),
            wake_buf: Box::new(0),
            inflight: 0,
            batch_wait_us: cfg.batch_wait_us,
            batch: cfg.batch.max(1),
            last_reaped: 0,
            min_timeout: false,
            ring_index: None,
            direct_files: None,
            direct_accept: fast && cfg.direct_accept,
            overflows: 0,
            dropped: 0,
            send_msgs: std::collections::HashMap::new(),
            msg_free: Vec::new(),
            region: Some(region),
        };
        uring.min_timeout = uring.ring.params().is_feature_min_timeout();
        uring.ring_index = register_ring_fd(&uring.ring).map(|i| (i, std::thread::current().id()));
        if uring.ring_index.is_some() {
            features.push("registered-ring");
        }
        if cfg.batch_wait_us > 0 {
            features.push(if uring.min_timeout {
                "batched-wait (kernel min-wait)"
            } else {
                "batched-wait (adaptive)"
            });
        }
        if fast {
            uring.setup_fast_path(cfg, buffers)?;
            features.extend(["multishot-accept", "multishot-recv", "buf-ring"]);
            features.push(if uring.direct_accept {
                "direct-fds"
            } else {
                "plain-fds (to see peer addresses)"
            });
        } else {
            uring.recv_free = (0..buffers).rev().collect();
            features.push("one-shot-ops");
            if cfg.fast_path {
                features.push("(fast path needs kernel 6.1+)");
            }
        }
        uring.features = features;
        uring.arm_waker();
        Ok(uring)
    }

    fn setup_fast_path(&mut self, cfg: &Config, buffers: u32) -> io::Result<()> {
        let direct = if cfg.direct_files > 0 {
            cfg.direct_files
        } else {
            // The kernel refuses a table larger than RLIMIT_NOFILE.
            crate::sys::nofile_limit().clamp(16, 1 << 20) as u32
        };
        self.ring.submitter().register_files_sparse(direct)?;
        self.direct_files = Some(direct);
        let layout = Layout::from_size_align(
            buffers as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer ring too large"))?;
        // SAFETY: non-zero size; zeroed memory is a valid empty ring (tail 0).
        let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        if entries.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate buffer ring",
            ));
        }
        // SAFETY: `entries` points at `buffers` zeroed, page-aligned entries that stay
        // allocated until the ring is dropped (and are leaked if it cannot be drained), which
        // is longer than the registration lives.
        let reg = unsafe {
            self.ring.submitter().register_buf_ring_with_flags(
                entries as u64,
                buffers as u16,
                BGID,
                0,
            )
        };
        if let Err(e) = reg {
            // SAFETY: allocated just above with this layout and never registered.
            unsafe { std::alloc::dealloc(entries as *mut u8, layout) };
            return Err(e);
        }
        let mut ring = BufRing {
            entries,
            layout,
            mask: (buffers - 1) as u16,
            tail: 0,
            dirty: false,
        };
        let region = self
            .region
            .as_ref()
            .expect("region lives as long as the ring");
        for b in 0..buffers {
            ring.add(b as u16, region.addr(b, 0), region.size);
        }
        ring.publish();
        self.buf_ring = Some(ring);
        Ok(())
    }

    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("region lives as long as the ring")
    }

    fn arm_waker(&mut self) {
        let ptr = &mut *self.wake_buf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.waker.as_raw_fd()), ptr, 8)
            .build()
            .user_data(Token::NONE.pack(OpKind::Wake));
        self.enqueue(e);
    }

    /// Queues an entry; when the submission queue is full, submits to make room.
    fn enqueue(&mut self, e: squeue::Entry) {
        self.inflight += 1;
        if self.backlog.is_empty() {
            // SAFETY: every entry built by this backend points only at memory that outlives
            // its completion: the buffer region, the boxed wake-up word, a gathered send's
            // boxed header (held in `send_msgs` until the completion), or nothing.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(e);
    }

    /// Submits what is queued and waits for `want` completions (or the timeout, or the
    /// minimum wait), naming the ring by its registered index.
    fn enter_registered(
        &mut self,
        index: u32,
        want: u32,
        ts: Option<&types::Timespec>,
        min_wait_us: u32,
    ) -> io::Result<usize> {
        let to_submit = self.ring.submission().len() as u32;
        let mut args = types::SubmitArgs::new().min_wait_usec(min_wait_us);
        if let Some(ts) = ts {
            args = args.timespec(ts);
        }
        let flags = ENTER_GETEVENTS | ENTER_EXT_ARG | ENTER_REGISTERED_RING;
        // SAFETY: `index` is this ring's descriptor as registered by this very thread (the
        // caller checks; the registration lives as long as the ring). Every queued entry was pushed
        // through the submission queue, whose tail is published when each push's queue
        // handle drops, and every buffer those entries name is owned by the kernel until
        // their completions (the module's ownership rule). `args` is an
        // `io_uring_getevents_arg` (`SubmitArgs` is a transparent wrapper of it) whose
        // timespec, if any, outlives this call; its size goes with it.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                index as libc::c_long,
                to_submit as libc::c_long,
                want as libc::c_long,
                flags as libc::c_long,
                &args as *const types::SubmitArgs as *const libc::c_void,
                std::mem::size_of::<types::SubmitArgs>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(e) = self.backlog.front() {
            // SAFETY: as in `enqueue`.
            if unsafe { self.ring.submission().push(e) }.is_err() {
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
                // SAFETY: as in `enqueue`.
                if unsafe { self.ring.submission().push(e) }.is_err() {
                    return Ok(());
                }
            }
            self.backlog.pop_front();
        }
        Ok(())
    }

    fn return_buf(&mut self, buf: u32) {
        if buf < self.recv_count {
            if let Some(ring) = self.buf_ring.as_mut() {
                let region = self
                    .region
                    .as_ref()
                    .expect("region lives as long as the ring");
                ring.add(buf as u16, region.addr(buf, 0), region.size);
            } else {
                self.recv_free.push(buf);
            }
        } else {
            self.send_free.push(buf);
        }
    }

    fn post_recv(&mut self, token: Token, sock: Socket) {
        let ud = token.pack(OpKind::Recv);
        if self.fast {
            let e = with_fd!(sock, |fd| opcode::RecvMulti::new(fd, BGID).build());
            self.enqueue(e.user_data(ud));
            return;
        }
        let Some(buf) = self.recv_free.pop() else {
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
        let (ptr, len) = (self.region().addr(buf, 0), self.region().size);
        let e = with_fd!(sock, |fd| opcode::Recv::new(fd, ptr, len).build());
        self.enqueue(e.user_data(ud));
    }

    fn close_listener_now(&mut self, i: usize) {
        self.listeners[i].fd = None;
    }

    /// Turns one completion queue entry into zero or one [`Completion`].
    fn complete(&mut self, ud: u64, res: i32, flags: u32, out: &mut Vec<Completion>) {
        let more = cqueue::more(flags);
        if !more {
            self.inflight = self.inflight.saturating_sub(1);
        }
        let Some((kind, token)) = Token::unpack(ud) else {
            return;
        };
        let result = |res: i32| {
            if res < 0 {
                Err(op_error(-res))
            } else {
                Ok(res as u32)
            }
        };
        match kind {
            OpKind::Accept => {
                let i = token.id as usize;
                let Some(l) = self.listeners.get_mut(i) else {
                    return;
                };
                if !more {
                    l.armed = false;
                }
                let closing = l.closing;
                let sock = result(res).map(|v| {
                    Socket(if self.direct_accept {
                        FIXED | v as u64
                    } else {
                        v as u64
                    })
                });
                if closing {
                    if let Ok(s) = sock {
                        self.push(Op::Close {
                            token: Token::NONE,
                            sock: s,
                        });
                    }
                    if !more {
                        self.close_listener_now(i);
                    }
                    return;
                }
                out.push(Completion::Accept {
                    listener: ListenerId(i as u32),
                    result: sock,
                    more: more && res >= 0,
                });
            }
            OpKind::Recv => {
                let result = if self.fast {
                    let bid = cqueue::buffer_select(flags).map(u32::from);
                    match (res, bid) {
                        (n, Some(b)) if n > 0 => Ok(Received::Data {
                            buf: BufId(b),
                            len: n as u32,
                        }),
                        (n, b) => {
                            if let Some(b) = b {
                                self.return_buf(b);
                            }
                            if n == 0 {
                                Ok(Received::Eof)
                            } else {
                                Err(op_error(-n))
                            }
                        }
                    }
                } else {
                    let slot = self
                        .recv_buf
                        .get_mut(token.id as usize)
                        .map(|b| std::mem::replace(b, NONE));
                    match slot {
                        Some(b) if b != NONE && res > 0 => Ok(Received::Data {
                            buf: BufId(b),
                            len: res as u32,
                        }),
                        other => {
                            if let Some(b) = other.filter(|&b| b != NONE) {
                                self.return_buf(b);
                            }
                            if res >= 0 {
                                Ok(Received::Eof)
                            } else {
                                Err(op_error(-res))
                            }
                        }
                    }
                };
                let more = more && matches!(result, Ok(Received::Data { .. }));
                out.push(Completion::Recv {
                    token,
                    result,
                    more,
                });
            }
            OpKind::Send => {
                if let Some(m) = self.send_msgs.remove(&token.id) {
                    // The kernel is done with this gathered send's header and vector.
                    self.msg_free.push(m);
                }
                out.push(Completion::Send {
                    token,
                    result: result(res),
                })
            }
            OpKind::Wake => {
                self.waker.drain();
                self.arm_waker();
                out.push(Completion::Wake);
            }
            OpKind::Cancel
            | OpKind::Close
            | OpKind::Shutdown
            | OpKind::Timeout
            | OpKind::Connect => {
                if res < 0 && !matches!(-res, libc::ENOENT | libc::EALREADY | libc::ENOTCONN) {
                    tracing::debug!(?kind, error = %io::Error::from_raw_os_error(-res), "io_uring housekeeping op failed");
                }
            }
        }
    }
}

impl Submit for Uring {
    fn push(&mut self, op: Op) {
        match op {
            Op::Accept { listener } => {
                let i = listener.0 as usize;
                let Some(fd) = self
                    .listeners
                    .get(i)
                    .and_then(|l| l.fd.as_ref())
                    .map(|f| f.as_raw_fd())
                else {
                    return;
                };
                self.listeners[i].armed = true;
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
            Op::CloseListener { listener } => {
                let i = listener.0 as usize;
                let Some(l) = self.listeners.get_mut(i) else {
                    return;
                };
                l.closing = true;
                if l.armed {
                    let ud = Token::new(listener.0, 0).pack(OpKind::Accept);
                    self.enqueue(
                        opcode::AsyncCancel::new(ud)
                            .build()
                            .user_data(Token::NONE.pack(OpKind::Cancel)),
                    );
                } else {
                    self.close_listener_now(i);
                }
            }
            Op::Recv { token, sock } => self.post_recv(token, sock),
            Op::Send {
                token,
                sock,
                buf,
                off,
                len,
            } => {
                let ptr = self.region().addr(buf.0, off) as *const u8;
                assert!(
                    off as u64 + len as u64 <= self.region().size as u64,
                    "send past the buffer"
                );
                let e = with_fd!(sock, |fd| opcode::Send::new(fd, ptr, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build());
                self.enqueue(e.user_data(token.pack(OpKind::Send)));
            }
            Op::SendParts {
                token,
                sock,
                parts,
                count,
            } => {
                let count = (count as usize).clamp(1, MAX_SEND_PARTS);
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
                for (v, p) in m.iov.iter_mut().zip(&parts[..count]) {
                    assert!(
                        p.off as u64 + p.len as u64 <= self.region().size as u64,
                        "send past the buffer"
                    );
                    *v = libc::iovec {
                        iov_base: self.region().addr(p.buf.0, p.off) as *mut libc::c_void,
                        iov_len: p.len as usize,
                    };
                }
                m.hdr.msg_iov = m.iov.as_mut_ptr();
                m.hdr.msg_iovlen = count;
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
                self.enqueue(e.user_data(token.pack(OpKind::Send)));
            }
            Op::CancelRecv { token, .. } | Op::CancelSend { token, .. } => {
                let target = if matches!(op, Op::CancelRecv { .. }) {
                    OpKind::Recv
                } else {
                    OpKind::Send
                };
                let e = opcode::AsyncCancel::new(token.pack(target)).build();
                self.enqueue(e.user_data(token.pack(OpKind::Cancel)));
            }
            Op::Shutdown { token, sock } => {
                let e = with_fd!(sock, |fd| opcode::Shutdown::new(fd, libc::SHUT_WR).build());
                self.enqueue(e.user_data(token.pack(OpKind::Shutdown)));
            }
            Op::Close { token, sock } => {
                let e = with_fd!(sock, |fd| opcode::Close::new(fd).build());
                self.enqueue(e.user_data(token.pack(OpKind::Close)));
            }
        }
    }

    fn release(&mut self, buf: BufId) {
        self.return_buf(buf.0);
    }

    fn max_send_parts(&self) -> usize {
        MAX_SEND_PARTS
    }
}

impl Backend for Uring {
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<ListenerId> {
        self.listeners.push(ListenerSlot {
            fd: Some(listener.into()),
            armed: false,
            closing: false,
        });
        Ok(ListenerId(self.listeners.len() as u32 - 1))
    }

    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket> {
        stream.set_nonblocking(true)?;
        Ok(Socket(stream.into_raw_fd() as u64))
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.waker.clone()
    }

    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()> {
        out.append(&mut self.synthetic);
        if let Some(r) = self.buf_ring.as_mut() {
            r.publish();
        }
        self.flush_backlog()?;
        let nonblocking = !out.is_empty() || !self.ring.completion().is_empty();
        let timeout = if nonblocking {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        // Batched waits. With the kernel's minimum wait: sleep until `batch` completions
        // are ready, or `batch_wait_us` has passed and at least one is (with DEFER_TASKRUN
        // the kernel does not even wake the loop before that). Without it: under load, ask
        // for as many completions as the last turn brought (up to `batch`) for at most
        // `batch_wait_us`; at light load (the last turn brought one or none) a plain wait.
        let mut min_wait = 0;
        let (want, timeout) = match timeout {
            Some(t) if t.is_zero() => (1, Some(t)),
            t if self.batch_wait_us > 0 && self.min_timeout => {
                min_wait = self.batch_wait_us;
                (self.batch as usize, t)
            }
            t if self.batch_wait_us > 0 && self.last_reaped > 1 => {
                let b = Duration::from_micros(self.batch_wait_us as u64);
                let want = self.last_reaped.min(self.batch as usize);
                (want, Some(t.map_or(b, |t| t.min(b))))
            }
            t => (1, t),
        };
        let ts = timeout.map(|t| {
            types::Timespec::new()
                .sec(t.as_secs())
                .nsec(t.subsec_nanos())
        });
        let index = self
            .ring_index
            .filter(|&(_, t)| t == std::thread::current().id())
            .map(|(i, _)| i);
        let res = match (index, &ts) {
            (Some(index), ts) => self.enter_registered(index, want as u32, ts.as_ref(), min_wait),
            (None, None) if min_wait == 0 => self.ring.submit_and_wait(1),
            (None, None) => {
                let args = types::SubmitArgs::new().min_wait_usec(min_wait);
                self.ring.submitter().submit_with_args(want, &args)
            }
            (None, Some(ts)) => {
                let args = types::SubmitArgs::new()
                    .timespec(ts)
                    .min_wait_usec(min_wait);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match res {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        if self.ring.submission().cq_overflow() {
            self.overflows += 1;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        let cq = self.ring.completion();
        self.dropped = cq.overflow() as u64;
        cqes.extend(cq.map(|c| (c.user_data(), c.result(), c.flags())));
        self.last_reaped = cqes.len();
        for &(ud, res, flags) in &cqes {
            self.complete(ud, res, flags, out);
        }
        cqes.clear();
        self.cqes = cqes;
        Ok(())
    }

    fn buf(&self, buf: BufId) -> &[u8] {
        // SAFETY: the buffer is lent to the caller (received, not yet released) or was
        // allocated to it: neither the kernel nor the ring writes it until it is released.
        unsafe { self.region().bytes(buf.0) }
    }

    fn alloc_buf(&mut self) -> Option<BufId> {
        self.send_free.pop().map(BufId)
    }

    fn buf_mut(&mut self, buf: BufId) -> &mut [u8] {
        assert!(
            buf.0 >= self.recv_count,
            "only allocated buffers may be written"
        );
        let r = self
            .region
            .as_mut()
            .expect("region lives as long as the ring");
        // SAFETY: allocated buffers are never in the kernel's buffer ring; the caller owns it
        // until it releases it, and `&mut self` keeps this the only live reference.
        unsafe { r.bytes_mut(buf.0) }
    }

    fn describe(&self) -> String {
        format!("io_uring ({})", self.features.join(", "))
    }

    fn max_connections(&self) -> Option<usize> {
        self.direct_files
            .filter(|_| self.direct_accept)
            .map(|n| n as usize)
    }

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        (sock.0 & FIXED == 0)
            .then(|| crate::sys::peer_ip(sock.0 as RawFd))
            .flatten()
    }

    fn overflows(&self) -> u64 {
        self.overflows + self.dropped
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // Cancel whatever is still posted and wait (bounded) for the kernel to let go of it
        // before the buffer memory may be freed.
        let deadline = Instant::now() + Duration::from_secs(1);
        // Entries still in the backlog never reached the kernel.
        self.inflight = self.inflight.saturating_sub(self.backlog.len() as u64);
        self.backlog.clear();
        let any = types::CancelBuilder::any();
        // SAFETY: a cancel entry references no memory.
        let _ = unsafe {
            self.ring
                .submission()
                .push(&opcode::AsyncCancel2::new(any).build().user_data(0))
        };
        self.inflight += 1;
        while self.inflight > 0 && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let done = self
                .ring
                .completion()
                .filter(|c| !cqueue::more(c.flags()))
                .count() as u64;
            self.inflight = self.inflight.saturating_sub(done);
        }
        if self.inflight > 0 {
            // The kernel may still write into the buffers: never free them.
            // (The buffer ring's entries are plain memory that no destructor frees.)
            std::mem::forget(self.region.take());
            // Nor the headers of gathered sends still in flight.
            std::mem::forget(std::mem::take(&mut self.send_msgs));
            self.buf_ring = None;
        } else if let Some(r) = self.buf_ring.take() {
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
            // SAFETY: unregistered (or the ring is idle and about to close); allocated with
            // this layout in `setup_fast_path`.
            unsafe { std::alloc::dealloc(r.entries as *mut u8, r.layout) };
        }
    }
}

/// Builds a ring with the best task-running mode the kernel accepts.
/// Builds a ring with the best task-running mode the kernel accepts, starting from the one
/// asked for.
fn build_ring(cfg: &Config) -> io::Result<(IoUring, Vec<&'static str>)> {
    let mut b = IoUring::builder();
    b.setup_cqsize(cfg.cq_entries)
        .setup_clamp()
        .setup_submit_all();
    if cfg.taskrun == TaskRun::Defer {
        let mut deferred = b.clone();
        deferred.setup_single_issuer().setup_defer_taskrun();
        if let Ok(r) = deferred.build(cfg.sq_entries) {
            return Ok((r, vec!["single-issuer", "defer-taskrun"]));
        }
    }
    if cfg.taskrun != TaskRun::Interrupt {
        let mut coop = b.clone();
        coop.setup_coop_taskrun().setup_taskrun_flag();
        if let Ok(r) = coop.build(cfg.sq_entries) {
            return Ok((r, vec!["coop-taskrun"]));
        }
    }
    Ok((b.build(cfg.sq_entries)?, vec!["interrupt-taskrun"]))
}

const ENTER_GETEVENTS: u32 = 1 << 0;
const ENTER_EXT_ARG: u32 = 1 << 3;
const ENTER_REGISTERED_RING: u32 = 1 << 4;
const REGISTER_RING_FDS: u32 = 20;

/// Registers the ring's descriptor with itself (`IORING_REGISTER_RING_FDS`), giving the index
/// waits use instead of the descriptor; `None` on kernels before 5.18 (waits then pass the
/// descriptor, as before).
fn register_ring_fd(ring: &IoUring) -> Option<u32> {
    #[repr(C)]
    struct RsrcUpdate {
        offset: u32,
        resv: u32,
        data: u64,
    }
    let mut up = RsrcUpdate {
        offset: u32::MAX, // let the kernel pick a free slot
        resv: 0,
        data: ring.as_raw_fd() as u64,
    };
    // SAFETY: `up` is a valid `io_uring_rsrc_update` for one entry that lives across the
    // call; the kernel writes the chosen slot into `offset` and keeps no pointer to it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd() as libc::c_long,
            REGISTER_RING_FDS as libc::c_long,
            &mut up as *mut RsrcUpdate as *mut libc::c_void,
            1 as libc::c_long,
        )
    };
    (r == 1).then_some(up.offset)
}

/// Whether the running kernel is at least `major.minor` (multishot receive needs 6.0).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let ma: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let mi: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}
