//! The event loop of one thread: reap completions from a backend and hand each to its
//! connection's handler, like the original's `GetQueuedCompletionStatus` loop.
//!
//! The worker owns the connection slab, the listeners' accept state (including the back-off
//! when descriptors run out), parked connections waiting for buffers, and graceful shutdown.
//!
//! A connection whose receive found no free buffer is parked, and unparked only when the
//! pool has buffers again, one connection per free buffer, those holding no buffer first:
//! with every buffer taken, a worker sleeps instead of retrying.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use crate::admission::Admission;
use crate::backend::Backend;
use crate::conn::{Budget, Conn, Cx, Limits, RecvState, Segments, Status};
use crate::live::LiveSlot;
use crate::op::{Completion, ListenerId, Op, Received, Socket};
use crate::slab::Slab;
use crate::stats::Stats;
use crate::token::Token;
use crate::wheel::Wheel;

mod accept;
mod gate;

pub use gate::ProxyConfig;

/// First pause after an accept fails for lack of descriptors; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while descriptors are exhausted.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While buffers are free but connections are still parked (the ones unparked had no data
/// to take a buffer with, so no completion came to trigger another turn), how soon the
/// next ones are tried. Never armed while no buffer is free.
const PARK_RETRY: Duration = Duration::from_millis(10);
/// Consecutive unexplained accept errors tolerated before backing off anyway.
const ACCEPT_ERRORS_BEFORE_BACKOFF: u32 = 16;
/// How long past the shutdown deadline cancellations may take before the loop gives up.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// Resolution of the idle and write timeouts.
pub const TICK: Duration = Duration::from_millis(100);

/// How a worker behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// Per-connection limits.
    pub limits: Limits,
    /// How long a graceful shutdown may take before connections are cut.
    pub shutdown_timeout: Duration,
    /// The server-wide connection budget; connections past it are closed at accept.
    pub admission: Arc<Admission>,
    /// Close a connection that has received nothing for this long (and owes no echo).
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose pending echo has made no send progress for this long
    /// (its peer stopped reading).
    pub write_timeout: Option<Duration>,
    /// Where to publish this worker's counters for the metrics endpoint (None: nowhere).
    pub live: Option<LiveSlot>,
    /// Every accepted connection starts with a PROXY protocol header (None: plain echo).
    pub proxy: Option<ProxyConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(10),
            admission: Admission::new(usize::MAX),
            idle_timeout: None,
            write_timeout: None,
            live: None,
            proxy: None,
        }
    }
}

struct Listener {
    /// The backend's name for it.
    id: ListenerId,
    /// An accept is posted on it.
    armed: bool,
    /// Not closed (closed at the stop, or when its worker's tables are full).
    open: bool,
    /// Accepts are paused until then (descriptors or buffers ran out).
    retry_at: Option<Instant>,
    /// The next pause, doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
    backoff: Duration,
    /// Accepts failed in a row (other errors back off after a few).
    errors_in_row: u32,
    /// The pause was logged (once, until an accept succeeds again).
    warned: bool,
}

/// One event loop over one backend.
pub struct Worker<B: Backend> {
    /// Where operations go and completions come from.
    backend: B,
    /// How this worker behaves.
    cfg: Config,
    /// The limits in buffers of this backend's pool.
    budget: Budget,
    /// Live connections, by token.
    conns: Slab<Conn>,
    /// Queued echo segments of every connection.
    segs: Segments,
    /// Counters.
    stats: Stats,
    /// The listeners this worker accepts from.
    listeners: Vec<Listener>,
    /// Connections parked for lack of a buffer that hold none: unparked first.
    parked_light: VecDeque<Token>,
    /// Parked connections that hold buffers already: unparked when the pool is not low.
    parked_heavy: VecDeque<Token>,
    /// Set by the signal thread: begin a graceful stop.
    stop: Arc<AtomicBool>,
    /// When the graceful stop began.
    stopping: Option<Instant>,
    /// The shutdown deadline passed and every connection was told to abort.
    aborted: bool,
    /// Completions of the current turn (kept to reuse its allocation).
    events: Vec<Completion>,
    /// The instant tick 0 stands for.
    epoch: Instant,
    /// The clock as the current turn read it.
    clock: Instant,
    /// The current tick (of [`TICK`]) since `epoch`.
    now: u32,
    /// Connections filed by the tick their timeout may fall due.
    wheel: Wheel,
    /// The idle timeout in ticks.
    idle_ticks: Option<u32>,
    /// The write timeout in ticks.
    write_ticks: Option<u32>,
    /// Scratch list of tokens whose wheel slot fell due.
    expired: Vec<Token>,
    /// Source address of each connection, kept only when limiting per address.
    peers: HashMap<Token, IpAddr>,
    /// What was last published to `cfg.live`, and in which tick.
    live_last: (Stats, usize, u32),
    /// Connections still waiting for their PROXY header (None: not a PROXY listener).
    gate: Option<gate::Gate>,
}

fn ticks(d: Option<Duration>) -> Option<u32> {
    d.map(|d| (d.as_nanos().div_ceil(TICK.as_nanos())).clamp(1, u32::MAX as u128 / 2) as u32)
}

impl<B: Backend> Worker<B> {
    /// A worker serving `listeners` (already registered with `backend`) until `stop` is set
    /// and its waker called.
    pub fn new(backend: B, listeners: &[ListenerId], cfg: Config, stop: Arc<AtomicBool>) -> Self {
        let (idle_ticks, write_ticks) = (ticks(cfg.idle_timeout), ticks(cfg.write_timeout));
        let budget = Budget::new(&cfg.limits, backend.buf_size(), backend.total_buffers());
        Worker {
            budget,
            epoch: Instant::now(),
            clock: Instant::now(),
            now: 0,
            wheel: Wheel::new(0),
            idle_ticks,
            write_ticks,
            expired: Vec::new(),
            peers: HashMap::new(),
            live_last: (Stats::default(), 0, u32::MAX),
            gate: cfg.proxy.clone().map(gate::Gate::new),
            backend,
            cfg,
            conns: Slab::with_capacity(1024),
            segs: Segments::new(),
            stats: Stats::default(),
            listeners: listeners
                .iter()
                .map(|&id| Listener {
                    id,
                    armed: false,
                    open: true,
                    retry_at: None,
                    backoff: BACKOFF_MIN,
                    errors_in_row: 0,
                    warned: false,
                })
                .collect(),
            parked_light: VecDeque::new(),
            parked_heavy: VecDeque::new(),
            stop,
            stopping: None,
            aborted: false,
            events: Vec::with_capacity(1024),
        }
    }

    /// The backend, for inspection.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, for tests and tools that drive it directly.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats;
        s.cq_overflows = self.backend.overflows();
        s.buffer_misuses = self.backend.buffer_misuses();
        s
    }

    /// The per-connection buffer budget this worker enforces.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Connections accepted on a PROXY listener and still waiting for their header.
    pub fn waiting_for_header(&self) -> usize {
        self.gate.as_ref().map_or(0, |g| g.waiting())
    }

    /// Connections parked, waiting for a buffer.
    pub fn parked(&self) -> usize {
        self.parked_light.len() + self.parked_heavy.len()
    }

    /// Runs until stopped and every connection has closed (or the shutdown deadline forced
    /// them closed). Returns what was served.
    pub fn run(mut self) -> io::Result<Stats> {
        loop {
            if self.stopping.is_none() && self.stop.load(Ordering::Acquire) {
                self.begin_shutdown();
            }
            let now = Instant::now();
            if self.stopping.is_some() && self.conns.is_empty() {
                break;
            }
            // Cancellations could not finish (a wedged backend): give up on them.
            if self.stop_deadline(ABORT_GRACE).is_some_and(|t| now > t) {
                tracing::warn!(
                    left = self.conns.len(),
                    "connections did not finish closing"
                );
                break;
            }
            let timeout = self.next_timeout(now);
            if let Err(e) = self.turn(timeout) {
                self.fail(&e);
                return Err(e);
            }
        }
        // Hand the last closes to the kernel.
        self.events.clear();
        self.backend.wait(&mut self.events, Some(Duration::ZERO))?;
        Ok(self.stats())
    }

    /// One pass: submit, wait up to `timeout`, dispatch every completion reaped.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.turn_at(Instant::now(), timeout)
    }

    /// [`Worker::turn`] with the clock read as `now`: tests drive timers (accept back-off,
    /// timeouts, the shutdown deadline) without sleeping.
    pub fn turn_at(&mut self, now: Instant, timeout: Option<Duration>) -> io::Result<()> {
        self.clock = now;
        self.now = self.tick_at(now);
        self.on_timers(now);
        self.expire_connections();
        self.arm_listeners();
        let timeout = self.publish_live(timeout);
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let waiting = Instant::now();
        self.backend.wait(&mut events, timeout)?;
        // The wait may have slept for as long as nothing happened (with no timer armed, for
        // ever): what it delivered happened now. The clock moves on by the time it took, so a
        // connection accepted after a quiet hour is not filed as an hour old.
        self.clock = now + waiting.elapsed();
        self.now = self.tick_at(self.clock);
        for c in events.drain(..) {
            self.dispatch(c);
        }
        self.events = events;
        self.unpark();
        Ok(())
    }

    /// The tick (of [`TICK`] since `epoch`) that `t` falls in.
    fn tick_at(&self, t: Instant) -> u32 {
        (t.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u32
    }

    /// The backend failed for good (the transient errors of normal operation never get
    /// here: backends retry them). Says so at once, and gives the connections' admission
    /// places back so the server's budget does not shrink; the connections themselves end
    /// with the backend.
    fn fail(&mut self, e: &io::Error) {
        tracing::error!(
            error = %e,
            connections = self.conns.len(),
            "worker failed; its connections are lost, the other workers go on"
        );
        self.gate = None;
        for token in self.conns.tokens() {
            self.conns.remove(token);
            self.cfg.admission.release();
            if let Some(ip) = self.peers.remove(&token) {
                self.cfg.admission.release_ip(ip);
            }
        }
    }

    /// Registers a connection that is already established (a socket the caller adopted into
    /// the backend) and starts echoing on it.
    pub fn adopt(&mut self, sock: Socket) -> Token {
        self.cfg.admission.admit_unchecked();
        self.insert_conn(sock)
    }

    /// Starts echoing on an admitted connection.
    fn insert_conn(&mut self, sock: Socket) -> Token {
        let token = self.conns.insert_with(|t| Conn::new(t, sock));
        self.stats.accepted += 1;
        if let Some(first) = self.first_timer() {
            self.wheel.insert(token, (self.now + first) as u64);
        }
        self.with_conn(token, |c, cx| c.on_accepted(cx));
        token
    }

    /// The shortest timeout a connection may have (idle, write, PROXY header), in ticks.
    fn first_timer(&self) -> Option<u32> {
        let header = self.gate.as_ref().map(|g| g.ticks);
        [self.idle_ticks, self.write_ticks, header]
            .into_iter()
            .flatten()
            .min()
    }

    /// Closes connections whose idle, write or PROXY header timeout has passed; files the
    /// others again.
    fn expire_connections(&mut self) {
        if self.wheel.is_empty() {
            return;
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.expire(self.now as u64, &mut expired);
        for token in expired.drain(..) {
            let Some(conn) = self.conns.get_mut(token) else {
                continue; // closed since it was filed
            };
            let header = self.gate.as_ref().and_then(|g| g.deadline(token));
            let at = conn.expires_at(self.idle_ticks, self.write_ticks);
            let at = at.map_or(header, |a| Some(header.map_or(a, |h| h.min(a))));
            let floor = self.first_timer().unwrap_or(1);
            match at {
                Some(at) if at <= self.now && header.is_some() => self.header_timed_out(token),
                Some(at) if at <= self.now => {
                    self.stats.timeouts += 1;
                    let client = self.peers.get(&token).copied();
                    tracing::debug!(?token, ?client, "connection timed out");
                    self.with_conn(token, |c, cx| c.abort(cx));
                }
                Some(at) => self.wheel.insert(token, at as u64),
                None => self.wheel.insert(token, (self.now + floor) as u64),
            }
            // Aborting waits for cancellations; check again in case they never come.
            if at.is_some_and(|at| at <= self.now) && self.conns.get_mut(token).is_some() {
                self.wheel.insert(token, (self.now + floor) as u64);
            }
        }
        self.expired = expired;
    }

    /// Starts a graceful shutdown now, without waiting for the stop flag.
    pub fn begin_shutdown(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Instant::now());
        for l in &mut self.listeners {
            if l.open {
                l.open = false;
                self.backend.push(Op::CloseListener { listener: l.id });
            }
        }
        for token in self.conns.tokens() {
            if self.gated(token) {
                // No echo is owed before the header: just close.
                if let Some(g) = &mut self.gate {
                    g.forget(token);
                }
                self.with_conn(token, |c, cx| c.abort(cx));
            } else {
                self.with_conn(token, |c, cx| c.shutdown(cx));
            }
        }
    }

    fn dispatch(&mut self, c: Completion) {
        match c {
            Completion::Accept {
                listener,
                result,
                more,
            } => self.on_accept(listener, result, more),
            Completion::Recv {
                token,
                result,
                more,
            } => {
                if self.gated(token) {
                    self.gated_recv(token, result, more);
                } else if !self.with_conn(token, |c, cx| c.on_recv(cx, result, more)) {
                    // A completion for a connection already gone: only its buffer matters.
                    if let Ok(Received::Data { buf, .. }) = result {
                        self.backend.release(buf);
                    }
                    return;
                }
                if let Some(conn) = self.conns.get_mut(token) {
                    if conn.recv_state() == RecvState::Parked {
                        if conn.held() == 0 {
                            self.parked_light.push_back(token);
                        } else {
                            self.parked_heavy.push_back(token);
                        }
                    }
                }
            }
            Completion::Send { token, result } => {
                self.with_conn(token, |c, cx| c.on_sent(cx, result));
            }
            Completion::Wake => {}
        }
    }

    /// Runs a handler on a live connection and frees its slot if it closed. Returns false
    /// (running nothing) when the token names a connection that is gone.
    fn with_conn(
        &mut self,
        token: Token,
        f: impl FnOnce(&mut Conn, &mut Cx<'_, B>) -> Status,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(token) else {
            return false;
        };
        let mut cx = Cx {
            io: &mut self.backend,
            segs: &mut self.segs,
            limits: &self.cfg.limits,
            budget: self.budget,
            stats: &mut self.stats,
            now: self.now,
        };
        if f(conn, &mut cx) == Status::Closed {
            self.conns.remove(token);
            if let Some(g) = &mut self.gate {
                g.forget(token);
            }
            self.cfg.admission.release();
            if let Some(ip) = self.peers.remove(&token) {
                self.cfg.admission.release_ip(ip);
            }
        }
        true
    }

    /// True when [`Worker::unpark`] would retry someone now.
    fn can_unpark(&self) -> bool {
        let free = self.backend.free_buffers();
        free > 0
            && (!self.parked_light.is_empty()
                || (free >= self.budget.low_water && !self.parked_heavy.is_empty()))
    }

    /// Gives parked connections another try, one per free buffer: first those holding no
    /// buffer, then (while the pool is not low) those holding some. With no buffer free
    /// nothing is retried, so a worker whose buffers are all taken sleeps until one is
    /// released.
    fn unpark(&mut self) {
        let mut free = self.backend.free_buffers();
        while free > 0 {
            let token = match self.parked_light.pop_front() {
                Some(t) => t,
                None if free >= self.budget.low_water => match self.parked_heavy.pop_front() {
                    Some(t) => t,
                    None => break,
                },
                None => break,
            };
            free -= 1;
            self.with_conn(token, |c, cx| c.unpark(cx));
        }
    }

    fn on_timers(&mut self, now: Instant) {
        for l in &mut self.listeners {
            if l.retry_at.is_some_and(|t| t <= now) {
                l.retry_at = None;
            }
        }
        // No deadline when not stopping, or when the timeout is too long for the clock.
        if !self.aborted && self.stop_deadline(Duration::ZERO).is_some_and(|t| now >= t) {
            self.aborted = true;
            tracing::warn!(
                left = self.conns.len(),
                "shutdown deadline passed; closing connections"
            );
            for token in self.conns.tokens() {
                self.with_conn(token, |c, cx| c.abort(cx));
            }
        }
    }

    /// Copies the counters to `cfg.live` (relaxed stores) when they changed, at most once
    /// per tick. A change within the tick already published shortens the wait to the next
    /// tick, so the last changes before a quiet spell are published too; an idle loop that
    /// published everything waits as long as it likes.
    fn publish_live(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let Some(slot) = &self.cfg.live else {
            return timeout;
        };
        let (stats, conns) = (self.stats(), self.conns.len());
        let (last, last_conns, tick) = self.live_last;
        if stats == last && conns == last_conns {
            return timeout;
        }
        if tick != self.now {
            slot.publish(&stats, conns);
            self.live_last = (stats, conns, self.now);
            return timeout;
        }
        let next = (self.epoch + TICK * (self.now + 1)).saturating_duration_since(self.clock);
        Some(timeout.map_or(next, |t| t.min(next)))
    }

    /// When the graceful stop's deadline (plus `grace`) passes; None when not stopping, or
    /// when the shutdown timeout is too long for the clock (`inf`, `1e300`): no deadline.
    fn stop_deadline(&self, grace: Duration) -> Option<Instant> {
        let start = self.stopping?;
        start
            .checked_add(self.cfg.shutdown_timeout)?
            .checked_add(grace)
    }

    /// How long the wait at `now` may sleep before a timer of this worker falls due (`None`:
    /// until a completion comes). No timer is armed for parked connections while no buffer
    /// is free.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for l in &self.listeners {
            if let Some(t) = l.retry_at {
                consider(t);
            }
        }
        let grace = if self.aborted {
            ABORT_GRACE
        } else {
            Duration::ZERO
        };
        if let Some(limit) = self.stop_deadline(grace) {
            consider(limit);
        }
        if self.can_unpark() {
            consider(now + PARK_RETRY);
        }
        if let Some(due) = self.wheel.next_due() {
            consider(self.epoch + TICK * (due.max(self.now as u64 + 1) as u32));
        }
        next.map(|t| t.saturating_duration_since(now))
    }
}
