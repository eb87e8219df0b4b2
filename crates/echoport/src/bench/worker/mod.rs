//! One load-generating thread: its own backend instance, its share of the connections, and
//! an event loop that sends, checks every echoed byte and times every message.
//!
//! Per connection the messages in flight sit in one queue, oldest first:
//!
//! ```text
//!   queue: [ m0 m1 m2 | m3 m4 ]      m0..m2 handed to sends (m2 maybe in part), m3.. unsent
//!            ^recv_off  ^send_idx/send_off
//! ```
//!
//! Echoed bytes are matched against the front message at `recv_off` (regenerated from its
//! key, see [`super::pattern`]); a message is done when its last byte is back. Sends are
//! batched: with no send in flight, one buffer is filled with as many queued messages as fit
//! and posted as one send (a short send is resumed from where it stopped).
//!
//! Closed loop: a connection starts with `pipeline` messages and creates one each time one
//! comes back. Open loop: the thread's messages are due at fixed intended times
//! (`offset + k * interval`), handed round-robin to its connections when due; latency counts
//! from the intended time, so a stalled server or a late client shows in the percentiles.
//!
//! Churn ([`churn`]): a connection that has had its `--messages-per-conn` echoes is closed
//! and a new one asked of the connector in its place; under `--reconnect` so is one the
//! server closed, its unsent messages handed to the next connection.

mod churn;
mod close;
mod conn;
mod stamped;
#[cfg(test)]
mod tests;
mod tick;

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use echoport_core::slab::Slab;
use echoport_core::{Backend, BufId, Completion, OpError, Socket, Token, Waker};

use super::connector::Request;
use super::interval::Recorder;
use super::params::SizeRange;
use super::pattern;
use super::tally::Tally;

/// A connection opened by the connector thread for this worker.
pub struct Incoming {
    /// Global connection number (also the content key's connection part).
    pub gid: u32,
    /// The connected stream.
    pub stream: TcpStream,
    /// The sequence number of its first message (a reconnect goes on from the last).
    pub next_seq: u64,
    /// When its connect began, ns since the run's start.
    pub started_ns: u64,
    /// Counts it as handed out until the worker has taken it (None in tests).
    pub in_hand: Option<crate::bench::connector::InHand>,
}

/// What the connector sends a worker: a connection, or word that one it expected failed.
pub enum Delivery {
    /// A connection.
    Conn(Incoming),
    /// A connection that could not be opened.
    Failed,
}

/// Counters the main thread reads once a second for the live line.
#[derive(Default)]
pub struct Live {
    /// Messages echoed in full (warm-up included).
    pub done: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Error events so far.
    pub errors: AtomicU64,
    /// Connections open now.
    pub conns: AtomicU64,
}

/// How this thread loads its connections.
#[derive(Copy, Clone, Debug)]
pub enum ThreadLoad {
    /// Each connection keeps `pipeline` messages in flight.
    Closed {
        /// Messages in flight per connection.
        pipeline: u32,
    },
    /// Message k of this thread is due at `offset_ns + k * interval_ns`.
    Open {
        /// Nanoseconds between this thread's messages.
        interval_ns: f64,
        /// When its first message is due.
        offset_ns: f64,
    },
}

/// What one thread does, in nanoseconds since the run's start.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The load.
    pub load: ThreadLoad,
    /// Message sizes.
    pub size: SizeRange,
    /// Messages intended before this are warm-up (not measured).
    pub warmup_ns: u64,
    /// No message is created at or after this (duration mode).
    pub end_ns: Option<u64>,
    /// Measured messages this thread creates (count mode).
    pub count: Option<u64>,
    /// No-progress timeout, and the grace at the end for the last echoes.
    pub timeout_ns: u64,
    /// Open loop: the length of a tick (0: none). Each message goes out at the first tick
    /// at or after its intended time (its latency counts from that tick), and the loop
    /// sleeps from tick to tick on a plain timer, not woken by echoes: one wake-up and one
    /// submission per tick, whatever the rate.
    pub tick_ns: u64,
    /// Open loop: poll, not sleep, when the next message is due within this many ns.
    pub spin_ns: u64,
    /// Keep every measured latency (tests compare the histograms with them).
    pub keep_samples: bool,
    /// Close (and replace) a connection after this many echoes.
    pub messages_per_conn: Option<u64>,
    /// A connection the server closes is replaced, not counted as an error.
    pub reconnect: bool,
}

impl Plan {
    /// `t` (ns since the start) falls in the measured window: after the warm-up, before the
    /// end.
    pub fn in_window(&self, t: u64) -> bool {
        t >= self.warmup_ns && self.end_ns.is_none_or(|e| t < e)
    }
}

/// How a worker reports that its backend is open: its waker and description, or why not.
pub type Ready = Result<(Arc<dyn Waker>, String), String>;

/// Everything a worker thread is handed.
pub struct Task {
    /// Its plan.
    pub plan: Plan,
    /// Set on Ctrl-C.
    pub stop: Arc<AtomicBool>,
    /// Its live counters.
    pub live: Arc<Live>,
    /// Connections from the connector; disconnected when it is done.
    pub incoming: Receiver<Delivery>,
    /// Connections the connector will open for this thread at the start.
    pub expected: u64,
    /// Where to ask for a connection in place of one that ended (with churn).
    pub requests: Option<Sender<Request>>,
    /// Reports the backend's waker and description once it is open.
    pub ready: Sender<Ready>,
    /// The run's start instant, sent when every thread is ready.
    pub start: Receiver<Instant>,
    /// Per-interval measurements, when asked for.
    pub intervals: Option<Recorder>,
}

/// What a worker thread returns.
pub struct Outcome {
    /// Its measurements.
    pub tally: Tally,
}

impl crate::backends::WithBackend for Task {
    type Output = anyhow::Result<Outcome>;

    fn run<B: Backend>(self, backend: B) -> anyhow::Result<Outcome> {
        let _ = self.ready.send(Ok((backend.waker(), backend.describe())));
        let Ok(epoch) = self.start.recv() else {
            // The run was called off before it started.
            return Ok(Outcome {
                tally: Tally::default(),
            });
        };
        let mut w = Worker::new(backend, self.plan, epoch, self.intervals);
        if w.ticked {
            tick::timer_slack();
        }
        w.pending = self.expected;
        w.requests = self.requests;
        w.run(&self.incoming, &self.stop, &self.live)?;
        if let Some(n) = w.stamped.as_ref().map(|s| s.unstamped).filter(|&n| n > 0) {
            tracing::info!(
                reads = n,
                "echo reads without a kernel arrival stamp (timed when read: pessimistic)"
            );
        }
        let now = w.now();
        if let Some(r) = w.intervals.take() {
            r.finish(now);
        }
        let mut tally = w.tally;
        tally.overflows = w.io.overflows();
        Ok(Outcome { tally })
    }
}

#[derive(Copy, Clone, Debug)]
struct Msg {
    /// The pattern key its bytes are made from (checked on the echo).
    key: u64,
    /// Intended (open loop) or creation (closed loop) time, ns since start.
    t: u64,
    len: u32,
    /// Sent in the measured phase (not the warm-up): its latency counts.
    measured: bool,
    /// Already counted as a mismatch (its echo is not checked again).
    bad: bool,
}

struct Conn {
    /// The socket, as the backend names it.
    sock: Socket,
    /// The connection's number in the run (its worker is `gid % threads`).
    gid: u32,
    /// Sequence number of the next message made on it.
    next_seq: u64,
    /// Messages in flight, oldest first: sent or waiting to be sent.
    queue: VecDeque<Msg>,
    /// Index in `queue` of the first message not yet wholly handed to a send.
    send_idx: usize,
    /// Bytes of that message already handed to sends.
    send_off: u32,
    /// Bytes of the oldest message already echoed.
    recv_off: u32,
    /// Bytes handed to sends so far.
    posted: u64,
    /// Bytes echoed back so far.
    received: u64,
    /// The send in flight: buffer, offset, length.
    send: Option<(BufId, u32, u32)>,
    /// A receive is posted.
    recv_armed: bool,
    /// The stream's descriptor when the ticked loop reads it itself ([`stamped`]).
    rx_fd: Option<i32>,
    /// A close is under way: nothing more is sent or read.
    closing: bool,
    /// Listed in the worker's `dirty` list (sends to post this turn).
    /// Connections with sends to post at the end of this turn.
    dirty: bool,
    /// Waiting in `buf_wait` for a send buffer.
    waiting_buf: bool,
    /// Index in the worker's `active` list.
    active_pos: usize,
    /// Index in the worker's `targets` list, while it takes new messages (open loop).
    target_pos: Option<usize>,
    /// When the connection last made progress while owed echoes.
    last_progress: u64,
    /// Messages created on it.
    issued: u64,
    /// Messages echoed in full on it.
    echoed: u64,
    /// When its connect began, ns since the start.
    started_ns: u64,
    /// Its first echo is back (connect-to-first-echo is recorded once).
    first_echo_seen: bool,
}

impl Conn {
    fn owed(&self) -> u64 {
        self.posted - self.received
    }

    fn idle(&self) -> bool {
        self.queue.is_empty()
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Run,
    Drain,
}

#[derive(Copy, Clone, Debug)]
enum Failure {
    Lost,
    Timeout,
    Io,
}

struct Worker<B: Backend> {
    /// The backend this thread drives.
    io: B,
    /// What this thread is to do (load, counts, timings).
    plan: Plan,
    /// The origin of the loop's clock (`now()` is ns since it).
    epoch: Instant,
    /// The connections, by token.
    conns: Slab<Conn>,
    /// Open connections not closing: timeout scans and the end of the run.
    active: Vec<Token>,
    /// Open loop: the connections that take new messages, in turn.
    targets: Vec<Token>,
    /// Open loop: messages of connections the server closed, not sent yet: they go out first
    /// on the next connection.
    orphans: VecDeque<Msg>,
    /// Connections still to come from the connector.
    pending: u64,
    /// Where to ask for replacements.
    requests: Option<Sender<Request>>,
    /// Round-robin cursor over `targets`.
    rr: usize,
    dirty: Vec<Token>,
    /// Connections whose receive is to be posted again at the end of this turn.
    rearm: Vec<Token>,
    /// Connections waiting for a send buffer, in order.
    buf_wait: VecDeque<Token>,
    /// Reused list of tokens (a copy of `active` to walk while it changes).
    scratch: Vec<Token>,
    /// Completions of the current wait (kept to reuse the allocation).
    events: Vec<Completion>,
    /// What was counted: messages, latencies, errors.
    tally: Tally,
    /// The per-interval recorder (`--interval`, `--hlog`), if asked for.
    intervals: Option<Recorder>,
    /// Running, or draining the echoes still owed at the end.
    phase: Phase,
    /// Stopped by a signal before the end.
    interrupted: bool,
    /// When draining must end (ns), the connections still owing being timed out.
    drain_deadline: u64,
    /// The drain deadline has passed: what is still owed fails as a timeout.
    deadline_passed: bool,
    /// When the next timeout scan runs (ns).
    next_scan: u64,
    /// How often timeouts are scanned (a fifth of the timeout, 1 to 100 ms).
    scan_every: u64,
    /// Open loop: messages scheduled so far (the next one is number `scheduled`).
    scheduled: u64,
    /// Messages created in the measured phase (against `--count`).
    issued_measured: u64,
    /// Messages echoed in full, warm-up included.
    done_all: u64,
    /// Bytes echoed in full messages, warm-up included.
    bytes_all: u64,
    /// Open loop with a tick: sleep on the timer, reap once per tick.
    ticked: bool,
    /// The ticked loop's kernel-stamped receive path.
    stamped: Option<stamped::Stamped>,
}

fn classify(e: OpError) -> Failure {
    match e {
        OpError::Os(c) if c == libc::ECONNRESET || c == libc::EPIPE || c == libc::ECONNABORTED => {
            Failure::Lost
        }
        _ => Failure::Io,
    }
}

impl<B: Backend> Worker<B> {
    fn new(io: B, plan: Plan, epoch: Instant, intervals: Option<Recorder>) -> Self {
        let scan_every = (plan.timeout_ns / 5).clamp(1_000_000, 100_000_000);
        let mut ticked = plan.tick_ns > 0 && matches!(plan.load, ThreadLoad::Open { .. });
        let stamped = if ticked { tick::open_stamped() } else { None };
        ticked &= stamped.is_some();
        let mut tally = Tally::default();
        if plan.keep_samples {
            tally.samples = Some(Vec::new());
        }
        Worker {
            io,
            plan,
            epoch,
            conns: Slab::with_capacity(1024),
            active: Vec::new(),
            targets: Vec::new(),
            orphans: VecDeque::new(),
            pending: 0,
            requests: None,
            rr: 0,
            dirty: Vec::new(),
            rearm: Vec::new(),
            buf_wait: VecDeque::new(),
            scratch: Vec::new(),
            events: Vec::with_capacity(1024),
            tally,
            intervals,
            phase: Phase::Run,
            interrupted: false,
            drain_deadline: u64::MAX,
            deadline_passed: false,
            next_scan: scan_every,
            scan_every,
            scheduled: 0,
            issued_measured: 0,
            done_all: 0,
            bytes_all: 0,
            ticked,
            stamped,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(
        &mut self,
        incoming: &Receiver<Delivery>,
        stop: &AtomicBool,
        live: &Live,
    ) -> io::Result<()> {
        let mut connector_open = true;
        loop {
            let now = self.now();
            if connector_open {
                connector_open = self.take_deliveries(incoming, now);
            }
            if !self.interrupted && stop.load(Ordering::Acquire) {
                self.interrupted = true;
                self.begin_drain(now, now);
            }
            if self.phase == Phase::Run {
                self.schedule(now);
            }
            if self.phase == Phase::Run && self.conns.is_empty() && self.pending == 0 {
                // Every connection failed or was lost: nothing left to do.
                self.begin_drain(now, now);
            }
            if self.phase == Phase::Drain && !self.deadline_passed && now >= self.drain_deadline {
                self.deadline_passed = true;
                self.end_all();
            }
            if let Some(r) = &mut self.intervals {
                r.roll(now);
            }
            if now >= self.next_scan {
                self.next_scan = now + self.scan_every;
                self.scan_timeouts(now);
            }
            self.flush(now);
            self.publish(live);
            if self.phase == Phase::Drain && self.conns.is_empty() {
                break;
            }
            if self.deadline_passed && now > self.drain_deadline.saturating_add(2_000_000_000) {
                // Cancellations that never completed (a wedged backend): give up on them;
                // dropping the backend cancels what is left.
                tracing::warn!(
                    left = self.conns.len(),
                    "connections did not finish closing"
                );
                break;
            }
            self.wait_and_dispatch(now)?;
        }
        // Hand the last closes to the kernel.
        self.events.clear();
        self.io.wait(&mut self.events, Some(Duration::ZERO))?;
        Ok(())
    }

    /// Adopts the connections the connector sent; false once it is gone.
    fn take_deliveries(&mut self, incoming: &Receiver<Delivery>, now: u64) -> bool {
        loop {
            match incoming.try_recv() {
                Ok(d) => {
                    self.pending = self.pending.saturating_sub(1);
                    if let Delivery::Conn(inc) = d {
                        self.add_conn(inc, now);
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    self.pending = 0;
                    return false;
                }
            }
        }
    }

    fn publish(&self, live: &Live) {
        live.done.store(self.done_all, Ordering::Relaxed);
        live.bytes.store(self.bytes_all, Ordering::Relaxed);
        live.errors
            .store(self.tally.errors.total(), Ordering::Relaxed);
        live.conns.store(self.conns.len() as u64, Ordering::Relaxed);
    }

    /// Waits for completions (or the next thing due) and handles them.
    fn wait_and_dispatch(&mut self, before: u64) -> io::Result<()> {
        if self.ticked && self.phase == Phase::Run && !self.targets.is_empty() {
            return self.tick(before);
        }
        let mut timeout = self.next_wakeup(before);
        if self.ticked {
            // Connecting (the connector's wake-up ends this wait) or draining: look at the
            // stamped receives at least once a tick.
            timeout = timeout.min(Duration::from_nanos(self.plan.tick_ns));
        }
        let deadline = before + timeout.as_nanos() as u64;
        if self.phase == Phase::Run
            && matches!(self.plan.load, ThreadLoad::Open { .. })
            && timeout.as_nanos() as u64 <= self.plan.spin_ns
        {
            // Due very soon: poll (a wait with no timer) rather than arm a timer.
            timeout = Duration::ZERO;
        }
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.io.wait(&mut events, Some(timeout))?;
        let now = self.now();
        // A wait that returns well past its deadline means this thread was not running
        // (a busy machine): report it, it inflates every latency measured meanwhile.
        let late = now.saturating_sub(deadline);
        self.note_late(before, late);
        if late > 50_000_000 {
            tracing::debug!(
                late_ms = late / 1_000_000,
                timeout_us = timeout.as_micros() as u64,
                events = events.len(),
                conns = self.conns.len(),
                "wait returned late"
            );
        }
        for c in events.drain(..) {
            self.dispatch(c, now);
        }
        self.events = events;
        self.reap_stamped(now);
        Ok(())
    }

    /// Records how late a wait begun at `at` returned, if it was in the measured window:
    /// what polluted the latencies measured (connecting before it and closing after it
    /// take long turns that time nothing).
    fn note_late(&mut self, at: u64, late: u64) {
        if self.phase == Phase::Run && self.plan.in_window(at) {
            self.tally.max_late_ns = self.tally.max_late_ns.max(late);
        }
    }

    fn next_wakeup(&self, now: u64) -> Duration {
        let mut at = self.next_scan;
        if let Some(r) = &self.intervals {
            at = at.min(r.next_at());
        }
        if self.phase == Phase::Run {
            if let Some(end) = self.plan.end_ns {
                at = at.min(end);
            }
            if matches!(self.plan.load, ThreadLoad::Open { .. }) && !self.targets.is_empty() {
                at = at.min(self.due(self.scheduled));
            }
        } else if !self.deadline_passed {
            at = at.min(self.drain_deadline);
        }
        Duration::from_nanos(at.saturating_sub(now))
    }

    /// Open loop: when message `k` goes out: its intended time, rounded up to the next tick
    /// when ticking (every message of a tick goes out together, at the tick).
    fn due(&self, k: u64) -> u64 {
        let ThreadLoad::Open {
            interval_ns,
            offset_ns,
        } = self.plan.load
        else {
            return 0;
        };
        let t = (offset_ns + k as f64 * interval_ns) as u64;
        match self.plan.tick_ns {
            0 => t,
            tick => t.div_ceil(tick) * tick,
        }
    }

    /// Creates the next message of a connection, intended at `t`. False when the run creates
    /// no more messages, or this connection has had its share (`--messages-per-conn`).
    fn issue(&mut self, token: Token, t: u64) -> bool {
        if self.phase != Phase::Run || self.plan.end_ns.is_some_and(|e| t >= e) {
            return false;
        }
        let measured = t >= self.plan.warmup_ns;
        if measured && self.plan.count.is_some_and(|c| self.issued_measured >= c) {
            return false;
        }
        let per_conn = self.plan.messages_per_conn;
        let Some(c) = self.conns.get_mut(token) else {
            return false;
        };
        if per_conn.is_some_and(|k| c.issued >= k) {
            return false;
        }
        if measured {
            self.issued_measured += 1;
        }
        let key = pattern::key(c.gid, c.next_seq);
        c.next_seq += 1;
        let len = self.plan.size.pick(key);
        let m = Msg {
            key,
            t,
            len,
            measured,
            bad: false,
        };
        self.enqueue(token, m);
        true
    }

    /// Open loop: hand out every message now due (even late: a message intended before the
    /// end is sent and counted however late the loop gets to it). Both loops: notice the end
    /// of creation.
    fn schedule(&mut self, now: u64) {
        if let ThreadLoad::Open { .. } = self.plan.load {
            self.hand_out_orphans();
            while !self.targets.is_empty() {
                let t = self.due(self.scheduled);
                if t > now {
                    break;
                }
                let token = self.targets[self.rr % self.targets.len()];
                self.rr = self.rr.wrapping_add(1);
                if !self.issue(token, t) {
                    self.begin_drain(now, now + self.plan.timeout_ns);
                    return;
                }
                self.scheduled += 1;
            }
        }
        // Open loop: not before every message intended before the end has gone to a
        // connection (with churn there may have been none to take it for a while).
        let all_issued = match self.plan.load {
            ThreadLoad::Open { .. } => {
                self.orphans.is_empty()
                    && self
                        .plan
                        .end_ns
                        .is_none_or(|e| self.due(self.scheduled) >= e)
            }
            ThreadLoad::Closed { .. } => true,
        };
        if (self.plan.end_ns.is_some_and(|e| now >= e) && all_issued)
            || self.plan.count.is_some_and(|c| self.issued_measured >= c)
        {
            self.begin_drain(now, now + self.plan.timeout_ns);
        }
    }
}
