//! `echoport bench --udp`: load against a UDP echo service (`echoport serve --udp`, RFC 862).
//!
//! Each flow is a non-blocking UDP socket connected to the server; each thread waits on its
//! flows with poll(2). The load is the same as over TCP: closed loop (`--pipeline` datagrams
//! out per flow; one given up on after `--timeout` is replaced, so on a lossy path prefer the
//! open loop) or open loop (`-r`, intended times, latency from the intended time). What comes
//! back is checked byte by byte and counted by sequence number ([`flow`]): loss, duplicates,
//! reordering, late arrivals. Loss is reported, not an error (a rate-limited or overloaded
//! service drops datagrams by design); a wrong or foreign datagram is a mismatch.

mod flow;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use super::interval::{self, Recorder};
use super::params::Load;
use super::run::{Env, Running, recorder, share, thread_plan};
use super::tally::Tally;
use super::unix_now;
use super::worker::{Live, Outcome, Plan, ThreadLoad};
use flow::{Arrival, Flow};

/// Largest datagram the bench sends (the IPv4 limit).
pub const MAX_DATAGRAM: u32 = 65_507;

/// Opens every flow's socket, then starts the threads together.
pub fn start(
    env: &Env,
    load: Load,
    ivl_tx: &Option<Sender<interval::Report>>,
) -> anyhow::Result<Running> {
    let p = env.p;
    let mut flows: Vec<Vec<Flow>> = (0..p.threads).map(|_| Vec::new()).collect();
    for gid in 0..p.connections {
        let source = (!p.sources.is_empty()).then(|| p.sources[gid % p.sources.len()]);
        let sock = open(p.server, source)?;
        flows[gid % p.threads].push(Flow::new(sock, gid as u32));
    }
    let mut handles = Vec::new();
    let mut lives = Vec::new();
    let mut starts = Vec::new();
    for (t, flows) in flows.into_iter().enumerate() {
        let (start_tx, start_rx) = mpsc::channel();
        let live = Arc::new(Live::default());
        let w = UdpWorker::new(env, load, t, flows, recorder(p, t, ivl_tx), live.clone());
        let cpu = (!p.cpus.is_empty()).then(|| p.cpus[t % p.cpus.len()]);
        let h = std::thread::Builder::new()
            .name(format!("bench-udp{t}"))
            .spawn(move || w.run(start_rx, cpu))
            .context("spawning a bench thread")?;
        handles.push(h);
        lives.push(live);
        starts.push(start_tx);
    }
    let epoch = Instant::now();
    let epoch_unix_s = unix_now();
    for s in starts {
        let _ = s.send(epoch);
    }
    Ok(Running {
        handles,
        lives,
        epoch,
        epoch_unix_s,
        backend: "udp (a socket per flow, poll)".into(),
        connector: None,
    })
}

/// The host's count of UDP datagrams dropped for a full receive buffer (Linux).
pub fn rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names = rows.next()?.split_whitespace();
    let values = rows.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
}

/// Receive buffer asked for each flow (the kernel caps it at net.core.rmem_max): replies
/// wait there while the thread is busy, and a full buffer drops them.
const RCVBUF: usize = 4 << 20;

/// A non-blocking UDP socket connected to `server`, bound to `source` if given.
fn open(server: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<UdpSocket> {
    let any = match server {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let local = SocketAddr::new(source.unwrap_or(any), 0);
    let s = UdpSocket::bind(local).with_context(|| format!("binding a UDP socket to {local}"))?;
    // Best effort: a smaller buffer still works, and drops show in host_rcvbuf_errors.
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(RCVBUF);
    s.connect(server)
        .with_context(|| format!("connecting a UDP socket to {server}"))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// One thread's flows and their load.
struct UdpWorker {
    /// This thread's flows (one connected UDP socket each).
    flows: Vec<Flow>,
    /// What to send, when, and for how long.
    plan: Plan,
    /// Closed loop: datagrams in flight per flow.
    pipeline: u32,
    /// Set on Ctrl-C.
    stop: Arc<AtomicBool>,
    /// Counters for the live line.
    live: Arc<Live>,
    /// Per-interval measurements, when asked for.
    intervals: Option<Recorder>,
    /// What this thread measured.
    tally: Tally,
    /// The run's start: every time here is ns since it.
    epoch: Instant,
    /// No more datagrams are created; waiting for the last echoes.
    draining: bool,
    /// Open loop: datagrams scheduled so far, and the next flow to take one.
    k: u64,
    /// Open loop: the flow the next datagram goes to (round-robin).
    rr: usize,
    /// Measured datagrams created so far (count mode stops at the count).
    issued_measured: u64,
    /// Datagrams echoed (warm-up included), for the live line.
    done_all: u64,
    /// Their bytes.
    bytes_all: u64,
    /// The datagram being sent, filled from its key.
    out: Vec<u8>,
    /// Where a received datagram lands.
    inb: Vec<u8>,
}

impl UdpWorker {
    fn new(
        env: &Env,
        load: Load,
        t: usize,
        flows: Vec<Flow>,
        intervals: Option<Recorder>,
        live: Arc<Live>,
    ) -> UdpWorker {
        let p = env.p;
        // A datagram flow has no connection to end or reopen.
        let plan = Plan {
            messages_per_conn: None,
            reconnect: false,
            ..thread_plan(p, load, t)
        };
        debug_assert_eq!(flows.len(), share(p.connections, p.threads, t));
        let mut tally = Tally::default();
        if p.keep_samples {
            tally.samples = Some(Vec::new());
        }
        UdpWorker {
            flows,
            pipeline: match load {
                Load::Closed { pipeline } => pipeline,
                Load::Open { .. } => 0,
            },
            plan,
            stop: env.stop.clone(),
            live,
            intervals,
            tally,
            epoch: Instant::now(),
            draining: false,
            k: 0,
            rr: 0,
            issued_measured: 0,
            done_all: 0,
            bytes_all: 0,
            out: vec![0; MAX_DATAGRAM as usize],
            inb: vec![0; MAX_DATAGRAM as usize + 1],
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(mut self, start: Receiver<Instant>, cpu: Option<usize>) -> anyhow::Result<Outcome> {
        if let Some(cpu) = cpu {
            echoport_io::sys::pin_to_cpu(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
        }
        let Ok(epoch) = start.recv() else {
            return Ok(Outcome {
                tally: Tally::default(),
            });
        };
        self.epoch = epoch;
        loop {
            let now = self.now();
            if self.stop.load(Ordering::Acquire) {
                break; // interrupted: what is out is counted lost
            }
            if !self.draining {
                self.schedule(now);
            }
            for f in &mut self.flows {
                f.expire(now, self.plan.timeout_ns);
            }
            if self.draining && self.flows.iter().all(|f| f.in_flight == 0) {
                break;
            }
            if let Some(r) = &mut self.intervals {
                r.roll(now);
            }
            self.publish();
            self.wait_and_receive(now)?;
        }
        let now = self.now();
        if let Some(r) = self.intervals.take() {
            r.finish(now);
        }
        self.publish();
        Ok(Outcome { tally: self.tally })
    }

    fn publish(&self) {
        self.live.done.store(self.done_all, Ordering::Relaxed);
        self.live.bytes.store(self.bytes_all, Ordering::Relaxed);
        let errors = self.tally.errors.total();
        self.live.errors.store(errors, Ordering::Relaxed);
        self.live
            .conns
            .store(self.flows.len() as u64, Ordering::Relaxed);
    }

    /// Sends what is due: the open loop's datagrams whose time has come, or the closed
    /// loop's replacements; notices the end of sending.
    fn schedule(&mut self, now: u64) {
        match self.plan.load {
            ThreadLoad::Open {
                interval_ns,
                offset_ns,
            } => loop {
                let t = (offset_ns + self.k as f64 * interval_ns) as u64;
                if t > now || !self.may_create(t) {
                    break;
                }
                let i = self.rr % self.flows.len();
                self.rr = self.rr.wrapping_add(1);
                self.k += 1;
                self.send(i, t, now);
            },
            ThreadLoad::Closed { .. } => {
                for i in 0..self.flows.len() {
                    while self.flows[i].in_flight < self.pipeline
                        && self.flows[i].retry_at <= now
                        && self.may_create(now)
                    {
                        self.send(i, now, now);
                    }
                }
            }
        }
        let ended = self.plan.end_ns.is_some_and(|e| now >= e)
            || self.plan.count.is_some_and(|c| self.issued_measured >= c);
        if ended {
            self.draining = true;
        }
    }

    /// Whether a datagram intended at `t` belongs to the run.
    fn may_create(&self, t: u64) -> bool {
        let measured = t >= self.plan.warmup_ns;
        self.plan.end_ns.is_none_or(|e| t < e)
            && !(measured && self.plan.count.is_some_and(|c| self.issued_measured >= c))
    }

    /// Sends flow `i`'s next datagram, intended at `t`.
    fn send(&mut self, i: usize, t: u64, now: u64) {
        let f = &mut self.flows[i];
        let key = f.next_key();
        let len = self.plan.size.pick(key) as usize;
        super::pattern::fill(key, 0, &mut self.out[..len]);
        let measured = t >= self.plan.warmup_ns;
        match f.sock.send(&self.out[..len]) {
            Ok(_) => {
                f.sent(t, measured);
                if measured {
                    self.issued_measured += 1;
                    self.tally.sent += 1;
                    self.tally.udp.sent += 1;
                    let lag = now.saturating_sub(t);
                    self.tally.max_send_lag_ns = self.tally.max_send_lag_ns.max(lag);
                }
            }
            Err(e) => {
                // Full socket buffer, or ICMP port unreachable from an earlier datagram: this
                // one is not sent; the flow pauses for a millisecond.
                f.retry_at = now + 1_000_000;
                if e.kind() == ErrorKind::ConnectionRefused {
                    self.tally.udp.refused += 1;
                    self.tally.errors.io_error += 1;
                } else {
                    self.tally.udp.send_blocked += 1;
                }
            }
        }
    }

    fn next_wakeup(&self, now: u64) -> u64 {
        let mut at = now + 100_000_000;
        if let Some(r) = &self.intervals {
            at = at.min(r.next_at());
        }
        for f in &self.flows {
            if let Some(x) = f.next_expiry(self.plan.timeout_ns) {
                at = at.min(x + 1);
            }
            if f.retry_at > now && f.in_flight < self.pipeline {
                at = at.min(f.retry_at);
            }
        }
        if !self.draining {
            if let Some(e) = self.plan.end_ns {
                at = at.min(e);
            }
            if let ThreadLoad::Open {
                interval_ns,
                offset_ns,
            } = self.plan.load
            {
                let due = (offset_ns + self.k as f64 * interval_ns) as u64;
                at = at.min(due.max(now + self.plan.tick_ns));
            }
        }
        at
    }

    /// Waits on every flow until one is readable or something falls due; takes what came.
    fn wait_and_receive(&mut self, before: u64) -> anyhow::Result<()> {
        let at = self.next_wakeup(before);
        let mut wait = Duration::from_nanos(at.saturating_sub(before));
        if !self.draining && wait.as_nanos() as u64 <= self.plan.spin_ns {
            wait = Duration::ZERO;
        }
        let ts = Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        let mut ready = Vec::new();
        {
            let mut fds: Vec<PollFd> = self
                .flows
                .iter()
                .map(|f| PollFd::new(&f.sock, PollFlags::IN))
                .collect();
            match poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => bail!("poll: {e}"),
            }
            ready.extend(
                fds.iter()
                    .enumerate()
                    .filter(|(_, p)| !p.revents().is_empty())
                    .map(|(i, _)| i),
            );
        }
        let now = self.now();
        let late = now.saturating_sub(before + wait.as_nanos() as u64);
        self.tally.max_late_ns = self.tally.max_late_ns.max(late);
        for i in ready {
            self.receive_all(i, now);
        }
        Ok(())
    }

    /// Takes every datagram waiting on flow `i`.
    fn receive_all(&mut self, i: usize, now: u64) {
        loop {
            let n = match self.flows[i].sock.recv(&mut self.inb) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    self.tally.udp.refused += 1;
                    self.tally.errors.io_error += 1;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP receive failed");
                    self.tally.errors.io_error += 1;
                    return;
                }
            };
            let data = &self.inb[..n];
            let size = self.plan.size;
            match self.flows[i].receive(data, now, &size, &mut self.tally.udp) {
                Arrival::Timed {
                    latency_ns,
                    measured,
                    len,
                } => {
                    self.done_all += 1;
                    self.bytes_all += len as u64;
                    if measured {
                        self.tally.record(now, latency_ns, len as u64);
                        if let Some(r) = &mut self.intervals {
                            r.record(now, latency_ns, len as u64);
                        }
                    }
                }
                Arrival::Untimed => {}
                Arrival::Bad => self.tally.errors.mismatch += 1,
            }
        }
    }
}
