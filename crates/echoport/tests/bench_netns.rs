//! Three bench processes in three network namespaces, each with its own address, load one
//! server in a fourth; `bench merge` combines their results, and the combination is exact:
//! the merged count is the sum, and the merged histogram (so its p99) is the histogram of
//! all the samples the three measured, concatenated.
//!
//! The namespaces and veth pairs are created here and removed when the test ends (a Drop
//! guard), with names holding this process's id; the addresses come from 198.18.0.0/15, the
//! range set aside for benchmarks (RFC 2544), and exist only inside those namespaces. The
//! root namespace is not touched. Needs root and iproute2's `ip netns`: without them the
//! test fails and says so.

mod bench_common;
mod common;

use std::process::Command;
use std::time::Duration;

use bench_common::*;
use common::Server;

/// Namespaces (and with them their veth ends), deleted on drop.
struct Netns {
    names: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs iproute2's `ip` (network namespaces): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}\nthis test needs root and network namespaces (`ip netns`)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn add(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// `ip netns exec NS echoport bench ...`, spawned.
fn bench_in(ns: &str, args: &[String]) -> std::process::Child {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            BIN,
            "bench",
            "--threads",
            "1",
            "--json",
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning a bench in a namespace")
}

#[test]
fn three_benches_in_three_namespaces_merge_exactly() {
    let pid = std::process::id();
    let mut ns = Netns { names: Vec::new() };
    let srv = format!("ep{pid}-srv");
    ns.add(&srv);
    let mut clients = Vec::new();
    for i in 1..=3u32 {
        let c = format!("ep{pid}-c{i}");
        ns.add(&c);
        // Interface names are at most 15 bytes: "e" + pid + "a"/"b" + i.
        let (a, b) = (format!("e{pid}a{i}"), format!("e{pid}b{i}"));
        ip(&[
            "link", "add", "name", &a, "netns", &c, "type", "veth", "peer", "name", &b, "netns",
            &srv,
        ]);
        let (client_ip, server_ip) = (
            format!("198.18.0.{}", 4 * i + 2),
            format!("198.18.0.{}", 4 * i + 1),
        );
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{client_ip}/30"),
            "dev",
            &a,
        ]);
        ip(&[
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{server_ip}/30"),
            "dev",
            &b,
        ]);
        ip(&["-n", &c, "link", "set", &a, "up"]);
        ip(&["-n", &srv, "link", "set", &b, "up"]);
        clients.push((c, client_ip, server_ip));
    }
    let server = Server::start_wrapped(
        &["ip", "netns", "exec", &srv],
        &["--threads", "1", "--listen", "0.0.0.0:0"],
    );
    let port = server.addr().port();
    let dir = Scratch::new("netns");
    let start = format!("{:.3}", unix_now() + 2.0);
    let mut children = Vec::new();
    for (i, (c, client_ip, server_ip)) in clients.iter().enumerate() {
        let args: Vec<String> = [
            &format!("{server_ip}:{port}")[..],
            "-c",
            "4",
            "-r",
            &format!("{}", 500 * (i + 1)),
            "-d",
            "2s",
            "--warmup",
            "300ms",
            "--source",
            client_ip,
            "--start-at",
            &start,
            "--tag",
            &format!("c{}", i + 1),
            "--raw-samples",
            &dir.arg(&format!("raw{i}.txt")),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        children.push(bench_in(c, &args));
    }
    let mut files = Vec::new();
    let mut docs = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = wait_output(child, Duration::from_secs(60));
        let d = doc(&out);
        assert_eq!(out.status.code(), Some(0), "bench {i}: {}", stderr(&out));
        let f = dir.arg(&format!("run{i}.json"));
        std::fs::write(&f, &out.stdout).unwrap();
        files.push(f);
        docs.push(d);
    }
    let stopped = server.stop();
    assert_eq!(
        stopped.stat("accepted"),
        12,
        "three benches of four connections: {}",
        stopped.log
    );

    let args: Vec<&str> = files.iter().map(String::as_str).chain(["--json"]).collect();
    let out = merge(&args);
    let m = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        m["warnings"].as_array().unwrap().len(),
        0,
        "started together: {m:#}"
    );
    let mr = &m["runs"][0];

    // The count is the sum, and each bench measured what its rate says.
    let counts: Vec<f64> = docs.iter().map(|d| num(d, "runs.0.messages")).collect();
    assert_eq!(
        counts,
        vec![1000.0, 2000.0, 3000.0],
        "500, 1000, 1500 msgs/s for 2 s"
    );
    assert_eq!(num(mr, "messages"), counts.iter().sum::<f64>());
    assert_eq!(num(mr, "connections.established"), 12.0);

    // The merged histogram is that of every sample of the three, concatenated.
    let mut all = Vec::new();
    for i in 0..3 {
        all.extend(samples(&dir.path(&format!("raw{i}.txt"))));
    }
    assert_eq!(all.len(), 6000);
    let mut concat = empty();
    for &v in &all {
        concat.record(v).unwrap();
    }
    let merged = latency(&m, 0);
    assert_eq!(
        merged, concat,
        "merged histogram == histogram of the concatenated samples"
    );
    let p99_us = |h: &hdrhistogram::Histogram<u64>| {
        (h.value_at_quantile(0.99) as f64 / 1000.0 * 1000.0).round() / 1000.0
    };
    assert_eq!(
        num(mr, "latency_us.p99"),
        p99_us(&concat),
        "merged p99 == p99 of the samples"
    );
    // And that is the samples' own p99 to the histogram's precision (3 digits).
    all.sort_unstable();
    let exact = all[(all.len() as f64 * 0.99).ceil() as usize - 1] as f64 / 1000.0;
    let got = num(mr, "latency_us.p99");
    assert!(
        (got - exact).abs() <= exact * 0.001 + 0.001,
        "p99 {got} us, samples' {exact} us"
    );

    // The windows line up: all three started at the same wall-clock time.
    let starts: Vec<f64> = docs
        .iter()
        .map(|d| num(d, "runs.0.window_start_unix_s"))
        .collect();
    let spread = starts.iter().cloned().fold(f64::MIN, f64::max)
        - starts.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread < 0.25, "window starts {starts:?}");
    assert!(num(mr, "common_window_s") > 1.5, "{mr:#}");
}
