//! Shared by the integration tests: start `echoport serve` on a chosen backend on an
//! ephemeral loopback port, talk to it, read its counters, stop it.
//!
//! [`on_every_backend!`] instantiates a list of test functions once per backend, so the whole
//! suite runs on io_uring and on epoll from one definition.
#![allow(dead_code)] // each test file uses its own part of this

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A backend the server can be told to use.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Be {
    /// `--backend io-uring`.
    IoUring,
    /// `--backend epoll`.
    Epoll,
}

impl Be {
    /// The value of `--backend`.
    pub fn arg(self) -> &'static str {
        match self {
            Be::IoUring => "io-uring",
            Be::Epoll => "epoll",
        }
    }

    /// What the start-up line's `backend=` begins with.
    pub fn name(self) -> &'static str {
        match self {
            Be::IoUring => "io_uring",
            Be::Epoll => "epoll",
        }
    }
}

/// Defines one `#[test]` per backend for each named function `fn(Be)` of the calling file,
/// in modules `io_uring` and `epoll` (so `cargo test epoll::` runs one backend's suite).
/// The file declares `#[macro_use] mod common;`.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name(crate::common::Be::IoUring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name(crate::common::Be::Epoll) } )*
        }
    };
}

/// A running `echoport serve`, killed on drop if still running.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line printed before the listening line.
    pub startup: Vec<String>,
    log: mpsc::Receiver<String>,
}

/// `echoport serve --listen 127.0.0.1:0` followed by `args`.
pub fn serve_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_echoport"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--log", "info"])
        .args(args);
    cmd
}

impl Server {
    /// Starts the server on `be` with extra `args`.
    pub fn start(be: Be, args: &[&str]) -> Server {
        let mut all = vec!["--backend", be.arg()];
        all.extend_from_slice(args);
        let s = Server::spawn(serve_command(&all));
        s.expect_backend(be.name());
        s
    }

    /// Starts the server on `be` with `prlimit --nofile=N` applied.
    pub fn start_with_fd_limit(be: Be, nofile: u32, args: &[&str]) -> Server {
        let mut all = vec!["--backend", be.arg()];
        all.extend_from_slice(args);
        let inner = serve_command(&all);
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(inner.get_program())
            .args(inner.get_args());
        let s = Server::spawn(cmd);
        s.expect_backend(be.name());
        s
    }

    /// Spawns `cmd` (some `echoport serve`) and waits for its listening line.
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start echoport serve");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut startup = Vec::new();
        let addr = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let addr = line
                        .split("listening on ")
                        .nth(1)
                        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap());
                    startup.push(line);
                    if let Some(addr) = addr {
                        break addr;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not say where it listens; it said: {startup:#?}");
                }
            }
        };
        Server {
            child,
            addr,
            startup,
            log: rx,
        }
    }

    /// The start-up line that names the backend.
    pub fn serving_line(&self) -> &str {
        self.startup
            .iter()
            .find(|l| l.contains("echoport serving"))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no start-up line in {:#?}", self.startup))
    }

    fn expect_backend(&self, name: &str) {
        let line = self.serving_line();
        assert!(
            line.contains(&format!("backend={name}")),
            "expected backend {name}: {line}"
        );
    }

    /// CPU time (user + system) the server has used.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // Linux reports these in USER_HZ, which is 100 on every architecture we build for.
        Duration::from_millis(ticks * 10)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success(), "kill -TERM {pid} failed");
    }

    /// Waits (bounded) for the server to exit; returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server with SIGTERM, checks it exits 0, and returns its final counters line.
    pub fn stop(mut self) -> String {
        self.terminate();
        let status = self.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "server exit status {status}");
        self.rest_of_log()
            .into_iter()
            .rfind(|l| l.contains("stopped"))
            .unwrap_or_else(|| panic!("no final counters line"))
    }

    /// Every stderr line printed after start-up: all of them once the server has exited
    /// (the reader ends at end of stream), otherwise those printed so far.
    pub fn rest_of_log(&mut self) -> Vec<String> {
        if self.child.try_wait().unwrap().is_some() {
            self.log.iter().collect()
        } else {
            self.log.try_iter().collect()
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of counter `key` in a final counters line.
pub fn stat(line: &str, key: &str) -> u64 {
    // Words look like `bytes_echoed=123`, the first one `total=accepted=4`.
    line.split(|c: char| c.is_whitespace() || c == '"')
        .filter_map(|w| w.rsplit_once('='))
        .find(|(k, _)| k.rsplit('=').next() == Some(key))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Bytes of message `r` of connection `c`, `size` long: every position differs from its
/// neighbours so a dropped, doubled or reordered byte shows.
pub fn message(c: usize, r: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (c * 31 + r * 7 + i + i / 251) as u8)
        .collect()
}

/// Connects with a read timeout so a broken server fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the server");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// `conns` clients at once each do `rounds` ping-pongs of `size` bytes; every byte is checked.
pub fn ping_pong(addr: SocketAddr, conns: usize, rounds: usize, size: usize) {
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            thread::spawn(move || {
                let mut s = connect(addr);
                let mut got = vec![0u8; size];
                for r in 0..rounds {
                    let msg = message(c, r, size);
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut got).unwrap();
                    assert!(got == msg, "connection {c} round {r}: echo differs");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a client failed");
    }
}

/// Streams `data` to the server while reading concurrently, then half-closes and reads to
/// end of stream. Returns what came back.
pub fn stream_through(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&s).read_to_end(&mut got)
        .expect("read the echo to its end");
    writer.join().expect("writer failed");
    got
}
