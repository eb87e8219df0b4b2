//! `echoport bench`: the load generator, and `echoport bench merge`.
//!
//! - [`args`], `params`, `parse`: the command line, validated into `params::Params`;
//! - `run`, `watch`: one run at one load: threads started together, watched (live line,
//!   intervals, CPU samples at the edges of the measured window), collected;
//! - `connector`: one thread opens the connections (paced, bound to source addresses) and
//!   hands them to the workers; `descriptors`: plain descriptors, or io_uring direct ones
//!   when the connections are more than the process may open;
//! - `worker`: one event loop per thread over its own backend instance (io_uring by
//!   default): closed or open loop, batched sends, every echoed byte checked;
//! - `pattern`: message content that any byte of can be regenerated from (key, offset);
//! - `tally`, `interval`: measurements, whole and per interval;
//! - `report`, `json`, `plot`, `hdr`, `sink`: the summary, JSON, SVG, HdrHistogram's
//!   encodings and interval log, and where intervals go;
//! - `udp`: the same loads over UDP, loss and order counted from the sequence numbers;
//! - `merge`: many runs' JSON into one exact report.
//!
//! This module runs the whole thing: the start time, the runs of a sweep, the outputs, Ctrl-C
//! and the exit code.

pub mod args;
mod connector;
mod descriptors;
mod hdr;
mod interval;
mod json;
mod merge;
mod params;
mod parse;
mod pattern;
mod plot;
mod report;
mod run;
mod sink;
mod tally;
mod udp;
mod watch;
mod worker;

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use echoport_core::Waker;

pub use args::Args;
use params::{Load, Params};
use report::RunResult;
use run::Env;
use sink::Sink;

/// Exit status when interrupted by SIGINT (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;

/// Wakes whichever workers the current run has (the signal thread is started once).
#[derive(Default)]
pub struct WakerSet(Mutex<Vec<Arc<dyn Waker>>>);

impl Waker for WakerSet {
    fn wake(&self) {
        for w in self.0.lock().expect("waker set lock").iter() {
            w.wake();
        }
    }
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs the load generator (or `bench merge`).
pub fn run(mut a: Args) -> anyhow::Result<ExitCode> {
    if let Some(args::Cmd::Merge(m)) = a.cmd.take().map(|c| *c) {
        return merge::run(m);
    }
    let mut p = Params::from_args(&a)?;
    let kind = crate::backends::choose(p.backend, &crate::backends::Options::default())?;
    descriptors::plan(&mut p, &a, &kind)?;
    if let Some(&cpu) = p.cpus.first() {
        // The connector, signal and main threads stay off the server's CPUs too.
        echoport_io::sys::pin_to_cpu(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let wakers = Arc::new(WakerSet::default());
    echoport_io::sys::handle_stop_signals(stop.clone(), vec![wakers.clone() as Arc<dyn Waker>])?;
    let started = unix_now();
    let live_line = !a.quiet && std::io::stderr().is_terminal();
    if let Some(at) = p.start_at {
        if !wait_until(at, &stop, a.quiet) {
            eprintln!("echoport bench: interrupted before the start time");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    }
    let mut sink = Sink::open(&p, &a, live_line)?;
    let env = Env {
        p: &p,
        kind,
        server_pid: a.server_pid,
        stop: stop.clone(),
        wakers,
        live_line,
    };
    let mut runs = Vec::new();
    for (i, load) in p.loads().into_iter().enumerate() {
        let r = run::run_once(&env, load, &mut sink, i)?;
        let interrupted = r.interrupted;
        if !p.sweep.is_empty() {
            eprint!("{}", report::text(&p, &r));
        }
        runs.push(r);
        if interrupted {
            break;
        }
    }
    report_all(&p, &a, &runs, started)
}

/// Sleeps until `at` (Unix seconds); false when interrupted first.
fn wait_until(at: f64, stop: &AtomicBool, quiet: bool) -> bool {
    let ahead = at - unix_now();
    if ahead < -1.0 {
        eprintln!(
            "echoport bench: warning: the start time {} passed {ahead:.1} s ago; starting now",
            parse::rfc3339_utc(at)
        );
    } else if ahead > 0.0 && !quiet {
        eprintln!(
            "echoport bench: waiting {ahead:.1} s for the start time {}",
            parse::rfc3339_utc(at)
        );
    }
    loop {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let left = at - unix_now();
        if left <= 0.0 {
            return true;
        }
        std::thread::sleep(Duration::from_secs_f64(left.min(0.05)));
    }
}

/// The summary, the JSON document, the files; the exit code.
fn report_all(p: &Params, a: &Args, runs: &[RunResult], started: f64) -> anyhow::Result<ExitCode> {
    let interrupted = runs.iter().any(|r| r.interrupted);
    let failed = runs.iter().any(|r| r.failed());
    let code = if interrupted {
        EXIT_INTERRUPTED
    } else if failed {
        1
    } else {
        0
    };
    let summary = if p.sweep.is_empty() {
        report::text(p, &runs[0])
    } else {
        report::sweep_table(runs)
    };
    if a.json {
        eprint!("{summary}");
        let doc = json::doc(p, runs, interrupted, code, started);
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        print!("{summary}");
    }
    write_files(p, a, runs)?;
    Ok(ExitCode::from(code))
}

/// `--hgrm`, `--plot` and `--raw-samples`.
fn write_files(p: &Params, a: &Args, runs: &[RunResult]) -> anyhow::Result<()> {
    let write = |path: &std::path::Path, text: String| {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = &a.hgrm {
        for r in runs {
            let path = match r.load {
                Load::Open { rate } if !p.sweep.is_empty() => {
                    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
                    let ext = path
                        .extension()
                        .map(|e| format!(".{}", e.to_string_lossy()))
                        .unwrap_or_default();
                    path.with_file_name(format!("{stem}-{:.0}{ext}", rate))
                }
                _ => path.clone(),
            };
            write(&path, report::hgrm(&r.tally))?;
        }
    }
    if let Some(path) = &a.plot {
        write(path, plot_of(p, runs))?;
    }
    if let Some(path) = &a.raw_samples {
        let mut s = String::new();
        for v in runs
            .iter()
            .filter_map(|r| r.tally.samples.as_ref())
            .flatten()
        {
            let _ = writeln!(s, "{v}");
        }
        write(path, s)?;
    }
    Ok(())
}

fn plot_of(p: &Params, runs: &[RunResult]) -> String {
    if p.sweep.is_empty() {
        let r = &runs[0];
        plot::percentiles(
            &r.tally.hist,
            &format!(
                "echoport bench: {} connections, {}, {}",
                p.connections,
                p.size,
                match r.load {
                    Load::Closed { pipeline } => format!("closed loop (pipeline {pipeline})"),
                    Load::Open { rate } => format!("{} msgs/s", report::group(rate)),
                }
            ),
        )
    } else {
        let points: Vec<(f64, &hdrhistogram::Histogram<u64>)> = runs
            .iter()
            .map(|r| (r.msgs_per_sec(), &r.tally.hist))
            .collect();
        plot::sweep(
            &points,
            &format!(
                "echoport bench: latency vs load, {} connections, {}",
                p.connections, p.size
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::run::share;

    #[test]
    fn connections_are_dealt_evenly() {
        for (c, n) in [(50, 2), (7, 3), (1, 1), (500, 7)] {
            let v: Vec<usize> = (0..n).map(|t| share(c, n, t)).collect();
            assert_eq!(v.iter().sum::<usize>(), c);
            for (t, &got) in v.iter().enumerate() {
                assert_eq!(got, (0..c).filter(|g| g % n == t).count());
            }
        }
    }
}
