//! Where finished intervals go: the interval log (`--hlog`), JSON lines (`--interval-json`)
//! and a line on stderr (`--interval`), all written as the run goes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use super::args::Args;
use super::hdr::Hlog;
use super::interval::Part;
use super::json::round;
use super::params::Params;
use super::report::{group, us};

/// The run an interval belongs to.
pub struct RunInfo {
    /// Its number (0, 1, ... in a sweep).
    pub index: usize,
    /// Its rate, in a sweep.
    pub sweep_rate: Option<f64>,
    /// When its measured window began, Unix seconds.
    pub window_start_unix_s: f64,
}

/// The interval outputs asked for.
pub struct Sink {
    every: Option<Duration>,
    print: bool,
    live_line: bool,
    tag: Option<String>,
    comment: String,
    hlog_path: Option<PathBuf>,
    hlog: Option<Hlog>,
    jsonl: Option<(PathBuf, BufWriter<File>)>,
}

impl Sink {
    /// Opens the files (the interval log waits for the first interval: its BaseTime is the
    /// start of the first measured window).
    pub fn open(p: &Params, a: &Args, live_line: bool) -> anyhow::Result<Sink> {
        let jsonl = match interval_json_path(a) {
            Some(path) => {
                let f =
                    File::create(&path).with_context(|| format!("creating {}", path.display()))?;
                Some((path, BufWriter::new(f)))
            }
            None => None,
        };
        Ok(Sink {
            every: p.interval,
            print: print_intervals(a),
            live_line,
            tag: p.tag.clone(),
            comment: format!(
                "[echoport {} bench -> {}: {} connections, {}]",
                env!("CARGO_PKG_VERSION"),
                p.server,
                p.connections,
                p.size
            ),
            hlog_path: a.hlog.clone(),
            hlog: None,
            jsonl,
        })
    }

    /// The interval length, when intervals are wanted at all.
    pub fn every(&self) -> Option<Duration> {
        self.every
    }

    /// One finished interval of `length_s` (shorter than the interval for the last one).
    pub fn emit(
        &mut self,
        run: &RunInfo,
        idx: u64,
        part: &Part,
        length_s: f64,
    ) -> anyhow::Result<()> {
        let every = self.every.map_or(1.0, |d| d.as_secs_f64());
        let start = run.window_start_unix_s + idx as f64 * every;
        let tag = self.tag_of(run);
        if let Some(path) = &self.hlog_path {
            if self.hlog.is_none() {
                let base = start - idx as f64 * every;
                let log = Hlog::create(path, &self.comment, base)
                    .with_context(|| format!("creating {}", path.display()))?;
                self.hlog = Some(log);
            }
            if let Some(log) = &mut self.hlog {
                log.interval(tag.as_deref(), start, length_s, &part.hist)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        let t_s = idx as f64 * every;
        if let Some((path, out)) = &mut self.jsonl {
            let line = interval_json(run, tag.as_deref(), idx, part, start, t_s, length_s);
            writeln!(out, "{line}")
                .and_then(|_| out.flush())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if self.print {
            let clear = if self.live_line { "\r\x1b[K" } else { "" };
            eprintln!("{clear}{}", interval_text(run, part, t_s, length_s));
        }
        Ok(())
    }

    fn tag_of(&self, run: &RunInfo) -> Option<String> {
        let rate = run.sweep_rate.map(|r| format!("r{r:.0}"));
        match (&self.tag, rate) {
            (Some(t), Some(r)) => Some(format!("{t}-{r}")),
            (Some(t), None) => Some(t.clone()),
            (None, r) => r,
        }
    }
}

fn interval_json_path(a: &Args) -> Option<PathBuf> {
    a.interval_json.clone()
}

fn print_intervals(a: &Args) -> bool {
    a.interval.is_some()
}

fn rate(n: f64, length_s: f64) -> f64 {
    if length_s > 0.0 { n / length_s } else { 0.0 }
}

fn interval_json(
    run: &RunInfo,
    tag: Option<&str>,
    idx: u64,
    part: &Part,
    start_unix_s: f64,
    t_s: f64,
    length_s: f64,
) -> serde_json::Value {
    let h = &part.hist;
    let q = |q: f64| round(h.value_at_quantile(q) as f64 / 1000.0, 3);
    json!({
        "run": run.index,
        "sweep_rate": run.sweep_rate,
        "tag": tag,
        "interval": idx,
        "start_unix_s": round(start_unix_s, 6),
        "t_s": round(t_s, 6),
        "length_s": round(length_s, 6),
        "messages": part.msgs(),
        "bytes": part.bytes,
        "msgs_per_sec": round(rate(part.msgs() as f64, length_s), 2),
        "mib_per_sec": round(rate(part.bytes as f64, length_s) / (1024.0 * 1024.0), 4),
        "latency_us": (!h.is_empty()).then(|| json!({
            "p50": q(0.5),
            "p90": q(0.9),
            "p99": q(0.99),
            "p99_9": q(0.999),
            "max": round(h.max() as f64 / 1000.0, 3),
        })),
    })
}

fn interval_text(run: &RunInfo, part: &Part, t_s: f64, length_s: f64) -> String {
    let h = &part.hist;
    let q = |q: f64| us(h.value_at_quantile(q) as f64 / 1000.0);
    let lat = if h.is_empty() {
        "(no echo completed)".to_string()
    } else {
        format!(
            "p50 {}  p99 {}  p99.9 {}  max {} us",
            q(0.5),
            q(0.99),
            q(0.999),
            us(h.max() as f64 / 1000.0)
        )
    };
    let sweep = run
        .sweep_rate
        .map(|r| format!("{} msgs/s run  ", group(r)))
        .unwrap_or_default();
    let span = format!("{:.1}-{:.1} s", t_s, t_s + length_s);
    format!(
        "  interval {sweep}{span:>15} {:>11} msgs/s  {lat}",
        group(rate(part.msgs() as f64, length_s)),
    )
}
