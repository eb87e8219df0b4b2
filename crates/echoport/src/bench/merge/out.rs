//! The merged report: the summary, the JSON document (`echoport-bench-merge/1`) and the SVG.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Value, json};

use super::{CONN_COUNTS, InRun, MIN_RATE_RATIO, MergeArgs, Merged};
use crate::bench::json::{cpu_json, errors_json, histograms_json, latency_json, round, udp_json};
use crate::bench::parse::rfc3339_utc;
use crate::bench::report::{self, Cpu, group, us};

/// Name and version of the merged document's schema.
pub const SCHEMA: &str = "echoport-bench-merge/1";

/// Writes everything asked for; the exit code.
pub fn report(a: &MergeArgs, groups: &[Merged]) -> anyhow::Result<ExitCode> {
    let warnings: Vec<String> = groups
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.warnings(i, groups.len()))
        .collect();
    let ok = groups.iter().all(Merged::ok);
    let code = u8::from(!ok || (a.strict && !warnings.is_empty()));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "echoport bench merge: {} files{}",
        a.files.len(),
        if groups.len() > 1 {
            format!(", {} runs each", groups.len())
        } else {
            String::new()
        }
    );
    for (i, m) in groups.iter().enumerate() {
        text(&mut s, m, i, groups.len());
    }
    for w in &warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    let verdict = report::verdict(false, !ok);
    let _ = writeln!(
        s,
        "  result       {verdict}{}",
        match warnings.len() {
            0 => String::new(),
            n => format!(" ({n} warning{})", if n == 1 { "" } else { "s" }),
        }
    );
    if a.json {
        eprint!("{s}");
        let doc = json!({
            "schema": SCHEMA,
            "tool": format!("echoport {}", env!("CARGO_PKG_VERSION")),
            "files": a.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "runs": groups.iter().map(group_json).collect::<Vec<_>>(),
            "warnings": warnings,
            "ok": code == 0,
            "exit_code": code,
        });
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        print!("{s}");
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, svg(groups, a.files.len()))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::from(code))
}

fn describe(m: &Merged) -> String {
    match (m.mode(), m.target_rate()) {
        ("open", Some(t)) => format!("open loop at {} msgs/s in total", group(t)),
        ("closed", _) => "closed loop".to_string(),
        _ => "open and closed loops mixed".to_string(),
    }
}

fn text(s: &mut String, m: &Merged, i: usize, n: usize) {
    let ((start, end), common) = m.windows();
    let head = if n > 1 {
        format!("run {} of {n}: ", i + 1)
    } else {
        String::new()
    };
    let _ = writeln!(s, "  {head}{} runs, {}", m.inputs.len(), describe(m));
    let _ = writeln!(
        s,
        "  throughput   {} msgs/s   {:.2} MiB/s   (sums; {} messages)",
        group(m.sum(|r| r.msgs_per_sec)),
        m.sum(|r| r.bytes as f64 / r.window_len().max(1e-9)) / (1024.0 * 1024.0),
        group(m.count(|r| r.messages) as f64),
    );
    if let Some(t) = m.target_rate() {
        let _ = writeln!(
            s,
            "  offered      {} msgs/s sent = {:.2} % of the intended rate",
            group(m.sum(|r| r.sent_per_sec)),
            m.sum(|r| r.sent_per_sec) / t * 100.0
        );
    }
    let _ = writeln!(
        s,
        "  windows      {} to {} ({:.3} s shared by all)",
        rfc3339_utc(start),
        rfc3339_utc(end),
        common
    );
    let _ = writeln!(s, "  latency us   {}", report::latency_line(&m.hist));
    let _ = writeln!(
        s,
        "  connections  {} established, {} failed",
        m.count(|r| r.established),
        m.count(|r| r.failed)
    );
    let in_window = m.count(|r| r.conn_counts.get("in_window").copied().unwrap_or(0));
    if in_window > 0 {
        let _ = writeln!(
            s,
            "  connects     {} begun in the windows = {} connects/s (sums)",
            group(in_window as f64),
            group(m.sum(|r| r.connects_per_sec))
        );
        let _ = writeln!(
            s,
            "  connect us   {}",
            report::latency_line(&m.connect_hist)
        );
        let _ = writeln!(
            s,
            "  1st echo us  {}",
            report::latency_line(&m.first_echo_hist)
        );
    }
    if let Some(u) = m.udp() {
        let _ = writeln!(s, "  udp          {} (sums)", report::udp_line(&u));
    }
    let _ = writeln!(s, "  errors       {}", report::errors_line(&m.errors));
    if let Some(c) = client_cpu(m) {
        let per = per_echo(&c, m);
        let _ = writeln!(
            s,
            "  client CPU   {} (all runs)",
            report::cpu_line(&c, None, per)
        );
    }
    for r in &m.inputs {
        let _ = writeln!(s, "  input        {}", input_line(r));
    }
}

fn input_line(r: &InRun) -> String {
    let p99 = if r.hist.is_empty() {
        "-".to_string()
    } else {
        us(r.hist.value_at_quantile(0.99) as f64 / 1000.0)
    };
    format!(
        "{}{}: {} msgs/s, {} messages, p99 {p99} us{}",
        r.file,
        r.tag
            .as_ref()
            .map(|t| format!(" [{t}]"))
            .unwrap_or_default(),
        group(r.msgs_per_sec),
        group(r.messages as f64),
        if r.ok { "" } else { ", NOT OK" }
    )
}

/// The sum of the clients' CPU, when every run measured its own.
fn client_cpu(m: &Merged) -> Option<Cpu> {
    let mut c = Cpu {
        user_s: 0.0,
        system_s: 0.0,
    };
    for r in &m.inputs {
        let rc = r.client_cpu?;
        c.user_s += rc.user_s;
        c.system_s += rc.system_s;
    }
    Some(c)
}

fn per_echo(c: &Cpu, m: &Merged) -> Option<f64> {
    let n = m.count(|r| r.messages);
    (n > 0).then(|| c.total_s() * 1e6 / n as f64)
}

fn input_json(r: &InRun, off_window: bool) -> Value {
    let ratios = r.ratios();
    json!({
        "file": r.file,
        "tag": r.tag,
        "mode": r.mode,
        "target_rate": r.target_rate,
        "window_start_unix_s": round(r.window.0, 6),
        "window_end_unix_s": round(r.window.1, 6),
        "messages": r.messages,
        "msgs_per_sec": r.msgs_per_sec,
        "sent_per_sec": r.sent_per_sec,
        "sent_ratio": ratios.map(|v| round(v.0, 5)),
        "achieved_ratio": ratios.map(|v| round(v.1, 5)),
        "latency_us": latency_json(&r.hist),
        "missed_rate": r.missed_rate().is_some(),
        "off_window": off_window,
        "interrupted": r.interrupted,
        "ok": r.ok,
    })
}

fn group_json(m: &Merged) -> Value {
    let ((start, end), common) = m.windows();
    let mut connect_errors = std::collections::BTreeMap::<String, u64>::new();
    for r in &m.inputs {
        for (k, v) in &r.connect_errors {
            *connect_errors.entry(k.clone()).or_default() += v;
        }
    }
    let target = m.target_rate();
    let sent_per_sec = m.sum(|r| r.sent_per_sec);
    let mut connections = json!({
        "established": m.count(|r| r.established),
        "failed": m.count(|r| r.failed),
        "errors": connect_errors,
        "connects_per_sec": round(m.sum(|r| r.connects_per_sec), 2),
        "connect_us": latency_json(&m.connect_hist),
        "first_echo_us": latency_json(&m.first_echo_hist),
    });
    for k in CONN_COUNTS {
        connections[k] = json!(m.count(|r| r.conn_counts.get(k).copied().unwrap_or(0)));
    }
    let cpu = client_cpu(m);
    json!({
        "mode": m.mode(),
        "inputs": m.inputs.len(),
        "target_rate": target,
        "window_start_unix_s": round(start, 6),
        "window_end_unix_s": round(end, 6),
        "common_window_s": round(common, 6),
        "messages": m.count(|r| r.messages),
        "bytes": m.count(|r| r.bytes),
        "sent": m.count(|r| r.sent),
        "sent_late": m.count(|r| r.sent_late),
        "msgs_per_sec": round(m.sum(|r| r.msgs_per_sec), 2),
        "sent_per_sec": round(sent_per_sec, 2),
        "rate_ratio": target.map(|t| round(sent_per_sec / t, 5)),
        "min_rate_ratio": MIN_RATE_RATIO,
        "max_send_lag_us": m.inputs.iter().map(|r| r.max_send_lag_us).fold(0.0, f64::max),
        "latency_us": latency_json(&m.hist),
        "histograms": histograms_json(&[
            ("latency", &m.hist),
            ("connect", &m.connect_hist),
            ("first_echo", &m.first_echo_hist),
        ]),
        "connections": connections,
        "udp": m.udp().map(|u| udp_json(&u)),
        "errors": errors_json(&m.errors),
        "client_cpu": cpu.map(|c| cpu_json(&c, per_echo(&c, m))),
        "cq_overflows": m.count(|r| r.cq_overflows),
        "client_max_late_us": m.inputs.iter().map(|r| r.client_max_late_us).fold(0.0, f64::max),
        "missed_rate": m.inputs.iter().any(|r| r.missed_rate().is_some()),
        "off_window": m.off_window.iter().any(|&o| o),
        "interrupted": m.inputs.iter().any(|r| r.interrupted),
        "ok": m.ok(),
        "runs": m.inputs.iter().zip(&m.off_window).map(|(r, &o)| input_json(r, o)).collect::<Vec<_>>(),
    })
}

fn svg(groups: &[Merged], files: usize) -> String {
    use crate::bench::plot;
    if groups.len() == 1 {
        let m = &groups[0];
        plot::percentiles(
            &m.hist,
            &format!("echoport bench merge: {files} runs, {}", describe(m)),
        )
    } else {
        let points: Vec<_> = groups
            .iter()
            .map(|m| (m.sum(|r| r.msgs_per_sec), &m.hist))
            .collect();
        plot::sweep(
            &points,
            &format!("echoport bench merge: latency vs load, {files} runs merged"),
        )
    }
}
