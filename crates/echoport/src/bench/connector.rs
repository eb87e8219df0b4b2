//! Opening the connections: one thread connects (paced by `--connect-rate`, bound to the
//! `--source` addresses in turn) and hands each connected socket to its worker, so a slow
//! connect never stalls a worker's event loop.
//!
//! With churn (`--messages-per-conn`, `--reconnect`) it stays for the whole run: workers ask
//! for a new connection in place of one they closed (or the server closed), and it answers
//! each request with a connection or a failure. Under `--reconnect` a failed reconnect is
//! retried (10 ms, doubling to 1 s) until `--timeout` has passed since the first try, so a
//! server restarting in place is waited for. Every connect is timed; those begun in the
//! measured window make the connect-time histogram and the connects/s figure.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use std::io::Write;

use echoport_core::Waker;
use echoport_core::proxy::{Cidr, encode_v1, encode_v2};
use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::args::ProxyVersion;
use super::tally::new_histogram;
use super::worker::{Delivery, Incoming};

/// A worker's request for a connection in place of one that ended.
#[derive(Copy, Clone, Debug)]
pub struct Request {
    /// The connection's number (its worker is `gid % threads`).
    pub gid: u32,
    /// Its next message's sequence number (content keys never repeat).
    pub next_seq: u64,
}

/// How the run churns connections.
#[derive(Copy, Clone, Debug, Default)]
pub struct ChurnPolicy {
    /// Serve requests for new connections during the run.
    pub serve: bool,
    /// Retry failed reconnects (`--reconnect`).
    pub retry: bool,
    /// Close with a reset (SO_LINGER 0) rather than a FIN.
    pub rst: bool,
}

/// What the connector does.
pub struct Connector {
    /// Where to connect.
    pub server: SocketAddr,
    /// Source addresses to bind to in turn (empty: the kernel picks).
    pub sources: Vec<IpAddr>,
    /// Begin each connection with a PROXY header of this version naming a client from this
    /// network (None: no header).
    pub proxy: Option<(ProxyVersion, Cidr)>,
    /// Connections to open.
    pub connections: usize,
    /// Connections per second (None: as fast as possible).
    pub rate: Option<f64>,
    /// Longest wait for one connect, and how long reconnects are retried.
    pub timeout: Duration,
    /// One (channel, waker) per worker; connection `gid` goes to worker `gid % len`.
    pub targets: Vec<(Sender<Delivery>, Arc<dyn Waker>)>,
    /// Requests for new connections (with churn).
    pub requests: Option<Receiver<Request>>,
    /// Churn settings.
    pub churn: ChurnPolicy,
    /// Ctrl-C, or the run is over: stop connecting.
    pub stop: Arc<AtomicBool>,
    /// The run is over (set by the main thread once the workers are done).
    pub halt: Arc<AtomicBool>,
    /// The run's start.
    pub epoch: Instant,
    /// The measured window, ns since the start: connects begun in it are measured.
    pub window: (u64, Option<u64>),
    /// Connections handed to workers and not yet taken by them (see [`InHand`]).
    pub in_hand: Arc<AtomicUsize>,
}

/// A connected descriptor handed to a worker and not yet taken by it: the connector opens
/// the next only while fewer than [`super::descriptors::IN_HAND`] are out, so a client whose
/// workers hold their connections as direct descriptors never has more than that many plain
/// ones open. Dropped once the worker has the stream.
pub struct InHand(Arc<AtomicUsize>);

impl InHand {
    fn new(count: &Arc<AtomicUsize>) -> InHand {
        count.fetch_add(1, Ordering::AcqRel);
        InHand(count.clone())
    }
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How connecting went.
#[derive(Clone, Debug)]
pub struct ConnectReport {
    /// Connections opened (reconnects included).
    pub established: u64,
    /// Connections that could not be opened (after their retries).
    pub failed: u64,
    /// Failures by error message.
    pub errors: BTreeMap<String, u64>,
    /// Connect attempts that failed and were retried (`--reconnect`).
    pub retries: u64,
    /// Connects begun in the measured window that succeeded.
    pub in_window: u64,
    /// Their connect times, ns.
    pub hist: Histogram<u64>,
}

impl Default for ConnectReport {
    fn default() -> Self {
        ConnectReport {
            established: 0,
            failed: 0,
            errors: BTreeMap::new(),
            retries: 0,
            in_window: 0,
            hist: new_histogram(),
        }
    }
}

/// A reconnect waiting to be tried again.
struct Retry {
    req: Request,
    first: Instant,
    at: Instant,
    backoff: Duration,
}

impl Connector {
    /// Opens every connection, then serves requests until the run is over; then wakes every
    /// worker, whose channel is now disconnected.
    pub fn run(mut self) -> ConnectReport {
        let mut report = ConnectReport::default();
        let mut next_at = self.epoch;
        for gid in 0..self.connections {
            if self.over() {
                break;
            }
            if let Some(rate) = self.rate {
                let due = self.epoch + Duration::from_secs_f64(gid as f64 / rate);
                sleep_until(due);
                next_at = due;
            }
            let req = Request {
                gid: gid as u32,
                next_seq: 0,
            };
            if let Err(e) = self.open(req, &mut report) {
                self.give_up(req, e, &mut report);
            }
        }
        if let Some(rx) = self.requests.take() {
            self.serve(&rx, next_at, &mut report);
        }
        let wakers: Vec<_> = self.targets.iter().map(|(_, w)| w.clone()).collect();
        drop(self.targets);
        for w in wakers {
            w.wake();
        }
        report
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.halt.load(Ordering::Acquire)
    }

    /// Answers requests (and retries) until the run is over or every worker is gone.
    fn serve(&self, rx: &Receiver<Request>, mut next_at: Instant, report: &mut ConnectReport) {
        let mut retries: VecDeque<Retry> = VecDeque::new();
        while !self.over() {
            let now = Instant::now();
            if retries.front().is_some_and(|r| r.at <= now) {
                let r = retries.pop_front().expect("front exists");
                self.pace(&mut next_at);
                self.attempt(r.req, r.first, r.backoff, &mut retries, report);
                continue;
            }
            let wait = retries
                .front()
                .map_or(Duration::from_millis(20), |r| {
                    r.at.saturating_duration_since(now)
                })
                .min(Duration::from_millis(20));
            match rx.recv_timeout(wait) {
                Ok(req) => {
                    self.pace(&mut next_at);
                    let first = Instant::now();
                    self.attempt(req, first, Duration::from_millis(10), &mut retries, report);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Waits for the connect rate's next slot.
    fn pace(&self, next_at: &mut Instant) {
        if let Some(rate) = self.rate {
            *next_at = (*next_at + Duration::from_secs_f64(1.0 / rate)).max(Instant::now());
            sleep_until(*next_at);
        }
    }

    fn attempt(
        &self,
        req: Request,
        first: Instant,
        backoff: Duration,
        retries: &mut VecDeque<Retry>,
        report: &mut ConnectReport,
    ) {
        let Err(e) = self.open(req, report) else {
            return;
        };
        if self.churn.retry && first.elapsed() < self.timeout {
            report.retries += 1;
            let r = Retry {
                req,
                first,
                at: Instant::now() + backoff,
                backoff: (backoff * 2).min(Duration::from_secs(1)),
            };
            let pos = retries
                .iter()
                .position(|o| o.at > r.at)
                .unwrap_or(retries.len());
            retries.insert(pos, r);
        } else {
            self.give_up(req, e, report);
        }
    }

    /// One connect, timed; the connection goes to its worker.
    fn open(&self, req: Request, report: &mut ConnectReport) -> Result<(), String> {
        while self.in_hand.load(Ordering::Acquire) >= super::descriptors::IN_HAND && !self.over() {
            // The workers are behind taking connections: do not pile up descriptors.
            std::thread::sleep(Duration::from_micros(200));
        }
        let gid = req.gid as usize;
        let source = (!self.sources.is_empty()).then(|| self.sources[gid % self.sources.len()]);
        let t0 = Instant::now();
        let started_ns = t0.duration_since(self.epoch).as_nanos() as u64;
        let mut stream = connect(self.server, source, self.timeout, self.churn.rst)?;
        if let Some((version, clients)) = self.proxy {
            // The n-th connection opened (reconnects included) names the n-th client.
            let header = proxy_header(version, clients, report.established, self.server);
            stream
                .write_all(&header)
                .map_err(|e| format!("writing the PROXY header: {e}"))?;
        }
        let took = t0.elapsed().as_nanos() as u64;
        let (from, to) = self.window;
        if started_ns >= from && to.is_none_or(|e| started_ns < e) {
            report.in_window += 1;
            report.hist.saturating_record(took.max(1));
        }
        let (tx, waker) = &self.targets[gid % self.targets.len()];
        let inc = Incoming {
            gid: req.gid,
            stream,
            next_seq: req.next_seq,
            started_ns,
            in_hand: Some(InHand::new(&self.in_hand)),
        };
        // Counted whether or not its worker still wants it: the server accepted it.
        report.established += 1;
        if tx.send(Delivery::Conn(inc)).is_ok() {
            waker.wake();
        }
        Ok(())
    }

    /// A connection that will not be opened: counted, and its worker told.
    fn give_up(&self, req: Request, e: String, report: &mut ConnectReport) {
        report.failed += 1;
        *report.errors.entry(e).or_default() += 1;
        let (tx, waker) = &self.targets[req.gid as usize % self.targets.len()];
        if tx.send(Delivery::Failed).is_ok() {
            waker.wake();
        }
    }
}

/// The PROXY header of the `n`-th connection: client address `n` of `clients` (wrapping
/// round), its port 1024 plus the number of wraps, so that no two connections name the same
/// client until the network's addresses times 64,512 ports are used up.
pub fn proxy_header(version: ProxyVersion, clients: Cidr, n: u64, server: SocketAddr) -> Vec<u8> {
    let wraps = n / clients.size().max(1);
    let port = 1024 + (wraps % (65536 - 1024)) as u16;
    let src = SocketAddr::new(clients.nth(n), port);
    match version {
        ProxyVersion::V1 => encode_v1(src, server).into_bytes(),
        ProxyVersion::V2 => {
            let mut out = Vec::with_capacity(52);
            encode_v2(src, server, &mut out);
            out
        }
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// One blocking connect, optionally bound to a source address first; `rst` sets SO_LINGER 0
/// so that closing it resets the connection.
fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    rst: bool,
) -> Result<TcpStream, String> {
    let s = Socket::new(
        Domain::for_address(server),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    s.set_tcp_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    if rst {
        s.set_linger(Some(Duration::ZERO))
            .map_err(|e| format!("SO_LINGER: {e}"))?;
    }
    if let Some(src) = source {
        if src.is_ipv4() {
            echoport_io::sys::set_bind_address_no_port(&s)
                .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        }
        s.bind(&SockAddr::from(SocketAddr::new(src, 0)))
            .map_err(|e| format!("bind to {src}: {e}"))?;
    }
    s.connect_timeout(&SockAddr::from(server), timeout)
        .map_err(|e| format!("connect: {e}"))?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use echoport_core::proxy::{Parsed, parse};

    #[test]
    fn every_connection_names_a_new_client_of_the_network() {
        let server: SocketAddr = "127.0.0.1:7007".parse().unwrap();
        let clients: Cidr = "198.51.100.0/24".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            seen.clear();
            for n in 0..600 {
                let h = proxy_header(version, clients, n, server);
                let Ok(Parsed::Done { header_len, header }) = parse(&h) else {
                    panic!("{version:?} {n}: {:?}", parse(&h));
                };
                assert_eq!(header_len, h.len());
                assert_eq!(header.destination, Some(server));
                let src = header.source.expect("a client");
                assert!(clients.contains(src.ip()), "{src}");
                assert_eq!(src.port(), 1024 + (n / 256) as u16);
                assert!(seen.insert(src), "{src} named twice");
            }
        }
        let one: Cidr = "192.0.2.7".parse().unwrap();
        let h = proxy_header(ProxyVersion::V1, one, 3, server);
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 127.0.0.1 1027 7007\r\n");
    }
}
