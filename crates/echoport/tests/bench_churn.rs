//! Connection churn: `--messages-per-conn K` closes each connection after K echoes and opens
//! another (paced by the open loop), `--close fin|rst`, the connect-time and first-echo
//! histograms, connects/s; `--reconnect` rides through a server restart.

mod bench_common;
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use bench_common::*;
use common::Server;
use rustix::process::Signal;
use serde_json::Value;

/// How a connection to the recording server went: bytes echoed, and how it ended.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    bytes: usize,
    end: &'static str,
}

/// An echo server that records every connection.
fn recording_server() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let log = log.clone();
            thread::spawn(move || {
                let r = echo_counting(s);
                log.lock().unwrap().push(r);
            });
        }
    });
    (addr, seen)
}

fn echo_counting(mut s: TcpStream) -> Seen {
    s.set_nodelay(true).unwrap();
    let mut buf = [0u8; 16384];
    let mut bytes = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Seen { bytes, end: "fin" },
            Ok(n) => {
                bytes += n;
                if s.write_all(&buf[..n]).is_err() {
                    return Seen {
                        bytes,
                        end: "write error",
                    };
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Seen { bytes, end: "rst" },
            Err(_) => {
                return Seen {
                    bytes,
                    end: "error",
                };
            }
        }
    }
}

/// Waits (up to 5 s) until the recording server has seen `n` connections end.
fn ended(seen: &Mutex<Vec<Seen>>, n: usize) -> Vec<Seen> {
    for _ in 0..500 {
        let v = seen.lock().unwrap().clone();
        if v.len() >= n {
            return v;
        }
        thread::sleep(Duration::from_millis(10));
    }
    seen.lock().unwrap().clone()
}

fn churn_run(close: &str) -> (Value, Vec<Seen>) {
    let (addr, seen) = recording_server();
    let out = bench(
        addr,
        &[
            "-c",
            "4",
            "-r",
            "2000",
            "-d",
            "1500ms",
            "--warmup",
            "0",
            "-s",
            "64",
            "--messages-per-conn",
            "25",
            "--close",
            close,
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let established = num(&d, "runs.0.connections.established") as usize;
    (d, ended(&seen, established))
}

fn assert_churned(d: &Value, seen: &[Seen], close: &str) {
    let r = &d["runs"][0];
    let msgs = num(r, "messages");
    assert_eq!(
        msgs, 3000.0,
        "every message intended in the 1.5 s, however late: {r:#}"
    );
    let established = num(r, "connections.established") as usize;
    let closes = num(r, "connections.closes");
    assert_eq!(
        seen.len(),
        established,
        "the server saw every connection: {seen:?}"
    );
    // Every connection carried at most K = 25 messages (the last few, cut by the end of
    // the run, fewer); those closed for churn exactly 25.
    let full = seen.iter().filter(|s| s.bytes == 25 * 64).count();
    assert!(seen.iter().all(|s| s.bytes <= 25 * 64), "{seen:?}");
    assert!(
        full as f64 >= closes,
        "{full} full connections, {closes} closes"
    );
    assert!(
        seen.len() as f64 >= msgs / 25.0,
        "{} connections for {msgs}",
        seen.len()
    );
    assert!(
        (closes - msgs / 25.0).abs() <= 4.0,
        "{closes} closes for {msgs} messages"
    );
    assert!(
        seen.iter()
            .filter(|s| s.bytes == 25 * 64)
            .all(|s| s.end == close),
        "every churned connection ended with {close}: {seen:?}"
    );
    // The open loop paces the churn: 2,000 msgs/s over 25 a connection is 80 connects/s.
    let rate = num(r, "connections.connects_per_sec");
    assert!((60.0..=100.0).contains(&rate), "{rate} connects/s");
    let in_window = num(r, "connections.in_window");
    // With no warm-up every connect counts, but for those begun after the end (for
    // messages intended before it that were still waiting for a connection).
    assert!(
        in_window <= established as f64 && in_window >= 0.8 * established as f64,
        "{in_window} of {established}"
    );
    assert_eq!(num(r, "connections.connect_us.count"), in_window);
    let first = num(r, "connections.first_echo_us.count");
    assert!(first >= closes && first <= in_window, "{r:#}");
    assert!(num(r, "connections.connect_us.p50") > 0.0);
    assert!(
        num(r, "connections.first_echo_us.p50") >= num(r, "connections.connect_us.p50"),
        "the first echo comes after the connect: {r:#}"
    );
    let h = decode(at(r, "histograms.connect").as_str().unwrap());
    assert_eq!(h.len() as f64, in_window);
    assert_eq!(num(r, "errors.total"), 0.0, "{r:#}");
    assert_eq!(num(d, "params.messages_per_conn"), 25.0);
    assert_eq!(d["params"]["close"], close);
}

#[test]
fn messages_per_conn_closes_with_fin_after_k_echoes_and_reopens() {
    let (d, seen) = churn_run("fin");
    assert_churned(&d, &seen, "fin");

    // Merged (here with itself), the churn counts and connect histograms add up.
    let dir = Scratch::new("churn-merge");
    std::fs::write(dir.path("a.json"), d.to_string()).unwrap();
    let a = dir.arg("a.json");
    let out = merge(&[&a, &a, "--json"]);
    let m = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (r, mr) = (&d["runs"][0], &m["runs"][0]);
    for k in ["closes", "in_window", "established", "reconnects"] {
        let path = format!("connections.{k}");
        assert_eq!(num(mr, &path), 2.0 * num(r, &path), "{k}");
    }
    let mut twice = decode(at(r, "histograms.connect").as_str().unwrap());
    twice.add(twice.clone()).unwrap();
    assert_eq!(
        decode(at(mr, "histograms.connect").as_str().unwrap()),
        twice
    );
    assert!(
        stderr(&out).contains("connects/s (sums)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn close_rst_resets_instead() {
    let (d, seen) = churn_run("rst");
    assert_churned(&d, &seen, "rst");
}

#[test]
fn the_closed_loop_churns_too_and_count_mode_still_counts_exactly() {
    let (addr, seen) = recording_server();
    let out = bench(
        addr,
        &[
            "-c",
            "2",
            "--pipeline",
            "4",
            "-n",
            "1000",
            "--warmup",
            "0",
            "--messages-per-conn",
            "10",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = &d["runs"][0];
    assert_eq!(num(r, "messages"), 1000.0);
    let established = num(r, "connections.established") as usize;
    let seen = ended(&seen, established);
    assert!(established >= 100, "{r:#}");
    assert!(seen.iter().all(|s| s.bytes <= 10 * 64), "{seen:?}");
    assert_eq!(seen.iter().map(|s| s.bytes).sum::<usize>(), 1000 * 64);
    let out = bench(addr, &["--messages-per-conn", "2", "--pipeline", "4"]);
    assert!(
        stderr(&out).contains("less than --pipeline"),
        "{}",
        stderr(&out)
    );
}

fn restart_run(reconnect: bool) -> Value {
    let first = Server::start(&["--threads", "1"]);
    let addr = first.addr();
    let mut args = vec!["-c", "4", "-r", "1000", "-d", "3s", "--warmup", "0"];
    if reconnect {
        args.push("--reconnect");
    }
    let child = bench_cmd(addr, &args).spawn().unwrap();
    thread::sleep(Duration::from_millis(1200));
    // Exit at once (a second signal), connections and all; back on the same port 300 ms
    // later.
    let mut first = first;
    first.signal(Signal::TERM);
    first.signal(Signal::TERM);
    assert!(
        first.wait_exit(Duration::from_secs(5)).is_some(),
        "the first server exits"
    );
    thread::sleep(Duration::from_millis(300));
    let listen = addr.to_string();
    let second = Server::start(&["--threads", "1", "--listen", &listen]);
    let out = wait_output(child, Duration::from_secs(30));
    let d = doc(&out);
    let code = out.status.code();
    drop(second);
    if reconnect {
        assert_eq!(code, Some(0), "{}", stderr(&out));
    } else {
        assert_eq!(code, Some(1), "{}", stderr(&out));
    }
    d
}

#[test]
fn reconnect_rides_through_a_server_restart() {
    let d = restart_run(true);
    let r = &d["runs"][0];
    assert_eq!(
        num(r, "errors.total"),
        0.0,
        "a restart is not an error: {r:#}"
    );
    assert_eq!(
        num(r, "connections.reconnects"),
        4.0,
        "each connection was closed once: {r:#}"
    );
    assert!(
        num(r, "connections.retries") >= 1.0,
        "the port was closed for 300 ms: {r:#}"
    );
    assert_eq!(num(r, "connections.established"), 8.0, "{r:#}");
    // Every message intended in the 3 s was sent (the ones due while no connection was up
    // went out late) and came back, except those abandoned: sent between the old server's
    // last echo and its close (up to a few hundred milliseconds' worth on a busy machine).
    let lost = num(r, "connections.abandoned_messages");
    assert_eq!(num(r, "messages") + lost, 3000.0, "{r:#}");
    assert!(lost <= 1000.0, "{r:#}");
    assert!(
        num(r, "latency_us.max") >= 250_000.0,
        "the gap shows in the tail: {r:#}"
    );
    assert_eq!(d["params"]["reconnect"], true);
}

#[test]
fn without_reconnect_a_server_restart_is_an_error() {
    let d = restart_run(false);
    let r = &d["runs"][0];
    assert_eq!(num(r, "errors.connection_lost"), 4.0, "{r:#}");
    assert_eq!(num(r, "connections.reconnects"), 0.0);
    assert_eq!(num(r, "connections.established"), 4.0, "{r:#}");
}
