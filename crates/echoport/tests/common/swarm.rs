//! Many clients at once without a thread each: non-blocking sockets driven by `poll(2)`.
//!
//! A [`Flow`] is one client connection. It sends its own tagged stream ([`Pattern`]) as a
//! list of messages: each message is written in chunks of random size, and the next message
//! starts only when the previous one's echo has fully arrived (so every flow keeps a bounded
//! amount in flight); or, with [`Plan::Stream`], it writes without end, keeping at most a
//! window of unechoed bytes. Every byte read is checked against what was sent at that offset.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use super::pattern::Pattern;
use super::rng::Rng;

/// Largest single write or read of a flow.
const IO_MAX: usize = 64 * 1024;

/// What a flow sends.
#[derive(Clone, Debug)]
pub enum Plan {
    /// These messages, one after the other; then shut down writing and expect end-of-stream.
    Messages(Vec<u64>),
    /// Bytes without end, at most `window` of them unechoed. End-of-stream from the server is
    /// accepted at any point (the server is stopping); what arrived must be a prefix.
    Stream { window: u64 },
}

/// Where a flow is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Sending and checking.
    Running,
    /// Everything echoed, write side shut down: waiting for end-of-stream.
    AwaitEof,
    /// Ended cleanly: everything echoed (messages) or a clean end-of-stream (stream).
    Done,
    /// Ended with an error (see [`Flow::error`]).
    Failed,
}

/// One client connection of a [`Swarm`].
pub struct Flow {
    pub id: u32,
    stream: Option<TcpStream>,
    pat: Pattern,
    rng: Rng,
    plan: Plan,
    messages: VecDeque<u64>,
    /// Bytes of the stream that may be written so far (end of the current message).
    limit: u64,
    pub sent: u64,
    pub received: u64,
    pub state: State,
    pub error: Option<String>,
    /// Set to false to stop sending (the connection stays open and keeps reading).
    pub writing: bool,
    /// Set to false to stop reading (the server's echo backs up).
    pub reading: bool,
    /// When a write last made progress.
    pub last_write: Instant,
    /// Whether the stream ended with end-of-stream (not a reset).
    pub eof: bool,
    scratch: Vec<u8>,
}

impl Flow {
    /// Connects (blocking, then non-blocking) and prepares to send `plan`.
    pub fn connect(addr: SocketAddr, id: u32, salt: u64, seed: u64, plan: Plan) -> Flow {
        let stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("client {id}: connecting to {addr}: {e}"));
        Flow::with_stream(stream, id, salt, seed, plan)
    }

    /// Drives an already connected stream.
    pub fn with_stream(stream: TcpStream, id: u32, salt: u64, seed: u64, plan: Plan) -> Flow {
        stream.set_nodelay(true).unwrap();
        stream.set_nonblocking(true).unwrap();
        let (messages, limit) = match &plan {
            Plan::Messages(m) => {
                let mut q: VecDeque<u64> = m.iter().copied().collect();
                let first = q.pop_front().unwrap_or(0);
                (q, first)
            }
            Plan::Stream { .. } => (VecDeque::new(), u64::MAX),
        };
        let mut f = Flow {
            id,
            stream: Some(stream),
            pat: Pattern::new(id, salt),
            rng: Rng::new(seed),
            plan,
            messages,
            limit,
            sent: 0,
            received: 0,
            state: State::Running,
            error: None,
            writing: true,
            reading: true,
            last_write: Instant::now(),
            eof: false,
            scratch: Vec::new(),
        };
        f.after_progress();
        f
    }

    pub fn is_over(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// Total bytes of a message plan.
    pub fn planned(&self) -> Option<u64> {
        match &self.plan {
            Plan::Messages(m) => Some(m.iter().sum()),
            Plan::Stream { .. } => None,
        }
    }

    fn window(&self) -> u64 {
        match self.plan {
            Plan::Messages(_) => u64::MAX,
            Plan::Stream { window } => window,
        }
    }

    fn wants_write(&self) -> bool {
        self.state == State::Running
            && self.writing
            && self.sent < self.limit
            && self.sent - self.received < self.window()
    }

    fn wants_read(&self) -> bool {
        !self.is_over() && self.reading
    }

    fn fail(&mut self, msg: String) {
        if !self.is_over() {
            self.error = Some(msg);
            self.state = State::Failed;
            self.stream = None;
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.stream = None;
    }

    /// Moves to the next message when the current one is echoed, and to the end when all are.
    fn after_progress(&mut self) {
        if self.state != State::Running || !matches!(self.plan, Plan::Messages(_)) {
            return;
        }
        while self.received == self.limit {
            match self.messages.pop_front() {
                Some(n) => self.limit += n,
                None => {
                    let s = self.stream.as_ref().expect("running flows have a stream");
                    if let Err(e) = s.shutdown(Shutdown::Write) {
                        self.fail(format!("client {}: shutdown(write): {e}", self.id));
                    } else {
                        self.state = State::AwaitEof;
                    }
                    return;
                }
            }
        }
    }

    fn on_writable(&mut self) {
        let room = (self.limit - self.sent).min(self.window() - (self.sent - self.received));
        let n = self.rng.log_uniform(1, IO_MAX as u64).min(room) as usize;
        if n == 0 {
            return;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(n, 0);
        self.pat.fill(self.sent, &mut buf);
        let r = self.stream.as_mut().expect("open").write(&buf);
        self.scratch = buf;
        match r {
            Ok(k) => {
                self.sent += k as u64;
                self.last_write = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => self.fail(format!(
                "client {}: write failed after {} bytes sent, {} echoed: {e}",
                self.id, self.sent, self.received
            )),
        }
    }

    fn on_readable(&mut self) {
        let n = self.rng.log_uniform(1, IO_MAX as u64) as usize;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(n, 0);
        let r = self.stream.as_mut().expect("open").read(&mut buf);
        match r {
            Ok(0) => self.on_eof(),
            Ok(k) => {
                let got = &buf[..k];
                let in_sent = ((self.sent - self.received) as usize).min(k);
                if let Err(e) = self.pat.check(self.received, &got[..in_sent]) {
                    self.scratch = buf;
                    return self.fail(e);
                }
                if in_sent < k {
                    let extra = self.pat.check(self.sent, &got[in_sent..]).err();
                    let msg = format!(
                        "client {}: received {} byte(s) more than it sent ({} sent); {}",
                        self.id,
                        k - in_sent,
                        self.sent,
                        extra.unwrap_or_else(|| "they continue our own stream".into())
                    );
                    self.scratch = buf;
                    return self.fail(msg);
                }
                self.received += k as u64;
                self.after_progress();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => self.fail(format!(
                "client {}: read failed after {} bytes sent, {} echoed: {e}",
                self.id, self.sent, self.received
            )),
        }
        self.scratch = buf;
    }

    fn on_eof(&mut self) {
        self.eof = true;
        match (&self.plan, self.state) {
            (Plan::Messages(_), State::AwaitEof) => self.finish(),
            (Plan::Messages(_), _) => self.fail(format!(
                "client {}: the server ended the stream early: {} of {} bytes echoed ({} sent)",
                self.id,
                self.received,
                self.planned().unwrap_or(0),
                self.sent
            )),
            (Plan::Stream { .. }, _) => self.finish(),
        }
    }
}

/// A set of flows driven together by one thread.
#[derive(Default)]
pub struct Swarm {
    pub flows: Vec<Flow>,
}

impl Swarm {
    pub fn new() -> Swarm {
        Swarm::default()
    }

    pub fn push(&mut self, f: Flow) {
        self.flows.push(f);
    }

    /// One round: wait up to `wait` for readiness, then do one read and/or one write on
    /// every ready flow. Returns how many flows were ready.
    pub fn step(&mut self, wait: Duration) -> usize {
        let mut idx = Vec::with_capacity(self.flows.len());
        let mut fds = Vec::with_capacity(self.flows.len());
        for (i, f) in self.flows.iter().enumerate() {
            let Some(s) = f.stream.as_ref() else { continue };
            let mut ev = PollFlags::empty();
            if f.wants_read() {
                ev |= PollFlags::IN;
            }
            if f.wants_write() {
                ev |= PollFlags::OUT;
            }
            if ev.is_empty() {
                continue;
            }
            idx.push(i);
            fds.push(PollFd::new(s, ev));
        }
        if fds.is_empty() {
            std::thread::sleep(wait.min(Duration::from_millis(5)));
            return 0;
        }
        let ts = Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: wait.subsec_nanos() as _,
        };
        match poll(&mut fds, Some(&ts)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return 0,
            Err(e) => panic!("poll: {e}"),
        }
        let ready: Vec<(usize, PollFlags)> = idx
            .iter()
            .zip(&fds)
            .filter(|(_, p)| !p.revents().is_empty())
            .map(|(&i, p)| (i, p.revents()))
            .collect();
        drop(fds);
        for &(i, ev) in &ready {
            let f = &mut self.flows[i];
            if ev.intersects(PollFlags::IN | PollFlags::ERR | PollFlags::HUP) && f.wants_read() {
                f.on_readable();
            }
            if ev.intersects(PollFlags::OUT | PollFlags::ERR) && f.wants_write() {
                f.on_writable();
            }
        }
        ready.len()
    }

    /// Steps until `done` holds; panics with a summary if `deadline` passes first.
    pub fn run_until(
        &mut self,
        deadline: Instant,
        what: &str,
        mut done: impl FnMut(&Swarm) -> bool,
    ) {
        while !done(self) {
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}: {}", self.summary());
            }
            self.step(Duration::from_millis(20));
        }
    }

    /// Steps until every flow is over.
    pub fn run_to_end(&mut self, deadline: Instant) {
        self.run_until(deadline, "every client to finish", |s| {
            s.flows.iter().all(Flow::is_over)
        });
    }

    pub fn failures(&self) -> Vec<&str> {
        self.flows
            .iter()
            .filter_map(|f| f.error.as_deref())
            .collect()
    }

    /// Panics listing the first failures, if any flow failed.
    pub fn assert_no_failures(&self) {
        let fails = self.failures();
        assert!(
            fails.is_empty(),
            "{} of {} clients failed; first ones:\n{}",
            fails.len(),
            self.flows.len(),
            fails
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// A short account of where the flows are, for timeout messages.
    pub fn summary(&self) -> String {
        let count = |s: State| self.flows.iter().filter(|f| f.state == s).count();
        let stuck: Vec<String> = self
            .flows
            .iter()
            .filter(|f| !f.is_over())
            .take(5)
            .map(|f| {
                format!(
                    "client {} {:?}: sent {} echoed {} (limit {})",
                    f.id, f.state, f.sent, f.received, f.limit
                )
            })
            .collect();
        format!(
            "{} flows: {} running, {} awaiting end-of-stream, {} done, {} failed; e.g. {}; \
             first failures: {:?}",
            self.flows.len(),
            count(State::Running),
            count(State::AwaitEof),
            count(State::Done),
            count(State::Failed),
            stuck.join("; "),
            self.failures().into_iter().take(3).collect::<Vec<_>>()
        )
    }
}
