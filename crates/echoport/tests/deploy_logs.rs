//! `--log-format json`: every line a server writes on stderr, from start to stop, is one JSON
//! object, and the start-up, listening and stopped lines carry their fields with their types
//! (numbers as numbers); a fatal error is a JSON line too.

mod deploy_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use deploy_support::BIN;
use serde_json::Value;

/// The first line whose message starts with `prefix`.
fn line<'a>(lines: &'a [Value], prefix: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
}

fn echo(addr: SocketAddr, msg: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Runs a JSON-logging server (3 connections echoed, then SIGTERM); returns every line it
/// wrote on stderr and the address it listened on.
fn json_run() -> (Vec<String>, SocketAddr) {
    let mut child = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "2",
        ])
        .args([
            "--udp",
            "--metrics",
            "127.0.0.1:0",
            "--buffers",
            "3",
            "--shutdown-timeout",
            "5",
            "--backend",
            "io-uring",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let Ok(l) = l else { break };
            let _ = tx.send(l);
        }
    });
    let mut raw = Vec::new();
    let addr: SocketAddr = loop {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no listening line within 30 s");
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        raw.push(l);
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on "))
        {
            let m = v["message"].as_str().unwrap();
            break m["listening on ".len()..]
                .parse()
                .expect("listening on ADDR");
        }
    };
    for i in 0..3 {
        echo(addr, format!("message {i}").as_bytes());
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    raw.extend(rx.try_iter());
    assert!(status.success(), "exit {status}:\n{}", raw.join("\n"));

    (raw, addr)
}

#[test]
fn every_line_is_json_and_the_key_lines_carry_their_fields() {
    let (raw, addr) = json_run();
    let lines: Vec<Value> = raw
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for (l, v) in raw.iter().zip(&lines) {
        assert!(l.starts_with("{\"timestamp\":\""), "{l}");
        for key in ["timestamp", "level", "message"] {
            assert!(v[key].is_string(), "no {key} in {l}");
        }
    }
    let start = line(&lines, "echoport serving");
    assert_eq!(start["level"], "INFO");
    assert!(
        start["backend"].as_str().unwrap().starts_with("io_uring"),
        "{start}"
    );
    for (key, want) in [
        ("threads", 2),
        ("buffers", 4),
        ("buf_size", 8192),
        ("max_pending", 65536),
    ] {
        assert_eq!(start[key].as_u64(), Some(want), "{key} in {start}");
    }
    assert!(start["max_connections"].as_u64().unwrap() > 0, "{start}");
    assert!(start["nofile"].as_u64().unwrap() > 0, "{start}");
    assert_eq!(start["shutdown_timeout"], "5s");
    assert!(
        start["adjusted"]
            .as_str()
            .unwrap()
            .contains("--buffers 3 rounded up to 4")
    );
    assert_eq!(start["addrs"], addr.to_string());
    assert_eq!(
        line(&lines, "listening on ")["message"],
        format!("listening on {addr}")
    );
    assert_eq!(line(&lines, "UDP echo on ")["addr"], addr.to_string());
    assert!(
        line(&lines, "metrics on http://")["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(line(&lines, "stopping")["signal"].as_i64(), Some(15));
    let stopped = line(&lines, "stopped");
    let bytes: u64 = (0..3).map(|i| format!("message {i}").len() as u64).sum();
    for (key, want) in [
        ("accepted", 3),
        ("closed", 3),
        ("errors", 0),
        ("bytes_echoed", bytes),
        ("udp_echoed", 0),
    ] {
        assert_eq!(stopped[key].as_u64(), Some(want), "{key} in {stopped}");
    }
    let per_thread = stopped["accepted_per_thread"].as_str().unwrap();
    let sum: u64 = per_thread
        .split(',')
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, 3, "{per_thread}");
}

#[test]
fn a_fatal_error_is_a_json_line_too() {
    let out = Command::new(BIN)
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--buffers",
            "0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    let v: Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    assert_eq!(v["level"], "ERROR");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("--buffers 0: must be 1 to 32768"),
        "{v}"
    );
}
