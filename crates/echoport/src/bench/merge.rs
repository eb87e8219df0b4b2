//! `echoport bench merge FILE...`: the JSON results of any number of bench runs (processes,
//! hosts) combined into one report.
//!
//! Run k of every file is merged with run k of the others (one run each, or the same sweep
//! everywhere). Counts are exact sums; latency percentiles are read from the sum of the
//! runs' histograms (decoded from their lossless encoding), never from averaged percentiles;
//! throughputs add up, as the runs ran side by side. Two things make a combination
//! misleading, and each is flagged (a warning line, and a field in the JSON): a run that
//! missed its offered rate (it sent, or got echoes back, at less than 99 % of its target: the
//! client or the path was the bottleneck, and its latencies describe a lighter load), and a
//! run whose measured window does not overlap the others' (it ran at another time).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde_json::Value;

use super::hdr;
use super::report::Cpu;
use super::tally::{Errors, UdpCounts, new_histogram};

mod out;

/// The connection counts of a run that add up across runs.
pub const CONN_COUNTS: [&str; 6] = [
    "retries",
    "in_window",
    "closes",
    "reconnects",
    "abandoned_messages",
    "abandoned_bytes",
];

/// A run below this share of its intended rate missed it.
pub const MIN_RATE_RATIO: f64 = 0.99;

/// Options of `echoport bench merge`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  \
    echoport bench merge host1.json host2.json host3.json --svg all.svg\n\n\
    Exit status: 0 when every run was OK, 1 when any run failed (or, with --strict, when a\n\
    warning was given).")]
pub struct MergeArgs {
    /// Results of `echoport bench --json` (schema echoport-bench/1), one or more.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,

    /// Print the merged results as JSON on stdout (the summary goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Write an SVG plot of the merged latency percentiles here (latency versus load when
    /// the files hold sweeps).
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,

    /// Also fail (exit status 1) on a warning: a run that missed its offered rate or ran at
    /// another time than the others.
    #[arg(long)]
    pub strict: bool,
}

/// One run read from a file.
#[derive(Clone, Debug)]
pub struct InRun {
    /// The file it came from, and its position there.
    pub file: String,
    /// The file's tag, if it had one.
    pub tag: Option<String>,
    /// "open" or "closed".
    pub mode: String,
    /// Intended rate (open loop).
    pub target_rate: Option<f64>,
    /// The measured window, Unix seconds.
    pub window: (f64, f64),
    /// Counts.
    pub messages: u64,
    /// Bytes echoed.
    pub bytes: u64,
    /// Messages sent in the window.
    pub sent: u64,
    /// Measured messages sent only after the window closed (0 in files written before it
    /// was counted).
    pub sent_late: u64,
    /// Rates as the run reported them.
    pub msgs_per_sec: f64,
    /// Sent per second.
    pub sent_per_sec: f64,
    /// Latency, ns.
    pub hist: Histogram<u64>,
    /// Errors by kind.
    pub errors: Errors,
    /// Connections established and failed, and failures by message.
    pub established: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by message.
    pub connect_errors: BTreeMap<String, u64>,
    /// Churn and connect counts (`retries`, `in_window`, `closes`, `reconnects`,
    /// `abandoned_messages`, `abandoned_bytes`), zero when absent.
    pub conn_counts: BTreeMap<&'static str, u64>,
    /// Connects per second in the window.
    pub connects_per_sec: f64,
    /// Connect times, and connect to first echo, ns (empty when absent).
    pub connect_hist: Histogram<u64>,
    /// Connect to first echo.
    pub first_echo_hist: Histogram<u64>,
    /// UDP counts (UDP runs).
    pub udp: Option<UdpCounts>,
    /// The client's CPU.
    pub client_cpu: Option<Cpu>,
    /// Worst send lag and client lateness, µs; CQ overflows.
    pub max_send_lag_us: f64,
    /// Client lateness, µs.
    pub client_max_late_us: f64,
    /// CQ overflows.
    pub cq_overflows: u64,
    /// Cut short.
    pub interrupted: bool,
    /// The run's own verdict.
    pub ok: bool,
}

impl InRun {
    /// Sent over intended, and echoed over intended (open loop).
    pub fn ratios(&self) -> Option<(f64, f64)> {
        let t = self.target_rate.filter(|t| *t > 0.0)?;
        Some((self.sent_per_sec / t, self.msgs_per_sec / t))
    }

    /// Why it missed its offered rate, if it did.
    pub fn missed_rate(&self) -> Option<String> {
        let (sent, echoed) = self.ratios()?;
        let pct = |v: f64| format!("{:.2} %", v * 100.0);
        if sent < MIN_RATE_RATIO {
            Some(format!("sent {} of its intended rate", pct(sent)))
        } else if echoed < MIN_RATE_RATIO {
            Some(format!(
                "got echoes back at {} of its intended rate",
                pct(echoed)
            ))
        } else {
            None
        }
    }

    fn window_len(&self) -> f64 {
        (self.window.1 - self.window.0).max(0.0)
    }
}

/// Runs merged: run k of every file.
pub struct Merged {
    /// The runs, in file order.
    pub inputs: Vec<InRun>,
    /// Per input: whether its window overlaps too few of the others.
    pub off_window: Vec<bool>,
    /// The sum of the histograms.
    pub hist: Histogram<u64>,
    /// The sums of the connect and first-echo histograms.
    pub connect_hist: Histogram<u64>,
    /// Connect to first echo.
    pub first_echo_hist: Histogram<u64>,
    /// Sums.
    pub errors: Errors,
}

impl Merged {
    fn new(inputs: Vec<InRun>) -> anyhow::Result<Merged> {
        let (mut hist, mut connect_hist, mut first_echo_hist) =
            (new_histogram(), new_histogram(), new_histogram());
        let mut errors = Errors::default();
        for r in &inputs {
            for (sum, h) in [
                (&mut hist, &r.hist),
                (&mut connect_hist, &r.connect_hist),
                (&mut first_echo_hist, &r.first_echo_hist),
            ] {
                sum.add(h)
                    .map_err(|e| anyhow::anyhow!("{}: its histograms do not add: {e:?}", r.file))?;
            }
            errors.merge(&r.errors);
        }
        let off_window = off_windows(&inputs);
        Ok(Merged {
            inputs,
            off_window,
            hist,
            connect_hist,
            first_echo_hist,
            errors,
        })
    }

    /// Sum over inputs.
    pub fn sum(&self, f: impl Fn(&InRun) -> f64) -> f64 {
        self.inputs.iter().map(f).sum()
    }

    /// Integer sum over inputs.
    pub fn count(&self, f: impl Fn(&InRun) -> u64) -> u64 {
        self.inputs.iter().map(f).sum()
    }

    /// The sum of the intended rates, when every run had one.
    pub fn target_rate(&self) -> Option<f64> {
        self.inputs.iter().map(|r| r.target_rate).sum()
    }

    /// "open", "closed", or "mixed".
    pub fn mode(&self) -> &str {
        let first = self.inputs[0].mode.as_str();
        if self.inputs.iter().all(|r| r.mode == first) {
            first
        } else {
            "mixed"
        }
    }

    /// From the earliest start to the latest end, and the span all windows share.
    pub fn windows(&self) -> ((f64, f64), f64) {
        let start = self
            .inputs
            .iter()
            .map(|r| r.window.0)
            .fold(f64::MAX, f64::min);
        let end = self
            .inputs
            .iter()
            .map(|r| r.window.1)
            .fold(f64::MIN, f64::max);
        let common_start = self
            .inputs
            .iter()
            .map(|r| r.window.0)
            .fold(f64::MIN, f64::max);
        let common_end = self
            .inputs
            .iter()
            .map(|r| r.window.1)
            .fold(f64::MAX, f64::min);
        ((start, end), (common_end - common_start).max(0.0))
    }

    /// The warnings about this run group, one line each.
    pub fn warnings(&self, group: usize, groups: usize) -> Vec<String> {
        let which = if groups > 1 {
            format!(" (run {})", group + 1)
        } else {
            String::new()
        };
        let mut w = Vec::new();
        for (r, &off) in self.inputs.iter().zip(&self.off_window) {
            if let Some(why) = r.missed_rate() {
                w.push(format!(
                    "{}{which}: {why} (below {:.0} %): it did not offer its load",
                    r.file,
                    MIN_RATE_RATIO * 100.0
                ));
            }
            if off {
                w.push(format!(
                    "{}{which}: its measured window ({} s from {}) does not overlap the others'",
                    r.file,
                    super::json::round(r.window_len(), 3),
                    super::parse::rfc3339_utc(r.window.0)
                ));
            }
            if r.interrupted {
                w.push(format!("{}{which}: interrupted (partial results)", r.file));
            }
        }
        w
    }

    /// The UDP counts summed, when any run was over UDP.
    pub fn udp(&self) -> Option<UdpCounts> {
        let mut sum: Option<UdpCounts> = None;
        for u in self.inputs.iter().filter_map(|r| r.udp.as_ref()) {
            sum.get_or_insert_with(UdpCounts::default).merge(u);
        }
        sum
    }

    /// Every input's own verdict was OK.
    pub fn ok(&self) -> bool {
        self.inputs.iter().all(|r| r.ok)
    }
}

/// Two windows overlap when they share more than half of the shorter one. A run overlapping
/// fewer than half of the other runs is off (with two runs apart, both are: which one ran at
/// the wrong time cannot be told).
fn off_windows(runs: &[InRun]) -> Vec<bool> {
    let overlap = |a: &InRun, b: &InRun| {
        let shared = a.window.1.min(b.window.1) - a.window.0.max(b.window.0);
        shared > 0.5 * a.window_len().min(b.window_len()) && shared > 0.0
    };
    (0..runs.len())
        .map(|i| {
            let n = (0..runs.len())
                .filter(|&j| j != i && overlap(&runs[i], &runs[j]))
                .count();
            2 * n < runs.len() - 1
        })
        .collect()
}

/// Runs `bench merge`.
pub fn run(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let mut files = Vec::new();
    for path in &a.files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.display().to_string();
        files.push(read_doc(&name, &text)?);
    }
    let groups = files[0].len();
    if let Some((i, f)) = files.iter().enumerate().find(|(_, f)| f.len() != groups) {
        bail!(
            "{} holds {} runs and {} holds {groups}: merge files of the same kind of run \
             (one run each, or the same sweep)",
            a.files[i].display(),
            f.len(),
            a.files[0].display()
        );
    }
    let mut merged = Vec::new();
    for g in 0..groups {
        let inputs = files.iter().map(|f| f[g].clone()).collect();
        merged.push(Merged::new(inputs)?);
    }
    out::report(&a, &merged)
}

/// The runs of one bench JSON document.
pub fn read_doc(file: &str, text: &str) -> anyhow::Result<Vec<InRun>> {
    let doc: Value = serde_json::from_str(text).with_context(|| format!("{file}: not JSON"))?;
    let schema = doc["schema"].as_str().unwrap_or("");
    if schema != super::json::SCHEMA {
        bail!(
            "{file}: schema {schema:?}, expected {:?} (the output of echoport bench --json)",
            super::json::SCHEMA
        );
    }
    let runs = doc["runs"]
        .as_array()
        .with_context(|| format!("{file}: no runs"))?;
    if runs.is_empty() {
        bail!("{file}: no runs");
    }
    let tag = doc["tag"].as_str().map(str::to_string);
    let many = runs.len() > 1;
    runs.iter()
        .enumerate()
        .map(|(i, r)| {
            let name = if many {
                format!("{file}#{}", i + 1)
            } else {
                file.to_string()
            };
            read_run(&name, tag.clone(), r)
        })
        .collect()
}

fn read_run(file: &str, tag: Option<String>, r: &Value) -> anyhow::Result<InRun> {
    let num = |k: &str| -> anyhow::Result<f64> {
        r[k].as_f64()
            .with_context(|| format!("{file}: run field {k:?} missing or not a number"))
    };
    let int = |k: &str| -> anyhow::Result<u64> {
        r[k].as_u64()
            .with_context(|| format!("{file}: run field {k:?} missing or not a count"))
    };
    let encoded = r["histograms"]["latency"].as_str().with_context(|| {
        format!("{file}: no lossless histogram (histograms.latency): written by an older echoport?")
    })?;
    let hist = hdr::decode(encoded).map_err(|e| anyhow::anyhow!("{file}: histogram: {e}"))?;
    let messages = int("messages")?;
    if hist.len() != messages {
        bail!(
            "{file}: its histogram holds {} values but it reports {messages} messages",
            hist.len()
        );
    }
    let extra = |name: &str| -> anyhow::Result<Histogram<u64>> {
        match r["histograms"][name].as_str() {
            Some(t) => hdr::decode(t).map_err(|e| anyhow::anyhow!("{file}: {name} histogram: {e}")),
            None => Ok(new_histogram()),
        }
    };
    let cpu = |v: &Value| -> Option<Cpu> {
        Some(Cpu {
            user_s: v["user_s"].as_f64()?,
            system_s: v["system_s"].as_f64()?,
        })
    };
    let conn = &r["connections"];
    Ok(InRun {
        file: file.to_string(),
        tag,
        mode: r["mode"].as_str().unwrap_or("closed").to_string(),
        target_rate: r["target_rate"].as_f64(),
        window: (num("window_start_unix_s")?, num("window_end_unix_s")?),
        messages,
        bytes: int("bytes")?,
        sent: int("sent")?,
        sent_late: r["sent_late"].as_u64().unwrap_or(0),
        msgs_per_sec: num("msgs_per_sec")?,
        sent_per_sec: num("sent_per_sec")?,
        hist,
        errors: Errors::from_kinds(|k| r["errors"][k].as_u64().unwrap_or(0)),
        established: conn["established"].as_u64().unwrap_or(0),
        failed: conn["failed"].as_u64().unwrap_or(0),
        connect_errors: conn["errors"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        conn_counts: CONN_COUNTS
            .iter()
            .map(|&k| (k, conn[k].as_u64().unwrap_or(0)))
            .collect(),
        connects_per_sec: conn["connects_per_sec"].as_f64().unwrap_or(0.0),
        connect_hist: extra("connect")?,
        first_echo_hist: extra("first_echo")?,
        udp: udp_counts(&r["udp"]),
        client_cpu: cpu(&r["client_cpu"]),
        max_send_lag_us: r["max_send_lag_us"].as_f64().unwrap_or(0.0),
        client_max_late_us: r["client_max_late_us"].as_f64().unwrap_or(0.0),
        cq_overflows: r["cq_overflows"].as_u64().unwrap_or(0),
        interrupted: r["interrupted"].as_bool().unwrap_or(false),
        ok: r["ok"].as_bool().unwrap_or(false),
    })
}

fn udp_counts(u: &Value) -> Option<UdpCounts> {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    u.is_object().then(|| UdpCounts {
        sent: n("sent"),
        received: n("received"),
        duplicates: n("duplicates"),
        reordered: n("reordered"),
        late: n("late"),
        send_blocked: n("send_blocked"),
        refused: n("refused"),
        host_rcvbuf_errors: n("host_rcvbuf_errors"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_at(start: f64, len: f64) -> InRun {
        InRun {
            file: format!("at{start}"),
            tag: None,
            mode: "open".into(),
            target_rate: Some(1000.0),
            window: (start, start + len),
            messages: 0,
            bytes: 0,
            sent: 0,
            sent_late: 0,
            msgs_per_sec: 1000.0,
            sent_per_sec: 1000.0,
            hist: new_histogram(),
            errors: Errors::default(),
            established: 0,
            failed: 0,
            connect_errors: BTreeMap::new(),
            conn_counts: BTreeMap::new(),
            connects_per_sec: 0.0,
            connect_hist: new_histogram(),
            first_echo_hist: new_histogram(),
            udp: None,
            client_cpu: None,
            max_send_lag_us: 0.0,
            client_max_late_us: 0.0,
            cq_overflows: 0,
            interrupted: false,
            ok: true,
        }
    }

    #[test]
    fn a_run_at_another_time_is_off_and_the_others_are_not() {
        let runs = [run_at(0.0, 10.0), run_at(0.5, 10.0), run_at(100.0, 10.0)];
        assert_eq!(off_windows(&runs), vec![false, false, true]);
        let two = [run_at(0.0, 10.0), run_at(20.0, 10.0)];
        assert_eq!(
            off_windows(&two),
            vec![true, true],
            "two apart: both flagged"
        );
        let barely = [run_at(0.0, 10.0), run_at(6.0, 10.0)];
        assert_eq!(off_windows(&barely), vec![true, true], "4 s of 10 shared");
        assert_eq!(off_windows(&[run_at(0.0, 1.0)]), vec![false]);
    }

    #[test]
    fn a_missed_rate_names_what_fell_short() {
        let mut r = run_at(0.0, 10.0);
        assert_eq!(r.missed_rate(), None);
        r.sent_per_sec = 985.0;
        assert!(r.missed_rate().unwrap().contains("sent 98.50 %"));
        r.sent_per_sec = 1000.0;
        r.msgs_per_sec = 900.0;
        assert!(r.missed_rate().unwrap().contains("echoes back at 90.00 %"));
        r.target_rate = None;
        assert_eq!(r.missed_rate(), None, "closed loop: no offered rate");
    }
}
