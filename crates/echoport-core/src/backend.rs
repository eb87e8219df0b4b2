//! The interface every backend implements: post operations, reap completions, lend buffers.

use std::io;
use std::time::Duration;

use crate::op::{BufId, Completion, Op, Socket};

/// Wakes a backend's [`Backend::wait`] from another thread or a signal handler thread; the
/// woken loop sees a [`Completion::Wake`].
pub trait Waker: Send + Sync {
    /// Makes the loop's current or next wait return with [`Completion::Wake`].
    fn wake(&self);
}

/// Where the state machine posts its next operations and returns borrowed buffers.
///
/// Split from [`Backend`] so the state machine can be driven by a recording fake in tests.
pub trait Submit {
    /// Queues an operation; it is handed to the kernel at the next [`Backend::wait`].
    fn push(&mut self, op: Op);
    /// Gives a buffer lent by a receive completion (or [`Backend::alloc_buf`]) back to the
    /// backend. Releasing a buffer the caller does not hold (twice, or never lent) is refused
    /// by the backend's pool: counted in [`Backend::buffer_misuses`], asserted in debug
    /// builds, and never turned into reuse.
    fn release(&mut self, buf: BufId);
    /// Bytes per buffer.
    fn buf_size(&self) -> u32;
    /// Copies the first `len` bytes of lent buffer `src` to offset `at` of lent buffer `dst`
    /// (a small receive appended to the bytes already queued in `dst`). The caller promises
    /// that no posted send names `dst`'s bytes `at..at + len`.
    fn copy(&mut self, dst: BufId, at: u32, src: BufId, len: u32);
    /// Receive buffers a new receive can take right now (in the kernel's ring, or free).
    fn free_buffers(&self) -> usize;
    /// Receive buffers in all.
    fn total_buffers(&self) -> usize;
    /// How many buffers one send may gather ([`crate::Op::SendParts`]); 1 (the default)
    /// means the backend takes only [`crate::Op::Send`].
    fn max_send_parts(&self) -> usize {
        1
    }
}

/// A completion source: io_uring, epoll (completions emulated from readiness), or IOCP.
///
/// Contract shared by all backends:
/// - every posted operation that names a connection produces at least one completion, and
///   exactly one with `more == false` (accept and receive may produce many before it);
/// - a completion carrying an error always ends its operation;
/// - a buffer handed out in a receive completion stays valid, and is not reused, until it is
///   released; a buffer named by a pending send stays valid until that send completes;
/// - completions of cancellations, shutdowns and closes are consumed by the backend.
pub trait Backend: Submit {
    /// Registers a bound, listening socket and returns its id.
    fn add_listener(&mut self, listener: std::net::TcpListener) -> io::Result<crate::ListenerId>;

    /// Takes over an already connected stream (the load generator's connections, which it
    /// connects on a blocking thread) and returns the backend's name for it.
    fn adopt(&mut self, stream: std::net::TcpStream) -> io::Result<Socket>;

    /// A handle that wakes this backend's wait from another thread.
    fn waker(&self) -> std::sync::Arc<dyn Waker>;

    /// Submits everything queued, then waits until at least one completion is available or
    /// `timeout` passes, and appends the completions to `out`.
    fn wait(&mut self, out: &mut Vec<Completion>, timeout: Option<Duration>) -> io::Result<()>;

    /// The bytes of a buffer lent by a receive completion (or obtained from
    /// [`Backend::alloc_buf`]).
    fn buf(&self, buf: BufId) -> &[u8];

    /// Borrows a free buffer for bytes the caller wants to send (clients, the load generator).
    /// Release it with [`Submit::release`] after its send completes.
    fn alloc_buf(&mut self) -> Option<BufId>;

    /// Mutable access to a buffer obtained from [`Backend::alloc_buf`].
    fn buf_mut(&mut self, buf: BufId) -> &mut [u8];

    /// A one-line description for the start-up log: backend name and features in use.
    fn describe(&self) -> String;

    /// The peer's IP address of an accepted socket, when the backend can tell (it cannot for
    /// io_uring direct descriptors).
    fn peer_ip(&self, _sock: Socket) -> Option<std::net::IpAddr> {
        None
    }

    /// How many connections this backend can hold in a table of its own (io_uring's direct
    /// descriptors), or `None` when each connection takes a descriptor of the process.
    fn max_connections(&self) -> Option<usize> {
        None
    }

    /// Completions the kernel could not queue and had to hold back (io_uring CQ overflow).
    fn overflows(&self) -> u64 {
        0
    }

    /// Buffer hand-overs the pool refused (a double release, a release of a buffer the
    /// caller did not hold): always 0 unless the state machine has a bug.
    fn buffer_misuses(&self) -> u64;
}
