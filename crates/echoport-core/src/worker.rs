//! The event loop of one thread: reap completions from a backend and hand each to its
//! connection's handler, like the original's `GetQueuedCompletionStatus` loop.
//!
//! The worker owns the connection slab, the listeners' accept state (including the back-off
//! when descriptors run out), parked connections waiting for buffers, and graceful shutdown.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::conn::{Conn, Cx, Limits, Segments, Status};
use crate::live::LiveSlot;
use crate::op::{Completion, ListenerId, Op, OpError, Received, Socket};
use crate::slab::Slab;
use crate::stats::Stats;
use crate::token::Token;
use crate::wheel::Wheel;

/// First pause after an accept fails for lack of descriptors; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while descriptors are exhausted.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often parked connections retry when no buffer came back in the meantime.
const PARK_RETRY: Duration = Duration::from_millis(10);
/// Consecutive unexplained accept errors tolerated before backing off anyway.
const ACCEPT_ERRORS_BEFORE_BACKOFF: u32 = 16;
/// How long past the shutdown deadline cancellations may take before the loop gives up.
const ABORT_GRACE: Duration = Duration::from_secs(2);
/// Resolution of the idle and write timeouts.
pub const TICK: Duration = Duration::from_millis(100);

/// The connection budget shared by every worker of a server: admission at accept.
#[derive(Debug)]
pub struct Admission {
    max: AtomicUsize,
    live: AtomicUsize,
    per_ip: Option<(u32, Mutex<HashMap<IpAddr, u32>>)>,
}

impl Admission {
    /// A budget of `max` connections.
    pub fn new(max: usize) -> Arc<Admission> {
        Admission::with_per_ip(max, None)
    }

    /// A budget of `max` connections, and of `per_ip` from any one address.
    pub fn with_per_ip(max: usize, per_ip: Option<u32>) -> Arc<Admission> {
        Arc::new(Admission {
            max: AtomicUsize::new(max),
            live: AtomicUsize::new(0),
            per_ip: per_ip.map(|n| (n, Mutex::new(HashMap::new()))),
        })
    }

    /// True when connections are also limited per source address.
    pub fn limits_per_ip(&self) -> bool {
        self.per_ip.is_some()
    }

    /// Takes one place for `ip` if its budget allows.
    pub fn try_acquire_ip(&self, ip: IpAddr) -> bool {
        let Some((max, map)) = &self.per_ip else {
            return true;
        };
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= *max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives `ip`'s place back.
    pub fn release_ip(&self, ip: IpAddr) {
        if let Some((_, map)) = &self.per_ip {
            let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }

    /// Changes the budget (connections already admitted stay).
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The budget.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Connections admitted and not yet released.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Takes one place if one is free.
    pub fn try_acquire(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back.
    pub fn release(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

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
        }
    }
}

struct Listener {
    id: ListenerId,
    armed: bool,
    open: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
    errors_in_row: u32,
}

/// One event loop over one backend.
pub struct Worker<B: Backend> {
    backend: B,
    cfg: Config,
    conns: Slab<Conn>,
    segs: Segments,
    stats: Stats,
    listeners: Vec<Listener>,
    parked: VecDeque<Token>,
    stop: Arc<AtomicBool>,
    stopping: Option<Instant>,
    aborted: bool,
    events: Vec<Completion>,
    epoch: Instant,
    now: u32,
    wheel: Wheel,
    idle_ticks: Option<u32>,
    write_ticks: Option<u32>,
    expired: Vec<Token>,
    /// Source address of each connection, kept only when limiting per address.
    peers: HashMap<Token, IpAddr>,
    /// What was last published to `cfg.live`, and in which tick.
    live_last: (Stats, usize, u32),
}

fn ticks(d: Option<Duration>) -> Option<u32> {
    d.map(|d| (d.as_nanos().div_ceil(TICK.as_nanos())).clamp(1, u32::MAX as u128 / 2) as u32)
}

impl<B: Backend> Worker<B> {
    /// A worker serving `listeners` (already registered with `backend`) until `stop` is set
    /// and its waker called.
    pub fn new(backend: B, listeners: &[ListenerId], cfg: Config, stop: Arc<AtomicBool>) -> Self {
        let (idle_ticks, write_ticks) = (ticks(cfg.idle_timeout), ticks(cfg.write_timeout));
        Worker {
            epoch: Instant::now(),
            now: 0,
            wheel: Wheel::new(0),
            idle_ticks,
            write_ticks,
            expired: Vec::new(),
            peers: HashMap::new(),
            live_last: (Stats::default(), 0, u32::MAX),
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
                })
                .collect(),
            parked: VecDeque::new(),
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
        s
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
            self.turn(timeout)?;
        }
        // Hand the last closes to the kernel.
        self.events.clear();
        self.backend.wait(&mut self.events, Some(Duration::ZERO))?;
        Ok(self.stats())
    }

    /// One pass: submit, wait up to `timeout`, dispatch every completion reaped.
    pub fn turn(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let now = Instant::now();
        self.now = (now.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos()) as u32;
        self.on_timers(now);
        self.expire_connections();
        self.arm_listeners();
        let timeout = self.publish_live(timeout);
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        self.backend.wait(&mut events, timeout)?;
        let mut sends = 0;
        for c in events.drain(..) {
            sends += matches!(c, Completion::Send { .. }) as usize;
            self.dispatch(c);
        }
        self.events = events;
        self.unpark(sends);
        Ok(())
    }

    /// Registers a connection that is already established (a socket the caller adopted into
    /// the backend) and starts echoing on it.
    pub fn adopt(&mut self, sock: Socket) -> Token {
        self.cfg.admission.live.fetch_add(1, Ordering::AcqRel);
        self.insert_conn(sock)
    }

    /// Starts echoing on an admitted connection.
    fn insert_conn(&mut self, sock: Socket) -> Token {
        let token = self.conns.insert_with(|t| Conn::new(t, sock));
        self.stats.accepted += 1;
        if let Some(first) = [self.idle_ticks, self.write_ticks]
            .into_iter()
            .flatten()
            .min()
        {
            self.wheel.insert(token, (self.now + first) as u64);
        }
        self.with_conn(token, |c, cx| c.on_accepted(cx));
        token
    }

    /// Closes connections whose idle or write timeout has passed; files the others again.
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
            let floor = [self.idle_ticks, self.write_ticks]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(1);
            match conn.expires_at(self.idle_ticks, self.write_ticks) {
                Some(at) if at <= self.now => {
                    self.stats.timeouts += 1;
                    tracing::debug!(?token, "connection timed out");
                    self.with_conn(token, |c, cx| c.abort(cx));
                    // Aborting waits for cancellations; check again in case they never come.
                    if self.conns.get_mut(token).is_some() {
                        self.wheel.insert(token, (self.now + floor) as u64);
                    }
                }
                Some(at) => self.wheel.insert(token, at as u64),
                None => self.wheel.insert(token, (self.now + floor) as u64),
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
            self.with_conn(token, |c, cx| c.shutdown(cx));
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
                if !self.with_conn(token, |c, cx| c.on_recv(cx, result, more)) {
                    // A completion for a connection already gone: only its buffer matters.
                    if let Ok(Received::Data { buf, .. }) = result {
                        self.backend.release(buf);
                    }
                    return;
                }
                if let Some(conn) = self.conns.get_mut(token) {
                    if conn.recv_state() == crate::conn::RecvState::Parked {
                        self.parked.push_back(token);
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
            stats: &mut self.stats,
            now: self.now,
        };
        if f(conn, &mut cx) == Status::Closed {
            self.conns.remove(token);
            self.cfg.admission.release();
            if let Some(ip) = self.peers.remove(&token) {
                self.cfg.admission.release_ip(ip);
            }
        }
        true
    }

    fn on_accept(&mut self, id: ListenerId, result: Result<Socket, OpError>, more: bool) {
        let Some(l) = self.listeners.iter_mut().find(|l| l.id == id) else {
            return;
        };
        if !more {
            l.armed = false;
        }
        match result {
            Ok(sock) => {
                l.backoff = BACKOFF_MIN;
                l.errors_in_row = 0;
                self.admit(sock);
            }
            Err(OpError::Canceled) => {}
            Err(e) => {
                l.errors_in_row += 1;
                let exhausted = matches!(e, OpError::TooManyFiles | OpError::NoBuffers);
                if exhausted || l.errors_in_row >= ACCEPT_ERRORS_BEFORE_BACKOFF {
                    let pause = l.backoff;
                    l.retry_at = Some(Instant::now() + pause);
                    l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
                    self.stats.accept_backoffs += 1;
                    if pause == BACKOFF_MIN || pause == BACKOFF_MAX {
                        tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing accepts");
                    }
                } else {
                    tracing::debug!(error = %e, "accept failed; retrying");
                }
            }
        }
    }

    /// Admits an accepted socket within the budgets, or closes it at once.
    fn admit(&mut self, sock: Socket) {
        let adm = self.cfg.admission.clone();
        let ip = if adm.limits_per_ip() {
            self.backend.peer_ip(sock)
        } else {
            None
        };
        let admitted = self.stopping.is_none()
            && adm.try_acquire()
            && (ip.is_none_or(|ip| adm.try_acquire_ip(ip)) || {
                adm.release();
                false
            });
        if !admitted {
            self.stats.refused += 1;
            self.backend.push(Op::Close {
                token: Token::NONE,
                sock,
            });
            return;
        }
        let token = self.insert_conn(sock);
        if let Some(ip) = ip {
            if self.conns.get_mut(token).is_some() {
                self.peers.insert(token, ip);
            } else {
                adm.release_ip(ip);
            }
        }
    }

    /// Posts an accept on every open listener that has none and is not backing off.
    fn arm_listeners(&mut self) {
        for l in &mut self.listeners {
            if l.open && !l.armed && l.retry_at.is_none() {
                l.armed = true;
                self.backend.push(Op::Accept { listener: l.id });
            }
        }
    }

    /// Gives parked connections another try: one per buffer that came back with a send.
    fn unpark(&mut self, budget: usize) {
        let budget = budget.max(1).min(self.parked.len());
        for _ in 0..budget {
            let Some(token) = self.parked.pop_front() else {
                break;
            };
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
        let next = (self.epoch + TICK * (self.now + 1)).saturating_duration_since(Instant::now());
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

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
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
        if !self.parked.is_empty() {
            consider(now + PARK_RETRY);
        }
        if let Some(due) = self.wheel.next_due() {
            consider(self.epoch + TICK * (due.max(self.now as u64 + 1) as u32));
        }
        next.map(|t| t.saturating_duration_since(now))
    }
}
