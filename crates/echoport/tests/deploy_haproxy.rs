//! Scale-out behind HAProxy (`mode tcp`), the recipe of docs/DEPLOY.md run on loopback: two
//! echoport processes behind one HAProxy, `echoport bench` through it with every byte
//! verified, one backend stopped mid-run with SIGTERM. What must hold:
//!
//! - no byte is ever corrupted, duplicated or invented (mismatch, extra echo: zero);
//! - the connections on the *other* backend lose nothing;
//! - the connections that were on the stopped backend see its drain: the echo of everything
//!   it had read, then end of stream (FIN), which the bench counts as `connection_lost`
//!   ("closed by the server"); a message still in flight when the drain began (never read by
//!   the server) is reported missing — at most one whole message per connection in a closed
//!   loop — never cut or altered;
//! - new connections keep working at once (HAProxy retries a refused connect and
//!   redispatches), HAProxy's echo health check marks the stopped backend DOWN, and a second
//!   run goes entirely to the other backend without a single error.
//!
//! It runs twice: plain TCP, and with the PROXY protocol (`send-proxy-v2` on the server
//! lines, `serve --proxy-protocol` on the backends), where each backend must also have read a
//! v2 header on every session HAProxy gave it, LOCAL headers on HAProxy's health checks, and
//! refused none.

#[macro_use]
mod common;
mod deploy_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use deploy_support::{Samples, bench, metrics_addr, require, scrape};
use rustix::process::{Pid, Signal, kill_process};

/// The backend section's options, exactly as docs/DEPLOY.md shows them (a test checks).
pub const BACKEND_OPTIONS: &[&str] = &[
    "balance roundrobin",
    "option tcp-check",
    "tcp-check connect default",
    "tcp-check send-binary 70696e670a",
    "tcp-check expect binary 70696e670a",
    "default-server inter 200ms fall 2 rise 2",
];

/// The defaults section's options, exactly as docs/DEPLOY.md shows them.
pub const DEFAULTS: &[&str] = &[
    "mode tcp",
    "timeout connect 2s",
    "timeout client 30s",
    "timeout server 30s",
    "retries 3",
    "option redispatch",
];

/// One way of running the recipe.
struct Scenario {
    /// Appended to each `server` line (e.g. ` send-proxy-v2`).
    server_opts: &'static str,
    /// Extra `echoport serve` flags for the backends (e.g. the PROXY protocol flag).
    echoport_args: &'static [&'static str],
    /// The backends read PROXY v2 headers (checked in their counters).
    proxy: bool,
}

/// Plain TCP.
const PLAIN: Scenario = Scenario {
    server_opts: "",
    echoport_args: &[],
    proxy: false,
};

/// The `server` line's options of the PROXY v2 recipe, exactly as docs/DEPLOY.md shows them.
pub const PROXY_SERVER_OPTS: &str = " send-proxy-v2";
/// The backends' flags of the PROXY v2 recipe (HAProxy on the same host: loopback).
pub const PROXY_ARGS: &[&str] = &["--proxy-protocol", "--proxy-from", "127.0.0.1"];

/// HAProxy sends a PROXY v2 header first on every connection, health checks included.
const PROXY_V2: Scenario = Scenario {
    server_opts: PROXY_SERVER_OPTS,
    echoport_args: PROXY_ARGS,
    proxy: true,
};

/// HAProxy in the foreground, its log collected, killed on drop.
struct Haproxy {
    child: Child,
    log: Arc<Mutex<String>>,
    stats: PathBuf,
    dir: PathBuf,
}

impl Haproxy {
    fn start(front: SocketAddr, backends: &[SocketAddr], s: &Scenario) -> Haproxy {
        let haproxy = require("haproxy", "haproxy");
        // One directory per HAProxy: the scenarios run side by side in one test process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("echoport-haproxy-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stats = dir.join("stats.sock");
        let mut cfg = format!(
            "global\n    log stderr format raw local0 info\n    maxconn 4000\n    \
             stats socket {} mode 600 level admin\ndefaults\n    log global\n    option tcplog\n",
            stats.display()
        );
        for o in DEFAULTS {
            cfg.push_str(&format!("    {o}\n"));
        }
        cfg.push_str(&format!(
            "frontend echo\n    bind {front}\n    default_backend echoport\nbackend echoport\n"
        ));
        for o in BACKEND_OPTIONS {
            cfg.push_str(&format!("    {o}\n"));
        }
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!("    server e{i} {b} check{}\n", s.server_opts));
        }
        let cfg_path = dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, &cfg).unwrap();
        let (child, log) = echoport_testkit::child::spawn_logged(
            Command::new(haproxy).arg("-db").arg("-f").arg(&cfg_path),
        );
        let hx = Haproxy {
            child,
            log,
            stats,
            dir,
        };
        // Ready once its stats socket answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&hx.stats).is_err() {
            assert!(
                Instant::now() < deadline,
                "HAProxy did not start:\n{}",
                hx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        hx
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `show stat`: per server name, its columns by header name.
    fn servers(&self) -> HashMap<String, HashMap<String, String>> {
        let mut s = UnixStream::connect(&self.stats)
            .unwrap_or_else(|e| panic!("HAProxy's stats socket: {e}\n{}", self.log()));
        s.write_all(b"show stat\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let mut lines = out.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        lines
            .map(|l| {
                header
                    .iter()
                    .map(|h| h.to_string())
                    .zip(l.split(',').map(str::to_string))
                    .collect::<HashMap<_, _>>()
            })
            .filter(|row| row.get("pxname").map(String::as_str) == Some("echoport"))
            .filter(|row| row.get("svname").is_some_and(|n| n.starts_with('e')))
            .map(|row| (row["svname"].clone(), row))
            .collect()
    }

    /// A server's (status, total sessions).
    fn server(&self, name: &str) -> (String, u64) {
        let all = self.servers();
        let row = all
            .get(name)
            .unwrap_or_else(|| panic!("no server {name} in {all:?}"));
        (row["status"].clone(), row["stot"].parse().unwrap())
    }

    /// Waits (10 s at most) until server `name` has status `want`.
    fn wait_status(&self, name: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (st, _) = self.server(name);
            if st == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {st}, not {want}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = kill_process(Pid::from_child(&self.child), Signal::TERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One ping through the balancer, on a fresh connection: the echo must be exact.
fn ping_through(front: SocketAddr, i: usize) {
    let mut s = TcpStream::connect(front).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let msg = format!("ping {i} through the balancer\n");
    s.write_all(msg.as_bytes()).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("ping {i}: {e}"));
    assert_eq!(got, msg.as_bytes(), "ping {i}");
}

fn errors(doc: &serde_json::Value, kind: &str) -> u64 {
    deploy_support::num(doc, &format!("runs.0.errors.{kind}"))
}

/// Message size of the bench runs.
const SIZE: u64 = 64;

/// `echoport bench` through the balancer: 20 connections of 64-byte messages for `secs`.
fn bench_through(front: SocketAddr, secs: &str) -> (Option<i32>, serde_json::Value) {
    let args = [
        "-c",
        "20",
        "-d",
        secs,
        "--warmup",
        "0",
        "--threads",
        "1",
        "-s",
        "64",
    ];
    bench(front, &args, Duration::from_secs(60))
}

/// Two echoport backends (A, and B with metrics) behind HAProxy, both seen UP.
struct Rig {
    /// None once stopped.
    a: Option<Server>,
    b: Server,
    b_metrics: SocketAddr,
    front: SocketAddr,
    hx: Haproxy,
}

impl Rig {
    fn start(s: &Scenario) -> Rig {
        let mut args_a = vec!["--threads", "1", "--shutdown-timeout", "5"];
        args_a.extend_from_slice(s.echoport_args);
        let mut args_b = vec!["--threads", "1", "--metrics", "127.0.0.1:0"];
        args_b.extend_from_slice(s.echoport_args);
        let a = Server::start(&args_a);
        let b = Server::start(&args_b);
        let b_metrics = metrics_addr(&b.log());
        let front = free_addr();
        let hx = Haproxy::start(front, &[a.addr(), b.addr()], s);
        hx.wait_status("e0", "UP");
        hx.wait_status("e1", "UP");
        Rig {
            a: Some(a),
            b,
            b_metrics,
            front,
            hx,
        }
    }

    fn b_bytes(&self) -> u64 {
        Samples::parse(&scrape(self.b_metrics).body).sum("echoport_bytes_echoed_total")
    }

    /// SIGTERM to A; waits until its listener is closed, checks that new connections work
    /// through the balancer, that A's drain is clean and quick, and that A goes DOWN.
    fn stop_a(&mut self) -> common::Stopped {
        let mut a = self.a.take().expect("A runs");
        let t_stop = Instant::now();
        a.signal(Signal::TERM);
        a.wait_log("the drain", |l| l.contains("stopping"));
        // A closes its listener within milliseconds of the signal. (A connection that
        // reaches its accept queue in that instant is closed at once and counted as
        // refused: take a backend out of rotation first when even that matters,
        // docs/DEPLOY.md says how.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(a.addr()).is_ok() {
            assert!(
                Instant::now() < deadline,
                "A's listener is still open 5 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // From then on new connections work, before and after the health check marks A
        // down: HAProxy retries the refused connect on B.
        for i in 0..10 {
            ping_through(self.front, i);
        }
        let stopped = a.finish(t_stop, Duration::from_secs(10));
        stopped.assert_clean();
        assert!(
            stopped.took < Duration::from_secs(3),
            "A's drain took {:?}",
            stopped.took
        );
        self.hx.wait_status("e0", "DOWN");
        stopped
    }
}

/// With the PROXY protocol: a backend read one v2 PROXY header per session HAProxy gave
/// it (`sessions`), LOCAL ones from the health checks, and refused nothing.
fn check_proxy_counters(which: &str, stopped: &common::Stopped, sessions: u64) {
    let s = |k: &str| stopped.stat(k);
    assert_eq!(
        s("proxy_v2"),
        sessions,
        "{which}: one v2 header per HAProxy session:\n{}",
        stopped.log
    );
    assert!(
        s("proxy_local") > 0,
        "{which}: no health check came as LOCAL"
    );
    for k in [
        "proxy_v1",
        "proxy_untrusted",
        "proxy_not_proxy",
        "proxy_malformed",
        "proxy_too_long",
        "proxy_timeouts",
        "proxy_truncated",
    ] {
        assert_eq!(s(k), 0, "{which}: {k}");
    }
}

/// What the clients of the stopped backend saw in run 1: its drain (closed by the server,
/// at most one whole in-flight message missing each), never a corrupted or invented byte,
/// and nothing at all on the other backend's connections.
fn check_drained_run(code: Option<i32>, doc: &serde_json::Value, on_a: u64) {
    for zero in [
        "mismatch",
        "extra_echo",
        "extra_bytes",
        "io_error",
        "timeout",
        "connect_failed",
    ] {
        assert_eq!(errors(doc, zero), 0, "run 1: {zero}");
    }
    let lost = errors(doc, "connection_lost");
    assert_eq!(
        lost, on_a,
        "exactly A's connections were closed by the drain, none of B's"
    );
    let (short, missing) = (errors(doc, "short_echo"), errors(doc, "missing_bytes"));
    assert!(short <= lost, "only drained connections may miss an echo");
    assert!(
        missing <= short * SIZE && missing % SIZE == 0,
        "{missing} bytes missing: whole in-flight messages only"
    );
    assert_eq!(
        code,
        Some(1),
        "the bench reports the closed connections as errors"
    );
}

/// The scenario of this file's header.
fn drain_moves_the_load(s: &Scenario) {
    let mut rig = Rig::start(s);
    // Run 1: 20 connections (round robin: 10 on each), 4 s; A is stopped after 1.5 s.
    let front = rig.front;
    let run1 = std::thread::spawn(move || bench_through(front, "4s"));
    std::thread::sleep(Duration::from_millis(1500));
    let (_, on_a) = rig.hx.server("e0");
    assert_eq!(on_a, 10, "round robin put {on_a} of 20 connections on A");
    let b_before = rig.b_bytes();
    let a_stopped = rig.stop_a();
    let (code1, doc1) = run1.join().expect("bench run 1");
    eprintln!("run 1: {doc1:#}");
    check_drained_run(code1, &doc1, on_a);
    let b_after = rig.b_bytes();
    assert!(
        b_after > b_before,
        "B echoed nothing after A's stop ({b_before} -> {b_after})"
    );

    // Run 2, with A down: everything goes to B, and nothing fails.
    let ((_, b_sessions), (_, a_sessions)) = (rig.hx.server("e1"), rig.hx.server("e0"));
    let (code2, doc2) = bench_through(front, "1s");
    assert_eq!(code2, Some(0), "run 2 with A down: {doc2:#}");
    assert_eq!(errors(&doc2, "total"), 0);
    assert!(deploy_support::num(&doc2, "runs.0.bytes") > 0);
    let (st_b, b_now) = rig.hx.server("e1");
    assert_eq!(
        (st_b.as_str(), b_now - b_sessions),
        ("UP", 20),
        "run 2 all on B"
    );
    let (st_a, a_now) = rig.hx.server("e0");
    assert_eq!(
        (st_a.as_str(), a_now),
        ("DOWN", a_sessions),
        "run 2 sent nothing to A"
    );
    let log = rig.hx.log();
    assert!(
        log.contains("is DOWN"),
        "HAProxy's log says nothing of A going down:\n{log}"
    );
    let b_stopped = rig.b.stop();
    b_stopped.assert_clean();
    if s.proxy {
        check_proxy_counters("A", &a_stopped, on_a);
        check_proxy_counters("B", &b_stopped, b_now);
    } else {
        assert_eq!(b_stopped.stat("proxy_v2"), 0);
    }
}

#[test]
fn a_drained_backend_hands_its_load_to_the_other() {
    drain_moves_the_load(&PLAIN);
}

#[test]
fn a_drained_backend_hands_its_load_to_the_other_with_proxy_v2() {
    drain_moves_the_load(&PROXY_V2);
}

/// docs/DEPLOY.md shows the configuration this file runs.
#[test]
fn the_deploy_guide_shows_the_tested_configuration() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/DEPLOY.md"))
        .expect("docs/DEPLOY.md");
    for line in DEFAULTS.iter().chain(BACKEND_OPTIONS) {
        assert!(
            doc.lines().any(|l| l.trim() == *line),
            "docs/DEPLOY.md lacks `{line}`"
        );
    }
    assert!(
        doc.lines()
            .any(|l| l.trim().starts_with("server ") && l.ends_with(PROXY_SERVER_OPTS)),
        "docs/DEPLOY.md shows no `server ...{PROXY_SERVER_OPTS}` line"
    );
    let flags = PROXY_ARGS.join(" ");
    assert!(
        doc.contains(&flags),
        "docs/DEPLOY.md does not show `echoport serve ... {flags}`"
    );
}
