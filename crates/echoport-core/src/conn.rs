//! The echo state machine of one connection: the original IOCP example's flow, written once.
//!
//! ```text
//! accepted ──▶ post receive
//! received N ──▶ queue N bytes, post a send of them (one send in flight at a time,
//!                 gathering what is queued when the backend can)
//! sent n ──▶ short? send the rest : release the buffer, send the next queued bytes
//! pending ≥ limit, or buffers held ≥ budget ──▶ stop receiving until the echo drains
//! small receive with data queued ──▶ copy it onto the last queued buffer, release its own
//! end of stream ──▶ flush what is pending, then close          (half-close)
//! server stopping ──▶ stop receiving, flush, shut down writing, discard until the peer closes
//! error ──▶ cancel what is pending, close this one connection when nothing is in flight
//! ```
//!
//! The machine never performs I/O: each handler records what happened and posts the next
//! [`Op`]s through [`Submit`]. It never closes a socket while an operation on it is pending,
//! so a late completion can never land on a reused descriptor.

use crate::backend::Submit;
use crate::op::{BufId, MAX_SEND_PARTS, Op, OpError, Received, SendPart, Socket};
use crate::stats::Stats;
use crate::token::Token;

mod segments;

pub use segments::Segments;
use segments::{NIL, Queue};

/// Limits that shape every connection of a worker.
#[derive(Copy, Clone, Debug)]
pub struct Limits {
    /// Bytes a connection may hold received but not yet echoed before it stops receiving.
    pub max_pending: u32,
}

/// A receive this small (at most `buf_size / COMPACT_DIVISOR` bytes) is copied onto the end of
/// the connection's last queued buffer when it fits there, instead of holding a buffer of its
/// own: a peer that trickles bytes and never reads cannot pin a whole buffer per byte.
pub const COMPACT_DIVISOR: u32 = 2;

/// The buffer budget of every connection of a worker: [`Limits`] turned into buffers of the
/// backend's pool. Receives are budgeted in buffers, not only bytes, because what a worker
/// runs out of is buffers, and a buffer is taken whole by however few bytes arrive in it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Most buffers one connection may hold queued for echo: `max_pending / buf_size`,
    /// rounded up, at least 1.
    pub max_buffers: u32,
    /// Below this many free receive buffers the pool is under pressure, and only a
    /// connection holding no buffer may receive (a reserve for connections that hold none).
    pub low_water: usize,
    /// Bytes per buffer.
    pub buf_size: u32,
}

impl Budget {
    /// The budget for `limits` over a pool of `total` receive buffers of `buf_size` bytes.
    /// The reserve is a quarter of the pool.
    pub fn new(limits: &Limits, buf_size: u32, total: usize) -> Budget {
        let buf_size = buf_size.max(1);
        Budget {
            max_buffers: limits.max_pending.div_ceil(buf_size).max(1),
            low_water: total / 4,
            buf_size,
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(&Limits::default(), 8192, 2048)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 64 * 1024,
        }
    }
}

/// Everything a handler needs besides the connection itself.
pub struct Cx<'a, S: Submit> {
    /// Where operations are posted and buffers returned.
    pub io: &'a mut S,
    /// Queued echo segments.
    pub segs: &'a mut Segments,
    /// Per-connection limits.
    pub limits: &'a Limits,
    /// The same limits in buffers of the backend's pool.
    pub budget: Budget,
    /// Counters.
    pub stats: &'a mut Stats,
    /// The worker's clock, in ticks, for the timeouts.
    pub now: u32,
}

/// Where a connection is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Receiving and echoing.
    Open,
    /// No longer receiving; sending what is queued. Then, if `linger`, shut down the write
    /// side and discard input until the peer closes; otherwise close.
    Flushing {
        /// True when the server is stopping (the peer has not closed its side).
        linger: bool,
    },
    /// Write side shut down; discarding input until end of stream.
    Lingering,
    /// An error or a forced stop: waiting for pending operations to finish, then closing.
    Aborting,
    /// The close has been posted; the slot may be freed.
    Closed,
}

/// The state of the connection's receive operation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RecvState {
    /// No receive posted.
    Idle,
    /// A receive is posted.
    Armed,
    /// A receive is posted and its cancellation requested.
    Canceling,
    /// The last receive found no buffer; waiting for the worker to unpark it.
    Parked,
}

/// Whether the connection is still alive after a handler ran.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Status {
    /// Still has work or may get more.
    Open,
    /// Its close was posted: free the slot.
    Closed,
}

/// One connection's echo state.
#[derive(Debug)]
pub struct Conn {
    /// Its slot and generation: every operation it posts carries this.
    token: Token,
    /// Its socket, as the backend names it.
    sock: Socket,
    /// Where it is in its life.
    phase: Phase,
    /// The state of its receive operation.
    recv: RecvState,
    /// The peer has shut down its sending side (end of stream received).
    eof: bool,
    /// Bytes asked of the send in flight; 0 when none is.
    sending: u32,
    /// The send in flight has been asked to cancel (so it is not asked twice).
    send_cancel_posted: bool,
    /// Segments received and not yet echoed, in order.
    queue: Queue,
    /// Buffers the queue holds (one per segment): the budget's unit.
    held: u32,
    /// Receiving is paused at the budget (counted once per pause in `Stats::paused`).
    paused: bool,
    /// Bytes received and not yet echoed.
    pending: u32,
    /// Tick of the last byte received (idle timeout).
    last_rx: u32,
    /// Tick of the last send progress, or of when echo started waiting (write timeout).
    last_tx: u32,
}

impl Conn {
    /// State for a connection just accepted (or adopted) under `token`.
    pub fn new(token: Token, sock: Socket) -> Conn {
        Conn {
            token,
            sock,
            phase: Phase::Open,
            recv: RecvState::Idle,
            eof: false,
            sending: 0,
            send_cancel_posted: false,
            queue: Queue::EMPTY,
            held: 0,
            paused: false,
            pending: 0,
            last_rx: 0,
            last_tx: 0,
        }
    }

    /// The connection's token.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The state of its receive.
    pub fn recv_state(&self) -> RecvState {
        self.recv
    }

    /// Bytes received and not yet echoed.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Buffers held queued for echo.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// True while a send is in flight.
    pub fn is_sending(&self) -> bool {
        self.sending > 0
    }

    /// Accepted: post the first receive.
    pub fn on_accepted<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        self.last_rx = cx.now;
        self.last_tx = cx.now;
        self.advance(cx)
    }

    /// The tick at which this connection has waited too long: `write` ticks without send
    /// progress while echo is pending, or `idle` ticks without receiving anything otherwise.
    /// `None` when the timeout that applies now is off.
    pub fn expires_at(&self, idle: Option<u32>, write: Option<u32>) -> Option<u32> {
        if self.pending > 0 {
            write.map(|w| self.last_tx.saturating_add(w))
        } else {
            idle.map(|i| self.last_rx.saturating_add(i))
        }
    }

    /// A receive completed: queue the bytes for echo, or note end of stream or the error.
    pub fn on_recv<S: Submit>(
        &mut self,
        cx: &mut Cx<'_, S>,
        result: Result<Received, OpError>,
        more: bool,
    ) -> Status {
        if !more {
            self.recv = RecvState::Idle;
        }
        match result {
            Ok(Received::Data { buf, len }) => self.received(cx, buf, 0, len),
            Ok(Received::Eof) => self.eof = true,
            Err(OpError::NoBuffers) if !more => {
                self.recv = RecvState::Parked;
                cx.stats.parked += 1;
            }
            Err(OpError::Canceled) => {}
            Err(_) => self.fail(cx),
        }
        self.advance(cx)
    }

    /// A send completed: account the bytes sent and send what remains.
    pub fn on_sent<S: Submit>(
        &mut self,
        cx: &mut Cx<'_, S>,
        result: Result<u32, OpError>,
    ) -> Status {
        let asked = std::mem::take(&mut self.sending);
        match result {
            Ok(n) if n > 0 && n <= asked => self.sent(cx, n, asked),
            // Zero bytes, more than asked, cancelled or failed: nothing sensible can follow.
            _ => self.fail(cx),
        }
        self.advance(cx)
    }

    /// The worker found buffers again: receive once more if still wanted.
    pub fn unpark<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        if self.recv == RecvState::Parked {
            self.recv = RecvState::Idle;
        }
        self.advance(cx)
    }

    /// The server is stopping: stop receiving, echo what was received, then say goodbye.
    pub fn shutdown<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        if self.phase == Phase::Open {
            self.phase = Phase::Flushing { linger: true };
        }
        self.advance(cx)
    }

    /// Close as soon as pending operations allow, dropping whatever is queued.
    pub fn abort<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        if self.phase != Phase::Closed {
            self.phase = Phase::Aborting;
        }
        self.advance(cx)
    }

    /// A receive completed whose first `off` bytes the worker's PROXY header gate took: the
    /// `len` bytes after them are queued for echo from that offset of the same buffer (not
    /// copied). `len` is at least 1.
    pub fn on_recv_from<S: Submit>(
        &mut self,
        cx: &mut Cx<'_, S>,
        buf: BufId,
        off: u32,
        len: u32,
        more: bool,
    ) -> Status {
        if !more {
            self.recv = RecvState::Idle;
        }
        self.received(cx, buf, off, len);
        self.advance(cx)
    }

    /// A receive completed and the worker's PROXY header gate took all of its bytes (and gave
    /// the buffer back): nothing to queue; receive on.
    pub fn on_recv_consumed<S: Submit>(&mut self, cx: &mut Cx<'_, S>, more: bool) -> Status {
        if !more {
            self.recv = RecvState::Idle;
        }
        self.last_rx = cx.now;
        self.advance(cx)
    }

    /// A receive completed and the worker's PROXY header gate refused what it carried (and
    /// gave the buffer back): close without echoing anything.
    pub fn on_recv_refused<S: Submit>(&mut self, cx: &mut Cx<'_, S>, more: bool) -> Status {
        if !more {
            self.recv = RecvState::Idle;
        }
        self.abort(cx)
    }

    fn received<S: Submit>(&mut self, cx: &mut Cx<'_, S>, buf: BufId, off: u32, len: u32) {
        self.last_rx = cx.now;
        match self.phase {
            Phase::Open | Phase::Flushing { .. } => {
                if self.pending == 0 {
                    self.last_tx = cx.now;
                }
                self.pending += len;
                if off > 0 || !self.append_to_tail(cx, buf, len) {
                    self.queue.push(cx.segs, buf, off, len);
                    self.held += 1;
                }
            }
            // Lingering or closing: the bytes have nowhere to go.
            _ => cx.io.release(buf),
        }
    }

    /// Copies a small receive onto the end of the last queued buffer when it fits there and
    /// gives its own buffer straight back. The bytes written lie past everything queued, so
    /// no posted send names them. Returns false (nothing done) otherwise.
    fn append_to_tail<S: Submit>(&mut self, cx: &mut Cx<'_, S>, buf: BufId, len: u32) -> bool {
        let size = cx.budget.buf_size;
        let Some(tail) = self.queue.back(cx.segs) else {
            return false;
        };
        let end = tail.off + tail.len;
        if len > size / COMPACT_DIVISOR || end + len > size {
            return false;
        }
        tail.len += len;
        let dst = tail.buf;
        cx.io.copy(dst, end, buf, len);
        cx.io.release(buf);
        cx.stats.compacted += 1;
        true
    }

    fn sent<S: Submit>(&mut self, cx: &mut Cx<'_, S>, n: u32, asked: u32) {
        if n < asked {
            cx.stats.short_sends += 1;
        }
        cx.stats.bytes_echoed += n as u64;
        self.pending -= n;
        self.last_tx = cx.now;
        // A gathered send may have covered several queued segments, the last one partly.
        let mut left = n;
        while left > 0 {
            let seg = self
                .queue
                .front(cx.segs)
                .expect("a send completed with more bytes than were queued");
            let take = left.min(seg.len);
            seg.off += take;
            seg.len -= take;
            left -= take;
            if seg.len == 0 {
                let buf = self.queue.pop(cx.segs).expect("front exists");
                self.held -= 1;
                cx.io.release(buf);
            }
        }
    }

    fn fail<S: Submit>(&mut self, cx: &mut Cx<'_, S>) {
        if !matches!(self.phase, Phase::Aborting | Phase::Closed) {
            cx.stats.errors += 1;
            self.phase = Phase::Aborting;
        }
    }

    /// Decides the next operations from the current state; every handler ends here.
    fn advance<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        if self.phase == Phase::Open && self.eof {
            self.phase = Phase::Flushing { linger: false };
        }
        match self.phase {
            Phase::Open => {
                self.post_send(cx);
                if self.over_budget(cx) {
                    if !self.paused {
                        // Counted once per pause, whether the receive is cancelled here or
                        // already ended by itself at the connection's allowance.
                        self.paused = true;
                        cx.stats.paused += 1;
                    }
                    if self.recv == RecvState::Armed {
                        self.cancel_recv(cx);
                    }
                } else if self.recv == RecvState::Idle {
                    self.post_recv(cx);
                }
                Status::Open
            }
            Phase::Flushing { linger } => {
                self.stop_receiving(cx);
                self.post_send(cx);
                if !self.queue.is_empty() || self.is_sending() || self.recv != RecvState::Idle {
                    return Status::Open;
                }
                if linger && !self.eof {
                    cx.io.push(Op::Shutdown {
                        token: self.token,
                        sock: self.sock,
                    });
                    self.phase = Phase::Lingering;
                    self.post_recv(cx);
                    Status::Open
                } else {
                    self.close(cx)
                }
            }
            Phase::Lingering => {
                if self.eof {
                    self.stop_receiving(cx);
                    if self.recv == RecvState::Idle {
                        return self.close(cx);
                    }
                } else if self.recv == RecvState::Idle {
                    self.post_recv(cx);
                }
                Status::Open
            }
            Phase::Aborting => {
                self.stop_receiving(cx);
                if self.is_sending() && !self.send_cancel_posted {
                    self.send_cancel_posted = true;
                    cx.io.push(Op::CancelSend {
                        token: self.token,
                        sock: self.sock,
                    });
                }
                if self.recv != RecvState::Idle || self.is_sending() {
                    return Status::Open;
                }
                while let Some(buf) = self.queue.pop(cx.segs) {
                    cx.io.release(buf);
                }
                self.held = 0;
                self.pending = 0;
                self.close(cx)
            }
            Phase::Closed => Status::Closed,
        }
    }

    /// True when the pool is low on free receive buffers: only connections holding none
    /// may receive then.
    fn pressure<S: Submit>(cx: &Cx<'_, S>) -> bool {
        cx.io.free_buffers() < cx.budget.low_water
    }

    /// True when the connection may not receive now: it owes its peer `max_pending` bytes,
    /// holds its whole budget of buffers, or holds any while the pool is under pressure.
    fn over_budget<S: Submit>(&self, cx: &Cx<'_, S>) -> bool {
        self.pending >= cx.limits.max_pending
            || self.held >= cx.budget.max_buffers
            || (self.held > 0 && Self::pressure(cx))
    }

    /// Bytes the next receive may deliver before it must end: what is left of the byte and
    /// buffer budgets (one buffer under pressure).
    fn recv_allowance<S: Submit>(&self, cx: &Cx<'_, S>) -> u32 {
        let size = cx.budget.buf_size;
        let bufs_left = if Self::pressure(cx) {
            1
        } else {
            cx.budget.max_buffers.saturating_sub(self.held).max(1)
        };
        let bytes_left = cx.limits.max_pending.saturating_sub(self.pending).max(1);
        bytes_left.min(bufs_left.saturating_mul(size))
    }

    fn post_recv<S: Submit>(&mut self, cx: &mut Cx<'_, S>) {
        self.recv = RecvState::Armed;
        self.paused = false;
        let max = if self.phase == Phase::Open {
            self.recv_allowance(cx)
        } else {
            // Lingering: every buffer is given back as it comes, so nothing is held and no
            // budget applies; the peer may have megabytes queued to throw away.
            u32::MAX
        };
        cx.io.push(Op::Recv {
            token: self.token,
            sock: self.sock,
            max,
        });
    }

    /// Sends what is queued: the first segment, or as many as the backend gathers in one
    /// send (fewer system calls and loop turns when receives outpace sends).
    fn post_send<S: Submit>(&mut self, cx: &mut Cx<'_, S>) {
        if self.is_sending() || self.queue.head == NIL {
            return;
        }
        let first = cx.segs.slots[self.queue.head as usize];
        let max = cx.io.max_send_parts().clamp(1, MAX_SEND_PARTS);
        if first.next == NIL || max == 1 {
            // The common case: one buffer to send.
            self.sending = first.len;
            cx.io.push(Op::Send {
                token: self.token,
                sock: self.sock,
                buf: first.buf,
                off: first.off,
                len: first.len,
            });
            return;
        }
        // Several queued and the backend gathers: up to `max` buffers in one send.
        let mut parts = [SendPart::default(); MAX_SEND_PARTS];
        let mut count = 0;
        let mut total = 0u32;
        let mut i = self.queue.head;
        while i != NIL && count < max {
            let seg = cx.segs.slots[i as usize];
            parts[count] = SendPart {
                buf: seg.buf,
                off: seg.off,
                len: seg.len,
            };
            total += seg.len;
            count += 1;
            i = seg.next;
        }
        self.sending = total;
        cx.stats.gathered_sends += 1;
        cx.io.push(Op::SendParts {
            token: self.token,
            sock: self.sock,
            parts,
            count: count as u8,
        });
    }

    fn cancel_recv<S: Submit>(&mut self, cx: &mut Cx<'_, S>) {
        self.recv = RecvState::Canceling;
        cx.io.push(Op::CancelRecv {
            token: self.token,
            sock: self.sock,
        });
    }

    /// Cancels a posted receive, and forgets a parked one.
    fn stop_receiving<S: Submit>(&mut self, cx: &mut Cx<'_, S>) {
        match self.recv {
            RecvState::Armed => self.cancel_recv(cx),
            RecvState::Parked => self.recv = RecvState::Idle,
            RecvState::Idle | RecvState::Canceling => {}
        }
    }

    fn close<S: Submit>(&mut self, cx: &mut Cx<'_, S>) -> Status {
        debug_assert!(self.queue.is_empty() && !self.is_sending() && self.recv == RecvState::Idle);
        self.phase = Phase::Closed;
        cx.stats.closed += 1;
        cx.io.push(Op::Close {
            token: self.token,
            sock: self.sock,
        });
        Status::Closed
    }
}
