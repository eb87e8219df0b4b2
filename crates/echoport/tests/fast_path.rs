//! io_uring fast-path limits under stress: a starved buffer ring, a tiny completion queue,
//! and a client that never reads. Each case checks every echoed byte.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_echoport"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start echoport serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not say where it listens (is io_uring available?)");
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        Server {
            child,
            addr,
            log: rx,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Stops the server with SIGTERM and returns its final stats line.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit status {status}");
        self.log
            .try_iter()
            .filter(|l| l.contains("stopped"))
            .last()
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `conns` clients each do `rounds` ping-pongs of `size` bytes; every byte is checked.
fn ping_pong(addr: SocketAddr, conns: usize, rounds: usize, size: usize) {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut got = vec![0u8; size];
                for r in 0..rounds {
                    let msg: Vec<u8> = (0..size).map(|i| (c * 31 + r * 7 + i) as u8).collect();
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut got).unwrap();
                    assert_eq!(got, msg, "connection {c} round {r}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a client failed");
    }
}

fn stat(line: &str, key: &str) -> u64 {
    line.split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn two_buffers_serve_a_hundred_busy_connections() {
    let server = Server::start(&["--threads", "1", "--buffers", "2", "--buf-size", "1024"]);
    ping_pong(server.addr, 100, 20, 3000);
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), 100 * 20 * 3000);
    assert!(
        stat(&stats, "parked") > 0,
        "the ring never ran dry, so nothing was tested: {stats}"
    );
}

#[test]
fn a_tiny_completion_queue_loses_no_completion() {
    let server = Server::start(&["--threads", "1", "--cq-entries", "4"]);
    ping_pong(server.addr, 100, 20, 700);
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), 100 * 20 * 700);
    assert!(
        stat(&stats, "cq_overflows") > 0,
        "the CQ never overflowed, so nothing was tested: {stats}"
    );
}

#[test]
fn one_shot_operations_with_two_buffers_still_progress() {
    let server = Server::start(&["--threads", "1", "--no-fast-path", "--buffers", "2"]);
    ping_pong(server.addr, 50, 10, 5000);
    let stats = server.stop();
    assert_eq!(stat(&stats, "bytes_echoed"), 50 * 10 * 5000);
}

#[test]
fn a_client_that_never_reads_is_throttled_and_does_not_stall_others() {
    let server = Server::start(&["--threads", "1", "--max-pending", "65536"]);
    let before = server.rss_kib();
    // The hog: a tiny receive buffer, writes as fast as it can, never reads.
    let hog = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hog.set_recv_buffer_size(4096).unwrap();
    hog.connect(&server.addr.into()).unwrap();
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
    ping_pong(server.addr, 100, 10, 512);
    let after = server.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    drop(hog);
    let stats = server.stop();
    assert!(
        stat(&stats, "paused") > 0,
        "the hog's receive was never paused: {stats}"
    );
}
