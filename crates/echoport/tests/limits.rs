//! Limits under stress: a starved buffer ring, a tiny completion queue, a client that never
//! reads, silent clients, and the connection cap. Each case checks every echoed byte.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Server, ping, ping_pong};
use std::thread;
use std::time::{Duration, Instant};

fn two_buffers_serve_a_hundred_busy_connections(backend: &str) {
    let server = Server::on(
        backend,
        &["--threads", "1", "--buffers", "2", "--buf-size", "1024"],
    );
    ping_pong(server.addr(), 100, 20, 3000);
    let stats = server.stop();
    assert_eq!(stats.stat("bytes_echoed"), 100 * 20 * 3000);
    assert!(
        stats.stat("parked") > 0,
        "the ring never ran dry, so nothing was tested: {}",
        stats.log
    );
}

#[test]
fn a_tiny_completion_queue_loses_no_completion() {
    // Below the floor of 256 that `serve` enforces, on purpose (a hidden test-only flag).
    let server = Server::on(
        "io-uring",
        &[
            "--threads",
            "1",
            "--cq-entries",
            "4",
            "--cq-entries-below-floor",
        ],
    );
    ping_pong(server.addr(), 100, 20, 700);
    let stats = server.stop();
    assert_eq!(stats.stat("bytes_echoed"), 100 * 20 * 700);
    assert!(
        stats.stat("cq_overflows") > 0,
        "the CQ never overflowed, so nothing was tested: {}",
        stats.log
    );
}

#[test]
fn a_batched_wait_echoes_everything_and_idles_without_spinning() {
    let server = Server::on("io-uring", &["--threads", "1", "--batch-wait-us", "200"]);
    let started = server.log();
    assert!(
        started.contains("batched-wait (kernel min-wait)"),
        "this kernel has IORING_FEAT_MIN_TIMEOUT (6.12+), so the batched wait should be the \
         kernel's minimum wait: {started}"
    );
    // Busy: many connections at once, every byte checked.
    ping_pong(server.addr(), 100, 20, 700);
    // A lone message after a quiet spell is not held back for the batch: the minimum wait
    // has run out long before it arrives.
    std::thread::sleep(Duration::from_millis(50));
    let mut s = server.connect();
    let t = Instant::now();
    for _ in 0..20 {
        ping(&mut s, b"lone");
        std::thread::sleep(Duration::from_millis(5));
    }
    let per_ping = (t.elapsed() - Duration::from_millis(100)) / 20;
    assert!(
        per_ping < Duration::from_millis(20),
        "a lone ping took {per_ping:?}: held back for a batch that never came"
    );
    drop(s);
    // Idle with connections open: no timer loop.
    let _idle: Vec<_> = (0..10).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = server.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = server.cpu_ticks() - before;
    assert!(
        spent <= 5,
        "an idle server with a batched wait used {spent} ticks of CPU in 1 s"
    );
    let stats = server.stop();
    assert_eq!(stats.stat("bytes_echoed"), 100 * 20 * 700 + 20 * 4);
}

#[test]
fn one_shot_operations_with_two_buffers_still_progress() {
    let server = Server::on(
        "io-uring",
        &["--threads", "1", "--no-fast-path", "--buffers", "2"],
    );
    ping_pong(server.addr(), 50, 10, 5000);
    let stats = server.stop();
    assert_eq!(stats.stat("bytes_echoed"), 50 * 10 * 5000);
}

fn a_client_that_never_reads_is_throttled_and_does_not_stall_others(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--max-pending", "65536"]);
    let before = server.rss_kib();
    // The hog: a tiny receive buffer, writes as fast as it can, never reads.
    let hog = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hog.set_recv_buffer_size(4096).unwrap();
    hog.connect(&server.addr().into()).unwrap();
    hog.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut hog = TcpStream::from(hog);
    let chunk = vec![0x5a; 64 * 1024];
    let mut written = 0usize;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        match hog.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break, // the server stopped reading: our send buffer is full
        }
    }
    assert!(
        written < 64 << 20,
        "the server kept reading from a client that never reads ({written} bytes)"
    );
    // Everyone else is served while the hog is stuck.
    ping_pong(server.addr(), 100, 10, 512);
    let after = server.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    drop(hog);
    let stats = server.stop();
    assert!(
        stats.stat("paused") > 0,
        "the hog's receive was never paused: {}",
        stats.log
    );
}

/// Reads until end of stream or error; true if the server closed the connection.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // timed out: still open
        }
    }
}

fn idle_timeout_closes_silent_clients_but_not_chatty_ones(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--idle-timeout", "0.5"]);
    let mut silent = TcpStream::connect(server.addr()).unwrap();
    let mut chatty = TcpStream::connect(server.addr()).unwrap();
    chatty
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    let mut echo = [0u8; 5];
    while started.elapsed() < Duration::from_millis(1500) {
        chatty.write_all(b"still").unwrap();
        chatty.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"still");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed_by_server(&mut silent, Duration::from_millis(100)),
        "silent client still open after 1.5 s"
    );
    drop(chatty);
    let stats = server.stop();
    assert_eq!(stats.stat("timeouts"), 1, "{}", stats.log);
}

/// A worker with nothing to do sleeps in its wait with no timer; the connection that wakes
/// it must be timed from its own accept, not from when the wait began (it was closed at once
/// as idle when the server had been quiet for longer than the idle timeout).
fn the_first_client_after_a_quiet_spell_is_not_taken_for_idle(backend: &str) {
    let server = Server::on(backend, &["--threads", "1", "--idle-timeout", "1"]);
    thread::sleep(Duration::from_millis(2500));
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    thread::sleep(Duration::from_millis(300));
    s.write_all(b"after a quiet spell").unwrap();
    let mut echo = [0u8; 19];
    s.read_exact(&mut echo)
        .expect("the first connection after a quiet spell was closed");
    assert_eq!(&echo, b"after a quiet spell");
    drop(s);
    let stats = server.stop();
    assert_eq!(stats.stat("timeouts"), 0, "{}", stats.log);
}

fn a_trickling_client_is_closed_when_it_pauses_past_the_idle_timeout(backend: &str) {
    // Slowloris: a byte now and then, each pause longer than the idle timeout.
    let server = Server::on(backend, &["--threads", "1", "--idle-timeout", "0.4"]);
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let started = Instant::now();
    let mut closed = false;
    for _ in 0..5 {
        if s.write_all(b".").is_err() {
            closed = true;
            break;
        }
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(1) => {}
            _ => {
                closed = true;
                break;
            }
        }
        thread::sleep(Duration::from_millis(700));
    }
    assert!(
        closed,
        "a client pausing 0.7 s between bytes survived a 0.4 s idle timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let stats = server.stop();
    assert_eq!(stats.stat("timeouts"), 1, "{}", stats.log);
}

fn write_timeout_closes_a_client_that_stops_reading(backend: &str) {
    let server = Server::on(
        backend,
        &[
            "--threads",
            "1",
            "--write-timeout",
            "0.5",
            "--max-pending",
            "16384",
        ],
    );
    let hog = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hog.set_recv_buffer_size(4096).unwrap();
    hog.connect(&server.addr().into()).unwrap();
    hog.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut hog = TcpStream::from(hog);
    let chunk = vec![1u8; 16384];
    let started = Instant::now();
    let mut broken = false;
    while started.elapsed() < Duration::from_secs(5) {
        match hog.write(&chunk) {
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                broken = true; // reset or broken pipe: the server closed us
                break;
            }
        }
    }
    assert!(broken, "a never-reading client was not closed within 5 s");
    let stats = server.stop();
    assert!(stats.stat("timeouts") >= 1, "{}", stats.log);
}

fn connections_past_the_cap_are_closed_at_once_and_others_unaffected(backend: &str) {
    let server = Server::on(backend, &["--threads", "2", "--max-connections", "4"]);
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = format!("held {i}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());
    }
    let mut extra = TcpStream::connect(server.addr()).unwrap();
    let t = Instant::now();
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(2)),
        "the fifth connection was left hanging"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refusal took {:?}",
        t.elapsed()
    );
    // The admitted ones still work, and a freed place is reusable.
    drop(held.pop());
    thread::sleep(Duration::from_millis(100));
    ping_pong(server.addr(), 1, 3, 100);
    for s in held.iter_mut() {
        s.write_all(b"ok").unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
    }
    drop(held);
    let stats = server.stop();
    assert_eq!(stats.stat("refused"), 1, "{}", stats.log);
}

fn descriptor_exhaustion(args: &[&str]) {
    let server = Server::start_wrapped(&["prlimit", "--nofile=256", "--"], args);
    // 1,000 clients knock; the server can hold only about 200 of them.
    let mut knocking: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(server.addr()).expect("the listen backlog takes the connect"))
        .collect();
    thread::sleep(Duration::from_millis(300));
    let before = server.cpu_ticks();
    thread::sleep(Duration::from_secs(1));
    let used = server.cpu_ticks() - before;
    // A server re-posting accept in a loop would burn ~100 ticks (one CPU) in that second.
    assert!(
        used <= 10,
        "server used {used} ticks of CPU in 1 s while out of descriptors"
    );
    // Once the clients leave, service resumes.
    knocking.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let ok = s.write_all(b"back").is_ok() && {
            let mut got = [0u8; 4];
            s.read_exact(&mut got).is_ok() && &got == b"back"
        };
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not resume after the clients left"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let stats = server.stop();
    assert!(stats.stat("accept_backoffs") > 0, "{}", stats.log);
}

fn descriptor_exhaustion_backs_off_instead_of_spinning(backend: &str) {
    descriptor_exhaustion(&[
        "--backend",
        backend,
        "--threads",
        "1",
        "--max-connections",
        "100000",
    ]);
}

#[test]
fn descriptor_exhaustion_backs_off_instead_of_spinning_io_uring_one_shot() {
    descriptor_exhaustion(&[
        "--backend",
        "io-uring",
        "--threads",
        "1",
        "--no-fast-path",
        "--max-connections",
        "100000",
    ]);
}

fn an_idle_server_sleeps(backend: &str) {
    {
        let args = ["--threads", "2"];
        let server = Server::on(backend, &args);
        // With a few idle connections, too: their timers must not spin either.
        let _idle: Vec<TcpStream> = (0..10)
            .map(|_| TcpStream::connect(server.addr()).unwrap())
            .collect();
        thread::sleep(Duration::from_millis(300));
        let before = server.cpu_ticks();
        thread::sleep(Duration::from_secs(1));
        let used = server.cpu_ticks() - before;
        assert!(
            used <= 2,
            "{args:?}: an idle server used {used} ticks of CPU in 1 s"
        );
    }
}

every_backend! {
    the_first_client_after_a_quiet_spell_is_not_taken_for_idle,
    a_trickling_client_is_closed_when_it_pauses_past_the_idle_timeout,
    two_buffers_serve_a_hundred_busy_connections,
    a_client_that_never_reads_is_throttled_and_does_not_stall_others,
    idle_timeout_closes_silent_clients_but_not_chatty_ones,
    write_timeout_closes_a_client_that_stops_reading,
    connections_past_the_cap_are_closed_at_once_and_others_unaffected,
    descriptor_exhaustion_backs_off_instead_of_spinning,
    an_idle_server_sleeps,
}
