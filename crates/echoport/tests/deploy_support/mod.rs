//! Helpers of the deployment tests (`deploy_*.rs`): a minimal HTTP client for the metrics
//! endpoint, a Prometheus text parser, and `echoport bench` with its JSON result.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_echoport");

/// The metrics address from a server's `metrics on http://ADDR/metrics` line.
pub fn metrics_addr(log: &str) -> SocketAddr {
    log.lines()
        .find_map(|l| l.split("metrics on http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no `metrics on http://ADDR/metrics` line in:\n{log}"))
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// Sends one request on `stream` (keep-alive unless `extra` says otherwise) and reads the
/// answer (its body by Content-Length).
pub fn request(stream: &mut TcpStream, method: &str, path: &str, extra: &str) -> Answer {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
    stream.write_all(req.as_bytes()).expect("sending a request");
    read_answer(stream, method == "HEAD")
}

/// Reads one answer from `stream`.
pub fn read_answer(stream: &mut TcpStream, head_only: bool) -> Answer {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "answer head cut short ({other:?}) after {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf).expect("an ASCII head");
    let mut lines = head.lines();
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    let mut body = vec![0u8; if head_only { 0 } else { len }];
    stream.read_exact(&mut body).expect("reading the body");
    Answer {
        status,
        headers,
        body: String::from_utf8(body).expect("a UTF-8 body"),
    }
}

/// GET /metrics on a fresh connection.
pub fn scrape(addr: SocketAddr) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connecting to the metrics endpoint");
    request(&mut s, "GET", "/metrics", "Connection: close\r\n")
}

/// Samples of a Prometheus text exposition, by name with labels (`a_total{worker="0"}`).
#[derive(Debug, Default)]
pub struct Samples(pub HashMap<String, u64>);

impl Samples {
    /// Parses the text, checking every sample line's shape and that its family was typed.
    pub fn parse(text: &str) -> Samples {
        let mut typed = Vec::new();
        let mut out = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.push(rest.split(' ').next().unwrap().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {line:?}"));
            let name = key.split('{').next().unwrap();
            assert!(typed.iter().any(|t| t == name), "{name} has no TYPE line");
            let v: u64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            out.insert(key.to_string(), v);
        }
        Samples(out)
    }

    /// The sum of every sample of metric `name` (over its labels).
    pub fn sum(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// One sample, by its full key.
    pub fn get(&self, key: &str) -> Option<u64> {
        self.0.get(key).copied()
    }
}

/// Scrapes until `done` holds (or 10 s pass), returning the last samples.
pub fn scrape_until(addr: SocketAddr, done: impl Fn(&Samples) -> bool) -> Samples {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = scrape(addr);
        assert_eq!(a.status, 200, "{a:?}");
        let s = Samples::parse(&a.body);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `echoport bench ADDR ARGS --json -q` (bounded: killed after `limit`); returns its
/// exit code and JSON document.
pub fn bench(addr: SocketAddr, args: &[&str], limit: Duration) -> (Option<i32>, Value) {
    let mut child = Command::new(BIN)
        .arg("bench")
        .arg(addr.to_string())
        .args(args)
        .args(["--json", "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting echoport bench");
    use echoport_testkit::child::{collect, wait_or_kill};
    let reader = collect(child.stdout.take().unwrap());
    let err_reader = collect(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, limit, "echoport bench");
    let stdout = reader.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    let doc = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
        panic!(
            "bench stdout is not JSON ({e}); status {status}\nstdout:\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&stdout)
        )
    });
    (status.code(), doc)
}

/// A number at a dotted path of a JSON document (`runs.0.bytes`).
pub fn num(doc: &Value, path: &str) -> u64 {
    let mut v = doc;
    for part in path.split('.') {
        v = match part.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[part],
        };
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("no number at {path} in {doc:#}"))
}

/// The path of a program on PATH (or in /usr/sbin, /sbin, where Debian puts daemons), or a
/// failure saying which package CI must install.
pub fn require(program: &str, package: &str) -> std::path::PathBuf {
    find(program).unwrap_or_else(|| {
        panic!("{program} is missing: .ci/run must install the Debian package {package}")
    })
}

/// The path of a program on PATH, /usr/sbin or /sbin.
pub fn find(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
