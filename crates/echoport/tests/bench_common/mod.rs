//! Helpers of the `bench_*` test files: running `echoport bench` (and `bench merge`), reading
//! its JSON, decoding its lossless histograms, scratch directories that clean up.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_echoport");

/// `echoport bench ADDR --threads 1 --json ARGS`, to completion.
pub fn bench(addr: SocketAddr, args: &[&str]) -> Output {
    bench_cmd(addr, args).output().expect("run echoport bench")
}

/// The command [`bench`] runs, to spawn it instead.
pub fn bench_cmd(addr: SocketAddr, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("bench")
        .arg(addr.to_string())
        .args(["--threads", "1", "--json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `echoport bench merge ARGS`, to completion.
pub fn merge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["bench", "merge"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run echoport bench merge")
}

/// Waits for a spawned bench, killing it after `limit`.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("waiting for bench").is_some() {
            return child.wait_with_output().expect("bench output");
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("bench output");
            panic!(
                "bench did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON document on stdout (the summary, on stderr, is printed for failing tests).
pub fn doc(out: &Output) -> Value {
    eprintln!("{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}); status {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// The value at a dotted path (`runs.0.latency_us.p99`).
pub fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
    }
    cur
}

pub fn num(v: &Value, path: &str) -> f64 {
    at(v, path)
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

/// A histogram from its text form (V2 compressed, base64), decoded by the library itself.
pub fn decode(text: &str) -> Histogram<u64> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("histogram is base64");
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .expect("histogram is HdrHistogram V2")
}

/// The lossless latency histogram of run `i` of a bench (or merge) document.
pub fn latency(d: &Value, i: usize) -> Histogram<u64> {
    let h = &d["runs"][i]["histograms"];
    assert_eq!(h["unit"], "ns", "{h:#}");
    decode(h["latency"].as_str().expect("histograms.latency"))
}

/// An empty histogram of the bench's bounds (1 ns to an hour, 3 digits).
pub fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap()
}

/// The values a `--raw-samples` file holds.
pub fn samples(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| l.parse().expect("one number a line"))
        .collect()
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("echoport-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    /// The path as a `&str` argument.
    pub fn arg(&self, f: &str) -> String {
        self.path(f).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
