//! Lossless results and their exact combination: every bench run carries its histogram in
//! HdrHistogram's own encoding and can write an interval log; `bench merge` adds counts and
//! histograms (never averages percentiles) and flags runs that missed their rate or ran at
//! another time; `--start-at` / `--start-in` start processes together.

mod bench_common;
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bench_common::*;
use common::Server;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
use serde_json::{Value, json};

#[test]
fn a_run_carries_its_histogram_losslessly_and_writes_an_interval_log() {
    let server = Server::start(&["--threads", "1"]);
    let dir = Scratch::new("lossless");
    let out = bench(
        server.addr(),
        &[
            "-c",
            "4",
            "-r",
            "3000",
            "-d",
            "2500ms",
            "--warmup",
            "300ms",
            "--tag",
            "host-a",
            "--hlog",
            &dir.arg("run.hlog"),
            "--raw-samples",
            &dir.arg("raw.txt"),
        ],
    );
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(d["tag"], "host-a");
    let r = &d["runs"][0];
    let messages = num(r, "messages") as u64;
    assert!(messages > 6000, "{r:#}");
    // A busy machine may get to a message intended inside the window only after it closed:
    // it is still measured (from its intended time) but counted apart from the load offered.
    assert_eq!(
        num(r, "sent") as u64 + num(r, "sent_late") as u64,
        messages,
        "every measured message sent came back: {r:#}"
    );
    assert_eq!(
        at(r, "histograms.encoding"),
        "HdrHistogram V2 compressed (deflate), base64"
    );

    // The histogram in the JSON is exactly the measured latencies.
    let h = latency(&d, 0);
    let raw = samples(&dir.path("raw.txt"));
    assert_eq!(raw.len() as u64, messages);
    let mut from_raw = empty();
    for &v in &raw {
        from_raw.record(v).unwrap();
    }
    assert_eq!(
        h, from_raw,
        "the encoded histogram differs from the samples"
    );
    assert_eq!(
        num(r, "latency_us.p99"),
        (h.value_at_quantile(0.99) as f64 / 1000.0 * 1000.0).round() / 1000.0,
        "the reported p99 is the histogram's"
    );
    let (w0, w1) = (num(r, "window_start_unix_s"), num(r, "window_end_unix_s"));
    assert!((w1 - w0 - num(r, "window_s")).abs() < 1e-3, "{r:#}");
    assert!(
        (unix_now() - w1).abs() < 30.0,
        "the window is wall-clock time: {w1}"
    );

    // The interval log: HdrHistogram's own parser reads it; one interval a second, tagged,
    // and together they hold every measured echo.
    let text = std::fs::read(dir.path("run.hlog")).unwrap();
    let shown = String::from_utf8_lossy(&text).into_owned();
    assert!(
        shown.contains("#[StartTime: ") && shown.contains("#[BaseTime: "),
        "{shown}"
    );
    assert!(
        shown.contains("\"StartTimestamp\",\"Interval_Length\""),
        "{shown}"
    );
    let entries: Vec<LogEntry> = IntervalLogIterator::new(&text)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e:?} in\n{shown}"));
    let base = entries
        .iter()
        .find_map(|e| match e {
            LogEntry::BaseTime(b) => Some(b.as_secs_f64()),
            _ => None,
        })
        .expect("a BaseTime");
    assert!(
        (base - w0).abs() < 0.002,
        "BaseTime {base} is the window's start {w0}"
    );
    let ivs: Vec<_> = entries
        .iter()
        .filter_map(|e| match e {
            LogEntry::Interval(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(ivs.len(), 3, "2.5 s in intervals of 1 s:\n{shown}");
    let mut union = empty();
    for (k, iv) in ivs.iter().enumerate() {
        assert_eq!(iv.tag().map(|t| t.as_str()), Some("host-a"));
        assert_eq!(iv.start_timestamp(), Duration::from_secs(k as u64));
        let length = iv.duration().as_secs_f64();
        if k < 2 {
            assert_eq!(length, 1.0);
        } else {
            assert!((0.45..=0.6).contains(&length), "last interval {length} s");
        }
        let part = decode(iv.encoded_histogram());
        assert!(
            part.len() > 1000,
            "interval {k} holds {} echoes",
            part.len()
        );
        union.add(&part).unwrap();
    }
    assert_eq!(union, h, "the intervals add up to the run");
}

/// A bench document with one open-loop run, as `bench --json` writes it (the fields merge
/// reads), holding `values` (ns, count).
fn synthetic(tag: &str, target: f64, sent_rate: f64, start: f64, values: &[(u64, u64)]) -> Value {
    let mut h = empty();
    for &(v, n) in values {
        h.record_n(v, n).unwrap();
    }
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(&h, &mut bytes)
        .unwrap();
    json!({
        "schema": "echoport-bench/1",
        "tag": tag,
        "runs": [{
            "mode": "open",
            "target_rate": target,
            "window_start_unix_s": start,
            "window_end_unix_s": start + 10.0,
            "window_s": 10.0,
            "messages": h.len(),
            "bytes": h.len() * 64,
            "sent": h.len(),
            "msgs_per_sec": sent_rate,
            "sent_per_sec": sent_rate,
            "histograms": {
                "encoding": "HdrHistogram V2 compressed (deflate), base64",
                "unit": "ns",
                "latency": base64::engine::general_purpose::STANDARD.encode(&bytes),
            },
            "errors": { "mismatch": 0, "total": 0 },
            "connections": { "established": 5, "failed": 0, "errors": {} },
            "ok": true,
        }],
    })
}

fn write(dir: &Scratch, name: &str, v: &Value) -> String {
    std::fs::write(dir.path(name), serde_json::to_string(v).unwrap()).unwrap();
    dir.arg(name)
}

#[test]
fn merge_reads_percentiles_from_the_summed_histogram_not_from_averages() {
    let dir = Scratch::new("merge-exact");
    // A: 9,900 echoes at 100 us. B: 100 echoes at 50 ms. Merged, 1 % of the echoes took
    // 50 ms, so p99 is 100 us and p99.9 is 50 ms; the average of the two p99s (25 ms) or of
    // the two p99.9s would be wrong both ways.
    let t0 = 1_800_000_000.0;
    let a = write(
        &dir,
        "a.json",
        &synthetic("a", 990.0, 990.0, t0, &[(100_000, 9_900)]),
    );
    let b = write(
        &dir,
        "b.json",
        &synthetic("b", 10.0, 10.0, t0 + 0.2, &[(50_000_000, 100)]),
    );
    let out = merge(&[&a, &b, "--json", "--svg", &dir.arg("m.svg")]);
    let d = doc(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(d["schema"], "echoport-bench-merge/1");
    let m = &d["runs"][0];
    assert_eq!(num(m, "messages"), 10_000.0);
    assert_eq!(num(m, "bytes"), 640_000.0);
    assert_eq!(num(m, "connections.established"), 10.0);
    assert_eq!(
        num(m, "msgs_per_sec"),
        1000.0,
        "throughputs of side-by-side runs add"
    );
    assert_eq!(num(m, "target_rate"), 1000.0);
    let p99 = num(m, "latency_us.p99");
    assert!((99.0..=101.0).contains(&p99), "merged p99 {p99} us");
    let p999 = num(m, "latency_us.p99_9");
    assert!(
        (49_900.0..=50_100.0).contains(&p999),
        "merged p99.9 {p999} us"
    );
    let mut want = empty();
    want.record_n(100_000, 9_900).unwrap();
    want.record_n(50_000_000, 100).unwrap();
    assert_eq!(
        latency(&d, 0),
        want,
        "the merged document's histogram is the sum"
    );
    assert_eq!(m["missed_rate"], false);
    assert_eq!(m["off_window"], false);
    assert_eq!(d["warnings"].as_array().unwrap().len(), 0, "{d:#}");
    let svg = std::fs::read_to_string(dir.path("m.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline") && svg.contains("10,000 messages")
    );
    let err = stderr(&out);
    assert!(
        err.contains("[a]") && err.contains("[b]") && err.contains("result       OK"),
        "{err}"
    );
}

#[test]
fn merge_flags_a_run_that_missed_its_rate_or_ran_at_another_time() {
    let dir = Scratch::new("merge-flags");
    let t0 = 1_800_000_000.0;
    let ok = write(
        &dir,
        "ok.json",
        &synthetic("ok", 1000.0, 1000.0, t0, &[(1000, 10)]),
    );
    let slow = write(
        &dir,
        "slow.json",
        &synthetic("slow", 1000.0, 980.0, t0, &[(1000, 10)]),
    );
    let late = write(
        &dir,
        "late.json",
        &synthetic("late", 1000.0, 1000.0, t0 + 3600.0, &[(1000, 10)]),
    );
    let out = merge(&[&ok, &slow, &late, "--json"]);
    let d = doc(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "warnings alone do not fail: {}",
        stderr(&out)
    );
    let runs = d["runs"][0]["runs"].as_array().unwrap();
    let flags: Vec<(bool, bool)> = runs
        .iter()
        .map(|r| {
            (
                r["missed_rate"].as_bool().unwrap(),
                r["off_window"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        vec![(false, false), (true, false), (false, true)],
        "{d:#}"
    );
    assert_eq!(num(&runs[1], "sent_ratio"), 0.98);
    let warnings: Vec<&str> = d["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("slow.json") && warnings[0].contains("sent 98.00 %"));
    assert!(warnings[1].contains("late.json") && warnings[1].contains("does not overlap"));
    let err = stderr(&out);
    assert!(
        err.contains("warning: ") && err.contains("(2 warnings)"),
        "{err}"
    );
    let strict = merge(&[&ok, &slow, &late, "--strict"]);
    assert_eq!(strict.status.code(), Some(1), "--strict fails on warnings");
}

#[test]
fn merge_refuses_what_it_cannot_combine_exactly() {
    let dir = Scratch::new("merge-bad");
    let good = synthetic("g", 100.0, 100.0, 1e9, &[(1000, 10)]);
    let g = write(&dir, "good.json", &good);
    let mut no_hist = good.clone();
    no_hist["runs"][0]["histograms"] = Value::Null;
    let mut wrong_count = good.clone();
    wrong_count["runs"][0]["messages"] = json!(11);
    let mut other_schema = good.clone();
    other_schema["schema"] = json!("something/9");
    let mut two_runs = good.clone();
    let run = two_runs["runs"][0].clone();
    two_runs["runs"].as_array_mut().unwrap().push(run);
    std::fs::write(dir.path("garbage.json"), "not json").unwrap();
    for (name, v, want) in [
        ("nohist.json", Some(no_hist), "no lossless histogram"),
        (
            "count.json",
            Some(wrong_count),
            "holds 10 values but it reports 11",
        ),
        ("schema.json", Some(other_schema), "schema"),
        ("two.json", Some(two_runs), "holds 2 runs"),
        ("garbage.json", None, "not JSON"),
    ] {
        let path = match v {
            Some(v) => write(&dir, name, &v),
            None => dir.arg(name),
        };
        let out = merge(&[&g, &path]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = stderr(&out);
        assert!(err.contains(want) && err.contains("json"), "{name}: {err}");
    }
    let out = merge(&[]);
    assert_ne!(out.status.code(), Some(0), "no files");
}

#[test]
fn start_at_lines_up_processes_started_at_different_times() {
    let server = Server::start(&["--threads", "1"]);
    let at = (unix_now() + 2.0).to_string();
    let args = [
        "-c",
        "2",
        "-r",
        "500",
        "-d",
        "500ms",
        "--warmup",
        "200ms",
        "--start-at",
        &at,
    ];
    let first = bench_cmd(server.addr(), &args).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let second = bench_cmd(server.addr(), &args).spawn().unwrap();
    let (a, b) = (
        wait_output(first, Duration::from_secs(30)),
        wait_output(second, Duration::from_secs(30)),
    );
    let at: f64 = at.parse().unwrap();
    for out in [&a, &b] {
        let d = doc(out);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
        assert_eq!(num(&d, "params.start_at_unix_s"), (at * 1e6).round() / 1e6);
        let start = num(&d, "runs.0.start_unix_s");
        assert!(
            (0.0..0.25).contains(&(start - at)),
            "started {} s after --start-at",
            start - at
        );
        assert!(stderr(out).contains("waiting"), "{}", stderr(out));
    }

    // A time already past starts at once, with a warning.
    let past = (unix_now() - 100.0).to_string();
    let out = bench(
        server.addr(),
        &[
            "-c",
            "1",
            "-d",
            "200ms",
            "--warmup",
            "0",
            "--start-at",
            &past,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("passed"), "{}", stderr(&out));
    let bad = bench(server.addr(), &["--start-at", "tomorrow"]);
    assert!(stderr(&bad).contains("bad time"), "{}", stderr(&bad));
}

#[test]
fn ctrl_c_while_waiting_for_the_start_exits_at_once() {
    let server = Server::start(&["--threads", "1"]);
    let child = bench_cmd(server.addr(), &["--start-in", "60s"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out = wait_output(child, Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        stderr(&out).contains("before the start time"),
        "{}",
        stderr(&out)
    );
}
