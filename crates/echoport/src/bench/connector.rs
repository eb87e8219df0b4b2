//! Opening the connections: one thread connects (paced by `--connect-rate`, bound to the
//! `--source` addresses in turn) and hands each connected socket to its worker, so a slow
//! connect never stalls a worker's event loop.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use echoport_core::Waker;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::worker::Incoming;

/// What the connector does.
pub struct Connector {
    /// Where to connect.
    pub server: SocketAddr,
    /// Source addresses to bind to in turn (empty: the kernel picks).
    pub sources: Vec<IpAddr>,
    /// Connections to open.
    pub connections: usize,
    /// Connections per second (None: as fast as possible).
    pub rate: Option<f64>,
    /// Longest wait for one connect.
    pub timeout: Duration,
    /// One (channel, waker) per worker; connection `gid` goes to worker `gid % len`.
    pub targets: Vec<(Sender<Incoming>, Arc<dyn Waker>)>,
    /// Ctrl-C, or the run is over: stop connecting.
    pub stop: Arc<AtomicBool>,
    /// The run is over (set by the main thread once the workers are done).
    pub halt: Arc<AtomicBool>,
    /// The run's start.
    pub epoch: Instant,
}

/// How connecting went.
#[derive(Clone, Debug, Default)]
pub struct ConnectReport {
    /// Connections opened and handed to a worker.
    pub established: u64,
    /// Connections that could not be opened.
    pub failed: u64,
    /// Failures by error message.
    pub errors: BTreeMap<String, u64>,
}

impl Connector {
    /// Opens every connection (or until stopped); then wakes every worker, whose channel is
    /// now disconnected.
    pub fn run(self) -> ConnectReport {
        let mut report = ConnectReport::default();
        let n = self.targets.len();
        for gid in 0..self.connections {
            if self.stop.load(Ordering::Acquire) || self.halt.load(Ordering::Acquire) {
                break;
            }
            if let Some(rate) = self.rate {
                let due = self.epoch + Duration::from_secs_f64(gid as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let source = (!self.sources.is_empty()).then(|| self.sources[gid % self.sources.len()]);
            match connect(self.server, source, self.timeout) {
                Ok(stream) => {
                    let (tx, waker) = &self.targets[gid % n];
                    if tx
                        .send(Incoming {
                            gid: gid as u32,
                            stream,
                        })
                        .is_ok()
                    {
                        report.established += 1;
                        waker.wake();
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    *report.errors.entry(e).or_default() += 1;
                }
            }
        }
        let wakers: Vec<_> = self.targets.iter().map(|(_, w)| w.clone()).collect();
        drop(self.targets);
        for w in wakers {
            w.wake();
        }
        report
    }
}

/// One blocking connect, optionally bound to a source address first.
fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let s = Socket::new(
        Domain::for_address(server),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    s.set_tcp_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
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
