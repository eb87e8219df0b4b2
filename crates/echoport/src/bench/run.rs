//! One run at one load: start the worker threads (each opens its backend and says so), start
//! them together with the connector, watch them ([`super::watch`]), collect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::args::CloseMode;
use super::connector::{self, ChurnPolicy, ConnectReport, Request};
use super::interval::{self, Merger, Recorder};
use super::params::{Load, Params};
use super::report::RunResult;
use super::sink::{RunInfo, Sink};
use super::tally::Tally;
use super::watch::{self, Watched};
use super::worker::{self, Delivery, Live, Plan, Task, ThreadLoad};
use super::{WakerSet, unix_now};

/// What every run of one invocation shares.
pub struct Env<'a> {
    /// The parameters.
    pub p: &'a Params,
    /// The backend chosen for the workers.
    pub kind: crate::backends::Chosen,
    /// The server whose CPU time to sample.
    pub server_pid: Option<u32>,
    /// Ctrl-C.
    pub stop: Arc<AtomicBool>,
    /// The wakers Ctrl-C wakes.
    pub wakers: Arc<WakerSet>,
    /// Whether to draw the live line.
    pub live_line: bool,
}

/// Worker threads running, and what watching and collecting them needs.
pub struct Running {
    /// The workers.
    pub handles: Vec<JoinHandle<anyhow::Result<worker::Outcome>>>,
    /// Their live counters.
    pub lives: Vec<Arc<Live>>,
    /// The run's start.
    pub epoch: Instant,
    /// The same instant on the wall clock.
    pub epoch_unix_s: f64,
    /// The backend's description.
    pub backend: String,
    /// The connector thread and the flag that ends it.
    pub connector: Option<(JoinHandle<ConnectReport>, Arc<AtomicBool>)>,
}

/// A worker thread started but not yet told to begin.
struct Pending {
    handle: JoinHandle<anyhow::Result<worker::Outcome>>,
    incoming: Sender<Delivery>,
    start: Sender<Instant>,
    live: Arc<Live>,
}

/// Most send buffers a worker's pool holds.
const SEND_BUFFERS: u32 = 16384;

/// Connections of thread `t` when `c` are dealt round-robin over `n` threads.
pub fn share(c: usize, n: usize, t: usize) -> usize {
    (c + n - 1 - t) / n
}

/// Thread `t`'s part of `count` messages, in proportion to its connections.
pub fn count_share(p: &Params, t: usize) -> Option<u64> {
    let cum: usize = (0..t).map(|i| share(p.connections, p.threads, i)).sum();
    let conns = share(p.connections, p.threads, t);
    p.count.map(|c| {
        let before = (c as u128 * cum as u128 / p.connections as u128) as u64;
        let after = (c as u128 * (cum + conns) as u128 / p.connections as u128) as u64;
        after - before
    })
}

/// Thread `t`'s load.
pub fn thread_load(p: &Params, load: Load, t: usize) -> ThreadLoad {
    match load {
        Load::Closed { pipeline } => ThreadLoad::Closed { pipeline },
        Load::Open { rate } => {
            let conns = share(p.connections, p.threads, t);
            let r = rate * conns as f64 / p.connections as f64;
            ThreadLoad::Open {
                interval_ns: 1e9 / r,
                offset_ns: t as f64 * 1e9 / rate,
            }
        }
    }
}

/// Thread `t`'s plan: its share of the load and of the count, and the run's timing.
pub fn thread_plan(p: &Params, load: Load, t: usize) -> Plan {
    Plan {
        load: thread_load(p, load, t),
        size: p.size,
        warmup_ns: p.warmup.as_nanos() as u64,
        end_ns: end_ns(p),
        count: count_share(p, t),
        timeout_ns: p.timeout.as_nanos() as u64,
        tick_ns: p.tick.as_nanos() as u64,
        spin_ns: p.spin.as_nanos() as u64,
        keep_samples: p.keep_samples,
        messages_per_conn: p.messages_per_conn,
        reconnect: p.reconnect,
    }
}

/// When measuring ends (duration mode), ns since the start.
pub fn end_ns(p: &Params) -> Option<u64> {
    p.count
        .is_none()
        .then(|| (p.warmup + p.duration).as_nanos() as u64)
}

/// The interval recorder of thread `t`, when intervals are wanted.
pub fn recorder(p: &Params, t: usize, tx: &Option<Sender<interval::Report>>) -> Option<Recorder> {
    let every = p.interval?;
    let tx = tx.as_ref()?.clone();
    Some(Recorder::new(
        t,
        p.warmup.as_nanos() as u64,
        every.as_nanos() as u64,
        tx,
    ))
}

/// One run at one load.
pub fn run_once(env: &Env, load: Load, sink: &mut Sink, index: usize) -> anyhow::Result<RunResult> {
    let (ivl_tx, ivl_rx) = mpsc::channel();
    let ivl_tx = sink.every().map(|_| ivl_tx);
    let drops0 = env.p.udp.then(super::udp::rcvbuf_errors).flatten();
    let running = if env.p.udp {
        super::udp::start(env, load, &ivl_tx)?
    } else {
        start_tcp(env, load, &ivl_tx)?
    };
    drop(ivl_tx);
    let mut r = finish(env, load, sink, index, running, ivl_rx)?;
    if let (Some(a), Some(b)) = (drops0, super::udp::rcvbuf_errors()) {
        r.tally.udp.host_rcvbuf_errors = b.saturating_sub(a);
    }
    Ok(r)
}

/// Watches a run to its end and collects its results; shared by TCP and UDP.
pub fn finish(
    env: &Env,
    load: Load,
    sink: &mut Sink,
    index: usize,
    running: Running,
    ivl_rx: Receiver<interval::Report>,
) -> anyhow::Result<RunResult> {
    let p = env.p;
    let info = RunInfo {
        index,
        sweep_rate: match load {
            Load::Open { rate } if !p.sweep.is_empty() => Some(rate),
            _ => None,
        },
        window_start_unix_s: running.epoch_unix_s + p.warmup.as_secs_f64(),
    };
    let mut merger = Merger::new(running.handles.len());
    let watched = {
        let mut feed = || -> anyhow::Result<()> {
            for rep in ivl_rx.try_iter() {
                merger.take(rep);
            }
            emit_ready(sink, &info, &mut merger)
        };
        watch::watch(env, &running, &mut feed)?
    };
    env.wakers.0.lock().expect("waker set lock").clear();
    let mut r = collect(env, load, running, watched)?;
    for rep in ivl_rx.try_iter() {
        merger.take(rep);
    }
    emit_rest(sink, &info, &mut merger, &r)?;
    r.tally.samples = r.tally.samples.take().filter(|_| p.keep_samples);
    Ok(r)
}

fn emit_ready(sink: &mut Sink, info: &RunInfo, m: &mut Merger) -> anyhow::Result<()> {
    let every = sink.every().map_or(1.0, |d| d.as_secs_f64());
    for (idx, part) in m.ready() {
        sink.emit(info, idx, &part, every)?;
    }
    Ok(())
}

/// The intervals left once the threads are done: the last one is cut at the window's end,
/// empty ones past it are not written.
fn emit_rest(sink: &mut Sink, info: &RunInfo, m: &mut Merger, r: &RunResult) -> anyhow::Result<()> {
    let every = sink.every().map_or(1.0, |d| d.as_secs_f64());
    let window = r.window.as_secs_f64();
    for (idx, part) in m.rest() {
        let start = idx as f64 * every;
        let length = every.min(window - start);
        if length <= 0.0 && part.msgs() == 0 {
            continue;
        }
        sink.emit(info, idx, &part, length.max(0.0))?;
    }
    Ok(())
}

/// Starts the TCP workers and the connector.
fn start_tcp(
    env: &Env,
    load: Load,
    ivl_tx: &Option<Sender<interval::Report>>,
) -> anyhow::Result<Running> {
    let p = env.p;
    let churn = ChurnPolicy {
        serve: p.messages_per_conn.is_some() || p.reconnect,
        retry: p.reconnect,
        rst: p.close == CloseMode::Rst,
    };
    let (req_tx, req_rx) = mpsc::channel();
    let (pending, thread_wakers, backend) =
        spawn_all(env, load, ivl_tx, churn.serve.then_some(req_tx))?;
    *env.wakers.0.lock().expect("waker set lock") = thread_wakers.clone();
    let epoch = Instant::now();
    let epoch_unix_s = unix_now();
    let mut targets = Vec::new();
    let mut handles = Vec::new();
    let mut lives = Vec::new();
    for (w, waker) in pending.into_iter().zip(thread_wakers) {
        let _ = w.start.send(epoch);
        targets.push((w.incoming, waker));
        handles.push(w.handle);
        lives.push(w.live);
    }
    let halt = Arc::new(AtomicBool::new(false));
    let connector = connector::Connector {
        server: p.server,
        sources: p.sources.clone(),
        proxy: p.proxy,
        connections: p.connections,
        rate: p.connect_rate,
        timeout: p.timeout,
        targets,
        requests: churn.serve.then_some(req_rx),
        churn,
        stop: env.stop.clone(),
        halt: halt.clone(),
        epoch,
        window: (p.warmup.as_nanos() as u64, end_ns(p)),
        in_hand: Default::default(),
    };
    let connector = std::thread::Builder::new()
        .name("bench-connect".into())
        .spawn(move || connector.run())
        .context("spawning the connector thread")?;
    Ok(Running {
        handles,
        lives,
        epoch,
        epoch_unix_s,
        backend,
        connector: Some((connector, halt)),
    })
}

/// Workers ready to begin: their handles, wakers and the backend's description.
type Spawned = (Vec<Pending>, Vec<Arc<dyn echoport_core::Waker>>, String);

/// Spawns every worker and waits until each has opened its backend (or one failed).
fn spawn_all(
    env: &Env,
    load: Load,
    ivl_tx: &Option<Sender<interval::Report>>,
    req_tx: Option<Sender<Request>>,
) -> anyhow::Result<Spawned> {
    let p = env.p;
    let (ready_tx, ready_rx) = mpsc::channel();
    let mut pending = Vec::new();
    for t in 0..p.threads {
        let ivl = recorder(p, t, ivl_tx);
        pending.push(spawn_worker(env, load, t, &ready_tx, ivl, req_tx.clone())?);
    }
    drop((ready_tx, req_tx));
    let mut thread_wakers = Vec::new();
    let mut backend = String::new();
    let mut failure = None;
    for r in ready_rx.iter().take(p.threads) {
        match r {
            Ok((w, d)) => {
                thread_wakers.push(w);
                backend = d;
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if thread_wakers.len() < p.threads && failure.is_none() {
        failure = Some("a bench thread exited before it was ready".into());
    }
    if let Some(e) = failure {
        // Dropping the start senders lets the ready threads return.
        let handles: Vec<_> = pending.into_iter().map(|w| w.handle).collect();
        for h in handles {
            let _ = h.join();
        }
        bail!("{e}");
    }
    Ok((pending, thread_wakers, backend))
}

fn spawn_worker(
    env: &Env,
    load: Load,
    t: usize,
    ready: &Sender<worker::Ready>,
    intervals: Option<Recorder>,
    requests: Option<Sender<Request>>,
) -> anyhow::Result<Pending> {
    let p = env.p;
    let conns = share(p.connections, p.threads, t);
    let plan = thread_plan(p, load, t);
    let opts = crate::backends::Options {
        pool: echoport_io::pool::PoolConfig {
            buf_size: if conns > 2048 { 2048 } else { 8192 },
            buffers: (conns as u32 * 2).next_power_of_two().clamp(256, 4096),
            // One send in flight per connection; beyond this many, a connection with bytes to
            // send waits for a buffer (a million idle connections need no million buffers).
            send_buffers: (conns as u32 + 16).min(SEND_BUFFERS),
        },
        fast_path: true,
        cq_entries: 65536,
        batch_wait_us: 0,
        direct_accept: false,
        direct_adopt: p.direct,
        max_rings: if p.direct {
            let table = echoport_io::sys::nofile_limit().min(1 << 20) as u32;
            echoport_io::uring::rings_for(conns, table) + 1
        } else {
            1
        },
        ..Default::default()
    };
    let (in_tx, in_rx) = mpsc::channel();
    let (start_tx, start_rx) = mpsc::channel();
    let live = Arc::new(Live::default());
    let task = Task {
        plan,
        stop: env.stop.clone(),
        live: live.clone(),
        incoming: in_rx,
        expected: conns as u64,
        requests,
        ready: ready.clone(),
        start: start_rx,
        intervals,
    };
    let cpu = (!p.cpus.is_empty()).then(|| p.cpus[t % p.cpus.len()]);
    let ready = ready.clone();
    let kind = env.kind.clone();
    let handle = crate::threads::spawn_loop(
        format!("bench-w{t}"),
        cpu,
        kind,
        opts,
        move |e| {
            let _ = ready.send(Err(e));
        },
        move |backend| backend.run(task),
    )?;
    Ok(Pending {
        handle,
        incoming: in_tx,
        start: start_tx,
        live,
    })
}

/// Joins the threads and computes the window.
fn collect(env: &Env, load: Load, running: Running, watched: Watched) -> anyhow::Result<RunResult> {
    let p = env.p;
    if let Some((_, halt)) = &running.connector {
        halt.store(true, Ordering::Release);
    }
    let mut tally = Tally::default();
    let mut error = None;
    for h in running.handles {
        match h.join() {
            Ok(Ok(o)) => tally.merge(&o.tally),
            Ok(Err(e)) => error = error.or(Some(e)),
            Err(_) => error = error.or(Some(anyhow::anyhow!("a bench thread panicked"))),
        }
    }
    let connect = match running.connector {
        Some((h, _)) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the connector thread panicked"))?,
        None => ConnectReport {
            established: p.connections as u64, // UDP flows
            ..Default::default()
        },
    };
    if let Some(e) = error {
        return Err(e);
    }
    tally.errors.connect_failed += connect.failed;
    let interrupted = env.stop.load(Ordering::Acquire);
    if !interrupted {
        // (Reconnects count as established too: with churn this is never short.)
        let tried = (connect.established + connect.failed) as usize;
        tally.errors.not_opened += p.connections.saturating_sub(tried) as u64;
    }
    let warmup_ns = p.warmup.as_nanos() as u64;
    let window_end = match end_ns(p) {
        Some(e) if !interrupted => e.max(tally.last_done_ns),
        _ => tally.last_done_ns,
    };
    let window = Duration::from_nanos(window_end.saturating_sub(warmup_ns));
    let sent_window = match end_ns(p) {
        Some(_) if !interrupted => p.duration,
        _ => window,
    };
    Ok(RunResult {
        load,
        tally,
        window,
        sent_window,
        connect,
        client_cpu: watched.client_cpu,
        server_cpu: watched.server_cpu,
        interrupted,
        backend: running.backend,
        epoch_unix_s: running.epoch_unix_s,
        warmup: p.warmup,
        udp: p.udp,
    })
}
