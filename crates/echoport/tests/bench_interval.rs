//! `--interval` and `--interval-json`: throughput and percentiles per interval, printed and
//! written as JSON lines, adding up to the run; a stall shows in the interval it hit.

mod bench_common;
mod common;

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use bench_common::*;
use common::Server;
use serde_json::Value;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn intervals_are_printed_written_and_add_up_to_the_run() {
    let server = Server::start(&["--threads", "1"]);
    let dir = Scratch::new("intervals");
    let out = bench(
        server.addr(),
        &[
            "-c",
            "4",
            "-r",
            "2000",
            "-d",
            "2200ms",
            "--warmup",
            "300ms",
            "--interval",
            "500ms",
            "--interval-json",
            &dir.arg("iv.jsonl"),
            "--tag",
            "t1",
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(num(&d, "params.interval_s"), 0.5);
    let r = &d["runs"][0];
    let iv = lines(&dir.path("iv.jsonl"));
    assert_eq!(iv.len(), 5, "2.2 s in intervals of 0.5 s: {iv:#?}");
    let mut total = 0.0;
    for (k, v) in iv.iter().enumerate() {
        assert_eq!(num(v, "interval"), k as f64);
        assert_eq!(num(v, "t_s"), k as f64 * 0.5);
        assert_eq!(v["tag"], "t1");
        let len = num(v, "length_s");
        if k < 4 {
            assert_eq!(len, 0.5);
            let rate = num(v, "msgs_per_sec");
            assert!(
                (1500.0..=2500.0).contains(&rate),
                "interval {k}: {rate} msgs/s"
            );
        } else {
            assert!((0.15..=0.3).contains(&len), "last interval {len} s");
        }
        let p: Vec<f64> = ["p50", "p99", "p99_9", "max"]
            .iter()
            .map(|q| num(v, &format!("latency_us.{q}")))
            .collect();
        assert!(p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]), "{v}");
        let start = num(v, "start_unix_s") - num(r, "window_start_unix_s");
        assert!((start - k as f64 * 0.5).abs() < 1e-3, "{v}");
        total += num(v, "messages");
    }
    assert_eq!(total, num(r, "messages"), "the intervals add up to the run");
    let err = stderr(&out);
    let printed: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("  interval "))
        .collect();
    assert_eq!(printed.len(), 5, "{err}");
    assert!(
        printed[1].contains("0.5-1.0 s") && printed[1].contains("msgs/s  p50 "),
        "{err}"
    );
    assert!(
        printed[1].contains(" p99.9 ") && printed[1].contains(" max "),
        "{err}"
    );
}

/// Echoes faithfully, except that once 64,000 bytes have come in it stops for 600 ms.
fn stalls_600ms(s: TcpStream) {
    common::echo_stalling(s, 64_000, Duration::from_millis(600));
}

#[test]
fn a_stall_shows_in_the_intervals_it_hit_and_not_in_the_others() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            s.set_nodelay(true).unwrap();
            thread::spawn(move || stalls_600ms(s));
        }
    });
    let dir = Scratch::new("stall-intervals");
    // 1,000 msgs/s of 64 B on one connection: the stall begins 1 s into the 0.5 s warm-up
    // plus 0.5 s measured, i.e. about 0.5 s into the measured window.
    let out = bench(
        addr,
        &[
            "-c",
            "1",
            "-r",
            "1000",
            "-d",
            "3s",
            "--warmup",
            "500ms",
            "--interval",
            "500ms",
            "--interval-json",
            &dir.arg("iv.jsonl"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let iv = lines(&dir.path("iv.jsonl"));
    // Six intervals, and a seventh sliver when the last echo came back after the 3 s.
    assert!((6..=7).contains(&iv.len()), "{iv:#?}");
    // An interval with no echo completed has no percentiles (null).
    let q = |v: &Value, k: &str| at(v, &format!("latency_us.{k}")).as_f64().unwrap_or(0.0);
    let max: Vec<f64> = iv.iter().map(|v| q(v, "max")).collect();
    let msgs: Vec<f64> = iv.iter().map(|v| num(v, "messages")).collect();
    let hit = (0..iv.len())
        .find(|&k| max[k] >= 400_000.0)
        .unwrap_or_else(|| panic!("no interval saw the 600 ms stall: max {max:?}"));
    assert!(hit <= 2, "the stall came about 0.5 s in: {max:?}");
    assert!(
        msgs.iter().any(|&m| m < 250.0),
        "an interval the stall covered completed few echoes: {msgs:?}"
    );
    // Intervals with echoes in them (a sliver after the end may have none, and no
    // percentiles: it is not calm, it is empty).
    let calm = iv[hit + 2..]
        .iter()
        .filter(|v| num(v, "messages") > 0.0 && num(v, "latency_us.p99") < 100_000.0);
    assert!(
        calm.count() >= 1,
        "after the stall the tail is small again: {max:?}"
    );
}
