//! `echoport serve`: check the flags, bind the listeners, start one event loop per thread,
//! stop on a signal.
//!
//! Each worker thread owns one backend instance (one io_uring ring, one epoll set, ...) and
//! its own listening socket per address (`SO_REUSEPORT`, so the kernel spreads connections
//! over the threads) or a duplicate of one shared socket. What the threads share: the stop
//! flag, the connection budget ([`echoport_core::admission::Admission`]), the published
//! counters when `--metrics` is on ([`LiveStats`], one padded block per thread), the UDP
//! rate budget when `--udp` is on, and on Windows the listening socket itself.

mod args;
mod bind;
mod capacity;
mod settings;

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use echoport_core::live::LiveStats;
use echoport_core::stats::Stats;
use echoport_core::udp::UdpStats;
use echoport_core::worker::{Admission, Config, Worker};
use echoport_core::{Backend, Waker};

pub use args::{Args, BackendChoice, ListenerMode};
// Used by the Linux-only parts: the io_uring options and the load generator.
#[cfg(target_os = "linux")]
pub use args::{TaskRunChoice, parse_cpu_list};
use capacity::{Capacity, Plan};
use settings::Settings;

/// Runs the server until stopped; exit code 0 after a graceful stop.
pub fn run(mut args: Args) -> anyhow::Result<ExitCode> {
    let settings = Settings::check(&mut args)?;
    let notifier = Notifier::from_env()?.map(Arc::new);
    let nofile = raise_nofile_limit();
    let bind::Sockets {
        tcp,
        addrs,
        udp,
        mode,
    } = bind::open(&args, settings.threads)?;
    let metrics = match &args.metrics {
        Some(spec) => Some(crate::metrics::bind(spec, args.metrics_public)?),
        None => None,
    };
    let live = metrics
        .as_ref()
        .map(|_| LiveStats::new(settings.threads, udp.len()));
    let cfg = worker_config(&args, &settings);
    let admission = cfg.admission.clone();
    let plan = Plan::new(&args, settings.threads, nofile);
    let opts = backend_options(&args, &plan);
    let chosen = crate::backends::choose(args.backend, &opts)?;
    let stop = Arc::new(AtomicBool::new(false));
    echoport_io::sys::block_stop_signals()?;

    let workers = spawn_workers(tcp, &cfg, live.as_ref(), &settings, &opts, &chosen, &stop)?;
    let started = wait_ready(&workers.ready, settings.threads);
    let capacity = Capacity::derive(&args, started.tables, nofile, &plan, settings.threads);
    admission.set_max(capacity.max);
    admission.set_bound(capacity.from.clone());
    let abort = |e: anyhow::Error| {
        stop.store(true, Ordering::Release);
        for w in &started.wakers {
            w.wake();
        }
        Err(e)
    };
    if let Some(e) = started.failure {
        return abort(e);
    }
    let udp_addrs: Vec<SocketAddr> = udp.iter().filter_map(|u| u.local_addr().ok()).collect();
    let metrics_udp = udp_addrs.clone();
    let udp = match start_udp(&args, udp, &stop, live.as_ref()) {
        Ok(h) => h,
        Err(e) => return abort(e),
    };
    let mut wakers = started.wakers.clone();
    if let Some(n) = &notifier {
        wakers.push(n.clone());
    }
    echoport_io::sys::handle_stop_signals(stop.clone(), wakers)?;
    if let (Some(listener), Some(live)) = (metrics, live) {
        let src = crate::metrics::Source {
            live,
            admission: admission.clone(),
            stop: stop.clone(),
            backend: started.kinds.clone(),
            udp_addrs: metrics_udp,
            started: std::time::SystemTime::now(),
        };
        if let Err(e) = start_metrics(listener, src) {
            return abort(e);
        }
    }
    log_start(&args, &settings, &chosen, &started, &capacity, mode, &addrs);
    if let Some(n) = &notifier {
        n.send(&ready_message(
            &addrs,
            &udp_addrs,
            &started.kinds,
            settings.threads,
        ));
    }
    finish(workers.handles, udp)
}

/// The backends' options: the flags, and on Linux the descriptor plan's table and ring
/// counts.
fn backend_options(args: &Args, plan: &Plan) -> crate::backends::Options {
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut opts = crate::backends::Options::from_serve(args);
    #[cfg(target_os = "linux")]
    {
        opts.direct_files = plan.table;
        opts.max_rings = plan.rings;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = plan;
    opts
}

/// Starts the metrics endpoint's thread and says where it listens.
fn start_metrics(
    listener: std::net::TcpListener,
    src: crate::metrics::Source,
) -> anyhow::Result<()> {
    let at = listener.local_addr()?;
    crate::metrics::spawn(listener, src)?;
    tracing::info!(addr = %at, "metrics on http://{at}/metrics");
    Ok(())
}

/// systemd's readiness message: `READY=1` and a status line.
fn ready_message(tcp: &[SocketAddr], udp: &[SocketAddr], backend: &str, threads: usize) -> String {
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut status = format!(
        "Serving TCP on {} ({backend}, {threads} threads)",
        list(tcp)
    );
    if !udp.is_empty() {
        status.push_str(&format!("; UDP on {}", list(udp)));
    }
    format!("READY=1\nSTATUS={status}\nMAINPID={}", std::process::id())
}

#[cfg(unix)]
use crate::systemd::Notifier;

/// No service manager to notify on this platform.
#[cfg(not(unix))]
struct Notifier;

#[cfg(not(unix))]
impl Notifier {
    fn from_env() -> anyhow::Result<Option<Notifier>> {
        Ok(None)
    }
    fn send(&self, _msg: &str) {}
}

#[cfg(not(unix))]
impl Waker for Notifier {
    fn wake(&self) {}
}

/// Waits for every thread, logs the final counters, and says how the run ended.
fn finish(
    workers: Vec<JoinHandle<anyhow::Result<Stats>>>,
    udp: Vec<JoinHandle<UdpStats>>,
) -> anyhow::Result<ExitCode> {
    let (total, per_thread, error) = join_workers(workers);
    let udp_total = (!udp.is_empty()).then(|| {
        let mut t = UdpStats::default();
        for h in udp {
            if let Ok(s) = h.join() {
                t.merge(&s);
            }
        }
        t
    });
    log_stopped(&total, udp_total.as_ref(), &per_thread);
    match error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Writes the stopped line from the two counter lists (`stats_counters!`, then
/// `udp_counters!`): one `tracing` field a counter, named by its key.
macro_rules! stopped_line {
    (
        @udp $t:ident $udp:ident $per_thread:ident [$($field:ident)*]
        $(#[$m:meta])* pub struct $n:ident: $f:ty;
        $( $(#[$um:meta])* $ufield:ident as $ukey:ident: $uv:expr; )*
    ) => {
        tracing::info!(
            $($field = $t.$field,)*
            $($ukey = $udp.map(|u| u.$ufield),)*
            accepted_per_thread = %$per_thread,
            "stopped"
        )
    };
    (
        $t:ident $udp:ident $per_thread:ident
        $(#[$m:meta])* pub struct $n:ident: $f:ty;
        $( $(#[$fm:meta])* $field:ident: $v:expr; )*
    ) => {
        echoport_core::udp_counters!(stopped_line @udp $t $udp $per_thread [$($field)*])
    };
}

/// The final counters, one field each (so JSON logs carry them as numbers).
fn log_stopped(t: &Stats, udp: Option<&UdpStats>, per_thread: &str) {
    echoport_core::stats_counters!(stopped_line t udp per_thread);
}

/// The descriptor limit the server runs with, after raising the soft limit to the hard one.
#[cfg(unix)]
fn raise_nofile_limit() -> u64 {
    match echoport_io::sys::raise_nofile_limit() {
        Ok((before, after)) => {
            if after > before {
                tracing::debug!(before, after, "raised the soft open-descriptor limit");
            }
            after
        }
        Err(e) => {
            let now = echoport_io::sys::nofile_limit();
            tracing::warn!(error = %e, nofile = now, "could not raise the open-descriptor limit");
            now
        }
    }
}

#[cfg(not(unix))]
fn raise_nofile_limit() -> u64 {
    echoport_io::sys::nofile_limit()
}

fn worker_config(args: &Args, s: &Settings) -> Config {
    Config {
        limits: echoport_core::conn::Limits {
            max_pending: args.max_pending,
        },
        shutdown_timeout: s.shutdown_timeout,
        // Without --max-connections, the budget is set once the backends say what they hold.
        admission: Admission::with_per_ip(
            args.max_connections.unwrap_or(usize::MAX),
            args.max_connections_per_ip,
        ),
        idle_timeout: s.idle_timeout,
        write_timeout: s.write_timeout,
        live: None,
        proxy: s.proxy.clone(),
    }
}

/// The worker threads and the channel each reports readiness on.
struct Workers {
    handles: Vec<JoinHandle<anyhow::Result<Stats>>>,
    ready: mpsc::Receiver<anyhow::Result<Ready>>,
}

fn spawn_workers(
    listeners: Vec<Vec<TcpListener>>,
    cfg: &Config,
    live: Option<&Arc<LiveStats>>,
    s: &Settings,
    opts: &crate::backends::Options,
    chosen: &crate::backends::Chosen,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Workers> {
    let (ready_tx, ready) = mpsc::channel::<anyhow::Result<Ready>>();
    let mut handles = Vec::new();
    for (i, socks) in listeners.into_iter().enumerate() {
        let ready = ready_tx.clone();
        let cfg = Config {
            live: live.map(|l| l.worker_slot(i)),
            ..cfg.clone()
        };
        let stop = stop.clone();
        let cpu = (!s.cpus.is_empty()).then(|| s.cpus[i % s.cpus.len()]);
        let opts = opts.clone();
        let chosen = chosen.clone();
        let told = ready.clone();
        let h = crate::threads::spawn_loop(
            format!("echoport-w{i}"),
            cpu,
            chosen,
            opts,
            move |e| {
                let _ = told.send(Err(anyhow::anyhow!("{e}")));
            },
            move |backend| serve_backend(backend, socks, cfg, stop, &ready),
        )?;
        handles.push(h);
    }
    Ok(Workers { handles, ready })
}

/// One worker thread's life once its backend is open: serve until stopped.
fn serve_backend(
    backend: crate::backends::AnyBackend,
    socks: Vec<TcpListener>,
    cfg: Config,
    stop: Arc<AtomicBool>,
    ready: &mpsc::Sender<anyhow::Result<Ready>>,
) -> anyhow::Result<Stats> {
    match backend {
        #[cfg(target_os = "linux")]
        crate::backends::AnyBackend::Uring(b) => serve_on(*b, socks, cfg, stop, ready),
        #[cfg(target_os = "linux")]
        crate::backends::AnyBackend::Epoll(b) => serve_on(*b, socks, cfg, stop, ready),
        #[cfg(windows)]
        crate::backends::AnyBackend::Iocp(b) => serve_on(*b, socks, cfg, stop, ready),
    }
}

/// What a worker thread reports once its backend is up.
struct Ready {
    waker: Arc<dyn Waker>,
    describe: String,
    max_connections: Option<usize>,
}

/// What the workers reported, together.
struct Started {
    wakers: Vec<Arc<dyn Waker>>,
    /// The distinct backend descriptions ("io_uring (...)", "epoll (...)").
    describe: String,
    /// Their short names, for the metrics ("io_uring", "io_uring+epoll").
    kinds: String,
    /// Connections every backend can hold, summed (None: one of them has no fixed table).
    tables: Option<usize>,
    failure: Option<anyhow::Error>,
}

fn wait_ready(rx: &mpsc::Receiver<anyhow::Result<Ready>>, threads: usize) -> Started {
    let mut s = Started {
        wakers: Vec::new(),
        describe: String::new(),
        kinds: String::new(),
        tables: Some(0),
        failure: None,
    };
    let mut describes: Vec<String> = Vec::new();
    for r in rx.iter().take(threads) {
        match r {
            Ok(ready) => {
                s.wakers.push(ready.waker);
                if !describes.contains(&ready.describe) {
                    describes.push(ready.describe);
                }
                s.tables = s.tables.zip(ready.max_connections).map(|(a, b)| a + b);
            }
            Err(e) => s.failure = s.failure.or(Some(e)),
        }
    }
    s.describe = describes.join(" + ");
    s.kinds = describes
        .iter()
        .map(|d| d.split(' ').next().unwrap_or(d))
        .collect::<Vec<_>>()
        .join("+");
    s
}

/// One worker thread: register this thread's listeners, report ready, run the loop.
fn serve_on<B: Backend>(
    mut backend: B,
    socks: Vec<TcpListener>,
    cfg: Config,
    stop: Arc<AtomicBool>,
    ready: &mpsc::Sender<anyhow::Result<Ready>>,
) -> anyhow::Result<Stats> {
    let mut ids = Vec::new();
    for s in socks {
        match backend.add_listener(s) {
            Ok(id) => ids.push(id),
            Err(e) => {
                let e = anyhow::Error::new(e).context("registering a listener");
                let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        }
    }
    let _ = ready.send(Ok(Ready {
        waker: backend.waker(),
        describe: backend.describe(),
        max_connections: backend.max_connections(),
    }));
    Worker::new(backend, &ids, cfg, stop).run().map_err(|e| {
        stop_after_worker_failure();
        anyhow::Error::new(e).context("a worker failed")
    })
}

/// A worker's backend failed for good (the worker has said why and given its connections'
/// places back): stop the whole server the way SIGTERM does, so the other workers finish
/// their connections' echoes and the operator sees one clear exit instead of a server that
/// quietly runs on with a thread fewer. Signals are blocked in every thread but the signal
/// thread, so this is taken there even if it comes before that thread starts.
fn stop_after_worker_failure() {
    tracing::error!("stopping the server: a worker failed (see above)");
    #[cfg(unix)]
    if let Err(e) =
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
    {
        tracing::error!(error = %e, "could not signal the stop");
    }
}

fn start_udp(
    args: &Args,
    socks: Vec<std::net::UdpSocket>,
    stop: &Arc<AtomicBool>,
    live: Option<&Arc<LiveStats>>,
) -> anyhow::Result<Vec<JoinHandle<UdpStats>>> {
    if socks.is_empty() {
        return Ok(Vec::new());
    }
    let limits = echoport_core::udp::UdpLimits {
        per_source_rate: args.udp_rate,
        per_source_burst: (args.udp_rate * 2.0).max(1.0),
        global_rate: args.udp_global_rate,
        ..Default::default()
    };
    crate::udp::spawn(socks, limits, stop.clone(), live)
}

/// The start-up line: which backend serves (and why not io_uring when it is not), and every
/// value in effect, with what was rounded; then `listening on ADDR` for each address.
fn log_start(
    args: &Args,
    s: &Settings,
    chosen: &crate::backends::Chosen,
    started: &Started,
    capacity: &Capacity,
    mode: ListenerMode,
    addrs: &[SocketAddr],
) {
    let addrs_list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let adjusted = (!s.adjusted.is_empty()).then(|| s.adjusted.join("; "));
    // With --proxy-protocol: who may send headers, as in effect (the default included).
    let proxy_from = s.proxy.as_ref().map(|p| {
        let list: Vec<String> = p.from.iter().map(|c| c.to_string()).collect();
        list.join(",")
    });
    tracing::info!(
        backend = %started.describe,
        why_not_io_uring = chosen.fallback.as_ref().map(display),
        threads = s.threads,
        listener = %mode.name(),
        max_connections = capacity.max,
        max_connections_from = %capacity.from,
        rings_per_thread = started.tables.map(|_| capacity.plan.rings),
        ring_table = started.tables.map(|_| capacity.plan.table),
        machine_limit = capacity.plan.machine.max,
        machine_limit_from = %capacity.plan.machine.from,
        nofile = echoport_io::sys::nofile_limit(),
        buf_size = args.buf_size,
        buffers = args.buffers,
        cq_entries = args.cq_entries,
        max_pending = args.max_pending,
        shutdown_timeout = %settings::show(Some(s.shutdown_timeout)),
        idle_timeout = %settings::show(s.idle_timeout),
        write_timeout = %settings::show(s.write_timeout),
        proxy_from = proxy_from.as_ref().map(display),
        proxy_timeout = s.proxy.as_ref().map(|p| settings::show(Some(p.timeout))).map(display),
        adjusted = adjusted.as_ref().map(display),
        addrs = %addrs_list,
        "echoport serving"
    );
    for a in addrs {
        // Exactly "listening on ADDR": scripts read the address from the end of the line.
        tracing::info!("listening on {a}");
    }
}

/// Joins every worker: the summed counters, each thread's accepted count, the first error.
fn join_workers(
    handles: Vec<JoinHandle<anyhow::Result<Stats>>>,
) -> (Stats, String, Option<anyhow::Error>) {
    let mut total = Stats::default();
    let mut accepted = Vec::with_capacity(handles.len());
    let mut error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => {
                total.merge(&s);
                accepted.push(s.accepted.to_string());
            }
            Ok(Err(e)) => error = error.or(Some(e)),
            Err(_) => error = error.or(Some(anyhow::anyhow!("a worker thread panicked"))),
        }
    }
    (total, accepted.join(","), error)
}
