//! `echoport bench`: the load generator.
//!
//! - [`args`], `params`, `parse`: the command line, validated into `params::Params`;
//! - [`connector`]: one thread opens the connections (paced, bound to source addresses) and
//!   hands them to the workers;
//! - [`worker`]: one event loop per thread over its own backend instance (io_uring by
//!   default): closed or open loop, batched sends, every echoed byte checked;
//! - [`pattern`]: message content that any byte of can be regenerated from (key, offset);
//! - [`tally`], [`report`], [`plot`]: measurements, the summary, JSON, .hgrm and SVG.
//!
//! This module runs the whole thing: the threads of each run, the live line, the CPU time
//! samples at the edges of the measured window, Ctrl-C and the exit code.

pub mod args;
mod connector;
mod params;
mod parse;
mod pattern;
mod plot;
mod report;
mod tally;
mod worker;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use echoport_core::Waker;

pub use args::Args;
use params::{Load, Params};
use report::{Cpu, RunResult};
use tally::Tally;
use worker::{Live, Plan, Task, ThreadLoad};

/// Exit status when interrupted by SIGINT (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;

/// Wakes whichever workers the current run has (the signal thread is started once).
#[derive(Default)]
struct WakerSet(Mutex<Vec<Arc<dyn Waker>>>);

impl Waker for WakerSet {
    fn wake(&self) {
        for w in self.0.lock().expect("waker set lock").iter() {
            w.wake();
        }
    }
}

/// Runs the load generator.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let p = Params::from_args(&a)?;
    let kind = crate::backends::choose(p.backend, &crate::backends::Options::default())?;
    if let Some(&cpu) = p.cpus.first() {
        // The connector, signal and main threads stay off the server's CPUs too.
        echoport_io::sys::pin_to_cpu(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let wakers = Arc::new(WakerSet::default());
    echoport_io::sys::handle_stop_signals(stop.clone(), vec![wakers.clone() as Arc<dyn Waker>])?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let live_line = !a.quiet && std::io::stderr().is_terminal();

    let mut runs = Vec::new();
    for load in p.loads() {
        let r = run_once(&p, load, kind.clone(), &a, &stop, &wakers, live_line)?;
        let interrupted = r.interrupted;
        if !p.sweep.is_empty() {
            eprint!("{}", report::text(&p, &r));
        }
        runs.push(r);
        if interrupted {
            break;
        }
    }
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
        report::text(&p, &runs[0])
    } else {
        report::sweep_table(&runs)
    };
    if a.json {
        eprint!("{summary}");
        let doc = report::json_doc(&p, &runs, interrupted, code, started);
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        print!("{summary}");
    }
    if let Some(path) = &a.hgrm {
        for r in &runs {
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
            std::fs::write(&path, report::hgrm(&r.tally))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if let Some(path) = &a.plot {
        let svg = if p.sweep.is_empty() {
            let r = &runs[0];
            plot::percentiles(
                &r.tally,
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
            plot::sweep(
                &runs,
                &format!(
                    "echoport bench: latency vs load, {} connections, {}",
                    p.connections, p.size
                ),
            )
        };
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::from(code))
}

/// Connections of thread `t` when `c` are dealt round-robin over `n` threads.
fn share(c: usize, n: usize, t: usize) -> usize {
    (c + n - 1 - t) / n
}

/// One run at one load: start the threads, watch, sample CPU, collect.
fn run_once(
    p: &Params,
    load: Load,
    kind: crate::backends::Chosen,
    a: &Args,
    stop: &Arc<AtomicBool>,
    wakers: &Arc<WakerSet>,
    live_line: bool,
) -> anyhow::Result<RunResult> {
    let n = p.threads;
    let warmup_ns = p.warmup.as_nanos() as u64;
    let end_ns = p
        .count
        .is_none()
        .then(|| warmup_ns + p.duration.as_nanos() as u64);
    let mut spawned = Vec::new();
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut cum = 0usize;
    for t in 0..n {
        let conns = share(p.connections, n, t);
        let thread_load = match load {
            Load::Closed { pipeline } => ThreadLoad::Closed { pipeline },
            Load::Open { rate } => {
                let r = rate * conns as f64 / p.connections as f64;
                ThreadLoad::Open {
                    interval_ns: 1e9 / r,
                    offset_ns: t as f64 * 1e9 / rate,
                }
            }
        };
        let count = p.count.map(|c| {
            let before = (c as u128 * cum as u128 / p.connections as u128) as u64;
            let after = (c as u128 * (cum + conns) as u128 / p.connections as u128) as u64;
            after - before
        });
        cum += conns;
        let plan = Plan {
            load: thread_load,
            size: p.size,
            warmup_ns,
            end_ns,
            count,
            timeout_ns: p.timeout.as_nanos() as u64,
            tick_ns: p.tick.as_nanos() as u64,
            spin_ns: p.spin.as_nanos() as u64,
        };
        let opts = crate::backends::Options {
            buf_size: if conns > 2048 { 2048 } else { 8192 },
            buffers: (conns as u32 * 2).next_power_of_two().clamp(256, 4096),
            fast_path: true,
            cq_entries: 65536,
            batch_wait_us: 0,
            send_buffers: conns as u32 + 16,
            ..Default::default()
        };
        let (in_tx, in_rx) = mpsc::channel();
        let (start_tx, start_rx) = mpsc::channel();
        let live = Arc::new(Live::default());
        let task = Task {
            plan,
            stop: stop.clone(),
            live: live.clone(),
            incoming: in_rx,
            ready: ready_tx.clone(),
            start: start_rx,
        };
        let cpu = (!p.cpus.is_empty()).then(|| p.cpus[t % p.cpus.len()]);
        let ready = ready_tx.clone();
        let kind = kind.clone();
        let h = std::thread::Builder::new()
            .name(format!("bench-w{t}"))
            .spawn(move || -> anyhow::Result<worker::Outcome> {
                if let Some(cpu) = cpu {
                    if let Err(e) = echoport_io::sys::pin_to_cpu(cpu) {
                        let _ = ready.send(Err(format!("pinning to CPU {cpu}: {e}")));
                        bail!("pinning to CPU {cpu}: {e}");
                    }
                }
                match crate::backends::open(&kind, &opts) {
                    Ok(b) => b.run(task),
                    Err(e) => {
                        let _ = ready.send(Err(format!("{e:#}")));
                        Err(e)
                    }
                }
            })
            .context("spawning a bench thread")?;
        spawned.push((h, in_tx, start_tx, live));
    }
    drop(ready_tx);

    let mut thread_wakers = Vec::new();
    let mut backend = String::new();
    let mut failure = None;
    for r in ready_rx.iter().take(n) {
        match r {
            Ok((w, d)) => {
                thread_wakers.push(w);
                backend = d;
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if thread_wakers.len() < n && failure.is_none() {
        failure = Some("a bench thread exited before it was ready".into());
    }
    if let Some(e) = failure {
        // Dropping the start senders lets the ready threads return.
        let handles: Vec<_> = spawned.into_iter().map(|(h, ..)| h).collect();
        for h in handles {
            let _ = h.join();
        }
        bail!("{e}");
    }
    *wakers.0.lock().expect("waker set lock") = thread_wakers.clone();

    let epoch = Instant::now();
    let mut targets = Vec::new();
    let mut handles = Vec::new();
    let mut lives = Vec::new();
    for ((h, in_tx, start_tx, live), w) in spawned.into_iter().zip(thread_wakers) {
        let _ = start_tx.send(epoch);
        targets.push((in_tx, w));
        handles.push(h);
        lives.push(live);
    }
    let halt = Arc::new(AtomicBool::new(false));
    let connector = connector::Connector {
        server: p.server,
        sources: p.sources.clone(),
        connections: p.connections,
        rate: p.connect_rate,
        timeout: p.timeout,
        targets,
        stop: stop.clone(),
        halt: halt.clone(),
        epoch,
    };
    let connector = std::thread::Builder::new()
        .name("bench-connect".into())
        .spawn(move || connector.run())
        .context("spawning the connector thread")?;

    // Watch: the live line once a second; CPU samples when the warm-up ends and when the
    // threads are done (the last measured echo is back: everything it cost is counted).
    let warm_at = epoch + p.warmup;
    let mut cpu0: Option<Sample> = None;
    let mut next_tick = epoch + Duration::from_secs(1);
    let mut last_done = 0u64;
    let mut last_bytes = 0u64;
    let mut secs = 0u64;
    loop {
        if handles.iter().all(|h| h.is_finished()) {
            break;
        }
        let now = Instant::now();
        if cpu0.is_none() && now >= warm_at {
            cpu0 = Sample::take(a.server_pid);
        }
        if now >= next_tick {
            secs += 1;
            next_tick += Duration::from_secs(1);
            if live_line {
                let sum = |f: &dyn Fn(&Live) -> u64| lives.iter().map(|l| f(l)).sum::<u64>();
                let done = sum(&|l| l.done.load(Ordering::Relaxed));
                let bytes = sum(&|l| l.bytes.load(Ordering::Relaxed));
                let errors = sum(&|l| l.errors.load(Ordering::Relaxed));
                let conns = sum(&|l| l.conns.load(Ordering::Relaxed));
                let phase = if now < warm_at { " (warm-up)" } else { "" };
                eprint!(
                    "\r\x1b[K  {secs:>4}s  {:>10} msgs/s  {:>9.2} MiB/s  {conns} conns  {errors} errors{phase}",
                    report::group((done - last_done) as f64),
                    (bytes - last_bytes) as f64 / (1024.0 * 1024.0),
                );
                let _ = std::io::stderr().flush();
                last_done = done;
                last_bytes = bytes;
            }
        }
        let mut until = now + Duration::from_millis(20);
        until = until.min(next_tick);
        if cpu0.is_none() {
            until = until.min(warm_at);
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    let cpu1 = Sample::take(a.server_pid);
    if live_line {
        eprint!("\r\x1b[K");
    }
    halt.store(true, Ordering::Release);
    wakers.0.lock().expect("waker set lock").clear();

    let mut tally = Tally::default();
    let mut error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(o)) => tally.merge(&o.tally),
            Ok(Err(e)) => error = error.or(Some(e)),
            Err(_) => error = error.or(Some(anyhow::anyhow!("a bench thread panicked"))),
        }
    }
    let connect = connector
        .join()
        .map_err(|_| anyhow::anyhow!("the connector thread panicked"))?;
    if let Some(e) = error {
        return Err(e);
    }
    tally.errors.connect_failed = connect.failed;
    let interrupted = stop.load(Ordering::Acquire);
    let window_end = match end_ns {
        Some(e) if !interrupted => e.max(tally.last_done_ns),
        _ => tally.last_done_ns,
    };
    let window = Duration::from_nanos(window_end.saturating_sub(warmup_ns));
    let sent_window = match end_ns {
        Some(_) if !interrupted => p.duration,
        _ => window,
    };
    let (client_cpu, server_cpu) = match (cpu0, cpu1) {
        (Some(a0), Some(a1)) => (
            Some(Cpu {
                user_s: (a1.user - a0.user).max(0.0),
                system_s: (a1.system - a0.system).max(0.0),
            }),
            match (a0.server, a1.server, a.server_pid) {
                (Some(s0), Some(s1), Some(pid)) => Some((
                    pid,
                    Cpu {
                        user_s: (s1.0 - s0.0).max(0.0),
                        system_s: (s1.1 - s0.1).max(0.0),
                    },
                )),
                _ => None,
            },
        ),
        _ => (None, None),
    };
    Ok(RunResult {
        load,
        tally,
        window,
        sent_window,
        connect,
        client_cpu,
        server_cpu,
        interrupted,
        backend,
    })
}

/// CPU times at one instant: this process's, and the server's when asked for.
struct Sample {
    user: f64,
    system: f64,
    server: Option<(f64, f64)>,
}

impl Sample {
    fn take(server_pid: Option<u32>) -> Option<Sample> {
        let (u, s) = echoport_io::sys::process_cpu_time().ok()?;
        Some(Sample {
            user: u.as_secs_f64(),
            system: s.as_secs_f64(),
            server: server_pid.and_then(proc_cpu),
        })
    }
}

/// User and system CPU seconds of process `pid`, from `/proc/PID/stat`.
fn proc_cpu(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let hz = echoport_io::sys::clock_ticks_per_second() as f64;
    Some((
        f.get(11)?.parse::<f64>().ok()? / hz,
        f.get(12)?.parse::<f64>().ok()? / hz,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn own_process_cpu_is_readable() {
        let (u, s) = proc_cpu(std::process::id()).expect("own /proc stat");
        assert!(u >= 0.0 && s >= 0.0);
    }
}
