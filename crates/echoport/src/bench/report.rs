//! The results: the human summary, the JSON document (versioned schema) and the HdrHistogram
//! percentile export.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use super::connector::ConnectReport;
use super::params::{Load, Params};
use super::tally::Tally;

/// Name and version of the JSON schema. Bump the number on any incompatible change.
pub const SCHEMA: &str = "echoport-bench/1";

/// CPU time over the measured window.
#[derive(Copy, Clone, Debug)]
pub struct Cpu {
    /// User time, seconds.
    pub user_s: f64,
    /// System time, seconds.
    pub system_s: f64,
}

impl Cpu {
    /// User plus system.
    pub fn total_s(&self) -> f64 {
        self.user_s + self.system_s
    }
}

/// One run (one rate of a sweep).
pub struct RunResult {
    /// Its load.
    pub load: Load,
    /// Measurements, merged over threads.
    pub tally: Tally,
    /// The measured window: from the end of the warm-up to the last measured echo (or the
    /// end of the duration, if later).
    pub window: Duration,
    /// The window sends are counted in: the duration (or `window` in count mode).
    pub sent_window: Duration,
    /// Connections opened and failed.
    pub connect: ConnectReport,
    /// The client's own CPU over the window (None when the run ended before it began).
    pub client_cpu: Option<Cpu>,
    /// The server's CPU over the window (with `--server-pid`).
    pub server_cpu: Option<(u32, Cpu)>,
    /// Cut short by Ctrl-C.
    pub interrupted: bool,
    /// The backend's description.
    pub backend: String,
}

impl RunResult {
    /// Measured messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        per_sec(self.tally.msgs as f64, self.window)
    }

    /// Measured echo bandwidth (one direction), MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        per_sec(self.tally.bytes as f64, self.window) / (1024.0 * 1024.0)
    }

    /// Measured messages sent per second of the window: the load actually offered.
    pub fn sent_per_sec(&self) -> f64 {
        per_sec(self.tally.sent as f64, self.sent_window)
    }

    /// Offered over intended rate (open loop): did the generator keep its schedule?
    pub fn rate_ratio(&self) -> Option<f64> {
        match self.load {
            Load::Open { rate } => Some(self.sent_per_sec() / rate),
            Load::Closed { .. } => None,
        }
    }

    /// CPU µs per measured echo.
    fn us_per_echo(&self, cpu: &Cpu) -> Option<f64> {
        (self.tally.msgs > 0).then(|| cpu.total_s() * 1e6 / self.tally.msgs as f64)
    }

    /// Client CPU µs per echo.
    pub fn client_us_per_echo(&self) -> Option<f64> {
        self.client_cpu.as_ref().and_then(|c| self.us_per_echo(c))
    }

    /// Server CPU µs per echo.
    pub fn server_us_per_echo(&self) -> Option<f64> {
        self.server_cpu
            .as_ref()
            .and_then(|(_, c)| self.us_per_echo(c))
    }

    /// Any error at all (connections that failed included).
    pub fn failed(&self) -> bool {
        self.errors_total() > 0 || (self.tally.msgs == 0 && !self.interrupted)
    }

    /// Error events, connection failures included.
    pub fn errors_total(&self) -> u64 {
        self.tally.errors.total()
    }
}

fn per_sec(n: f64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n / d.as_secs_f64()
    }
}

fn describe_load(load: &Load) -> String {
    match load {
        Load::Closed { pipeline } => format!("closed loop, pipeline {pipeline}"),
        Load::Open { rate } => format!("open loop at {} msgs/s", group(*rate)),
    }
}

/// 1234567.8 -> "1,234,568".
pub fn group(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        group(v)
    } else {
        format!("{v:.1}")
    }
}

/// The human summary of one run.
pub fn text(p: &Params, r: &RunResult) -> String {
    let mut s = String::new();
    let t = &r.tally;
    let span = match p.count {
        Some(n) => format!("{} messages", group(n as f64)),
        None => secs(p.duration),
    };
    let _ = writeln!(
        s,
        "echoport bench -> {}  [{}; {} threads; {} connections; {}; {}; {} + {} warm-up]",
        p.server,
        r.backend,
        p.threads,
        p.connections,
        p.size,
        describe_load(&r.load),
        span,
        secs(p.warmup)
    );
    let _ = writeln!(
        s,
        "  throughput   {} msgs/s   {:.2} MiB/s   ({} messages in {:.3} s)",
        group(r.msgs_per_sec()),
        r.mib_per_sec(),
        group(t.msgs as f64),
        r.window.as_secs_f64(),
    );
    if let Some(q) = r.rate_ratio() {
        let _ = writeln!(
            s,
            "  offered      {} msgs/s sent = {:.2} % of the intended rate; sends at most {} us behind schedule",
            group(r.sent_per_sec()),
            q * 100.0,
            us(t.max_send_lag_ns as f64 / 1000.0)
        );
    }
    if t.msgs > 0 {
        let _ = writeln!(
            s,
            "  latency us   p50 {}   p90 {}   p99 {}   p99.9 {}   p99.99 {}   max {}",
            us(t.us_at(0.5)),
            us(t.us_at(0.9)),
            us(t.us_at(0.99)),
            us(t.us_at(0.999)),
            us(t.us_at(0.9999)),
            us(t.hist.max() as f64 / 1000.0),
        );
    } else {
        let _ = writeln!(s, "  latency us   (no message measured)");
    }
    let _ = writeln!(
        s,
        "  connections  {} established, {} failed{}",
        r.connect.established,
        r.connect.failed,
        r.connect
            .errors
            .iter()
            .map(|(e, n)| format!("; {n} x {e}"))
            .collect::<String>()
    );
    let kinds: Vec<String> = t
        .errors
        .kinds()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let _ = writeln!(
        s,
        "  errors       {}",
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(" ")
        }
    );
    if let Some(c) = &r.client_cpu {
        let _ = writeln!(
            s,
            "  client CPU   {:.3} s (user {:.3}, sys {:.3}){}",
            c.total_s(),
            c.user_s,
            c.system_s,
            r.client_us_per_echo()
                .map(|v| format!(" = {v:.2} us per echo"))
                .unwrap_or_default()
        );
    }
    if let Some((pid, c)) = &r.server_cpu {
        let _ = writeln!(
            s,
            "  server CPU   {:.3} s (user {:.3}, sys {:.3}; pid {pid}){}",
            c.total_s(),
            c.user_s,
            c.system_s,
            r.server_us_per_echo()
                .map(|v| format!(" = {v:.2} us per echo"))
                .unwrap_or_default()
        );
    }
    if t.overflows > 0 {
        let _ = writeln!(s, "  client CQ overflows {}", t.overflows);
    }
    if t.max_late_ns >= 1_000_000 {
        let _ = writeln!(
            s,
            "  note         the client's own loop ran up to {:.1} ms late (machine busy?)",
            t.max_late_ns as f64 / 1e6
        );
    }
    let verdict = if r.interrupted {
        "INTERRUPTED (partial results)"
    } else if r.failed() {
        "FAILED"
    } else {
        "OK"
    };
    let _ = writeln!(s, "  result       {verdict}");
    s
}

/// One line per rate of a sweep.
pub fn sweep_table(runs: &[RunResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}",
        "target/s",
        "achieved/s",
        "p50 us",
        "p90",
        "p99",
        "p99.9",
        "p99.99",
        "max",
        "errors",
        "cpu us/e"
    );
    for r in runs {
        let t = &r.tally;
        let target = match r.load {
            Load::Open { rate } => group(rate),
            Load::Closed { .. } => "closed".into(),
        };
        let _ = writeln!(
            s,
            "{:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>9}{}",
            target,
            group(r.msgs_per_sec()),
            us(t.us_at(0.5)),
            us(t.us_at(0.9)),
            us(t.us_at(0.99)),
            us(t.us_at(0.999)),
            us(t.us_at(0.9999)),
            us(t.hist.max() as f64 / 1000.0),
            r.errors_total(),
            r.client_us_per_echo()
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
            if r.interrupted { "  (interrupted)" } else { "" }
        );
    }
    s
}

fn round(v: f64, places: i32) -> f64 {
    let m = 10f64.powi(places);
    (v * m).round() / m
}

fn cpu_json(c: &Cpu, per_echo: Option<f64>) -> Value {
    json!({
        "user_s": round(c.user_s, 6),
        "system_s": round(c.system_s, 6),
        "total_s": round(c.total_s(), 6),
        "us_per_echo": per_echo.map(|v| round(v, 4)),
    })
}

fn run_json(r: &RunResult) -> Value {
    let t = &r.tally;
    let mut errors = serde_json::Map::new();
    for (k, n) in t.errors.kinds() {
        errors.insert(k.into(), json!(n));
    }
    errors.insert("total".into(), json!(r.errors_total()));
    let latency = if t.msgs > 0 {
        json!({
            "count": t.hist.len(),
            "min": round(t.hist.min() as f64 / 1000.0, 3),
            "mean": round(t.hist.mean() / 1000.0, 3),
            "stdev": round(t.hist.stdev() / 1000.0, 3),
            "p50": round(t.us_at(0.5), 3),
            "p90": round(t.us_at(0.9), 3),
            "p99": round(t.us_at(0.99), 3),
            "p99_9": round(t.us_at(0.999), 3),
            "p99_99": round(t.us_at(0.9999), 3),
            "max": round(t.hist.max() as f64 / 1000.0, 3),
        })
    } else {
        Value::Null
    };
    let (mode, pipeline, target) = match r.load {
        Load::Closed { pipeline } => ("closed", Some(pipeline), None),
        Load::Open { rate } => ("open", None, Some(rate)),
    };
    json!({
        "mode": mode,
        "pipeline": pipeline,
        "target_rate": target,
        "window_s": round(r.window.as_secs_f64(), 6),
        "messages": t.msgs,
        "bytes": t.bytes,
        "msgs_per_sec": round(r.msgs_per_sec(), 2),
        "mib_per_sec": round(r.mib_per_sec(), 4),
        "sent_per_sec": round(r.sent_per_sec(), 2),
        "rate_ratio": r.rate_ratio().map(|v| round(v, 5)),
        "max_send_lag_us": round(t.max_send_lag_ns as f64 / 1000.0, 1),
        "latency_us": latency,
        "connections": {
            "established": r.connect.established,
            "failed": r.connect.failed,
            "errors": r.connect.errors,
        },
        "errors": errors,
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

/// The whole JSON document.
pub fn json_doc(
    p: &Params,
    runs: &[RunResult],
    interrupted: bool,
    exit_code: u8,
    started_unix_s: f64,
) -> Value {
    let mode = if !p.sweep.is_empty() {
        "sweep"
    } else {
        match p.load {
            Load::Closed { .. } => "closed",
            Load::Open { .. } => "open",
        }
    };
    json!({
        "schema": SCHEMA,
        "tool": format!("echoport {}", env!("CARGO_PKG_VERSION")),
        "started_unix_s": round(started_unix_s, 3),
        "server": p.server.to_string(),
        "backend": runs.first().map(|r| r.backend.clone()),
        "params": {
            "mode": mode,
            "connections": p.connections,
            "threads": p.threads,
            "cpus": p.cpus,
            "backend": clap::ValueEnum::to_possible_value(&p.backend).map(|v| v.get_name().to_string()),
            "connect_rate": p.connect_rate,
            "sources": p.sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
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
        },
        "runs": runs.iter().map(run_json).collect::<Vec<_>>(),
        "interrupted": interrupted,
        "ok": exit_code == 0,
        "exit_code": exit_code,
    })
}

/// The percentile distribution in HdrHistogram's text format (values in microseconds), as
/// its plotters read it.
pub fn hgrm(t: &Tally) -> String {
    let h = &t.hist;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let inv = if q < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - q))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "{:>12.3} {:>2.12} {:>10} {}",
                h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
                q,
                total,
                inv
            );
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        1u64 << (2.0 * 10f64.powi(h.sigfig() as i32)).log2().ceil() as u32
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping() {
        assert_eq!(group(0.0), "0");
        assert_eq!(group(999.4), "999");
        assert_eq!(group(1000.0), "1,000");
        assert_eq!(group(1234567.8), "1,234,568");
    }

    #[test]
    fn hgrm_ends_at_the_max_with_the_total_count() {
        let mut t = Tally::default();
        for v in 1..=1000u64 {
            t.hist.record(v * 1000).unwrap();
        }
        let out = hgrm(&t);
        let rows: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .skip(1)
            .collect();
        let last: Vec<&str> = rows.last().unwrap().split_whitespace().collect();
        assert_eq!(last[2], "1000", "{out}");
        let v: f64 = last[0].parse().unwrap();
        assert!((999.0..=1001.0).contains(&v), "{out}");
        assert!(out.contains("Total count    =         1000"), "{out}");
    }
}
