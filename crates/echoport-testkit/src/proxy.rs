//! A fault-injecting TCP proxy for loopback tests (there is no `tc netem` here).
//!
//! It sits between a client and a server and, per connection, delays, slices, throttles,
//! truncates, resets or slowly closes the byte stream. Each connection gets two pump threads
//! (client→server and server→client) that read a piece, wait as the faults say, and write it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// What to do to the streams that pass through.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Delay added before forwarding each piece.
    pub latency: Duration,
    /// Extra random delay, up to this much, per piece.
    pub jitter: Duration,
    /// Forward at most this many bytes per write (1: byte by byte).
    pub slice: Option<usize>,
    /// Pace each direction to this many bytes per second.
    pub bandwidth: Option<u64>,
    /// After this many client→server bytes, reset both connections (RST, not FIN).
    pub reset_after: Option<u64>,
    /// Forward only this many server→client bytes, then close both sides cleanly.
    pub truncate_after: Option<u64>,
    /// When the client shuts down its sending side, wait this long before passing it on.
    pub slow_close: Option<Duration>,
}

/// A running proxy. Dropping it stops accepting; connections in flight finish on their own.
pub struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (an ephemeral port) in front of `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        accepted2.fetch_add(1, Ordering::Relaxed);
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        let faults = faults.clone();
                        thread::spawn(move || {
                            let _ = relay(client, upstream, faults, seed);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Proxy {
            addr,
            stop,
            accepted,
        })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(client: TcpStream, upstream: SocketAddr, f: Faults, seed: u64) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let reset = Arc::new(AtomicBool::new(false));
    let up = {
        let (from, to, f, reset) = (
            client.try_clone()?,
            server.try_clone()?,
            f.clone(),
            reset.clone(),
        );
        thread::spawn(move || pump(from, to, &f, Direction::Up, seed, &reset))
    };
    let down = pump(server, client, &f, Direction::Down, seed ^ 0x5555, &reset);
    let _ = up.join();
    down
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    f: &Faults,
    dir: Direction,
    mut seed: u64,
    reset: &AtomicBool,
) -> io::Result<()> {
    let mut buf = vec![0u8; f.slice.unwrap_or(16 * 1024).max(1)];
    let mut moved: u64 = 0;
    let started = Instant::now();
    let limit = match dir {
        Direction::Up => f.reset_after,
        Direction::Down => f.truncate_after,
    };
    loop {
        let want = match limit {
            Some(l) => buf.len().min((l - moved) as usize),
            None => buf.len(),
        };
        if want == 0 {
            break;
        }
        let n = match from.read(&mut buf[..want]) {
            // The other pump reset the connection: leave, sending nothing more.
            _ if reset.load(Ordering::Relaxed) => return Ok(()),
            Ok(0) => {
                if dir == Direction::Up {
                    if let Some(d) = f.slow_close {
                        thread::sleep(d);
                    }
                }
                let _ = to.shutdown(Shutdown::Write);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                // Pass a reset on as a reset.
                let _ = socket2::SockRef::from(&to).set_linger(Some(Duration::ZERO));
                let _ = to.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let jitter = if f.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(seed % f.jitter.as_nanos() as u64)
        };
        let delay = f.latency + jitter;
        if !delay.is_zero() {
            thread::sleep(delay);
        }
        moved += n as u64;
        if let Some(bps) = f.bandwidth {
            let due = Duration::from_secs_f64(moved as f64 / bps as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                thread::sleep(wait);
            }
        }
        to.write_all(&buf[..n])?;
        if limit == Some(moved) {
            break;
        }
    }
    match dir {
        Direction::Up => {
            // Reset both sides mid-stream: with a zero linger, the last close of each socket
            // sends RST; shutting down the read sides wakes the other pump so it lets go too.
            reset.store(true, Ordering::Relaxed);
            for s in [&from, &to] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        Direction::Down => {
            // Truncate: a clean end of stream towards the client, and close the server side.
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Both);
        }
    }
    Ok(())
}
