//! The results of a run and the human summary; the HdrHistogram percentile export (.hgrm).
//! The JSON document is [`super::json`].

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::args::CloseMode;
use super::connector::ConnectReport;
use super::params::{Load, Params};
use super::tally::{Errors, Tally, UdpCounts};

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
    /// The run's start (when its connections began to open), Unix seconds.
    pub epoch_unix_s: f64,
    /// Its warm-up: the measured window begins this long after the start.
    pub warmup: Duration,
    /// Over UDP.
    pub udp: bool,
}

impl RunResult {
    /// The measured window's beginning, Unix seconds.
    pub fn window_start_unix_s(&self) -> f64 {
        self.epoch_unix_s + self.warmup.as_secs_f64()
    }

    /// The measured window's end, Unix seconds.
    pub fn window_end_unix_s(&self) -> f64 {
        self.window_start_unix_s() + self.window.as_secs_f64()
    }

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

    /// Connects begun in the window, per second of it: the server's accept rate.
    pub fn connects_per_sec(&self) -> f64 {
        per_sec(self.connect.in_window as f64, self.sent_window)
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

pub fn per_sec(n: f64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n / d.as_secs_f64()
    }
}

pub fn describe_load(load: &Load) -> String {
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

pub fn us(v: f64) -> String {
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
        "echoport bench -> {}  [{}; {} threads; {} {}; {}; {}; {} + {} warm-up]",
        p.server,
        r.backend,
        p.threads,
        p.connections,
        if p.udp { "UDP flows" } else { "connections" },
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
            "  offered      {} msgs/s sent = {:.2} % of the intended rate; sends at most {} us behind schedule{}",
            group(r.sent_per_sec()),
            q * 100.0,
            us(t.max_send_lag_ns as f64 / 1000.0),
            match t.sent_late {
                0 => String::new(),
                n => format!(
                    "; {} sent after the window (still measured)",
                    group(n as f64)
                ),
            }
        );
    }
    let _ = writeln!(s, "  latency us   {}", latency_line(&t.hist));
    if p.udp {
        let _ = writeln!(s, "  udp          {}", udp_line(&t.udp));
    } else {
        let _ = writeln!(s, "  connections  {}", connections_line(&r.connect));
        churn_lines(&mut s, p, r);
    }
    let _ = writeln!(s, "  errors       {}", errors_line(&t.errors));
    health_lines(&mut s, r);
    let _ = writeln!(s, "  result       {}", verdict(r.interrupted, r.failed()));
    s
}

/// Connect rate and times, time to the first echo, churn: when there is something to say.
fn churn_lines(s: &mut String, p: &Params, r: &RunResult) {
    let c = &r.connect;
    let t = &r.tally;
    let churning = p.messages_per_conn.is_some() || p.reconnect;
    if churning || c.in_window > 0 {
        let _ = writeln!(
            s,
            "  connects     {} begun in the window = {} connects/s (the server's accepts/s); {} retried",
            group(c.in_window as f64),
            group(r.connects_per_sec()),
            c.retries
        );
        let _ = writeln!(s, "  connect us   {}", latency_line(&c.hist));
        let _ = writeln!(s, "  1st echo us  {}", latency_line(&t.first_echo));
    }
    if churning {
        let _ = writeln!(
            s,
            "  churn        {} closed after {} echoes ({}), {} closed by the server and reopened; {} messages ({} bytes) abandoned",
            group(t.churn.closes as f64),
            p.messages_per_conn.map_or("-".into(), |k| group(k as f64)),
            match p.close {
                CloseMode::Fin => "fin",
                CloseMode::Rst => "rst",
            },
            group(t.churn.reconnects as f64),
            group(t.churn.abandoned_msgs as f64),
            group(t.churn.abandoned_bytes as f64),
        );
    }
}

/// The CPU, overflow and lateness lines.
fn health_lines(s: &mut String, r: &RunResult) {
    let t = &r.tally;
    if let Some(c) = &r.client_cpu {
        let _ = writeln!(
            s,
            "  client CPU   {}",
            cpu_line(c, None, r.client_us_per_echo())
        );
    }
    if let Some((pid, c)) = &r.server_cpu {
        let _ = writeln!(
            s,
            "  server CPU   {}",
            cpu_line(c, Some(*pid), r.server_us_per_echo())
        );
    }
    if t.overflows > 0 {
        let _ = writeln!(s, "  client CQ overflows {}", t.overflows);
    }
    if t.errors.not_opened > 0 {
        let _ = writeln!(
            s,
            "  note         {} connections were still to open when the run ended: give a \
             --warmup as long as connecting takes, or more --source addresses",
            group(t.errors.not_opened as f64)
        );
    }
    if t.max_late_ns >= 1_000_000 {
        let _ = writeln!(
            s,
            "  note         the client's own loop ran up to {:.1} ms late (machine busy?)",
            t.max_late_ns as f64 / 1e6
        );
    }
}

/// "OK", "FAILED" or "INTERRUPTED (partial results)".
pub fn verdict(interrupted: bool, failed: bool) -> &'static str {
    if interrupted {
        "INTERRUPTED (partial results)"
    } else if failed {
        "FAILED"
    } else {
        "OK"
    }
}

/// "p50 ..  p90 ..  p99 ..  p99.9 ..  p99.99 ..  max .." of a histogram in ns, shown in us.
pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "(no message measured)".into();
    }
    let q = |q: f64| us(h.value_at_quantile(q) as f64 / 1000.0);
    format!(
        "p50 {}   p90 {}   p99 {}   p99.9 {}   p99.99 {}   max {}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        q(0.9999),
        us(h.max() as f64 / 1000.0),
    )
}

/// "N established, M failed; k x error ...".
pub fn connections_line(c: &ConnectReport) -> String {
    format!(
        "{} established, {} failed{}",
        c.established,
        c.failed,
        c.errors
            .iter()
            .map(|(e, n)| format!("; {n} x {e}"))
            .collect::<String>()
    )
}

/// "N sent, N back, N lost (x %), ..." of a UDP run.
pub fn udp_line(u: &UdpCounts) -> String {
    format!(
        "{} sent, {} back, {} lost ({:.3} %), {} duplicated, {} reordered, {} late; {} not sent (socket buffer full){}",
        group(u.sent as f64),
        group(u.received as f64),
        group(u.lost() as f64),
        u.loss_ratio() * 100.0,
        group(u.duplicates as f64),
        group(u.reordered as f64),
        group(u.late as f64),
        group(u.send_blocked as f64),
        if u.refused > 0 {
            format!("; {} refused (nothing listening?)", u.refused)
        } else {
            String::new()
        },
    ) + &if u.host_rcvbuf_errors > 0 {
        format!(
            "\n  note         the kernel dropped {} UDP datagrams on this host for full receive buffers meanwhile (some loss may not be the server's)",
            group(u.host_rcvbuf_errors as f64)
        )
    } else {
        String::new()
    }
}

/// "none" or "kind=n ...".
pub fn errors_line(e: &Errors) -> String {
    let kinds: Vec<String> = e
        .kinds()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    if kinds.is_empty() {
        "none".to_string()
    } else {
        kinds.join(" ")
    }
}

/// "1.234 s (user .., sys ..; pid P) = x us per echo".
pub fn cpu_line(c: &Cpu, pid: Option<u32>, per_echo: Option<f64>) -> String {
    format!(
        "{:.3} s (user {:.3}, sys {:.3}{}){}",
        c.total_s(),
        c.user_s,
        c.system_s,
        pid.map(|p| format!("; pid {p}")).unwrap_or_default(),
        per_echo
            .map(|v| format!(" = {v:.2} us per echo"))
            .unwrap_or_default()
    )
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
