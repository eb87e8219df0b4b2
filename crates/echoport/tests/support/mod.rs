//! Shared by the integration tests: start `echoport serve` on an ephemeral loopback port,
//! read its log, measure it, stop it, and parse its final counters.
#![allow(dead_code)] // each test file uses a different part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The Linux backends every behaviour is checked on.
pub const BACKENDS: [&str; 2] = ["io-uring", "epoll"];

/// `every_backend! { case, ... }`: each case is a `fn case(backend: &str)`; this makes one
/// `#[test]` per backend, as `io_uring::case` and `epoll::case`.
#[macro_export]
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

/// A running `echoport serve`, killed on drop if not stopped.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Server {
    /// Starts the server on one backend (`io-uring`, `epoll`) with more arguments.
    pub fn on(backend: &str, args: &[&str]) -> Server {
        let mut all = vec!["--backend", backend];
        all.extend_from_slice(args);
        Server::start(&all)
    }

    pub fn start(args: &[&str]) -> Server {
        Server::start_with(Command::new(env!("CARGO_BIN_EXE_echoport")), args)
    }

    /// Starts the server under `prlimit --nofile=N`.
    pub fn start_with_fd_limit(n: u32, args: &[&str]) -> Server {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={n}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_echoport"));
        Server::start_with(cmd, args)
    }

    pub fn start_with(mut cmd: Command, args: &[&str]) -> Server {
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(
                std::env::var("ECHOPORT_TEST_BACKEND")
                    .map(|b| vec!["--backend".to_string(), b])
                    .unwrap_or_default(),
            )
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

    /// CPU time (user + system) the server has used, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_name.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// The final counters line, reading the log to its end (the process has exited, so the
    /// reader thread sees end of file and hangs up).
    fn final_line(&self) -> Option<String> {
        let mut last = None;
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            if line.contains("stopped") {
                last = Some(line);
            }
        }
        last
    }

    /// Descriptors the server process has open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the server to exit (after [`Server::terminate`]) within `limit`; returns its
    /// exit status and final counters line.
    pub fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let line = self.final_line();
                return (status, line.unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {limit:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Stops the server with SIGTERM and returns its final stats line.
    pub fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exit status {status}");
        self.final_line().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=` in the server's final counters line.
pub fn stat(line: &str, key: &str) -> u64 {
    let pat = format!("{key}=");
    line.match_indices(&pat)
        .find(|(at, _)| {
            *at == 0
                || !line.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && line.as_bytes()[at - 1] != b'_'
        })
        .and_then(|(at, _)| {
            let digits: String = line[at + pat.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}
