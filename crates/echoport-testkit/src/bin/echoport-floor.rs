//! The kernel-only cost of one loopback TCP echo on this machine: the floor no server beats.
//!
//! Usage: `echoport-floor [SIZE] [SECONDS]` (defaults 64 and 2).
//!
//! One thread owns both ends of a loopback connection and does, back to back, what a client
//! and an echo server would: client send, server receive, server send, client receive. There
//! are no wake-ups, no context switches and no event loop, only the four system calls and the
//! TCP stack behind them. Prints CPU µs per echo for the whole echo and for the server's half
//! (its receive and send): the process's user + system time (`getrusage`) for the whole
//! echo, and the wall time spent in the server's two calls for its half (the thread
//! never sleeps, so wall time there is CPU time).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// User + system CPU time of this process so far (`getrusage`, microseconds; zero where
/// there is none).
fn cpu_time() -> Duration {
    #[cfg(unix)]
    if let Ok((user, system)) = echoport_io::sys::process_cpu_time() {
        return user + system;
    }
    Duration::ZERO
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size: usize = args.first().map_or(64, |s| s.parse().expect("SIZE"));
    let secs: f64 = args.get(1).map_or(2.0, |s| s.parse().expect("SECONDS"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    for s in [&client, &server] {
        s.set_nodelay(true).unwrap();
    }
    let msg = vec![0x42u8; size];
    let mut buf = vec![0u8; size];
    let one = |client: &mut TcpStream, server: &mut TcpStream, buf: &mut [u8]| {
        client.write_all(&msg).unwrap();
        server.read_exact(buf).unwrap();
        server.write_all(buf).unwrap();
        client.read_exact(buf).unwrap();
    };
    for _ in 0..10_000 {
        one(&mut client, &mut server, &mut buf);
    }
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            one(&mut client, &mut server, &mut buf);
        }
        n += 1000;
    }
    let cpu = cpu_time() - c0;
    let total = cpu.as_secs_f64() * 1e6 / n as f64;
    // The server's half: time its receive+send alone on the same connection.
    let mut server_ns = 0u128;
    let reps = (n / 10).max(1000);
    for _ in 0..reps {
        client.write_all(&msg).unwrap();
        let t = Instant::now();
        server.read_exact(&mut buf).unwrap();
        server.write_all(&buf).unwrap();
        server_ns += t.elapsed().as_nanos();
        client.read_exact(&mut buf).unwrap();
    }
    let server = server_ns as f64 / 1000.0 / reps as f64;
    println!(
        "{{\"size\": {size}, \"echoes\": {n}, \"cpu_us_per_echo\": {total:.3}, \"server_side_us_per_echo\": {server:.3}}}"
    );
}
