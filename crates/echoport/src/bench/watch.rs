//! Watching a run from the main thread: the live line once a second (on a terminal), the
//! finished intervals as they come, and the CPU time samples at the edges of the measured
//! window (when the warm-up ends, and when the threads are done: the last measured echo is
//! back, so everything it cost is counted).

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::report::{self, Cpu};
use super::run::{Env, Running};
use super::worker::Live;

/// What watching measured.
pub struct Watched {
    /// This process's CPU over the measured window (None when the run ended before it began).
    pub client_cpu: Option<Cpu>,
    /// The server's, with `--server-pid`.
    pub server_cpu: Option<(u32, Cpu)>,
}

/// The live line's previous totals.
#[derive(Default)]
struct LiveLine {
    secs: u64,
    done: u64,
    bytes: u64,
}

impl LiveLine {
    fn draw(&mut self, lives: &[std::sync::Arc<Live>], warm: bool) {
        let sum = |f: &dyn Fn(&Live) -> u64| lives.iter().map(|l| f(l)).sum::<u64>();
        let done = sum(&|l| l.done.load(Ordering::Relaxed));
        let bytes = sum(&|l| l.bytes.load(Ordering::Relaxed));
        let errors = sum(&|l| l.errors.load(Ordering::Relaxed));
        let conns = sum(&|l| l.conns.load(Ordering::Relaxed));
        let phase = if warm { " (warm-up)" } else { "" };
        self.secs += 1;
        eprint!(
            "\r\x1b[K  {:>4}s  {:>10} msgs/s  {:>9.2} MiB/s  {conns} conns  {errors} errors{phase}",
            self.secs,
            report::group(done.saturating_sub(self.done) as f64),
            bytes.saturating_sub(self.bytes) as f64 / (1024.0 * 1024.0),
        );
        let _ = std::io::stderr().flush();
        self.done = done;
        self.bytes = bytes;
    }
}

/// Watches until every worker thread has finished; `feed` is called every turn (about every
/// 20 ms) to pass on finished intervals.
pub fn watch(
    env: &Env,
    running: &Running,
    feed: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Watched> {
    let epoch = running.epoch;
    let warm_at = epoch + env.p.warmup;
    let mut cpu0: Option<Sample> = None;
    let mut next_tick = epoch + Duration::from_secs(1);
    let mut line = LiveLine::default();
    while !running.handles.iter().all(|h| h.is_finished()) {
        let now = Instant::now();
        if cpu0.is_none() && now >= warm_at {
            cpu0 = Sample::take(env.server_pid);
        }
        if now >= next_tick {
            next_tick += Duration::from_secs(1);
            if env.live_line {
                line.draw(&running.lives, now < warm_at);
            }
        }
        feed()?;
        let mut until = (now + Duration::from_millis(20)).min(next_tick);
        if cpu0.is_none() {
            until = until.min(warm_at);
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    let cpu1 = Sample::take(env.server_pid);
    if env.live_line {
        eprint!("\r\x1b[K");
    }
    Ok(cpu_over(cpu0, cpu1, env.server_pid))
}

fn cpu_over(cpu0: Option<Sample>, cpu1: Option<Sample>, pid: Option<u32>) -> Watched {
    let (Some(a0), Some(a1)) = (cpu0, cpu1) else {
        return Watched {
            client_cpu: None,
            server_cpu: None,
        };
    };
    let diff = |u0: f64, s0: f64, u1: f64, s1: f64| Cpu {
        user_s: (u1 - u0).max(0.0),
        system_s: (s1 - s0).max(0.0),
    };
    Watched {
        client_cpu: Some(diff(a0.user, a0.system, a1.user, a1.system)),
        server_cpu: match (a0.server, a1.server, pid) {
            (Some(s0), Some(s1), Some(pid)) => Some((pid, diff(s0.0, s0.1, s1.0, s1.1))),
            _ => None,
        },
    }
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

/// User and system CPU seconds of process `pid`.
fn proc_cpu(pid: u32) -> Option<(f64, f64)> {
    let (u, s) = echoport_io::sys::process_cpu_of(pid).ok()?;
    Some((u.as_secs_f64(), s.as_secs_f64()))
}
