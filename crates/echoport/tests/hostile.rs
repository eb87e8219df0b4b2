//! Storms and stops: a connect-and-close storm from several source addresses, and a graceful
//! stop with 1,000 connections that all have echo owed.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::Server;
use rustix::process::Signal;

/// Connects from `src` (port chosen at connect, with `IP_BIND_ADDRESS_NO_PORT`: a plain
/// bind to port 0 searches the whole port range past every TIME_WAIT socket on the host,
/// tens of milliseconds a connection after a suite's worth of tests, which starved the storm).
fn connect_from(src: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    echoport_io::sys::set_bind_address_no_port(&s)?;
    s.bind(&format!("{src}:0").parse::<SocketAddr>().unwrap().into())?;
    s.connect(&to.into())?;
    Ok(s.into())
}

/// Connections the storm makes before it stops (a third each of echo-and-close, send-and-reset
/// and connect-and-leave, from four source addresses), and the most time it may take.
const STORM: u64 = 2000;
const STORM_LIMIT: Duration = Duration::from_secs(60);

fn a_connect_and_close_storm_leaves_no_trace_and_never_stalls_accept(backend: &str) {
    let server = Server::on(backend, &["--threads", "2"]);
    let addr = server.addr();
    let (fds_before, rss_before) = (server.settled_fd_count(), server.rss_kib());
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let stormers: Vec<_> = (2..6)
        .map(|i| {
            let (stop, cycles) = (stop.clone(), cycles.clone());
            thread::spawn(move || {
                let src = format!("127.0.0.{i}");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && n < STORM / 4 {
                    let Ok(mut s) = connect_from(&src, addr) else {
                        continue;
                    };
                    match n % 3 {
                        // Echo one message, then close politely.
                        0 => {
                            let _ = s.write_all(b"storm");
                            let mut b = [0u8; 5];
                            let _ = s.read_exact(&mut b);
                        }
                        // Send and reset at once.
                        1 => {
                            let _ = s.write_all(b"gone");
                            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        }
                        // Connect and leave.
                        _ => {}
                    }
                    n += 1;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Meanwhile a probe keeps echoing, for as long as the storm lasts (however slow the
    // machine makes it) and at least 3 s; no accept stall may delay it.
    let started = Instant::now();
    let (mut worst, mut probes) = (Duration::ZERO, 0u32);
    while started.elapsed() < STORM_LIMIT
        && (started.elapsed() < Duration::from_secs(3) || stormers.iter().any(|s| !s.is_finished()))
    {
        let t = Instant::now();
        let mut p = TcpStream::connect(addr).unwrap();
        p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        p.write_all(b"probe").unwrap();
        let mut b = [0u8; 5];
        p.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"probe");
        worst = worst.max(t.elapsed());
        probes += 1;
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for s in stormers {
        s.join().unwrap();
    }
    let total = cycles.load(Ordering::Relaxed);
    assert_eq!(
        total, STORM,
        "the storm did not finish within {STORM_LIMIT:?} ({total} connections)"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a probe waited {worst:?} during the storm ({probes} probes)"
    );
    let fds_after = server.fds_back_to(fds_before, Duration::from_secs(10));
    let rss_after = server.rss_kib();
    assert_eq!(
        fds_after, fds_before,
        "descriptors leaked after {total} connections"
    );
    assert!(
        rss_after < rss_before + 4096,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    let stats = server.stop();
    assert_eq!(
        stats.stat("accepted"),
        stats.stat("closed"),
        "{}",
        stats.log
    );
}

fn graceful_stop_with_a_thousand_connections_echoes_everything_owed(backend: &str) {
    let mut server = Server::on(backend, &["--threads", "2", "--shutdown-timeout", "10"]);
    let addr = server.addr();
    const CONNS: usize = 1000;
    const LEN: usize = 4000;
    let msg = |i: usize| -> Vec<u8> { (0..LEN).map(|j| (i * 7 + j) as u8).collect() };
    let mut conns: Vec<TcpStream> = (0..CONNS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(&msg(i)).unwrap();
    }
    // Every connection has echo owed (nobody has read yet) when the stop comes.
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    server.signal(Signal::TERM);
    let readers: Vec<_> = conns
        .chunks_mut(CONNS / 8)
        .map(|chunk| {
            chunk
                .iter_mut()
                .map(|c| c.try_clone().unwrap())
                .collect::<Vec<_>>()
        })
        .enumerate()
        .map(|(k, chunk)| {
            thread::spawn(move || {
                for (j, mut c) in chunk.into_iter().enumerate() {
                    let i = k * (CONNS / 8) + j;
                    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                    let mut got = Vec::new();
                    match c.read_to_end(&mut got) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                            panic!("connection {i} reset")
                        }
                        Err(e) => panic!("connection {i}: {e}"),
                    }
                    assert_eq!(got, msg(i), "connection {i}: echo differs or is cut short");
                }
            })
        })
        .collect();
    for r in readers {
        r.join().expect("a connection lost its echo");
    }
    drop(conns);
    let stats = server.finish(t0, Duration::from_secs(12));
    stats.assert_clean();
    assert_eq!(
        stats.stat("bytes_echoed"),
        (CONNS * LEN) as u64,
        "{}",
        stats.log
    );
}

fn the_per_address_cap_holds_for_one_address_and_spares_the_others(backend: &str) {
    let server = Server::on(
        backend,
        &["--threads", "2", "--max-connections-per-ip", "3"],
    );
    let echo = |s: &mut TcpStream| -> bool {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 2];
        s.write_all(b"hi").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"hi"
    };
    let mut first: Vec<TcpStream> = (0..3)
        .map(|_| connect_from("127.0.0.2", server.addr()).unwrap())
        .collect();
    assert!(
        first.iter_mut().all(echo),
        "the first three from 127.0.0.2 are served"
    );
    let mut fourth = connect_from("127.0.0.2", server.addr()).unwrap();
    assert!(!echo(&mut fourth), "a fourth from 127.0.0.2 is refused");
    let mut other = connect_from("127.0.0.3", server.addr()).unwrap();
    assert!(echo(&mut other), "another address is unaffected");
    // The place is free once the server has closed that connection (its descriptor goes),
    // however long a busy machine takes to get there.
    let held = server.fd_count();
    drop(first.pop());
    server.fds_back_to(held - 1, Duration::from_secs(10));
    let mut again = connect_from("127.0.0.2", server.addr()).unwrap();
    assert!(echo(&mut again), "a freed place is reusable");
    drop((first, fourth, other, again));
    let stats = server.stop();
    assert_eq!(stats.stat("refused"), 1, "{}", stats.log);
}

every_backend! {
    a_connect_and_close_storm_leaves_no_trace_and_never_stalls_accept,
    graceful_stop_with_a_thousand_connections_echoes_everything_owed,
    the_per_address_cap_holds_for_one_address_and_spares_the_others,
}
