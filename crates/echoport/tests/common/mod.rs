//! Shared helpers of the integration tests: the server under test, random numbers, tagged
//! byte streams and a poll-driven swarm of non-blocking clients.
//!
//! Every server is the real `echoport` binary, started on `127.0.0.1:0`; its address is read
//! from its `listening on ADDR` log line. [`Server`] kills its child when dropped (SIGTERM,
//! then SIGKILL), so a failing test never leaves a server behind.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod pattern;
pub mod rng;
pub mod swarm;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use echoport_testkit::child::collect;
use rustix::process::{Pid, Signal, kill_process};

/// The Linux backends every behaviour is checked on.
#[allow(dead_code)]
pub const BACKENDS: [&str; 2] = ["io-uring", "epoll"];

/// `every_backend! { case, ... }`: each case is a `fn case(backend: &str)`; this makes one
/// `#[test]` per backend, as `io_uring::case` and `epoll::case`.
#[allow(unused_macros)]
macro_rules! every_backend {
    ($($case:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $case() { super::$case("io-uring") } )*
        }
        mod epoll {
            $( #[test] fn $case() { super::$case("epoll") } )*
        }
    };
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_echoport");

/// How long a server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Server::stop`] waits for a graceful exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `echoport serve`, killed on drop.
pub struct Server {
    child: Option<Child>,
    addr: SocketAddr,
    args: Vec<String>,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts `echoport serve` with `args` and waits for its address. Unless `args` say
    /// otherwise it listens on `127.0.0.1:0`, logs at `info` (`ECHOPORT_TEST_LOG` overrides)
    /// and has a 5 s shutdown deadline.
    pub fn start(args: &[&str]) -> Server {
        Server::start_configured(args, |_| {})
    }

    /// [`Server::start`], letting `configure` change the command first (a seccomp filter
    /// applied between fork and exec, a resource limit).
    pub fn start_configured(args: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        Server::start_inner(&[], args, configure)
    }

    /// [`Server::start`] on one backend (`io-uring`, `epoll`).
    pub fn on(backend: &str, args: &[&str]) -> Server {
        let mut all = vec!["--backend", backend];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    /// [`Server::start`] under a wrapper command, e.g. `["prlimit", "--nofile=256", "--"]`.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Server {
        Server::start_inner(wrapper, args, |_| {})
    }

    fn start_inner(
        wrapper: &[&str],
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Server {
        let has = |flag: &str| args.contains(&flag);
        let mut full: Vec<String> = vec!["serve".into()];
        full.extend(args.iter().map(|a| a.to_string()));
        if !has("--listen") && !has("-l") {
            full.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        if !has("--shutdown-timeout") {
            full.extend(["--shutdown-timeout".into(), "5".into()]);
        }
        if !has("--log") {
            let level = std::env::var("ECHOPORT_TEST_LOG").unwrap_or_else(|_| "info".into());
            full.extend(["--log".into(), level]);
        }
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    {
                        let mut l = log.lock().unwrap();
                        l.push_str(&line);
                        l.push('\n');
                    }
                    // After the line is in the log, so the log holds what `start` saw.
                    if let Some(addr) = listening_addr(&line) {
                        let _ = tx.send(addr);
                    }
                }
            })
        };
        let mut server = Server {
            child: Some(child),
            addr: "0.0.0.0:0".parse().unwrap(),
            args: full,
            log,
            reader: Some(reader),
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => server.addr = addr,
            Err(_) => {
                let status = server.wait_exit(Duration::from_secs(2));
                let reader = server.reader.take();
                if status.is_some() {
                    if let Some(r) = reader {
                        let _ = r.join();
                    }
                }
                panic!(
                    "`echoport {}` did not start listening ({}); its stderr:\n{}",
                    server.args.join(" "),
                    status.map_or("still running".into(), |s| format!("it exited: {s}")),
                    server.log()
                );
            }
        }
        server
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not reaped").id()
    }

    /// Everything it printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 10 s for the log to satisfy `pred` (lines arrive asynchronously).
    pub fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if pred(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in the server's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// CPU time (user + system) the server has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let (user, system) = echoport_io::sys::process_cpu_ticks(self.pid()).unwrap();
        user + system
    }

    /// Resident memory of the server, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Descriptors the server process has open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// The descriptor count once it has held still for 300 ms (threads may still be setting
    /// up after the address is printed), within 10 s; a baseline for [`Server::fds_back_to`].
    pub fn settled_fd_count(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut last, mut since) = (self.fd_count(), Instant::now());
        while since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.fd_count();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        last
    }

    /// Waits up to `limit` for the descriptor count to come back to `baseline` (closing is
    /// asynchronous: a loaded machine may take a while); returns the last count seen, so the
    /// caller's equality check still catches a leak.
    pub fn fds_back_to(&self, baseline: usize, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.fd_count();
            if now == baseline || Instant::now() >= deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects a client with `TCP_NODELAY` and a 20 s read timeout.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr)
            .unwrap_or_else(|e| panic!("connecting to the server at {}: {e}", self.addr));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Sends a signal, if the child has not been reaped yet (so its pid is still ours).
    pub fn signal(&mut self, sig: Signal) {
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                kill_process(Pid::from_child(child), sig)
                    .unwrap_or_else(|e| panic!("sending {sig:?} to the server: {e}"));
            }
        }
    }

    /// Waits up to `timeout` for the server to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("waiting for the server") {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Panics (with its log) unless the server is still running.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.wait_exit(Duration::ZERO) {
            panic!("the server exited with {st}; its stderr:\n{}", self.log());
        }
    }

    /// SIGTERM, then waits for the exit; panics if it takes longer than [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> Stopped {
        let t0 = Instant::now();
        self.signal(Signal::TERM);
        self.finish(t0, STOP_TIMEOUT)
    }

    /// Waits (after a signal the test sent itself) for the exit, at most `timeout` after `t0`.
    pub fn finish(mut self, t0: Instant, timeout: Duration) -> Stopped {
        let status = self.wait_exit(timeout.saturating_sub(t0.elapsed()));
        let took = t0.elapsed();
        let Some(status) = status else {
            panic!(
                "the server did not exit within {timeout:?}; its stderr:\n{}",
                self.log()
            );
        };
        self.child = None;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Stopped {
            status,
            took,
            log: self.log(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = kill_process(Pid::from_child(&child), Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} line(s) of the server's stderr ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// What a server left behind when it exited.
pub struct Stopped {
    pub status: ExitStatus,
    /// From the signal (or [`Server::finish`]'s `t0`) to the exit.
    pub took: Duration,
    pub log: String,
}

impl Stopped {
    /// Exit status 0, nothing forced, nothing panicked, no error logged.
    pub fn assert_clean(&self) {
        assert!(
            self.status.success(),
            "server exit status {}; its stderr:\n{}",
            self.status,
            self.log
        );
        for bad in [
            "deadline passed",
            "did not finish closing",
            "panicked",
            " ERROR ",
        ] {
            assert!(
                !self.log.contains(bad),
                "the server's stderr contains {bad:?}:\n{}",
                self.log
            );
        }
    }

    /// The counters of the final `stopped` line (`accepted`, `closed`, `errors`, ...).
    pub fn stats(&self) -> HashMap<String, u64> {
        let line = self
            .log
            .lines()
            .find(|l| l.contains("stopped") && l.contains("accepted="))
            .unwrap_or_else(|| panic!("no final `stopped` line in:\n{}", self.log));
        line.split_whitespace()
            .filter_map(|w| {
                // `total=accepted=3`, `udp=udp_echoed=5`: the name is the last before `=N`.
                let (k, v) = w.rsplit_once('=')?;
                let k = k.rsplit('=').next()?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn stat(&self, name: &str) -> u64 {
        *self
            .stats()
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name} in the stopped line:\n{}", self.log))
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Runs `echoport ARGS` to completion with `stdin` as input; returns (status, stdout, stderr).
pub fn run_bin(args: &[&str], stdin: &[u8], timeout: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let what = format!("`echoport {}`", args.join(" "));
    let status = echoport_testkit::child::wait_or_kill(&mut child, timeout, &what);
    let _ = writer.join();
    let text = |h: JoinHandle<Vec<u8>>| String::from_utf8_lossy(&h.join().unwrap()).into_owned();
    (status, text(out), text(err))
}

/// Reads exactly `n` bytes, with a clear message when the stream ends or fails first.
pub fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        match stream.read(&mut buf[got..]) {
            Ok(0) => panic!("end of stream after {got} of {n} bytes"),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading after {got} of {n} bytes: {e}"),
        }
    }
    buf
}

/// Expects end-of-stream next (no stray bytes, no reset).
pub fn expect_eof(stream: &mut TcpStream) {
    let mut b = [0u8; 256];
    match stream.read(&mut b) {
        Ok(0) => {}
        Ok(k) => panic!(
            "expected end of stream, got {k} more bytes: {:02x?}",
            &b[..k]
        ),
        Err(e) => panic!("expected end of stream, got an error: {e}"),
    }
}

/// Sets `SO_LINGER` to zero, so that dropping the stream resets the connection.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    drop(stream);
}

/// A small ping-pong on `stream` that must echo exactly.
pub fn ping(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).expect("writing a ping");
    let got = read_n(stream, msg.len());
    assert_eq!(got, msg, "the echo differs from the ping");
}

/// `conns` clients each do `rounds` ping-pongs of `size` bytes on their own thread, every byte
/// checked; returns the bytes echoed.
#[allow(dead_code)]
pub fn ping_pong(addr: SocketAddr, conns: usize, rounds: usize, size: usize) -> u64 {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            std::thread::spawn(move || {
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
    (conns * rounds * size) as u64
}

/// An echo peer (for a test's own listener) that echoes faithfully, except that once
/// `after` bytes have come in it stops for `pause`, once.
pub fn echo_stalling(mut s: TcpStream, after: usize, pause: Duration) {
    let mut buf = [0u8; 16384];
    let (mut at, mut stalled) = (0usize, false);
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
        at += n;
        if !stalled && at >= after {
            stalled = true;
            std::thread::sleep(pause);
        }
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
