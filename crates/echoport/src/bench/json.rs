//! The JSON document of a bench run (schema `echoport-bench/1`; fields are only ever added
//! within a version), and the pieces `bench merge` shares with it.
//!
//! Every run carries its histograms losslessly ([`super::hdr::encode`]) next to the
//! percentiles read from them, so any number of runs can be merged exactly later.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::hdr;
use super::params::{Load, Params};
use super::report::{Cpu, RunResult};
use super::tally::{Errors, UdpCounts};

/// Name and version of the JSON schema. Bump the number on any incompatible change.
pub const SCHEMA: &str = "echoport-bench/1";

/// `v` rounded to `places` decimals.
pub fn round(v: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (v * m).round() / m
}

/// CPU times, and per echo when known.
pub fn cpu_json(c: &Cpu, per_echo: Option<f64>) -> Value {
    json!({
        "user_s": round(c.user_s, 6),
        "system_s": round(c.system_s, 6),
        "total_s": round(c.total_s(), 6),
        "us_per_echo": per_echo.map(|v| round(v, 4)),
    })
}

/// Percentiles in microseconds of a histogram in nanoseconds (null when empty).
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    let q = |q: f64| round(h.value_at_quantile(q) as f64 / 1000.0, 3);
    json!({
        "count": h.len(),
        "min": round(h.min() as f64 / 1000.0, 3),
        "mean": round(h.mean() / 1000.0, 3),
        "stdev": round(h.stdev() / 1000.0, 3),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "p99_9": q(0.999),
        "p99_99": q(0.9999),
        "max": round(h.max() as f64 / 1000.0, 3),
    })
}

/// Errors by kind, and their total.
pub fn errors_json(e: &Errors) -> Value {
    let mut errors = serde_json::Map::new();
    for (k, n) in e.kinds() {
        errors.insert(k.into(), json!(n));
    }
    errors.insert("total".into(), json!(e.total()));
    Value::Object(errors)
}

/// The lossless histograms of a run, by name.
pub fn histograms_json(named: &[(&str, &Histogram<u64>)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("encoding".into(), json!(hdr::ENCODING));
    m.insert("unit".into(), json!("ns"));
    for (name, h) in named {
        m.insert((*name).into(), json!(hdr::encode(h)));
    }
    Value::Object(m)
}

fn run_json(r: &RunResult) -> Value {
    let t = &r.tally;
    let (mode, pipeline, target) = match r.load {
        Load::Closed { pipeline } => ("closed", Some(pipeline), None),
        Load::Open { rate } => ("open", None, Some(rate)),
    };
    json!({
        "mode": mode,
        "pipeline": pipeline,
        "target_rate": target,
        "start_unix_s": round(r.epoch_unix_s, 6),
        "window_start_unix_s": round(r.window_start_unix_s(), 6),
        "window_end_unix_s": round(r.window_end_unix_s(), 6),
        "window_s": round(r.window.as_secs_f64(), 6),
        "sent_window_s": round(r.sent_window.as_secs_f64(), 6),
        "messages": t.msgs,
        "bytes": t.bytes,
        "sent": t.sent,
        "sent_late": t.sent_late,
        "msgs_per_sec": round(r.msgs_per_sec(), 2),
        "mib_per_sec": round(r.mib_per_sec(), 4),
        "sent_per_sec": round(r.sent_per_sec(), 2),
        "rate_ratio": r.rate_ratio().map(|v| round(v, 5)),
        "max_send_lag_us": round(t.max_send_lag_ns as f64 / 1000.0, 1),
        "latency_us": latency_json(&t.hist),
        "histograms": histograms_json(&[
            ("latency", &t.hist),
            ("connect", &r.connect.hist),
            ("first_echo", &t.first_echo),
        ]),
        "connections": connections_json(r),
        "udp": r.udp.then(|| udp_json(&t.udp)),
        "errors": errors_json(&t.errors),
        "client_cpu": r.client_cpu.as_ref().map(|c| cpu_json(c, r.client_us_per_echo())),
        "server_cpu": r.server_cpu.as_ref().map(|(pid, c)| {
            let mut v = cpu_json(c, r.server_us_per_echo());
            v["pid"] = json!(pid);
            v
        }),
        "cq_overflows": t.overflows,
        "client_max_late_us": round(t.max_late_ns as f64 / 1000.0, 1),
        "interrupted": r.interrupted,
        "ok": !r.failed() && !r.interrupted,
    })
}

/// The UDP counts of a run.
pub fn udp_json(u: &UdpCounts) -> Value {
    json!({
        "sent": u.sent,
        "received": u.received,
        "lost": u.lost(),
        "loss_ratio": round(u.loss_ratio(), 6),
        "duplicates": u.duplicates,
        "reordered": u.reordered,
        "late": u.late,
        "send_blocked": u.send_blocked,
        "refused": u.refused,
        "host_rcvbuf_errors": u.host_rcvbuf_errors,
    })
}

fn connections_json(r: &RunResult) -> Value {
    let (c, churn) = (&r.connect, &r.tally.churn);
    json!({
        "established": c.established,
        "failed": c.failed,
        "errors": c.errors,
        "retries": c.retries,
        "in_window": c.in_window,
        "connects_per_sec": round(r.connects_per_sec(), 2),
        "closes": churn.closes,
        "reconnects": churn.reconnects,
        "abandoned_messages": churn.abandoned_msgs,
        "abandoned_bytes": churn.abandoned_bytes,
        "connect_us": latency_json(&c.hist),
        "first_echo_us": latency_json(&r.tally.first_echo),
    })
}

fn params_json(p: &Params) -> Value {
    let mode = if !p.sweep.is_empty() {
        "sweep"
    } else {
        match p.load {
            Load::Closed { .. } => "closed",
            Load::Open { .. } => "open",
        }
    };
    json!({
        "mode": mode,
        "connections": p.connections,
        "threads": p.threads,
        "cpus": p.cpus,
        "backend": clap::ValueEnum::to_possible_value(&p.backend).map(|v| v.get_name().to_string()),
        "connect_rate": p.connect_rate,
        "sources": p.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "proxy_protocol": p.proxy.map(|(v, src)| json!({
            "version": clap::ValueEnum::to_possible_value(&v).map(|v| v.get_name().to_string()),
            "clients": src.to_string(),
        })),
        "size": { "min": p.size.min, "max": p.size.max },
        "duration_s": p.count.is_none().then_some(p.duration.as_secs_f64()),
        "count": p.count,
        "warmup_s": p.warmup.as_secs_f64(),
        "pipeline": match p.load { Load::Closed { pipeline } if p.sweep.is_empty() => Some(pipeline), _ => None },
        "rate": match p.load { Load::Open { rate } if p.sweep.is_empty() => Some(rate), _ => None },
        "sweep": p.sweep,
        "timeout_s": p.timeout.as_secs_f64(),
        "tick_s": p.tick.as_secs_f64(),
        "spin_s": p.spin.as_secs_f64(),
        "start_at_unix_s": p.start_at.map(|v| round(v, 6)),
        "interval_s": p.interval.map(|d| d.as_secs_f64()),
        "messages_per_conn": p.messages_per_conn,
        "close": clap::ValueEnum::to_possible_value(&p.close).map(|v| v.get_name().to_string()),
        "reconnect": p.reconnect,
        "transport": if p.udp { "udp" } else { "tcp" },
    })
}

/// The whole JSON document.
pub fn doc(
    p: &Params,
    runs: &[RunResult],
    interrupted: bool,
    exit_code: u8,
    started_unix_s: f64,
) -> Value {
    json!({
        "schema": SCHEMA,
        "tool": format!("echoport {}", env!("CARGO_PKG_VERSION")),
        "tag": p.tag,
        "started_unix_s": round(started_unix_s, 3),
        "server": p.server.to_string(),
        "backend": runs.first().map(|r| r.backend.clone()),
        "params": params_json(p),
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        "interrupted": interrupted,
        "ok": exit_code == 0,
        "exit_code": exit_code,
    })
}
