//! UDP echo (RFC 862), off unless `--udp`: one datagram in, the same datagram back to its
//! sender, under the guards of [`echoport_core::udp`].
//!
//! Datagrams need no connection state and no ordering, so this is a small loop per listen
//! address on its own thread, the same on every platform and beside any TCP backend: receive
//! (learning the true length, so a truncated datagram is dropped rather than cut), ask the
//! guard, reply without blocking. A reply that would block is dropped, never queued.
//! The rates are one budget for the process ([`UdpBudget`]): every loop draws on it, so
//! more addresses never mean more replies, and a source has one allowance for all of them.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use echoport_core::live::LiveUdpSlot;
use echoport_core::udp::{Refusal, UdpBudget, UdpGuard, UdpLimits, UdpStats};
use socket2::{Domain, Protocol, Socket, Type};

/// Largest datagram payload over IPv4 (65,535 - 8 - 20); IPv6 allows 20 bytes more.
const MAX_DATAGRAM: usize = 65_527;

/// How often a loop publishes its counters to the metrics (when it has a slot).
const PUBLISH_EVERY: Duration = echoport_core::worker::TICK;

/// Binds a UDP socket on each address.
pub fn bind(addrs: &[SocketAddr]) -> anyhow::Result<Vec<UdpSocket>> {
    let mut socks = Vec::new();
    for &addr in addrs {
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.bind(&addr.into())
            .with_context(|| format!("cannot listen for UDP on {addr}"))?;
        socks.push(sock.into());
    }
    Ok(socks)
}

/// Starts an echo loop on each bound socket, all under one reply budget (per source and in
/// total, for the whole process); `live` gets one slot per socket, in order.
pub fn spawn(
    socks: Vec<UdpSocket>,
    limits: UdpLimits,
    stop: Arc<AtomicBool>,
    live: Option<&Arc<echoport_core::live::LiveStats>>,
) -> anyhow::Result<Vec<JoinHandle<UdpStats>>> {
    let budget = Arc::new(UdpBudget::new(limits, Instant::now()));
    let mut own_ports = Vec::with_capacity(socks.len());
    for sock in &socks {
        own_ports.push(sock.local_addr()?.port());
    }
    own_ports.sort_unstable();
    own_ports.dedup();
    let mut handles = Vec::new();
    for (i, sock) in socks.into_iter().enumerate() {
        let addr = sock.local_addr()?;
        // The loop looks at the stop flag at least this often.
        sock.set_read_timeout(Some(Duration::from_millis(250)))?;
        let stop = stop.clone();
        let slot = live.map(|l| l.udp_slot(i));
        let guard = UdpGuard::new(&own_ports, budget.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("echoport-udp-{addr}"))
                .spawn(move || serve(sock, guard, &stop, slot))?,
        );
        tracing::info!(addr = %addr, "UDP echo on {addr}");
    }
    Ok(handles)
}

fn serve(
    sock: UdpSocket,
    mut guard: UdpGuard,
    stop: &AtomicBool,
    live: Option<LiveUdpSlot>,
) -> UdpStats {
    // One byte more than the largest datagram, so a fit is never mistaken for a cut.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut log = RefusalLog::default();
    let mut published = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(slot) = &live {
            if published.elapsed() >= PUBLISH_EVERY {
                slot.publish(&guard.stats);
                published = Instant::now();
            }
        }
        let (n, src) = match recv(&sock, &mut buf) {
            Ok(v) => v,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) {
                    tracing::debug!(error = %e, "UDP receive failed");
                }
                log.flush(Instant::now());
                continue;
            }
        };
        let now = Instant::now();
        match guard.check(src, n > buf.len(), now) {
            Ok(()) => match send_now(&sock, &buf[..n], src) {
                Ok(_) => guard.stats.echoed += 1,
                Err(_) => guard.stats.dropped += 1,
            },
            Err(reason) => log.note(reason, src, now),
        }
        log.flush(now);
    }
    if let Some(slot) = &live {
        slot.publish(&guard.stats);
    }
    guard.stats
}

#[cfg(target_os = "linux")]
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    echoport_io::sys::recv_from_full(sock, buf)
}

#[cfg(not(target_os = "linux"))]
fn recv(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    // The buffer is larger than any datagram, so nothing is ever cut here.
    sock.recv_from(buf)
}

/// Sends without ever blocking: a reply that does not fit now is dropped, not queued.
#[cfg(unix)]
fn send_now(sock: &UdpSocket, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    socket2::SockRef::from(sock).send_to_with_flags(data, &to.into(), libc::MSG_DONTWAIT)
}

#[cfg(not(unix))]
fn send_now(sock: &UdpSocket, data: &[u8], to: SocketAddr) -> std::io::Result<usize> {
    sock.send_to(data, to)
}

/// Logs refusals at most once a second, as counts, so a flood cannot flood the log.
#[derive(Default)]
struct RefusalLog {
    count: u64,
    last: Option<(Refusal, SocketAddr)>,
    since: Option<Instant>,
}

impl RefusalLog {
    fn note(&mut self, r: Refusal, src: SocketAddr, now: Instant) {
        self.count += 1;
        self.last = Some((r, src));
        self.since.get_or_insert(now);
    }

    fn flush(&mut self, now: Instant) {
        let Some(since) = self.since else { return };
        if now.duration_since(since) < Duration::from_secs(1) {
            return;
        }
        if let Some((r, src)) = self.last {
            tracing::warn!(count = self.count, last_source = %src, last_reason = %r, "UDP datagrams not echoed");
        }
        *self = RefusalLog::default();
    }
}
