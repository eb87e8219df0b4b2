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
//!   the ring when the send completes, so an idle connection holds no buffer. Each receive
//!   carries the connection's byte allowance as the kernel's multishot limit (6.17+), so it
//!   ends by itself at the connection's budget; on 6.0–6.16 receives from the ring are
//!   one-shot instead (each takes exactly one buffer);
//! - `SINGLE_ISSUER | DEFER_TASKRUN`: completions are processed only when the loop asks for
//!   them, with no inter-processor interrupt per completion.
//!
//! Without it (`fast_path: false`, or an older kernel), every accept and receive is a
//! one-shot operation on a plain descriptor, receiving into a buffer chosen when it is posted.
//!
//! # Buffer ownership
//! All buffer memory is the pool's one region (`pool.rs`), allocated at start and never moved
//! or freed while the kernel may touch it. The pool records who holds each buffer: the kernel
//! (in the buffer ring, or named by a posted one-shot receive), or the state machine (between
//! a receive completion and [`Submit::release`]; a send it posts reads it until the send
//! completes). Every hand-over is checked there. If the ring is dropped with operations still
//! in flight that could not be drained, the region is leaked, never freed.
//!
//! The files: `setup.rs` (probe, ring flags, kernel features), `buf_ring.rs` (the provided
//! buffer ring), `submit.rs` (one function per operation posted), `complete.rs` (one per kind
//! of completion reaped), `wait.rs` (submit, sleep, reap), `drop.rs` (cancel and drain),
//! `rings.rs` (more rings than threads: a worker's extra direct-descriptor tables, and where
//! buffers go), `accept.rs` (accepts across them, each promised a free slot), `adopt.rs`
//! (connected streams handed in, registered into free slots: a client's connections).
//!
//! # Capacity
//! A ring's direct-descriptor table holds at most `RLIMIT_NOFILE` entries, so a worker
//! owns up to [`Config::max_rings`] rings, added as tables fill (`rings.rs`). A direct
//! [`Socket`] names its ring (bits 32..48) and its slot in that ring's table (bits 0..32).

mod accept;
mod adopt;
mod buf_ring;
mod complete;
mod drop;
mod rings;
mod setup;
mod submit;
mod wait;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use echoport_core::{
    Backend, BufId, Completion, ListenerId, MAX_SEND_PARTS, OpKind, Socket, Token, Waker,
};
use io_uring::{IoUring, opcode, squeue, types};

use crate::pool::{Misuse, Pool, PoolConfig};
use crate::sys::EventFd;
use buf_ring::BufRing;
use echoport_core::moderation::Moderator;
pub use rings::{capacity, rings_for};
pub use setup::probe;

/// Tags a [`Socket`] that is a direct descriptor (an index into the ring's file table).
const FIXED: u64 = 1 << 63;
const NONE: u32 = u32::MAX;

/// Settings of one ring.
#[derive(Clone, Debug)]
pub struct Config {
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries: enough for every connection's posted operations at once.
    pub cq_entries: u32,
    /// The buffer pool.
    pub pool: PoolConfig,
    /// Use the fast path when the kernel has it.
    pub fast_path: bool,
    /// Size of the direct descriptor table (0: the process's descriptor limit).
    pub direct_files: u32,
    /// Most rings this backend may own (1: only its own), each with a direct descriptor
    /// table of `direct_files`: the rings after the first are added as tables fill.
    pub max_rings: u32,
    /// Accept into direct descriptors on the fast path. Off when the caller needs to know
    /// peers' addresses (a direct descriptor cannot be asked).
    pub direct_accept: bool,
    /// Adopted streams become direct descriptors on the fast path (`adopt.rs`): each one's
    /// plain descriptor is closed once the ring's table holds the socket, so a client holds
    /// more connections than `RLIMIT_NOFILE` (up to [`Config::max_rings`] tables). For a
    /// backend that makes no accepts: it picks the slots itself, so listeners are refused.
    pub direct_adopt: bool,
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
    /// Adaptive completion moderation: the most latency, in microseconds, a wait may add by
    /// holding for more completions, granted only while the completion rate says a batch
    /// will fill within it ([`echoport_core::moderation`]); 0 turns it off. Needs the
    /// kernel's minimum wait (6.12); a fixed [`Config::batch_wait_us`] takes precedence.
    pub max_added_latency_us: u32,
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
            pool: PoolConfig::default(),
            fast_path: true,
            direct_files: 0,
            max_rings: 1,
            direct_accept: true,
            direct_adopt: false,
            batch_wait_us: 0,
            batch: 32,
            max_added_latency_us: 0,
            taskrun: TaskRun::Defer,
        }
    }
}

/// How receives are posted.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum RecvMode {
    /// Multishot from the buffer ring, ended by the kernel at the connection's allowance
    /// (`IORING_RECV_MULTISHOT` with a total length, 6.17+).
    MultishotLimited,
    /// One-shot from the buffer ring: one buffer per receive (fast path on 6.0–6.16).
    OneshotRing,
    /// One-shot into a buffer chosen when posted (no fast path).
    OneshotOwn,
}

/// The message header and vector of a gathered send (`IORING_OP_SENDMSG`), boxed so their
/// addresses stay put from submission to completion.
struct MsgSlot {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_SEND_PARTS],
}

/// A listening socket and the state of its accept.
struct ListenerSlot {
    /// The socket; `None` once closed.
    fd: Option<OwnedFd>,
    /// An accept is posted on it (kept beside the worker's own flag: the backend must know
    /// whether a cancel is needed to close it).
    armed: bool,
    /// Closing: accepted sockets are closed at once, and the socket when the accept ends.
    closing: bool,
    /// One-shot accepts posted and not yet completed (`accept.rs`).
    posted: u32,
}

/// An io_uring ring serving one worker thread.
pub struct Uring {
    /// The ring.
    ring: IoUring,
    /// Multishot accept and receive, buffer ring, direct descriptors.
    fast: bool,
    /// How receives are posted.
    recv_mode: RecvMode,
    /// What the start-up line lists.
    features: Vec<&'static str>,
    /// Every buffer, and who holds it.
    pool: Pool,
    /// The provided buffer ring (fast path).
    buf_ring: Option<BufRing>,
    /// One-shot receives into own buffers: the buffer posted with each connection's
    /// receive, by connection id.
    recv_buf: Vec<u32>,
    /// Listening sockets, by [`ListenerId`].
    listeners: Vec<ListenerSlot>,
    /// Entries that did not fit in the submission queue, in order.
    backlog: VecDeque<squeue::Entry>,
    /// Completions made at post time (a refused operation), handed out at the next wait.
    synthetic: Vec<Completion>,
    /// Completion entries of the current wait (kept to reuse the allocation).
    cqes: Vec<(u64, i32, u32)>,
    /// The same, for the extra rings.
    table_cqes: Vec<(u64, i32, u32)>,
    /// The waker's eventfd; a read of it is always posted.
    waker: Arc<EventFd>,
    /// Where that read lands; the kernel holds it while the read is posted.
    wake_buf: Box<u64>,
    /// Operations posted and not yet finished (their last completion not reaped).
    inflight: u64,
    /// Batched wait bound in microseconds (0: off).
    batch_wait_us: u32,
    /// Completions a batched wait aims for.
    batch: u32,
    /// Completions the last wait brought: how many the next batched wait asks for (on
    /// kernels without the minimum wait).
    last_reaped: usize,
    /// The kernel has `IORING_FEAT_MIN_TIMEOUT`: batched waits use its minimum wait.
    min_timeout: bool,
    /// Adaptive moderation: how long the next wait may hold for more completions. `None`
    /// when it is off, overridden by a fixed batched wait, or the kernel has no minimum wait,
    /// so the loop then reads no clock for it.
    moderator: Option<Moderator>,
    /// The origin of the moderator's clock.
    epoch: Instant,
    /// The ring's own descriptor registered with it (`IORING_REGISTER_RING_FDS`, 5.18): the
    /// loop's waits name the ring by this index, sparing the kernel a descriptor lookup.
    /// The registration belongs to the thread that made it; `Uring` is not `Send` (see the
    /// assertion below), so that is the thread that uses it.
    ring_index: Option<u32>,
    /// Size of the direct descriptor table (fast path only).
    direct_files: Option<u32>,
    /// Accepted connections get direct descriptors.
    direct_accept: bool,
    /// Adopted streams get direct descriptors (slots picked by `adopt.rs`).
    direct_adopt: bool,
    /// Loop turns that found the kernel holding completions back (CQ overflow).
    overflows: u64,
    /// Completions the kernel dropped outright (only without `IORING_FEAT_NODROP`).
    dropped: u64,
    /// The rings beyond this one, and which ring holds what (`rings.rs`).
    tables: rings::Tables,
    /// The settings, for the rings added later.
    cfg: Config,
    /// Gathered sends in flight, by connection id (at most one send per connection).
    send_msgs: HashMap<u32, Box<MsgSlot>>,
    /// Headers of finished gathered sends, for reuse. Boxed on purpose: a slot moves between
    /// this list and `send_msgs`, and the kernel holds the address of its contents.
    #[allow(clippy::vec_box)]
    msg_free: Vec<Box<MsgSlot>>,
}

// `Uring` must stay on the thread that built it (its registered ring descriptor belongs to
// that thread): it holds raw pointers, so it is not `Send`, and this fails to compile if that
// ever changes.
const _: fn() = || {
    trait NotSend<A> {
        fn check() {}
    }
    impl<T: ?Sized> NotSend<()> for T {}
    struct IsSend;
    impl<T: ?Sized + Send> NotSend<IsSend> for T {}
    let _ = <Uring as NotSend<_>>::check;
};

macro_rules! with_fd {
    ($sock:expr, |$fd:ident| $body:expr) => {{
        let s: Socket = $sock;
        if s.0 & $crate::uring::FIXED != 0 {
            let $fd = io_uring::types::Fixed(s.0 as u32);
            $body
        } else {
            let $fd = io_uring::types::Fd(s.0 as std::os::fd::RawFd);
            $body
        }
    }};
}
pub(crate) use with_fd;

impl Uring {
    /// Sets up a ring with the fast path when asked for and available.
    pub fn new(cfg: &Config) -> io::Result<Uring> {
        let (ring, mut features) = setup::build_ring(cfg)?;
        let kernel = setup::kernel_version();
        // Multishot receive with a buffer ring needs kernel 6.0; DEFER_TASKRUN (6.1) implies it.
        let fast = cfg.fast_path && (features.contains(&"defer-taskrun") || kernel >= (6, 0));
        let recv_mode = match (fast, kernel >= (6, 17)) {
            (true, true) => RecvMode::MultishotLimited,
            (true, false) => RecvMode::OneshotRing,
            (false, _) => RecvMode::OneshotOwn,
        };
        let mut uring = Uring {
            ring,
            fast,
            recv_mode,
            features: Vec::new(),
            pool: Pool::new(&cfg.pool)?,
            buf_ring: None,
            recv_buf: Vec::new(),
            listeners: Vec::new(),
            backlog: VecDeque::new(),
            synthetic: Vec::new(),
            cqes: Vec::with_capacity(1024),
            table_cqes: Vec::new(),
            waker: Arc::new(EventFd::new()?),
            wake_buf: Box::new(0),
            inflight: 0,
            batch_wait_us: cfg.batch_wait_us,
            batch: cfg.batch.max(1),
            last_reaped: 0,
            min_timeout: false,
            moderator: None,
            epoch: Instant::now(),
            ring_index: None,
            direct_files: None,
            direct_accept: fast && cfg.direct_accept,
            direct_adopt: fast && cfg.direct_adopt,
            overflows: 0,
            dropped: 0,
            tables: rings::Tables::new(0, 1, 0),
            cfg: cfg.clone(),
            send_msgs: HashMap::new(),
            msg_free: Vec::new(),
        };
        uring.min_timeout = uring.ring.params().is_feature_min_timeout();
        uring.ring_index = setup::register_ring_fd(&uring.ring);
        if uring.ring_index.is_some() {
            features.push("registered-ring");
        }
        if cfg.batch_wait_us == 0 && cfg.max_added_latency_us > 0 {
            if uring.min_timeout {
                uring.moderator = Some(Moderator::new(cfg.max_added_latency_us));
            }
            features.push(if uring.min_timeout {
                "adaptive-moderation"
            } else {
                "no moderation (needs the kernel's minimum wait, 6.12+)"
            });
        }
        if cfg.batch_wait_us > 0 {
            features.push(if uring.min_timeout {
                "batched-wait (kernel min-wait)"
            } else {
                "batched-wait (adaptive)"
            });
        }
        if fast {
            uring.setup_fast_path(cfg)?;
            features.extend(["multishot-accept", "buf-ring"]);
            features.push(match recv_mode {
                RecvMode::MultishotLimited => "multishot-recv (limited)",
                _ => "one-shot recv from the ring (limited multishot needs 6.17+)",
            });
            features.push(match (uring.direct_adopt, uring.direct_accept) {
                (true, _) => "direct-fds (adopted)",
                (false, true) => "direct-fds",
                (false, false) => "plain-fds",
            });
        } else {
            features.push("one-shot-ops");
            if cfg.fast_path {
                features.push("(fast path needs kernel 6.1+)");
            }
        }
        uring.features = features;
        uring.arm_waker();
        Ok(uring)
    }

    /// Registers the direct descriptor table and the buffer ring, and hands every receive
    /// buffer to the kernel through it.
    fn setup_fast_path(&mut self, cfg: &Config) -> io::Result<()> {
        let direct = if cfg.direct_files > 0 {
            cfg.direct_files
        } else {
            // The kernel refuses a table larger than RLIMIT_NOFILE.
            crate::sys::nofile_limit().clamp(16, 1 << 20) as u32
        };
        self.ring.submitter().register_files_sparse(direct)?;
        self.direct_files = Some(direct);
        let count = self.pool.recv_count();
        let max_rings = if self.direct_accept || self.direct_adopt {
            cfg.max_rings
        } else {
            1
        };
        self.tables = rings::Tables::new(direct, max_rings, count);
        let mut ring = BufRing::register(&self.ring, count)?;
        for _ in 0..self.tables.share() {
            let Some(b) = self.pool.take_recv() else {
                break;
            };
            ring.add(b as u16, self.pool.addr(b, 0), self.pool.buf_size());
            self.tables.placed(0, b);
        }
        ring.publish();
        self.buf_ring = Some(ring);
        Ok(())
    }

    /// The ring a socket's operations are posted on: a direct descriptor's own, else 0.
    fn ring_of(sock: Socket) -> usize {
        if sock.0 & FIXED != 0 {
            ((sock.0 >> 32) & 0xffff) as usize
        } else {
            0
        }
    }

    /// Queues an entry on ring `r` (0: this ring; the others are `rings.rs`'s).
    fn enqueue_on(&mut self, r: usize, e: squeue::Entry) {
        match r.checked_sub(1).and_then(|i| self.tables.extra.get_mut(i)) {
            Some(t) => t.push(e),
            None => self.enqueue(e),
        }
    }

    /// Posts the read of the waker's eventfd.
    fn arm_waker(&mut self) {
        let ptr = &mut *self.wake_buf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.waker.as_raw_fd()), ptr, 8)
            .build()
            .user_data(Token::NONE.pack(OpKind::Wake));
        self.enqueue(e);
    }

    /// Queues an entry; when the submission queue is full, keeps it for the next wait.
    fn enqueue(&mut self, e: squeue::Entry) {
        self.inflight += 1;
        if self.backlog.is_empty() {
            // SAFETY: every entry built by this backend points only at memory that outlives
            // its completion: the pool's region (a buffer the kernel holds, or a lent one a
            // send reads), the boxed wake-up word, a gathered send's boxed header (held in
            // `send_msgs` until the completion), or nothing.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(e);
    }

    /// Reports a refused buffer hand-over: a bug in the caller, asserted in debug builds,
    /// logged (the first few) and counted in release builds.
    fn misuse(&self, m: Misuse) {
        crate::pool::report(&m, self.pool.misuses());
    }
}

impl Backend for Uring {
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<ListenerId> {
        if self.direct_adopt {
            // Accepts would take slots of tables whose slots `adopt.rs` hands out itself.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a ring that adopts streams as direct descriptors does not accept",
            ));
        }
        self.listeners.push(ListenerSlot {
            fd: Some(listener.into()),
            armed: false,
            closing: false,
            posted: 0,
        });
        Ok(ListenerId(self.listeners.len() as u32 - 1))
    }

    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket> {
        if self.direct_adopt {
            return self.adopt_direct(stream);
        }
        stream.set_nonblocking(true)?;
        Ok(Socket(stream.into_raw_fd() as u64))
    }

    fn waker(&self) -> Arc<dyn Waker> {
        self.waker.clone()
    }

    fn wait(
        &mut self,
        out: &mut Vec<Completion>,
        timeout: Option<std::time::Duration>,
    ) -> io::Result<()> {
        self.wait_and_reap(out, timeout)
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

    fn describe(&self) -> String {
        format!("io_uring ({})", self.features.join(", "))
    }

    fn max_connections(&self) -> Option<usize> {
        self.direct_files
            .filter(|_| self.direct_accept || self.direct_adopt)
            .map(|_| self.tables.capacity())
    }

    fn peer_ip(&self, sock: Socket) -> Option<std::net::IpAddr> {
        if sock.0 & FIXED != 0 {
            return None;
        }
        // SAFETY: a plain socket handed out by this backend's accept (or adopted) stays open
        // until the state machine posts its close, which it does only after its last use.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.0 as RawFd) };
        crate::sys::peer_ip(fd)
    }

    fn overflows(&self) -> u64 {
        self.overflows + self.dropped
    }

    fn buffer_misuses(&self) -> u64 {
        self.pool.misuses()
    }
}
